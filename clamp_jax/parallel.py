"""Device mesh from the config, and logical-axis rules that place parameters and batches on it.

Parameters carry logical axis names (`embed`, `heads`, `mlp`, ...) in their `logical_axes`
metadata. The config's rules map each name to one mesh axis, a tuple of mesh axes, or None
(replicated). A tensor dimension that the mapped mesh axes do not divide evenly is replicated,
with a log line, instead of failing at compile time.

Activations are constrained at block boundaries with `constrain(x, ('batch', 'length',
'act_embed'))`. The constraint applies only inside `activation_sharding(mesh, rules)`, which the
train step enters while it traces, so models called outside it (generation, tests) are unchanged.

On multi-slice TPU the mesh is hybrid: `config.mesh.{data,fsdp,tensor}` are the sizes inside one
slice (ICI) and `config.mesh.dcn_{data,fsdp,tensor}` the sizes across slices (DCN). Each mesh axis
then has size `ici * dcn`, slice-major, so collectives over an axis cross the slow links least.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')


class MeshError(ValueError):
  """Mesh sizes that do not fit the devices, the batch or the model."""


def dcn_shape(mesh_config: ml_collections.ConfigDict) -> dict[str, int]:
  """Sizes across slices, `{'data': dcn_data, ...}`; all 1 for a single slice."""
  sizes = {axis: int(mesh_config.get(f'dcn_{axis}', 1)) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if size < 1:
      raise MeshError(f'config.mesh.dcn_{axis}={size} must be a positive size.')
  return sizes


def resolve_mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolve the sizes of `data`, `fsdp` and `tensor` inside one slice.

  At most one may be -1 to fill the rest. `num_devices` counts the devices of one slice.
  """
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
  """Build a `Mesh` over `devices` (all by default) with axes `data`, `fsdp` and `tensor`.

  With DCN sizes above 1 the devices are grouped into slices: by `slice_index` on multi-slice
  TPU, by process on multi-process GPU, and into equal consecutive blocks in one process.
  """
  devices = list(devices if devices is not None else jax.devices())
  dcn = dcn_shape(mesh_config)
  num_slices = math.prod(dcn.values())
  if len(devices) % num_slices:
    raise MeshError(
        f'{len(devices)} devices cannot form {num_slices} slices of equal size (config.mesh.'
        f'dcn_data={dcn["data"]} x dcn_fsdp={dcn["fsdp"]} x dcn_tensor={dcn["tensor"]}).')
  slices = _group_slices(devices, num_slices)
  ici = resolve_mesh_shape(mesh_config, len(slices[0]))
  ici_shape = tuple(ici[axis] for axis in MESH_AXES)
  if num_slices == 1:
    return Mesh(_slice_grid(slices[0], ici_shape), MESH_AXES)
  dcn_dims = tuple(dcn[axis] for axis in MESH_AXES)
  grid = np.stack([_slice_grid(s, ici_shape) for s in slices])  # [slice, data, fsdp, tensor]
  grid = grid.reshape(dcn_dims + ici_shape)
  # Interleave to [dcn_data, ici_data, dcn_fsdp, ici_fsdp, ...]: each axis is slice-major.
  grid = grid.transpose(0, 3, 1, 4, 2, 5)
  shape = tuple(d * i for d, i in zip(dcn_dims, ici_shape))
  return Mesh(grid.reshape(shape), MESH_AXES)


def _group_slices(devices: list, num_slices: int) -> list[list]:
  """Split `devices` into `num_slices` equal lists: by TPU slice, else by process, else in order.

  The last case lets one process simulate several slices.
  """
  if num_slices == 1:
    return [devices]
  for attribute in ('slice_index', 'process_index'):
    groups: dict[int, list] = {}
    for device in devices:
      groups.setdefault(getattr(device, attribute, 0) or 0, []).append(device)
    if len(groups) > 1:
      if len(groups) != num_slices:
        raise MeshError(
            f'The devices form {len(groups)} groups by {attribute}, but the config.mesh.dcn_* '
            f'sizes multiply to {num_slices}.')
      return [groups[key] for key in sorted(groups)]
  size = len(devices) // num_slices
  return [devices[i * size:(i + 1) * size] for i in range(num_slices)]


