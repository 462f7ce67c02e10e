"""Shared fixtures: generated MSD-like data and a runner for ``python -m monai.bundle``."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_demo_data import make_case, make_dataset  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
REFERENCE_DIR = ROOT.parent / "shared" / "reference"


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` intra-op threads (tests of tiny tensors use 1: no OpenMP spin-waiting when
    several jobs share two cores), then restore the previous number."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_reference(name: str) -> dict:
    """``../shared/reference/<name>``: outputs of the authors' own code (see its README); skip when absent."""
    import torch

    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: the authors' reference outputs are not beside this checkout")
    return torch.load(path, map_location="cpu", weights_only=True)


def run_cli(args: list[str], cwd: Path = ROOT, timeout: int = 900, check: bool = True, torchrun: int = 0):
    """Run ``python -m monai.bundle ARGS`` (or under ``torchrun --nproc_per_node=N``) and return the result."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
        cmd += ["-m", "monai.bundle", *args]
    else:
        cmd = [sys.executable, "-m", "monai.bundle", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
            f"--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc


def assert_resumed(models_dir: Path, before: dict, log: str) -> None:
    """A run resumed with ``--resume true --epochs 2`` from a 1-epoch, 2-iteration ``checkpoint_latest.pt``
    (``before``, loaded before the run): the log names the restored file, and the new checkpoint is one epoch, two
    optimiser steps and one scheduler step further on."""
    import torch

    ckpt = models_dir / "checkpoint_latest.pt"
    assert f"Restored all variables from {ckpt}" in log
    after = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert after["trainer"]["iteration"] == 4 and after["trainer"]["max_epochs"] == 2
    assert after["optimizer"]["state"][0]["step"] == before["optimizer"]["state"][0]["step"] + 2
    assert after["lr_scheduler"]["last_epoch"] == before["lr_scheduler"]["last_epoch"] + 1


def save_oblique_case(path: Path, size=(36, 40, 20), seed: int = 7) -> np.ndarray:
    """Write a 4-channel case with an LPS-flipped, anisotropic, translated affine; return that affine."""
    image, _ = make_case(np.random.default_rng(seed), size)
    affine = np.array([[-1.2, 0, 0, 90.0], [0, -1.0, 0, 110.0], [0, 0, 1.6, -40.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(image, affine), path)
    return affine


@pytest.fixture(scope="session")
def msd_dir(tmp_path_factory) -> Path:
    """A tiny MSD Task01-like dataset: 4 labelled cases (2 train / 2 validation with val_fraction 0.5) and
    2 test cases, one of them with a non-identity, anisotropic affine."""
    root = make_dataset(tmp_path_factory.mktemp("msd") / "Task01_BrainTumour", cases=4, test=2, size=(32, 32, 24))
    save_oblique_case(root / "imagesTs" / "BRATS_006.nii.gz")
    return root
