"""Contrastive losses (InfoNCE and sigmoid) between image and text embeddings, with equal captions.

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

`sigmoid_contrastive_loss` is SigLIP's pairwise alternative: every (image, text) pair is an
independent binary classification, +1 for positives and -1 for all other pairs, so no row needs a
softmax over the whole batch.

`clamp_jax.sharded_losses` computes the same losses on a batch split over mesh axes.

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
  identity = jnp.eye(batch, dtype=bool)
  if positives is None:
    positives = identity
  else:
    if positives.shape != (batch, batch):
      raise ValueError(
          f'Expected positives of shape [{batch}, {batch}], got {list(positives.shape)}.')
    positives = positives.astype(bool) | identity
  return contrastive_loss_from_positives(image_embeddings, text_embeddings, logit_scale,
                                         positives)


def indexed_contrastive_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array | float,
    caption_index: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE against a table of distinct captions.

  Args:
    image_embeddings: L2-normalised `[images, dim]`.
    text_embeddings: L2-normalised `[captions, dim]`, one row per distinct caption.
    logit_scale: scalar temperature multiplier, already exponentiated and clipped.
    caption_index: int `[images]`, the row of `text_embeddings` that is image i's caption.

  Image i's only positive is its caption row, so its minimum loss is 0. A caption row's positives
  are all images that carry it; rows that no image in the batch carries are left out of the
  text-to-image term. With one distinct caption per image (`caption_index == arange`) this is
  CLIP's loss exactly.
  """
  num_captions = text_embeddings.shape[0]
  positives = caption_index[:, None] == jnp.arange(num_captions)[None, :]
  return contrastive_loss_from_positives(image_embeddings, text_embeddings, logit_scale,
                                         positives)


