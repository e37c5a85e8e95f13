"""Multi-process start-up: `jax.distributed.initialize()` on TPU pods and multi-process GPU jobs.

Every process runs the same command. After initialisation `jax.devices()` lists the devices of all
processes, `jax.process_index()` selects the share of the data each process reads, and the
mesh spans every host.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
import ml_collections

CHOICES = ('auto', 'yes', 'no')


def multi_process_environment() -> str | None:
  """Name the launcher when the environment shows several processes, else None."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1:
    return 'SLURM'
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if len([host for host in hosts.split(',') if host]) > 1:
    return 'TPU pod'
  if int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return 'Open MPI'
  return None


def maybe_initialize(config: ml_collections.ConfigDict) -> bool:
  """Initialise JAX's distributed runtime as `config.distributed` sets; return True if it ran.

  Must run before any other JAX call that touches devices.
  """
  settings = config.distributed
  if settings.initialize not in CHOICES:
    raise ValueError(f'config.distributed.initialize={settings.initialize!r} is not one of '
                     f'{CHOICES}.')
  if settings.initialize == 'no':
    return False
  launcher = multi_process_environment()
  if settings.initialize == 'auto' and launcher is None and not settings.coordinator_address:
    return False
  kwargs = {}
  if settings.coordinator_address:
    kwargs['coordinator_address'] = settings.coordinator_address
  if settings.num_processes > 0:
    kwargs['num_processes'] = settings.num_processes
  if settings.process_id >= 0:
    kwargs['process_id'] = settings.process_id
  logging.info('Initialising jax.distributed (%s).', launcher or 'from the config')
  jax.distributed.initialize(**kwargs)
  logging.info('Process %d of %d; %d local of %d devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def simulate_cpu_devices(count: int) -> None:
  """Make JAX start with `count` CPU devices. Works only before JAX's backends start."""
  from jax._src import xla_bridge

  if xla_bridge.backends_are_initialized():
    sys.exit('error: JAX started before the simulated CPU device count could be set.')
  flags_value = os.environ.get('XLA_FLAGS', '')
  flags_value = ' '.join(flag for flag in flags_value.split()
                         if not flag.startswith('--xla_force_host_platform_device_count'))
  os.environ['XLA_FLAGS'] = f'{flags_value} --xla_force_host_platform_device_count={count}'
  jax.config.update('jax_platforms', 'cpu')
