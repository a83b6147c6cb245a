"""Flash attention: cross-lowering for cuda/tpu, supports(), errors, tiles,
autotune. No kernel runs here except the autotune test (interpret mode)."""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from kernels import flash_attention
from kernels.flash_attention import BlockSizes
from kernels.flash_attention import BlockTable
from kernels.flash_attention import autotune
from kernels.flash_attention import autotune_table
from kernels.flash_attention import common
from kernels.flash_attention import supports
from kernels.flash_attention.block_sizes import DEFAULTS
from kernels.flash_attention.block_table import TableKey

TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALL = "tpu_custom_call"
DISABLED = [export.DisabledSafetyCheck.custom_call(TRITON_CALL),
            export.DisabledSafetyCheck.custom_call(MOSAIC_CALL)]


def _structs(batch=1, q_len=256, kv_len=256, heads=4, kv_heads=2, head_dim=64,
             dtype=jnp.bfloat16):
  return (jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dtype),
          jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dtype),
          jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dtype))


# jax >= 0.11 asks the Triton lowering for the target GPU (its compute capability) and,
# with no GPU attached, takes it from an abstract mesh: a pre-Hopper one, so that the
# automatic backend is Triton (Hopper would pick Mosaic GPU for bf16/fp16).
A100 = jax.sharding.AbstractDevice(device_kind="NVIDIA A100-SXM4-80GB", platform="gpu",
                                   num_cores=108)


def _export(fn, platforms, *args):
  export_fn = export.export(jax.jit(fn), platforms=platforms, disabled_checks=DISABLED)
  if "cuda" not in platforms or jax.devices()[0].platform == "gpu":
    return export_fn(*args).mlir_module()
  with jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((), (), abstract_device=A100)):
    return export_fn(*args).mlir_module()


def _tmp_json(test) -> str:
  tmp = tempfile.TemporaryDirectory()
  test.addCleanup(tmp.cleanup)
  return os.path.join(tmp.name, "table.json")


class LoweringTest(parameterized.TestCase):
  """jax.export lowers the real kernels for cuda (Triton) and tpu (Mosaic)."""

  @parameterized.product(platform=("cuda", "tpu"), head_dim=(64, 128),
                         is_causal=(False, True))
  def test_forward_and_backward_lower(self, platform, head_dim, is_causal):
    q, k, v = _structs(head_dim=head_dim)
    ids = jax.ShapeDtypeStruct((1, 256), jnp.int32) if is_causal else None
    call = TRITON_CALL if platform == "cuda" else MOSAIC_CALL

    def fwd(q, k, v, ids):
      return flash_attention(q, k, v, is_causal=is_causal, segment_ids=ids)

    def fwd_bwd(q, k, v, ids):
      return jax.grad(lambda *a: jnp.sum(fwd(*a, ids).astype(jnp.float32)),
                      argnums=(0, 1, 2))(q, k, v)

    text = _export(fwd, [platform], q, k, v, ids)
    self.assertEqual(text.count(call), 1)
    text = _export(fwd_bwd, [platform], q, k, v, ids)
    # forward + backward kernels (dK/dV, dQ; delta in XLA).
    self.assertEqual(text.count(call), 3)
    self.assertNotIn(MOSAIC_CALL if platform == "cuda" else TRITON_CALL, text)

  @parameterized.parameters(64, 128, 256)
  def test_triton_unaligned_segments_gqa_lower_for_cuda(self, head_dim):
    # Masked loads at the ends, tile skipping on segment ids, per-query-head
    # dK/dV partials: all must lower for cuda with the default tiles.
    q, k, v = _structs(q_len=200, kv_len=300, heads=4, kv_heads=1,
                       head_dim=head_dim)
    ids = (jax.ShapeDtypeStruct((1, 200), jnp.int32),
           jax.ShapeDtypeStruct((1, 300), jnp.int32))

    def fwd_bwd(q, k, v, ids):
      return jax.grad(lambda *a: jnp.sum(flash_attention(
          *a, is_causal=True, segment_ids=ids).astype(jnp.float32)),
                      argnums=(0, 1, 2))(q, k, v)

    text = _export(fwd_bwd, ["cuda"], q, k, v, ids)
    self.assertEqual(text.count(TRITON_CALL), 3)

  def test_odd_shapes_lower_and_cpu_gets_interpret_mode(self):
    # Padded inside: lengths 100/300, head dim 80, GQA 4:2.
    q, k, v = _structs(q_len=100, kv_len=300, head_dim=80)
    fn = lambda *a: flash_attention(*a, is_causal=True)  # noqa: E731
    self.assertIn(TRITON_CALL, _export(fn, ["cuda"], q, k, v))
    self.assertIn(MOSAIC_CALL, _export(fn, ["tpu"], q, k, v))
    cpu = _export(fn, ["cpu"], q, k, v)  # the interpreted kernel: plain HLO
    self.assertNotIn(TRITON_CALL, cpu)
    self.assertNotIn(MOSAIC_CALL, cpu)


