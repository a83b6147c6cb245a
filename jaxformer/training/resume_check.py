"""Resuming with a different config: which changes are safe, and one error for the rest.

On resume the whole config saved with the checkpoint is compared with the new one:

* changes that leave the training trajectory alone (``train.num_steps``, cadences,
  logging, the progress bar, evaluation size: the :data:`HARMLESS` keys) are allowed
  and logged; so are sharding and launch settings, but logged (and recorded in
  ``metrics.jsonl``) as changes that alter the trajectory (:data:`REORDERING`: another
  device layout reduces in another order, ~1e-7 at first);
* every other change (model, optimizer, data, seed, task, ...) would silently continue a
  different run from this one's state, so all of them are reported in one
  ``ValueError`` that lists each field as ``old -> new``;
* a deliberate change is allowed by naming it in ``train.allow_config_changes`` (e.g.
  ``("optimizer.learning_rate",)``; a section name allows the whole section), and the
  loop records it in ``metrics.jsonl`` as a ``config_changes`` row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

# Dotted keys (or whole sections) that may change between a run and its resumption.
HARMLESS: tuple[str, ...] = (
    "train.num_steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoint",
    "train.progress", "train.tensorboard", "task_options.sample_prompt",
    "task_options.sample_tokens", "task_options.sample_temperature",
    "train.bleu_batches", "train.allow_config_changes",
    "train.max_consecutive_skipped", "data.prefetch", "data.eval_batch_size",
    "sharding", "distributed",
)
# Harmless keys that still change the floating-point reduction order (the device
# layout): the losses then differ from an unchanged resume at rounding level.
REORDERING: tuple[str, ...] = ("sharding", "distributed")
_MISSING = "<absent>"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: tree}


def _plain(config: Any) -> Any:
  """A config (ConfigDict or mapping) as JSON data: tuples become lists, as saved."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def _covered(key: str, names: Iterable[str]) -> bool:
  return any(key == n or key.startswith(n + ".") for n in names)


def config_changes(stored: Any, current: Any) -> dict[str, tuple[Any, Any]]:
  """``{dotted key: (old, new)}`` for every leaf that differs (``"<absent>"`` if missing)."""
  old, new = _flatten(_plain(stored)), _flatten(_plain(current))
  return {k: (old.get(k, _MISSING), new.get(k, _MISSING))
          for k in sorted(set(old) | set(new))
          if old.get(k, _MISSING) != new.get(k, _MISSING)}


def allowed_changes(config: Mapping[str, Any]) -> tuple[str, ...]:
  """``train.allow_config_changes`` of a config (JSON data or a ``ConfigDict``),
  checked: a tuple of dotted config keys."""
  train = config["train"] if "train" in config else {}
  names = train["allow_config_changes"] if "allow_config_changes" in train else ()
  return check_allowed(names or ())


def check_allowed(names: Any) -> tuple[str, ...]:
  """``train.allow_config_changes`` checked: a tuple of dotted config keys."""
  if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
    raise ValueError(f"train.allow_config_changes={names!r} must be a tuple of dotted "
                     "config keys, e.g. ('optimizer.learning_rate',)")
  return tuple(names)


def check_resume(stored: Any, current: Any, *, where: str = "the checkpoint"
                 ) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
  """Compares the config saved with a checkpoint with the config resuming from it.

  Args:
    stored: the saved config (JSON data).
    current: the new config.
    where: names the checkpoint in the error.
  Returns:
    ``(harmless, allowed)``: the changes of :data:`HARMLESS` keys, and those permitted
    by ``train.allow_config_changes`` (both ``{key: (old, new)}``).
  Raises:
    ValueError: listing every other change as ``key: old -> new``.
  """
  allow = allowed_changes(current)
  changes = config_changes(stored, current)
  harmless = {k: v for k, v in changes.items() if _covered(k, HARMLESS)}
  allowed = {k: v for k, v in changes.items()
             if k not in harmless and _covered(k, allow)}
  refused = {k: v for k, v in changes.items() if k not in harmless and k not in allowed}
  if refused:
    lines = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items()]
    raise ValueError(
        f"{where} was written with a different config; resuming would continue another "
        "run's trajectory. Changed fields:\n  " + "\n  ".join(lines) +
        "\nUse another --workdir, restore these values, or allow a deliberate change "
        "with --config.train.allow_config_changes='(\"" + lines[0].split(":")[0] +
        "\",)'.")
  return harmless, allowed


def describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def log_changes(logger: Any, start: int, changes: dict[str, Any],
                config: Mapping[str, Any]) -> None:
  """Logs the changes :func:`check_resume` allowed (``changes``: its two dicts under
  ``"harmless"`` and ``"allowed"``); records deliberate ones, and device-layout ones
  (:data:`REORDERING`, with ``"alters_trajectory": true``), in the metrics as one
  ``{"step": start, "config_changes": {key: {"old", "new"}}}`` row.

  Args:
    logger: a :class:`jaxformer.training.metrics_logger.MetricsLogger`.
    start: the step resumed from.
    changes: as above (empty for a run from scratch).
    config: the new config as JSON data (for the note on ``train.num_steps``).
  """
  harmless, allowed = changes.get("harmless"), changes.get("allowed")
  reordering = {k: v for k, v in (harmless or {}).items() if _covered(k, REORDERING)}
  harmless = {k: v for k, v in (harmless or {}).items() if k not in reordering}
  if reordering:
    logger.log_text(
        f"resuming on another device layout: {describe(reordering)}. Allowed, but it "
        "alters the trajectory: sums over the batch are reduced in another order, so "
        "losses differ from an unchanged resume at float rounding level (~1e-7) and "
        "the difference can grow")
  if harmless:
    note = (" (the learning-rate schedule now spans the new num_steps)"
            if "train.num_steps" in harmless
            and config["optimizer"].get("schedule") != "constant" else "")
    logger.log_text(f"resuming with changed settings: "
                    f"{describe(harmless)}{note}")
  if allowed:
    logger.log_text("resuming with deliberate config changes (train.allow_config_"
                    f"changes): {describe(allowed)}")
  row = {k: {"old": old, "new": new, "alters_trajectory": True}
         for k, (old, new) in reordering.items()}
  row.update({k: {"old": old, "new": new} for k, (old, new) in (allowed or {}).items()})
  if row:
    logger.log_row({"step": start, "config_changes": row})
