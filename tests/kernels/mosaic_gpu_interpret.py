"""Runs Mosaic GPU kernels in JAX's GPU interpret mode on the CPU (tests only).

jax's interpreter (`jax._src.pallas.mosaic_gpu.interpret`) simulates SMEM,
TMA, barriers and wgmma and detects races, but lacks three things a
FlashAttention-3 kernel uses. This module adds them to the interpreter, for
the test process only (the kernels are unchanged):
  * `pl.run_state` (a wgmma accumulating into live registers): interpreted as
    a scoped register accumulator initialised with the value, the body, and a
    read back;
  * `plgpu.load` (a load with an explicit register layout): a plain ref read,
    and `plgpu.layout_cast` (no CPU lowering): the identity;
  * wgmma with the A operand in registers (P in P @ V) and operands seen
    through `transpose_ref` (K^T in Q @ K^T): read, transposed, multiplied.
And wgmma is asynchronous here, as on the GPU (jax's interpreter runs it at
issue): a wgmma's SMEM operands are read, and its product accumulated, only
when the issuing warpgroup waits for it (`wgmma_wait(n)`, an accumulator
read with `wait_n`, the end of `pl.run_state`, the end of the thread), i.e.
at the latest moment the hardware may read them. A kernel that releases an
operand's slot (a barrier arrive) before waiting for the wgmmas reading it
then races with the producer's next write into that slot, and the race
detector reports it (`_pending_wgmmas`; jax's own wgmma reads are not
race-checked at all, these are).
Three changes to how the interpreter runs, also test-only:
  * each simulated warpgroup's body is evaluated eagerly, one primitive at a
    time in its own Python thread, instead of being compiled per call into an
    XLA CPU executable that runs its barrier waits as callbacks (these could
    starve XLA's intra-op thread pool, one thread per core, and deadlock; see
    `_eval_eagerly`). Also 4-5x faster: nothing is compiled per call;
  * a warpgroup that fails aborts its kernel, and a barrier wait past
    BARRIER_WAIT_TIMEOUT_S raises: no kernel hangs on a barrier;
  * a pipeline may leave its last `num_stages` barrier completions unwaited
    (see `_barrier_deallocate`).
And the callbacks' small bookkeeping arrays (allocation keys) are built with
NumPy instead of dispatching jnp ops.
Works on jax 0.10 and 0.11, gated on what the interpreter has, not on the
version: 0.11 names a simulated thread by a `MeshLocation`/`Thread` pytree
(`_MESH_LOCATIONS`), gives scan FlatTree params and closed sub-jaxprs, waits
on a barrier per `Thread`, converts callback arguments with `_to_int` (which
must accept the eager threads' NumPy scalars) and restarts register buffer
ids per cluster (kept counting here, see `_reset_per_cluster_state`).
`interpret_context()` installs all of this and returns the context that runs every
Mosaic GPU kernel traced under it in interpret mode with race detection, on
an abstract H100, as the kernels' lowering and dispatch expect.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import types

import jax
from jax._src import callback
from jax._src import core as jax_core
from jax._src import linear_util as lu
from jax._src import pjit
from jax._src.interpreters import partial_eval as pe
from jax._src.lax.control_flow import conditionals
from jax._src.lax.control_flow import loops
from jax._src.pallas import primitives as pallas_primitives
from jax._src.pallas.mosaic.interpret import thread_map
from jax._src.pallas.mosaic.interpret import utils as interpret_utils
from jax._src.pallas.mosaic_gpu import core as gpu_core
from jax._src.pallas.mosaic_gpu import primitives as gpu_primitives
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret
from jax._src.pallas.mosaic_gpu.interpret import shared_memory
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from jax._src.pallas.mosaic_gpu.interpret.params import force_gpu_interpret_mode
from jax._src.state import discharge as state_discharge
from jax._src.state import indexing
from jax._src.state import primitives as state_primitives
from jax._src.state import types as state_types
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np

H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                   platform="gpu", num_cores=132)
_Interpreter = jaxpr_interpret.JaxprInterpreter
_ORIGINAL_INTERPRET = _Interpreter.interpret


def _run_state_as_scoped(outer_avals, *args, jaxpr, is_initialized, **_):
  """run_state -> run_scoped over register buffers: write, body, read.

  Arguments that are already refs pass through; the others (the wgmma
  accumulator, closed-over register values) get a scoped register buffer.
  """
  fresh = [i for i, a in enumerate(outer_avals)
           if not isinstance(a, state_types.AbstractRef)]
  types = []
  for i in fresh:
    aval = jaxpr.invars[i].aval
    if isinstance(aval, gpu_core.WGMMAAbstractAccumulatorRef):
      types.append(plgpu.ACC(aval.shape, aval.dtype))
    else:
      types.append(gpu_core.MemorySpace.REGS(aval.shape, aval.dtype))

  def body(*scoped):
    refs = list(args)
    for i, ref in zip(fresh, scoped):
      if is_initialized[i]:
        state_primitives.ref_set(ref, (), args[i])
      refs[i] = ref
    jax_core.eval_jaxpr(jaxpr, (), *refs)
    _wgmma_wait(0)  # run_state awaits all outstanding wgmmas
    return [ref[...] for ref in scoped]

  finals = pallas_primitives.run_scoped(body, *types)
  outs = list(args)
  for i, value in zip(fresh, finals):
    outs[i] = value
  return outs


def _rewrite_eval(jaxpr, consts, *args):
  """Evaluates `jaxpr`, replacing the primitives the interpreter lacks."""
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]  # noqa
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive is gpu_primitives.load_p:
      outs = [state_primitives.get_p.bind(*invals, tree=eqn.params["tree"])]
    elif eqn.primitive is gpu_core.layout_cast_p:  # registers are arrays here
      outs = invals
    elif eqn.primitive is state_discharge.run_state_p:
      outs = _run_state_as_scoped([v.aval for v in eqn.invars],
                                    *invals, **eqn.params)
    elif eqn.primitive is gpu_primitives.wgmma_wait_p:
      # jax 0.10 binds n as an operand, jax 0.11 as a parameter.
      _wgmma_wait(eqn.params["n"] if "n" in eqn.params else invals[0])
      outs = []
    else:
      outs = eqn.primitive.bind(*invals, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _interpret(self, jaxpr, token, *args):
  lacking = (gpu_primitives.load_p, state_discharge.run_state_p,
             gpu_core.layout_cast_p, gpu_primitives.wgmma_wait_p)
  if not any(eqn.primitive in lacking for eqn in jaxpr.eqns):
    return _ORIGINAL_INTERPRET(self, jaxpr, token, *args)
  n_consts = len(jaxpr.constvars)
  avals = [v.aval for v in jaxpr.constvars + jaxpr.invars]
  fun = lu.wrap_init(
      lambda *xs: _rewrite_eval(jaxpr, xs[:n_consts], *xs[n_consts:]),
      debug_info=jaxpr.debug_info)
  new_jaxpr, _, new_consts = pe.trace_to_jaxpr_dynamic(fun, avals)
  return _ORIGINAL_INTERPRET(self, new_jaxpr, token, *new_consts, *args)


def _read_operand(memory, key_array, transforms, thread, logging_info):
  """Buffer contents through NDIndexer and transpose transforms."""
  transforms = gpu_callbacks._remove_noop_transforms(transforms)  # noqa
  indexers = [t for t in transforms if isinstance(t, indexing.NDIndexer)]
  perms = [t.permutation for t in transforms
           if isinstance(t, state_types.TransposeTransform)]
  if len(indexers) + len(perms) != len(transforms) or (
      perms and not isinstance(transforms[-1],
                               state_types.TransposeTransform)):
    raise NotImplementedError(f"wgmma operand transforms {transforms}")
  key = gpu_callbacks.HostAllocationKey.from_array(key_array)
  rng = interpret_utils.to_range(jax.tree.map(int, indexers))
  value, _, clock = memory.get_buffer_content(key, rng, thread,
                                              logging_info=logging_info)
  if memory.detect_races and clock is not None:  # jax's wgmma checks none
    gpu_callbacks.get_races().check_read(
        logging_info.device_id, logging_info.thread_id, clock, key, rng,
        source_info=logging_info.source_info)
  for perm in perms:
    value = np.transpose(value, perm)
  return value


# jax >= 0.11 names a simulated thread by a `MeshLocation` and a `Thread`
# (pytrees passed to the callbacks), reads buffers through an `Access` that
# already composes indexers and transposes, and stores `RefUnion`s; jax 0.10
# passes (device_id, grid_point_coords, thread_id) arrays and plain ranges.
_MESH_LOCATIONS = hasattr(shared_memory, "MeshLocation")


def _accumulate(memory, acc_key, acc_range, a, b, acc_dtype, thread, info):
  """acc += a @ b in float32, on the accumulator's buffer (both jax versions)."""
  acc, _, _ = memory.get_buffer_content(acc_key, acc_range, thread,
                                        logging_info=info)
  out = acc + np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(
      acc_dtype)
  memory.store_buffer_content(acc_key, acc_range, out, thread,
                              logging_info=info)


