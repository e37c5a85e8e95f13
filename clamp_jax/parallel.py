"""Device mesh from the config, and logical-axis rules that place parameters and batches on it.

Parameters carry logical axis names (`embed`, `heads`, `mlp`, ...) in their `logical_axes`
metadata. The config's rules map each name to one mesh axis, a tuple of mesh axes, or None
(replicated). A tensor dimension that the mapped mesh axes do not divide evenly is replicated,
with a log line, instead of failing at compile time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')


class MeshError(ValueError):
  """Mesh sizes that do not fit the devices, the batch or the model."""


def resolve_mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolve the sizes of `data`, `fsdp` and `tensor`. At most one may be -1 to fill the rest."""
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise MeshError(f'Only one mesh axis may be -1, got {sizes}.')
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise MeshError(f'config.mesh.{axis}={size} must be a positive size or -1.')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise MeshError(
          f'{num_devices} devices cannot be split into mesh {sizes}: {num_devices} is not '
          f'divisible by {fixed}.')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise MeshError(
        f'Mesh sizes data={sizes["data"]} x fsdp={sizes["fsdp"]} x tensor={sizes["tensor"]} '
        f'= {math.prod(sizes.values())} do not match the {num_devices} devices; set one axis '
        'to -1 to fill the rest.')
  return sizes


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Build a `Mesh` over `devices` (all by default) with axes `data`, `fsdp` and `tensor`."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules_dict(rules) -> dict[str, tuple[str, ...] | None]:
  """Normalise config rules `((logical, mesh_axes), ...)` to `{logical: tuple or None}`."""
  table = {}
  for logical, mesh_axes in rules:
    if mesh_axes is None:
      table[logical] = None
    elif isinstance(mesh_axes, str):
      table[logical] = (mesh_axes,)
    else:
      table[logical] = tuple(mesh_axes)
  return table


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules) -> PartitionSpec:
  """Map the `logical_axes` names of a tensor of `shape` to a `PartitionSpec`.

  A mesh axis is used at most once per tensor, and a dimension whose size the mapped mesh axes
  do not divide is replicated.
  """
  table = rules_dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(logical_axes, shape, strict=True):
    mesh_axes = table.get(name) if name is not None else None
    if not mesh_axes:
      spec.append(None)
      continue
    mesh_axes = tuple(axis for axis in mesh_axes if axis not in used and mesh.shape[axis] > 1)
    ways = math.prod(mesh.shape[axis] for axis in mesh_axes)
    if not mesh_axes or size % ways:
      if mesh_axes:
        logging.info('Replicating dimension %r of size %d: not divisible by mesh axes %s (%d).',
                     name, size, mesh_axes, ways)
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules) -> NamedSharding:
  """Sharding of one variable from its `logical_axes` metadata (replicated without it)."""
  shape = tuple(variable.shape) if hasattr(variable, 'shape') else ()
  axes = variable.get_metadata().get('logical_axes')
  if axes is None or len(axes) != len(shape):
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules):
  """Map every variable of `state` to its `NamedSharding`, keeping the tree structure."""
  return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh, rules) -> None:
  """Move every variable of `module` onto `mesh` with the sharding its logical axes ask for."""
  state = nnx.state(module)
  shardings = state_shardings(state, mesh, rules)

  def place(variable, sharding):
    variable.set_value(jax.device_put(variable.get_value(), sharding))
    return variable

  jax.tree.map(place, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(module, state)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of batch-major arrays: the leading dimension over the `batch` rule's mesh axes."""
  mesh_axes = tuple(axis for axis in (rules_dict(rules).get('batch') or ()) if axis in mesh.shape)
  return NamedSharding(mesh, PartitionSpec(mesh_axes if mesh_axes else None))


def batch_shards(mesh: Mesh, rules) -> int:
  """Count the ways the batch dimension is split."""
  mesh_axes = rules_dict(rules).get('batch') or ()
  return math.prod(mesh.shape[axis] for axis in mesh_axes if axis in mesh.shape)


def validate_mesh_for_model(mesh: Mesh, rules, *, batch_size: int, num_heads: int | None,
                            num_kv_heads: int | None) -> None:
  """Reject a batch or head count that the mesh cannot split, naming the numbers."""
  shards = batch_shards(mesh, rules)
  if batch_size % shards:
    raise MeshError(
        f'config.train.batch_size={batch_size} is not divisible by the {shards} batch shards '
        f'of mesh {dict(mesh.shape)}.')
  tensor = mesh.shape['tensor']
  for name, count in (('num_attention_heads', num_heads), ('num_key_value_heads', num_kv_heads)):
    if count is not None and count % tensor:
      raise MeshError(
          f'LLM {name}={count} is not divisible by config.mesh.tensor={tensor}; pick a tensor '
          'size that divides it.')


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules,
                replicated: Sequence[str] = ()) -> dict[str, jax.Array]:
  """Turn this process's share of a batch into global arrays on `mesh`.

  Arrays are split along their leading dimension over the batch axes, except the keys in
  `replicated` (such as a table of distinct captions), which every device gets whole.
  """
  split = batch_sharding(mesh, rules)
  whole = NamedSharding(mesh, PartitionSpec())
  return {key: jax.make_array_from_process_local_data(whole if key in replicated else split,
                                                      np.asarray(value))
          for key, value in batch.items()}
