"""Plan mode: compile the train step for a target mesh and report whether it fits in memory.

The model and optimizer are built abstractly with `nnx.eval_shape` (shapes and dtypes, no weights
and no checkpoint read), sharded by the config's rules, and the jitted train step is lowered and
compiled for the target. With `plan.devices > 0` the target is that many simulated CPU devices
(`main.py` sets XLA's host device count before JAX starts), so a laptop can plan a pod. The CPU
compiler computes bfloat16 in float32 and fuses differently from TPU and GPU compilers, so its
numbers are an estimate. With `plan.topology` (for example 'v5e:4x8') the step is compiled
ahead of time for that TPU topology by libtpu, without a TPU.

Reported per device: parameter bytes, optimizer-state bytes, and the compiler's peak estimate
(arguments + outputs - donated aliases + temporaries), plus FLOPs per step (see `step_flops`). The
last line printed is `plan: fits` or `plan: does not fit`, and WORKDIR/plan.json contains the
numbers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from clamp_jax import build, parallel
from clamp_jax import step as step_lib
from clamp_jax.models.llama import Llama, LlamaConfig
from clamp_jax.weights import WeightLoadError, resolve_checkpoint
from clamp_jax.weights.gguf_file import gguf_config, open_gguf
from clamp_jax.weights.hf_folder import read_hf_config

GIB = 1 << 30


def llm_architecture(config: ml_collections.ConfigDict) -> LlamaConfig:
  """Return the LLM's architecture without reading weights.

  From `model.random_llm` for a random LLM, from `model.llm_architecture` when set, else from the
  checkpoint's config.json or GGUF metadata.
  """
  model_config = config.model
  overrides = dict(dtype=model_config.llm_dtype, param_dtype=model_config.llm_param_dtype,
                   remat=model_config.remat, scan_layers=model_config.scan_layers,
                   attention=model_config.attention)
  if model_config.llm == 'random':
    return LlamaConfig(**model_config.random_llm.to_dict(), **overrides)
  if model_config.llm_architecture:
    return LlamaConfig(**model_config.llm_architecture.to_dict(), **overrides)
  try:
    path = resolve_checkpoint(model_config.llm)
  except WeightLoadError as e:
    raise WeightLoadError(
        f'{e} Plan mode needs the architecture only: set config.model.llm_architecture to its '
        'LlamaConfig fields (see configs/llama7b.py).') from e
  if os.path.isdir(path):
    return LlamaConfig.from_hf_dict(read_hf_config(path), **overrides)
  return gguf_config(open_gguf(path), path, **overrides)


def abstract_training_state(config: ml_collections.ConfigDict):
  """`(model, optimizer, trainable)` with abstract arrays: shapes and dtypes only."""
  from clamp_jax.train import make_optimizer

  llm_config = llm_architecture(config)
  trainable = build.trainable_filter(build.trainable_patterns(config))

  def create():
    llm = Llama(llm_config, rngs=nnx.Rngs(config.seed))
    model, _ = build.build_model(config, llm=llm, tokenizer=None, image_tower_weights=False)
    return model, make_optimizer(model, config.train, trainable)

  model, optimizer = nnx.eval_shape(create)
  return model, optimizer, trainable


def abstract_batch(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """Describe a global batch of `train.batch_size` images and captions (one caption each)."""
  batch, size = config.train.batch_size, config.model.vit.image_size
  length = config.data.max_length
  return {
      'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
      'input_ids': jax.ShapeDtypeStruct((batch, length), jnp.int32),
      'attention_mask': jax.ShapeDtypeStruct((batch, length), jnp.int32),
  }


def bytes_per_device(state, shardings) -> int:
  """Bytes of one device's shards of every array in `state`."""
  total = 0
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  for variable, sharding in zip(leaves, sharding_leaves, strict=True):
    value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
    shard = sharding.shard_shape(tuple(value.shape))
    total += math.prod(shard) * np.dtype(value.dtype).itemsize
  return total


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return cost or {}


