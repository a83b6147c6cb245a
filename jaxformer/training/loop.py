"""The training loop: ``train(config, workdir) -> final metrics``.

Validates the config, then builds mesh, tokenizer, model, task, data and state;
resumes exactly from the newest checkpoint in ``workdir`` (state *and* data iterator
position); then runs ``train_step`` ``config.train.num_steps`` times with periodic
logging, held-out eval, checkpoints, SIGTERM handling, and the task's sample at the
end. Everything that depends on what is learned is the task's
(:mod:`jaxformer.tasks`): the loop names no task.

The host never waits for the device except at log/eval/checkpoint steps: step n+1 is
dispatched before step n's metrics are read (and only at log steps).

Around it: one run per workdir (:mod:`~jaxformer.training.workdir_lock`), the whole
config checked on resume (:mod:`~jaxformer.training.resume_check`), a fallback past
damaged checkpoints, metrics rows once each and in order, and a stop when the run
diverges (:mod:`~jaxformer.training.divergence`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxformer import tasks as tasks_lib
from jaxformer.data import vocab
from jaxformer.models import registry
from jaxformer.pretrained import runs as pretrained_runs
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import distributed
from jaxformer.training import divergence
from jaxformer.training import finetune as finetune_lib
from jaxformer.training import metrics_logger
from jaxformer.training import optimizer as opt_lib
from jaxformer.training import resume_check
from jaxformer.training import sharding as sharding_lib
from jaxformer.training import state as state_lib
from jaxformer.training import steps as steps_lib
from jaxformer.training import workdir_lock
from jaxformer.training.validate import validate_config

__all__ = ["train", "validate_config", "Evaluator", "build_model"]


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


def build_model(config: Mapping[str, Any], tokenizer: Any) -> tuple[Any, Any]:
  """``(model_config, module)`` of ``config.model``; an unset ``model.vocab_size``
  becomes the tokenizer's (a vocabulary fitted on the run's text)."""
  section = dict(config["model"])
  if tokenizer is not None and "vocab_size" in section:
    if section["vocab_size"] is None:
      section["vocab_size"] = tokenizer.vocab_size
    elif section["vocab_size"] < tokenizer.vocab_size:
      raise ValueError(f"model.vocab_size={section['vocab_size']} is smaller than "
                       f"the tokenizer's vocabulary ({tokenizer.vocab_size})")
  return registry.build_model(section)


class Evaluator:
  """Held-out metrics: ``eval_batches`` fixed batches, token-weighted means, plus the
  task's own eval metrics (bits per byte, BLEU, ...) on the same batches."""

  def __init__(self, config: Mapping[str, Any], task: tasks_lib.Task, eval_step: Any,
               runtime: tasks_lib.Runtime, divisor: int):
    self._task = task
    self._eval_step = eval_step
    self._runtime = runtime
    self._num_batches = config["train"]["eval_batches"]
    self._batch = sharding_lib.per_process_batch(
        config["data"]["eval_batch_size"], divisor, "data.eval_batch_size")

  def __call__(self, params: Any) -> dict[str, float]:
    it = self._task.batches(batch_size=self._batch, seed=0, train=False)
    batches = [next(it) for _ in range(self._num_batches)]
    outs = [self._eval_step(params, self._runtime.shard(b)) for b in batches]
    metrics = steps_lib.reduce_eval_metrics(self._runtime.to_host(outs))
    metrics.update(self._task.eval_metrics(params, batches, metrics, self._runtime))
    return metrics


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
    ``{"step", "loss", "eval_loss", the task's eval metrics ("eval_bits_per_byte",
    "eval_bleu", ...), "step_time_ms",
    "tokens_per_sec", "skipped_steps", "preempted", "sample", ...}``; a finished run
    that is run again changes nothing and returns its ``summary.json``.
  Raises:
    workdir_lock.WorkdirLockedError: another run is using ``workdir``.
    divergence.TrainingDivergedError: ``train.max_consecutive_skipped`` steps in a row
      were skipped.
  """
  config = pretrained_runs.configure(config)  # init.pretrained: checkpoint's model
  validate_config(config)
  sharding_lib.configure_cpu_devices(config["sharding"].get("cpu_devices", 0),
                                     config["data"]["batch_size"])
  distributed.maybe_initialize(config.get("distributed"))
  os.makedirs(workdir, exist_ok=True)
  # The lock, then resources closed whatever happens (the checkpointer waits for its
  # save in flight): nothing below runs without them.
  with workdir_lock.hold(workdir), ckpt_lib.Preemption(), \
      contextlib.ExitStack() as resources:
    return _train(config, workdir, should_stop=should_stop, resources=resources)


def _train(config: Any, workdir: str, *, should_stop: Callable[[int], bool] | None,
           resources: contextlib.ExitStack) -> dict[str, Any]:
  """:func:`train` once the workdir is locked (``resources`` closes what it opens)."""
  tc = config["train"]
  dc = config["data"]
  num_steps = tc["num_steps"]

  # --- build ------------------------------------------------------------------------
  sc = config["sharding"]
  mesh = sharding_lib.make_mesh(tuple(sc["mesh_shape"]))
  rules = sharding_lib.make_rules(fsdp=sc.get("fsdp", True),
                                  tensor=sc.get("tensor", True))
  tokenizer = (pretrained_runs.tokenizer(config)
               or vocab.build_tokenizer(dc, workdir))
  model_cfg, model = build_model(config, tokenizer)
  # Every sharded dimension must divide its mesh axes: say which field, before tracing.
  registry.check_shardable(config["model"]["name"], model_cfg,
                           registry.logical_axis_sizes(rules, dict(mesh.shape)))
  task = tasks_lib.build_task(config, tokenizer=tokenizer, model_config=model_cfg)
  runtime = tasks_lib.Runtime(
      model=model, shard=lambda batch: sharding_lib.shard_batch(batch, mesh),
      to_host=sharding_lib.to_host,
      activate=lambda: sharding_lib.activate(mesh, rules))
  finetune_cfg = finetune_lib.resolve(config.get("finetune"))
  opt_cfg = opt_lib.OptimizerConfig.from_mapping(config["optimizer"])
  tx = finetune_lib.wrap_optimizer(opt_lib.make_optimizer(opt_cfg, num_steps),
                                  finetune_cfg)
  schedule = opt_lib.make_schedule(opt_cfg,
                                   max(num_steps // opt_cfg.grad_accum_steps, 1))
  guard = divergence.DivergenceGuard(tc.get(
      "max_consecutive_skipped", divergence.DEFAULT_MAX_CONSECUTIVE_SKIPPED))
  divisor = sharding_lib.batch_divisor(mesh)
  local_batch = sharding_lib.per_process_batch(dc["batch_size"], divisor,
                                               "data.batch_size")
  seq_len = task.example_length()

  config_json = _config_json(config)
  if "vocab_size" in config_json.get("model", {}):
    config_json["model"]["vocab_size"] = getattr(model_cfg, "vocab_size", None)
  checkpointer = resources.enter_context(ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=tc["keep_checkpoints"],
      save_every=tc["checkpoint_every"], async_save=tc["async_checkpoint"]))
  train_it = task.batches(batch_size=local_batch, seed=tc["seed"], train=True)
  # Shapes for init: the first batch, then rewind (the data position is unchanged).
  data_start = train_it.get_state()
  init_batch = jax.tree.map(lambda x: np.zeros((divisor, *x.shape[1:]), x.dtype),
                            next(train_it))
  train_it.set_state(data_start)

  def init_fn(rng):
    return model.init(rng, *task.model_inputs(init_batch))
  changes: dict[str, Any] = {}   # resume_check's (harmless, allowed) config changes

  def check(step, stored):
    changes["harmless"], changes["allowed"] = resume_check.check_resume(
        stored, config_json, where=f"checkpoint {step} in {workdir}")

  def use_data_state(_, data_state):
    if data_state is not None:
      train_it.set_state(data_state)
  restored = checkpointer.all_steps() and checkpointer.restore_latest(
      state_lib.abstract_train_state(init_fn, tx, mesh, rules), check=check,
      use=use_data_state)
  if not restored:
    start = 0
    state, shardings = state_lib.create_train_state(
        init_fn, tx, jax.random.key(tc["seed"]), mesh, rules)
    state = finetune_lib.init_from_pretrained(state, shardings.params, finetune_cfg)
    state = pretrained_runs.load_into_state(state, shardings.params, config)
  else:
    start, state, _ = restored
    shardings = state_lib.state_shardings(init_fn, tx, mesh, rules)
  train_step = steps_lib.make_train_step(
      model=model, task=task, tx=tx, opt_config=opt_cfg, mesh=mesh, rules=rules,
      shardings=shardings, schedule=schedule)
  eval_step = steps_lib.make_eval_step(
      model=model, task=task, mesh=mesh, rules=rules,
      param_shardings=shardings.params)
  evaluate = Evaluator(config, task, eval_step, runtime, divisor)

  # --- logging ----------------------------------------------------------------------
  logging_process = distributed.is_logging_process()
  previous_row = metrics_logger.resume_metrics(workdir, start)[0] if (
      logging_process) else {}
  num_params = registry.num_params(model_cfg, state.params)  # without vocab padding
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
  resources.callback(logger.close)
  logger.log_text(
      f"{type(model).__name__}: {num_params:,} params | mesh "
      f"{dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
      f"device(s), {jax.process_count()} process(es) | batch {dc['batch_size']} x "
      f"{seq_len} | {task.describe_data()} | " + (f"resuming at step {start}" if start else
                         f"from {pretrained_runs.directory(config) or 'scratch'}"))
  if start == 0 and finetune_lib.describe(finetune_cfg):
    logger.log_text(finetune_lib.describe(finetune_cfg, state.params))
  resume_check.log_changes(logger, start, changes, config)
  if start >= num_steps:
    return metrics_logger.finished_summary(logger, workdir, start, num_steps,
                                           previous_row)

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
      last_row = logger.log_train(pending[0], sharding_lib.to_host(pending[1]))
      pending = None
      guard.check(last_row["step"], last_row["consecutive_skipped"])

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
      guard.update(step, metrics)
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
      if checkpointer.should_save(step) and guard.may_save(step, logger.log_text):
        flush()  # the rows up to a checkpoint are on disk before it is
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
  if guard.may_save(step, logger.log_text):
    checkpointer.save(step, state, data_state=train_it.get_state(),
                      config=config_json, force=True)
  checkpointer.close()

  # --- summary ----------------------------------------------------------------------
  summary: dict[str, Any] = {"step": step, "preempted": preempted,
                             "num_params": num_params}
  summary["loss"] = last_row.get("loss")
  summary.update({k: v for k, v in eval_row.items() if k != "step"})
  summary["skipped_steps"] = int(sharding_lib.to_host(state.skipped_steps))
  if timed_from is not None and step > timed_from[0]:
    seconds = t_end - timed_from[1] - eval_seconds
    steps_timed = step - timed_from[0]
    summary["step_time_ms"] = 1000.0 * seconds / steps_timed
    summary["tokens_per_sec"] = tokens_per_step * steps_timed / seconds
    if peak is not None:
      summary["mfu"] = (flops_per_step * steps_timed / seconds
                        / (peak * jax.device_count()))
  summary["wall_time_s"] = time.perf_counter() - t_begin
  if not preempted:
    sample = task.sample(state.params, runtime, tc)
    if sample is not None:
      summary["sample"] = sample
  if logging_process:
    lines = [f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
             for k, v in summary.items() if k != "sample"]
    logger.log_text("summary | " + " | ".join(lines))
    if "sample" in summary:
      logger.log_text(f"sample (prompt {tc.get('sample_prompt', '')!r}, temperature "
                      f"{tc.get('sample_temperature', 1.0)}):\n{summary['sample']}")
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(metrics_logger.json_safe(summary), f, indent=2, allow_nan=False)
  return summary
