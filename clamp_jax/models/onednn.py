"""Matrix products on the CPU through oneDNN, for bfloat16 compute where XLA:CPU has no bf16 dot.

XLA:CPU in jaxlib 0.10 converts both operands of a bfloat16 dot to float32 and multiplies in
float32. oneDNN's matmul runs bfloat16 on the CPU's AVX-512 BF16 (or AMX) units, at about twice
XLA's float32 rate on an AVX-512 BF16 CPU. `matmul(x, w)` computes `x @ w` with oneDNN inside a
jitted program through `jax.experimental.buffer_callback`. Its gradient for `x` (`dy @ w.T`)
runs the same way. The gradient for `w` is an XLA dot, which the compiler drops when `w` is
frozen.

The library comes from the PyPI wheel `onednn-cpu-gomp` (oneDNN 3.2 with GNU OpenMP), the
`cpu-bf16` extra of this package. `CLAMP_ONEDNN_LIBRARY` names another `libdnnl.so.3`.

Under `clamp_jax.parallel.activation_sharding` with more than one device, each device multiplies
its own batch shard (a `shard_map` over the batch axes) with `threads_per_device` OpenMP threads,
so two CPU devices on two cores run their products side by side.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
import sys
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
from jax.experimental import buffer_callback
import numpy as np
from jax.sharding import PartitionSpec

from clamp_jax import parallel

ENV_LIBRARY = 'CLAMP_ONEDNN_LIBRARY'
INSTALL_HINT = 'pip install onednn-cpu-gomp==2023.2.0'

# Values of oneDNN 3.x's C API (dnnl_common_types.h and dnnl_types.h).
_DNNL_CPU = 1
_DNNL_STREAM_IN_ORDER = 1
_DNNL_ARG_SRC = 1
_DNNL_ARG_DST = 17
_DNNL_ARG_WEIGHTS = 33
_DNNL_ARG_SCRATCHPAD = 80
_DNNL_QUERY_IMPL_INFO_STR = 8
_DNNL_QUERY_SCRATCHPAD_MD = 136
_DNNL_SCRATCHPAD_MODE_USER = 1
DATA_TYPES = {np.dtype(ml_dtypes.bfloat16): 2, np.dtype(np.float32): 3}
_MAX_DIMS = 12
_Dims = ctypes.c_int64 * _MAX_DIMS


class OneDNNError(RuntimeError):
  """Error raised when oneDNN is missing or a oneDNN call fails."""


class _ExecArg(ctypes.Structure):
  _fields_ = [('arg', ctypes.c_int), ('memory', ctypes.c_void_p)]


def _candidate_paths() -> list[str]:
  # The wheel installs its libraries under <prefix>/lib as data files.
  paths = [os.path.join(prefix, 'lib', 'libdnnl.so.3')
           for prefix in dict.fromkeys((sys.prefix, sys.base_prefix))]
  found = ctypes.util.find_library('dnnl')
  if found:
    paths.append(found)
  return paths


def _load() -> tuple[ctypes.CDLL, str]:
  """Open `CLAMP_ONEDNN_LIBRARY` if set, else the installed wheel's library."""
  override = os.environ.get(ENV_LIBRARY)
  if override:
    try:
      return ctypes.CDLL(override), override
    except OSError as e:
      raise OneDNNError(
          f'{ENV_LIBRARY}={override} could not be loaded ({e}). Set it to the path of a '
          f'libdnnl.so.3, or unset it to use the library that {INSTALL_HINT} installs.') from e
  errors = []
  for path in _candidate_paths():
    try:
      return ctypes.CDLL(path), path
    except OSError as e:
      errors.append(f'{path}: {e}')
  raise OneDNNError(
      'model.matmul=onednn needs the oneDNN library, which was not found ('
      + '; '.join(errors) + f'). Install it with {INSTALL_HINT}, or set {ENV_LIBRARY} to the '
      'path of a libdnnl.so.3.')


