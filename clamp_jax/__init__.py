"""CLAMP (Contrastive LAnguage Model Prompt-tuning) in JAX and Flax NNX."""

from clamp_jax.generate import generate, generate_ids
from clamp_jax.weights import image_preprocessing, load_clip_teacher, load_image_tower, load_llm

__all__ = ['generate', 'generate_ids', 'image_preprocessing', 'load_clip_teacher',
           'load_image_tower', 'load_llm']
