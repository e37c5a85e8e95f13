"""CLIP's text transformer and a frozen CLIP teacher (image and text towers) for distillation.

The text transformer follows transformers' `CLIPTextModel` plus `text_projection`: token and
learned position embeddings, causal pre-norm blocks, a final LayerNorm, and pooling at the
end-of-text token. The blocks are the image tower's `EncoderBlock`, with a mask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from clamp_jax.models.layers import Embedding, LayerNorm, Linear, normal_init, run_layers
from clamp_jax.models.vit import ACTIVATIONS, EncoderBlock, VisionTransformer

# A config.json `eos_token_id` of 2 marks the original OpenAI CLIP configs, whose end-of-text
# token is the highest id in the vocabulary. transformers then pools at the position of the
# highest id instead of looking for the token.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Architecture of the CLIP text transformer. The defaults are OpenAI CLIP ViT-B's.

  The field names `width`, `heads`, `mlp_dim`, `act`, `layer_norm_eps`, `dtype`, `param_dtype`
  and `matmul` are the ones `EncoderBlock` reads from a `ViTConfig`.
  """

  vocab_size: int = 49408
  max_length: int = 77  # Position embeddings: the longest token sequence.
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  embed_dim: int = 512  # Output size of `text_projection`.
  act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: str = 'none'
  scan_layers: bool = False
  matmul: str = 'xla'  # Matmul backend of the blocks' linear layers: 'xla' or 'onednn'.

  def __post_init__(self):
    for name in ('vocab_size', 'max_length', 'width', 'layers', 'heads', 'mlp_dim',
                 'embed_dim'):
      value = getattr(self, name)
      if value <= 0:
        raise ValueError(f'CLIPTextConfig.{name} must be positive, got {value}.')
    if self.width % self.heads:
      raise ValueError(f'width={self.width} is not divisible by heads={self.heads}.')
    if self.act not in ACTIVATIONS:
      raise ValueError(f'Invalid act {self.act!r}: expected one of {ACTIVATIONS}.')

  @property
  def head_dim(self) -> int:
    return self.width // self.heads


def end_of_text_positions(ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Position of the end-of-text token in each row of `ids` `[batch, length]`, as transformers'
  `CLIPTextModel` chooses it.

  With `eos_token_id == 2` (the original OpenAI configs) it is the first position of the highest
  id. Otherwise it is the first position that contains `eos_token_id`, or 0 if a row has none.
  """
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax(ids == eos_token_id, axis=-1)


class CLIPTextTransformer(nnx.Module):
  """`encoder(ids, mask)` maps token ids `[batch, length]` to projected text embeddings
  `[batch, embed_dim]` (float32, not normalised)."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(config.dtype)
    param_dtype = jnp.dtype(config.param_dtype)
    self.token_embedding = Embedding(config.vocab_size, config.width, dtype=self.dtype,
                                     param_dtype=param_dtype, rngs=rngs)
    self.position_embedding = nnx.Param(
        normal_init(0.01)(rngs.params(), (config.max_length, config.width), param_dtype),
        logical_axes=(None, 'embed'))
    self.layers = nnx.List([EncoderBlock(config, rngs=rngs) for _ in range(config.layers)])
    self.final_layer_norm = LayerNorm(config.width, eps=config.layer_norm_eps, dtype=self.dtype,
                                      param_dtype=param_dtype)
    self.projection = Linear(config.width, config.embed_dim, axes=('embed', None),
                             dtype=self.dtype, param_dtype=param_dtype,
                             stddev=config.width ** -0.5, rngs=rngs)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Embed `ids` `[batch, length]` with `mask` (1 for tokens, 0 for padding).

    Each token attends to itself and to the earlier tokens that the mask keeps. Positions count from 0 at
    the first column whatever the padding, as in transformers.
    """
    length = ids.shape[1]
    if length > self.config.max_length:
      raise ValueError(f'Token sequences of length {length} exceed the {self.config.max_length} '
                       'position embeddings.')
    x = self.token_embedding(ids)
    x = x + self.position_embedding[:length].astype(self.dtype)
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    attend = causal[None, None] & (mask[:, None, None, :] > 0)
    x = run_layers(self.layers, lambda layer, x: layer(x, attend), x, remat=self.config.remat,
                   scan=self.config.scan_layers)
    x = self.final_layer_norm(x)
    positions = end_of_text_positions(ids, self.config.eos_token_id)
    pooled = jnp.take_along_axis(x, positions[:, None, None], axis=1)[:, 0]
    return self.projection(pooled).astype(jnp.float32)


def l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPTeacher(nnx.Module):
  """A pretrained CLIP model whose embeddings serve as distillation targets.

  Both methods return L2-normalised float32 embeddings `[batch, embed_dim]` under
  `jax.lax.stop_gradient`, so no gradient reaches the teacher's weights. The weights are
  `nnx.Param`s, so keep them out of the trainable filter, or the optimizer keeps state for them.
  `logit_scale` is the checkpoint's temperature, `exp` of its stored log.
  """

  def __init__(self, image_tower: VisionTransformer, text_encoder: CLIPTextTransformer,
               logit_scale: float):
    if image_tower.config.embed_dim != text_encoder.config.embed_dim:
      raise ValueError(f'The image tower projects to {image_tower.config.embed_dim} and the text '
                       f'encoder to {text_encoder.config.embed_dim}; they must agree.')
    self.image_tower = image_tower
    self.text_encoder = text_encoder
    self.logit_scale = float(logit_scale)

  def encode_image(self, images: jax.Array) -> jax.Array:
    """Embed images `[batch, size, size, 3]` normalised as the checkpoint expects."""
    return jax.lax.stop_gradient(l2_normalize(self.image_tower(images)))

  def encode_text(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Embed token ids `[batch, length]` from the teacher's tokenizer, with their mask."""
    return jax.lax.stop_gradient(l2_normalize(self.text_encoder(ids, mask)))
