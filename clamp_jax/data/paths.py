"""File patterns for data sources: brace ranges, comma lists and globs, and per-process shares.

`expand_pattern('/data/laion/{00000..01066}.tar')` gives the 1067 names from 00000.tar to
01066.tar. A numeric range keeps the zero padding of its endpoints, `{a,b}` lists alternatives,
and a name that still contains `*`, `?` or `[` after brace expansion is matched with `glob`.
Only local paths are supported.
"""

from __future__ import annotations

import glob
import os
import re

_RANGE = re.compile(r'^(-?\d+)\.\.(-?\d+)$')
_GLOB_CHARS = ('*', '?', '[')


def expand_braces(pattern: str) -> list[str]:
  """Expand every `{a..b}` range and `{x,y}` list in `pattern`, left to right.

  Raises:
    ValueError: on nested or unbalanced braces, or a group that is neither a range nor a list.
  """
  start = pattern.find('{')
  if start < 0:
    if '}' in pattern:
      raise ValueError(f'Unbalanced "}}" in pattern {pattern!r}.')
    return [pattern]
  end = pattern.find('}', start)
  if end < 0:
    raise ValueError(f'Unbalanced "{{" in pattern {pattern!r}.')
  group = pattern[start + 1:end]
  if '{' in group:
    raise ValueError(f'Nested braces are not supported in pattern {pattern!r}.')
  head, tail = pattern[:start], pattern[end + 1:]
  return [head + choice + rest
          for choice in _expand_group(group, pattern)
          for rest in expand_braces(tail)]


def _expand_group(group: str, pattern: str) -> list[str]:
  match = _RANGE.match(group)
  if match:
    first, last = match.group(1), match.group(2)
    # '{00000..01066}' keeps five digits; '{0..10}' gives unpadded numbers.
    padded = first.lstrip('-').startswith('0') and len(first.lstrip('-')) > 1
    width = max(len(first), len(last)) if padded else 0
    low, high = int(first), int(last)
    step = 1 if high >= low else -1
    return [str(number).zfill(width) for number in range(low, high + step, step)]
  if ',' in group:
    return group.split(',')
  raise ValueError(
      f'Brace group {{{group}}} in pattern {pattern!r} is neither a range such as '
      '{00000..00099} nor a list such as {a,b}.')


def expand_pattern(pattern: str) -> list[str]:
  """Return the existing files that `pattern` names, in pattern order (globs sorted).

  Names from brace expansion that do not exist are left out. Raises FileNotFoundError, naming
  the pattern, when no file exists.
  """
  if not pattern:
    raise FileNotFoundError('The data file pattern is empty; set config.data.train.pattern.')
  pattern = os.path.expanduser(pattern)
  paths = []
  for name in expand_braces(pattern):
    if any(char in name for char in _GLOB_CHARS):
      paths.extend(sorted(path for path in glob.glob(name) if os.path.isfile(path)))
    elif os.path.isfile(name):
      paths.append(name)
  if not paths:
    raise FileNotFoundError(
        f'No file matches the data pattern {pattern!r}; check the folder and the brace range '
        '(e.g. /data/shards/{00000..00099}.tar).')
  return paths


def count_missing(pattern: str) -> tuple[int, int, str | None]:
  """Count the names of a brace pattern (without globs) and how many of them do not exist.

  Returns `(names, missing, first_missing)`.
  """
  names = [name for name in expand_braces(os.path.expanduser(pattern))
           if not any(char in name for char in _GLOB_CHARS)]
  missing = [name for name in names if not os.path.isfile(name)]
  return len(names), len(missing), (missing[0] if missing else None)


def split_for_process(items: list, process_index: int, process_count: int,
                      what: str) -> list:
  """Return this process's share `items[process_index::process_count]` of a list.

  Raises ValueError when there are fewer items than processes, so that no process reads nothing.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count}).')
  if len(items) < process_count:
    raise ValueError(
        f'{what} has {len(items)} entries for {process_count} processes; every process needs '
        'at least one. Write more, smaller shards (make_shards --samples_per_shard).')
  return items[process_index::process_count]
