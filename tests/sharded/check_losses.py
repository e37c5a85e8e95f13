"""Compare the sharded contrastive losses with the single-device ones on 8 simulated CPU devices.

Usage: python tests/sharded/check_losses.py [--mesh data=8] [--batch-axes data,fsdp]

Every check prints one line, with the max differences for numeric checks. The exit status is 1
when any check fails.
JAX reads the device count when it starts, so XLA_FLAGS is set here before jax is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from clamp_jax.losses import (equal_caption_mask, sigmoid_contrastive_loss,  # noqa: E402
                              softmax_contrastive_loss)
from clamp_jax.sharded_losses import (sharded_sigmoid_contrastive_loss,  # noqa: E402
                                      sharded_softmax_contrastive_loss)

LOSS_TOLERANCE = 1e-5
GRAD_RELATIVE_TOLERANCE = 1e-5
GLOBAL_BATCH = 32
DIM = 16
CAPTION_LENGTH = 6
LOGIT_SCALE = 10.0
LOGIT_BIAS = -5.0


class Checker:
  """Collects pass or fail per check and prints one line per check."""

  def __init__(self, prefix: str):
    self.prefix = prefix
    self.failures = 0

  def require(self, name: str, passed: bool, detail: str = '') -> None:
    self.failures += not passed
    status = 'ok' if passed else 'FAIL'
    print(f'{status} {self.prefix} {name} {detail}'.rstrip(), flush=True)

  def close(self, name: str, actual, expected) -> None:
    """Compare scalars within LOSS_TOLERANCE, relative to the reference once it exceeds 1.

    Losses above 1 get a relative bound because the rounding error of a float32 sum of
    `batch**2` pair losses grows with its value.
    """
    difference = abs(float(actual) - float(expected))
    self.require(name, difference <= LOSS_TOLERANCE * max(1.0, abs(float(expected))),
                 f'sharded={float(actual):.8g} single={float(expected):.8g} '
                 f'max_abs_diff={difference:.3g}')

  def close_relative(self, name: str, actual, expected) -> None:
    """Max absolute difference over the array, relative to the largest reference magnitude."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    max_abs = float(np.max(np.abs(actual - expected)))
    relative = max_abs / max(float(np.max(np.abs(expected))), 1e-30)
    self.require(name, relative <= GRAD_RELATIVE_TOLERANCE,
                 f'max_abs_diff={max_abs:.3g} relative={relative:.3g}')


def make_mesh(sizes: dict[str, int]) -> Mesh:
  # `jax.sharding.Mesh` gives Auto axis types, like the training mesh.
  devices = np.array(jax.devices()[:int(np.prod(list(sizes.values())))])
  return Mesh(devices.reshape(tuple(sizes.values())), tuple(sizes))


