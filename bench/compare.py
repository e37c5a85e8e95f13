"""Compare our CLAMP training step with the PyTorch reference on this machine, or sweep our step.

Each measurement runs in its own process, one after the other: first `bench/step.py` (JAX) at each
of `--ours_dtypes` and `--ours_cpu_devices`, then `bench/reference_torch.py` at each of
`--reference_precisions`. Every child gets the same batch size, caption length, step counts and `--config.*` overrides, and the
children's own tables stream through. The summary prints our samples/s, the reference's samples/s
at float32 and at its fastest precision, and the lines

    ratio_float32: X          (our fastest float32 run / the reference at float32)
    ratio_bfloat16: X         (our fastest bfloat16 run / the reference's fastest bf16 mode)
    ratio_same_precision: X   (the larger of those two)
    ratio_fastest: X          (our fastest run / the reference's fastest)

followed by one JSON line. `--sweep` times our step at several batch sizes and caption lengths
instead (one process, one loaded model), and `--sweep_reference=PRECISION` adds the reference's
sweep and per-point ratios.

    python bench/compare.py --batch_size=64 --caption_length=32
    python bench/compare.py --sweep
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common

BENCH = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(BENCH)
# With this tunable, glibc 2.35 and later requests transparent huge pages for the large blocks it
# maps. XLA:CPU allocates a step's temporaries afresh each step, and with 4 KiB pages the kernel
# faults in and zeroes each page again: about 950,000 faults per step of the default config.
HUGEPAGE_TUNABLE = 'glibc.malloc.hugetlb=1'
# Install paths of gperftools' tcmalloc: Debian's and Ubuntu's libtcmalloc-minimal4 (x86-64,
# then 64-bit ARM) and Fedora's gperftools-libs. It keeps freed memory for reuse, so a
# step's temporaries are not mapped and zeroed by the kernel each step.
TCMALLOC_PATHS = ('/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4',
                  '/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4',
                  '/usr/lib64/libtcmalloc_minimal.so.4')

SUMMARY_COLUMNS = [
    ('implementation', 'implementation', 's'),
    ('precision', 'precision', 's'),
    ('matmul', 'matmul', 's'),
    ('attention', 'attention', 's'),
    ('llm_weights', 'LLM weights', 's'),
    ('device_count', 'devices', 'd'),
    ('batch_size', 'batch', 'd'),
    ('caption_length', 'caption tokens', 'd'),
    ('samples_per_second', 'samples/s', '.2f'),
    ('step_seconds_median', 'step s (median)', '.3f'),
    ('tokens_per_second', 'tokens/s', '.0f'),
    ('flops_per_step', 'FLOPs per step', '.3e'),
    ('mfu', 'MFU', '.3f'),
    ('peak_gflops', 'matmul peak GFLOP/s', '.1f'),
    ('compile_seconds', 'compile s', '.1f'),
    ('peak_rss_gib', 'peak RSS GiB', '.2f'),
    ('process_seconds', 'process s', '.0f'),
]


def parse_args() -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      epilog='Other arguments of the form --config.FIELD=VALUE (and --config=FILE) go to every '
             'child unchanged.')
  parser.add_argument('--batch_size', type=int, default=0,
                      help='Image-caption pairs per step; 0: config.train.batch_size.')
  parser.add_argument('--caption_length', type=int, default=0,
                      help='Tokens per caption, padding included; 0: config.data.max_length.')
  parser.add_argument('--steps', type=int, default=10, help='Timed steps per measurement.')
  parser.add_argument('--warmup', type=int, default=2, help='Untimed steps before timing.')
  parser.add_argument('--matmul_size', type=int, default=2048,
                      help='Side of the square matrices of the matmul rate tests.')

  parser.add_argument('--ours_dtypes', default='float32,bfloat16',
                      help='Comma-separated compute dtypes of our step.')
  parser.add_argument('--ours_matmul', default='xla',
                      help="Comma-separated matmul backends of our step (config.model.matmul: "
                           'xla, onednn); onednn also sets config.model.attention=onednn. Each '
                           'dtype runs with each; onednn needs the cpu-bf16 extra.')
  parser.add_argument('--ours_llm_weights', default='config', choices=['config', 'compute'],
                      help="Storage dtype of the frozen LLM's weights in our step, the sweep's "
                           "too (bench/step.py --llm_weights): 'config' keeps "
                           "model.llm_param_dtype, 'compute' stores them in each run's compute "
                           'dtype.')
  parser.add_argument('--ours_cpu_devices', default='0',
                      help='Comma-separated CPU device counts of our step (bench/step.py '
                           "--cpu_devices); 0: the devices JAX finds, 'cores': one device per "
                           'CPU this process may use. Each dtype runs at each count.')
  parser.add_argument('--reference_precisions', default='float32,bf16-autocast,bf16',
                      help='Comma-separated precisions of the reference (float32, '
                           'bf16-autocast, bf16).')
  parser.add_argument('--reference_threads', type=int, default=0,
                      help='torch.set_num_threads of the reference; 0: every CPU it may use.')

  parser.add_argument('--sweep', action='store_true',
                      help='Time our step at --sweep_batch_sizes and --sweep_caption_lengths '
                           'instead of comparing.')
  parser.add_argument('--sweep_batch_sizes', default='8,16,32,64',
                      help='Batch sizes of the sweep, at --caption_length.')
  parser.add_argument('--sweep_caption_lengths', default='16,32,64',
                      help='Caption lengths of the sweep, at --batch_size.')
  parser.add_argument('--sweep_dtype', default='float32', choices=['float32', 'bfloat16'],
                      help='Compute dtype of our step in the sweep.')
  parser.add_argument('--sweep_cpu_devices', default='0',
                      help="CPU device count of our step in the sweep, or 'cores'; 0: the "
                           'devices JAX finds.')
  parser.add_argument('--sweep_reference', default='',
                      choices=['', 'float32', 'bf16-autocast', 'bf16'],
                      help='Also sweep the reference at this precision; empty: do not.')

  parser.add_argument('--malloc_hugepages', default='on', choices=['on', 'off'],
                      help="'on': run every child with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so "
                           'glibc backs large allocations with transparent huge pages (see '
                           'bench/RESULTS.md); off: leave the environment as it is.')

  parser.add_argument('--preload', default='',
                      help="Shared library to preload (LD_PRELOAD) into every child, ours and the "
                           "reference alike; 'tcmalloc' stands for the first of "
                           f'{", ".join(TCMALLOC_PATHS)} that exists. Empty: none.')

  parser.add_argument('--out_dir', default='',
                      help='Folder for each child\'s JSON result; empty: a new temporary folder.')

  args, passthrough = parser.parse_known_args()
  unexpected = [arg for arg in passthrough if not arg.startswith('--config')]
  if unexpected:
    parser.error(f'unrecognized arguments: {" ".join(unexpected)}')
  common.check_step_counts(args.steps, args.warmup)
  install_hint = ('install it (Debian or Ubuntu: sudo apt-get install libtcmalloc-minimal4; '
                  'Fedora: sudo dnf install gperftools-libs) or pass its path')
  if args.preload == 'tcmalloc':
    found = [path for path in TCMALLOC_PATHS if os.path.isfile(path)]
    if not found:
      parser.error(f'--preload=tcmalloc: libtcmalloc_minimal.so.4 not found in '
                   f'{", ".join(TCMALLOC_PATHS)}. To fix, {install_hint}.')
    args.preload = found[0]
  elif args.preload and not os.path.isfile(args.preload):
    parser.error(f'--preload={args.preload}: file not found. For tcmalloc, {install_hint}.')
  return args, passthrough


def cpu_device_counts(text: str) -> list[int]:
  """Parse a comma-separated list of CPU device counts, where 'cores' is the CPUs' count."""
  counts = []
  for part in text.split(','):
    count = len(os.sched_getaffinity(0)) if part == 'cores' else None
    if count is None:
      try:
        count = int(part)
      except ValueError:
        sys.exit(f"error: --ours_cpu_devices={text!r}: {part!r} is not a count or 'cores'.")
    if count < 0:
      sys.exit(f'error: --ours_cpu_devices={text!r} has a negative count.')
    if count not in counts:
      counts.append(count)
  return counts


