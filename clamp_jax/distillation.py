"""Distillation from a frozen CLIP teacher: match the student's similarity matrix to the teacher's.

Both models embed the same images and captions (the teacher reads the raw caption with its own
tokenizer). Each similarity matrix is scaled by 100, as CLIP's logit scale at the end of training.
The student's rows are trained with soft cross-entropy against the teacher's softmaxed rows, in both
directions (image to text over the rows, text to image over the columns), and the two
directions are averaged. The teacher gets no gradient.

`sharded_distillation_loss` computes the same on a batch split over mesh axes: each device
all-gathers the embeddings and computes its own rows against all columns.

Einsum letters: i image index, j text index, d embedding dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

SCALE = 100.0


def _row_soft_cross_entropy(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Per-row `-sum(softmax(teacher) * log_softmax(student))`, `[rows]`."""
  targets = jax.nn.softmax(teacher_logits, axis=-1)
  return -jnp.sum(targets * jax.nn.log_softmax(student_logits, axis=-1), axis=-1)


def _check(student_images, student_texts, teacher_images, teacher_texts) -> None:
  if student_images.shape != student_texts.shape or student_images.ndim != 2:
    raise ValueError(f'Student embeddings must be two equal [batch, dim] arrays, got '
                     f'{list(student_images.shape)} and {list(student_texts.shape)}.')
  if teacher_images.shape != teacher_texts.shape or teacher_images.ndim != 2:
    raise ValueError(f'Teacher embeddings must be two equal [batch, dim] arrays, got '
                     f'{list(teacher_images.shape)} and {list(teacher_texts.shape)}.')
  if teacher_images.shape[0] != student_images.shape[0]:
    raise ValueError(f'Teacher batch {teacher_images.shape[0]} differs from the student batch '
                     f'{student_images.shape[0]}.')


def distillation_loss(student_images: jax.Array, student_texts: jax.Array,
                      teacher_images: jax.Array, teacher_texts: jax.Array,
                      scale: float = SCALE) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Soft cross-entropy of the student's similarities against the teacher's, both directions.

  Args:
    student_images, student_texts: L2-normalised student embeddings `[batch, d]`, paired by row.
    teacher_images, teacher_texts: L2-normalised teacher embeddings `[batch, d']` of the same
      images and captions; they receive no gradient.
    scale: multiplier of both similarity matrices.

  Returns:
    `(loss, metrics)` in float32, with `distill_i2t` and `distill_t2i` in the metrics. When the
    student equals the teacher, the loss is the mean entropy of the teacher's softmaxed rows.
  """
  _check(student_images, student_texts, teacher_images, teacher_texts)
  teacher_images = jax.lax.stop_gradient(teacher_images.astype(jnp.float32))
  teacher_texts = jax.lax.stop_gradient(teacher_texts.astype(jnp.float32))
  student = scale * jnp.einsum('id,jd->ij', student_images.astype(jnp.float32),
                               student_texts.astype(jnp.float32))
  teacher = scale * jnp.einsum('id,jd->ij', teacher_images, teacher_texts)
  i2t = jnp.mean(_row_soft_cross_entropy(student, teacher))
  t2i = jnp.mean(_row_soft_cross_entropy(student.T, teacher.T))
  return 0.5 * (i2t + t2i), {'distill_i2t': i2t, 'distill_t2i': t2i}


def sharded_distillation_loss(student_images: jax.Array, student_texts: jax.Array,
                              teacher_images: jax.Array, teacher_texts: jax.Array, mesh: Mesh,
                              batch_axes: Sequence[str] = ('data', 'fsdp'),
                              scale: float = SCALE) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`distillation_loss` on a batch split over `batch_axes` of `mesh`; equal result and gradients.

  Each device has `[batch / shards, d]` rows of every input, gathers all rows, and computes the
  cross-entropy of its own image rows against all texts and of its own text rows against all
  images. Memory per device is `local batch x global batch` per matrix.
  """
  _check(student_images, student_texts, teacher_images, teacher_texts)
  axes = tuple(axis for axis in batch_axes if axis in mesh.shape and mesh.shape[axis] > 1)
  if not axes:
    return distillation_loss(student_images, student_texts, teacher_images, teacher_texts, scale)
  shards = 1
  for axis in axes:
    shards *= mesh.shape[axis]
  global_batch = student_images.shape[0]
  if global_batch % shards:
    raise ValueError(f'Batch {global_batch} is not divisible by the {shards} shards of mesh axes '
                     f'{axes}.')

  def per_shard(s_images, s_texts, t_images, t_texts):
    gather = lambda x: jax.lax.all_gather(x, axes, tiled=True).astype(jnp.float32)
    t_images = jax.lax.stop_gradient(t_images.astype(jnp.float32))
    t_texts = jax.lax.stop_gradient(t_texts.astype(jnp.float32))
    s_images, s_texts = s_images.astype(jnp.float32), s_texts.astype(jnp.float32)
    student_i2t = scale * jnp.einsum('id,jd->ij', s_images, gather(s_texts))
    teacher_i2t = scale * jnp.einsum('id,jd->ij', t_images, jax.lax.stop_gradient(gather(t_texts)))
    student_t2i = scale * jnp.einsum('jd,id->ji', s_texts, gather(s_images))
    teacher_t2i = scale * jnp.einsum('jd,id->ji', t_texts,
                                     jax.lax.stop_gradient(gather(t_images)))
    sums = jnp.stack([jnp.sum(_row_soft_cross_entropy(student_i2t, teacher_i2t)),
                      jnp.sum(_row_soft_cross_entropy(student_t2i, teacher_t2i))])
    i2t, t2i = jax.lax.psum(sums, axes) / global_batch
    return 0.5 * (i2t + t2i), {'distill_i2t': i2t, 'distill_t2i': t2i}

  rows = PartitionSpec(axes, None)
  sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=(rows, rows, rows, rows),
                          out_specs=PartitionSpec())
  return sharded(student_images, student_texts, teacher_images, teacher_texts)
