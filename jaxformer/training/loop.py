"""The training loop: ``train(config, workdir) -> final metrics``.

``train`` parses the config once (:mod:`~jaxformer.training.config`), then
:func:`_train` reads as the loop it is:

1. build (:func:`_build`): the sharding, the tokenizer, the model, the task, the
   optimizer, the data iterator and the checkpointer;
2. restore or init (:func:`_start`): the newest checkpoint in ``workdir`` (state *and*
   data iterator position, exactly), or a fresh state from the run's origin
   (scratch, a Hugging Face directory or one of our runs: :mod:`.init`);
3. the step loop (:class:`_Steps`): ``train_step`` ``config.train.num_steps`` times
   with periodic logging, held-out eval, checkpoints and SIGTERM handling, then the
   summary and the task's sample.

Everything that depends on what is learned is the task's (:mod:`jaxformer.tasks`), and
everything that depends on where the parameters start is the origin's: the loop names
no task, model or source.

The host reads device values only at log/eval/checkpoint steps: step n+1 is
dispatched before step n's metrics are read (and only at log steps). On several CPU
devices one step is in flight at a time (``_Steps.settle``), with the next batch
already made and transferred while the step runs.

Around it: one run per workdir (:mod:`~jaxformer.training.workdir_lock`), the whole
config checked on resume (:mod:`~jaxformer.training.resume_check`), a fallback past
damaged checkpoints, metrics rows once each and in order, and a stop when the run
diverges (:mod:`~jaxformer.training.divergence`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxformer import configs
from jaxformer import tasks as tasks_lib
from jaxformer.data import fingerprint as fingerprint_lib
from jaxformer.data import vocab
from jaxformer.models import common as model_common
from jaxformer.models import registry
from jaxformer.training import checkpoint as ckpt_lib
from jaxformer.training import config as config_lib
from jaxformer.training import distributed
from jaxformer.training import divergence
from jaxformer.training import metrics_logger
from jaxformer.training import optimizer as opt_lib
from jaxformer.training import resume_check
from jaxformer.training import sharding as sharding_lib
from jaxformer.training import state as state_lib
from jaxformer.training import steps as steps_lib
from jaxformer.training import workdir_lock

__all__ = ["train", "validate_config", "Evaluator", "build_model"]

validate_config = config_lib.parse


def build_model(config: Any, tokenizer: Any, *, platform: str | None = None,
                vocab_shards: int = 1) -> tuple[Any, Any]:
  """``(model_config, module)`` of ``config.model`` (an experiment or stored config);
  an unset ``model.vocab_size`` becomes the tokenizer's (a vocabulary fitted on the
  run's text), and with ``platform`` an unset ``model.vocab_pad_multiple`` what that
  platform and ``vocab_shards`` (the vocabulary's tensor-parallel split) need."""
  section = configs.plain(config["model"])
  if platform is not None and section.get("vocab_pad_multiple", 0) is None:
    # Padding follows the hardware and the mesh (none on a CPU without tensor axis).
    section["vocab_pad_multiple"] = model_common.vocab_pad_multiple(platform,
                                                                    vocab_shards)
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

  def __init__(self, run: config_lib.RunConfig, task: tasks_lib.Task, eval_step: Any,
               runtime: tasks_lib.Runtime):
    self._task = task
    self._eval_step = eval_step
    self._runtime = runtime
    batch = runtime.sharding.per_process_batch(run.data.eval_batch_size,
                                               "data.eval_batch_size")
    # The same fixed batches at every eval, read now: a validation split that cannot
    # give them fails before step 1, not after the first eval_every steps.
    it = self._task.batches(batch_size=batch, seed=0, train=False)
    self._batches = [next(it) for _ in range(run.train.eval_batches)]

  def __call__(self, params: Any) -> dict[str, float]:
    batches = self._batches
    outs = [self._eval_step(params, self._runtime.shard(b)) for b in batches]
    metrics = steps_lib.reduce_eval_metrics(self._runtime.to_host(outs))
    metrics.update(self._task.eval_metrics(params, batches, metrics, self._runtime))
    return metrics


def _check_layout(run: config_lib.RunConfig) -> None:
  """The mesh fits the devices and divides the batches (ValueError naming the field)."""
  sharding = sharding_lib.Sharding.build(run.sharding)
  for field in ("batch_size", "eval_batch_size"):
    sharding.per_process_batch(getattr(run.data, field), f"data.{field}")


def train(config: Any, workdir: str, *,
          should_stop: Callable[[int], bool] | None = None) -> dict[str, Any]:
  """Trains (or resumes training) as described by ``config``; returns a summary.

  Args:
    config: an ``ml_collections.ConfigDict`` (see ``experiments/configs/``
      for the sections and fields), or an already parsed
      :class:`~jaxformer.training.config.RunConfig`.
    workdir: checkpoints, ``metrics.jsonl``, TensorBoard events, ``summary.json``.
    should_stop: optional ``steps_done -> bool``, checked after every step; True
      stops like a SIGTERM does (checkpoint, then return with ``preempted=True``).
  Returns:
    ``{"step", "loss", "eval_loss", the task's eval metrics ("eval_bits_per_byte",
    "eval_bleu", ...), "step_time_ms",
    "tokens_per_sec", "skipped_steps", "preempted", "sample", ...}``; a finished run
    that is run again changes nothing and returns its ``summary.json``.
  Raises:
    ValueError: the config is invalid (before the workdir is created).
    workdir_lock.WorkdirLockedError: another run is using ``workdir``.
    divergence.TrainingDivergedError: ``train.max_consecutive_skipped`` steps in a row
      were skipped.
  """
  run = config_lib.parse(config)
  sharding_lib.configure_cpu_devices(run.sharding.cpu_devices, run.data.batch_size)
  distributed.maybe_initialize(run.distributed)
  _check_layout(run)  # before the workdir exists: nothing to clean up
  workdir_lock.make_workdir(workdir)  # a file, read-only: one clear error
  # The lock, then resources closed whatever happens (the checkpointer waits for its
  # save in flight): nothing below runs without them.
  with workdir_lock.hold(workdir), ckpt_lib.Preemption(), \
      contextlib.ExitStack() as resources:
    return _train(run, workdir, should_stop=should_stop, resources=resources)


def _train(run: config_lib.RunConfig, workdir: str, *,
           should_stop: Callable[[int], bool] | None,
           resources: contextlib.ExitStack) -> dict[str, Any]:
  """:func:`train` once the workdir is locked (``resources`` closes what it opens)."""
  b = _build(run, workdir, resources)
  start, state, shardings, changes = _start(run, b, workdir)
  train_step = steps_lib.make_train_step(
      model=b.model, task=b.task, tx=b.tx, opt_config=run.optimizer,
      sharding=b.sharding, shardings=shardings, schedule=b.schedule)
  eval_step = steps_lib.make_eval_step(model=b.model, task=b.task, sharding=b.sharding,
                                       param_shardings=shardings.params)
  evaluate = Evaluator(run, b.task, eval_step, b.runtime)  # reads its data now
  # Unknown characters, after the data check of a resume (changed text: that error).
  coverage = vocab.check_coverage(b.tokenizer, run.data)
  logger, perf = _logger(run, b, workdir, start, state, resources, coverage)
  if start == 0:
    logger.log_text(run.origin.describe(state.params))  # what trains
  resume_check.log_changes(logger, start, changes, b.stored)
  if changes.get("data"):
    logger.log_text("resuming on changed data (train.allow_config_changes names it): "
                    + "; ".join(changes["data"]))
  if start >= run.train.num_steps:
    return metrics_logger.finished_summary(logger, workdir, start, run.train.num_steps,
                                           perf.previous_row)
  loop = _Steps(run, b, logger, evaluate)
  state = loop.run(state, train_step, start, should_stop)
  return _summarize(run, b, loop, perf, state, workdir)


@dataclasses.dataclass
class _Built:
  """What :func:`_build` makes once per run."""
  sharding: sharding_lib.Sharding
  model_config: Any
  model: Any
  task: tasks_lib.Task
  runtime: tasks_lib.Runtime
  tx: Any
  schedule: Any
  init_fn: Callable[[jax.Array], Any]
  train_it: Any
  checkpointer: ckpt_lib.Checkpointer
  stored: dict[str, Any]   # the config as stored with checkpoints
  seq_len: int
  tokenizer: Any
  fingerprint: dict[str, Any]   # of the data, stored with checkpoints


def _build(run: config_lib.RunConfig, workdir: str,
           resources: contextlib.ExitStack) -> _Built:
  """The sharding, tokenizer, model, task, optimizer, data and checkpointer."""
  num_steps = run.train.num_steps
  sharding = sharding_lib.Sharding.build(run.sharding)
  tokenizer = (run.origin.tokenizer(run.data)
               or vocab.build_tokenizer(run.data, workdir))
  model_cfg, model = build_model(
      run.stored, tokenizer, platform=sharding.mesh.devices.flat[0].platform,
      vocab_shards=registry.logical_axis_sizes(sharding.rules,
                                               sharding.shape).get("vocab", 1))
  # Every sharded dimension must divide its mesh axes: say which field, before tracing.
  sharding.check_shardable(run.model["name"], model_cfg)
  task = run.build_task(tokenizer=tokenizer, model_config=model_cfg)
  local_batch = sharding.per_process_batch(run.data.batch_size, "data.batch_size")
  train_it = task.batches(batch_size=local_batch, seed=run.train.seed, train=True)
  # Shapes for init: the first batch, then rewind (the data position is unchanged).
  data_start = train_it.get_state()
  init_batch = jax.tree.map(
      lambda x: np.zeros((sharding.batch_divisor, *x.shape[1:]), x.dtype),
      next(train_it))
  train_it.set_state(data_start)
  init_fn = lambda rng: model.init(rng, *task.model_inputs(init_batch))  # noqa: E731
  abstract_params = None
  if run.init.freeze_body:  # the frozen body's complement: the head (shapes only)
    with sharding.activate():
      abstract_vars = jax.eval_shape(init_fn, jax.random.key(0))
    abstract_params = nn.meta.unbox(abstract_vars["params"])
  tx = run.origin.optimizer(opt_lib.make_optimizer(run.optimizer, num_steps),
                            abstract_params)
  schedule = opt_lib.make_schedule(
      run.optimizer, max(num_steps // run.optimizer.grad_accum_steps, 1))
  stored = dict(run.stored, model=dict(run.stored["model"]))
  for field in ("vocab_size", "vocab_pad_multiple"):  # as resolved for this run
    if field in stored["model"]:
      stored["model"][field] = getattr(model_cfg, field, None)
  checkpointer = resources.enter_context(ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=run.train.keep_checkpoints,
      save_every=run.train.checkpoint_every, async_save=run.train.async_checkpoint))
  return _Built(sharding=sharding, model_config=model_cfg, model=model, task=task,
                runtime=tasks_lib.Runtime(model=model, sharding=sharding), tx=tx,
                schedule=schedule, init_fn=init_fn, train_it=train_it,
                checkpointer=checkpointer, stored=stored,
                seq_len=task.example_length(), tokenizer=tokenizer,
                fingerprint=fingerprint_lib.fingerprint(run.data, tokenizer))


def _start(run: config_lib.RunConfig, b: _Built, workdir: str
           ) -> tuple[int, state_lib.TrainState, state_lib.TrainState, dict[str, Any]]:
  """``(start step, state, its shardings, resume_check's config changes)``: the
  newest checkpoint restored exactly, or a fresh state loaded from the origin."""
  changes: dict[str, Any] = {}   # resume_check's (harmless, allowed) config changes

  def check(step, stored):
    changes["harmless"], changes["allowed"] = resume_check.check_resume(
        stored, b.stored, where=f"checkpoint {step} in {workdir}")
    changes["data"] = fingerprint_lib.check_resume(
        b.checkpointer.stored_fingerprint(step), b.fingerprint,
        run.train.allow_config_changes, where=f"checkpoint {step} in {workdir}")

  def use_data_state(_, data_state):
    if data_state is not None:
      b.train_it.set_state(data_state)
  restored = b.checkpointer.all_steps() and b.checkpointer.restore_latest(
      state_lib.abstract_train_state(b.init_fn, b.tx, b.sharding), check=check,
      use=use_data_state)
  if restored:
    start, state, _ = restored
    return start, state, b.sharding.state_shardings(b.init_fn, b.tx), changes
  state, shardings = state_lib.create_train_state(
      b.init_fn, b.tx, jax.random.key(run.train.seed), b.sharding)
  return 0, run.origin.load(state, shardings.params), shardings, changes


@dataclasses.dataclass
class _Perf:
  """Throughput bookkeeping of the run."""
  num_params: int
  tokens_per_step: int
  flops_per_step: float
  peak: float | None
  previous_row: dict[str, Any]


def _logger(run: config_lib.RunConfig, b: _Built, workdir: str, start: int,
            state: state_lib.TrainState, resources: contextlib.ExitStack,
            coverage: str = "") -> tuple[metrics_logger.MetricsLogger, _Perf]:
  """The metrics logger (closed with ``resources``) and its header line."""
  logging_process = distributed.is_logging_process()
  previous_row = metrics_logger.resume_metrics(workdir, start)[0] if (
      logging_process) else {}
  num_params = registry.num_params(b.model_config, state.params)  # no vocab padding
  tokens_per_step = run.data.batch_size * b.seq_len
  flops_per_step = tokens_per_step * metrics_logger.flops_per_token(
      num_params=num_params, num_layers=getattr(b.model_config, "num_layers", 0),
      width=getattr(b.model_config, "embed_dim", 0), seq_len=b.seq_len)
  peak = metrics_logger.peak_flops_per_device()
  logger = metrics_logger.MetricsLogger(
      workdir, total_steps=run.train.num_steps, start_step=start,
      tokens_per_step=tokens_per_step, flops_per_step=flops_per_step,
      peak_flops=None if peak is None else peak * jax.device_count(),
      enabled=logging_process, progress=run.train.progress,
      tensorboard=run.train.tensorboard)
  resources.callback(logger.close)
  logger.log_text(
      f"{type(b.model).__name__}: {num_params:,} params | mesh "
      f"{b.sharding.shape} on {jax.device_count()} {jax.devices()[0].platform} "
      f"device(s), {jax.process_count()} process(es) | batch {run.data.batch_size} x "
      f"{b.seq_len} | {b.task.describe_data()} | " + (
          f"resuming at step {start}" if start else f"from {run.origin.where()}")
      + (f" | {coverage}" if coverage else ""))
  return logger, _Perf(num_params, tokens_per_step, flops_per_step, peak,
                       previous_row)


class _Steps:
  """The step loop: train steps with logging, evals, checkpoints and preemption."""

  def __init__(self, run: config_lib.RunConfig, b: _Built,
               logger: metrics_logger.MetricsLogger, evaluate: Evaluator):
    self.run_config, self.b, self.logger, self.evaluate = run, b, logger, evaluate
    self.guard = divergence.DivergenceGuard(run.train.max_consecutive_skipped)
    self.step = 0
    self.pending = None
    self.last_row: dict[str, Any] = {}
    self.eval_row: dict[str, Any] = {}
    self.eval_step_done = -1
    self.preempted = False
    self.timed_from = None          # (step, time) after the first (compiling) step
    self.eval_seconds = 0.0
    self.t_begin = time.perf_counter()
    self.t_end = self.t_begin
    mesh = b.sharding.mesh
    self.one_in_flight = mesh.devices.flat[0].platform == "cpu" and mesh.size > 1

  def settle(self, state: state_lib.TrainState) -> None:
    """On several CPU devices, waits for the last step before launching a program.

    XLA:CPU runs each device's part of a program on one shared thread pool, and the
    parts meet at the gradients' all-reduce. A second program (the next step, an eval)
    launched while a step is in flight can hold the thread the other device still
    needs: the all-reduce then never completes (XLA aborts after 40 s; seen on a
    loaded 2-core host). The next batch is made and transferred before this wait, so
    the host's work still overlaps the step.
    """
    if self.one_in_flight:
      jax.block_until_ready(state)

  def flush(self) -> None:
    if self.pending is not None:
      host = sharding_lib.to_host(self.pending[1])
      host["consecutive_skipped"] = self.guard.read(self.pending[0])
      self.last_row = self.logger.log_train(self.pending[0], host)
      self.pending = None
      self.guard.check(self.last_row["step"], self.last_row["consecutive_skipped"])

  def run_eval(self, state: state_lib.TrainState) -> None:
    self.flush()
    self.settle(state)
    t0 = time.perf_counter()
    self.eval_row = self.logger.log_eval(self.step, self.evaluate(state.params))
    self.eval_step_done = self.step
    self.eval_seconds += time.perf_counter() - t0
    self.logger.reset_timer(self.step)

  def save(self, state: state_lib.TrainState, force: bool = False) -> None:
    self.b.checkpointer.save(self.step, state, data_state=self.b.train_it.get_state(),
                             config=self.b.stored, force=force,
                             fingerprint=self.b.fingerprint)

  def run(self, state: state_lib.TrainState, train_step: Any, start: int,
          should_stop: Callable[[int], bool] | None) -> state_lib.TrainState:
    tc, b, logger, guard = self.run_config.train, self.b, self.logger, self.guard
    multi = jax.process_count() > 1
    self.step = start
    with ckpt_lib.Preemption() as preempt:
      while self.step < tc.num_steps:
        batch = b.sharding.shard_batch(next(b.train_it))
        self.settle(state)
        state, metrics = train_step(state, batch)
        self.step += 1
        step = self.step
        guard.update(step, metrics)
        self.flush()  # the previous log step's metrics: step n+1 is already dispatched
        if self.timed_from is None:
          jax.block_until_ready(metrics)  # compilation: keep it out of throughput
          self.timed_from = (step, time.perf_counter())
          logger.reset_timer(step)
        is_log = step % tc.log_every == 0 or step == tc.num_steps
        if is_log:
          self.pending = (step, metrics)
        if step % tc.eval_every == 0 or step == tc.num_steps:
          self.run_eval(state)
        if b.checkpointer.should_save(step) and guard.may_save(step, logger.log_text):
          self.flush()  # the rows up to a checkpoint are on disk before it is
          self.save(state)
        stop = preempt.requested or (should_stop is not None and should_stop(step))
        if multi:
          stop = ckpt_lib.any_process(stop) if is_log else False
        if stop and step < tc.num_steps:
          self.preempted = True
          self.flush()
          logger.log_text(f"preempted: saving a checkpoint at step {step} and exiting")
          break
    self.flush()
    jax.block_until_ready(state)
    self.t_end = time.perf_counter()
    if self.eval_step_done != self.step and not self.preempted:
      self.run_eval(state)
    if guard.may_save(self.step, logger.log_text):
      self.save(state, force=True)
    b.checkpointer.close()
    return state


def _summarize(run: config_lib.RunConfig, b: _Built, loop: _Steps, perf: _Perf,
               state: state_lib.TrainState, workdir: str) -> dict[str, Any]:
  """The run's summary (logged, written to ``summary.json``) with the task's sample."""
  step = loop.step
  summary: dict[str, Any] = {"step": step, "preempted": loop.preempted,
                             "num_params": perf.num_params}
  summary["loss"] = loop.last_row.get("loss")
  summary.update({k: v for k, v in loop.eval_row.items() if k != "step"})
  summary["skipped_steps"] = int(sharding_lib.to_host(state.skipped_steps))
  if loop.timed_from is not None and step > loop.timed_from[0]:
    seconds = loop.t_end - loop.timed_from[1] - loop.eval_seconds
    steps_timed = step - loop.timed_from[0]
    summary["step_time_ms"] = 1000.0 * seconds / steps_timed
    summary["tokens_per_sec"] = perf.tokens_per_step * steps_timed / seconds
    if perf.peak is not None:
      summary["mfu"] = (perf.flops_per_step * steps_timed / seconds
                        / (perf.peak * jax.device_count()))
  summary["wall_time_s"] = time.perf_counter() - loop.t_begin
  sample = None if loop.preempted else b.task.sample(state.params, b.runtime,
                                                     run.train.seed)
  if sample is not None:
    summary["sample"] = sample[0]
  if distributed.is_logging_process():
    lines = [f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
             for k, v in summary.items() if k != "sample"]
    loop.logger.log_text("summary | " + " | ".join(lines))
    if sample is not None:
      loop.logger.log_text(f"{sample[1]}:\n{sample[0]}")
    metrics_logger.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary
