"""Profile one training step: where the time goes, page faults, and how busy the cores are.

Builds the step as `bench/step.py` does, times `--steps` steps with the page faults and the user
and system CPU seconds of each, then traces one more step with `jax.profiler` (a Perfetto trace,
saved with the compiled HLO text) and prints:

- the operations with the most time summed over threads, each described by its output shape
  and, for a dot, its operand shapes, so the forward and backward forms of a matmul show apart;
- the wall time of the traced step split by what ran: nothing, only other operations, or dots;
- the operations that ran alone (one core idle) the longest.

    python bench/profile_step.py --batch_size=32 --caption_length=32 --steps=3
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/profile_step.py --batch_size=32 --steps=3

It takes `bench/step.py`'s flags (`--config`, `--config.*`, `--batch_size`, `--caption_length`,
`--dtype`, `--llm_weights`, `--steps`, `--cpu_devices`) plus `--top` and `--trace_dir`.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time

from absl import app, flags

import common
import step as step_bench

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TOP = flags.DEFINE_integer('top', 25, 'Rows of each table.')
_TRACE_DIR = flags.DEFINE_string('trace_dir', '',
                                 'Folder for the trace; empty: a new temporary folder.')

# Trace events that are bookkeeping of the runtime, not operations of the program.
RUNTIME_EVENTS = ('end:', 'Thunk', 'Threadpool', 'Pjit', 'Common', 'Slinky', 'ParseArguments')


def operation_descriptions(hlo_text: str) -> dict[str, str]:
  """Map each fusion instruction's name to its output shape and, for dots, the operand shapes."""
  bodies = {match.group(1): match.group(2)
            for match in re.finditer(r'^%?([\w.\-]+) .*?\{\n(.*?)\n\}', hlo_text, re.M | re.S)}
  descriptions = {}
  for match in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) fusion\(.*?calls=%?([\w.\-]+)',
                           hlo_text, re.M):
    name, shape, body = match.group(1), match.group(2), bodies.get(match.group(3), '')
    dots = re.findall(r'= (\S+) dot\((.*?)\), lhs_contracting_dims=\{(.*?)\}, '
                      r'rhs_contracting_dims=\{(.*?)\}', body)
    if dots:
      shapes = dict(re.findall(r'%?([\w.\-]+) = (\S+) (?:parameter|bitcast|transpose|copy)\(',
                               body))
      parts = []
      for out, operands, lhs, rhs in dots:
        names = [operand.strip().lstrip('%') for operand in operands.split(',')]
        parts.append(f'{out} = {" x ".join(shapes.get(n, n) for n in names)} '
                     f'(contracting {lhs}/{rhs})')
      descriptions[name] = 'dot ' + '; '.join(parts)
    else:
      kinds = collections.Counter(re.findall(r'= \S+ ([a-z\-]+)\(', body))
      # A dot with batch dimensions (attention) lists them before its contracting ones.
      prefix = 'dot (batched) ' if 'dot' in kinds else ''
      descriptions[name] = (f'{prefix}{shape} '
                            f'{",".join(kind for kind, _ in kinds.most_common(5))}')
  return descriptions


