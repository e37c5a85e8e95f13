"""Read evaluation datasets: labelled images from a folder or TFDS, captioned images for retrieval.

Images get CLIP's evaluation transform (`clamp_jax.data.images.clip_preprocess`) at the model's
image size. An image that cannot be read or decoded is left out and counted, so one bad file
does not stop a long evaluation.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from clamp_jax.data import listings
from clamp_jax.data.images import clip_preprocess, decode_image, to_rgb
from clamp_jax.evaluation.benchmarks import (CAPTION_FILES, CLASS_NAMES_FILE, Benchmark,
                                             ResolvedBenchmark, display_name)

TFDS_INSTALL_HINT = "pip install 'clamp-jax[tfds]'"


@dataclasses.dataclass(frozen=True)
class ReadSettings:
  """Settings for reading and preprocessing evaluation images."""

  image_size: int
  source: str = 'auto'
  tfds_data_dir: str = ''
  max_image_pixels: int = 89_478_485


@dataclasses.dataclass
class LabelledImages:
  """A classification test set: `load(i)` returns `(pixels or None, label)` for i < size."""

  class_names: list[str]
  size: int
  load: Callable[[int], tuple[np.ndarray | None, int]]
  description: str


@dataclasses.dataclass
class CaptionedImages:
  """A retrieval test set: every caption points to its image through `caption_image`."""

  image_paths: list[str]
  captions: list[str]
  caption_image: np.ndarray
  description: str


def load_image_file(path: str, settings: ReadSettings) -> np.ndarray | None:
  """Read, decode and preprocess one image file; None when it cannot be read or decoded."""
  try:
    with open(path, 'rb') as file:
      data = file.read()
    return clip_preprocess(decode_image(data, settings.max_image_pixels), settings.image_size)
  except Exception as error:  # pylint: disable=broad-except
    # Pillow raises many types for broken files (OSError, ValueError, SyntaxError, ...).
    logging.debug('Cannot read image %s (%s).', path, error)
    return None


# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------


def class_names_file(resolved: ResolvedBenchmark, root: str) -> str:
  """Return the classnames.txt that applies to `resolved`, or '' when there is none."""
  candidates = [os.path.join(root, CLASS_NAMES_FILE)] if root else []
  if resolved.folder:
    candidates.append(os.path.join(resolved.folder, CLASS_NAMES_FILE))
    fallback = resolved.benchmark.class_names_fallback
    if fallback:
      parent = os.path.dirname(os.path.normpath(resolved.folder))
      candidates.append(os.path.join(parent, fallback, CLASS_NAMES_FILE))
  for path in candidates:
    if os.path.isfile(path):
      return path
  return ''


def _missing_class_names(benchmark: Benchmark, where: str) -> FileNotFoundError:
  return FileNotFoundError(
      f'{benchmark.title} labels {where} are ids, not names; put a {CLASS_NAMES_FILE} with '
      f'id<TAB>name lines (or one name per class in label order) into its dataset folder.')


def folder_root(resolved: ResolvedBenchmark) -> str:
  """Return the class root: the `folder_split` subfolder when it exists, else the folder."""
  split_folder = os.path.join(resolved.folder, resolved.benchmark.folder_split)
  return split_folder if os.path.isdir(split_folder) else resolved.folder


def read_image_folder(resolved: ResolvedBenchmark, settings: ReadSettings) -> LabelledImages:
  """List an image folder with one subfolder per class (see `benchmarks` for the layout)."""
  benchmark = resolved.benchmark
  root = folder_root(resolved)
  names_file = class_names_file(resolved, root)
  if not names_file and benchmark.needs_class_names_file:
    raise _missing_class_names(benchmark, f'(the subfolder names of {root})')
  items, names = listings.list_image_folder(root, names_file)
  if not names_file:
    names = [display_name(name, benchmark) for name in names]

  def load(index: int) -> tuple[np.ndarray | None, int]:
    path, label = items[index]
    return load_image_file(path, settings), label

  return LabelledImages(names, len(items), load, f'image folder {root}')


def read_tfds(resolved: ResolvedBenchmark, settings: ReadSettings) -> LabelledImages:
  """Open a prepared TFDS dataset with `tfds.data_source` (random access, no TensorFlow ops).

  NOTE: not covered by the test suite, which does not install TensorFlow Datasets.
  """
  benchmark = resolved.benchmark
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise FileNotFoundError(
        f'{benchmark.title} has no folder {resolved.folder or "(config.eval.data_dir is empty)"}'
        f' and reading TFDS {benchmark.tfds_name!r} needs TensorFlow Datasets: '
        f'{TFDS_INSTALL_HINT}.') from error
  source = tfds.data_source(benchmark.tfds_name, split=benchmark.tfds_split,
                            data_dir=settings.tfds_data_dir or None)
  label_feature = source.dataset_info.features[benchmark.tfds_label_key]
  raw_names = [str(name) for name in label_feature.names]
  names_file = class_names_file(resolved, '')
  if names_file:
    names = listings.read_class_names(names_file, raw_names)
  elif benchmark.needs_class_names_file:
    raise _missing_class_names(benchmark, f'(TFDS {benchmark.tfds_name} label names)')
  else:
    names = [display_name(name, benchmark) for name in raw_names]

  def load(index: int) -> tuple[np.ndarray | None, int]:
    example = source[index]
    label = int(example[benchmark.tfds_label_key])
    try:
      image = to_rgb(Image.fromarray(np.asarray(example[benchmark.tfds_image_key])))
      return clip_preprocess(image, settings.image_size), label
    except (ValueError, TypeError, OSError) as error:
      logging.debug('Cannot decode example %d of %s (%s).', index, benchmark.tfds_name, error)
      return None, label

  return LabelledImages(names, len(source), load,
                        f'TFDS {benchmark.tfds_name} split {benchmark.tfds_split}')


def read_labelled_images(resolved: ResolvedBenchmark, settings: ReadSettings) -> LabelledImages:
  """Open a classification benchmark from its folder or TFDS, as `settings.source` chooses."""
  benchmark = resolved.benchmark
  has_folder = bool(resolved.folder) and os.path.isdir(resolved.folder)
  use_folder = settings.source == 'folder' or (settings.source == 'auto' and has_folder)
  if use_folder or not benchmark.tfds_name:
    if not has_folder:
      where = resolved.folder or '(config.eval.data_dir is empty)'
      tfds_hint = (f', or prepare TFDS {benchmark.tfds_name!r}' if benchmark.tfds_name else '')
      raise FileNotFoundError(
          f'No data for {benchmark.title}: {where} is not a folder. Place it there in '
          f'image-folder layout (README, "Evaluation benchmarks"){tfds_hint}.')
    return read_image_folder(resolved, settings)
  return read_tfds(resolved, settings)


# ----------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------


def _image_root(folder: str) -> str:
  images = os.path.join(folder, 'images')
  return images if os.path.isdir(images) else folder


def _read_caption_json(path: str, image_root: str, split: str) -> list[tuple[str, str]]:
  """Read COCO captions JSON (`images` + `annotations`) or Karpathy JSON (`sentences`)."""
  with open(path, encoding='utf-8') as file:
    data = json.load(file)
  pairs = []
  if 'annotations' in data:
    files = {image['id']: image['file_name'] for image in data['images']}
    for annotation in data['annotations']:
      pairs.append((os.path.join(image_root, files[annotation['image_id']]),
                    annotation['caption']))
    return pairs
  for image in data['images']:
    if image.get('split', split) != split:
      continue
    path = os.path.join(image_root, image.get('filepath', ''), image['filename'])
    pairs.extend((path, sentence['raw']) for sentence in image['sentences'])
  return pairs


def read_captioned_images(resolved: ResolvedBenchmark, split: str = 'test') -> CaptionedImages:
  """Read the caption file of a retrieval folder (see `benchmarks` for the accepted files).

  Karpathy JSON keeps the images of `split`; COCO JSON and CSV/TSV files are taken whole. Image
  paths are relative to the folder's `images/` subfolder when it exists (CSV/TSV: to the file).

  Raises:
    FileNotFoundError: when the folder has no caption file or the file has no caption.
  """
  folder = resolved.folder
  files = [os.path.join(folder, name) for name in CAPTION_FILES
           if folder and os.path.isfile(os.path.join(folder, name))]
  if not files:
    raise FileNotFoundError(
        f'No caption file for {resolved.benchmark.title} in {folder or "config.eval.data_dir"}; '
        f'expected one of {CAPTION_FILES}.')
  path = files[0]
  if path.endswith('.json'):
    pairs = _read_caption_json(path, _image_root(folder), split)
  else:
    pairs = [(image, caption.decode('utf-8', 'replace'))
             for image, caption in listings.read_caption_table(path) if caption is not None]
  if not pairs:
    raise FileNotFoundError(f'Caption file {path!r} has no captions for split {split!r}.')
  image_index: dict[str, int] = {}
  captions, caption_image = [], []
  for image, caption in pairs:
    captions.append(caption.strip())
    caption_image.append(image_index.setdefault(image, len(image_index)))
  return CaptionedImages(list(image_index), captions, np.asarray(caption_image, np.int32),
                         f'caption file {path}')


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------


def subset_indices(size: int, max_items: int) -> np.ndarray:
  """Return all indices, or a sorted fixed-seed sample of `max_items` when it is positive."""
  if max_items <= 0 or max_items >= size:
    return np.arange(size)
  return np.sort(np.random.default_rng(0).choice(size, max_items, replace=False))


def threaded_batches(load: Callable, indices: Sequence[int], batch_size: int,
                     threads: int) -> Iterator[list]:
  """Yield `[load(i) for i in batch]` per batch; the next batch is read while one is in use."""
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:

    def submit(start: int) -> list[concurrent.futures.Future]:
      return [pool.submit(load, int(i)) for i in indices[start:start + batch_size]]

    pending = submit(0)
    for start in range(0, len(indices), batch_size):
      current = pending
      following = start + batch_size
      pending = submit(following) if following < len(indices) else []
      yield [future.result() for future in current]
