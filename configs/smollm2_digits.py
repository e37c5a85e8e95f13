"""The default job: CLAMP on scikit-learn's digits with the real SmolLM2-135M-Instruct text tower.

Runs on a 2-core CPU in minutes: LoRA, prompts, pooler and projection train on the frozen SmolLM2,
and a small ViT trains from scratch on the 8x8 digits upscaled to 32x32.

    python -m clamp_jax.main --config=configs/smollm2_digits.py --workdir=/tmp/clamp_digits
"""

from clamp_jax.config_base import base_config


def get_config():
  config = base_config()
  config.model.llm = 'smollm2'
  config.model.embed_dim = 256
  config.model.lock_image_tower = False  # The ViT has no pretrained weights here, so it trains.
  vit = config.model.vit
  vit.image_size = 32
  vit.patch_size = 4
  vit.width = 192
  vit.layers = 4
  vit.heads = 4
  vit.pool = 'gap'

  train = config.train
  train.steps = 240
  train.batch_size = 64
  train.learning_rate = 1e-3
  train.warmup_steps = 10
  train.weight_decay = 0.05
  train.log_every = 5
  train.checkpoint_every = 60
  # Zero-shot prompts: the training template, since the text tower saw no other phrasing.
  config.eval.templates = config.data.templates
  return config
