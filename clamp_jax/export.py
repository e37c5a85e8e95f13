"""Export mode: the latest checkpoint as reusable files, and the loader of the trained parameters.

`run_export` restores WORKDIR/checkpoints and writes WORKDIR/export/:

    trained/checkpoint/     Orbax checkpoint of the trained parameters (LoRA, prompts, pooler,
                            projection, temperature and bias, the image tower when trained) and
                            the calibrated feature statistics
    trained/config.json     the run's config, which `load_trained` rebuilds the model from
    merged/                 the text tower's LLM with LoRA folded into its weights, in Hugging Face
                            layout (config.json, *.safetensors, tokenizer files), for
                            transformers' LlamaForCausalLM
    peft/                   adapter_config.json and adapter_model.safetensors in PEFT's LoRA format,
                            for the Hugging Face base model
    head.safetensors        prompts, pooler, projection, temperature, bias and feature statistics
    export.json             the exported step and the file lists

The export is written into a temporary folder next to WORKDIR/export and renamed over it at the
end, so an interrupted export leaves the previous one intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors.numpy import save_file

from clamp_jax import build, hf_export
from clamp_jax.checkpointing import flatten_state, target_struct, unflatten_into
from clamp_jax.models.text_tower import FeatureStat

EXPORT_DIR = 'export'
TRAINED_DIR = 'trained'
TRAINED_CHECKPOINT = 'checkpoint'
CONFIG_FILE = 'config.json'


def head_filter(path, value) -> bool:
  """Parameters and statistics of the tower head: everything of the text tower but the LLM,
  plus the temperature and the bias."""
  name = build.path_string(path)
  if not isinstance(value, (nnx.Param, FeatureStat)):
    return False
  if name.startswith('text_tower/'):
    return not name.startswith('text_tower/llm/')
  return not name.startswith('image_tower/')


def trained_tree(model, trainable) -> dict:
  """`{'params': trained parameters, 'feature_stats': ...}`, flat path-keyed dicts."""
  return {'params': flatten_state(nnx.state(model, trainable)),
          'feature_stats': flatten_state(nnx.state(model, FeatureStat))}


def restore_latest(config: ml_collections.ConfigDict, workdir: str, *, required: bool):
  """Build the model as training does and restore the latest checkpoint of WORKDIR into it.

  Returns `(setup, step)`; `step` is None when there is no checkpoint and `required` is False.
  Raises FileNotFoundError when there is none and `required` is True.
  """
  from clamp_jax.train import set_up

  setup = set_up(config, workdir)
  try:
    step = setup.checkpointer.latest_step()
    if step is None and required:
      raise FileNotFoundError(
          f'No checkpoint in {setup.checkpointer.directory}; train first with config.mode=train.')
    if step is not None:
      setup.checkpointer.restore(step, model=setup.model, optimizer=setup.optimizer,
                                 trainable=setup.trainable)
  finally:
    setup.checkpointer.close()
  setup.model.eval()
  return setup, step


def export_dtype(config: ml_collections.ConfigDict) -> str:
  return config.export.dtype or config.model.llm_param_dtype


def run_export(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Restore the latest checkpoint and write WORKDIR/export (see the module docstring).

  Returns the export folder.
  """
  setup, step = restore_latest(config, workdir, required=True)
  model, llm = setup.model, setup.model.text_tower.llm
  # NOTE: every process gathers each tensor and only process 0 writes files; this path has run
  # in a single process only.
  primary = jax.process_index() == 0
  final = os.path.join(workdir, EXPORT_DIR)
  staging = f'{final}.partial'
  if primary:
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
  logging.info('Exporting step %d to %s.', step, final)

  # trained/: an Orbax checkpoint of what training changed, with the config beside it.
  trained = os.path.join(staging, TRAINED_DIR)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(trained, TRAINED_CHECKPOINT), trained_tree(model, setup.trainable))
  checkpointer.wait_until_finished()
  checkpointer.close()
  if primary:
    with open(os.path.join(trained, CONFIG_FILE), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))

  # merged/: the LLM with LoRA folded in, in Hugging Face layout.
  dtype = export_dtype(config)
  merged = os.path.join(staging, 'merged')
  if primary:
    os.makedirs(merged)
  files = hf_export.write_safetensors_folder(
      hf_export.iter_hf_tensors(llm, merge_lora=True, dtype=dtype), merged,
      max_shard_bytes=config.export.max_shard_bytes, write=primary)
  if primary:
    with open(os.path.join(merged, 'config.json'), 'w', encoding='utf-8') as f:
      json.dump(hf_export.hf_config(llm.config, dtype), f, indent=2)
    setup.tokenizer.save_pretrained(merged)

  # peft/: the adapters alone, for the Hugging Face base model.
  lora = config.model.lora
  hf_export.write_peft_adapter(
      llm, os.path.join(staging, 'peft'), rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
      base_model_name_or_path=config.export.base_model_name_or_path or config.model.llm,
      write=primary)

  # head.safetensors: the tower head, by parameter path.
  head = {path.replace('/', '.'): np.ascontiguousarray(hf_export.to_host(value))
          for path, value in flatten_state(nnx.state(model, head_filter)).items()}
  if primary:
    save_file(head, os.path.join(staging, 'head.safetensors'),
              metadata={'num_prompts': str(config.model.num_prompts),
                        'pooler_heads': str(config.model.pooler_heads),
                        'max_logit_scale': str(config.model.max_logit_scale)})
    with open(os.path.join(staging, 'export.json'), 'w', encoding='utf-8') as f:
      json.dump({'step': step, 'merged_files': files, 'merged_dtype': dtype,
                 'head_tensors': sorted(head)}, f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
  logging.info('Exported step %d to %s (trained/, merged/, peft/, head.safetensors).', step, final)
  return final


def load_trained(folder: str, *, llm_path: str | None = None, llm=None, tokenizer=None):
  """Rebuild a CLAMP model from an export's `trained/` folder.

  The base LLM and the image tower are built fresh from the saved config, as training built
  them. `llm_path` replaces `config.model.llm`, for a base model that moved, and `llm` and
  `tokenizer` pass an already loaded one. Then the trained parameters and feature statistics
  are restored into them. Returns `(model, tokenizer, config)` with the model in eval mode on
  the default device.
  """
  with open(os.path.join(folder, CONFIG_FILE), encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  if llm_path is not None:
    config.model.llm = llm_path
  model, tokenizer = build.build_model(config, llm=llm, tokenizer=tokenizer)
  if tokenizer is not None and tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  trainable = build.trainable_filter(build.trainable_patterns(config))
  target = trained_tree(model, trainable)
  checkpointer = ocp.StandardCheckpointer()
  restored = checkpointer.restore(os.path.join(os.path.abspath(folder), TRAINED_CHECKPOINT),
                                  jax.tree.map(target_struct, target))
  checkpointer.close()
  for key, selector in (('params', trainable), ('feature_stats', FeatureStat)):
    state = nnx.state(model, selector)
    unflatten_into(state, restored[key])
    nnx.update(model, state)
  model.eval()
  return model, tokenizer, config