def backend_flags(matmul: str) -> list[str]:
  """Config overrides of one `--ours_matmul` value: 'onednn' also runs the attention's products
  through oneDNN."""
  flags = [f'--config.model.matmul={matmul}']
  if matmul == 'onednn':
    flags.append('--config.model.attention=onednn')
  return flags


def common_flags(args: argparse.Namespace, passthrough: list[str]) -> list[str]:
  flags = [f'--steps={args.steps}', f'--warmup={args.warmup}',
           f'--matmul_size={args.matmul_size}']
  if args.batch_size:
    flags.append(f'--batch_size={args.batch_size}')
  if args.caption_length:
    flags.append(f'--caption_length={args.caption_length}')
  return flags + passthrough


def child_environment(args: argparse.Namespace) -> dict[str, str]:
  env = dict(os.environ)
  if args.malloc_hugepages == 'on':
    tunables = [part for part in env.get('GLIBC_TUNABLES', '').split(':') if part]
    env['GLIBC_TUNABLES'] = ':'.join([*tunables, HUGEPAGE_TUNABLE])
  if args.preload:
    env['LD_PRELOAD'] = ':'.join(
        part for part in (args.preload, env.get('LD_PRELOAD', '')) if part)
  return env


def preload_note(args: argparse.Namespace) -> str:
  """Return the summary title's mention of `--preload`, empty without one."""
  return f', every process with LD_PRELOAD={args.preload}' if args.preload else ''


