"""Subprocess worker for the multi-device / multi-process tests (not a test module).

  python tests/training/multidevice_worker.py meshes NUM_DEVICES
      -> JSON: for each mesh shape, the losses of 3 GPT-tiny train steps and the
         shardings of a few parameters.
  python tests/training/multidevice_worker.py process PID PORT
      -> one of two processes (2 CPU devices each) running the same 3 steps on an FSDP
         mesh over 4 devices, then a short `loop.train` run; prints JSON.
"""

from __future__ import annotations

import json
import sys


def _steps(mesh_shape, devices, *, num_steps=3):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxformer.models import gpt  # pylint: disable=g-import-not-at-top
  from jaxformer.training import optimizer as opt  # pylint: disable=g-import-not-at-top
  from jaxformer.training import sharding  # pylint: disable=g-import-not-at-top
  from jaxformer.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from jaxformer.training import steps  # pylint: disable=g-import-not-at-top
  from jaxformer import tasks  # pylint: disable=g-import-not-at-top

  model = gpt.GPT(gpt.gpt_tiny(num_layers=1))
  cfg = opt.OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
  tx = opt.make_optimizer(cfg, 10)
  mesh = sharding.Sharding.build(sharding.ShardingConfig(mesh_shape=mesh_shape),
                                 devices)
  init_fn = lambda r: model.init(r, jnp.zeros((1, 16), jnp.int32))
  state, shard = state_lib.create_train_state(init_fn, tx, jax.random.key(0), mesh)
  step = steps.make_train_step(model=model, task=tasks.CausalLM({}), tx=tx,
                               opt_config=cfg, sharding=mesh,
                               shardings=shard)
  losses = []
  rng = np.random.default_rng(0)
  for _ in range(num_steps):
    tokens = rng.integers(0, 64, (8, 17))
    batch = {"inputs": tokens[:, :-1].astype(np.int32),
             "targets": tokens[:, 1:].astype(np.int32),
             "weights": np.ones((8, 16), np.float32)}
    if jax.process_count() > 1:  # each process passes its own rows
      n = 8 // jax.process_count()
      i = jax.process_index()
      batch = {k: v[i * n:(i + 1) * n] for k, v in batch.items()}
    state, metrics = step(state, mesh.shard_batch(batch))
    losses.append(float(metrics["loss"]))
  def describe(x):
    return {"shape": list(x.shape), "spec": [str(s) for s in x.sharding.spec],
            "shard_shape": list(x.addressable_shards[0].data.shape)}

  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  params = {jax.tree_util.keystr(path): describe(x) for path, x in flat}
  mu = jax.tree.leaves(state.opt_state[1][0].mu)  # clip -> (adam, ...) -> mu
  return {"losses": losses, "params": params,
          "mu_sharded": sum(1 for x in mu
                            if x.addressable_shards[0].data.shape != x.shape)}


def meshes(num_devices: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", num_devices)
  devices = jax.devices()
  assert len(devices) == num_devices, devices
  out = {"single": _steps((1, 1, 1), devices[:1])}
  for name, shape in (("dp", (-1, 1, 1)), ("fsdp", (1, -1, 1)),
                      ("tp", (1, 1, 2)), ("fsdp_tp", (1, -1, 2)),
                      ("dp_fsdp_tp", (2, 2, 2))):
    n = num_devices if -1 in shape else int(np.prod(shape))
    out[name] = _steps(shape, devices[:n])
  print("RESULT " + json.dumps(out))


def process(pid: int, port: int, workdir: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", 2)
  sys.path.insert(0, "tests/training")
  import training_helpers as th  # pylint: disable=g-import-not-at-top
  from jaxformer.training import distributed  # pylint: disable=g-import-not-at-top
  from jaxformer.training import loop  # pylint: disable=g-import-not-at-top

  dist = {"initialize": "auto", "coordinator_address": f"127.0.0.1:{port}",
          "num_processes": 2, "process_id": pid}
  assert distributed.maybe_initialize(dist)
  assert jax.process_count() == 2 and jax.device_count() == 4
  out = {"fsdp_steps": _steps((1, -1, 1), jax.devices())}
  c = th.tiny_config(num_steps=4, log_every=2, eval_every=4, checkpoint_every=2)
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.sharding.mesh_shape = (2, -1, 1)
  c.distributed.update(dist)
  summary = loop.train(c, workdir)
  out["train"] = {k: summary[k] for k in ("step", "loss", "eval_loss")}
  print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  if sys.argv[1] == "meshes":
    meshes(int(sys.argv[2]))
  else:
    process(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
