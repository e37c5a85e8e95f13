"""Generate mode: decode `config.generate.prompts` with the text tower's LLM.

The LLM comes from the latest checkpoint in WORKDIR/checkpoints, or is the base model when there
is none. With `config.generate.adapters=False` the LoRA adapters are skipped, so the output equals
the base LLM's token for token. CLAMP trains only adapters, prompts and the head and never changes
the LLM's own weights, which is how the model keeps its generative abilities.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from clamp_jax.export import restore_latest
from clamp_jax.generate import generate_ids

OUTPUT_FILE = 'generations.json'


def format_prompts(tokenizer, prompts, chat_template: bool) -> list[str]:
  """Wrap each prompt as a user turn of the tokenizer's chat template, if it has one."""
  if not chat_template or not getattr(tokenizer, 'chat_template', None):
    return list(prompts)
  return [tokenizer.apply_chat_template([{'role': 'user', 'content': prompt}], tokenize=False,
                                        add_generation_prompt=True)
          for prompt in prompts]


def decode_rows(tokenizer, rows) -> tuple[list[str], list[list[int]]]:
  """Text and ids of each generated row, cut before the first end-of-sequence token."""
  eos = tokenizer.eos_token_id
  texts, ids = [], []
  for row in rows:
    row = [int(token) for token in row]
    if eos is not None and eos in row:
      row = row[:row.index(eos)]
    ids.append(row)
    texts.append(tokenizer.decode(row, skip_special_tokens=True))
  return texts, ids


def run_generate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Decode the prompts in one left-padded batch, print them and write WORKDIR/generations.json."""
  settings = config.generate
  setup, step = restore_latest(config, workdir, required=False)
  if step is None:
    logging.info('No checkpoint in %s; generating with the base model.',
                 setup.checkpointer.directory)
  tokenizer = setup.tokenizer
  texts_in = format_prompts(tokenizer, settings.prompts, settings.chat_template)
  previous_side = tokenizer.padding_side
  tokenizer.padding_side = 'left'
  try:
    encoded = tokenizer(texts_in, return_tensors='np', padding=True)
  finally:
    tokenizer.padding_side = previous_side
  rows = generate_ids(setup.model.text_tower.llm, encoded['input_ids'],
                      encoded['attention_mask'], max_new_tokens=settings.max_new_tokens,
                      eos_token_id=tokenizer.eos_token_id, adapters=settings.adapters,
                      temperature=settings.temperature, top_p=settings.top_p, seed=config.seed)
  texts, ids = decode_rows(tokenizer, rows)

  record = {
      'step': step,
      'adapters': settings.adapters,
      'temperature': settings.temperature,
      'top_p': settings.top_p,
      'max_new_tokens': settings.max_new_tokens,
      'seed': config.seed,
      'outputs': [{'prompt': prompt, 'input': text_in, 'text': text, 'token_ids': row}
                  for prompt, text_in, text, row in zip(settings.prompts, texts_in, texts, ids)],
  }
  if jax.process_index() == 0:
    for prompt, text in zip(settings.prompts, texts):
      print(f'### {prompt}\n{text}\n', flush=True)
    path = os.path.join(workdir, OUTPUT_FILE)
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(record, f, indent=2, ensure_ascii=False)
    logging.info('Wrote %d generations to %s.', len(texts), path)
  return record