class _Library:
  """The loaded library, one CPU engine, and a primitive per problem shape."""

  def __init__(self):
    self.dnnl, self.path = _load()
    self.dnnl.dnnl_primitive_desc_query.restype = ctypes.c_int
    self.dnnl.dnnl_primitive_desc_query_md.restype = ctypes.c_void_p
    self.dnnl.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
    try:
      self.gomp = ctypes.CDLL('libgomp.so.1')
    except OSError:
      self.gomp = None
    self.engine = ctypes.c_void_p()
    self._check(self.dnnl.dnnl_engine_create(ctypes.byref(self.engine), _DNNL_CPU, 0),
                'dnnl_engine_create')
    # Key: (shape, strides, dtype) of src, weights and dst. Value: (primitive, descriptors,
    # scratchpad bytes, kernel name).
    self._primitives: dict[tuple, tuple] = {}
    self._lock = threading.Lock()
    self._local = threading.local()

  @staticmethod
  def _check(status: int, operation: str) -> None:
    if status != 0:
      raise OneDNNError(f'oneDNN {operation} failed with status {status}.')

  def _descriptor(self, array: np.ndarray) -> ctypes.c_void_p:
    """Create a memory descriptor of `array`'s shape, dtype and strides (a NumPy view may be
    strided)."""
    descriptor = ctypes.c_void_p()
    strides = [stride // array.itemsize for stride in array.strides]
    for axis, size in enumerate(array.shape):
      if size == 1:
        # Any stride addresses a dimension of size 1 (NumPy gives 0 to an added axis). oneDNN
        # reads layouts from the strides' order, so it gets the span of the inner dimensions.
        strides[axis] = max([strides[inner] * array.shape[inner]
                             for inner in range(axis + 1, array.ndim)], default=1)
    self._check(self.dnnl.dnnl_memory_desc_create_with_strides(
        ctypes.byref(descriptor), array.ndim, _Dims(*array.shape),
        DATA_TYPES[array.dtype], _Dims(*strides)), 'dnnl_memory_desc_create_with_strides')
    return descriptor

  def primitive(self, src: np.ndarray, weights: np.ndarray, dst: np.ndarray):
    """Return the matmul primitive for these operands' shapes, strides and dtypes, created once."""
    key = tuple((a.shape, a.strides, a.dtype.str) for a in (src, weights, dst))
    with self._lock:
      if key not in self._primitives:
        descriptors = tuple(self._descriptor(a) for a in (src, weights, dst))
        # With the default (library) scratchpad, primitives share one buffer, and two threads
        # executing at once overwrite each other's data. So each call passes its own buffer.
        attributes = ctypes.c_void_p()
        self._check(self.dnnl.dnnl_primitive_attr_create(ctypes.byref(attributes)),
                    'dnnl_primitive_attr_create')
        self._check(self.dnnl.dnnl_primitive_attr_set_scratchpad_mode(
            attributes, _DNNL_SCRATCHPAD_MODE_USER), 'dnnl_primitive_attr_set_scratchpad_mode')
        primitive_desc = ctypes.c_void_p()
        self._check(self.dnnl.dnnl_matmul_primitive_desc_create(
            ctypes.byref(primitive_desc), self.engine, descriptors[0], descriptors[1], None,
            descriptors[2], attributes),
                    f'matmul descriptor for {src.shape} x {weights.shape} -> {dst.shape}')
        scratchpad = ctypes.c_void_p(self.dnnl.dnnl_primitive_desc_query_md(
            primitive_desc, _DNNL_QUERY_SCRATCHPAD_MD, 0))
        scratchpad_bytes = self.dnnl.dnnl_memory_desc_get_size(scratchpad) if scratchpad else 0
        primitive = ctypes.c_void_p()
        self._check(self.dnnl.dnnl_primitive_create(ctypes.byref(primitive), primitive_desc),
                    'dnnl_primitive_create')
        name = ctypes.c_char_p()
        self.dnnl.dnnl_primitive_desc_query(primitive_desc, _DNNL_QUERY_IMPL_INFO_STR, 0,
                                            ctypes.byref(name))
        self._primitives[key] = (primitive, (*descriptors, scratchpad), scratchpad_bytes,
                                 (name.value or b'').decode())
      return self._primitives[key]

  def stream(self) -> ctypes.c_void_p:
    # Streams are not thread-safe, so each calling thread gets its own.
    stream = getattr(self._local, 'stream', None)
    if stream is None:
      stream = ctypes.c_void_p()
      self._check(self.dnnl.dnnl_stream_create(ctypes.byref(stream), self.engine,
                                               _DNNL_STREAM_IN_ORDER), 'dnnl_stream_create')
      self._local.stream = stream
    return stream

  def scratchpad(self, size: int) -> int:
    """Address of this thread's scratch buffer of at least `size` bytes, 64-byte aligned."""
    buffer = getattr(self._local, 'scratchpad', None)
    if buffer is None or buffer.size < size + 64:
      buffer = np.empty(size + 64, np.uint8)
      self._local.scratchpad = buffer
    return (buffer.ctypes.data + 63) // 64 * 64

  def implementation(self, m: int, k: int, n: int, dtype, transpose_w: bool = False) -> str:
    """Name of the oneDNN kernel for this problem, such as 'brg:avx512_core_bf16'."""
    weights = np.empty((n, k) if transpose_w else (k, n), dtype)
    return self.primitive(np.empty((m, k), dtype), weights.T if transpose_w else weights,
                          np.empty((m, n), dtype))[3]

  def matmul(self, x: np.ndarray, w: np.ndarray, out: np.ndarray, transpose_w: bool,
             threads: int) -> None:
    """Write `x @ w` (or `x @ w.T`) into `out`, all C-contiguous 2-D arrays of one dtype."""
    m, k = x.shape
    n = w.shape[0] if transpose_w else w.shape[1]
    if out.shape != (m, n) or not all(a.flags.c_contiguous and a.dtype == x.dtype
                                      for a in (x, w, out)):
      raise OneDNNError(f'matmul operands do not fit: x {x.shape}, w {w.shape} '
                        f'(transposed: {transpose_w}), out {out.shape}.')
    if m == 0 or n == 0:
      return
    if k == 0:
      out[...] = 0
      return
    self.strided_matmul(x, w.T if transpose_w else w, out, threads)

  def strided_matmul(self, src: np.ndarray, weights: np.ndarray, dst: np.ndarray,
                     threads: int) -> None:
    """Write `src @ weights` into `dst`: NumPy views `[..., m, k]`, `[..., k, n]` and
    `[..., m, n]` with any strides, batch dimensions of size 1 in `weights` broadcast.

    `src` and `weights` share a dtype, and `dst` has theirs or float32.
    """
    primitive, descriptors, scratchpad_bytes, _ = self.primitive(src, weights, dst)
    buffers = [src.ctypes.data, weights.ctypes.data, dst.ctypes.data]
    arg_ids = [_DNNL_ARG_SRC, _DNNL_ARG_WEIGHTS, _DNNL_ARG_DST]
    if scratchpad_bytes:
      buffers.append(self.scratchpad(scratchpad_bytes))
      arg_ids.append(_DNNL_ARG_SCRATCHPAD)
    if self.gomp is not None:
      # The OpenMP thread count is a per-thread setting, so each calling thread sets its own.
      self.gomp.omp_set_num_threads(threads)
    memories = []
    try:
      for descriptor, address in zip(descriptors, buffers):
        memory = ctypes.c_void_p()
        self._check(self.dnnl.dnnl_memory_create(ctypes.byref(memory), descriptor, self.engine,
                                                 ctypes.c_void_p(address)),
                    'dnnl_memory_create')
        memories.append(memory)
      args = (_ExecArg * len(memories))(*(_ExecArg(arg, memory)
                                          for arg, memory in zip(arg_ids, memories)))
      stream = self.stream()
      self._check(self.dnnl.dnnl_primitive_execute(primitive, stream, len(memories), args),
                  f'matmul {src.shape} x {weights.shape}')
      self._check(self.dnnl.dnnl_stream_wait(stream), 'dnnl_stream_wait')
    finally:
      for memory in memories:
        self.dnnl.dnnl_memory_destroy(memory)


_LIBRARY: _Library | None = None
_LIBRARY_LOCK = threading.Lock()


def require_cpu_backend() -> None:
  """Raise OneDNNError unless JAX runs on the CPU, since the callback reads operands as host
  memory."""
  if jax.default_backend() != 'cpu':
    raise OneDNNError(f"model.matmul='onednn' runs on the CPU only, but JAX's backend is "
                      f"{jax.default_backend()!r}; use model.matmul='xla' there.")


def check_usable() -> None:
  """Check, before any weight loads, that oneDNN matmuls can run here: a CPU backend and a
  loadable library."""
  require_cpu_backend()
  library()


def library() -> _Library:
  """Load oneDNN once; raises OneDNNError with the install command when it is missing."""
  global _LIBRARY
  with _LIBRARY_LOCK:
    if _LIBRARY is None:
      _LIBRARY = _Library()
    return _LIBRARY


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _host_matmul(out, x, w, *, transpose_w: bool, threads: int) -> None:
  """Write `x @ w` (or `x @ w.T`) into the output buffer `out` in place."""
  library().matmul(x.reshape(-1, x.shape[-1]), w, out.reshape(-1, out.shape[-1]), transpose_w,
                   threads)


# FLOPs of the products traced inside `count_flops()`, which XLA's cost analysis cannot see
# inside callbacks.
_COUNTER = threading.local()


@contextlib.contextmanager
def count_flops() -> Iterator[list[float]]:
  """Count the FLOPs (2 m k n per product, whole batch) of the oneDNN products traced inside.

  The yielded one-element list contains the running total.
  """
  previous = getattr(_COUNTER, 'value', None)
  total = [0.0]
  _COUNTER.value = total
  try:
    yield total
  finally:
    _COUNTER.value = previous


def add_flops(flops: float) -> None:
  """Add `flops` to the running `count_flops()` total, if one is open."""
  counter = getattr(_COUNTER, 'value', None)
  if counter is not None:
    counter[0] += flops


def _call(x: jax.Array, w: jax.Array, transpose_w: bool) -> jax.Array:
  n = w.shape[0] if transpose_w else w.shape[1]
  add_flops(2.0 * math.prod(x.shape) * n)
  return run_on_host(functools.partial(_host_matmul, transpose_w=transpose_w),
                     jax.ShapeDtypeStruct((*x.shape[:-1], n), x.dtype), (x, w),
                     batched=(True, False))


def run_on_host(host, result: jax.ShapeDtypeStruct, operands, batched) -> jax.Array:
  """Compute `result` with `host(out, *operands, threads=N)` on NumPy views of XLA's buffers.

  Under activation sharding each device runs `host` with `cores / local devices` OpenMP threads
  on its own shard of the batch: the leading axis of `result` and of each operand marked in
  `batched`. The other operands are passed whole.
  """
  context = parallel.current_activation_context()
  mesh = context[0] if context else None
  if mesh is None or mesh.size == 1:
    return _callback(host, result, operands, _cores())
  batch_axes = parallel.batch_mesh_axes(mesh, context[1])
  shards = parallel.batch_shards(mesh, context[1])
  if (not batch_axes or len(result.shape) < 2 or result.shape[0] % shards
      or any(operand.shape[0] % shards for operand, split in zip(operands, batched) if split)):
    # Only the leading (batch) dimension is split; anything else runs whole on one device.
    return _callback(host, result, operands, _cores())
  local_devices = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
  threads = max(1, _cores() // max(1, local_devices))
  spec = PartitionSpec(batch_axes if len(batch_axes) > 1 else batch_axes[0])
  local = jax.ShapeDtypeStruct((result.shape[0] // shards, *result.shape[1:]), result.dtype)
  return jax.shard_map(lambda *parts: _callback(host, local, parts, threads), mesh=mesh,
                       in_specs=tuple(spec if split else PartitionSpec() for split in batched),
                       out_specs=spec, check_vma=False)(*operands)


def _callback(host, result: jax.ShapeDtypeStruct, operands, threads: int) -> jax.Array:
  # buffer_callback hands over XLA's own buffers: no copies in, and the output written in place.
  # (pure_callback passes jax.Arrays, whose conversion to NumPy can wait on the very program
  # that runs the callback.)
  return buffer_callback.buffer_callback(
      functools.partial(_host_entry, host=host, threads=threads), result,
      vmap_method='sequential')(*operands)


def _host_entry(context, out, *operands, host, threads: int) -> None:
  del context
  host(np.asarray(out), *(np.asarray(operand) for operand in operands), threads=threads)


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return _call(x, w, False)


def _matmul_forward(x, w):
  return _call(x, w, False), (x, w)


def _matmul_backward(residuals, grad):
  x, w = residuals
  grad = grad.astype(x.dtype)
  grad_x = _call(grad, w, True)
  # An XLA dot, which the compiler removes when the gradient of `w` is not used.
  grad_w = jnp.einsum('...k,...n->kn', x, grad, preferred_element_type=jnp.float32)
  return grad_x, grad_w.astype(w.dtype)


_matmul.defvjp(_matmul_forward, _matmul_backward)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """Compute `x @ w` with oneDNN for `x` `[..., k]` and `w` `[k, n]` of one dtype (bfloat16 or
  float32)."""
  if x.dtype != w.dtype or np.dtype(x.dtype) not in DATA_TYPES:
    raise TypeError(f'oneDNN matmul takes two bfloat16 or two float32 operands, got {x.dtype} '
                    f'and {w.dtype}.')
  if w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(f'oneDNN matmul needs x [..., k] and w [k, n], got {x.shape} and {w.shape}.')
  require_cpu_backend()
  return _matmul(x, w)
