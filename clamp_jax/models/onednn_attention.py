"""Grouped-query attention whose batched products run on the CPU through oneDNN.

`model.attention='onednn'`. XLA:CPU computes the attention's small batched products (one per
batch row and head) in float32, after copying the queries, keys and values into head-major
layouts. oneDNN reads them in place through strided memory descriptors, multiplies in the
compute dtype (bfloat16 on AVX-512 BF16 or AMX), and writes the attention output straight into
the `[b, t, heads, d]` layout the output projection reads. The scores come back in float32, and
the mask and softmax stay in XLA.

Letters: b batch, t query position, s key position, k kv head, g query heads per kv head, d head
dim. Queries `[b, t, k * g, d]` view as `[b, k, g, t, d]`; keys and values `[b, s, k, d]` as
`[b, k, 1, s, d]`, broadcast over g.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from clamp_jax.models import onednn


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Compute `softmax(q k^T / sqrt(d)) v` over the keys `mask` `[b, 1, t, s]` allows.

  `q` is `[b, t, heads, d]`, and `k` and `v` are `[b, s, kv_heads, d]`, all of one dtype
  (bfloat16 or float32). The result is `[b, t, heads, d]` in that dtype. A query with every key masked gets
  uniform weights, as in the einsum path.
  """
  if not (q.dtype == k.dtype == v.dtype) or np.dtype(q.dtype) not in onednn.DATA_TYPES:
    raise TypeError(f'oneDNN attention takes bfloat16 or float32 q, k and v of one dtype, got '
                    f'{q.dtype}, {k.dtype} and {v.dtype}.')
  onednn.require_cpu_backend()
  scores = _scores(q, k) / math.sqrt(q.shape[-1])
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return _values(weights, v)


def _query_view(q: np.ndarray, kv_heads: int) -> np.ndarray:
  """View `[b, t, k * g, d]` as `[b, k, g, t, d]`, without a copy."""
  b, t, heads, d = q.shape
  return q.reshape(b, t, kv_heads, heads // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _run(src: np.ndarray, weights: np.ndarray, dst: np.ndarray, threads: int) -> None:
  onednn.library().strided_matmul(src, weights, dst, threads)


def _product(host, shape, dtype, *operands) -> jax.Array:
  return onednn.run_on_host(host, jax.ShapeDtypeStruct(shape, dtype), operands,
                            batched=(True,) * len(operands))


def _flops(*dims: int) -> None:
  onednn.add_flops(2.0 * math.prod(dims))


# Scores `[b, k, g, t, s]` (float32) = q k^T.


def _scores_host(out, q, k, *, threads):
  # k [b, s, k, d] viewed as [b, k, 1, d, s].
  _run(_query_view(q, k.shape[2]), k.transpose(0, 2, 3, 1)[:, :, None], out, threads)


def _grad_q_host(out, grad, k, *, threads):
  # d_q [b, k, g, t, d] = d_scores [b, k, g, t, s] @ k [b, k, 1, s, d].
  _run(grad, k.transpose(0, 2, 1, 3)[:, :, None], _query_view(out, k.shape[2]), threads)


def _grad_k_host(out, grad, q, *, threads):
  # Per query group: d_k [b, k, g, s, d] = d_scores^T [b, k, g, s, t] @ q [b, k, g, t, d].
  _run(grad.transpose(0, 1, 2, 4, 3), _query_view(q, out.shape[1]), out, threads)


@jax.custom_vjp
def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
  b, t, heads, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  _flops(b, heads, t, s, d)
  return _product(_scores_host, (b, kv_heads, heads // kv_heads, t, s), jnp.float32, q, k)


def _scores_forward(q, k):
  return _scores(q, k), (q, k)


def _scores_backward(residuals, grad):
  q, k = residuals
  b, t, heads, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  grad = grad.astype(q.dtype)
  _flops(2, b, heads, t, s, d)
  grad_q = _product(_grad_q_host, q.shape, q.dtype, grad, k)
  grad_k = _product(_grad_k_host, (b, kv_heads, heads // kv_heads, s, d), jnp.float32, grad, q)
  return grad_q, jnp.sum(grad_k, axis=2).transpose(0, 2, 1, 3).astype(k.dtype)


_scores.defvjp(_scores_forward, _scores_backward)


# Output `[b, t, k * g, d]` = weights v.


def _values_host(out, weights, v, *, threads):
  # weights [b, k, g, t, s] @ v [b, k, 1, s, d], written in the [b, t, k * g, d] layout.
  _run(weights, v.transpose(0, 2, 1, 3)[:, :, None], _query_view(out, v.shape[2]), threads)


def _grad_weights_host(out, grad, v, *, threads):
  # d_weights [b, k, g, t, s] = d_out [b, k, g, t, d] @ v^T [b, k, 1, d, s].
  _run(_query_view(grad, v.shape[2]), v.transpose(0, 2, 3, 1)[:, :, None], out, threads)


def _grad_v_host(out, weights, grad, *, threads):
  # Per query group: d_v [b, k, g, s, d] = weights^T [b, k, g, s, t] @ d_out [b, k, g, t, d].
  _run(weights.transpose(0, 1, 2, 4, 3), _query_view(grad, weights.shape[1]), out, threads)


@jax.custom_vjp
def _values(weights: jax.Array, v: jax.Array) -> jax.Array:
  b, kv_heads, groups, t, s = weights.shape
  d = v.shape[-1]
  _flops(b, kv_heads * groups, t, s, d)
  return _product(_values_host, (b, t, kv_heads * groups, d), v.dtype, weights, v)


def _values_forward(weights, v):
  return _values(weights, v), (weights, v)


def _values_backward(residuals, grad):
  weights, v = residuals
  b, kv_heads, groups, t, s = weights.shape
  d = v.shape[-1]
  grad = grad.astype(v.dtype)
  _flops(2, b, kv_heads * groups, t, s, d)
  grad_weights = _product(_grad_weights_host, weights.shape, jnp.float32, grad, v)
  grad_v = _product(_grad_v_host, (b, kv_heads, groups, s, d), jnp.float32, weights, grad)
  return (grad_weights.astype(weights.dtype),
          jnp.sum(grad_v, axis=2).transpose(0, 2, 1, 3).astype(v.dtype))


_values.defvjp(_values_forward, _values_backward)
