"""Llama-family decoder-only language model in Flax NNX.

Covers Llama 1/2/3, Vicuna, SmolLM and other checkpoints with the same layout: RMSNorm, rotary
position embedding (default, `linear` and `llama3` frequency scaling), grouped-query attention,
SwiGLU MLP, tied or untied output head and a functional KV cache for incremental decoding.

Einsum letters: b batch, t query position, s key position, k kv head, g query heads per kv head,
d head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clamp_jax.models import onednn_attention
from clamp_jax.models.layers import Embedding, Linear, RMSNorm, run_layers
from clamp_jax.parallel import constrain

KVCache = list[dict[str, jax.Array]]


ATTENTION_KERNELS = ('einsum', 'xla', 'cudnn', 'onednn')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-family model; field names follow Hugging Face's `LlamaConfig`."""

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int | None = None  # Defaults to hidden_size // num_attention_heads.
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # None for plain RoPE, else a dict with `rope_type` ('linear' or 'llama3') and its parameters.
  rope_scaling: dict[str, Any] | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | list[int] | None = 2
  pad_token_id: int | None = None
  dtype: str = 'float32'  # Compute dtype of matmuls and activations.
  param_dtype: str = 'float32'  # Storage dtype of the weights.
  # Rematerialisation of each decoder layer in the backward pass: 'none', 'full', 'dots' or
  # 'dots_no_batch' (see `clamp_jax.models.layers.REMAT_POLICIES`).
  remat: str = 'none'
  # Run the decoder layers as one `jax.lax.scan` (compile time flat in depth) when not decoding.
  scan_layers: bool = False
  # Attention kernel: 'einsum' (two einsums and a float32 softmax), or 'xla' or 'cudnn' for
  # `jax.nn.dot_product_attention` with that implementation. cuDNN needs an NVIDIA GPU and
  # bfloat16 or float16 compute. 'onednn' runs the batched products through oneDNN on the CPU
  # (`clamp_jax.models.onednn_attention`).
  attention: str = 'einsum'
  # Matmul backend of the decoder's linear layers: 'xla', or 'onednn' for oneDNN's bfloat16 (or
  # float32) kernels on the CPU (`clamp_jax.models.onednn`), which XLA:CPU lacks for bfloat16.
  matmul: str = 'xla'

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> 'LlamaConfig':
    """Build from a Hugging Face `config.json` dict, reading old and new rope keys.

    transformers 5 writes `rope_parameters` (with `rope_theta` inside); older checkpoints carry a
    top-level `rope_theta` and an optional `rope_scaling` dict.
    """
    rope_theta = hf.get('rope_theta', 10000.0)
    rope_scaling = hf.get('rope_scaling')
    rope_parameters = hf.get('rope_parameters')
    if rope_parameters:
      rope_parameters = dict(rope_parameters)
      rope_theta = rope_parameters.pop('rope_theta', rope_theta)
      if rope_parameters.get('rope_type', rope_parameters.get('type', 'default')) != 'default':
        rope_scaling = rope_parameters
    if rope_scaling is not None:
      rope_scaling = dict(rope_scaling)
      rope_scaling.setdefault('rope_type', rope_scaling.get('type', 'default'))
      if rope_scaling['rope_type'] == 'default':
        rope_scaling = None
    fields = dict(
        vocab_size=hf['vocab_size'],
        hidden_size=hf['hidden_size'],
        intermediate_size=hf['intermediate_size'],
        num_hidden_layers=hf['num_hidden_layers'],
        num_attention_heads=hf['num_attention_heads'],
        num_key_value_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
        head_dim=hf.get('head_dim'),
        rms_norm_eps=hf.get('rms_norm_eps', 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=hf.get('max_position_embeddings', 4096),
        tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
        bos_token_id=hf.get('bos_token_id'),
        eos_token_id=hf.get('eos_token_id'),
        pad_token_id=hf.get('pad_token_id'),
    )
    fields.update(overrides)
    return cls(**fields)


# ----------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------


def rope_inverse_frequencies(config: LlamaConfig) -> jax.Array:
  """Inverse frequencies `[head_dim // 2]` with the checkpoint's scaling applied."""
  dim = config.resolved_head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  rope_type = scaling['rope_type']
  if rope_type == 'linear':
    return inv_freq / scaling['factor']
  if rope_type == 'llama3':
    factor = scaling['factor']
    low_freq_factor = scaling['low_freq_factor']
    high_freq_factor = scaling['high_freq_factor']
    old_context = scaling['original_max_position_embeddings']
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)
  raise ValueError(
      f"Unsupported rope_type {rope_type!r}: supported are 'default', 'linear' and 'llama3'.")


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Compute the cosines and sines `[b, t, 1, d/2]` (float32) of the rotary angles at
  `positions` `[b, t]`.

  Computed once per forward pass and shared by every layer. XLA would otherwise fuse the
  cosines and sines into each layer's rotation and evaluate them again for every head, at several
  times the cost of the rotation itself. A product with the identity matrix (exact, a few MFLOPs)
  stops that: XLA does not fuse a dot into its consumers.
  """
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, d/2]
  identity = jnp.eye(inv_freq.shape[-1], dtype=jnp.float32)
  cos, sin = (jnp.dot(table, identity, precision=jax.lax.Precision.HIGHEST)
              for table in (jnp.cos(angles), jnp.sin(angles)))
  return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotate `x` `[b, t, heads, d]` by the angles of `rope_tables` in Hugging Face's half-split
  layout."""
  cos, sin = rope
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Position ids `[b, t]` counting only real tokens, so left and right padding give the same ids."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
  """Boolean mask `[b, 1, t, s]`: query t attends to key s when s <= t and key s is a real token."""
  length = attention_mask.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  return causal[None, None] & attention_mask.astype(bool)[:, None, None, :]


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.num_heads = config.num_attention_heads
    self.num_kv_heads = config.num_key_value_heads
    self.head_dim = config.resolved_head_dim
    self.dtype = jnp.dtype(config.dtype)
    if config.attention not in ATTENTION_KERNELS:
      raise ValueError(f'attention={config.attention!r} is not one of {ATTENTION_KERNELS}.')
    self.kernel = config.attention
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_attention_heads={self.num_heads} is not a multiple of '
          f'num_key_value_heads={self.num_kv_heads}.')
    dims = dict(dtype=self.dtype, param_dtype=jnp.dtype(config.param_dtype),
                matmul=config.matmul, rngs=rngs)
    hidden = config.hidden_size
    self.q_proj = Linear(hidden, self.num_heads * self.head_dim, axes=('embed', 'heads'), **dims)
    self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, axes=('embed', 'kv_heads'),
                         **dims)
    self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, axes=('embed', 'kv_heads'),
                         **dims)
    self.o_proj = Linear(self.num_heads * self.head_dim, hidden, axes=('heads', 'embed'), **dims)

  def __call__(
      self,
      x: jax.Array,
      rope: tuple[jax.Array, jax.Array],
      mask: jax.Array,
      *,
      adapters: bool = True,
      cache: dict[str, jax.Array] | None = None,
      cache_index: jax.Array | int = 0,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Attend over `x` `[b, t, embed]` with the rotary tables `rope` (from `rope_tables`) and the
    mask `[b, 1, t, s]`, where s is the key length.

    With a cache (`k`, `v` of shape `[b, max_len, kv_heads, d]`), the new keys and values are written
    at `cache_index` and the queries attend over the whole cache, so `s == max_len`.
    """
    batch, length, _ = x.shape
    q = self.q_proj(x, adapters=adapters).reshape(batch, length, self.num_heads, self.head_dim)
    k = self.k_proj(x, adapters=adapters).reshape(batch, length, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x, adapters=adapters).reshape(batch, length, self.num_kv_heads, self.head_dim)
    q = apply_rope(q, rope)
    k = apply_rope(k, rope)

    if cache is not None:
      k = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype),
                                       (0, cache_index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype),
                                       (0, cache_index, 0, 0))
      cache = {'k': k, 'v': v}

    if self.kernel == 'einsum':
      out = self.einsum_attention(q, k, v, mask)
    elif self.kernel == 'onednn':
      out = onednn_attention.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    else:
      # Query head h reads key-value head h // groups, as in the einsum path.
      # NOTE: with 'xla', a row with every key masked (a padding query) gets uniform weights, as in
      # the einsum path. The tests run on CPU, so 'cudnn' is untested here.
      out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                         mask=mask.astype(bool), implementation=self.kernel)
    out = out.reshape(batch, length, self.num_heads * self.head_dim)
    return self.o_proj(out, adapters=adapters), cache

  def einsum_attention(self, q, k, v, mask):
    batch, length = q.shape[:2]
    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(batch, length, self.num_kv_heads, groups, self.head_dim)
    scores = jnp.einsum('btkgd,bskd->bkgts', q, k.astype(q.dtype)).astype(jnp.float32)
    scores = scores / math.sqrt(self.head_dim)
    # Masked keys get the most negative float rather than -inf: a fully masked row (a padding query)
    # then softmaxes to uniform weights instead of NaN, and its output is ignored downstream.
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    return jnp.einsum('bkgts,bskd->btkgd', weights, v.astype(self.dtype))


class MLP(nnx.Module):
  """SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    dims = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
                matmul=config.matmul, rngs=rngs)
    hidden, inner = config.hidden_size, config.intermediate_size
    self.gate_proj = Linear(hidden, inner, axes=('embed', 'mlp'), **dims)
    self.up_proj = Linear(hidden, inner, axes=('embed', 'mlp'), **dims)
    self.down_proj = Linear(inner, hidden, axes=('mlp', 'embed'), **dims)

  def __call__(self, x: jax.Array, *, adapters: bool = True) -> jax.Array:
    gate = self.gate_proj(x, adapters=adapters)
    up = self.up_proj(x, adapters=adapters)
    # The gating runs in float32: with bfloat16 operands XLA:CPU rounds every intermediate of the
    # forward and backward pass to bfloat16, which costs more than the arithmetic.
    hidden = jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)
    return self.down_proj(hidden.astype(gate.dtype), adapters=adapters)


