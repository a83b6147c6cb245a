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

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import command_line
from jaxformer.training import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a module with get_config()).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for checkpoints and metrics (resumes).")
command_line.define_verbose()
flags.mark_flags_as_required(["config", "workdir"])


@command_line.user_errors
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  loop.train(_CONFIG.value, _WORKDIR.value)  # validates before creating the workdir


if __name__ == "__main__":
  app.run(main, flags_parser=command_line.parse_flags)
