"""oneDNN matmuls (`model.matmul='onednn'`) and attention (`model.attention='onednn'`): products,
gradients, a Llama, a ViT, greedy generation and sharded training against XLA's dots, and the
errors when the library is missing or the value is unknown."""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clamp_jax.configuration import ConfigError, validate_config
from clamp_jax.generate import generate_ids
from clamp_jax.models import onednn, onednn_attention
from clamp_jax.models.llama import Llama, LlamaConfig
from clamp_jax.models.lora import LoRAConfig, apply_lora, iter_linears
from clamp_jax.models.vit import VisionTransformer, ViTConfig
from conftest import REPO, run_main_command
from test_parallel import train_losses

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def product_and_grads(matmul, x, w, cotangent):
  def loss(a, b):
    return jnp.sum(matmul(a, b).astype(jnp.float32) * cotangent)

  value, (grad_x, grad_w) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
  product = jax.jit(matmul)(x, w)
  return [np.asarray(t, np.float32) for t in (product, value, grad_x, grad_w)]


@pytest.mark.parametrize('dtype,tolerance', [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_product_and_gradients_match_xla(dtype, tolerance):
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (3, 5, 40), jnp.float32).astype(dtype)
  w = jax.random.normal(keys[1], (40, 24), jnp.float32).astype(dtype)
  cotangent = jax.random.normal(keys[2], (3, 5, 24), jnp.float32)
  ours = product_and_grads(onednn.matmul, x, w, cotangent)
  xla = product_and_grads(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)
                          .astype(a.dtype), x, w, cotangent)
  for name, got, expected in zip(('product', 'loss', 'grad x', 'grad w'), ours, xla):
    scale = max(float(np.max(np.abs(expected))), 1.0)
    assert np.max(np.abs(got - expected)) <= tolerance * scale, name
  assert ours[0].shape == (3, 5, 24)


def test_library_reports_a_cpu_kernel():
  name = onednn.library().implementation(64, 32, 16, jnp.bfloat16)
  assert name, 'oneDNN gave no implementation name'
  assert 'ref' not in name, f'oneDNN fell back to its reference kernel: {name}'


def test_operand_checks():
  with pytest.raises(TypeError, match='bfloat16 or two float32'):
    onednn.matmul(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4), jnp.float32))
  with pytest.raises(ValueError, match=r'x \[\.\.\., k\]'):
    onednn.matmul(jnp.ones((2, 3)), jnp.ones((4, 4)))


def lora_llama(matmul: str, scan_layers: bool, attention: str = 'einsum') -> Llama:
  config = dataclasses.replace(CONFIG, matmul=matmul, scan_layers=scan_layers, attention=attention)
  model = Llama(config, rngs=nnx.Rngs(0))
  apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0), rngs=nnx.Rngs(1))
  key = jax.random.key(7)
  for _, linear in iter_linears(model):
    if linear.lora is not None:
      key, sub = jax.random.split(key)
      linear.lora.lora_b[...] = 0.5 * jax.random.normal(sub, linear.lora.lora_b.shape)
  return model


@pytest.mark.parametrize('scan_layers,attention',
                         [(False, 'einsum'), (True, 'einsum'), (False, 'onednn'), (True, 'onednn')])
def test_llama_logits_and_adapter_gradients_match_xla(scan_layers, attention):
  ids = jax.random.randint(jax.random.key(5), (2, 7), 1, CONFIG.vocab_size)
  mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)

  def loss(model):
    logits = model(ids, mask)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

  results = {}
  for matmul in ('xla', 'onednn'):
    model = lora_llama(matmul, scan_layers, attention if matmul == 'onednn' else 'einsum')
    grad_fn = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)
    (_, logits), grads = nnx.jit(grad_fn)(model)
    results[matmul] = (np.asarray(logits), jax.tree.leaves(nnx.to_pure_dict(grads)))
  logits_xla, grads_xla = results['xla']
  logits_onednn, grads_onednn = results['onednn']
  assert np.max(np.abs(logits_onednn - logits_xla)) <= 1e-4 * np.max(np.abs(logits_xla))
  assert len(grads_xla) == len(grads_onednn) == 2 * 4 * CONFIG.num_hidden_layers
  for expected, got in zip(grads_xla, grads_onednn):
    scale = float(np.max(np.abs(expected)))
    assert scale > 0
    assert np.max(np.abs(np.asarray(got) - np.asarray(expected))) <= 1e-4 * scale


