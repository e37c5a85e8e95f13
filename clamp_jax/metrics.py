"""Metric output: one JSON object per logged step in `metrics.jsonl`, plus TensorBoard events."""

from __future__ import annotations

import json
import math
import os


class MetricWriter:
  """Appends `{'step': int, name: float or int, ...}` lines to WORKDIR/metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
    """`enabled=False` (every process but the first of a multi-process run) writes nothing."""
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled
    # The values written for the most recent step, on every process (see `values_at`).
    self._recent_step, self._recent_values = None, {}
    self._file = open(self.path, 'a', encoding='utf-8') if enabled else None
    self._tb = None
    if tensorboard and enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    # Counts stay integers in the JSON; everything else is a float.
    values = {name: value if isinstance(value, int) else float(value)
              for name, value in metrics.items()}
    if step != self._recent_step:
      self._recent_step, self._recent_values = step, {}
    self._recent_values.update(values)
    if not self.enabled:
      return
    self._file.write(json.dumps({'step': int(step), **values}) + '\n')
    self._file.flush()
    if self._tb is not None:
      for name, value in values.items():
        if math.isfinite(value):
          self._tb.add_scalar(name, value, step)
      self._tb.flush()

  def values_at(self, step: int) -> dict[str, float]:
    """Return every value written for `step` if it is the most recent step written, else {}."""
    return dict(self._recent_values) if step == self._recent_step else {}

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """Read all records of WORKDIR/metrics.jsonl, in file order."""
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
