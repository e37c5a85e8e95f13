"""Matmul rate of this machine under JAX: `jnp.dot` on square matrices, per dtype.

The rate is the MFU denominator of `bench/step.py`, and `bench/xla_flags.py` compares it across
XLA_FLAGS settings. XLA reads XLA_FLAGS once, when the backend starts, so a flag change needs a new
process.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp

DTYPES = ('float32', 'bfloat16')


def measure_matmul_rate(dtype: str, size: int = 2048, repeats: int = 7,
                        backend: str = 'xla') -> dict:
  """Time `jnp.dot` (or with `backend='onednn'`, `clamp_jax.models.onednn.matmul`) of two
  `[size, size]` matrices of `dtype`, output in the same dtype.

  Returns the median of `repeats` timed calls after one warm-up call, in seconds and GFLOP/s
  (`2 * size**3` FLOPs per call). It also returns the largest difference from a float32 product
  of the same inputs, relative to that product's largest entry, which shows when an XLA flag
  changes the numerics.
  """
  key_a, key_b = jax.random.split(jax.random.key(0))
  a32 = jax.random.normal(key_a, (size, size), jnp.float32)
  b32 = jax.random.normal(key_b, (size, size), jnp.float32)
  a, b = a32.astype(dtype), b32.astype(dtype)
  if backend == 'onednn':
    from clamp_jax.models import onednn

    dot = jax.jit(onednn.matmul)
  else:
    dot = jax.jit(jnp.dot)
  product = dot(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  exact = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
  error = float(jnp.max(jnp.abs(product.astype(jnp.float32) - exact)) / jnp.max(jnp.abs(exact)))
  return {'dtype': dtype, 'backend': backend, 'size': size, 'repeats': repeats,
          'seconds': seconds,
          'gflops': 2 * size ** 3 / seconds / 1e9, 'max_relative_error': error}


def inspect_bfloat16_dot(size: int = 2048) -> dict:
  """Report how XLA compiles a bfloat16 `jnp.dot`: whether its optimised HLO computes in
  float32 (the inputs converted up), and the kinds of library fusions it uses (such as
  `__ynn_fusion` or `__onednn_fusion`)."""
  a = jnp.ones((size, size), jnp.bfloat16)
  text = jax.jit(jnp.dot).lower(a, a).compile().as_text()
  kinds = sorted({line.split('"kind":"')[1].split('"')[0] for line in text.splitlines()
                  if '"kind":"' in line})
  # A bfloat16 dot that accumulates in float32 converts only its output. An upcast dot converts
  # its `[size, size]` inputs to float32 first.
  upcast = re.search(r'= f32\[\d+,\d+\]\{[\d,]*\} convert\(', text) is not None
  return {'upcast_to_float32': upcast, 'fusion_kinds': kinds}


def measure_matmul_rates(size: int = 2048, repeats: int = 7, dtypes=DTYPES) -> dict[str, dict]:
  """`measure_matmul_rate` for each of `dtypes`, by dtype name."""
  return {dtype: measure_matmul_rate(dtype, size, repeats) for dtype in dtypes}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=2048, help='Matrix side in elements.')
  parser.add_argument('--repeats', type=int, default=7, help='Timed calls per dtype.')
  parser.add_argument('--dtypes', default=','.join(DTYPES),
                      help='Comma-separated dtypes, from: ' + ', '.join(DTYPES) + '.')
  args = parser.parse_args()
  rates = measure_matmul_rates(args.size, args.repeats, args.dtypes.split(','))
  print(json.dumps({'devices': [str(d) for d in jax.devices()], 'rates': rates,
                    'bfloat16_dot': inspect_bfloat16_dot(args.size)}))


if __name__ == '__main__':
  main()
