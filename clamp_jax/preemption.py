"""Stop requests for the training loop: SIGTERM and JAX's preemption sync point.

The loop calls `StopWatch.check(step)` after every step. A request makes the loop save a checkpoint
at that step boundary and return, so the process exits with status 0 and a rerun resumes.

- One process: a SIGTERM handler sets a flag, and the step that is running finishes first.
- Several processes joined by `jax.distributed`: JAX's preemption service takes the SIGTERM
  (its notifier listens for it) and agrees on one step for every process.
  `jax.experimental.multihost_utils.reached_preemption_sync_point(step)` turns True at that step
  on all of them at once. A flag per process would let processes stop at different steps, so no
  Python handler is installed there.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax


class StopWatch:
  """Context manager that records SIGTERM and polls the preemption sync point.

  Entering installs the SIGTERM handler (main thread, single process only); leaving restores the
  previous handler.
  """

  def __init__(self):
    self.signal_received: str | None = None
    self.stop_reason: str | None = None  # What `check` last reported, once it reported one.
    self._previous = None
    self._installed = False
    self._sync_point_available = True

  def __enter__(self) -> 'StopWatch':
    if jax.distributed.is_initialized():
      logging.info('SIGTERM is left to JAX\'s preemption service; the loop saves and stops at '
                   'its sync point.')
    elif threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
      self._installed = True
    return self

  def __exit__(self, *exc_info) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def _on_signal(self, signum, frame) -> None:
    del frame
    self.signal_received = signal.Signals(signum).name

  def check(self, step: int) -> str | None:
    """Call after every step, on every process; return why to stop now, or None."""
    reason = 'preemption sync point' if self._reached_sync_point(step) else self.signal_received
    if reason is not None:
      self.stop_reason = reason
    return reason

  def _reached_sync_point(self, step: int) -> bool:
    if not self._sync_point_available:
      return False
    try:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except (ImportError, AttributeError, RuntimeError) as e:
      # RuntimeError: jax.distributed runs without its preemption service
      # (jax_enable_preemption_service is off).
      logging.info('Preemption sync point unavailable (%s); only SIGTERM stops the loop.', e)
      self._sync_point_available = False
      return False
