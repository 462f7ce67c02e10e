"""Parsing of values that arrive from ``python -m monai.bundle run ... --key value``."""

from __future__ import annotations

from typing import Any

__all__ = ["as_bool"]


def as_bool(value: Any) -> bool:
    """Read a switch given in a config or on the command line.

    Fire turns ``--amp False`` into ``False`` but leaves ``--amp false`` as the string ``'false'``, which Python
    treats as true; accept the usual spellings (1/0, true/false, yes/no, on/off, any case) and reject anything else
    with a message instead of guessing.
    """
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean (true/false), got {value!r}")
    return bool(value)
