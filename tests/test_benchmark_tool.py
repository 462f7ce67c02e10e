"""Smoke test of tools/benchmark.py: tiny sizes, one repeat, the report's shape only (never its timings)."""

from __future__ import annotations

import json
import sys

import pytest

import benchmark  # tools/ is on sys.path (conftest.py)

COLUMNS = [
    "Bundle", "Model", "Input (BxCxspatial)", "Params", "GFLOPs", "Latency ms",
    "Peak fwd mem MiB (CPU RSS growth, fresh process)", "Whole volume s", "Params ratio", "GFLOPs ratio",
    "Latency ratio", "Memory ratio", "Volume ratio",
]


def _table(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]


def test_benchmark_tiny_run(tmp_path):
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    argv = [
        "--bundle", "dalight3d", "--device", "cpu", "--threads", "2", "--roi", "16", "--volume", "20,20,16",
        "--baselines", "SegResNet", "--repeats", "1", "--warmup", "0", "--memory", "inprocess", "--keep-freed-memory",
        "--out", str(md), "--json", str(js), "--plot", str(tmp_path / "cost.png"),
    ]
    benchmark.main(argv)
    text = md.read_text()
    for head in ("- Date:", "- Machine: CPU", "torch threads 2", "GPU:", "- Versions: torch", "monai",
                 "- Command: `python tools/benchmark.py --bundle dalight3d", "**Sizes changed**",
                 "- CPU allocator (timings): glibc malloc keeps freed memory" if sys.platform.startswith("linux")
                 else "- CPU allocator"):
        assert head in text, head
    table = _table(text)
    assert table[0] == COLUMNS
    rows = table[2:]
    assert [r[1] for r in rows] == ["**DALight3D (bundle)**", "SegResNet"]
    assert all(len(r) == len(COLUMNS) for r in rows)
    ours, base = rows
    assert ours[2] == "1x4x16x16x16" and ours[3] == "2,219,074"
    assert ours[8:] == ["1.00"] * 5  # every ratio of the bundle's own row
    assert all(c != "—" for c in base[3:])  # every figure measured, every ratio computed

    png = tmp_path / "cost.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads(js.read_text())
    assert report["meta"]["torch_threads"] == 2 and report["skipped"] == []
    results = {r["model"]: r for r in report["results"]}
    for r in results.values():
        assert r["errors"] == [] and r["gflops"] > 0 and r["latency_ms"] > 0 and r["volume_s"] > 0
        assert len(r["latencies_ms"]) == 1 and r["peak_mem_mib"] is not None
    assert results["SegResNet"]["ratio_params"] == pytest.approx(4702244 / 2219074)


def test_registry_entries_and_skips(monkeypatch):
    entry = benchmark.resolve_entry("dalight3d")  # parses the bundle's config; builds nothing
    assert [m.name for m in entry.models] == ["DALight3D (bundle)", "UNet", "VNet", "AttentionUnet", "SegResNet"]
    assert (entry.roi, entry.volume, entry.sw_batch_size, entry.overlap) == ((64, 64, 64), (4, 240, 240, 155), 4, 0.5)
    assert entry.in_channels == entry.out_channels == 4
    assert {"dalight3d", "glims", "emcad", "eamnet"} <= set(benchmark.BUNDLES)
    for reg in benchmark.BUNDLES.values():
        assert set(reg["baselines"]) <= set(benchmark.BASELINES)

    monkeypatch.setitem(benchmark.BUNDLES, "not_written_yet", dict(benchmark.BUNDLES["dalight3d"], fallback=None))
    with pytest.raises(benchmark.SkipEntry, match="bundles/not_written_yet"):
        benchmark.resolve_entry("not_written_yet")
    with pytest.raises(SystemExit, match="nothing to benchmark"):
        benchmark.main(["--bundle", "not_written_yet", "--device", "cpu"])


def test_speed_sweep_tiny(tmp_path):
    """The sweep's reference row is the bundle's own setting; float-exact variants change no voxel."""
    md = tmp_path / "sweep.md"
    report = benchmark.main(["--bundle", "dalight3d", "--device", "cpu", "--sweep", "--roi", "16",
                             "--volume", "24,20,16", "--out", str(md)])
    rows = report["sweeps"]["dalight3d"]
    names = [r["name"] for r in rows]
    assert names[0].startswith("bundle config") and rows[0]["sw_batch_size"] == 4
    assert {"inference_mode", "inference_mode, channels-last"} <= set(names)
    assert not any("cpu_fast_path off" in n for n in names)  # DALight-3D has no DepthwiseConv3d: no duplicate row
    assert any(r["sw_batch_size"] == 1 for r in rows) and any(r["amp"] for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert rows[0]["max_abs_diff"] == 0 and rows[0]["speedup"] == pytest.approx(1.0)
    for name in ("inference_mode", "inference_mode, sw_batch_size 1", "inference_mode, channels-last"):
        r = by_name[name]
        assert r["error"] is None and r["max_abs_diff"] < 1e-3, (name, r["max_abs_diff"])
        assert r["changed_fraction"] < 1e-3
    text = md.read_text()
    assert "# medseg-bundles inference-speed sweep" in text and "| Setting | Whole volume s |" in text
    assert "- Command: `python tools/benchmark.py --bundle dalight3d" in text


def test_speed_sweep_depthwise_path(tmp_path):
    """On CPU the sweep times GLIMS's depth-wise convolutions on the plain nn.Conv3d path too: same outputs."""
    report = benchmark.main(["--bundle", "glims", "--device", "cpu", "--sweep", "--sweep-no-amp",
                             "--sweep-batches", "4", "--roi", "32", "--volume", "40,32,32",
                             "--out", str(tmp_path / "sweep.md")])
    rows = {r["name"]: r for r in report["sweeps"]["glims"]}
    plain = next(r for name, r in rows.items() if "cpu_fast_path off" in name)
    assert plain["error"] is None and not plain["depthwise_fast"]
    assert plain["max_abs_diff"] < 1e-4 and plain["changed_fraction"] == 0


def test_profile_names_the_depthwise_layers(tmp_path):
    """--profile times one forward by kind of layer: GLIMS's three dilations of depth-wise convolution appear."""
    report = benchmark.main(["--bundle", "glims", "--device", "cpu", "--profile", "--roi", "32",
                             "--out", str(tmp_path / "profile.md")])
    prof = report["profiles"]["glims"]
    kinds = {r["kind"]: r for r in prof["layers"]}
    for d in (1, 2, 3):
        r = kinds[f"DepthwiseConv3d depth-wise k3x3x3 dilation {d} stride 1"]
        assert r["calls"] == 16 and r["seconds"] > 0
    assert sum(r["seconds"] for r in prof["layers"]) <= prof["total_s"] * 1.05
    assert prof["input_shape"] == [1, 4, 32, 32, 32] and "aten::" in prof["operators"]
    assert "## Profile: GLIMS (bundle)" in (tmp_path / "profile.md").read_text()


def test_cpu_memory_worker_subprocess():
    """The CPU memory figure comes from a fresh ``tools/benchmark.py --memory-worker`` process (the smoke runs above
    measure in process): the worker starts, builds the one model and answers with a figure."""
    from bench.memory import cpu_memory_subprocess

    spec = dict(bundle="dalight3d", model="SegResNet", fallback_nets=False, shape=[1, 4, 16, 16, 16], amp=False,
                threads=1, plain_depthwise=False)
    mib = cpu_memory_subprocess(spec, timeout=600)
    assert isinstance(mib, float) and mib >= 0
