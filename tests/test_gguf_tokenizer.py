"""The GGUF tokenizer built without PyTorch equals transformers' own GGUF tokenizer."""

import os
import subprocess
import sys

import pytest

from clamp_jax.weights import load_tokenizer, smollm2_gguf_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [
    'Hello world! A photo of the handwritten digit seven.',
    '<|im_start|>user\nDescribe a photo<|im_end|>\n<|im_start|>assistant\n1.',
    '  spaces  and\ttabs 12345 \u00fcn\u00efcode',
]


@pytest.fixture(scope='module')
def tokenizers_pair():
  from transformers import AutoTokenizer
  path = smollm2_gguf_path()
  ours = load_tokenizer(path)
  reference = AutoTokenizer.from_pretrained(os.path.dirname(path),
                                            gguf_file=os.path.basename(path))
  return ours, reference


@pytest.mark.parametrize('text', TEXTS)
def test_gguf_tokenizer_ids_match(tokenizers_pair, text):
  ours, reference = tokenizers_pair
  assert ours(text)['input_ids'] == reference(text)['input_ids']


def test_gguf_tokenizer_special_tokens_match(tokenizers_pair):
  ours, reference = tokenizers_pair
  assert ours.bos_token == reference.bos_token
  assert ours.eos_token == reference.eos_token
  assert ours.pad_token == reference.pad_token
  messages = [{'role': 'user', 'content': 'hi'}]
  assert (ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) ==
          reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_gguf_tokenizer_loads_without_torch():
  # A None entry in sys.modules makes both `import torch` and transformers' availability
  # check behave as on a machine without PyTorch.
  code = ('import sys; sys.modules["torch"] = None; '
          'from clamp_jax.weights import load_tokenizer, smollm2_gguf_path; '
          'print(load_tokenizer(smollm2_gguf_path())("seven")["input_ids"])')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().startswith('[')
