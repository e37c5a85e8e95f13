"""Command-line entry point.

    python -m clamp_jax.main --config=configs/smollm2_digits.py --workdir=/tmp/clamp_digits
    python -m clamp_jax.main --config=configs/tiny.py --config.train.steps=10 --workdir=/tmp/tiny

`--config` names an ml_collections config file; `--config.a.b=value` overrides any of its fields.
`config.mode` picks the job: 'train' trains (resuming from WORKDIR/checkpoints) and evaluates;
'eval' restores the latest checkpoint and evaluates.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from clamp_jax.configuration import ConfigError, validate_config, validate_workdir

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to an ml_collections config file, e.g. configs/smollm2_digits.py.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output folder for checkpoints, metrics.jsonl, TensorBoard events and '
    'evaluation results. A rerun with the same folder resumes.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  try:
    validate_config(config)
    validate_workdir(workdir)
  except ConfigError as e:
    sys.exit(f'error: {e}')
  _quiet_library_logs()
  logging.info('Config:\n%s', config)

  # Imported after validation so that a bad config fails fast, before JAX starts.
  from clamp_jax import modes
  modes.run(config, workdir)


class _OwnInfoOnly(logging.Filter):
  """Pass INFO records from clamp_jax only; libraries (Orbax, JAX) pass from WARNING up."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f'{os.sep}clamp_jax{os.sep}' in record.pathname


def _quiet_library_logs() -> None:
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  for handler in root.handlers:
    handler.addFilter(_OwnInfoOnly())


def run() -> None:
  app.run(main)


if __name__ == '__main__':
  run()