def run_child(script: str, flags: list[str], json_path: str,
              env: dict[str, str]) -> dict | None:
  """Run one benchmark script to completion and return its JSON result, or None if it failed."""
  command = [sys.executable, os.path.join(BENCH, script), *flags, f'--json_out={json_path}']
  env_prefix = ''.join(f'{name}={env[name]} ' for name in ('LD_PRELOAD', 'GLIBC_TUNABLES')
                       if env.get(name))
  print(f'\n$ {env_prefix}{" ".join(command)}', flush=True)
  start = time.perf_counter()
  completed = subprocess.run(command, cwd=REPOSITORY, env=env, check=False)
  elapsed = time.perf_counter() - start
  if completed.returncode != 0 or not os.path.isfile(json_path):
    print(f'{script} failed with exit status {completed.returncode} after {elapsed:.0f} s.',
          file=sys.stderr, flush=True)
    return None
  print(f'({script} took {elapsed:.0f} s)', flush=True)
  with open(json_path) as f:
    result = json.load(f)
  result['wall_seconds'] = elapsed
  return result


def summary_row(result: dict, point: dict) -> dict:
  ours = result['framework'] == 'jax'
  return {'implementation': 'ours (JAX)' if ours else 'reference (PyTorch)',
          'precision': result['dtype'] if ours else result['precision'],
          'matmul': result.get('matmul_backend', 'xla') if ours else 'torch',
          'attention': result.get('attention', 'einsum') if ours else 'torch',
          'llm_weights': (result.get('llm_param_dtype', '-') if ours
                          else 'bfloat16' if result['precision'] == 'bf16' else 'float32'),
          'device_count': result.get('device_count'),
          'peak_gflops': result['peak_gflops'], 'process_seconds': result['wall_seconds'],
          **point}


def fastest(rows: list[dict]) -> dict | None:
  return max(rows, key=lambda row: row['samples_per_second']) if rows else None


def show_rate(row: dict | None) -> str:
  if row is None:
    return 'n/a'
  return f'{row["samples_per_second"]:.3f} ({row["precision"]})'


def show_ratio(ratio: float | None) -> str:
  return 'n/a' if ratio is None else f'{ratio:.3f}'


def samples_ratio(numerator: dict | None, denominator: dict | None) -> float | None:
  if numerator is None or denominator is None:
    return None
  return numerator['samples_per_second'] / denominator['samples_per_second']


