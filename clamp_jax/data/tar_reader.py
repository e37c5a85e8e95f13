"""Read one webdataset tar shard as a stream of samples with a resumable byte offset.

The layout is the one img2dataset and webdataset write. The files of one sample sit next to each
other and share a key, which is the path up to the first '.' of the file name: `000123.jpg`,
`000123.txt` and `000123.json` form sample `000123`. The image is the first of the extensions
in `IMAGE_EXTENSIONS` that the sample has, and the caption is its `.txt` file. Other files are
ignored.

The reader parses the 512-byte tar headers itself (with `tarfile.TarInfo.frombuf`) instead of
using `tarfile.TarFile`. That is because TarFile ends without an error on a header cut off after
the first member, and a truncated shard must be counted. Pax and GNU long names are supported.

The iterator state is the byte offset of the next sample's first header, plus how many elements
have already come from the end of the shard. A restored iterator seeks there, so resuming never
rereads the shard from its start.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator

import grain

from clamp_jax.data.quality import ShardEnd, Skipped
from clamp_jax.data.samples import RawSample

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')
CAPTION_EXTENSION = 'txt'

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_NAME_HEADERS = (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME)
# Header types whose data belongs to no member: global pax headers and GNU long link names.
_IGNORED_HEADERS = (tarfile.XGLTYPE, tarfile.GNUTYPE_LONGLINK)

# Outcomes at the end of a shard's member list.
_END = 'end'  # The end-of-archive block: a complete tar.
_EOF = 'eof'  # The file ends on a header boundary without the end-of-archive block.
_TRUNCATED = 'truncated'  # The file ends inside a header or inside a member's data.
_INVALID = 'invalid'  # A header fails its checksum or cannot be parsed.


def split_member_name(name: str) -> tuple[str, str]:
  """Split a member path into the sample key and the lower-case extension.

  The key is the folder plus the file name up to its first '.', as in webdataset:
  'part/000123.seg.png' gives ('part/000123', 'seg.png').
  """
  folder, _, base = name.rpartition('/')
  stem, _, extension = base.partition('.')
  key = f'{folder}/{stem}' if folder else stem
  return key, extension.lower()


def _pax_path(data: bytes) -> str | None:
  """Return the 'path' record of a pax extended header, or None."""
  position = 0
  path = None
  while position < len(data):
    space = data.find(b' ', position)
    if space < 0:
      break
    try:
      length = int(data[position:space])
    except ValueError:
      break
    if length <= 0:
      break
    record = data[space + 1:position + length - 1]  # Drops the trailing newline.
    keyword, _, value = record.partition(b'=')
    if keyword == b'path':
      path = value.decode('utf-8', 'surrogateescape')
    position += length
  return path


def iterate_members(file, offset: int) -> Iterator[tuple[int, str, bytes]]:
  """Yield `(start, name, data)` for each regular file from `offset`, then return how it ended.

  `start` is the offset of the first header that belongs to the member (a pax or long-name header
  counts). The generator's return value is one of 'end', 'eof', 'truncated' or 'invalid'.
  """
  start = offset
  long_name = None
  while True:
    file.seek(offset)
    header = file.read(_BLOCK)
    if not header:
      return _EOF
    if len(header) < _BLOCK:
      return _TRUNCATED
    if header == _ZERO_BLOCK:
      return _END
    try:
      info = tarfile.TarInfo.frombuf(header, 'utf-8', 'surrogateescape')
    except tarfile.HeaderError:
      return _INVALID
    size = info.size
    next_offset = offset + _BLOCK + -(-size // _BLOCK) * _BLOCK
    if info.type in _NAME_HEADERS or info.isreg():
      data = file.read(size)
      if len(data) < size:
        return _TRUNCATED
      if info.type == tarfile.XHDTYPE:
        long_name = _pax_path(data) or long_name
      elif info.type == tarfile.GNUTYPE_LONGNAME:
        long_name = data.rstrip(b'\0').decode('utf-8', 'surrogateescape')
      else:
        yield start, long_name or info.name, data
    offset = next_offset
    if info.type not in _NAME_HEADERS and info.type not in _IGNORED_HEADERS:
      # Name and ignored headers belong to the member that follows them.
      long_name = None
      start = next_offset


def _make_sample(key: str, files: dict[str, bytes], seed_parts: tuple[int, ...]) -> RawSample:
  image = next((files[extension] for extension in IMAGE_EXTENSIONS if extension in files), None)
  return RawSample(key=key, image=image, caption=files.get(CAPTION_EXTENSION),
                   seed_parts=seed_parts)


def iterate_shard(file, offset: int, stream_index: int):
  """Yield `(element, resume_offset)` pairs for the samples of a tar from `offset`.

  Elements are `RawSample`s, then possibly one `Skipped` marker for a damaged end, then
  `ShardEnd()`. Reading again from `resume_offset` gives the following elements; the
  end-of-shard elements all share the offset of the last sample's start.
  """
  members = iterate_members(file, offset)
  key, files, group_start = None, {}, offset
  read_any = False
  while True:
    try:
      start, name, data = next(members)
    except StopIteration as stop:
      ending = stop.value
      break
    read_any = True
    member_key, extension = split_member_name(name)
    if key is not None and member_key != key:
      yield _make_sample(key, files, (stream_index, group_start)), start
      files, group_start = {}, start
    key = member_key
    files.setdefault(extension, data)

  if ending == _END:
    if key is not None:
      yield _make_sample(key, files, (stream_index, group_start)), group_start
  elif offset == 0 and not read_any:
    # A zero-byte file, or one whose first header is not a tar header.
    yield Skipped('unreadable_shard'), group_start
  else:
    # The last sample may be missing files, so it is dropped whole.
    yield Skipped('truncated_tar'), group_start
  yield ShardEnd(), group_start


class TarShardIterator(grain.DatasetIterator):
  """Iterator over one shard; the state is `{'offset', 'done_at_offset'}` (JSON integers)."""

  def __init__(self, path: str, stream_index: int):
    super().__init__()
    self._path = path
    self._stream_index = stream_index
    self._offset = 0  # Where reading resumes: the start of the next sample.
    self._done_at_offset = 0  # Elements already returned that reading from `_offset` repeats.
    self._file = None
    self._elements = None

  def _open(self) -> None:
    try:
      self._file = open(self._path, 'rb')  # pylint: disable=consider-using-with
    except OSError as error:
      logging.warning('Cannot open shard %s (%s); counting it as unreadable.', self._path, error)
      self._elements = iter([(Skipped('unreadable_shard'), self._offset),
                             (ShardEnd(), self._offset)])
    else:
      self._elements = iterate_shard(self._file, self._offset, self._stream_index)
    for _ in range(self._done_at_offset):
      next(self._elements, None)

  def __next__(self):
    if self._elements is None:
      self._open()
    try:
      element, resume_offset = next(self._elements)
    except StopIteration:
      self._close_file()
      raise
    except OSError as error:
      logging.warning('Read error in shard %s at offset %d (%s); skipping the rest of it.',
                      self._path, self._offset, error)
      self._close_file()
      self._elements = iter([(Skipped('unreadable_shard'), self._offset),
                             (ShardEnd(), self._offset)])
      self._done_at_offset = 0
      element, resume_offset = next(self._elements)
    if resume_offset == self._offset:
      self._done_at_offset += 1
    else:
      self._offset, self._done_at_offset = resume_offset, 0
    return element

  def get_state(self) -> dict:
    return {'offset': self._offset, 'done_at_offset': self._done_at_offset}

  def set_state(self, state: dict) -> None:
    self._close_file()
    self._offset = int(state['offset'])
    self._done_at_offset = int(state['done_at_offset'])

  def _close_file(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    self._elements = None

  def close(self) -> None:
    self._close_file()
    super().close()

  def __str__(self) -> str:
    return f'TarShardIterator({self._path})'


class TarShardDataset(grain.IterDataset):
  """One tar shard as an `IterDataset` of `RawSample`s, markers and a final `ShardEnd`.

  `stream_index` is the shard's position in the repeated, shuffled shard stream; it is unique per
  shard and epoch and seeds the samples' random crops.
  """

  def __init__(self, path: str, stream_index: int):
    super().__init__()
    self._path = path
    self._stream_index = stream_index

  def __iter__(self) -> TarShardIterator:
    return TarShardIterator(self._path, self._stream_index)

  def __str__(self) -> str:
    return f'TarShardDataset({self._path})'
