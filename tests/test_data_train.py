"""End to end: train configs/tiny.py through the CLI on webdataset shards written by make_shards."""

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image

from clamp_jax.data import make_shards
from clamp_jax.data.quality import SKIP_REASONS
from clamp_jax.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, '-m', 'clamp_jax.main', *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def write_shards(root):
  """Write two class folders of 12 images into shards 00000..00002, then a shard of bad samples
  as 00003; return the pattern of all four."""
  for class_index, name in enumerate(('red', 'blue')):
    os.makedirs(root / 'images' / name)
    for index in range(12):
      colour = (250, 10 * index, 0) if class_index == 0 else (0, 10 * index, 250)
      Image.new('RGB', (24 + index, 20), colour).save(root / 'images' / name / f'{index}.png')
  assert make_shards.main(['--input', str(root / 'images'), '--output_dir', str(root / 'shards'),
                           '--samples_per_shard', '8']) == 0
  with tarfile.open(root / 'shards' / '00003.tar', 'w') as tar:
    for name, data in (('bad0.jpg', b'\xff\xd8 not a jpeg'), ('bad0.txt', b'a photo of a red.'),
                       ('bad1.txt', b'a photo of a blue.')):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(root / 'shards' / '{00000..00003}.tar')


def train_records(workdir, pattern, *extra):
  common = ['--config=configs/tiny.py', f'--workdir={workdir}', '--config.train.steps=6',
            '--config.eval.at_end=False', '--config.data.train.kind=webdataset',
            f'--config.data.train.pattern={pattern}', '--config.data.train.shuffle_buffer=4']
  result = run_main(*common, *extra)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_tiny_resumes_on_shards_like_straight_run(tmp_path):
  """6 steps straight versus 3 steps, stop, 3 more: the same losses and skip counts."""
  pattern = write_shards(tmp_path)
  train_records(tmp_path / 'straight', pattern)
  train_records(tmp_path / 'split', pattern, '--config.train.stop_after_steps=3')
  resumed = train_records(tmp_path / 'split', pattern)
  assert 'Resuming from step 3' in resumed.stderr

  straight = [r for r in read_metrics(str(tmp_path / 'straight')) if 'train/loss' in r]
  split = [r for r in read_metrics(str(tmp_path / 'split')) if 'train/loss' in r]
  assert [r['step'] for r in straight] == [1, 2, 3, 4, 5, 6]
  assert [r['step'] for r in split] == [1, 2, 3, 4, 5, 6]
  previous = dict.fromkeys(SKIP_REASONS, 0)
  for left, right in zip(straight, split):
    assert np.isfinite(left['train/loss'])
    assert abs(left['train/loss'] - right['train/loss']) < 1e-6, left['step']
    counts = {reason: left[f'data/skipped/{reason}'] for reason in SKIP_REASONS}
    assert counts == {reason: right[f'data/skipped/{reason}'] for reason in SKIP_REASONS}
    for reason in SKIP_REASONS:
      assert counts[reason] >= previous[reason], (left['step'], reason)
    previous = counts
  # 48 samples read of 24 good ones per epoch: the bad shard has been read at least once.
  assert previous['corrupt_image'] >= 1
  assert previous['missing_image'] >= 1


def test_pattern_without_files_one_error_line(tmp_path):
  pattern = str(tmp_path / 'none' / '{00000..00009}.tar')
  result = run_main('--config=configs/tiny.py', f'--workdir={tmp_path / "run"}',
                    '--config.data.train.kind=webdataset', f'--config.data.train.pattern={pattern}',
                    timeout=120)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert pattern in lines[0]
  assert 'Traceback' not in result.stderr
