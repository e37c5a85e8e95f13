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
    r'^logit_bias$',
)


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # One of: train (train, then evaluate), eval (evaluate the latest checkpoint), plan (compile for
  # a target mesh and report memory), export (write the latest checkpoint as HF, PEFT and Orbax
  # files under WORKDIR/export) or generate (decode config.generate.prompts with the LLM).
  config.mode = 'train'
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
  # Architecture for plan mode when model.llm is a checkpoint that is not on this machine:
  # LlamaConfig fields as in random_llm. Empty: read config.json or GGUF metadata of model.llm.
  model.llm_architecture = ml_collections.ConfigDict()
  # Rematerialisation of each LLM layer and ViT block in the backward pass: 'none', 'full'
  # (keep only block inputs), 'dots' (keep matmul outputs) or 'dots_no_batch'.
  model.remat = 'none'
  # Run the LLM layers and the ViT blocks as one jax.lax.scan each, so compile time stays flat in
  # depth. The layer weights are then stacked (copied) once per step.
  model.scan_layers = False
  # LLM attention kernel: 'einsum' (two einsums, float32 softmax), 'xla' or 'cudnn'
  # (jax.nn.dot_product_attention with that implementation; 'cudnn' needs an NVIDIA GPU and
  # bfloat16 compute), or 'onednn' (the batched products through oneDNN on the CPU).
  model.attention = 'einsum'
  # Matmul backend of both towers' linear layers: 'xla', or 'onednn' for oneDNN's bfloat16
  # kernels on the CPU (XLA:CPU computes bfloat16 dots in float32). Needs the cpu-bf16 extra.
  model.matmul = 'xla'
  model.embed_dim = 512  # Shared image-text embedding size.
  model.num_prompts = 24  # Read-only prompt tokens appended after each caption.
  model.pooler_heads = 8  # Heads of the attention pooler over the prompt positions.
  # Standardise the prompt hidden states per feature with statistics of the first training batch
  # (a fixed, data-dependent init), so the pooler starts from features where captions differ.
  model.calibrate_text_features = True
  model.init_logit_scale = 1 / 0.07  # Initial contrastive logit scale (exp of the learned log).
  model.max_logit_scale = 100.0  # The logit scale is clipped at this value.
  model.init_logit_bias = -10.0  # Initial logit bias of the sigmoid loss (unused by softmax).
  # Frozen CLIP teacher for distillation: a Hugging Face CLIPModel folder (or cached hub id);
  # empty: no distillation. Needs one caption per image (data.caption_table=False on digits).
  model.teacher = ''
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
  vit.dtype = 'float32'  # Compute dtype of the image tower: float32 or bfloat16.
  vit.param_dtype = 'float32'  # Storage dtype of the image tower's weights.
  # Pretrained image tower: a Hugging Face CLIP folder (config.json + *.safetensors), a hub id in
  # the local hub cache, or an open_clip ViT .safetensors file. Empty: random init. A folder's
  # config.json must match the fields above and model.embed_dim (checked before loading); an
  # open_clip file records no config, so the fields above describe it.
  vit.checkpoint = ''
  # LiT: keep the image tower frozen. False adds '^image_tower/' to the trainable patterns.
  model.lock_image_tower = True

  mesh = config.mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Data-parallel size; -1 takes the devices left over by the other axes.
  mesh.fsdp = 1  # Fully sharded data-parallel size: parameters split over this axis too.
  mesh.tensor = 1  # Tensor-parallel size: heads, MLP and vocabulary split over this axis.
  # Sizes across TPU slices or GPU processes (DCN); each mesh axis has size ici * dcn, and the
  # sizes above are then per slice. All 1 on a single slice or host.
  mesh.dcn_data = 1
  mesh.dcn_fsdp = 1
  mesh.dcn_tensor = 1
  # Logical axis name -> mesh axes (a name, a tuple of names, or None to replicate).
  mesh.rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('mlp', 'tensor'),
      ('vocab', 'tensor'),
      ('lora_rank', None),
      # Activations at block boundaries: [batch, length, act_embed].
      ('length', None),
      ('act_embed', None),
  )

  distributed = config.distributed = ml_collections.ConfigDict()
  # Call jax.distributed.initialize(): 'auto' does so when the environment shows several
  # processes (TPU pod worker, SLURM job with several tasks, JAX_COORDINATOR_ADDRESS set);
  # 'yes' always; 'no' never.
  distributed.initialize = 'auto'
  distributed.coordinator_address = ''  # host:port of process 0; empty lets JAX detect it.
  distributed.num_processes = 0  # Process count; 0 lets JAX detect it.
  distributed.process_id = -1  # This process's index; -1 lets JAX detect it.

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
  train.loss = 'softmax'  # 'softmax' (CLIP's symmetric InfoNCE) or 'sigmoid' (SigLIP).
  # Gather embeddings across devices with jax.shard_map in the loss (each device computes its
  # own rows against all columns); False leaves the loss to the compiler.
  train.sharded_loss = True
  # Split each batch into this many micro-batches with the gradient-cache method: the loss and
  # its gradients stay those of the whole batch, activation memory is one micro-batch's.
  train.microbatches = 1
  # Weight of the distillation loss (soft cross-entropy against the teacher's similarities,
  # both directions, scaled by 100) added to the contrastive loss when model.teacher is set.
  train.distill_weight = 1.0
  train.trainable = TRAINABLE  # Regexes over parameter paths that get gradients and Adam state.
  train.log_every = 10  # Steps between metric writes.
  train.checkpoint_every = 200  # Steps between Orbax checkpoints (one is also saved at the end).
  train.keep_checkpoints = 3  # The most recent checkpoints kept on disk.
  # Also keep this many checkpoints with the best `best_metric` (0: only the most recent ones).
  train.keep_best_checkpoints = 0
  # Metric that ranks checkpoints: a name in metrics.jsonl recorded at the checkpoint's step,
  # such as 'train/loss' or 'eval/digits/top1' (evaluation at that step needs
  # eval.every_steps to divide the step).
  train.best_metric = 'train/loss'
  train.best_mode = 'min'  # 'min' or 'max': which end of best_metric is best.

  data = config.data = ml_collections.ConfigDict()
  data.test_fraction = 0.2  # Share of the digits held out for zero-shot evaluation.
  data.split_seed = 0  # Seed of the fixed digits train/test split.
  # Caption templates with one '{}' for the class name, for training on digits, on an image
  # folder and on a TFDS class label.
  data.templates = ('a photo of the handwritten digit {}.',)
  # Instruction format around each caption; '{caption}' is replaced by the caption.
  data.caption_wrapper = (
      '<|im_start|>user\nDescribe {caption}<|im_end|>\n<|im_start|>assistant\n1.')
  # Digits only: run the text tower once per distinct caption (class x template) in place of
  # once per image. The other kinds always give one caption per image.
  data.caption_table = True
  data.max_length = 32  # Caption tokens per sample, wrapper included; prompts come on top.

  source = data.train = ml_collections.ConfigDict()
  # Training data: 'digits' (scikit-learn's 8x8 digits), 'webdataset' (tar shards), 'folder'
  # (one subfolder per class), 'csv' (path,caption rows), 'array_record' (records written by
  # make_shards), 'tfds' (needs the [tfds] extra) or 'mixture' (several sources, weighted).
  source.kind = 'digits'
  # What to read. webdataset, array_record: a file pattern with brace ranges or globs, such as
  # '/data/laion/{00000..01066}.tar'. folder: the root folder. csv: a .csv or .tsv file.
  # tfds: the dataset name.
  source.pattern = ''
  # mixture: one 'KIND:PATTERN' string per source, such as 'webdataset:/d/{00000..00099}.tar'.
  source.sources = ()
  # mixture: relative sampling weight of each source, counted in samples; empty: equal weights.
  source.weights = ()
  # folder: class names, one per line in sorted subfolder order or as folder<TAB>name lines;
  # empty: the subfolder names.
  source.class_names_file = ''
  source.tfds_split = 'train'  # tfds: split to read.
  source.tfds_data_dir = ''  # tfds: folder of the prepared dataset; empty: TFDS's default.
  source.tfds_image_key = 'image'  # tfds: image feature.
  # tfds: caption feature; a ClassLabel feature gives captions from data.templates.
  source.tfds_caption_key = 'caption'
  source.cycle_length = 8  # webdataset: shards read at the same time, interleaved.
  # webdataset: samples per shuffle window; 0 or 1 keeps the shard order of samples. The
  # other kinds shuffle all samples of an epoch.
  source.shuffle_buffer = 1000
  source.read_threads = 8  # folder, csv, array_record, tfds: threads that read and decode.
  # Worker processes that read, decode and batch; 0 does this in one background thread of the
  # training process. A resumed run must use the same number.
  source.num_workers = 0
  source.worker_buffer_size = 2  # Batches prepared ahead by each worker (or by the thread).
  # Training augmentation: a random crop (torchvision's RandomResizedCrop) in place of CLIP's
  # resize and center crop.
  source.random_resized_crop = False
  source.crop_scale = (0.9, 1.0)  # random_resized_crop: (min, max) share of the image area.
  # Images with more pixels (width * height) are skipped; the default is Pillow's
  # decompression-bomb warning limit.
  source.max_image_pixels = 89_478_485
  # Raise DataQualityError when more than this share of the samples read has been skipped,
  # once skip_check_min_samples have been read (counted per source and per worker process).
  source.max_skip_fraction = 0.1
  source.skip_check_min_samples = 1000

  export = config.export = ml_collections.ConfigDict()
  # Export mode writes WORKDIR/export/{trained,merged,peft,head.safetensors}.
  # Largest safetensors file of merged/ in bytes; bigger models are split over several files.
  export.max_shard_bytes = 4 * 1024 ** 3
  # dtype of the merged/ weights: 'float32', 'bfloat16', or '' for the LLM's storage dtype. The
  # PEFT adapters are always float32.
  export.dtype = ''
  # base_model_name_or_path in peft/adapter_config.json: the Hugging Face id or folder of the
  # base model. Empty: config.model.llm.
  export.base_model_name_or_path = ''

  generate = config.generate = ml_collections.ConfigDict()
  # Generate mode decodes these prompts in one batch with the latest checkpoint's LLM.
  generate.prompts = ('What is the capital of France?',)
  generate.max_new_tokens = 32  # Tokens decoded after each prompt.
  generate.temperature = 0.0  # Softmax temperature; 0 decodes greedily.
  generate.top_p = 1.0  # Nucleus sampling: sample from the smallest set with this much mass.
  # Decode with the trained LoRA adapters; False gives the base LLM's output exactly.
  generate.adapters = True
  # Wrap each prompt in the tokenizer's chat template (as a user turn) when it has one.
  generate.chat_template = True

  plan = config.plan = ml_collections.ConfigDict()
  # Plan mode compiles the train step for this many simulated devices (0: the real devices).
  plan.devices = 0
  plan.device_memory_gib = 16.0  # Memory of one device in GiB.
  # Share of device memory the step may use; the rest is left for the runtime and fragmentation.
  plan.usable_fraction = 0.95
  # Compile for this TPU topology instead of CPU devices, e.g. 'v5e:4x8' or 'v6e:8x8' (needs
  # libtpu: pip install 'clamp-jax[tpu-plan]'); plan.devices is then ignored. Empty: CPU.
  plan.topology = ''

  evaluation = config.eval = ml_collections.ConfigDict()
  evaluation.templates = ('a photo of the handwritten digit {}.', 'a handwritten {}.',
                          'the number {}.')  # Digits prompt templates, averaged per class.
  # Benchmarks for eval mode and the end of training: registry names (clamp_jax/evaluation/
  # benchmarks.py), 'all', 'elevater' or 'imagenet_variants', folder names under data_dir, or
  # folder paths. 'digits' is the held-out scikit-learn digits.
  evaluation.datasets = ('digits',)
  # Folder with one subfolder per benchmark (data_dir/<name>/); empty: TFDS and digits only.
  evaluation.data_dir = ''
  # Where benchmarks are read: 'auto' (the folder when it exists, else TFDS), 'folder' or 'tfds'.
  evaluation.source = 'auto'
  evaluation.tfds_data_dir = ''  # Folder of prepared TFDS datasets; empty: TFDS's default.
  evaluation.batch_size = 64  # Images per evaluation batch.
  evaluation.text_batch_size = 64  # Prompts or captions per text-tower batch.
  evaluation.read_threads = 8  # Threads that read and decode evaluation images.
  # Class-embedding cache, per checkpoint step and dataset; relative paths are under the
  # workdir. Empty: no cache.
  evaluation.cache_dir = 'eval_cache'
  evaluation.at_end = True  # Run zero-shot evaluation after training.
  evaluation.every_steps = 0  # Steps between evaluations during training; 0: none.
  # Benchmarks of the evaluation during training; empty: the same as datasets.
  evaluation.periodic_datasets = ()
  # Images per benchmark in the evaluation during training, a fixed random subset; 0: all.
  evaluation.periodic_max_images = 0
  return config
