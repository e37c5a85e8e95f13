"""`CLIPTeacher` from a Hugging Face `CLIPModel` folder against transformers' PyTorch CLIPModel.

Each case saves a tiny random CLIPModel and a small CLIP tokenizer (one token per letter) with
`save_pretrained`, then loads both offline.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from clamp_jax.models.clip_text import end_of_text_positions
from clamp_jax.weights import WeightLoadError, load_clip_teacher
from clamp_jax.weights.clip_teacher import tokenize

LETTERS = [chr(code) for code in range(ord('a'), ord('z') + 1)]
START_ID, END_ID = 52, 53  # <|startoftext|> and <|endoftext|> in `letter_vocab`.
CONTEXT = 12
EMBED = 8


def letter_vocab() -> dict[str, int]:
  vocab = {letter: index for index, letter in enumerate(LETTERS)}
  vocab.update({letter + '</w>': 26 + index for index, letter in enumerate(LETTERS)})
  vocab['<|startoftext|>'] = START_ID
  vocab['<|endoftext|>'] = END_ID
  return vocab


def save_clip_model(folder, *, act: str, image_size: int, eos_token_id: int,
                    vocab_size: int, seed: int = 0):
  """Save a seeded random CLIPModel and the letter tokenizer; returns the PyTorch model."""
  torch.manual_seed(seed)
  text = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=vocab_size, max_position_embeddings=CONTEXT, hidden_act=act,
              eos_token_id=eos_token_id, bos_token_id=START_ID, pad_token_id=END_ID)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=image_size, patch_size=4, hidden_act=act)
  config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED)
  model = transformers.CLIPModel(config).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
  model.save_pretrained(folder)
  transformers.CLIPTokenizer(vocab=letter_vocab(), merges=[]).save_pretrained(folder)
  return model


def reference_embeddings(model, ids, mask, pixels):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long(),
                pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  return out.text_embeds.numpy(), out.image_embeds.numpy()


def random_pixels(seed: int, size: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(3, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize('act, image_size', [('quick_gelu', 16), ('gelu', 28)])
def test_legacy_eos_config_matches_transformers(tmp_path, act, image_size):
  """eos_token_id=2 (original OpenAI configs): pooling at the highest id, text from the
  tokenizer with right padding."""
  reference = save_clip_model(tmp_path, act=act, image_size=image_size, eos_token_id=2,
                              vocab_size=54)
  teacher, tokenizer = load_clip_teacher(str(tmp_path))
  ids, mask = tokenize(tokenizer, ['a cat', 'the dog runs', 'abcdefghijklmnop'], CONTEXT)
  assert ids.shape == (3, CONTEXT)
  assert ids[2, -1] == END_ID  # Truncation keeps the end-of-text token.
  pixels = random_pixels(1, image_size)
  text, image = reference_embeddings(reference, ids, mask, pixels)
  ours_text = np.asarray(teacher.encode_text(jnp.asarray(ids), jnp.asarray(mask)))
  ours_image = np.asarray(teacher.encode_image(jnp.asarray(pixels)))
  np.testing.assert_allclose(ours_text, text, rtol=0, atol=1e-4)
  np.testing.assert_allclose(ours_image, image, rtol=0, atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(ours_text, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize('act, image_size', [('gelu', 16), ('quick_gelu', 28)])
def test_eos_token_config_matches_transformers(tmp_path, act, image_size):
  """eos_token_id set to the real token: pooling at its first position, even where higher ids
  come earlier, and with left padding."""
  vocab_size = 64
  reference = save_clip_model(tmp_path, act=act, image_size=image_size, eos_token_id=END_ID,
                              vocab_size=vocab_size)
  teacher, _ = load_clip_teacher(str(tmp_path))
  rng = np.random.default_rng(3)
  ids = rng.integers(END_ID + 1, vocab_size, size=(3, CONTEXT)).astype(np.int32)
  mask = np.ones_like(ids)
  ids[0, 5] = END_ID  # Higher ids follow, so argmax pooling would pick another position.
  ids[1, 9], ids[1, 11] = END_ID, END_ID  # The first occurrence counts.
  ids[2, :4], mask[2, :4] = END_ID, 0  # Left padding with the pad token (= end of text)...
  ids[2, 10] = END_ID  # ...so HF pools at position 0, a padding position.
  np.testing.assert_array_equal(end_of_text_positions(jnp.asarray(ids), END_ID), [5, 9, 0])
  pixels = random_pixels(2, image_size)
  text, image = reference_embeddings(reference, ids, mask, pixels)
  np.testing.assert_allclose(np.asarray(teacher.encode_text(jnp.asarray(ids), jnp.asarray(mask))),
                             text, rtol=0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(teacher.encode_image(jnp.asarray(pixels))), image,
                             rtol=0, atol=1e-4)


def test_logit_scale_and_config(tmp_path):
  reference = save_clip_model(tmp_path, act='quick_gelu', image_size=16, eos_token_id=2,
                              vocab_size=54)
  teacher, _ = load_clip_teacher(str(tmp_path))
  expected = float(reference.logit_scale.detach().exp())
  assert teacher.logit_scale == pytest.approx(expected, rel=1e-6)
  assert teacher.text_encoder.config.max_length == CONTEXT
  assert teacher.text_encoder.config.embed_dim == EMBED
  assert teacher.image_tower.config.embed_dim == EMBED


def test_tokenizer_matches_transformers(tmp_path):
  save_clip_model(tmp_path, act='quick_gelu', image_size=16, eos_token_id=2, vocab_size=54)
  _, tokenizer = load_clip_teacher(str(tmp_path))
  reference = transformers.CLIPTokenizer(vocab=letter_vocab(), merges=[])
  texts = ['A Cat', 'zebra crossing']
  ids, mask = tokenize(tokenizer, texts, CONTEXT)
  expected = reference(texts, padding='max_length', truncation=True, max_length=CONTEXT,
                       return_tensors='np')
  np.testing.assert_array_equal(ids, expected['input_ids'])
  np.testing.assert_array_equal(mask, expected['attention_mask'])
  assert ids[0, 0] == START_ID


def test_no_gradient_reaches_teacher(tmp_path):
  save_clip_model(tmp_path, act='quick_gelu', image_size=16, eos_token_id=2, vocab_size=54)
  teacher, tokenizer = load_clip_teacher(str(tmp_path))
  ids, mask = tokenize(tokenizer, ['a cat'], CONTEXT)
  pixels = jnp.asarray(random_pixels(4, 16))

  def loss(model):
    return (jnp.sum(model.encode_image(pixels)[:1] * model.encode_text(jnp.asarray(ids),
                                                                       jnp.asarray(mask))))

  grads = nnx.grad(loss)(teacher)
  for leaf in jax.tree.leaves(grads):
    assert not np.any(np.asarray(leaf))


def test_vision_only_folder_rejected(tmp_path):
  torch.manual_seed(0)
  config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         image_size=16, patch_size=4)
  transformers.CLIPVisionModelWithProjection(config).save_pretrained(tmp_path)
  with pytest.raises(WeightLoadError, match='needs a full CLIPModel folder'):
    load_clip_teacher(str(tmp_path))


def test_missing_tokenizer_one_line(tmp_path):
  save_clip_model(tmp_path, act='quick_gelu', image_size=16, eos_token_id=2, vocab_size=54)
  (tmp_path / 'tokenizer.json').unlink()
  with pytest.raises(WeightLoadError) as error:
    load_clip_teacher(str(tmp_path))
  message = str(error.value)
  assert '\n' not in message
  assert 'no usable tokenizer files' in message


def test_tokenizer_larger_than_vocabulary_rejected(tmp_path):
  save_clip_model(tmp_path, act='quick_gelu', image_size=16, eos_token_id=2, vocab_size=50)
  with pytest.raises(WeightLoadError, match='the tokenizer has 54 tokens, more than the text '
                                            'tower vocabulary of 50'):
    load_clip_teacher(str(tmp_path))


def test_missing_text_tensor_one_line(tmp_path):
  from safetensors.numpy import load_file, save_file

  save_clip_model(tmp_path, act='quick_gelu', image_size=16, eos_token_id=2, vocab_size=54)
  path = tmp_path / 'model.safetensors'
  tensors = load_file(str(path))
  del tensors['text_projection.weight']
  save_file(tensors, str(path))
  with pytest.raises(WeightLoadError) as error:
    load_clip_teacher(str(tmp_path))
  message = str(error.value)
  assert '\n' not in message
  assert "missing tensor 'text_projection.weight'" in message
