"""Write webdataset tar shards (or ArrayRecord files) from an image folder or a CSV/TSV file.

    python -m clamp_jax.data.make_shards --input=/data/pets --output_dir=/data/pets_shards
    python -m clamp_jax.data.make_shards --input=captions.tsv --output_dir=out --samples_per_shard=5000

An input folder has one subfolder per class, and each image's caption is `--template` filled
with the class name. An input file has `path<TAB>caption` rows (commas for .csv). Each sample
becomes `KEY.<ext>` (the image), `KEY.txt` (the caption) and `KEY.json` (the source path), with
KEY a 9-digit running number, as img2dataset writes them. Samples whose image cannot be read or
decoded, or whose caption is missing, empty or not UTF-8, are left out and counted by reason.
The last line printed is the pattern to pass as `--config.data.train.pattern`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import io
import json
import os
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
from PIL import Image

from clamp_jax.data import images, listings
from clamp_jax.data.captions import fill_template
from clamp_jax.data.quality import format_counts
from clamp_jax.data.records import encode_record

FORMATS = ('webdataset', 'array_record')
IMAGE_FORMATS = {'keep': None, 'jpg': 'JPEG', 'png': 'PNG', 'webp': 'WEBP'}
_CHUNK = 256  # Samples validated at a time by the thread pool.


@dataclasses.dataclass
class Sample:
  """One validated sample, ready to write."""

  source: str
  caption: str
  extension: str
  image: bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m clamp_jax.data.make_shards',
      description='Write webdataset tar shards (KEY.jpg/png/webp + KEY.txt + KEY.json) or '
                  'ArrayRecord files from an image folder or a CSV/TSV of path,caption rows.')
  parser.add_argument('--input', required=True,
                      help='an image folder with one subfolder per class, or a .csv/.tsv file '
                           'of path,caption rows (relative paths are relative to the file)')
  parser.add_argument('--output_dir', required=True, help='folder to write the shards to')
  parser.add_argument('--prefix', default='',
                      help='shard name prefix: shards are PREFIX00000.tar, PREFIX00001.tar, ...')
  parser.add_argument('--format', choices=FORMATS, default='webdataset',
                      help='webdataset tar shards or ArrayRecord files (default: webdataset)')
  parser.add_argument('--samples_per_shard', type=int, default=10000,
                      help='samples per shard file (default: 10000)')
  parser.add_argument('--image_format', choices=tuple(IMAGE_FORMATS), default='keep',
                      help="'keep' copies each image file's bytes unchanged (default); jpg, png "
                           'or webp re-encode it as RGB')
  parser.add_argument('--template', default='a photo of a {}.',
                      help="image folders: caption template with one '{}' for the class name "
                           "(default: 'a photo of a {}.')")
  parser.add_argument('--class_names_file', default='',
                      help='image folders: class names, one per line in sorted subfolder order '
                           'or folder<TAB>name lines (default: the subfolder names)')
  parser.add_argument('--shuffle_seed', type=int, default=0,
                      help='seed of the sample order shuffle; -1 keeps the input order '
                           '(default: 0, so shards of a class folder mix the classes)')
  parser.add_argument('--max_image_pixels', type=int, default=89_478_485,
                      help='leave out images with more pixels than this (default: 89478485)')
  parser.add_argument('--threads', type=int, default=8,
                      help='threads that read and check images (default: 8)')
  args = parser.parse_args(argv)
  if args.samples_per_shard <= 0:
    parser.error(f'--samples_per_shard={args.samples_per_shard} must be positive.')
  if args.threads <= 0:
    parser.error(f'--threads={args.threads} must be positive.')
  return args


def list_inputs(args: argparse.Namespace) -> list[tuple[str, bytes | str | None]]:
  """List `(image_path, caption)` pairs from the input folder or caption file."""
  if os.path.isdir(args.input):
    items, class_names = listings.list_image_folder(args.input, args.class_names_file)
    return [(path, fill_template(args.template, class_names[label])) for path, label in items]
  return listings.read_caption_table(args.input)


def check_sample(path: str, caption: bytes | str | None, image_format: str,
                 max_pixels: int) -> Sample | str:
  """Read and check one sample; return it ready to write, or the skip reason."""
  if caption is None:
    return 'missing_caption'
  if isinstance(caption, bytes):
    try:
      caption = caption.decode('utf-8')
    except UnicodeDecodeError:
      return 'caption_not_utf8'
  caption = caption.strip()
  if not caption:
    return 'empty_caption'
  try:
    with open(path, 'rb') as file:
      data = file.read()
  except OSError:
    return 'missing_image'
  if not data:
    return 'empty_image'
  try:
    image = images.open_image(data, max_pixels)
  except images.ImageTooLargeError:
    return 'too_many_pixels'
  except Image.DecompressionBombError:
    return 'too_many_pixels'
  except Exception:  # pylint: disable=broad-exception-caught
    # Pillow raises many exception types for undecodable data.
    return 'corrupt_image'
  pillow_format = IMAGE_FORMATS[image_format]
  if pillow_format is None:
    extension = os.path.splitext(path)[1].lower().lstrip('.')
    return Sample(path, caption, extension, data)
  buffer = io.BytesIO()
  options = {'quality': 95} if pillow_format in ('JPEG', 'WEBP') else {}
  images.to_rgb(image).save(buffer, format=pillow_format, **options)
  return Sample(path, caption, image_format, buffer.getvalue())


class ShardWriter:
  """Write samples into numbered shard files of `samples_per_shard` samples each."""

  def __init__(self, output_dir: str, prefix: str, file_format: str, samples_per_shard: int):
    self.output_dir = output_dir
    self.prefix = prefix
    self.file_format = file_format
    self.samples_per_shard = samples_per_shard
    self.extension = 'tar' if file_format == 'webdataset' else 'array_record'
    self.shards = 0
    self.samples = 0
    self._writer = None
    self._temporary = None

  def _path(self, index: int) -> str:
    return os.path.join(self.output_dir, f'{self.prefix}{index:05d}.{self.extension}')

  def _open(self) -> None:
    self._temporary = self._path(self.shards) + '.incomplete'
    if self.file_format == 'webdataset':
      self._writer = tarfile.open(self._temporary, 'w', format=tarfile.PAX_FORMAT)
    else:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      self._writer = array_record_module.ArrayRecordWriter(self._temporary, 'group_size:1')

  def _close(self) -> None:
    self._writer.close()
    os.replace(self._temporary, self._path(self.shards))
    self._writer = None
    self.shards += 1

  def _add_member(self, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # Fixed, so the same input gives byte-identical shards.
    self._writer.addfile(info, io.BytesIO(data))

  def write(self, sample: Sample) -> None:
    if self._writer is None:
      self._open()
    key = f'{self.samples:09d}'
    if self.file_format == 'webdataset':
      self._add_member(f'{key}.{sample.extension}', sample.image)
      self._add_member(f'{key}.txt', sample.caption.encode('utf-8'))
      self._add_member(f'{key}.json', json.dumps({'source': sample.source}).encode('utf-8'))
    else:
      self._writer.write(encode_record(key, sample.caption, sample.extension, sample.image))
    self.samples += 1
    if self.samples % self.samples_per_shard == 0:
      self._close()

  def finish(self) -> str | None:
    """Close the last shard; return the brace pattern of all shards, or None if none."""
    if self._writer is not None:
      self._close()
    if not self.shards:
      return None
    last = self.shards - 1
    return os.path.join(self.output_dir,
                        f'{self.prefix}{{{0:05d}..{last:05d}}}.{self.extension}')


def checked_samples(inputs: list, args: argparse.Namespace, skipped: Counter) -> Iterator[Sample]:
  """Check the inputs on a thread pool, in order; count the rejected ones in `skipped`."""
  with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
    for start in range(0, len(inputs), _CHUNK):
      chunk = inputs[start:start + _CHUNK]
      results = pool.map(lambda item: check_sample(item[0], item[1], args.image_format,
                                                   args.max_image_pixels), chunk)
      for result in results:
        if isinstance(result, str):
          skipped[result] += 1
        else:
          yield result


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    inputs = list_inputs(args)
  except (OSError, ValueError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  if args.shuffle_seed >= 0:
    order = np.random.default_rng(args.shuffle_seed).permutation(len(inputs))
    inputs = [inputs[index] for index in order]
  os.makedirs(args.output_dir, exist_ok=True)

  writer = ShardWriter(args.output_dir, args.prefix, args.format, args.samples_per_shard)
  skipped = Counter()
  last_report = 0.0
  for done, sample in enumerate(checked_samples(inputs, args, skipped), start=1):
    writer.write(sample)
    now = time.monotonic()
    if now - last_report > 0.5:
      last_report = now
      print(f'\rmake_shards: {done + sum(skipped.values())}/{len(inputs)} read, {done} written '
            f'to {writer.shards} finished shards, {sum(skipped.values())} left out',
            end='', file=sys.stderr, flush=True)
  pattern = writer.finish()
  print(f'\rmake_shards: {len(inputs)}/{len(inputs)} read, {writer.samples} written to '
        f'{writer.shards} shards, {sum(skipped.values())} left out ({format_counts(skipped)}).',
        file=sys.stderr)
  if pattern is None:
    print('error: no usable sample; nothing written.', file=sys.stderr)
    return 1
  print(pattern)
  return 0


if __name__ == '__main__':
  sys.exit(main())
