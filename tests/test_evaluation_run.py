"""Eval mode end to end on configs/tiny.py, periodic evaluation, and the class-embedding cache.

The datasets are written from scikit-learn's digits in image-folder layout: `digit_words` names
its classes with words (bare lines in subfolder order) and `digit_numerals` with numerals
(folder<TAB>name lines); `digit_captions` is a caption CSV for retrieval.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from clamp_jax import build, train
from clamp_jax.evaluation import benchmarks, zero_shot
from clamp_jax.evaluation.classification import evaluate_classification
from clamp_jax.evaluation.options import eval_options
from clamp_jax.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
IMAGES_PER_CLASS = 4
EVAL_DATASETS = ('digit_words', 'digit_numerals', 'digit_captions')


def run_main(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, '-m', 'clamp_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def write_digit_datasets(root: str) -> None:
  """Write the three datasets (40 digit images each, as 8-bit grayscale PNG files)."""
  digits = load_digits()
  first_images = {}
  for dataset in ('digit_words', 'digit_numerals'):
    for label in range(10):
      folder = os.path.join(root, dataset, f'd{label}')
      os.makedirs(folder)
      for index in np.flatnonzero(digits.target == label)[:IMAGES_PER_CLASS]:
        path = os.path.join(folder, f'{index}.png')
        Image.fromarray((digits.images[index] * 15).astype(np.uint8)).save(path)
        first_images.setdefault(label, path)
  with open(os.path.join(root, 'digit_words', 'classnames.txt'), 'w') as file:
    file.write('\n'.join(WORDS) + '\n')
  with open(os.path.join(root, 'digit_numerals', 'classnames.txt'), 'w') as file:
    file.write(''.join(f'd{label}\t{label}\n' for label in range(10)))
  # One file that is not an image: it is left out and counted.
  with open(os.path.join(root, 'digit_numerals', 'd3', 'broken.png'), 'wb') as file:
    file.write(b'not a png')

  os.makedirs(os.path.join(root, 'digit_captions'))
  with open(os.path.join(root, 'digit_captions', 'captions.csv'), 'w') as file:
    file.write('path,caption\n')
    for label, path in first_images.items():
      file.write(f'{path},a handwritten {WORDS[label]}.\n{path},the digit {label}.\n')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A 2-step tiny checkpoint, trained with evaluation on digit_words after every step."""
  root = tmp_path_factory.mktemp('evaluation')
  data_dir, workdir = str(root / 'data'), str(root / 'work')
  write_digit_datasets(data_dir)
  result = run_main('--config=configs/tiny.py', '--config.train.steps=2',
                    '--config.eval.at_end=False', '--config.eval.every_steps=1',
                    "--config.eval.periodic_datasets=('digit_words',)",
                    '--config.eval.periodic_max_images=20', f'--config.eval.data_dir={data_dir}',
                    f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  return data_dir, workdir


def eval_args(data_dir: str, workdir: str) -> list[str]:
  datasets = '(' + ','.join(f"'{name}'" for name in EVAL_DATASETS) + ')'
  return ['--config=configs/tiny.py', '--config.train.steps=2', '--config.mode=eval',
          f'--config.eval.datasets={datasets}', f'--config.eval.data_dir={data_dir}',
          f'--workdir={workdir}']


def test_periodic_evaluation_logs_metrics(trained):
  _, workdir = trained
  records = [record for record in read_metrics(workdir) if 'eval/digit_words/top1' in record]
  assert [record['step'] for record in records] == [1, 2]
  for record in records:
    assert record['eval/digit_words/num_images'] == 20
    assert 0.0 <= record['eval/digit_words/top1'] <= record['eval/digit_words/top5'] <= 1.0
    assert 0.0 <= record['eval/digit_words/mean_per_class'] <= 1.0


def test_eval_mode_writes_reports(trained):
  data_dir, workdir = trained
  result = run_main(*eval_args(data_dir, workdir))
  assert result.returncode == 0, result.stderr[-3000:]

  with open(os.path.join(workdir, 'eval_results.json')) as file:
    results = json.load(file)
  assert list(results) == list(EVAL_DATASETS)
  for name in ('digit_words', 'digit_numerals'):
    assert set(results[name]) >= {'top1', 'top5', 'mean_per_class', 'num_images'}
    assert results[name]['num_images'] == 10 * IMAGES_PER_CLASS
  assert results['digit_numerals']['num_unreadable'] == 1
  captions = results['digit_captions']
  assert captions['num_images'] == 10
  assert captions['num_captions'] == 20
  assert captions['t2i_r10'] == 1.0  # Only 10 images to rank.
  for direction in ('i2t', 't2i'):
    assert captions[f'{direction}_r1'] <= captions[f'{direction}_r5'] <= captions[
        f'{direction}_r10']
  for name, row in results.items():
    for metric, value in row.items():
      if not metric.startswith('num_'):
        assert 0.0 <= value <= 1.0, (name, metric, value)

  scores = [results['digit_words']['top1'], results['digit_numerals']['top1'],
            captions['mean_recall']]
  lines = open(os.path.join(workdir, 'eval_results.md')).read().splitlines()
  assert len(lines) == 2 + len(EVAL_DATASETS) + 1
  assert len({line.count('|') for line in lines}) == 1
  assert lines[-1].startswith(f'| **mean** |  | **{np.mean(scores):.4f}** |')
  with Image.open(os.path.join(workdir, 'eval_results.png')) as image:
    assert image.format == 'PNG'
  assert 'mean score over 3 datasets' in result.stdout
  assert not os.path.exists(os.path.join(workdir, 'zero_shot.json'))  # Only for the digits.

  # A second run reads both classifiers from the cache and reproduces the results.
  result = run_main(*eval_args(data_dir, workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ('digit_words', 'digit_numerals'):
    assert f'{name}: class embeddings of step 2 read from' in result.stderr
  with open(os.path.join(workdir, 'eval_results.json')) as file:
    assert json.load(file) == results


def test_eval_mode_missing_dataset_one_error_line(trained):
  data_dir, workdir = trained
  result = run_main('--config=configs/tiny.py', '--config.mode=eval',
                    "--config.eval.datasets=('digit_words','gtsrb')",
                    f'--config.eval.data_dir={data_dir}', f'--workdir={workdir}', timeout=120)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert 'gtsrb:' in lines[0]
  assert 'is not a folder' in lines[0]


def test_class_embedding_cache_skips_text_tower(trained, tmp_path, monkeypatch):
  data_dir, _ = trained
  sys.path.insert(0, REPO)
  from configs import tiny
  config = tiny.get_config()
  model, tokenizer = build.build_model(config)
  model.eval()
  caption_tokenizer = train.make_caption_tokenizer(config, tokenizer)
  options = eval_options(config, str(tmp_path), max_images=8)
  resolved = benchmarks.resolve('digit_words', data_dir)

  calls = []
  encode_text = zero_shot._encode_text
  monkeypatch.setattr(zero_shot, '_encode_text',
                      lambda *args: calls.append(1) or encode_text(*args))

  first = evaluate_classification(model, caption_tokenizer, resolved, options, step=7)
  assert calls, 'the first run must build the classifier'
  calls.clear()
  second = evaluate_classification(model, caption_tokenizer, resolved, options, step=7)
  assert not calls, 'the second run must read the classifier from the cache'
  assert second == first

  evaluate_classification(model, caption_tokenizer, resolved, options, step=8)
  assert calls, 'another step must not reuse the cache'
  calls.clear()
  model.text_tower.prompts[...] = model.text_tower.prompts[...] + 1.0
  evaluate_classification(model, caption_tokenizer, resolved, options, step=7)
  assert calls, 'changed prompt weights must not reuse the cache'
