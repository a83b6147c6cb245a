"""Reading and writing Hugging Face checkpoint directories (``config.json`` + safetensors).

Tensors are read one at a time with the ``safetensors`` package (numpy; no torch), so
the host never holds more than one tensor of the checkpoint beyond what it places.
bfloat16 tensors, which numpy cannot name, are read from the file's bytes as
``ml_dtypes.bfloat16`` (the format is a JSON header followed by raw little-endian data).
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Mapping

import numpy as np

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
# Old BERT checkpoints call LayerNorm parameters gamma / beta.
_ALIASES = ((".weight", ".gamma"), (".bias", ".beta"))


def read_config(directory: str) -> dict:
  """The parsed ``config.json`` of a checkpoint directory."""
  path = os.path.join(directory, CONFIG)
  if not os.path.isfile(path):
    raise ValueError(f"{directory!r} is not a Hugging Face checkpoint directory: it has "
                     f"no {CONFIG} (save_pretrained writes config.json + "
                     "model.safetensors)")
  return read_json(path, "config.json as save_pretrained writes it")


def read_json(path: str, what: str) -> dict:
  """The JSON object in ``path``; ValueError naming the file when it is not one."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}): expected {what}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object: "
                     f"expected {what}")
  return value


class Checkpoint:
  """The tensors of a directory's ``*.safetensors`` files, read lazily by name."""

  def __init__(self, directory: str):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
      other = [os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.bin"))]
      hint = (f" (it has {other}: save the model again with save_pretrained("
              "safe_serialization=True))" if other else "")
      raise ValueError(f"{directory!r} has no *.safetensors weights{hint}")
    self.directory = directory
    self._files: dict[str, str] = {}
    self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in files:
      try:
        with safe_open(path, framework="numpy") as handle:
          for name in handle.keys():
            piece = handle.get_slice(name)
            self._files[name] = path
            self._meta[name] = (tuple(piece.get_shape()), piece.get_dtype())
      except Exception as e:  # safetensors' SafetensorError (not exported everywhere)
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}; {os.path.getsize(path)} "
            "bytes): it may be truncated or not safetensors at all; download or save "
            "it again") from e

  @property
  def names(self) -> set[str]:
    return set(self._files)

  def resolve(self, name: str, prefix: str) -> str | None:
    """The stored name of ``name``: as is, without the base-model ``prefix``, or with
    ``gamma``/``beta`` for LayerNorm ``weight``/``bias``; None when absent."""
    candidates = [name]
    if name.startswith(prefix + "."):
      candidates.append(name[len(prefix) + 1:])
    for cand in list(candidates):
      for new, old in _ALIASES:
        if "LayerNorm" in cand and cand.endswith(new):
          candidates.append(cand[:-len(new)] + old)
    return next((c for c in candidates if c in self._files), None)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._meta[name][0]

  def get(self, name: str) -> np.ndarray:
    """The tensor ``name`` as a numpy array (bfloat16 via ``ml_dtypes``).

    The file is opened for this one tensor and closed again: a handle kept open
    keeps every page it has read mapped, and so counted in the process's memory.
    """
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    if self._meta[name][1] == "BF16":
      return _read_bf16(self._files[name], name)
    with safe_open(self._files[name], framework="numpy") as handle:
      return handle.get_tensor(name)


def _read_bf16(path: str, name: str) -> np.ndarray:
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    entry = json.loads(f.read(size))[name]
    start, end = entry["data_offsets"]
    f.seek(8 + size + start)
    data = f.read(end - start)
  return np.frombuffer(data, ml_dtypes.bfloat16).reshape(entry["shape"])


def write(directory: str, hf_config: Mapping, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes ``config.json`` and ``model.safetensors`` (``format: pt`` metadata, which
  ``transformers`` expects) into ``directory``."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG), "w", encoding="utf-8") as f:
    json.dump(dict(hf_config), f, indent=2, sort_keys=True)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
