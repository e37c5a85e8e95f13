"""Caption tokenization for the text tower: an instruction wrapper around each caption.

The LLM reads every caption inside a fixed instruction, for example
`<|im_start|>user\\nA photo of {caption}. Describe its visual attributes.<|im_end|>\\n`
`<|im_start|>assistant\\n1.`. The text before `{caption}` (prefix), the caption and the text after
it (suffix) are tokenized separately, and only the caption's tokens are truncated, so the
instruction always reaches the model whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

CAPTION_FIELD = '{caption}'


def fill_template(template: str, class_name: str) -> str:
  """Insert `class_name` into a template with one `{}` field, e.g. 'a photo of the digit {}.'."""
  if template.count('{}') != 1:
    raise ValueError(f'Template {template!r} must contain exactly one "{{}}" field.')
  return template.replace('{}', class_name)


def fill_templates(templates: Sequence[str], class_names: Sequence[str]) -> list[list[str]]:
  """Build every caption: `captions[c][t]` is template t filled with class name c."""
  return [[fill_template(template, name) for template in templates] for name in class_names]


class CaptionTokenizer:
  """Tokenize captions inside an instruction wrapper into fixed-length, right-padded id rows.

  Each row is `[bos] + prefix + caption + suffix + padding`. BOS is prepended only when the
  Hugging Face tokenizer adds it by itself with `add_special_tokens=True` (the SmolLM2 GGUF
  tokenizer does not, under transformers 5.25). No EOS is appended, because the wrapper's suffix
  ends the sequence. Padding uses `tokenizer.pad_token_id`, or `eos_token_id` when the tokenizer has no pad token.

  Whitespace that ends the prefix is moved to the front of the caption, so that a byte-level BPE
  tokenizer produces the " seven" token it would produce inside the whole string.
  NOTE: the boundaries can still differ from tokenizing the joined string. With SmolLM2, a caption
  ending in '.' before a suffix starting with '.' gives two '.' tokens where the joined text has
  one '..' token. Tokenizers that add a prefix space to every call (SentencePiece with
  `add_dummy_prefix`) add one at each piece.
  """

  def __init__(self, tokenizer: Any, wrapper: str, max_length: int, *,
               teacher: Callable[[list[str]], tuple[np.ndarray, np.ndarray]] | None = None):
    """`teacher(captions) -> (ids, mask)` also tokenizes the raw captions (no wrapper) for a
    distillation teacher; they come out as `teacher_input_ids` and `teacher_attention_mask`."""
    self.teacher = teacher
    if wrapper.count(CAPTION_FIELD) != 1:
      raise ValueError(
          f'Wrapper {wrapper!r} must contain exactly one {CAPTION_FIELD} field.')
    self.tokenizer = tokenizer
    self.wrapper = wrapper
    self.max_length = max_length

    prefix, suffix = wrapper.split(CAPTION_FIELD)
    stripped = prefix.rstrip(' ')
    self.caption_lead = prefix[len(stripped):]
    self.prefix_ids = self._encode(stripped)
    self.suffix_ids = self._encode(suffix)
    if self._adds_bos():
      self.prefix_ids = [tokenizer.bos_token_id] + self.prefix_ids

    self.pad_id = tokenizer.pad_token_id
    if self.pad_id is None:
      self.pad_id = tokenizer.eos_token_id
    if self.pad_id is None:
      raise ValueError('The tokenizer has neither a pad token nor an EOS token to pad with.')

    fixed = len(self.prefix_ids) + len(self.suffix_ids)
    if fixed >= max_length:
      raise ValueError(
          f'The wrapper takes {fixed} tokens (prefix and suffix, BOS included), which leaves no '
          f'room for the caption within max_length={max_length}. Increase max_length or shorten '
          f'the wrapper.')
    self.max_caption_tokens = max_length - fixed

  def _encode(self, text: str) -> list[int]:
    if not text:
      return []
    return list(self.tokenizer(text, add_special_tokens=False)['input_ids'])

  def _adds_bos(self) -> bool:
    """Check whether the tokenizer prepends BOS by itself when asked to add special tokens."""
    bos = self.tokenizer.bos_token_id
    if bos is None:
      return False
    with_special = self.tokenizer('x', add_special_tokens=True)['input_ids']
    without = self.tokenizer('x', add_special_tokens=False)['input_ids']
    return with_special[:1] == [bos] and without[:1] != [bos]

  def __call__(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """Tokenize `n` captions into int32 `input_ids` and `attention_mask` of shape `[n, max_length]`.

    Captions longer than `max_caption_tokens` keep their first tokens.
    """
    if isinstance(captions, str):
      raise TypeError('Expected a sequence of captions, got a single string.')
    input_ids = np.full((len(captions), self.max_length), self.pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(captions), self.max_length), dtype=np.int32)
    if not captions:
      return {'input_ids': input_ids, 'attention_mask': attention_mask}

    texts = [self.caption_lead + caption for caption in captions]
    encoded = self.tokenizer(texts, add_special_tokens=False)['input_ids']
    for row, caption_ids in enumerate(encoded):
      ids = self.prefix_ids + list(caption_ids[:self.max_caption_tokens]) + self.suffix_ids
      input_ids[row, :len(ids)] = ids
      attention_mask[row, :len(ids)] = 1
    tokens = {'input_ids': input_ids, 'attention_mask': attention_mask}
    if self.teacher is not None:
      teacher_ids, teacher_mask = self.teacher(list(captions))
      tokens['teacher_input_ids'] = np.asarray(teacher_ids, np.int32)
      tokens['teacher_attention_mask'] = np.asarray(teacher_mask, np.int32)
    return tokens
