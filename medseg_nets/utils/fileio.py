"""Crash-safe file writing: a reader sees either the previous complete file or the new complete one; a file's
sha256."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "provisional",
    "discard_provisional",
    "clear_provisional",
    "prepare_output_dir",
    "file_sha256",
]

#: files this run created that must not outlive a run stopped by bad input (predictions, the split file)
_PROVISIONAL: list[Path] = []


def provisional(path: str | os.PathLike) -> None:
    """Record that the run is about to create ``path`` (when it does not exist yet): if the run then stops on bad
    input, :func:`discard_provisional` (called by the error handler) removes it, so nothing partial is left."""
    p = Path(path).absolute()
    if not p.exists() and p not in _PROVISIONAL:
        _PROVISIONAL.append(p)


def discard_provisional() -> list[Path]:
    """Remove the files recorded by :func:`provisional`; return those removed."""
    removed = []
    while _PROVISIONAL:
        p = _PROVISIONAL.pop()
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
        except OSError:
            pass
    return removed[::-1]


def clear_provisional() -> None:
    """Forget the recorded files (a new run starts in this process)."""
    _PROVISIONAL.clear()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform/filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, flush it to disk, then rename it over ``path``.

    ``os.replace`` is atomic on POSIX and Windows when source and target are on the same filesystem, so a process
    killed at any point leaves either the old ``path`` untouched or the new one complete, never a truncated file.
    The temporary name keeps the suffixes of ``path`` (e.g. ``.nii.gz``) because some writers infer the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` made atomic (see :func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and its parents) and check that files can be written there, before the run starts.

    Raises :class:`~medseg_nets.errors.InputDataError` naming the folder when it is a file, cannot be created or
    is not writable (e.g. ``--output_dir`` on a read-only mount), instead of a traceback when the first file is saved.
    """
    from medseg_nets.errors import InputDataError

    p = Path(os.path.expanduser(str(path)))
    if p.exists() and not p.is_dir():
        raise InputDataError(f"{p}: is a file; expected a folder for the outputs (set --output_dir/--ckpt_dir)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=p)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InputDataError(
            f"{p}: cannot write there ({e.strerror or e}); expected a writable folder for the outputs "
            "(set --output_dir/--ckpt_dir)"
        ) from e
    return p


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