def compare(args: argparse.Namespace, passthrough: list[str], out_dir: str) -> int:
  flags = common_flags(args, passthrough)
  runs = [('step.py', [*flags, f'--dtype={dtype}', f'--cpu_devices={devices}',
                       *backend_flags(matmul), f'--llm_weights={args.ours_llm_weights}'],
           f'ours {dtype} with {matmul} matmuls on {devices or "default"} devices',
           f'ours_{dtype}_{matmul}_{devices}.json')
          for devices in cpu_device_counts(args.ours_cpu_devices)
          for matmul in args.ours_matmul.split(',')
          for dtype in args.ours_dtypes.split(',')]
  reference_flags = [*flags, f'--threads={args.reference_threads}']
  runs += [('reference_torch.py', [*reference_flags, f'--precision={precision}'],
            f'reference {precision}', f'reference_{precision}.json')
           for precision in args.reference_precisions.split(',')]
  results, failed = [], []
  for script, script_flags, name, json_name in runs:
    result = run_child(script, script_flags, os.path.join(out_dir, json_name),
                       child_environment(args))
    if result is None:
      failed.append(name)
    else:
      results.append(result)

  rows = [summary_row(result, result['points'][0]) for result in results]
  ours = [row for row in rows if row['implementation'].startswith('ours')]
  reference = [row for row in rows if row['implementation'].startswith('reference')]
  ours_float32 = fastest([row for row in ours if row['precision'] == 'float32'])
  reference_float32 = next((row for row in reference if row['precision'] == 'float32'), None)
  ours_bfloat16 = fastest([row for row in ours if row['precision'] == 'bfloat16'])
  reference_bfloat16 = fastest([row for row in reference if row['precision'].startswith('bf16')])
  ours_fastest, reference_fastest = fastest(ours), fastest(reference)
  ratio_float32 = samples_ratio(ours_float32, reference_float32)
  ratio_bfloat16 = samples_ratio(ours_bfloat16, reference_bfloat16)
  known = [ratio for ratio in (ratio_float32, ratio_bfloat16) if ratio is not None]
  ratio_same = max(known) if known else None
  ratio_fastest = samples_ratio(ours_fastest, reference_fastest)

  print('\nCLAMP training step, ours against the PyTorch reference, on '
        f'{len(os.sched_getaffinity(0))} CPUs{preload_note(args)}')
  print(common.format_table(rows, SUMMARY_COLUMNS))
  print()
  print(f'ours_samples_per_second_float32: {show_rate(ours_float32)}')
  print(f'ours_samples_per_second_bfloat16: {show_rate(ours_bfloat16)}')
  print(f'ours_fastest_samples_per_second: {show_rate(ours_fastest)}')
  print(f'reference_samples_per_second_float32: {show_rate(reference_float32)}')
  print(f'reference_samples_per_second_bfloat16: {show_rate(reference_bfloat16)}')
  print(f'reference_samples_per_second_fastest: {show_rate(reference_fastest)}')
  print(f'ratio_float32: {show_ratio(ratio_float32)}')
  print(f'ratio_bfloat16: {show_ratio(ratio_bfloat16)}')
  print(f'ratio_same_precision: {show_ratio(ratio_same)}')
  print(f'ratio_fastest: {show_ratio(ratio_fastest)}')
  if failed:
    print(f'failed: {", ".join(failed)}', file=sys.stderr)
  print(json.dumps({'mode': 'compare', 'rows': rows, 'ratio_float32': ratio_float32,
                    'ratio_bfloat16': ratio_bfloat16, 'ratio_same_precision': ratio_same,
                    'ratio_fastest': ratio_fastest, 'failed': failed, 'out_dir': out_dir}))
  return 1 if failed else 0


def sweep(args: argparse.Namespace, passthrough: list[str], out_dir: str) -> int:
  flags = [*common_flags(args, passthrough), f'--sweep_batch_sizes={args.sweep_batch_sizes}',
           f'--sweep_caption_lengths={args.sweep_caption_lengths}']
  env = child_environment(args)
  counts = cpu_device_counts(args.sweep_cpu_devices)
  if len(counts) != 1:
    sys.exit(f'error: --sweep_cpu_devices={args.sweep_cpu_devices!r} must be one count.')
  devices = counts[0]
  ours = run_child('step.py', [*flags, f'--dtype={args.sweep_dtype}', f'--cpu_devices={devices}',
                               f'--llm_weights={args.ours_llm_weights}'],
                   os.path.join(out_dir, f'sweep_ours_{args.sweep_dtype}.json'), env)

  reference = None
  if args.sweep_reference:
    reference = run_child('reference_torch.py',
                          [*flags, f'--threads={args.reference_threads}',
                           f'--precision={args.sweep_reference}'],
                          os.path.join(out_dir, f'sweep_reference_{args.sweep_reference}.json'),
                          env)
  if ours is None:
    return 1

  rows = [summary_row(ours, point) for point in ours['points']]
  if reference is not None:
    reference_rate = {(p['batch_size'], p['caption_length']): p['samples_per_second']
                      for p in reference['points']}
    for row in rows:
      rate = reference_rate.get((row['batch_size'], row['caption_length']))
      row['reference_samples_per_second'] = rate
      row['ratio'] = row['samples_per_second'] / rate if rate else None
  # One process times every point, so its wall time is not a per-point measure.
  columns = [column for column in SUMMARY_COLUMNS[1:] if column[0] != 'process_seconds']
  if reference is not None:
    columns = columns + [('reference_samples_per_second',
                          f'reference samples/s ({args.sweep_reference})', '.2f'),
                         ('ratio', 'ratio', '.3f')]

  print('\nOur CLAMP step against batch size and caption length '
        f'({args.sweep_dtype} compute){preload_note(args)}')
  print(common.format_table(rows, columns))
  print(json.dumps({'mode': 'sweep', 'rows': rows, 'out_dir': out_dir,
                    'reference_failed': bool(args.sweep_reference) and reference is None}))
  return 1 if args.sweep_reference and reference is None else 0


def main() -> None:
  args, passthrough = parse_args()
  out_dir = args.out_dir or tempfile.mkdtemp(prefix='clamp_bench_')
  os.makedirs(out_dir, exist_ok=True)
  sys.exit(sweep(args, passthrough, out_dir) if args.sweep else compare(args, passthrough,
                                                                            out_dir))


if __name__ == '__main__':
  main()
