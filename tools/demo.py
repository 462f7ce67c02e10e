#!/usr/bin/env python
"""The main job: DALight-3D end to end on data this project generates, through the bundle's own CLI, on CPU.

Steps (every model step is ``python -m monai.bundle run`` on bundles/dalight3d/configs, as a user would run it):

1. generate a small synthetic MSD Task01-like dataset (tools/make_demo_data.py), with the test cases' ground truth
   kept aside in ``labelsTs``;
2. score the untrained network with evaluate.json (the "before" row);
3. train with train.json (demo overrides: 32^3 patches, learning rate 2e-3, few epochs; see ``DEMO_OVERRIDES``);
4. evaluate the best checkpoint with evaluate.json (whole-volume sliding window; per-region and per-label Dice,
   HD95) — the "after" row;
5. run inference.json on the unseen test volumes, score its label maps against ``labelsTs`` in the input's space,
   and draw one axial slice (FLAIR, ground truth, prediction) to ``<out>/demo_slice.png``.

Usage:
    python tools/demo.py [--out demo_out] [--epochs 6] [--cases 16] [--size 48 48 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "dalight3d"
CFG = BUNDLE / "configs"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_demo_data import make_dataset  # noqa: E402

# The recipe of the paper (train.json) is for 64^3 patches, lr 5e-5 and hundreds of epochs on a GPU. The demo must
# show learning in minutes on 2 CPU cores, so it trains on 32^3 patches with a larger learning rate.
DEMO_OVERRIDES = {
    "roi_size": "[32,32,32]",
    "learning_rate": "0.002",
    "num_samples": "4",
    "num_workers": "0",
    "sw_batch_size": "4",
    "val_fraction": "0.25",
}
REGIONS = {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}
COLOURS = {1: (255, 220, 0), 2: (220, 40, 40), 3: (40, 120, 255)}  # edema, non-enhancing, enhancing


def _progress_lines(data: bytes) -> tuple[list[str], bytes]:
    """The progress-bar updates (tqdm segments ending in ``\r`` or ``\n`` that hold ``%|``) in ``data``, and the
    unfinished rest."""
    parts = re.split(rb"[\r\n]", data)
    rest = parts.pop()
    lines = []
    for part in parts:
        if b"%|" in part:
            text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", part.decode("utf-8", "replace"))
            lines.append(re.split(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", text)[0].strip())  # a log line glued on
    return lines, rest


def bundle_run(config: list[str], log: Path, **overrides: str) -> float:
    """``python -m monai.bundle run`` with the bundle's meta/logging files; output to ``log``, and the progress bar
    (epoch, iterations, loss, ETA) on this terminal; returns seconds."""
    files = [str(CFG / c) for c in config]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]",
           "--meta_file", str(CFG / "metadata.json"), "--logging_file", str(CFG / "logging.conf")]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    print("  $ python -m monai.bundle run --config_file", " ".join(cmd[5:]).replace(str(ROOT) + "/", ""), flush=True)
    t0 = time.time()
    shown, pending = "", b""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            f.write(chunk)
            f.flush()
            lines, pending = _progress_lines(pending + chunk)
            if lines and lines[-1] != shown:
                shown = lines[-1]
                sys.stdout.write("\r    " + shown[:110].ljust(110))
                sys.stdout.flush()
        returncode = proc.wait()
    if shown:
        sys.stdout.write("\n")
    if returncode != 0:
        sys.exit(f"demo step failed (exit {returncode}); see {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))
    return time.time() - t0


def mean_dice(report: Path) -> dict[str, float]:
    s = json.loads(report.read_text())["summary"]
    return {**{k: v["mean"] for k, v in s["val_region_dice"].items()},
            **{k: v["mean"] for k, v in s["val_label_dice"].items()}}


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    inter, total = np.logical_and(pred, gt).sum(), pred.sum() + gt.sum()
    return float(2 * inter / total) if total else 1.0


def slice_png(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, path: Path) -> int:
    """Three panels of the axial slice with the most tumour: FLAIR, FLAIR + ground truth, FLAIR + prediction."""
    from PIL import Image

    z = int(np.argmax((gt > 0).sum(axis=(0, 1))))
    flair = image[..., z, 0]
    grey = np.clip(255 * (flair - flair.min()) / (np.ptp(flair) + 1e-8), 0, 255).astype(np.uint8)
    base = np.repeat(grey[..., None], 3, axis=-1)

    def overlay(lab: np.ndarray) -> np.ndarray:
        out = base.astype(np.float32).copy()
        for v, c in COLOURS.items():
            out[lab == v] = 0.45 * out[lab == v] + 0.55 * np.array(c)
        return out.astype(np.uint8)

    panels = [base, overlay(gt[..., z]), overlay(pred[..., z])]
    strip = np.concatenate([np.pad(np.rot90(p), ((4, 4), (4, 4), (0, 0))) for p in panels], axis=1)
    Image.fromarray(strip).resize((strip.shape[1] * 4, strip.shape[0] * 4), Image.NEAREST).save(path)
    return z


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--cases", type=int, default=16, help="labelled cases (a quarter is held out for validation)")
    p.add_argument("--test", type=int, default=2, help="unseen test cases for inference")
    p.add_argument("--size", type=int, nargs=3, default=[48, 48, 40])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    out = Path(a.out).resolve()
    run, logs = out / "bundle", out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    print(f"[1/5] generating {a.cases} + {a.test} synthetic cases of {a.size[0]}x{a.size[1]}x{a.size[2]} in {out}/data")
    data = make_dataset(out / "data" / "Task01_BrainTumour", a.cases, a.test, tuple(a.size), a.seed,
                        test_labels=True)
    common = {"dataset_dir": data, "bundle_root": run, **DEMO_OVERRIDES}

    print("[2/5] evaluating the untrained network")
    import torch

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CFG / "inference.json"))
    torch.manual_seed(a.seed)
    (run / "models").mkdir(parents=True, exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), run / "models" / "untrained.pt")
    bundle_run(["train.json", "evaluate.json"], logs / "evaluate_untrained.log", **common, ckpt_path=run / "models" / "untrained.pt",
               output_dir=run / "eval_untrained")
    before = mean_dice(run / "eval_untrained" / "metrics.json")

    print(f"[3/5] training {a.epochs} epochs (log: {logs / 'train.log'}, TensorBoard: {run / 'eval' / 'tensorboard'})")
    t_train = bundle_run(["train.json"], logs / "train.log", **common, epochs=a.epochs, val_interval=a.epochs)

    print("[4/5] evaluating the best checkpoint")
    bundle_run(["train.json", "evaluate.json"], logs / "evaluate.log", **common)
    after = mean_dice(run / "eval" / "metrics.json")

    print("[5/5] inference on the unseen test volumes")
    bundle_run(["inference.json"], logs / "inference.log", **common, output_dir=out / "predictions")
    test_rows = []
    for img in sorted((data / "imagesTs").glob("*.nii.gz")):
        stem = img.name[: -len(".nii.gz")]
        pred_file = out / "predictions" / f"{stem}_seg.nii.gz"
        pred_nii, img_nii = nib.load(pred_file), nib.load(img)
        assert pred_nii.shape == img_nii.shape[:3] and np.allclose(pred_nii.affine, img_nii.affine), pred_file
        pred, gt = np.asarray(pred_nii.dataobj), np.asarray(nib.load(data / "labelsTs" / img.name).dataobj)
        test_rows.append({r: dice(np.isin(pred, v), np.isin(gt, v)) for r, v in REGIONS.items()})
        if len(test_rows) == 1:
            z = slice_png(np.asarray(img_nii.dataobj), gt, pred, out / "demo_slice.png")
            print(f"  wrote {out / 'demo_slice.png'} ({stem}, axial slice {z}: FLAIR | ground truth | prediction; "
                  "yellow edema, red non-enhancing, blue enhancing)")
    test_mean = {r: float(np.mean([row[r] for row in test_rows])) for r in REGIONS}

    names = ["WT", "TC", "ET", "edema", "non_enhancing", "enhancing"]
    lines = ["| Dice (mean over cases) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             "| untrained, validation | " + " | ".join(f"{before[n]:.3f}" for n in names) + " |",
             f"| after {a.epochs} epochs, validation | " + " | ".join(f"{after[n]:.3f}" for n in names) + " |",
             "| after training, unseen test (input space) | "
             + " | ".join(f"{test_mean[n]:.3f}" if n in test_mean else "" for n in names) + " |"]
    table = "\n".join(lines)
    (out / "demo_results.md").write_text(table + "\n")
    print("\n" + table + "\n")
    print(f"training took {t_train / 60:.1f} min; the whole demo {(time.time() - t_start) / 60:.1f} min "
          f"({a.threads} threads). Results: {out / 'demo_results.md'}")
    if after["WT"] <= before["WT"] + 0.2:
        print("WARNING: whole-tumour Dice did not improve by 0.2 over the untrained network", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
