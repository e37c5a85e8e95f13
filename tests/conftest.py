"""Shared fixtures: a tiny random Hugging Face Llama folder and a short CLAMP run on it.

The folder contains a seeded random `LlamaForCausalLM` saved with `save_pretrained` (safetensors,
untied output head) and SmolLM2's tokenizer, whose vocabulary size the model uses. The run trains
`configs/tiny.py` for 2 steps with `--config.model.llm=FOLDER`, which makes every LoRA B non-zero,
so exports and generation differ from the base model unless the adapters are off.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_HF_LLAMA = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
    rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0},
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


def run_main_command(*args: str, timeout: int = 600, env_extra=None) -> subprocess.CompletedProcess:
  """Run `python -m clamp_jax.main ARGS` from the repository root and capture its output."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', **(env_extra or {}))
  return subprocess.run([sys.executable, '-m', 'clamp_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='session')
def tiny_hf_llama(tmp_path_factory) -> str:
  """Folder of a seeded random transformers Llama with SmolLM2's tokenizer."""
  import torch
  import transformers

  from clamp_jax.weights import load_tokenizer, smollm2_gguf_path

  folder = tmp_path_factory.mktemp('tiny_hf_llama')
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF_LLAMA))
  model.save_pretrained(folder)
  load_tokenizer(smollm2_gguf_path()).save_pretrained(folder)
  return str(folder)


@pytest.fixture(scope='session')
def trained_on_hf_llama(tiny_hf_llama, tmp_path_factory) -> tuple[str, list[str]]:
  """Workdir of a 2-step run of configs/tiny.py on `tiny_hf_llama`, and the flags it used."""
  workdir = tmp_path_factory.mktemp('trained_on_hf_llama')
  flags = ['--config=configs/tiny.py', f'--config.model.llm={tiny_hf_llama}',
           '--config.train.steps=2', '--config.eval.at_end=False']
  result = run_main_command(*flags, f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  return str(workdir), flags