# -- Asynchronous wgmma. -------------------------------------------------------
#
# Each simulated thread is a Python thread (see `_eval_eagerly`), so its
# wgmma groups in flight are a thread-local FIFO of deferred matmuls.

_wgmma_state = threading.local()


def _pending_wgmmas() -> list:
  if not hasattr(_wgmma_state, "pending"):
    _wgmma_state.pending = []
  return _wgmma_state.pending


def _complete_wgmmas(keep: int | None):
  """Runs the oldest pending wgmmas until at most `keep` are in flight."""
  if keep is None:  # an accumulator read that does not wait
    return
  pending = _pending_wgmmas()
  while len(pending) > keep:
    pending.pop(0)()


def _wgmma_wait(n: int):
  """`wgmma_wait(n)` traced into a thread's body: a callback at run time."""
  callback.io_callback(functools.partial(_complete_wgmmas, int(n)), None,
                       ordered=False)


_DEREF = gpu_callbacks.wgmma_accumulator_deref


def _wgmma_accumulator_deref(*args, wait_n, **kwargs):
  _complete_wgmmas(wait_n)
  return _DEREF(*args, wait_n=wait_n, **kwargs)


def _wgmma_callback(token, device_id, grid_point_coords, thread_id, acc, a, b,
                    acc_transforms, a_transforms, b_transforms, *,
                    a_in_registers: bool, acc_dtype, source_info):
  device_id, thread_id = int(device_id), int(thread_id)
  memory = gpu_callbacks._get_shared_memory()  # noqa
  thread = memory.get_global_thread_id(device_id, thread_id)
  info = interpret_utils.GPULoggingInfo(
      device_id=device_id,
      grid_point_coords=tuple(int(x) for x in grid_point_coords),
      thread_id=thread_id, source_info=source_info)
  read = functools.partial(_read_operand, memory, thread=thread,
                           logging_info=info)
  a_regs = np.array(a) if a_in_registers else None  # registers: read now
  acc_key = gpu_callbacks.HostAllocationKey.from_array(acc)
  acc_range = interpret_utils.to_range(
      jax.tree.map(int, gpu_callbacks._remove_noop_transforms(  # noqa
          acc_transforms)))

  def complete():  # SMEM operands: read when waited for
    a_val = a_regs if a_in_registers else read(a, a_transforms)
    _accumulate(memory, acc_key, acc_range, a_val, read(b, b_transforms),
                acc_dtype, thread, info)

  _pending_wgmmas().append(complete)
  return token


