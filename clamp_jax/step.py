"""The CLAMP training step under `jax.jit` with explicit shardings and donated state.

The model and optimizer are split into two states. The frozen parameters (the base LLM and a
locked image tower) are passed in and never returned. The mutable state (trainable parameters,
optimizer moments, dropout RNG counters, calibration statistics) is donated and returned updated.
Both carry the shardings their logical axes map to, so the compiled step's inputs and outputs live
on the mesh as the rules set, and the old mutable buffers are reused for the new ones.

With `microbatches > 1` the batch is processed in equal parts with the gradient-cache method, which
keeps the contrastive loss over the whole global batch:
1. embed every micro-batch (no gradients kept), giving the full `[batch, dim]` embeddings;
2. compute the loss on the full embeddings and its gradients with respect to the embeddings and
   to the temperature;
3. for each micro-batch again, back-propagate its slice of those embedding gradients into the
   trainable parameters, with the same dropout masks as in step 1, and add the results.
The gradients equal one full-batch step's (up to float summation order); activation memory is one
micro-batch's, at the cost of one more forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clamp_jax import parallel
from clamp_jax.distillation import distillation_loss, sharded_distillation_loss
from clamp_jax.losses import (equal_caption_mask, indexed_contrastive_loss,
                              sigmoid_contrastive_loss, softmax_contrastive_loss)
from clamp_jax.sharded_losses import (sharded_sigmoid_contrastive_loss,
                                      sharded_softmax_contrastive_loss)

LOSSES = ('softmax', 'sigmoid')
# Batch entries with one row per caption: per image, or per distinct caption in a caption table.
CAPTION_KEYS = ('input_ids', 'attention_mask', 'teacher_input_ids', 'teacher_attention_mask')


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Loss choice and batch split of the train step."""

  loss: str = 'softmax'  # 'softmax' (CLIP's InfoNCE) or 'sigmoid' (SigLIP).
  # Gather embeddings with `jax.shard_map` when the batch is split over devices.
  sharded_loss: bool = True
  microbatches: int = 1  # Parts the batch is processed in (gradient cache); 1 disables it.
  distill_weight: float = 1.0  # Weight of the distillation loss when the model has a teacher.

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f'loss={self.loss!r} is not one of {LOSSES}.')
    if self.microbatches < 1:
      raise ValueError(f'microbatches={self.microbatches} must be at least 1.')


def contrastive_loss(model, images: jax.Array, texts: jax.Array, batch: dict, options: StepOptions,
                     mesh: Mesh, rules) -> tuple[jax.Array, dict]:
  """Loss and metrics of L2-normalised embeddings against `batch`'s pairing.

  A batch with `caption_index` and fewer text rows than images carries a caption table: each image's
  positive is its own row. Otherwise row i of both is a pair, and equal captions count as positives.
  With a teacher in the model, `options.distill_weight` times the distillation loss is added.
  """
  loss, metrics = _pair_loss(model, images, texts, batch, options, mesh, rules)
  if model.teacher is None:
    return loss, metrics
  distill, distill_metrics = _distillation(model, images, texts, batch, options, mesh, rules)
  metrics = {**metrics, **distill_metrics, 'contrastive_loss': loss}
  return loss + options.distill_weight * distill, metrics


def _batch_axes(mesh: Mesh, rules) -> tuple[str, ...]:
  """Return the mesh axes that the `batch` rule splits the batch over."""
  return tuple(a for a in (parallel.rules_dict(rules).get('batch') or ()) if a in mesh.shape)


def _distillation(model, images, texts, batch, options, mesh, rules):
  """Distillation loss against the model's frozen teacher on the same images and captions."""
  if 'teacher_input_ids' not in batch:
    raise ValueError('The model has a teacher, but the batch has no teacher_input_ids; build the '
                     'caption tokenizer with the teacher tokenizer.')
  if texts.shape[0] != images.shape[0]:
    raise ValueError('Distillation needs one caption per image; set config.data.caption_table=False.')
  teacher = model.teacher
  pixels = batch['image']
  size = teacher.image_tower.config.image_size
  if pixels.shape[1:3] != (size, size):
    pixels = jax.image.resize(pixels, (pixels.shape[0], size, size, pixels.shape[3]), 'bicubic')
  teacher_images = teacher.encode_image(pixels)
  teacher_texts = teacher.encode_text(batch['teacher_input_ids'], batch['teacher_attention_mask'])
  if options.sharded_loss and parallel.batch_shards(mesh, rules) > 1:
    axes = _batch_axes(mesh, rules)
    return sharded_distillation_loss(images, texts, teacher_images, teacher_texts, mesh, axes)
  return distillation_loss(images, texts, teacher_images, teacher_texts)


