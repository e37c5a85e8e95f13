"""Run the benchmarks of `config.eval.datasets` and write the reports; periodic evaluation.

Eval mode and the end of training call `run_evaluation`, which writes WORKDIR/eval_results.json,
.md and .png, prints the table, and keeps writing WORKDIR/zero_shot.json for the digits. During
training, `make_periodic_evaluator` gives a hook that evaluates every `config.eval.every_steps`
steps and logs `eval/<dataset>/<metric>` to the metric writer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence

import jax
import ml_collections

from clamp_jax.data.captions import CaptionTokenizer
from clamp_jax.evaluation import benchmarks
from clamp_jax.evaluation.classification import evaluate_classification
from clamp_jax.evaluation.options import EvalOptions, eval_options
from clamp_jax.evaluation.report import format_table, write_reports
from clamp_jax.evaluation.retrieval import evaluate_retrieval
from clamp_jax.evaluation.zero_shot import evaluate_digits

# The digits' entry in WORKDIR/zero_shot.json, as training has always written it.
DIGITS_SUMMARY_KEYS = ('top1', 'top5', 'num_images')


def evaluate_datasets(model, caption_tokenizer: CaptionTokenizer,
                      config: ml_collections.ConfigDict, names: Sequence[str],
                      options: EvalOptions, step: int | None
                      ) -> tuple[dict[str, dict], dict[str, str]]:
  """Evaluate each named benchmark; returns `{dataset: metrics}` and `{dataset: primary metric}`."""
  results, primary = {}, {}
  for entry in names:
    resolved = benchmarks.resolve(entry, options.data_dir)
    benchmark = resolved.benchmark
    if benchmark.task == benchmarks.DIGITS:
      metrics = evaluate_digits(model, caption_tokenizer, config)
    elif benchmark.task == benchmarks.RETRIEVAL:
      metrics = evaluate_retrieval(model, caption_tokenizer, resolved, options)
    else:
      metrics = evaluate_classification(model, caption_tokenizer, resolved, options, step)
    results[benchmark.name] = metrics
    primary[benchmark.name] = benchmark.metric
    logging.info('%s: %s = %.4f.', benchmark.name, benchmark.metric, metrics[benchmark.metric])
  return results, primary


def metric_records(results: dict[str, dict]) -> dict[str, float]:
  """Flatten results into metric-writer names `eval/<dataset>/<metric>`."""
  return {f'eval/{dataset}/{name}': value for dataset, row in results.items()
          for name, value in row.items()}


def run_evaluation(model, caption_tokenizer: CaptionTokenizer, config: ml_collections.ConfigDict,
                   workdir: str, step: int | None) -> dict[str, dict]:
  """Evaluate `config.eval.datasets` at checkpoint `step`, write the reports, print the table."""
  names = benchmarks.expand_names(config.eval.datasets)
  logging.info('Zero-shot evaluation at step %s on %s.', step, ', '.join(names))
  options = eval_options(config, workdir)
  benchmarks.check_data(names, options.data_dir, options.read.source)
  results, primary = evaluate_datasets(model, caption_tokenizer, config, names, options, step)
  if 'digits' in results:
    path = os.path.join(workdir, 'zero_shot.json')
    summary = {'digits': {key: results['digits'][key] for key in DIGITS_SUMMARY_KEYS}}
    with open(path, 'w', encoding='utf-8') as file:
      json.dump(summary, file, indent=2)
    logging.info('Wrote %s', path)
  paths = write_reports(results, primary, workdir)
  print(format_table(results, primary), flush=True)
  logging.info('Wrote %s', ', '.join(paths))
  return results


def make_periodic_evaluator(model, caption_tokenizer: CaptionTokenizer,
                            config: ml_collections.ConfigDict, workdir: str,
                            writer) -> Callable[[int], None] | None:
  """Return a hook `evaluate(step)` for the training loop, or None when it would never run.

  The hook evaluates `config.eval.periodic_datasets` (empty: `config.eval.datasets`) on at most
  `config.eval.periodic_max_images` images each, every `config.eval.every_steps` steps, and
  writes `eval/<dataset>/<metric>`. It skips the last step when `config.eval.at_end` is set,
  because the full evaluation after training covers that step.
  """
  every = config.eval.every_steps
  if every <= 0:
    return None
  if jax.process_count() > 1:
    # NOTE: evaluation feeds process-local arrays, so it runs in one process only.
    logging.warning('Skipping periodic evaluation in a %d-process run.', jax.process_count())
    return None
  names = benchmarks.expand_names(config.eval.periodic_datasets or config.eval.datasets)
  options = eval_options(config, workdir, max_images=config.eval.periodic_max_images)
  benchmarks.check_data(names, options.data_dir, options.read.source)

  def evaluate(step: int) -> None:
    if step % every or (step == config.train.steps and config.eval.at_end):
      return
    model.eval()
    try:
      results, _ = evaluate_datasets(model, caption_tokenizer, config, names, options, step)
    finally:
      model.train()
    writer.write(step, metric_records(results))

  return evaluate
