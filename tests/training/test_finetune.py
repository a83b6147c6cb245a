"""Starting from our run (the "run" origin): the pretrained body is restored exactly
(step 0), frozen params get zero updates, the head starts fresh (with what the
pretrained run never trained); mismatches are named. The init config's edge."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from experiments.configs import imdb_finetune
from tests.training.training_helpers import updated_names
from jaxformer.models import registry
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import config as config_lib
from jaxformer.training import finetune
from jaxformer.training import init as init_lib
from jaxformer.training import optimizer as opt_lib
from jaxformer.training import sharding as sharding_lib
from jaxformer.training import state as state_lib

SMALL = dict(num_layers=1, embed_dim=16, max_len=16, block=dict(num_heads=2, mlp_dim=32))
HEAD = ("classifier",)


def _body(params):
  flat = traverse_util.flatten_dict(params)
  return {k: v for k, v in flat.items() if k[0] not in HEAD}


def _finetune_config(pretrained_workdir: str | None, freeze: bool):
  c = imdb_finetune.get_config("tiny")
  c.model.update(SMALL)
  c.data.update(dict(seq_len=16, batch_size=4, eval_batch_size=4, prefetch=0))
  c.finetune.update(dict(pretrained_workdir=pretrained_workdir, freeze_body=freeze))
  c.train.update(dict(num_steps=2, log_every=1, eval_every=2, eval_batches=1,
                      checkpoint_every=2, progress=False, tensorboard=False,
                      async_checkpoint=False))
  return c


def _init_state(model_section, seed, tx=None):
  """A TrainState of the model in ``model_section``, as the loop creates it."""
  _, model = registry.build_model(model_section)
  mesh = sharding_lib.Sharding.build(sharding_lib.ShardingConfig(mesh_shape=(1, 1, 1)),
                                     jax.devices()[:1])
  inputs = jnp.zeros((1, SMALL["max_len"]), jnp.int32)
  tx = tx or optax.adam(1e-3)
  state, shardings = state_lib.create_train_state(
      lambda rng: model.init(rng, inputs), tx, jax.random.key(seed), mesh)
  return state, shardings


def _origin(c):
  """The origin the config ``c`` chooses, as the loop gets it."""
  return config_lib.make_origin(init_lib.InitConfig.parse(c.init, c.finetune))


def _write_pretrained(workdir, nsp):
  c = _finetune_config(None, False)
  section = dict(c.model, mlm_head=True, nsp_head=nsp, num_classes=0)
  state, _ = _init_state(section, seed=123)
  noise = jax.tree.map(lambda x: x + 0.5 * jnp.ones_like(x), state.params)
  state = state.replace(params=noise)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       async_save=False)
  checkpointer.save(7, state, force=True, config={"model": {
      k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in section.items()}})
  checkpointer.close()
  return workdir, jax.device_get(state.params)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 'pretrained' BERT checkpoint (MLM + NSP heads, params off their init) written by
  the loop's Checkpointer: ``(workdir, params)``."""
  return _write_pretrained(str(tmp_path_factory.mktemp("pretrained")), nsp=True)


@pytest.fixture(scope="module")
def pretrained_mlm_only(tmp_path_factory):
  """As ``pretrained`` but MLM only: its pooler never had a gradient."""
  return _write_pretrained(str(tmp_path_factory.mktemp("mlm_only")), nsp=False)


def test_load_pretrained_params_reads_exact_params(pretrained):
  workdir, params = pretrained
  assert finetune.pretrained_step(workdir) == 7
  loaded = finetune.load_pretrained_params(workdir)
  chex.assert_trees_all_equal(loaded, params)
  assert {"mlm_bias", "nsp", "encoder", "pooler"} <= set(loaded)
  with pytest.raises(ValueError, match=r"finetune.step=3.*\[7\]"):
    finetune.pretrained_step(workdir, 3)
  with pytest.raises(ValueError, match="no checkpoint"):
    finetune.pretrained_step(os.path.join(workdir, "missing"))


def test_step0_body_equals_pretrained_head_is_fresh(pretrained):
  workdir, params = pretrained
  c = _finetune_config(workdir, False)
  state, shardings = _init_state(c.model, seed=0)
  fresh = jax.device_get(state.params)
  origin = _origin(c)
  assert isinstance(origin, finetune.RunOrigin)
  state = origin.load(state, shardings.params)
  got = jax.device_get(state.params)
  want_body = _body(params)
  got_body = _body(got)
  assert set(got_body) == set(_body(fresh))               # no MLM / NSP params added
  for path, value in got_body.items():
    np.testing.assert_array_equal(value, want_body[path], err_msg=str(path))
    assert not np.array_equal(value, _body(fresh)[path])  # really replaced
  chex.assert_trees_all_equal(got["classifier"], fresh["classifier"])
  # From scratch: the state is untouched.
  assert _origin(_finetune_config(None, False)).load(state, shardings.params) is state