def plan_devices(config: ml_collections.ConfigDict) -> list:
  """Return the devices to compile for: a TPU topology's, or `plan.devices` CPU devices."""
  if config.plan.topology:
    # Compiling for a topology uses no TPU, so libtpu's one-process-per-host lock is not needed.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    try:
      from jax.experimental import topologies
      topology = topologies.get_topology_desc(topology_name=config.plan.topology,
                                              platform='tpu')
    except Exception as e:  # libtpu raises several types for a missing library or bad name.
      raise parallel.MeshError(
          f'config.plan.topology={config.plan.topology!r} could not be loaded ({e}). It needs '
          "libtpu: pip install 'clamp-jax[tpu-plan]'; names look like 'v5e:4x8' or "
          "'v6e:8x8'.") from e
    return list(topology.devices)
  devices = jax.devices()
  wanted = config.plan.devices or len(devices)
  if len(devices) < wanted:
    raise parallel.MeshError(
        f'config.plan.devices={wanted}, but JAX sees {len(devices)} devices. Plan mode sets the '
        'simulated device count before JAX starts; run it through `python -m clamp_jax.main`.')
  return devices[:wanted]


def compile_step(config: ml_collections.ConfigDict, devices: list):
  """Build the abstract state and compile the train step on `devices`; returns the pieces."""
  mesh = parallel.make_mesh(config.mesh, devices)
  rules = config.mesh.rules
  model, optimizer, trainable = abstract_training_state(config)
  llm_config = model.text_tower.llm.config
  parallel.validate_mesh_for_model(mesh, rules, batch_size=config.train.batch_size,
                                   num_heads=llm_config.num_attention_heads,
                                   num_kv_heads=llm_config.num_key_value_heads)
  options = step_lib.StepOptions(loss=config.train.loss, sharded_loss=config.train.sharded_loss,
                                 microbatches=config.train.microbatches)
  step, frozen = step_lib.make_step_function(model, optimizer, trainable, options, mesh, rules)
  frozen_shardings, mutable_shardings = step_lib.step_shardings(model, optimizer, frozen, mesh,
                                                                rules)
  frozen_state, mutable_state = step_lib.split_state(model, optimizer, frozen)
  batch = abstract_batch(config)
  jitted = step_lib.jit_step(step, frozen_shardings, mutable_shardings,
                             step_lib.batch_shardings(tuple(batch), mesh, rules), mesh)
  compiled = jitted.lower(frozen_state, mutable_state, batch).compile()
  return compiled, mesh, model, trainable, mutable_state, mutable_shardings


