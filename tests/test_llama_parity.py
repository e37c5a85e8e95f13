"""Logit parity of the Flax `Llama` with transformers' `LlamaForCausalLM` on tiny random models.

Each case saves a seeded random transformers model as a sharded safetensors folder and loads it
through `load_hf_folder`, so the test covers the config reader, the shard index and the tensor
mapping as well as the forward pass.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from clamp_jax.models.llama import LlamaConfig, positions_from_mask
from clamp_jax.weights import load_llm
from clamp_jax.weights.hf_folder import load_hf_folder

VOCAB = 128
PAD_ID = 0
LENGTHS = (16, 11, 5)

# initializer_range 0.1 (transformers' default is 0.02) gives attention scores of order one, so
# rotary position details visibly change the logits.
CASES = {
    # Grouped-query attention (4 query heads per kv head), tied output head, non-default theta.
    'gqa_tied': dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
        rope_parameters={'rope_type': 'default', 'rope_theta': 1000.0},
    ),
    # llama3 frequency scaling with a 64-token original context: with head_dim 16 and theta 5e5
    # the wavelengths are about 6, 33, 168, ... tokens, so one band is interpolated (between 16
    # and 64) and the longer ones are divided by `factor`.
    'llama3_untied': dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
        max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.1,
        rope_parameters={'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0,
                         'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                         'original_max_position_embeddings': 64},
    ),
}


def right_padded_batch(seed):
  """Random ids `[3, 16]` right-padded to the longest of LENGTHS, and the attention mask."""
  rng = np.random.default_rng(seed)
  width = max(LENGTHS)
  ids = np.full((len(LENGTHS), width), PAD_ID, np.int32)
  mask = np.zeros((len(LENGTHS), width), np.int32)
  for row, length in enumerate(LENGTHS):
    ids[row, :length] = rng.integers(1, VOCAB, size=length)
    mask[row, :length] = 1
  return ids, mask


def write_old_style_config(new_folder, old_folder):
  """Copy a checkpoint folder and rewrite its config with top-level `rope_theta`, `rope_scaling`."""
  shutil.copytree(new_folder, old_folder)
  path = os.path.join(old_folder, 'config.json')
  with open(path, encoding='utf-8') as f:
    config = json.load(f)
  rope = dict(config.pop('rope_parameters'))
  config['rope_theta'] = rope.pop('rope_theta')
  config['rope_scaling'] = None if rope['rope_type'] == 'default' else rope
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2)


@pytest.fixture(scope='module', params=sorted(CASES))
def case(request, tmp_path_factory):
  """Seeded reference model, its saved folders in new and old config style, and a batch."""
  name = request.param
  torch.manual_seed(0)
  reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CASES[name]))
  reference.eval()
  new_folder = str(tmp_path_factory.mktemp(f'{name}_new'))
  # 50 KB per shard splits these models (about 250 KB and 370 KB of float32) into several files.
  reference.save_pretrained(new_folder, max_shard_size='50KB')
  old_folder = str(tmp_path_factory.mktemp(f'{name}_old') / 'checkpoint')
  write_old_style_config(new_folder, old_folder)
  ids, mask = right_padded_batch(seed=1)
  with torch.no_grad():
    ref_logits = reference(input_ids=torch.from_numpy(ids).long(),
                           attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  return dict(name=name, new=new_folder, old=old_folder, ids=ids, mask=mask,
              ref_logits=ref_logits)


def real_positions_max_diff(ours, reference, mask):
  real = mask.astype(bool)
  return float(np.max(np.abs(np.asarray(ours)[real] - np.asarray(reference)[real])))


def test_checkpoint_has_several_shards(case):
  files = os.listdir(case['new'])
  shards = [f for f in files if f.endswith('.safetensors')]
  assert 'model.safetensors.index.json' in files
  assert len(shards) >= 3


def test_transformers_writes_rope_parameters(case):
  with open(os.path.join(case['new'], 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  assert 'rope_parameters' in config
  assert 'rope_theta' not in config
  assert 'rope_scaling' not in config


def test_logits_match_transformers(case):
  llm = load_hf_folder(case['new'])
  ours = llm(jnp.asarray(case['ids']), jnp.asarray(case['mask']))
  assert ours.dtype == jnp.float32
  assert ours.shape == case['ref_logits'].shape
  assert real_positions_max_diff(ours, case['ref_logits'], case['mask']) <= 1e-4


def test_xla_attention_kernel_matches_transformers(case):
  """`jax.nn.dot_product_attention` in place of the einsums gives the same logits, so the grouped
  heads map to the same key-value heads."""
  llm = load_hf_folder(case['new'], attention='xla')
  ours = llm(jnp.asarray(case['ids']), jnp.asarray(case['mask']))
  assert real_positions_max_diff(ours, case['ref_logits'], case['mask']) <= 1e-4


def test_load_llm_folder_matches(case):
  llm, tokenizer = load_llm(case['new'], tokenizer=False)
  ours = llm(jnp.asarray(case['ids']), jnp.asarray(case['mask']))
  assert tokenizer is None
  assert real_positions_max_diff(ours, case['ref_logits'], case['mask']) <= 1e-4


def test_old_config_style_same_config(case):
  new_config = load_hf_folder(case['new']).config
  old_config = load_hf_folder(case['old']).config
  assert old_config == new_config


def test_old_config_style_same_logits(case):
  ids, mask = jnp.asarray(case['ids']), jnp.asarray(case['mask'])
  new_logits = np.asarray(load_hf_folder(case['new'])(ids, mask))
  old_logits = np.asarray(load_hf_folder(case['old'])(ids, mask))
  assert np.array_equal(old_logits, new_logits)


def test_config_reads_rope_settings(case):
  config = load_hf_folder(case['new']).config
  expected_theta = CASES[case['name']]['rope_parameters']['rope_theta']
  assert config.rope_theta == expected_theta
  if case['name'] == 'llama3_untied':
    assert config.rope_scaling['rope_type'] == 'llama3'
    assert config.rope_scaling['factor'] == 8.0
    assert config.rope_scaling['original_max_position_embeddings'] == 64
    assert config.tie_word_embeddings is False
  else:
    assert config.rope_scaling is None
    assert config.tie_word_embeddings is True
    assert config.num_key_value_heads == 2


def test_rope_settings_change_logits(case):
  """Loading with default rope settings must move the logits, or parity would not cover them."""
  if case['name'] == 'llama3_untied':
    plain = load_hf_folder(case['new'], rope_scaling=None)
  else:
    plain = load_hf_folder(case['new'], rope_theta=10000.0)
  logits = plain(jnp.asarray(case['ids']), jnp.asarray(case['mask']))
  assert real_positions_max_diff(logits, case['ref_logits'], case['mask']) > 1e-2


def test_left_padding_matches_unpadded(case):
  llm = load_hf_folder(case['new'])
  ids, mask = case['ids'], case['mask']
  width = ids.shape[1]
  left_ids = np.full_like(ids, PAD_ID)
  left_mask = np.zeros_like(mask)
  for row, length in enumerate(LENGTHS):
    left_ids[row, width - length:] = ids[row, :length]
    left_mask[row, width - length:] = 1
  padded = np.asarray(llm(jnp.asarray(left_ids), jnp.asarray(left_mask)))
  for row, length in enumerate(LENGTHS):
    alone = np.asarray(llm(jnp.asarray(ids[row:row + 1, :length])))[0]
    diff = float(np.max(np.abs(padded[row, width - length:] - alone)))
    assert diff <= 1e-5, f'row {row} (length {length}): max abs diff {diff}'


def test_left_padding_positions_count_real():
  left = positions_from_mask(jnp.asarray([[0, 0, 1, 1, 1]]))
  right = positions_from_mask(jnp.asarray([[1, 1, 1, 0, 0]]))
  assert left[0, 2:].tolist() == [0, 1, 2]
  assert right[0, :3].tolist() == [0, 1, 2]


def test_config_from_hf_dict_defaults():
  config = LlamaConfig.from_hf_dict(dict(vocab_size=10, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2))
  assert config.num_key_value_heads == 2
  assert config.rope_theta == 10000.0
  assert config.rope_scaling is None