def test_merge_pretrained_names_mismatches():
  params = {"encoder": {"k": np.zeros((2, 3))}, "pooler": {"k": np.zeros(3)},
            "classifier": {"k": np.zeros((3, 2))}}
  pre = {"encoder": {"k": np.ones((2, 4))}, "mlm_bias": np.ones(5)}
  with pytest.raises(ValueError, match=r"(?s)missing: \['pooler/k'\].*encoder/k: "
                     r"pretrained \(2, 4\) != model \(2, 3\)"):
    finetune.merge_pretrained(params, pre, head=HEAD)
  pre = {"encoder": {"k": np.ones((2, 3))}, "pooler": {"k": np.ones(3)}}
  merged = finetune.merge_pretrained(params, pre, head=HEAD)
  np.testing.assert_array_equal(merged["encoder"]["k"], 1.0)
  np.testing.assert_array_equal(merged["classifier"]["k"], 0.0)
  with pytest.raises(ValueError, match=r"\['head'\]"):
    finetune.merge_pretrained(params, pre, head=("classifier", "head"))
  with pytest.raises(TypeError, match="sequence"):
    finetune.param_labels(params, "classifier")


def _scratch(freeze):
  return init_lib.Origin(init_lib.InitConfig(head=HEAD, freeze_body=freeze))


def test_freeze_body_zero_updates_for_body_only():
  params = {"encoder": {"k": jnp.ones((2, 3))}, "classifier": {"k": jnp.ones(3)}}
  assert finetune.param_labels(params, HEAD) == {"encoder": {"k": "body"},
                                                 "classifier": {"k": "head"}}
  base = opt_lib.make_optimizer(opt_lib.OptimizerConfig(learning_rate=0.1), 10)
  assert _scratch(False).optimizer(base, params) is base
  tx = _scratch(True).optimizer(base, params)
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state = tx.init(params)
  for _ in range(2):  # warmup-free schedule: lr > 0 from the first update
    updates, opt_state = tx.update(grads, opt_state, params)
  np.testing.assert_array_equal(updates["encoder"]["k"], 0.0)
  assert np.all(np.asarray(updates["classifier"]["k"]) != 0.0)


@pytest.mark.parametrize("nsp,want_head", [(True, ("classifier",)),
                                           (False, ("classifier", "pooler"))])
def test_frozen_body_trains_exactly_the_head(nsp, want_head, pretrained,
                                             pretrained_mlm_only):
  """MLM-only pre-training never trains the pooler: it joins the head (fresh and
  trainable); after NSP it is loaded and frozen. The optimizer updates exactly the head."""
  workdir, params = pretrained if nsp else pretrained_mlm_only
  c = _finetune_config(workdir, True)
  origin = _origin(c)
  state, shardings = _init_state(c.model, seed=0)
  fresh = jax.device_get(state.params)
  assert origin.head(state.params) == want_head
  state = origin.load(state, shardings.params)
  got = jax.device_get(state.params)
  chex.assert_trees_all_equal(got["encoder"], params["encoder"])
  pooler_source = params if nsp else fresh
  chex.assert_trees_all_equal(got["pooler"], pooler_source["pooler"])
  assert origin.trains(got) == list(want_head)
  assert updated_names(origin, got) == list(want_head)
  assert "trainable: " + ", ".join(want_head) in origin.describe(got)
  # Not frozen: everything trains; an explicit pooler in the head is kept as given.
  assert _origin(_finetune_config(workdir, False)).trains(got) == sorted(got)
  c.finetune.head = ("classifier", "pooler")
  explicit = _origin(c)
  assert explicit.head(got) == ("classifier", "pooler")
  assert "added to the head" not in explicit.describe(got)


def test_describe_and_the_init_edge(pretrained_mlm_only):
  workdir, params = pretrained_mlm_only
  origin = _origin(_finetune_config(workdir, True))
  head_params = {k: v for k, v in params.items() if k != "nsp"}
  head_params["classifier"] = {"kernel": np.zeros((16, 3), np.float32)}
  count = sum(x.size for n in ("classifier", "pooler")
              for x in jax.tree.leaves(head_params[n]))
  assert origin.describe(head_params) == (
      f"init: {workdir} (step 7), fresh head ('classifier', 'pooler'), body frozen "
      "(pooler added to the head: the origin never trained it) | trainable: "
      f"classifier, pooler ({count:,} params)")
  scratch = _origin(_finetune_config(None, False))
  assert scratch.describe({"a": np.zeros(3)}) == "init: scratch | trainable: a (3 params)"
  c = _finetune_config(workdir, False)
  c.init.pretrained = "some/hf_dir"
  with pytest.raises(ValueError, match="two origins"):
    init_lib.InitConfig.parse(c.init, c.finetune)
  with pytest.raises(ValueError, match=r"finetune\.head='classifier' must be a tuple"):
    init_lib.InitConfig.parse(None, {"head": "classifier"})
  with pytest.raises(ValueError, match=r"finetune\.freeze_body=1 must be a bool"):
    init_lib.InitConfig.parse(None, {"freeze_body": 1})
  with pytest.raises(ValueError, match=r"finetune\.pretrained_dir is not a field"):
    init_lib.InitConfig.parse(None, {"pretrained_dir": "x"})


# The loop end to end with a frozen body (the body is bit-identical after training):
# tests/experiments/test_configs.py::test_imdb_finetune_frozen_on_mock_imdb.
