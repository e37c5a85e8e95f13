"""Checkpoint recovery: SIGKILL at random moments and during saves, SIGTERM, best-K retention,
and restoring onto another mesh.

The training runs are subprocesses of `python -m clamp_jax.main` on configs/tiny.py. Every signal
goes to a process this test started, by its pid.
"""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clamp_jax.checkpointing import Checkpointer
from clamp_jax.metrics import read_metrics
from clamp_jax.preemption import StopWatch
from conftest import REPO, run_main_command

STEPS = 24
FLAGS = ['--config=configs/tiny.py', f'--config.train.steps={STEPS}',
         '--config.train.checkpoint_every=3', '--config.train.log_every=1',
         '--config.eval.at_end=False']
TEMPORARY_MARK = '.orbax-checkpoint-tmp'
# Upper bound on the time from SIGTERM to exit: the running step, one save and its wait.
SIGTERM_EXIT_LIMIT_S = 60.0


def start_training(workdir, *extra, log_name='train.log') -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  log = open(os.path.join(workdir, log_name), 'ab')
  return subprocess.Popen([sys.executable, '-m', 'clamp_jax.main', *FLAGS, *extra,
                           f'--workdir={workdir}'], cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT)


def last_logged_step(workdir) -> int:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    steps = [json.loads(line)['step'] for line in f if line.strip().endswith('}')]
  return max(steps, default=0)


def temporary_folders(workdir) -> list[str]:
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return [name for name in os.listdir(folder) if TEMPORARY_MARK in name]


