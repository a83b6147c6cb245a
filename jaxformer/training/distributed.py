"""Multi-process start-up: when to call ``jax.distributed.initialize``.

One process per host (or per GPU) runs the same command. Each process reads its own
shard of the data (``jax.process_index()`` of ``jax.process_count()``), the train step
sees one global batch, and only process 0 writes logs (checkpoints are written
collectively by orbax).

Launching:

* **Explicit** (any cluster, or two processes on one machine)::

    python -m experiments.train --config=... --workdir=DIR \\
        --config.distributed.coordinator_address=10.0.0.1:1234 \\
        --config.distributed.num_processes=2 --config.distributed.process_id=0
    # ... and process_id=1 on the other host / terminal.

  The same three values can come from the environment instead:
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``.
* **SLURM**: ``srun --ntasks=N python -m experiments.train ...``; JAX reads
  ``SLURM_JOB_ID`` / ``SLURM_NTASKS`` / ``SLURM_PROCID`` / the node list itself.
* **Cloud TPU pods**: run the command on every worker
  (``gcloud compute tpus tpu-vm ssh ... --worker=all``); JAX reads the TPU metadata.

``config.distributed.initialize`` is ``"auto"`` (initialise when one of the above is
present), ``"always"`` or ``"never"``. Call :func:`maybe_initialize` before anything
else touches JAX devices.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

from jaxformer import configs

log = logging.getLogger(__name__)

MODES = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
  """The ``distributed`` section (the module docstring): ``initialize`` is one of
  :data:`MODES`; the three others are given all together or not at all."""

  initialize: str = "auto"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    if self.initialize not in MODES:
      raise ValueError(
          f"distributed.initialize={self.initialize!r} is not one of {MODES}")

  @classmethod
  def parse(cls, section: Any) -> DistributedConfig:
    return configs.parse(cls, section, "distributed")


def _env_int(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name)
  return int(value) if value not in (None, "") else None


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
  """Which multi-process launcher the environment indicates, or None.

  Returns one of ``"env"`` (``JAX_COORDINATOR_ADDRESS``), ``"slurm"`` (a SLURM job
  step with more than one task) or ``"tpu"`` (a multi-worker Cloud TPU slice).
  """
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "env"
  if env.get("SLURM_JOB_ID") and (_env_int(env, "SLURM_NTASKS") or 1) > 1:
    return "slurm"
  hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES")
  if hosts and len(hosts.split(",")) > 1:
    return "tpu"
  return None


def initialize_kwargs(config: DistributedConfig | Mapping[str, Any] | None,
                      env: Mapping[str, str] | None = None
                      ) -> dict[str, Any] | None:
  """Arguments for ``jax.distributed.initialize``, or None for a single process.

  Args:
    config: the ``distributed`` config section (a :class:`DistributedConfig`, or a
      mapping of its fields).
    env: environment (default ``os.environ``).
  """
  env = os.environ if env is None else env
  config = DistributedConfig.parse(config)
  mode = config.initialize
  address = config.coordinator_address or None
  num, pid = config.num_processes, config.process_id
  if address is None and num is None and pid is None and env.get(
      "JAX_COORDINATOR_ADDRESS"):
    address = env["JAX_COORDINATOR_ADDRESS"]
    num = _env_int(env, "JAX_NUM_PROCESSES")
    pid = _env_int(env, "JAX_PROCESS_ID")
    if num is None or pid is None:  # let JAX's cluster detection fill them in
      return {} if mode != "never" else None
  if mode == "never":
    return None
  explicit = {k: v for k, v in (("coordinator_address", address),
                                ("num_processes", num), ("process_id", pid))
              if v is not None}
  if explicit and len(explicit) != 3:
    missing = sorted({"coordinator_address", "num_processes", "process_id"}
                     - set(explicit))
    raise ValueError(f"distributed: got {sorted(explicit)} but not {missing}; "
                     "give all three (or none, for auto-detection)")
  if explicit:
    if num < 1 or not 0 <= pid < num:
      raise ValueError(f"distributed.process_id={pid!r} must be in "
                       f"[0, num_processes={num!r})")
    return explicit
  if mode == "always" or detect_cluster(env) is not None:
    return {}  # JAX reads the environment / cluster itself
  return None


def maybe_initialize(config: DistributedConfig | Mapping[str, Any] | None = None
                     ) -> bool:
  """Calls ``jax.distributed.initialize`` when config or environment says so.

  Args:
    config: the ``distributed`` config section (may be None: auto-detect only).
  Returns:
    True if this process is part of a multi-process run.
  """
  kwargs = initialize_kwargs(config)
  if kwargs is None:
    return False
  if jax.distributed.is_initialized():
    return True
  log.info("jax.distributed.initialize(%s)", kwargs)
  jax.distributed.initialize(**kwargs)
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_logging_process() -> bool:
  """Only process 0 writes logs, metrics files and samples."""
  return jax.process_index() == 0
