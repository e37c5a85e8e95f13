"""Load a Llama-family model from a Hugging Face checkpoint folder (config.json + safetensors)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from clamp_jax.models.llama import Llama, LlamaConfig
from clamp_jax.weights.assign import WeightLoadError, fill_llama

SUPPORTED_ARCHITECTURES = ('LlamaForCausalLM', 'MistralForCausalLM')
SUPPORTED_MODEL_TYPES = ('llama', 'mistral')


def read_hf_config(folder: str) -> dict:
  """Read and check `config.json`; raises `WeightLoadError` naming the file on any problem."""
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise WeightLoadError(
        f'{folder}: no config.json found; expected a Hugging Face checkpoint folder with '
        'config.json and *.safetensors files.')
  try:
    with open(path, encoding='utf-8') as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise WeightLoadError(f'{path}: invalid JSON ({e}).') from e
  model_type = hf.get('model_type')
  architectures = hf.get('architectures') or []
  if model_type not in SUPPORTED_MODEL_TYPES and not set(architectures) & set(
      SUPPORTED_ARCHITECTURES):
    raise WeightLoadError(
        f'{path}: unsupported architecture (model_type={model_type!r}, '
        f'architectures={architectures}); supported model types are {SUPPORTED_MODEL_TYPES}.')
  if model_type == 'mistral' and hf.get('sliding_window'):
    raise WeightLoadError(f'{path}: sliding-window attention is not supported.')
  return hf


def safetensors_files(folder: str) -> list[str]:
  """List the safetensors files: those in the index file if present, else every `*.safetensors`."""
  index = os.path.join(folder, 'model.safetensors.index.json')
  if os.path.isfile(index):
    try:
      with open(index, encoding='utf-8') as f:
        weight_map = json.load(f)['weight_map']
    except (OSError, json.JSONDecodeError, KeyError) as e:
      raise WeightLoadError(f'{index}: invalid index file ({e}).') from e
    files = sorted(set(weight_map.values()))
    missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
    if missing:
      raise WeightLoadError(f'{index}: lists files that are missing from {folder}: {missing}.')
    return [os.path.join(folder, name) for name in files]
  files = sorted(name for name in os.listdir(folder) if name.endswith('.safetensors'))
  if not files:
    raise WeightLoadError(
        f'{folder}: no *.safetensors files found. Convert .bin checkpoints to safetensors first; '
        'pickle files are not loaded.')
  return [os.path.join(folder, name) for name in files]


def iter_safetensors(paths: list[str]) -> Iterator[tuple[str, callable]]:
  """Yield `(name, read_fn)` for every tensor, opening one file at a time.

  Tensors are read as numpy arrays; bfloat16 ones, which numpy's reader rejects, go through the
  flax reader and come back as numpy arrays of `ml_dtypes.bfloat16`.
  """
  for path in paths:
    try:
      handle = safe_open(path, framework='numpy')
      names = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as e:
      raise WeightLoadError(f'{path}: not a readable safetensors file ({e}).') from e
    for name in names:
      yield name, _reader(handle, path, name)


def _reader(handle, path: str, name: str):
  def read() -> np.ndarray:
    try:
      if handle.get_slice(name).get_dtype() == 'BF16':
        return np.asarray(safe_open(path, framework='flax').get_tensor(name))
      return handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
      raise WeightLoadError(f'{path}: tensor {name!r} could not be read ({e}).') from e
  return read


def load_hf_folder(folder: str, *, place=None, **config_overrides) -> Llama:
  """Build a `Llama` from a Hugging Face folder, reading tensors one by one."""
  hf = read_hf_config(folder)
  config = LlamaConfig.from_hf_dict(hf, **config_overrides)
  paths = safetensors_files(folder)
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  fill_llama(model, iter_safetensors(paths), source=folder, place=place)
  return model
