"""The scikit-learn handwritten digits (1797 real 8x8 grayscale images, 10 classes) and a fixed split.

The images ship inside scikit-learn, so no download is needed. Pixel values are integers 0..16,
where 16 is full ink. The split is stratified by class and depends only on the seed and the test
fraction.
"""

from __future__ import annotations

import functools

import numpy as np

CLASS_NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
MAX_PIXEL_VALUE = 16


@functools.lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Load all 1797 images as uint8 `[n, 8, 8]` (values 0..16) and labels as int32 `[n]`."""
  # Imported here so that importing this module does not load scikit-learn.
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = digits.images.astype(np.uint8)
  labels = digits.target.astype(np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def split_indices(labels: np.ndarray, seed: int, test_fraction: float) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
  """Split example indices into sorted `(train, test)` arrays, stratified by label.

  One permutation of all indices from `np.random.default_rng(seed)` orders the examples. Each class
  then sends its first `round(count * test_fraction)` examples in that order to the test split.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction}.')
  order = np.random.default_rng(seed).permutation(len(labels))
  is_test = np.zeros(len(labels), dtype=bool)
  for label in np.unique(labels):
    members = order[labels[order] == label]
    is_test[members[:round(len(members) * test_fraction)]] = True
  return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def load_digits_split(split: str, seed: int = 0,
                      test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
  """Load one split as uint8 images `[n, 8, 8]` (values 0..16) and int32 labels `[n]`.

  With the defaults the test split has 359 images and the train split 1438.
  """
  if split not in ('train', 'test'):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  images, labels = load_digits_arrays()
  train, test = split_indices(labels, seed, test_fraction)
  indices = train if split == 'train' else test
  return images[indices], labels[indices]
