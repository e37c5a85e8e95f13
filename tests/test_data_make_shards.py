"""Tests for `python -m clamp_jax.data.make_shards`."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from clamp_jax.data import make_shards
from clamp_jax.data.paths import expand_pattern

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, '-m', 'clamp_jax.data.make_shards', *map(str, args)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def make_class_folder(root, per_class=3):
  for class_index, name in enumerate(('cat', 'dog')):
    os.makedirs(root / name)
    for index in range(per_class):
      Image.new('RGB', (10 + index, 8), (class_index * 200, index * 50, 0)).save(
          root / name / f'{index}.png')


def members(path):
  with tarfile.open(path) as tar:
    return [(member.name, tar.extractfile(member).read()) for member in tar.getmembers()]


def test_help_lists_flags():
  result = run_tool('--help')
  assert result.returncode == 0
  for flag in ('--input', '--output_dir', '--samples_per_shard', '--image_format', '--format',
               '--template', '--prefix'):
    assert flag in result.stdout
  assert '10000' in result.stdout


def test_folder_to_shards_cli(tmp_path):
  make_class_folder(tmp_path / 'images')
  result = run_tool('--input', tmp_path / 'images', '--output_dir', tmp_path / 'shards',
                    '--samples_per_shard', 4)
  assert result.returncode == 0, result.stderr
  pattern = result.stdout.strip().splitlines()[-1]
  assert pattern == str(tmp_path / 'shards' / '{00000..00001}.tar')
  assert 'make_shards: 6/6 read, 6 written to 2 shards, 0 left out' in result.stderr
  assert len(expand_pattern(pattern)) == 2


def test_shard_layout(tmp_path):
  make_class_folder(tmp_path / 'images')
  assert make_shards.main(['--input', str(tmp_path / 'images'), '--output_dir',
                           str(tmp_path / 'out'), '--shuffle_seed', '-1']) == 0
  names = [name for name, _ in members(tmp_path / 'out' / '00000.tar')]
  assert names[:3] == ['000000000.png', '000000000.txt', '000000000.json']
  assert len(names) == 18
  contents = dict(members(tmp_path / 'out' / '00000.tar'))
  assert contents['000000000.txt'] == b'a photo of a cat.'
  assert contents['000000005.txt'] == b'a photo of a dog.'
  source = json.loads(contents['000000000.json'])['source']
  with open(source, 'rb') as file:
    assert contents['000000000.png'] == file.read()  # Passed through unchanged.


def test_shards_byte_identical_on_rerun(tmp_path):
  make_class_folder(tmp_path / 'images')
  for name in ('a', 'b'):
    assert make_shards.main(['--input', str(tmp_path / 'images'), '--output_dir',
                             str(tmp_path / name)]) == 0
  assert (tmp_path / 'a' / '00000.tar').read_bytes() == (tmp_path / 'b' / '00000.tar').read_bytes()


def test_reencode_to_jpeg(tmp_path):
  make_class_folder(tmp_path / 'images', per_class=1)
  rgba = Image.new('RGBA', (6, 6), (0, 0, 0, 0))
  rgba.save(tmp_path / 'images' / 'cat' / 'clear.png')
  assert make_shards.main(['--input', str(tmp_path / 'images'), '--output_dir',
                           str(tmp_path / 'out'), '--image_format', 'jpg']) == 0
  contents = members(tmp_path / 'out' / '00000.tar')
  jpegs = [data for name, data in contents if name.endswith('.jpg')]
  assert len(jpegs) == 3
  for data in jpegs:
    assert Image.open(io.BytesIO(data)).format == 'JPEG'


def test_bad_inputs_left_out_and_counted(tmp_path, capsys):
  folder = tmp_path / 'images'
  os.makedirs(folder)
  Image.new('RGB', (8, 8)).save(folder / 'good.png')
  Image.new('RGB', (200, 200)).save(folder / 'huge.png')
  (folder / 'empty.png').write_bytes(b'')
  (folder / 'broken.jpg').write_bytes(b'\xff\xd8\xff broken')
  table = folder / 'captions.tsv'
  table.write_bytes(b'good.png\ta dog\nhuge.png\ta big dog\nempty.png\tnothing\n'
                    b'broken.jpg\tbroken\nmissing.png\tgone\ngood.png\t \ngood.png\t\xff\xfe\n'
                    b'good.png\n')
  assert make_shards.main(['--input', str(table), '--output_dir', str(tmp_path / 'out'),
                           '--max_image_pixels', '10000']) == 0
  summary = capsys.readouterr().err.strip().splitlines()[-1]
  assert '8/8 read, 1 written to 1 shards, 7 left out' in summary
  for reason in ('missing_image=1', 'missing_caption=1', 'empty_caption=1',
                 'caption_not_utf8=1', 'empty_image=1', 'corrupt_image=1', 'too_many_pixels=1'):
    assert reason in summary
  assert len(members(tmp_path / 'out' / '00000.tar')) == 3


def test_array_record_output(tmp_path):
  make_class_folder(tmp_path / 'images')
  assert make_shards.main(['--input', str(tmp_path / 'images'), '--output_dir',
                           str(tmp_path / 'out'), '--format', 'array_record',
                           '--samples_per_shard', '5', '--prefix', 'train-']) == 0
  import grain  # pylint: disable=import-outside-toplevel
  files = expand_pattern(str(tmp_path / 'out' / 'train-{00000..00001}.array_record'))
  assert len(grain.sources.ArrayRecordDataSource(files)) == 6


def test_no_usable_sample_fails(tmp_path, capsys):
  table = tmp_path / 'captions.tsv'
  table.write_text('missing.png\ta cat\n')
  assert make_shards.main(['--input', str(table), '--output_dir', str(tmp_path / 'out')]) == 1
  assert 'no usable sample' in capsys.readouterr().err


def test_missing_input_one_error_line(tmp_path):
  result = run_tool('--input', tmp_path / 'nothing.tsv', '--output_dir', tmp_path / 'out')
  assert result.returncode == 1
  assert result.stderr.strip() == f"error: Caption file '{tmp_path / 'nothing.tsv'}' does not exist."


@pytest.mark.parametrize('flag', ['--samples_per_shard=0', '--threads=0'])
def test_rejects_nonpositive_counts(tmp_path, flag):
  result = run_tool('--input', tmp_path, '--output_dir', tmp_path / 'out', flag)
  assert result.returncode == 2
  assert 'must be positive' in result.stderr