def wait_for(condition, process, timeout=300.0, interval=0.001) -> bool:
  """Poll `condition()` until it is true (True), or `process` exits or time runs out (False)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition():
      return True
    if process.poll() is not None:
      return False
    time.sleep(interval)
  return False


def kill(process) -> None:
  if process.poll() is None:
    os.kill(process.pid, signal.SIGKILL)
  process.wait(timeout=60)


def final_losses(workdir) -> dict[int, float]:
  """`train/loss` per step; a step logged again after a restart keeps its last value."""
  return {r['step']: r['train/loss'] for r in read_metrics(str(workdir)) if 'train/loss' in r}


@pytest.fixture(scope='module')
def reference_losses(tmp_path_factory) -> dict[int, float]:
  workdir = tmp_path_factory.mktemp('uninterrupted')
  result = run_main_command(*FLAGS, f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  losses = final_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses


def test_sigkill_at_random_moments_resumes_exactly(tmp_path, reference_losses):
  seed = random.randrange(2 ** 32)
  rng = random.Random(seed)
  events = []

  # 1. SIGKILL at a random moment between two steps of the first third of training.
  target = rng.randint(1, STEPS // 3)
  process = start_training(tmp_path)
  assert wait_for(lambda: last_logged_step(tmp_path) >= target, process), 'run ended early'
  time.sleep(rng.uniform(0.0, 0.3))
  kill(process)
  events.append(('random', last_logged_step(tmp_path)))

  # 2. SIGKILL while a checkpoint is being written: as soon as Orbax's temporary folder shows.
  for attempt in range(3):
    process = start_training(tmp_path)
    caught = wait_for(lambda: bool(temporary_folders(tmp_path)), process)
    kill(process)
    left = temporary_folders(tmp_path)
    events.append(('during save', caught, left))
    if left:
      break
  print(f'kill events (seed {seed}): {events}')
  assert any(event[0] == 'during save' and event[2] for event in events), (
      f'no kill landed inside a save: {events} (seed {seed})')

  # 3. Rerun to the end: the partial save is ignored and deleted, training resumes.
  result = run_main_command(*FLAGS, f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert not temporary_folders(tmp_path)
  got = final_losses(tmp_path)
  assert sorted(got) == list(range(1, STEPS + 1))
  assert abs(got[STEPS] - reference_losses[STEPS]) <= 1e-5, (events, seed)
  for step in range(1, STEPS + 1):
    assert abs(got[step] - reference_losses[step]) <= 1e-5, (step, events, seed)


def test_sigterm_saves_and_exits_zero(tmp_path, reference_losses):
  process = start_training(tmp_path)
  assert wait_for(lambda: last_logged_step(tmp_path) >= 4, process), 'run ended early'
  sent = time.monotonic()
  os.kill(process.pid, signal.SIGTERM)
  returncode = process.wait(timeout=SIGTERM_EXIT_LIMIT_S + 30)
  seconds = time.monotonic() - sent
  with open(tmp_path / 'train.log', errors='replace') as f:
    log = f.read()
  print(f'SIGTERM to exit: {seconds:.2f} s')
  assert returncode == 0, log[-3000:]
  assert seconds <= SIGTERM_EXIT_LIMIT_S
  stopped = last_logged_step(tmp_path)
  assert stopped < STEPS
  assert f'Stopped at step {stopped} on SIGTERM' in log
  assert str(stopped) in os.listdir(tmp_path / 'checkpoints')
  assert not temporary_folders(tmp_path)

  # The rerun resumes after the stop step and matches the uninterrupted run.
  result = run_main_command(*FLAGS, f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Resuming from step {stopped} of {STEPS}' in result.stderr
  got = final_losses(tmp_path)
  for step in range(stopped + 1, STEPS + 1):
    assert abs(got[step] - reference_losses[step]) <= 1e-5, step


KILL_DURING_SAVE = textwrap.dedent('''
    import sys, time
    import jax.numpy as jnp, optax
    from flax import nnx
    from clamp_jax.checkpointing import Checkpointer

    class Big(nnx.Module):
      def __init__(self):
        # 16 x 4M float32 = 256 MiB, so one save takes long enough to be interrupted.
        self.weights = nnx.List([nnx.Param(jnp.zeros((4 * 1024 * 1024,))) for _ in range(16)])

    model = Big()
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    checkpointer = Checkpointer(sys.argv[1], keep=3)
    for step in (1, 2):
      for weight in model.weights:
        weight[...] = jnp.full(weight.shape, float(step))
      checkpointer.save(step, model=model, optimizer=optimizer, trainable=nnx.Param,
                        data_state={'step': step})
      if step == 1:
        checkpointer.wait()
        print('saved 1', flush=True)
    print('saving 2', flush=True)
    checkpointer.wait()
    time.sleep(600)
''')


def test_kill_during_save_restores_previous_step(tmp_path):
  directory = tmp_path / 'checkpoints'
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  process = subprocess.Popen([sys.executable, '-c', KILL_DURING_SAVE, str(directory)], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    step_two = lambda: any(name.startswith('2.') and TEMPORARY_MARK in name
                           for name in (os.listdir(directory) if directory.exists() else ()))
    assert wait_for(step_two, process, timeout=300), process.stdout.read()[-3000:]
  finally:
    kill(process)
  assert any(TEMPORARY_MARK in name for name in os.listdir(directory))
  assert '2' not in os.listdir(directory)

  class Big(nnx.Module):
    def __init__(self):
      self.weights = nnx.List([nnx.Param(jnp.zeros((4 * 1024 * 1024,))) for _ in range(16)])

  model = Big()
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  checkpointer = Checkpointer(str(directory), keep=3)
  assert checkpointer.latest_step() == 1
  data_state = checkpointer.restore(1, model=model, optimizer=optimizer, trainable=nnx.Param)
  assert data_state == {'step': 1}
  for weight in model.weights:
    assert np.all(np.asarray(weight[...]) == 1.0)
  checkpointer.close()
  assert not any(TEMPORARY_MARK in name for name in os.listdir(directory))


class Small(nnx.Module):
  def __init__(self):
    self.weight = nnx.Param(jnp.zeros((3,)))


def saved_steps(directory, keep, keep_best, best_metric, best_mode, values) -> list[int]:
  model = Small()
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  checkpointer = Checkpointer(str(directory), keep=keep, keep_best=keep_best,
                              best_metric=best_metric, best_mode=best_mode)
  for step, value in enumerate(values, start=1):
    metrics = {'train/loss': 1.0} if value is None else {'train/loss': 1.0, best_metric: value}
    checkpointer.save(step, model=model, optimizer=optimizer, trainable=nnx.Param,
                      data_state={}, metrics=metrics)
    checkpointer.wait()
  steps = checkpointer.all_steps()
  checkpointer.close()
  return steps


def test_keeps_last_and_best_checkpoints(tmp_path):
  values = [0.5, 0.9, 0.1, 0.3, 0.2, 0.4]
  assert saved_steps(tmp_path / 'max', 2, 1, 'eval/digits/top1', 'max', values) == [2, 5, 6]
  assert saved_steps(tmp_path / 'min', 1, 2, 'eval/digits/top1', 'min', values) == [3, 5, 6]
  assert saved_steps(tmp_path / 'none', 2, 0, 'eval/digits/top1', 'max', values) == [5, 6]
  # Checkpoints without the metric never outrank those with it.
  sparse = [None, 0.2, None, None, 0.7, None, None]
  assert saved_steps(tmp_path / 'sparse', 1, 2, 'eval/x', 'max', sparse) == [2, 5, 7]


def test_best_checkpoints_survive_restart(tmp_path):
  values = [0.5, 0.9, 0.1]
  assert saved_steps(tmp_path, 1, 1, 'eval/x', 'max', values) == [2, 3]
  # A new manager reads the saved metrics back and keeps ranking by them.
  model = Small()
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  checkpointer = Checkpointer(str(tmp_path), keep=1, keep_best=1, best_metric='eval/x',
                              best_mode='max')
  assert checkpointer.metrics(2)['eval/x'] == 0.9
  checkpointer.save(4, model=model, optimizer=optimizer, trainable=nnx.Param, data_state={},
                    metrics={'eval/x': 0.3})
  checkpointer.wait()
  assert checkpointer.all_steps() == [2, 4]
  checkpointer.close()


def test_stop_watch_records_sigterm():
  previous = signal.getsignal(signal.SIGTERM)
  with StopWatch() as watch:
    assert watch.check(1) is None
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    assert watch.check(2) == 'SIGTERM'
    assert watch.stop_reason == 'SIGTERM'
  assert signal.getsignal(signal.SIGTERM) is previous


EIGHT_DEVICES = '--xla_force_host_platform_device_count=8'


def run_on_eight_devices(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS=EIGHT_DEVICES)
  return subprocess.run([sys.executable, '-m', 'clamp_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_restore_onto_other_mesh(tmp_path):
  common = ['--config=configs/tiny.py', '--config.train.steps=4', '--config.eval.at_end=False']
  data8 = ['--config.mesh.data=8', '--config.mesh.fsdp=1', '--config.mesh.tensor=1']
  fsdp_tensor = ['--config.mesh.data=1', '--config.mesh.fsdp=4', '--config.mesh.tensor=2']

  straight = run_on_eight_devices(*common, *data8, f'--workdir={tmp_path / "straight"}')
  assert straight.returncode == 0, straight.stderr[-3000:]
  first = run_on_eight_devices(*common, *data8, '--config.train.stop_after_steps=2',
                               f'--workdir={tmp_path / "moved"}')
  assert first.returncode == 0, first.stderr[-3000:]
  second = run_on_eight_devices(*common, *fsdp_tensor, f'--workdir={tmp_path / "moved"}')
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Mesh {'data': 1, 'fsdp': 4, 'tensor': 2} over 8 devices" in second.stderr
  assert 'Resuming from step 2 of 4' in second.stderr

  expected = final_losses(tmp_path / 'straight')
  got = final_losses(tmp_path / 'moved')
  for step in (3, 4):
    assert abs(got[step] - expected[step]) <= 1e-4, (step, got[step], expected[step])
