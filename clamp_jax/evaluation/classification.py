"""Zero-shot classification of one benchmark: a cached text classifier, then batched images."""

from __future__ import annotations

import logging
import os

import numpy as np

from clamp_jax.data.captions import CaptionTokenizer
from clamp_jax.evaluation import metrics
from clamp_jax.evaluation.benchmarks import TEMPLATES_FILE, ResolvedBenchmark
from clamp_jax.evaluation.cache import cached_class_embeddings
from clamp_jax.evaluation.options import EvalOptions
from clamp_jax.evaluation.readers import (read_labelled_images, subset_indices,
                                          threaded_batches)
from clamp_jax.evaluation.zero_shot import class_embeddings, image_embeddings


def benchmark_templates(resolved: ResolvedBenchmark) -> tuple[str, ...]:
  """Return the lines of the folder's templates.txt if it exists, else the benchmark's templates."""
  path = os.path.join(resolved.folder, TEMPLATES_FILE) if resolved.folder else ''
  if path and os.path.isfile(path):
    with open(path, encoding='utf-8') as file:
      lines = tuple(line.strip() for line in file if line.strip())
    bad = [line for line in lines if line.count('{}') != 1]
    if not lines or bad:
      raise ValueError(f'{path} must contain one template per line, each with exactly one {{}} '
                       f'field for the class name; invalid lines: {bad[:3]}.')
    return lines
  return resolved.benchmark.templates


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Compute top-1, mean per-class accuracy, top-5 (over 5 classes) and ROC AUC (2 classes).

  ROC AUC scores class 1 against class 0 by the difference of their similarities.
  """
  num_classes = scores.shape[1]
  results = {'top1': metrics.top_k_accuracy(scores, labels, 1)}
  if num_classes > 5:
    results['top5'] = metrics.top_k_accuracy(scores, labels, 5)
  results['mean_per_class'] = metrics.mean_per_class_accuracy(scores, labels)
  if num_classes == 2 and 0 < int(labels.sum()) < len(labels):
    results['roc_auc'] = metrics.roc_auc(scores[:, 1] - scores[:, 0], labels == 1)
  return results


def keep_present_classes(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Drop the classifier columns of classes absent from `labels` and renumber the labels."""
  present = np.unique(labels)
  return scores[:, present], np.searchsorted(present, labels).astype(labels.dtype)


def evaluate_classification(model, caption_tokenizer: CaptionTokenizer,
                            resolved: ResolvedBenchmark, options: EvalOptions,
                            step: int | None) -> dict[str, float]:
  """Evaluate one classification benchmark; returns its metrics and `num_images`."""
  benchmark = resolved.benchmark
  data = read_labelled_images(resolved, options.read)
  templates = benchmark_templates(resolved)
  indices = subset_indices(data.size, options.max_images)
  logging.info('%s: %d of %d images, %d classes, %d templates, from %s.', benchmark.name,
               len(indices), data.size, len(data.class_names), len(templates), data.description)

  def build() -> np.ndarray:
    return class_embeddings(model, caption_tokenizer, data.class_names, templates,
                            options.text_batch_size, pad=True)

  classifier, _ = cached_class_embeddings(
      build, model=model, caption_tokenizer=caption_tokenizer, class_names=data.class_names,
      templates=templates, dataset=benchmark.name, directory=options.cache_dir, step=step)

  score_rows, labels, unreadable = [], [], 0
  for batch in threaded_batches(data.load, indices, options.batch_size, options.read_threads):
    pixels = [image for image, _ in batch if image is not None]
    labels.extend(label for image, label in batch if image is not None)
    unreadable += len(batch) - len(pixels)
    if pixels:
      embeddings = image_embeddings(model, np.stack(pixels), options.batch_size, pad=True)
      score_rows.append(embeddings @ classifier.T)
  if unreadable:
    logging.warning('%s: %d of %d images could not be read or decoded and were left out.',
                    benchmark.name, unreadable, len(indices))
  if not score_rows:
    raise FileNotFoundError(f'{benchmark.title}: none of the {len(indices)} images in '
                            f'{data.description} could be read.')

  scores = np.concatenate(score_rows)
  labels = np.asarray(labels, dtype=np.int64)
  if benchmark.present_classes_only:
    scores, labels = keep_present_classes(scores, labels)
  results = classification_metrics(scores, labels)
  if benchmark.metric not in results:
    raise ValueError(f'{benchmark.title} reports {benchmark.metric}, which needs two classes '
                     f'with images of both; {data.description} gave {scores.shape[1]} classes '
                     f'and labels {np.unique(labels).tolist()[:5]}.')
  results['num_images'] = int(len(labels))
  if unreadable:
    results['num_unreadable'] = int(unreadable)
  return results
