"""Hugging Face files from a Llama model: an HF-layout safetensors folder and PEFT LoRA adapters.

Tensor names follow transformers' `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj.weight`,
...), the reverse of the loader's mapping in `clamp_jax.weights.assign`. Our kernels are
`[in, out]`; Hugging Face stores Linear weights as `[out, in]`, so every kernel is transposed on
the way out. Arrays are gathered to the host one tensor at a time, so a sharded model is never
held whole in host memory beyond one safetensors file's worth.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from clamp_jax.models.llama import Llama, LlamaConfig
from clamp_jax.models.lora import iter_linears

# Our parameter path inside a decoder layer -> the Hugging Face name inside `model.layers.N.`.
_LAYER_TENSORS = (
    (('self_attn', 'q_proj'), 'self_attn.q_proj'),
    (('self_attn', 'k_proj'), 'self_attn.k_proj'),
    (('self_attn', 'v_proj'), 'self_attn.v_proj'),
    (('self_attn', 'o_proj'), 'self_attn.o_proj'),
    (('mlp', 'gate_proj'), 'mlp.gate_proj'),
    (('mlp', 'up_proj'), 'mlp.up_proj'),
    (('mlp', 'down_proj'), 'mlp.down_proj'),
)
_LAYER_NORMS = ('input_layernorm', 'post_attention_layernorm')
# safetensors metadata that transformers' loader expects of PyTorch-layout files.
SAFETENSORS_METADATA = {'format': 'pt'}
NUMPY_DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16}


def to_host(array: jax.Array) -> np.ndarray:
  """Whole `array` as a numpy array on this host, gathered from other processes if needed."""
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(jax.device_get(array))


def hf_config(config: LlamaConfig, dtype: str) -> dict:
  """`config.json` contents for transformers' `LlamaForCausalLM` with weights of `dtype`.

  The rope settings are written in the older top-level form (`rope_theta`, `rope_scaling`),
  which transformers 5 still reads and older versions need.
  """
  return {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': config.vocab_size,
      'hidden_size': config.hidden_size,
      'intermediate_size': config.intermediate_size,
      'num_hidden_layers': config.num_hidden_layers,
      'num_attention_heads': config.num_attention_heads,
      'num_key_value_heads': config.num_key_value_heads,
      'head_dim': config.resolved_head_dim,
      'hidden_act': 'silu',
      'rms_norm_eps': config.rms_norm_eps,
      'rope_theta': config.rope_theta,
      'rope_scaling': config.rope_scaling,
      'max_position_embeddings': config.max_position_embeddings,
      'tie_word_embeddings': config.tie_word_embeddings,
      'attention_bias': False,
      'mlp_bias': False,
      'bos_token_id': config.bos_token_id,
      'eos_token_id': config.eos_token_id,
      'pad_token_id': config.pad_token_id,
      'torch_dtype': dtype,
  }


def merged_kernel(linear) -> jax.Array:
  """Return the Linear's kernel `[in, out]` plus its LoRA update (in float32), if it has one."""
  kernel = linear.kernel[...]
  if linear.lora is None or linear.lora.merged:
    return kernel
  return kernel.astype(jnp.float32) + linear.lora.delta()


