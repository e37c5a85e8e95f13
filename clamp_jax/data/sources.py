"""Per-source Grain streams of decoded samples: shuffled, repeated and split across processes.

Each builder returns an infinite `IterDataset` of example dicts and `Skipped`/`ShardEnd` markers,
reading only this process's share of the source:

- webdataset: the shard list is split across processes (`paths[process_index::process_count]`).
  Each epoch reads the process's shards in a new seeded order, `cycle_length` shards at a time
  (interleaved), and shuffles samples in windows of `shuffle_buffer` (Grain's
  `WindowShuffleIterDataset`). Decoding runs after the shuffle.
- folder, csv, array_record, tfds: random-access lists split the same way and shuffled globally
  with a new seeded order per epoch. Reading and decoding run on `read_threads` threads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence

import grain
import numpy as np

from clamp_jax.data import listings, paths
from clamp_jax.data.captions import fill_template
from clamp_jax.data.records import decode_record
from clamp_jax.data.samples import RawSample
from clamp_jax.data.tar_reader import TarShardDataset

TFDS_INSTALL_HINT = "pip install 'clamp-jax[tfds]'"


@dataclasses.dataclass(frozen=True)
class ReadSettings:
  """Settings shared by all sources (see the config comments of data.train)."""

  seed: int
  process_index: int
  process_count: int
  cycle_length: int = 8
  shuffle_buffer: int = 1000
  read_threads: int = 8
  prefetch_samples: int = 256
  templates: tuple[str, ...] = ('a photo of a {}.',)
  class_names_file: str = ''
  tfds_split: str = 'train'
  tfds_data_dir: str = ''
  tfds_image_key: str = 'image'
  tfds_caption_key: str = 'caption'


@dataclasses.dataclass
class SourceStream:
  """A built source: the stream, its description for messages, and its shards per pass."""

  dataset: grain.IterDataset
  description: str
  shards_per_pass: int | None


def choose_template(seed: int, position: int, count: int) -> int:
  """Pick a template index from the seed and the sample's position in the repeated stream."""
  if count == 1:
    return 0
  return int(np.random.default_rng((seed, position)).integers(count))


class _OpenShard:
  """Map a shard path at stream position `index` to its `TarShardDataset`."""

  def __call__(self, index: int, path: str) -> TarShardDataset:
    return TarShardDataset(path, index)


class _ReadFolderImage:
  """Read an image file and caption it with a class-name template."""

  def __init__(self, class_names: Sequence[str], templates: Sequence[str], seed: int,
               decoder: Callable):
    self.class_names = list(class_names)
    self.templates = list(templates)
    self.seed = seed
    self.decoder = decoder

  def __call__(self, position: int, item: tuple[str, int]):
    path, class_index = item
    template = self.templates[choose_template(self.seed, position, len(self.templates))]
    caption = fill_template(template, self.class_names[class_index])
    return self.decoder(RawSample(key=path, image=_read_file(path), caption=caption,
                                  seed_parts=(position,)))


class _ReadListedImage:
  """Read the image file of a `(path, caption)` row."""

  def __init__(self, decoder: Callable):
    self.decoder = decoder

  def __call__(self, position: int, item: tuple[str, bytes | None]):
    path, caption = item
    return self.decoder(RawSample(key=path, image=_read_file(path), caption=caption,
                                  seed_parts=(position,)))


class _ReadRecord:
  """Parse and decode one ArrayRecord record."""

  def __init__(self, decoder: Callable):
    self.decoder = decoder

  def __call__(self, position: int, record: bytes):
    return self.decoder(decode_record(record, (position,)))


class _ReadTfdsExample:
  """Turn a TFDS example dict into a `RawSample` and decode it."""

  def __init__(self, image_key: str, caption_key: str, class_names: Sequence[str] | None,
               templates: Sequence[str], seed: int, decoder: Callable):
    self.image_key = image_key
    self.caption_key = caption_key
    self.class_names = list(class_names) if class_names else None
    self.templates = list(templates)
    self.seed = seed
    self.decoder = decoder

  def __call__(self, position: int, example: dict):
    image = example.get(self.image_key)
    caption = example.get(self.caption_key)
    if caption is not None and self.class_names is not None:
      template = self.templates[choose_template(self.seed, position, len(self.templates))]
      caption = fill_template(template, self.class_names[int(caption)])
    elif isinstance(caption, np.ndarray):
      caption = caption.item()
    image = None if image is None else np.asarray(image)
    return self.decoder(RawSample(key=str(position), image=image, caption=caption,
                                  seed_parts=(position,)))


def _read_file(path: str) -> bytes | None:
  """Return the file's bytes, or None when it cannot be read (counted as a missing image)."""
  try:
    with open(path, 'rb') as file:
      return file.read()
  except OSError as error:
    logging.debug('Cannot read image %s (%s).', path, error)
    return None


