"""Pretrained weights in: Hugging Face safetensors folders, GGUF files and CLIP image towers."""

from clamp_jax.weights.assign import WeightLoadError
from clamp_jax.weights.clip import image_preprocessing, load_image_tower
from clamp_jax.weights.clip_teacher import load_clip_teacher
from clamp_jax.weights.llm import load_llm, load_tokenizer, resolve_checkpoint, smollm2_gguf_path

__all__ = ['WeightLoadError', 'image_preprocessing', 'load_clip_teacher', 'load_image_tower',
           'load_llm', 'load_tokenizer', 'resolve_checkpoint', 'smollm2_gguf_path']