def _wgmma_callback_mesh(*, token, mesh_location, thread, acc, a, b,
                         acc_transforms, a_transforms, b_transforms,
                         a_in_registers: bool, acc_dtype, source_info):
  """`_wgmma_callback` for jax >= 0.11 (see `_MESH_LOCATIONS`)."""
  memory = gpu_callbacks._get_shared_memory()  # noqa
  info = shared_memory.GPULoggingInfo(mesh_location, thread, source_info)

  def access(key_array, transforms):
    key = gpu_callbacks.HostAllocationKey.from_array(key_array)
    transforms = jax.tree.map(
        int, gpu_callbacks._remove_noop_transforms(transforms))  # noqa
    return key, memory.access(key, transforms)

  def read(key_array, transforms):
    key, rng = access(key_array, transforms)
    value, _, clock = memory.get_buffer_content(key, rng, thread,
                                                logging_info=info)
    if memory.detect_races and clock is not None:  # jax's wgmma checks none
      # wgmma reads SMEM through the async proxy (as jax 0.11's tcgen05_mma
      # does), at a new tick of the thread's own clock: later events of the
      # thread (a release after the wait) are ordered after it, earlier ones
      # (a release before the wait) are not.
      with memory.lock:
        own = memory.clocks[thread]
        own.inc(memory.thread_to_vc_position(thread))
        clock = own.async_smem_clock.copy()
      gpu_callbacks.get_races().check_read(thread, clock, key, rng,
                                           source_info=source_info)
    return value

  a_regs = np.array(a) if a_in_registers else None  # registers: read now
  acc_key, acc_range = access(acc, acc_transforms)

  def complete():  # SMEM operands: read when waited for
    a_val = a_regs if a_in_registers else read(a, a_transforms)
    _accumulate(memory, acc_key, acc_range, a_val, read(b, b_transforms),
                acc_dtype, thread, info)

  _pending_wgmmas().append(complete)
  return token


