"""Build a CLAMP model, its tokenizer and its trainable-parameter filter from a config."""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from clamp_jax.data.pipeline import CLIP_MEAN, CLIP_STD
from clamp_jax.models import onednn
from clamp_jax.models.clamp import CLAMP
from clamp_jax.models.llama import Llama, LlamaConfig
from clamp_jax.models.lora import LoRAConfig, apply_lora
from clamp_jax.models.text_tower import TextTower
from clamp_jax.models.vit import VisionTransformer, ViTConfig
from clamp_jax.weights import (WeightLoadError, image_preprocessing, load_image_tower, load_llm,
                               load_tokenizer, resolve_checkpoint)
from clamp_jax.weights.clip import checkpoint_architecture
from clamp_jax.weights.clip_config import architecture_differences


def path_string(path) -> str:
  return '/'.join(str(part) for part in path)


def trainable_filter(patterns) -> nnx.filterlib.Filter:
  """Filter selecting `nnx.Param`s whose '/'-joined path matches one of `patterns`."""
  compiled = [re.compile(p) for p in patterns]

  def matches(path, value) -> bool:
    return isinstance(value, nnx.Param) and any(p.search(path_string(path)) for p in compiled)

  return matches


def build_llm(config: ml_collections.ConfigDict, place=None):
  """Load the LLM and its tokenizer, or build a random LLM that borrows a checkpoint's tokenizer.

  `place(variable, host_array)` puts each loaded tensor on devices as it is read (see
  `clamp_jax.parallel.sharded_placer`).
  """
  model_config = config.model
  if 'onednn' in (model_config.matmul, model_config.attention):
    onednn.check_usable()
  overrides = dict(dtype=model_config.llm_dtype, param_dtype=model_config.llm_param_dtype,
                   remat=model_config.remat, scan_layers=model_config.scan_layers,
                   attention=model_config.attention, matmul=model_config.matmul)
  if model_config.llm == 'random':
    llm_config = LlamaConfig(**model_config.random_llm.to_dict(), **overrides)
    llm = Llama(llm_config, rngs=nnx.Rngs(config.seed))
    tokenizer = load_tokenizer(resolve_checkpoint(model_config.random_llm_tokenizer))
  else:
    llm, tokenizer = load_llm(model_config.llm, place=place, **overrides)
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  return llm, tokenizer


def vit_config(config: ml_collections.ConfigDict) -> ViTConfig:
  vit = config.model.vit
  return ViTConfig(image_size=vit.image_size, patch_size=vit.patch_size, width=vit.width,
                   layers=vit.layers, heads=vit.heads, mlp_ratio=vit.mlp_ratio,
                   embed_dim=config.model.embed_dim, act=vit.act, pool=vit.pool,
                   dtype=vit.dtype, param_dtype=vit.param_dtype, remat=config.model.remat,
                   scan_layers=config.model.scan_layers, matmul=config.model.matmul)


def check_image_tower_checkpoint(config: ml_collections.ConfigDict) -> None:
  """Check `model.vit.checkpoint` against the config before anything loads.

  A Hugging Face folder's config.json must describe the architecture that `model.vit` and
  `model.embed_dim` give, because the data pipeline and plan mode read these fields. An open_clip
  file has no config; its tensor shapes are checked while it loads.
  """
  checkpoint = config.model.vit.checkpoint
  requested = vit_config(config)
  found = checkpoint_architecture(checkpoint)
  if found is not None:
    differences = architecture_differences(requested, found)
    if differences:
      listed = ', '.join(_config_difference(*difference) for difference in differences)
      raise WeightLoadError(f'{checkpoint}: the config does not match the checkpoint: {listed}.')
  preprocessing = image_preprocessing(checkpoint)
  if (not np.allclose(preprocessing.mean, CLIP_MEAN, atol=1e-6)
      or not np.allclose(preprocessing.std, CLIP_STD, atol=1e-6)):
    logging.warning('%s expects pixel mean %s and std %s, but the data pipeline normalises with '
                    "OpenAI CLIP's %s and %s.", checkpoint, preprocessing.mean, preprocessing.std,
                    tuple(CLIP_MEAN.tolist()), tuple(CLIP_STD.tolist()))


def _config_difference(field: str, ours, theirs) -> str:
  if field == 'mlp_dim':
    return f'config.model.vit.mlp_ratio gives an MLP of {ours} (checkpoint: {theirs})'
  name = 'config.model.embed_dim' if field == 'embed_dim' else f'config.model.vit.{field}'
  return f'{name}={ours!r} (checkpoint: {theirs!r})'


def build_image_tower(config: ml_collections.ConfigDict, rngs: nnx.Rngs, place=None,
                      load_weights: bool = True) -> VisionTransformer:
  """Build the image tower: load it from `model.vit.checkpoint`, or initialise it from `rngs`
  when that is empty or `load_weights` is False."""
  checkpoint = config.model.vit.checkpoint
  if not checkpoint or not load_weights:
    return VisionTransformer(vit_config(config), rngs=rngs)
  logging.info('Loading the image tower from %s.', checkpoint)
  return load_image_tower(checkpoint, vit_config(config), place=place)


def build_model(config: ml_collections.ConfigDict, llm: Llama | None = None,
                tokenizer=None, place=None,
                image_tower_weights: bool = True) -> tuple[CLAMP, object]:
  """CLAMP with a loaded (or random) LLM, LoRA attached, a fresh tower head and a ViT.

  `place` is handed to the weight loaders (see `build_llm`). The image tower loads from
  `model.vit.checkpoint` when it is set, unless `image_tower_weights` is False (plan mode needs
  shapes only).
  """
  load_tower = bool(config.model.vit.checkpoint) and image_tower_weights
  if load_tower:
    check_image_tower_checkpoint(config)  # Fails before the LLM loads.
  if llm is None:
    llm, tokenizer = build_llm(config, place=place)
  rngs = nnx.Rngs(params=config.seed + 1, dropout=config.seed + 2)
  lora = config.model.lora
  adapted = apply_lora(llm, LoRAConfig(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                       targets=tuple(lora.targets)), rngs=rngs)
  logging.info('LoRA adapters on %d layers (rank %d).', len(adapted), lora.rank)
  num_prompts = config.model.num_prompts
  # Prompt rows start from the embeddings of the first ordinary words of the vocabulary after the
  # special tokens; with too small a vocabulary they cycle.
  vocab = llm.config.vocab_size
  init_ids = (jnp.arange(num_prompts - 1) * 97 + 1000) % vocab
  text_tower = TextTower(llm, embed_dim=config.model.embed_dim, num_prompts=num_prompts,
                         pooler_heads=config.model.pooler_heads, prompt_init_ids=init_ids,
                         rngs=rngs)
  image_tower = build_image_tower(config, rngs, place=place, load_weights=load_tower)
  sigmoid = config.train.loss == 'sigmoid'
  model = CLAMP(image_tower, text_tower, init_logit_scale=config.model.init_logit_scale,
                max_logit_scale=config.model.max_logit_scale,
                init_logit_bias=config.model.init_logit_bias if sigmoid else None)
  return model, tokenizer


def trainable_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`config.train.trainable`, plus the whole image tower unless it is locked."""
  patterns = tuple(config.train.trainable)
  if not config.model.lock_image_tower:
    patterns += (r'^image_tower/',)
  return patterns


def count_parameters(model: nnx.Module, filter_) -> int:
  state = nnx.state(model, filter_)
  return sum(int(x.size) for x in jax.tree.leaves(state))
