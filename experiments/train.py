"""The one training CLI: any experiment is a config file.

  python -m experiments.train --config=experiments/configs/gpt_bytes.py \\
      --workdir=runs/gpt_bytes [--config.train.num_steps=500 ...]

Rerunning with the same ``--workdir`` resumes from its newest checkpoint (model state and
data position). SIGTERM or Ctrl-C (SIGINT) saves a checkpoint and exits with status 0;
a second run on a workdir in use fails at once. A bad config or
input prints one line naming the field and exits with status 1 (``--verbose``: the
traceback too). Everything this does is ``jaxformer.training.loop.train(config,
workdir)``, importable from a notebook.
"""

from __future__ import annotations

import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxformer.training import divergence
from jaxformer.training import loop
from jaxformer.training import workdir_lock

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a module with get_config()).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for checkpoints and metrics (resumes).")
_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "On an error, print the traceback, not just its line.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config file reported in one line."""
  verbose = any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv)
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    if verbose:
      traceback.print_exc()
    if isinstance(e, (AttributeError, KeyError)):  # an override of no config field
      raw = str(e.args[0] if e.args else e)
      name = re.search(r"'([^'\\]+)\\?'", raw)
      hint = re.search(r'Did you mean "([^"]+)"', raw)
      line = ("unknown config field in an override"
              + (f": {name.group(1)!r}" if name else "")
              + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))
    else:
      # A failing config file's traceback is embedded in the message: its last line
      # is the error itself.
      lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
      line = lines[-1] if lines else repr(e)
    print(f"error: {line}", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    loop.train(_CONFIG.value, _WORKDIR.value)  # validates before creating the workdir
  except (ValueError, TypeError, FileNotFoundError, workdir_lock.WorkdirLockedError,
          divergence.TrainingDivergedError) as e:
    if _VERBOSE.value:
      traceback.print_exc()
    print(f"error: {e}" + ("" if _VERBOSE.value else "  (--verbose: traceback)"),
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
