"""Command-line entry point.

    python -m clamp_jax.main --config=configs/smollm2_digits.py --workdir=/tmp/clamp_digits
    python -m clamp_jax.main --config=configs/tiny.py --config.train.steps=10 --workdir=/tmp/tiny

`--config` names an ml_collections config file; `--config.a.b=value` overrides any of its fields.
`config.mode` picks the job: 'train' trains (resuming from WORKDIR/checkpoints) and evaluates;
'eval' restores the latest checkpoint and evaluates; 'export' writes the latest checkpoint to
WORKDIR/export as Hugging Face, PEFT and Orbax files; 'generate' decodes `config.generate.prompts`
with the LLM of the latest checkpoint; 'plan' compiles the train step for `config.plan.devices`
simulated devices and reports per-device memory and whether it fits:

    python -m clamp_jax.main --config=configs/llama7b.py --workdir=/tmp/plan7b \
        --config.mode=plan --config.plan.devices=32 --config.plan.device_memory_gib=32
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
  if config.mode == 'plan' and config.plan.devices > 0 and not config.plan.topology:
    from clamp_jax.distributed import simulate_cpu_devices

    simulate_cpu_devices(config.plan.devices)

  # Imported after validation so that a bad config fails fast, before JAX starts.
  from clamp_jax import modes
  from clamp_jax.data import DataQualityError
  from clamp_jax.models.onednn import OneDNNError
  from clamp_jax.parallel import MeshError
  from clamp_jax.weights import WeightLoadError
  try:
    modes.run(config, workdir)
  except (MeshError, WeightLoadError, DataQualityError, OneDNNError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')


class _OwnInfoOnly(logging.Filter):
  """Pass INFO records from clamp_jax only; libraries (Orbax, JAX) pass from WARNING up."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f'{os.sep}clamp_jax{os.sep}' in record.pathname


def _quiet_library_logs() -> None:
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  for handler in root.handlers:
    handler.addFilter(_OwnInfoOnly())


def parse_flags(argv: list[str]) -> list[str]:
  """Parse flags, turning a bad `--config` file or override into one error line."""
  for arg in argv[1:]:
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1].split(':', 1)[0]
      if not os.path.isfile(path):
        sys.exit(f'error: config file {path!r} not found (--config={path}); pass a file such '
                 'as configs/smollm2_digits.py.')
  try:
    remaining = flags.FLAGS(argv)
    _CONFIG.value  # Loads the file and applies the overrides.
  except flags.IllegalFlagValueError as e:
    sys.exit(f'error: {_first_line(e)}')
  except flags.Error as e:
    sys.exit(f'error: {_first_line(e)}\nRun with --helpfull to list the flags.')
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for an override of a field that the config does not have.
    field = str(e).strip('"\'')
    sys.exit(f'error: unknown config field {field!r} in a --config.* override; check the '
             'spelling against the config file.')
  except OSError as e:
    sys.exit(f'error: could not load the config file ({_first_line(e)}).')
  return remaining


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
