"""Pretrained weights placed straight into their shardings, across two processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import helpers as h

REPO_ROOT = os.path.dirname(os.path.dirname(h.HERE))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_load_their_own_shards(tmp_path):
  """2 processes x 2 CPU devices (gloo), FSDP x tensor mesh (1, 2, 2): each process's
  shards of the HF weights equal the checkpoint's slices, the sharded model's logits
  match the reference (1e-5), and an orbax body restores into the same shardings."""
  port = _free_port()
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["XLA_FLAGS"] = ""
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(h.HERE, "multiprocess_worker.py"), str(i), str(port),
       str(tmp_path / "body")], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=400)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, stderr[-3000:]
    line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
    outs.append(json.loads(line[len("RESULT "):]))
  for out in outs:
    assert out["shards_ok"] and out["body_ok"]
    assert out["logits_err"] < 1e-5
    assert out["wi_spec"] == ["fsdp", "tensor"] and out["wi_shard"] == [16, 64]
    assert out["sharded_leaves"] >= out["num_leaves"] // 2
