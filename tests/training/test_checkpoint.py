"""Checkpoints: sharded round trip, iterator state, keep-N, save cadence, half-written
directories ignored, config mismatches named, SIGTERM flag."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading

import chex
import jax
import numpy as np
import pytest

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
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  rules = sharding.make_rules()
  init_fn = th.tiny_init_fn(model)
  state, _ = state_lib.create_train_state(init_fn, tx, jax.random.key(3), mesh, rules)
  return state, state_lib.abstract_train_state(init_fn, tx, mesh, rules)


class CheckpointerTest(chex.TestCase):

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
    ck = ckpt_lib.Checkpointer(d)
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

  def test_any_process_single(self):
    self.assertTrue(ckpt_lib.any_process(True))
    self.assertFalse(ckpt_lib.any_process(False))


if __name__ == "__main__":
  pytest.main([__file__])
