"""What every part of the benchmark shares: the repository root, the progress log on stderr and the short form of an
error message that the reports print."""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def short(e: BaseException, limit: int = 300) -> str:
    """First line of an exception message, shortened (MONAI's optional-import errors carry whole tracebacks)."""
    text = (str(e).strip().splitlines() or [""])[0]
    return (text[:limit] + "...") if len(text) > limit else text
