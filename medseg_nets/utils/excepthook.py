"""The top-level error handler of a run stopped by bad input.

MONAI wraps exceptions raised in transforms (``RuntimeError: applying transform ...``), in config expressions
(``RuntimeError: Failed to evaluate ...``) and in DataLoader worker processes, so the
:class:`~medseg_nets.errors.InputDataError` that names the bad file ends up at the top of a long chained traceback
whose last line says nothing about it. :func:`install_excepthook` (done when ``medseg_nets.utils`` is imported, so
in every ``python -m monai.bundle run`` of a bundle here) handles an uncaught exception whose chain holds an
``InputDataError``:

- the full traceback goes to a log file (``<tmp>/medseg_nets_error_<pid>.log``, named on the terminal) and to the
  ``medseg_nets`` logger at DEBUG level, not to the terminal;
- the files this run created that must not outlive it (predictions, ``datalist_split.json``; see
  :func:`medseg_nets.utils.provisional`) are removed;
- the terminal's last lines are ``The run stopped on bad input:`` and the message(s) naming the file and what was
  expected; the process exits with status 1 at once (``os._exit``), so that no thread or worker left behind by
  the failed run can turn the exit into an abort (``terminate called without an active exception``, status 134).

Any other exception is reported by Python's usual hook, traceback and all (it is a bug, not bad input).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import traceback
from types import TracebackType

from medseg_nets.errors import InputDataError

__all__ = ["input_errors", "install_excepthook"]

# how an InputDataError appears in the text of an exception re-raised from a DataLoader worker process
_IN_TEXT = re.compile(r"InputDataError: (.+)")
_HEADER = "The run stopped on bad input:"
#: exit at once after the message (tests that call the hook directly switch it off)
HARD_EXIT = True

logger = logging.getLogger("medseg_nets")


def input_errors(exc: BaseException | None) -> list[str]:
    """Messages of the :class:`InputDataError` s in the chain of ``exc`` (``__cause__``/``__context__``), including
    those that survive only as text (exceptions re-raised from DataLoader workers), innermost last, without repeats."""
    found: list[str] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, InputDataError):
            found.append(str(exc))
        else:
            found += [m.group(1).strip() for m in _IN_TEXT.finditer(str(exc))]
        exc = exc.__cause__ if exc.__cause__ is not None else exc.__context__
    return list(dict.fromkeys(reversed(found)))[::-1]


def _write_log(text: str) -> str | None:
    path = os.path.join(tempfile.gettempdir(), f"medseg_nets_error_{os.getpid()}.log")
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path
    except OSError:
        return None


def report_input_error(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> bool:
    """Report ``exc`` as a bad-input stop (see the module doc) when its chain holds an ``InputDataError``;
    return whether it did."""
    messages = input_errors(exc)
    if not messages:
        return False
    from medseg_nets.utils.fileio import discard_provisional

    text = "".join(traceback.format_exception(exc_type, exc, tb))
    logger.debug("run stopped on bad input:\n%s", text)
    log = _write_log(text)
    removed = discard_provisional()
    lines = []
    if removed:
        lines.append(f"removed {len(removed)} file(s) this run had written: " + ", ".join(map(str, removed[:5]))
                     + (" ..." if len(removed) > 5 else ""))
    lines.append(f"full traceback: {log}" if log else "(the traceback could not be written to a log file)")
    lines.append(_HEADER)
    lines += [f"InputDataError: {m}" for m in messages]
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
    return True


def install_excepthook() -> None:
    """Wrap ``sys.excepthook`` (once) with :func:`report_input_error`; other exceptions go to the previous hook."""
    if getattr(sys.excepthook, "_medseg_nets", False):
        return
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        try:
            handled = issubclass(exc_type, Exception) and report_input_error(exc_type, exc, tb)
        except Exception:  # never let the summary hide the original error
            handled = False
        if not handled:
            previous(exc_type, exc, tb)
            return
        if HARD_EXIT:
            os._exit(1)

    hook._medseg_nets = True  # type: ignore[attr-defined]
    sys.excepthook = hook
