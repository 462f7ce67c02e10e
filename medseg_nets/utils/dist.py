"""Device and torch.distributed helpers so that one bundle config runs on CPU (gloo) and on CUDA (nccl)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["get_device", "init_distributed", "cleanup_distributed", "ddp_wrap", "rank_zero_only", "get_rank"]


def get_device(local_rank: int | None = None) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (``LOCAL_RANK`` from the environment, as set by torchrun), else CPU."""
    if torch.cuda.is_available():
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(f"cuda:{local_rank}")
    return torch.device("cpu")


def init_distributed(device: torch.device | str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment; nccl for CUDA devices, gloo otherwise.

    Does nothing when already initialised. Returns True when a process group is (now) initialised.
    """
    if dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "multi_gpu_train.json must be started with torchrun, e.g. "
            "`torchrun --nproc_per_node=2 -m monai.bundle run --config_file \"['train.json','multi_gpu_train.json']\"`"
        )
    device = torch.device(device) if device is not None else get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", init_method="env://")
    else:
        dist.init_process_group(backend="gloo", init_method="env://")
    return True


def cleanup_distributed() -> None:
    """Destroy the default process group if there is one, after a barrier: every rank leaves together, so that no
    rank tears down its gloo/nccl connections while a peer is still finishing its last collective or writing its
    outputs (a rank that exited early aborted with "terminate called without an active exception" under gloo)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def get_rank() -> int:
    """Global rank, 0 outside torch.distributed."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def ddp_wrap(module: torch.nn.Module, device: torch.device | str, **kwargs: Any) -> torch.nn.Module:
    """Move ``module`` to ``device`` and wrap it in DistributedDataParallel (``device_ids`` only on CUDA)."""
    device = torch.device(device)
    module = module.to(device)
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)


def rank_zero_only(items: Sequence[Any]) -> list[Any]:
    """``items`` on global rank 0 and an empty list elsewhere (for log-only handlers under DDP)."""
    return list(items) if get_rank() == 0 else []
