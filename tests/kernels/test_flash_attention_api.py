"""Flash attention: cross-lowering for cuda/tpu, supports(), errors, tiles,
autotune. No kernel runs here except the autotune test (interpret mode)."""

from __future__ import annotations

import dataclasses

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from kernels import flash_attention
from kernels.flash_attention import BlockSizes
from kernels.flash_attention import api
from kernels.flash_attention import autotune
from kernels.flash_attention import supports

TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALL = "tpu_custom_call"
DISABLED = [export.DisabledSafetyCheck.custom_call(TRITON_CALL),
            export.DisabledSafetyCheck.custom_call(MOSAIC_CALL)]


def _structs(batch=1, q_len=256, kv_len=256, heads=4, kv_heads=2, head_dim=64,
             dtype=jnp.bfloat16):
  return (jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dtype),
          jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dtype),
          jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dtype))


def _export(fn, platforms, *args):
  exported = export.export(jax.jit(fn), platforms=platforms,
                           disabled_checks=DISABLED)(*args)
  return exported.mlir_module()


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
    # forward + backward kernels (Triton: preprocess, dK/dV, dQ; Mosaic:
    # dK/dV, dQ; delta in XLA).
    self.assertEqual(text.count(call), 4 if platform == "cuda" else 3)
    self.assertNotIn(MOSAIC_CALL if platform == "cuda" else TRITON_CALL, text)

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
    for backend in ("triton", "mosaic"):
      for head_dim in (32, 64, 128, 256):
        blocks = BlockSizes.get_default(backend, head_dim)
        blocks.validate(backend)
        self.assertEqual(hash(blocks), hash(dataclasses.replace(blocks)))

  def test_fit_shrinks_for_short_sequences(self):
    blocks = BlockSizes.get_default("triton", 64).fit(1, 37, "triton")
    self.assertEqual(blocks.q_blocks(), (16, 16, 16))
    self.assertEqual(blocks.k_blocks(), (64, 64, 32))
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
    self.assertEqual(BlockSizes(block_q=64).dkv, (16, 64))
    self.assertEqual(BlockSizes(block_q=64).dq, (64, 16))


class AutotuneTest(parameterized.TestCase):

  def tearDown(self):
    api.TUNED_BLOCK_SIZES.clear()
    super().tearDown()

  def test_picks_a_candidate_caches_it_and_flash_attention_uses_it(self):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 32, 2, 16)), jnp.float32)
               for _ in range(3))
    good = [BlockSizes(block_q=16, block_k=16), BlockSizes(block_q=32,
                                                           block_k=32)]
    bad = BlockSizes(block_q=24, block_k=16)  # not a power of two: skipped
    best = autotune(q, k, v, is_causal=True, candidates=[bad, *good], reps=1,
                    include_backward=False, interpret=True)
    self.assertIn(best, good)
    key = api.tuning_key(q, k, v, is_causal=True, has_segments=False,
                         backend="triton")
    self.assertEqual(api.TUNED_BLOCK_SIZES[key], best)
    # flash_attention(block_sizes=None) consults the cache: the Triton
    # forward's grid is (q_len // block_q, batch, heads).
    def triton_grids(tiles):
      api.TUNED_BLOCK_SIZES[key] = tiles
      text = str(jax.make_jaxpr(
          lambda *a: flash_attention(*a, is_causal=True))(q, k, v))
      return text
    self.assertIn("grid=(2, 1, 2)", triton_grids(good[0]))
    self.assertIn("grid=(1, 1, 2)", triton_grids(good[1]))
    with pytest.raises(ValueError, match="no candidate"):
      autotune(q, k, v, candidates=[bad], reps=1, include_backward=False,
               interpret=True)
