"""Vision Transformer image tower in the CLIP layout, in Flax NNX.

The layout follows OpenAI CLIP's visual encoder. A bias-free patch embedding, a class token and
learned position embeddings feed a LayerNorm (`ln_pre`) and a stack of pre-norm transformer blocks.
The final class token goes through a LayerNorm (`ln_post`) and a bias-free projection to the joint
embedding space. Attention keeps separate q/k/v/out projections with biases, as Hugging Face's
`CLIPVisionModel` does, so its weights and open_clip's (after splitting the fused `in_proj`) map
onto these parameters one to one.

The patch kernel is stored as `[patch, patch, channels, width]` (HWIO). A PyTorch `Conv2d` weight
`[width, channels, patch, patch]` maps onto it with `transpose(2, 3, 1, 0)`.

Einsum letters: b batch, y and x patch grid rows and columns, p and q pixel offsets inside a patch,
c channels, t query token, s key token, h head, d head dim, e embed (width).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from clamp_jax.models.layers import LayerNorm, Linear, normal_init, run_layers
from clamp_jax.parallel import constrain

ACTIVATIONS = ('gelu', 'quick_gelu')


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of the image tower. The defaults are CLIP ViT-B/32."""

  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  embed_dim: int = 512  # Output size of the final projection (the joint embedding space).
  # 'quick_gelu' is `x * sigmoid(1.702 x)` as in OpenAI CLIP, 'gelu' the exact erf form.
  act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  # 'token' reads the class token (CLIP); 'gap' averages the patch tokens, which separates
  # images from the first step when training from scratch.
  pool: str = 'token'
  dtype: str = 'float32'  # Compute dtype of matmuls and activations.
  param_dtype: str = 'float32'  # Storage dtype of the weights.
  remat: str = 'none'  # Rematerialisation of each block: 'none', 'full', 'dots', 'dots_no_batch'.
  scan_layers: bool = False  # Run the blocks as one `jax.lax.scan`.
  # Matmul backend of the blocks' linear layers: 'xla', or 'onednn' (`clamp_jax.models.onednn`).
  matmul: str = 'xla'

  def __post_init__(self):
    for name in ('image_size', 'patch_size', 'width', 'layers', 'heads', 'embed_dim'):
      value = getattr(self, name)
      if value <= 0:
        raise ValueError(f'ViTConfig.{name} must be positive, got {value}.')
    if self.image_size % self.patch_size:
      raise ValueError(
          f'image_size={self.image_size} is not divisible by patch_size={self.patch_size}.')
    if self.width % self.heads:
      raise ValueError(f'width={self.width} is not divisible by heads={self.heads}.')
    if self.mlp_ratio <= 0:
      raise ValueError(f'ViTConfig.mlp_ratio must be positive, got {self.mlp_ratio}.')
    if self.pool not in ('token', 'gap'):
      raise ValueError(f"Invalid pool {self.pool!r}: expected 'token' or 'gap'.")
    if self.act not in ACTIVATIONS:
      raise ValueError(f'Invalid act {self.act!r}: expected one of {ACTIVATIONS}.')

  @property
  def grid_size(self) -> int:
    """Number of patches along each side of the image."""
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """Sequence length: one class token plus one token per patch."""
    return self.grid_size ** 2 + 1

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)


def quick_gelu(x: jax.Array) -> jax.Array:
  """Sigmoid approximation of GELU used by OpenAI CLIP: `x * sigmoid(1.702 x)`."""
  return x * jax.nn.sigmoid(1.702 * x)


def activation(name: str):
  if name == 'quick_gelu':
    return quick_gelu
  return lambda x: jax.nn.gelu(x, approximate=False)


class Attention(nnx.Module):
  """Multi-head self-attention over all tokens (no mask), with biased q/k/v/out projections."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.heads = config.heads
    self.head_dim = config.head_dim
    self.dtype = jnp.dtype(config.dtype)
    dims = dict(use_bias=True, dtype=self.dtype, param_dtype=jnp.dtype(config.param_dtype),
                matmul=config.matmul, rngs=rngs)
    width = config.width
    self.q_proj = Linear(width, width, axes=('embed', 'heads'), **dims)
    self.k_proj = Linear(width, width, axes=('embed', 'heads'), **dims)
    self.v_proj = Linear(width, width, axes=('embed', 'heads'), **dims)
    self.out_proj = Linear(width, width, axes=('heads', 'embed'), **dims)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Attend over `x` `[b, tokens, embed]` and return `[b, tokens, embed]`.

    `mask` is a boolean array that broadcasts to `[b, heads, t, s]`; True lets query t see key s.
    A query whose keys are all masked gets a zero output, as PyTorch's
    `scaled_dot_product_attention` (torch 2.13) returns.
    """
    batch, length, _ = x.shape
    shape = (batch, length, self.heads, self.head_dim)
    q = self.q_proj(x).reshape(shape)
    k = self.k_proj(x).reshape(shape)
    v = self.v_proj(x).reshape(shape)
    scores = jnp.einsum('bthd,bshd->bhts', q, k).astype(jnp.float32)
    if mask is not None:
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores / math.sqrt(self.head_dim), axis=-1)
    if mask is not None:
      weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
    weights = weights.astype(self.dtype)
    out = jnp.einsum('bhts,bshd->bthd', weights, v)
    return self.out_proj(out.reshape(batch, length, self.heads * self.head_dim))


