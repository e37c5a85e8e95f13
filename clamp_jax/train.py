"""CLAMP training: set up, restore, step, log, checkpoint, evaluate.

Only the parameters matched by the config's trainable patterns get gradients and AdamW state: LoRA,
prompts, pooler, projection, temperature, and the image tower when unlocked. The base LLM is frozen
and never receives a gradient.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from clamp_jax import build, parallel
from clamp_jax.checkpointing import Checkpointer
from clamp_jax.data.captions import CaptionTokenizer
from clamp_jax.data.train_data import make_train_dataset, uses_caption_table
from clamp_jax.evaluation.suite import make_periodic_evaluator, metric_records, run_evaluation
from clamp_jax import step as step_lib
from clamp_jax.metrics import MetricWriter
from clamp_jax.preemption import StopWatch
from clamp_jax.step import CAPTION_KEYS, CompiledStep, StepOptions


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------


def make_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from zero to the peak rate, then cosine decay to zero at the last step."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_config.learning_rate,
      warmup_steps=train_config.warmup_steps,
      decay_steps=max(train_config.steps, train_config.warmup_steps + 1), end_value=0.0)


def make_optimizer(model: nnx.Module, train_config: ml_collections.ConfigDict,
                   trainable) -> nnx.Optimizer:
  """AdamW on the trainable parameters with the config's schedule and global-norm clipping.

  Weight decay applies to matrices only (ndim >= 2); biases, norm scales and the temperature are
  not decayed, as in CLIP.
  """
  schedule = make_schedule(train_config)
  decay_mask = lambda params: jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)
  parts = []
  if train_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(train_config.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2,
                           weight_decay=train_config.weight_decay, mask=decay_mask))
  return nnx.Optimizer(model, optax.chain(*parts), wrt=trainable)


# ----------------------------------------------------------------------------------------------
# Step
# ----------------------------------------------------------------------------------------------


def step_options(config: ml_collections.ConfigDict) -> StepOptions:
  return StepOptions(loss=config.train.loss, sharded_loss=config.train.sharded_loss,
                     microbatches=config.train.microbatches,
                     distill_weight=config.train.distill_weight)


def make_train_step(model, optimizer, trainable, config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh, batch: dict) -> CompiledStep:
  """Build the jitted step for batches shaped like `batch` (a dict of device arrays)."""
  replicated = replicated_keys(config)
  return step_lib.make_train_step(model, optimizer, trainable, step_options(config), mesh,
                                  config.mesh.rules, tuple(batch), replicated)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def make_caption_tokenizer(config: ml_collections.ConfigDict, tokenizer,
                           teacher_tokenize=None) -> CaptionTokenizer:
  """Build the LLM's caption tokenizer. With `teacher_tokenize(captions) -> (ids, mask)` it also
  adds the teacher's tokens of the raw captions, for distillation."""
  return CaptionTokenizer(tokenizer, config.data.caption_wrapper, config.data.max_length,
                          teacher=teacher_tokenize)


def make_train_data(config: ml_collections.ConfigDict, caption_tokenizer: CaptionTokenizer):
  return make_train_dataset(config, caption_tokenizer)


def replicated_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Batch entries every device gets whole: the caption table, when the data carries one."""
  return CAPTION_KEYS if uses_caption_table(config) else ()


@dataclasses.dataclass
class TrainingSetup:
  """Everything a train or eval run builds before its first step."""

  mesh: jax.sharding.Mesh
  model: nnx.Module
  tokenizer: object
  trainable: object
  optimizer: nnx.Optimizer
  checkpointer: Checkpointer
  # Tokenizes raw captions for the distillation teacher; None without a teacher.
  teacher_tokenize: object = None


def set_up(config: ml_collections.ConfigDict, workdir: str) -> TrainingSetup:
  """Build the mesh, the sharded model, its optimizer and the checkpointer of WORKDIR."""
  logging.info('Building the model (LLM: %s).', config.model.llm)
  mesh = parallel.make_mesh(config.mesh)
  # The batch check needs no model, so a misfit batch fails before the LLM loads.
  parallel.validate_mesh_for_model(mesh, config.mesh.rules, batch_size=config.train.batch_size,
                                   num_heads=None, num_kv_heads=None)
  # Checkpoint tensors go into their shards as they are read; place_model then moves the
  # remaining (new) parameters onto the mesh.
  model, tokenizer = build.build_model(
      config, place=parallel.sharded_placer(mesh, config.mesh.rules))
  place_model(model, mesh, config)
  teacher_tokenize = None
  if config.model.teacher:
    teacher_tokenize = attach_teacher(model, config, mesh)
  trainable = build.trainable_filter(build.trainable_patterns(config))
  optimizer = make_optimizer(model, config.train, trainable)
  # Adam's moments follow their parameters' shardings; the step counters are replicated.
  parallel.shard_module(optimizer, mesh, config.mesh.rules)
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'),
                              keep=config.train.keep_checkpoints,
                              keep_best=config.train.keep_best_checkpoints,
                              best_metric=config.train.best_metric,
                              best_mode=config.train.best_mode)
  return TrainingSetup(mesh, model, tokenizer, trainable, optimizer, checkpointer,
                       teacher_tokenize)


def attach_teacher(model, config: ml_collections.ConfigDict, mesh):
  """Load the frozen CLIP teacher of `config.model.teacher` into its shards and attach it to
  `model`; return the function that tokenizes raw captions for it."""
  from clamp_jax.weights.clip_teacher import load_clip_teacher, tokenize

  logging.info('Loading the distillation teacher from %s.', config.model.teacher)
  teacher, teacher_tokenizer = load_clip_teacher(
      config.model.teacher, place=parallel.sharded_placer(mesh, config.mesh.rules),
      dtype=config.model.vit.dtype, param_dtype=config.model.vit.param_dtype)
  model.teacher = teacher
  length = teacher.text_encoder.config.max_length
  return lambda captions: tokenize(teacher_tokenizer, captions, length)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Restore the latest checkpoint in WORKDIR/checkpoints and run zero-shot evaluation."""
  from clamp_jax.export import restore_latest

  setup, step = restore_latest(config, workdir, required=True)
  return run_evaluation(setup.model, make_caption_tokenizer(config, setup.tokenizer), config,
                        workdir, step)


