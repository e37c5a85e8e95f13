"""Orbax checkpoints of the training state and the data iterator's position.

A checkpoint holds only what training changes: the trainable parameters, the optimizer state, the
dropout RNG counters, the text tower's calibrated feature statistics and the data iterator state.
The frozen LLM comes from its own checkpoint file on restore, so a SmolLM2 run saves a few MB per
step instead of the whole model.

Saves are asynchronous and atomic: Orbax writes each step into a temporary folder and renames it
to the step number once every file is on disk. A process killed during a save leaves only the
temporary folder, which `latest_step` ignores and the next start deletes. The manager keeps the
last `keep` checkpoints plus the `keep_best` best ones by a metric recorded with each save.
"""

from __future__ import annotations

import logging
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from clamp_jax.models.text_tower import FeatureStat

STATE_ITEM = 'state'
DATA_ITEM = 'data'
BEST_MODES = ('min', 'max')


def flatten_state(state: nnx.State) -> dict[str, jax.Array]:
  """`{'a/b/0/c': array}` from an nnx State; string keys keep Orbax's tree paths stable."""
  return {'/'.join(str(p) for p in path): variable.get_value()
          for path, variable in nnx.to_flat_state(state)}


def unflatten_into(state: nnx.State, flat: dict[str, jax.Array]) -> None:
  """Write `flat` arrays back into the variables of `state` (in place); keys must match exactly."""
  expected = {'/'.join(str(p) for p in path): variable
              for path, variable in nnx.to_flat_state(state)}
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise ValueError(
        f'Checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}. '
        'Was it written with a different config?')
  for key, variable in expected.items():
    variable.set_value(flat[key])


class Checkpointer:
  """Saves and restores `{trainable, optimizer, rng_counts, feature_stats}` and the data state."""

  def __init__(self, directory: str, *, keep: int, keep_best: int = 0, best_metric: str = '',
               best_mode: str = 'max'):
    """Keep the last `keep` checkpoints and, with `keep_best > 0`, the `keep_best` checkpoints
    with the best `best_metric` ('min' or 'max' by `best_mode`) among the metrics saved with them.

    A checkpoint whose metrics lack `best_metric` ranks below every checkpoint that has it.
    """
    self.directory = os.path.abspath(directory)
    if keep < 1:
      raise ValueError(f'keep={keep} must be at least 1, so that training can resume.')
    if best_mode not in BEST_MODES:
      raise ValueError(f'best_mode={best_mode!r} is not one of {BEST_MODES}.')
    if keep_best > 0 and not best_metric:
      raise ValueError(f'keep_best={keep_best} needs a best_metric to rank checkpoints by.')
    policy = ocp.checkpoint_managers
    policies = [policy.LatestN(n=keep)]
    best_fn = None
    if keep_best > 0:
      best_fn = metric_getter(best_metric, best_mode)
      policies.append(policy.BestN(get_metric_fn=best_fn, reverse=best_mode == 'min',
                                   n=keep_best, keep_checkpoints_without_metrics=False))
    # `best_fn` also makes Orbax write each save's metrics next to its items.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy.AnyPreservationPolicy(policies), best_fn=best_fn,
        best_mode=best_mode, create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=(STATE_ITEM, DATA_ITEM))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints on disk, in increasing order."""
    return sorted(self.manager.all_steps())

  def metrics(self, step: int) -> dict | None:
    """Return the metrics saved with step `step`, or None when none were saved (`keep_best=0`)."""
    return self.manager.metrics(step)

  def save(self, step: int, *, model, optimizer, trainable, data_state: dict,
           metrics: dict[str, float] | None = None) -> None:
    """Start an asynchronous save of step `step`; `wait()` blocks until it is on disk.

    `metrics` (name to number) rank the checkpoint for `keep_best`.
    """
    tree = {
        'trainable': flatten_state(nnx.state(model, trainable)),
        'optimizer': flatten_state(nnx.state(optimizer)),
        'rng_counts': flatten_state(nnx.state(model, nnx.RngCount)),
        'feature_stats': flatten_state(nnx.state(model, FeatureStat)),
    }
    self.manager.save(
        step,
        args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(tree),
                                   DATA_ITEM: ocp.args.JsonSave(_jsonable(data_state))}),
        metrics=_jsonable(metrics) if metrics else None, force=True)
    logging.info('Saving checkpoint for step %d to %s', step, self.directory)

  def restore(self, step: int, *, model, optimizer, trainable) -> dict:
    """Restore step `step` into `model` and `optimizer` in place; returns the data state.

    Each array is read straight into the sharding of the variable it replaces, so a checkpoint
    saved on one mesh restores onto the mesh that `model` and `optimizer` are placed on now.
    """
    target = {
        'trainable': flatten_state(nnx.state(model, trainable)),
        'optimizer': flatten_state(nnx.state(optimizer)),
        'rng_counts': flatten_state(nnx.state(model, nnx.RngCount)),
        'feature_stats': flatten_state(nnx.state(model, FeatureStat)),
    }
    abstract = jax.tree.map(target_struct, target)
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract),
                                   DATA_ITEM: ocp.args.JsonRestore()}))
    tree = restored[STATE_ITEM]
    trainable_state = nnx.state(model, trainable)
    unflatten_into(trainable_state, tree['trainable'])
    nnx.update(model, trainable_state)
    for key, variable_type in (('rng_counts', nnx.RngCount), ('feature_stats', FeatureStat)):
      state = nnx.state(model, variable_type)
      unflatten_into(state, tree[key])
      nnx.update(model, state)
    optimizer_state = nnx.state(optimizer)
    unflatten_into(optimizer_state, tree['optimizer'])
    nnx.update(optimizer, optimizer_state)
    logging.info('Restored checkpoint for step %d from %s', step, self.directory)
    return restored[DATA_ITEM]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Wait for pending work and release the manager's threads."""
    # Orbax removes unfinished temporary directories of earlier runs in a thread that the manager
    # starts, and its close() does not wait for that thread. An interpreter exit while the thread
    # runs prints a traceback, so wait for it here.
    cleanup = getattr(self.manager, '_cleanup_tmp_directory_future', None)
    if cleanup is not None:
      cleanup.result()
    self.manager.close()


def target_struct(array: jax.Array) -> jax.ShapeDtypeStruct:
  """Shape, dtype and sharding that Orbax restores `array`'s replacement into."""
  return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=array.sharding)


def metric_getter(name: str, mode: str):
  """Return `get(metrics) -> float` for ranking; a missing or non-finite value ranks worst."""
  worst = -math.inf if mode == 'max' else math.inf

  def get(metrics) -> float:
    value = (metrics or {}).get(name)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
      return worst
    return float(value)

  return get


def _jsonable(value):
  """Convert numpy scalars and bytes in an iterator state to JSON types."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, bytes):
    return value.decode('utf-8')
  return value
