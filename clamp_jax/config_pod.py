"""Settings shared by the pod-scale configs (configs/llama7b.py, configs/vicuna13b.py)."""

import ml_collections

from clamp_jax.config_base import base_config

# OpenAI CLIP ViT-L/14: width 1024, 24 blocks, 16 heads, QuickGELU.
VIT_L14 = dict(patch_size=14, width=1024, layers=24, heads=16, mlp_ratio=4.0, act='quick_gelu',
               pool='token')
# Local folders of openai/clip-vit-large-patch14 and openai/clip-vit-large-patch14-336, by image
# size.
VIT_L14_FOLDERS = {224: '~/models/clip-vit-large-patch14',
                   336: '~/models/clip-vit-large-patch14-336'}


def pod_config(llm_path: str, architecture: dict, image_size: int) -> ml_collections.ConfigDict:
  """Settings shared by the 7B and 13B configs: the reference recipe on a pod."""
  config = base_config()
  model = config.model
  model.llm = llm_path
  model.llm_architecture = ml_collections.ConfigDict(architecture)
  model.llm_dtype = 'bfloat16'
  model.llm_param_dtype = 'bfloat16'  # Frozen base weights; adapters and heads stay float32.
  model.remat = 'full'
  model.scan_layers = True
  model.embed_dim = 768
  model.calibrate_text_features = False
  vit = model.vit
  for key, value in VIT_L14.items():
    vit[key] = value
  vit.image_size = image_size
  vit.dtype = 'bfloat16'
  vit.param_dtype = 'bfloat16'
  # OpenAI CLIP ViT-L/14 as a Hugging Face folder (see README, Pretrained image towers); plan mode
  # does not read it.
  vit.checkpoint = VIT_L14_FOLDERS[image_size]
  model.lock_image_tower = True

  config.mesh.data = 1
  config.mesh.fsdp = -1  # Parameters, optimizer state and batch split over every device.
  config.mesh.tensor = 1

  train = config.train
  train.batch_size = 2048
  # Six epochs of 10M image-caption pairs at a global batch of 2048.
  train.steps = 29297
  # NOTE: the peak learning rate is this project's choice, not a published value.
  train.learning_rate = 1e-4
  train.warmup_steps = 1220
  train.weight_decay = 0.5
  train.b1 = 0.9
  train.b2 = 0.98
  train.grad_clip_norm = 1.0
  train.log_every = 50
  train.checkpoint_every = 1000

  data = config.data
  # Web-scale image-caption shards; point this at yours (see README, Training data).
  data.train.kind = 'webdataset'
  data.train.pattern = '/data/cc12m/{00000..01242}.tar'
  data.caption_table = False  # Web captions are all distinct.
  data.max_length = 64  # Caption tokens with the instruction wrapper; 24 prompts come on top.
  data.caption_wrapper = ('USER: {caption} This image has the following visual attributes '
                          'ASSISTANT: 1.')
  config.eval.at_end = False
  return config
