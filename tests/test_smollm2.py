"""SmolLM2-135M-Instruct from its GGUF file: logits and greedy decoding against transformers.

Both sides dequantize the same Q4_1 file to float32, so they run the same weights and any difference
comes from the model code.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from clamp_jax.generate import generate, generate_ids
from clamp_jax.models.lora import LoRAConfig, apply_lora, iter_linears
from clamp_jax.weights import load_llm, smollm2_gguf_path

pytestmark = pytest.mark.slow

QUESTIONS = (
    'What is the capital of France?',
    'Write a haiku about the sea.',
    'List three primary colors.',
)
NEW_TOKENS = 20


@pytest.fixture(scope='module')
def ours():
  return load_llm('smollm2')


@pytest.fixture(scope='module')
def reference():
  # One thread is enough for a 135M model, and multi-threaded OpenMP slows down sharply when
  # other processes compete for the same cores.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  path = smollm2_gguf_path()
  model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                               gguf_file=os.path.basename(path),
                                               dtype=torch.float32)
  model.eval()
  yield model
  torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def chat_prompts(ours):
  _, tokenizer = ours
  return [
      tokenizer.apply_chat_template([{'role': 'user', 'content': question}], tokenize=False,
                                    add_generation_prompt=True)
      for question in QUESTIONS
  ]


def encode(tokenizer, texts, side):
  previous = tokenizer.padding_side
  tokenizer.padding_side = side
  try:
    return tokenizer(texts, return_tensors='np', padding=True)
  finally:
    tokenizer.padding_side = previous


def cut_at_eos(tokens, eos):
  """Return tokens up to and including the first EOS, since each side pads differently after it."""
  tokens = [int(t) for t in tokens]
  return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.fixture(scope='module')
def reference_continuations(reference, ours, chat_prompts):
  _, tokenizer = ours
  encoded = encode(tokenizer, chat_prompts, 'left')
  with torch.no_grad():
    output = reference.generate(input_ids=torch.from_numpy(encoded['input_ids']).long(),
                                attention_mask=torch.from_numpy(encoded['attention_mask']).long(),
                                max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
  return output[:, encoded['input_ids'].shape[1]:].numpy()


@pytest.fixture(scope='module')
def adapted(ours):
  """A copy of the model with default LoRA adapters whose B is random and nonzero."""
  llm, _ = ours
  copy = nnx.clone(llm)
  apply_lora(copy, LoRAConfig(), rngs=nnx.Rngs(0))
  key = jax.random.key(1)
  for _, linear in iter_linears(copy):
    if linear.lora is not None:
      key, sub = jax.random.split(key)
      linear.lora.lora_b[...] = 0.05 * jax.random.normal(sub, linear.lora.lora_b.shape)
  copy.eval()
  return copy


def test_config_from_gguf(ours):
  llm, _ = ours
  config = llm.config
  assert config.num_hidden_layers == 30
  assert config.hidden_size == 576
  assert config.num_attention_heads == 9
  assert config.num_key_value_heads == 3
  assert config.tie_word_embeddings is True
  assert config.rope_theta == 100000.0


def test_logits_match_transformers(ours, reference, chat_prompts):
  llm, tokenizer = ours
  encoded = encode(tokenizer, chat_prompts, 'right')
  mask = encoded['attention_mask']
  assert mask.sum(axis=1).min() < mask.shape[1]
  logits = np.asarray(llm(jnp.asarray(encoded['input_ids']), jnp.asarray(mask)))
  with torch.no_grad():
    expected = reference(input_ids=torch.from_numpy(encoded['input_ids']).long(),
                         attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  real = mask.astype(bool)
  # Measured with this test on CPU (jax 0.10.2, torch 2.13.0): max abs diff about 1.2e-4 on
  # logits up to about 38 in magnitude.
  assert float(np.max(np.abs(logits[real] - expected[real]))) <= 1e-3


def test_greedy_ids_match_transformers(ours, chat_prompts, reference_continuations):
  llm, tokenizer = ours
  encoded = encode(tokenizer, chat_prompts, 'left')
  assert encoded['attention_mask'][:, 0].min() == 0
  ids = generate_ids(llm, encoded['input_ids'], encoded['attention_mask'],
                     max_new_tokens=NEW_TOKENS, eos_token_id=tokenizer.eos_token_id)
  assert ids.shape == (len(QUESTIONS), NEW_TOKENS)
  eos = tokenizer.eos_token_id
  for row in range(len(QUESTIONS)):
    assert cut_at_eos(ids[row], eos) == cut_at_eos(reference_continuations[row], eos), \
        f'prompt {row}: {QUESTIONS[row]!r}'


def test_generate_text_matches_transformers(ours, chat_prompts, reference_continuations):
  llm, tokenizer = ours
  side = tokenizer.padding_side
  texts = generate(llm, tokenizer, chat_prompts, max_new_tokens=NEW_TOKENS)
  assert tokenizer.padding_side == side
  eos = tokenizer.eos_token_id
  for row, text in enumerate(texts):
    tokens = cut_at_eos(reference_continuations[row], eos)
    expected = tokenizer.decode(tokens, skip_special_tokens=True)
    assert text == expected, f'prompt {row}'
  assert 'Paris' in texts[0]


def test_adapters_off_matches_base(ours, adapted, chat_prompts):
  llm, tokenizer = ours
  base = generate(llm, tokenizer, chat_prompts, max_new_tokens=NEW_TOKENS)
  off = generate(adapted, tokenizer, chat_prompts, max_new_tokens=NEW_TOKENS, adapters=False)
  assert off == base


def test_adapters_on_changes_text(ours, adapted, chat_prompts):
  llm, tokenizer = ours
  base = generate(llm, tokenizer, chat_prompts, max_new_tokens=NEW_TOKENS)
  on = generate(adapted, tokenizer, chat_prompts, max_new_tokens=NEW_TOKENS, adapters=True)
  assert on != base


def test_clone_leaves_base_unadapted(ours, adapted):
  llm, _ = ours
  assert adapted.layers[0].self_attn.q_proj.lora is not None
  assert llm.layers[0].self_attn.q_proj.lora is None
