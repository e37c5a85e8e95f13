"""The CLAMP model: an image tower, an LLM text tower and a learned temperature."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from clamp_jax.models.text_tower import TextTower


class TemperatureParam(nnx.Param):
  """Log of the contrastive logit scale (a scalar)."""


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CLAMP(nnx.Module):
  """Two towers mapping images and captions into one embedding space.

  The logit scale is `exp(log_scale)`, initialised to 1/0.07 and clipped at `max_logit_scale` (100)
  when used, as in CLIP.
  """

  def __init__(self, image_tower: nnx.Module, text_tower: TextTower, *,
               init_logit_scale: float = 1 / 0.07, max_logit_scale: float = 100.0,
               init_logit_bias: float | None = None):
    """`init_logit_bias` adds a learned scalar bias for the sigmoid loss (SigLIP uses -10)."""
    self.image_tower = image_tower
    self.text_tower = text_tower
    self.max_logit_scale = max_logit_scale
    self.log_logit_scale = TemperatureParam(jnp.asarray(math.log(init_logit_scale), jnp.float32),
                                            logical_axes=())
    self.logit_bias = nnx.data(
        None if init_logit_bias is None else
        TemperatureParam(jnp.asarray(init_logit_bias, jnp.float32), logical_axes=()))
    # A frozen CLIP teacher for distillation (`clamp_jax.models.clip_text.CLIPTeacher`), or None.
    self.teacher = nnx.data(None)

  def logit_scale(self) -> jax.Array:
    return jnp.minimum(jnp.exp(self.log_logit_scale[...]), self.max_logit_scale)

  def bias(self) -> jax.Array:
    """Return the sigmoid loss's logit bias. Raise ValueError if the model has none."""
    if self.logit_bias is None:
      raise ValueError('This model has no logit bias; build it with init_logit_bias for the '
                       'sigmoid loss.')
    return self.logit_bias[...]

  def encode_image(self, images: jax.Array) -> jax.Array:
    """L2-normalised image embeddings `[b, embed_dim]` from normalised images `[b, h, w, 3]`."""
    return l2_normalize(self.image_tower(images))

  def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                  adapters: bool = True) -> jax.Array:
    """L2-normalised text embeddings `[b, embed_dim]` from right-padded caption ids `[b, l]`."""
    return l2_normalize(self.text_tower(input_ids, attention_mask, adapters=adapters))

  def __call__(self, images, input_ids, attention_mask):
    """Image and text embeddings plus the clipped logit scale, for the contrastive loss."""
    return (self.encode_image(images), self.encode_text(input_ids, attention_mask),
            self.logit_scale())
