"""Image decoding and CLIP preprocessing for web-scale sources.

`decode_image` turns encoded bytes into an 8-bit RGB Pillow image: grayscale, palette, RGBA,
CMYK and 16-bit images are converted, and transparent pixels are composited onto white.
`clip_preprocess` then follows OpenAI CLIP's evaluation transform: bicubic resize of the shorter
side to `image_size`, center crop, scaling to [0, 1] and normalisation with the CLIP mean and std.
`random_resized_crop` is the training alternative to the resize and center crop.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from clamp_jax.data.pipeline import CLIP_MEAN, CLIP_STD

# Modes that hold more than 8 bits per pixel; they are scaled to 8 bits as 16-bit values.
_WIDE_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')
_ALPHA_MODES = ('RGBA', 'LA', 'PA', 'RGBa', 'La')
_MAX_16_BIT = 65535


class ImageTooLargeError(ValueError):
  """The image has more pixels than the configured limit."""


def open_image(data: bytes, max_pixels: int) -> Image.Image:
  """Open encoded image bytes, check the pixel count from the header, and decode the pixels.

  Raises:
    ImageTooLargeError: when width * height > max_pixels (checked before decoding).
    Exception: whatever Pillow raises for data it cannot decode (OSError, ValueError,
      SyntaxError, struct.error, ...). Callers treat every such error as a corrupt image.
  """
  image = Image.open(io.BytesIO(data))
  width, height = image.size
  if width * height > max_pixels:
    raise ImageTooLargeError(f'{width}x{height} pixels exceed the limit of {max_pixels}.')
  if width == 0 or height == 0:
    raise ValueError(f'Image has zero size {width}x{height}.')
  image.load()
  return image


def to_rgb(image: Image.Image) -> Image.Image:
  """Convert any Pillow mode to 8-bit RGB.

  16-bit and 32-bit integer grayscale is scaled from [0, 65535] to [0, 255] (values above 65535
  are clipped). Images with an alpha channel, and palette images with a transparent colour, are
  composited onto a white background.
  """
  if image.mode in _WIDE_MODES:
    wide = np.asarray(image, dtype=np.float64)
    scaled = np.clip(np.round(wide * (255 / _MAX_16_BIT)), 0, 255).astype(np.uint8)
    image = Image.fromarray(scaled)
  elif image.mode == 'F':
    image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
  has_alpha = image.mode in _ALPHA_MODES or (image.mode == 'P' and 'transparency' in image.info)
  if has_alpha:
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, rgba)
  if image.mode != 'RGB':
    image = image.convert('RGB')
  return image


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
  """Decode image bytes into 8-bit RGB (see `open_image` for the errors)."""
  return to_rgb(open_image(data, max_pixels))


def normalize(image: Image.Image) -> np.ndarray:
  """Scale an RGB image to [0, 1] and normalise it with the CLIP mean and std: float32 [H, W, 3]."""
  pixels = np.asarray(image, dtype=np.float32) / 255.0
  return (pixels - CLIP_MEAN) / CLIP_STD


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
  """Resize with bicubic filtering so that the shorter side is `size` pixels.

  The longer side becomes `int(size * long / short)`, as in torchvision's `Resize(size)`.
  """
  width, height = image.size
  if width <= height:
    new_size = (size, int(size * height / width))
  else:
    new_size = (int(size * width / height), size)
  if new_size == image.size:
    return image
  return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  """Crop the central `size` x `size` square, with torchvision's rounding of the offsets."""
  width, height = image.size
  left = int(round((width - size) / 2.0))
  top = int(round((height - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def clip_preprocess(image: Image.Image, size: int) -> np.ndarray:
  """Apply CLIP's transform to an RGB image: float32 [size, size, 3], CLIP-normalised."""
  return normalize(center_crop(resize_shorter_side(image, size), size))


def sample_crop_box(width: int, height: int, rng: np.random.Generator,
                    scale: tuple[float, float],
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Draw a random crop `(left, top, right, bottom)` as torchvision's RandomResizedCrop does.

  The crop covers a uniform fraction in `scale` of the image area with a log-uniform aspect
  ratio in `ratio`. After 10 draws that do not fit, it falls back to a center crop with the
  aspect ratio clamped to `ratio`.
  """
  area = width * height
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_low, log_high))
    crop_width = int(round(math.sqrt(target_area * aspect)))
    crop_height = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      left = int(rng.integers(0, width - crop_width + 1))
      top = int(rng.integers(0, height - crop_height + 1))
      return left, top, left + crop_width, top + crop_height
  aspect = width / height
  if aspect < ratio[0]:
    crop_width, crop_height = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    crop_width, crop_height = int(round(height * ratio[1])), height
  else:
    crop_width, crop_height = width, height
  left = (width - crop_width) // 2
  top = (height - crop_height) // 2
  return left, top, left + crop_width, top + crop_height


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator,
                        scale: tuple[float, float]) -> np.ndarray:
  """Crop a random box (see `sample_crop_box`), resize it bicubically to `size` x `size`, and
  normalise: float32 [size, size, 3]."""
  box = sample_crop_box(image.width, image.height, rng, scale)
  resized = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
  return normalize(resized)
