"""Contrastive losses on a batch split over mesh axes, computed with `jax.shard_map`.

They equal the single-device functions in `clamp_jax.losses` on the global batch, including
equal-caption positives found across shards, up to float32 summation order.

Einsum letters: i image index, j text index, d embedding dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from clamp_jax.losses import (caption_token_rows, check_paired_embeddings, equal_rows,
                              sigmoid_pair_sums)


def sharded_softmax_contrastive_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array | float,
    mesh: Mesh,
    batch_axes: str | Sequence[str] = ('data', 'fsdp'),
    input_ids: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Compute `softmax_contrastive_loss` on a batch split over the `batch_axes` of `mesh`.

  Each shard all-gathers the image and text embeddings over the batch axes. It then takes the
  cross-entropy of its own image rows against all texts and of its own text rows against all
  images. The loss and the metrics are sums over the rows of all shards divided by the global
  batch, so they equal the single-device function on the global batch. Gradients flow back through
  the gathers, whose transpose is a reduce-scatter, so each shard receives the full gradient of its
  own rows.

  Memory per device is the gathered embeddings of both towers, `2 * [batch, dim]`, plus a few
  temporaries of shape `[batch / shards, batch]` (logits, targets, log-probabilities and their
  gradients), where one device would need them at `[batch, batch]`. With `input_ids`, the
  equal-caption test adds a temporary `[batch / shards, batch, length]` booleans.
  Mesh axes outside `batch_axes` (such as `tensor`) receive replicated inputs and repeat the same
  computation.

  Args:
    image_embeddings: L2-normalised `[batch, dim]`, split along the batch over the batch axes.
    text_embeddings: L2-normalised `[batch, dim]`, split the same way. Row i is paired with image i.
    logit_scale: scalar temperature multiplier, already exponentiated and clipped.
    mesh: the device mesh, for example `jax.sharding.Mesh(devices, ('data', 'fsdp', 'tensor'))`.
    batch_axes: the mesh axes that split the batch, major to minor, as in
      `PartitionSpec(batch_axes)`. Names that the mesh lacks are skipped, but at least one must
      exist.
    input_ids: optional int `[batch, length]` caption tokens, split like the embeddings. With
      `attention_mask`, equal captions become positives exactly as in
      `softmax_contrastive_loss(..., positives=equal_caption_mask(input_ids, attention_mask))`.
    attention_mask: `[batch, length]`, required together with `input_ids`.

  Returns:
    `(loss, metrics)` with the metric names of `softmax_contrastive_loss`, each over the global
    batch.

  Raises:
    ValueError: no batch axis in the mesh, mismatched shapes, or a global batch that the number of
      batch shards does not divide.
  """
  axes, num_shards = _mesh_batch_axes(mesh, batch_axes)
  token_rows = _check_sharded_batch(image_embeddings, text_embeddings, input_ids, attention_mask,
                                    axes, num_shards)
  global_batch = image_embeddings.shape[0]

  def per_shard(images, texts, scale, token_rows=None):
    local_batch = images.shape[0]
    # A tiled gather over `axes` concatenates the shards in the order of `PartitionSpec(axes)`,
    # which restores the global batch order. Gathering before the float32 cast keeps the
    # transfer in the input dtype.
    all_images = jax.lax.all_gather(images, axes, tiled=True).astype(jnp.float32)  # [batch, d]
    all_texts = jax.lax.all_gather(texts, axes, tiled=True).astype(jnp.float32)  # [batch, d]
    images = images.astype(jnp.float32)
    texts = texts.astype(jnp.float32)

    # `axis_index` over several axes linearises them in the same major-to-minor order.
    first_row = jax.lax.axis_index(axes) * local_batch
    global_rows = first_row + jnp.arange(local_batch)
    positives = global_rows[:, None] == jnp.arange(global_batch)[None, :]  # [local, batch]
    if token_rows is not None:
      all_token_rows = jax.lax.all_gather(token_rows, axes, tiled=True)
      positives = positives | equal_rows(token_rows, all_token_rows)

    logits_i2t = scale * jnp.einsum('id,jd->ij', images, all_texts)  # [local images, texts]
    logits_t2i = scale * jnp.einsum('jd,id->ji', texts, all_images)  # [local texts, images]
    # Caption equality is symmetric, and image r carries caption r. So the images that are
    # positives of text r are the texts that are positives of image r, and both directions use
    # the same rows of `positives`. Every text has its own image as a positive, so no text row is
    # left out of the text-to-image mean as in `contrastive_loss_from_positives`.
    row_losses_i2t, hits_i2t = _soft_target_rows(logits_i2t, positives)
    row_losses_t2i, hits_t2i = _soft_target_rows(logits_t2i, positives)
    local_sums = jnp.stack([jnp.sum(row_losses_i2t), jnp.sum(row_losses_t2i),
                            jnp.sum(hits_i2t), jnp.sum(hits_t2i)])
    loss_i2t, loss_t2i, accuracy_i2t, accuracy_t2i = (
        jax.lax.psum(local_sums, axes) / global_batch)
    metrics = {
        'loss_i2t': loss_i2t,
        'loss_t2i': loss_t2i,
        'accuracy_i2t': accuracy_i2t,
        'accuracy_t2i': accuracy_t2i,
    }
    return 0.5 * (loss_i2t + loss_t2i), metrics

  row_spec = PartitionSpec(axes, None)
  args = [image_embeddings, text_embeddings, jnp.asarray(logit_scale, jnp.float32)]
  in_specs = [row_spec, row_spec, PartitionSpec()]
  if token_rows is not None:
    args.append(token_rows)
    in_specs.append(row_spec)
  sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(in_specs),
                          out_specs=PartitionSpec())
  return sharded(*args)


