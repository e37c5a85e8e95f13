"""Helpers shared by the JAX and PyTorch step benchmarks.

They use NumPy only, so the PyTorch process never imports JAX.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys

import numpy as np

MIN_TIMED_STEPS = 5
BATCH_SEED = 0


def synthetic_batch(batch_size: int, caption_length: int, image_size: int, vocab_size: int,
                    pad_id: int = 0, seed: int = BATCH_SEED) -> dict[str, np.ndarray]:
  """Random images and right-padded random captions in the layout of the training data.

  Images are float32 `[batch, size, size, 3]` drawn from N(0, 1), the range of CLIP-normalised
  pixels. Each caption has a real length drawn uniformly from `[ceil(length / 2), length]`,
  followed by `pad_id`, which the mask hides, so its value does not change the work.
  `input_ids` and `attention_mask` are int32 `[batch, length]`. The same arguments give the same
  arrays in both benchmarks, so both run the same padding pattern.
  """
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch_size, image_size, image_size, 3), dtype=np.float32)
  lengths = rng.integers(math.ceil(caption_length / 2), caption_length, endpoint=True,
                         size=batch_size)
  mask = (np.arange(caption_length)[None, :] < lengths[:, None]).astype(np.int32)
  tokens = rng.integers(0, vocab_size, size=(batch_size, caption_length), dtype=np.int32)
  input_ids = np.where(mask == 1, tokens, pad_id).astype(np.int32)
  return {'image': images, 'input_ids': input_ids, 'attention_mask': mask}


def parse_sizes(text: str, name: str) -> list[int]:
  """Parse a comma-separated list of positive integers such as '8,16,32'. '' gives []."""
  if not text:
    return []
  try:
    sizes = [int(part) for part in text.split(',')]
  except ValueError:
    sys.exit(f'error: --{name}={text!r} is not a comma-separated list of integers.')
  if any(size <= 0 for size in sizes):
    sys.exit(f'error: --{name}={text!r} has a size below 1.')
  return sizes


def measured_points(batch_size: int, caption_length: int, sweep_batch_sizes: list[int],
                    sweep_caption_lengths: list[int]) -> list[tuple[int, int]]:
  """`(batch_size, caption_length)` pairs to time, without repeats.

  Without sweep sizes this is the one pair given. Otherwise the batch sizes run at
  `caption_length` and the caption lengths at `batch_size`, not every combination.
  """
  if not sweep_batch_sizes and not sweep_caption_lengths:
    return [(batch_size, caption_length)]
  points = [(size, caption_length) for size in sweep_batch_sizes]
  points += [(batch_size, length) for length in sweep_caption_lengths]
  return list(dict.fromkeys(points))


def check_step_counts(steps: int, warmup: int) -> None:
  if steps < MIN_TIMED_STEPS:
    sys.exit(f'error: --steps={steps}; time at least {MIN_TIMED_STEPS} steps for a median.')
  if warmup < 0:
    sys.exit(f'error: --warmup={warmup} must not be negative.')


def peak_rss_bytes() -> int:
  """Peak resident memory of this process so far (Linux reports `ru_maxrss` in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_statistics(step_seconds: list[float], batch_size: int, tokens_per_sample: int,
                    flops_per_step: float | None, peak_gflops: float | None) -> dict:
  """Median step time and the rates derived from it.

  `tokens_per_sample` counts every position the LLM runs per caption: the padded caption
  length plus the prompts. MFU is the achieved FLOP rate over `peak_gflops`.
  """
  median = statistics.median(step_seconds)
  result = {
      'step_seconds_median': median,
      'step_seconds_min': min(step_seconds),
      'step_seconds_max': max(step_seconds),
      'samples_per_second': batch_size / median,
      'tokens_per_second': batch_size * tokens_per_sample / median,
      'flops_per_step': flops_per_step,
      'achieved_gflops': None,
      'mfu': None,
  }
  if flops_per_step:
    result['achieved_gflops'] = flops_per_step / median / 1e9
    if peak_gflops:
      result['mfu'] = result['achieved_gflops'] / peak_gflops
  return result


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
  """Render `rows` as a Markdown table with `columns` of `(key, heading, format spec)`.

  A missing or None value prints as '-'.
  """
  lines = ['| ' + ' | '.join(heading for _, heading, _ in columns) + ' |',
           '|' + '|'.join(' --- ' for _ in columns) + '|']
  for row in rows:
    cells = []
    for key, _, spec in columns:
      value = row.get(key)
      cells.append('-' if value is None else format(value, spec))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


# Columns of the per-point table that both benchmarks print.
POINT_COLUMNS = [
    ('batch_size', 'batch', 'd'),
    ('caption_length', 'caption tokens', 'd'),
    ('tokens_per_sample', 'LLM tokens per sample', 'd'),
    ('compile_seconds', 'compile s', '.1f'),
    ('step_seconds_median', 'step s (median)', '.3f'),
    ('samples_per_second', 'samples/s', '.2f'),
    ('tokens_per_second', 'tokens/s', '.0f'),
    ('flops_per_step', 'FLOPs per step', '.3e'),
    ('achieved_gflops', 'GFLOP/s', '.1f'),
    ('mfu', 'MFU', '.3f'),
    ('peak_rss_gib', 'peak RSS GiB', '.2f'),
    ('host_state_seconds', 'host state s', '.3f'),
]
