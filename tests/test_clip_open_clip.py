"""open_clip ViT checkpoints (`visual.*` state dicts in safetensors).

open-clip-torch 3.3.0 cannot be imported here: it needs torchvision, whose only available build
requires a newer torch than the pinned 2.13.0. So each checkpoint is built from a tiny random
transformers `CLIPVisionModelWithProjection`, renamed to open_clip's layout with q, k and v fused
into `in_proj`, and our output is compared with the transformers model's.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

import clamp_jax
from clamp_jax.models.vit import ViTConfig
from clamp_jax.weights import WeightLoadError
from clamp_jax.weights.clip_config import OPENAI_CLIP_MEAN

WIDTH, PATCH, EMBED, LAYERS = 32, 4, 8, 2
LAYER_NAMES = {'layer_norm1': 'ln_1', 'layer_norm2': 'ln_2', 'self_attn.out_proj': 'attn.out_proj',
               'mlp.fc1': 'mlp.c_fc', 'mlp.fc2': 'mlp.c_proj'}


def reference_model(act: str, image_size: int, seed: int = 0):
  torch.manual_seed(seed)
  config = transformers.CLIPVisionConfig(
      hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
      num_attention_heads=4, image_size=image_size, patch_size=PATCH, projection_dim=EMBED,
      hidden_act=act)
  model = transformers.CLIPVisionModelWithProjection(config).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
  return model


def open_clip_state_dict(model) -> dict[str, np.ndarray]:
  """Rename a transformers CLIP vision state dict to open_clip's `visual.*` layout."""
  hf = {name: tensor.detach().numpy().copy() for name, tensor in model.state_dict().items()}
  prefix = 'vision_model.'
  out = {
      'visual.conv1.weight': hf[prefix + 'embeddings.patch_embedding.weight'],
      'visual.class_embedding': hf[prefix + 'embeddings.class_embedding'],
      'visual.positional_embedding': hf[prefix + 'embeddings.position_embedding.weight'],
      'visual.proj': np.ascontiguousarray(hf['visual_projection.weight'].T),
  }
  for ours, theirs in (('ln_pre', 'pre_layrnorm'), ('ln_post', 'post_layernorm')):
    out[f'visual.{ours}.weight'] = hf[f'{prefix}{theirs}.weight']
    out[f'visual.{ours}.bias'] = hf[f'{prefix}{theirs}.bias']
  for index in range(LAYERS):
    source = f'{prefix}encoder.layers.{index}.'
    target = f'visual.transformer.resblocks.{index}.'
    for kind in ('weight', 'bias'):
      out[f'{target}attn.in_proj_{kind}'] = np.concatenate(
          [hf[f'{source}self_attn.{p}_proj.{kind}'] for p in ('q', 'k', 'v')])
      for hf_name, open_clip_name in LAYER_NAMES.items():
        out[f'{target}{open_clip_name}.{kind}'] = hf[f'{source}{hf_name}.{kind}']
  return out


def text_tower_tensors() -> dict[str, np.ndarray]:
  """A few open_clip text-tower tensors, which the image tower loader skips."""
  rng = np.random.default_rng(0)
  return {
      'token_embedding.weight': rng.normal(size=(40, 16)).astype(np.float32),
      'positional_embedding': rng.normal(size=(8, 16)).astype(np.float32),
      'transformer.resblocks.0.attn.in_proj_weight': rng.normal(size=(48, 16)).astype(np.float32),
      'text_projection': rng.normal(size=(16, EMBED)).astype(np.float32),
      'logit_scale': np.array(4.6, np.float32),
  }


def architecture(act: str, image_size: int, **overrides) -> ViTConfig:
  fields = dict(image_size=image_size, patch_size=PATCH, width=WIDTH, layers=LAYERS, heads=4,
                mlp_ratio=4.0, embed_dim=EMBED, act=act)
  return ViTConfig(**{**fields, **overrides})


def save(path, tensors: dict[str, np.ndarray]) -> str:
  save_file(tensors, str(path))
  return str(path)


def images(seed: int, size: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)


def expected_embeddings(model, pixels: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).image_embeds.numpy()


