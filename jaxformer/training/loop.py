"""The training loop: ``train(config, workdir) -> final metrics``.

Builds mesh, model, data and state from the config; resumes exactly from the newest
checkpoint in ``workdir`` (state *and* data iterator position); then runs
``train_step`` ``config.train.num_steps`` times with periodic logging, held-out eval,
checkpoints, SIGTERM handling, and a generated sample at the end. A task's extra eval
(:data:`jaxformer.training.tasks.EXTRA_EVALS`, e.g. seq2seq BLEU) runs with each eval.

The host never waits for the device except at log/eval/checkpoint steps: step n+1 is
dispatched before step n's metrics are read (and only at log steps).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxformer.generation import decode as generation
from jaxformer.pretrained import runs as pretrained_runs
from jaxformer.training import builders
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import distributed
from jaxformer.training import finetune as finetune_lib
from jaxformer.training import metrics_logger
from jaxformer.training import optimizer as opt_lib
from jaxformer.training import sharding as sharding_lib
from jaxformer.training import state as state_lib
from jaxformer.training import steps as steps_lib
from jaxformer.training import tasks as tasks_lib

BYTE_TOKENIZERS = ("bytes",)


def _check_positive(section: Mapping[str, Any], names: tuple[str, ...],
                    prefix: str) -> None:
  for name in names:
    value = section[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{prefix}.{name}={value!r} must be an int >= 1")


def validate_config(config: Mapping[str, Any]) -> None:
  """Cheap checks of the config, before any device work (ValueError naming fields)."""
  for section in ("model", "data", "optimizer", "train", "sharding"):
    if section not in config:
      raise ValueError(f"config has no {section!r} section; it has "
                       f"{sorted(config.keys())}")
  _check_positive(config["train"], ("num_steps", "log_every", "eval_every",
                                    "eval_batches", "checkpoint_every"), "train")
  _check_positive(config["data"], ("batch_size", "eval_batch_size") + tuple(
      k for k in ("seq_len", "source_len", "target_len") if k in config["data"]),
                  "data")
  max_len = config["model"].get("max_len")
  if max_len is not None and config["data"].get("seq_len", 0) > max_len:
    raise ValueError(f"data.seq_len={config['data']['seq_len']} exceeds "
                     f"model.max_len={max_len}")
  tasks_lib.get_task(config["task"], config.get("task_options"))


def _config_json(config: Any) -> dict[str, Any]:
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def _truncate_metrics(workdir: str, last_step: int) -> None:
  """On resume, drops metrics rows written after the checkpoint we resume from."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    rows = [line for line in f if line.strip()]
  keep = [r for r in rows if json.loads(r).get("step", 0) <= last_step]
  if len(keep) != len(rows):
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(keep)


def _host(tree: Any) -> Any:
  """Device values -> numpy on every process (gathers non-addressable arrays)."""
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


class Evaluator:
  """Held-out metrics: ``eval_batches`` fixed batches, token-weighted means.

  ``extra_eval`` (the task's, from :func:`jaxformer.training.tasks.get_extra_eval`)
  gets the same host batches and adds its metrics (e.g. seq2seq ``bleu``).
  """

  def __init__(self, config: Mapping[str, Any], tokenizer: Any, eval_step: Any,
               mesh: jax.sharding.Mesh, divisor: int,
               extra_eval: steps_lib.ExtraEval | None = None):
    self._data = config["data"]
    self._tokenizer = tokenizer
    self._eval_step = eval_step
    self._mesh = mesh
    self._extra_eval = extra_eval
    self._num_batches = config["train"]["eval_batches"]
    self._batch = builders.per_process_batch(self._data["eval_batch_size"], divisor)
    self._bytes = (self._data.get("tokenizer") in BYTE_TOKENIZERS
                   and config["task"] == "causal_lm")
    self._unigram: float | None = None

  def __call__(self, params: Any) -> dict[str, float]:
    it = builders.eval_iterator(self._data, self._tokenizer,
                                batch_size=self._batch)
    batches = [next(it) for _ in range(self._num_batches)]
    outs = [self._eval_step(params, sharding_lib.shard_batch(b, self._mesh))
            for b in batches]
    metrics = steps_lib.reduce_eval_metrics(_host(outs))
    if self._bytes and "nll" in metrics:
      metrics["bits_per_byte"] = metrics["nll"] / math.log(2.0)
      if self._unigram is None:
        self._unigram = unigram_bits(batches)
      metrics["unigram_bits_per_byte"] = self._unigram
    if self._extra_eval is not None:
      metrics.update(self._extra_eval(params, batches))
    return metrics


