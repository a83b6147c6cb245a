"""Device mesh, logical-axis rules and the shardings of state and batches.

One value, :class:`Sharding`, built once from :class:`ShardingConfig` (the config's
``sharding`` section) and the devices, owns the mesh and its logical-axis rules and
offers what the rest of training needs: ``shard_batch``, ``activate``,
``state_shardings``, ``check_shardable``. It travels wherever a mesh and rules would.

The mesh has the axes :data:`jaxformer.axes.MESH_AXES` (``("data", "fsdp",
"tensor")``); the config's ``mesh_shape`` sizes them (one entry may be -1 = the
remaining devices). One device, data parallel, FSDP and tensor parallel are the same
code with different shapes::

  mesh_shape=(1, 1, 1)     one device
  mesh_shape=(-1, 1, 1)    data parallel (params replicated)
  mesh_shape=(1, -1, 1)    FSDP (params' embed axis sharded, batch sharded too)
  mesh_shape=(1, -1, 2)    FSDP x tensor parallel (heads / mlp / vocab over tensor)

Batches are sharded over ``("data", "fsdp")`` along their leading axis. The model's
``nn.with_logical_constraint`` calls need the mesh and rules in context while tracing:
wrap tracing/calls in ``Sharding.activate()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxformer import axes
from jaxformer import configs
from jaxformer.models import registry
from jaxformer.training import state as state_lib

log = logging.getLogger(__name__)

MESH_AXES = axes.MESH_AXES
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardingConfig:
  """The ``sharding`` section.

  Attributes:
    mesh_shape: sizes of the mesh axes :data:`MESH_AXES`; at most one -1 (= the
      remaining devices).
    fsdp: rules shard parameters' ``embed`` axis over ``fsdp``.
    tensor: rules shard heads / mlp / vocab over ``tensor``.
    cpu_devices: CPU only: split the host into this many JAX devices (one per core);
      -1 = auto (cores dividing the batch), 0 = JAX's default single CPU device.
  """

  mesh_shape: tuple[int, ...] = (-1,) + (1,) * (len(MESH_AXES) - 1)
  fsdp: bool = True
  tensor: bool = True
  cpu_devices: int = 0

  def __post_init__(self):
    shape = self.mesh_shape
    if (len(shape) != len(MESH_AXES) or shape.count(-1) > 1
        or any(s == 0 or s < -1 for s in shape)):
      raise ValueError(f"sharding.mesh_shape={shape!r} must be {len(MESH_AXES)} ints "
                       f"{MESH_AXES}, positive, with at most one -1 (= the remaining "
                       "devices)")
    if self.cpu_devices < -1:
      raise ValueError(f"sharding.cpu_devices={self.cpu_devices!r} must be -1 (auto), "
                       "0 (JAX default) or a positive device count")

  @classmethod
  def parse(cls, section: Any) -> ShardingConfig:
    return configs.parse(cls, section, "sharding")


def resolve_mesh_shape(mesh_shape: Sequence[int],
                       num_devices: int) -> tuple[int, ...]:
  """Replaces a -1 in ``mesh_shape`` by the remaining device count; validates.

  Args:
    mesh_shape: sizes of ``("data", "fsdp", "tensor")``; at most one -1.
    num_devices: devices available.
  Returns:
    Concrete sizes whose product is ``num_devices``.
  """
  shape = tuple(int(s) for s in mesh_shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh_shape={tuple(mesh_shape)!r} needs {len(MESH_AXES)} "
                     f"entries, one per mesh axis {MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh_shape={shape!r}: entries must be positive, with at "
                     "most one -1 (= the remaining devices)")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh_shape={shape!r}: {num_devices} devices are not "
                       f"divisible by the fixed axes' product {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh_shape={shape!r} uses {math.prod(shape)} devices but "
                     f"{num_devices} are available; use -1 for one axis")
  return shape


def auto_cpu_devices(batch_size: int, cores: int | None = None) -> int:
  """The most CPU devices (<= cores) that divide ``batch_size`` evenly."""
  if cores is None:
    try:
      cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
      cores = os.cpu_count() or 1
  return max(d for d in range(1, max(cores, 1) + 1) if batch_size % d == 0)


def configure_cpu_devices(count: int, batch_size: int) -> int | None:
  """Splits the host CPU into ``count`` JAX devices (before JAX initialises).

  XLA:CPU parallelises one small model's ops poorly across cores, but runs one device
  per core well: with ``count`` CPU devices the usual data-parallel mesh
  (``mesh_shape=(-1, 1, 1)``) gives each core its own slice of the batch (on 2 cores,
  a small model's step takes about half the time). Only the CPU backend is affected; on
  GPU/TPU hosts the accelerator stays the default backend.

  Args:
    count: 0 = leave JAX's default (one CPU device); N > 0 = N devices; -1 = auto:
      :func:`auto_cpu_devices` for ``batch_size``.
    batch_size: the global batch (auto picks a divisor of it).
  Returns:
    The device count requested, or None if nothing was changed (count 0, XLA_FLAGS
    already forces a count, or JAX was already initialised - then a warning is
    logged and the existing devices are used).
  """
  if count == 0 or "xla_force_host_platform_device_count" in os.environ.get(
      "XLA_FLAGS", ""):
    return None
  if count < -1:
    raise ValueError(f"sharding.cpu_devices={count!r} must be -1 (auto), 0 (JAX "
                     "default) or a positive device count")
  n = auto_cpu_devices(batch_size) if count == -1 else count
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    log.warning("sharding.cpu_devices=%d ignored: JAX is already initialised "
                "(set it before any JAX computation)", count)
    return None
  return n


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``Mesh`` with axes ``("data", "fsdp", "tensor")`` over all (given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def make_rules(*, fsdp: bool = True, tensor: bool = True) -> axes.Rules:
  """Logical-axis rules for the mesh (see :func:`jaxformer.axes.rules_for`)."""
  return axes.rules_for(fsdp=fsdp, tensor=tensor)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: axes.Rules) -> Iterator[None]:
  """Mesh + logical rules in context, for tracing models with logical constraints."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over ``("data", "fsdp")``, everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  """The global batch size must be a multiple of this."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: axes.Rules) -> Any:
  """NamedShardings for a tree of (possibly ``nn.LogicallyPartitioned``) leaves.

  Leaves without logical metadata (optimizer counters, rng keys) are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded over the batch axes.

  Each process passes its own slice (``global_batch / process_count`` rows); on one
  process this is just a sharded ``device_put``.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in batch.items()
  }


def to_host(tree: Any) -> Any:
  """Device values -> numpy on every process (gathers non-addressable arrays)."""
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(tree))


@dataclasses.dataclass(frozen=True)
class Sharding:
  """The mesh and its logical-axis rules, as one value (see the module docstring).

  Build it with :meth:`build` (from a :class:`ShardingConfig` and the devices) or
  directly from a ``Mesh`` and rules.
  """

  mesh: Mesh
  rules: axes.Rules = axes.DEFAULT_RULES

  @classmethod
  def build(cls, config: ShardingConfig | None = None,
            devices: Sequence[jax.Device] | None = None) -> Sharding:
    """The mesh ``config.mesh_shape`` over ``devices`` (default: all) with the rules
    ``config.fsdp`` / ``config.tensor`` choose."""
    config = config or ShardingConfig()
    return cls(make_mesh(config.mesh_shape, devices),
               make_rules(fsdp=config.fsdp, tensor=config.tensor))

  @property
  def shape(self) -> dict[str, int]:
    """``{mesh axis: size}``."""
    return dict(self.mesh.shape)

  @property
  def batch_divisor(self) -> int:
    """The global batch size must be a multiple of this."""
    return batch_divisor(self.mesh)

  def activate(self) -> contextlib.AbstractContextManager[None]:
    """Mesh + logical rules in context, for tracing models with logical constraints."""
    return activate(self.mesh, self.rules)

  def batch_sharding(self) -> NamedSharding:
    return batch_sharding(self.mesh)

  def replicated(self) -> NamedSharding:
    return replicated(self.mesh)

  def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays sharded over the batch axes."""
    return shard_batch(batch, self.mesh)

  def logical_shardings(self, abstract_tree: Any) -> Any:
    return logical_shardings(abstract_tree, self.mesh, self.rules)

  @staticmethod
  def to_host(tree: Any) -> Any:
    """Device values -> numpy on every process (see :func:`to_host`)."""
    return to_host(tree)

  def state_shardings(self, init_fn: state_lib.InitFn,
                      tx: Any) -> state_lib.TrainState:
    """A ``TrainState`` of ``NamedSharding`` leaves (no computation, no memory).

    Parameters get the shardings their logical axis names map to; optimizer moments
    and accumulators follow their parameters; scalars and keys are replicated.
    """
    with self.activate():
      abstract_vars = jax.eval_shape(init_fn, jax.random.key(0))
    return state_lib.state_shardings_from(abstract_vars, tx, self.logical_shardings(
        abstract_vars["params"]), self.replicated())

  def check_shardable(self, model_name: str, model_config: Any) -> None:
    """ValueError naming the model field whose dimension the mesh cannot split."""
    registry.check_shardable(model_name, model_config,
                             registry.logical_axis_sizes(self.rules, self.shape))

  def per_process_batch(self, global_batch: int, field: str) -> int:
    """This process's share of ``field`` (see :func:`per_process_batch`)."""
    return per_process_batch(global_batch, self.batch_divisor, field)


def per_process_batch(global_batch: int, divisor: int, field: str) -> int:
  """This process's share of the global batch ``field`` (ValueError naming it if the
  process count or the mesh's ``data x fsdp`` size does not divide it)."""
  count = jax.process_count()
  if global_batch % count or global_batch % divisor:
    raise ValueError(
        f"{field}={global_batch} must be divisible by the process count ({count}) "
        f"and by the mesh's data x fsdp size ({divisor}; sharding.mesh_shape)")
  return global_batch // count
