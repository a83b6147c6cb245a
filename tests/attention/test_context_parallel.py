"""Context-parallel attention (ring.py): block kernels with lse, option checks, and the
sharded == unsharded equivalence on 4 and 8 CPU devices (one subprocess, all cases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.attention import chunked as chunked_lib
from jaxformer.attention import core
from jaxformer.attention import ring

import attention_reference as ref
import context_parallel_worker as worker

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _qkv(b, lq, lk, h, hkv, d, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
  return f(b, lq, h, d), f(b, lk, hkv, d), f(b, lk, hkv, d), f(b, lq, h, d)


def _lse64(q, k, *, is_causal, q_seg, kv_seg, scale):
  """Float64 log-sum-exp ``[B, H, Lq]`` of the allowed scaled logits (-inf if none)."""
  b, lq, h, _ = q.shape
  k_rep = np.repeat(np.asarray(k, np.float64), h // k.shape[2], axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), k_rep) * scale
  allowed = ref.allowed_mask(b, h, lq, k.shape[1], is_causal=is_causal, q_seg=q_seg,
                             kv_seg=kv_seg)
  masked = np.where(allowed, logits, -np.inf)
  top = np.max(np.where(allowed, logits, -1e300), axis=-1, keepdims=True)
  with np.errstate(divide="ignore"):
    return np.log(np.sum(np.exp(masked - top), axis=-1)) + top[..., 0]


class BlockKernelTest(chex.TestCase, parameterized.TestCase):
  """The ring's CPU block kernels: forward with lse, backward from a given out/lse.
  (The Pallas pair is checked through the ring in the multi-device worker.)"""

  def _check(self, fwd, bwd, empty_lse, *, causal, seg, atol):
    # Lq > Lk causal leaves the first rows with no key (zeros, the "empty" lse).
    q, k, v, d_out = _qkv(2, 21, 13, 4, 2, 16)
    q_seg = kv_seg = None
    if seg:
      rng = np.random.default_rng(1)
      q_seg, kv_seg = (np.sort(rng.integers(0, 3, (2, n)), axis=1).astype(np.int32)
                       for n in (21, 13))
    scale = 0.3
    out, lse = fwd(q, k, v, causal, q_seg, kv_seg, scale)
    want, _, want_grads = ref.attention(q, k, v, is_causal=causal, q_seg=q_seg,
                                        kv_seg=kv_seg, scale=scale, d_out=d_out)
    want_lse = _lse64(q, k, is_causal=causal, q_seg=q_seg, kv_seg=kv_seg, scale=scale)
    np.testing.assert_allclose(out, want, atol=atol, rtol=atol)
    seen = np.isfinite(want_lse)
    self.assertFalse(seen.all() and causal)   # the test has empty rows when causal
    np.testing.assert_allclose(np.asarray(lse)[seen], want_lse[seen], atol=atol,
                               rtol=atol)
    np.testing.assert_array_equal(np.asarray(lse)[~seen], np.float32(empty_lse))
    grads = bwd(q, k, v, out, lse, d_out, causal, q_seg, kv_seg, scale)
    for got, w in zip(grads, want_grads):
      np.testing.assert_allclose(got, w, atol=atol, rtol=atol)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((False, True), (True, True))
  def test_einsum_block(self, causal, seg):
    """The ring's small-block kernel (an einsum); tolerance 2e-5."""
    cfg = ring._Ring(axis="context", size=1, causal=causal, scale=0.3, precision=None,
                     impl="einsum", mode="ring")
    fwd = self.variant(lambda q, k, v, c, qs, ks, s: ring._einsum_fwd(
        cfg, q, k, v, qs, ks, c), static_argnums=(3, 6))
    bwd = self.variant(lambda q, k, v, o, l, g, c, qs, ks, s: ring._einsum_bwd(
        cfg, q, k, v, qs, ks, o, l, g, c), static_argnums=(6, 9))
    self._check(fwd, bwd, 1e30, causal=causal, seg=seg, atol=2e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((False, True), (True, True))
  def test_chunked_with_lse(self, causal, seg):
    """Tolerance 2e-5 (float32 against float64)."""
    fwd = self.variant(lambda q, k, v, c, qs, ks, s: chunked_lib.attention_with_lse(
        q, k, v, is_causal=c, q_segment_ids=qs, kv_segment_ids=ks, scale=s),
                       static_argnums=(3, 6))
    bwd = self.variant(lambda q, k, v, o, l, g, c, qs, ks, s: chunked_lib.attention_backward(
        q, k, v, o, l, g, is_causal=c, q_segment_ids=qs, kv_segment_ids=ks, scale=s),
                       static_argnums=(6, 9))
    self._check(fwd, bwd, 1e30, causal=causal, seg=seg, atol=2e-5)


class OptionsTest(parameterized.TestCase):

  def test_bad_mode_is_named(self):
    q, k, v, _ = _qkv(1, 8, 8, 2, 2, 8)
    with self.assertRaisesRegex(ValueError, "context_parallel='ringg'.*'all_gather'"):
      core.dot_product_attention(q, k, v, context_parallel="ringg")
    with self.assertRaisesRegex(ValueError, "context_parallel=3"):
      with ring.context_parallel(3):
        pass

  def test_context_manager_sets_and_restores(self):
    self.assertEqual(ring.current_mode(), "ring")
    with ring.context_parallel("all_gather"):
      self.assertEqual(ring.current_mode(), "all_gather")
    self.assertEqual(ring.current_mode(), "ring")

  def test_no_context_axis_no_layout(self):
    q, k, _, _ = _qkv(1, 8, 8, 2, 2, 8)
    self.assertIsNone(ring.active_layout(q, k))
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
      self.assertIsNone(ring.active_layout(q, k))

  def test_layout_from_mesh_and_rules(self):
    """A context axis > 1 that the rules map the length onto, and lengths >= its size
    (a decoding step of one query stays unsharded); non-dividing axes are dropped."""
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    from jaxformer import axes  # pylint: disable=g-import-not-at-top
    mesh = jax.sharding.AbstractMesh((2, 1, 4), ("data", "tensor", "context"))
    rules = ((axes.ACT_BATCH, "data"), (axes.ACT_LENGTH, "context"),
             (axes.ACT_HEADS, "tensor"), (axes.ACT_KV_HEADS, "tensor"))
    q = jax.ShapeDtypeStruct((2, 8, 4, 8), jnp.float32)
    k = jax.ShapeDtypeStruct((2, 8, 2, 8), jnp.float32)
    with jax.sharding.use_abstract_mesh(mesh):
      with nn.logical_axis_rules(rules):
        layout = ring.active_layout(q, k)
        self.assertEqual((layout.size, layout.batch_axes, layout.heads_axes),
                         (4, ("data",), ("tensor",)))
        odd_batch = jax.ShapeDtypeStruct((3, 8, 4, 8), jnp.float32)
        self.assertEqual(ring.active_layout(odd_batch, k).batch_axes, ())
        one_query = jax.ShapeDtypeStruct((2, 1, 4, 8), jnp.float32)
        self.assertIsNone(ring.active_layout(one_query, k))
      with nn.logical_axis_rules(((axes.ACT_LENGTH, None),)):
        self.assertIsNone(ring.active_layout(q, k))

  @parameterized.parameters(
      (dict(has_bias=True), "bias"), (dict(hard=True), "hard"),
      (dict(return_weights=True), "return_weights"), (dict(dropout=True), "dropout"),
      (dict(mask=np.ones((1, 2, 8, 8), bool)), "key padding mask"))
  def test_unsupported_options_are_named(self, kw, word):
    args = dict(has_bias=False, hard=False, return_weights=False, dropout=False,
                mask=None)
    self.assertIsNone(ring.unsupported(**args))
    args.update(kw)
    self.assertIn(word, ring.unsupported(**args))

  def test_shard_map_is_available(self):
    f = ring.shard_map(lambda x: x * 2, mesh=jax.make_mesh(
        (1,), ("context",), axis_types=(jax.sharding.AxisType.Auto,)),
                       in_specs=jax.sharding.PartitionSpec("context"),
                       out_specs=jax.sharding.PartitionSpec("context"))
    np.testing.assert_array_equal(f(jnp.arange(4.0)), np.arange(4.0) * 2)


@pytest.fixture(scope="module")
def multidevice():
  """Runs every case of context_parallel_worker.py in one 8-device subprocess."""
  env = dict(os.environ)
  env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "tests/attention/context_parallel_worker.py"],
                        cwd=_REPO, env=env, capture_output=True, text=True, timeout=900,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_equals_unsharded_on_4_and_8_devices(multidevice):
  """Every case of the worker (one subprocess; one test, so that pytest-xdist never runs
  the subprocess twice): forward and gradients within 1e-5 of the unsharded float32
  result (max abs difference; values are O(1)) and 2e-5 of the float64 reference; ring
  mode compiles to collective-permutes, and with lengths a multiple of 2N to no
  all-gather at all (K/V never gathered); all-gather mode gathers."""
  assert sorted(multidevice) == sorted(worker.CASES)
  for name, result in multidevice.items():
    for what, err in result["vs_unsharded"].items():
      assert err <= 1e-5, (name, what, result)
    for what, err in result["vs_float64"].items():
      assert err <= 2e-5, (name, what, result)
    case = worker.CASES[name]
    if case[2] == "ring":
      assert result["collective_permute"], name
      if case[5] % (2 * case[1][1]) == 0 and case[6] % (2 * case[1][1]) == 0:
        assert not result["all_gather"], name
    else:
      assert result["all_gather"], name


