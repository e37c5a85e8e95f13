"""Broken, incomplete or mismatched checkpoints raise a one-line WeightLoadError naming the file."""

import json
import os
import shutil

import gguf
import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from clamp_jax.weights import WeightLoadError, load_llm, smollm2_gguf_path
from clamp_jax.weights.gguf_file import load_gguf
from clamp_jax.weights.hf_folder import load_hf_folder

HF_CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)

# Tiny GGUF model: hidden 16, 4 heads of 4 dims, 2 kv heads, MLP 24, vocab 32, one layer.
GGUF_HIDDEN, GGUF_HEADS, GGUF_KV_HEADS, GGUF_INNER, GGUF_VOCAB = 16, 4, 2, 24, 32
GGUF_SHAPES = {
    'token_embd.weight': (GGUF_VOCAB, GGUF_HIDDEN),
    'output_norm.weight': (GGUF_HIDDEN,),
    'blk.0.attn_norm.weight': (GGUF_HIDDEN,),
    'blk.0.attn_q.weight': (GGUF_HIDDEN, GGUF_HIDDEN),
    'blk.0.attn_k.weight': (GGUF_KV_HEADS * 4, GGUF_HIDDEN),
    'blk.0.attn_v.weight': (GGUF_KV_HEADS * 4, GGUF_HIDDEN),
    'blk.0.attn_output.weight': (GGUF_HIDDEN, GGUF_HIDDEN),
    'blk.0.ffn_norm.weight': (GGUF_HIDDEN,),
    'blk.0.ffn_gate.weight': (GGUF_INNER, GGUF_HIDDEN),
    'blk.0.ffn_up.weight': (GGUF_INNER, GGUF_HIDDEN),
    'blk.0.ffn_down.weight': (GGUF_HIDDEN, GGUF_INNER),
}


def assert_one_line_naming(error, *names):
  message = str(error.value)
  assert '\n' not in message, message
  for name in names:
    assert name in message, f'{name!r} missing from: {message}'


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
  """A valid single-file Hugging Face checkpoint folder from a seeded tiny transformers model."""
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
  folder = tmp_path_factory.mktemp('valid_hf')
  model.save_pretrained(str(folder))
  return folder


def copy_folder(source, tmp_path):
  target = tmp_path / 'checkpoint'
  shutil.copytree(source, target)
  return target


def edit_config(folder, **changes):
  path = folder / 'config.json'
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


