"""Generate mode and top-p sampling: adapters off reproduce the base LLM token for token."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from clamp_jax import export
from clamp_jax.generate import generate_ids, select_tokens
from clamp_jax.generate_mode import OUTPUT_FILE, format_prompts
from clamp_jax.weights import load_llm
from conftest import REPO, run_main_command

PROMPTS = ('The capital of France is', 'Once upon a time, in a small village by the sea,')
MAX_NEW_TOKENS = 12


def generate_flags(*extra):
  return ['--config.mode=generate', f'--config.generate.max_new_tokens={MAX_NEW_TOKENS}',
          f'--config.generate.prompts={PROMPTS!r}', '--config.generate.chat_template=False',
          *extra]


def run_generate(flags, workdir, *extra) -> dict:
  result = run_main_command(*flags, *generate_flags(*extra), f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  for prompt in PROMPTS:
    assert f'### {prompt}' in result.stdout
  with open(os.path.join(workdir, OUTPUT_FILE)) as f:
    return json.load(f)


def left_padded(tokenizer, texts):
  tokenizer.padding_side = 'left'
  encoded = tokenizer(list(texts), return_tensors='np', padding=True)
  return encoded['input_ids'], encoded['attention_mask']


def cut_at_eos(row, eos):
  row = [int(token) for token in row]
  return row[:row.index(eos)] if eos in row else row


def test_adapters_off_equals_base_model(trained_on_hf_llama, tiny_hf_llama):
  workdir, flags = trained_on_hf_llama
  record = run_generate(flags, workdir, '--config.generate.adapters=False')
  assert record['step'] == 2
  assert record['adapters'] is False
  got = [output['token_ids'] for output in record['outputs']]

  # Our LLM loaded fresh from the base folder, with no adapters attached at all.
  base, tokenizer = load_llm(tiny_hf_llama)
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  ids, mask = left_padded(tokenizer, PROMPTS)
  eos = tokenizer.eos_token_id
  ours = generate_ids(base, ids, mask, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos)
  assert got == [cut_at_eos(row, eos) for row in ours]

  # transformers' greedy decoding of the same base model.
  reference_model = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_llama,
                                                                  dtype=torch.float32)
  reference_model.eval()
  with torch.no_grad():
    out = reference_model.generate(
        input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
        max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id)
  reference = [cut_at_eos(row, eos) for row in out[:, ids.shape[1]:].numpy()]
  assert got == reference
  assert all(len(row) > 0 for row in got)


def test_adapters_on_match_trained_model(trained_on_hf_llama):
  workdir, flags = trained_on_hf_llama
  record = run_generate(flags, workdir, '--config.generate.adapters=True')
  assert record['adapters'] is True
  assert [output['prompt'] for output in record['outputs']] == list(PROMPTS)

  # The same decoding in-process from the checkpoint restored by export.restore_latest.
  sys.path.insert(0, REPO)
  from configs import tiny
  config = tiny.get_config()
  config.model.llm = flags[1].split('=', 1)[1]
  setup, step = export.restore_latest(config, workdir, required=True)
  assert step == 2
  tokenizer = setup.tokenizer
  ids, mask = left_padded(tokenizer, PROMPTS)
  rows = generate_ids(setup.model.text_tower.llm, ids, mask, max_new_tokens=MAX_NEW_TOKENS,
                      eos_token_id=tokenizer.eos_token_id, adapters=True)
  assert [output['token_ids'] for output in record['outputs']] == [
      cut_at_eos(row, tokenizer.eos_token_id) for row in rows]


def test_without_checkpoint_uses_base_model(tmp_path):
  record = run_generate(['--config=configs/tiny.py'], tmp_path,
                        '--config.generate.temperature=0.8', '--config.generate.top_p=0.9')
  assert record['step'] is None
  assert record['temperature'] == 0.8
  assert len(record['outputs']) == len(PROMPTS)


def test_select_tokens_top_p_keeps_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  drawn = np.asarray(select_tokens(logits, keys, (1.0, 0.7)))
  # 0.5 + 0.3 >= 0.7, so only tokens 0 and 1 may be drawn, in about a 5:3 ratio.
  assert set(drawn.tolist()) == {0, 1}
  assert abs(np.mean(drawn == 0) - 0.5 / 0.8) < 0.05
  greedy_like = np.asarray(select_tokens(logits, keys, (1.0, 1e-6)))
  assert set(greedy_like.tolist()) == {0}
  assert np.asarray(select_tokens(logits, keys, None)).tolist() == [0] * 2000


def test_sampling_reproducible_by_seed():
  from clamp_jax.models.llama import Llama, LlamaConfig
  from flax import nnx

  llm = Llama(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
              rngs=nnx.Rngs(0))
  ids = np.asarray([[0, 5, 6, 7], [8, 9, 10, 11]], np.int32)
  mask = np.asarray([[0, 1, 1, 1], [1, 1, 1, 1]], np.int32)
  kwargs = dict(max_new_tokens=16, temperature=1.5, top_p=0.95)
  first = generate_ids(llm, ids, mask, seed=3, **kwargs)
  again = generate_ids(llm, ids, mask, seed=3, **kwargs)
  other = generate_ids(llm, ids, mask, seed=4, **kwargs)
  greedy = generate_ids(llm, ids, mask, max_new_tokens=16)
  assert np.array_equal(first, again)
  assert not np.array_equal(first, other)
  assert not np.array_equal(first, greedy)


def test_format_prompts_chat_template():
  class Plain:
    chat_template = None

  assert format_prompts(Plain(), ['hi'], chat_template=True) == ['hi']


@pytest.mark.parametrize('override, message', [
    ('--config.generate.top_p=0', 'config.generate.top_p=0'),
    ('--config.generate.temperature=-1.0', 'config.generate.temperature=-1.0'),
    ('--config.generate.max_new_tokens=0', 'config.generate.max_new_tokens=0'),
])
def test_bad_generate_settings_one_error_line(tmp_path, override, message):
  result = run_main_command('--config=configs/tiny.py', '--config.mode=generate', override,
                            f'--workdir={tmp_path}', timeout=120)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert message in lines[0]
