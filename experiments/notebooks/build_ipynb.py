"""Writes the notebooks (jupytext percent-format ``.py`` files) as ``.ipynb``.

  python -m experiments.notebooks.build_ipynb              # -> experiments/notebooks/out/ipynb/
  python -m experiments.notebooks.build_ipynb --execute    # ... and run them (tiny size)
  python -m experiments.notebooks.build_ipynb --out_dir=DIR attention_pictures

The ``.py`` files are the source of truth (diffable, reviewed); the ``.ipynb`` files are
generated into a git-ignored folder. ``--execute`` runs each notebook with nbclient
(``FULL=1`` in the environment for the full-size runs); outputs land in the notebooks'
own ``OUT_DIR``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent
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


def build(out_dir: pathlib.Path, names: Sequence[str] = (), *, execute: bool = False,
          timeout: int = 1800) -> list[pathlib.Path]:
  """Converts (and optionally executes) the notebooks; returns the ``.ipynb`` paths."""
  import jupytext  # pylint: disable=g-import-not-at-top
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for path in notebook_paths(names):
    notebook = jupytext.read(path)
    if execute:
      import nbclient  # pylint: disable=g-import-not-at-top
      nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                              resources={"metadata": {"path": str(out_dir)}}).execute()
    target = out_dir / f"{path.stem}.ipynb"
    jupytext.write(notebook, target, fmt="ipynb")
    written.append(target)
  return written


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("names", nargs="*", help="notebooks to build (default: all)")
  parser.add_argument("--out_dir", default=str(NOTEBOOK_DIR / "out" / "ipynb"))
  parser.add_argument("--execute", action="store_true", help="run them with nbclient")
  args = parser.parse_args(argv)
  for path in build(pathlib.Path(args.out_dir), args.names, execute=args.execute):
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
