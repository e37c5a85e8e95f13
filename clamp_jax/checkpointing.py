"""Orbax checkpoints of the training state and the data iterator's position.

A checkpoint holds only what training changes: the trainable parameters, the optimizer state, the
dropout RNG counters, the text tower's calibrated feature statistics and the data iterator state.
The frozen LLM comes from its own checkpoint file on restore, so a SmolLM2 run saves a few MB per
step instead of the whole model.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from clamp_jax.models.text_tower import FeatureStat

STATE_ITEM = 'state'
DATA_ITEM = 'data'


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

  def __init__(self, directory: str, *, keep: int):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=(STATE_ITEM, DATA_ITEM))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, *, model, optimizer, trainable, data_state: dict) -> None:
    """Start an asynchronous save of step `step`; `wait()` blocks until it is on disk."""
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
        force=True)
    logging.info('Saving checkpoint for step %d to %s', step, self.directory)

  def restore(self, step: int, *, model, optimizer, trainable) -> dict:
    """Restore step `step` into `model` and `optimizer` in place; returns the data state."""
    target = {
        'trainable': flatten_state(nnx.state(model, trainable)),
        'optimizer': flatten_state(nnx.state(optimizer)),
        'rng_counts': flatten_state(nnx.state(model, nnx.RngCount)),
        'feature_stats': flatten_state(nnx.state(model, FeatureStat)),
    }
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
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
    self.manager.close()


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
