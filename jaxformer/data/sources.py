"""Random-access data sources: TFDS (without TensorFlow), local text files, a registry.

A source is anything with ``__len__`` and ``__getitem__(i) -> dict`` (the interface of
``tfds.data_source``); the pipelines of :mod:`jaxformer.data.pipeline` read them.

:func:`get_source` maps a name to a source through the plain dict :data:`SOURCES`:

==================  ==============================================  ===================
name                records                                         splits
==================  ==============================================  ===================
stdlib_text         ``{"text": bytes}`` (embedded, no download)     train, validation
stdlib_line_kinds   ``{"text", "label"}`` (3 kinds of stdlib lines) train, validation
text_files          ``{"text": bytes}`` (``path=`` file/dir/glob)   train, validation
                    (``validation_fraction=``; see ``local_text``)
tiny_shakespeare    ``{"text"}`` (TFDS, one record per split)       train, validation, test
lm1b                ``{"text"}`` (TFDS)                             train, test
imdb_reviews        ``{"text", "label"}`` (TFDS)                    train, test, unsupervised
wmt14_translate/de-en  ``{"de", "en"}`` (TFDS)                      train, validation, test
mnist               ``{"image" uint8 [28,28,1], "label"}`` (TFDS)   train, test
cifar10             ``{"image" uint8 [32,32,3], "label", "id"}``    train, test
reversal            ``{"source", "target"}`` (synthetic)            train, validation, test
shapes              ``{"image" uint8 [H,W,1], "label"}`` (synth.)   train, validation, test
==================  ==============================================  ===================

TFDS data are read with ``tfds.data_source`` from a ``data_dir`` prepared in the
``array_record`` format (preparing needs TensorFlow once, on any machine; reading does
not): ``tfds build NAME --file_format=array_record --data_dir=DIR``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import functools
import inspect
import os
import typing
from typing import Any

from jaxformer.data import embedded
from jaxformer.data import line_kinds
from jaxformer.data import local_text
from jaxformer.data import synthetic
from jaxformer.data.local_text import TextFilesSource

TFDS_DATASETS = ("tiny_shakespeare", "lm1b", "imdb_reviews", "wmt14_translate/de-en",
                 "mnist", "cifar10")


def _prepare_hint(name: str, data_dir: str | None) -> str:
  target = data_dir or "~/tensorflow_datasets"
  return (
      f"Prepare it once (needs TensorFlow, on any machine) in the array_record format:\n"
      f"  pip install tensorflow tensorflow-datasets\n"
      f"  tfds build {name} --file_format=array_record --data_dir={target}\n"
      f"or in Python: tfds.builder({name!r}, data_dir={target!r}, "
      f"file_format='array_record').download_and_prepare()\n"
      f"then pass data_dir={target!r} (reading needs no TensorFlow).")


def tfds_source(name: str, split: str, data_dir: str | None = None):
  """``tfds.data_source(name, split=split, data_dir=data_dir)``, without TensorFlow.

  Args:
    name: a TFDS name, e.g. one of :data:`TFDS_DATASETS` (``"wmt14_translate/de-en"``
      imports its builder module first).
    split: a TFDS split string (``"train"``, ``"test[:10%]"``, ...).
    data_dir: the TFDS data directory; None = TFDS's default.

  Returns:
    The TFDS random-access source (records are dicts of numpy arrays / bytes).

  Raises:
    ValueError: the data set is not prepared (in array_record format) under
      ``data_dir``; the message says how to prepare it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not isinstance(name, str) or not name:
    raise ValueError(f"name must be a TFDS data set name, got {name!r}.")
  if name.startswith("wmt14_translate"):
    import tensorflow_datasets.translate.wmt14  # pylint: disable=g-import-not-at-top,unused-import
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-exception-caught
    root = os.path.expanduser(
        data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    if not os.path.isdir(os.path.join(root, name)):
      reason = f"no prepared data at {os.path.join(root, name)}"
    else:
      text = str(e).strip()
      reason = (f"{type(e).__name__}: {text.splitlines()[0]}" if text
                else type(e).__name__)
    raise ValueError(
        f"Cannot read TFDS data set {name!r} (split {split!r}) from data_dir="
        f"{data_dir!r}: {reason}.\n"
        + _prepare_hint(name, data_dir)) from None


def text_files_source(path_or_glob: str | os.PathLike[str]) -> TextFilesSource:
  """Every file of a file, a folder or a glob as one record: :class:`TextFilesSource`."""
  return TextFilesSource(path_or_glob)


# name -> factory(split, **options). Plain dict: add entries here.
SOURCES: dict[str, Callable[..., Any]] = {
    "stdlib_text": embedded.stdlib_text_source,
    "stdlib_line_kinds": line_kinds.LineKindSource,
    "text_files": local_text.text_split_source,
    **{name: functools.partial(tfds_source, name) for name in TFDS_DATASETS},
    "reversal": synthetic.reversal_source,
    "shapes": synthetic.shapes_source,
}


# name -> a check of its options that needs no reading (ValueError naming the field).
OPTION_CHECKS: dict[str, Callable[..., Any]] = {
    "text_files": local_text.check_options,
}


def option_names(name: str) -> tuple[str, ...]:
  """The options the source ``name`` takes: its factory's keyword arguments (those of
  the class it returns when the factory forwards ``**options``)."""
  factory = SOURCES[name]
  params = inspect.signature(factory).parameters
  if any(p.kind is p.VAR_KEYWORD for p in params.values()):
    owner = typing.get_type_hints(factory).get("return")
    params = inspect.signature(owner).parameters
  return tuple(n for n, p in params.items()
               if n not in ("split", "self") and p.kind is p.KEYWORD_ONLY
               or (n != "split" and p.kind is p.POSITIONAL_OR_KEYWORD
                   and p.default is not p.empty))


def check_options(name: str, options: Mapping[str, Any],
                  **requirements: Any) -> dict[str, Any]:
  """``data.source_options`` checked against what the source ``name`` takes
  (``requirements`` go to the source's check, e.g. ``min_validation_bytes``).

  Raises:
    ValueError: an unknown source, or an option the source does not take (naming
      ``data.source_options.<option>`` and the valid ones), or one its check refuses.
  """
  if name not in SOURCES:
    raise ValueError(f"data.source={name!r} is not a known source; known: "
                     f"{sorted(SOURCES)}")
  options = dict(options)
  valid = option_names(name)
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(f"data.source_options.{unknown[0]} is not an option of "
                     f"data.source={name!r}; valid: {sorted(valid)}")
  if name in OPTION_CHECKS:
    params = inspect.signature(SOURCES[name]).parameters
    defaults = {n: None if p.default is p.empty else p.default
                for n, p in params.items() if n in valid}
    OPTION_CHECKS[name](**{**defaults, **options}, **requirements)
  return options


def get_source(name: str, split: str = "train", **options: Any):
  """The source registered as ``name`` in :data:`SOURCES`.

  Args:
    name: a key of :data:`SOURCES`.
    split: the split to read.
    **options: passed to the factory (``data_dir=`` for TFDS names, ``path=`` and
      ``validation_fraction=`` for ``text_files``, ``num_examples=``/``seed=`` for
      synthetic ones).
  """
  if name not in SOURCES:
    raise ValueError(f"data.source={name!r} is not a known source; known: "
                     f"{sorted(SOURCES)}")
  return SOURCES[name](split, **options)

