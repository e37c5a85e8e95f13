"""CLAMP text tower on a tiny random Llama: read-only prompts, padding, mask layout, prompt init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clamp_jax.models.llama import Llama, LlamaConfig, causal_mask, positions_from_mask
from clamp_jax.models.lora import LoRAConfig, apply_lora, iter_linears
from clamp_jax.models.text_tower import TextTower, read_only_prompt_layout

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
NUM_PROMPTS = 3
LENGTHS = (6, 4, 1)
PAD_ID = 0


def make_tower(seed=0, prompt_init_ids=None):
  llm = Llama(CONFIG, rngs=nnx.Rngs(seed))
  return TextTower(llm, embed_dim=16, num_prompts=NUM_PROMPTS, pooler_heads=4,
                   prompt_init_ids=prompt_init_ids, rngs=nnx.Rngs(seed + 1))


def right_padded_captions(pad_id=PAD_ID):
  """Ids `[3, 6]` right-padded to the longest of LENGTHS, and the attention mask."""
  width = max(LENGTHS)
  real = np.asarray(jax.random.randint(jax.random.key(2), (len(LENGTHS), width), 1,
                                       CONFIG.vocab_size))
  ids = np.full_like(real, pad_id)
  mask = np.zeros_like(real)
  for row, length in enumerate(LENGTHS):
    ids[row, :length] = real[row, :length]
    mask[row, :length] = 1
  return jnp.asarray(ids), jnp.asarray(mask)


def randomize_lora_b(model, seed=7):
  key = jax.random.key(seed)
  for _, linear in iter_linears(model):
    if linear.lora is not None:
      key, sub = jax.random.split(key)
      linear.lora.lora_b[...] = 0.5 * jax.random.normal(sub, linear.lora.lora_b.shape)


def base_hidden_same_width(llm, ids, mask):
  """Base LLM hidden states with the plain causal mask, padded to the tower's sequence length."""
  padded_mask = jnp.pad(mask, ((0, 0), (0, NUM_PROMPTS)))
  embeddings = jnp.pad(llm.embed_tokens(ids), ((0, 0), (0, NUM_PROMPTS), (0, 0)))
  hidden, _ = llm.hidden_states(embeddings, positions_from_mask(padded_mask),
                                causal_mask(padded_mask), adapters=False)
  return np.asarray(hidden)


def base_hidden_alone(llm, caption_ids):
  """Base LLM hidden states `[l, embed]` for one unpadded caption `[l]`."""
  ones = jnp.ones((1, caption_ids.shape[0]), jnp.int32)
  hidden, _ = llm.hidden_states(llm.embed_tokens(caption_ids[None]), positions_from_mask(ones),
                                causal_mask(ones), adapters=False)
  return np.asarray(hidden[0])


def test_caption_states_equal_base_exactly():
  """With the same sequence length, caption tokens match the base LLM bit for bit."""
  tower = make_tower()
  ids, mask = right_padded_captions()
  hidden, _ = tower.hidden_states(ids, mask)
  base = base_hidden_same_width(tower.llm, ids, mask)
  for row, length in enumerate(LENGTHS):
    assert np.array_equal(np.asarray(hidden[row, :length]), base[row, :length]), f'row {row}'


def test_caption_states_match_unpadded_base():
  """Against an unpadded run the key axis is shorter, which changes XLA's reduction order.

  On CPU (jax 0.10.2) the max abs difference was below 5e-7 on hidden states of order one, so
  exact equality does not hold and 1e-5 is the tolerance.
  """
  tower = make_tower()
  ids, mask = right_padded_captions()
  hidden, _ = tower.hidden_states(ids, mask)
  for row, length in enumerate(LENGTHS):
    alone = base_hidden_alone(tower.llm, ids[row, :length])
    diff = float(np.max(np.abs(np.asarray(hidden[row, :length]) - alone)))
    assert diff <= 1e-5, f'row {row}: max abs diff {diff}'


def test_zero_b_caption_states_exact():
  tower = make_tower()
  apply_lora(tower.llm, LoRAConfig(rank=4), rngs=nnx.Rngs(3))
  tower.eval()
  ids, mask = right_padded_captions()
  hidden, _ = tower.hidden_states(ids, mask, adapters=True)
  base = base_hidden_same_width(tower.llm, ids, mask)
  for row, length in enumerate(LENGTHS):
    assert np.array_equal(np.asarray(hidden[row, :length]), base[row, :length]), f'row {row}'


