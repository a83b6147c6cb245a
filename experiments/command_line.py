"""What every command (``train``, ``prompt``, ``sample``, ``perplexity``) does with errors,
and the compilation cache each turns on (:mod:`jaxformer.compilation_cache`).

A problem the user can fix (a bad flag, config value or input file, a full disk, a
workdir in use) ends the command with one line, ``error: ...``, as its last line on
stderr and exit status 1; ``--verbose`` prints the traceback before it. Anything else
(a bug) keeps Python's traceback.
"""

from __future__ import annotations

import errno
import functools
import logging
import re
import sys
import traceback
from collections.abc import Callable

from absl import flags
from absl import logging as absl_logging

from jaxformer import compilation_cache
from jaxformer.training import divergence
from jaxformer.training import workdir_lock

# Errors that are the user's to fix: each becomes one line.
USER_ERRORS = (ValueError, TypeError, OSError, workdir_lock.WorkdirLockedError,
               divergence.TrainingDivergedError)


def define_verbose() -> None:
  """The ``--verbose`` flag (idempotent)."""
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False,
                      "On an error, print the traceback, not just its line.")


def _verbose(argv: list[str] | None = None) -> bool:
  if argv is not None:
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1")
               for a in argv)
  try:
    return bool(flags.FLAGS["verbose"].value)
  except (KeyError, flags.Error):
    return False


def one_line(error: BaseException) -> str:
  """``error`` as one line: an OSError names its errno and path; a message of several
  lines, and the notes added to the error, are joined."""
  if isinstance(error, OSError) and error.errno is not None and (
      error.strerror or error.filename):
    code = errno.errorcode.get(error.errno, str(error.errno))
    where = error.filename if error.filename is not None else ""
    extra = f" -> {error.filename2}" if getattr(error, "filename2", None) else ""
    text = f"{error.strerror or error} ({code})" + (f": {where}{extra}" if where else "")
  else:
    text = str(error) or type(error).__name__
  for note in getattr(error, "__notes__", ()):
    text += "\n" + note
  lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
  out = ""
  for line in lines:
    out += line if not out else (" " if out.endswith(":") else "; ") + line
  return out or type(error).__name__


def report(error: BaseException, verbose: bool) -> None:
  """Prints ``error``'s line (after the traceback when ``verbose``) to stderr."""
  if verbose:
    traceback.print_exception(error)
  print(f"error: {one_line(error)}" + ("" if verbose else "  (--verbose: traceback)"),
        file=sys.stderr, flush=True)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config file reported in one line."""
  verbose = _verbose(argv)
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    if verbose:
      traceback.print_exc()
    if isinstance(e, (AttributeError, KeyError)):  # an override of no config field
      raw = str(e.args[0] if e.args else e)
      name = re.search(r"'([^'\\]+)\\?'", raw)
      hint = re.search(r'Did you mean "([^"]+)"', raw)
      line = ("unknown config field in an override"
              + (f": {name.group(1)!r}" if name else "")
              + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))
    else:
      # A failing config file's traceback is embedded in the message: its last line
      # is the error itself.
      lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
      line = lines[-1] if lines else repr(e)
    print(f"error: {line}", file=sys.stderr)
    sys.exit(1)


def _no_orbax_tracebacks(record: logging.LogRecord) -> bool:
  """Keeps orbax's log lines but not their tracebacks: its writer threads log every
  failure of a save (a full disk), which the command then reports in its one line."""
  if "orbax" in record.pathname and record.exc_info:
    record.exc_info, record.exc_text = None, None
  return True


def user_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """``main`` with :data:`USER_ERRORS` reported in one line and exit status 1 (an
  interrupt: status 130), and JAX's persistent compilation cache on."""

  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    if not _verbose():
      absl_logging.set_verbosity(absl_logging.WARNING)  # the library's info: not here
      absl_logging.get_absl_handler().addFilter(_no_orbax_tracebacks)
    compilation_cache.use_compilation_cache()
    try:
      main(argv)
    except USER_ERRORS as e:
      report(e, _verbose())
      sys.exit(1)
    except KeyboardInterrupt as e:  # a second Ctrl-C: stopped at once, no save
      report(KeyboardInterrupt(f"interrupted ({e or 'Ctrl-C'}); the newest complete "
                               "checkpoint, if any, is kept"), _verbose())
      sys.exit(130)
  return wrapped


def require_causal_lm(model_name: str, found: str, where: str) -> None:
  """ValueError unless ``model_name`` (a key of the model registry) is a causal LM of
  text, which prompting, sampling and perplexity need."""
  if model_name != "gpt":
    raise ValueError(f"{where} needs a causal LM (a GPT model), found {found}")
