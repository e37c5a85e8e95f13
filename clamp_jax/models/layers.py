"""Building blocks shared by the towers: linear layers with an optional LoRA slot, norms, embeddings.

Every parameter carries `logical_axes` metadata (names such as `embed`, `mlp`, `vocab`) that the
sharding rules map to mesh axes. Kernels are stored as `[in_features, out_features]`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from clamp_jax.models import onednn
from clamp_jax.parallel import gather_for_use

# Matmul backends of `Linear`: XLA's dot, or oneDNN on the CPU (`clamp_jax.models.onednn`).
MATMUL_BACKENDS = ('xla', 'onednn')

# Rematerialisation policies by config name: which intermediates of a block the backward pass
# keeps; everything else it recomputes.
REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,  # Keep only the block inputs.
    'dots': jax.checkpoint_policies.dots_saveable,  # Keep matmul outputs.
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_CHOICES = ('none', *REMAT_POLICIES)


def maybe_remat(function: Callable, remat: str) -> Callable:
  """Wrap `function(module, *arrays)` in `nnx.remat` with the named policy; 'none' returns it."""
  if remat == 'none':
    return function
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat={remat!r} is not one of {REMAT_CHOICES}.')
  return nnx.remat(function, policy=REMAT_POLICIES[remat], prevent_cse=True)


def run_layers(layers, call: Callable, x: jax.Array, *, remat: str = 'none',
               scan: bool = False) -> jax.Array:
  """Apply `x = call(layer, x)` for each of `layers` in order.

  With `scan=True` the layers run as one `jax.lax.scan` over their stacked states, so the compiled
  program contains one layer body whatever the depth (compile time stays flat). Stacking copies the
  layer weights once per call. `remat` names the policy of `REMAT_POLICIES` for each layer.
  """
  if not scan:
    step = maybe_remat(call, remat)
    for layer in layers:
      x = step(layer, x)
    return x
  graphdef, first = nnx.split(layers[0])
  structure = jax.tree.structure(first)
  states = []
  for index, layer in enumerate(layers):
    state = nnx.state(layer)
    if jax.tree.structure(state) != structure:
      raise ValueError(f'scan_layers needs identical layers, but layer {index} differs from '
                       'layer 0 (for example LoRA on some layers only).')
    states.append(state)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

  def body(x, state):
    layer = nnx.merge(graphdef, state)
    return call(layer, x), nnx.state(layer, nnx.RngState)

  if remat != 'none':
    if remat not in REMAT_POLICIES:
      raise ValueError(f'remat={remat!r} is not one of {REMAT_CHOICES}.')
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
  x, rng_states = jax.lax.scan(body, x, stacked)
  for index, layer in enumerate(layers):
    nnx.update(layer, jax.tree.map(lambda a, i=index: a[i], rng_states))
  return x


def normal_init(stddev: float):
  return jax.nn.initializers.normal(stddev)


class Linear(nnx.Module):
  """Dense layer `y = x @ kernel (+ bias)` with an optional LoRA adapter in `self.lora`.

  The adapter is attached later by `clamp_jax.models.lora.apply_lora`; `adapters=False` at call time
  skips it, which gives back the base layer exactly. A merged adapter raises ValueError there.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      axes: tuple[str | None, str | None],
      use_bias: bool = False,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      stddev: float = 0.02,
      matmul: str = 'xla',
      rngs: nnx.Rngs,
  ):
    if matmul not in MATMUL_BACKENDS:
      raise ValueError(f'matmul={matmul!r} is not one of {MATMUL_BACKENDS}.')
    self.matmul = matmul
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    self.axes = axes
    self.kernel = nnx.Param(
        normal_init(stddev)(rngs.params(), (in_features, out_features), param_dtype),
        logical_axes=axes,
    )
    self.bias = nnx.data(
        nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
        if use_bias
        else None
    )
    self.lora = nnx.data(None)

  def __call__(self, x: jax.Array, *, adapters: bool = True) -> jax.Array:
    if self.lora is not None and self.lora.merged and not adapters:
      # The merged kernel contains the adapter update, so the base layer is no longer available.
      raise ValueError('adapters=False was requested, but this LoRA adapter is merged into its '
                       'kernel. Call clamp_jax.models.lora.unmerge(model) first.')
    x = x.astype(self.dtype)
    kernel = gather_for_use(self.kernel[...].astype(self.dtype), self.axes)
    y = onednn.matmul(x, kernel) if self.matmul == 'onednn' else x @ kernel
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if adapters and self.lora is not None and not self.lora.merged:
      y = y + self.lora(x).astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """Root-mean-square norm as in Llama: statistics in float32, scale applied after the cast back."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=('embed',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * x32).astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias, statistics in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=('embed',))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=('embed',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class Embedding(nnx.Module):
  """Token embedding table `[vocab, embed]`; `attend` gives logits for a tied output head."""

  def __init__(self, vocab_size: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = nnx.Param(
        normal_init(0.02)(rngs.params(), (vocab_size, dim), param_dtype),
        logical_axes=('vocab', 'embed'),
    )

  def __call__(self, ids: jax.Array) -> jax.Array:
    table = gather_for_use(self.embedding[...], ('vocab', 'embed'))
    return jnp.take(table, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    table = gather_for_use(self.embedding[...].astype(self.dtype), ('vocab', 'embed'))
    return x.astype(self.dtype) @ table.T
