"""Reasons for skipping a training sample, the markers that carry them, and the skip-rate check.

Readers and decoders report a bad sample by emitting `Skipped(reason)` in its place, and the
counting stage (`counting.py`) drops the marker and counts it. Every batch then reports
the running count of each reason under `data/skipped/<reason>`.
"""

from __future__ import annotations

import dataclasses

# Reasons in the order of the counters. Shard-level failures count once per shard read.
SKIP_REASONS = (
    'missing_image',  # The sample has no image file (or the listed image file does not exist).
    'missing_caption',  # The sample has no caption (.txt file, CSV column or TFDS feature).
    'empty_caption',  # The caption is empty or only whitespace.
    'caption_not_utf8',  # The caption bytes are not valid UTF-8.
    'empty_image',  # The image file has zero bytes.
    'corrupt_image',  # Pillow cannot decode the image, e.g. because it is truncated.
    'too_many_pixels',  # Width times height exceeds data.train.max_image_pixels.
    'corrupt_record',  # An ArrayRecord record that is not in the make_shards record layout.
    'truncated_tar',  # A tar shard ends inside a member or has an invalid header after the first.
    'unreadable_shard',  # A shard that cannot be opened or is not a tar file at all.
)


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Marker that replaces a sample which cannot be used; `reason` is one of SKIP_REASONS."""

  reason: str

  def __post_init__(self):
    if self.reason not in SKIP_REASONS:
      raise ValueError(f'Unknown skip reason {self.reason!r}; expected one of {SKIP_REASONS}.')


@dataclasses.dataclass(frozen=True)
class ShardEnd:
  """Marker that a reader finished one shard; it carries no sample and is never counted."""


class DataQualityError(ValueError):
  """Too many training samples were skipped, or a whole pass over the shards gave no sample."""


def format_counts(counts: dict[str, int]) -> str:
  """Format the non-zero counts as 'reason=count, ...', or 'none'."""
  parts = [f'{reason}={counts[reason]}' for reason in SKIP_REASONS if counts.get(reason)]
  return ', '.join(parts) if parts else 'none'


def skip_fraction_error(source: str, counts: dict[str, int], used: int,
                        max_skip_fraction: float) -> DataQualityError:
  """Build the error for a source whose share of skipped samples is above the limit."""
  skipped = sum(counts.values())
  total = skipped + used
  return DataQualityError(
      f'{source}: skipped {skipped} of {total} samples read ({skipped / total:.1%}, above '
      f'config.data.train.max_skip_fraction={max_skip_fraction}). Skipped by reason: '
      f'{format_counts(counts)}. Check that the pattern names the intended files and that they '
      'hold image-caption pairs (write shards with python -m clamp_jax.data.make_shards), or '
      'raise config.data.train.max_skip_fraction.')


def empty_pass_error(source: str, counts: dict[str, int], shards: int) -> DataQualityError:
  """Build the error for a source whose shards, all read once, gave no usable sample."""
  return DataQualityError(
      f'{source}: read {shards} shards and found no usable image-caption sample. Skipped by '
      f'reason: {format_counts(counts)}. Check that the pattern names webdataset tar shards with '
      'KEY.jpg/png/webp and KEY.txt files (write them with python -m clamp_jax.data.make_shards).')