def _slice_grid(devices: list, shape: tuple[int, ...]) -> np.ndarray:
  """Devices of one slice as an array of `shape`, topology-aware on TPU."""
  if devices[0].platform == 'tpu':
    from jax.experimental import mesh_utils
    try:
      return mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, NotImplementedError, ValueError) as e:
      # One device per TensorCore (v4 topologies in libtpu 0.0.42) has no physical layout there.
      logging.info('No topology-aware layout for mesh %s (%s); using device order.', shape, e)
  return np.asarray(devices).reshape(shape)


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


def place_array(value, sharding: NamedSharding) -> jax.Array:
  """Put `value` (a numpy or JAX array, whole on every process) onto `sharding`.

  With several processes each one contributes only the shards of its own devices.
  """
  if isinstance(value, np.ndarray):
    # Each device's slice is copied on its own, so a transposed or strided view never becomes
    # one whole contiguous copy on the host.
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  if jax.process_count() == 1:
    return jax.device_put(value, sharding)
  if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(value)
    return jax.random.wrap_key_data(place_array(jax.random.key_data(value), sharding), impl=impl)
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def sharded_placer(mesh: Mesh, rules):
  """Return `place(variable, host_array)` for the weight loaders. Each tensor goes straight into
  the shards of its variable's logical axes, so no host ever has the whole model in memory."""
  return lambda variable, array: place_array(array, variable_sharding(variable, mesh, rules))


def shard_module(module: nnx.Module, mesh: Mesh, rules) -> None:
  """Move every variable of `module` onto `mesh` with the sharding its logical axes ask for."""
  state = nnx.state(module)
  shardings = state_shardings(state, mesh, rules)

  def place(variable, sharding):
    variable.set_value(place_array(variable.get_value(), sharding))
    return variable

  jax.tree.map(place, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(module, state)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of batch-major arrays: the leading dimension over the `batch` rule's mesh axes."""
  mesh_axes = tuple(axis for axis in (rules_dict(rules).get('batch') or ()) if axis in mesh.shape)
  return NamedSharding(mesh, PartitionSpec(mesh_axes if mesh_axes else None))


def batch_mesh_axes(mesh: Mesh, rules) -> tuple[str, ...]:
  """Return the mesh axes of size above 1 that split the batch dimension."""
  return tuple(axis for axis in (rules_dict(rules).get('batch') or ())
               if axis in mesh.shape and mesh.shape[axis] > 1)


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


# ----------------------------------------------------------------------------------------------
# Activation sharding
# ----------------------------------------------------------------------------------------------

_ACTIVATIONS = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules) -> Iterator[None]:
  """Make `constrain` apply `rules` on `mesh` while tracing inside this context."""
  previous = getattr(_ACTIVATIONS, 'value', None)
  _ACTIVATIONS.value = (mesh, rules)
  try:
    yield
  finally:
    _ACTIVATIONS.value = previous


def current_activation_context() -> tuple[Mesh, object] | None:
  """Return `(mesh, rules)` of the enclosing `activation_sharding`, or None outside one."""
  return getattr(_ACTIVATIONS, 'value', None)


def gather_for_use(weight: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Constrain a weight to its sharding without the batch axes (`data`, `fsdp`) before a matmul.

  This all-gathers an FSDP-sharded weight at its use, layer by layer, as ZeRO-3 does, so the
  compiler never chooses to gather the (much larger) batch of activations instead. A no-op
  outside `activation_sharding`.
  """
  context = current_activation_context()
  if context is None:
    return weight
  mesh, rules = context
  spec = logical_to_spec(logical_axes, weight.shape, mesh, rules)
  kept = []
  for entry in spec:
    names = entry if isinstance(entry, tuple) else (entry,) if entry else ()
    names = tuple(name for name in names if name not in ('data', 'fsdp'))
    kept.append(names[0] if len(names) == 1 else names or None)
  return jax.lax.with_sharding_constraint(weight, NamedSharding(mesh, PartitionSpec(*kept)))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Constrain activation `x` to the sharding its logical axes map to; a no-op outside
  `activation_sharding`."""
  context = current_activation_context()
  if context is None:
    return x
  mesh, rules = context
  spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
