"""JAX's persistent compilation cache, turned on the same way by every command.

A run compiles the same few programs every time it starts (the train step, the eval
step, the state's initialisation, the sampler): 7.5 s of an 98 s CPU run of
``gpt_text`` (4 x 128, 2,000 steps) on 2 cores. With the cache on, a second run of the
same config, a resume, or a seed sweep reads them back instead (MaxText keeps one in
``~/jax_cache`` the same way). An entry is keyed by the program, the compile options,
the devices and the jax/XLA version, so a hit runs the very executable that a fresh
compile would give: results do not depend on whether the cache was warm.

Where it goes, first match:

1. the ``path`` argument (the notebooks keep theirs under ``experiments/notebooks/out``);
2. ``JAX_COMPILATION_CACHE_DIR`` in the environment: jax's own setting, left as is
   (the test suite points it at its own folder);
3. ``$JAXFORMER_COMPILATION_CACHE``: a folder, or ``off`` (also ``0``, ``false``,
   ``none`` or empty) for no cache;
4. ``$XDG_CACHE_HOME/jaxformer/jax``, else ``~/.cache/jaxformer/jax``.

A folder that cannot be created turns the cache off with a warning: a cache never
stops a run. The size limit (LRU eviction past it) also turns on the cache's file
lock, so that runs side by side never read an entry another is writing.
"""

from __future__ import annotations

import os
import pathlib
import warnings

import jax

ENV = "JAXFORMER_COMPILATION_CACHE"
OFF = ("off", "0", "false", "none", "")
MAX_BYTES = 2 << 30


def default_dir() -> pathlib.Path:
  """``$XDG_CACHE_HOME/jaxformer/jax`` (``~/.cache`` when unset)."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                          ".cache")
  return pathlib.Path(root) / "jaxformer" / "jax"


def use_compilation_cache(path: str | os.PathLike[str] | None = None, *,
                          min_compile_secs: float = 0.2,
                          max_bytes: int = MAX_BYTES) -> str | None:
  """Turns the persistent cache on (see the module docstring for where).

  Args:
    path: the folder (None: the environment's or the default).
    min_compile_secs: programs that compile faster are not stored (0: all).
    max_bytes: the cache's size limit.
  Returns:
    The folder in use, or None when the cache is off.
  """
  if path is None and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if path is None:
    chosen = os.environ.get(ENV)
    if chosen is not None and chosen.strip().lower() in OFF:
      return None
    path = chosen or default_dir()
  folder = pathlib.Path(path).expanduser()
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    warnings.warn(f"no compilation cache: cannot create {folder} ({e}); set {ENV} "
                  "to another folder, or to 'off'", stacklevel=2)
    return None
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", max_bytes)
  return str(folder)