def _interpret_wgmma(self, eqn, token, get_invals):
  acc, a, b, *leaves = get_invals()
  empty = jax.tree.structure([])
  acc_t, a_t, b_t = jax.tree.unflatten(
      jax.tree_util.treedef_tuple((
          eqn.params["acc_transforms_tree"] or empty,
          eqn.params["a_transforms_tree"] or empty,
          eqn.params["b_transforms_tree"] or empty)), leaves)
  a_in_registers = not isinstance(eqn.invars[1].aval,
                                  state_types.AbstractRef)
  if _MESH_LOCATIONS:
    resolve = jaxpr_interpret.resolve_ref
    acc, acc_t = resolve(eqn.invars[0].aval, acc, acc_t)
    if not a_in_registers:
      a, a_t = resolve(eqn.invars[1].aval, a, a_t)
    b, b_t = resolve(eqn.invars[2].aval, b, b_t)
    return callback.io_callback(
        functools.partial(_wgmma_callback_mesh, a_in_registers=a_in_registers,
                          acc_dtype=eqn.invars[0].aval.dtype,
                          source_info=eqn.source_info),
        gpu_callbacks.TOKEN_SHAPE_DTYPE,
        token=token, mesh_location=self.mesh_location, thread=self.thread,
        acc=acc, a=a, b=b, acc_transforms=acc_t, a_transforms=a_t,
        b_transforms=b_t, ordered=True), []
  return callback.io_callback(
      functools.partial(_wgmma_callback, a_in_registers=a_in_registers,
                        acc_dtype=eqn.invars[0].aval.dtype,
                        source_info=eqn.source_info),
      gpu_callbacks.TOKEN_SHAPE_DTYPE,
      token, self.device_info.device_id, self.grid_point_coords,
      self.thread_id, acc, a, b, acc_t, a_t, b_t, ordered=True), []


# -- The simulated threads: evaluated eagerly, one primitive at a time. --------
#
# jax's runner (`thread_map._run_jaxpr`) jit-compiles each warpgroup's body
# afresh on every call and runs it as an XLA CPU executable, with its barrier
# waits as Python callbacks inside. XLA runs parts of an executable on its
# intra-op thread pool, which has one thread per core (2 in CI): a callback
# blocked there (a barrier wait, or the kernel's own thread_map callback
# waiting for its warpgroups) holds a pool thread, and once every pool thread
# is held so, the warpgroup that would release them waits for a pool thread
# forever (seen in gdb: both pool threads in Python callbacks, the remaining
# warpgroups in `CpuPjRtRawLoadedExecutable::Execute` -> `BlockUntilReady`).
# Here each body is evaluated in its own Python thread instead: control flow
# (while, scan, cond, jit) in Python, every other primitive dispatched eagerly
# (small cached single-op executables, no callbacks inside), the callbacks
# called directly. No callback ever runs on an XLA pool thread, so none can
# starve it; and nothing is compiled per call (4-5x faster).


def _eval_eagerly(jaxpr: jax_core.Jaxpr, consts, args) -> list:
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]  # noqa
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    prim, params = eqn.primitive, eqn.params
    if prim is callback.io_callback_p:
      outs = [np.asarray(x) for x in
              params["callback"](*[np.asarray(x) for x in invals])]
    elif prim is loops.while_p:
      nc, nb = params["cond_nconsts"], params["body_nconsts"]
      (cond, ck), (body, bk) = map(_open, (params["cond_jaxpr"],
                                           params["body_jaxpr"]))
      cc, bc, outs = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
      while bool(_eval_eagerly(cond, ck, [*cc, *outs])[0]):
        outs = _eval_eagerly(body, bk, [*bc, *outs])
    elif prim is loops.scan_p:
      outs = _scan_eagerly(eqn, invals)
    elif prim is conditionals.cond_p:
      outs = _eval_eagerly(*_open(params["branches"][int(invals[0])]),
                           invals[1:])
    elif prim is pjit.jit_p:
      outs = _eval_eagerly(*_open(params["jaxpr"]), invals)
    else:
      if any(sub.effects for sub in jax_core.jaxprs_in_params(params)):
        raise NotImplementedError(  # would run its callbacks inside XLA
            f"eager evaluation of {prim} with effects")
      outs = prim.bind(*invals, **params)
      outs = outs if prim.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _open(jaxpr) -> tuple[jax_core.Jaxpr, list]:
  """A (closed or open) sub-jaxpr's jaxpr and consts."""
  if isinstance(jaxpr, jax_core.ClosedJaxpr):
    return jaxpr.jaxpr, jaxpr.consts
  return jaxpr, []


