#!/usr/bin/env python
"""Check a bundle the way the MONAI Model Zoo's CI does, offline.

Checks, in order (each prints PASS/FAIL with the reason):
  1. required files (configs/metadata.json, LICENSE, configs/inference.json, and this project's
     train/evaluate/multi_gpu_train/logging configs, docs/README.md, docs/data_license.txt);
  2. metadata: the version is listed in the changelog and the fields the zoo's metadata schema requires are present
     (checked here because ``verify_metadata`` downloads the schema, which needs a network);
  3. ``create_workflow(workflow_type="inference"/"train")`` and ``check_properties()`` report nothing missing;
  4. ``verify_net_in_out``: the network accepts the declared input shape and yields the declared output;
  5. ``ckpt_export`` to TorchScript, and the exported module's output equals the eager network's.

Usage:
    python tools/verify_bundle.py bundles/dalight3d [--skip-export] [--n 4]
    python tools/verify_bundle.py bundles/dalight3d bundles/glims   # several; a PASS/FAIL summary at the end
    python tools/verify_bundle.py --all                            # every bundles/<name> with configs/metadata.json
The exit status is non-zero when any bundle fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_demo_data, when imported from elsewhere

REQUIRED_FILES = ["configs/metadata.json", "LICENSE", "configs/inference.json"]
PROJECT_FILES = [
    "configs/train.json",
    "configs/evaluate.json",
    "configs/multi_gpu_train.json",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",
]
# required by meta_schema_20220324.json (the schema URL in metadata.json), plus this project's own conventions
REQUIRED_META = [
    "schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
    "required_packages_version", "task", "description", "authors", "copyright", "network_data_format",
    "intended_use", "references",
]
def _msd_data(root: Path) -> Path:
    from make_demo_data import make_dataset

    return make_dataset(root / "data", cases=3, test=1, size=(32, 32, 24))


def _skin_data(root: Path) -> Path:
    from make_demo_data import make_skin_dataset

    return make_skin_dataset(root / "data", cases=3, size=(40, 48), layout="isic2018", test=1)


def _brats_data(root: Path, depth: int = 32) -> Path:
    """BraTS 2021 layout (one folder a case); emcad reads axial slices, so it takes a shallower volume."""
    from make_demo_data import make_brats_dataset

    return make_brats_dataset(root / "data", cases=3, size=(32, 32, depth), convention="2021")


# bundle name -> function(tmp_root) -> dataset_dir: a tiny generated dataset in the bundle's real input format
DEMO_DATA: dict[str, Callable[[Path], Path]] = {
    "dalight3d": _msd_data,
    "eamnet": _skin_data,
    "emcad": partial(_brats_data, depth=16),
    "glims": _brats_data,
}

REQUIRED_IO = ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data", "channel_def"]


def check_files(bundle: Path) -> list[str]:
    return [f"missing {f}" for f in REQUIRED_FILES + PROJECT_FILES if not (bundle / f).is_file()]


def check_metadata(bundle: Path) -> list[str]:
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    errors = [f"metadata.json lacks '{k}'" for k in REQUIRED_META if k not in meta]
    if meta.get("version") not in meta.get("changelog", {}):
        errors.append(f"version {meta.get('version')} is not a key of the changelog")
    if "medseg-nets" not in meta.get("required_packages_version", {}):
        errors.append("required_packages_version must list medseg-nets")
    fmt = meta.get("network_data_format", {})
    for part in ("inputs", "outputs"):
        if not fmt.get(part):
            errors.append(f"network_data_format lacks '{part}'")
        for name, spec in fmt.get(part, {}).items():
            errors += [f"network_data_format.{part}.{name} lacks '{k}'" for k in REQUIRED_IO if k not in spec]
    return errors


def check_properties(bundle: Path) -> list[str]:
    """``check_properties()`` instantiates the datasets, so the bundle's datalist needs data in its real format:
    a tiny generated dataset stands in for ``dataset_dir``."""
    from monai.bundle import create_workflow

    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        data = DEMO_DATA.get(bundle.name, _msd_data)(Path(tmp))
        for wtype, files in (("inference", ["configs/inference.json"]), ("train", ["configs/train.json"])):
            wf = create_workflow(
                config_file=[str(bundle / f) for f in files],
                workflow_type=wtype,
                meta_file=str(bundle / "configs/metadata.json"),
                logging_file=str(bundle / "configs/logging.conf"),
                bundle_root=str(bundle),
                dataset_dir=str(data),
                output_dir=str(Path(tmp) / "out"),
                ckpt_dir=str(Path(tmp) / "models"),
            )
            wf.initialize()
            missing = wf.check_properties()
            if missing:
                errors.append(f"{wtype} workflow misses properties {missing}")
    return errors


def declared_spatial_shape(image_spec: dict, n: int) -> list[int]:
    """The spatial input shape a bundle declares (``network_data_format.inputs.image.spatial_shape``) with ``n``
    (e.g. ``"8*n"``); ``"*"`` (any size, the Zoo's wildcard) takes ``n``. Also used by tools/export_onnx.py."""
    shape = image_spec["spatial_shape"]
    return [n if str(s) == "*" else int(eval(str(s), {"__builtins__": {}}, {"n": n})) for s in shape]


def check_net_in_out(bundle: Path, n: int) -> list[str]:
    from monai.bundle import ConfigParser, verify_net_in_out

    # metadata outputs.pred describes the label map the bundle writes (what MONAI Label and the Zoo read: one
    # channel, integer values named in channel_def); the network itself yields network_def#out_channels float maps
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    pred = "_meta_#network_data_format#outputs#pred#"
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs/metadata.json"),
        config_file=str(bundle / "configs/inference.json"),
        n=n,
        device="cpu",
        **{pred + "num_channels": parser.get("network_def#out_channels"), pred + "dtype": "float32"},
    )
    return []


