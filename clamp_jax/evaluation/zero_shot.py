"""Zero-shot classification: class names x templates through the text tower, then nearest class.

Each class's classifier row is the mean of its L2-normalised template embeddings, normalised again
(CLIP's prompt ensembling). Images are scored by cosine similarity against every row. This module
contains the batched encoders and the held-out digits benchmark; `suite` runs every benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from clamp_jax.data.captions import CaptionTokenizer
from clamp_jax.data.digits import CLASS_NAMES, load_digits_split
from clamp_jax.data.pipeline import preprocess_digit, tokenize_class_captions
from clamp_jax.evaluation.metrics import top_k_accuracy
from clamp_jax.models.clamp import l2_normalize


@nnx.jit
def _encode_text(model, input_ids, attention_mask):
  return model.encode_text(input_ids, attention_mask)


@nnx.jit
def _encode_image(model, images):
  return model.encode_image(images)


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  """Append zero rows up to `rows`, so that every batch has one shape and compiles once."""
  if len(array) == rows:
    return array
  padding = np.zeros((rows - len(array),) + array.shape[1:], array.dtype)
  return np.concatenate([array, padding])


def text_embeddings(model, input_ids: np.ndarray, attention_mask: np.ndarray, batch_size: int,
                    pad: bool = False) -> np.ndarray:
  """Embed token rows with the text tower, `batch_size` rows per call: L2-normalised `[n, d]`.

  `pad=True` fills the last batch up with padding rows (then dropped), so that no new shape
  compiles.
  """
  rows = []
  for start in range(0, len(input_ids), batch_size):
    ids = input_ids[start:start + batch_size]
    mask = attention_mask[start:start + batch_size]
    count = len(ids)
    if pad:
      ids, mask = _pad_rows(ids, batch_size), _pad_rows(mask, batch_size)
    rows.append(np.asarray(_encode_text(model, jnp.asarray(ids), jnp.asarray(mask)))[:count])
  return np.concatenate(rows)


def class_embeddings(model, caption_tokenizer: CaptionTokenizer, class_names: Sequence[str],
                     templates: Sequence[str], batch_size: int = 64,
                     pad: bool = False) -> np.ndarray:
  """Zero-shot classifier `[classes, embed_dim]`: template-averaged, renormalised text embeddings."""
  tokens = tokenize_class_captions(caption_tokenizer, templates, class_names)
  num_classes, num_templates, length = tokens['input_ids'].shape
  ids = tokens['input_ids'].reshape(-1, length)
  mask = tokens['attention_mask'].reshape(-1, length)
  embeddings = text_embeddings(model, ids, mask, batch_size, pad)
  embeddings = embeddings.reshape(num_classes, num_templates, -1)
  return np.asarray(l2_normalize(jnp.asarray(embeddings.mean(axis=1))))


def image_embeddings(model, images: np.ndarray, batch_size: int, pad: bool = False) -> np.ndarray:
  """L2-normalised image embeddings `[n, embed_dim]` for preprocessed images `[n, h, w, 3]`."""
  rows = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    count = len(batch)
    if pad:
      batch = _pad_rows(batch, batch_size)
    rows.append(np.asarray(_encode_image(model, jnp.asarray(batch)))[:count])
  return np.concatenate(rows)


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