def test_vit_gradients_match_xla():
  """The image tower trains from scratch in the default job, so its weight gradients count."""
  images = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
  direction = jax.random.normal(jax.random.key(3), (3, 24))

  def loss(model):
    embeddings = model(images)
    return jnp.sum(embeddings * direction), embeddings

  results = {}
  for matmul in ('xla', 'onednn'):
    config = ViTConfig(image_size=16, patch_size=4, width=32, layers=2, heads=4, embed_dim=24,
                       matmul=matmul)
    model = VisionTransformer(config, rngs=nnx.Rngs(0))
    grad_fn = nnx.value_and_grad(loss, has_aux=True)
    (_, embeddings), grads = nnx.jit(grad_fn)(model)
    results[matmul] = (np.asarray(embeddings), jax.tree.leaves(nnx.to_pure_dict(grads)))
  embeddings_xla, grads_xla = results['xla']
  embeddings_onednn, grads_onednn = results['onednn']
  assert np.max(np.abs(embeddings_onednn - embeddings_xla)) <= 1e-4 * np.max(np.abs(embeddings_xla))
  assert len(grads_xla) == len(grads_onednn) > 2 * 6
  largest = max(float(np.max(np.abs(g))) for g in grads_xla)
  assert largest > 0
  for expected, got in zip(grads_xla, grads_onednn):
    # The key bias has a zero gradient in exact arithmetic, because softmax ignores a shift per
    # query. So each leaf's tolerance is at least 1e-6 of the largest gradient.
    scale = max(float(np.max(np.abs(expected))), 1e-2 * largest)
    assert np.max(np.abs(np.asarray(got) - np.asarray(expected))) <= 1e-4 * scale


def einsum_attention(q, k, v, mask):
  b, t, heads, d = q.shape
  kv_heads = k.shape[2]
  grouped = q.reshape(b, t, kv_heads, heads // kv_heads, d)
  scores = jnp.einsum('btkgd,bskd->bkgts', grouped, k).astype(jnp.float32) / np.sqrt(d)
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum('bkgts,bskd->btkgd', weights, v).reshape(b, t, heads, d)


@pytest.mark.parametrize('dtype,tolerance', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_attention_and_gradients_match_einsum(dtype, tolerance):
  keys = jax.random.split(jax.random.key(4), 4)
  q = jax.random.normal(keys[0], (3, 7, 6, 8)).astype(dtype)
  k = jax.random.normal(keys[1], (3, 7, 2, 8)).astype(dtype)
  v = jax.random.normal(keys[2], (3, 7, 2, 8)).astype(dtype)
  cotangent = jax.random.normal(keys[3], (3, 7, 6, 8))
  # Left padding in row 1: its first two queries see no real key at all.
  real = jnp.asarray([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [1] * 4 + [0] * 3], bool)
  mask = jnp.tril(jnp.ones((7, 7), bool))[None, None] & real[:, None, None, :]

  def results(function):
    def loss(q, k, v):
      return jnp.sum(function(q, k, v, mask).astype(jnp.float32) * cotangent)

    output = jax.jit(function)(q, k, v, mask)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    return [np.asarray(t, np.float32) for t in (output, *grads)]

  for expected, got in zip(results(einsum_attention), results(onednn_attention.attention)):
    scale = float(np.max(np.abs(expected)))
    assert scale > 0
    assert np.max(np.abs(got - expected)) <= tolerance * scale


def test_unknown_backend_is_rejected_before_compiling():
  sys.path.insert(0, REPO)
  from configs import tiny

  config = tiny.get_config()
  config.model.matmul = 'mkl'
  with pytest.raises(ConfigError, match="config.model.matmul='mkl' is not one of"):
    validate_config(config)


def test_unloadable_library_gives_one_error_line(tmp_path):
  absent = tmp_path / 'absent' / 'libdnnl.so.3'
  result = run_main_command(
      '--config=configs/tiny.py', f'--workdir={tmp_path}', '--config.model.matmul=onednn',
      env_extra={onednn.ENV_LIBRARY: str(absent)}, timeout=300)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith(f'error: {onednn.ENV_LIBRARY}={absent} could not be loaded'), \
      lines[-5:]
  assert 'pip install onednn-cpu-gomp' in lines[-1]
  assert 'Traceback' not in result.stderr


def test_missing_library_names_install_command(monkeypatch, tmp_path):
  monkeypatch.delenv(onednn.ENV_LIBRARY, raising=False)
  monkeypatch.setattr(onednn, '_candidate_paths', lambda: [str(tmp_path / 'libdnnl.so.3')])
  with pytest.raises(onednn.OneDNNError,
                     match=r'was not found .*pip install onednn-cpu-gomp==2023\.2\.0'):
    onednn._load()


def test_sharded_training_matches_single_device_xla(tmp_path):
  reference = train_losses(tmp_path / 'xla', {'data': 1}, devices=1)
  assert sorted(reference) == [1, 2, 3]
  # Each of the 8 devices multiplies its own shard of the batch.
  losses = train_losses(tmp_path / 'onednn', {'data': 8}, devices=8,
                        extra=('--config.model.matmul=onednn', '--config.model.attention=onednn'))
  for step, expected in reference.items():
    assert abs(losses[step] - expected) <= 1e-4, (step, losses[step], expected)


def test_greedy_generation_matches_xla():
  ids = jnp.asarray([[0, 0, 5, 9, 11], [3, 7, 2, 8, 4]], jnp.int32)
  mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)
  tokens = {(matmul, attention): generate_ids(lora_llama(matmul, False, attention), ids, mask,
                                              max_new_tokens=6)
            for matmul, attention in (('xla', 'einsum'), ('onednn', 'einsum'),
                                      ('onednn', 'onednn'))}
  expected = tokens['xla', 'einsum']
  assert expected.shape == (2, 6)
  np.testing.assert_array_equal(tokens['onednn', 'einsum'], expected)
  # With the KV cache each new query attends over the whole cache.
  np.testing.assert_array_equal(tokens['onednn', 'onednn'], expected)