def _scan_eagerly(eqn, invals) -> list:
  p = eqn.params
  body, body_consts = _open(p["jaxpr"])
  if "ft_in" in p:  # jax >= 0.11: the operands' grouping as FlatTrees
    consts, carry, xs = (list(g) for g in p["ft_in"].update(invals).unpack())
    n_carry = len(carry)
  else:
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts, carry = invals[:n_consts], invals[n_consts:n_consts + n_carry]
    xs = invals[n_consts + n_carry:]
  steps = range(p["length"])
  ys = []
  for i in (reversed(steps) if p["reverse"] else steps):
    outs = _eval_eagerly(body, body_consts,
                         [*consts, *carry, *(x[i] for x in xs)])
    carry = outs[:n_carry]
    ys.append(outs[n_carry:])
  if p["reverse"]:
    ys.reverse()
  if not ys:
    return [*carry, *(jnp.zeros(v.aval.shape, v.aval.dtype)
                      for v in eqn.outvars[n_carry:])]
  return [*carry, *(jnp.stack(column) for column in zip(*ys))]


# -- No simulated thread waits forever. ----------------------------------------
#
# jax's barrier wait has no timeout: if one warpgroup fails (an exception in a
# callback), the others wait forever for its arrivals, and the test hangs.
# Here a failing warpgroup aborts the kernel: every barrier wait re-checks
# each second and raises once aborted, or once it has waited longer than
# BARRIER_WAIT_TIMEOUT_S (a kernel deadlock: the error names the wait).

BARRIER_WAIT_TIMEOUT_S = 120.0  # a legitimate wait takes well under a second
_abort = threading.Event()
_abort_reason: list[str] = []
_waiting = threading.local()


def _abort_kernel(reason: str):
  _abort_reason.append(reason)
  _abort.set()


class _AbortableCondition(threading.Condition):
  """A barrier's condition variable whose waits fail instead of hanging."""

  def wait(self, timeout=None):
    del timeout  # `Barrier.wait` waits without one and loops on the phase
    super().wait(1.0)
    if _abort.is_set():
      raise RuntimeError("Mosaic GPU interpret: another simulated thread "
                         f"failed ({_abort_reason[0]})")
    since = getattr(_waiting, "since", None)
    if since is not None and time.monotonic() - since > BARRIER_WAIT_TIMEOUT_S:
      info = _waiting.info
      where = info if isinstance(info, str) else info.format("barrier wait")
      reason = (f"a barrier wait took over {BARRIER_WAIT_TIMEOUT_S:.0f} s, "
                f"the kernel deadlocked: {where}")
      _abort_kernel(reason)
      raise TimeoutError(f"Mosaic GPU interpret: {reason}")
    return True


_BARRIER_INIT = shared_memory.Barrier.__init__
_BARRIER_WAIT = shared_memory.Barrier.wait


def _barrier_init(self, *args, **kwargs):
  _BARRIER_INIT(self, *args, **kwargs)
  self.cv = _AbortableCondition()


def _barrier_timed_wait(self, *thread, logging_info=None):
  """`Barrier.wait(device_id, local_thread_id)` (jax 0.10) or `(thread)`."""
  _waiting.since = time.monotonic()
  _waiting.info = logging_info or f"thread {thread[-1]}"
  try:
    return _BARRIER_WAIT(self, *thread, logging_info=logging_info)
  finally:
    _waiting.since = None


def _barrier_deallocate(self):
  """`Barrier.deallocate` without its check that a thread that waited on a
  barrier saw every completion. A pipeline's producer never waits for the
  consumers' releases of its last `num_stages` loads (jax's own
  attention_mgpu.py does the same): harmless, as the barrier is not used
  again, but the check rejects every kernel whose ring wraps around. A wait
  for a completion that was missed still fails (`Barrier.wait`)."""
  with self.cv:
    self.ref_count -= 1


