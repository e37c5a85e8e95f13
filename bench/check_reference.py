"""Check that the PyTorch reference of `bench/reference_torch.py` computes our text tower.

With fresh adapters (LoRA B at zero) and dropout off, the reference's prompt hidden states, the
pooler's input, must equal `TextTower.prompt_hidden_states`. Its caption positions must also equal a
plain causal forward of the captions alone, because the read-only mask hides the prompts from
them. Both sides read the same GGUF file and start the prompts from the same embedding rows.
The script prints the largest differences and exits with status 1 when one exceeds `--tolerance`.

    python bench/check_reference.py --batch_size=4 --caption_length=12
"""

from __future__ import annotations

import sys

from absl import app, flags

import common
import reference_torch

# --config, --batch_size and --caption_length are the flags of reference_torch.py. Unset sizes
# take these small defaults instead of the config's.
DEFAULT_BATCH_SIZE = 4
DEFAULT_CAPTION_LENGTH = 12
_TOLERANCE = flags.DEFINE_float('tolerance', 1e-3, 'Largest accepted absolute difference.')


def reference_states(tower, host: dict):
  """Prompt hidden states `[b, prompts, hidden]` of the reference text tower and its LLM's plain
  causal forward `[b, length, hidden]`, as NumPy arrays."""
  import torch

  input_ids = torch.from_numpy(host['input_ids']).long()
  attention_mask = torch.from_numpy(host['attention_mask']).long()
  captured = {}
  hook = tower.pooler.register_forward_hook(
      lambda module, inputs, output: captured.update(states=inputs[0]))
  with torch.no_grad():
    tower(input_ids, attention_mask)
    plain = tower.llm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
  hook.remove()
  return captured['states'].numpy(), plain.numpy()


def our_states(config, host: dict):
  """Our prompt hidden states and final hidden states of the caption positions."""
  import jax.numpy as jnp
  import numpy as np

  from clamp_jax import build

  model, _ = build.build_model(config)
  model.eval()
  input_ids = jnp.asarray(host['input_ids'])
  attention_mask = jnp.asarray(host['attention_mask'])
  prompt_states = model.text_tower.prompt_hidden_states(input_ids, attention_mask)
  hidden, _ = model.text_tower.hidden_states(input_ids, attention_mask)
  return np.asarray(prompt_states), np.asarray(hidden)[:, :input_ids.shape[1]]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import numpy as np

  config = reference_torch._CONFIG.value
  if config.model.llm == 'random':
    sys.exit("error: config.model.llm='random' gives each side its own random weights; check "
             'with a checkpoint such as smollm2.')
  reference_torch.install_torch_modules()
  reference, _ = reference_torch.build_reference_model(config, 'float32', 'auto')
  reference.eval()
  tower = reference.text_tower
  host = common.synthetic_batch(reference_torch._BATCH_SIZE.value or DEFAULT_BATCH_SIZE,
                                reference_torch._CAPTION_LENGTH.value or DEFAULT_CAPTION_LENGTH,
                                config.model.vit.image_size, tower.llm.config.vocab_size)
  reference_prompts, reference_plain = reference_states(tower, host)
  ours_prompts, ours_captions = our_states(config, host)

  real = host['attention_mask'].astype(bool)
  prompt_difference = float(np.abs(ours_prompts - reference_prompts).max())
  caption_difference = float(np.abs(ours_captions[real] - reference_plain[real]).max())
  print(f'prompt hidden states: max abs difference {prompt_difference:.2e} '
        f'(largest value {np.abs(ours_prompts).max():.1f})')
  print(f'caption positions against a plain causal forward: max abs difference '
        f'{caption_difference:.2e}')
  if max(prompt_difference, caption_difference) > _TOLERANCE.value:
    sys.exit(f'error: a difference exceeds --tolerance={_TOLERANCE.value}.')


if __name__ == '__main__':
  app.run(main)