def unigram_bits(batches: list[dict[str, np.ndarray]]) -> float:
  """The unigram baseline, in bits per target token, of LM eval batches.

  The entropy of the weighted empirical distribution of the batches' ``targets``: the
  cross-entropy the best unigram model (one fitted on these very batches) would reach,
  so a trained model's ``eval_bits_per_byte`` should fall clearly below it.
  """
  targets = np.concatenate([np.asarray(b["targets"]).reshape(-1) for b in batches])
  weights = np.concatenate([np.asarray(b["weights"], np.float64).reshape(-1)
                            for b in batches])
  counts = np.bincount(targets, weights=weights)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


def sample_text(model: Any, params: Any, tokenizer: Any, *, prompt: str,
                max_new_tokens: int, temperature: float, seed: int,
                max_len: int) -> str:
  """Generates a continuation of ``prompt`` with the model's KV cache."""
  ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  new = min(max_new_tokens, max_len - len(ids))
  if new < 1:
    return prompt
  tokens_BT, lengths_B = generation.generate(
      model, params, jnp.asarray([ids], jnp.int32), max_new_tokens=new,
      rng=jax.random.key(seed), temperature=temperature,
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  tokens_BT, lengths_B = _host((tokens_BT, lengths_B))
  return tokenizer.decode(np.asarray(tokens_BT[0, 1:int(lengths_B[0])]).tolist())


def train(config: Any, workdir: str, *,
          should_stop: Callable[[int], bool] | None = None) -> dict[str, Any]:
  """Trains (or resumes training) as described by ``config``; returns a summary.

  Args:
    config: an ``ml_collections.ConfigDict`` (see ``experiments/configs/gpt_bytes.py``
      for the sections and fields).
    workdir: checkpoints, ``metrics.jsonl``, TensorBoard events, ``summary.json``.
    should_stop: optional ``steps_done -> bool``, checked after every step; True
      stops like a SIGTERM does (checkpoint, then return with ``preempted=True``).
  Returns:
    ``{"step", "loss", "eval_loss", "eval_bits_per_byte" (byte tokenizers),
    "eval_bleu" (seq2seq with ``train.bleu_batches > 0``), "step_time_ms",
    "tokens_per_sec", "skipped_steps", "preempted", "sample", ...}``.
  """
  config = pretrained_runs.configure(config)  # init.pretrained: checkpoint's model
  validate_config(config)
  sharding_lib.configure_cpu_devices(config["sharding"].get("cpu_devices", 0),
                                     config["data"]["batch_size"])
  distributed.maybe_initialize(config.get("distributed"))
  tc = config["train"]
  dc = config["data"]
  num_steps = tc["num_steps"]

  # --- build ------------------------------------------------------------------------
  sc = config["sharding"]
  mesh = sharding_lib.make_mesh(tuple(sc["mesh_shape"]))
  rules = sharding_lib.make_rules(fsdp=sc.get("fsdp", True),
                                  tensor=sc.get("tensor", True))
  model_cfg, model = builders.build_model(config["model"])
  tokenizer = pretrained_runs.tokenizer(config) or builders.build_tokenizer(dc)
  vocab = getattr(model_cfg, "vocab_size", None)
  if vocab is not None and tokenizer is not None and vocab < tokenizer.vocab_size:
    raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's "
                     f"vocabulary ({tokenizer.vocab_size})")
  task = tasks_lib.get_task(config["task"], config.get("task_options"),
                            tokenizer=tokenizer)
  extra_eval = tasks_lib.get_extra_eval(config, model=model, tokenizer=tokenizer,
                                        mesh=mesh, rules=rules)
  finetune_cfg = config.get("finetune")
  opt_cfg = opt_lib.OptimizerConfig.from_mapping(config["optimizer"])
  tx = finetune_lib.wrap_optimizer(opt_lib.make_optimizer(opt_cfg, num_steps),
                                  finetune_cfg)
  schedule = opt_lib.make_schedule(opt_cfg,
                                   max(num_steps // opt_cfg.grad_accum_steps, 1))
  divisor = sharding_lib.batch_divisor(mesh)
  local_batch = builders.per_process_batch(dc["batch_size"], divisor)
  seq_len = builders.example_length(dc, model_cfg)

  config_json = _config_json(config)
  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=tc["keep_checkpoints"],
      save_every=tc["checkpoint_every"], async_save=tc["async_checkpoint"])
  train_it = builders.train_iterator(dc, tokenizer, batch_size=local_batch,
                                     seed=tc["seed"])
  # Shapes for init: the first batch, then rewind (the data position is unchanged).
  data_start = train_it.get_state()
  init_batch = jax.tree.map(lambda x: np.zeros((divisor, *x.shape[1:]), x.dtype),
                            next(train_it))
  train_it.set_state(data_start)

  def init_fn(rng):
    return tasks_lib.init_variables(model, task, init_batch, rng)
  start = checkpointer.latest_step()
  if start is None:
    start = 0
    state, shardings = state_lib.create_train_state(
        init_fn, tx, jax.random.key(tc["seed"]), mesh, rules)
    state = finetune_lib.init_from_pretrained(state, shardings.params, finetune_cfg)
    state = pretrained_runs.load_into_state(state, shardings.params, config)
  else:
    checkpointer.check_config(start, config_json)
    shardings = state_lib.state_shardings(init_fn, tx, mesh, rules)
    abstract = state_lib.abstract_train_state(init_fn, tx, mesh, rules)
    state, data_state = checkpointer.restore(start, abstract)
    if data_state is not None:
      train_it.set_state(data_state)
  train_step = steps_lib.make_train_step(
      model=model, task=task, tx=tx, opt_config=opt_cfg, mesh=mesh, rules=rules,
      shardings=shardings, schedule=schedule)
  eval_step = steps_lib.make_eval_step(
      model=model, task=task, mesh=mesh, rules=rules,
      param_shardings=shardings.params)
  evaluate = Evaluator(config, tokenizer, eval_step, mesh, divisor, extra_eval)

  # --- logging ----------------------------------------------------------------------
  logging_process = distributed.is_logging_process()
  if logging_process and start > 0:
    _truncate_metrics(workdir, start)
  num_params = state_lib.count_params(state.params)
  tokens_per_step = dc["batch_size"] * seq_len
  flops_per_step = tokens_per_step * metrics_logger.flops_per_token(
      num_params=num_params, num_layers=getattr(model_cfg, "num_layers", 0),
      width=getattr(model_cfg, "embed_dim", 0), seq_len=seq_len)
  peak = metrics_logger.peak_flops_per_device()
  logger = metrics_logger.MetricsLogger(
      workdir, total_steps=num_steps, start_step=start,
      tokens_per_step=tokens_per_step, flops_per_step=flops_per_step,
      peak_flops=None if peak is None else peak * jax.device_count(),
      enabled=logging_process, progress=tc.get("progress"),
      tensorboard=tc.get("tensorboard", True))
  logger.log_text(
      f"{type(model).__name__}: {num_params:,} params | mesh "
      f"{dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
      f"device(s), {jax.process_count()} process(es) | batch {dc['batch_size']} x "
      f"{seq_len} | " + (f"resuming at step {start}" if start else
                         f"from {pretrained_runs.directory(config) or 'scratch'}"))
  if start == 0 and finetune_lib.describe(finetune_cfg):
    logger.log_text(finetune_lib.describe(finetune_cfg))

  # --- loop -------------------------------------------------------------------------
  multi = jax.process_count() > 1
  step = start
  pending = None
  last_row: dict[str, Any] = {}
  eval_row: dict[str, Any] = {}
  eval_step_done = -1
  preempted = False
  timed_from = None          # (step, time) after the first (compiling) step
  eval_seconds = 0.0
  t_begin = time.perf_counter()

  def flush():
    nonlocal pending, last_row
    if pending is not None:
      last_row = logger.log_train(pending[0], _host(pending[1]))
      pending = None

  def run_eval():
    nonlocal eval_row, eval_step_done, eval_seconds
    flush()
    t0 = time.perf_counter()
    eval_row = logger.log_eval(step, evaluate(state.params))
    eval_step_done = step
    eval_seconds += time.perf_counter() - t0
    logger.reset_timer(step)

  with ckpt_lib.Preemption() as preempt:
    while step < num_steps:
      batch = sharding_lib.shard_batch(next(train_it), mesh)
      state, metrics = train_step(state, batch)
      step += 1
      flush()  # the previous log step's metrics: step n+1 is already dispatched
      if timed_from is None:
        jax.block_until_ready(metrics)  # compilation: keep it out of throughput
        timed_from = (step, time.perf_counter())
        logger.reset_timer(step)
      is_log = step % tc["log_every"] == 0 or step == num_steps
      if is_log:
        pending = (step, metrics)
      if step % tc["eval_every"] == 0 or step == num_steps:
        run_eval()
      if checkpointer.should_save(step):  # (get_state only when saving)
        checkpointer.save(step, state, data_state=train_it.get_state(),
                          config=config_json)
      stop = preempt.requested or (should_stop is not None and should_stop(step))
      if multi:
        stop = ckpt_lib.any_process(stop) if is_log else False
      if stop and step < num_steps:
        preempted = True
        flush()
        logger.log_text(f"preempted: saving a checkpoint at step {step} and exiting")
        break
  flush()
  jax.block_until_ready(state)
  t_end = time.perf_counter()
  if eval_step_done != step and not preempted:
    run_eval()
  checkpointer.save(step, state, data_state=train_it.get_state(),
                    config=config_json, force=True)
  checkpointer.close()

  # --- summary ----------------------------------------------------------------------
  summary: dict[str, Any] = {"step": step, "preempted": preempted,
                             "num_params": num_params}
  summary["loss"] = last_row.get("loss")
  summary.update({k: v for k, v in eval_row.items() if k != "step"})
  summary["skipped_steps"] = int(_host(state.skipped_steps))
  if timed_from is not None and step > timed_from[0]:
    seconds = t_end - timed_from[1] - eval_seconds
    steps_timed = step - timed_from[0]
    summary["step_time_ms"] = 1000.0 * seconds / steps_timed
    summary["tokens_per_sec"] = tokens_per_step * steps_timed / seconds
    if peak is not None:
      summary["mfu"] = (flops_per_step * steps_timed / seconds
                        / (peak * jax.device_count()))
  summary["wall_time_s"] = time.perf_counter() - t_begin
  if not preempted and tc.get("sample_tokens", 0) > 0 and config["task"] == "causal_lm":
    summary["sample"] = sample_text(
        model, state.params, tokenizer, prompt=tc.get("sample_prompt", ""),
        max_new_tokens=tc["sample_tokens"],
        temperature=tc.get("sample_temperature", 1.0), seed=tc["seed"],
        max_len=getattr(model_cfg, "max_len", seq_len))
  if logging_process:
    lines = [f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
             for k, v in summary.items() if k != "sample"]
    logger.log_text("summary | " + " | ".join(lines))
    if "sample" in summary:
      logger.log_text(f"sample (prompt {tc.get('sample_prompt', '')!r}, temperature "
                      f"{tc.get('sample_temperature', 1.0)}):\n{summary['sample']}")
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
  logger.close()
  return summary
