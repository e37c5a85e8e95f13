"""Tests for the sigmoid loss and for the contrastive losses on a batch split over mesh axes.

JAX reads the simulated device count once, when it starts, and the other test modules start it
with one device. So the 8-device comparisons run `tests/sharded/check_losses.py` in a subprocess.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from clamp_jax.losses import sigmoid_contrastive_loss, softmax_contrastive_loss
from clamp_jax.sharded_losses import (sharded_sigmoid_contrastive_loss,
                                      sharded_softmax_contrastive_loss)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK_SCRIPT = os.path.join(REPO, 'tests', 'sharded', 'check_losses.py')


def normalized(rng, batch, dim):
  x = rng.standard_normal((batch, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_sigmoid_loss(images, texts, scale, bias, positives):
  """Pair-by-pair NumPy version of the sigmoid loss, in float64."""
  positives = positives | np.eye(len(images), dtype=bool)
  total = 0.0
  for i in range(len(images)):
    for j in range(len(texts)):
      logit = scale * float(np.dot(images[i].astype(np.float64), texts[j])) + bias
      label = 1.0 if positives[i, j] else -1.0
      # -log(sigmoid(z)) = log(1 + exp(-z)).
      total += np.log1p(np.exp(-label * logit))
  return total / len(images)


@pytest.fixture
def embeddings():
  rng = np.random.default_rng(0)
  return normalized(rng, 6, 16), normalized(rng, 6, 16)


def test_sigmoid_matches_reference(embeddings):
  images, texts = embeddings
  loss, metrics = sigmoid_contrastive_loss(images, texts, 10.0, -5.0)
  expected = reference_sigmoid_loss(images, texts, 10.0, -5.0, np.eye(6, dtype=bool))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss_positive'] + metrics['loss_negative'], loss, rtol=1e-6)


def test_sigmoid_matches_reference_with_positives(embeddings):
  images, texts = embeddings
  positives = np.eye(6, dtype=bool)
  positives[0, 3] = positives[3, 0] = True
  positives[1, 4] = positives[4, 1] = True
  loss, _ = sigmoid_contrastive_loss(images, texts, 10.0, -5.0, positives=positives)
  expected = reference_sigmoid_loss(images, texts, 10.0, -5.0, positives)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_sigmoid_diagonal_always_included(embeddings):
  images, texts = embeddings
  without_diagonal = np.zeros((6, 6), dtype=bool)
  loss, _ = sigmoid_contrastive_loss(images, texts, 10.0, -5.0, positives=without_diagonal)
  expected = reference_sigmoid_loss(images, texts, 10.0, -5.0, np.eye(6, dtype=bool))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_sigmoid_rejects_bad_positives_shape(embeddings):
  images, texts = embeddings
  with pytest.raises(ValueError, match='positives'):
    sigmoid_contrastive_loss(images, texts, 10.0, -5.0, positives=np.eye(5, dtype=bool))


def test_sharded_one_device_equals_single(embeddings):
  images, texts = embeddings
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'tensor'))
  loss, metrics = sharded_softmax_contrastive_loss(images, texts, 10.0, mesh)
  expected_loss, expected_metrics = softmax_contrastive_loss(images, texts, 10.0)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  for name, value in expected_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-6, err_msg=name)
  loss, _ = sharded_sigmoid_contrastive_loss(images, texts, 10.0, -5.0, mesh)
  expected_loss, _ = sigmoid_contrastive_loss(images, texts, 10.0, -5.0)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)


def test_sharded_rejects_mesh_without_batch_axes(embeddings):
  images, texts = embeddings
  mesh = Mesh(np.array(jax.devices()[:1]), ('tensor',))
  with pytest.raises(ValueError, match='batch axes'):
    sharded_softmax_contrastive_loss(images, texts, 10.0, mesh)
  with pytest.raises(ValueError, match='batch axes'):
    sharded_sigmoid_contrastive_loss(images, texts, 10.0, -5.0, mesh)


def test_sharded_rejects_ids_without_mask(embeddings):
  images, texts = embeddings
  mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
  input_ids = np.zeros((6, 4), np.int32)
  with pytest.raises(ValueError, match='attention_mask'):
    sharded_softmax_contrastive_loss(images, texts, 10.0, mesh, input_ids=input_ids)


@pytest.mark.parametrize('mesh, batch_axes', [
    ('data=8', 'data,fsdp'),
    ('data=2,fsdp=2,tensor=2', 'data,fsdp'),
    ('fsdp=4,tensor=2', 'data,fsdp'),
])
def test_sharded_losses_match_single_device(mesh, batch_axes):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  result = subprocess.run(
      [sys.executable, CHECK_SCRIPT, f'--mesh={mesh}', f'--batch-axes={batch_axes}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  report = result.stdout + result.stderr[-3000:]
  assert result.returncode == 0, report
  assert '0 failed checks' in result.stdout, report
  # The script prints 51 passing lines on these meshes. Fewer means that checks were skipped.
  passed = [line for line in result.stdout.splitlines() if line.startswith('ok ')]
  assert len(passed) >= 50, report
