"""Measure host memory while loading a multi-file safetensors checkpoint into shards.

Usage: python tests/sharded/measure_loading.py CHECKPOINT_DIR FSDP_SIZE
Run with XLA_FLAGS=--xla_force_host_platform_device_count=8. Prints one JSON line:
  baseline_bytes: peak resident memory before loading (imports, JAX started);
  peak_bytes: peak resident memory at the end (the whole process lifetime);
  device_bytes: bytes held by the loaded arrays on all (CPU) devices together, which on this
    machine live in host memory but on an accelerator would not;
  largest_tensor_bytes: the largest tensor of the checkpoint;
  overhead_bytes: peak_bytes - baseline_bytes - device_bytes, the transient host memory of loading.
"""

import json
import resource
import sys

import jax
import ml_collections
import numpy as np
from flax import nnx

from clamp_jax import parallel
from clamp_jax.weights.hf_folder import load_hf_folder


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


def main(folder: str, fsdp: int) -> None:
  mesh_config = ml_collections.ConfigDict(dict(data=-1, fsdp=fsdp, tensor=1))
  mesh = parallel.make_mesh(mesh_config)
  rules = (('embed', 'fsdp'), ('vocab', 'tensor'), ('heads', 'tensor'), ('kv_heads', 'tensor'),
           ('mlp', 'tensor'))
  jax.numpy.zeros(8).block_until_ready()  # Start the runtime before the baseline.
  baseline = peak_rss_bytes()
  model = load_hf_folder(folder, place=parallel.sharded_placer(mesh, rules))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  device_bytes = sum(shard.data.nbytes for leaf in leaves for shard in leaf.addressable_shards)
  largest = max(leaf.nbytes for leaf in leaves)
  specs = {str(leaf.sharding.spec) for leaf in leaves}
  peak = peak_rss_bytes()
  print(json.dumps({
      'baseline_bytes': baseline, 'peak_bytes': peak, 'device_bytes': int(device_bytes),
      'model_bytes': int(sum(leaf.nbytes for leaf in leaves)), 'largest_tensor_bytes': int(largest),
      'overhead_bytes': int(peak - baseline - device_bytes), 'specs': sorted(specs),
      'checksum': float(sum(np.asarray(leaf, np.float64).sum() for leaf in leaves[:3])),
  }))


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]))