def step_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs of one whole train step (all devices together), from the compiler's cost analysis.

  XLA counts a loop body once, whatever its trip count. So the step is compiled unrolled on one
  device at depths (1, 1), (2, 1) and (1, 2) for (LLM layers, ViT blocks), and the per-layer
  costs are extrapolated to the real depths. Every layer of a tower costs the same, so the
  extrapolation is exact.
  """
  llm_layers = llm_architecture(config).num_hidden_layers
  vit_layers = config.model.vit.layers

  def flops_at(llm_depth: int, vit_depth: int) -> float:
    small = config.copy_and_resolve_references()
    with small.unlocked():
      small.model.scan_layers = False
      small.model.vit.layers = vit_depth
      small.mesh.data, small.mesh.fsdp, small.mesh.tensor = 1, 1, 1
      for field in ('dcn_data', 'dcn_fsdp', 'dcn_tensor'):
        small.mesh[field] = 1
      architecture = llm_architecture(config)
      small.model.llm = 'random'
      small.model.random_llm = ml_collections.ConfigDict(
          {field: getattr(architecture, field) for field in _ARCHITECTURE_FIELDS})
      small.model.random_llm.num_hidden_layers = llm_depth
    compiled = compile_step(small, jax.devices('cpu')[:1])[0]
    return float(_cost(compiled).get('flops', 0.0))

  base = flops_at(1, 1)
  per_llm_layer = flops_at(2, 1) - base
  per_vit_layer = flops_at(1, 2) - base
  return base + (llm_layers - 1) * per_llm_layer + (vit_layers - 1) * per_vit_layer


_ARCHITECTURE_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                        'num_attention_heads', 'num_key_value_heads', 'head_dim', 'rms_norm_eps',
                        'rope_theta', 'rope_scaling', 'max_position_embeddings',
                        'tie_word_embeddings', 'bos_token_id', 'eos_token_id', 'pad_token_id')


def make_plan(config: ml_collections.ConfigDict) -> dict:
  """Compile the train step for the planned mesh and return the memory and FLOP numbers."""
  devices = plan_devices(config)
  start = time.perf_counter()
  compiled, mesh, model, trainable, mutable_state, mutable_shardings = compile_step(
      config, devices)
  compile_seconds = time.perf_counter() - start
  logging.info('Compiled the step for mesh %s in %.1f s.', dict(mesh.shape), compile_seconds)
  memory = compiled.memory_analysis()
  rules = config.mesh.rules
  params = nnx.state(model, nnx.Param)
  param_bytes = bytes_per_device(params, parallel.state_shardings(params, mesh, rules))
  optimizer_bytes = bytes_per_device(mutable_state[1], mutable_shardings[1])
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  logging.info('Counting FLOPs per step on small unrolled copies of the model.')
  flops = step_flops(config)
  usable = config.plan.usable_fraction * config.plan.device_memory_gib * GIB
  count = lambda filter_: build.count_parameters(model, filter_)
  return {
      'target': config.plan.topology or f'cpu x {mesh.size} (simulated)',
      'devices': mesh.size,
      'mesh': {axis: int(size) for axis, size in mesh.shape.items()},
      'global_batch': config.train.batch_size,
      'microbatches': config.train.microbatches,
      'caption_tokens': config.data.max_length + config.model.num_prompts,
      'remat': config.model.remat,
      'scan_layers': config.model.scan_layers,
      'llm_dtype': config.model.llm_dtype,
      'llm_param_dtype': config.model.llm_param_dtype,
      'parameters': count(nnx.Param),
      'trainable_parameters': count(trainable),
      'param_bytes_per_device': int(param_bytes),
      'optimizer_bytes_per_device': int(optimizer_bytes),
      'argument_bytes_per_device': int(memory.argument_size_in_bytes),
      'output_bytes_per_device': int(memory.output_size_in_bytes),
      'alias_bytes_per_device': int(memory.alias_size_in_bytes),
      'temp_bytes_per_device': int(memory.temp_size_in_bytes),
      'peak_bytes_per_device': int(peak),
      'device_memory_bytes': int(config.plan.device_memory_gib * GIB),
      'usable_bytes_per_device': int(usable),
      'flops_per_step': flops,
      'flops_per_step_per_device': flops / mesh.size,
      'compile_seconds': round(compile_seconds, 1),
      'fits': bool(peak <= usable),
  }


def format_plan(plan: dict) -> str:
  gib = lambda value: (f'{value / GIB:8.2f} GiB' if value >= GIB / 10 else
                       f'{value / (1 << 20):8.2f} MiB')
  lines = [
      f'mesh {plan["mesh"]} ({plan["devices"]} devices), global batch {plan["global_batch"]} '
      f'in {plan["microbatches"]} micro-batch(es), {plan["caption_tokens"]} tokens per caption',
      f'parameters {plan["parameters"]:,} ({plan["trainable_parameters"]:,} trainable)',
      f'per device:',
      f'  parameters        {gib(plan["param_bytes_per_device"])}',
      f'  optimizer state   {gib(plan["optimizer_bytes_per_device"])}',
      f'  temporaries       {gib(plan["temp_bytes_per_device"])}',
      f'  peak (estimate)   {gib(plan["peak_bytes_per_device"])} of '
      f'{gib(plan["usable_bytes_per_device"]).strip()} usable '
      f'({plan["device_memory_bytes"] / GIB:.0f} GiB device)',
      f'FLOPs per step {plan["flops_per_step"]:.3e} ({plan["flops_per_step_per_device"]:.3e} per '
      f'device); compiled for {plan["target"]} in {plan["compile_seconds"]} s',
  ]
  return '\n'.join(lines)


def run_plan(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Make the plan, print it, write WORKDIR/plan.json and end with the verdict line."""
  plan = make_plan(config)
  with open(os.path.join(workdir, 'plan.json'), 'w', encoding='utf-8') as f:
    json.dump(plan, f, indent=2)
  print(format_plan(plan))
  print('plan: fits' if plan['fits'] else 'plan: does not fit', flush=True)
  return plan
