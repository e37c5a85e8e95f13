"""Tests for the pieces of the web-scale input: patterns, tar reading, images, listings, records."""

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from clamp_jax.data import images, listings, paths, tar_reader
from clamp_jax.data.pipeline import CLIP_MEAN, CLIP_STD
from clamp_jax.data.quality import ShardEnd, Skipped
from clamp_jax.data.records import decode_record, encode_record
from clamp_jax.data.samples import ImageOptions, RawSample, SampleDecoder
from clamp_jax.data.source_config import parse_mixture_entry


# ----------------------------------------------------------------------------------------------
# Patterns
# ----------------------------------------------------------------------------------------------


def test_braces_padded_range():
  names = paths.expand_braces('/d/{00000..00011}.tar')
  assert len(names) == 12
  assert names[0] == '/d/00000.tar'
  assert names[-1] == '/d/00011.tar'


def test_braces_unpadded_range_and_list():
  assert paths.expand_braces('{8..10}-{a,b}') == ['8-a', '8-b', '9-a', '9-b', '10-a', '10-b']


@pytest.mark.parametrize('pattern', ['/d/{0..3.tar', '/d/0..3}.tar', '/d/{a{b}}.tar',
                                     '/d/{abc}.tar'])
def test_braces_reject_malformed(pattern):
  with pytest.raises(ValueError, match='pattern'):
    paths.expand_braces(pattern)


def test_expand_pattern_keeps_existing(tmp_path):
  for index in (0, 2):
    (tmp_path / f'{index:03d}.tar').write_bytes(b'x')
  found = paths.expand_pattern(str(tmp_path / '{000..003}.tar'))
  assert found == [str(tmp_path / '000.tar'), str(tmp_path / '002.tar')]
  assert paths.count_missing(str(tmp_path / '{000..003}.tar'))[:2] == (4, 2)


def test_expand_pattern_glob(tmp_path):
  for name in ('b.tar', 'a.tar', 'c.txt'):
    (tmp_path / name).write_bytes(b'x')
  assert paths.expand_pattern(str(tmp_path / '*.tar')) == [str(tmp_path / 'a.tar'),
                                                          str(tmp_path / 'b.tar')]


def test_expand_pattern_no_match_names_pattern(tmp_path):
  pattern = str(tmp_path / '{00000..00009}.tar')
  with pytest.raises(FileNotFoundError, match=r'\{00000\.\.00009\}'):
    paths.expand_pattern(pattern)


def test_split_for_process_disjoint():
  items = list(range(10))
  shares = [paths.split_for_process(items, index, 3, 'x') for index in range(3)]
  assert sorted(sum(shares, [])) == items
  assert shares[1] == [1, 4, 7]


def test_split_for_process_rejects_too_few():
  with pytest.raises(ValueError, match='2 entries for 3 processes'):
    paths.split_for_process([1, 2], 0, 3, 'pattern')


def test_mixture_entry_parsing():
  assert parse_mixture_entry('csv:/d/a.tsv') == ('csv', '/d/a.tsv')
  with pytest.raises(ValueError, match='KIND:PATTERN'):
    parse_mixture_entry('/d/{0..3}.tar')


# ----------------------------------------------------------------------------------------------
# Tar reading
# ----------------------------------------------------------------------------------------------


def write_tar(path, members, tar_format=tarfile.PAX_FORMAT):
  with tarfile.open(path, 'w', format=tar_format) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def read_all(path, state=None):
  iterator = tar_reader.TarShardIterator(str(path), stream_index=7)
  if state is not None:
    iterator.set_state(state)
  elements = list(iterator)
  iterator.close()
  return elements


def test_split_member_name():
  assert tar_reader.split_member_name('000123.jpg') == ('000123', 'jpg')
  assert tar_reader.split_member_name('part/000123.seg.PNG') == ('part/000123', 'seg.png')


def test_tar_groups_members_by_key(tmp_path):
  path = tmp_path / 'a.tar'
  write_tar(path, [('0.jpg', b'i0'), ('0.txt', b'c0'), ('0.json', b'{}'),
                   ('1.png', b'i1'), ('1.txt', b'c1'), ('2.txt', b'c2')])
  elements = read_all(path)
  assert [e.key for e in elements[:-1]] == ['0', '1', '2']
  assert (elements[0].image, elements[0].caption) == (b'i0', b'c0')
  assert elements[1].image == b'i1'
  assert elements[2].image is None
  assert isinstance(elements[-1], ShardEnd)
  assert elements[0].seed_parts == (7, 0)


