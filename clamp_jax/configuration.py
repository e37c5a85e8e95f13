"""Config and workdir checks that run before any model is built or compiled.

Each check raises `ConfigError` with one line that names the field, its value and the fix.
"""

from __future__ import annotations

import os
import uuid

import ml_collections

from clamp_jax.data.source_config import validate_train_source
from clamp_jax.evaluation.benchmarks import check_data, expand_names
from clamp_jax.modes import MODES

DTYPES = ('float32', 'bfloat16')
# Kept in step with clamp_jax.models.layers.REMAT_CHOICES, which needs JAX to import.
REMAT_CHOICES = ('none', 'full', 'dots', 'dots_no_batch')
# Kept in step with clamp_jax.models.llama.ATTENTION_KERNELS.
ATTENTION_KERNELS = ('einsum', 'xla', 'cudnn', 'onednn')
# Kept in step with clamp_jax.models.layers.MATMUL_BACKENDS.
MATMUL_BACKENDS = ('xla', 'onednn')


class ConfigError(ValueError):
  """A config value or the workdir cannot work."""


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _positive(config: ml_collections.ConfigDict, name: str) -> None:
  value = config
  for part in name.split('.'):
    value = value[part]
  _require(isinstance(value, (int, float)) and value > 0,
           f'config.{name}={value!r} must be a positive number.')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Reject configs that would fail later, naming the field and the fix."""
  _require(config.mode in MODES, f'config.mode={config.mode!r} is not one of {tuple(MODES)}.')
  for name in ('train.steps', 'train.batch_size', 'train.learning_rate', 'train.log_every',
               'train.checkpoint_every', 'train.keep_checkpoints', 'model.embed_dim',
               'model.num_prompts', 'model.pooler_heads', 'model.lora.rank',
               'model.vit.image_size', 'model.vit.patch_size', 'model.vit.width',
               'model.vit.layers', 'model.vit.heads', 'data.max_length', 'eval.batch_size',
               'eval.text_batch_size', 'eval.read_threads'):
    _positive(config, name)

  train = config.train
  _require(0 <= train.warmup_steps <= train.steps,
           f'config.train.warmup_steps={train.warmup_steps} must be between 0 and '
           f'config.train.steps={train.steps}.')
  _require(train.stop_after_steps >= 0,
           f'config.train.stop_after_steps={train.stop_after_steps} must be >= 0 (0 runs to '
           'config.train.steps).')
  _require(train.grad_clip_norm >= 0,
           f'config.train.grad_clip_norm={train.grad_clip_norm} must be >= 0 (0 disables it).')
  _require(len(train.trainable) > 0, 'config.train.trainable is empty: nothing would train.')
  _require(isinstance(train.keep_best_checkpoints, int) and train.keep_best_checkpoints >= 0,
           f'config.train.keep_best_checkpoints={train.keep_best_checkpoints!r} must be an '
           'integer >= 0 (0: keep only the most recent checkpoints).')
  _require(train.best_mode in ('min', 'max'),
           f"config.train.best_mode={train.best_mode!r} must be 'min' or 'max'.")
  if train.keep_best_checkpoints > 0:
    _require(bool(train.best_metric),
             'config.train.best_metric is empty; name the metric that ranks checkpoints, e.g. '
             "'train/loss'.")
  _validate_export_and_generate(config)

  _require(train.loss in ('softmax', 'sigmoid'),
           f"config.train.loss={train.loss!r} must be 'softmax' or 'sigmoid'.")
  _require(isinstance(train.microbatches, int) and train.microbatches >= 1,
           f'config.train.microbatches={train.microbatches!r} must be an integer >= 1.')
  _require(train.batch_size % train.microbatches == 0,
           f'config.train.batch_size={train.batch_size} is not divisible by '
           f'config.train.microbatches={train.microbatches}.')
  if train.loss == 'sigmoid' and config.data.train.kind == 'digits':
    _require(not config.data.caption_table,
             'config.train.loss=sigmoid needs one caption per image; set '
             'config.data.caption_table=False.')
  if config.model.teacher and config.data.train.kind == 'digits':
    _require(not config.data.caption_table,
             f'config.model.teacher={config.model.teacher!r} needs one caption per image; set '
             'config.data.caption_table=False.')
  _require(train.distill_weight >= 0,
           f'config.train.distill_weight={train.distill_weight} must be >= 0.')
  _require(config.model.attention in ATTENTION_KERNELS,
           f'config.model.attention={config.model.attention!r} is not one of '
           f'{ATTENTION_KERNELS}.')
  _require(config.model.matmul in MATMUL_BACKENDS,
           f'config.model.matmul={config.model.matmul!r} is not one of {MATMUL_BACKENDS}.')
  _require(config.model.remat in REMAT_CHOICES,
           f'config.model.remat={config.model.remat!r} is not one of {REMAT_CHOICES}.')
  _require(config.distributed.initialize in ('auto', 'yes', 'no'),
           f"config.distributed.initialize={config.distributed.initialize!r} must be 'auto', "
           "'yes' or 'no'.")
  if config.mode == 'plan':
    _require(config.plan.devices >= 0,
             f'config.plan.devices={config.plan.devices} must be >= 0 (0: the real devices).')
    _require(config.plan.device_memory_gib > 0,
             f'config.plan.device_memory_gib={config.plan.device_memory_gib} must be positive.')
    _require(0 < config.plan.usable_fraction <= 1,
             f'config.plan.usable_fraction={config.plan.usable_fraction} must be in (0, 1].')

  vit = config.model.vit
  _require(vit.image_size % vit.patch_size == 0,
           f'config.model.vit.image_size={vit.image_size} is not divisible by '
           f'config.model.vit.patch_size={vit.patch_size}.')
  _require(vit.width % vit.heads == 0,
           f'config.model.vit.width={vit.width} is not divisible by '
           f'config.model.vit.heads={vit.heads}.')
  _require(vit.act in ('gelu', 'quick_gelu'),
           f"config.model.vit.act={vit.act!r} must be 'gelu' or 'quick_gelu'.")

  for name in ('llm_dtype', 'llm_param_dtype', 'vit.dtype', 'vit.param_dtype'):
    section, _, key = name.rpartition('.')
    value = (config.model[section] if section else config.model)[key]
    _require(value in DTYPES, f'config.model.{name}={value!r} is not one of {DTYPES}.')
  _require(0 <= config.model.lora.dropout < 1,
           f'config.model.lora.dropout={config.model.lora.dropout} must be in [0, 1).')
  if config.model.llm == 'random':
    random_llm = config.model.random_llm
    _require(random_llm.hidden_size % config.model.pooler_heads == 0,
             f'config.model.random_llm.hidden_size={random_llm.hidden_size} is not divisible '
             f'by config.model.pooler_heads={config.model.pooler_heads}.')

  try:
    if config.mode != 'plan':  # Plan mode reads no data, so the files need not exist here.
      validate_train_source(config.data.train)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  _require('{caption}' in config.data.caption_wrapper,
           f'config.data.caption_wrapper={config.data.caption_wrapper!r} has no {{caption}} '
           'field to put the caption in.')
  for field in ('data.templates', 'eval.templates'):
    section, key = field.split('.')
    templates = config[section][key]
    _require(len(templates) > 0, f'config.{field} is empty.')
    for template in templates:
      _require('{}' in template,
               f'config.{field} entry {template!r} has no {{}} field for the class name.')
  evaluation = config.eval
  _require(len(evaluation.datasets) > 0,
           "config.eval.datasets is empty; name at least one benchmark, e.g. ('digits',).")
  _require(evaluation.source in ('auto', 'folder', 'tfds'),
           f"config.eval.source={evaluation.source!r} must be 'auto', 'folder' or 'tfds'.")
  for name in ('every_steps', 'periodic_max_images'):
    _require(isinstance(evaluation[name], int) and evaluation[name] >= 0,
             f'config.eval.{name}={evaluation[name]!r} must be an integer >= 0 (0: off).')
  # Missing evaluation data fails here, before a long training run or a large model load.
  evaluates = config.mode == 'eval' or (
      config.mode == 'train' and (evaluation.at_end or evaluation.every_steps > 0))
  if evaluates:
    names = expand_names(tuple(evaluation.datasets) + tuple(evaluation.periodic_datasets))
    try:
      check_data(names, evaluation.data_dir, evaluation.source)
    except FileNotFoundError as error:
      raise ConfigError(str(error)) from None
  _require(0 < config.data.test_fraction < 1,
           f'config.data.test_fraction={config.data.test_fraction} must be in (0, 1).')


def _validate_export_and_generate(config: ml_collections.ConfigDict) -> None:
  export = config.export
  _require(isinstance(export.max_shard_bytes, int) and export.max_shard_bytes > 0,
           f'config.export.max_shard_bytes={export.max_shard_bytes!r} must be a positive '
           'integer.')
  _require(export.dtype in ('', *DTYPES),
           f"config.export.dtype={export.dtype!r} must be '' (the LLM's dtype) or one of "
           f'{DTYPES}.')
  generate = config.generate
  _require(isinstance(generate.max_new_tokens, int) and generate.max_new_tokens >= 1,
           f'config.generate.max_new_tokens={generate.max_new_tokens!r} must be an integer '
           '>= 1.')
  _require(generate.temperature >= 0,
           f'config.generate.temperature={generate.temperature} must be >= 0 (0: greedy).')
  _require(0 < generate.top_p <= 1,
           f'config.generate.top_p={generate.top_p} must be in (0, 1].')
  if config.mode == 'generate':
    _require(len(generate.prompts) > 0 and all(isinstance(p, str) for p in generate.prompts),
             f'config.generate.prompts={generate.prompts!r} must be a non-empty tuple of '
             'strings.')


def validate_workdir(workdir: str) -> None:
  """Create `workdir` if needed and check that files can be written there."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write-test-{uuid.uuid4().hex}')
    with open(probe, 'w', encoding='utf-8') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(
        f'--workdir={workdir} is not writable ({e.strerror}); pass a folder you can write to.'
    ) from e
