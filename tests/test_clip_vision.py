"""Pretrained image towers from Hugging Face CLIP folders, checked against transformers' PyTorch
CLIP on tiny random models saved with `save_pretrained` (safetensors)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import clamp_jax
from clamp_jax.models.vit import ViTConfig
from clamp_jax.weights import WeightLoadError
from clamp_jax.weights.clip_config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

WIDTH, PATCH, EMBED = 32, 4, 8


def perturb(model: torch.nn.Module, seed: int) -> None:
  """Add noise to every parameter, so LayerNorm scales, biases and embeddings all matter."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def vision_config(act: str, image_size: int, **overrides) -> transformers.CLIPVisionConfig:
  fields = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=2,
                num_attention_heads=4, image_size=image_size, patch_size=PATCH,
                projection_dim=EMBED, hidden_act=act, layer_norm_eps=1e-5)
  return transformers.CLIPVisionConfig(**{**fields, **overrides})


def save_vision_model(folder, act='quick_gelu', image_size=16, projection=True, seed=0,
                      **overrides):
  """Save a seeded random CLIP vision model to `folder`; returns the PyTorch model."""
  torch.manual_seed(seed)
  cls = (transformers.CLIPVisionModelWithProjection if projection
         else transformers.CLIPVisionModel)
  model = cls(vision_config(act, image_size, **overrides)).eval()
  perturb(model, seed)
  model.save_pretrained(folder)
  return model


def random_images(seed, size, batch=2):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def torch_pixels(images):
  return torch.from_numpy(images.transpose(0, 3, 1, 2))


@pytest.mark.parametrize('act, image_size, eps', [
    ('quick_gelu', 16, 1e-5),
    ('gelu', 16, 1e-5),
    ('quick_gelu', 28, 1e-6),
    ('gelu', 28, 1e-6),
])
def test_hf_folder_matches_transformers(tmp_path, act, image_size, eps):
  reference = save_vision_model(tmp_path, act, image_size, layer_norm_eps=eps)
  tower = clamp_jax.load_image_tower(str(tmp_path))
  assert tower.config.act == act
  assert tower.config.image_size == image_size
  assert tower.config.layer_norm_eps == eps
  images = random_images(1, image_size)
  with torch.no_grad():
    expected = reference(pixel_values=torch_pixels(images)).image_embeds.numpy()
  ours = np.asarray(tower(jnp.asarray(images)))
  assert ours.shape == (2, EMBED)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_vision_model_without_projection(tmp_path):
  """A `CLIPVisionModel` has no projection; the tower returns the pooled class token."""
  reference = save_vision_model(tmp_path, projection=False)
  tower = clamp_jax.load_image_tower(str(tmp_path))
  assert tower.config.embed_dim == WIDTH
  images = random_images(2, 16)
  with torch.no_grad():
    expected = reference(pixel_values=torch_pixels(images)).pooler_output.numpy()
  np.testing.assert_allclose(np.asarray(tower(jnp.asarray(images))), expected, rtol=0,
                             atol=1e-4)


def test_legacy_tensor_names(tmp_path):
  """Older `CLIPVisionModel` files prefix `vision_model.` and store `position_ids`."""
  reference = save_vision_model(tmp_path, projection=False)
  path = tmp_path / 'model.safetensors'
  tensors = {f'vision_model.{name}': value for name, value in load_file(str(path)).items()}
  tensors['vision_model.embeddings.position_ids'] = np.arange(17, dtype=np.int64)[None]
  save_file(tensors, str(path))
  tower = clamp_jax.load_image_tower(str(tmp_path))
  images = random_images(3, 16)
  with torch.no_grad():
    expected = reference(pixel_values=torch_pixels(images)).pooler_output.numpy()
  np.testing.assert_allclose(np.asarray(tower(jnp.asarray(images))), expected, rtol=0,
                             atol=1e-4)


def test_full_clip_model_folder(tmp_path):
  """A `CLIPModel` folder gives its image tower; the text tensors are skipped."""
  torch.manual_seed(0)
  text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              vocab_size=40, max_position_embeddings=8)
  config = transformers.CLIPConfig(text_config=text, vision_config=vision_config('gelu', 16),
                                   projection_dim=EMBED)
  reference = transformers.CLIPModel(config).eval()
  perturb(reference, 0)
  reference.save_pretrained(tmp_path)
  tower = clamp_jax.load_image_tower(str(tmp_path))
  images = random_images(4, 16)
  with torch.no_grad():
    expected = reference.get_image_features(pixel_values=torch_pixels(images)).pooler_output
  np.testing.assert_allclose(np.asarray(tower(jnp.asarray(images))), expected.numpy(), rtol=0,
                             atol=1e-4)