@pytest.mark.parametrize('tar_format', [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tar_long_member_names(tmp_path, tar_format):
  key = 'folder/' + 'k' * 150
  path = tmp_path / 'long.tar'
  write_tar(path, [(f'{key}.jpg', b'image'), (f'{key}.txt', b'caption')], tar_format)
  elements = read_all(path)
  assert elements[0].key == key
  assert elements[0].caption == b'caption'


def test_tar_resume_from_state(tmp_path):
  path = tmp_path / 'a.tar'
  write_tar(path, [(f'{i}.{ext}', f'{i}{ext}'.encode()) for i in range(5) for ext in ('jpg',
                                                                                         'txt')])
  iterator = tar_reader.TarShardIterator(str(path), stream_index=0)
  first = [next(iterator).key for _ in range(2)]
  state = iterator.get_state()
  rest = [getattr(element, 'key', None) for element in iterator]
  iterator.close()
  resumed = [getattr(element, 'key', None) for element in read_all(path, state)]
  assert first == ['0', '1']
  assert rest == ['2', '3', '4', None]
  assert resumed == rest


def test_tar_cut_mid_member(tmp_path):
  path = tmp_path / 'a.tar'
  write_tar(path, [(f'{i}.{ext}', bytes(600)) for i in range(3) for ext in ('jpg', 'txt')])
  data = path.read_bytes()
  # Sample 2's .txt header starts at 5 * (512 + 1024); cut inside its data.
  path.write_bytes(data[:5 * 1536 + 512 + 100])
  elements = read_all(path)
  assert [e.key for e in elements[:2]] == ['0', '1']
  assert elements[2] == Skipped('truncated_tar')
  assert isinstance(elements[3], ShardEnd)
  assert len(elements) == 4


def test_tar_cut_mid_header(tmp_path):
  path = tmp_path / 'a.tar'
  write_tar(path, [(f'{i}.{ext}', bytes(600)) for i in range(3) for ext in ('jpg', 'txt')])
  path.write_bytes(path.read_bytes()[:4 * 1536 + 200])
  elements = read_all(path)
  assert [e.key for e in elements[:1]] == ['0']
  assert elements[1] == Skipped('truncated_tar')
  assert len(elements) == 3


def test_tar_end_state_resumes_to_stop(tmp_path):
  path = tmp_path / 'a.tar'
  write_tar(path, [('0.jpg', b'a'), ('0.txt', b'b')])
  path.write_bytes(path.read_bytes()[:700])  # Cut inside the .txt header.
  iterator = tar_reader.TarShardIterator(str(path), stream_index=0)
  assert next(iterator) == Skipped('truncated_tar')
  state = iterator.get_state()
  iterator.close()
  assert [type(e) for e in read_all(path, state)] == [ShardEnd]


@pytest.mark.parametrize('content', [b'', b'this is not a tar file\n' * 100, b'short'])
def test_tar_unreadable_file(tmp_path, content):
  path = tmp_path / 'bad.tar'
  path.write_bytes(content)
  assert read_all(path) == [Skipped('unreadable_shard'), ShardEnd()]


def test_tar_missing_file(tmp_path):
  assert read_all(tmp_path / 'gone.tar') == [Skipped('unreadable_shard'), ShardEnd()]


def test_tar_empty_archive(tmp_path):
  path = tmp_path / 'empty.tar'
  write_tar(path, [])
  assert read_all(path) == [ShardEnd()]


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def encode(image, image_format='PNG', **options):
  buffer = io.BytesIO()
  image.save(buffer, format=image_format, **options)
  return buffer.getvalue()


def test_rgb_conversion_grayscale():
  image = images.decode_image(encode(Image.new('L', (4, 3), 77)), max_pixels=100)
  assert image.mode == 'RGB'
  assert np.asarray(image)[1, 2].tolist() == [77, 77, 77]


def test_rgb_conversion_16_bit():
  pixels = np.full((3, 4), 200 * 257, dtype=np.uint16)
  image = images.decode_image(encode(Image.fromarray(pixels)), max_pixels=100)
  assert Image.open(io.BytesIO(encode(Image.fromarray(pixels)))).mode != 'RGB'
  assert np.asarray(image)[0, 0].tolist() == [200, 200, 200]


def test_rgb_conversion_rgba_on_white():
  rgba = Image.new('RGBA', (4, 4), (10, 20, 30, 0))
  rgba.putpixel((1, 1), (10, 20, 30, 255))
  image = np.asarray(images.decode_image(encode(rgba), max_pixels=100))
  assert image[0, 0].tolist() == [255, 255, 255]
  assert image[1, 1].tolist() == [10, 20, 30]


def test_rgb_conversion_palette_with_transparency():
  palette = Image.new('P', (4, 4), 1)
  palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
  palette.putpixel((0, 0), 0)
  data = encode(palette, transparency=0)
  image = np.asarray(images.decode_image(data, max_pixels=100))
  assert image[0, 0].tolist() == [255, 255, 255]
  assert image[2, 2].tolist() == [200, 100, 50]


def test_rgb_conversion_cmyk():
  cmyk = Image.new('CMYK', (8, 8), (0, 255, 255, 0))  # Pure red in CMYK.
  image = np.asarray(images.decode_image(encode(cmyk, 'JPEG', quality=100), max_pixels=100))
  assert image.shape == (8, 8, 3)
  assert image[4, 4, 0] > 200
  assert image[4, 4, 1] < 60


def test_open_image_pixel_limit():
  with pytest.raises(images.ImageTooLargeError, match='20x10'):
    images.open_image(encode(Image.new('RGB', (20, 10))), max_pixels=199)


def test_clip_preprocess_landscape_geometry():
  # Left third red, middle green, right third blue: the center crop keeps only green.
  pixels = np.zeros((30, 90, 3), np.uint8)
  pixels[:, :30, 0] = 255
  pixels[:, 30:60, 1] = 255
  pixels[:, 60:, 2] = 255
  out = images.clip_preprocess(Image.fromarray(pixels), 10)
  assert out.shape == (10, 10, 3)
  assert out.dtype == np.float32
  restored = out * CLIP_STD + CLIP_MEAN
  np.testing.assert_allclose(restored[5, 5], [0, 1, 0], atol=0.02)


def test_clip_preprocess_resizes_shorter_side():
  resized = images.resize_shorter_side(Image.new('RGB', (50, 20)), 10)
  assert resized.size == (25, 10)
  resized = images.resize_shorter_side(Image.new('RGB', (20, 33)), 10)
  assert resized.size == (10, 16)


def test_clip_preprocess_uniform_color():
  out = images.clip_preprocess(Image.new('RGB', (37, 23), (255, 0, 51)), 16)
  expected = (np.array([1.0, 0.0, 0.2], np.float32) - CLIP_MEAN) / CLIP_STD
  np.testing.assert_allclose(out[3, 7], expected, atol=1e-5)


def test_random_crop_box_bounds_and_seed():
  boxes = [images.sample_crop_box(200, 100, np.random.default_rng(seed), (0.3, 1.0))
           for seed in range(50)]
  for left, top, right, bottom in boxes:
    assert 0 <= left < right <= 200
    assert 0 <= top < bottom <= 100
    area = (right - left) * (bottom - top)
    assert 0.25 * 20000 <= area <= 20000
  assert len(set(boxes)) > 40
  again = images.sample_crop_box(200, 100, np.random.default_rng(3), (0.3, 1.0))
  assert again == boxes[3]


# ----------------------------------------------------------------------------------------------
# Sample decoding
# ----------------------------------------------------------------------------------------------


class CharTokenizer:
  """One token per character (id = code point + 3); enough to check captions."""

  bos_token_id = 1
  eos_token_id = 2
  pad_token_id = 0

  def __call__(self, text, add_special_tokens=False):
    del add_special_tokens
    if isinstance(text, str):
      return {'input_ids': [ord(char) + 3 for char in text]}
    return {'input_ids': [[ord(char) + 3 for char in item] for item in text]}


@pytest.fixture(name='decoder')
def decoder_fixture():
  from clamp_jax.data.captions import CaptionTokenizer
  tokenizer = CaptionTokenizer(CharTokenizer(), 'Caption: {caption}', max_length=24)
  return SampleDecoder(tokenizer, ImageOptions(image_size=8, max_pixels=1000), seed=0)


GOOD_IMAGE = encode(Image.new('RGB', (12, 9), (1, 2, 3)))


@pytest.mark.parametrize('image, caption, reason', [
    (None, b'a cat', 'missing_image'),
    (GOOD_IMAGE, None, 'missing_caption'),
    (GOOD_IMAGE, b' \n ', 'empty_caption'),
    (GOOD_IMAGE, b'caf\xe9', 'caption_not_utf8'),
    (b'', b'a cat', 'empty_image'),
    (b'\x89PNG garbage', b'a cat', 'corrupt_image'),
    (GOOD_IMAGE[:len(GOOD_IMAGE) // 2], b'a cat', 'corrupt_image'),
    (encode(Image.new('RGB', (50, 30))), b'a cat', 'too_many_pixels'),
])
def test_decoder_skip_reasons(decoder, image, caption, reason):
  assert decoder(RawSample('k', image, caption, (0,))) == Skipped(reason)


def test_decoder_output(decoder):
  example = decoder(RawSample('k', GOOD_IMAGE, 'a cat ', (0,)))
  assert example['image'].shape == (8, 8, 3)
  assert example['input_ids'].dtype == np.int32
  length = int(example['attention_mask'].sum())
  text = ''.join(chr(token - 3) for token in example['input_ids'][:length])
  assert text == 'Caption: a cat'


def test_decoder_passes_markers(decoder):
  assert decoder(Skipped('truncated_tar')) == Skipped('truncated_tar')
  assert decoder(ShardEnd()) == ShardEnd()


def test_decoder_random_crop_depends_on_seed_parts():
  from clamp_jax.data.captions import CaptionTokenizer
  tokenizer = CaptionTokenizer(CharTokenizer(), '{caption}', max_length=8)
  options = ImageOptions(image_size=8, max_pixels=10**6, random_resized_crop=True,
                         crop_scale=(0.2, 0.5))
  decoder = SampleDecoder(tokenizer, options, seed=0)
  pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
  data = encode(Image.fromarray(pixels))
  first = decoder(RawSample('k', data, 'x', (1, 2)))['image']
  again = decoder(RawSample('k', data, 'x', (1, 2)))['image']
  other = decoder(RawSample('k', data, 'x', (1, 3)))['image']
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


# ----------------------------------------------------------------------------------------------
# Listings and records
# ----------------------------------------------------------------------------------------------


def make_class_folder(root):
  for folder, count in (('b_dog', 2), ('a_cat', 3)):
    os.makedirs(root / folder / 'nested')
    for index in range(count):
      Image.new('RGB', (4, 4)).save(root / folder / f'{index}.png')
  (root / 'a_cat' / 'notes.txt').write_text('not an image')
  Image.new('RGB', (4, 4)).save(root / 'a_cat' / 'nested' / 'deep.jpg')


def test_folder_listing(tmp_path):
  make_class_folder(tmp_path)
  items, names = listings.list_image_folder(str(tmp_path))
  assert names == ['a_cat', 'b_dog']
  assert [label for _, label in items] == [0, 0, 0, 0, 1, 1]
  assert any(path.endswith('deep.jpg') for path, _ in items)


def test_folder_class_names_file(tmp_path):
  make_class_folder(tmp_path / 'images')
  ordered = tmp_path / 'ordered.txt'
  ordered.write_text('cat\ndog\n')
  mapped = tmp_path / 'mapped.txt'
  mapped.write_text('b_dog\tgood dog\na_cat\tcat\n')
  assert listings.list_image_folder(str(tmp_path / 'images'), str(ordered))[1] == ['cat', 'dog']
  assert listings.list_image_folder(str(tmp_path / 'images'), str(mapped))[1] == ['cat',
                                                                                  'good dog']
  wrong = tmp_path / 'wrong.txt'
  wrong.write_text('one\n')
  with pytest.raises(ValueError, match='1 names for 2 subfolders'):
    listings.list_image_folder(str(tmp_path / 'images'), str(wrong))


def test_folder_without_images(tmp_path):
  os.makedirs(tmp_path / 'empty_class')
  with pytest.raises(FileNotFoundError, match='no image files'):
    listings.list_image_folder(str(tmp_path))


def test_caption_table_rows(tmp_path):
  table = tmp_path / 'captions.tsv'
  table.write_bytes(b'path\tcaption\nimg/a.png\ta cat\n\n/abs/b.png\tcaf\xe9\nc.png\n')
  rows = listings.read_caption_table(str(table))
  assert rows == [(str(tmp_path / 'img' / 'a.png'), b'a cat'), ('/abs/b.png', b'caf\xe9'),
                  (str(tmp_path / 'c.png'), None)]


def test_caption_table_csv_quoting(tmp_path):
  table = tmp_path / 'captions.csv'
  table.write_text('a.png,"a cat, sitting"\n')
  assert listings.read_caption_table(str(table))[0][1] == b'a cat, sitting'


def test_record_round_trip():
  record = encode_record('000000007', 'a cat', 'png', b'\x89PNGdata\n')
  sample = decode_record(record, (3,))
  assert (sample.key, sample.caption, sample.image) == ('000000007', 'a cat', b'\x89PNGdata\n')
  assert decode_record(b'no header line', (0,)) == Skipped('corrupt_record')
  assert decode_record(b'[1, 2]\nimage', (0,)) == Skipped('corrupt_record')
