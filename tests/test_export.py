"""Export mode against transformers and PEFT in PyTorch, on a tiny random Hugging Face Llama.

The exported PEFT adapters on the same base model give our hidden states, the merged folder loads
in transformers with our logits, and `load_trained` rebuilds the trained CLAMP model.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from clamp_jax import build, export
from clamp_jax.checkpointing import flatten_state
from clamp_jax.models.llama import causal_mask, positions_from_mask
from clamp_jax.models.lora import iter_linears
from conftest import run_main_command

peft = pytest.importorskip('peft')

LENGTHS = (12, 7, 3)


def right_padded_batch(seed=0, vocab=49152):
  rng = np.random.default_rng(seed)
  width = max(LENGTHS)
  ids = np.full((len(LENGTHS), width), 2, np.int32)
  mask = np.zeros((len(LENGTHS), width), np.int32)
  for row, length in enumerate(LENGTHS):
    ids[row, :length] = rng.integers(3, vocab, size=length)
    mask[row, :length] = 1
  return ids, mask


def real_positions(array, mask):
  """Rows of `array` `[b, t, ...]` at the real (unpadded) positions, concatenated."""
  return np.concatenate([np.asarray(array[row, :int(mask[row].sum())]) for row in range(len(mask))])


@pytest.fixture(scope='module')
def exported(trained_on_hf_llama):
  workdir, flags = trained_on_hf_llama
  result = run_main_command(*flags, '--config.mode=export', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  return os.path.join(workdir, export.EXPORT_DIR)


@pytest.fixture(scope='module')
def ours(exported, tiny_hf_llama):
  """The trained model rebuilt by `load_trained` on a freshly loaded base LLM."""
  model, tokenizer, config = export.load_trained(os.path.join(exported, export.TRAINED_DIR))
  assert config.model.llm == tiny_hf_llama
  return model, tokenizer, config


def test_export_layout(exported):
  names = set(os.listdir(exported))
  assert {'trained', 'merged', 'peft', 'head.safetensors', 'export.json'} <= names
  assert not os.path.exists(exported + '.partial')
  assert {'checkpoint', 'config.json'} <= set(os.listdir(os.path.join(exported, 'trained')))
  assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= set(
      os.listdir(os.path.join(exported, 'merged')))
  assert {'adapter_config.json', 'adapter_model.safetensors'} <= set(
      os.listdir(os.path.join(exported, 'peft')))
  with open(os.path.join(exported, 'export.json')) as f:
    assert json.load(f)['step'] == 2


def test_peft_files_follow_peft_format(exported, tiny_hf_llama):
  with open(os.path.join(exported, 'peft', 'adapter_config.json')) as f:
    config = json.load(f)
  assert config['peft_type'] == 'LORA'
  assert config['r'] == 4
  assert config['lora_alpha'] == 16.0
  assert config['lora_dropout'] == 0.1
  assert sorted(config['target_modules']) == ['k_proj', 'o_proj', 'q_proj', 'v_proj']
  assert config['base_model_name_or_path'] == tiny_hf_llama
  tensors = load_file(os.path.join(exported, 'peft', 'adapter_model.safetensors'))
  assert len(tensors) == 2 * 4 * 2  # A and B for four projections in two layers.
  q_a = tensors['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight']
  q_b = tensors['base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight']
  k_b = tensors['base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight']
  assert q_a.shape == (4, 64)  # [r, in]
  assert q_b.shape == (64, 4)  # [out, r]: 4 heads of 16.
  assert k_b.shape == (32, 4)  # 2 kv heads of 16.
  assert np.abs(q_b).max() > 0, 'training should have moved LoRA B away from zero'


def test_peft_adapters_match_our_hidden_states(exported, tiny_hf_llama, ours):
  model, _, _ = ours
  llm = model.text_tower.llm
  ids, mask = right_padded_batch()
  hidden, _ = llm.hidden_states(llm.embed_tokens(jnp.asarray(ids)),
                                positions_from_mask(jnp.asarray(mask)),
                                causal_mask(jnp.asarray(mask)), adapters=True)
  base_hidden, _ = llm.hidden_states(llm.embed_tokens(jnp.asarray(ids)),
                                     positions_from_mask(jnp.asarray(mask)),
                                     causal_mask(jnp.asarray(mask)), adapters=False)

  base = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_llama, dtype=torch.float32)
  adapted = peft.PeftModel.from_pretrained(base, os.path.join(exported, 'peft'))
  adapted.eval()
  with torch.no_grad():
    reference = adapted.base_model.model.model(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()

  ours_real = real_positions(hidden, mask)
  reference_real = real_positions(reference, mask)
  difference = np.abs(ours_real - reference_real).max()
  print(f'PEFT hidden states: max difference {difference:.2e}')
  assert difference <= 1e-4
  # The adapters matter: the same comparison without them is far off.
  assert np.abs(real_positions(base_hidden, mask) - reference_real).max() > 1e-3


def test_merged_folder_matches_our_logits(exported, ours):
  model, _, _ = ours
  llm = model.text_tower.llm
  ids, mask = right_padded_batch(seed=1)
  logits = llm(jnp.asarray(ids), jnp.asarray(mask), adapters=True)

  merged = transformers.LlamaForCausalLM.from_pretrained(os.path.join(exported, 'merged'),
                                                         dtype=torch.float32)
  merged.eval()
  with torch.no_grad():
    reference = merged(input_ids=torch.from_numpy(ids).long(),
                       attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  difference = np.abs(real_positions(logits, mask) - real_positions(reference, mask)).max()
  print(f'merged logits: max difference {difference:.2e}')
  assert difference <= 1e-4
  tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(exported, 'merged'))
  assert tokenizer('a photo')['input_ids']


def test_head_file_holds_tower_head(exported, ours):
  model, _, _ = ours
  head = load_file(os.path.join(exported, 'head.safetensors'))
  assert 'text_tower.prompts' in head
  assert 'text_tower.projection.kernel' in head
  assert 'text_tower.pooler.query' in head
  assert 'text_tower.feature_mean' in head
  assert 'log_logit_scale' in head
  assert not any(name.startswith(('text_tower.llm.', 'image_tower.')) for name in head)
  np.testing.assert_array_equal(head['text_tower.prompts'],
                                np.asarray(model.text_tower.prompts[...]))


def test_load_trained_restores_checkpoint(trained_on_hf_llama, ours):
  """The rebuilt model equals the training checkpoint restored the ordinary way."""
  model, _, config = ours
  workdir, _ = trained_on_hf_llama
  setup, step = export.restore_latest(config, workdir, required=True)
  assert step == 2
  trainable = build.trainable_filter(build.trainable_patterns(config))
  expected = flatten_state(nnx.state(setup.model, trainable))
  got = flatten_state(nnx.state(model, trainable))
  assert sorted(expected) == sorted(got)
  for name in expected:
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(expected[name]), name)
  changed = [path for path, linear in iter_linears(model.text_tower.llm)
             if linear.lora is not None and np.abs(np.asarray(linear.lora.lora_b[...])).max() > 0]
  assert len(changed) == 8
