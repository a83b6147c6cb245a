"""jaxformer.compilation_cache: where the cache goes (environment, argument, our
variable, the default), off when asked or when the folder cannot be made, and that a
command's programs land in it and are read back (a subprocess: jax sets its cache up
once per process)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from jaxformer import compilation_cache as cc

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def updates(monkeypatch):
  """The jax config updates made, not applied (this process keeps the suite's)."""
  made = {}
  monkeypatch.setattr(cc.jax.config, "update", lambda k, v: made.__setitem__(k, v))
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.delenv(cc.ENV, raising=False)
  return made


def test_jax_own_setting_is_kept_unless_a_folder_is_given(updates, monkeypatch,
                                                          tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
  monkeypatch.setenv(cc.ENV, str(tmp_path / "var"))
  assert cc.use_compilation_cache() == str(tmp_path / "jax")
  assert updates == {} and not (tmp_path / "var").exists()
  assert cc.use_compilation_cache(tmp_path / "mine") == str(tmp_path / "mine")
  assert updates["jax_compilation_cache_dir"] == str(tmp_path / "mine")


def test_argument_then_variable_then_default(updates, monkeypatch, tmp_path):
  assert cc.use_compilation_cache(tmp_path / "arg", min_compile_secs=0.0) == str(
      tmp_path / "arg")
  assert updates["jax_compilation_cache_dir"] == str(tmp_path / "arg")
  assert updates["jax_persistent_cache_min_compile_time_secs"] == 0.0
  assert updates["jax_compilation_cache_max_size"] == cc.MAX_BYTES
  monkeypatch.setenv(cc.ENV, str(tmp_path / "var"))
  assert cc.use_compilation_cache() == str(tmp_path / "var")
  assert (tmp_path / "var").is_dir()
  monkeypatch.delenv(cc.ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cc.default_dir() == tmp_path / "xdg" / "jaxformer" / "jax"
  assert cc.use_compilation_cache() == str(tmp_path / "xdg" / "jaxformer" / "jax")


@pytest.mark.parametrize("value", ["off", "0", "False", "none", ""])
def test_off(updates, monkeypatch, value):
  monkeypatch.setenv(cc.ENV, value)
  assert cc.use_compilation_cache() is None and updates == {}


def test_a_folder_that_cannot_be_made_warns_and_turns_it_off(updates, tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.warns(UserWarning, match="no compilation cache: cannot create"):
    assert cc.use_compilation_cache(tmp_path / "file" / "cache") is None
  assert updates == {}


def test_programs_are_stored_and_read_back(tmp_path):
  """Two processes compile the same program: the second finds it in the cache."""
  code = ("import jax, jax.numpy as jnp\n"
          "from jaxformer import compilation_cache as cc\n"
          "jax.monitoring.register_event_listener(\n"
          "    lambda event, **kw: print('EVENT', event.rsplit('/', 1)[-1]))\n"
          "cc.use_compilation_cache(min_compile_secs=0.0)\n"
          "f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)\n"
          "print('VALUE', float(f(jnp.ones((8, 8))).sum()))\n")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update({cc.ENV: str(tmp_path / "cache"), "PYTHONPATH": str(REPO),
              "JAX_LOG_COMPILES": "0"})
  outs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.splitlines()
          for _ in range(2)]
  assert any(name.startswith("jit_") for name in os.listdir(tmp_path / "cache"))
  first, second = ({line for line in out if line.startswith("EVENT")} for out in outs)
  assert "EVENT cache_misses" in first and "EVENT cache_hits" not in first
  assert "EVENT cache_hits" in second and "EVENT cache_misses" not in second
  value = [line for line in outs[0] if line.startswith("VALUE")]
  assert value and value == [line for line in outs[1] if line.startswith("VALUE")]