class MLP(nnx.Module):
  """Feed-forward block `fc2(act(fc1(x)))` with biases."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    dims = dict(use_bias=True, dtype=jnp.dtype(config.dtype),
                param_dtype=jnp.dtype(config.param_dtype), matmul=config.matmul, rngs=rngs)
    self.act = activation(config.act)
    self.fc1 = Linear(config.width, config.mlp_dim, axes=('embed', 'mlp'), **dims)
    self.fc2 = Linear(config.mlp_dim, config.width, axes=('mlp', 'embed'), **dims)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nnx.Module):
  """Pre-norm transformer block: attention and MLP, each with a residual connection."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    norm = dict(eps=config.layer_norm_eps, dtype=jnp.dtype(config.dtype),
                param_dtype=jnp.dtype(config.param_dtype))
    self.layer_norm1 = LayerNorm(config.width, **norm)
    self.self_attn = Attention(config, rngs=rngs)
    self.layer_norm2 = LayerNorm(config.width, **norm)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return constrain(x + self.mlp(self.layer_norm2(x)), ('batch', 'length', 'act_embed'))


class VisionTransformer(nnx.Module):
  """CLIP-style ViT: `tower(images)` maps `[batch, height, width, 3]` to `[batch, embed_dim]`.

  The input is float pixels already normalised with the checkpoint's mean and std. The output is
  the projected class token and is not L2-normalised, so the contrastive loss normalises it.
  """

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(config.dtype)
    param_dtype = jnp.dtype(config.param_dtype)
    width = config.width
    # Embedding scale width**-0.5 as in OpenAI CLIP's initialisation.
    scale = width ** -0.5
    # PyTorch's default Conv2d init (uniform with bound 1/sqrt(fan_in)), which CLIP keeps for its
    # patch embedding. A smaller init lets the position embeddings drown the pixels at the start.
    fan_in = config.patch_size * config.patch_size * 3
    self.patch_embedding = nnx.Param(
        jax.random.uniform(rngs.params(), (config.patch_size, config.patch_size, 3, width),
                           param_dtype, -fan_in ** -0.5, fan_in ** -0.5),
        logical_axes=(None, None, None, 'embed'),
    )
    self.class_embedding = nnx.Param(
        normal_init(scale)(rngs.params(), (width,), param_dtype), logical_axes=('embed',))
    self.position_embedding = nnx.Param(
        normal_init(scale)(rngs.params(), (config.num_tokens, width), param_dtype),
        logical_axes=(None, 'embed'),
    )
    norm = dict(eps=config.layer_norm_eps, dtype=self.dtype, param_dtype=param_dtype)
    self.ln_pre = LayerNorm(width, **norm)
    self.layers = nnx.List([EncoderBlock(config, rngs=rngs) for _ in range(config.layers)])
    self.ln_post = LayerNorm(width, **norm)
    self.projection = Linear(width, config.embed_dim, axes=('embed', None), dtype=self.dtype,
                             param_dtype=param_dtype, stddev=scale, rngs=rngs)

  def patchify(self, images: jax.Array) -> jax.Array:
    """Embed non-overlapping patches: `[b, H, W, 3]` to `[b, grid * grid, embed]`.

    Equivalent to a stride-`patch` convolution without bias.
    """
    config = self.config
    batch, height, width, channels = images.shape
    if (height, width, channels) != (config.image_size, config.image_size, 3):
      raise ValueError(
          f'Expected images of shape [batch, {config.image_size}, {config.image_size}, 3], '
          f'got {list(images.shape)}.')
    grid, patch = config.grid_size, config.patch_size
    patches = images.astype(self.dtype).reshape(batch, grid, patch, grid, patch, channels)
    kernel = self.patch_embedding[...].astype(self.dtype)
    tokens = jnp.einsum('bypxqc,pqce->byxe', patches, kernel)
    return tokens.reshape(batch, grid * grid, config.width)

  def encode(self, images: jax.Array) -> jax.Array:
    """Run the encoder and return the token states `[b, tokens, embed]` before `ln_post`."""
    tokens = self.patchify(images)
    batch = tokens.shape[0]
    class_token = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype),
                                   (batch, 1, self.config.width))
    x = jnp.concatenate([class_token, tokens], axis=1)
    x = x + self.position_embedding[...].astype(self.dtype)
    x = constrain(self.ln_pre(x), ('batch', 'length', 'act_embed'))
    return run_layers(self.layers, lambda layer, x: layer(x), x, remat=self.config.remat,
                      scan=self.config.scan_layers)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Projected class-token embeddings `[batch, embed_dim]` (float32, not normalised)."""
    tokens = self.encode(images)
    pooled = tokens[:, 0] if self.config.pool == 'token' else tokens[:, 1:].mean(axis=1)
    pooled = self.ln_post(pooled)
    return self.projection(pooled).astype(jnp.float32)