def test_adapters_off_caption_states_exact():
  tower = make_tower()
  apply_lora(tower.llm, LoRAConfig(rank=4), rngs=nnx.Rngs(3))
  randomize_lora_b(tower.llm)
  tower.eval()
  ids, mask = right_padded_captions()
  off, _ = tower.hidden_states(ids, mask, adapters=False)
  on, _ = tower.hidden_states(ids, mask, adapters=True)
  base = base_hidden_same_width(tower.llm, ids, mask)
  for row, length in enumerate(LENGTHS):
    assert np.array_equal(np.asarray(off[row, :length]), base[row, :length]), f'row {row}'
  first = LENGTHS[0]
  assert float(np.max(np.abs(np.asarray(on[0, :first]) - base[0, :first]))) > 1e-3


def test_prompt_change_keeps_caption_states():
  tower = make_tower()
  ids, mask = right_padded_captions()
  hidden_before, _ = tower.hidden_states(ids, mask)
  embedding_before = np.asarray(tower(ids, mask))
  tower.prompts[...] = tower.prompts[...] + jax.random.normal(jax.random.key(4),
                                                               tower.prompts.shape)
  hidden_after, _ = tower.hidden_states(ids, mask)
  embedding_after = np.asarray(tower(ids, mask))
  for row, length in enumerate(LENGTHS):
    assert np.array_equal(np.asarray(hidden_after[row, :length]),
                          np.asarray(hidden_before[row, :length])), f'row {row}'
  for row in range(len(LENGTHS)):
    change = float(np.max(np.abs(embedding_after[row] - embedding_before[row])))
    assert change > 1e-3, f'row {row}: embedding moved only {change}'


def test_output_shape_and_dtype():
  tower = make_tower()
  ids, mask = right_padded_captions()
  out = tower(ids, mask)
  assert out.shape == (len(LENGTHS), 16)
  assert out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))


def test_right_padding_matches_alone():
  tower = make_tower()
  ids, mask = right_padded_captions()
  batched = np.asarray(tower(ids, mask))
  for row, length in enumerate(LENGTHS):
    alone = np.asarray(tower(ids[row:row + 1, :length], jnp.ones((1, length), jnp.int32)))[0]
    diff = float(np.max(np.abs(batched[row] - alone)))
    assert diff <= 1e-5, f'row {row} (length {length}): max abs diff {diff}'


def test_extra_padding_columns_ignored():
  tower = make_tower()
  ids, mask = right_padded_captions()
  wider_ids = jnp.pad(ids, ((0, 0), (0, 5)), constant_values=PAD_ID)
  wider_mask = jnp.pad(mask, ((0, 0), (0, 5)))
  narrow = np.asarray(tower(ids, mask))
  wide = np.asarray(tower(wider_ids, wider_mask))
  assert float(np.max(np.abs(wide - narrow))) <= 1e-5


def test_pad_token_ids_ignored():
  """The tower puts prompt embeddings or zeros at pad positions, so pad ids never reach the LLM."""
  tower = make_tower()
  ids_zero, mask = right_padded_captions(pad_id=0)
  ids_other, _ = right_padded_captions(pad_id=17)
  assert not np.array_equal(np.asarray(ids_zero), np.asarray(ids_other))
  assert np.array_equal(np.asarray(tower(ids_zero, mask)), np.asarray(tower(ids_other, mask)))


def test_layout_mask_hand_example():
  mask = jnp.asarray([[1, 1, 1, 0],
                      [1, 1, 0, 0]])
  lengths, positions, is_caption, is_prompt, attention = read_only_prompt_layout(mask, 2)
  # Row 0: captions 0-2, prompts 3-4, padding 5. Row 1: captions 0-1, prompts 2-3, padding 4-5.
  expected = np.asarray([
      [[1, 0, 0, 0, 0, 0],
       [1, 1, 0, 0, 0, 0],
       [1, 1, 1, 0, 0, 0],
       [1, 1, 1, 1, 1, 0],
       [1, 1, 1, 1, 1, 0],
       [0, 0, 0, 0, 0, 0]],
      [[1, 0, 0, 0, 0, 0],
       [1, 1, 0, 0, 0, 0],
       [1, 1, 1, 1, 0, 0],
       [1, 1, 1, 1, 0, 0],
       [0, 0, 0, 0, 0, 0],
       [0, 0, 0, 0, 0, 0]],
  ], bool)
  assert attention.shape == (2, 1, 6, 6)
  assert np.array_equal(np.asarray(attention[:, 0]), expected)
  assert lengths.tolist() == [3, 2]
  assert np.asarray(is_caption).astype(int).tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
  assert np.asarray(is_prompt).astype(int).tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0]]
  assert positions.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]


