"""Checkpoints: sharded round trip, iterator state, keep-N, save cadence, half-written
directories ignored and cleaned, config mismatches named, fallback past damaged
checkpoints, an unwritable directory failing fast, SIGTERM / SIGINT flag."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import tempfile
import threading
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl.testing import parameterized

from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import optimizer as opt
from jaxformer.training import sharding
from jaxformer.training import state as state_lib

import training_helpers as th

CONFIG = {"model": {"name": "gpt", "num_layers": 2, "mesh": (1, 2)},
          "train": {"num_steps": 10}}


def _tmpdir(test) -> str:
  d = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, d, ignore_errors=True)
  return d


def _state():
  model = th.TinyLM()
  tx = opt.make_optimizer(opt.OptimizerConfig(), 10)
  mesh = sharding.Sharding.build(sharding.ShardingConfig(mesh_shape=(1, 1, 1)),
                                 jax.devices()[:1])
  init_fn = th.tiny_init_fn(model)
  state, _ = state_lib.create_train_state(init_fn, tx, jax.random.key(3), mesh)
  return state, state_lib.abstract_train_state(init_fn, tx, mesh)


class CheckpointerTest(parameterized.TestCase):

  def test_round_trip_state_data_and_sharding(self):
    state, abstract = _state()
    state = state.replace(step=state.step + 7)
    d = _tmpdir(self)
    ck = ckpt_lib.Checkpointer(d)
    data_state = {"position": np.int64(12), "blob": b"\x00\xffgrain", "xs": (1, 2)}
    self.assertTrue(ck.save(7, state, data_state=data_state, config=CONFIG))
    ck.close()
    ck = ckpt_lib.Checkpointer(d)
    self.assertEqual(ck.latest_step(), 7)
    restored, restored_data = ck.restore(7, abstract, config=CONFIG)
    self.assertIsInstance(restored, state_lib.TrainState)
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    self.assertEqual(restored_data,
                     {"position": 12, "blob": b"\x00\xffgrain", "xs": [1, 2]})
    leaf = restored.params["hidden"]["kernel"]
    self.assertEqual(leaf.sharding, abstract.params["hidden"]["kernel"].sharding)
    ck.close()

  def test_cpu_writes_each_replicated_array_from_one_replica(self):
    """On CPU no array is cut into per-replica slices to save (see the function)."""
    ckpt_lib.Checkpointer(_tmpdir(self)).close()
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    self.assertIsInstance(handler, ocp.type_handlers.ArrayHandler)
    self.assertFalse(handler._use_replica_parallel)  # pylint: disable=protected-access

  def test_relative_directory_is_resolved(self):
    # `make demo` passes --workdir=runs/demo; orbax's writer rejects relative paths.
    state, abstract = _state()
    d = _tmpdir(self)
    cwd = os.getcwd()
    os.chdir(d)
    self.addCleanup(os.chdir, cwd)
    ck = ckpt_lib.Checkpointer(os.path.join("runs", "ckpt"))
    self.assertTrue(ck.save(1, state, config=CONFIG))
    ck.close()
    self.assertTrue(os.path.isabs(os.fspath(ck.directory)))
    ck = ckpt_lib.Checkpointer(os.path.join("runs", "ckpt"))
    self.assertEqual(ck.latest_step(), 1)
    restored, _ = ck.restore(1, abstract, config=CONFIG)
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    ck.close()

  def test_half_written_directory_is_ignored(self):
    state, abstract = _state()
    d = _tmpdir(self)
    ck = ckpt_lib.Checkpointer(d)
    ck.save(2, state, config=CONFIG)
    ck.close()
    # a save of step 4 that died half way: orbax's temporary directory name
    tmp = os.path.join(d, "4.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(tmp, "state"))
    with open(os.path.join(tmp, "state", "garbage"), "w") as f:
      f.write("not a checkpoint")
    with self.assertLogs(ckpt_lib.log, logging.WARNING) as logs:
      ck = ckpt_lib.Checkpointer(d)
    self.assertIn("4.orbax-checkpoint-tmp-1234567", logs.output[0])
    self.assertFalse(os.path.exists(tmp))  # cleaned at start
    self.assertEqual(ck.latest_step(), 2)
    self.assertEqual(ck.all_steps(), [2])
    restored, _ = ck.restore(ck.latest_step(), abstract)
    chex.assert_trees_all_equal(jax.device_get(restored.params),
                                jax.device_get(state.params))
    ck.close()

  def test_keep_n_and_save_cadence(self):
    state, _ = _state()
    d = _tmpdir(self)
    ck = ckpt_lib.Checkpointer(d, max_to_keep=2, save_every=2)
    self.assertEqual([ck.should_save(s) for s in (1, 2, 3, 4)],
                     [False, True, False, True])
    started = [ck.save(s, state) for s in (1, 2, 3, 4, 5, 6)]
    self.assertFalse(ck.should_save(6))  # already saved
    self.assertEqual(started, [False, True, False, True, False, True])
    self.assertTrue(ck.save(7, state, force=True))
    self.assertFalse(ck.save(7, state, force=True))  # already there
    ck.wait()
    self.assertEqual(ck.all_steps(), [6, 7])
    ck.close()

  def test_config_mismatch_names_fields(self):
    state, abstract = _state()
    d = _tmpdir(self)
    ck = ckpt_lib.Checkpointer(d)
    ck.save(1, state, config=CONFIG)
    ck.wait()
    other = {"model": {"name": "gpt", "num_layers": 3, "mesh": [1, 2], "extra": 1},
             "train": {"num_steps": 99}}  # train differences are allowed
    with self.assertRaisesRegex(ValueError, "model.num_layers: checkpoint 2 != "
                                "config 3") as cm:
      ck.restore(1, abstract, config=other)
    self.assertIn("model.extra", str(cm.exception))
    self.assertNotIn("mesh", str(cm.exception))     # tuple == list after JSON
    self.assertNotIn("num_steps", str(cm.exception))
    ck.close()

  @parameterized.parameters("truncated_array", "deleted_state", "bad_data_json",
                            "bad_config_json", "use_fails")
  def test_restore_latest_falls_back_past_a_damaged_checkpoint(self, damage):
    state, abstract = _state()
    d = _tmpdir(self)
    with ckpt_lib.Checkpointer(os.path.join(d, "ck"), max_to_keep=None) as ck:
      for step in (1, 2):
        ck.save(step, state.replace(step=state.step + step),
                data_state={"position": step}, config=CONFIG)
    step2 = os.path.join(d, "ck", "2")
    if damage == "truncated_array":
      files = [f for f in glob.glob(os.path.join(step2, "state", "**", "*"),
                                    recursive=True)
               if os.path.isfile(f) and "d/" in f.replace(os.sep, "/")]
      self.assertNotEmpty(files)
      for f in files:
        with open(f, "r+b") as fh:
          fh.truncate(os.path.getsize(f) // 2)
    elif damage == "deleted_state":
      shutil.rmtree(os.path.join(step2, "state"))
    elif damage in ("bad_data_json", "bad_config_json"):
      item = damage.split("_")[1]
      for f in glob.glob(os.path.join(step2, item, "*")):
        with open(f, "w") as fh:
          fh.write("{not json")
    used = []

    def use(restored_state, data_state):
      if damage == "use_fails" and data_state["position"] == 2:
        raise ValueError("iterator state from another pipeline")
      used.append(data_state)
    ck = ckpt_lib.Checkpointer(os.path.join(d, "ck"))
    with self.assertLogs(ckpt_lib.log, logging.WARNING) as logs:
      step, restored, data_state = ck.restore_latest(abstract, use=use)
    self.assertEqual((step, data_state, used), (1, {"position": 1}, [data_state]))
    self.assertEqual(int(restored.step), int(state.step) + 1)
    self.assertIn(step2, logs.output[-1])
    moved = glob.glob(os.path.join(d, "ck.damaged", "2-*"))
    self.assertLen(moved, 1)  # kept for inspection, not deleted
    self.assertEqual(ck.all_steps(), [1])
    self.assertTrue(ck.save(2, state, config=CONFIG))  # the step can be saved anew
    ck.close()

  def test_restore_latest_none_restores_or_none_exist(self):
    state, abstract = _state()
    d = _tmpdir(self)
    with ckpt_lib.Checkpointer(d) as ck:
      self.assertIsNone(ck.restore_latest(abstract))
      ck.save(3, state, config=CONFIG)
    shutil.rmtree(os.path.join(d, "3", "state"))
    with ckpt_lib.Checkpointer(d) as ck:
      with self.assertRaisesRegex(ValueError, "no checkpoint in .* restores:\n  step 3"):
        ck.restore_latest(abstract)

  def test_restore_latest_check_errors_are_not_damage(self):
    state, abstract = _state()
    d = _tmpdir(self)
    with ckpt_lib.Checkpointer(d) as ck:
      ck.save(3, state, config=CONFIG)

    def check(step, stored):
      raise ValueError(f"config of {step} differs: {stored['train']}")
    with ckpt_lib.Checkpointer(d) as ck:
      with self.assertRaisesRegex(ValueError, "config of 3 differs"):
        ck.restore_latest(abstract, check=check)
      self.assertEqual(ck.all_steps(), [3])  # not moved aside

  def test_the_data_fingerprint_is_stored_with_the_data_state(self):
    state, _ = _state()
    d = _tmpdir(self)
    fingerprint = {"files": [{"path": "a.txt", "size": 3, "sha256": "ab"}],
                   "tokenizer": "cd"}
    with ckpt_lib.Checkpointer(d, async_save=False) as ck:
      ck.save(1, state, data_state=b"\x00pos", fingerprint=fingerprint)
      ck.save(2, state, data_state=b"\x00pos")
      self.assertEqual(ck.stored_fingerprint(1), fingerprint)
      self.assertIsNone(ck.stored_fingerprint(2))  # as in checkpoints from before

  def test_unwritable_directory_fails_at_once_naming_path_and_reason(self):
    d = _tmpdir(self)
    blocker = os.path.join(d, "checkpoints")
    with open(blocker, "w") as f:
      f.write("a file, not a directory")
    t0 = time.perf_counter()
    with self.assertRaisesRegex(ValueError, f"cannot write checkpoints to {blocker}: "
                                "(File exists|Not a directory)"):
      ckpt_lib.Checkpointer(blocker)
    with self.assertRaisesRegex(ValueError, "Not a directory"):
      ckpt_lib.Checkpointer(os.path.join(blocker, "sub"))
    self.assertLess(time.perf_counter() - t0, 5)

  def test_read_only_leaves_unfinished_saves_alone(self):
    state, _ = _state()
    d = _tmpdir(self)
    with ckpt_lib.Checkpointer(d) as ck:
      ck.save(1, state)
    in_flight = os.path.join(d, "2.orbax-checkpoint-tmp-99")  # another run's save
    os.makedirs(in_flight)
    with ckpt_lib.Checkpointer(d, read_only=True) as ck:
      self.assertEqual(ck.all_steps(), [1])
    self.assertTrue(os.path.isdir(in_flight))
    ckpt_lib.Checkpointer(os.path.join(d, "nowhere"), read_only=True).close()
    self.assertFalse(os.path.exists(os.path.join(d, "nowhere")))

  def test_close_is_idempotent_and_the_context_closes(self):
    state, _ = _state()
    d = _tmpdir(self)
    with ckpt_lib.Checkpointer(d) as ck:
      ck.save(1, state)
    self.assertEqual(ck.all_steps(), [1])  # closed: the async save was waited for
    ck.close()
    with self.assertRaises(RuntimeError):
      with ckpt_lib.Checkpointer(d) as ck:
        ck.save(2, state)
        raise RuntimeError("the loop failed")
    self.assertEqual(ckpt_lib.Checkpointer(d).all_steps(), [1, 2])

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "save_every"):
      ckpt_lib.Checkpointer(_tmpdir(self), save_every=0)
    with self.assertRaisesRegex(ValueError, "max_to_keep"):
      ckpt_lib.Checkpointer(_tmpdir(self), max_to_keep=0)


class ConfigMismatchesTest(chex.TestCase):

  def test_nested_and_missing(self):
    diffs = ckpt_lib.config_mismatches({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "d": 3}})
    self.assertEqual(diffs, ["a.c: checkpoint 2, missing in config",
                             "a.d: missing in checkpoint, config 3"])


class PreemptionTest(chex.TestCase):

  def test_sigterm_sets_flag_and_handler_is_restored(self):
    if threading.current_thread() is not threading.main_thread():
      self.skipTest("signal handlers can only be installed from the main thread")
    before = signal.getsignal(signal.SIGTERM)
    with ckpt_lib.Preemption() as p:
      self.assertFalse(p.requested)
      os.kill(os.getpid(), signal.SIGTERM)
      self.assertTrue(p.requested)
    self.assertIs(signal.getsignal(signal.SIGTERM), before)

  def test_sigint_like_sigterm_second_signal_interrupts_nested_share_flag(self):
    if threading.current_thread() is not threading.main_thread():
      self.skipTest("signal handlers can only be installed from the main thread")
    before = signal.getsignal(signal.SIGINT)
    with ckpt_lib.Preemption() as outer:
      os.kill(os.getpid(), signal.SIGINT)  # e.g. Ctrl-C while compiling
      self.assertTrue(outer.requested)
      with ckpt_lib.Preemption() as inner:
        self.assertTrue(inner.requested)  # the loop sees it
        with self.assertRaises(KeyboardInterrupt):
          os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: stop now
    self.assertIs(signal.getsignal(signal.SIGINT), before)

  def test_a_repeated_sigterm_waits(self):
    if threading.current_thread() is not threading.main_thread():
      self.skipTest("signal handlers can only be installed from the main thread")
    with ckpt_lib.Preemption() as p:
      os.kill(os.getpid(), signal.SIGTERM)
      with self.assertLogs(ckpt_lib.log, logging.WARNING) as logs:
        os.kill(os.getpid(), signal.SIGTERM)  # no KeyboardInterrupt: the save finishes
      self.assertTrue(p.requested)
    self.assertIn("received signal 15 again: already saving", logs.output[0])

  def test_any_process_single(self):
    self.assertTrue(ckpt_lib.any_process(True))
    self.assertFalse(ckpt_lib.any_process(False))


if __name__ == "__main__":
  pytest.main([__file__])
