"""Load a Llama-family model from a GGUF file (llama.cpp's format), dequantized to float32.

llama.cpp's converter permutes the rows of the q and k projections within each head so that rotary
pairs are adjacent (GGUF row 2i is Hugging Face row i, row 2i+1 is row i + head_dim/2). The loader
undoes that permutation so the weights match the Hugging Face layout that `Llama` uses.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
from flax import nnx

from clamp_jax.models.llama import Llama, LlamaConfig
from clamp_jax.weights.assign import WeightLoadError, fill_llama

_GGUF_TO_HF = {
    'token_embd': 'model.embed_tokens',
    'output_norm': 'model.norm',
    'output': 'lm_head',
}
_GGUF_LAYER_TO_HF = {
    'attn_norm': 'input_layernorm',
    'attn_q': 'self_attn.q_proj',
    'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj',
    'ffn_norm': 'post_attention_layernorm',
    'ffn_gate': 'mlp.gate_proj',
    'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj',
}
_LAYER = re.compile(r'^blk\.(\d+)\.(\w+)\.weight$')


def open_gguf(path: str):
  """Open a GGUF file, turning the reader's low-level errors into one `WeightLoadError` line."""
  import gguf  # Imported lazily: only GGUF checkpoints need it.

  try:
    return gguf.GGUFReader(path)
  except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
    raise WeightLoadError(f'{path}: not a readable GGUF file ({type(e).__name__}: {e}).') from e


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def gguf_config(reader, path: str, **overrides) -> LlamaConfig:
  """Read the model config from the GGUF metadata (`general.architecture` must be 'llama')."""
  arch = _field(reader, 'general.architecture')
  if arch != 'llama':
    raise WeightLoadError(
        f"{path}: unsupported GGUF architecture {arch!r}; only 'llama' is supported.")
  names = {t.name for t in reader.tensors}

  heads = int(_field(reader, 'llama.attention.head_count'))
  hidden = int(_field(reader, 'llama.embedding_length'))
  vocab = _field(reader, 'llama.vocab_size')
  if vocab is None:
    vocab = len(_field(reader, 'tokenizer.ggml.tokens'))

  scaling_type = _field(reader, 'llama.rope.scaling.type')
  rope_scaling = None
  if scaling_type not in (None, 'none'):
    if scaling_type != 'linear' or 'rope_freqs.weight' in names:
      raise WeightLoadError(
          f'{path}: rope scaling {scaling_type!r} in GGUF files is not supported; load the '
          'Hugging Face safetensors folder instead.')
    factor = float(_field(reader, 'llama.rope.scaling.factor'))
    rope_scaling = {'rope_type': 'linear', 'factor': factor}

  key_length = _field(reader, 'llama.attention.key_length')
  fields = dict(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(_field(reader, 'llama.feed_forward_length')),
      num_hidden_layers=int(_field(reader, 'llama.block_count')),
      num_attention_heads=heads,
      num_key_value_heads=int(_field(reader, 'llama.attention.head_count_kv', heads)),
      head_dim=int(key_length) if key_length is not None else None,
      rms_norm_eps=float(_field(reader, 'llama.attention.layer_norm_rms_epsilon', 1e-5)),
      rope_theta=float(_field(reader, 'llama.rope.freq_base', 10000.0)),
      rope_scaling=rope_scaling,
      max_position_embeddings=int(_field(reader, 'llama.context_length', 4096)),
      tie_word_embeddings='output.weight' not in names,
      bos_token_id=_field(reader, 'tokenizer.ggml.bos_token_id'),
      eos_token_id=_field(reader, 'tokenizer.ggml.eos_token_id'),
      pad_token_id=_field(reader, 'tokenizer.ggml.padding_token_id'),
  )
  fields.update(overrides)
  return LlamaConfig(**fields)


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undo llama.cpp's per-head q/k row interleaving on a `[out, in]` weight."""
  half = weight.shape[0] // num_heads // 2
  return (weight.reshape(num_heads, half, 2, *weight.shape[1:])
          .swapaxes(1, 2)
          .reshape(weight.shape))


def iter_gguf_tensors(reader, path: str, config: LlamaConfig) -> Iterator[tuple[str, callable]]:
  """Yield `(hf_name, read_fn)` for each tensor; reading dequantizes that tensor alone."""
  import gguf

  for tensor in reader.tensors:
    name = tensor.name
    match = _LAYER.match(name)
    if match:
      hf_part = _GGUF_LAYER_TO_HF.get(match.group(2))
      if hf_part is None:
        raise WeightLoadError(f'{path}: unexpected tensor {name!r} for a llama model.')
      hf_name = f'model.layers.{match.group(1)}.{hf_part}.weight'
    elif name == 'rope_freqs.weight':
      continue
    else:
      base = name.removesuffix('.weight')
      if base not in _GGUF_TO_HF:
        raise WeightLoadError(f'{path}: unexpected tensor {name!r} for a llama model.')
      hf_name = f'{_GGUF_TO_HF[base]}.weight'

    def read(tensor=tensor, hf_name=hf_name):
      try:
        array = gguf.dequantize(tensor.data, tensor.tensor_type)
      except (ValueError, NotImplementedError, IndexError) as e:
        raise WeightLoadError(f'{path}: tensor {tensor.name!r} could not be decoded ({e}).') from e
      array = np.asarray(array, dtype=np.float32)
      if hf_name.endswith('q_proj.weight'):
        array = unpermute_rotary_rows(array, config.num_attention_heads)
      elif hf_name.endswith('k_proj.weight'):
        array = unpermute_rotary_rows(array, config.num_key_value_heads)
      return array

    yield hf_name, read


def load_gguf(path: str, *, place=None, **config_overrides) -> Llama:
  """Build a `Llama` from a GGUF file, dequantizing one tensor at a time."""
  reader = open_gguf(path)
  config = gguf_config(reader, path, **config_overrides)
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  fill_llama(model, iter_gguf_tensors(reader, path, config), source=path, place=place)
  return model
