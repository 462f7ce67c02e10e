"""ONNX export of the four networks (optional ``onnx`` extra): onnxruntime's output equals PyTorch's.

Each bundle's ``network_def`` is exported in a small configuration (narrow widths, small input) through
``tools/export_onnx.py`` (which calls ``monai.bundle.onnx_export``, torch's dynamo exporter), and once through the
real command line ``python -m monai.bundle onnx_export``. Skipped when onnx / onnxscript / onnxruntime are missing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import torch  # noqa: E402

import export_onnx  # noqa: E402  (tools/ is on sys.path through conftest)
from conftest import ROOT, run_cli  # noqa: E402

# bundle -> (network_def overrides, input shape): same blocks as the bundle's network, narrow and small
SMALL = {
    "dalight3d": (
        {"network_def#base_channels": 8, "network_def#bottleneck_channels": 32, "network_def#head_channels": 8},
        [1, 4, 32, 32, 32],
    ),
    "glims": (
        {"network_def#feature_size": 12, "network_def#img_size": 32, "network_def#depths": [1, 1, 1, 1]},
        [1, 4, 32, 32, 32],
    ),
    "emcad": ({"network_def#encoder": "pvt_v2_b0"}, [1, 4, 64, 64]),
    "eamnet": ({"network_def#features": [8, 16, 32]}, [1, 3, 64, 64]),  # 3 levels: every block, fewer ops
}


def _graph_io(path):
    model = onnx.load(str(path), load_external_data=False)
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return {v.name: dims(v) for v in model.graph.input}, {v.name: dims(v) for v in model.graph.output}


def _small_net(name: str, seed: int = 0):
    from monai.bundle import ConfigParser

    overrides, _ = SMALL[name]
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / name / "configs" / "inference.json"))
    for k, v in overrides.items():
        parser[k] = v
    torch.manual_seed(seed)
    return parser.get_parsed_content("network_def").eval()


# GLIMS with a static batch: its dynamic-batch export takes ~1.7x as long (the batch is covered by
# test_glims_blocks_export_with_a_dynamic_batch; the full-size GLIMS export passes with a dynamic batch)
@pytest.mark.parametrize("name,dynamic", [("glims", False), ("emcad", True), ("eamnet", True)])
def test_export_tool_matches_torch(name, dynamic, tmp_path):
    overrides, shape = SMALL[name]
    r = export_onnx.export_bundle(ROOT / "bundles" / name, tmp_path, input_shape=shape, overrides=overrides,
                                  dynamic_batch=dynamic)
    assert r.ok, r.error
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.onnx"]  # one self-contained file, no leftovers
    assert r.batches_checked == ((1, 2) if dynamic else (1,)) and r.opset is not None and r.opset >= 17
    assert r.max_abs_diff <= 1e-4 * max(1.0, r.output_scale), export_onnx.describe(r)
    inputs, outputs = _graph_io(r.path)
    assert list(inputs) == ["image"] and list(outputs) == ["pred"]
    assert inputs["image"][1:] == shape[1:] and outputs["pred"][2:] == shape[2:]
    assert isinstance(inputs["image"][0], str) if dynamic else inputs["image"][0] == 1


def test_glims_blocks_export_with_a_dynamic_batch():
    """The GLIMS blocks that read the batch size keep it symbolic under torch.export (no specialisation)."""
    from torch.export import Dim

    from medseg_nets.blocks.glims import CSAB, PatchExpand3D

    for block, x in ((CSAB(8), torch.randn(2, 8, 4, 4, 4)), (PatchExpand3D(16), torch.randn(2, 16, 2, 2, 2))):
        ep = torch.export.export(block.eval(), (x,), dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}})
        y = torch.randn(3, *x.shape[1:])
        with torch.no_grad():
            assert torch.allclose(ep.module()(y), block(y), atol=1e-6)


def test_monai_bundle_cli_onnx_export(tmp_path):
    """``python -m monai.bundle onnx_export`` with the bundle's own configs (DALight-3D, narrowed by overrides)."""
    name = "dalight3d"
    overrides, shape = SMALL[name]
    net = _small_net(name)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    configs = ROOT / "bundles" / name / "configs"
    out = tmp_path / "model.onnx"
    args = [
        "onnx_export", "network_def", "--filepath", str(out), "--ckpt_file", str(ckpt),
        "--config_file", str(configs / "inference.json"), "--meta_file", str(configs / "metadata.json"),
        "--input_shape", json.dumps([2, *shape[1:]]),  # a dynamic batch is traced at batch 2
        "--converter_kwargs", json.dumps({"input_names": ["image"], "output_names": ["pred"],
                                          "dynamic_axes": {"image": [0], "pred": [0]}}),
    ]
    for k, v in overrides.items():
        args += [f"--{k}", json.dumps(v)]
    run_cli(args, timeout=600)
    inputs, outputs = _graph_io(out)
    assert inputs["image"][1:] == shape[1:] and isinstance(inputs["image"][0], str)
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 2):
        x = torch.randn([batch, *shape[1:]], generator=gen)
        diff, scale = export_onnx.compare_with_torch(net, out, x)
        assert diff <= 1e-4 * max(1.0, scale), (batch, diff, scale)


def test_export_tool_failure_leaves_nothing(tmp_path, monkeypatch):
    """A mismatch (here simulated) gives a non-zero exit and no .onnx file; a missing bundle fails too."""
    import monai.bundle
    from onnx import TensorProto, helper

    def fake_export(filepath, **kwargs):  # a valid, trivial ONNX model instead of the slow real export
        v = helper.make_tensor_value_info
        graph = helper.make_graph([helper.make_node("Identity", ["image"], ["pred"])], "g",
                                  [v("image", TensorProto.FLOAT, [1])], [v("pred", TensorProto.FLOAT, [1])])
        onnx.save(helper.make_model(graph), filepath)

    monkeypatch.setattr(monai.bundle, "onnx_export", fake_export)
    monkeypatch.setattr(export_onnx, "compare_with_torch", lambda net, path, x: (1.0, 1.0))
    out = tmp_path / "out"
    lines: list[str] = []
    overrides, shape = SMALL["dalight3d"]
    argv = [str(ROOT / "bundles" / "dalight3d"), str(tmp_path / "no_such_bundle"), "--out", str(out),
            "--input-shape", *map(str, shape)] + ["--set"] + [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    assert export_onnx.main(argv, log=lines.append) == 1
    assert "max abs diff 1 > tolerance" in lines[0] and lines[0].startswith("FAIL dalight3d")
    assert lines[1].startswith("FAIL no_such_bundle") and "2 of 2 export(s) failed" in lines[2]
    assert list(out.iterdir()) == []


def test_export_tool_default_input_shape():
    b = ROOT / "bundles"
    assert export_onnx.default_input_shape(b / "dalight3d") == [1, 4, 64, 64, 64]  # roi_size
    assert export_onnx.default_input_shape(b / "glims") == [1, 4, 96, 96, 96]
    assert export_onnx.default_input_shape(b / "emcad") == [1, 4, 256, 256]
    assert export_onnx.default_input_shape(b / "eamnet") == [1, 3, 256, 256]  # image_size (whole image)


def test_export_tool_help():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "export_onnx.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "onnx_export" in proc.stdout