def check_export(bundle: Path, n: int) -> list[str]:
    import torch
    from monai.bundle import ConfigParser, ckpt_export

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    parser.read_meta(str(bundle / "configs/metadata.json"))
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def").eval()
    image = parser.get("_meta_")["network_data_format"]["inputs"]["image"]
    shape = [1, image["num_channels"]] + declared_spatial_shape(image, n)
    with tempfile.TemporaryDirectory() as tmp:
        weights = bundle / "models/model.pt"
        if weights.is_file():
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        else:  # no trained weights yet: export a randomly initialised network
            weights = Path(tmp) / "model.pt"
            torch.save(net.state_dict(), weights)
        ts_path = Path(tmp) / "model.ts"
        ckpt_export(
            net_id="network_def",
            filepath=str(ts_path),
            ckpt_file=str(weights),
            meta_file=str(bundle / "configs/metadata.json"),
            config_file=str(bundle / "configs/inference.json"),
            bundle_root=str(bundle),
        )
        scripted = torch.jit.load(str(ts_path), map_location="cpu").eval()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref, out = net(x), scripted(x)
        # TorchScript runs the PyTorch layers, eager on CPU may run medseg_nets.native's fused kernels (another order
        # of the same arithmetic): the same outputs within 1e-4 of their range (issue 16's tolerance)
        if ref.shape != out.shape:
            return [f"TorchScript output shape {tuple(out.shape)} differs from eager {tuple(ref.shape)}"]
        diff, span = float((ref - out).abs().max()), float(ref.max() - ref.min())
        if diff > 1e-4 * max(span, 1.0):
            return [f"TorchScript output differs from eager (max abs diff {diff:.3g}, {diff / max(span, 1e-12):.2g} "
                    "of the output range; 1e-4 allowed)"]
    return []


def verify(bundle: str | Path, n: int = 4, export: bool = True, log: Callable[[str], None] = print) -> list[str]:
    """Run every check; return the list of failures (empty when the bundle passes)."""
    bundle = Path(bundle).resolve()
    checks = [("files", check_files), ("metadata", check_metadata), ("properties", check_properties),
              ("verify_net_in_out", lambda b: check_net_in_out(b, n))]
    if export:
        checks.append(("ckpt_export", lambda b: check_export(b, n)))
    failures = []
    for name, fn in checks:
        try:
            errors = fn(bundle)
        except Exception as e:  # a crash in a check is a failure of that check
            errors = [f"{type(e).__name__}: {e}"]
        log(f"{'PASS' if not errors else 'FAIL'} {bundle.name}: {name}" + "".join(f"\n    {e}" for e in errors))
        failures += [f"{name}: {e}" for e in errors]
        if name in ("files", "metadata") and errors:
            break  # later checks need the files
    return failures


BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"


def all_bundles(root: Path = BUNDLES_DIR) -> list[Path]:
    """Every folder under ``root`` that holds a ``configs/metadata.json``, sorted by name."""
    return sorted(d for d in root.iterdir() if (d / "configs" / "metadata.json").is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="*", help="bundle folders, e.g. bundles/dalight3d")
    p.add_argument("--all", action="store_true", help=f"every bundle under {BUNDLES_DIR} (with configs/metadata.json)")
    p.add_argument("--n", type=int, default=4, help="value of n in the declared spatial shape, e.g. 8*n")
    p.add_argument("--skip-export", action="store_true")
    a = p.parse_args(argv)
    bundles = [Path(b) for b in a.bundles] + (all_bundles() if a.all else [])
    bundles = list(dict.fromkeys(b.resolve() for b in bundles))  # once each, in the order given
    if not bundles:
        p.error("name at least one bundle folder, or --all")
    results = {}
    for b in bundles:
        if not b.is_dir():
            print(f"FAIL {b}: not a folder")
            results[b] = ["not a folder"]
            continue
        results[b] = verify(b, a.n, not a.skip_export)
    print("\nsummary:")
    for b, failures in results.items():
        print(f"  {'PASS' if not failures else 'FAIL'} {b.name}"
              + (f" ({len(failures)} failure(s))" if failures else ""))
    failed = [b for b, f in results.items() if f]
    n = len(results)
    print(f"{len(failed)} of {n} bundle(s) failed" if failed else f"all checks passed ({n} bundle(s))")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