def read_trace(trace_dir: str) -> list[dict]:
  paths = glob.glob(os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'), recursive=True)
  if not paths:
    raise FileNotFoundError(f'No Perfetto trace under {trace_dir}.')
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  return [event for event in events
          if event.get('ph') == 'X' and not event['name'].startswith('$')
          and not event['name'].startswith(RUNTIME_EVENTS)]


def describe(name: str, descriptions: dict[str, str]) -> str:
  return descriptions.get(name, re.sub(r'\.\d+$', '', name))


def summed_times(events: list[dict], descriptions: dict[str, str]) -> list[dict]:
  total, count = collections.Counter(), collections.Counter()
  for event in events:
    key = describe(event['name'], descriptions)
    total[key] += event['dur']
    count[key] += 1
  return [{'ms': micros / 1e3, 'count': count[key], 'mean_ms': micros / 1e3 / count[key],
           'operation': key[:150]} for key, micros in total.most_common()]


def occupancy(events: list[dict], descriptions: dict[str, str]) -> tuple[list[dict], list[dict]]:
  """Split the traced span by how many dots and other operations ran, and sum the time each
  non-dot operation ran alone."""
  is_dot = [describe(event['name'], descriptions).startswith('dot') for event in events]
  edges = sorted([(event['ts'], 1, i) for i, event in enumerate(events)]
                 + [(event['ts'] + event['dur'], -1, i) for i, event in enumerate(events)])
  states, alone = collections.Counter(), collections.Counter()
  active: set[int] = set()
  last = edges[0][0]
  for time_point, change, index in edges:
    dots = sum(is_dot[i] for i in active)
    states[(min(dots, 2), min(len(active) - dots, 2))] += time_point - last
    if len(active) == 1:
      (only,) = active
      if not is_dot[only]:
        alone[describe(events[only]['name'], descriptions)] += time_point - last
    last = time_point
    if change > 0:
      active.add(index)
    else:
      active.discard(index)
  state_rows = [{'dots': dots, 'others': others, 'ms': micros / 1e3}
                for (dots, others), micros in sorted(states.items())]
  alone_rows = [{'ms': micros / 1e3, 'operation': key[:150]}
                for key, micros in alone.most_common()]
  return state_rows, alone_rows


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if step_bench._CPU_DEVICES.value:  # pylint: disable=protected-access
    from clamp_jax.distributed import simulate_cpu_devices

    simulate_cpu_devices(step_bench._CPU_DEVICES.value)  # pylint: disable=protected-access
  import jax

  # pylint: disable=protected-access
  dtype, steps = step_bench._DTYPE.value, step_bench._STEPS.value
  config = step_bench.benchmark_config(step_bench._CONFIG.value, dtype,
                                       step_bench._LLM_WEIGHTS.value)
  batch_size = step_bench._BATCH_SIZE.value or config.train.batch_size
  caption_length = step_bench._CAPTION_LENGTH.value or config.data.max_length
  # pylint: enable=protected-access
  config = step_bench.point_config(config, batch_size, caption_length)
  mesh, model, trainable, optimizer = step_bench.build_training_state(config)
  print('compiling ...', file=sys.stderr, flush=True)
  prepared = step_bench.compile_point(config, mesh, model, trainable, optimizer)
  descriptions = operation_descriptions(prepared.compiled.as_text())
  run_step = prepared.run_step

  run_step()
  seconds, faults, user_seconds, system_seconds = [], [], [], []
  for _ in range(steps):
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    run_step()
    seconds.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults.append(after.ru_minflt - before.ru_minflt)
    user_seconds.append(after.ru_utime - before.ru_utime)
    system_seconds.append(after.ru_stime - before.ru_stime)

  trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix='clamp_profile_')
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    run_step()
  with open(os.path.join(trace_dir, 'step.hlo.txt'), 'w', encoding='utf-8') as f:
    f.write(prepared.compiled.as_text())
  events = read_trace(trace_dir)
  span_ms = (max(e['ts'] + e['dur'] for e in events) - min(e['ts'] for e in events)) / 1e3
  state_rows, alone_rows = occupancy(events, descriptions)

  print(f'batch {batch_size}, caption length {caption_length}, {dtype}, '
        f'{jax.device_count()} device(s); '
        f'GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r}, '
        f'LD_PRELOAD={os.environ.get("LD_PRELOAD", "")!r}')
  print(f'step seconds: {", ".join(f"{s:.3f}" for s in seconds)} '
        f'(median {statistics.median(seconds):.3f})')
  print(f'minor page faults per step: {", ".join(str(f) for f in faults)}')
  print(f'CPU seconds per step, user: {", ".join(f"{s:.2f}" for s in user_seconds)}; '
        f'system: {", ".join(f"{s:.2f}" for s in system_seconds)}')
  print(f'traced step: {span_ms:.0f} ms from the first operation to the last; trace and the '
        f'compiled HLO (step.hlo.txt) in {trace_dir}\n')
  print('Time summed over threads, by operation')
  print(common.format_table(summed_times(events, descriptions)[:_TOP.value],
                            [('ms', 'ms', '.1f'), ('count', 'count', 'd'),
                             ('mean_ms', 'mean ms', '.2f'), ('operation', 'operation', 's')]))
  print('\nWall time of the traced step by what ran (2 means 2 or more)')
  print(common.format_table(state_rows, [('dots', 'dots', 'd'), ('others', 'other operations', 'd'),
                                         ('ms', 'ms', '.0f')]))
  print('\nOperations other than dots that ran alone')
  print(common.format_table(alone_rows[:_TOP.value], [('ms', 'ms', '.1f'),
                                                      ('operation', 'operation', 's')]))


if __name__ == '__main__':
  app.run(main)
