"""On-disk cache of zero-shot classifiers (class embeddings), one file per step and dataset.

Building a classifier runs the LLM text tower over classes x templates captions: for ImageNet,
1000 classes times every template. The cache keeps it under
`CACHE_DIR/step_<step>/<dataset>-<key>.npz`. The key hashes the class names, the templates, the
caption wrapper and length, and the text tower's projection and prompt weights. Changed prompts,
or a retrained model that reuses a step number, therefore miss the cache instead of reading
stale embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from clamp_jax.data.captions import CaptionTokenizer


def text_tower_fingerprint(model) -> str:
  """Hash the text tower's projection and prompt weights (SHA-256), which training updates."""
  digest = hashlib.sha256()
  tower = model.text_tower
  for part in (tower.projection, tower.prompts):
    for leaf in jax.tree.leaves(nnx.state(part) if isinstance(part, nnx.Module) else part[...]):
      digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()


def cache_key(model, caption_tokenizer: CaptionTokenizer, class_names: Sequence[str],
              templates: Sequence[str]) -> str:
  """Hash of everything a classifier depends on besides the frozen LLM weights."""
  settings = {'class_names': list(class_names), 'templates': list(templates),
              'wrapper': caption_tokenizer.wrapper, 'max_length': caption_tokenizer.max_length,
              'model': text_tower_fingerprint(model)}
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode('utf-8')).hexdigest()[:16]


def cache_path(directory: str, step: int, dataset: str, key: str) -> str:
  return os.path.join(directory, f'step_{step:08d}', f'{dataset}-{key}.npz')


def cached_class_embeddings(build: Callable[[], np.ndarray], *, model, caption_tokenizer,
                            class_names: Sequence[str], templates: Sequence[str], dataset: str,
                            directory: str, step: int | None) -> tuple[np.ndarray, bool]:
  """Load the classifier of (`step`, `dataset`) from the cache, or `build()` and store it.

  Returns the embeddings and whether they came from the cache. An empty `directory` or a None
  `step` turns the cache off.
  """
  if not directory or step is None:
    return build(), False
  key = cache_key(model, caption_tokenizer, class_names, templates)
  path = cache_path(directory, step, dataset, key)
  if os.path.isfile(path):
    try:
      with np.load(path) as stored:
        embeddings = stored['class_embeddings']
      logging.info('%s: class embeddings of step %d read from %s.', dataset, step, path)
      return embeddings, True
    except (OSError, ValueError, KeyError) as error:
      logging.warning('Ignoring unreadable class-embedding cache %s (%s).', path, error)

  embeddings = build()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Write to a temporary file and rename it, so that a crash never leaves a truncated file.
  handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
  with os.fdopen(handle, 'wb') as file:
    np.savez(file, class_embeddings=embeddings)
  os.replace(temporary, path)
  logging.info('%s: class embeddings of step %d written to %s.', dataset, step, path)
  return embeddings, False
