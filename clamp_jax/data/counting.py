"""Grain stages that drop skipped samples, count them by reason, and report the counts per batch.

Counting happens in two stages so that the counts stay exact with worker processes and across
resume:

1. `SkipCountingIterDataset`, per source and per worker, drops `Skipped` and `ShardEnd` markers.
   Each sample it passes on carries, under `SKIP_DELTA_KEY`, the skips counted since the previous
   sample it passed. Batching stacks these vectors, and `sum_skip_deltas` adds them up per batch.
   This stage also raises `DataQualityError` when its source skips too much.
2. `SkipTotalsIterDataset`, in the main process after the worker processes, adds the per-batch
   deltas to running totals. It replaces `SKIP_DELTA_KEY` with one int64 scalar per reason under
   `data/skipped/<reason>`.

Both stages keep their counts in the iterator state, so a restored iterator continues the counts
of the run that saved it.
"""

from __future__ import annotations

import grain
import numpy as np

from clamp_jax.data.quality import (SKIP_REASONS, ShardEnd, Skipped, empty_pass_error,
                                    skip_fraction_error)

SKIP_DELTA_KEY = '_skip_delta'
SKIPPED_PREFIX = 'data/skipped/'


def _zero_counts() -> dict[str, int]:
  return {reason: 0 for reason in SKIP_REASONS}


class SkipCountingIterator(grain.DatasetIterator):
  """Iterator of `SkipCountingIterDataset`."""

  def __init__(self, parent: grain.DatasetIterator, source: str, max_skip_fraction: float,
               min_samples: int, shards_per_pass: int | None):
    super().__init__(parent)
    self._source = source
    self._max_skip_fraction = max_skip_fraction
    self._min_samples = min_samples
    self._shards_per_pass = shards_per_pass
    self._counts = _zero_counts()  # Skipped samples so far, by reason.
    self._reported = _zero_counts()  # The part of `_counts` already attached to a sample.
    self._used = 0  # Samples passed on.
    self._shard_ends = 0

  def __next__(self):
    while True:
      element = next(self._parent)
      if isinstance(element, ShardEnd):
        self._shard_ends += 1
        self._check_empty_pass()
        continue
      if isinstance(element, Skipped):
        self._counts[element.reason] += 1
        self._check_skip_fraction()
        continue
      self._used += 1
      delta = np.array([self._counts[reason] - self._reported[reason]
                        for reason in SKIP_REASONS], dtype=np.int64)
      self._reported = dict(self._counts)
      return {**element, SKIP_DELTA_KEY: delta}

  def _check_skip_fraction(self) -> None:
    skipped = sum(self._counts.values())
    total = skipped + self._used
    if total >= self._min_samples and skipped > self._max_skip_fraction * total:
      raise skip_fraction_error(self._source, self._counts, self._used, self._max_skip_fraction)

  def _check_empty_pass(self) -> None:
    if (self._shards_per_pass and self._used == 0
        and self._shard_ends >= self._shards_per_pass):
      raise empty_pass_error(self._source, self._counts, self._shard_ends)

  def get_state(self) -> dict:
    return {'parent': self._parent.get_state(), 'counts': dict(self._counts),
            'reported': dict(self._reported), 'used': self._used,
            'shard_ends': self._shard_ends}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state['parent'])
    self._counts = {reason: int(state['counts'].get(reason, 0)) for reason in SKIP_REASONS}
    self._reported = {reason: int(state['reported'].get(reason, 0)) for reason in SKIP_REASONS}
    self._used = int(state['used'])
    self._shard_ends = int(state['shard_ends'])


class SkipCountingIterDataset(grain.IterDataset):
  """Drop `Skipped` and `ShardEnd` markers, count the skips, and attach the counts to samples.

  Args:
    parent: samples (dicts of arrays) mixed with markers.
    source: the source's description for error messages, e.g. "webdataset '/d/{0..9}.tar'".
    max_skip_fraction: raise `DataQualityError` once more than this share of the samples read
      has been skipped ...
    min_samples: ... but only after this many samples (used plus skipped) have been read.
    shards_per_pass: raise `DataQualityError` when this many `ShardEnd` markers have passed
      without a single usable sample; None for sources without shards. A worker process reads
      only part of the shards, so there the check fires after up to `num_workers` passes.
  """

  def __init__(self, parent: grain.IterDataset, *, source: str, max_skip_fraction: float,
               min_samples: int, shards_per_pass: int | None = None):
    super().__init__(parent)
    self._source = source
    self._max_skip_fraction = max_skip_fraction
    self._min_samples = min_samples
    self._shards_per_pass = shards_per_pass

  def __iter__(self) -> SkipCountingIterator:
    return SkipCountingIterator(self._parent.__iter__(), self._source, self._max_skip_fraction,
                                self._min_samples, self._shards_per_pass)

  def __str__(self) -> str:
    return f'SkipCountingIterDataset({self._source})'


def sum_skip_deltas(batch: dict) -> dict:
  """Replace a batch's stacked per-sample skip deltas `[B, reasons]` by their sum `[reasons]`."""
  return {**batch, SKIP_DELTA_KEY: batch[SKIP_DELTA_KEY].sum(axis=0)}


class SkipTotalsIterator(grain.DatasetIterator):
  """Iterator of `SkipTotalsIterDataset`."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._totals = _zero_counts()

  def __next__(self) -> dict:
    batch = dict(next(self._parent))
    delta = batch.pop(SKIP_DELTA_KEY)
    for reason, count in zip(SKIP_REASONS, delta):
      self._totals[reason] += int(count)
    for reason in SKIP_REASONS:
      batch[SKIPPED_PREFIX + reason] = np.int64(self._totals[reason])
    return batch

  def get_state(self) -> dict:
    return {'parent': self._parent.get_state(), 'totals': dict(self._totals)}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state['parent'])
    self._totals = {reason: int(state['totals'].get(reason, 0)) for reason in SKIP_REASONS}


class SkipTotalsIterDataset(grain.IterDataset):
  """Turn per-batch skip deltas into running totals under `data/skipped/<reason>` (int64)."""

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent)

  def __iter__(self) -> SkipTotalsIterator:
    return SkipTotalsIterator(self._parent.__iter__())

  def __str__(self) -> str:
    return 'SkipTotalsIterDataset'
