"""Load a frozen `CLIPTeacher` and its tokenizer from a Hugging Face `CLIPModel` folder.

Nothing is downloaded: the tokenizer loads with `local_files_only=True`, and a hub id resolves
only from the local hub cache. Weights come from safetensors only.
"""

from __future__ import annotations

import math
import os

import numpy as np
from flax import nnx

from clamp_jax.models.clip_text import CLIPTeacher, CLIPTextConfig, CLIPTextTransformer
from clamp_jax.weights.assign import WeightLoadError
from clamp_jax.weights.clip import hf_encoder_layer_specs, load_hf_clip_vision
from clamp_jax.weights.clip_config import (HF_PROJECTION_DIM, HF_TEXT_DEFAULTS, check_activation,
                                           read_clip_config, sub_config)
from clamp_jax.weights.hf_folder import iter_safetensors, safetensors_files
from clamp_jax.weights.llm import resolve_checkpoint
from clamp_jax.weights.tensor_map import (Placer, TensorSpec, fill_from_map, iter_file_tensors,
                                          layer_norm_specs, require_filled, transposed,
                                          unchanged)

TEXT_PREFIX = 'text_model.'
LOGIT_SCALE = 'logit_scale'


def hf_text_config(hf: dict, *, source: str, **settings) -> CLIPTextConfig:
  """Translate the text part of a `CLIPModel` config.json into a `CLIPTextConfig`."""
  text = sub_config(hf, 'text_config', HF_TEXT_DEFAULTS)
  check_activation(text['hidden_act'], source)
  eos_token_id = text['eos_token_id']
  if not isinstance(eos_token_id, int):
    raise WeightLoadError(f'{source}: text_config.eos_token_id={eos_token_id!r}; a single int '
                          'is supported.')
  try:
    return CLIPTextConfig(
        vocab_size=text['vocab_size'], max_length=text['max_position_embeddings'],
        width=text['hidden_size'], layers=text['num_hidden_layers'],
        heads=text['num_attention_heads'], mlp_dim=text['intermediate_size'],
        embed_dim=hf.get('projection_dim', HF_PROJECTION_DIM), act=text['hidden_act'],
        layer_norm_eps=text['layer_norm_eps'], eos_token_id=eos_token_id, **settings)
  except ValueError as e:
    raise WeightLoadError(f'{source}: invalid text config ({e}).') from e


def hf_text_table(config: CLIPTextConfig) -> dict[str, TensorSpec]:
  """Map transformers `CLIPModel` text tensor names to shapes and `CLIPTextTransformer`
  parameters."""
  width = config.width
  table = {
      'embeddings.token_embedding.weight': TensorSpec(
          (config.vocab_size, width), ((('token_embedding', 'embedding'), unchanged),)),
      'embeddings.position_embedding.weight': TensorSpec(
          (config.max_length, width), ((('position_embedding',), unchanged),)),
  }
  for index in range(config.layers):
    table.update(hf_encoder_layer_specs(f'encoder.layers.{index}', ('layers', index), width,
                                        config.mlp_dim))
  table.update(layer_norm_specs('final_layer_norm', ('final_layer_norm',), width))
  table = {TEXT_PREFIX + name: spec for name, spec in table.items()}
  table['text_projection.weight'] = TensorSpec(
      (config.embed_dim, width), ((('projection', 'kernel'), transposed),))
  return table


def hf_text_key(name: str) -> str | None:
  """Return the table key of a `CLIPModel` tensor, or None for the image tower, buffers and
  `logit_scale`."""
  if name.startswith(('vision_model.', 'visual_projection.')) or name == LOGIT_SCALE:
    return None
  if name.endswith('embeddings.position_ids'):
    return None
  return name


def read_logit_scale(paths: list[str], source: str) -> float:
  """Return `exp` of the stored `logit_scale` tensor."""
  for name, read in iter_safetensors(paths):
    if name == LOGIT_SCALE:
      value = np.asarray(read(), dtype=np.float64)
      if value.size != 1:
        raise WeightLoadError(f'{source}: tensor {LOGIT_SCALE!r} has shape {value.shape}, '
                              'expected a scalar.')
      return math.exp(float(value.reshape(())))
  raise WeightLoadError(f'{source}: missing tensor {LOGIT_SCALE!r}.')


# Files of a CLIP tokenizer: `tokenizer.json`, or the BPE pair `vocab.json` and `merges.txt`.
TOKENIZER_FILES = ('tokenizer.json', 'vocab.json')


def load_clip_tokenizer(folder: str, vocab_size: int):
  """Load the folder's tokenizer with transformers, from local files only (no remote code).

  transformers 5 builds a CLIP tokenizer with a placeholder vocabulary when the files are
  missing, so their presence is checked first, and the tokenizer's ids must fit `vocab_size`.
  """
  import transformers  # Imported here: the image tower loaders do not need it.

  if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
    raise WeightLoadError(f'{folder}: no usable tokenizer files; expected tokenizer.json, or '
                          'vocab.json and merges.txt.')
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
  except (OSError, ValueError) as e:
    raise WeightLoadError(f'{folder}: no usable tokenizer files ({e}).') from e
  if len(tokenizer) > vocab_size:
    raise WeightLoadError(f'{folder}: the tokenizer has {len(tokenizer)} tokens, more than the '
                          f'text tower vocabulary of {vocab_size}.')
  return tokenizer


def tokenize(tokenizer, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Tokenize `texts` into ids and mask, int32 `[len(texts), length]`: padded, and truncated
  with the end-of-text token kept."""
  encoded = tokenizer(list(texts), padding='max_length', truncation=True, max_length=length,
                      return_tensors='np')
  return (encoded['input_ids'].astype(np.int32), encoded['attention_mask'].astype(np.int32))


def load_clip_teacher(path: str, *, place: Placer | None = None,
                      **settings) -> tuple[CLIPTeacher, object]:
  """Load `(teacher, tokenizer)` from a Hugging Face `CLIPModel` folder or a cached hub id.

  `settings` (`dtype`, `param_dtype`, `remat`, `scan_layers`) apply to both towers. Text for the
  teacher goes through `tokenize(tokenizer, texts, teacher.text_encoder.config.max_length)`.
  """
  folder = resolve_checkpoint(path)
  hf = read_clip_config(folder)
  if hf.get('model_type') != 'clip':
    raise WeightLoadError(f"{folder}: model_type={hf.get('model_type')!r}; the teacher needs a "
                          "full CLIPModel folder (model_type 'clip') with both towers.")
  image_tower = load_hf_clip_vision(folder, place=place, **settings)
  text_config = hf_text_config(hf, source=folder, **settings)
  paths = safetensors_files(folder)
  text_encoder = nnx.eval_shape(lambda: CLIPTextTransformer(text_config, rngs=nnx.Rngs(0)))
  fill_from_map(text_encoder, iter_file_tensors(paths), hf_text_table(text_config),
                source=folder, rename=hf_text_key, place=place)
  require_filled(text_encoder, folder)
  teacher = CLIPTeacher(image_tower, text_encoder, read_logit_scale(paths, folder))
  return teacher, load_clip_tokenizer(folder, text_config.vocab_size)
