"""Sharded training on 8 simulated CPU devices: equal losses across meshes, real shardings, errors.

JAX reads the simulated device count once, before it starts, so every multi-device case runs in a
subprocess with XLA_FLAGS set.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from clamp_jax.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIGHT_DEVICES = '--xla_force_host_platform_device_count=8'


def run_python(args: list[str], *, devices: int, timeout: int = 600):
  env = dict(os.environ, PYTHONPATH=REPO)
  env['XLA_FLAGS'] = EIGHT_DEVICES if devices == 8 else ''
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def train_losses(workdir, mesh: dict[str, int], devices: int) -> dict[int, float]:
  overrides = [f'--config.mesh.{axis}={size}' for axis, size in mesh.items()]
  result = run_python(['-m', 'clamp_jax.main', '--config=configs/tiny.py',
                       '--config.train.steps=3', '--config.eval.at_end=False',
                       f'--workdir={workdir}', *overrides], devices=devices)
  assert result.returncode == 0, result.stderr[-3000:]
  return {r['step']: r['train/loss'] for r in read_metrics(str(workdir)) if 'train/loss' in r}


def test_meshes_give_equal_losses(tmp_path):
  reference = train_losses(tmp_path / 'single', {'data': 1, 'fsdp': 1, 'tensor': 1}, devices=1)
  assert sorted(reference) == [1, 2, 3]
  meshes = [
      {'data': 8, 'fsdp': 1, 'tensor': 1},
      {'data': 2, 'fsdp': 2, 'tensor': 2},
      {'data': 1, 'fsdp': 4, 'tensor': 2},
  ]
  for mesh in meshes:
    name = '_'.join(f'{axis}{size}' for axis, size in mesh.items())
    losses = train_losses(tmp_path / name, mesh, devices=8)
    for step, expected in reference.items():
      assert abs(losses[step] - expected) <= 1e-4, (mesh, step, losses[step], expected)


SHARDING_PROBE = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, '.')
    import jax
    from configs import tiny
    from clamp_jax import build, parallel, train

    config = tiny.get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
    mesh = parallel.make_mesh(config.mesh)
    model, _ = build.build_model(config)
    train.place_model(model, mesh, config)
    llm = model.text_tower.llm
    def spec(variable):
      return [list(a) if isinstance(a, tuple) else a for a in variable.get_value().sharding.spec]
    def shards(variable):
      return len({str(s.index) for s in variable.get_value().addressable_shards})
    print(json.dumps({
        'q_proj': spec(llm.layers[0].self_attn.q_proj.kernel),
        'o_proj': spec(llm.layers[0].self_attn.o_proj.kernel),
        'gate_proj': spec(llm.layers[1].mlp.gate_proj.kernel),
        'down_proj': spec(llm.layers[1].mlp.down_proj.kernel),
        'embedding': spec(llm.embed_tokens.embedding),
        'embedding_shards': shards(llm.embed_tokens.embedding),
        'gate_shards': shards(llm.layers[1].mlp.gate_proj.kernel),
        'lora_b': spec(llm.layers[0].self_attn.q_proj.lora.lora_b),
        'norm': spec(llm.norm.scale),
    }))
''')


def test_parameters_sharded_by_rules():
  result = run_python(['-c', SHARDING_PROBE], devices=8)
  assert result.returncode == 0, result.stderr[-3000:]
  specs = json.loads(result.stdout.strip().splitlines()[-1])
  assert specs['q_proj'] == ['fsdp', 'tensor']
  assert specs['o_proj'] == ['tensor', 'fsdp']
  assert specs['gate_proj'] == ['fsdp', 'tensor']
  assert specs['down_proj'] == ['tensor', 'fsdp']
  assert specs['embedding'] == ['tensor', 'fsdp']
  assert specs['embedding_shards'] == 8
  assert specs['gate_shards'] == 8
  assert specs['lora_b'] == [None, 'tensor']
  assert specs['norm'] == ['fsdp']


@pytest.mark.parametrize('overrides, message', [
    (['--config.mesh.data=3'], 'do not match the 8 devices'),
    (['--config.mesh.data=8', '--config.train.batch_size=12'],
     'batch_size=12 is not divisible by the 8 batch shards'),
    (['--config.mesh.data=1', '--config.mesh.tensor=8'],
     'num_attention_heads=4 is not divisible by config.mesh.tensor=8'),
])
def test_misfit_mesh_rejected(tmp_path, overrides, message):
  result = run_python(['-m', 'clamp_jax.main', '--config=configs/tiny.py',
                       f'--workdir={tmp_path}', *overrides], devices=8, timeout=300)
  assert result.returncode != 0
  assert message in result.stderr
  assert 'Compiling' not in result.stderr
