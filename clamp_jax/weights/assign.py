"""Fill an abstract (shape-only) Llama model tensor by tensor from Hugging Face-named arrays.

Both loaders translate their file's tensors to Hugging Face names (`model.layers.0.self_attn.q_proj.
weight`, ...) and hand them here one at a time, so host memory contains about one tensor at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clamp_jax.models.llama import Llama


class WeightLoadError(ValueError):
  """A checkpoint file is missing, unreadable, or does not match the model."""


_LAYER = re.compile(r'^model\.layers\.(\d+)\.(.+)\.weight$')
_LAYER_PARAMS = {
    'self_attn.q_proj': ('self_attn', 'q_proj', 'kernel'),
    'self_attn.k_proj': ('self_attn', 'k_proj', 'kernel'),
    'self_attn.v_proj': ('self_attn', 'v_proj', 'kernel'),
    'self_attn.o_proj': ('self_attn', 'o_proj', 'kernel'),
    'mlp.gate_proj': ('mlp', 'gate_proj', 'kernel'),
    'mlp.up_proj': ('mlp', 'up_proj', 'kernel'),
    'mlp.down_proj': ('mlp', 'down_proj', 'kernel'),
    'input_layernorm': ('input_layernorm', 'scale'),
    'post_attention_layernorm': ('post_attention_layernorm', 'scale'),
}
# Tensors some checkpoints carry that the model recomputes or does not use.
_IGNORED = re.compile(r'(rotary_emb\.inv_freq|rope_freqs\.weight)$')


def hf_name_to_path(name: str) -> tuple[tuple, bool] | None:
  """Map a Hugging Face Llama tensor name to `(model path, transpose)`; None for ignored tensors."""
  if _IGNORED.search(name):
    return None
  if name == 'model.embed_tokens.weight':
    return ('embed_tokens', 'embedding'), False
  if name == 'model.norm.weight':
    return ('norm', 'scale'), False
  if name == 'lm_head.weight':
    return ('lm_head', 'kernel'), True
  match = _LAYER.match(name)
  if match and match.group(2) in _LAYER_PARAMS:
    sub = _LAYER_PARAMS[match.group(2)]
    # Hugging Face stores Linear weights as [out, in]; our kernels are [in, out].
    return ('layers', int(match.group(1)), *sub), sub[-1] == 'kernel'
  raise WeightLoadError(f'Unexpected tensor {name!r}: it is not part of a Llama-family model.')


def _get_variable(model: nnx.Module, path: tuple) -> nnx.Variable:
  node = model
  for part in path:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node


def fill_llama(
    model: Llama,
    tensors: Iterable[tuple[str, Callable[[], np.ndarray]]],
    source: str,
    place: Callable[[nnx.Variable, np.ndarray], jax.Array] | None = None,
) -> None:
  """Assign each `(hf_name, read_fn)` tensor to `model`, which may be abstract (from `eval_shape`).

  `read_fn` is called only when the tensor is needed, so a caller can stream from disk.
  `place(variable, array)` turns the host array (already in the parameter's dtype) into a device
  array, for example split over a mesh as the variable's logical axes ask; by default it is
  `jnp.asarray`. Host memory then holds about one tensor at a time, twice during a dtype cast. Raises `WeightLoadError` naming the tensor on a shape
  mismatch, and listing missing tensors at the end.
  """
  tied = model.config.tie_word_embeddings
  expected = {path for path, node in _iter_param_paths(model)}
  seen = set()
  for name, read in tensors:
    mapped = hf_name_to_path(name)
    if mapped is None:
      continue
    path, transpose = mapped
    if path[0] == 'lm_head' and tied:
      continue  # Some tied checkpoints still store a copy of the embedding as lm_head.
    if path not in expected:
      raise WeightLoadError(
          f'{source}: tensor {name!r} has no place in a model with '
          f'{model.config.num_hidden_layers} layers (tie_word_embeddings={tied}).')
    variable = _get_variable(model, path)
    array = np.asarray(read())
    if transpose:
      array = array.T
    if tuple(array.shape) != tuple(variable.shape):
      want = tuple(variable.shape)[::-1] if transpose else tuple(variable.shape)
      raise WeightLoadError(
          f'{source}: tensor {name!r} has shape {tuple(array.T.shape if transpose else array.shape)}'
          f', expected {want} from the model config.')
    array = array.astype(variable.dtype, copy=False)
    variable.set_value(place(variable, array) if place else jnp.asarray(array))
    del array
    seen.add(path)
  missing = sorted(expected - seen, key=str)
  if missing:
    names = ', '.join('.'.join(str(p) for p in path) for path in missing[:5])
    raise WeightLoadError(
        f'{source}: {len(missing)} model parameters have no tensor in the checkpoint, e.g. {names}.')


def _iter_param_paths(model: nnx.Module):
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param) and not isinstance(node, nnx.LoRAParam):
      yield tuple(path), node
