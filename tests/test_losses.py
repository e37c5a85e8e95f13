"""Tests for the symmetric contrastive loss and the equal-caption mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clamp_jax.losses import equal_caption_mask, softmax_contrastive_loss


def normalized(rng, batch, dim):
  x = rng.standard_normal((batch, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_loss(images, texts, scale, positives):
  """Row-by-row NumPy version of the multi-positive symmetric InfoNCE loss."""
  positives = positives | np.eye(len(images), dtype=bool)
  logits = scale * images.astype(np.float64) @ texts.astype(np.float64).T

  def directional(logits, positives):
    total = 0.0
    for row in range(len(logits)):
      shifted = logits[row] - logits[row].max()
      log_probs = shifted - np.log(np.sum(np.exp(shifted)))
      target = positives[row] / positives[row].sum()
      total += -np.sum(target * log_probs)
    return total / len(logits)

  i2t = directional(logits, positives)
  t2i = directional(logits.T, positives.T)
  return 0.5 * (i2t + t2i), i2t, t2i


@pytest.fixture
def embeddings():
  rng = np.random.default_rng(0)
  return normalized(rng, 6, 16), normalized(rng, 6, 16)


def test_loss_matches_reference(embeddings):
  images, texts = embeddings
  loss, metrics = softmax_contrastive_loss(images, texts, 10.0)
  expected, i2t, t2i = reference_loss(images, texts, 10.0, np.eye(6, dtype=bool))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss_i2t'], i2t, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss_t2i'], t2i, rtol=1e-5)


def test_loss_matches_reference_with_positives(embeddings):
  images, texts = embeddings
  positives = np.eye(6, dtype=bool)
  positives[0, 3] = positives[3, 0] = True
  positives[1, 4] = positives[4, 1] = True
  loss, metrics = softmax_contrastive_loss(images, texts, 20.0, positives=positives)
  expected, i2t, t2i = reference_loss(images, texts, 20.0, positives)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss_i2t'], i2t, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss_t2i'], t2i, rtol=1e-5)


def test_positives_diagonal_always_included(embeddings):
  images, texts = embeddings
  without_diagonal = np.zeros((6, 6), dtype=bool)
  loss, _ = softmax_contrastive_loss(images, texts, 10.0, positives=without_diagonal)
  expected, _, _ = reference_loss(images, texts, 10.0, np.eye(6, dtype=bool))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_positives_change_loss(embeddings):
  images, texts = embeddings
  positives = np.eye(6, dtype=bool)
  positives[0, 3] = positives[3, 0] = True
  plain, _ = softmax_contrastive_loss(images, texts, 10.0)
  multi, _ = softmax_contrastive_loss(images, texts, 10.0, positives=positives)
  assert abs(float(plain) - float(multi)) > 1e-4


def test_loss_symmetric_under_swap(embeddings):
  images, texts = embeddings
  positives = np.eye(6, dtype=bool)
  positives[2, 5] = positives[5, 2] = True
  forward, forward_metrics = softmax_contrastive_loss(images, texts, 7.0, positives=positives)
  swapped, swapped_metrics = softmax_contrastive_loss(texts, images, 7.0, positives=positives)
  np.testing.assert_allclose(forward, swapped, rtol=1e-6)
  np.testing.assert_allclose(forward_metrics['loss_i2t'], swapped_metrics['loss_t2i'], rtol=1e-6)


def test_equal_captions_reach_log_k_minimum():
  # Images 0 and 1 share one caption, so the best loss of each row is log(2), not 0.
  images = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
  texts = images.copy()
  positives = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
  loss, metrics = softmax_contrastive_loss(images, texts, 100.0, positives=positives)
  expected = (2 * np.log(2.0) + 0.0) / 3
  np.testing.assert_allclose(loss, expected, atol=1e-5)
  assert float(metrics['accuracy_i2t']) == 1.0


def test_accuracy_counts_positive_argmax():
  images = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
  texts = np.array([[1.0, 0.0], [0.8, -0.6], [0.0, 1.0]], dtype=np.float32)
  # Rows 0 and 2 pick their own text, row 1 picks text 2.
  _, metrics = softmax_contrastive_loss(images, texts, 10.0)
  np.testing.assert_allclose(metrics['accuracy_i2t'], 2 / 3, rtol=1e-6)

  positives = np.eye(3, dtype=bool)
  positives[1, 2] = positives[2, 1] = True
  _, metrics = softmax_contrastive_loss(images, texts, 10.0, positives=positives)
  np.testing.assert_allclose(metrics['accuracy_i2t'], 1.0, rtol=1e-6)


def test_gradient_finite(embeddings):
  images, texts = embeddings
  positives = np.eye(6, dtype=bool)
  positives[0, 1] = positives[1, 0] = True

  def loss_fn(images, texts, scale):
    return softmax_contrastive_loss(images, texts, scale, positives=positives)[0]

  grads = jax.grad(loss_fn, argnums=(0, 1, 2))(jnp.asarray(images), jnp.asarray(texts), 100.0)
  for grad in grads:
    assert bool(jnp.all(jnp.isfinite(grad)))
  assert float(jnp.abs(grads[0]).sum()) > 0.0


def test_loss_float32_for_bfloat16_inputs(embeddings):
  images, texts = embeddings
  loss, _ = softmax_contrastive_loss(jnp.asarray(images, jnp.bfloat16),
                                     jnp.asarray(texts, jnp.bfloat16), 10.0)
  assert loss.dtype == jnp.float32


def test_loss_rejects_shape_mismatch():
  with pytest.raises(ValueError, match='equal shape'):
    softmax_contrastive_loss(np.zeros((4, 8)), np.zeros((3, 8)), 1.0)


def test_loss_rejects_bad_positives_shape(embeddings):
  images, texts = embeddings
  with pytest.raises(ValueError, match='positives'):
    softmax_contrastive_loss(images, texts, 1.0, positives=np.eye(5, dtype=bool))


def test_equal_caption_mask_cases():
  input_ids = np.array([
      [5, 6, 7, 0],
      [5, 6, 7, 9],  # Same real tokens as row 0, different padding id.
      [5, 6, 8, 0],  # Differs in the last real token.
      [5, 6, 0, 0],  # Prefix of row 0.
      [5, 6, 7, 0],
  ])
  attention_mask = np.array([
      [1, 1, 1, 0],
      [1, 1, 1, 0],
      [1, 1, 1, 0],
      [1, 1, 0, 0],
      [1, 1, 1, 0],
  ])
  mask = np.asarray(equal_caption_mask(input_ids, attention_mask))
  assert mask.dtype == bool
  assert mask.shape == (5, 5)
  assert np.all(np.diag(mask))
  assert mask[0, 1]
  assert mask[0, 4]
  assert mask[1, 4]
  assert not mask[0, 2]
  assert not mask[0, 3]
  assert not mask[2, 3]
  np.testing.assert_array_equal(mask, mask.T)


def test_equal_caption_mask_padding_token_zero():
  # A real token 0 must not match a padding position.
  input_ids = np.array([[3, 0], [3, 0]])
  attention_mask = np.array([[1, 1], [1, 0]])
  mask = np.asarray(equal_caption_mask(input_ids, attention_mask))
  assert not mask[0, 1]
