"""Mesh shapes and shardings; multi-device equivalence (DP / FSDP / TP) in a subprocess
with 8 CPU devices; two processes on localhost (slow)."""

from __future__ import annotations

import json
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P

from jaxformer import axes
from jaxformer.training import sharding

import training_helpers as th


class MeshShapeTest(parameterized.TestCase):

  @parameterized.parameters(
      ((-1, 1, 1), 8, (8, 1, 1)),
      ((1, -1, 2), 8, (1, 4, 2)),
      ((2, 2, 2), 8, (2, 2, 2)),
      ((1, 1, 1), 1, (1, 1, 1)),
      ((1, -1, 1), 1, (1, 1, 1)),
  )
  def test_resolve(self, shape, n, want):
    self.assertEqual(sharding.resolve_mesh_shape(shape, n), want)

  @parameterized.parameters(
      ((-1, -1, 1), 8, "at most one -1"),
      ((1, 1), 8, "needs 3 entries"),
      ((3, -1, 1), 8, "not divisible"),
      ((2, 2, 1), 8, "uses 4 devices but 8"),
      ((0, 1, 1), 1, "positive"),
  )
  def test_errors_name_the_value(self, shape, n, msg):
    with self.assertRaisesRegex(ValueError, msg):
      sharding.resolve_mesh_shape(shape, n)

  def test_make_mesh_axes_and_batch_sharding(self):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    self.assertEqual(mesh.axis_names, ("data", "fsdp", "tensor"))
    self.assertEqual(sharding.batch_sharding(mesh).spec, P(("data", "fsdp")))
    self.assertEqual(sharding.batch_divisor(mesh), 1)
    batch = th.make_batch(0)
    out = sharding.shard_batch(batch, mesh)
    np.testing.assert_array_equal(np.asarray(out["inputs"]), batch["inputs"])
    self.assertEqual(out["inputs"].sharding.spec, P(("data", "fsdp")))

  def test_logical_shardings_follow_rules(self):
    model = th.TinyLM()
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    abstract = jax.eval_shape(th.tiny_init_fn(model), jax.random.key(0))
    specs = jax.tree.map(lambda s: s.spec, sharding.logical_shardings(
        abstract["params"], mesh, sharding.make_rules()))
    self.assertEqual(specs["hidden"]["kernel"], P("fsdp", "tensor"))
    self.assertEqual(specs["embedding"], P("tensor", "fsdp"))
    no_fsdp = jax.tree.map(lambda s: s.spec, sharding.logical_shardings(
        abstract["params"], mesh, sharding.make_rules(fsdp=False, tensor=False)))
    self.assertEqual(no_fsdp["hidden"]["kernel"], P(None, None))

  def test_to_host_and_per_process_batch(self):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    batch = sharding.shard_batch({"x": np.arange(8.0).reshape(4, 2)}, mesh)
    host = sharding.to_host((batch, jnp.ones(3)))
    self.assertIsInstance(host[0]["x"], np.ndarray)
    np.testing.assert_array_equal(host[0]["x"], np.arange(8.0).reshape(4, 2))
    self.assertEqual(sharding.per_process_batch(8, 2, "data.batch_size"), 8)
    with self.assertRaisesRegex(ValueError, r"data\.eval_batch_size=5.*mesh_shape"):
      sharding.per_process_batch(5, 2, "data.eval_batch_size")

  def test_activate_sets_rules(self):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with sharding.activate(mesh, sharding.make_rules()):
      self.assertEqual(dict(nn.get_logical_axis_rules())[axes.EMBED], "fsdp")
    self.assertEqual(tuple(nn.get_logical_axis_rules()), ())


