"""Distillation loss against a NumPy reference, its entropy fixed point, and its sharded form on 8
simulated devices."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from clamp_jax.distillation import distillation_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def normalized(rng, shape):
  x = rng.standard_normal(shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def reference_loss(si, st, ti, tt, scale=100.0):
  """Float64 NumPy: soft cross-entropy rows, image-to-text and text-to-image, averaged."""
  def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

  si, st, ti, tt = (np.asarray(a, np.float64) for a in (si, st, ti, tt))
  student, teacher = scale * si @ st.T, scale * ti @ tt.T
  i2t = -(np.exp(log_softmax(teacher)) * log_softmax(student)).sum(-1).mean()
  t2i = -(np.exp(log_softmax(teacher.T)) * log_softmax(student.T)).sum(-1).mean()
  return 0.5 * (i2t + t2i)


def test_matches_numpy_reference():
  rng = np.random.default_rng(0)
  si, st = normalized(rng, (6, 8)), normalized(rng, (6, 8))
  ti, tt = normalized(rng, (6, 5)), normalized(rng, (6, 5))
  loss, metrics = distillation_loss(si, st, ti, tt)
  np.testing.assert_allclose(float(loss), reference_loss(si, st, ti, tt), rtol=1e-5)
  np.testing.assert_allclose(0.5 * (metrics['distill_i2t'] + metrics['distill_t2i']), loss,
                             rtol=1e-6)


def test_teacher_as_student_gives_teacher_entropy():
  rng = np.random.default_rng(1)
  images, texts = normalized(rng, (5, 4)), normalized(rng, (5, 4))
  loss, _ = distillation_loss(images, texts, images, texts, scale=10.0)
  logits = 10.0 * images.astype(np.float64) @ texts.T.astype(np.float64)

  def mean_entropy(x):
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return -(p * np.log(p)).sum(-1).mean()

  expected = 0.5 * (mean_entropy(logits) + mean_entropy(logits.T))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert expected > 0.1  # A soft teacher, so the check is not about zero.


def test_teacher_gets_no_gradient():
  rng = np.random.default_rng(2)
  args = [jnp.asarray(normalized(rng, (4, 3))) for _ in range(4)]
  grads = jax.grad(lambda *a: distillation_loss(*a)[0], argnums=(0, 1, 2, 3))(*args)
  assert float(jnp.abs(grads[0]).max()) > 0
  assert float(jnp.abs(grads[1]).max()) > 0
  assert float(jnp.abs(grads[2]).max()) == 0
  assert float(jnp.abs(grads[3]).max()) == 0


SHARDED = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, '.')
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from clamp_jax.distillation import distillation_loss, sharded_distillation_loss
    rng = np.random.default_rng(3)
    def normalized(shape):
      x = rng.standard_normal(shape)
      return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), jnp.float32)
    si, st, ti, tt = normalized((16, 8)), normalized((16, 8)), normalized((16, 6)), normalized((16, 6))
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4, 1), ('data', 'fsdp', 'tensor'))
    rows = NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))
    placed = [jax.device_put(x, rows) for x in (si, st, ti, tt)]
    plain = jax.value_and_grad(lambda a, b: distillation_loss(a, b, ti, tt)[0], argnums=(0, 1))
    sharded = jax.jit(jax.value_and_grad(
        lambda a, b, c, d: sharded_distillation_loss(a, b, c, d, mesh)[0], argnums=(0, 1)))
    (loss, (gi, gt)), (sloss, (sgi, sgt)) = plain(si, st), sharded(*placed)
    print(json.dumps({'loss': float(abs(loss - sloss)), 'grad_images': float(jnp.abs(gi - sgi).max()),
                      'grad_texts': float(jnp.abs(gt - sgt).max()), 'value': float(loss),
                      'grad_scale': float(jnp.abs(gi).max())}))
''')


def test_sharded_equals_single_device():
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run([sys.executable, '-c', SHARDED], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  diffs = json.loads(result.stdout.strip().splitlines()[-1])
  assert diffs['value'] > 0 and diffs['grad_scale'] > 0
  assert diffs['loss'] < 1e-5
  assert diffs['grad_images'] < 1e-5 * max(1.0, diffs['grad_scale'])
  assert diffs['grad_texts'] < 1e-5 * max(1.0, diffs['grad_scale'])