def _pair_loss(model, images: jax.Array, texts: jax.Array, batch: dict, options: StepOptions,
               mesh: Mesh, rules) -> tuple[jax.Array, dict]:
  logit_scale = model.logit_scale()
  if 'caption_index' in batch and texts.shape[0] != images.shape[0]:
    if options.loss != 'softmax':
      raise ValueError('The sigmoid loss needs one caption per image; set '
                       'config.data.caption_table=False.')
    return indexed_contrastive_loss(images, texts, logit_scale, batch['caption_index'])
  ids, mask = batch['input_ids'], batch['attention_mask']
  axes = _batch_axes(mesh, rules)
  if options.sharded_loss and parallel.batch_shards(mesh, rules) > 1:
    if options.loss == 'softmax':
      return sharded_softmax_contrastive_loss(images, texts, logit_scale, mesh, axes, ids, mask)
    return sharded_sigmoid_contrastive_loss(images, texts, logit_scale, model.bias(), mesh, axes,
                                            ids, mask)
  positives = equal_caption_mask(ids, mask)
  if options.loss == 'softmax':
    return softmax_contrastive_loss(images, texts, logit_scale, positives)
  return sigmoid_contrastive_loss(images, texts, logit_scale, model.bias(), positives)


def _embed(model, batch: dict) -> tuple[jax.Array, jax.Array]:
  return (model.encode_image(batch['image']),
          model.encode_text(batch['input_ids'], batch['attention_mask']))