def normalized(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
  x = rng.standard_normal((rows, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_batch(rng: np.random.Generator, repeated_captions: bool):
  """Return images, texts, input_ids and attention_mask for GLOBAL_BATCH rows.

  With repeated captions, rows draw from 5 distinct captions of different lengths, and equal
  captions get nearly equal text embeddings. They are not exactly equal, because with equal
  logits the uniform target over equal captions gives the same softmax loss as the one-hot target,
  and the loss checks would then not see missing positives. Padding ids are random, so the checks
  fail if padding is compared.
  """
  images = normalized(rng, GLOBAL_BATCH, DIM)
  if not repeated_captions:
    caption_ids = np.arange(GLOBAL_BATCH)
    texts = normalized(rng, GLOBAL_BATCH, DIM)
  else:
    caption_ids = rng.integers(0, 5, size=GLOBAL_BATCH)
    texts = normalized(rng, 5, DIM)[caption_ids] + 0.1 * normalized(rng, GLOBAL_BATCH, DIM)
    texts /= np.linalg.norm(texts, axis=-1, keepdims=True)
  lengths = 2 + caption_ids % (CAPTION_LENGTH - 1)
  attention_mask = (np.arange(CAPTION_LENGTH)[None, :] < lengths[:, None]).astype(np.int32)
  real_tokens = 100 + caption_ids[:, None] * 10 + np.arange(CAPTION_LENGTH)[None, :]
  padding = rng.integers(0, 50, size=(GLOBAL_BATCH, CAPTION_LENGTH))
  input_ids = np.where(attention_mask == 1, real_tokens, padding).astype(np.int32)
  return images, texts, input_ids, attention_mask


def put_sharded(checker: Checker, name: str, array: np.ndarray, mesh: Mesh,
                axes: tuple[str, ...], num_shards: int) -> jax.Array:
  """Place `array` split along the batch over `axes` and check that it is split."""
  spec = PartitionSpec(axes, None)
  placed = jax.device_put(array, NamedSharding(mesh, spec))
  # `shard.index` is a tuple of slices, which are not hashable before Python 3.12.
  distinct_blocks = {shard.index[0].indices(array.shape[0]) for shard in placed.addressable_shards}
  block_rows = {shard.data.shape[0] for shard in placed.addressable_shards}
  checker.require(f'{name} sharded', placed.sharding.spec == spec and
                  not placed.sharding.is_fully_replicated and
                  len(distinct_blocks) == num_shards and
                  block_rows == {array.shape[0] // num_shards},
                  f'spec={placed.sharding.spec} blocks={len(distinct_blocks)} '
                  f'rows_per_block={sorted(block_rows)}')
  return placed


def check_softmax(checker: Checker, mesh: Mesh, axes, num_shards: int, batch,
                  repeated_captions: bool) -> None:
  images, texts, input_ids, attention_mask = batch
  put = lambda name, array: put_sharded(checker, name, array, mesh, axes, num_shards)
  sharded_images, sharded_texts = put('images', images), put('texts', texts)
  tokens = {}
  positives = None
  if repeated_captions:
    tokens = {'input_ids': put('input_ids', input_ids),
              'attention_mask': put('attention_mask', attention_mask)}
    positives = equal_caption_mask(input_ids, attention_mask)

  def sharded_loss(images, texts, scale, tokens):
    return sharded_softmax_contrastive_loss(images, texts, scale, mesh, axes, **tokens)

  def single_loss(images, texts, scale):
    return softmax_contrastive_loss(images, texts, scale, positives)

  sharded_fn = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1, 2), has_aux=True))
  single_fn = jax.jit(jax.value_and_grad(single_loss, argnums=(0, 1, 2), has_aux=True))
  (loss, metrics), grads = sharded_fn(sharded_images, sharded_texts, LOGIT_SCALE, tokens)
  (expected_loss, expected_metrics), expected_grads = single_fn(images, texts, LOGIT_SCALE)

  hlo = sharded_fn.lower(sharded_images, sharded_texts, LOGIT_SCALE, tokens).compile().as_text()
  checker.require('softmax gathers over devices', 'all-gather' in hlo)
  checker.close('softmax loss', loss, expected_loss)
  for name in sorted(expected_metrics):
    checker.close(f'softmax {name}', metrics[name], expected_metrics[name])
  for name, grad, expected in zip(('grad_images', 'grad_texts', 'grad_scale'), grads,
                                  expected_grads):
    checker.close_relative(f'softmax {name}', grad, expected)


def check_sigmoid(checker: Checker, mesh: Mesh, axes, num_shards: int, batch,
                  repeated_captions: bool) -> None:
  images, texts, input_ids, attention_mask = batch
  put = lambda name, array: put_sharded(checker, name, array, mesh, axes, num_shards)
  sharded_images, sharded_texts = put('images', images), put('texts', texts)
  tokens = {}
  positives = None
  if repeated_captions:
    tokens = {'input_ids': put('input_ids', input_ids),
              'attention_mask': put('attention_mask', attention_mask)}
    positives = equal_caption_mask(input_ids, attention_mask)

  def sharded_loss(images, texts, scale, bias, tokens):
    return sharded_sigmoid_contrastive_loss(images, texts, scale, bias, mesh, axes, **tokens)

  def single_loss(images, texts, scale, bias):
    return sigmoid_contrastive_loss(images, texts, scale, bias, positives)

  sharded_fn = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1, 2, 3), has_aux=True))
  single_fn = jax.jit(jax.value_and_grad(single_loss, argnums=(0, 1, 2, 3), has_aux=True))
  (loss, metrics), grads = sharded_fn(sharded_images, sharded_texts, LOGIT_SCALE, LOGIT_BIAS,
                                      tokens)
  (expected_loss, expected_metrics), expected_grads = single_fn(images, texts, LOGIT_SCALE,
                                                                LOGIT_BIAS)

  hlo = sharded_fn.lower(sharded_images, sharded_texts, LOGIT_SCALE, LOGIT_BIAS,
                         tokens).compile().as_text()
  # A ring over one shard has no steps, so it sends nothing.
  checker.require('sigmoid rotates text blocks',
                  num_shards == 1 or 'collective-permute' in hlo)
  checker.require('sigmoid does not gather', 'all-gather' not in hlo)
  checker.close('sigmoid loss', loss, expected_loss)
  for name in sorted(expected_metrics):
    checker.close(f'sigmoid {name}', metrics[name], expected_metrics[name])
  for name, grad, expected in zip(('grad_images', 'grad_texts', 'grad_scale', 'grad_bias'),
                                  grads, expected_grads):
    checker.close_relative(f'sigmoid {name}', grad, expected)


