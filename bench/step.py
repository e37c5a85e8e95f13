"""Time the CLAMP training step on synthetic batches: forward, loss, backward and AdamW update.

The step is the one training runs (`clamp_jax.train.make_train_step`): the text tower with LoRA and
read-only prompts, the image tower, the symmetric contrastive loss and the optimizer update, as one
jitted function. Batches are random arrays of the training data's shapes, one caption per image
(`data.caption_table=False`), made before timing starts, so data loading is not timed.

Run from the repository root:

    python bench/step.py --batch_size=64 --caption_length=32 --dtype=float32 --steps=10

It first measures the machine's `jnp.dot` rate per dtype, then prints per point: compile time,
median step time, samples/s, LLM tokens/s (padded caption plus prompts), FLOPs per step from the
compiler's cost analysis, MFU and peak resident memory. The last line is one JSON object.
`--sweep_batch_sizes` and `--sweep_caption_lengths` time several shapes with one loaded model, and
`--config.*` overrides any config field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

from absl import app, flags
from ml_collections import config_flags

import common

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(REPOSITORY, 'configs', 'smollm2_digits.py'),
    'ml_collections config file of the model; --config.FIELD=VALUE overrides a field.',
    lock_config=True)
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', None, 'Image-caption pairs per step; default: config.train.batch_size.')
_CAPTION_LENGTH = flags.DEFINE_integer(
    'caption_length', None, 'Tokens per caption, padding included; the prompts come on top. '
    'Default: config.data.max_length.')
_DTYPE = flags.DEFINE_enum(
    'dtype', 'float32', ['float32', 'bfloat16'],
    'Compute dtype of both towers (model.llm_dtype and model.vit.dtype). Weights keep the '
    "config's storage dtype.")
_LLM_WEIGHTS = flags.DEFINE_enum(
    'llm_weights', 'config', ['config', 'compute'],
    "Storage dtype of the frozen LLM's weights: 'config' keeps model.llm_param_dtype, 'compute' "
    'stores them in --dtype. The trainable parameters keep theirs.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per point; at least 5.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps per point after compiling.')
_MATMUL_SIZE = flags.DEFINE_integer('matmul_size', 2048,
                                    'Side of the square matrices of the matmul rate test.')
_MATMUL_REPEATS = flags.DEFINE_integer('matmul_repeats', 7,
                                       'Timed matmuls per dtype; the median counts.')
_SWEEP_BATCH_SIZES = flags.DEFINE_string(
    'sweep_batch_sizes', '', 'Comma-separated batch sizes to time at --caption_length, such as '
    '8,16,32,64.')
_SWEEP_CAPTION_LENGTHS = flags.DEFINE_string(
    'sweep_caption_lengths', '', 'Comma-separated caption lengths to time at --batch_size, such '
    'as 16,32,64.')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 0, 'Run on the CPU platform split into this many XLA devices '
    '(--xla_force_host_platform_device_count), data-parallel over them; 0: the devices JAX '
    'finds.')
_JSON_OUT = flags.DEFINE_string('json_out', '', 'Also write the JSON result to this file.')


def benchmark_config(config, dtype: str, llm_weights: str = 'config'):
  """Return a copy of `config` with one caption per image and `dtype` compute in both towers.

  With `llm_weights='compute'` the LLM's weights are stored in `dtype` too.
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.caption_table = False
    config.model.llm_dtype = dtype
    config.model.vit.dtype = dtype
    if llm_weights == 'compute':
      config.model.llm_param_dtype = dtype
  return config


def point_config(config, batch_size: int, caption_length: int):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.train.batch_size = batch_size
    config.data.max_length = caption_length
  return config


def build_training_state(config):
  """Build the mesh, the sharded model and its optimizer as `train.set_up` does, without a
  checkpointer, and switch the model to training mode (LoRA dropout on)."""
  from clamp_jax import build, parallel, train

  mesh = parallel.make_mesh(config.mesh)
  model, _ = build.build_model(config, place=parallel.sharded_placer(mesh, config.mesh.rules))
  train.place_model(model, mesh, config)
  trainable = build.trainable_filter(build.trainable_patterns(config))
  optimizer = train.make_optimizer(model, config.train, trainable)
  parallel.shard_module(optimizer, mesh, config.mesh.rules)
  model.train()
  return mesh, model, trainable, optimizer


def cost_analysis_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get('flops')
  return float(flops) if flops else None