def write_gguf(path, arch='llama', drop=None, grow=None):
  """Write a tiny float32 GGUF model. `drop` leaves a tensor out and `grow` adds a row to one."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(1)
  writer.add_context_length(64)
  writer.add_embedding_length(GGUF_HIDDEN)
  writer.add_feed_forward_length(GGUF_INNER)
  writer.add_head_count(GGUF_HEADS)
  writer.add_head_count_kv(GGUF_KV_HEADS)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_vocab_size(GGUF_VOCAB)
  rng = np.random.default_rng(0)
  for name, shape in GGUF_SHAPES.items():
    if name == drop:
      continue
    if name == grow:
      shape = (shape[0] + 1, *shape[1:])
    writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def truncated_copy(source, target, size):
  with open(source, 'rb') as f:
    data = f.read(size)
  with open(target, 'wb') as f:
    f.write(data)
  return target


def test_valid_fixtures_load(hf_folder, tmp_path):
  """The untouched fixtures load, so each failure below comes from the one change it makes."""
  llm = load_hf_folder(str(hf_folder))
  tiny = load_gguf(str(write_gguf(tmp_path / 'tiny.gguf')))
  assert llm.config.hidden_size == HF_CONFIG['hidden_size']
  assert tiny.config.hidden_size == GGUF_HIDDEN
  assert tiny.config.num_key_value_heads == GGUF_KV_HEADS


@pytest.mark.parametrize('keep_fraction', [0.0001, 0.5, 0.999])
def test_truncated_safetensors(hf_folder, tmp_path, keep_fraction):
  folder = copy_folder(hf_folder, tmp_path)
  weights = folder / 'model.safetensors'
  size = os.path.getsize(weights)
  truncated_copy(hf_folder / 'model.safetensors', weights, max(1, int(size * keep_fraction)))
  with pytest.raises(WeightLoadError) as error:
    load_llm(str(folder), tokenizer=False)
  assert_one_line_naming(error, str(weights))


def test_random_bytes_gguf(tmp_path):
  path = tmp_path / 'random.gguf'
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(WeightLoadError) as error:
    load_llm(str(path), tokenizer=False)
  assert_one_line_naming(error, str(path))


@pytest.mark.parametrize('keep_fraction', [0.01, 0.5, 0.999])
def test_truncated_tiny_gguf(tmp_path, keep_fraction):
  source = write_gguf(tmp_path / 'tiny.gguf')
  size = int(os.path.getsize(source) * keep_fraction)
  path = truncated_copy(source, tmp_path / 'truncated.gguf', size)
  with pytest.raises(WeightLoadError) as error:
    load_llm(str(path), tokenizer=False)
  assert_one_line_naming(error, str(path))


def test_truncated_smollm2_gguf(tmp_path):
  path = truncated_copy(smollm2_gguf_path(), tmp_path / 'smollm2_head.gguf', 1 << 20)
  with pytest.raises(WeightLoadError) as error:
    load_llm(str(path), tokenizer=False)
  assert_one_line_naming(error, str(path))


def test_gguf_unknown_architecture(tmp_path):
  path = write_gguf(tmp_path / 'gpt2.gguf', arch='gpt2')
  with pytest.raises(WeightLoadError) as error:
    load_gguf(str(path))
  assert_one_line_naming(error, str(path), "'gpt2'")


def test_gguf_missing_tensor(tmp_path):
  path = write_gguf(tmp_path / 'missing.gguf', drop='blk.0.ffn_up.weight')
  with pytest.raises(WeightLoadError) as error:
    load_gguf(str(path))
  assert_one_line_naming(error, str(path), 'layers.0.mlp.up_proj')


def test_gguf_shape_mismatch(tmp_path):
  path = write_gguf(tmp_path / 'shape.gguf', grow='blk.0.ffn_up.weight')
  with pytest.raises(WeightLoadError) as error:
    load_gguf(str(path))
  assert_one_line_naming(error, str(path), 'model.layers.0.mlp.up_proj.weight', '(25, 16)')


def test_folder_without_config(hf_folder, tmp_path):
  folder = copy_folder(hf_folder, tmp_path)
  (folder / 'config.json').unlink()
  with pytest.raises(WeightLoadError) as error:
    load_llm(str(folder), tokenizer=False)
  assert_one_line_naming(error, str(folder), 'config.json')


def test_folder_without_safetensors(hf_folder, tmp_path):
  folder = copy_folder(hf_folder, tmp_path)
  (folder / 'model.safetensors').unlink()
  with pytest.raises(WeightLoadError) as error:
    load_llm(str(folder), tokenizer=False)
  assert_one_line_naming(error, str(folder), '*.safetensors')


def test_invalid_config_json(hf_folder, tmp_path):
  folder = copy_folder(hf_folder, tmp_path)
  (folder / 'config.json').write_text('{"model_type": "llama",')
  with pytest.raises(WeightLoadError) as error:
    load_llm(str(folder), tokenizer=False)
  assert_one_line_naming(error, str(folder / 'config.json'), 'invalid JSON')


def test_unknown_architecture(hf_folder, tmp_path):
  folder = copy_folder(hf_folder, tmp_path)
  edit_config(folder, model_type='gpt2', architectures=['GPT2LMHeadModel'])
  with pytest.raises(WeightLoadError) as error:
    load_llm(str(folder), tokenizer=False)
  assert_one_line_naming(error, str(folder / 'config.json'), "'gpt2'", 'GPT2LMHeadModel')


def test_missing_tensor(hf_folder, tmp_path):
  folder = copy_folder(hf_folder, tmp_path)
  weights = folder / 'model.safetensors'
  tensors = load_file(str(weights))
  del tensors['model.layers.0.mlp.up_proj.weight']
  save_file(tensors, str(weights))
  with pytest.raises(WeightLoadError) as error:
    load_llm(str(folder), tokenizer=False)
  assert_one_line_naming(error, str(folder), 'layers.0.mlp.up_proj')


def test_shape_mismatch(hf_folder, tmp_path):
  folder = copy_folder(hf_folder, tmp_path)
  edit_config(folder, intermediate_size=40)
  with pytest.raises(WeightLoadError) as error:
    load_llm(str(folder), tokenizer=False)
  # safetensors lists tensors by name, so down_proj is the first MLP weight checked.
  assert_one_line_naming(error, str(folder), "'model.layers.0.mlp.down_proj.weight'",
                         'shape (32, 48)', 'expected (32, 40)')


def test_unexpected_tensor(hf_folder, tmp_path):
  folder = copy_folder(hf_folder, tmp_path)
  weights = folder / 'model.safetensors'
  tensors = load_file(str(weights))
  tensors['model.layers.0.self_attn.q_norm.weight'] = np.ones((8,), np.float32)
  save_file(tensors, str(weights))
  with pytest.raises(WeightLoadError) as error:
    load_llm(str(folder), tokenizer=False)
  assert_one_line_naming(error, 'model.layers.0.self_attn.q_norm.weight')


def test_index_lists_missing_shard(tmp_path):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
  folder = tmp_path / 'sharded'
  model.save_pretrained(str(folder), max_shard_size='20KB')
  shards = sorted(folder.glob('*.safetensors'))
  assert len(shards) >= 2
  shards[-1].unlink()
  with pytest.raises(WeightLoadError) as error:
    load_llm(str(folder), tokenizer=False)
  assert_one_line_naming(error, str(folder / 'model.safetensors.index.json'), shards[-1].name)


def test_nonexistent_local_path(tmp_path):
  path = str(tmp_path / 'no_such_checkpoint')
  with pytest.raises(WeightLoadError) as error:
    load_llm(path, tokenizer=False)
  assert_one_line_naming(error, path, 'no such file or folder')


def test_uncached_hub_id(tmp_path, monkeypatch):
  hf_home = tmp_path / 'hf_home'
  hf_home.mkdir()
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HOME', str(hf_home))
  # huggingface_hub reads these variables at import time, so its module constants are patched too.
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HOME', str(hf_home))
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(hf_home / 'hub'))
  repo_id = 'nonexistent-org/nonexistent-model'
  with pytest.raises(WeightLoadError) as error:
    load_llm(repo_id, tokenizer=False)
  assert_one_line_naming(error, repo_id, f'hf download {repo_id}')
  assert list(hf_home.iterdir()) == []
