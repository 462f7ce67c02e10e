"""A closing line for runs stopped by bad input.

MONAI wraps exceptions raised in transforms (``RuntimeError: applying transform ...``), in config expressions
(``RuntimeError: Failed to evaluate ...``) and in DataLoader worker processes, so the
:class:`~medseg_nets.errors.InputDataError` that names the bad file ends up at the top of a long chained traceback
whose last line says nothing about it. :func:`install_excepthook` (done when ``medseg_nets.utils`` is imported)
makes an uncaught exception whose chain holds an ``InputDataError`` end with that error's message again.
"""

from __future__ import annotations

import re
import sys
from types import TracebackType

from medseg_nets.errors import InputDataError

__all__ = ["input_errors", "install_excepthook"]

# how an InputDataError appears in the text of an exception re-raised from a DataLoader worker process
_IN_TEXT = re.compile(r"InputDataError: (.+)")
_HEADER = "The run stopped on bad input:"


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


def install_excepthook() -> None:
    """Wrap ``sys.excepthook`` (once): after the usual traceback, repeat the messages of the bad-input errors in the
    chain, unless the uncaught exception is itself the ``InputDataError`` (its message is already the last line)."""
    if getattr(sys.excepthook, "_medseg_nets", False):
        return
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        previous(exc_type, exc, tb)
        try:
            messages = [] if isinstance(exc, InputDataError) else input_errors(exc)
            if messages:
                sys.stderr.write(f"\n{_HEADER}\n" + "\n".join(f"InputDataError: {m}" for m in messages) + "\n")
                sys.stderr.flush()
        except Exception:  # never let the summary hide the original error
            pass

    hook._medseg_nets = True  # type: ignore[attr-defined]
    sys.excepthook = hook
