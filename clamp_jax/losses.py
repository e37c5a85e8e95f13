"""Symmetric contrastive (InfoNCE) loss between image and text embeddings, with repeated captions.

CLIP's loss treats the pair (image i, caption i) as the only positive in row i, so the target of
each softmax row is one-hot on the diagonal. A batch of class-templated captions such as "a photo
of the digit seven." often contains the same caption several times. With one-hot targets, image i is
then pushed away from caption j even though caption j is token for token the caption of image i,
and the gradients of the equal captions cancel or fight.

Here every row's target is instead uniform over its positives: all captions equal to caption i
(including caption i itself). The `positives` matrix marks those pairs and `equal_caption_mask`
builds it from the tokenized batch. Without repeated captions the target is the identity and the
loss is CLIP's exactly. With k equal captions in a row, the row's minimum loss is `log(k)`, not 0,
because the best prediction spreads the probability evenly over k equal logits.

Einsum letters: i image index, j text index, d embedding dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Average `-sum(targets * log_softmax(logits))` over the rows of two `[rows, classes]` arrays."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))


def softmax_contrastive_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array | float,
    positives: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Compute the symmetric InfoNCE loss over one batch of paired embeddings.

  Args:
    image_embeddings: L2-normalised image embeddings `[batch, dim]`.
    text_embeddings: L2-normalised text embeddings `[batch, dim]`. Row i is paired with image i.
    logit_scale: scalar temperature multiplier, already exponentiated and clipped.
    positives: optional bool `[batch, batch]`, True where caption i equals caption j. The diagonal
      is always treated as positive. None means only the diagonal is positive.

  Returns:
    `(loss, metrics)`. The loss is the mean of the image-to-text and text-to-image cross-entropies
    in float32. The metrics are `loss_i2t`, `loss_t2i`, `accuracy_i2t` and `accuracy_t2i`, where an
    accuracy counts a row as correct when its argmax is a positive.
  """
  if image_embeddings.shape != text_embeddings.shape or image_embeddings.ndim != 2:
    raise ValueError(
        f'Expected image and text embeddings of equal shape [batch, dim], got '
        f'{list(image_embeddings.shape)} and {list(text_embeddings.shape)}.')
  batch = image_embeddings.shape[0]

  images = image_embeddings.astype(jnp.float32)
  texts = text_embeddings.astype(jnp.float32)
  scale = jnp.asarray(logit_scale, jnp.float32)
  logits_i2t = scale * jnp.einsum('id,jd->ij', images, texts)  # [images, texts]
  logits_t2i = logits_i2t.T  # [texts, images]

  identity = jnp.eye(batch, dtype=bool)
  if positives is None:
    positives = identity
  else:
    if positives.shape != (batch, batch):
      raise ValueError(
          f'Expected positives of shape [{batch}, {batch}], got {list(positives.shape)}.')
    positives = positives.astype(bool) | identity

  # Row i of `targets_i2t` is uniform over the captions equal to caption i. Column j of the
  # positives lists the images whose caption equals caption j, which gives the text-to-image rows.
  targets_i2t = positives / jnp.sum(positives, axis=1, keepdims=True)
  positives_t2i = positives.T
  targets_t2i = positives_t2i / jnp.sum(positives_t2i, axis=1, keepdims=True)

  loss_i2t = soft_cross_entropy(logits_i2t, targets_i2t)
  loss_t2i = soft_cross_entropy(logits_t2i, targets_t2i)
  loss = 0.5 * (loss_i2t + loss_t2i)

  rows = jnp.arange(batch)
  hit_i2t = positives[rows, jnp.argmax(logits_i2t, axis=1)]
  hit_t2i = positives_t2i[rows, jnp.argmax(logits_t2i, axis=1)]
  metrics = {
      'loss_i2t': loss_i2t,
      'loss_t2i': loss_t2i,
      'accuracy_i2t': jnp.mean(hit_i2t.astype(jnp.float32)),
      'accuracy_t2i': jnp.mean(hit_t2i.astype(jnp.float32)),
  }
  return loss, metrics


def equal_caption_mask(input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mark pairs of equal captions: bool `[batch, batch]`, True where rows i and j match.

  Two rows are equal when they have the same real tokens at the same positions. Token ids under a
  zero in `attention_mask` are ignored, so padding ids do not matter. Memory is
  `O(batch**2 * length)` booleans.
  """
  real = attention_mask.astype(bool)
  # Token ids are non-negative, so -1 marks padding without colliding with a real token.
  ids = jnp.where(real, input_ids.astype(jnp.int32), -1)
  return jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
