#!/usr/bin/env python
"""Peak memory of one MONAI Label training run of a bundle, with the bundle's defaults or other settings.

MONAI Label's ``BundleTrainTask`` (0.8.5, ``monailabel/tasks/train/bundle.py``, ``run_single_gpu``) runs the
bundle's ``train.json`` through ``monai.bundle.run`` with these overrides: ``bundle_root``,
``train#trainer#max_epochs``, ``train#dataset#data`` / ``validate#dataset#data`` (its datastore's
``{"image", "label"}`` items split by ``val_split``), ``device`` and ``train#handlers``. This script makes the same
call on generated BraTS-like studies (4-channel NIfTI + label, as MONAI Label's datastore serves them) and reports
the peak resident memory of the process (sampled every 50 ms, and ``ru_maxrss``) and, on CUDA, the peak memory
PyTorch allocated and reserved, as JSON. Nothing is imported from monailabel (the call is the same without its
server), so it runs wherever the bundle runs.

    python tools/monailabel/train_memory.py --bundle glims --device cuda --iterations 4
    python tools/monailabel/train_memory.py --bundle glims --device cuda --set batch_size=1 --set num_samples=1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from make_demo_data import make_case  # noqa: E402


def _studies(folder: Path, n: int, size: tuple[int, int, int]) -> list[dict[str, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        if (folder / f"case{i}_label.nii.gz").is_file() and nib.load(folder / f"case{i}.nii.gz").shape[:3] == size:
            items.append({"image": str(folder / f"case{i}.nii.gz"), "label": str(folder / f"case{i}_label.nii.gz")})
            continue
        image, msd = make_case(np.random.default_rng(i), size)
        label = np.choose(msd, np.array([0, 2, 1, 4], np.uint8)).astype(np.uint8)  # BraTS 2021 values
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), folder / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"case{i}_label.nii.gz")
        items.append({"image": str(folder / f"case{i}.nii.gz"), "label": str(folder / f"case{i}_label.nii.gz")})
    return items


def _parse(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="glims")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", type=int, default=5, help="labelled studies (MONAI Label's val_split 0.2 -> 1 val)")
    p.add_argument("--size", type=int, nargs=3, default=[160, 160, 128], help="study size (BraTS: 240 240 155)")
    p.add_argument("--val-split", type=float, default=0.2)
    p.add_argument("--set", action="append", default=[], metavar="ID=VALUE",
                   help="a config id to set in the bundle copy (MONAI Label reads configs as they are)")
    p.add_argument("--studies", type=Path, help="keep the generated studies here (reused when present)")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--max-rss-gib", type=float, default=0.0,
                   help="stop the run (exit 3, reported) once the process holds this much: a shared machine's guard")
    a = p.parse_args(argv)

    from monai.bundle import ConfigParser, create_workflow
    from monai.data import partition_dataset

    tmp = Path(tempfile.mkdtemp(prefix="train_memory_"))
    try:
        bundle = tmp / "model" / a.bundle
        shutil.copytree(ROOT / "bundles" / a.bundle, bundle, ignore=shutil.ignore_patterns("eval", "*.pt", "*.ts"))
        settings = dict(kv.split("=", 1) for kv in a.set)
        if settings:
            f = bundle / "configs" / "train.json"
            parser = ConfigParser()
            parser.read_config(str(f))
            for k, v in settings.items():
                parent = k.rsplit("#", 1)[0] if "#" in k else k
                if parser.get(parent) is None:
                    raise SystemExit(f"{a.bundle}/configs/train.json has no id {parent}")
                parser[k] = _parse(v)
            ConfigParser.export_config_file(parser.config, str(f), indent=4)
        items = _studies(a.studies or tmp / "studies", a.cases, tuple(a.size))
        train_ds, val_ds = partition_dataset(items, ratios=[1 - a.val_split, a.val_split], shuffle=False)
        overrides = {
            "bundle_root": str(bundle),
            "train#trainer#max_epochs": 1,
            "train#dataset#data": train_ds,
            "validate#dataset#data": val_ds,
            "device": a.device,
        }
        page = os.sysconf("SC_PAGE_SIZE")

        def rss() -> int:  # Linux: resident pages of this process
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        peak = {"rss": rss()}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak["rss"] = max(peak["rss"], rss())
                if a.max_rss_gib and peak["rss"] > a.max_rss_gib * 2**30:
                    print(json.dumps({"bundle": a.bundle, "device": a.device, "settings": settings,
                                      "stopped_over_rss_gib": a.max_rss_gib}), flush=True)
                    os._exit(3)
                time.sleep(0.05)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        start = time.monotonic()
        workflow = create_workflow(config_file=str(bundle / "configs" / "train.json"),
                                   meta_file=str(bundle / "configs" / "metadata.json"),
                                   run_id="run", init_id=None, final_id=None, **overrides)
        workflow.run()
        workflow.finalize()
        seconds = time.monotonic() - start
        stop.set()
        t.join()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        result = {
            "bundle": a.bundle, "device": a.device, "settings": settings, "study_size": a.size,
            "train_cases": len(train_ds), "val_cases": len(val_ds),
            "iterations": int(trainer.state.iteration), "epochs": int(trainer.state.epoch),
            "model_pt_written": (bundle / "models" / "model.pt").is_file(),
            "seconds": round(seconds, 1),
            "peak_rss_gib": round(peak["rss"] / 2**30, 2),
            "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
        }
        if a.device.startswith("cuda"):
            result["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            result["cuda_max_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            result["gpu"] = torch.cuda.get_device_name(0)
        print(json.dumps(result))
        if a.json:
            a.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
