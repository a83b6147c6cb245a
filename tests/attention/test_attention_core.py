"""dot_product_attention: every CPU implementation vs a float64 NumPy reference."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from unittest import mock

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.attention import chunked as chunked_lib
from jaxformer.attention import core
from jaxformer.attention import gpu_table
from jaxformer.attention import dot_product_attention, make_causal_mask

import attention_reference as ref

ATOL, RTOL = 2e-5, 2e-4


@dataclasses.dataclass(frozen=True)
class Case:
  q_len: int
  kv_len: int | None = None          # None = q_len
  heads: int = 2
  kv_heads: int = 2
  dqk: int = 8
  dv: int = 8
  batch: int = 2
  is_causal: bool = False
  segments: str | None = None        # None | "single" | "pair"


CASES = {
    "len1": Case(1),
    "len7_causal": Case(7, is_causal=True),
    "len77_gqa_causal": Case(77, heads=4, kv_heads=2, is_causal=True),
    "len77_gqa_noncausal": Case(77, heads=4, kv_heads=2),
    "len130_segments_causal": Case(130, segments="single", is_causal=True),
    "cross_gqa_dv": Case(7, 77, heads=4, kv_heads=1, dv=6),
    "decode_alignment": Case(7, 130, is_causal=True),
    "segment_pair": Case(33, 50, heads=4, kv_heads=2, segments="pair"),
    "segment_pair_causal_long_q": Case(130, 77, segments="pair", is_causal=True),
}


def make_inputs(case: Case, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  kv_len = case.kv_len or case.q_len
  q = rng.normal(size=(case.batch, case.q_len, case.heads, case.dqk))
  k = rng.normal(size=(case.batch, kv_len, case.kv_heads, case.dqk))
  v = rng.normal(size=(case.batch, kv_len, case.kv_heads, case.dv))
  d_out = rng.normal(size=(case.batch, case.q_len, case.heads, case.dv))
  seg = None
  if case.segments == "single":
    seg = np.sort(rng.integers(0, 3, (case.batch, case.q_len)), axis=-1)
  elif case.segments == "pair":
    # id 3 never occurs among the keys: those queries have no allowed key at all.
    seg = (rng.integers(0, 4, (case.batch, case.q_len)),
           rng.integers(0, 3, (case.batch, kv_len)))
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q), cast(k), cast(v), d_out, seg


def ref_segments(seg):
  if seg is None:
    return None, None
  if isinstance(seg, tuple):
    return seg
  return seg, seg


def small_blocks():
  """Tiny chunk blocks so that the blocking logic runs at test sizes."""
  return mock.patch.multiple(chunked_lib, DEFAULT_BLOCK_Q=16, DEFAULT_BLOCK_K=32)


class ImplementationsTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True)
  @parameterized.product(implementation=("xla", "chunked"), case=tuple(CASES))
  def test_forward_and_gradients_match_reference(self, implementation, case):
    self._check_case(implementation, case)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(implementation=("xla", "chunked"),
                         case=("len7_causal", "segment_pair"))
  def test_jit_and_eager_agree_with_reference(self, implementation, case):
    self._check_case(implementation, case)

  def _check_case(self, implementation, case):
    c = CASES[case]
    q, k, v, d_out, seg = make_inputs(c)
    q_seg, kv_seg = ref_segments(seg)
    seg_arg = None if seg is None else (
        tuple(map(jnp.asarray, seg)) if isinstance(seg, tuple) else jnp.asarray(seg))

    def loss(q, k, v):
      out = dot_product_attention(q, k, v, is_causal=c.is_causal, segment_ids=seg_arg,
                                  implementation=implementation)
      return jnp.sum(out * d_out.astype(np.float32)), out

    with small_blocks():
      (_, out), grads = self.variant(jax.value_and_grad(loss, argnums=(0, 1, 2),
                                                        has_aux=True))(q, k, v)
    want_out, _, want_grads = ref.attention(q, k, v, is_causal=c.is_causal, q_seg=q_seg,
                                            kv_seg=kv_seg, d_out=d_out)
    np.testing.assert_allclose(out, want_out, atol=ATOL, rtol=RTOL)
    for name, got, want in zip("qkv", grads, want_grads):
      np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=f"d{name}")

  @parameterized.parameters("xla", "chunked")
  def test_bfloat16_within_one_percent(self, implementation):
    c = Case(77, 130, heads=4, kv_heads=2, is_causal=True)
    q, k, v, _, _ = make_inputs(c, dtype=jnp.bfloat16)
    with small_blocks():
      out = dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    self.assertEqual(out.dtype, jnp.bfloat16)
    want, _ = ref.attention(q.astype(jnp.float32), k.astype(jnp.float32),
                            v.astype(jnp.float32), is_causal=True)
    err = np.linalg.norm(np.asarray(out, np.float64) - want) / np.linalg.norm(want)
    self.assertLess(err, 1e-2)

  @parameterized.parameters("xla", "chunked")
  def test_custom_scale(self, implementation):
    q, k, v, _, _ = make_inputs(Case(33, is_causal=True))
    with small_blocks():
      out = dot_product_attention(q, k, v, is_causal=True, scale=0.7,
                                  implementation=implementation)
    want, _ = ref.attention(q, k, v, is_causal=True, scale=0.7)
    np.testing.assert_allclose(out, want, atol=ATOL, rtol=RTOL)

  def test_implementation_none_matches_xla(self):
    q, k, v, _, seg = make_inputs(CASES["len130_segments_causal"])
    got = dot_product_attention(q, k, v, is_causal=True, segment_ids=jnp.asarray(seg))
    want = dot_product_attention(q, k, v, is_causal=True, segment_ids=jnp.asarray(seg),
                                 implementation="xla")
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


class XlaAttentionTest(chex.TestCase):
  """``xla_attention`` called directly (validated inputs: rank-4 mask, explicit scale)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_reference_with_groups_segments_and_scale(self):
    c = Case(7, 9, heads=4, kv_heads=2, is_causal=True, segments="pair")
    q, k, v, _, (q_seg, kv_seg) = make_inputs(c)
    mask = np.random.default_rng(2).random((2, 1, 7, 9)) < 0.8
    out, weights = self.variant(functools.partial(
        core.xla_attention, is_causal=True, scale=0.3))(
            q, k, v, mask=jnp.asarray(mask), q_segment_ids=jnp.asarray(q_seg),
            kv_segment_ids=jnp.asarray(kv_seg))
    want, want_w = ref.attention(q, k, v, mask=mask, is_causal=True, q_seg=q_seg,
                                 kv_seg=kv_seg, scale=0.3)
    self.assertEqual(weights.dtype, jnp.float32)
    np.testing.assert_allclose(out, want, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(weights, want_w, atol=ATOL, rtol=RTOL)


class XlaOnlyOptionsTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True)
  def test_mask_and_bias(self):
    c = Case(7, 77, heads=4, kv_heads=2, dv=6)
    q, k, v, d_out, _ = make_inputs(c)
    rng = np.random.default_rng(1)
    mask = rng.random((2, 1, 7, 77)) < 0.7            # broadcast over heads
    bias = rng.normal(size=(4, 7, 77)).astype(np.float32)   # rank 3: broadcast over batch

    def loss(q, k, v):
      out = dot_product_attention(q, k, v, mask=jnp.asarray(mask), bias=jnp.asarray(bias),
                                  implementation="xla")
      return jnp.sum(out * d_out.astype(np.float32)), out

    (_, out), grads = self.variant(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
        q, k, v)
    want, _, want_grads = ref.attention(q, k, v, mask=mask, bias=bias[None], d_out=d_out)
    np.testing.assert_allclose(out, want, atol=ATOL, rtol=RTOL)
    for got, w in zip(grads, want_grads):
      np.testing.assert_allclose(got, w, atol=ATOL, rtol=RTOL)

  @chex.variants(with_jit=True)
  def test_fully_masked_rows_are_zero_with_finite_gradients(self):
    q, k, v, d_out, _ = make_inputs(Case(7, 9))
    mask = np.ones((1, 1, 7, 9), bool)
    mask[..., 2, :] = False
    mask[..., 5, :] = False

    def loss(q, k, v):
      out = dot_product_attention(q, k, v, mask=jnp.asarray(mask))
      return jnp.sum(out * d_out.astype(np.float32)), out

    (_, out), grads = self.variant(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
        q, k, v)
    np.testing.assert_array_equal(out[:, 2], 0.0)
    np.testing.assert_array_equal(out[:, 5], 0.0)
    for g in grads:
      self.assertTrue(np.all(np.isfinite(g)))
    np.testing.assert_array_equal(grads[0][:, 2], 0.0)
    _, _, want_grads = ref.attention(q, k, v, mask=mask, d_out=d_out)
    for got, w in zip(grads, want_grads):
      np.testing.assert_allclose(got, w, atol=ATOL, rtol=RTOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_hard_attention_picks_the_best_allowed_key(self):
    q, k, v, d_out, _ = make_inputs(Case(7, 11, heads=4, kv_heads=2, dv=5, is_causal=True))

    def loss(q, k, v):
      out, w = dot_product_attention(q, k, v, is_causal=True, hard=True,
                                     return_weights=True)
      return jnp.sum(out * d_out.astype(np.float32)), (out, w)

    (_, (out, w)), grads = self.variant(
        jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    want, want_w, want_grads = ref.attention(q, k, v, is_causal=True, hard=True,
                                             d_out=d_out)
    np.testing.assert_array_equal(w, want_w)
    np.testing.assert_allclose(out, want, atol=ATOL)
    # The output is exactly one value row.
    best = np.argmax(np.asarray(w), -1)                         # [B, H, Lq]
    v_rep = np.repeat(np.asarray(v), 2, axis=2)
    picked = np.take_along_axis(v_rep.transpose(0, 2, 1, 3), best[..., None], axis=2)
    np.testing.assert_array_equal(out, picked.transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(grads[0], 0.0)
    np.testing.assert_array_equal(grads[1], 0.0)
    np.testing.assert_allclose(grads[2], want_grads[2], atol=ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_straight_through_hard_attention(self):
    """One-hot forward (as hard=True); q and k get the softmax's gradients, v the
    one-hot's: all against the float64 reference."""
    c = Case(7, 11, heads=4, kv_heads=2, dv=5, is_causal=True)
    q, k, v, d_out, _ = make_inputs(c)
    scale = 0.7

    def loss(q, k, v, hard):
      out, w = dot_product_attention(q, k, v, is_causal=True, hard=hard, scale=scale,
                                     return_weights=True)
      return jnp.sum(out * d_out.astype(np.float32)), (out, w)

    grad = lambda hard: self.variant(jax.value_and_grad(  # noqa: E731
        functools.partial(loss, hard=hard), (0, 1, 2), has_aux=True))(q, k, v)
    (_, (out, w)), grads = grad("straight_through")
    (_, (hard_out, hard_w)), hard_grads = grad(True)
    want, want_w, want_grads = ref.attention(q, k, v, is_causal=True, scale=scale,
                                             hard="straight_through", d_out=d_out)
    _, _, soft_grads = ref.attention(q, k, v, is_causal=True, scale=scale, d_out=d_out)
    np.testing.assert_array_equal(w, want_w)                # exactly one-hot
    np.testing.assert_array_equal(w, hard_w)
    np.testing.assert_array_equal(out, hard_out)
    np.testing.assert_allclose(out, want, atol=ATOL)
    for i in (0, 1):   # q, k: the softmax's gradient, not zero
      self.assertGreater(float(np.abs(grads[i]).max()), 1e-3)
      np.testing.assert_allclose(grads[i], soft_grads[i], atol=ATOL, rtol=RTOL)
      np.testing.assert_allclose(grads[i], want_grads[i], atol=ATOL, rtol=RTOL)
      np.testing.assert_array_equal(hard_grads[i], 0.0)       # hard=True: still zero
    np.testing.assert_allclose(grads[2], want_grads[2], atol=ATOL)
    np.testing.assert_allclose(grads[2], hard_grads[2], atol=ATOL)

  def test_bad_hard_value(self):
    q, k, v, _, _ = make_inputs(Case(4))
    with self.assertRaisesRegex(ValueError, r"hard='argmax'.*straight_through"):
      dot_product_attention(q, k, v, hard="argmax")

  @chex.variants(with_jit=True, without_jit=True)
  def test_return_weights(self):
    c = Case(7, 13, heads=4, kv_heads=2, segments="pair")
    q, k, v, _, seg = make_inputs(c)
    out, w = self.variant(lambda q, k, v: dot_product_attention(
        q, k, v, segment_ids=tuple(map(jnp.asarray, seg)), return_weights=True))(q, k, v)
    want, want_w = ref.attention(q, k, v, q_seg=seg[0], kv_seg=seg[1])
    self.assertEqual(w.shape, (2, 4, 7, 13))
    self.assertEqual(w.dtype, jnp.float32)
    np.testing.assert_allclose(w, want_w, atol=1e-6)
    np.testing.assert_allclose(out, want, atol=ATOL, rtol=RTOL)
    row_ok = want_w.sum(-1) > 0
    np.testing.assert_allclose(np.asarray(w).sum(-1)[row_ok], 1.0, atol=1e-6)

  def test_dropout_on_weights(self):
    q, k, v, _, _ = make_inputs(Case(7))
    attend = lambda r: dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=r)
    base = dot_product_attention(q, k, v)
    same = dot_product_attention(q, k, v, dropout_rate=0.5)     # no rng: dropout off
    np.testing.assert_array_equal(base, same)
    draws = jax.jit(jax.vmap(attend))(jax.random.split(jax.random.key(2), 400))
    a, b = draws[0], draws[1]
    self.assertFalse(np.allclose(a, base))
    self.assertFalse(np.allclose(a, b))
    # Unbiased: the mean over many dropout draws approaches the deterministic output.
    mean = draws.mean(0)
    np.testing.assert_allclose(mean, base, atol=0.25)

  def test_explicit_causal_mask_equals_flag(self):
    q, k, v, _, _ = make_inputs(Case(7, 12))
    a = dot_product_attention(q, k, v, is_causal=True)
    b = dot_product_attention(q, k, v, mask=make_causal_mask(7, 12))
    np.testing.assert_allclose(a, b, atol=1e-6)


class DispatchTest(parameterized.TestCase):

  def _shapes(self, q_len, kv_len):
    return (jax.ShapeDtypeStruct((1, q_len, 2, 8), jnp.float32),
            jax.ShapeDtypeStruct((1, kv_len, 2, 8), jnp.float32),
            jax.ShapeDtypeStruct((1, kv_len, 2, 8), jnp.float32))

  def _choose(self, q_len, kv_len, **opts):
    defaults = dict(has_mask=False, has_bias=False, hard=False, return_weights=False,
                    dropout=False)
    defaults.update(opts)
    return core._choose_implementation(*self._shapes(q_len, kv_len), None, None, True,
                                       **defaults)

  def test_cpu_choice(self):
    self.assertEqual(jax.default_backend(), "cpu")
    self.assertEqual(self._choose(128, 128), "xla")
    self.assertEqual(self._choose(2048, 2048), "chunked")
    self.assertEqual(self._choose(2048, 2048, has_mask=True), "chunked")
    # Options the chunked path does not have keep the math: xla.
    for opt in ("has_bias", "hard", "return_weights", "dropout"):
      self.assertEqual(self._choose(2048, 2048, **{opt: True}), "xla", opt)

  def test_fallback_is_logged(self):
    with self.assertLogs(core.logger, "INFO") as logs:
      self._choose(2048, 2048, has_bias=True)
    self.assertIn("does not support bias", "\n".join(logs.output))

  def test_named_path_that_cannot_raises(self):
    q, k, v, _, _ = make_inputs(Case(7))
    with self.assertRaisesRegex(ValueError, "'chunked' cannot be used.*bias"):
      dot_product_attention(q, k, v, bias=jnp.ones((7, 7)), implementation="chunked")
    with self.assertRaisesRegex(ValueError, "'pallas' cannot be used.*mask"):
      dot_product_attention(q, k, v, mask=jnp.ones((7, 7), bool), implementation="pallas")
    with self.assertRaisesRegex(ValueError, "'chunked' cannot be used.*return_weights"):
      dot_product_attention(q, k, v, return_weights=True, implementation="chunked")
    with self.assertRaisesRegex(ValueError, "cuDNN needs an NVIDIA GPU"):
      dot_product_attention(q, k, v, implementation="cudnn")

  @parameterized.named_parameters(("causal_decode", Case(7, 13, heads=4, kv_heads=2,
                                                      is_causal=True)),
                                  ("causal_square_pairs", Case(9, heads=4, kv_heads=2,
                                                               is_causal=True,
                                                               segments="pair")))
  def test_cudnn_wrapper_logic(self, c):
    """The cuDNN path's mask translation, run through jax.nn's xla implementation."""
    q, k, v, _, seg = make_inputs(c)
    q_seg, kv_seg = ref_segments(seg)
    original = jax.nn.dot_product_attention
    calls = []

    def fake(*args, implementation=None, **kwargs):
      calls.append((implementation, kwargs["is_causal"], kwargs["mask"] is not None))
      return original(*args, implementation="xla", **kwargs)

    with mock.patch.object(jax.nn, "dot_product_attention", fake):
      out = core._cudnn_attention(
          q, k, v, mask=None, bias=None, is_causal=c.is_causal,
          q_segment_ids=None if seg is None else jnp.asarray(q_seg),
          kv_segment_ids=None if seg is None else jnp.asarray(kv_seg), scale=8 ** -0.5)
    # Square causal uses cuDNN's own causal flag; bottom-right needs a mask.
    self.assertEqual(calls, [("cudnn", c.kv_len is None, c.kv_len is not None
                              or seg is not None)])
    want, _ = ref.attention(q, k, v, is_causal=c.is_causal, q_seg=q_seg, kv_seg=kv_seg)
    np.testing.assert_allclose(out, want, atol=ATOL, rtol=RTOL)

  def test_pallas(self):
    """The Pallas kernel through the dispatcher (interpret mode on the CPU)."""
    c = Case(33, heads=4, kv_heads=2, segments="single", is_causal=True)
    q, k, v, _, seg = make_inputs(c)
    try:
      import kernels.flash_attention  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      with self.assertRaisesRegex(ValueError, "kernels.flash_attention"):
        dot_product_attention(q, k, v, implementation="pallas")
      return
    seg = jnp.asarray(seg)
    out = dot_product_attention(q, k, v, is_causal=True, segment_ids=seg,
                                implementation="pallas")
    want, _ = ref.attention(q, k, v, is_causal=True, q_seg=seg, kv_seg=seg)
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-3)


class GpuDefaultTest(parameterized.TestCase):
  """implementation=None on a (mocked) GPU: cuDNN unless the benchmark table says."""

  KIND = "Test GPU 80GB"

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = tmp.name
    self.enter_context(mock.patch.object(core, "_platform", lambda: "gpu"))
    self.enter_context(mock.patch.object(core, "_device_kind", lambda: self.KIND))
    self.enter_context(mock.patch.dict(os.environ, {gpu_table.ENV_VAR: self.dir}))

  def _choose(self, q_len=4096, head_dim=128, causal=True, dtype=jnp.bfloat16):
    q = jax.ShapeDtypeStruct((1, q_len, 4, head_dim), dtype)
    opts = dict(has_mask=False, has_bias=False, hard=False, return_weights=False,
                dropout=False)
    with self.assertLogs(core.logger, "INFO") as logs:
      impl = core._choose_implementation(q, q, q, None, None, causal, **opts)
    return impl, "\n".join(logs.output)

  def _write(self, fwd_ms, fwd_bwd_ms, seq_bucket=4096):
    rows = [dict(seq_bucket=seq_bucket, dtype="bfloat16", causal=True, head_dim=128,
                 mode=mode, ms=dict(pallas=ms[0], cudnn=ms[1]))
            for mode, ms in (("fwd", fwd_ms), ("fwd+bwd", fwd_bwd_ms))]
    path = os.path.join(self.dir, gpu_table.table_filename(self.KIND))
    with open(path, "w") as f:
      json.dump(dict(format=1, device_kind=self.KIND, cases=rows), f)
    self.assertEqual(gpu_table.find_table(self.KIND).name, "attention-dispatch-test-gpu-80gb.json")

  def test_no_table_means_cudnn(self):
    impl, log = self._choose()
    self.assertEqual(impl, "cudnn")
    self.assertIn("no benchmark table for 'Test GPU 80GB'", log)

  def test_table_shows_pallas_faster_in_every_mode(self):
    self._write(fwd_ms=(1.0, 1.2), fwd_bwd_ms=(3.0, 3.3))
    impl, log = self._choose(q_len=3000)  # bucket 4096
    self.assertEqual(impl, "pallas")
    self.assertIn("fwd+bwd: pallas 3.000 ms vs cudnn 3.300 ms", log)

  def test_table_shows_cudnn_faster_somewhere_or_has_no_entry(self):
    self._write(fwd_ms=(1.0, 1.2), fwd_bwd_ms=(3.5, 3.3))
    impl, log = self._choose()
    self.assertEqual(impl, "cudnn")
    self.assertIn("fwd+bwd: pallas 3.500 ms vs cudnn 3.300 ms", log)
    self.assertEqual(self._choose(q_len=8192)[0], "cudnn")  # no row for 8k
    self.assertIn("no pallas/cudnn times", self._choose(head_dim=64)[1])

  def test_cudnn_cannot_then_pallas(self):
    impl, log = self._choose(dtype=jnp.float32)
    self.assertEqual(impl, "pallas")
    self.assertIn("not 'cudnn': cuDNN attention needs bfloat16/float16", log)


class CudnnNeverRejectsTest(parameterized.TestCase):
  """Issue 18: cuDNN is only handed what JAX's cuDNN checks accept (device kind, compute
  capability and cuDNN version mocked; jax.nn's cuDNN call replaced by its XLA path)."""

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.enter_context(mock.patch.object(core, "_platform", lambda: "gpu"))
    self.enter_context(mock.patch.object(core, "_device_kind", lambda: "NVIDIA H100"))
    self.enter_context(mock.patch.dict(os.environ, {gpu_table.ENV_VAR: tmp.name}))
    core._WARNED.clear()

  def _choose(self, q_len=256, kv_len=None, head_dim=128, capability=(9, 0),
              cudnn=91300, **opts):
    q = jax.ShapeDtypeStruct((2, q_len, 4, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, kv_len or q_len, 4, head_dim), jnp.bfloat16)
    flags = dict(has_mask=False, has_bias=False, hard=False, return_weights=False,
                 dropout=False)
    flags.update(opts)
    with mock.patch.object(core, "_gpu_capability", lambda: capability), \
        mock.patch.object(core, "_cudnn_version", lambda: cudnn), \
        self.assertLogs(core.logger, "INFO") as logs:
      impl = core._choose_implementation(q, k, k, None, None, False, **flags)
    return impl, logs

  @parameterized.named_parameters(
      ("hd256_sm90_cudnn_9_13", 256, (9, 0), 91300, "cudnn"),
      ("hd256_sm90_cudnn_9_12", 256, (9, 0), 91200, "pallas"),
      ("hd256_sm80", 256, (8, 0), 91300, "pallas"),
      ("hd256_no_cudnn_version", 256, (9, 0), None, "pallas"),
      ("hd128_sm80", 128, (8, 0), 90100, "cudnn"),
      ("hd264_sm90", 264, (9, 0), 91300, "xla"))  # above every fused kernel
  def test_head_dim_by_capability_and_version(self, head_dim, capability, cudnn, want):
    impl, logs = self._choose(head_dim=head_dim, capability=capability, cudnn=cudnn)
    self.assertEqual(impl, want, logs.output)
    if want != "cudnn":
      self.assertRegex("\n".join(logs.output), r"head_dim <= (128|256)")

  def test_bias_with_odd_lengths_is_not_cudnn_and_the_fallback_warns_once(self):
    self.assertEqual(self._choose(q_len=256, has_bias=True)[0], "cudnn")
    for lengths in ((255, 256), (256, 255)):
      impl, logs = self._choose(q_len=lengths[0], kv_len=lengths[1], has_bias=True)
      self.assertEqual(impl, "xla")  # pallas and chunked take no bias
      self.assertIn("only with even lengths", "\n".join(logs.output))
      self.assertEqual([r.levelname for r in logs.records], ["WARNING"])
      _, again = self._choose(q_len=lengths[0], kv_len=lengths[1], has_bias=True)
      self.assertEqual([r.levelname for r in again.records], ["INFO"])  # once per shape
    with self.assertRaisesRegex(ValueError, "'cudnn' cannot be used.*even lengths"):
      q = jnp.ones((1, 7, 2, 8), jnp.bfloat16)
      dot_product_attention(q, q, q, bias=jnp.zeros((7, 7)), implementation="cudnn")

  @parameterized.named_parameters(
      ("bias_broadcast_along_lq", (1, 4, 1, 12), None),
      ("bias_broadcast_along_lk", (2, 1, 8, 1), None),
      ("mask_broadcast_along_lq", None, (2, 1, 1, 12)),
      ("both", (4, 1, 12), (1, 1, 8, 1)))
  def test_broadcast_bias_and_mask_reach_cudnn_full_length(self, bias_shape, mask_shape):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 8, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 12, 4, 16)), jnp.float32) for _ in range(2))
    bias = None if bias_shape is None else jnp.asarray(rng.normal(size=bias_shape),
                                                        jnp.float32)
    mask = None if mask_shape is None else jnp.asarray(
        rng.random(mask_shape) < 0.7).at[..., 0].set(True)
    seen = []
    original = jax.nn.dot_product_attention

    def fake(*args, implementation=None, **kwargs):
      for name in ("bias", "mask"):
        if kwargs.get(name) is not None:  # JAX's cuDNN check_layout: full Lq and Lk
          seen.append((name, kwargs[name].shape[-2:]))
      return original(*args, implementation="xla", **kwargs)

    with mock.patch.object(jax.nn, "dot_product_attention", fake):
      out = core._cudnn_attention(q, k, v, mask=None if mask is None else
                                  core._to_rank4(mask), bias=None if bias is None
                                  else core._to_rank4(bias), is_causal=False,
                                  q_segment_ids=None, kv_segment_ids=None,
                                  scale=0.25)
    self.assertTrue(seen)
    self.assertTrue(all(shape == (8, 12) for _, shape in seen), seen)
    want = core.xla_attention(
        q, k, v, mask=None if mask is None else core._to_rank4(mask),
        bias=None if bias is None else core._to_rank4(bias), scale=0.25)[0]
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


