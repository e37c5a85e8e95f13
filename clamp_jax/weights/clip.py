"""Pretrained CLIP image towers: Hugging Face CLIP folders and open_clip safetensors files.

A Hugging Face folder (`CLIPModel`, `CLIPVisionModelWithProjection` or `CLIPVisionModel`) has a
config.json, which gives the architecture. An open_clip checkpoint is a bare state dict, so its
architecture comes from a `ViTConfig`, and every tensor's shape is checked against it. Both are
read tensor by tensor into an abstract `VisionTransformer`, and a `place(variable, array)`
callback (see `clamp_jax.parallel.sharded_placer`) can put each tensor straight into its shards.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from clamp_jax.models.vit import ViTConfig, VisionTransformer
from clamp_jax.weights.assign import WeightLoadError
from clamp_jax.weights.clip_config import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RUN_SETTINGS,
                                           ImagePreprocessing, hf_preprocessing,
                                           hf_vision_config, raise_on_differences,
                                           read_clip_config)
from clamp_jax.weights.hf_folder import safetensors_files
from clamp_jax.weights.llm import resolve_checkpoint
from clamp_jax.weights.tensor_map import (Placer, TensorSpec, conv_to_hwio, fill_from_map,
                                          iter_file_tensors, layer_norm_specs, linear_specs,
                                          require_filled, row_block, transposed, unchanged)

HF_PREFIX = 'vision_model.'
# Top-level names of a `CLIPVisionModel` saved by transformers 5, which drops `vision_model.`.
_HF_UNPREFIXED = ('embeddings.', 'encoder.', 'pre_layrnorm.', 'post_layernorm.')
OPEN_CLIP_PREFIX = 'visual.'


def tensor_shapes(paths: list[str]) -> dict[str, tuple[int, ...]]:
  """Shape of every tensor in the safetensors files, read from the headers only."""
  shapes = {}
  for path in paths:
    try:
      with safe_open(path, framework='numpy') as handle:
        for name in handle.keys():
          shapes[name] = tuple(handle.get_slice(name).get_shape())
    except (SafetensorError, OSError, ValueError) as e:
      raise WeightLoadError(f'{path}: not a readable safetensors file ({e}).') from e
  return shapes


def hf_encoder_layer_specs(name: str, path: tuple, width: int,
                           mlp_dim: int) -> dict[str, TensorSpec]:
  """Tensors of one transformers `CLIPEncoderLayer` named `NAME.*`, for our `EncoderBlock`."""
  specs = {}
  specs.update(layer_norm_specs(f'{name}.layer_norm1', (*path, 'layer_norm1'), width))
  specs.update(layer_norm_specs(f'{name}.layer_norm2', (*path, 'layer_norm2'), width))
  for projection in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
    specs.update(linear_specs(f'{name}.self_attn.{projection}',
                              (*path, 'self_attn', projection), width, width))
  specs.update(linear_specs(f'{name}.mlp.fc1', (*path, 'mlp', 'fc1'), width, mlp_dim))
  specs.update(linear_specs(f'{name}.mlp.fc2', (*path, 'mlp', 'fc2'), mlp_dim, width))
  return specs


# ----------------------------------------------------------------------------------------------
# Hugging Face CLIP folders
# ----------------------------------------------------------------------------------------------


def hf_has_projection(hf: dict, names) -> bool:
  """Return whether the folder's model ends in `visual_projection`.

  `CLIPModel` and `CLIPVisionModelWithProjection` always do, so a missing tensor is an error
  there. Otherwise the tensor's presence decides.
  """
  architectures = hf.get('architectures') or []
  return (hf.get('model_type') == 'clip' or 'CLIPVisionModelWithProjection' in architectures
          or 'visual_projection.weight' in names)


def hf_vision_table(config: ViTConfig, *, has_projection: bool) -> dict[str, TensorSpec]:
  """Map Hugging Face CLIP vision tensor names to shapes and `VisionTransformer` parameters."""
  width, patch = config.width, config.patch_size
  table = {
      'embeddings.patch_embedding.weight': TensorSpec(
          (width, 3, patch, patch), ((('patch_embedding',), conv_to_hwio),)),
      'embeddings.class_embedding': TensorSpec((width,), ((('class_embedding',), unchanged),)),
      'embeddings.position_embedding.weight': TensorSpec(
          (config.num_tokens, width), ((('position_embedding',), unchanged),)),
  }
  table.update(layer_norm_specs('pre_layrnorm', ('ln_pre',), width))
  for index in range(config.layers):
    table.update(hf_encoder_layer_specs(f'encoder.layers.{index}', ('layers', index), width,
                                        config.mlp_dim))
  table.update(layer_norm_specs('post_layernorm', ('ln_post',), width))
  table = {HF_PREFIX + name: spec for name, spec in table.items()}
  if has_projection:
    table['visual_projection.weight'] = TensorSpec(
        (config.embed_dim, width), ((('projection', 'kernel'), transposed),))
  return table


def hf_vision_key(name: str) -> str | None:
  """Return the table key of a tensor in a Hugging Face CLIP folder, or None for a tensor that
  the image tower skips."""
  if name.startswith(('text_model.', 'text_projection.', 'logit_scale')):
    return None
  if name.endswith('embeddings.position_ids'):
    return None  # Older checkpoints store this buffer, and the model computes it instead.
  if name.startswith(_HF_UNPREFIXED):
    return HF_PREFIX + name
  return name


def load_hf_clip_vision(folder: str, config: ViTConfig | None = None, *,
                        place: Placer | None = None, **settings) -> VisionTransformer:
  """Load the image tower of a Hugging Face CLIP folder, reading tensors one by one.

  The architecture comes from config.json. `config`, when given, must agree with it on every
  field of `clip_config.ARCHITECTURE_FIELDS`, and its run settings (`RUN_SETTINGS`) apply;
  `settings` override single run settings.
  """
  hf = read_clip_config(folder)
  paths = safetensors_files(folder)
  has_projection = hf_has_projection(hf, tensor_shapes(paths))
  if config is not None:
    settings = {**{key: getattr(config, key) for key in RUN_SETTINGS}, **settings}
  found = hf_vision_config(hf, has_projection=has_projection, source=folder, **settings)
  if config is not None:
    raise_on_differences(config, found, folder)
  model = nnx.eval_shape(lambda: VisionTransformer(found, rngs=nnx.Rngs(0)))
  fill_from_map(model, iter_file_tensors(paths),
                hf_vision_table(found, has_projection=has_projection), source=folder,
                rename=hf_vision_key, place=place)
  if not has_projection:
    logging.info('%s has no visual_projection; the image tower returns the pooled class token.',
                 folder)
    kernel = model.projection.kernel
    identity = np.eye(found.width, dtype=kernel.dtype)
    kernel.set_value(place(kernel, identity) if place else np.asarray(identity))
  require_filled(model, folder)
  return model


# ----------------------------------------------------------------------------------------------
# open_clip state dicts
# ----------------------------------------------------------------------------------------------


def open_clip_key(name: str) -> str | None:
  """Return the table key of an open_clip tensor, or None outside the image tower (text tower,
  logit scale).

  The `module.` prefix of checkpoints saved from `DistributedDataParallel` is dropped.
  """
  name = name.removeprefix('module.')
  return name if name.startswith(OPEN_CLIP_PREFIX) else None


def open_clip_table(config: ViTConfig) -> dict[str, TensorSpec]:
  """Map open_clip `VisionTransformer` tensor names to shapes and our parameters.

  Each block's attention is a PyTorch `MultiheadAttention` with q, k and v fused into
  `in_proj_weight` `[3 * width, width]`, in that order, which splits into three projections.
  """
  width, patch, mlp_dim = config.width, config.patch_size, config.mlp_dim
  table = {
      'conv1.weight': TensorSpec((width, 3, patch, patch),
                                 ((('patch_embedding',), conv_to_hwio),)),
      'class_embedding': TensorSpec((width,), ((('class_embedding',), unchanged),)),
      'positional_embedding': TensorSpec((config.num_tokens, width),
                                         ((('position_embedding',), unchanged),)),
  }
  table.update(layer_norm_specs('ln_pre', ('ln_pre',), width))
  for index in range(config.layers):
    name, path = f'transformer.resblocks.{index}', ('layers', index)
    attention = (*path, 'self_attn')
    table.update(layer_norm_specs(f'{name}.ln_1', (*path, 'layer_norm1'), width))
    table.update(layer_norm_specs(f'{name}.ln_2', (*path, 'layer_norm2'), width))
    projections = ('q_proj', 'k_proj', 'v_proj')
    table[f'{name}.attn.in_proj_weight'] = TensorSpec((3 * width, width), tuple(
        ((*attention, projection, 'kernel'), row_block(i, 3, transposed))
        for i, projection in enumerate(projections)))
    table[f'{name}.attn.in_proj_bias'] = TensorSpec((3 * width,), tuple(
        ((*attention, projection, 'bias'), row_block(i, 3))
        for i, projection in enumerate(projections)))
    table.update(linear_specs(f'{name}.attn.out_proj', (*attention, 'out_proj'), width, width))
    table.update(linear_specs(f'{name}.mlp.c_fc', (*path, 'mlp', 'fc1'), width, mlp_dim))
    table.update(linear_specs(f'{name}.mlp.c_proj', (*path, 'mlp', 'fc2'), mlp_dim, width))
  table.update(layer_norm_specs('ln_post', ('ln_post',), width))
  # open_clip applies `proj` as `x @ proj`, so it is already [width, embed].
  table['proj'] = TensorSpec((width, config.embed_dim), ((('projection', 'kernel'), unchanged),))
  return {OPEN_CLIP_PREFIX + name: spec for name, spec in table.items()}


def load_open_clip_vision(path: str, config: ViTConfig, *, place: Placer | None = None,
                          **settings) -> VisionTransformer:
  """Load the image tower of an open_clip ViT checkpoint (one `.safetensors` state dict).

  The file records shapes but no config: `config` gives the architecture, and each tensor's
  shape is checked against it. NOTE: the shapes do not show the head count or the activation.
  OpenAI-pretrained weights use QuickGELU, most LAION-trained ones GELU, and a wrong `act` or
  `heads` gives wrong embeddings without an error.
  """
  if config.pool != 'token':
    raise WeightLoadError(f"{path}: pool={config.pool!r} is not supported for open_clip "
                          "checkpoints; use pool='token'.")
  if settings:
    config = dataclasses.replace(config, **settings)
  model = nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0)))
  fill_from_map(model, iter_file_tensors([path]), open_clip_table(config), source=path,
                rename=open_clip_key, place=place)
  require_filled(model, path)
  return model


def open_clip_preprocessing(path: str) -> ImagePreprocessing:
  """Image size from the position embedding and patch shapes, with OpenAI CLIP's mean and std.

  NOTE: open_clip uses OpenAI's statistics for its ViT models, but a few pretrained tags use
  others, and the file does not record them.
  """
  shapes = {name.removeprefix('module.'): shape for name, shape in tensor_shapes([path]).items()}
  for name in ('visual.positional_embedding', 'visual.conv1.weight'):
    if name not in shapes:
      raise WeightLoadError(f'{path}: missing tensor {name!r}.')
  tokens = shapes['visual.positional_embedding'][0]
  patch = shapes['visual.conv1.weight'][-1]
  grid = int(round((tokens - 1) ** 0.5))
  if grid * grid != tokens - 1:
    raise WeightLoadError(f"{path}: tensor 'visual.positional_embedding' has {tokens} rows, "
                          'which is not a class token plus a square grid of patches.')
  return ImagePreprocessing(grid * patch, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


# ----------------------------------------------------------------------------------------------
# Either kind
# ----------------------------------------------------------------------------------------------


def resolve_image_tower(path_or_id: str) -> tuple[str, str]:
  """Return `(local path, kind)`: kind 'hf' for a folder, 'open_clip' for a `.safetensors` file.

  A Hugging Face hub id resolves only from the local hub cache, and nothing is downloaded.
  """
  path = resolve_checkpoint(path_or_id)
  if os.path.isdir(path):
    return path, 'hf'
  if path.endswith('.safetensors'):
    return path, 'open_clip'
  raise WeightLoadError(f'{path}: not an image tower checkpoint; expected a Hugging Face CLIP '
                        'folder or an open_clip .safetensors file.')


def load_image_tower(path: str, config: ViTConfig | None = None, *,
                     place: Placer | None = None, **settings) -> VisionTransformer:
  """Load a pretrained CLIP image tower from a Hugging Face folder or an open_clip file.

  The returned `VisionTransformer` maps float32 images `[batch, height, width, 3]`, normalised
  with the mean and std that `image_preprocessing(path)` returns, to projected embeddings
  `[batch, embed_dim]`, not L2-normalised. A folder's config.json gives the architecture, and `config`, when given, must
  agree with it. An open_clip file needs `config`. `settings` set `dtype`, `param_dtype`,
  `remat` or `scan_layers`. `place(variable, array)` puts each tensor on devices as it is read.
  """
  unknown = sorted(set(settings) - set(RUN_SETTINGS))
  if unknown:
    raise TypeError(f'load_image_tower got unexpected settings {unknown}; allowed: '
                    f'{RUN_SETTINGS}.')
  local, kind = resolve_image_tower(path)
  if kind == 'hf':
    return load_hf_clip_vision(local, config, place=place, **settings)
  if config is None:
    raise WeightLoadError(f'{local}: an open_clip checkpoint has no config; pass its '
                          'architecture as config=ViTConfig(...).')
  return load_open_clip_vision(local, config, place=place, **settings)


def checkpoint_architecture(path: str, **settings) -> ViTConfig | None:
  """Return the `ViTConfig` that a Hugging Face folder's config.json describes, without reading
  weights, or None for an open_clip file, which records no config."""
  local, kind = resolve_image_tower(path)
  if kind != 'hf':
    return None
  hf = read_clip_config(local)
  has_projection = hf_has_projection(hf, tensor_shapes(safetensors_files(local)))
  return hf_vision_config(hf, has_projection=has_projection, source=local, **settings)


def image_preprocessing(path: str) -> ImagePreprocessing:
  """Image size, mean and std that the checkpoint's image tower expects (see `load_image_tower`).

  The input is an RGB image resized (bicubic) so that its shorter side is `image_size`, center
  cropped to a square, scaled to [0, 1] and normalised with `mean` and `std`, as
  `clamp_jax.data.images.clip_preprocess` does with OpenAI's statistics.
  """
  local, kind = resolve_image_tower(path)
  if kind == 'hf':
    return hf_preprocessing(local, read_clip_config(local))
  return open_clip_preprocessing(local)
