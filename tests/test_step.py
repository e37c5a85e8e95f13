"""The jitted train step: micro-batches, scanned and rematerialised layers, sigmoid loss, bf16,
donation. Each variant is checked against the plain full-batch computation on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clamp_jax import build, parallel, train
from clamp_jax import step as step_lib
from clamp_jax.step import CAPTION_KEYS, StepOptions


def tiny_config(**changes):
  from configs import tiny
  config = tiny.get_config()
  config.model.lora.dropout = 0.0  # Equal dropout masks are not the point of these tests.
  config.data.caption_table = False
  for path, value in changes.items():
    node = config
    *parents, leaf = path.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def setup(config):
  model, tokenizer = build.build_model(config)
  mesh = parallel.make_mesh(config.mesh)
  train.place_model(model, mesh, config)
  trainable = build.trainable_filter(build.trainable_patterns(config))
  host = next(iter(train.make_train_data(config, train.make_caption_tokenizer(config, tokenizer))))
  replicated = CAPTION_KEYS if config.data.caption_table else ()
  batch, _ = train.split_data_counters(host, mesh, config.mesh.rules, replicated)
  model.train()
  return model, mesh, trainable, batch


def loss_and_grads(config, options: StepOptions):
  model, mesh, trainable, batch = setup(config)

  @nnx.jit
  def run(model, batch):
    (loss, metrics), grads = step_lib.loss_and_grads(model, batch, trainable, options, mesh,
                                                     config.mesh.rules)
    return loss, metrics, grads

  loss, metrics, grads = run(model, batch)
  flat = {build.path_string(path): np.asarray(variable.get_value())
          for path, variable in nnx.to_flat_state(grads)}
  return float(loss), jax.device_get(metrics), flat


def assert_grads_close(left, right, rtol=1e-4):
  """Equal up to float summation order: within `rtol` of each tensor's largest entry."""
  assert left.keys() == right.keys()
  assert len(left) > 20
  for name in left:
    # The floor covers gradients that are zero in exact arithmetic (a key bias under softmax).
    atol = max(rtol * float(np.abs(left[name]).max()), 1e-8)
    np.testing.assert_allclose(left[name], right[name], rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize('caption_table', [False, True])
def test_microbatches_match_full_batch(caption_table):
  config = tiny_config(**{'data.caption_table': caption_table})
  loss, metrics, grads = loss_and_grads(config, StepOptions(microbatches=1))
  micro_loss, micro_metrics, micro_grads = loss_and_grads(config, StepOptions(microbatches=2))
  assert abs(loss - micro_loss) < 1e-5
  for name in metrics:
    assert abs(metrics[name] - micro_metrics[name]) < 1e-5, name
  assert_grads_close(grads, micro_grads)
  # Micro-batches must not be a no-op: the text rows really are split into two parts.
  assert any(np.abs(value).max() > 0 for name, value in micro_grads.items() if '/lora/' in name)


def test_microbatches_with_scanned_rematerialised_layers():
  loss, _, grads = loss_and_grads(tiny_config(), StepOptions())
  config = tiny_config(**{'model.scan_layers': True, 'model.remat': 'full'})
  micro_loss, _, micro_grads = loss_and_grads(config, StepOptions(microbatches=2))
  assert abs(loss - micro_loss) < 1e-5
  assert_grads_close(grads, micro_grads)


def test_microbatches_with_dropout_advance_rng_counts():
  config = tiny_config(**{'model.lora.dropout': 0.1, 'model.scan_layers': True})
  model, mesh, trainable, batch = setup(config)
  counts = lambda: [int(x) for x in jax.tree.leaves(nnx.state(model, nnx.RngCount))]
  before = counts()

  @nnx.jit
  def run(model, batch):
    return step_lib.loss_and_grads(model, batch, trainable, StepOptions(microbatches=2), mesh,
                                   config.mesh.rules)[0][0]

  assert np.isfinite(float(run(model, batch)))
  after = counts()
  assert len(after) == len(before) > 0
  assert sum(after) > sum(before)


def test_microbatches_not_dividing_rows_rejected():
  config = tiny_config()
  with pytest.raises(ValueError, match='not divisible by config.train.microbatches=3'):
    loss_and_grads(config, StepOptions(microbatches=3))


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_scan_and_remat_match_plain_layers(remat):
  loss, _, grads = loss_and_grads(tiny_config(), StepOptions())
  config = tiny_config(**{'model.scan_layers': True, 'model.remat': remat})
  scan_loss, _, scan_grads = loss_and_grads(config, StepOptions())
  assert abs(loss - scan_loss) < 1e-5
  assert_grads_close(grads, scan_grads)


def test_sigmoid_loss_trains_bias_and_temperature():
  config = tiny_config(**{'train.loss': 'sigmoid', 'model.init_logit_scale': 10.0})
  loss, metrics, grads = loss_and_grads(config, StepOptions(loss='sigmoid'))
  assert np.isfinite(loss)
  assert abs(metrics['loss_positive'] + metrics['loss_negative'] - loss) < 1e-4
  assert grads['logit_bias'] != 0
  assert grads['log_logit_scale'] != 0
  micro_loss, _, micro_grads = loss_and_grads(config, StepOptions(loss='sigmoid',
                                                                  microbatches=2))
  assert abs(loss - micro_loss) < 1e-5
  assert_grads_close(grads, micro_grads)


def test_bfloat16_compute_close_to_float32():
  loss, _, _ = loss_and_grads(tiny_config(), StepOptions())
  config = tiny_config(**{'model.llm_dtype': 'bfloat16', 'model.vit.dtype': 'bfloat16'})
  bf16_loss, _, grads = loss_and_grads(config, StepOptions())
  assert bf16_loss != loss  # The bf16 path really ran.
  assert abs(bf16_loss - loss) < 0.05 * abs(loss)
  assert all(value.dtype == np.float32 for value in grads.values())


def test_step_donates_mutable_state_and_keeps_frozen():
  config = tiny_config()
  model, mesh, trainable, batch = setup(config)
  optimizer = train.make_optimizer(model, config.train, trainable)
  parallel.shard_module(optimizer, mesh, config.mesh.rules)
  step = train.make_train_step(model, optimizer, trainable, config, mesh, batch)
  frozen_before = jax.tree.leaves(nnx.state(model, step.frozen_filter))
  mutable_before = jax.tree.leaves(nnx.state(model, trainable))
  metrics = step(model, optimizer, batch)
  assert np.isfinite(float(metrics['train/loss']))
  assert all(leaf.is_deleted() for leaf in mutable_before)
  assert not any(leaf.is_deleted() for leaf in frozen_before)
  # The model now contains the step's outputs, and a second step runs without recompiling.
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(nnx.state(model, trainable)))
  step(model, optimizer, batch)
  assert step.function._cache_size() == 1


def test_held_state_follows_assignments_outside_the_step():
  """Two steps with a trainable value assigned between them equal the same two steps run with a
  fresh split of the state each time."""
  config = tiny_config()
  results = []
  for reuse in (True, False):
    model, mesh, trainable, batch = setup(config)
    optimizer = train.make_optimizer(model, config.train, trainable)
    parallel.shard_module(optimizer, mesh, config.mesh.rules)
    step = train.make_train_step(model, optimizer, trainable, config, mesh, batch)
    step(model, optimizer, batch)
    if not reuse:
      step = step_lib.CompiledStep(step.function, step.frozen_filter)
    model.text_tower.prompts[...] = jnp.zeros_like(model.text_tower.prompts[...])
    metrics = step(model, optimizer, batch)
    results.append((float(metrics['train/loss']), np.asarray(model.text_tower.prompts[...])))
  (held_loss, held_prompts), (fresh_loss, fresh_prompts) = results
  assert held_loss == fresh_loss
  np.testing.assert_array_equal(held_prompts, fresh_prompts)


def test_activation_constraint_only_inside_context():
  x = jnp.ones((4, 3, 2))
  assert parallel.constrain(x, ('batch', 'length', 'act_embed')) is x
