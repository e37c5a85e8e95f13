"""Batched decoding with a KV cache, greedy or by top-p sampling, with LoRA adapters on or off.

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
                 eos_token_id: int | None = None, adapters: bool = True,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
  """Continuation ids `[b, max_new_tokens]` for left-padded prompts `[b, l]`.

  `temperature=0` decodes greedily. Above 0, each token is sampled from the softmax of the
  logits divided by `temperature`, restricted to the smallest set of most likely tokens whose
  probabilities sum to at least `top_p` (nucleus sampling), with random keys from `seed`.
  After a row emits `eos_token_id` it keeps emitting it, so rows stay aligned.
  """
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be at least 1, got {max_new_tokens}.')
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0 (0: greedy), got {temperature}.')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}.')
  input_ids = jnp.asarray(input_ids, jnp.int32)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  graphdef, state = nnx.split(llm)
  eos = -1 if eos_token_id is None else int(eos_token_id)
  sampling = (float(temperature), float(top_p)) if temperature > 0 else None
  out = _decode(graphdef, state, input_ids, attention_mask, jax.random.key(seed),
                max_new_tokens, eos, adapters, sampling)
  return np.asarray(out)


def select_tokens(logits: jax.Array, key: jax.Array, sampling) -> jax.Array:
  """Next ids `[b]` from logits `[b, vocab]`: argmax, or a top-p sample when `sampling` is
  `(temperature, top_p)`.

  Tokens whose logit ties the smallest kept logit are kept too.
  """
  if sampling is None:
    return jnp.argmax(logits, axis=-1)
  temperature, top_p = sampling
  logits = logits.astype(jnp.float32) / temperature
  ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
  probabilities = jax.nn.softmax(ordered, axis=-1)
  # A token stays when the tokens ranked above it hold less than top_p, so the first always does.
  mass_before = jnp.cumsum(probabilities, axis=-1) - probabilities
  smallest_kept = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), axis=-1,
                          keepdims=True)
  logits = jnp.where(logits >= smallest_kept, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _decode(graphdef, state, input_ids, attention_mask, key, max_new_tokens, eos, adapters,
            sampling):
  llm = nnx.merge(graphdef, state)
  # Decoding runs without dropout, so this traced copy is switched to eval mode. In train mode,
  # LoRA dropout would update its RNG count inside the scan, which Flax rejects.
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
  token = select_tokens(llm.logits(hidden[:, -1:])[:, 0], jax.random.fold_in(key, 0), sampling)
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
    new = select_tokens(llm.logits(hidden)[:, 0], jax.random.fold_in(key, i + 1), sampling)
    new = jnp.where(done, eos, new)
    return (cache, new, key_valid, done | (new == eos)), token

  (_, last, _, _), tokens = jax.lax.scan(step, (cache, token, key_valid, done),
                                         jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def generate(llm: Llama, tokenizer, prompts: list[str], *, max_new_tokens: int = 32,
             adapters: bool = True, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0) -> list[str]:
  """Decode `max_new_tokens` after each prompt and return the new text per prompt.

  Greedy by default; see `generate_ids` for `temperature`, `top_p` and `seed`.
  """
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
                     max_new_tokens=max_new_tokens, eos_token_id=eos, adapters=adapters,
                     temperature=temperature, top_p=top_p, seed=seed)
  texts = []
  for row in ids:
    row = list(row)
    if eos is not None and eos in row:
      row = row[:row.index(eos)]
    texts.append(tokenizer.decode(row, skip_special_tokens=True))
  return texts
