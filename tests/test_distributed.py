"""Two processes on one machine, joined by jax.distributed over loopback, train like one.

Each process has 4 simulated CPU devices; the mesh spans all 8 with a DCN (across-process) data
axis, and each process reads only its own share of every global batch.
"""

import os
import socket
import subprocess
import sys

import numpy as np

from clamp_jax.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ['-m', 'clamp_jax.main', '--config=configs/tiny.py', '--config.train.steps=3',
          '--config.eval.at_end=False', '--config.data.caption_table=False',
          '--config.model.lora.dropout=0.0']


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def environment(devices: int) -> dict:
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
              JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def losses(workdir) -> dict[int, float]:
  return {r['step']: r['train/loss'] for r in read_metrics(str(workdir)) if 'train/loss' in r}


def test_two_processes_match_one(tmp_path):
  single = subprocess.run([sys.executable, *COMMON, f'--workdir={tmp_path / "one"}',
                           '--config.mesh.data=1'],
                          cwd=REPO, env=environment(1), capture_output=True, text=True,
                          timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  address = f'127.0.0.1:{free_port()}'
  processes = [
      subprocess.Popen(
          [sys.executable, *COMMON, f'--workdir={tmp_path / "two"}', '--config.mesh.data=2',
           '--config.mesh.fsdp=2', '--config.mesh.dcn_data=2',
           '--config.distributed.initialize=yes',
           f'--config.distributed.coordinator_address={address}',
           '--config.distributed.num_processes=2', f'--config.distributed.process_id={index}'],
          cwd=REPO, env=environment(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True)
      for index in range(2)
  ]
  outputs = [process.communicate(timeout=600) for process in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  assert 'Process 1 of 2; 4 local of 8 devices.' in outputs[1][1]

  expected, got = losses(tmp_path / 'one'), losses(tmp_path / 'two')
  assert sorted(got) == [1, 2, 3]
  for step, value in expected.items():
    assert abs(got[step] - value) <= 1e-4, (step, got[step], value)


def test_digit_processes_split_each_global_batch():
  from clamp_jax import train
  from configs import tiny
  from clamp_jax.weights import load_tokenizer, resolve_checkpoint
  from clamp_jax.data.train_data import make_train_dataset

  config = tiny.get_config()
  config.data.caption_table = False
  tokenizer = load_tokenizer(resolve_checkpoint('smollm2'))
  captions = train.make_caption_tokenizer(config, tokenizer)
  whole = iter(make_train_dataset(config, captions, process_index=0, process_count=1))
  parts = [iter(make_train_dataset(config, captions, process_index=i, process_count=2))
           for i in range(2)]
  for _ in range(3):
    batch = next(whole)
    shares = [next(part) for part in parts]
    assert all(len(share['image']) == len(batch['image']) // 2 for share in shares)
    joined = np.concatenate([share['image'] for share in shares])
    # The same examples, each process holding its own half of the global batch.
    assert sorted(map(bytes, joined)) == sorted(map(bytes, batch['image']))
    assert not set(map(bytes, shares[0]['image'])) & set(map(bytes, shares[1]['image']))
