"""Subprocess worker for the context-parallel attention tests (not a test module).

  python tests/attention/context_parallel_worker.py
      -> JSON: for each case, the largest differences between ``dot_product_attention``
         with the length sharded over a ``context`` mesh axis (4 or 8 of 8 CPU devices)
         and (a) the unsharded float32 result, (b) the float64 NumPy reference, for the
         output and the gradients of ``sum(out * d_out)``; and which collectives the
         compiled program contains.

One process serves every case (JAX can split the CPU into devices only before it
initialises); each case compiles one program (forward and backward together).
"""

from __future__ import annotations

import json
import os
import sys
import zlib

# name: (devices, mesh sizes (data, context), mode, causal, B, Lq, Lk, H, Hkv, D,
#        segments, key mask, block kernel: None = the default, an einsum per block
#        at these sizes on the CPU)
CASES = {
    "4dev_ring_causal_gqa_segments_odd": (4, (1, 4), "ring", True, 2, 30, 30, 4, 2, 8,
                                          True, False, "chunked"),
    "4dev_ring_full_cross_keymask_odd": (4, (1, 4), "ring", False, 2, 13, 22, 2, 1, 8,
                                         False, True, None),
    "4dev_allgather_causal_bottom_right_gqa": (4, (1, 4), "all_gather", True, 1, 10, 24,
                                               4, 2, 8, False, False, None),
    "4dev_ring_causal_pallas_segments": (4, (1, 4), "ring", True, 1, 32, 32, 2, 1, 16,
                                         True, False, "pallas"),
    "8dev_ring_causal_gqa_segments": (8, (1, 8), "ring", True, 2, 48, 48, 4, 2, 8, True,
                                      False, None),
    "8dev_data2_ring_full_segments": (8, (2, 4), "ring", False, 2, 24, 24, 4, 2, 8, True,
                                      False, None),
}


def _segments(rng, batch, length):
  import numpy as np  # pylint: disable=g-import-not-at-top
  # Sorted random ids: packed documents of random lengths, some crossing shards.
  return np.sort(rng.integers(0, 4, (batch, length)), axis=1).astype(np.int32)


def run_case(name, spec):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from jaxformer import axes  # pylint: disable=g-import-not-at-top
  from jaxformer.attention import core  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(__file__))
  import attention_reference as ref  # pylint: disable=g-import-not-at-top

  (ndev, mesh_sizes, mode, causal, b, lq, lk, h, hkv, d, segments, keymask,
   block) = spec
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  q = rng.normal(size=(b, lq, h, d)).astype(np.float32)
  k = rng.normal(size=(b, lk, hkv, d)).astype(np.float32)
  v = rng.normal(size=(b, lk, hkv, d)).astype(np.float32)
  d_out = rng.normal(size=(b, lq, h, d)).astype(np.float32)
  seg = _segments(rng, b, lq) if segments else None
  mask = None
  if keymask:
    valid = rng.random((b, lk)) < 0.7
    valid[:, 0] = True
    mask = valid[:, None, None, :]

  def attend(q, k, v, d_out, seg, mask, **kw):
    def f(q, k, v):
      return core.dot_product_attention(q, k, v, is_causal=causal, segment_ids=seg,
                                        mask=mask, **kw)
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(d_out)

  # Unsharded float32 (the xla path, no mesh) and the float64 reference.
  want32 = [np.asarray(x) for x in attend(q, k, v, d_out, seg, mask,
                                          implementation="xla")]
  want64 = ref.attention(q, k, v, mask=mask, is_causal=causal, q_seg=seg, kv_seg=seg,
                         d_out=d_out)
  want64 = [want64[0]] + list(want64[2])

  devices = jax.devices()[:ndev]
  mesh = jax.make_mesh(mesh_sizes, ("data", "context"), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = ((axes.ACT_BATCH, "data"), (axes.ACT_LENGTH, "context"),
           (axes.ACT_HEADS, None), (axes.ACT_KV_HEADS, None))
  lengthwise = NamedSharding(mesh, P("data", "context"))
  put = lambda x: None if x is None else jax.device_put(  # noqa: E731
      x, lengthwise if x.shape[1] % mesh_sizes[1] == 0 else NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fn = jax.jit(lambda *a: attend(*a, implementation=block, context_parallel=mode))
    args = (put(q), put(k), put(v), put(d_out), put(seg), mask)
    compiled = fn.lower(*args).compile()
    got = [np.asarray(x) for x in compiled(*args)]
  hlo = compiled.as_text()
  names = ("out", "dq", "dk", "dv")
  return {
      "vs_unsharded": {n: float(np.max(np.abs(g - w))) for n, g, w in zip(names, got, want32)},
      "vs_float64": {n: float(np.max(np.abs(g - w))) for n, g, w in zip(names, got, want64)},
      "scale": {n: float(np.max(np.abs(w))) for n, w in zip(names, want64)},
      "collective_permute": "collective-permute" in hlo,
      "all_gather": "all-gather" in hlo,
  }


def main():
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", 8)
  jax.config.update("jax_numpy_rank_promotion", "raise")
  names = sys.argv[1:] or list(CASES)
  print(json.dumps({name: run_case(name, CASES[name]) for name in names}))


if __name__ == "__main__":
  main()
