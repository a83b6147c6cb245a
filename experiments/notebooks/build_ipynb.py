"""Writes the notebooks (jupytext percent-format ``.py`` files) as ``.ipynb``.

  python -m experiments.notebooks.build_ipynb                        # -> out/ipynb/, unrun
  python -m experiments.notebooks.build_ipynb --execute              # ... run at tiny size
  python -m experiments.notebooks.build_ipynb --execute --size=cpu   # the committed results
  python -m experiments.notebooks.build_ipynb --out_dir=DIR attention_pictures

The ``.py`` files are the source of truth (diffable, reviewed). ``--execute`` runs each
notebook with nbclient at ``--size`` (``common.size``) and writes, per notebook,
``<out_dir>/<name>.ipynb`` with its outputs and figures and ``<out_dir>/<name>/`` with
its tables (markdown + CSV) and PNGs; training workdirs go to ``--runs_dir`` (never
into ``out_dir``). With ``--size=cpu`` the default ``out_dir`` is
``experiments/notebooks/results/``, which is committed: a reader sees the results
without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import time
from collections.abc import Iterator, Mapping, Sequence

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = NOTEBOOK_DIR / "results"
JUPYTEXT_MARK = "format_name: percent"


def notebook_paths(names: Sequence[str] = ()) -> list[pathlib.Path]:
  """The percent-format notebooks in this folder (all, or those named without ``.py``)."""
  paths = sorted(p for p in NOTEBOOK_DIR.glob("*.py")
                 if JUPYTEXT_MARK in p.read_text(encoding="utf-8")[:600])
  if names:
    known = {p.stem: p for p in paths}
    unknown = sorted(set(names) - set(known))
    if unknown:
      raise ValueError(f"unknown notebooks {unknown}; known: {sorted(known)}")
    paths = [known[n] for n in names]
  return paths


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
  """``os.environ`` with ``values`` set (the notebook kernel inherits it)."""
  saved = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def build(out_dir: pathlib.Path, names: Sequence[str] = (), *, execute: bool = False,
          size: str = "tiny", runs_dir: pathlib.Path | None = None,
          timeout: int = 7200) -> list[pathlib.Path]:
  """Converts (and optionally executes) the notebooks; returns the ``.ipynb`` paths.

  ``timeout``: seconds per cell (a cpu-size cell that trains every arm can take well
  over half an hour on a shared machine).
  """
  import jupytext  # pylint: disable=g-import-not-at-top
  out_dir.mkdir(parents=True, exist_ok=True)
  runs_dir = runs_dir or NOTEBOOK_DIR / "out" / "runs"
  written = []
  for path in notebook_paths(names):
    notebook = jupytext.read(path)
    if execute:
      import nbclient  # pylint: disable=g-import-not-at-top
      env = {"NOTEBOOK_SIZE": size, "FULL": "1" if size == "full" else "0",
             "OUT_DIR": str(out_dir / path.stem), "RUNS_DIR": str(runs_dir)}
      start = time.perf_counter()
      with _environment(env):
        nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
                                ).execute()
      print(f"{path.stem}: executed at size {size} in "
            f"{time.perf_counter() - start:.0f} s", flush=True)
    target = out_dir / f"{path.stem}.ipynb"
    jupytext.write(notebook, target, fmt="ipynb")
    written.append(target)
  return written


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("names", nargs="*", help="notebooks to build (default: all)")
  parser.add_argument("--out_dir", default=None,
                      help="default: results/ for --size=cpu, else out/ipynb/")
  parser.add_argument("--runs_dir", default=str(NOTEBOOK_DIR / "out" / "runs"))
  parser.add_argument("--execute", action="store_true", help="run them with nbclient")
  parser.add_argument("--size", default="tiny", choices=("tiny", "cpu", "full"))
  args = parser.parse_args(argv)
  out_dir = args.out_dir or (RESULTS_DIR if args.execute and args.size == "cpu"
                             else NOTEBOOK_DIR / "out" / "ipynb")
  for path in build(pathlib.Path(out_dir), args.names, execute=args.execute,
                    size=args.size, runs_dir=pathlib.Path(args.runs_dir)):
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