@pytest.mark.parametrize('act, image_size', [('quick_gelu', 16), ('gelu', 28)])
def test_open_clip_layout_matches_transformers(tmp_path, act, image_size):
  model = reference_model(act, image_size)
  path = save(tmp_path / 'open_clip_model.safetensors',
              {**open_clip_state_dict(model), **text_tower_tensors()})
  tower = clamp_jax.load_image_tower(path, architecture(act, image_size))
  pixels = images(1, image_size)
  np.testing.assert_allclose(np.asarray(tower(jnp.asarray(pixels))),
                             expected_embeddings(model, pixels), rtol=0, atol=1e-4)


def test_module_prefix_accepted(tmp_path):
  model = reference_model('quick_gelu', 16)
  tensors = {f'module.{name}': value for name, value in open_clip_state_dict(model).items()}
  path = save(tmp_path / 'ddp.safetensors', tensors)
  tower = clamp_jax.load_image_tower(path, architecture('quick_gelu', 16))
  pixels = images(2, 16)
  np.testing.assert_allclose(np.asarray(tower(jnp.asarray(pixels))),
                             expected_embeddings(model, pixels), rtol=0, atol=1e-4)


def test_preprocessing_from_shapes(tmp_path):
  path = save(tmp_path / 'model.safetensors',
              open_clip_state_dict(reference_model('quick_gelu', 28)))
  preprocessing = clamp_jax.image_preprocessing(path)
  assert preprocessing.image_size == 28
  assert preprocessing.mean == OPENAI_CLIP_MEAN


def test_config_required(tmp_path):
  path = save(tmp_path / 'model.safetensors',
              open_clip_state_dict(reference_model('quick_gelu', 16)))
  with pytest.raises(WeightLoadError, match='an open_clip checkpoint has no config'):
    clamp_jax.load_image_tower(path)


def test_missing_tensor_one_line(tmp_path):
  tensors = open_clip_state_dict(reference_model('quick_gelu', 16))
  del tensors['visual.transformer.resblocks.1.attn.in_proj_bias']
  path = save(tmp_path / 'model.safetensors', tensors)
  with pytest.raises(WeightLoadError) as error:
    clamp_jax.load_image_tower(path, architecture('quick_gelu', 16))
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith(path)
  assert "missing tensor 'visual.transformer.resblocks.1.attn.in_proj_bias'" in message


def test_wrong_image_size_names_position_embedding(tmp_path):
  path = save(tmp_path / 'model.safetensors',
              open_clip_state_dict(reference_model('quick_gelu', 16)))
  with pytest.raises(WeightLoadError) as error:
    clamp_jax.load_image_tower(path, architecture('quick_gelu', 28))
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith(path)
  assert "tensor 'visual.positional_embedding' has shape (17, 32), expected (50, 32)" in message


def test_wrong_width_names_tensor(tmp_path):
  path = save(tmp_path / 'model.safetensors',
              open_clip_state_dict(reference_model('quick_gelu', 16)))
  with pytest.raises(WeightLoadError) as error:
    clamp_jax.load_image_tower(path, architecture('quick_gelu', 16, width=64, heads=4))
  message = str(error.value)
  assert '\n' not in message
  assert "tensor 'visual.class_embedding' has shape (32,), expected (64,)" in message


def test_extra_layer_rejected(tmp_path):
  path = save(tmp_path / 'model.safetensors',
              open_clip_state_dict(reference_model('quick_gelu', 16)))
  with pytest.raises(WeightLoadError, match="unexpected tensor 'visual.transformer.resblocks.1"):
    clamp_jax.load_image_tower(path, architecture('quick_gelu', 16, layers=1))


def test_unsupported_block_variant_rejected(tmp_path):
  """Layer scale (`ls_1.gamma`) has no parameter here, so it fails instead of being dropped."""
  tensors = open_clip_state_dict(reference_model('quick_gelu', 16))
  tensors['visual.transformer.resblocks.0.ls_1.gamma'] = np.ones(WIDTH, np.float32)
  path = save(tmp_path / 'model.safetensors', tensors)
  with pytest.raises(WeightLoadError, match="unexpected tensor 'visual.transformer.resblocks.0."
                                            "ls_1.gamma'"):
    clamp_jax.load_image_tower(path, architecture('quick_gelu', 16))


def test_average_pooling_rejected(tmp_path):
  path = save(tmp_path / 'model.safetensors',
              open_clip_state_dict(reference_model('quick_gelu', 16)))
  config = dataclasses.replace(architecture('quick_gelu', 16), pool='gap')
  with pytest.raises(WeightLoadError, match="pool='gap' is not supported"):
    clamp_jax.load_image_tower(path, config)
