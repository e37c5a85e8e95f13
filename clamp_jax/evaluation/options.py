"""Evaluation settings taken from `config.eval` and the model config."""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from clamp_jax.evaluation.readers import ReadSettings


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """Settings of every benchmark evaluation besides the model and the caption tokenizer."""

  read: ReadSettings
  data_dir: str
  batch_size: int
  text_batch_size: int
  read_threads: int
  max_images: int  # Images per dataset, a fixed random subset; 0: all.
  cache_dir: str  # Absolute folder of the class-embedding cache; '' turns it off.


def eval_options(config: ml_collections.ConfigDict, workdir: str,
                 max_images: int = 0) -> EvalOptions:
  """Build the options of `config.eval`; `max_images` > 0 evaluates a subset of each dataset."""
  evaluation = config.eval
  cache_dir = evaluation.cache_dir
  if cache_dir:
    cache_dir = os.path.join(workdir, os.path.expanduser(cache_dir))
  read = ReadSettings(image_size=config.model.vit.image_size, source=evaluation.source,
                      tfds_data_dir=evaluation.tfds_data_dir,
                      max_image_pixels=config.data.train.max_image_pixels)
  return EvalOptions(
      read=read, data_dir=evaluation.data_dir, batch_size=evaluation.batch_size,
      text_batch_size=evaluation.text_batch_size, read_threads=evaluation.read_threads,
      max_images=max_images, cache_dir=cache_dir)