class SupportsAndErrorsTest(parameterized.TestCase):

  def test_supported_on_accelerators(self):
    q, k, v = _structs()
    for platform in ("cuda", "gpu", "rocm", "tpu"):
      self.assertIsNone(supports(q, k, v, platform=platform))
    self.assertIn("interpret", supports(q, k, v, platform="cpu"))

  @parameterized.named_parameters(
      ("head_dim_too_big", dict(head_dim=320), "head_dim = 320"),
      ("heads_not_multiple", dict(heads=3, kv_heads=2), "multiple"),
      ("float64", dict(dtype=jnp.float64), "dtype"),
  )
  def test_unsupported_inputs(self, kwargs, message):
    q, k, v = _structs(**kwargs)
    reason = supports(q, k, v, platform="cuda")
    self.assertIsInstance(reason, str)
    self.assertIn(message, reason)
    error = TypeError if "dtype" in kwargs else ValueError
    with self.assertRaisesRegex(error, message):
      # NumPy arrays: float64 exists there without jax_enable_x64.
      flash_attention(np.zeros(q.shape, q.dtype), np.zeros(k.shape, k.dtype),
                      np.zeros(v.shape, v.dtype))

  def test_bad_segment_ids_and_arguments(self):
    q, k, v = (jnp.zeros(s.shape, jnp.float32) for s in _structs(q_len=8,
                                                                 kv_len=12))
    with self.assertRaisesRegex(ValueError, "q_len == kv_len"):
      flash_attention(q, k, v, segment_ids=jnp.zeros((1, 8), jnp.int32))
    with self.assertRaisesRegex(ValueError, "kv segment ids"):
      flash_attention(q, k, v, segment_ids=(jnp.zeros((1, 8), jnp.int32),
                                            jnp.zeros((1, 8), jnp.int32)))
    with self.assertRaisesRegex(TypeError, "integers"):
      flash_attention(q, k, v, segment_ids=(jnp.zeros((1, 8)),
                                            jnp.zeros((1, 12))))
    with self.assertRaisesRegex(ValueError, "backend"):
      flash_attention(q, k, v, backend="cuda")
    with self.assertRaisesRegex(ValueError, "power of 2"):
      x = jnp.zeros((1, 64, 2, 16))
      flash_attention(x, x, x, block_sizes=BlockSizes(block_q=24, block_k=16))
    self.assertIn("key head_dim", supports(q, k[..., :8], v))


class BlockSizesTest(parameterized.TestCase):

  def test_defaults_are_valid_and_hashable(self):
    self.assertEqual(set(DEFAULTS), {"triton", "mosaic", "mosaic_gpu"})
    for backend in DEFAULTS:
      for head_dim in (32, 64, 128, 256):
        blocks = BlockSizes.get_default(backend, head_dim)
        blocks.validate(backend)
        self.assertEqual(hash(blocks), hash(dataclasses.replace(blocks)))
        if backend == "triton":  # backward tiles stay on the tensor cores
          self.assertGreaterEqual(min(blocks.dkv + blocks.dq), 64)
    with self.assertRaisesRegex(ValueError, "exceeds"):
      BlockSizes.get_default("triton", 512)
    with self.assertRaises(TypeError):
      DEFAULTS["triton"] = ()  # read-only data

  def test_fit_shrinks_for_short_sequences(self):
    blocks = BlockSizes.get_default("triton", 64).fit(1, 37, "triton")
    self.assertEqual(blocks.q_blocks(), (16, 16, 16))
    self.assertEqual(blocks.k_blocks(), (64, 64, 64))
    blocks.validate("triton")
    mosaic = BlockSizes.get_default("mosaic", 64).fit(5, 300, "mosaic")
    self.assertEqual(mosaic.block_q, 8)
    self.assertEqual(mosaic.block_k, 128)

  def test_rules(self):
    with self.assertRaisesRegex(ValueError, "positive int"):
      BlockSizes(block_q=0)
    with self.assertRaisesRegex(ValueError, "multiple of 128"):
      BlockSizes(block_q=128, block_k=64).validate("mosaic")
    BlockSizes(block_q=8, block_k=16).validate("mosaic", interpret=True)
    self.assertEqual(BlockSizes(block_q=128).dkv, (64, 128))
    self.assertEqual(BlockSizes(block_q=128).dq, (128, 64))
    with self.assertRaisesRegex(ValueError, "multiple of 64"):
      BlockSizes(block_q=128, block_k=32).validate("mosaic_gpu")
    self.assertEqual(
        BlockSizes.get_default("mosaic_gpu", 64).fit(5, 300,
                                                     "mosaic_gpu").block_q, 128)

  def test_segment_tile_bounds(self):
    ids = jnp.asarray([[0, 0, 1, 1, 1, 2, 2]], jnp.int32)
    bounds = common.segment_tile_bounds(ids, 3, 3)  # padded with the last id
    np.testing.assert_array_equal(bounds, [[[0, 1, 2], [1, 2, 2]]])
    meet = [[bool(common.tiles_meet(bounds[0], i, bounds[0], j))
             for j in range(3)] for i in range(3)]
    self.assertEqual(meet, [[True, True, False], [True, True, True],
                            [False, True, True]])


