#!/usr/bin/env python
"""Export a bundle's network to ONNX and check onnxruntime's output against PyTorch's.

The export goes through MONAI's own bundle exporter, ``monai.bundle.onnx_export`` (the function behind
``python -m monai.bundle onnx_export``), on the bundle's ``network_def``; with torch >= 2.9 that runs the
``torch.export``-based ("dynamo") ONNX exporter, opset 20 by default. The graph has the input named ``image``,
the output ``pred``, a dynamic batch axis (``--static-batch`` fixes it) and fixed spatial sizes: export at the
size the network will be run at (default below).

Then the network is built again from the same config and weights, in eval mode, and run on the same random input
with PyTorch and with onnxruntime (CPU); the largest absolute difference is printed and must not exceed
``atol + rtol * max|y|`` (``y`` the PyTorch output; defaults 1e-4 and 1e-3: float32 round-off, while a wrong
export is off by the order of ``max|y|``). With a dynamic batch the check also runs at batch ``B + 1``. The
``.onnx`` file (one self-contained file, weights included) is written under a temporary name and renamed to
``<out>/<bundle name>.onnx`` only when the check passes (nothing is left behind otherwise).

Weights: ``--ckpt`` (a state dict, as written by the bundles' CheckpointSaver / ``models/model.pt``), else the
bundle's ``models/model.pt`` when it exists, else a randomly initialised network (seed 0) -- no trained weights
exist in this repository, so that is the usual case and only proves that the export is faithful.

Input shape (``--input-shape B C ...``), by default ``1 x num_channels`` of ``metadata.json``
(``network_data_format``) ``x`` the spatial size the bundle feeds the network: ``roi_size`` (sliding-window patch)
or ``image_size`` (whole resized image) of ``inference.json``, else the metadata's ``spatial_shape`` with
``n = --n`` (e.g. ``"32*n"``; a ``"*"`` dimension, any size, takes ``n`` too).

Usage:
    python tools/export_onnx.py bundles/dalight3d                   # -> onnx_out/dalight3d.onnx
    python tools/export_onnx.py --all --out exported
    python tools/export_onnx.py bundles/glims --input-shape 1 4 96 96 96 --opset 18
    python tools/export_onnx.py bundles/glims --set network_def#feature_size=12 --input-shape 1 4 32 32 32

The exit status is non-zero when an export fails or its output differs from PyTorch's. Needs the ``onnx`` extra:
``pip install -e .[onnx]`` (onnx, onnxscript, onnxruntime).

The same export with MONAI's command line (``B=bundles/dalight3d/configs``; a checkpoint is required; trace a
dynamic batch at batch 2, as torch.export fixes dims that are 1 in the example, which broke GLIMS)::

    python -m monai.bundle onnx_export network_def --filepath model.onnx --ckpt_file models/model.pt \\
        --config_file $B/inference.json --meta_file $B/metadata.json --input_shape "[2,4,64,64,64]" \\
        --converter_kwargs '{"input_names": ["image"], "output_names": ["pred"], "dynamic_axes": {"image": [0], "pred": [0]}}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # verify_bundle, when imported from elsewhere
from verify_bundle import declared_spatial_shape  # noqa: E402

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"
INPUT_NAME, OUTPUT_NAME = "image", "pred"


@dataclass
class ExportResult:
    bundle: str
    path: Optional[Path]  # the .onnx file (None when the export or the check failed)
    input_shape: list[int]
    opset: Optional[int] = None
    max_abs_diff: Optional[float] = None  # over every batch size checked
    tolerance: Optional[float] = None
    output_scale: Optional[float] = None  # max |y| of the PyTorch output
    batches_checked: tuple[int, ...] = ()
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _require_onnx() -> None:
    missing = []
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ImportError(
            f"ONNX export needs {', '.join(missing)}: pip install -e '.[onnx]' (or pip install onnx onnxscript "
            "onnxruntime)."
        )


def _parser(bundle: Path, overrides: dict[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    for k, v in overrides.items():
        parser[k] = v
    return parser


def default_input_shape(bundle: Path, n: int = 1, overrides: Optional[dict[str, Any]] = None) -> list[int]:
    """``[1, C, *spatial]``: see the module docstring."""
    parser = _parser(Path(bundle), overrides or {})
    spec = parser.get("_meta_#network_data_format#inputs#image")
    spatial = None
    for key in ("roi_size", "image_size"):
        value = parser.get(key)
        if isinstance(value, (list, tuple)) and all(isinstance(s, int) for s in value):
            spatial = [int(s) for s in value]
            break
    if spatial is None:
        spatial = declared_spatial_shape(spec, n)
    return [1, int(spec["num_channels"]), *spatial]


def onnx_output(onnx_path: Path | str, x) -> Any:
    """Run the ONNX model with onnxruntime (CPU) on the tensor ``x``; return the first output (numpy)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # no constant-folding chatter
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.detach().cpu().numpy()})[0]


