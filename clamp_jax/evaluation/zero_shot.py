"""Zero-shot classification: class names x templates through the text tower, then nearest class.

Each class's classifier row is the mean of its L2-normalised template embeddings, normalised again
(CLIP's prompt ensembling). Images are scored by cosine similarity against every row.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from clamp_jax.data.captions import CaptionTokenizer
from clamp_jax.data.digits import CLASS_NAMES, load_digits_split
from clamp_jax.data.pipeline import preprocess_digit, tokenize_class_captions
from clamp_jax.models.clamp import l2_normalize


@nnx.jit
def _encode_text(model, input_ids, attention_mask):
  return model.encode_text(input_ids, attention_mask)


@nnx.jit
def _encode_image(model, images):
  return model.encode_image(images)


def class_embeddings(model, caption_tokenizer: CaptionTokenizer, class_names: Sequence[str],
                     templates: Sequence[str], batch_size: int = 64) -> np.ndarray:
  """Zero-shot classifier `[classes, embed_dim]`: template-averaged, renormalised text embeddings."""
  tokens = tokenize_class_captions(caption_tokenizer, templates, class_names)
  num_classes, num_templates, length = tokens['input_ids'].shape
  ids = tokens['input_ids'].reshape(-1, length)
  mask = tokens['attention_mask'].reshape(-1, length)
  rows = []
  for start in range(0, len(ids), batch_size):
    rows.append(np.asarray(_encode_text(model, jnp.asarray(ids[start:start + batch_size]),
                                        jnp.asarray(mask[start:start + batch_size]))))
  embeddings = np.concatenate(rows).reshape(num_classes, num_templates, -1)
  return np.asarray(l2_normalize(jnp.asarray(embeddings.mean(axis=1))))


def image_embeddings(model, images: np.ndarray, batch_size: int) -> np.ndarray:
  """L2-normalised image embeddings `[n, embed_dim]` for preprocessed images `[n, h, w, 3]`."""
  rows = []
  for start in range(0, len(images), batch_size):
    rows.append(np.asarray(_encode_image(model, jnp.asarray(images[start:start + batch_size]))))
  return np.concatenate(rows)


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the `k` highest scores."""
  k = min(k, scores.shape[1])
  top = np.argsort(-scores, axis=1)[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=1)))


def evaluate_digits(model, caption_tokenizer: CaptionTokenizer, config: ml_collections.ConfigDict
                    ) -> dict[str, float]:
  """Top-1 and top-5 zero-shot accuracy on the held-out digits."""
  images, labels = load_digits_split('test', seed=config.data.split_seed,
                                     test_fraction=config.data.test_fraction)
  size = config.model.vit.image_size
  pixels = np.stack([preprocess_digit(image, size) for image in images])
  classifier = class_embeddings(model, caption_tokenizer, CLASS_NAMES,
                                tuple(config.eval.templates), config.eval.batch_size)
  scores = image_embeddings(model, pixels, config.eval.batch_size) @ classifier.T
  return {'top1': top_k_accuracy(scores, labels, 1), 'top5': top_k_accuracy(scores, labels, 5),
          'num_images': int(len(labels))}


def format_table(results: dict[str, dict[str, float]]) -> str:
  lines = [f'{"dataset":<12} {"top1":>7} {"top5":>7} {"images":>7}']
  for name, row in results.items():
    lines.append(f'{name:<12} {row["top1"]:>7.4f} {row["top5"]:>7.4f} {row["num_images"]:>7d}')
  return '\n'.join(lines)


def run_zero_shot(model, caption_tokenizer: CaptionTokenizer, config: ml_collections.ConfigDict,
                  workdir: str) -> dict[str, dict[str, float]]:
  """Evaluate, write WORKDIR/zero_shot.json and print the table."""
  logging.info('Zero-shot evaluation on the held-out digits.')
  results = {'digits': evaluate_digits(model, caption_tokenizer, config)}
  path = os.path.join(workdir, 'zero_shot.json')
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  print(format_table(results), flush=True)
  logging.info('Wrote %s', path)
  return results
