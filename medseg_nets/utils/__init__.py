"""Small utilities: crash-safe writes, distributed/device helpers, CPU allocator settings."""

from .cli import as_bool
from .dist import cleanup_distributed, ddp_wrap, get_device, get_rank, init_distributed, rank_zero_only
from .fileio import (
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    discard_provisional,
    file_sha256,
    prepare_output_dir,
    provisional,
)
from .excepthook import input_errors, install_excepthook
from .memory import keep_freed_memory, malloc_trim

install_excepthook()  # bad-input messages close a crashed run's traceback (see excepthook.py)

__all__ = [
    "as_bool",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "cleanup_distributed",
    "discard_provisional",
    "ddp_wrap",
    "get_device",
    "get_rank",
    "init_distributed",
    "input_errors",
    "install_excepthook",
    "keep_freed_memory",
    "malloc_trim",
    "prepare_output_dir",
    "provisional",
    "rank_zero_only",
]
