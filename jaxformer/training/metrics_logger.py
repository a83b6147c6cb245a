"""Training metrics: progress bar or plain lines, ``metrics.jsonl``, TensorBoard, MFU.

Only process 0 writes (``enabled=False`` elsewhere). Every logged row goes to
``<workdir>/metrics.jsonl`` as one JSON object (``{"step": 100, "loss": 2.31, ...}``;
eval rows carry ``eval_loss``, ``eval_bits_per_byte``, ...) and to TensorBoard event
files in ``<workdir>/tensorboard``. On a terminal a tqdm bar shows step, loss, tokens/s
and ETA; otherwise (CI, log files) one plain line per log step.

MFU (model FLOP utilisation) = achieved model FLOP/s / peak FLOP/s of the devices, with
model FLOPs per token ``6 N + 12 n_layers d_model L`` (PaLM, appendix B: the matmul
FLOPs of forward + backward, plus attention scores). Peak numbers are dense bf16
tensor-core figures; on devices not in :data:`PEAK_FLOPS` (e.g. CPUs) MFU is omitted.

Each step appears once, in order: on (re)start :func:`resume_metrics` drops the rows
written after the checkpoint the run resumes from (all of them when there is none) and a
partial last line left by a kill. NaN and infinities are written as JSON ``null``.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax

log = logging.getLogger(__name__)

# device_kind substring (lower case) -> dense bf16 peak FLOP/s per device.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """Dense bf16 peak FLOP/s of ``device`` (default: the first device), or None."""
  device = jax.devices()[0] if device is None else device
  if device.platform == "cpu":
    return None
  kind = device.device_kind.lower()
  for key, flops in PEAK_FLOPS:
    if key in kind:
      return flops
  return None


def flops_per_token(*, num_params: int, num_layers: int, width: int,
                    seq_len: int) -> float:
  """Training FLOPs per token: ``6 N + 12 n_layers d_model L`` (fwd + bwd)."""
  return 6.0 * num_params + 12.0 * num_layers * width * seq_len


def json_safe(row: Mapping[str, Any]) -> dict[str, Any]:
  """``row`` with non-finite floats as None (strict JSON has no NaN: they become null)."""
  return {k: None if isinstance(v, float) and not math.isfinite(v) else v
          for k, v in row.items()}


def resume_metrics(workdir: str, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """Makes ``<workdir>/metrics.jsonl`` end at ``step``, the step a run (re)starts from.

  Drops rows after ``step`` (written by a run that was killed before its next
  checkpoint; all rows when ``step`` is 0), lines that are not JSON objects (a partial
  last line from a kill), with a warning, and ``config_changes`` rows at ``step`` (the
  resumed run records its own).

  Returns:
    The last kept train row (with ``loss``) and eval row (with ``eval_loss``), ``{}``
    when there is none.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}, {}
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  keep, last_train, last_eval = [], {}, {}
  for i, line in enumerate(lines):
    try:
      row = json.loads(line)
      row_step = row["step"] if isinstance(row, dict) else None
    except (json.JSONDecodeError, KeyError):
      row_step = None
    if not isinstance(row_step, int) or not line.endswith("\n"):
      if line.strip():
        log.warning("%s line %d is not a complete metrics row (a run killed while "
                    "writing it?); dropped: %r", path, i + 1, line[:80])
      continue
    if row_step > step or (row_step == step and "config_changes" in row):
      continue
    keep.append(line)
    if "loss" in row:
      last_train = row
    if "eval_loss" in row:
      last_eval = row
  if len(keep) != len(lines):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)  # a kill now leaves the old or the new file
  return last_train, last_eval


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  return str(datetime.timedelta(seconds=int(seconds)))


