"""Test-wide settings: strict rank promotion, float64 available for references, a
persistent compilation cache shared by every test process, and XLA:CPU compiling
without LLVM's optimisation passes.

The cache (``$JAXFORMER_TEST_JAX_CACHE``, default ``.jax_cache/tests`` in the repo,
git-ignored) lets the many tests and subprocesses (CLI runs, resume after a kill, the
notebooks) that compile the same small programs compile each once per suite run. Only
compilations slower than 0.2 s are stored; an entry is keyed by the program, the
compile options and the jax/XLA version, so a hit runs the very executable a fresh
compile would give. Environment variables, so that subprocesses inherit them.

``TEST_XLA_FLAGS`` (``XLA_FLAGS`` unless the environment sets it): the suite's programs
are small and run a few steps each, so compiling them is most of its time. XLA's own
passes (fusion, simplification, layout) still run; only the LLVM backend's optimisation
is off, which made the whole suite take a quarter less CPU time (2 cores, 2026-12-06:
23.9 instead of 31.5 minutes of user time) with every test passing. Benchmarks and
the CLI run with XLA's defaults.
"""

import os
import pathlib

_CACHE = os.environ.get("JAXFORMER_TEST_JAX_CACHE") or str(
    pathlib.Path(__file__).resolve().parents[1] / ".jax_cache" / "tests")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# A size limit turns on the cache's file lock, so that the two pytest-xdist workers and
# their subprocesses never read an entry while another process writes it.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", TEST_XLA_FLAGS)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", False)
