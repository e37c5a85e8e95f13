"""Fill an abstract model from checkpoint tensors through a table of tensor names.

The table maps each checkpoint tensor name to its shape in the file and to the model parameters
it fills, each with a function that converts the array to the parameter's layout (a transpose, a
slice of a fused tensor). Tensors are read one at a time and handed to a `place` callback, so
about one tensor at a time is in host memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clamp_jax.weights.assign import WeightLoadError
from clamp_jax.weights.hf_folder import iter_safetensors

# A model parameter path (attribute names and list indices) and the conversion from the
# checkpoint array to the parameter's layout.
Target = tuple[tuple, Callable[[np.ndarray], np.ndarray]]
Placer = Callable[[nnx.Variable, np.ndarray], jax.Array]


def unchanged(array: np.ndarray) -> np.ndarray:
  return array


def transposed(array: np.ndarray) -> np.ndarray:
  """PyTorch `Linear` weight `[out, in]` to our kernel `[in, out]`."""
  return array.T


def conv_to_hwio(array: np.ndarray) -> np.ndarray:
  """PyTorch `Conv2d` weight `[out, in, h, w]` to our patch kernel `[h, w, in, out]`."""
  return array.transpose(2, 3, 1, 0)


def row_block(index: int, count: int, then: Callable[[np.ndarray], np.ndarray] = unchanged):
  """Take block `index` of `count` equal blocks along axis 0, then apply `then`.

  Splits fused tensors such as a `[3 * width, width]` q/k/v projection.
  """
  def convert(array: np.ndarray) -> np.ndarray:
    size = array.shape[0] // count
    return then(array[index * size:(index + 1) * size])
  return convert


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One checkpoint tensor: its shape in the file and the parameters it fills."""

  shape: tuple[int, ...]
  targets: tuple[Target, ...]


def layer_norm_specs(name: str, path: tuple, width: int) -> dict[str, TensorSpec]:
  """PyTorch `LayerNorm` tensors `NAME.weight` and `NAME.bias` for our `LayerNorm` at `path`."""
  return {f'{name}.weight': TensorSpec((width,), (((*path, 'scale'), unchanged),)),
          f'{name}.bias': TensorSpec((width,), (((*path, 'bias'), unchanged),))}


def linear_specs(name: str, path: tuple, in_features: int,
                 out_features: int) -> dict[str, TensorSpec]:
  """PyTorch `Linear` tensors `NAME.weight` and `NAME.bias` for our biased `Linear` at `path`."""
  return {
      f'{name}.weight': TensorSpec((out_features, in_features),
                                   (((*path, 'kernel'), transposed),)),
      f'{name}.bias': TensorSpec((out_features,), (((*path, 'bias'), unchanged),)),
  }


def iter_file_tensors(paths: list[str]) -> Iterator[tuple[str, str, Callable[[], np.ndarray]]]:
  """Yield `(file, name, read_fn)` for every tensor of the safetensors files, one file at a time."""
  for path in paths:
    for name, read in iter_safetensors([path]):
      yield path, name, read


def get_variable(model: nnx.Module, path: tuple) -> nnx.Variable:
  node = model
  for part in path:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node


def fill_from_map(
    model: nnx.Module,
    tensors: Iterable[tuple[str, str, Callable[[], np.ndarray]]],
    table: dict[str, TensorSpec],
    *,
    source: str,
    rename: Callable[[str], str | None],
    place: Placer | None = None,
) -> None:
  """Assign the tensors named in `table` to `model`, which may be abstract (from `eval_shape`).

  `tensors` yields `(file, name, read_fn)`. `rename(name)` returns the table key of a checkpoint
  name, or None for a tensor that this model does not use (it is never read). A table key with
  no tensor, a renamed tensor missing from `table`, or a shape other than the table's raises
  `WeightLoadError` with one line that names the file (or `source`) and the tensor.
  `place(variable, array)` puts the host array, already in the parameter's dtype, on devices;
  by default it is `jnp.asarray`.
  """
  seen = set()
  for file, name, read in tensors:
    key = rename(name)
    if key is None:
      continue
    spec = table.get(key)
    if spec is None:
      raise WeightLoadError(f'{file}: unexpected tensor {name!r}; the model has no parameter '
                            'for it (an unsupported architecture variant).')
    if key in seen:
      raise WeightLoadError(f'{file}: tensor {name!r} appears twice in {source}.')
    array = np.asarray(read())
    if tuple(array.shape) != spec.shape:
      raise WeightLoadError(
          f'{file}: tensor {name!r} has shape {tuple(array.shape)}, expected {spec.shape} '
          'from the architecture config.')
    for path, convert in spec.targets:
      variable = get_variable(model, path)
      value = convert(array).astype(variable.dtype, copy=False)
      if tuple(value.shape) != tuple(variable.shape):
        raise WeightLoadError(  # A table error in this project, not a checkpoint problem.
            f'{file}: tensor {name!r} converts to shape {tuple(value.shape)}, but parameter '
            f'{"/".join(map(str, path))} has shape {tuple(variable.shape)}.')
      variable.set_value(place(variable, value) if place else jnp.asarray(value))
      del value
    del array
    seen.add(key)
  missing = [key for key in table if key not in seen]
  if missing:
    more = f' and {len(missing) - 1} more' if len(missing) > 1 else ''
    raise WeightLoadError(f'{source}: missing tensor {missing[0]!r}{more}.')


def require_filled(model: nnx.Module, source: str) -> None:
  """Raise `WeightLoadError` if a parameter of an `eval_shape` model still has no value."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable) and isinstance(node.get_value(), jax.ShapeDtypeStruct):
      name = '/'.join(str(part) for part in path)
      raise WeightLoadError(f'{source}: no checkpoint tensor fills parameter {name}.')
