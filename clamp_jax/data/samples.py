"""One image-caption pair between reading and decoding, and its decoder into model inputs.

Every source reader yields `RawSample`s (or `Skipped` markers). `SampleDecoder` turns a
`RawSample` into the arrays of one example, or into `Skipped(reason)` when the image or the
caption cannot be used, so a bad sample is dropped whole and never shifts the pairing of others.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from PIL import Image

from clamp_jax.data import images
from clamp_jax.data.captions import CaptionTokenizer
from clamp_jax.data.quality import ShardEnd, Skipped


@dataclasses.dataclass
class RawSample:
  """An undecoded sample.

  Attributes:
    key: the sample's name in its source (tar key, file path or record index), for logs.
    image: encoded image bytes, a decoded uint8 array [H, W] or [H, W, C] (TFDS), or None when
      the sample has no image.
    caption: caption bytes (decoded as UTF-8 later), a str, or None when the sample has none.
    seed_parts: integers unique to this sample and epoch within its source. Together with the
      pipeline seed they seed the sample's random crop, so a resumed run draws the same crop.
  """

  key: str
  image: bytes | np.ndarray | None
  caption: bytes | str | None
  seed_parts: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  """Image decoding and preprocessing settings."""

  image_size: int  # Output height and width in pixels.
  max_pixels: int  # Images with more pixels (width * height) are skipped.
  random_resized_crop: bool = False  # Random crop in place of resize and center crop.
  crop_scale: tuple[float, float] = (0.9, 1.0)  # Area fraction range of the random crop.


class SampleDecoder:
  """Decode a `RawSample` into `{image, input_ids, attention_mask}` or a `Skipped` marker.

  `image` is float32 [image_size, image_size, 3], CLIP-normalised; `input_ids` and
  `attention_mask` are int32 [max_length] rows from the caption tokenizer. Markers pass through.
  """

  def __init__(self, caption_tokenizer: CaptionTokenizer, options: ImageOptions, seed: int):
    self.caption_tokenizer = caption_tokenizer
    self.options = options
    self.seed = seed

  def __call__(self, sample):
    if isinstance(sample, (Skipped, ShardEnd)):
      return sample
    caption = self._caption(sample.caption)
    if isinstance(caption, Skipped):
      return caption
    image = self._image(sample)
    if isinstance(image, Skipped):
      return image
    tokens = self.caption_tokenizer([caption])
    return {'image': image, **{key: value[0] for key, value in tokens.items()}}

  @staticmethod
  def _caption(caption: bytes | str | None) -> str | Skipped:
    if caption is None:
      return Skipped('missing_caption')
    if isinstance(caption, bytes):
      try:
        caption = caption.decode('utf-8')
      except UnicodeDecodeError:
        return Skipped('caption_not_utf8')
    caption = caption.strip()
    if not caption:
      return Skipped('empty_caption')
    return caption

  def _image(self, sample: RawSample) -> np.ndarray | Skipped:
    options = self.options
    if sample.image is None:
      return Skipped('missing_image')
    if isinstance(sample.image, np.ndarray):
      pixels = sample.image
      if pixels.size == 0:
        return Skipped('empty_image')
      if pixels.shape[0] * pixels.shape[1] > options.max_pixels:
        return Skipped('too_many_pixels')
      image = images.to_rgb(Image.fromarray(np.squeeze(pixels)))
    else:
      if not sample.image:
        return Skipped('empty_image')
      try:
        image = images.decode_image(sample.image, options.max_pixels)
      except images.ImageTooLargeError:
        return Skipped('too_many_pixels')
      except Image.DecompressionBombError:
        return Skipped('too_many_pixels')
      except Exception as error:  # pylint: disable=broad-exception-caught
        # Pillow raises many types for corrupt data (OSError, ValueError, SyntaxError,
        # struct.error, IndexError, ...), and none of them may stop training.
        logging.debug('Skipping sample %s: cannot decode its image (%r).', sample.key, error)
        return Skipped('corrupt_image')
    if options.random_resized_crop:
      rng = np.random.default_rng((self.seed, *sample.seed_parts))
      return images.random_resized_crop(image, options.image_size, rng, options.crop_scale)
    return images.clip_preprocess(image, options.image_size)
