"""Build a Hugging Face fast tokenizer from a GGUF file's metadata, without PyTorch.

`AutoTokenizer.from_pretrained(..., gguf_file=...)` in transformers 5.25 reads the file with a
module that imports torch, so it fails where only JAX is installed. This module reads the same
metadata with the `gguf` package and hands it to transformers' own converter
(`convert_gguf_tokenizer`), which needs only the `tokenizers` library.
"""

from __future__ import annotations

from clamp_jax.weights.assign import WeightLoadError
from clamp_jax.weights.gguf_file import open_gguf

# Special token name -> the GGUF key (after "tokenizer.ggml.") that stores its id.
_SPECIAL_TOKEN_IDS = {
    'bos_token': 'bos_token_id',
    'eos_token': 'eos_token_id',
    'unk_token': 'unknown_token_id',
    'pad_token': 'padding_token_id',
}


def read_gguf_tokenizer_metadata(path: str) -> tuple[str, dict, dict]:
  """Read `(architecture, tokenizer_dict, tokenizer_config)` from the file's metadata."""
  from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

  reader = open_gguf(path)
  metadata = {}
  for key, field in reader.fields.items():
    if key.startswith('tokenizer.') or key == 'general.architecture':
      metadata[key] = field.contents()
  if 'tokenizer.ggml.tokens' not in metadata:
    raise WeightLoadError(f'{path}: the GGUF file has no tokenizer (tokenizer.ggml.tokens).')
  groups = {
      group: {name: metadata[f'tokenizer.{key}'] for key, name in renames.items()
              if f'tokenizer.{key}' in metadata}
      for group, renames in GGUF_TOKENIZER_MAPPING.items()
  }
  tokenizer_dict, tokenizer_config = groups['tokenizer'], groups['tokenizer_config']
  if tokenizer_dict.get('tokenizer_type') == 'llama':
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file sets add_bos_token.
    tokenizer_config.setdefault('add_bos_token', True)
  tokens = tokenizer_dict['tokens']
  for name, key in _SPECIAL_TOKEN_IDS.items():
    token_id = metadata.get(f'tokenizer.ggml.{key}')
    tokenizer_config[name] = tokens[int(token_id)] if token_id is not None else None
  return metadata['general.architecture'], tokenizer_dict, tokenizer_config


def load_gguf_tokenizer(path: str):
  """Build a `PreTrainedTokenizerFast` equal to the one transformers makes from the same file."""
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

  architecture, tokenizer_dict, tokenizer_config = read_gguf_tokenizer_metadata(path)
  backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
  return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