def contrastive_loss_from_positives(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array | float,
    positives: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Compute the loss and metrics for bool `positives` `[images, texts]`.

  Every image row needs at least one positive.

  Each row's target is uniform over its positives. Text rows without any positive image are
  excluded from the text-to-image mean.
  """
  if image_embeddings.ndim != 2 or text_embeddings.ndim != 2 or (
      image_embeddings.shape[1] != text_embeddings.shape[1]):
    raise ValueError(
        f'Expected image and text embeddings [rows, dim] of equal dim, got '
        f'{list(image_embeddings.shape)} and {list(text_embeddings.shape)}.')
  images = image_embeddings.astype(jnp.float32)
  texts = text_embeddings.astype(jnp.float32)
  scale = jnp.asarray(logit_scale, jnp.float32)
  logits_i2t = scale * jnp.einsum('id,jd->ij', images, texts)  # [images, texts]
  logits_t2i = logits_i2t.T  # [texts, images]

  # Row i of `targets_i2t` is uniform over the captions equal to caption i. Column j of the
  # positives lists the images whose caption equals caption j, which gives the text-to-image rows.
  positives = positives.astype(bool)
  targets_i2t = positives / jnp.sum(positives, axis=1, keepdims=True)
  positives_t2i = positives.T
  counts_t2i = jnp.sum(positives_t2i, axis=1, keepdims=True)
  targets_t2i = positives_t2i / jnp.maximum(counts_t2i, 1)
  has_image = (counts_t2i[:, 0] > 0).astype(jnp.float32)

  loss_i2t = soft_cross_entropy(logits_i2t, targets_i2t)
  log_probs_t2i = jax.nn.log_softmax(logits_t2i, axis=-1)
  per_text = -jnp.sum(targets_t2i * log_probs_t2i, axis=-1)
  loss_t2i = jnp.sum(per_text * has_image) / jnp.maximum(jnp.sum(has_image), 1.0)
  loss = 0.5 * (loss_i2t + loss_t2i)

  hit_i2t = jnp.take_along_axis(positives, jnp.argmax(logits_i2t, axis=1)[:, None], axis=1)[:, 0]
  hit_t2i = jnp.take_along_axis(positives_t2i, jnp.argmax(logits_t2i, axis=1)[:, None],
                                axis=1)[:, 0]
  metrics = {
      'loss_i2t': loss_i2t,
      'loss_t2i': loss_t2i,
      'accuracy_i2t': jnp.mean(hit_i2t.astype(jnp.float32)),
      'accuracy_t2i': jnp.sum(hit_t2i * has_image) / jnp.maximum(jnp.sum(has_image), 1.0),
  }
  return loss, metrics


def equal_caption_mask(input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mark pairs of equal captions: bool `[batch, batch]`, True where rows i and j match.

  Two rows are equal when they have the same real tokens at the same positions. Token ids under a
  zero in `attention_mask` are ignored, so padding ids do not matter. Memory is
  `O(batch**2 * length)` booleans.
  """
  rows = caption_token_rows(input_ids, attention_mask)
  return equal_rows(rows, rows)


def caption_token_rows(input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Set padding ids to -1 in int32 `[batch, length]` rows, so equal captions give equal rows."""
  if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
    raise ValueError(
        f'Expected input_ids and attention_mask of equal shape [batch, length], got '
        f'{list(input_ids.shape)} and {list(attention_mask.shape)}.')
  real = attention_mask.astype(bool)
  # Token ids are non-negative, so -1 marks padding without colliding with a real token.
  return jnp.where(real, input_ids.astype(jnp.int32), -1)


def equal_rows(rows: jax.Array, other_rows: jax.Array) -> jax.Array:
  """Bool `[rows, other_rows]`, True where two token rows from `caption_token_rows` are equal."""
  return jnp.all(rows[:, None, :] == other_rows[None, :, :], axis=-1)


def sigmoid_contrastive_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float,
    positives: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Compute SigLIP's pairwise sigmoid loss over one batch of paired embeddings.

  Every pair (image i, text j) is a binary classification with the logit
  `logit_scale * <image_i, text_j> + logit_bias` and the label +1 for a positive pair, -1 for any
  other pair. The loss is `-sum(log_sigmoid(label * logit)) / batch`, summed over all `batch**2`
  pairs and divided by the batch size.

  Args:
    image_embeddings: L2-normalised image embeddings `[batch, dim]`.
    text_embeddings: L2-normalised text embeddings `[batch, dim]`. Row i is paired with image i.
    logit_scale: scalar multiplier of the cosine similarities, already exponentiated.
    logit_bias: scalar added to every logit.
    positives: optional bool `[batch, batch]`, True where caption i equals caption j. The diagonal
      is always treated as positive. None means only the diagonal is positive.

  Returns:
    `(loss, metrics)` in float32. The metrics are `loss_positive` and `loss_negative`, the parts of
    the loss from the positive and from the negative pairs, which add up to the loss.
  """
  check_paired_embeddings(image_embeddings, text_embeddings)
  batch = image_embeddings.shape[0]
  identity = jnp.eye(batch, dtype=bool)
  if positives is None:
    positives = identity
  else:
    if positives.shape != (batch, batch):
      raise ValueError(
          f'Expected positives of shape [{batch}, {batch}], got {list(positives.shape)}.')
    positives = positives.astype(bool) | identity
  positive_sum, negative_sum = sigmoid_pair_sums(
      image_embeddings.astype(jnp.float32), text_embeddings.astype(jnp.float32),
      jnp.asarray(logit_scale, jnp.float32), jnp.asarray(logit_bias, jnp.float32), positives)
  metrics = {'loss_positive': positive_sum / batch, 'loss_negative': negative_sum / batch}
  return (positive_sum + negative_sum) / batch, metrics


def check_paired_embeddings(image_embeddings: jax.Array, text_embeddings: jax.Array) -> None:
  if image_embeddings.shape != text_embeddings.shape or image_embeddings.ndim != 2:
    raise ValueError(
        f'Expected image and text embeddings of equal shape [batch, dim], got '
        f'{list(image_embeddings.shape)} and {list(text_embeddings.shape)}.')


def sigmoid_pair_sums(
    images: jax.Array,
    texts: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    positives: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Sum `-log_sigmoid(label * logit)` over the positive and over the negative pairs of a block."""
  logits = scale * jnp.einsum('id,jd->ij', images, texts) + bias  # [images, texts]
  labels = jnp.where(positives, 1.0, -1.0)
  pair_losses = -jax.nn.log_sigmoid(labels * logits)
  positive_sum = jnp.sum(jnp.where(positives, pair_losses, 0.0))
  negative_sum = jnp.sum(jnp.where(positives, 0.0, pair_losses))
  return positive_sum, negative_sum


# ----------------------------------------------------------------------------------------------
# Losses on a batch split over mesh axes
# ----------------------------------------------------------------------------------------------
