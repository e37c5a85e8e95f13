"""CLAMP text tower: a frozen LLM read through learned prompt tokens and an attention pooler.

For each caption (right-padded ids `[batch, length]`), `num_prompts` learned embeddings are placed
right after its last real token. The LLM runs on `[batch, length + num_prompts]` with a read-only
mask. Caption tokens attend causally to caption tokens only, so their hidden states are exactly the
base LLM's. Prompt tokens attend to every real caption token and to all prompt tokens. Padding is
masked for everyone. One learned query then pools the prompt positions' final hidden states with
multi-head attention, a LayerNorm follows, and a linear projection maps to the shared embedding
space.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from clamp_jax.models.layers import LayerNorm, Linear
from clamp_jax.models.llama import Llama


class PromptParam(nnx.Param):
  """Learned prompt embeddings `[num_prompts, embed]`."""


class FeatureStat(nnx.Variable):
  """Fixed per-feature statistics of the prompt hidden states, set once by `calibrate`."""


def read_only_prompt_layout(attention_mask: jax.Array, num_prompts: int):
  """Positions and mask for captions followed by prompt tokens.

  Args:
    attention_mask: `[b, l]` right-padded caption mask (1 for real tokens).
    num_prompts: prompt tokens appended after each caption.

  Returns:
    lengths `[b]` (real caption tokens), positions `[b, t]` with `t = l + num_prompts`, is_caption
    and is_prompt `[b, t]` booleans, and the attention mask `[b, 1, t, t]`.
  """
  batch, length = attention_mask.shape
  total = length + num_prompts
  lengths = attention_mask.astype(jnp.int32).sum(axis=-1)
  index = jnp.arange(total)[None, :]
  is_caption = index < lengths[:, None]
  is_prompt = (index >= lengths[:, None]) & (index < lengths[:, None] + num_prompts)
  causal = jnp.tril(jnp.ones((total, total), dtype=bool))[None]
  caption_query = is_caption[:, :, None] & is_caption[:, None, :] & causal
  prompt_query = is_prompt[:, :, None] & (is_caption | is_prompt)[:, None, :]
  mask = (caption_query | prompt_query)[:, None]
  positions = jnp.broadcast_to(index, (batch, total))
  return lengths, positions, is_caption, is_prompt, mask


class AttentionPooler(nnx.Module):
  """One learned query attending over `[b, n, embed]` tokens with multi-head attention."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f'Pooler width {dim} is not divisible by pooler_heads={num_heads}.')
    self.num_heads = num_heads
    self.query = nnx.Param(jax.random.normal(rngs.params(), (1, dim)) * 0.02,
                           logical_axes=(None, 'embed'))
    self.ln_keys = LayerNorm(dim)
    self.q_proj = Linear(dim, dim, axes=('embed', 'heads'), use_bias=True, rngs=rngs)
    self.k_proj = Linear(dim, dim, axes=('embed', 'heads'), use_bias=True, rngs=rngs)
    self.v_proj = Linear(dim, dim, axes=('embed', 'heads'), use_bias=True, rngs=rngs)
    self.out_proj = Linear(dim, dim, axes=('heads', 'embed'), use_bias=True, rngs=rngs)
    self.ln_out = LayerNorm(dim)

  def __call__(self, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Pool `tokens` `[b, n, embed]` (optional `valid` `[b, n]`) to `[b, embed]`."""
    batch, n, dim = tokens.shape
    head_dim = dim // self.num_heads
    keys_in = self.ln_keys(tokens.astype(jnp.float32))
    q = self.q_proj(self.query[...]).reshape(1, self.num_heads, head_dim)
    k = self.k_proj(keys_in).reshape(batch, n, self.num_heads, head_dim)
    v = self.v_proj(keys_in).reshape(batch, n, self.num_heads, head_dim)
    # Letters: b batch, h head, n token, d head dim.
    scores = jnp.einsum('hd,bnhd->bhn', q[0], k) / math.sqrt(head_dim)
    if valid is not None:
      scores = jnp.where(valid[:, None, :], scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    pooled = jnp.einsum('bhn,bnhd->bhd', weights, v).reshape(batch, dim)
    return self.ln_out(self.out_proj(pooled))


class TextTower(nnx.Module):
  """LLM with read-only prompts, attention pooler and projection (see the module docstring)."""

  def __init__(
      self,
      llm: Llama,
      *,
      embed_dim: int = 512,
      num_prompts: int = 24,
      pooler_heads: int = 8,
      prompt_init_ids: jax.Array | None = None,
      rngs: nnx.Rngs,
  ):
    """Wrap `llm` (weights already loaded) as a CLAMP text tower.

    Prompt embeddings start as copies of the embedding rows `prompt_init_ids` (`num_prompts - 1`
    ids, random rows if None) plus one row holding the mean embedding.
    """
    if num_prompts < 1:
      raise ValueError(f'num_prompts must be at least 1, got {num_prompts}.')
    self.llm = llm
    self.num_prompts = num_prompts
    hidden = llm.config.hidden_size
    table = llm.embed_tokens.embedding[...]
    if prompt_init_ids is None:
      prompt_init_ids = jax.random.randint(rngs.params(), (num_prompts - 1,), 0, table.shape[0])
    prompt_init_ids = jnp.asarray(prompt_init_ids)
    if prompt_init_ids.shape != (num_prompts - 1,):
      raise ValueError(
          f'prompt_init_ids has shape {prompt_init_ids.shape}, expected ({num_prompts - 1},).')
    init = jnp.concatenate([table[prompt_init_ids], table.mean(axis=0, keepdims=True)], axis=0)
    self.prompts = PromptParam(init.astype(jnp.float32), logical_axes=(None, 'embed'))
    # Identity until `calibrate` sets them. After that the pooler reads standardised hidden states.
    self.feature_mean = FeatureStat(jnp.zeros((hidden,), jnp.float32), logical_axes=('embed',))
    self.feature_scale = FeatureStat(jnp.ones((hidden,), jnp.float32), logical_axes=('embed',))
    self.pooler = AttentionPooler(hidden, pooler_heads, rngs=rngs)
    self.projection = Linear(hidden, embed_dim, axes=('embed', None),
                             stddev=hidden ** -0.5, rngs=rngs)

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                    adapters: bool = True):
    """Final LLM hidden states `[b, l + num_prompts, embed]` and the layout from
    `read_only_prompt_layout`."""
    lengths, positions, is_caption, is_prompt, mask = read_only_prompt_layout(
        attention_mask, self.num_prompts)
    batch, length = input_ids.shape
    captions = self.llm.embed_tokens(input_ids)
    captions = jnp.pad(captions, ((0, 0), (0, self.num_prompts), (0, 0)))
    prompt_index = jnp.clip(positions - lengths[:, None], 0, self.num_prompts - 1)
    prompts = self.prompts[...].astype(captions.dtype)[prompt_index]
    embeddings = jnp.where(is_caption[..., None], captions,
                           jnp.where(is_prompt[..., None], prompts, 0))
    hidden, _ = self.llm.hidden_states(embeddings, positions, mask, adapters=adapters)
    return hidden, (lengths, positions, is_caption, is_prompt, mask)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *,
               adapters: bool = True) -> jax.Array:
    """Text embeddings `[b, embed_dim]` (not normalised) for right-padded captions `[b, l]`."""
    prompt_hidden = self.prompt_hidden_states(input_ids, attention_mask, adapters=adapters)
    standardized = (prompt_hidden - self.feature_mean[...]) * self.feature_scale[...]
    pooled = self.pooler(standardized)
    return self.projection(pooled).astype(jnp.float32)

  def prompt_hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                           adapters: bool = True) -> jax.Array:
    """Final LLM hidden states at the prompt positions, float32 `[b, num_prompts, embed]`."""
    hidden, (lengths, *_) = self.hidden_states(input_ids, attention_mask, adapters=adapters)
    prompt_positions = lengths[:, None] + jnp.arange(self.num_prompts)[None, :]
    prompt_hidden = jnp.take_along_axis(hidden, prompt_positions[..., None], axis=1)
    return prompt_hidden.astype(jnp.float32)

  def calibrate(self, input_ids: jax.Array, attention_mask: jax.Array, eps: float = 1e-3) -> None:
    """Set the pooler's input standardisation from the base LLM on a batch of captions.

    A frozen LLM's final hidden states share a large common component (for SmolLM2-135M about 40x
    the norm of what differs between captions), which a fresh pooler and projection need many
    steps to factor out. Subtracting the per-feature mean and dividing by the per-feature standard
    deviation, measured once with adapters off, starts training from features where captions
    differ. The statistics stay fixed afterwards and are saved with the checkpoint.
    """
    prompt_hidden = self.prompt_hidden_states(input_ids, attention_mask, adapters=False)
    flat = prompt_hidden.reshape(-1, prompt_hidden.shape[-1])
    self.feature_mean[...] = flat.mean(axis=0)
    self.feature_scale[...] = 1.0 / (flat.std(axis=0) + eps)