def test_layout_caption_never_sees_prompts():
  mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
  _, _, is_caption, is_prompt, attention = read_only_prompt_layout(mask, 4)
  attention = np.asarray(attention[:, 0])
  is_caption, is_prompt = np.asarray(is_caption), np.asarray(is_prompt)
  for row in range(mask.shape[0]):
    caption_rows = attention[row][is_caption[row]]
    assert not np.any(caption_rows[:, is_prompt[row]]), f'row {row}'


def test_layout_prompt_sees_all_real():
  mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
  _, _, is_caption, is_prompt, attention = read_only_prompt_layout(mask, 4)
  attention = np.asarray(attention[:, 0])
  is_caption, is_prompt = np.asarray(is_caption), np.asarray(is_prompt)
  for row in range(mask.shape[0]):
    prompt_rows = attention[row][is_prompt[row]]
    real = is_caption[row] | is_prompt[row]
    assert np.all(prompt_rows[:, real]), f'row {row}'
    assert not np.any(prompt_rows[:, ~real]), f'row {row}'


def test_layout_padding_fully_masked():
  mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
  _, _, is_caption, is_prompt, attention = read_only_prompt_layout(mask, 4)
  attention = np.asarray(attention[:, 0])
  padding = ~(np.asarray(is_caption) | np.asarray(is_prompt))
  for row in range(mask.shape[0]):
    assert not np.any(attention[row][padding[row]]), f'row {row}: padding query sees a key'
    assert not np.any(attention[row][:, padding[row]]), f'row {row}: a query sees padding'


def test_left_padding_base_llm():
  """The base LLM with left padding reproduces the unpadded caption's hidden states."""
  tower = make_tower()
  llm = tower.llm
  ids, mask = right_padded_captions()
  width = ids.shape[1]
  left_ids = np.full(ids.shape, PAD_ID, np.int32)
  left_mask = np.zeros(ids.shape, np.int32)
  for row, length in enumerate(LENGTHS):
    left_ids[row, width - length:] = np.asarray(ids[row, :length])
    left_mask[row, width - length:] = 1
  left_mask = jnp.asarray(left_mask)
  hidden, _ = llm.hidden_states(llm.embed_tokens(jnp.asarray(left_ids)),
                                positions_from_mask(left_mask), causal_mask(left_mask))
  for row, length in enumerate(LENGTHS):
    alone = base_hidden_alone(llm, ids[row, :length])
    diff = float(np.max(np.abs(np.asarray(hidden[row, width - length:]) - alone)))
    assert diff <= 1e-5, f'row {row}: max abs diff {diff}'


def test_prompt_init_chosen_rows():
  init_ids = jnp.asarray([5, 9])
  tower = make_tower(prompt_init_ids=init_ids)
  table = np.asarray(tower.llm.embed_tokens.embedding[...])
  prompts = np.asarray(tower.prompts[...])
  assert prompts.shape == (NUM_PROMPTS, CONFIG.hidden_size)
  assert np.array_equal(prompts[0], table[5])
  assert np.array_equal(prompts[1], table[9])
  np.testing.assert_allclose(prompts[-1], table.mean(axis=0), rtol=0, atol=1e-7)


def test_prompt_init_random_rows():
  tower = make_tower()
  table = np.asarray(tower.llm.embed_tokens.embedding[...])
  prompts = np.asarray(tower.prompts[...])
  for index in range(NUM_PROMPTS - 1):
    matches = np.all(table == prompts[index], axis=1)
    assert np.any(matches), f'prompt {index} is not an embedding row'
  np.testing.assert_allclose(prompts[-1], table.mean(axis=0), rtol=0, atol=1e-7)


def test_prompt_init_wrong_shape():
  with pytest.raises(ValueError, match=r'expected \(2,\)'):
    make_tower(prompt_init_ids=jnp.asarray([1, 2, 3]))


def test_zero_prompts_rejected():
  llm = Llama(CONFIG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='num_prompts must be at least 1'):
    TextTower(llm, embed_dim=16, num_prompts=0, pooler_heads=4, rngs=nnx.Rngs(1))