def _split_micro(array: jax.Array, parts: int, name: str) -> jax.Array:
  """`[n, ...]` to `[parts, n // parts, ...]` with part k holding rows k, k + parts, ...

  Strided parts keep each device's share of every part equal, so no part idles devices.
  """
  rows = array.shape[0]
  if rows % parts:
    raise ValueError(f'Batch entry {name!r} has {rows} rows, not divisible by '
                     f'config.train.microbatches={parts}.')
  return jnp.swapaxes(array.reshape(rows // parts, parts, *array.shape[1:]), 0, 1)


def _join_micro(array: jax.Array) -> jax.Array:
  """Inverse of `_split_micro`: `[parts, m, ...]` back to `[parts * m, ...]` in row order."""
  parts, rows = array.shape[:2]
  return jnp.swapaxes(array, 0, 1).reshape(parts * rows, *array.shape[2:])


def loss_and_grads(model, batch: dict, trainable, options: StepOptions, mesh: Mesh, rules):
  """Return `((loss, metrics), grads)` of the trainable parameters, in micro-batches when
  `options.microbatches > 1`."""
  if options.microbatches == 1:
    def loss_fn(model):
      images, texts = _embed(model, batch)
      return contrastive_loss(model, images, texts, batch, options, mesh, rules)
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)
    return grad_fn(model)
  return _gradient_cache(model, batch, trainable, options, mesh, rules)


def _gradient_cache(model, batch: dict, trainable, options: StepOptions, mesh: Mesh, rules):
  parts = options.microbatches
  graphdef, params, rngs, rest = nnx.split(model, trainable, nnx.RngState, ...)
  micro = {key: _split_micro(value, parts, key) for key, value in batch.items()
           if key in ('image', *CAPTION_KEYS)}

  def embed(params, rngs, chunk):
    # Merging reuses the Variable objects of a State. Rebuilding the RNG state here gives them the
    # current trace level, so dropout may advance its counters inside `jax.vjp`.
    rngs = jax.tree.map(lambda x: x, rngs)
    model = nnx.merge(graphdef, params, rngs, rest)
    embeddings = _embed(model, chunk)
    return embeddings, nnx.state(model, nnx.RngState)

  # 1. Embeddings of every micro-batch, keeping the RNG state each one started from.
  def forward(rngs, chunk):
    embeddings, next_rngs = embed(params, rngs, chunk)
    return next_rngs, (embeddings, rngs)

  final_rngs, ((images, texts), start_rngs) = jax.lax.scan(forward, rngs, micro)
  images, texts = _join_micro(images), _join_micro(texts)

  # 2. Loss over the full batch; gradients for the embeddings and the temperature.
  def loss_of(params, images, texts):
    model = nnx.merge(graphdef, params, rngs, rest)
    return contrastive_loss(model, images, texts, batch, options, mesh, rules)

  (loss, metrics), (head_grads, image_grads, text_grads) = jax.value_and_grad(
      loss_of, argnums=(0, 1, 2), has_aux=True)(params, images, texts)

  # 3. Back-propagate each micro-batch's embedding gradients into the parameters.
  cotangents = (_split_micro(image_grads, parts, 'image'),
                _split_micro(text_grads, parts, 'input_ids'))

  def backward(total, inputs):
    chunk, chunk_rngs, cotangent = inputs
    _, vjp = jax.vjp(lambda p: embed(p, chunk_rngs, chunk)[0], params)
    (grads,) = vjp(cotangent)
    return jax.tree.map(jnp.add, total, grads), None

  grads, _ = jax.lax.scan(backward, head_grads, (micro, start_rngs, cotangents))
  nnx.update(model, final_rngs)
  return (loss, metrics), grads


@dataclasses.dataclass
class CompiledStep:
  """A jitted step plus the state layout it expects; `__call__` updates model and optimizer.

  Splitting a model into states walks its whole graph: about 0.3 s of host time per step for
  SmolLM2-135M with adapters and its optimizer. So the step keeps its input states between calls,
  writes each result straight into the module's variables, and splits again only when a variable
  no longer contains the array of the kept state (something outside the step assigned it).
  """

  function: Callable
  frozen_filter: object
  inputs: StepInputs | None = dataclasses.field(default=None, init=False, repr=False)

  def __call__(self, model, optimizer, batch: dict) -> dict:
    inputs = self.inputs
    if inputs is None or not inputs.current(model, optimizer):
      inputs = self.inputs = StepInputs.split(model, optimizer, self.frozen_filter)
    (model_state, optimizer_state), metrics = self.function(inputs.frozen, inputs.mutable, batch)
    inputs.write_back(model_state, optimizer_state)
    return metrics


@dataclasses.dataclass
class StepInputs:
  """The step's input states and, per state leaf, the module variable it mirrors."""

  module: object
  optimizer: object
  frozen: nnx.State
  mutable: tuple[nnx.State, nnx.State]
  frozen_pairs: list  # (module variable, the array the frozen state passes for it)
  mutable_vars: list  # The module variables of the mutable states' leaves, in state order.
  mutable_arrays: list  # The mutable states' arrays, in the order of `mutable_vars`.

  @classmethod
  def split(cls, model, optimizer, frozen_filter) -> StepInputs:
    frozen, mutable = split_state(model, optimizer, frozen_filter)
    model_vars, optimizer_vars = _variables_by_path(model), _variables_by_path(optimizer)
    frozen_pairs = [(model_vars[path], leaf.get_raw_value())
                    for path, leaf in nnx.to_flat_state(frozen)]
    mutable_vars = ([model_vars[path] for path, _ in nnx.to_flat_state(mutable[0])]
                    + [optimizer_vars[path] for path, _ in nnx.to_flat_state(mutable[1])])
    return cls(model, optimizer, frozen, mutable, frozen_pairs, mutable_vars, _arrays(mutable))

  def current(self, model, optimizer) -> bool:
    """Check that every variable still contains the array this state passes for it."""
    if model is not self.module or optimizer is not self.optimizer:
      return False
    frozen_current = all(var.get_raw_value() is array for var, array in self.frozen_pairs)
    return frozen_current and all(
        var.get_raw_value() is array
        for var, array in zip(self.mutable_vars, self.mutable_arrays, strict=True))

  def write_back(self, model_state: nnx.State, optimizer_state: nnx.State) -> None:
    """Keep the step's output states as the next inputs and put their arrays in the variables."""
    self.mutable = (model_state, optimizer_state)
    self.mutable_arrays = _arrays(self.mutable)
    for var, array in zip(self.mutable_vars, self.mutable_arrays, strict=True):
      var.set_raw_value(array)


def _variables_by_path(node) -> dict:
  return {path: value for path, value in nnx.iter_graph(node) if isinstance(value, nnx.Variable)}


def _arrays(states) -> list:
  """Return the arrays of `states` in `nnx.to_flat_state` order, state after state."""
  return [leaf.get_raw_value() for state in states for _, leaf in nnx.to_flat_state(state)]


def frozen_filter(trainable) -> object:
  """Parameters that never change: every `nnx.Param` outside the trainable set."""
  return nnx.All(nnx.Param, nnx.Not(trainable))


def split_state(model, optimizer, frozen):
  """`(frozen model state, (mutable model state, optimizer state))`.

  Model and optimizer are split separately because the trainable filters match paths that start
  at the model's root.
  """
  return nnx.state(model, frozen), (nnx.state(model, nnx.Not(frozen)), nnx.state(optimizer))


def make_step_function(model, optimizer, trainable, options: StepOptions, mesh: Mesh, rules):
  """Build the pure `(frozen, mutable, batch) -> (mutable, metrics)` step; return it and its
  frozen filter."""
  frozen = frozen_filter(trainable)
  model_def, _, _ = nnx.split(model, frozen, ...)
  optimizer_def, _ = nnx.split(optimizer)

  def step(frozen_state, mutable_state, batch):
    model_state, optimizer_state = mutable_state
    with parallel.activation_sharding(mesh, rules):
      model = nnx.merge(model_def, frozen_state, model_state)
      optimizer = nnx.merge(optimizer_def, optimizer_state)
      logit_scale = model.logit_scale()
      (loss, metrics), grads = loss_and_grads(model, batch, trainable, options, mesh, rules)
      optimizer.update(model, grads)
      out = {f'train/{name}': value for name, value in metrics.items()}
      out['train/loss'] = loss
      out['train/logit_scale'] = logit_scale
      out['train/grad_norm'] = optax.tree.norm(grads)
      return (nnx.state(model, nnx.Not(frozen)), nnx.state(optimizer)), out

  return step, frozen


def batch_shardings(batch_keys, mesh: Mesh, rules, replicated=()) -> dict[str, NamedSharding]:
  """Sharding per batch entry: split over the batch axes, or whole for `replicated` keys."""
  split = parallel.batch_sharding(mesh, rules)
  whole = NamedSharding(mesh, PartitionSpec())
  return {key: whole if key in replicated else split for key in batch_keys}


def step_shardings(model, optimizer, frozen, mesh: Mesh, rules):
  """Shardings of the step's frozen and mutable state, from the variables' logical axes."""
  frozen_state, mutable_state = split_state(model, optimizer, frozen)
  return (parallel.state_shardings(frozen_state, mesh, rules),
          jax.tree.map(lambda s: parallel.state_shardings(s, mesh, rules), mutable_state,
                       is_leaf=lambda x: isinstance(x, nnx.State)))


def jit_step(step, frozen_shardings, mutable_shardings, data_shardings, mesh: Mesh):
  """`jax.jit` with explicit in and out shardings; the mutable state is donated."""
  return jax.jit(step,
                 in_shardings=(frozen_shardings, mutable_shardings, data_shardings),
                 out_shardings=(mutable_shardings, NamedSharding(mesh, PartitionSpec())),
                 donate_argnums=(1,))


def make_train_step(model, optimizer, trainable, options: StepOptions, mesh: Mesh, rules,
                    batch_keys, replicated=()) -> CompiledStep:
  """Jit the step with the shardings of the current model and donate the mutable state."""
  step, frozen = make_step_function(model, optimizer, trainable, options, mesh, rules)
  frozen_shardings, mutable_shardings = step_shardings(model, optimizer, frozen, mesh, rules)
  function = jit_step(step, frozen_shardings, mutable_shardings,
                      batch_shardings(batch_keys, mesh, rules, replicated), mesh)
  return CompiledStep(function, frozen)