class ValidationTest(parameterized.TestCase):

  @parameterized.product(implementation=(None, "xla", "chunked", "pallas", "cudnn"),
                         scale=(float("nan"), float("inf")))
  def test_non_finite_scale_raises_for_every_implementation(self, implementation, scale):
    q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="expected a finite number"):
      dot_product_attention(q, q, q, scale=scale, implementation=implementation)

  def test_empty_key_sequence_in_chunked(self):
    q, k = jnp.ones((1, 4, 2, 8)), jnp.ones((1, 0, 2, 8))
    with pytest.raises(ValueError, match="key sequence is empty"):
      dot_product_attention(q, k, k, implementation="chunked")
    with pytest.raises(ValueError, match="empty sequence"):
      chunked_lib.chunked_attention(q, k, k)

  @parameterized.parameters("xla", "chunked", "pallas")
  def test_precision_reaches_the_matmuls(self, implementation):
    q = jax.ShapeDtypeStruct((1, 16, 2, 16), jnp.float32)
    text = str(jax.make_jaxpr(functools.partial(
        dot_product_attention, implementation=implementation, precision="highest"))(q, q, q))
    self.assertIn("Precision.HIGHEST", text)
    self.assertNotIn("precision=None", text)

  def test_bad_precision(self):
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="precision='tf32'"):
      dot_product_attention(q, q, q, precision="tf32")

  def _qkv(self, q_shape=(2, 5, 4, 8), k_shape=(2, 6, 2, 8), v_shape=(2, 6, 2, 3),
           dtypes=(jnp.float32,) * 3):
    return (jnp.zeros(q_shape, dtypes[0]), jnp.zeros(k_shape, dtypes[1]),
            jnp.zeros(v_shape, dtypes[2]))

  @parameterized.named_parameters(
      ("rank", dict(q_shape=(2, 5, 32)), {}, ValueError, "query must be rank 4"),
      ("batch", dict(k_shape=(3, 6, 2, 8), v_shape=(3, 6, 2, 3)), {}, ValueError,
       "batch sizes differ"),
      ("heads", dict(k_shape=(2, 6, 3, 8), v_shape=(2, 6, 3, 3)), {}, ValueError,
       "query heads 4 must be a multiple of key/value heads 3"),
      ("head_dim", dict(k_shape=(2, 6, 2, 7)), {}, ValueError,
       "query head_dim 8 != key head_dim 7"),
      ("kv_len", dict(v_shape=(2, 7, 2, 3)), {}, ValueError,
       "key length 6 != value length 7"),
      ("dtype", dict(dtypes=(jnp.float32, jnp.bfloat16, jnp.float32)), {}, TypeError,
       "share a dtype"),
      ("mask_shape", {}, dict(mask=jnp.ones((2, 1, 5, 5), bool)), ValueError,
       r"mask of shape \(2, 1, 5, 5\) does not broadcast to .* \(2, 4, 5, 6\)"),
      ("mask_dtype", {}, dict(mask=jnp.ones((5, 6), jnp.float32)), TypeError,
       "mask must be bool"),
      ("bias_shape", {}, dict(bias=jnp.ones((3, 5, 6))), ValueError,
       r"bias of shape \(3, 5, 6\) does not broadcast"),
      ("implementation", {}, dict(implementation="flash"), ValueError,
       "implementation='flash'; expected one of"),
      ("segment_single_cross", {}, dict(segment_ids=jnp.zeros((2, 5), jnp.int32)),
       ValueError, "single segment_ids array needs Lq == Lk"),
      ("segment_pair_shape", {},
       dict(segment_ids=(jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 5), jnp.int32))),
       ValueError, r"segment_ids\[1\] has shape \(2, 5\); expected .* \(2, 6\)"),
      ("segment_dtype", {},
       dict(segment_ids=(jnp.zeros((2, 5)), jnp.zeros((2, 6), jnp.int32))),
       TypeError, "must be integer"),
      ("dropout", {}, dict(dropout_rate=1.0), ValueError, "dropout_rate=1.0"),
  )
  def test_errors(self, shapes, kwargs, error, match):
    q, k, v = self._qkv(**shapes)
    with pytest.raises(error, match=match):
      dot_product_attention(q, k, v, **kwargs)
