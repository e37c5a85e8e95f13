"""Zero-shot image-text retrieval: recall@1/5/10 from images to captions and back.

Image-to-text counts a hit when any of the image's own captions ranks within the first K of all
captions. Text-to-image counts a hit when the caption's image ranks within the first K images.
"""

from __future__ import annotations

import logging

import numpy as np

from clamp_jax.data.captions import CaptionTokenizer
from clamp_jax.evaluation import metrics
from clamp_jax.evaluation.options import EvalOptions
from clamp_jax.evaluation.benchmarks import ResolvedBenchmark
from clamp_jax.evaluation.readers import (load_image_file, read_captioned_images,
                                          subset_indices, threaded_batches)
from clamp_jax.evaluation.zero_shot import image_embeddings, text_embeddings

RECALL_KS = (1, 5, 10)
# Rows of the similarity matrix computed at a time, which bounds its memory to this many rows.
_CHUNK = 1024


def retrieval_metrics(image_embedding: np.ndarray, text_embedding: np.ndarray,
                      caption_image: np.ndarray) -> dict[str, float]:
  """Compute recall@K in both directions (`i2t_r1`, ..., `t2i_r10`) and their mean, `mean_recall`."""
  image_ids = np.arange(len(image_embedding))
  i2t = [metrics.image_to_text_ranks(image_embedding[start:start + _CHUNK] @ text_embedding.T,
                                     caption_image, image_ids[start:start + _CHUNK])
         for start in range(0, len(image_embedding), _CHUNK)]
  t2i = [metrics.text_to_image_ranks(text_embedding[start:start + _CHUNK] @ image_embedding.T,
                                     caption_image[start:start + _CHUNK])
         for start in range(0, len(text_embedding), _CHUNK)]
  results = {}
  for direction, ranks in (('i2t', i2t), ('t2i', t2i)):
    for k, recall in metrics.recall_at_k(np.concatenate(ranks), RECALL_KS).items():
      results[f'{direction}_r{k}'] = recall
  results['mean_recall'] = float(np.mean(list(results.values())))
  return results


def evaluate_retrieval(model, caption_tokenizer: CaptionTokenizer, resolved: ResolvedBenchmark,
                       options: EvalOptions) -> dict[str, float]:
  """Evaluate one caption dataset; returns recalls, `num_images` and `num_captions`."""
  benchmark = resolved.benchmark
  data = read_captioned_images(resolved)
  logging.info('%s: %d images, %d captions, from %s.', benchmark.name, len(data.image_paths),
               len(data.captions), data.description)

  chosen = subset_indices(len(data.image_paths), options.max_images)
  load = lambda index: load_image_file(data.image_paths[index], options.read)
  kept, rows = [], []
  for position, batch in enumerate(threaded_batches(load, chosen, options.batch_size,
                                                    options.read_threads)):
    start = position * options.batch_size
    pixels = [image for image in batch if image is not None]
    kept.extend(int(chosen[start + offset]) for offset, image in enumerate(batch)
                if image is not None)
    if pixels:
      rows.append(image_embeddings(model, np.stack(pixels), options.batch_size, pad=True))
  if not rows:
    raise FileNotFoundError(f'{benchmark.title}: none of the images in {data.description} '
                            'could be read.')
  if len(kept) < len(chosen):
    logging.warning('%s: %d of %d images could not be read and were left out with their '
                    'captions.', benchmark.name, len(chosen) - len(kept), len(chosen))

  # Renumber the kept images 0..n-1 and keep only their captions.
  new_index = np.full(len(data.image_paths), -1, dtype=np.int64)
  new_index[kept] = np.arange(len(kept))
  caption_image = new_index[data.caption_image]
  captions = [caption for caption, image in zip(data.captions, caption_image) if image >= 0]
  caption_image = caption_image[caption_image >= 0]

  tokens = caption_tokenizer(captions)
  text = text_embeddings(model, tokens['input_ids'], tokens['attention_mask'],
                         options.text_batch_size, pad=True)
  results = retrieval_metrics(np.concatenate(rows), text, caption_image)
  results['num_images'] = len(kept)
  results['num_captions'] = len(captions)
  return results