def compare_with_torch(net, onnx_path: Path | str, x) -> tuple[float, float]:
    """(max |onnx - torch|, max |torch|) for the eval-mode network ``net`` on input ``x``."""
    import numpy as np
    import torch

    net.eval()
    with torch.no_grad():
        ref = net(x)
    if not torch.is_tensor(ref):
        raise TypeError(f"the network returned {type(ref).__name__}, expected one tensor in eval mode")
    out = onnx_output(onnx_path, x)
    ref_np = ref.detach().cpu().numpy()
    if out.shape != ref_np.shape:
        raise ValueError(f"onnxruntime output shape {list(out.shape)} != PyTorch output shape {list(ref_np.shape)}")
    return float(np.abs(out - ref_np).max()), float(np.abs(ref_np).max())


def export_bundle(
    bundle: Path | str,
    out_dir: Path | str,
    input_shape: Optional[Sequence[int]] = None,
    n: int = 1,
    ckpt: Optional[Path | str] = None,
    opset: Optional[int] = None,
    dynamic_batch: bool = True,
    overrides: Optional[dict[str, Any]] = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    name: Optional[str] = None,
) -> ExportResult:
    """Export ``bundle``'s ``network_def`` to ``<out_dir>/<name or bundle name>.onnx`` and check it (see module doc).

    ``overrides``: config id -> value (e.g. ``{"network_def#feature_size": 12}``), applied to the export and to the
    PyTorch reference alike. Returns an :class:`ExportResult`; never raises for an export or check failure.
    """
    _require_onnx()
    import onnx
    import torch
    from monai.bundle import onnx_export

    bundle = Path(bundle).resolve()
    overrides = dict(overrides or {})
    name = name or bundle.name
    shape = [int(s) for s in (input_shape or default_input_shape(bundle, n, overrides))]
    result = ExportResult(bundle=bundle.name, path=None, input_shape=shape)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{name}.onnx"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}.onnx.") as tmp:
        tmp_onnx = Path(tmp) / f"{name}.onnx"
        try:
            if ckpt is None and not overrides and (bundle / "models" / "model.pt").is_file():
                ckpt = bundle / "models" / "model.pt"
            if ckpt is None:  # no weights: a randomly initialised network, the same one for export and check
                torch.manual_seed(0)
                ckpt = Path(tmp) / "random_init.pt"
                torch.save(_parser(bundle, overrides).get_parsed_content("network_def").state_dict(), ckpt)
            converter_kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
            if opset is not None:
                converter_kwargs["opset_version"] = int(opset)
            if dynamic_batch:
                converter_kwargs["dynamic_axes"] = {INPUT_NAME: [0], OUTPUT_NAME: [0]}
            # a dynamic batch is traced at batch >= 2: torch.export specialises dims of size 1 (seen with GLIMS)
            export_shape = [max(shape[0], 2), *shape[1:]] if dynamic_batch else shape
            with warnings.catch_warnings():
                # torch turns dynamic_axes into dynamic_shapes; a batch that got fixed would fail the B + 1 check
                warnings.filterwarnings("ignore", message=".*'dynamic_axes' is not recommended.*")
                warnings.filterwarnings("ignore", message=".*from_dynamic_axes_to_dynamic_shapes is deprecated.*")
                onnx_export(
                    net_id="network_def",
                    filepath=str(tmp_onnx),
                    ckpt_file=str(ckpt),
                    meta_file=str(bundle / "configs" / "metadata.json"),
                    config_file=str(bundle / "configs" / "inference.json"),
                    input_shape=export_shape,
                    converter_kwargs=converter_kwargs,
                    bundle_root=str(bundle),
                    **overrides,
                )
            model = onnx.load(str(tmp_onnx))
            onnx.checker.check_model(model)
            result.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
            del model

            net = _parser(bundle, overrides).get_parsed_content("network_def")
            state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
            net.load_state_dict(state)
            net = net.cpu().eval()
            batches = (shape[0], shape[0] + 1) if dynamic_batch else (shape[0],)
            gen = torch.Generator().manual_seed(0)
            diffs, scales = [], []
            for b in batches:
                x = torch.randn([b, *shape[1:]], generator=gen)
                d, s = compare_with_torch(net, tmp_onnx, x)
                diffs.append(d)
                scales.append(s)
            result.max_abs_diff = max(diffs)
            result.output_scale = max(scales)
            result.tolerance = atol + rtol * result.output_scale
            result.batches_checked = batches
            if not result.max_abs_diff <= result.tolerance:  # also catches NaN
                raise AssertionError(
                    f"onnxruntime output differs from PyTorch: max abs diff {result.max_abs_diff:.3g} > tolerance "
                    f"{result.tolerance:.3g} (atol {atol:g} + rtol {rtol:g} x max|y| {result.output_scale:.3g})"
                )
            os.replace(tmp_onnx, final)
            result.path = final
        except Exception as e:  # reported, the partial file goes with the temporary folder
            result.error = f"{type(e).__name__}: {e}"
    return result