@dataclasses.dataclass
class CompiledPoint:
  """The step compiled for one batch size and caption length, with its synthetic batch."""

  host_batch: dict
  compiled: object
  # FLOPs of the products that run outside XLA (model.matmul='onednn'), which XLA's cost
  # analysis does not count.
  callback_flops: float
  run: object  # clamp_jax.step.CompiledStep around `compiled`.
  run_step: Callable[[], dict]  # One step, blocked until its outputs are ready.
  lower_seconds: float
  compile_seconds: float


def compile_point(config, mesh, model, trainable, optimizer) -> CompiledPoint:
  """Compile the step for `config.train.batch_size` and `config.data.max_length` on a
  synthetic batch of that shape."""
  import jax

  from clamp_jax import parallel, train
  from clamp_jax import step as step_lib
  from clamp_jax.models import onednn

  batch_size, caption_length = config.train.batch_size, config.data.max_length
  llm_config = model.text_tower.llm.config
  parallel.validate_mesh_for_model(mesh, config.mesh.rules, batch_size=batch_size,
                                   num_heads=llm_config.num_attention_heads,
                                   num_kv_heads=llm_config.num_key_value_heads)
  host_batch = common.synthetic_batch(batch_size, caption_length, config.model.vit.image_size,
                                      llm_config.vocab_size)
  batch = parallel.place_batch(host_batch, mesh, config.mesh.rules)
  train_step = train.make_train_step(model, optimizer, trainable, config, mesh, batch)

  frozen, mutable = step_lib.split_state(model, optimizer, train_step.frozen_filter)
  start = time.perf_counter()
  with onednn.count_flops() as callback_flops:
    lowered = train_step.function.lower(frozen, mutable, batch)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  del frozen, mutable
  run = step_lib.CompiledStep(compiled, train_step.frozen_filter)

  def run_step() -> dict:
    metrics = run(model, optimizer, batch)
    jax.block_until_ready((run.inputs.mutable, metrics))
    return metrics

  return CompiledPoint(host_batch, compiled, callback_flops[0], run, run_step, lowered_at - start,
                       compiled_at - start)


def time_point(config, mesh, model, trainable, optimizer, *, steps: int,
               warmup: int, peak_gflops: float) -> dict:
  """Compile the step for `config.train.batch_size` and `config.data.max_length`, then time it."""
  import jax

  from clamp_jax import plan

  prepared = compile_point(config, mesh, model, trainable, optimizer)
  host_batch, compiled, run_step = prepared.host_batch, prepared.compiled, prepared.run_step
  batch_size, caption_length = config.train.batch_size, config.data.max_length
  if config.model.scan_layers:
    # XLA counts a scanned layer once, so take the FLOPs of unrolled copies (see plan.step_flops).
    # NOTE: with model.matmul='onednn' this count leaves out the oneDNN products.
    flops = plan.step_flops(config)
  else:
    # The cost analysis of a partitioned program counts one device's share.
    flops = cost_analysis_flops(compiled)
    flops = flops * mesh.size + prepared.callback_flops if flops else flops

  first_start = time.perf_counter()
  run_step()
  first_step_seconds = time.perf_counter() - first_start
  for _ in range(max(warmup - 1, 0)):
    run_step()
  step_seconds = []
  for _ in range(steps):
    start_step = time.perf_counter()
    metrics = run_step()
    step_seconds.append(time.perf_counter() - start_step)
  host_state_seconds = time_state_round_trip(prepared.run, model, optimizer)
  loss = float(jax.device_get(metrics['train/loss']))
  if not math.isfinite(loss):
    logging.warning('train/loss is %s after the timed steps; the timing may not be typical.',
                    loss)

  tokens_per_sample = caption_length + config.model.num_prompts
  point = {
      'batch_size': batch_size,
      'caption_length': caption_length,
      'tokens_per_sample': tokens_per_sample,
      'real_caption_tokens_per_sample': float(host_batch['attention_mask'].sum(axis=1).mean()),
      'lower_seconds': prepared.lower_seconds,
      'compile_seconds': prepared.compile_seconds,
      'first_step_seconds': first_step_seconds,
      'host_state_seconds': host_state_seconds,
      'step_seconds': step_seconds,
      'loss': loss,
  }
  point.update(common.step_statistics(step_seconds, batch_size, tokens_per_sample, flops,
                                      peak_gflops))
  point['peak_rss_gib'] = common.peak_rss_bytes() / 2 ** 30
  return point


