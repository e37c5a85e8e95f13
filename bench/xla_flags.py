"""Check which XLA:CPU flags of this jaxlib change the speed of float32 and bfloat16 matmuls.

Each flag set runs `bench/jax_matmul.py` in a new process with XLA_FLAGS set, because XLA reads the
variable once, when the backend starts. The table shows whether the process started (an unknown
flag aborts it), whether XLA computes a bfloat16 dot in float32, the library fusions it used, and
the `jnp.dot` rates. `--with_step` also runs `bench/step.py` under each flag set that started.

    python bench/xla_flags.py
    python bench/xla_flags.py --with_step --step_args='--batch_size=16 --steps=5 --warmup=1'
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

import common

BENCH = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(BENCH)

# Flag names come from the strings of jaxlib 0.10.2's libjax_common.so. A flag that a later jaxlib
# drops makes its row fail to start.
FLAG_SETS = (
    ('default', ''),
    ('onednn', '--xla_cpu_use_onednn=true'),
    ('onednn custom call', '--xla_cpu_use_onednn=true '
                           '--xla_cpu_experimental_onednn_custom_call=true'),
    ('onednn dot fusion', '--xla_cpu_use_onednn=true '
                          '--xla_cpu_experimental_onednn_fusion_type=dot'),
    ('xnnpack', '--xla_cpu_use_xnnpack=true'),
    ('xnn dot fusion', '--xla_cpu_experimental_xnn_fusion_type=dot'),
    ('xnn greedy graph fusion',
     '--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY'),
    ('ynn dot fusion (replaces the default list)', '--xla_cpu_experimental_ynn_fusion_type=dot'),
    ('no ynn individual dot', '--xla_cpu_experimental_ynn_fusion_type=-individual_dot'),
    ('fast math', '--xla_cpu_enable_fast_math=true'),
    ('max ISA AMX', '--xla_cpu_max_isa=AMX'),
    ('thunk runtime off (deprecated)', '--xla_cpu_use_thunk_runtime=false'),
)

COLUMNS = [
    ('name', 'flag set', 's'),
    ('flags', 'XLA_FLAGS', 's'),
    ('started', 'starts', 's'),
    ('upcast', 'bf16 dot in f32', 's'),
    ('fusions', 'library fusions', 's'),
    ('float32_gflops', 'f32 GFLOP/s', '.1f'),
    ('bfloat16_gflops', 'bf16 GFLOP/s', '.1f'),
    ('bfloat16_error', 'bf16 max rel. error', '.1e'),
    ('step_samples_per_second', 'step samples/s', '.2f'),
]


def last_line(text: str) -> str:
  lines = text.strip().splitlines()
  return lines[-1] if lines else 'no output'


def run_matmul(flags: str, size: int, repeats: int) -> dict:
  """Run the matmul test under `flags` and return a table row."""
  environment = {**os.environ, 'XLA_FLAGS': flags}
  command = [sys.executable, os.path.join(BENCH, 'jax_matmul.py'), f'--size={size}',
             f'--repeats={repeats}']
  completed = subprocess.run(command, env=environment, capture_output=True, text=True,
                             check=False)
  lines = [line for line in completed.stdout.splitlines() if line.startswith('{')]
  if completed.returncode != 0 or not lines:
    return {'started': f'no: {last_line(completed.stderr)[-120:]}'}
  result = json.loads(lines[-1])
  rates, dot = result['rates'], result['bfloat16_dot']
  return {
      'started': 'yes',
      'upcast': 'yes' if dot['upcast_to_float32'] else 'no',
      'fusions': ' '.join(dot['fusion_kinds']) or 'none',
      'float32_gflops': rates['float32']['gflops'],
      'bfloat16_gflops': rates['bfloat16']['gflops'],
      'bfloat16_error': rates['bfloat16']['max_relative_error'],
  }


def run_step(flags: str, step_args: list[str], json_path: str) -> float | None:
  """Run `bench/step.py` under `flags` and return its samples/s, or None if it failed."""
  environment = {**os.environ, 'XLA_FLAGS': flags}
  command = [sys.executable, os.path.join(BENCH, 'step.py'), *step_args,
             f'--json_out={json_path}']
  completed = subprocess.run(command, env=environment, cwd=REPOSITORY, capture_output=True,
                             text=True, check=False)
  if completed.returncode != 0 or not os.path.isfile(json_path):
    print(f'step.py failed under XLA_FLAGS={flags!r}: {last_line(completed.stderr)}',
          file=sys.stderr)
    return None
  with open(json_path) as f:
    return json.load(f)['points'][0]['samples_per_second']


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=2048, help='Matrix side of the matmul test.')
  parser.add_argument('--repeats', type=int, default=7, help='Timed matmuls per dtype.')
  parser.add_argument('--with_step', action='store_true',
                      help='Also time bench/step.py under each flag set that starts.')
  parser.add_argument('--step_args', default='--dtype=bfloat16 --steps=5 --warmup=1',
                      help='Arguments of bench/step.py for --with_step, as one shell-quoted '
                           'string.')
  parser.add_argument('--out_dir', default='/tmp',
                      help='Folder for the JSON results of step.py under --with_step.')
  args = parser.parse_args()

  rows = []
  for index, (name, flags) in enumerate(FLAG_SETS):
    print(f'{name}: XLA_FLAGS={flags!r}', file=sys.stderr, flush=True)
    row = {'name': name, 'flags': flags or '(none)', **run_matmul(flags, args.size, args.repeats)}
    if args.with_step and row['started'] == 'yes':
      json_path = os.path.join(args.out_dir, f'xla_flags_step_{index}.json')
      row['step_samples_per_second'] = run_step(flags, shlex.split(args.step_args), json_path)
    rows.append(row)
  print(common.format_table(rows, COLUMNS))
  print(json.dumps({'size': args.size, 'repeats': args.repeats, 'rows': rows}))


if __name__ == '__main__':
  main()
