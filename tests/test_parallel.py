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


def train_losses(workdir, mesh: dict[str, int], devices: int,
                 extra: tuple[str, ...] = ()) -> dict[int, float]:
  overrides = [f'--config.mesh.{axis}={size}' for axis, size in mesh.items()] + list(extra)
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


def test_sharded_loss_microbatches_and_scan_match_single_device(tmp_path):
  """One caption per image: the shard_map losses, micro-batches, scanned and rematerialised layers
  on 8 devices give the single-device losses."""
  common = ['--config.data.caption_table=False', '--config.model.lora.dropout=0.0']

  def losses(name, mesh, devices, *extra):
    overrides = [f'--config.mesh.{axis}={size}' for axis, size in mesh.items()]
    result = run_python(['-m', 'clamp_jax.main', '--config=configs/tiny.py',
                         '--config.train.steps=3', '--config.eval.at_end=False',
                         f'--workdir={tmp_path / name}', *common, *overrides, *extra],
                        devices=devices)
    assert result.returncode == 0, result.stderr[-3000:]
    return {r['step']: r['train/loss'] for r in read_metrics(str(tmp_path / name))
            if 'train/loss' in r}

  single = {'data': 1, 'fsdp': 1, 'tensor': 1}
  reference = losses('softmax_1', single, 1)
  sigmoid = ['--config.train.loss=sigmoid', '--config.model.init_logit_scale=10.0']
  sigmoid_reference = losses('sigmoid_1', single, 1, *sigmoid)
  runs = [
      (reference, 'softmax_data8', {'data': 8, 'fsdp': 1, 'tensor': 1}, []),
      (reference, 'softmax_fsdp4_tensor2', {'data': 1, 'fsdp': 4, 'tensor': 2},
       ['--config.train.microbatches=2', '--config.model.scan_layers=True',
        '--config.model.remat=full']),
      (sigmoid_reference, 'sigmoid_mixed', {'data': 2, 'fsdp': 2, 'tensor': 2}, sigmoid),
  ]
  for expected, name, mesh, extra in runs:
    got = losses(name, mesh, 8, *extra)
    assert sorted(got) == [1, 2, 3]
    for step, value in expected.items():
      assert abs(got[step] - value) <= 1e-4, (name, step, got[step], value)


HYBRID_PROBE = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, '.')
    import jax, ml_collections
    from clamp_jax import parallel
    config = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=1, dcn_data=2, dcn_fsdp=1,
                                            dcn_tensor=1))
    mesh = parallel.make_mesh(config)
    print(json.dumps({'shape': dict(mesh.shape),
                      'ids': [[d.id for d in row] for row in mesh.devices[:, :, 0]]}))
''')


def test_hybrid_mesh_is_slice_major():
  result = run_python(['-c', HYBRID_PROBE], devices=8)
  assert result.returncode == 0, result.stderr[-3000:]
  probe = json.loads(result.stdout.strip().splitlines()[-1])
  assert probe['shape'] == {'data': 4, 'fsdp': 2, 'tensor': 1}
  # Slice 0 holds devices 0-3 and fills data rows 0-1; slice 1 holds 4-7 in rows 2-3, so only
  # the data axis crosses slices.
  assert probe['ids'] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_plan_mode_writes_numbers_and_verdict(tmp_path):
  args = ['-m', 'clamp_jax.main', '--config=configs/tiny.py', '--config.mode=plan',
          '--config.plan.devices=8', '--config.mesh.data=1', '--config.mesh.fsdp=4',
          '--config.mesh.tensor=2', '--config.data.caption_table=False']
  # Plan mode sets the simulated device count itself, so it runs without XLA_FLAGS.
  result = run_python([*args, f'--workdir={tmp_path / "fits"}'], devices=1)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == 'plan: fits'
  with open(tmp_path / 'fits' / 'plan.json') as f:
    plan = json.load(f)
  assert plan['devices'] == 8 and plan['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 2}
  for key in ('peak_bytes_per_device', 'param_bytes_per_device', 'optimizer_bytes_per_device',
              'flops_per_step'):
    assert plan[key] > 0, key
  # Parameters are split 8 ways where the rules allow, so one device holds far less than all.
  all_param_bytes = plan['parameters'] * 4
  assert all_param_bytes / 8 <= plan['param_bytes_per_device'] < all_param_bytes / 4
  assert plan['peak_bytes_per_device'] >= plan['param_bytes_per_device']

  tight = run_python([*args, f'--workdir={tmp_path / "tight"}',
                      '--config.plan.device_memory_gib=0.0001'], devices=1)
  assert tight.returncode == 0, tight.stderr[-3000:]
  assert tight.stdout.strip().splitlines()[-1] == 'plan: does not fit'


def test_plan_mode_rejects_misfit_heads_before_compiling(tmp_path):
  result = run_python(['-m', 'clamp_jax.main', '--config=configs/tiny.py', '--config.mode=plan',
                       '--config.plan.devices=8', '--config.mesh.data=1',
                       '--config.mesh.tensor=8', f'--workdir={tmp_path}'], devices=1)
  assert result.returncode != 0
  assert 'num_attention_heads=4 is not divisible by config.mesh.tensor=8' in result.stderr
  assert not (tmp_path / 'plan.json').exists()
