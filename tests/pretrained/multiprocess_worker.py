"""One of two processes (2 CPU devices each, gloo) loading pretrained weights sharded.

  python tests/pretrained/multiprocess_worker.py PID PORT WORKDIR

Loads the tiny GPT-2 fixture with ``from_huggingface(sharding=...)`` onto an FSDP x tensor
mesh over the 4 devices of both processes, checks each process's shards against the
checkpoint, runs the model, then saves the params with orbax and restores them as a
fine-tuning body (``finetune.init_from_pretrained``) into a fresh sharded state. Prints
``RESULT {json}``. Not a test module (see test_sharded_loading.py).
"""

from __future__ import annotations

import json
import os
import sys


def main(pid: int, port: int, workdir: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", 2)
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from jaxformer.pretrained import from_huggingface  # pylint: disable=g-import-not-at-top
  from jaxformer.training import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from jaxformer.training import finetune  # pylint: disable=g-import-not-at-top
  from jaxformer.training import optimizer as opt_lib  # pylint: disable=g-import-not-at-top
  from jaxformer.training import sharding  # pylint: disable=g-import-not-at-top
  from jaxformer.training import state as state_lib  # pylint: disable=g-import-not-at-top

  here = os.path.dirname(os.path.abspath(__file__))
  directory = os.path.join(here, "fixtures", "gpt2_lm")
  assert jax.process_count() == 2 and jax.device_count() == 4
  mesh = sharding.Sharding.build(sharding.ShardingConfig(mesh_shape=(1, 2, 2)))
  model, params = from_huggingface(directory, sharding=mesh)

  # Each process holds only its own shards, and they are the checkpoint's values.
  hf = load_file(os.path.join(directory, "model.safetensors"))
  wi = params["decoder"]["layers_0"]["mlp"]["wi"]["kernel"]
  want = hf["transformer.h.0.mlp.c_fc.weight"]
  shards_ok = all(np.array_equal(np.asarray(s.data), want[s.index])
                  for s in wi.addressable_shards)
  leaves = jax.tree.leaves(params)
  sharded = sum(1 for x in leaves if x.addressable_shards[0].data.shape != x.shape)

  ref = dict(np.load(os.path.join(directory, "reference.npz")))
  ids = jnp.asarray(ref["input_input_ids"], jnp.int32)
  mask = jnp.asarray(ref["input_attention_mask"], bool)[:, None, None, :]
  with mesh.activate():
    logits = jax.jit(lambda p: model.apply({"params": p}, ids, mask=mask),
                     out_shardings=mesh.replicated())(params)
  err = float(np.abs(np.asarray(logits.addressable_shards[0].data)
                     - ref["logits"]).max())

  # Our own orbax checkpoint of these params, restored as a fine-tuning body.
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(1, {"params": params}, force=True)
  ckpt.close()
  tx = opt_lib.make_optimizer(opt_lib.OptimizerConfig(), 10)
  init_fn = lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))  # noqa: E731
  state, shardings = state_lib.create_train_state(init_fn, tx, jax.random.key(1), mesh)
  state = finetune.init_from_pretrained(state, shardings.params, workdir, None, ())
  flat_new = traverse_util.flatten_dict(state.params)
  flat_old = traverse_util.flatten_dict(params)
  body_ok = all(
      a.sharding == b.sharding and all(np.array_equal(np.asarray(x.data), np.asarray(y.data))
                                       for x, y in zip(a.addressable_shards,
                                                       b.addressable_shards))
      for a, b in ((flat_new[k], flat_old[k]) for k in flat_old))
  multihost_utils.sync_global_devices("done")
  print("RESULT " + json.dumps({
      "shards_ok": shards_ok, "sharded_leaves": sharded, "num_leaves": len(leaves),
      "wi_spec": [str(s) for s in wi.sharding.spec],
      "wi_shard": list(wi.addressable_shards[0].data.shape), "logits_err": err,
      "body_ok": body_ok}), flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
