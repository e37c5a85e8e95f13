"""Tests for the CLIP-layout ViT image tower."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clamp_jax.models.vit import ViTConfig, VisionTransformer

TINY = dict(image_size=16, patch_size=4, width=32, layers=2, heads=4, embed_dim=8)


@pytest.fixture(scope='module')
def tower():
  return VisionTransformer(ViTConfig(**TINY), rngs=nnx.Rngs(0))


def random_images(seed, batch=2, size=16):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


def test_output_shape(tower):
  out = tower(random_images(1, batch=3))
  assert out.shape == (3, 8)
  assert out.dtype == jnp.float32


def test_output_not_normalized(tower):
  norms = jnp.linalg.norm(tower(random_images(1)), axis=-1)
  assert not np.allclose(norms, 1.0, atol=1e-3)


def test_config_rejects_indivisible_patch():
  with pytest.raises(ValueError, match='image_size=30 is not divisible by patch_size=4'):
    ViTConfig(**{**TINY, 'image_size': 30})


def test_config_rejects_indivisible_heads():
  with pytest.raises(ValueError, match='width=30 is not divisible by heads=4'):
    ViTConfig(**{**TINY, 'width': 30})


def test_config_rejects_unknown_activation():
  with pytest.raises(ValueError, match='relu'):
    ViTConfig(**{**TINY, 'act': 'relu'})


def test_rejects_wrong_image_size(tower):
  with pytest.raises(ValueError, match='16, 16, 3'):
    tower(random_images(1, size=20))


def test_jit_matches_eager(tower):
  images = random_images(2)
  jitted = nnx.jit(lambda model, x: model(x))(tower, images)
  np.testing.assert_allclose(jitted, tower(images), rtol=1e-5, atol=1e-5)


def test_different_images_differ(tower):
  out = tower(jnp.concatenate([random_images(3, batch=1), random_images(4, batch=1)]))
  assert float(jnp.max(jnp.abs(out[0] - out[1]))) > 1e-3


def test_batch_rows_independent(tower):
  images = random_images(5, batch=3)
  together = tower(images)
  alone = tower(images[1:2])
  np.testing.assert_allclose(together[1:2], alone, rtol=1e-5, atol=1e-5)


def test_params_have_logical_axes(tower):
  params = nnx.state(tower, nnx.Param)
  variables = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
  for variable in variables:
    axes = variable.get_metadata().get('logical_axes')
    assert axes is not None
    assert len(axes) == variable[...].ndim


@pytest.mark.parametrize('act', ['quick_gelu', 'gelu'])
def test_matches_hugging_face_clip(act):
  """Random Hugging Face CLIP vision weights copied by name give the same embeddings."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  hf_config = transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      image_size=16, patch_size=4, projection_dim=8, hidden_act=act, layer_norm_eps=1e-5)
  torch.manual_seed(0)
  hf_model = transformers.CLIPVisionModelWithProjection(hf_config).eval()
  weights = {name: tensor.detach().numpy() for name, tensor in hf_model.state_dict().items()}

  tower = VisionTransformer(ViTConfig(**TINY, act=act), rngs=nnx.Rngs(0))
  prefix = 'vision_model.'
  tower.patch_embedding[...] = weights[prefix + 'embeddings.patch_embedding.weight'].transpose(
      2, 3, 1, 0)
  tower.class_embedding[...] = weights[prefix + 'embeddings.class_embedding']
  tower.position_embedding[...] = weights[prefix + 'embeddings.position_embedding.weight']
  for ours, theirs in ((tower.ln_pre, 'pre_layrnorm'), (tower.ln_post, 'post_layernorm')):
    ours.scale[...] = weights[f'{prefix}{theirs}.weight']
    ours.bias[...] = weights[f'{prefix}{theirs}.bias']
  for index, block in enumerate(tower.layers):
    layer = f'{prefix}encoder.layers.{index}.'
    for norm in ('layer_norm1', 'layer_norm2'):
      getattr(block, norm).scale[...] = weights[layer + norm + '.weight']
      getattr(block, norm).bias[...] = weights[layer + norm + '.bias']
    linears = {f'self_attn.{name}': getattr(block.self_attn, name)
               for name in ('q_proj', 'k_proj', 'v_proj', 'out_proj')}
    linears.update({'mlp.fc1': block.mlp.fc1, 'mlp.fc2': block.mlp.fc2})
    for name, linear in linears.items():
      linear.kernel[...] = weights[layer + name + '.weight'].T
      linear.bias[...] = weights[layer + name + '.bias']
  tower.projection.kernel[...] = weights['visual_projection.weight'].T

  images = np.array(random_images(6))
  with torch.no_grad():
    expected = hf_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).image_embeds
  np.testing.assert_allclose(tower(jnp.asarray(images)), expected.numpy(), rtol=1e-4, atol=1e-5)
