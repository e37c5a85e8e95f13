"""The training dataset that `config.data.train` describes: digits or web-scale image-text data.

For the web-scale kinds the pipeline is, per process:

    source streams (sources.py: split, shuffle, repeat, decode)
      -> SkipCountingIterDataset per source (drop and count bad samples)
      -> mix by weight (kind='mixture')
      -> batch -> worker processes (num_workers > 0) or one prefetch thread
      -> SkipTotalsIterDataset (running skip counts)

Each batch is a dict of numpy arrays:
  image: float32 [B, image_size, image_size, 3], CLIP-normalised.
  input_ids, attention_mask: int32 [B, data.max_length], the sample's own caption.
  data/skipped/<reason>: int64 scalars, the number of samples of this process skipped for that
    reason up to and including this batch (see quality.SKIP_REASONS).
B is `config.train.batch_size / jax.process_count()`. The iterator's `get_state()` is
JSON-serialisable, and `set_state()` resumes at exactly the next batch with the same skip counts,
as long as the sources, the process count and `num_workers` are unchanged.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import ml_collections
import numpy as np

from clamp_jax.data.captions import CaptionTokenizer
from clamp_jax.data.counting import (SkipCountingIterDataset, SkipTotalsIterDataset,
                                     sum_skip_deltas)
from clamp_jax.data.pipeline import make_digits_dataset
from clamp_jax.data.samples import ImageOptions, SampleDecoder
from clamp_jax.data.source_config import source_entries, validate_train_source
from clamp_jax.data.sources import ReadSettings, build_stream


def uses_caption_table(config: ml_collections.ConfigDict) -> bool:
  """Tell whether batches carry the table of distinct captions (digits with data.caption_table)."""
  return config.data.train.kind == 'digits' and bool(config.data.caption_table)


def make_train_dataset(config: ml_collections.ConfigDict, caption_tokenizer: CaptionTokenizer,
                       *, process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
  """Build the training dataset of `config.data.train.kind`; `iter()` on it gives batches.

  `process_index` and `process_count` default to `jax.process_index()` and
  `jax.process_count()`. The digits kind keeps its own pipeline (`make_digits_dataset`) and
  batch layout, with the whole `config.train.batch_size` per batch.
  """
  data = config.data
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  batch_size = process_batch_size(config.train.batch_size, process_count)
  if data.train.kind == 'digits':
    return make_digits_dataset(
        'train', caption_tokenizer=caption_tokenizer, templates=tuple(data.templates),
        image_size=config.model.vit.image_size, batch_size=batch_size,
        seed=config.seed, split_seed=data.split_seed, test_fraction=data.test_fraction,
        caption_table=data.caption_table, shuffle=True, repeat=True,
        process_index=process_index, process_count=process_count)

  validate_train_source(data.train)
  return make_web_dataset(config, caption_tokenizer, batch_size=batch_size,
                          process_index=process_index, process_count=process_count)


def process_batch_size(global_batch_size: int, process_count: int) -> int:
  """Return each process's share of the global batch; it must divide evenly."""
  if global_batch_size % process_count:
    raise ValueError(f'config.train.batch_size={global_batch_size} is not divisible by the '
                     f'{process_count} processes.')
  return global_batch_size // process_count


def source_seed(seed: int, process_index: int, source_index: int) -> int:
  """Derive a 32-bit seed per process and source, so their orders and crops differ."""
  sequence = np.random.SeedSequence([seed, process_index, source_index])
  return int(sequence.generate_state(1)[0])


def make_web_dataset(config: ml_collections.ConfigDict, caption_tokenizer: CaptionTokenizer, *,
                     batch_size: int, process_index: int,
                     process_count: int) -> grain.IterDataset:
  """Build the web-scale pipeline of the module docstring for one process."""
  source = config.data.train
  image_options = ImageOptions(
      image_size=config.model.vit.image_size, max_pixels=int(source.max_image_pixels),
      random_resized_crop=bool(source.random_resized_crop),
      crop_scale=tuple(float(value) for value in source.crop_scale))
  decoder = SampleDecoder(caption_tokenizer, image_options, seed=config.seed)
  settings = ReadSettings(
      seed=config.seed, process_index=process_index, process_count=process_count,
      cycle_length=source.cycle_length, shuffle_buffer=source.shuffle_buffer,
      read_threads=source.read_threads, prefetch_samples=2 * batch_size,
      templates=tuple(config.data.templates), class_names_file=source.class_names_file,
      tfds_split=source.tfds_split, tfds_data_dir=source.tfds_data_dir,
      tfds_image_key=source.tfds_image_key, tfds_caption_key=source.tfds_caption_key)

  components = []
  for index, (kind, pattern) in enumerate(source_entries(source)):
    component_settings = dataclasses.replace(
        settings, seed=source_seed(config.seed, process_index, index))
    stream = build_stream(kind, pattern, component_settings, decoder)
    components.append(SkipCountingIterDataset(
        stream.dataset, source=stream.description,
        max_skip_fraction=source.max_skip_fraction,
        min_samples=source.skip_check_min_samples, shards_per_pass=stream.shards_per_pass))
  if len(components) == 1:
    dataset = components[0]
  else:
    weights = tuple(source.weights) or (1.0,) * len(components)
    dataset = grain.IterDataset.mix(components, weights)

  dataset = dataset.batch(batch_size, drop_remainder=True).map(sum_skip_deltas)
  if source.num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=source.num_workers, per_worker_buffer_size=source.worker_buffer_size))
  else:
    dataset = grain.experimental.ThreadPrefetchIterDataset(
        dataset, prefetch_buffer_size=source.worker_buffer_size)
  return SkipTotalsIterDataset(dataset)