_A100 = jax.sharding.AbstractDevice(device_kind="NVIDIA A100-SXM4-80GB", platform="gpu",
                                    num_cores=108)


def test_ring_with_pallas_blocks_lowers_for_cuda():
  """Without a GPU: the ring (forward and backward) over an abstract 4-device A100 mesh
  lowers for cuda with the Triton kernel as its block kernel and collective-permutes
  between the blocks."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from jax import export  # pylint: disable=g-import-not-at-top
  from jaxformer import axes  # pylint: disable=g-import-not-at-top

  def grads(q, k, v):
    def loss(q, k, v):
      return jnp.sum(core.dot_product_attention(
          q, k, v, is_causal=True, implementation="pallas").astype(jnp.float32))
    return jax.grad(loss, (0, 1, 2))(q, k, v)

  structs = [jax.ShapeDtypeStruct((1, 256, h, 64), jnp.bfloat16) for h in (4, 2, 2)]
  mesh = jax.sharding.AbstractMesh((4,), (ring.CONTEXT_AXIS,), abstract_device=_A100)
  rules = ((axes.ACT_LENGTH, ring.CONTEXT_AXIS),)
  with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(rules):
    text = export.export(jax.jit(grads), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            *structs).mlir_module()
  assert "collective_permute" in text
  assert text.count("__gpu$xla.gpu.triton") >= 4   # forward and backward blocks
  assert "all_gather" not in text
