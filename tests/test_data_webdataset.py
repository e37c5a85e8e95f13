"""Tests of the web-scale training pipeline on shards written by make_shards, bad samples included.

Every good image has an id, drawn as its colour, and its caption is 'picture <id>'. The tests
check that each batch row contains the image of the id its caption names, that skipped samples are
counted exactly by reason, and that a restored iterator continues with identical batches.
"""

import io
import json
import os
import sys
import tarfile

import grain
import numpy as np
import pytest
from PIL import Image

from clamp_jax.data import images, make_shards
from clamp_jax.data.captions import CaptionTokenizer
from clamp_jax.data.counting import SKIPPED_PREFIX
from clamp_jax.data.pipeline import CLIP_MEAN, CLIP_STD
from clamp_jax.data.quality import SKIP_REASONS, DataQualityError
from clamp_jax.data.records import encode_record
from clamp_jax.data.train_data import make_train_dataset, source_seed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 16
BATCH_SIZE = 8
MAX_PIXELS = 10_000
GOOD_SHARD_IDS = 40  # Ids 0..39 fill shards 00000..00004 (8 per shard).
# Shard 00005: the samples in order, as a good id or the reason the sample is skipped.
MIXED_SHARD = (40, 'corrupt_image', 41, 'corrupt_image', 'empty_image', 42, 'too_many_pixels',
               'missing_caption', 'empty_caption', 'caption_not_utf8', 'missing_image', 43, 44)
CUT_SHARD = (48, 49, 50, 'truncated_tar')  # Shard 00006: id 51 is cut off mid-file.
UNREADABLE_SHARDS = ('unreadable_shard',)  # Shards 00007 (zero bytes) and 00008 (not a tar).
PATTERN = '{00000..00008}.tar'


# ----------------------------------------------------------------------------------------------
# Test data
# ----------------------------------------------------------------------------------------------


class CharTokenizer:
  """One token per character (id = code point + 3), so captions can be read back from ids."""

  bos_token_id = 1
  eos_token_id = 2
  pad_token_id = 0

  def __call__(self, text, add_special_tokens=False):
    del add_special_tokens
    if isinstance(text, str):
      return {'input_ids': [ord(char) + 3 for char in text]}
    return {'input_ids': [[ord(char) + 3 for char in item] for item in text]}


def caption_tokenizer():
  return CaptionTokenizer(CharTokenizer(), 'Caption: {caption}', max_length=32)