class MetricsLogger:
  """Writes training and eval metrics (see module docstring).

  Args:
    workdir: output directory (``metrics.jsonl``, ``tensorboard/``).
    total_steps: the run's last step (for the bar / ETA).
    start_step: step the run (re)starts from.
    tokens_per_step: global tokens per ``train_step`` (for tokens/s).
    flops_per_step: model FLOPs per ``train_step`` (None -> no MFU).
    peak_flops: total peak FLOP/s of all devices (None -> no MFU).
    enabled: write anything at all (False on processes other than 0).
    progress: tqdm bar (True), plain lines (False), or None = bar iff stdout is a TTY.
    tensorboard: write TensorBoard events.
    stream: where plain lines go (default stdout).
  """

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               tokens_per_step: int = 0, flops_per_step: float | None = None,
               peak_flops: float | None = None, enabled: bool = True,
               progress: bool | None = None, tensorboard: bool = True,
               stream: TextIO | None = None):
    self.workdir = workdir
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self.enabled = enabled
    self._stream = stream or sys.stdout
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._jsonl = None
    self._failed = False
    self._tb = None
    self._bar = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a",
                       encoding="utf-8")
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
    if progress is None:
      progress = self._stream.isatty()
    if progress:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, file=self._stream)

  def reset_timer(self, step: int) -> None:
    """Restarts throughput timing at ``step`` (e.g. after compilation or eval)."""
    self._last_step = step
    self._last_time = time.perf_counter()

  def _append(self, row: Mapping[str, Any]) -> None:
    """One row to ``metrics.jsonl``, on disk when this returns.

    Raises:
      OSError: naming ``metrics.jsonl`` (a full disk: ``ENOSPC``); a partial row is
        dropped when the run resumes from its last checkpoint.
    """
    if self._jsonl is None:
      return
    try:
      self._jsonl.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
      self._jsonl.flush()
    except OSError as e:
      self._failed = True
      error = OSError(e.errno, e.strerror or str(e), self._jsonl.name)
      error.add_note("the rows up to the last checkpoint are kept; free space and "
                     "run again to resume")
      raise error from e

  def _write(self, row: Mapping[str, Any], prefix: str = "") -> None:
    self._append(row)
    if self._tb is not None:
      step = int(row["step"])
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(prefix + k, v, step)

  def _print(self, text: str) -> None:
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, file=self._stream, flush=True)

  def log_train(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Logs host metrics at ``step`` (steps completed); adds throughput and MFU.

    Returns the row written (also on disabled processes).
    """
    now = time.perf_counter()
    steps = step - self._last_step
    seconds = now - self._last_time
    row: dict[str, Any] = {"step": int(step)}
    row.update({k: float(v) for k, v in metrics.items()})
    if steps > 0 and seconds > 0:
      row["step_time_ms"] = 1000.0 * seconds / steps
      if self.tokens_per_step:
        row["tokens_per_sec"] = self.tokens_per_step * steps / seconds
      if self.flops_per_step and self.peak_flops:
        row["mfu"] = self.flops_per_step * steps / seconds / self.peak_flops
    self._last_step, self._last_time = step, now
    if not self.enabled:
      return row
    self._write(row, "train/")
    eta = (self.total_steps - step) * row.get("step_time_ms", math.nan) / 1000.0
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      post = {"loss": f"{row.get('loss', math.nan):.4f}"}
      if "tokens_per_sec" in row:
        post["tok/s"] = f"{row['tokens_per_sec']:,.0f}"
      if "mfu" in row:
        post["mfu"] = f"{100 * row['mfu']:.1f}%"
      self._bar.set_postfix(post, refresh=True)
    else:
      parts = [f"step {step}/{self.total_steps}",
               f"loss {row.get('loss', math.nan):.4f}"]
      if "step_time_ms" in row:
        parts.append(f"{row['step_time_ms']:.1f} ms/step")
      if "tokens_per_sec" in row:
        parts.append(f"{row['tokens_per_sec']:,.0f} tok/s")
      if "mfu" in row:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
      if row.get("skipped_steps"):
        parts.append(f"skipped {int(row['skipped_steps'])}")
      parts.append(f"ETA {_format_duration(eta)}")
      self._print(" | ".join(parts))
    return row

  def log_eval(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Logs eval metrics; keys are prefixed ``eval_`` (``eval_loss``, ...)."""
    row: dict[str, Any] = {"step": int(step)}
    row.update({(k if k.startswith("eval_") else f"eval_{k}"): float(v)
                for k, v in metrics.items()})
    if self.enabled:
      self._write(row)
      text = " | ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step")
      self._print(f"eval @ step {step}: {text}")
    return row

  def log_row(self, row: Mapping[str, Any]) -> None:
    """Writes a row that is neither train nor eval metrics (e.g. ``config_changes``)."""
    self._append(row)

  def log_text(self, text: str) -> None:
    if self.enabled:
      self._print(text)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    errors = []  # both files are closed whatever happens; the first error is raised
    if self._tb is not None:
      tb, self._tb = self._tb, None
      try:
        tb.close()
      except OSError as e:
        errors.append(OSError(e.errno, e.strerror or str(e),
                              os.path.join(self.workdir, "tensorboard")))
    if self._jsonl is not None:
      jsonl, self._jsonl = self._jsonl, None
      try:
        jsonl.close()
      except OSError as e:
        errors.append(OSError(e.errno, e.strerror or str(e), jsonl.name))
    if errors and not self._failed:  # after a failed write: already raised, said
      raise errors[0]


def finished_summary(logger: MetricsLogger, workdir: str, start: int,
                     num_steps: int, previous_row: dict[str, Any]) -> dict[str, Any]:
  """A rerun of a finished run (checkpoint ``start`` >= ``num_steps``): says so, changes
  nothing and returns its ``summary.json`` (written from ``previous_row``, the last
  train row, if the run was killed before writing it)."""
  logger.log_text(
      f"nothing to do: {workdir} holds a finished run at step {start} "
      f"(train.num_steps={num_steps}); raise train.num_steps to train on, or use "
      "another --workdir")
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      log.warning("%s is damaged (%s); rebuilt from checkpoint %d and metrics.jsonl",
                  path, e, start)
      summary = None
    if isinstance(summary, dict) and summary.get("step") == start:
      return summary
  summary = {"step": start, "preempted": False, "loss": previous_row.get("loss")}
  if logger.enabled:  # killed before writing it, or damaged
    write_json(path, summary)
  return summary


def write_json(path: str, row: Mapping[str, Any]) -> None:
  """``row`` as JSON in ``path``, atomically (a kill leaves the old file or the new)."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(json_safe(row), f, indent=2, allow_nan=False)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise OSError(e.errno, e.strerror or str(e), path) from e
