"""`model.vit.checkpoint` in `build_model`: loading, config checks, plan mode, sharded loading."""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from clamp_jax import build, plan
from clamp_jax.weights import WeightLoadError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  sys.path.insert(0, REPO)
  from configs import tiny
  return tiny.get_config()


def save_tiny_tower(folder) -> torch.nn.Module:
  """A random CLIP vision model with configs/tiny.py's image tower architecture."""
  vit = tiny_config().model.vit
  config = transformers.CLIPVisionConfig(
      hidden_size=vit.width, intermediate_size=int(vit.width * vit.mlp_ratio),
      num_hidden_layers=vit.layers, num_attention_heads=vit.heads, image_size=vit.image_size,
      patch_size=vit.patch_size, projection_dim=tiny_config().model.embed_dim,
      hidden_act=vit.act)
  torch.manual_seed(0)
  model = transformers.CLIPVisionModelWithProjection(config).eval()
  model.save_pretrained(folder)
  return model


def reference_embeddings(model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
    return model(pixel_values=pixels).image_embeds.numpy()


def random_images(size: int) -> np.ndarray:
  return np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)


def test_build_model_loads_locked_tower(tmp_path):
  reference = save_tiny_tower(tmp_path)
  config = tiny_config()
  config.model.vit.checkpoint = str(tmp_path)
  config.model.lock_image_tower = True
  model, _ = build.build_model(config)
  images = random_images(config.model.vit.image_size)
  np.testing.assert_allclose(np.asarray(model.image_tower(jnp.asarray(images))),
                             reference_embeddings(reference, images), rtol=0, atol=1e-4)
  trainable = nnx.state(model, build.trainable_filter(build.trainable_patterns(config)))
  assert 'image_tower' not in trainable


@pytest.mark.parametrize('field, value, message', [
    ('width', 64, 'config.model.vit.width=64 (checkpoint: 32)'),
    ('act', 'quick_gelu', "config.model.vit.act='quick_gelu' (checkpoint: 'gelu')"),
    ('mlp_ratio', 2.0, 'config.model.vit.mlp_ratio gives an MLP of 64 (checkpoint: 128)'),
    ('image_size', 32, 'config.model.vit.image_size=32 (checkpoint: 16)'),
])
def test_config_mismatch_names_field(tmp_path, field, value, message):
  save_tiny_tower(tmp_path)
  config = tiny_config()
  config.model.vit.checkpoint = str(tmp_path)
  config.model.vit[field] = value
  with pytest.raises(WeightLoadError) as error:
    build.check_image_tower_checkpoint(config)
  assert '\n' not in str(error.value)
  assert message in str(error.value)


def test_embed_dim_mismatch_names_field(tmp_path):
  save_tiny_tower(tmp_path)
  config = tiny_config()
  config.model.vit.checkpoint = str(tmp_path)
  config.model.embed_dim = 16
  with pytest.raises(WeightLoadError, match=r'config.model.embed_dim=16 \(checkpoint: 32\)'):
    build.check_image_tower_checkpoint(config)


def test_plan_mode_reads_no_image_tower(tmp_path):
  config = tiny_config()
  config.model.vit.checkpoint = str(tmp_path / 'not_there')
  model, _, _ = plan.abstract_training_state(config)
  assert model.image_tower.config.width == config.model.vit.width


SHARDED_PROBE = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from clamp_jax import parallel
    from clamp_jax.config_base import base_config
    from clamp_jax.weights import load_image_tower

    folder = sys.argv[1]
    config = base_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 2
    mesh = parallel.make_mesh(config.mesh)
    tower = load_image_tower(folder, place=parallel.sharded_placer(mesh, config.mesh.rules))
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    kernel = tower.layers[0].mlp.fc1.kernel.get_value()
    print(json.dumps({
        'spec': [a for a in kernel.sharding.spec],
        'shards': len({str(s.index) for s in kernel.addressable_shards}),
        'embeddings': np.asarray(tower(images)).tolist(),
    }))
''')


def test_sharded_placer_loads_into_shards(tmp_path):
  reference = save_tiny_tower(tmp_path)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  result = subprocess.run([sys.executable, '-c', SHARDED_PROBE, str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  probe = json.loads(result.stdout.strip().splitlines()[-1])
  assert probe['spec'] == ['fsdp', 'tensor']
  assert probe['shards'] == 4
  np.testing.assert_allclose(np.array(probe['embeddings'], np.float32),
                             reference_embeddings(reference, random_images(16)), rtol=0,
                             atol=1e-4)