def _run_thread(jaxpr, consts, *args):
  """`thread_map._run_jaxpr`: one simulated thread's body, eagerly."""
  if isinstance(jaxpr, jax_core.ClosedJaxpr):  # jax >= 0.11 passes it closed
    jaxpr = jaxpr.jaxpr
  _pending_wgmmas().clear()
  try:
    _eval_eagerly(jaxpr, consts, args)
    _complete_wgmmas(0)  # a thread's last wgmmas complete before it ends
  except BaseException as e:
    if not _abort.is_set():
      _abort_kernel(f"{type(e).__name__}: {str(e)[:2000]}")
    raise
  finally:
    _pending_wgmmas().clear()


_TO_INT = getattr(shared_memory, "_to_int", None)  # jax >= 0.11


def _to_int(x):
  """`shared_memory._to_int`, accepting NumPy scalars too: the eager threads
  call the callbacks with NumPy arrays, where XLA passes jax arrays."""
  if isinstance(x, (np.ndarray, np.generic)):
    return int(x)
  return _TO_INT(x)


_RESET_PER_CLUSTER = getattr(shared_memory.GPUSharedMemory,
                             "reset_per_cluster_state", None)  # jax >= 0.11


def _reset_per_cluster_state(self):
  """`GPUSharedMemory.reset_per_cluster_state`, except that register buffer
  ids keep counting down across clusters. jax restarts them at -100 for each
  cluster (and restarts the threads' vector clocks), while the race detector
  keeps every earlier access by buffer key: the next cluster's accumulators
  then reuse the previous cluster's keys with smaller clocks, and every access
  to them reads as a race with the previous cluster's. Unique keys avoid it."""
  next_regs_id = getattr(self, "next_regs_id", None)  # None: in `__init__`
  _RESET_PER_CLUSTER(self)
  if next_regs_id is not None:
    with self.lock:
      self.next_regs_id = next_regs_id


class _NumpyArrays(types.ModuleType):
  """jnp, except that `array` builds a NumPy array (callback results)."""

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def array(x, dtype=None):
    return np.array(x, dtype=dtype)


@contextlib.contextmanager
def interpret_context(detect_races: bool = True):
  """Interpret mode on an abstract H100, with the additions above.

  Yields a function returning whether any kernel interpreted so far inside
  the context had a race (jax keeps one race record per shared-memory
  lifetime, so the records are collected as they are replaced).
  """
  found = []
  init = gpu_callbacks._initialize_shared_memory  # noqa: SLF001

  def init_and_collect(*args, **kwargs):
    races = gpu_callbacks._races  # noqa: SLF001
    found.append(races is not None and races.races_found)
    return init(*args, **kwargs)

  def races_found() -> bool:
    races = gpu_callbacks._races  # noqa: SLF001
    return any(found) or (races is not None and races.races_found)

  patches = [(_Interpreter, "interpret", _interpret),
             (_Interpreter, "_interpret_wgmma_ref_p", _interpret_wgmma),
             (thread_map, "_run_jaxpr", _run_thread),
             (shared_memory.Barrier, "__init__", _barrier_init),
             (shared_memory.Barrier, "wait", _barrier_timed_wait),
             (shared_memory.Barrier, "deallocate", _barrier_deallocate),
             (gpu_callbacks, "jnp", _NumpyArrays("jnp")),
             (gpu_callbacks, "wgmma_accumulator_deref",
              _wgmma_accumulator_deref),
             (gpu_callbacks, "_initialize_shared_memory", init_and_collect)]
  if _TO_INT is not None:
    patches.append((shared_memory, "_to_int", _to_int))
  if _RESET_PER_CLUSTER is not None:
    patches.append((shared_memory.GPUSharedMemory, "reset_per_cluster_state",
                    _reset_per_cluster_state))
  saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
  for obj, name, value in patches:
    setattr(obj, name, value)
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=H100)
  interpret_pallas_call.reset_gpu_interpret_mode_state()
  _abort.clear()
  _abort_reason.clear()
  try:
    with jax.sharding.use_abstract_mesh(mesh), force_gpu_interpret_mode(
        InterpretGPUParams(detect_races=detect_races)):
      yield races_found
  finally:
    for obj, name, value in saved:
      setattr(obj, name, value)