def all_bundles(root: Path = BUNDLES_DIR) -> list[Path]:
    """Every folder under ``root`` that holds a ``configs/metadata.json``, sorted by name."""
    return sorted(d for d in root.iterdir() if (d / "configs" / "metadata.json").is_file())


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--set expects ID=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a plain string
    return out


def describe(r: ExportResult) -> str:
    shape = "x".join(str(s) for s in r.input_shape)
    if not r.ok:
        return f"FAIL {r.bundle}: " + (f"input {shape}: " if shape else "") + str(r.error)
    return (
        f"PASS {r.bundle}: {r.path} (opset {r.opset}, torch.onnx dynamo exporter via monai.bundle onnx_export, "
        f"input {shape}, batches checked {list(r.batches_checked)}) max abs diff {r.max_abs_diff:.3g} "
        f"(tolerance {r.tolerance:.3g}, max |y| {r.output_scale:.3g})"
    )


def main(argv: Optional[list[str]] = None, log: Callable[[str], None] = print) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="*", help="bundle folders, e.g. bundles/dalight3d")
    p.add_argument("--all", action="store_true", help=f"every bundle under {BUNDLES_DIR}")
    p.add_argument("--out", default="onnx_out", help="output folder (default: onnx_out)")
    p.add_argument("--input-shape", type=int, nargs="+", help="B C D H W or B C H W (default: see above)")
    p.add_argument("--n", type=int, default=1, help="n in the metadata spatial shape when inference.json has no size")
    p.add_argument("--ckpt", help="state dict to export (default: models/model.pt if present, else random init)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's, 20 with torch 2.13)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size instead of a dynamic batch axis")
    p.add_argument("--set", nargs="*", default=[], metavar="ID=VALUE",
                   help="config overrides (JSON values), e.g. network_def#feature_size=12")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--rtol", type=float, default=1e-3, help="relative to max |y| of the PyTorch output")
    a = p.parse_args(argv)
    bundles = [Path(b) for b in a.bundles] + (all_bundles() if a.all else [])
    bundles = list(dict.fromkeys(b.resolve() for b in bundles))
    if not bundles:
        p.error("name at least one bundle folder, or --all")
    if a.ckpt and len(bundles) > 1:
        p.error("--ckpt goes with one bundle")
    try:
        _require_onnx()
    except ImportError as e:
        log(str(e))
        return 2
    overrides = _parse_set(a.set)
    results = []
    for b in bundles:
        if not (b / "configs" / "inference.json").is_file():
            results.append(ExportResult(b.name, None, [], error="no configs/inference.json"))
        else:
            results.append(export_bundle(b, a.out, a.input_shape, a.n, a.ckpt, a.opset, not a.static_batch,
                                         overrides, a.atol, a.rtol))
        log(describe(results[-1]))
    failed = [r for r in results if not r.ok]
    if len(results) > 1:
        log(f"{len(failed)} of {len(results)} export(s) failed" if failed else f"all {len(results)} exports passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