def iter_hf_tensors(llm: Llama, *, merge_lora: bool, dtype: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yield `(hf_name, host array of dtype)` for every weight of `llm`, one tensor at a time.

  `merge_lora=True` folds each adapter into its base weight (`W + A @ B * alpha / rank`), so the
  result needs no adapter code to run.
  """
  numpy_dtype = NUMPY_DTYPES[dtype]

  def out(array) -> np.ndarray:
    return np.ascontiguousarray(to_host(array).astype(numpy_dtype))

  def weight(linear) -> np.ndarray:
    kernel = merged_kernel(linear) if merge_lora else linear.kernel[...]
    return out(kernel).T.copy()

  yield 'model.embed_tokens.weight', out(llm.embed_tokens.embedding[...])
  for index, layer in enumerate(llm.layers):
    prefix = f'model.layers.{index}.'
    for norm in _LAYER_NORMS:
      yield f'{prefix}{norm}.weight', out(getattr(layer, norm).scale[...])
    for (block, name), hf_name in _LAYER_TENSORS:
      yield f'{prefix}{hf_name}.weight', weight(getattr(getattr(layer, block), name))
  yield 'model.norm.weight', out(llm.norm.scale[...])
  if llm.lm_head is not None:
    yield 'lm_head.weight', weight(llm.lm_head)


def write_safetensors_folder(tensors: Iterator[tuple[str, np.ndarray]], folder: str, *,
                             max_shard_bytes: int, write: bool = True) -> list[str]:
  """Write `tensors` as `model.safetensors`, or as numbered shards plus
  `model.safetensors.index.json` when they exceed `max_shard_bytes`; returns the file names.

  Every process must iterate `tensors` (gathers are collective); only `write=True` writes.
  """
  shards: list[dict[str, np.ndarray]] = [{}]
  sizes = [0]
  temporary_names = []

  def flush() -> None:
    name = f'shard-{len(temporary_names):05d}.tmp'
    if write:
      save_file(shards[-1], os.path.join(folder, name), metadata=SAFETENSORS_METADATA)
    temporary_names.append((name, list(shards[-1])))
    shards[-1] = {}

  for name, array in tensors:
    if sizes[-1] and sizes[-1] + array.nbytes > max_shard_bytes:
      flush()
      sizes.append(0)
    shards[-1][name] = array
    sizes[-1] += array.nbytes
  flush()

  count = len(temporary_names)
  if count == 1:
    final_names = ['model.safetensors']
  else:
    final_names = [f'model-{i + 1:05d}-of-{count:05d}.safetensors' for i in range(count)]
  weight_map = {}
  for (temporary, names), final in zip(temporary_names, final_names):
    if write:
      os.replace(os.path.join(folder, temporary), os.path.join(folder, final))
    weight_map.update({name: final for name in names})
  if count > 1 and write:
    index = {'metadata': {'total_size': int(sum(sizes))}, 'weight_map': weight_map}
    with open(os.path.join(folder, 'model.safetensors.index.json'), 'w', encoding='utf-8') as f:
      json.dump(index, f, indent=2)
  return final_names


def hf_module_name(path: str) -> str:
  """Hugging Face module name of one of our Linear paths inside the LLM.

  'layers/0/self_attn/q_proj' becomes 'model.layers.0.self_attn.q_proj'.
  """
  if path == 'lm_head':
    return 'lm_head'
  if path.startswith('layers/'):
    return 'model.' + path.replace('/', '.')
  raise ValueError(f'Linear {path!r} has no Hugging Face Llama module name.')


def peft_target_modules(llm: Llama, adapted: list[str]) -> list[str] | str:
  """PEFT's `target_modules` for exactly the modules in `adapted` (HF module names).

  A list of short names (`['q_proj', 'v_proj']`) when every module with such a name has an
  adapter, else a regular expression that PEFT matches in full against each module name.
  """
  short = sorted({name.rsplit('.', 1)[-1] for name in adapted})
  every = [hf_module_name(path) for path, _ in iter_linears(llm)]
  if sorted(name for name in every if name.rsplit('.', 1)[-1] in short) == sorted(adapted):
    return short
  return '(' + '|'.join(re.escape(name) for name in sorted(adapted)) + ')'


def write_peft_adapter(llm: Llama, folder: str, *, rank: int, alpha: float, dropout: float,
                       base_model_name_or_path: str, write: bool = True) -> dict:
  """Write PEFT's `adapter_config.json` and `adapter_model.safetensors` for `llm`'s adapters.

  PEFT's LoRA computes `x @ A.T @ B.T * lora_alpha / r` with `lora_A.weight` `[r, in]` and
  `lora_B.weight` `[out, r]`, which equals our `x @ lora_a @ lora_b * alpha / rank` with
  `lora_a` `[in, r]` and `lora_b` `[r, out]` transposed. Returns the adapter config.
  """
  tensors, adapted = {}, []
  for path, linear in iter_linears(llm):
    if linear.lora is None:
      continue
    if linear.lora.merged:
      raise ValueError(f'The adapter of {path} is merged into its kernel; unmerge it first.')
    module = hf_module_name(path)
    adapted.append(module)
    key = f'base_model.model.{module}'
    tensors[f'{key}.lora_A.weight'] = np.ascontiguousarray(
        to_host(linear.lora.lora_a[...]).astype(np.float32).T)
    tensors[f'{key}.lora_B.weight'] = np.ascontiguousarray(
        to_host(linear.lora.lora_b[...]).astype(np.float32).T)
  if not adapted:
    raise ValueError('The LLM has no LoRA adapters to export.')
  config = {
      'peft_type': 'LORA',
      'task_type': 'CAUSAL_LM',
      'base_model_name_or_path': base_model_name_or_path,
      'r': rank,
      'lora_alpha': alpha,
      'lora_dropout': dropout,
      'target_modules': peft_target_modules(llm, adapted),
      'bias': 'none',
      'fan_in_fan_out': False,
      'use_rslora': False,
      'use_dora': False,
      'inference_mode': True,
      'modules_to_save': None,
      'init_lora_weights': True,
  }
  if write:
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, 'adapter_model.safetensors'),
              metadata=SAFETENSORS_METADATA)
    with open(os.path.join(folder, 'adapter_config.json'), 'w', encoding='utf-8') as f:
      json.dump(config, f, indent=2)
  return config