def time_state_round_trip(run, model, optimizer, repeats: int = 10) -> float:
  """Return the median seconds of the step's host work alone: checking that the kept input
  states are current and writing a step's output states into the model and optimizer."""
  inputs = run.inputs
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    if not inputs.current(model, optimizer):
      raise RuntimeError('The step inputs went stale between timed steps.')
    inputs.write_back(*inputs.mutable)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_table(rates: dict) -> str:
  rows = list(rates.values())
  return common.format_table(rows, [('dtype', 'dtype', 's'), ('backend', 'backend', 's'),
                                    ('size', 'matrix side', 'd'),
                                    ('seconds', 'median s', '.4f'),
                                    ('gflops', 'GFLOP/s', '.1f')])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.check_step_counts(_STEPS.value, _WARMUP.value)
  from clamp_jax.configuration import ConfigError, validate_config

  config = benchmark_config(_CONFIG.value, _DTYPE.value, _LLM_WEIGHTS.value)
  batch_size = _BATCH_SIZE.value or config.train.batch_size
  caption_length = _CAPTION_LENGTH.value or config.data.max_length
  points = common.measured_points(
      batch_size, caption_length,
      common.parse_sizes(_SWEEP_BATCH_SIZES.value, 'sweep_batch_sizes'),
      common.parse_sizes(_SWEEP_CAPTION_LENGTHS.value, 'sweep_caption_lengths'))
  try:
    for size, length in points:
      validate_config(point_config(config, size, length))
  except ConfigError as e:
    sys.exit(f'error: {e}')

  if _CPU_DEVICES.value:
    from clamp_jax.distributed import simulate_cpu_devices

    simulate_cpu_devices(_CPU_DEVICES.value)
  import jax

  import jax_matmul

  rates = jax_matmul.measure_matmul_rates(_MATMUL_SIZE.value, _MATMUL_REPEATS.value)
  # A bfloat16 step may run some dots in float32 (XLA:CPU upcasts bfloat16 dots), so its MFU is
  # taken against the fastest rate of any dtype (and backend) the step may use.
  peak_dtypes = ['float32'] if _DTYPE.value == 'float32' else list(jax_matmul.DTYPES)
  if config.model.matmul == 'onednn':
    for dtype in ('float32', _DTYPE.value):
      rates[f'{dtype} (onednn)'] = jax_matmul.measure_matmul_rate(
          dtype, _MATMUL_SIZE.value, _MATMUL_REPEATS.value, backend='onednn')
      peak_dtypes.append(f'{dtype} (onednn)')
  peak_dtype = max(peak_dtypes, key=lambda dtype: rates[dtype]['gflops'])
  peak_gflops = rates[peak_dtype]['gflops']
  print(matmul_table(rates), flush=True)

  load_start = time.perf_counter()
  first = point_config(config, *points[0])
  mesh, model, trainable, optimizer = build_training_state(first)
  load_seconds = time.perf_counter() - load_start

  results = []
  for size, length in points:
    print(f'timing batch {size}, caption length {length} ...', file=sys.stderr, flush=True)
    results.append(time_point(point_config(config, size, length), mesh, model, trainable,
                              optimizer, steps=_STEPS.value, warmup=_WARMUP.value,
                              peak_gflops=peak_gflops))

  device = jax.devices()[0]
  summary = {
      'benchmark': 'clamp_step',
      'framework': 'jax',
      'jax_version': jax.__version__,
      'backend': jax.default_backend(),
      'device_kind': device.device_kind,
      'device_count': jax.device_count(),
      'cpu_count': len(os.sched_getaffinity(0)),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
      'ld_preload': os.environ.get('LD_PRELOAD', ''),
      'config': config_flags.get_config_filename(flags.FLAGS['config']),
      'llm': config.model.llm,
      'dtype': _DTYPE.value,
      'llm_param_dtype': config.model.llm_param_dtype,
      'matmul_backend': config.model.matmul,
      'attention': config.model.attention,
      'num_prompts': config.model.num_prompts,
      'scan_layers': config.model.scan_layers,
      'remat': config.model.remat,
      'steps': _STEPS.value,
      'warmup': _WARMUP.value,
      'matmul': rates,
      'peak_dtype': peak_dtype,
      'peak_gflops': peak_gflops,
      'load_seconds': load_seconds,
      'points': results,
      'peak_rss_bytes': common.peak_rss_bytes(),
  }
  print(f'\nCLAMP step, JAX {jax.__version__} on {jax.device_count()} {device.device_kind} '
        f'device(s), {_DTYPE.value} compute; MFU against {peak_dtype} matmul at '
        f'{peak_gflops:.1f} GFLOP/s')
  print(common.format_table(results, common.POINT_COLUMNS))
  line = json.dumps(summary)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'w') as f:
      f.write(line + '\n')
  print(line, flush=True)


if __name__ == '__main__':
  app.run(main)
