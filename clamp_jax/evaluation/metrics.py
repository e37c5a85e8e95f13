"""Evaluation metrics on score matrices: top-k and mean per-class accuracy, ROC AUC, recall@K.

All values are fractions in [0, 1], and scores are higher-is-better. In retrieval ranks a
candidate outranks the correct item only with a strictly higher score, so ties count as hits.
Top-k accuracy breaks ties in the order of `np.argsort`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the `k` highest scores (k is capped at the classes)."""
  k = min(k, scores.shape[1])
  top = np.argsort(-scores, axis=1)[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=1)))


def mean_per_class_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy of each class that occurs in `labels`, averaged over those classes."""
  predictions = np.argmax(scores, axis=1)
  per_class = [np.mean(predictions[labels == label] == label) for label in np.unique(labels)]
  return float(np.mean(per_class))


def roc_auc(scores: np.ndarray, is_positive: np.ndarray) -> float:
  """Area under the ROC curve of a binary score (the Mann-Whitney U statistic, normalised).

  Tied scores count one half, which equals the trapezoidal area under the ROC curve.

  Raises:
    ValueError: when `is_positive` holds only one class, where the area is undefined.
  """
  is_positive = np.asarray(is_positive, dtype=bool)
  num_positive = int(is_positive.sum())
  num_negative = len(is_positive) - num_positive
  if num_positive == 0 or num_negative == 0:
    raise ValueError(f'ROC AUC needs both classes; got {num_positive} positive and '
                     f'{num_negative} negative examples.')
  ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
  rank_sum = ranks[is_positive].sum()
  return float((rank_sum - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative))


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks in ascending order, with tied values sharing the mean of their ranks."""
  order = np.argsort(values, kind='mergesort')
  sorted_values = values[order]
  ranks = np.empty(len(values), dtype=np.float64)
  start = 0
  while start < len(values):
    end = start
    while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
      end += 1
    ranks[order[start:end + 1]] = (start + end) / 2 + 1
    start = end + 1
  return ranks


def image_to_text_ranks(similarity: np.ndarray, caption_image: np.ndarray,
                        image_ids: np.ndarray) -> np.ndarray:
  """Rank (0 = first) of each image's best-scored own caption among all captions.

  `similarity` is `[images, captions]`, `caption_image[j]` is the image of caption j and
  `image_ids[i]` the id of row i (rows may be a chunk of all images).
  """
  is_own = caption_image[None, :] == image_ids[:, None]
  best_own = np.where(is_own, similarity, -np.inf).max(axis=1)
  return np.sum(similarity > best_own[:, None], axis=1)


def text_to_image_ranks(similarity: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
  """Rank (0 = first) of each caption's image among all images.

  `similarity` is `[captions, images]` and `caption_image[j]` is the image of caption j.
  """
  own = similarity[np.arange(len(caption_image)), caption_image]
  return np.sum(similarity > own[:, None], axis=1)


def recall_at_k(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
  """Fraction of queries whose correct item ranks within the first k, for each k."""
  return {k: float(np.mean(ranks < k)) for k in ks}