class BlockTableTest(parameterized.TestCase):

  def test_json_round_trip_lookup_and_replace(self):
    key = TableKey.of("triton", (1, 100, 4, 64), (1, 300, 2, 64),
                      (1, 300, 2, 32), jnp.bfloat16, causal=True,
                      segments=False)
    self.assertEqual((key.q_bucket, key.kv_bucket, key.dtype), (128, 512,
                                                                "bfloat16"))
    tiles = BlockSizes(block_q=64, block_k=32)
    table = BlockTable(device_kind="NVIDIA H100").with_entry(key, tiles)
    path = _tmp_json(self)
    table.save(path)
    loaded = BlockTable.load(path)
    self.assertEqual(loaded, table)
    self.assertEqual(hash(loaded), hash(table))
    self.assertEqual(loaded.lookup(key), tiles)
    self.assertIsNone(loaded.lookup(dataclasses.replace(key, causal=False)))
    other = BlockSizes(block_q=16, block_k=16)
    self.assertEqual(loaded.with_entry(key, other).entries, ((key, other),))
    with self.assertRaisesRegex(ValueError, "duplicate"):
      BlockTable(entries=((key, tiles), (key, other)))
    with self.assertRaisesRegex(ValueError, "format"):
      BlockTable.from_json({"entries": []})


class AutotuneTest(parameterized.TestCase):

  def test_tunes_into_a_table_that_flash_attention_uses(self):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 32, 2, 16)), jnp.float32)
               for _ in range(3))
    good = [BlockSizes(block_q=16, block_k=16), BlockSizes(block_q=32,
                                                           block_k=32)]
    bad = BlockSizes(block_q=24, block_k=16)  # not a power of two: an error
    path = _tmp_json(self)
    table = autotune_table([dict(query=q, key=k, value=v, is_causal=True)],
                           path=path, candidates=good, reps=1,
                           include_backward=False, interpret=True)
    self.assertEqual(BlockTable.load(path), table)
    ((key, best),) = table.entries
    self.assertIn(best, good)
    self.assertEqual((key.backend, key.causal, key.q_bucket), ("triton", True,
                                                              32))

    # The table is an explicit argument: the Triton forward's grid is
    # (heads, batch, q_len // block_q); without it the defaults apply.
    def grid(block_sizes):
      return str(jax.make_jaxpr(lambda *a: flash_attention(
          *a, is_causal=True, block_sizes=block_sizes))(q, k, v))
    for tiles, want in ((good[0], "grid=(2, 1, 2)"),
                        (good[1], "grid=(2, 1, 1)")):
      self.assertIn(want, grid(table.with_entry(key, tiles)))
    self.assertIn("grid=(2, 1, 1)", grid(None))  # 32 rows: one default tile
    with pytest.raises(ValueError, match="1 candidate.*break the 'triton'.*block_q"):
      autotune(q, k, v, candidates=[good[0], bad], reps=1, include_backward=False,
               interpret=True)
    with pytest.raises(ValueError, match="unknown case keys"):
      autotune_table([dict(query=q, key=k, value=v, causal=True)])


class PrecisionTest(parameterized.TestCase):

  @parameterized.parameters((None, jnp.float32, "HIGHEST"),
                            ("default", jnp.float32, "DEFAULT"),
                            (None, jnp.bfloat16, "DEFAULT"),
                            (jax.lax.Precision.HIGH, jnp.float32, "HIGH"))
  def test_float32_is_not_silently_tf32(self, precision, dtype, want):
    x = jax.ShapeDtypeStruct((1, 32, 2, 16), dtype)
    text = str(jax.make_jaxpr(lambda *a: flash_attention(
        *a, precision=precision, backend="triton"))(x, x, x))
    found = set(re.findall(r"precision=\(Precision\.(\w+), ", text))
    self.assertEqual(found, {want})

  def test_bad_precision(self):
    x = jnp.zeros((1, 8, 1, 16))
    with self.assertRaisesRegex(ValueError, "precision must be"):
      flash_attention(x, x, x, precision="tf32")
