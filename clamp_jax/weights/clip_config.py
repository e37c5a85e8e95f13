"""Architecture of CLIP checkpoints: config.json of Hugging Face CLIP folders, and the checks of a
requested `ViTConfig` against a checkpoint's."""

from __future__ import annotations

import dataclasses
import json
import os

from clamp_jax.models.vit import ACTIVATIONS, ViTConfig
from clamp_jax.weights.assign import WeightLoadError

# OpenAI CLIP's per-channel pixel statistics (RGB, images scaled to [0, 1]), the same values as
# `clamp_jax.data.pipeline.CLIP_MEAN` and `CLIP_STD`.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers' `CLIPVisionConfig` and `CLIPTextConfig` defaults (transformers 5.25), for fields
# that a config.json leaves out.
HF_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
    num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
    hidden_act='quick_gelu', layer_norm_eps=1e-5)
HF_TEXT_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
    num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
    hidden_act='quick_gelu', layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=49406,
    eos_token_id=49407)
# `CLIPConfig.projection_dim` default: the joint embedding size of a `CLIPModel`.
HF_PROJECTION_DIM = 512

# ViTConfig fields that set how the tower runs, not what it computes.
RUN_SETTINGS = ('dtype', 'param_dtype', 'remat', 'scan_layers', 'matmul')
# ViTConfig fields that a requested config must share with the checkpoint. `layer_norm_eps` is
# not among them: a Hugging Face config.json sets it, and open_clip uses PyTorch's 1e-5.
ARCHITECTURE_FIELDS = ('image_size', 'patch_size', 'width', 'layers', 'heads', 'mlp_dim',
                       'embed_dim', 'act', 'pool')


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
  """Input the tower expects: square images of `image_size` pixels, scaled to [0, 1], then
  normalised per RGB channel as `(pixels - mean) / std`."""

  image_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


def read_clip_config(folder: str) -> dict:
  """Read config.json of a Hugging Face CLIP folder. Problems raise `WeightLoadError` naming the
  file."""
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise WeightLoadError(f'{folder}: no config.json found; expected a Hugging Face CLIP folder '
                          'with config.json and *.safetensors files.')
  try:
    with open(path, encoding='utf-8') as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise WeightLoadError(f'{path}: invalid JSON ({e}).') from e
  if hf.get('model_type') not in ('clip', 'clip_vision_model'):
    raise WeightLoadError(
        f"{path}: model_type={hf.get('model_type')!r} is not a CLIP model; expected 'clip' or "
        "'clip_vision_model'.")
  return hf


def sub_config(hf: dict, name: str, defaults: dict) -> dict:
  """Return the effective `vision_config` or `text_config` of a `CLIPModel` config.

  As transformers does, a legacy `<name>_dict` entry (on top of the defaults) replaces the values
  of `<name>`.
  """
  legacy = hf.get(f'{name}_dict')
  if legacy is not None:
    return {**(hf.get(name) or {}), **defaults, **legacy}
  return {**defaults, **(hf.get(name) or {})}


def hf_vision_fields(hf: dict) -> dict:
  """Return the vision config of a CLIP config.json (full model or vision only), with
  `projection_dim` set to the size of `visual_projection`'s output."""
  if hf.get('model_type') == 'clip':
    vision = sub_config(hf, 'vision_config', HF_VISION_DEFAULTS)
    vision['projection_dim'] = hf.get('projection_dim', HF_PROJECTION_DIM)
    return vision
  return {**HF_VISION_DEFAULTS, **hf}


def hf_vision_config(hf: dict, *, has_projection: bool, source: str, **settings) -> ViTConfig:
  """Translate a CLIP config.json into a `ViTConfig`, with `settings` from `RUN_SETTINGS`.

  Without a projection (`CLIPVisionModel`) the tower's projection is the identity, so it returns
  the pooled class token after `post_layernorm`, and `embed_dim` equals the width.
  """
  vision = hf_vision_fields(hf)
  check_activation(vision['hidden_act'], source)
  if vision['num_channels'] != 3:
    raise WeightLoadError(f"{source}: num_channels={vision['num_channels']}; only RGB (3) "
                          'images are supported.')
  image_size = square_size(vision['image_size'], 'image_size', source)
  patch_size = square_size(vision['patch_size'], 'patch_size', source)
  width = vision['hidden_size']
  try:
    config = ViTConfig(
        image_size=image_size, patch_size=patch_size, width=width,
        layers=vision['num_hidden_layers'], heads=vision['num_attention_heads'],
        mlp_ratio=vision['intermediate_size'] / width,
        embed_dim=vision['projection_dim'] if has_projection else width,
        act=vision['hidden_act'], layer_norm_eps=vision['layer_norm_eps'], pool='token',
        **settings)
  except ValueError as e:
    raise WeightLoadError(f'{source}: invalid vision config ({e}).') from e
  if config.mlp_dim != vision['intermediate_size']:
    raise WeightLoadError(f"{source}: intermediate_size={vision['intermediate_size']} is not "
                          f'representable as a multiple of hidden_size={width}.')
  return config


def check_activation(name: str, source: str) -> None:
  if name not in ACTIVATIONS:
    raise WeightLoadError(f'{source}: hidden_act={name!r} is not supported; the towers '
                          f'implement {ACTIVATIONS}.')


def square_size(value, key: str, source: str) -> int:
  """Return an int size as is, or the side of a square `[height, width]` size."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise WeightLoadError(f'{source}: {key}={value} is not square; only square sizes are '
                            'supported.')
    value = value[0]
  return int(value)


def hf_preprocessing(folder: str, hf: dict) -> ImagePreprocessing:
  """Return the image size from config.json, and the mean and std from preprocessor_config.json
  when the folder has one, else OpenAI CLIP's."""
  image_size = square_size(hf_vision_fields(hf)['image_size'], 'image_size', folder)
  mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
  path = os.path.join(folder, 'preprocessor_config.json')
  if os.path.isfile(path):
    try:
      with open(path, encoding='utf-8') as f:
        processor = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise WeightLoadError(f'{path}: invalid JSON ({e}).') from e
    mean = tuple(float(x) for x in processor.get('image_mean', mean))
    std = tuple(float(x) for x in processor.get('image_std', std))
    if len(mean) != 3 or len(std) != 3:
      raise WeightLoadError(f'{path}: image_mean and image_std need 3 values (RGB), got '
                            f'{list(mean)} and {list(std)}.')
  return ImagePreprocessing(image_size, mean, std)


def architecture_differences(requested: ViTConfig,
                             found: ViTConfig) -> list[tuple[str, object, object]]:
  """`(field, requested value, checkpoint value)` for each architecture field that differs."""
  return [(field, getattr(requested, field), getattr(found, field))
          for field in ARCHITECTURE_FIELDS if getattr(requested, field) != getattr(found, field)]


def raise_on_differences(requested: ViTConfig, found: ViTConfig, source: str) -> None:
  """Raise `WeightLoadError` listing each `ViTConfig` field where `requested` differs from the
  checkpoint's architecture."""
  differences = architecture_differences(requested, found)
  if differences:
    listed = ', '.join(f'{field}={ours!r} (checkpoint: {theirs!r})'
                       for field, ours, theirs in differences)
    raise WeightLoadError(f'{source}: the requested ViTConfig differs from the checkpoint: '
                          f'{listed}.')
