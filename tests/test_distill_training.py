"""Training with a frozen CLIP teacher: the logged loss is the contrastive loss plus the weighted
distillation loss, on one device and with the shard_map losses on 8 simulated devices."""

import os
import subprocess
import sys

import pytest

from clamp_jax.metrics import read_metrics
from test_clip_teacher import END_ID, save_clip_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir, teacher, devices: int, *extra):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  result = subprocess.run(
      [sys.executable, '-m', 'clamp_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}',
       '--config.train.steps=2', '--config.eval.at_end=False', '--config.model.lora.dropout=0.0',
       '--config.data.caption_table=False', f'--config.model.teacher={teacher}',
       '--config.train.distill_weight=0.5', *extra],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return [r for r in read_metrics(str(workdir)) if 'train/loss' in r]


@pytest.fixture(scope='module')
def teacher_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp('clip_teacher')
  # A 28 px teacher: the 16 px training images are resized for it inside the step.
  save_clip_model(folder, act='quick_gelu', image_size=28, eos_token_id=END_ID, vocab_size=54)
  return str(folder)


def test_distillation_adds_weighted_loss(tmp_path, teacher_folder):
  records = train(tmp_path / 'one', teacher_folder, 1, '--config.mesh.data=1')
  assert [r['step'] for r in records] == [1, 2]
  for record in records:
    distill = 0.5 * (record['train/distill_i2t'] + record['train/distill_t2i'])
    assert distill > 0
    assert abs(record['train/loss'] - (record['train/contrastive_loss'] + 0.5 * distill)) < 1e-4


def test_sharded_distillation_matches_one_device(tmp_path, teacher_folder):
  one = train(tmp_path / 'one', teacher_folder, 1, '--config.mesh.data=1')
  eight = train(tmp_path / 'eight', teacher_folder, 8, '--config.mesh.data=4',
                '--config.mesh.fsdp=2')
  for left, right in zip(one, eight, strict=True):
    for key in ('train/loss', 'train/distill_i2t', 'train/distill_t2i'):
      assert abs(left[key] - right[key]) < 1e-4, (left['step'], key, left[key], right[key])


def test_caption_table_rejected_with_teacher(tmp_path, teacher_folder):
  result = subprocess.run(
      [sys.executable, '-m', 'clamp_jax.main', '--config=configs/tiny.py', f'--workdir={tmp_path}',
       f'--config.model.teacher={teacher_folder}'],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=120)
  assert result.returncode != 0
  assert 'needs one caption per image; set config.data.caption_table=False' in result.stderr