def test_preprocessing_defaults_to_openai(tmp_path):
  save_vision_model(tmp_path, image_size=28)
  preprocessing = clamp_jax.image_preprocessing(str(tmp_path))
  assert preprocessing.image_size == 28
  assert preprocessing.mean == OPENAI_CLIP_MEAN
  assert preprocessing.std == OPENAI_CLIP_STD


def test_preprocessing_reads_preprocessor_config(tmp_path):
  save_vision_model(tmp_path)
  with open(tmp_path / 'preprocessor_config.json', 'w') as f:
    json.dump({'image_mean': [0.5, 0.5, 0.5], 'image_std': [0.25, 0.5, 1.0],
               'crop_size': {'height': 16, 'width': 16}}, f)
  preprocessing = clamp_jax.image_preprocessing(str(tmp_path))
  assert preprocessing.image_size == 16
  assert preprocessing.mean == (0.5, 0.5, 0.5)
  assert preprocessing.std == (0.25, 0.5, 1.0)


def test_place_callback_gets_every_parameter(tmp_path):
  save_vision_model(tmp_path)
  placed = []

  def place(variable, array):
    placed.append((tuple(variable.shape), array.dtype))
    return jnp.asarray(array)

  tower = clamp_jax.load_image_tower(str(tmp_path), place=place)
  parameters = jax.tree.leaves(nnx.state(tower, nnx.Param))
  assert len(placed) == len(parameters)
  assert all(dtype == np.float32 for _, dtype in placed)


def test_bfloat16_storage(tmp_path):
  save_vision_model(tmp_path)
  tower = clamp_jax.load_image_tower(str(tmp_path), param_dtype='bfloat16')
  assert tower.layers[0].mlp.fc1.kernel[...].dtype == jnp.bfloat16
  assert tower(jnp.asarray(random_images(5, 16))).dtype == jnp.float32


def test_requested_config_must_match(tmp_path):
  save_vision_model(tmp_path)
  requested = ViTConfig(image_size=16, patch_size=PATCH, width=WIDTH, layers=3, heads=4,
                        embed_dim=EMBED, act='gelu')
  with pytest.raises(WeightLoadError) as error:
    clamp_jax.load_image_tower(str(tmp_path), requested)
  message = str(error.value)
  assert '\n' not in message
  assert 'layers=3 (checkpoint: 2)' in message
  assert "act='gelu' (checkpoint: 'quick_gelu')" in message


def test_missing_tensor_one_line(tmp_path):
  save_vision_model(tmp_path)
  path = tmp_path / 'model.safetensors'
  tensors = load_file(str(path))
  del tensors['vision_model.encoder.layers.1.mlp.fc2.bias']
  save_file(tensors, str(path))
  with pytest.raises(WeightLoadError) as error:
    clamp_jax.load_image_tower(str(tmp_path))
  message = str(error.value)
  assert '\n' not in message
  assert "missing tensor 'vision_model.encoder.layers.1.mlp.fc2.bias'" in message
  assert str(tmp_path) in message


def test_shape_mismatch_one_line(tmp_path):
  save_vision_model(tmp_path)
  with open(tmp_path / 'config.json') as f:
    config = json.load(f)
  config['intermediate_size'] = 3 * WIDTH
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(config, f)
  with pytest.raises(WeightLoadError) as error:
    clamp_jax.load_image_tower(str(tmp_path))
  message = str(error.value)
  assert '\n' not in message
  # safetensors stores tensors sorted by name, so the bias is read before the weight.
  assert "tensor 'vision_model.encoder.layers.0.mlp.fc1.bias' has shape (128,)" in message
  assert 'expected (96,)' in message
  assert os.path.join(str(tmp_path), 'model.safetensors') in message


def test_unsupported_activation_rejected(tmp_path):
  save_vision_model(tmp_path, act='gelu_new')
  with pytest.raises(WeightLoadError, match="hidden_act='gelu_new' is not supported"):
    clamp_jax.load_image_tower(str(tmp_path))


def test_not_a_checkpoint_rejected(tmp_path):
  path = tmp_path / 'weights.bin'
  path.write_bytes(b'\0' * 16)
  with pytest.raises(WeightLoadError, match='not an image tower checkpoint'):
    clamp_jax.load_image_tower(str(path))
