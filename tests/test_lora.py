"""LoRA adapters on a tiny random Llama: the off switch, merge and unmerge, targets and dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clamp_jax.generate import generate_ids
from clamp_jax.models.llama import Llama, LlamaConfig
from clamp_jax.models.lora import (HashDropout, LoRAConfig, apply_lora, iter_linears, keep_mask,
                                   merge, unmerge)

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.1)


def tiny_llama(seed=0):
  return Llama(CONFIG, rngs=nnx.Rngs(seed))


def batch():
  """Ids `[2, 7]` with the second row right-padded after 4 tokens."""
  ids = jax.random.randint(jax.random.key(5), (2, 7), 1, CONFIG.vocab_size)
  mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
  return ids, mask


def randomize_lora_b(model, seed=7, scale=0.5):
  """Give every adapter a random nonzero B, so adapters change the output."""
  key = jax.random.key(seed)
  for _, linear in iter_linears(model):
    if linear.lora is not None:
      key, sub = jax.random.split(key)
      shape = linear.lora.lora_b.shape
      linear.lora.lora_b[...] = scale * jax.random.normal(sub, shape, jnp.float32)


def adapted_llama():
  """Tiny Llama in eval mode, its base logits, then default adapters with random B."""
  model = tiny_llama()
  model.eval()
  ids, mask = batch()
  base = np.asarray(model(ids, mask))
  apply_lora(model, LORA, rngs=nnx.Rngs(1))
  model.eval()
  randomize_lora_b(model)
  return model, base


def kernels(model):
  return {path: np.asarray(linear.kernel[...]) for path, linear in iter_linears(model)}


def test_zero_b_equals_base():
  model = tiny_llama()
  model.eval()
  ids, mask = batch()
  base = np.asarray(model(ids, mask))
  apply_lora(model, LORA, rngs=nnx.Rngs(1))
  model.eval()
  with_adapters = np.asarray(model(ids, mask, adapters=True))
  assert np.array_equal(with_adapters, base)


def test_fresh_adapter_b_is_zero():
  model = tiny_llama()
  apply_lora(model, LORA, rngs=nnx.Rngs(1))
  for path, linear in iter_linears(model):
    if linear.lora is not None:
      assert not np.any(np.asarray(linear.lora.lora_b[...])), path
      assert np.any(np.asarray(linear.lora.lora_a[...])), path


def test_adapters_off_equals_base():
  model, base = adapted_llama()
  ids, mask = batch()
  off = np.asarray(model(ids, mask, adapters=False))
  assert np.array_equal(off, base)


def test_adapters_on_differs():
  model, base = adapted_llama()
  ids, mask = batch()
  on = np.asarray(model(ids, mask, adapters=True))
  assert float(np.max(np.abs(on - base))) > 1e-3


def test_merge_unmerge_restores_kernels():
  model, _ = adapted_llama()
  before = kernels(model)
  assert merge(model) == 8
  merged = kernels(model)
  assert unmerge(model) == 8
  after = kernels(model)
  assert not np.array_equal(merged['layers/0/self_attn/q_proj'],
                            before['layers/0/self_attn/q_proj'])
  for path in before:
    assert float(np.max(np.abs(after[path] - before[path]))) <= 1e-6, path


def test_merge_twice_is_noop():
  model, _ = adapted_llama()
  assert merge(model) == 8
  once = kernels(model)
  assert merge(model) == 0
  twice = kernels(model)
  assert unmerge(model) == 8
  assert unmerge(model) == 0
  for path in once:
    assert np.array_equal(twice[path], once[path]), path


def test_merged_matches_unmerged_output():
  model, base = adapted_llama()
  ids, mask = batch()
  unmerged = np.asarray(model(ids, mask, adapters=True))
  merge(model)
  merged = np.asarray(model(ids, mask, adapters=True))
  assert float(np.max(np.abs(merged - unmerged))) <= 1e-5
  assert float(np.max(np.abs(merged - base))) > 1e-3


def test_merged_adapters_off_raises():
  """A merged kernel no longer contains the base weights, so adapters=False cannot be honoured."""
  model, _ = adapted_llama()
  ids, mask = batch()
  merge(model)
  with pytest.raises(ValueError, match='unmerge'):
    model(ids, mask, adapters=False)


def test_unmatched_pattern_raises():
  model = tiny_llama()
  config = LoRAConfig(targets=(r'self_attn/qkv_proj$',))
  with pytest.raises(ValueError, match='matched no Linear layer'):
    apply_lora(model, config, rngs=nnx.Rngs(1))


def test_default_targets_attention_only():
  model = tiny_llama()
  adapted = apply_lora(model, LORA, rngs=nnx.Rngs(1))
  expected = sorted(f'layers/{layer}/self_attn/{name}'
                    for layer in range(CONFIG.num_hidden_layers)
                    for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'))
  assert sorted(adapted) == expected
  for path, linear in iter_linears(model):
    if path in expected:
      assert linear.lora is not None, path
    else:
      assert linear.lora is None, path


def test_custom_targets_mlp_only():
  model = tiny_llama()
  adapted = apply_lora(model, LoRAConfig(targets=(r'mlp/up_proj$',)), rngs=nnx.Rngs(1))
  assert sorted(adapted) == ['layers/0/mlp/up_proj', 'layers/1/mlp/up_proj']
  assert model.layers[0].self_attn.q_proj.lora is None
  assert model.lm_head.lora is None


def test_apply_twice_skips_adapted():
  model = tiny_llama()
  apply_lora(model, LORA, rngs=nnx.Rngs(1))
  first = model.layers[0].self_attn.q_proj.lora
  with pytest.raises(ValueError, match='matched no Linear layer'):
    apply_lora(model, LORA, rngs=nnx.Rngs(2))
  assert model.layers[0].self_attn.q_proj.lora is first


def test_adapter_params_are_lora_params():
  model = tiny_llama()
  apply_lora(model, LORA, rngs=nnx.Rngs(1))
  lora_state = nnx.state(model, nnx.LoRAParam)
  count = sum(leaf.size for leaf in jax.tree.leaves(lora_state))
  # Eight adapters, each A [in, 4] plus B [4, out].
  q_and_o = 2 * (32 * 4 + 4 * 32)
  k_and_v = 2 * (32 * 4 + 4 * 16)
  assert count == CONFIG.num_hidden_layers * (q_and_o + k_and_v)


def test_train_dropout_varies_branch():
  model, _ = adapted_llama()
  model.train()
  lora = model.layers[0].self_attn.q_proj.lora
  x = jax.random.normal(jax.random.key(3), (2, 5, 32))
  first = np.asarray(lora(x))
  second = np.asarray(lora(x))
  assert not np.array_equal(first, second)


def test_train_dropout_varies_model():
  model, _ = adapted_llama()
  model.train()
  ids, mask = batch()
  first = np.asarray(model(ids, mask))
  second = np.asarray(model(ids, mask))
  assert not np.array_equal(first, second)


def test_hash_dropout_rate_mean_and_independence():
  dropout = HashDropout(0.1, rngs=nnx.Rngs(dropout=0))
  x = jnp.ones((64, 56, 576))
  first, second = np.asarray(dropout(x)), np.asarray(dropout(x))
  # 2,064,384 decisions: the kept fraction's standard deviation is 2.1e-4, the mean's 2.3e-4.
  assert abs(np.mean(first != 0) - 0.9) < 1.5e-3
  assert abs(np.mean(first) - 1.0) < 1.5e-3
  # Neighbours along every axis, and the same element in two calls, agree only as often as
  # independent draws do (0.9**2 + 0.1**2 = 0.82).
  first_kept, second_kept = first != 0, second != 0
  for axis in range(3):
    head = np.take(first_kept, range(first_kept.shape[axis] - 1), axis=axis)
    tail = np.take(first_kept, range(1, first_kept.shape[axis]), axis=axis)
    assert abs(np.mean(head == tail) - 0.82) < 3e-3, axis
  assert abs(np.mean(first_kept == second_kept) - 0.82) < 3e-3
  assert dropout(jnp.ones((3, 5))).shape == (3, 5)
  assert dropout(jnp.ones((7,))).shape == (7,)


def test_keep_mask_rounds_the_probability_to_32_bits():
  keep, probability = keep_mask(jax.random.key(0), 0.9, (1000, 1000))
  assert probability == round(0.9 * 2**32) / 2**32
  assert abs(float(jnp.mean(keep)) - 0.9) < 1.5e-3
  never, zero = keep_mask(jax.random.key(0), 0.0, (100, 100))
  assert zero == 2**-32
  assert not bool(jnp.any(never))


def test_eval_branch_is_deterministic():
  model, _ = adapted_llama()
  lora = model.layers[0].self_attn.q_proj.lora
  x = jax.random.normal(jax.random.key(3), (2, 5, 32))
  first = np.asarray(lora(x))
  second = np.asarray(lora(x))
  assert np.array_equal(first, second)
  assert float(np.max(np.abs(first))) > 0.0


def test_train_adapters_off_ignores_dropout():
  """Dropout sits in the adapter branch only, so the base path is deterministic in train mode."""
  model, base = adapted_llama()
  model.train()
  ids, mask = batch()
  off = np.asarray(model(ids, mask, adapters=False))
  assert np.array_equal(off, base)


def test_generate_ignores_train_mode():
  """Greedy decoding turns dropout off on its own copy and leaves the caller's mode alone."""
  model, _ = adapted_llama()
  ids, _ = batch()
  mask = jnp.ones(ids.shape, jnp.int32)
  expected = generate_ids(model, ids, mask, max_new_tokens=6)
  model.train()
  in_train_mode = generate_ids(model, ids, mask, max_new_tokens=6)
  assert np.array_equal(in_train_mode, expected)
  assert model.layers[0].self_attn.q_proj.lora.dropout.deterministic is False