def webdataset_stream(pattern: str, settings: ReadSettings, decoder: Callable) -> SourceStream:
  """Build the stream of a webdataset shard pattern (see the module docstring)."""
  shard_paths = paths.expand_pattern(pattern)
  names, missing, first_missing = paths.count_missing(pattern)
  if missing:
    logging.warning('%d of the %d shards named by %r do not exist (first: %s); reading the '
                    'other %d.', missing, names, pattern, first_missing, len(shard_paths))
  description = f'webdataset pattern {pattern!r}'
  mine = paths.split_for_process(shard_paths, settings.process_index, settings.process_count,
                                 description)
  shards = grain.MapDataset.source(mine).shuffle(seed=settings.seed).repeat()
  shard_datasets = shards.map_with_index(_OpenShard())
  dataset = grain.experimental.InterleaveIterDataset(
      shard_datasets, cycle_length=min(settings.cycle_length, len(mine)))
  if settings.shuffle_buffer > 1:
    dataset = grain.experimental.WindowShuffleIterDataset(
        dataset, window_size=settings.shuffle_buffer, seed=settings.seed)
  dataset = dataset.map(decoder)
  logging.info('Reading %d of %d shards of %r in this process.', len(mine), len(shard_paths),
               pattern)
  return SourceStream(dataset, description, len(mine))


def _map_style_stream(items: grain.MapDataset, reader: Callable, settings: ReadSettings,
                      description: str) -> SourceStream:
  """Split, shuffle, repeat and read a random-access source on `read_threads` threads."""
  if len(items) < settings.process_count:
    raise ValueError(f'{description} has {len(items)} samples for {settings.process_count} '
                     'processes; every process needs at least one.')
  mine = items[settings.process_index::settings.process_count]
  dataset = mine.shuffle(seed=settings.seed).repeat().map_with_index(reader)
  read_options = grain.ReadOptions(num_threads=settings.read_threads,
                                   prefetch_buffer_size=settings.prefetch_samples)
  return SourceStream(dataset.to_iter_dataset(read_options), description, None)


def folder_stream(root: str, settings: ReadSettings, decoder: Callable) -> SourceStream:
  items, class_names = listings.list_image_folder(root, settings.class_names_file)
  logging.info('Image folder %s: %d images in %d classes.', root, len(items), len(class_names))
  reader = _ReadFolderImage(class_names, settings.templates, settings.seed, decoder)
  return _map_style_stream(grain.MapDataset.source(items), reader, settings,
                           f'image folder {root!r}')


def csv_stream(path: str, settings: ReadSettings, decoder: Callable) -> SourceStream:
  rows = listings.read_caption_table(path)
  logging.info('Caption file %s: %d rows.', path, len(rows))
  return _map_style_stream(grain.MapDataset.source(rows), _ReadListedImage(decoder), settings,
                           f'caption file {path!r}')


def array_record_stream(pattern: str, settings: ReadSettings, decoder: Callable) -> SourceStream:
  record_paths = paths.expand_pattern(pattern)
  source = grain.sources.ArrayRecordDataSource(record_paths)
  logging.info('ArrayRecord pattern %s: %d records in %d files.', pattern, len(source),
               len(record_paths))
  return _map_style_stream(grain.MapDataset.source(source), _ReadRecord(decoder), settings,
                           f'array_record pattern {pattern!r}')


def tfds_stream(name: str, settings: ReadSettings, decoder: Callable) -> SourceStream:
  """Read a prepared TFDS dataset through `tfds.data_source` (random access, no TensorFlow ops).

  A `ClassLabel` caption feature becomes a caption from `templates`; a `Text` feature is used
  as it is.
  NOTE: not covered by the test suite, which does not install TensorFlow Datasets.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        f"config.data.train.kind='tfds' needs TensorFlow Datasets; install it with "
        f'{TFDS_INSTALL_HINT}.') from error
  source = tfds.data_source(name, split=settings.tfds_split,
                            data_dir=settings.tfds_data_dir or None)
  features = source.dataset_info.features
  for key in (settings.tfds_image_key, settings.tfds_caption_key):
    if key not in features:
      raise ValueError(f'TFDS dataset {name!r} has no feature {key!r}; its features are '
                       f'{sorted(features)}.')
  caption_feature = features[settings.tfds_caption_key]
  class_names = getattr(caption_feature, 'names', None)
  reader = _ReadTfdsExample(settings.tfds_image_key, settings.tfds_caption_key, class_names,
                            settings.templates, settings.seed, decoder)
  return _map_style_stream(grain.MapDataset.source(source), reader, settings,
                           f'TFDS dataset {name!r} split {settings.tfds_split!r}')


STREAM_BUILDERS = {
    'webdataset': webdataset_stream,
    'folder': folder_stream,
    'csv': csv_stream,
    'array_record': array_record_stream,
    'tfds': tfds_stream,
}


def build_stream(kind: str, pattern: str, settings: ReadSettings,
                 decoder: Callable) -> SourceStream:
  """Build the stream of one source of `kind` ('webdataset', 'folder', 'csv', ...)."""
  if kind not in STREAM_BUILDERS:
    raise ValueError(f'Unknown source kind {kind!r}; expected one of {sorted(STREAM_BUILDERS)}.')
  return STREAM_BUILDERS[kind](os.path.expanduser(pattern), settings, decoder)