def place_model(model, mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict) -> None:
  """Check that the batch and the LLM's heads fit `mesh`, then shard the model onto it."""
  llm_config = model.text_tower.llm.config
  parallel.validate_mesh_for_model(mesh, config.mesh.rules, batch_size=config.train.batch_size,
                                   num_heads=llm_config.num_attention_heads,
                                   num_kv_heads=llm_config.num_key_value_heads)
  parallel.shard_module(model, mesh, config.mesh.rules)
  logging.info('Mesh %s over %d devices.', dict(mesh.shape), mesh.size)


def calibrate_text_tower(model, batch) -> None:
  """Standardise the pooler's input with statistics of one batch's captions (see `calibrate`)."""
  logging.info('Calibrating the text tower on %d captions.', len(batch['input_ids']))
  nnx.jit(lambda tower, ids, mask: tower.calibrate(ids, mask))(
      model.text_tower, batch['input_ids'], batch['attention_mask'])


# ----------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train for `config.train.steps` steps (resuming from WORKDIR/checkpoints), then evaluate.

  Returns the last logged training metrics and, when evaluation ran, its results under 'eval'.
  """
  train_config = config.train
  setup = set_up(config, workdir)
  mesh, model, trainable = setup.mesh, setup.model, setup.trainable
  optimizer, checkpointer = setup.optimizer, setup.checkpointer
  try:
    num_trainable = build.count_parameters(model, trainable)
    num_total = build.count_parameters(model, nnx.Param)
    logging.info('Trainable parameters: %s of %s.', f'{num_trainable:,}', f'{num_total:,}')
    if num_trainable == 0:
      raise ValueError(
          f'config.train.trainable={list(train_config.trainable)} matches no parameter.')
    caption_tokenizer = make_caption_tokenizer(config, setup.tokenizer, setup.teacher_tokenize)
    dataset = make_train_data(config, caption_tokenizer)
    data_iter = iter(dataset)

    start_step = checkpointer.latest_step() or 0
    replicated = replicated_keys(config)
    if not start_step and config.model.calibrate_text_features:
      first = iter(dataset)
      calibrate_text_tower(model, split_data_counters(next(first), mesh, config.mesh.rules,
                                                      replicated)[0])
      close_iterator(first)
    if start_step:
      data_state = checkpointer.restore(start_step, model=model, optimizer=optimizer,
                                        trainable=trainable)
      data_iter.set_state(data_state)
      logging.info('Resuming from step %d of %d.', start_step, train_config.steps)

    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    model.train()
    batches = (split_data_counters(batch, mesh, config.mesh.rules, replicated)
               for batch in data_iter)
    make_step = lambda batch: make_train_step(model, optimizer, trainable, config, mesh, batch)
    evaluate = make_periodic_evaluator(model, caption_tokenizer, config, workdir, writer)
    stop_watch = StopWatch()
    with stop_watch:
      last_metrics = run_train_loop(model, optimizer, data_iter, batches, make_step, checkpointer,
                                    writer, train_config, start_step, trainable, evaluate,
                                    stop_watch)
    checkpointer.wait()
    close_iterator(data_iter)

    results = {'train': last_metrics}
    # A stop request skips the evaluation at the end too; the rerun runs it.
    finished = ((checkpointer.latest_step() or 0) >= train_config.steps
                and stop_watch.stop_reason is None)
    if not finished:
      logging.info('Stopped at step %d of %d; rerun the same command to resume.',
                   checkpointer.latest_step() or 0, train_config.steps)
    if finished and config.eval.at_end and jax.process_count() > 1:
      # NOTE: zero-shot evaluation feeds process-local arrays, so it runs in one process only.
      logging.warning('Skipping zero-shot evaluation in a %d-process run; run config.mode=eval '
                      'from one process.', jax.process_count())
    elif finished and config.eval.at_end:
      model.eval()
      results['eval'] = run_evaluation(model, caption_tokenizer, config, workdir,
                                       train_config.steps)
      writer.write(train_config.steps, metric_records(results['eval']))
    writer.close()
  finally:
    # Waits for a save in flight, so an error after a save still leaves that checkpoint whole.
    checkpointer.close()
  return results


def close_iterator(iterator) -> None:
  """Stop a data iterator's worker processes, if it has any."""
  close = getattr(iterator, 'close', None)
  if close is not None:
    close()


