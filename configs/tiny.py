"""Tiny random towers for tests and smoke runs: seconds per run on a CPU.

The LLM is a 2-layer random Llama that borrows SmolLM2's tokenizer.
"""

from clamp_jax.config_base import base_config


def get_config():
  config = base_config()
  config.model.llm = 'random'
  config.model.embed_dim = 32
  config.model.num_prompts = 4
  config.model.pooler_heads = 4
  config.model.lora.rank = 4
  config.model.lock_image_tower = False
  vit = config.model.vit
  vit.image_size = 16
  vit.patch_size = 4
  vit.width = 32
  vit.layers = 2
  vit.heads = 4

  train = config.train
  train.steps = 4
  train.batch_size = 8
  train.learning_rate = 1e-3
  train.warmup_steps = 1
  train.weight_decay = 0.0
  train.log_every = 1
  train.checkpoint_every = 2
  config.data.max_length = 24
  config.eval.templates = ('a photo of the handwritten digit {}.',)
  return config
