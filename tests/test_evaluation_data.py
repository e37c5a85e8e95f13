"""Benchmark registry and evaluation data readers on small folders written by the tests."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from clamp_jax.evaluation import benchmarks
from clamp_jax.evaluation.classification import benchmark_templates
from clamp_jax.evaluation.readers import (ReadSettings, read_captioned_images,
                                          read_labelled_images, subset_indices,
                                          threaded_batches)

SETTINGS = ReadSettings(image_size=16)


def write_image(path, value=128, size=(12, 10), mode='RGB'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new(mode, size, value if mode != 'RGB' else (value, value, value)).save(path)


def test_registry_covers_the_suite():
  expected = {'imagenet', 'imagenet_v2', 'imagenet_sketch', 'imagenet_a', 'imagenet_r',
              'voc2007', 'gtsrb', 'country211', 'rendered_sst2', 'kitti_distance', 'eurosat',
              'resisc45', 'caltech101', 'cifar10', 'cifar100', 'dtd', 'fgvc_aircraft',
              'food101', 'mnist', 'flowers102', 'oxford_pets', 'pcam', 'stanford_cars',
              'fer2013', 'hateful_memes'}
  assert set(benchmarks.ALL_CLASSIFICATION) == expected
  for name in ('fgvc_aircraft', 'oxford_pets', 'caltech101', 'flowers102'):
    assert benchmarks.REGISTRY[name].metric == benchmarks.MEAN_PER_CLASS
  assert benchmarks.REGISTRY['hateful_memes'].metric == benchmarks.ROC_AUC
  for benchmark in benchmarks.REGISTRY.values():
    for template in benchmark.templates:
      assert template.count('{}') == 1, (benchmark.name, template)


def test_expand_names_keeps_order_without_repeats():
  names = benchmarks.expand_names(('digits', 'imagenet_variants', 'imagenet_a', 'dtd'))
  assert names == ['digits', 'imagenet_v2', 'imagenet_sketch', 'imagenet_a', 'imagenet_r', 'dtd']


def test_display_name_rules():
  assert benchmarks.display_name('aquarium_fish', benchmarks.REGISTRY['cifar100']) == \
      'aquarium fish'
  assert benchmarks.display_name('HerbaceousVegetation', benchmarks.REGISTRY['eurosat']) == \
      'herbaceous vegetation'
  assert benchmarks.display_name('1', benchmarks.REGISTRY['hateful_memes']) == 'hateful meme'


def test_folder_names_and_split_subfolder(tmp_path):
  for name in ('apple_pie', 'sushi'):
    write_image(str(tmp_path / 'food101' / 'test' / name / 'a.png'))
  write_image(str(tmp_path / 'food101' / 'train' / 'pizza' / 'a.png'))  # Not the test split.
  data = read_labelled_images(benchmarks.resolve('food101', str(tmp_path)), SETTINGS)
  assert data.class_names == ['apple pie', 'sushi']
  assert data.size == 2
  pixels, label = data.load(1)
  assert pixels.shape == (16, 16, 3)
  assert pixels.dtype == np.float32
  assert label == 1


def test_imagenet_variant_uses_imagenet_class_names(tmp_path):
  (tmp_path / 'imagenet').mkdir()
  (tmp_path / 'imagenet' / 'classnames.txt').write_text(
      'n01\tgoldfish\nn02\tgreat white shark\nn03\ttiger shark\n')
  for wnid in ('n03', 'n01'):
    write_image(str(tmp_path / 'imagenet_a' / wnid / 'x.jpg'))
  data = read_labelled_images(benchmarks.resolve('imagenet_a', str(tmp_path)), SETTINGS)
  assert data.class_names == ['goldfish', 'tiger shark']


def test_imagenet_without_class_names_raises(tmp_path):
  write_image(str(tmp_path / 'imagenet' / 'val' / 'n01' / 'x.png'))
  with pytest.raises(FileNotFoundError, match='classnames.txt'):
    read_labelled_images(benchmarks.resolve('imagenet', str(tmp_path)), SETTINGS)


def test_unreadable_image_loads_as_none(tmp_path):
  write_image(str(tmp_path / 'things' / 'cat' / 'good.png'), mode='L')
  (tmp_path / 'things' / 'cat' / 'broken.png').write_bytes(b'not an image')
  resolved = benchmarks.resolve('things', str(tmp_path))
  assert resolved.benchmark.task == benchmarks.CLASSIFICATION
  data = read_labelled_images(resolved, SETTINGS)
  loaded = [data.load(index)[0] for index in range(data.size)]
  assert sum(image is None for image in loaded) == 1


def test_templates_file_replaces_benchmark_templates(tmp_path):
  write_image(str(tmp_path / 'dtd' / 'banded' / 'a.png'))
  resolved = benchmarks.resolve('dtd', str(tmp_path))
  assert benchmark_templates(resolved) == benchmarks.REGISTRY['dtd'].templates
  (tmp_path / 'dtd' / 'templates.txt').write_text('a {} thing.\n\nstuff that is {}.\n')
  assert benchmark_templates(resolved) == ('a {} thing.', 'stuff that is {}.')
  (tmp_path / 'dtd' / 'templates.txt').write_text('no field here.\n')
  with pytest.raises(ValueError, match='exactly one'):
    benchmark_templates(resolved)


def test_check_data_names_every_missing_benchmark(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    benchmarks.check_data(['gtsrb', 'mscoco', 'digits', 'cifar10'], str(tmp_path), 'auto')
  message = str(error.value)
  assert 'gtsrb:' in message
  assert 'mscoco:' in message
  assert 'cifar10' not in message  # cifar10 may still come from TFDS.
  with pytest.raises(FileNotFoundError, match='cifar10:'):
    benchmarks.check_data(['cifar10'], str(tmp_path), 'folder')


def test_caption_csv_groups_captions_by_image(tmp_path):
  folder = tmp_path / 'pairs'
  write_image(str(folder / 'a.png'))
  write_image(str(folder / 'b.png'))
  (folder / 'captions.csv').write_text(
      'path,caption\na.png,a grey square\nb.png,another square\na.png,a flat grey image\n')
  resolved = benchmarks.resolve('pairs', str(tmp_path))
  assert resolved.benchmark.task == benchmarks.RETRIEVAL
  data = read_captioned_images(resolved)
  assert [os.path.basename(path) for path in data.image_paths] == ['a.png', 'b.png']
  assert data.captions == ['a grey square', 'another square', 'a flat grey image']
  assert data.caption_image.tolist() == [0, 1, 0]


def test_coco_and_karpathy_json(tmp_path):
  coco = tmp_path / 'coco_like'
  (coco / 'images').mkdir(parents=True)
  (coco / 'captions.json').write_text(json.dumps({
      'images': [{'id': 7, 'file_name': 'x.jpg'}, {'id': 9, 'file_name': 'y.jpg'}],
      'annotations': [{'image_id': 9, 'caption': 'two'}, {'image_id': 7, 'caption': 'one'},
                      {'image_id': 9, 'caption': 'three'}]}))
  data = read_captioned_images(benchmarks.resolve('coco_like', str(tmp_path)))
  assert data.image_paths == [str(coco / 'images' / 'y.jpg'), str(coco / 'images' / 'x.jpg')]
  assert data.caption_image.tolist() == [0, 1, 0]

  karpathy = tmp_path / 'karpathy_like'
  karpathy.mkdir()
  (karpathy / 'captions.json').write_text(json.dumps({'images': [
      {'filepath': 'val', 'filename': 'p.jpg', 'split': 'test',
       'sentences': [{'raw': 'first'}, {'raw': 'second'}]},
      {'filepath': 'val', 'filename': 'q.jpg', 'split': 'train',
       'sentences': [{'raw': 'not used'}]}]}))
  data = read_captioned_images(benchmarks.resolve('karpathy_like', str(tmp_path)))
  assert data.image_paths == [str(karpathy / 'val' / 'p.jpg')]
  assert data.captions == ['first', 'second']


def test_subset_indices_fixed_and_sorted():
  first, second = subset_indices(100, 10), subset_indices(100, 10)
  assert first.tolist() == second.tolist()
  assert first.tolist() == sorted(set(first.tolist()))
  assert len(first) == 10
  assert subset_indices(5, 0).tolist() == [0, 1, 2, 3, 4]


def test_threaded_batches_keep_order():
  batches = list(threaded_batches(lambda index: index * 10, list(range(7)), 3, threads=2))
  assert batches == [[0, 10, 20], [30, 40, 50], [60]]