def id_colour(sample_id):
  return (16 + 32 * (sample_id % 8), 16 + 32 * (sample_id // 8 % 8), 200)


def image_bytes(sample_id):
  """Encode a uniform image of the id's colour in one of eight modes and formats."""
  size = (20 + sample_id % 13, 16 + sample_id % 7)
  rgb = Image.new('RGB', size, id_colour(sample_id))
  variant = sample_id % 8
  buffer = io.BytesIO()
  if variant == 0:
    rgb.save(buffer, 'PNG')
  elif variant == 1:
    rgb.save(buffer, 'JPEG', quality=90)
  elif variant == 2:
    rgb.convert('L').save(buffer, 'PNG')
  elif variant == 3:
    rgb.convert('P', palette=Image.Palette.ADAPTIVE).save(buffer, 'PNG')
  elif variant == 4:
    rgba = rgb.convert('RGBA')
    rgba.putalpha(128)
    rgba.save(buffer, 'PNG')
  elif variant == 5:
    rgb.convert('CMYK').save(buffer, 'JPEG', quality=90)
  elif variant == 6:
    gray = np.asarray(rgb.convert('L'), dtype=np.uint16) * 257
    Image.fromarray(gray).save(buffer, 'PNG')
  else:
    rgb.convert('LA').save(buffer, 'PNG')
  return buffer.getvalue()


def extension(sample_id):
  return 'jpg' if sample_id % 8 in (1, 5) else 'png'


def write_images(folder, ids):
  """Write the images of `ids` and a TSV of 'path<TAB>picture <id>' rows; return the TSV path."""
  os.makedirs(folder, exist_ok=True)
  rows = []
  for sample_id in ids:
    name = f'{sample_id}.{extension(sample_id)}'
    with open(os.path.join(folder, name), 'wb') as file:
      file.write(image_bytes(sample_id))
    rows.append(f'{name}\tpicture {sample_id}\n')
  table = os.path.join(folder, 'captions.tsv')
  with open(table, 'w', encoding='utf-8') as file:
    file.writelines(rows)
  return table


def run_make_shards(*args):
  assert make_shards.main([str(arg) for arg in args]) == 0


def add_member(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_mixed_shard(path):
  """Write MIXED_SHARD's samples straight into a tar, including what make_shards rejects."""
  good = image_bytes(0)
  with tarfile.open(path, 'w') as tar:
    for index, entry in enumerate(MIXED_SHARD):
      key = f'mixed{index:03d}'
      if isinstance(entry, int):
        add_member(tar, f'{key}.{extension(entry)}', image_bytes(entry))
        add_member(tar, f'{key}.txt', f'picture {entry}'.encode())
        add_member(tar, f'{key}.json', b'{}')
        continue
      image, caption = good, b'picture 100'
      if entry == 'corrupt_image' and index == 1:
        image = b'\xff\xd8\xff\xe0 this is not a JPEG body' * 20
      elif entry == 'corrupt_image':
        jpeg = image_bytes(1)
        image = jpeg[:len(jpeg) // 2]
      elif entry == 'empty_image':
        image = b''
      elif entry == 'too_many_pixels':
        buffer = io.BytesIO()
        Image.new('RGB', (120, 100), (1, 2, 3)).save(buffer, 'PNG')
        image = buffer.getvalue()
      elif entry == 'empty_caption':
        caption = b'  \n'
      elif entry == 'caption_not_utf8':
        caption = b'picture \xff\xfe 7'
      if entry != 'missing_image':
        add_member(tar, f'{key}.png', image)
      if entry != 'missing_caption':
        add_member(tar, f'{key}.txt', caption)


def cut_last_sample(path):
  """Cut a shard inside the .json member of its last sample."""
  with tarfile.open(path) as tar:
    last_json = [member for member in tar.getmembers() if member.name.endswith('.json')][-1]
  with open(path, 'rb') as file:
    data = file.read()
  with open(path, 'wb') as file:
    file.write(data[:last_json.offset_data + 5])


@pytest.fixture(scope='module', name='corpus')
def corpus_fixture(tmp_path_factory):
  """Write shards 00000..00008 (see the module constants) and return their folder."""
  root = tmp_path_factory.mktemp('corpus')
  shards = root / 'shards'
  table = write_images(root / 'images', range(GOOD_SHARD_IDS))
  run_make_shards('--input', table, '--output_dir', shards, '--samples_per_shard', 8,
                  '--shuffle_seed', -1)
  write_mixed_shard(shards / '00005.tar')
  cut_table = write_images(root / 'cut', (48, 49, 50, 51))
  run_make_shards('--input', cut_table, '--output_dir', root / 'cut_shards', '--shuffle_seed', -1)
  os.replace(root / 'cut_shards' / '00000.tar', shards / '00006.tar')
  cut_last_sample(shards / '00006.tar')
  (shards / '00007.tar').write_bytes(b'')
  (shards / '00008.tar').write_text('not a tar file\n' * 50)
  return root


# ----------------------------------------------------------------------------------------------
# Expected batches
# ----------------------------------------------------------------------------------------------


def shard_outcomes(shards):
  """Map each shard path to its samples in order: good ids, or skip reasons."""
  outcomes = {}
  for index in range(GOOD_SHARD_IDS // 8):
    outcomes[str(shards / f'{index:05d}.tar')] = tuple(range(8 * index, 8 * index + 8))
  outcomes[str(shards / '00005.tar')] = MIXED_SHARD
  outcomes[str(shards / '00006.tar')] = CUT_SHARD
  outcomes[str(shards / '00007.tar')] = UNREADABLE_SHARDS
  outcomes[str(shards / '00008.tar')] = UNREADABLE_SHARDS
  return outcomes


def expected_batches(stream, batch_size, count):
  """Group a stream of outcomes into `count` batches of (ids, cumulative skip counts)."""
  counts = dict.fromkeys(SKIP_REASONS, 0)
  batches, ids = [], []
  for outcome in stream:
    if isinstance(outcome, str):
      counts[outcome] += 1
      continue
    ids.append(outcome)
    if len(ids) == batch_size:
      batches.append((ids, dict(counts)))
      ids = []
      if len(batches) == count:
        return batches
  raise AssertionError('The stream ended early.')


def sequential_stream(paths, outcomes, seed):
  """The outcomes in the order the pipeline reads them with cycle_length=1 and no sample shuffle:
  shards in Grain's seeded order, one epoch after another."""
  order = grain.MapDataset.source(paths).shuffle(seed=seed).repeat()
  for index in range(len(paths) * 10):
    yield from outcomes[order[index]]


# ----------------------------------------------------------------------------------------------
# Reading batches
# ----------------------------------------------------------------------------------------------


def make_config(pattern, **source_fields):
  sys.path.insert(0, REPO)
  from configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  source = config.data.train
  source.kind = 'webdataset'
  source.pattern = str(pattern)
  source.max_image_pixels = MAX_PIXELS
  source.max_skip_fraction = 0.5
  source.read_threads = 2
  for name, value in source_fields.items():
    source[name] = value
  assert config.model.vit.image_size == IMAGE_SIZE
  assert config.train.batch_size == BATCH_SIZE
  return config


def caption_ids(batch):
  """Read the id back from each row's caption 'Caption: picture <id>'."""
  ids = []
  for row, mask in zip(batch['input_ids'], batch['attention_mask']):
    text = ''.join(chr(token - 3) for token in row[:int(mask.sum())])
    assert text.startswith('Caption: picture '), text
    ids.append(int(text.rsplit(' ', 1)[1]))
  return ids


def skip_counts(batch):
  return {reason: int(batch[SKIPPED_PREFIX + reason]) for reason in SKIP_REASONS}


def reference_image(sample_id):
  return images.clip_preprocess(images.decode_image(image_bytes(sample_id), MAX_PIXELS),
                                IMAGE_SIZE)


def assert_rows_paired(batch):
  """Each row's image is the image of the id that its caption names."""
  for row, sample_id in enumerate(caption_ids(batch)):
    np.testing.assert_allclose(batch['image'][row], reference_image(sample_id), atol=1e-6,
                               err_msg=f'row {row}, id {sample_id}')
    if sample_id % 8 == 0:  # Lossless RGB: the centre pixel is the id's colour.
      centre = batch['image'][row, IMAGE_SIZE // 2, IMAGE_SIZE // 2] * CLIP_STD + CLIP_MEAN
      np.testing.assert_allclose(centre * 255, id_colour(sample_id), atol=1.0)


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    assert set(want) == set(got)
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_batch_layout(corpus):
  iterator = iter(make_train_dataset(make_config(corpus / 'shards' / PATTERN),
                                     caption_tokenizer()))
  batch = next(iterator)
  iterator.close()
  assert batch['image'].shape == (BATCH_SIZE, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert batch['image'].dtype == np.float32
  assert batch['input_ids'].shape == (BATCH_SIZE, 32)
  assert batch['input_ids'].dtype == np.int32
  assert batch['attention_mask'].dtype == np.int32
  counters = {key for key in batch if key.startswith('data/')}
  assert counters == {SKIPPED_PREFIX + reason for reason in SKIP_REASONS}
  for key in counters:
    assert isinstance(batch[key], np.int64)


def test_exact_pairs_and_counts_in_read_order(corpus):
  shards = corpus / 'shards'
  config = make_config(shards / PATTERN, cycle_length=1, shuffle_buffer=0)
  iterator = iter(make_train_dataset(config, caption_tokenizer()))
  batches = take(iterator, 14)  # 48 good samples per epoch: a little over two epochs.
  iterator.close()

  outcomes = shard_outcomes(shards)
  stream = sequential_stream(sorted(outcomes), outcomes, source_seed(config.seed, 0, 0))
  expected = expected_batches(stream, BATCH_SIZE, len(batches))
  for index, (batch, (ids, counts)) in enumerate(zip(batches, expected)):
    assert caption_ids(batch) == ids, f'batch {index}'
    assert skip_counts(batch) == counts, f'batch {index}'
    assert_rows_paired(batch)
  last = skip_counts(batches[-1])
  assert last['unreadable_shard'] >= 4  # Two unreadable shards in each of two epochs.
  assert last['corrupt_image'] >= 4


def test_every_bad_kind_counted_per_epoch(corpus):
  config = make_config(corpus / 'shards' / PATTERN, cycle_length=3, shuffle_buffer=16)
  iterator = iter(make_train_dataset(config, caption_tokenizer()))
  batches = take(iterator, 18)  # 144 samples: three epochs of 48 good samples.
  iterator.close()
  per_epoch = {reason: 0 for reason in SKIP_REASONS}
  for outcome in MIXED_SHARD + CUT_SHARD + 2 * UNREADABLE_SHARDS:
    if isinstance(outcome, str):
      per_epoch[outcome] += 1
  final = skip_counts(batches[-1])
  for reason, count in per_epoch.items():
    # Three epochs were read, and the skips of the next epoch may have started.
    assert 2 * count <= final[reason] <= 4 * count, reason
  seen = [sample_id for batch in batches for sample_id in caption_ids(batch)]
  good_ids = set(range(45)) | {48, 49, 50}
  assert set(seen) == good_ids
  for batch in batches:
    assert_rows_paired(batch)
  previous = dict.fromkeys(SKIP_REASONS, 0)
  for batch in batches:
    counts = skip_counts(batch)
    assert all(counts[reason] >= previous[reason] for reason in SKIP_REASONS)
    previous = counts


def resume_check(config):
  """Compare 6 straight batches with 3, a JSON round trip of the state, and 3 from a new iterator."""
  tokenizer = caption_tokenizer()
  iterator = iter(make_train_dataset(config, tokenizer))
  first = take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  straight = first + take(iterator, 3)
  iterator.close()

  resumed_iterator = iter(make_train_dataset(config, tokenizer))
  resumed_iterator.set_state(state)
  resumed = first + take(resumed_iterator, 3)
  resumed_iterator.close()
  assert_batches_equal(straight, resumed)
  return straight


def test_resume_identical_batches(corpus):
  config = make_config(corpus / 'shards' / PATTERN, cycle_length=3, shuffle_buffer=16,
                       random_resized_crop=True)
  batches = resume_check(config)
  assert skip_counts(batches[-1]) != skip_counts(batches[0])  # The counts moved on the way.


@pytest.fixture(name='parsed_flags')
def parsed_flags_fixture():
  # Grain's worker processes read absl flags, which clamp_jax.main parses at start.
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def test_resume_with_worker_processes(corpus, parsed_flags):
  config = make_config(corpus / 'shards' / PATTERN, cycle_length=2, shuffle_buffer=8,
                       num_workers=2)
  batches = resume_check(config)
  for batch in batches:
    assert_rows_paired(batch)
  assert sum(skip_counts(batches[-1]).values()) > 0


def test_process_shares_are_disjoint(corpus):
  seen = []
  for process_index in range(2):
    config = make_config(corpus / 'shards' / PATTERN, cycle_length=1, shuffle_buffer=0)
    iterator = iter(make_train_dataset(config, caption_tokenizer(), process_index=process_index,
                                       process_count=2))
    batches = take(iterator, 14)  # 56 samples of 4: two epochs of either share.
    iterator.close()
    assert batches[0]['image'].shape[0] == BATCH_SIZE // 2
    seen.append({sample_id for batch in batches for sample_id in caption_ids(batch)})
  # Sorted shards 0, 2, 4, 6, 8 go to process 0 and 1, 3, 5, 7 to process 1.
  assert seen[0] == set(range(0, 8)) | set(range(16, 24)) | set(range(32, 40)) | {48, 49, 50}
  assert seen[1] == set(range(8, 16)) | set(range(24, 32)) | set(range(40, 45))


def test_mixture_follows_weights(corpus, tmp_path):
  listed = write_images(tmp_path / 'listed', range(100, 110))
  folder = tmp_path / 'folder'
  for class_name, sample_id in (('red', 120), ('green', 121)):
    os.makedirs(folder / class_name)
    (folder / class_name / f'{sample_id}.png').write_bytes(image_bytes(8 * sample_id))
  config = make_config('')
  source = config.data.train
  source.kind = 'mixture'
  source.sources = (f'webdataset:{corpus}/shards/{{00000..00004}}.tar', f'csv:{listed}',
                    f'folder:{folder}')
  source.weights = (2.0, 1.0, 1.0)
  config.data.templates = ('a photo of a {}.',)
  iterator = iter(make_train_dataset(config, caption_tokenizer()))
  batches = take(iterator, 8)
  iterator.close()
  sources = {'webdataset': 0, 'csv': 0, 'folder': 0}
  for batch in batches:
    for row, mask in zip(batch['input_ids'], batch['attention_mask']):
      text = ''.join(chr(token - 3) for token in row[:int(mask.sum())])
      if text.startswith('Caption: a photo of a '):
        sources['folder'] += 1
      elif int(text.rsplit(' ', 1)[1]) >= 100:
        sources['csv'] += 1
      else:
        sources['webdataset'] += 1
  assert sources == {'webdataset': 32, 'csv': 16, 'folder': 16}


def test_csv_source_counts_bad_rows(tmp_path):
  folder = tmp_path / 'images'
  write_images(folder, range(6))
  (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n broken')
  rows = [f'{i}.{extension(i)}\tpicture {i}\n'.encode() for i in range(6)]
  rows += [b'gone.png\tpicture 7\n', b'0.png\tpicture \xff\n', b'0.png\t \n', b'0.png\n',
           b'broken.png\tpicture 9\n']
  table = folder / 'rows.tsv'
  table.write_bytes(b''.join(rows))
  outcomes = list(range(6)) + ['missing_image', 'caption_not_utf8', 'empty_caption',
                               'missing_caption', 'corrupt_image']
  config = make_config(table, kind='csv')
  config.train.batch_size = 3
  iterator = iter(make_train_dataset(config, caption_tokenizer()))
  batches = take(iterator, 8)  # Four epochs of six good rows.
  iterator.close()

  order = grain.MapDataset.source(outcomes).shuffle(seed=source_seed(config.seed, 0, 0)).repeat()
  stream = (order[index] for index in range(len(outcomes) * 10))
  for batch, (ids, counts) in zip(batches, expected_batches(stream, 3, len(batches))):
    assert caption_ids(batch) == ids
    assert skip_counts(batch) == counts
    assert_rows_paired(batch)


def test_folder_source_captions_from_templates(tmp_path):
  root = tmp_path / 'classes'
  for class_index, class_name in enumerate(('cat', 'dog')):
    os.makedirs(root / class_name)
    for index in range(3):
      sample_id = 8 * (10 * class_index + index)  # Lossless RGB PNGs.
      (root / class_name / f'{index}.png').write_bytes(image_bytes(sample_id))
  (root / 'dog' / 'empty.png').write_bytes(b'')
  names = tmp_path / 'names.txt'
  names.write_text('cat\tsmall cat\ndog\tbig dog\n')
  config = make_config(root, kind='folder', class_names_file=str(names))
  config.data.templates = ('a photo of a {}.', 'the {}.')
  config.train.batch_size = 6
  iterator = iter(make_train_dataset(config, caption_tokenizer()))
  batches = take(iterator, 4)
  iterator.close()
  texts = set()
  for batch in batches:
    for row in range(len(batch['input_ids'])):
      length = int(batch['attention_mask'][row].sum())
      text = ''.join(chr(token - 3) for token in batch['input_ids'][row, :length])
      texts.add(text)
      # Cat images have ids 0, 8, 16 and dog images 80, 88, 96: colours differ in green.
      centre = batch['image'][row, IMAGE_SIZE // 2, IMAGE_SIZE // 2] * CLIP_STD + CLIP_MEAN
      expected_ids = (0, 8, 16) if 'cat' in text else (80, 88, 96)
      assert any(np.allclose(centre * 255, id_colour(sample_id), atol=1.0)
                 for sample_id in expected_ids), (text, centre * 255)
  assert texts == {'Caption: a photo of a small cat.', 'Caption: the small cat.',
                   'Caption: a photo of a big dog.', 'Caption: the big dog.'}
  assert skip_counts(batches[-1])['empty_image'] >= 3


def test_array_record_source(corpus, tmp_path):
  table = os.path.join(corpus, 'images', 'captions.tsv')
  run_make_shards('--input', table, '--output_dir', tmp_path, '--format', 'array_record',
                  '--samples_per_shard', 16, '--prefix', 'part-')
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / 'part-00003.array_record'),
                                                 'group_size:1')
  writer.write(b'not a record')
  writer.write(encode_record('x', 'picture 45', 'png', image_bytes(45)))
  writer.close()
  config = make_config(tmp_path / 'part-{00000..00003}.array_record', kind='array_record')
  iterator = iter(make_train_dataset(config, caption_tokenizer()))
  batches = take(iterator, 12)  # 96 samples: two epochs of 41 good records.
  iterator.close()
  for batch in batches:
    assert_rows_paired(batch)
  seen = {sample_id for batch in batches for sample_id in caption_ids(batch)}
  assert seen == set(range(GOOD_SHARD_IDS)) | {45}
  assert skip_counts(batches[-1])['corrupt_record'] >= 2


def test_all_bad_shards_raise(corpus):
  config = make_config(corpus / 'shards' / '{00007..00008}.tar', cycle_length=1,
                       shuffle_buffer=0)
  iterator = iter(make_train_dataset(config, caption_tokenizer()))
  with pytest.raises(DataQualityError, match=r'read 2 shards and found no usable.*'
                                             r'unreadable_shard=2'):
    next(iterator)
  iterator.close()


def test_skip_fraction_limit_raises(corpus):
  config = make_config(corpus / 'shards' / PATTERN, cycle_length=1, shuffle_buffer=0,
                       max_skip_fraction=0.02, skip_check_min_samples=40)
  iterator = iter(make_train_dataset(config, caption_tokenizer()))
  with pytest.raises(DataQualityError) as raised:
    take(iterator, 20)
  iterator.close()
  message = str(raised.value)
  assert PATTERN in message
  assert 'max_skip_fraction=0.02' in message
  assert 'make_shards' in message


def test_skip_limit_raises_from_worker(corpus, parsed_flags):
  config = make_config(corpus / 'shards' / '{00007..00008}.tar', shuffle_buffer=0,
                       num_workers=1)
  iterator = iter(make_train_dataset(config, caption_tokenizer()))
  with pytest.raises(DataQualityError, match='found no usable image-caption sample'):
    next(iterator)
  iterator.close()


def test_pattern_without_files_names_it(tmp_path):
  pattern = str(tmp_path / 'missing' / '{00000..00009}.tar')
  with pytest.raises(ValueError, match=r'missing/\{00000\.\.00009\}\.tar'):
    make_train_dataset(make_config(pattern), caption_tokenizer())