def sharded_sigmoid_contrastive_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float,
    mesh: Mesh,
    batch_axes: str | Sequence[str] = ('data', 'fsdp'),
    input_ids: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Compute `sigmoid_contrastive_loss` on a batch split over the `batch_axes` of `mesh`.

  Each shard keeps its own images and visits the text blocks of all shards in turn. It starts with
  its own texts, and at each further step `jax.lax.ppermute` passes every text block (with its
  caption tokens) one shard along the ring of batch shards. Each shard adds the pair losses of its
  images against the block it holds. After one block per shard, every pair of the global batch
  has been counted once, and a `psum` over the batch axes adds up the shards.

  Memory: the logits and their temporaries exist for one block of `[batch / shards,
  batch / shards]` pairs at a time, where one device would need them at `[batch, batch]`. Each
  ring step is rematerialised with `jax.checkpoint`, so for the backward pass the scan stores only
  the text block that each step received, `[batch, dim]` in total per device, and recomputes the
  logits one block at a time. The backward pass sends the text gradients back around the ring.

  Args:
    image_embeddings: L2-normalised `[batch, dim]`, split along the batch over the batch axes.
    text_embeddings: L2-normalised `[batch, dim]`, split the same way. Row i is paired with image i.
    logit_scale: scalar multiplier of the cosine similarities, already exponentiated.
    logit_bias: scalar added to every logit.
    mesh: the device mesh.
    batch_axes: the mesh axes that split the batch, major to minor. Names that the mesh lacks are
      skipped, but at least one must exist.
    input_ids: optional int `[batch, length]` caption tokens, split like the embeddings. With
      `attention_mask`, equal captions are positive pairs, as with
      `sigmoid_contrastive_loss(..., positives=equal_caption_mask(input_ids, attention_mask))`.
    attention_mask: `[batch, length]`, required together with `input_ids`.

  Returns:
    `(loss, metrics)` with the metric names of `sigmoid_contrastive_loss`, each over the global
    batch.

  Raises:
    ValueError: no batch axis in the mesh, mismatched shapes, or a global batch that the number of
      batch shards does not divide.
  """
  axes, num_shards = _mesh_batch_axes(mesh, batch_axes)
  token_rows = _check_sharded_batch(image_embeddings, text_embeddings, input_ids, attention_mask,
                                    axes, num_shards)
  global_batch = image_embeddings.shape[0]
  # Any single cycle through all shards visits every text block once, whatever order `ppermute`
  # gives the shards of several axes. Each block carries its own caption tokens, and only the
  # shard's own block, visited first, holds the diagonal pairs.
  ring = [(source, (source + 1) % num_shards) for source in range(num_shards)]

  def per_shard(images, texts, scale, bias, token_rows=None):
    images = images.astype(jnp.float32)
    texts = texts.astype(jnp.float32)
    local_batch = images.shape[0]

    # The shard's own text block is the only one that holds the diagonal pairs.
    own_positives = jnp.eye(local_batch, dtype=bool)
    if token_rows is not None:
      own_positives = own_positives | equal_rows(token_rows, token_rows)
    positive_sum, negative_sum = sigmoid_pair_sums(images, texts, scale, bias, own_positives)

    @jax.checkpoint
    def visit_next_block(carry, _):
      block_texts, block_token_rows, positive_sum, negative_sum = carry
      block_texts = jax.lax.ppermute(block_texts, axes, ring)
      if token_rows is None:
        positives = jnp.zeros((local_batch, local_batch), dtype=bool)
      else:
        block_token_rows = jax.lax.ppermute(block_token_rows, axes, ring)
        positives = equal_rows(token_rows, block_token_rows)
      block_positive, block_negative = sigmoid_pair_sums(images, block_texts, scale, bias,
                                                          positives)
      carry = (block_texts, block_token_rows, positive_sum + block_positive,
               negative_sum + block_negative)
      return carry, None

    carry = (texts, token_rows, positive_sum, negative_sum)
    carry, _ = jax.lax.scan(visit_next_block, carry, length=num_shards - 1)
    local_sums = jnp.stack(carry[2:])
    positive_mean, negative_mean = jax.lax.psum(local_sums, axes) / global_batch
    metrics = {'loss_positive': positive_mean, 'loss_negative': negative_mean}
    return positive_mean + negative_mean, metrics

  row_spec = PartitionSpec(axes, None)
  args = [image_embeddings, text_embeddings, jnp.asarray(logit_scale, jnp.float32),
          jnp.asarray(logit_bias, jnp.float32)]
  in_specs = [row_spec, row_spec, PartitionSpec(), PartitionSpec()]
  if token_rows is not None:
    args.append(token_rows)
    in_specs.append(row_spec)
  sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(in_specs),
                          out_specs=PartitionSpec())
  return sharded(*args)


def _mesh_batch_axes(mesh: Mesh, batch_axes: str | Sequence[str]) -> tuple[tuple[str, ...], int]:
  """Return the batch axes that `mesh` has, in the given order, and the number of batch shards."""
  if isinstance(batch_axes, str):
    batch_axes = (batch_axes,)
  axes = tuple(axis for axis in batch_axes if axis in mesh.axis_names)
  if not axes:
    raise ValueError(
        f'None of the batch axes {tuple(batch_axes)} is a mesh axis; the mesh has '
        f'{tuple(mesh.axis_names)}. Pass batch_axes naming the mesh axes that split the batch.')
  return axes, math.prod(mesh.shape[axis] for axis in axes)


def _check_sharded_batch(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    input_ids: jax.Array | None,
    attention_mask: jax.Array | None,
    axes: tuple[str, ...],
    num_shards: int,
) -> jax.Array | None:
  """Validate the shapes and return the caption token rows, or None without `input_ids`."""
  check_paired_embeddings(image_embeddings, text_embeddings)
  batch = image_embeddings.shape[0]
  if batch % num_shards:
    raise ValueError(
        f'The global batch of {batch} rows is not divisible by the {num_shards} shards of the '
        f'mesh axes {axes}; use a batch that is a multiple of {num_shards}.')
  if (input_ids is None) != (attention_mask is None):
    raise ValueError('Pass input_ids and attention_mask together, or neither of them.')
  if input_ids is None:
    return None
  token_rows = caption_token_rows(input_ids, attention_mask)
  if token_rows.shape[0] != batch:
    raise ValueError(
        f'Expected caption tokens for {batch} rows like the embeddings, got '
        f'{list(input_ids.shape)}.')
  return token_rows


def _soft_target_rows(logits: jax.Array,
                      positives: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Return each row's cross-entropy against a target uniform over its positives, and its hit.

  A row is a hit (1.0) when its argmax is a positive. Every row needs at least one positive.
  """
  targets = positives / jnp.sum(positives, axis=1, keepdims=True)
  row_losses = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  hits = jnp.take_along_axis(positives, jnp.argmax(logits, axis=1)[:, None], axis=1)[:, 0]
  return row_losses, hits.astype(jnp.float32)