def test_sharding_value_owns_mesh_and_rules():
  """One value from ShardingConfig + devices: mesh, rules, batches, state shardings,
  divisibility checks, and its config errors naming the field."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxformer.models import gpt  # pylint: disable=g-import-not-at-top
  value = sharding.Sharding.build(
      sharding.ShardingConfig(mesh_shape=(1, 1, 1), fsdp=False), jax.devices()[:1])
  assert value.mesh.axis_names == axes.MESH_AXES and value.batch_divisor == 1
  assert value.shape == {"data": 1, "fsdp": 1, "tensor": 1}
  assert value.rules == axes.rules_for(fsdp=False, tensor=True)
  with value.activate():
    assert dict(nn.get_logical_axis_rules())[axes.EMBED] is None
  batch = value.shard_batch({"x": np.arange(8.0).reshape(4, 2)})
  assert batch["x"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(value.to_host(batch)["x"], np.arange(8.0).reshape(4, 2))
  model = th.TinyLM()
  shardings = value.state_shardings(th.tiny_init_fn(model), optax.adam(1e-3))
  assert shardings.params["hidden"]["kernel"].spec == P(None, "tensor")
  assert shardings.step.spec == P()
  cfg = gpt.gpt_tiny(num_layers=1, vocab_size=30)
  value.check_shardable("gpt", cfg)   # a 1 x 1 x 1 mesh divides everything
  assert value.per_process_batch(4, "data.batch_size") == 4
  assert sharding.ShardingConfig().mesh_shape == (-1,) + (1,) * (len(axes.MESH_AXES) - 1)
  with pytest.raises(ValueError, match=r"sharding\.mesh_shape=\(1, 1\) must be 3 ints"):
    sharding.ShardingConfig(mesh_shape=(1, 1))
  with pytest.raises(ValueError, match=r"sharding\.fsdp='yes' must be a bool"):
    sharding.ShardingConfig.parse({"fsdp": "yes"})


@pytest.mark.parametrize("batch,cores,want", [
    (12, 2, 2), (12, 16, 12), (12, 5, 4), (7, 4, 1), (8, 1, 1)])
def test_auto_cpu_devices_divides_the_batch(batch, cores, want):
  assert sharding.auto_cpu_devices(batch, cores) == want


def test_configure_cpu_devices_after_init_is_a_warning(monkeypatch):
  jax.devices()  # JAX is initialised in this process
  monkeypatch.setenv("XLA_FLAGS", "")
  assert sharding.configure_cpu_devices(0, 12) is None
  assert sharding.configure_cpu_devices(2, 12) is None  # too late: warned, ignored
  with pytest.raises(ValueError, match="sharding.cpu_devices=-2"):
    sharding.configure_cpu_devices(-2, 12)


def test_configure_cpu_devices_before_init():
  proc = th.run_python(["-c", (
      "import jax; from jaxformer.training import sharding;"
      "n = sharding.configure_cpu_devices(-1, 12);"
      "print('DEVICES', n, jax.device_count())")], env={"XLA_FLAGS": ""})
  assert proc.returncode == 0, proc.stderr[-2000:]
  n = sharding.auto_cpu_devices(12)
  assert f"DEVICES {n} {n}" in proc.stdout


@pytest.mark.slow
def test_dp_fsdp_tp_match_one_device():
  """Same 3 GPT-tiny steps on 1 device and on 8 CPU devices under 5 layouts.

  Tolerance: rtol 1e-5 on the losses (float32; only reduction order differs).
  """
  proc = th.run_python(["tests/training/multidevice_worker.py", "meshes", "8"],
                       timeout=600)  # six compilations: ~5 min on a busy 2-core host
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  want = out["single"]["losses"]
  assert want[-1] < want[0]
  for name in ("dp", "fsdp", "tp", "fsdp_tp", "dp_fsdp_tp"):
    np.testing.assert_allclose(out[name]["losses"], want, rtol=1e-5, err_msg=name)

  def sharded(name):
    return {k for k, v in out[name]["params"].items()
            if v["shard_shape"] != v["shape"]}

  assert not sharded("single") and not sharded("dp")   # replicated parameters
  assert out["dp"]["mu_sharded"] == 0
  emb = "['token_embedding']['embedding']"
  # FSDP: the embed axis (here the table's columns) is split 8 ways; the vocabulary
  # (64) is not padded on a CPU (vocab_pad_multiple follows the mesh)
  assert out["fsdp"]["params"][emb]["shard_shape"] == [64, 4]
  assert len(sharded("fsdp")) >= 8 and out["fsdp"]["mu_sharded"] >= 8
  # TP: the vocab axis split 2 ways, embed axis whole
  assert out["tp"]["params"][emb]["shard_shape"] == [32, 32]
  assert out["fsdp_tp"]["params"][emb]["shard_shape"] == [32, 8]
  assert sharded("tp") < sharded("fsdp_tp")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree(tmp_path):
  """Two processes x 2 CPU devices (gloo collectives on localhost): FSDP steps equal
  the one-device losses (rtol 1e-5), and a short `loop.train` run with checkpoints
  gives the same summary on both processes."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  port = _free_port()
  env = dict(os.environ)
  env["PYTHONPATH"] = th.REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  procs = [subprocess.Popen(
      [sys.executable, "tests/training/multidevice_worker.py", "process", str(i),
       str(port), str(tmp_path / "run")], cwd=th.REPO_ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, stderr[-3000:]
    line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
    outs.append(json.loads(line[len("RESULT "):]))
  ref = th.run_python(["-c", (
      "import sys, json; sys.path.insert(0, 'tests/training');"
      "import multidevice_worker as w, jax;"
      "print('RESULT ' + json.dumps(w._steps((1, 1, 1), jax.devices()[:1])))")])
  assert ref.returncode == 0, ref.stderr[-3000:]
  want = json.loads(ref.stdout.split("RESULT ")[-1])["losses"]
  for out in outs:
    np.testing.assert_allclose(out["fsdp_steps"]["losses"], want, rtol=1e-5)
  assert outs[0]["train"] == outs[1]["train"]
  assert outs[0]["train"]["step"] == 4
  assert np.isfinite(outs[0]["train"]["eval_loss"])
  assert (tmp_path / "run" / "checkpoints" / "4").is_dir()


if __name__ == "__main__":
  pytest.main([__file__])
