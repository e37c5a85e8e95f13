"""The ArrayRecord record layout for image-caption pairs: a JSON header line, then the image bytes.

A record is `json.dumps({'key': ..., 'caption': ..., 'ext': 'jpg'}).encode() + b'\\n' + image`.
`make_shards --format=array_record` writes it, and `kind='array_record'` sources read it.
"""

from __future__ import annotations

import json

from clamp_jax.data.quality import Skipped
from clamp_jax.data.samples import RawSample


def encode_record(key: str, caption: str, extension: str, image: bytes) -> bytes:
  """Serialise one sample into a record."""
  header = json.dumps({'key': key, 'caption': caption, 'ext': extension}, ensure_ascii=False)
  return header.encode('utf-8') + b'\n' + image


def decode_record(record: bytes, seed_parts: tuple[int, ...]) -> RawSample | Skipped:
  """Parse a record into a `RawSample`, or `Skipped('corrupt_record')` when it has another layout."""
  newline = record.find(b'\n')
  if newline < 0:
    return Skipped('corrupt_record')
  try:
    header = json.loads(record[:newline].decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return Skipped('corrupt_record')
  if not isinstance(header, dict):
    return Skipped('corrupt_record')
  caption = header.get('caption')
  if caption is not None and not isinstance(caption, str):
    return Skipped('corrupt_record')
  image = record[newline + 1:]
  return RawSample(key=str(header.get('key', seed_parts)), image=image, caption=caption,
                   seed_parts=seed_parts)
