"""Grain input pipeline for the digits: CLIP-normalised images with tokenized class captions.

Order of operations: example ids -> `shuffle` -> `repeat` -> per-example transform (image and
caption) -> threaded prefetch -> `batch`. Grain's `MapDataset.shuffle` folds the epoch number into
its seed (`seed + epoch` in grain 0.2.18) for indices past the first epoch, so shuffling before
`repeat` gives every epoch a different, reproducible order. Because every step is a function of the
element's index, an iterator's `get_state()` is only the next index, and `set_state()` resumes at
exactly the same batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np
from PIL import Image

from clamp_jax.data.captions import CaptionTokenizer, fill_templates
from clamp_jax.data.digits import CLASS_NAMES, MAX_PIXEL_VALUE, load_digits_split

# OpenAI CLIP's per-channel pixel statistics (RGB) for images scaled to [0, 1].
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def preprocess_digit(image: np.ndarray, image_size: int) -> np.ndarray:
  """Turn one uint8 digit `[8, 8]` (values 0..16) into float32 `[image_size, image_size, 3]`.

  The digit is scaled to [0, 1], resized with bicubic filtering, clipped back to [0, 1] (bicubic
  overshoots at sharp edges), copied to three channels and normalised with the CLIP mean and std.
  """
  gray = image.astype(np.float32) / MAX_PIXEL_VALUE
  resized = Image.fromarray(gray).resize((image_size, image_size), Image.Resampling.BICUBIC)
  gray = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
  rgb = np.repeat(gray[:, :, None], 3, axis=-1)
  return (rgb - CLIP_MEAN) / CLIP_STD


def tokenize_class_captions(caption_tokenizer: CaptionTokenizer, templates: Sequence[str],
                            class_names: Sequence[str] = CLASS_NAMES) -> dict[str, np.ndarray]:
  """Tokenize every (class, template) caption once: int32 arrays `[classes, templates, length]`.

  The same table serves the training captions and the zero-shot classifier prompts.
  """
  if not templates:
    raise ValueError('At least one caption template is required.')
  captions = fill_templates(templates, class_names)
  flat = caption_tokenizer([caption for row in captions for caption in row])
  return {key: value.reshape(len(class_names), len(templates), -1) for key, value in flat.items()}


def choose_template(seed: int, epoch: int, example_id: int, num_templates: int) -> int:
  """Pick a template index from `(seed, epoch, example_id)` alone, so reruns pick the same one."""
  if num_templates == 1:
    return 0
  return int(np.random.default_rng((seed, epoch, example_id)).integers(num_templates))


class DigitExamples:
  """Build one example dict from its position in the repeated stream and its example id."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, captions: dict[str, np.ndarray],
               image_size: int, seed: int):
    self.images = images
    self.labels = labels
    self.captions = captions
    self.image_size = image_size
    self.seed = seed
    self.num_templates = captions['input_ids'].shape[1]

  def __call__(self, position: int, example_id: int) -> dict[str, np.ndarray]:
    example_id = int(example_id)
    epoch = position // len(self.labels)
    label = int(self.labels[example_id])
    template = choose_template(self.seed, epoch, example_id, self.num_templates)
    return {
        'image': preprocess_digit(self.images[example_id], self.image_size),
        **{key: value[label, template] for key, value in self.captions.items()},
        'caption_index': np.int32(label * self.num_templates + template),
        'label': np.int32(label),
    }


class AttachCaptionTable:
  """Replace a batch's per-image captions by the table of all distinct captions.

  The batch then carries `input_ids` and `attention_mask` `[classes * templates, L]` and
  `caption_index` `[B]`, so the text tower runs once per distinct caption instead of once per image.
  """

  def __init__(self, captions: dict[str, np.ndarray]):
    self.tables = {key: value.reshape(-1, value.shape[-1]) for key, value in captions.items()}

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**batch, **self.tables}


def make_digits_dataset(
    split: str,
    *,
    caption_tokenizer: CaptionTokenizer,
    templates: Sequence[str],
    image_size: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    drop_remainder: bool = True,
    split_seed: int = 0,
    test_fraction: float = 0.2,
    caption_table: bool = False,
    read_options: grain.ReadOptions | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
  """Build a batched digits dataset. `iter()` on it gives a checkpointable `grain.DatasetIterator`.

  Each batch is a dict of numpy arrays:
    image: float32 `[B, image_size, image_size, 3]`, CLIP-normalised.
    input_ids: int32 `[B, L]`, the example's class caption in one of `templates`, right-padded.
    attention_mask: int32 `[B, L]`, 1 on real tokens.
    caption_index: int32 `[B]`, the example's caption as `label * len(templates) + template`.
    label: int32 `[B]`, the digit 0..9.

  With `caption_table=True`, `input_ids` and `attention_mask` are instead the table of all
  `10 * len(templates)` distinct captions and `caption_index` points into it.

  Args:
    split: 'train' or 'test' (see `load_digits_split`).
    caption_tokenizer: wraps and tokenizes the captions; L is its `max_length`.
    templates: caption templates with one `{}` field for the class name.
    image_size: output height and width in pixels.
    batch_size: examples per batch.
    seed: shuffle seed (0 to 2**32 - 1) and template-choice seed.
    shuffle: shuffle the examples, with a different order in each epoch.
    repeat: repeat forever; otherwise stop after one epoch.
    drop_remainder: drop a final batch smaller than `batch_size`.
    split_seed: seed of the train/test split.
    test_fraction: share of each class held out as the test split.
    caption_table: emit the distinct-caption table instead of one caption per image.
    read_options: grain threading and prefetch settings. The default keeps grain's thread count and
      buffers `2 * batch_size` examples, far fewer than grain's 500.
    process_index: this process's index among `process_count` processes. Each reads every
      `process_count`-th example of the shuffled stream, starting at its index, so with
      `batch_size` set to the global batch over `process_count` the processes' batches together
      hold exactly the examples of one global batch.
    process_count: number of processes reading.
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  if image_size <= 0:
    raise ValueError(f'image_size must be positive, got {image_size}.')
  images, labels = load_digits_split(split, seed=split_seed, test_fraction=test_fraction)
  captions = tokenize_class_captions(caption_tokenizer, templates)

  dataset = grain.MapDataset.range(len(labels))
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  if repeat:
    dataset = dataset.repeat()
  dataset = dataset.map_with_index(DigitExamples(images, labels, captions, image_size, seed))
  if process_count > 1:
    dataset = dataset[process_index::process_count]

  if read_options is None:
    read_options = grain.ReadOptions(prefetch_buffer_size=2 * batch_size)
  batched = dataset.to_iter_dataset(read_options).batch(batch_size, drop_remainder=drop_remainder)
  if caption_table:
    batched = batched.map(AttachCaptionTable(captions))
  return batched
