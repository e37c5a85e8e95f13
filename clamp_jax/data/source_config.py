"""Checks of the `config.data.train` section, cheap enough to run before JAX starts.

`validate_train_source` raises ValueError with one line that names the field, its value and the
fix. It also checks that the named files exist, so a wrong path fails before any model loads.
"""

from __future__ import annotations

import os

import ml_collections

from clamp_jax.data import paths

KINDS = ('digits', 'webdataset', 'folder', 'csv', 'array_record', 'tfds', 'mixture')
# Kinds that a mixture entry may name.
MIXABLE_KINDS = ('webdataset', 'folder', 'csv', 'array_record', 'tfds')


def parse_mixture_entry(entry: str) -> tuple[str, str]:
  """Split a mixture entry 'KIND:PATTERN' into (kind, pattern)."""
  kind, separator, pattern = entry.partition(':')
  if not separator or kind not in MIXABLE_KINDS or not pattern:
    raise ValueError(
        f'config.data.train.sources entry {entry!r} is not KIND:PATTERN with KIND one of '
        f'{MIXABLE_KINDS}, e.g. webdataset:/data/laion/{{00000..01066}}.tar.')
  return kind, pattern


def source_entries(source: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """Return the (kind, pattern) pairs that `config.data.train` reads: one, or a mixture's."""
  if source.kind == 'mixture':
    return [parse_mixture_entry(entry) for entry in source.sources]
  return [(source.kind, source.pattern)]


def _check_files(kind: str, pattern: str, field: str) -> None:
  expanded = os.path.expanduser(pattern)
  if kind in ('webdataset', 'array_record'):
    try:
      paths.expand_pattern(expanded)
    except FileNotFoundError as error:
      raise ValueError(f'{field}: {error}') from None
  elif kind == 'folder' and not os.path.isdir(expanded):
    raise ValueError(f'{field}={pattern!r} is not a folder; give the root folder with one '
                     'subfolder per class.')
  elif kind == 'csv' and not os.path.isfile(expanded):
    raise ValueError(f'{field}={pattern!r} does not exist; give a .csv or .tsv file of '
                     'path,caption rows.')


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def validate_train_source(source: ml_collections.ConfigDict) -> None:
  """Reject a `config.data.train` section that cannot work (see the module docstring)."""
  _require(source.kind in KINDS, f'config.data.train.kind={source.kind!r} is not one of {KINDS}.')
  if source.kind == 'digits':
    return
  if source.kind == 'mixture':
    _require(len(source.sources) > 0,
             "config.data.train.sources is empty; kind='mixture' needs KIND:PATTERN entries.")
    _require(not source.weights or len(source.weights) == len(source.sources),
             f'config.data.train.weights has {len(source.weights)} entries for '
             f'{len(source.sources)} sources; give one weight per source or none.')
    _require(all(weight > 0 for weight in source.weights),
             f'config.data.train.weights={tuple(source.weights)} must all be positive.')
    field = 'config.data.train.sources'
  else:
    _require(bool(source.pattern),
             f"config.data.train.pattern is empty; kind={source.kind!r} needs it, e.g. "
             "--config.data.train.pattern='/data/shards/{00000..00099}.tar'.")
    field = 'config.data.train.pattern'
  for kind, pattern in source_entries(source):
    _check_files(kind, pattern, field)

  _require(source.num_workers >= 0,
           f'config.data.train.num_workers={source.num_workers} must be >= 0.')
  for name in ('worker_buffer_size', 'cycle_length', 'max_image_pixels'):
    _require(source[name] >= 1, f'config.data.train.{name}={source[name]} must be >= 1.')
  for name in ('shuffle_buffer', 'read_threads', 'skip_check_min_samples'):
    _require(source[name] >= 0, f'config.data.train.{name}={source[name]} must be >= 0.')
  _require(0 <= source.max_skip_fraction <= 1,
           f'config.data.train.max_skip_fraction={source.max_skip_fraction} must be in [0, 1].')
  scale = tuple(source.crop_scale)
  _require(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
           f'config.data.train.crop_scale={scale} must be (min, max) with '
           '0 < min <= max <= 1.')
