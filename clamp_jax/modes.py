"""Jobs selected by `config.mode`, each a function `(config, workdir) -> None`."""

from __future__ import annotations

import ml_collections


def train(config: ml_collections.ConfigDict, workdir: str) -> None:
  from clamp_jax.train import train_and_evaluate
  train_and_evaluate(config, workdir)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> None:
  from clamp_jax.train import evaluate_checkpoint
  evaluate_checkpoint(config, workdir)


def plan(config: ml_collections.ConfigDict, workdir: str) -> None:
  from clamp_jax.plan import run_plan
  run_plan(config, workdir)


def export(config: ml_collections.ConfigDict, workdir: str) -> None:
  from clamp_jax.export import run_export
  run_export(config, workdir)


def generate(config: ml_collections.ConfigDict, workdir: str) -> None:
  from clamp_jax.generate_mode import run_generate
  run_generate(config, workdir)


MODES = {'train': train, 'eval': evaluate, 'plan': plan, 'export': export, 'generate': generate}


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  if config.mode != 'plan':
    from clamp_jax.distributed import maybe_initialize
    maybe_initialize(config)
  MODES[config.mode](config, workdir)