def split_data_counters(batch: dict, mesh, rules, replicated) -> tuple[dict, dict]:
  """Put a host batch on the mesh; entries named 'data/...' (input counters) stay on the host."""
  counters = {key: value for key, value in batch.items() if key.startswith('data/')}
  arrays = {key: value for key, value in batch.items() if not key.startswith('data/')}
  return parallel.place_batch(arrays, mesh, rules, replicated), counters


def run_train_loop(model, optimizer, data_iter, batches, make_step, checkpointer, writer,
                   train_config, start_step, trainable, evaluate=None,
                   stop_watch: StopWatch | None = None) -> dict:
  """Step from `start_step` to `train_config.steps`, logging and checkpointing on schedule.

  `batches` yields `(device batch, input counters)` drawn from `data_iter`, whose state is saved
  with each checkpoint. `make_step(batch)` builds the jitted step on the first batch.
  `evaluate(step)`, when given, runs after each step's logging and before its checkpoint, so the
  checkpoint's metrics include what it wrote. When `stop_watch.check(step)` reports a stop
  request, the loop logs and saves that step, waits for the save to finish and returns.
  """
  total = train_config.steps
  end = min(total, train_config.stop_after_steps or total)
  schedule = make_schedule(train_config)
  batch_size = train_config.batch_size
  last = {}
  progress = tqdm(total=total, initial=start_step, desc='train', unit='step', dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  window_start, window_steps = time.perf_counter(), 0
  train_step = None
  for step in range(start_step + 1, end + 1):
    batch, counters = next(batches)
    if train_step is None:
      train_step = make_step(batch)
    metrics = train_step(model, optimizer, batch)
    window_steps += 1
    progress.update(1)
    stop_reason = stop_watch.check(step) if stop_watch is not None else None

    if step % train_config.log_every == 0 or step == end or stop_reason:
      metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
      metrics.update({name: int(value) for name, value in counters.items()})
      if not math.isfinite(metrics['train/loss']):
        raise NonFiniteLossError(
            f'train/loss is {metrics["train/loss"]} at step {step}; lower '
            f'train.learning_rate (now {train_config.learning_rate}) or check the data.')
      elapsed = time.perf_counter() - window_start
      metrics['perf/samples_per_second'] = window_steps * batch_size / elapsed
      metrics['perf/step_seconds'] = elapsed / window_steps
      metrics['train/learning_rate'] = float(schedule(step - 1))  # optax counts from 0.
      writer.write(step, metrics)
      progress.set_postfix(loss=f'{metrics["train/loss"]:.4f}',
                           temp=f'{metrics["train/logit_scale"]:.1f}',
                           samples_s=f'{metrics["perf/samples_per_second"]:.1f}')
      last = {'step': step, **metrics}
      window_start, window_steps = time.perf_counter(), 0

    if evaluate is not None and not stop_reason:
      evaluate(step)
    if step % train_config.checkpoint_every == 0 or step == end or stop_reason:
      checkpointer.save(step, model=model, optimizer=optimizer, trainable=trainable,
                        data_state=data_iter.get_state(),
                        metrics=checkpoint_metrics(metrics, writer, step))
    if stop_reason:
      checkpointer.wait()
      logging.info('Stopped at step %d on %s; the checkpoint is saved in %s. Rerun the same '
                   'command to resume.', step, stop_reason, checkpointer.directory)
      break
  progress.close()
  return last


def checkpoint_metrics(step_metrics: dict, writer: MetricWriter, step: int) -> dict[str, float]:
  """Collect the step's training metrics plus what `writer` recorded for `step` (evaluation)."""
  values = {name: float(value) for name, value in jax.device_get(step_metrics).items()}
  values.update(writer.values_at(step))
  return values
