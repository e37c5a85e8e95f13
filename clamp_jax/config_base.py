"""Default config fields; each file in configs/ starts from `base_config()` and sets its job."""

import ml_collections

# The CLAMP trainable set: LoRA adapters, prompt embeddings, attention pooler, projection and the
# temperature. Regular expressions searched in parameter paths such as
# 'text_tower/llm/layers/3/self_attn/q_proj/lora/lora_a'. The base LLM never matches.
TRAINABLE = (
    r'/lora/lora_[ab]$',
    r'^text_tower/prompts$',
    r'^text_tower/pooler/',
    r'^text_tower/projection/',
    r'^log_logit_scale$',
)


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = 'train'  # One of: train, eval.
  config.seed = 0  # Seed for parameter init, dropout and data order.

  model = config.model = ml_collections.ConfigDict()
  model.llm = 'smollm2'  # LLM checkpoint: HF folder, .gguf file, cached hub id, 'smollm2' or 'random'.
  # Architecture of a randomly initialised LLM (used only when llm == 'random'); LlamaConfig fields.
  model.random_llm = ml_collections.ConfigDict(dict(
      vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
      rope_theta=10000.0))
  # Tokenizer for llm == 'random': any checkpoint whose tokenizer to borrow ('smollm2' by default).
  model.random_llm_tokenizer = 'smollm2'
  model.llm_param_dtype = 'float32'  # Storage dtype of the frozen LLM weights: float32 or bfloat16.
  model.llm_dtype = 'float32'  # Compute dtype inside the LLM: float32 or bfloat16.
  model.embed_dim = 512  # Shared image-text embedding size.
  model.num_prompts = 24  # Read-only prompt tokens appended after each caption.
  model.pooler_heads = 8  # Heads of the attention pooler over the prompt positions.
  # Standardise the prompt hidden states per feature with statistics of the first training batch
  # (a fixed, data-dependent init), so the pooler starts from features where captions differ.
  model.calibrate_text_features = True
  model.init_logit_scale = 1 / 0.07  # Initial contrastive logit scale (exp of the learned log).
  model.max_logit_scale = 100.0  # The logit scale is clipped at this value.
  lora = model.lora = ml_collections.ConfigDict()
  lora.rank = 16  # LoRA rank r.
  lora.alpha = 16.0  # LoRA alpha; the update is scaled by alpha / rank.
  lora.dropout = 0.1  # Dropout on the LoRA branch's input, during training only.
  lora.targets = (r'self_attn/q_proj$', r'self_attn/k_proj$', r'self_attn/v_proj$',
                  r'self_attn/o_proj$')  # Regexes over Linear paths that get adapters.
  vit = model.vit = ml_collections.ConfigDict()
  vit.image_size = 224  # Input side in pixels.
  vit.patch_size = 16  # Patch side in pixels.
  vit.width = 768  # Transformer width.
  vit.layers = 12  # Transformer blocks.
  vit.heads = 12  # Attention heads.
  vit.mlp_ratio = 4.0  # MLP hidden size as a multiple of width.
  vit.act = 'gelu'  # 'gelu' or 'quick_gelu' (OpenAI CLIP).
  vit.pool = 'token'  # 'token' (class token, as CLIP) or 'gap' (mean of the patch tokens).
  # LiT: keep the image tower frozen. False adds '^image_tower/' to the trainable patterns.
  model.lock_image_tower = True

  mesh = config.mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Data-parallel size; -1 takes the devices left over by the other axes.
  mesh.fsdp = 1  # Fully sharded data-parallel size: parameters split over this axis too.
  mesh.tensor = 1  # Tensor-parallel size: heads, MLP and vocabulary split over this axis.
  # Logical axis name -> mesh axes (a name, a tuple of names, or None to replicate).
  mesh.rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('mlp', 'tensor'),
      ('vocab', 'tensor'),
      ('lora_rank', None),
  )

  train = config.train = ml_collections.ConfigDict()
  train.steps = 1000  # Optimizer steps; the learning-rate schedule spans all of them.
  # End this run after this many steps in total (0: run to train.steps). A rerun with the same
  # workdir resumes, which splits a long job over several time-limited jobs.
  train.stop_after_steps = 0
  train.batch_size = 256  # Global batch size in image-caption pairs.
  train.learning_rate = 1e-4  # Peak AdamW learning rate.
  train.warmup_steps = 100  # Linear warmup steps before cosine decay to zero.
  train.weight_decay = 0.5  # AdamW decoupled weight decay (CLAMP's reference value).
  train.b1 = 0.9  # AdamW beta1.
  train.b2 = 0.98  # AdamW beta2.
  train.grad_clip_norm = 1.0  # Global gradient norm clipping; 0 disables it.
  train.trainable = TRAINABLE  # Regexes over parameter paths that get gradients and Adam state.
  train.log_every = 10  # Steps between metric writes.
  train.checkpoint_every = 200  # Steps between Orbax checkpoints (one is also saved at the end).
  train.keep_checkpoints = 3  # Checkpoints kept on disk.

  data = config.data = ml_collections.ConfigDict()
  data.name = 'digits'  # Training dataset; 'digits' is scikit-learn's 8x8 handwritten digits.
  data.test_fraction = 0.2  # Share of the dataset held out for zero-shot evaluation.
  data.split_seed = 0  # Seed of the fixed train/test split.
  data.templates = ('a photo of the handwritten digit {}.',)  # Caption templates for training.
  # Instruction format around each caption; '{caption}' is replaced by the filled template.
  data.caption_wrapper = (
      '<|im_start|>user\nDescribe {caption}<|im_end|>\n<|im_start|>assistant\n1.')
  # Run the text tower once per distinct caption (class x template) in place of once per image.
  data.caption_table = True
  data.max_length = 32  # Caption tokens per sample, wrapper included; prompts come on top.

  evaluation = config.eval = ml_collections.ConfigDict()
  evaluation.templates = ('a photo of the handwritten digit {}.', 'a handwritten {}.',
                          'the number {}.')  # Zero-shot prompt templates, averaged per class.
  evaluation.batch_size = 64  # Images per evaluation batch.
  evaluation.at_end = True  # Run zero-shot evaluation after training.
  return config
