"""End-to-end training on configs/tiny.py: one step, frozen base, resume, and bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from clamp_jax import build, parallel, train
from clamp_jax.step import CAPTION_KEYS
from clamp_jax.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, '-m', 'clamp_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def tiny_config():
  sys.path.insert(0, REPO)
  from configs import tiny
  return tiny.get_config()


def losses_by_step(workdir: str) -> dict[int, float]:
  return {r['step']: r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r}


def test_tiny_one_step_end_to_end(tmp_path):
  result = run_main('--config=configs/tiny.py', '--config.train.steps=1',
                    '--config.train.warmup_steps=0', f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr[-3000:]
  records = read_metrics(str(tmp_path))
  assert records[0]['step'] == 1
  assert np.isfinite(records[0]['train/loss'])
  with open(tmp_path / 'zero_shot.json') as f:
    results = json.load(f)
  assert set(results['digits']) == {'top1', 'top5', 'num_images'}
  assert 0.0 <= results['digits']['top1'] <= 1.0
  assert results['digits']['num_images'] == 359
  assert (tmp_path / 'checkpoints' / '1').is_dir()
  assert any(name.startswith('events') for name in os.listdir(tmp_path / 'tensorboard'))

  # Eval mode restores the checkpoint and reproduces the end-of-training evaluation.
  (tmp_path / 'zero_shot.json').unlink()
  result = run_main('--config=configs/tiny.py', '--config.train.steps=1',
                    '--config.train.warmup_steps=0', '--config.mode=eval', f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'zero_shot.json') as f:
    assert json.load(f) == results


def test_eval_without_checkpoint_one_error_line(tmp_path):
  result = run_main('--config=configs/tiny.py', '--config.mode=eval', f'--workdir={tmp_path}',
                    timeout=300)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert 'No checkpoint in' in lines[-1]
  assert 'Traceback' not in result.stderr


def test_step_freezes_base_and_trains_groups():
  config = tiny_config()
  config.train.warmup_steps = 0  # Warmup starts at a learning rate of 0, which changes nothing.
  model, tokenizer = build.build_model(config)
  trainable = build.trainable_filter(build.trainable_patterns(config))
  optimizer = train.make_optimizer(model, config.train, trainable)
  mesh = parallel.make_mesh(config.mesh)
  train.place_model(model, mesh, config)
  host_batch = next(iter(train.make_train_data(config,
                                               train.make_caption_tokenizer(config, tokenizer))))
  batch, _ = train.split_data_counters(host_batch, mesh, config.mesh.rules, CAPTION_KEYS)
  base_weights = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  frozen = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model.text_tower.llm, base_weights)))
  before = {build.path_string(p): np.array(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, trainable))}

  model.train()
  train.make_train_step(model, optimizer, trainable, config, mesh, batch)(model, optimizer, batch)

  frozen_after = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model.text_tower.llm,
                                                                   base_weights)))
  assert len(jax.tree.leaves(frozen)) == 2 * 9 + 2  # Two layers of nine weights, embed, norm.
  for left, right in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_after), strict=True):
    assert np.array_equal(left, right)
  after = {build.path_string(p): np.array(v.get_value())
           for p, v in nnx.to_flat_state(nnx.state(model, trainable))}
  groups = {'lora': '/lora/', 'prompts': 'text_tower/prompts', 'pooler': 'text_tower/pooler/',
            'projection': 'text_tower/projection/', 'temperature': 'log_logit_scale',
            'image_tower': 'image_tower/'}
  for group, marker in groups.items():
    names = [name for name in before if marker in name]
    assert names, group
    changed = [name for name in names if not np.array_equal(before[name], after[name])]
    assert changed, f'no parameter of {group} changed'


def test_frozen_llm_gets_no_optimizer_state():
  config = tiny_config()
  model, _ = build.build_model(config)
  trainable = build.trainable_filter(build.trainable_patterns(config))
  optimizer = train.make_optimizer(model, config.train, trainable)
  paths = [build.path_string(p) for p, _ in nnx.to_flat_state(nnx.state(optimizer))]
  llm_paths = [p for p in paths if 'text_tower/llm/' in p]
  assert llm_paths
  assert all('/lora/' in p for p in llm_paths)


def test_resume_matches_uninterrupted(tmp_path):
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  common = ['--config=configs/tiny.py', '--config.train.steps=4', '--config.eval.at_end=False']
  result = run_main(*common, f'--workdir={straight}')
  assert result.returncode == 0, result.stderr[-3000:]
  result = run_main(*common, '--config.train.stop_after_steps=2', f'--workdir={resumed}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert max(losses_by_step(str(resumed))) == 2
  result = run_main(*common, f'--workdir={resumed}')
  assert result.returncode == 0, result.stderr[-3000:]

  expected, got = losses_by_step(str(straight)), losses_by_step(str(resumed))
  for step in (3, 4):
    assert abs(expected[step] - got[step]) <= 1e-5, (step, expected[step], got[step])


@pytest.mark.parametrize('args, message', [
    (('--config=configs/tiny.py', '--config.train.bogus=1'), "unknown config field 'bogus'"),
    (('--config=configs/missing.py',), "config file 'configs/missing.py' not found"),
    (('--config=configs/tiny.py', '--config.model.vit.patch_size=5'),
     'image_size=16 is not divisible by config.model.vit.patch_size=5'),
])
def test_bad_config_one_error_line(tmp_path, args, message):
  result = run_main(*args, f'--workdir={tmp_path}', timeout=120)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert message in lines[0]
  assert 'Traceback' not in result.stderr


def test_unwritable_workdir_one_error_line(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  result = run_main('--config=configs/tiny.py', f'--workdir={blocker}/run', timeout=120)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert 'is not writable' in lines[0]