class DecoderLayer(nnx.Module):
  """Pre-norm transformer block: attention and MLP, each with a residual connection."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    norm = dict(eps=config.rms_norm_eps, dtype=jnp.dtype(config.dtype),
                param_dtype=jnp.dtype(config.param_dtype))
    self.input_layernorm = RMSNorm(config.hidden_size, **norm)
    self.self_attn = Attention(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, rope, mask, *, adapters=True, cache=None, cache_index=0):
    attn_out, cache = self.self_attn(
        self.input_layernorm(x), rope, mask,
        adapters=adapters, cache=cache, cache_index=cache_index)
    x = x + attn_out
    x = x + self.mlp(self.post_attention_layernorm(x), adapters=adapters)
    return constrain(x, ('batch', 'length', 'act_embed')), cache


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class Llama(nnx.Module):
  """Llama-family causal language model.

  `llm(input_ids, attention_mask)` returns float32 logits `[batch, length, vocab]`;
  `llm.hidden_states(...)` returns the final-norm hidden states for callers that bring their own
  embeddings, mask and positions (the CLAMP text tower, the generation loop).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(config, rngs=rngs)
                            for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                        param_dtype=param_dtype)
    self.lm_head = nnx.data(None)
    if not config.tie_word_embeddings:
      self.lm_head = Linear(config.hidden_size, config.vocab_size, axes=('embed', 'vocab'),
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               adapters: bool = True) -> jax.Array:
    """Logits `[batch, length, vocab]` (float32) for int ids `[batch, length]`.

    `attention_mask` (1 for real tokens, 0 for padding) may pad on the left or the right; position
    ids count real tokens only.
    """
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, dtype=jnp.int32)
    hidden, _ = self.hidden_states(
        self.embed_tokens(input_ids),
        positions_from_mask(attention_mask),
        causal_mask(attention_mask),
        adapters=adapters,
    )
    return self.logits(hidden)

  def hidden_states(
      self,
      embeddings: jax.Array,
      positions: jax.Array,
      mask: jax.Array,
      *,
      adapters: bool = True,
      cache: KVCache | None = None,
      cache_index: jax.Array | int = 0,
  ) -> tuple[jax.Array, KVCache | None]:
    """Run the decoder stack on `embeddings` `[b, t, embed]` and return final-norm hidden states.

    Args:
      embeddings: input embeddings `[b, t, embed]`.
      positions: int position ids `[b, t]` for the rotary embedding.
      mask: boolean attention mask `[b, 1, t, s]`; `s == t` without a cache, else the cache length.
      adapters: apply LoRA adapters where attached.
      cache: per-layer `{'k', 'v'}` arrays `[b, max_len, kv_heads, head_dim]`, or None.
      cache_index: where the new keys and values are written in the cache.
    """
    rope = rope_tables(positions, rope_inverse_frequencies(self.config))
    x = constrain(embeddings, ('batch', 'length', 'act_embed'))
    if cache is None:
      x = run_layers(
          self.layers,
          lambda layer, x: layer(x, rope, mask, adapters=adapters)[0],
          x, remat=self.config.remat, scan=self.config.scan_layers)
      return self.norm(x), None
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(x, rope, mask, adapters=adapters, cache=cache[i],
                             cache_index=cache_index)
      new_cache.append(layer_cache)
    return self.norm(x), new_cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Output head: float32 logits `[b, t, vocab]` from final hidden states."""
    if self.lm_head is None:
      return self.embed_tokens.attend(hidden).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
    """Empty KV cache for `max_length` positions."""
    config = self.config
    shape = (batch, max_length, config.num_key_value_heads, config.resolved_head_dim)
    dtype = dtype or jnp.dtype(config.dtype)
    return [{'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
            for _ in range(config.num_hidden_layers)]
