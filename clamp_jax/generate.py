"""Batched greedy decoding with a KV cache, with LoRA adapters on or off.

With `adapters=False` (or before training, when every LoRA `B` is zero) the output equals the base
LLM's, which is how a CLAMP model keeps its generative abilities.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clamp_jax.models.llama import Llama


def generate_ids(llm: Llama, input_ids, attention_mask, *, max_new_tokens: int,
                 eos_token_id: int | None = None, adapters: bool = True) -> np.ndarray:
  """Greedy continuation ids `[b, max_new_tokens]` for left-padded prompts `[b, l]`.

  After a row emits `eos_token_id` it keeps emitting it, so rows stay aligned.
  """
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be at least 1, got {max_new_tokens}.')
  input_ids = jnp.asarray(input_ids, jnp.int32)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  graphdef, state = nnx.split(llm)
  eos = -1 if eos_token_id is None else int(eos_token_id)
  out = _greedy(graphdef, state, input_ids, attention_mask, max_new_tokens, eos, adapters)
  return np.asarray(out)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _greedy(graphdef, state, input_ids, attention_mask, max_new_tokens, eos, adapters):
  llm = nnx.merge(graphdef, state)
  # Greedy decoding runs without dropout, so this traced copy is switched to eval mode. In train
  # mode, LoRA dropout would update its RNG count inside the scan, which Flax rejects.
  llm.eval()
  batch, length = input_ids.shape
  total = length + max_new_tokens
  cache = llm.init_cache(batch, total)
  key_valid = jnp.concatenate(
      [attention_mask.astype(bool), jnp.zeros((batch, max_new_tokens), bool)], axis=1)

  # Prefill: every prompt position attends causally to real prompt tokens.
  positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
  causal = jnp.arange(total)[None, :] <= jnp.arange(length)[:, None]  # [l, total]
  mask = causal[None, None] & key_valid[:, None, None, :]
  hidden, cache = llm.hidden_states(llm.embed_tokens(input_ids), positions, mask,
                                    adapters=adapters, cache=cache, cache_index=0)
  token = jnp.argmax(llm.logits(hidden[:, -1:]), axis=-1)[:, 0]
  next_position = attention_mask.sum(axis=-1)
  done = token == eos

  def step(carry, i):
    cache, token, key_valid, done = carry
    index = length + i
    key_valid = key_valid.at[:, index].set(True)
    mask = key_valid[:, None, None, :]
    positions = (next_position + i)[:, None]
    hidden, cache = llm.hidden_states(llm.embed_tokens(token[:, None]), positions, mask,
                                      adapters=adapters, cache=cache, cache_index=index)
    new = jnp.argmax(llm.logits(hidden), axis=-1)[:, 0]
    new = jnp.where(done, eos, new)
    return (cache, new, key_valid, done | (new == eos)), token

  (_, last, _, _), tokens = jax.lax.scan(step, (cache, token, key_valid, done),
                                         jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def generate(llm: Llama, tokenizer, prompts: list[str], *, max_new_tokens: int = 32,
             adapters: bool = True) -> list[str]:
  """Greedy-decode `max_new_tokens` after each prompt and return the new text per prompt."""
  if isinstance(prompts, str):
    prompts = [prompts]
  previous_side = tokenizer.padding_side
  tokenizer.padding_side = 'left'
  try:
    encoded = tokenizer(list(prompts), return_tensors='np', padding=True)
  finally:
    tokenizer.padding_side = previous_side
  eos = tokenizer.eos_token_id
  ids = generate_ids(llm, encoded['input_ids'], encoded['attention_mask'],
                     max_new_tokens=max_new_tokens, eos_token_id=eos, adapters=adapters)
  texts = []
  for row in ids:
    row = list(row)
    if eos is not None and eos in row:
      row = row[:row.index(eos)]
    texts.append(tokenizer.decode(row, skip_special_tokens=True))
  return texts
