"""Mosaic GPU (Hopper) flash attention, tested on the CPU.

* Numerics: the shared kernel test body (`FlashAttentionTestBase`: odd
  lengths, causal, segments, GQA, cross lengths, bf16), and cases with
  several CTAs whose K/V (or Q/dO) rings wrap around in all three kernels
  (causal, segments, GQA, Lq != Lk, d_v != d_qk, head dim 256, fp16 and
  bf16), forward and gradients against the float64 reference, in jax's
  Mosaic GPU interpret mode (simulated SMEM, TMA, barriers and wgmma) on an
  abstract H100, with race detection; every test asserts that no race was
  reported. See mosaic_gpu_interpret.py for what the harness adds (about a
  minute for all of them on 2 CPU cores).
* Harness: a race is reported; a deadlocked or failing kernel raises instead
  of hanging.
* Lowering: `jax.export(..., platforms=["cuda"])` under the abstract H100
  lowers the real kernels (layouts, barriers, the shared-memory budget) for
  head dims 64/128/256, causal or not, segments, GQA, bf16, forward and
  forward+backward. Nothing here runs ptxas: that happens on a GPU.
* Dispatch: the automatic backend picks Mosaic GPU for Hopper, Triton below.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import importlib
import re
import sys
from unittest import mock

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.flash_attention import BlockSizes
from kernels.flash_attention import api
from kernels.flash_attention import flash_attention
from kernels.flash_attention import mosaic_gpu
from kernels.flash_attention import mosaic_gpu_vjp
from tests.kernels import mosaic_gpu_interpret
from tests.kernels.test_flash_attention import FlashAttentionTestBase

# Last resort against a hang the harness cannot turn into an error (a kernel
# looping forever): dump every thread's stack and end the test process, so
# that CI fails instead of waiting. A case takes seconds to a minute.
WATCHDOG_S = 600

# The smallest legal tiles: one CTA = two 64-row warpgroups.
TINY_MGPU = BlockSizes(block_q=128, block_k=64, block_q_dkv=64,
                       block_k_dkv=128, block_q_dq=128, block_k_dq=64)


def _start_watchdog(test):
  faulthandler.dump_traceback_later(WATCHDOG_S, exit=True,
                                    file=sys.__stderr__)
  test.addCleanup(faulthandler.cancel_dump_traceback_later)


class InterpretedTestCase(parameterized.TestCase):
  """Runs the test in Mosaic GPU interpret mode; fails on any race."""

  __test__ = False

  def setUp(self):
    super().setUp()
    _start_watchdog(self)
    self.races_found = self.enter_context(
        mosaic_gpu_interpret.interpret_context(detect_races=True))

  def tearDown(self):
    self.assertFalse(self.races_found(), "GPU interpret mode found races")
    super().tearDown()


@pytest.mark.slow  # the interpreter runs 3 threads per CTA through callbacks
class MosaicGpuInterpretTest(InterpretedTestCase, FlashAttentionTestBase):
  """The shared cases, and these multi-tile ones, interpreted.

  Tiles (TINY_MGPU): forward and dQ CTAs take 128 query rows and stream
  64-key tiles, dK/dV CTAs take 128 keys and stream 64-row (q, dO) tiles,
  through 2-slot rings: a kernel's ring wraps around once it streams 3 tiles.
  """

  __test__ = True
  BACKEND = "mosaic_gpu"
  BLOCKS = TINY_MGPU
  DTYPE = jnp.float16  # wgmma inputs: fp16/bf16 only
  DTYPES = (jnp.float16, jnp.bfloat16)
  # tokamax's cases: only small_sequences (the issue-18 case) in fp16 at tokamax's
  # fp16 tolerances; the others would add minutes of interpretation each.
  TOKAMAX_CASES = ("small_sequences",)

  CASES = (
      # 2 query CTAs x up to 4 key tiles (forward, dQ), up to 4 (q, dO)
      # tiles per dK/dV CTA and group head: every ring wraps around.
      ("causal_gqa", dict(q_len=200, num_heads=2, num_kv_heads=1,
                          head_dim=64, is_causal=True)),
      # Lq != Lk, both unaligned, sorted segment ids (tiles skipped by id
      # range), several CTAs per axis, bf16.
      ("segments_cross_lengths_bf16", dict(
          batch=2, q_len=150, kv_len=230, num_heads=2, head_dim=64,
          segments=3, dtype=jnp.bfloat16)),
      # Causal with Lq < Lk (a chunk of queries at the end of the keys), GQA.
      ("causal_chunked_prefill_gqa", dict(
          q_len=40, kv_len=210, num_heads=4, num_kv_heads=2, head_dim=64,
          is_causal=True)),
      # d_v != d_qk after padding (separate O buffer), a custom scale.
      ("value_head_dim_differs", dict(q_len=130, kv_len=150, head_dim=64,
                                      head_dim_v=128, num_heads=1,
                                      scale=0.3)),
      # Head dim 256: the backward kernels' rings have a single slot.
      ("head_dim_256_causal", dict(q_len=130, num_heads=1, head_dim=256,
                                   is_causal=True)),
  )

  @parameterized.named_parameters(*CASES)
  def test_case(self, kwargs):
    self.check(**kwargs)

  def test_persistent_forward_runs_several_items_per_cta(self):
    # Non-causal forwards are persistent: on 2 CTAs, each runs 2 of the 4
    # (head, query program) items, its K/V ring (4 key tiles per item, with
    # segment ids: fewer, varying per item) running on across them.
    self.enter_context(mock.patch.object(mosaic_gpu, "PERSISTENT_CTAS", 2))
    self.check(q_len=200, num_heads=2, head_dim=64, segments=2)

  def test_forward_three_stage_ring(self):
    # BlockSizes.num_stages = 3: a 3-slot K/V ring, wrapping around with 4
    # key tiles (forward only: the backward rings pick their own depth).
    self.BLOCKS = dataclasses.replace(TINY_MGPU, num_stages=3)
    self.check(q_len=200, num_heads=1, head_dim=64, is_causal=True,
               grads=False)


def _copy_kernel(body, **scratch):
  """A 2-thread kernel copying 128 floats through `body`."""
  x = jnp.arange(128, dtype=jnp.float32)
  return jax.jit(plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((128,), jnp.float32),
      scratch_types=scratch, num_threads=2, thread_name="wg"))(x)


class MosaicGpuHarnessTest(parameterized.TestCase):
  """The harness reports races, and fails (never hangs) on a stuck kernel."""

  def setUp(self):
    super().setUp()
    _start_watchdog(self)

  def test_unsynchronised_writes_are_a_race(self):
    def body(x_ref, o_ref, smem):
      wg = lax.axis_index("wg")
      smem[...] = x_ref[...] + wg.astype(jnp.float32)  # both threads write

      @pl.when(wg == 0)
      def _():
        o_ref[...] = smem[...]

    with mosaic_gpu_interpret.interpret_context() as races:
      np.asarray(_copy_kernel(body, smem=plgpu.SMEM((128,), jnp.float32)))
      self.assertTrue(races())

  @parameterized.parameters(True, False)
  def test_releasing_a_wgmma_operand_before_waiting_is_a_race(self, early):
    # wgmma is asynchronous: its SMEM operand may only be overwritten once
    # the wgmma has been waited for. Thread 0 multiplies, then releases b's
    # buffer to thread 1, which overwrites it: a race when released before
    # the wait, whichever thread the simulation happens to run first.
    x = jnp.eye(64, dtype=jnp.float16)
    t = mosaic_gpu.smem_transforms(jnp.float16)

    def body(x_ref, o_ref, a_smem, b_smem, free):
      wg = lax.axis_index("wg")

      @pl.when(wg == 0)
      def _():
        a_smem[...] = x_ref[...]
        b_smem[...] = x_ref[...]
        plgpu.commit_smem()  # generic stores before the async proxy's reads

        def product(acc_ref):
          plgpu.wgmma(acc_ref, a_smem, b_smem)
          if early:
            plgpu.barrier_arrive(free)
          plgpu.wgmma_wait(0)
          if not early:
            plgpu.barrier_arrive(free)
          return acc_ref[...]

        o_ref[...] = pl.run_scoped(product,
                                   plgpu.ACC((64, 64), jnp.float32))

      @pl.when(wg == 1)
      def _():
        plgpu.barrier_wait(free)
        b_smem[...] = jnp.zeros((64, 64), jnp.float16)

    with mosaic_gpu_interpret.interpret_context() as races:
      out = jax.jit(plgpu.kernel(
          body, out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32),
          scratch_types=dict(a_smem=plgpu.SMEM((64, 64), jnp.float16,
                                               transforms=t),
                             b_smem=plgpu.SMEM((64, 64), jnp.float16,
                                               transforms=t),
                             free=plgpu.Barrier()),
          num_threads=2, thread_name="wg"))(x)
      out = np.asarray(out)
      self.assertEqual(races(), early)
      if not early:  # else b may have been overwritten before it was read
        np.testing.assert_array_equal(out, np.eye(64))

  def test_barrier_nobody_arrives_at_times_out(self):
    def body(x_ref, o_ref, never):
      @pl.when(lax.axis_index("wg") == 0)
      def _():
        plgpu.barrier_wait(never)
        o_ref[...] = x_ref[...]

    self.enter_context(mock.patch.object(
        mosaic_gpu_interpret, "BARRIER_WAIT_TIMEOUT_S", 2.0))
    with mosaic_gpu_interpret.interpret_context():
      with self.assertRaisesRegex(Exception, "the kernel deadlocked"):
        np.asarray(_copy_kernel(body, never=plgpu.Barrier()))

  def test_failing_thread_aborts_the_others(self):
    def body(x_ref, o_ref, never, twice):
      wg = lax.axis_index("wg")

      @pl.when(wg == 0)
      def _():
        plgpu.barrier_wait(never)  # thread 1 fails instead of arriving
        o_ref[...] = x_ref[...]

      @pl.when(wg == 1)
      def _():
        plgpu.barrier_arrive(twice)
        plgpu.barrier_arrive(twice)  # a completion nobody saw: an error

    with mosaic_gpu_interpret.interpret_context():
      # jax >= 0.11 aborts the barrier waits itself ("Computation failed on
      # <the failing thread>") before the harness's own abort check.
      with self.assertRaisesRegex(
          Exception, "another simulated thread failed|Computation failed on"):
        np.asarray(_copy_kernel(body, never=plgpu.Barrier(),
                                twice=plgpu.Barrier()))


class MosaicGpuApiTest(parameterized.TestCase):

  def test_float32_is_rejected(self):
    q = jnp.zeros((1, 8, 1, 64), jnp.float32)
    with self.assertRaisesRegex(TypeError, "bfloat16 or float16"):
      flash_attention(q, q, q, backend="mosaic_gpu")

  def test_tile_rules(self):
    with self.assertRaisesRegex(ValueError, "multiple of 128"):
      BlockSizes(block_q=64, block_k=64).validate("mosaic_gpu")
    fit = BlockSizes.get_default("mosaic_gpu", 128).fit(37, 300, "mosaic_gpu")
    self.assertEqual((fit.block_q, fit.block_k), (128, 128))
    fit.validate("mosaic_gpu")

  def test_default_tiles_fit_shared_memory(self):
    for head_dim in (64, 128, 256):
      blocks = BlockSizes.get_default("mosaic_gpu", head_dim)
      stages = mosaic_gpu.num_stages(blocks, head_dim, head_dim, jnp.bfloat16)
      self.assertLessEqual(
          mosaic_gpu.smem_bytes(blocks.block_q // 2, blocks.block_k, head_dim,
                                head_dim, stages), mosaic_gpu.SMEM_BYTES)
      # The backward rings: 2 slots up to head dim 128, 1 at 256.
      (dkv_q, dkv_k), (dq_q, dq_k) = blocks.dkv, blocks.dq
      stages = 2 if head_dim <= 128 else 1
      self.assertLessEqual(mosaic_gpu_vjp.smem_bytes_dkv(
          dkv_q, dkv_k // 2, head_dim, head_dim, stages),
                           mosaic_gpu.SMEM_BYTES)
      self.assertLessEqual(mosaic_gpu_vjp.smem_bytes_dq(
          dq_q // 2, dq_k, head_dim, head_dim, stages), mosaic_gpu.SMEM_BYTES)

  def test_persistent_grid_size(self):
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200",
                                         platform="gpu", num_cores=7)
    with jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((), (), abstract_device=device)):
      self.assertEqual(mosaic_gpu.num_sms(), 7)  # the traced-for device's
      with mock.patch.object(mosaic_gpu, "PERSISTENT_CTAS", 2):
        self.assertEqual(mosaic_gpu.num_sms(), 2)
    if jax.devices()[0].platform != "gpu":  # no device to ask: an H100's
      self.assertEqual(mosaic_gpu.num_sms(), mosaic_gpu.SMS_H100)

  def test_num_stages(self):
    blocks = BlockSizes.get_default("mosaic_gpu", 128)
    self.assertEqual(mosaic_gpu.num_stages(blocks, 128, 128, jnp.bfloat16), 2)
    three = dataclasses.replace(blocks, num_stages=3)
    self.assertEqual(mosaic_gpu.num_stages(three, 128, 128, jnp.bfloat16), 3)
    with self.assertRaisesRegex(ValueError, "num_stages = 4 .* shared memory"):
      mosaic_gpu.num_stages(dataclasses.replace(blocks, num_stages=4), 128,
                            128, jnp.bfloat16)
    with self.assertRaisesRegex(ValueError, r"num_stages = 5 must be in"):
      mosaic_gpu.num_stages(dataclasses.replace(blocks, num_stages=5), 64, 64,
                            jnp.bfloat16)

  @parameterized.parameters(
      (256, 256, 128, 64, True), (200, 200, 128, 64, True),
      (40, 210, 128, 64, True), (210, 40, 128, 64, True),
      (300, 130, 256, 128, False), (130, 300, 128, 64, False),
      (1, 1, 128, 64, True), (64, 640, 128, 64, True))
  def test_in_kernel_tile_ranges_match_the_xla_prepass(self, q_len, kv_len,
                                                       rows, cols, causal):
    # Without segment ids the kernels compute their tile ranges themselves
    # (kv_range, q_range); they must equal what the XLA pre-pass gives.
    # Padded lengths hold more tiles than the real ones (lcm padding).
    p = api.common.Problem(
        q_len=q_len, kv_len=kv_len, q_len_padded=-(-q_len // 256) * 256,
        kv_len_padded=-(-kv_len // 256) * 256, causal=causal, scale=1.0,
        has_segments=False)
    for block_q, block_k, transpose, ranges_of in (
        (rows, cols, False, mosaic_gpu.kv_range),
        (cols, rows, True, mosaic_gpu.q_range)):

      @jax.jit  # one small program instead of many eager ops
      def both():
        overlap = mosaic_gpu.tile_overlap(p, None, None, batch=1,
                                          block_q=block_q, block_k=block_k)
        if transpose:
          overlap = jnp.swapaxes(overlap, 1, 2)
        want = mosaic_gpu.tile_ranges(overlap)[0]
        lo, hi = ranges_of(p, jnp.arange(want.shape[0]), block_q, block_k)
        return want, jnp.stack(jnp.broadcast_arrays(lo, hi), -1)

      want, got = both()
      np.testing.assert_array_equal(got, want, err_msg=ranges_of.__name__)

  @parameterized.parameters(
      ("NVIDIA H100 80GB HBM3", True), ("NVIDIA H200", True),
      ("NVIDIA A100-SXM4-80GB", False), ("NVIDIA B200", False))
  def test_hopper_detection_under_abstract_mesh(self, kind, hopper):
    device = jax.sharding.AbstractDevice(device_kind=kind, platform="gpu",
                                         num_cores=132)
    with jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((), (), abstract_device=device)):
      self.assertEqual(api.hopper_gpu(), hopper)

  def test_no_gpu_means_triton(self):
    if jax.devices()[0].platform == "gpu":
      self.skipTest("a GPU is attached")
    self.assertFalse(api.hopper_gpu())

  def test_tile_skipping_follows_segments_and_causality(self):
    p = api.common.Problem(q_len=256, kv_len=256, q_len_padded=256,
                           kv_len_padded=256, causal=True, scale=1.0,
                           has_segments=True)
    ids = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 64)[None]  # 4 x 64
    ranges = mosaic_gpu.tile_ranges(mosaic_gpu.tile_overlap(
        p, ids, ids, batch=1, block_q=128, block_k=64))
    # Query rows 0-127 hold segments 0, 1 -> key tiles 0, 1; 128-255 -> 2, 3.
    np.testing.assert_array_equal(ranges[0], [[0, 2], [2, 4]])


TRITON_CALL = "__gpu$xla.gpu.triton"


def _export(fn, *args):
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
      (), (), abstract_device=mosaic_gpu_interpret.H100)):
    return jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
            TRITON_CALL)])(*args)


class MosaicGpuExportTest(parameterized.TestCase):
  """The real kernels lower for cuda (Mosaic GPU custom calls) on a CPU."""

  @parameterized.named_parameters(
      ("d64_causal_segments", 64, 64, True, True, 1),
      ("d128_gqa", 128, 128, False, False, 2),
      ("d256_causal_gqa", 256, 256, True, False, 4),
      ("d128_dv64_segments", 128, 64, False, True, 1),
  )
  def test_forward_and_backward_export(self, head_dim, head_dim_v, causal,
                                       segments, group):
    shapes = ((2, 256, 4, head_dim), (2, 384, 4 // group, head_dim),
              (2, 384, 4 // group, head_dim_v))
    q, k, v = (jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes)
    ids = None
    if segments:
      ids = (jax.ShapeDtypeStruct((2, 256), jnp.int32),
             jax.ShapeDtypeStruct((2, 384), jnp.int32))

    def attention(q, k, v, ids):
      return flash_attention(q, k, v, is_causal=causal, segment_ids=ids,
                             backend="mosaic_gpu")

    def loss(q, k, v, ids):
      return jax.grad(lambda *a: attention(*a, ids).astype(jnp.float32).sum(),
                      argnums=(0, 1, 2))(q, k, v)

    for fn, kernels in ((attention, 1), (loss, 3)):
      text = _export(fn, q, k, v, ids).mlir_module()
      self.assertLen(re.findall(r"custom_call @mosaic_gpu", text), kernels)
      self.assertNotIn(TRITON_CALL, text)

  def test_automatic_backend_is_mosaic_gpu_on_hopper(self):
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    text = _export(lambda q: flash_attention(q, q, q, is_causal=True),
                   q).mlir_module()
    self.assertIn("mosaic_gpu", text)
    self.assertNotIn(TRITON_CALL, text)
    # float32 stays on Triton even on Hopper (wgmma would use TF32).
    q32 = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.float32)
    text = _export(lambda q: flash_attention(q, q, q), q32).mlir_module()
    self.assertIn(TRITON_CALL, text)
    self.assertNotIn("custom_call @mosaic_gpu", text)


class NothingSilentlyReplacedTest(parameterized.TestCase):
  """Issue 18 section 3: an invalid explicit choice is an error; a fallback nobody
  asked for is a WARNING once per shape; autotune tunes the kernel that runs."""

  def test_tiles_invalid_for_mosaic_gpu_are_an_error_on_hopper(self):
    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    triton_tiles = BlockSizes(block_q=64, block_k=64)  # fine for Triton
    with mock.patch.object(api, "hopper_gpu", return_value=True), \
        mock.patch.object(jax, "default_backend", return_value="gpu"), \
        self.assertRaisesRegex(ValueError, "block_q.*multiple of 128.*mosaic_gpu"):
      flash_attention(q, q, q, block_sizes=triton_tiles)
    # Below Hopper the same tiles suit the kernel that runs (Triton); the Mosaic GPU
    # branch traced beside it (never run there) takes its defaults, without a word.
    with mock.patch.object(api, "hopper_gpu", return_value=False):
      out = jax.eval_shape(lambda q: flash_attention(q, q, q,
                                                     block_sizes=triton_tiles), q)
    self.assertEqual(out.shape, q.shape)

  def test_plan_raises_for_the_primary_backend(self):
    cfg = api._Config(is_causal=False, scale=1.0,  # pylint: disable=protected-access
                      block_sizes=BlockSizes(block_q=64, block_k=64), interpret=False,
                      backend=None, precision=lax.Precision.DEFAULT,
                      primary="mosaic_gpu")
    shape = (1, 256, 2, 64)
    with self.assertRaisesRegex(ValueError, "multiple of 128"):
      api._plan(cfg, "mosaic_gpu", False, shape, shape, shape,  # pylint: disable=protected-access
                jnp.bfloat16, False)
    blocks, *_ = api._plan(  # pylint: disable=protected-access
        dataclasses.replace(cfg, primary="triton"), "mosaic_gpu", False, shape,
        shape, shape, jnp.bfloat16, False)
    self.assertEqual(blocks, BlockSizes.get_default("mosaic_gpu", 64).fit(
        256, 256, "mosaic_gpu"))

  @parameterized.parameters((None, False), (12079, False), (12080, True),
                            (12090, True), (12091, False), (13000, False))
  def test_ptxas_guard_versions(self, runtime, refused):
    with mock.patch.object(api, "cuda_runtime_version", return_value=runtime):
      self.assertEqual(api.mosaic_gpu_causal_refused(True) is not None, refused)
      self.assertIsNone(api.mosaic_gpu_causal_refused(False))

  def test_ptxas_guard_explicit_is_an_error_automatic_is_triton_with_a_warning(self):
    q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    with mock.patch.object(api, "cuda_runtime_version", return_value=12085):
      with self.assertRaisesRegex(ValueError, "ptxas"):
        jax.eval_shape(lambda q: flash_attention(q, q, q, is_causal=True,
                                                 backend="mosaic_gpu"), q)
      api._WARNED.clear()  # pylint: disable=protected-access
      with self.assertLogs(api.logger, "WARNING") as logs:
        text = _export(lambda q: flash_attention(q, q, q, is_causal=True),
                       q).mlir_module()
        _export(lambda q: flash_attention(q, q, q, is_causal=True), q)
      self.assertLen(logs.records, 1)  # once per shape
      self.assertIn("ptxas", logs.output[0])
      self.assertIn(TRITON_CALL, text)
      self.assertNotIn("custom_call @mosaic_gpu", text)
      text = _export(lambda q: flash_attention(q, q, q), q).mlir_module()
      self.assertIn("custom_call @mosaic_gpu", text)  # non-causal: unaffected

  @parameterized.parameters(
      (jnp.bfloat16, False, None, "gpu", "mosaic_gpu"),
      (jnp.float16, True, 12091, "gpu", "mosaic_gpu"),
      (jnp.bfloat16, True, 12085, "gpu", "triton"),
      (jnp.float32, False, None, "gpu", "triton"),
      (jnp.bfloat16, False, None, "tpu", "mosaic"),
      (jnp.bfloat16, False, None, "cpu", "triton"))
  def test_primary_backend(self, dtype, causal, runtime, platform, want):
    with mock.patch.object(api, "hopper_gpu", return_value=True), \
        mock.patch.object(api, "cuda_runtime_version", return_value=runtime):
      self.assertEqual(api.primary_backend(None, dtype, causal, platform), want)
      self.assertEqual(api.primary_backend("triton", dtype, causal, platform),
                       "triton")

  def test_autotune_table_tunes_mosaic_gpu_on_hopper(self):
    autotune_lib = importlib.import_module("kernels.flash_attention.autotune")
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    best = BlockSizes.get_default("mosaic_gpu", 64)
    with mock.patch.object(api, "hopper_gpu", return_value=True), \
        mock.patch.object(jax, "default_backend", return_value="gpu"), \
        mock.patch.object(autotune_lib, "autotune", return_value=best) as tune:
      table = autotune_lib.autotune_table([dict(query=q, key=q, value=q)])
    self.assertEqual(tune.call_args.kwargs["backend"], "mosaic_gpu")
    ((key, got),) = table.entries
    self.assertEqual((key.backend, got), ("mosaic_gpu", best))

  @parameterized.parameters(64, 128, 256)
  def test_mosaic_gpu_candidates_keep_the_rules_and_fit(self, head_dim):
    autotune_lib = importlib.import_module("kernels.flash_attention.autotune")
    candidates = autotune_lib.default_candidates("mosaic_gpu", head_dim)
    # Key tiles 64/128/256 x two backward tiles, as the forward's SMEM allows.
    self.assertLen(candidates, {64: 12, 128: 8, 256: 4}[head_dim])
    self.assertIn(BlockSizes.get_default("mosaic_gpu", head_dim), candidates)
    for blocks in candidates:
      blocks.validate("mosaic_gpu")
      self.assertLessEqual(mosaic_gpu.smem_bytes(blocks.block_q // 2, blocks.block_k,
                                                 head_dim, head_dim),
                           mosaic_gpu.SMEM_BYTES)

  def test_autotune_warns_for_a_candidate_that_fails_to_run(self):
    autotune_lib = importlib.import_module("kernels.flash_attention.autotune")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 1, 16)), jnp.float32)
    good, failing = BlockSizes(block_q=16, block_k=16), BlockSizes(block_q=32,
                                                                   block_k=32)
    real = api.flash_attention

    def flaky(*args, block_sizes=None, **kwargs):
      if block_sizes == failing:
        raise RuntimeError("pretend compile failure")
      return real(*args, block_sizes=block_sizes, **kwargs)

    with mock.patch.object(autotune_lib.api, "flash_attention", flaky), \
        self.assertLogs(autotune_lib.logger, "WARNING") as logs:
      best = autotune_lib.autotune(x, x, x, candidates=[good, failing], reps=1,
                                   include_backward=False, interpret=True)
    self.assertEqual(best, good)
    self.assertIn("pretend compile failure", logs.output[0])


if __name__ == "__main__":
  absltest.main()