def check_mesh(sizes: dict[str, int], batch_axes: tuple[str, ...]) -> int:
  """Run every check on one mesh and return the number of failures."""
  mesh = make_mesh(sizes)
  axes = tuple(axis for axis in batch_axes if axis in sizes)
  num_shards = int(np.prod([sizes[axis] for axis in axes]))
  mesh_name = ','.join(f'{axis}={size}' for axis, size in sizes.items())
  failures = 0
  for repeated_captions in (False, True):
    rng = np.random.default_rng(int(repeated_captions))
    batch = make_batch(rng, repeated_captions)
    captions = 'repeated' if repeated_captions else 'distinct'
    checker = Checker(f'[{mesh_name} {captions}]')
    if repeated_captions:
      # Equal captions in different shards are what the gathered or rotated tokens must find.
      positives = np.asarray(equal_caption_mask(batch[2], batch[3]))
      shard_of_row = np.arange(GLOBAL_BATCH) // (GLOBAL_BATCH // num_shards)
      cross_shard = int(np.sum(positives & (shard_of_row[:, None] != shard_of_row[None, :])))
      checker.require('batch has cross-shard positives', cross_shard > 0,
                      f'pairs={cross_shard}')
    check_softmax(checker, mesh, axes, num_shards, batch, repeated_captions)
    check_sigmoid(checker, mesh, axes, num_shards, batch, repeated_captions)
    failures += checker.failures

  checker = Checker(f'[{mesh_name} errors]')
  uneven = np.zeros((num_shards + 1, DIM), np.float32)
  for loss_fn, args in ((sharded_softmax_contrastive_loss, (LOGIT_SCALE,)),
                        (sharded_sigmoid_contrastive_loss, (LOGIT_SCALE, LOGIT_BIAS))):
    try:
      loss_fn(uneven, uneven, *args, mesh, axes)
      message = 'no error'
    except ValueError as error:
      message = str(error)
    checker.require(f'{loss_fn.__name__} rejects uneven batch', 'not divisible' in message,
                    f'message={message!r}')
  return failures + checker.failures


def parse_mesh(text: str) -> dict[str, int]:
  sizes = {}
  for part in text.split(','):
    axis, size = part.split('=')
    sizes[axis.strip()] = int(size)
  return sizes


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mesh', default='data=8',
                      help='Mesh axis sizes, comma separated, such as data=2,fsdp=2,tensor=2.')
  parser.add_argument('--batch-axes', default='data,fsdp',
                      help='Mesh axes that split the batch, comma separated, major to minor.')
  args = parser.parse_args()
  sizes = parse_mesh(args.mesh)
  if int(np.prod(list(sizes.values()))) > jax.device_count():
    print(f'FAIL mesh {sizes} needs more than the {jax.device_count()} devices', flush=True)
    return 1
  failures = check_mesh(sizes, tuple(args.batch_axes.split(',')))
  print(f'{failures} failed checks', flush=True)
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
