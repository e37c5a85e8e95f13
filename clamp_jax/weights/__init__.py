"""Pretrained weights in: Hugging Face safetensors folders and GGUF files."""

from clamp_jax.weights.assign import WeightLoadError
from clamp_jax.weights.llm import load_llm, load_tokenizer, resolve_checkpoint, smollm2_gguf_path

__all__ = ['WeightLoadError', 'load_llm', 'load_tokenizer', 'resolve_checkpoint',
           'smollm2_gguf_path']
