"""Smoke test of tools/benchmark.py: tiny sizes, one repeat, the report's shape only (never its timings)."""

from __future__ import annotations

import json
import os
import sys

import pytest

import benchmark  # tools/ is on sys.path (conftest.py)
from medseg_nets import native

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
    # DALight-3D has CPU fast-path layers (depth-wise, point-wise): the plain-layers row, with the same outputs
    plain = next(r for r in rows if "cpu_fast_path off" in r["name"])
    assert plain["error"] is None and plain["max_abs_diff"] < 1e-3 and plain["changed_fraction"] < 1e-4
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
    """On CPU the sweep times GLIMS with its fast-path layers off (plain PyTorch layers) too: same outputs."""
    report = benchmark.main(["--bundle", "glims", "--device", "cpu", "--sweep", "--sweep-no-amp",
                             "--sweep-batches", "4", "--roi", "32", "--volume", "40,32,32",
                             "--out", str(tmp_path / "sweep.md")])
    rows = {r["name"]: r for r in report["sweeps"]["glims"]}
    plain = next(r for name, r in rows.items() if "cpu_fast_path off" in name)
    assert plain["error"] is None and not plain["depthwise_fast"]
    # float32 rounding of other kernels (instance norm through the group-norm kernel): the relative bound of 1e-4 of
    # the output range is tests/test_cpu_layers.py's; here the logits of random weights span about 10
    assert plain["max_abs_diff"] < 1e-3 and plain["changed_fraction"] < 1e-4


def test_profile_names_the_depthwise_layers(tmp_path):
    """--profile times one forward by kind of layer: GLIMS's point-wise convolutions, and its fused C kernels (every
    depth-wise convolution, every norm + PReLU) when built, else its instance norms; with --plain-layers (no fused
    DACB branches) its three dilations of depth-wise convolution too."""
    report = benchmark.main(["--bundle", "glims", "--device", "cpu", "--profile", "--roi", "32",
                             "--out", str(tmp_path / "profile.md")])
    prof = report["profiles"]["glims"]
    kinds = {r["kind"]: r for r in prof["layers"]}
    pointwise = kinds["PointwiseConv3d dense k1x1x1 dilation 1 stride 1"]["calls"]
    if native.available():  # 16 DACBs: one kernel for their branches (with their group norms), 62 instance norms
        assert pointwise == 39 - 5  # the 5 decoder fusions take [up-sampled, skip] as parts: products, no module call
        assert kinds["medseg_nets.native.depthwise3d_branches (fused C kernel)"]["calls"] == 16
        assert kinds["medseg_nets.native.depthwise3d (fused C kernel)"]["calls"] == 5  # the CSABs' 7^3 convolutions
        assert kinds["medseg_nets.native.norm_act (fused C kernel)"]["calls"] == 62
        assert "medseg_nets.native.depthwise3d" in prof["operators"]
    else:
        assert pointwise == 39 and kinds["InstanceNorm3d"]["calls"] == 62
    assert sum(r["seconds"] for r in prof["layers"]) <= prof["total_s"] * 1.05
    assert prof["input_shape"] == [1, 4, 32, 32, 32] and "aten::" in prof["operators"]
    assert "## Profile: GLIMS (bundle)" in (tmp_path / "profile.md").read_text()
    plain = benchmark.main(["--bundle", "glims", "--device", "cpu", "--profile", "--roi", "32", "--plain-layers",
                            "--out", str(tmp_path / "profile_plain.md")])
    kinds = {r["kind"]: r for r in plain["profiles"]["glims"]["layers"]}
    for d in (1, 2, 3):
        r = kinds[f"DepthwiseConv3d depth-wise k3x3x3 dilation {d} stride 1"]
        assert r["calls"] == 16 and r["seconds"] > 0


def test_cpu_memory_worker_subprocess():
    """The CPU memory figure comes from a fresh ``tools/benchmark.py --memory-worker`` process (the smoke runs above
    measure in process): the worker starts, builds the one model and answers with a figure."""
    from bench.memory import cpu_memory_subprocess

    spec = dict(bundle="dalight3d", model="SegResNet", fallback_nets=False, shape=[1, 4, 16, 16, 16], amp=False,
                threads=1, plain_layers=False)
    mib = cpu_memory_subprocess(spec, timeout=600)
    assert isinstance(mib, float) and mib >= 0


# ---------------------------------------------------------------------------------------------------------------------
# --cases: issue 16's table (synthetic BraTS-like case, whole-case runs through the bundles, goals)
# ---------------------------------------------------------------------------------------------------------------------
def test_brain_case_is_a_centred_brain_zero_outside():
    import numpy as np

    from bench.case_data import BRATS_BRAIN, BRATS_FIELD, brain_case, nonzero_extent, scaled_sizes

    assert scaled_sizes(1.0) == (BRATS_FIELD, BRATS_BRAIN) == ((240, 240, 155), (138, 169, 138))
    assert scaled_sizes(0.2) == ((48, 48, 31), (28, 34, 28))
    field, brain = (40, 44, 30), (21, 27, 19)
    image, info = brain_case(field, brain, seed=3)
    assert image.shape == field + (4,) and image.dtype == np.float32
    offset = tuple((f - b) // 2 for f, b in zip(field, brain))
    assert nonzero_extent(image) == (offset, brain)
    assert info["extent"] == list(brain) and info["extent_start"] == list(offset) and info["field"] == list(field)
    box = tuple(slice(o, o + b) for o, b in zip(offset, brain))
    outside = image.copy()
    outside[box] = 0
    assert not outside.any()  # skull-stripped: exactly zero outside the brain's box
    inside = np.any(image[box] != 0, axis=-1)
    assert 0.3 < inside.mean() < 0.95  # an ellipsoid-like brain, not a filled box
    assert image.min() >= 0 and all(image[box][..., c].max() > 0 for c in range(4))
    with pytest.raises(ValueError, match="must fit"):
        brain_case((20, 20, 20), (21, 10, 10))


def test_cached_case_layouts_are_read_by_the_bundles(tmp_path):
    """The case is written once (MSD 4-channel file and BraTS case folder), reused while its recipe is the same, and
    each layout is what the bundles' datalists find: one case to predict."""
    import nibabel as nib

    from bench.case_data import BRATS_CASE, RECIPE_VERSION, cached_case
    from medseg_nets.data import Datalists

    case = cached_case(tmp_path, scale=0.12, seed=0)
    field = case.info["field"]
    assert not case.reused and field == [29, 29, 19]
    assert nib.load(str(case.msd_file)).shape == (*field, 4)
    modalities = sorted((case.brats_dir / BRATS_CASE).glob("*.nii.gz"))
    assert len(modalities) == 4
    for f in modalities:
        img = nib.load(str(f))
        assert img.shape == tuple(field) and img.get_data_dtype() == "int16"
    for bundle, kind in (("dalight3d", "msd"), ("glims", "brats"), ("emcad", "brats")):
        dataset_dir, layout = case.input_for(bundle)
        lists = Datalists(str(dataset_dir), kind, "inference", output_dir=str(tmp_path / "out"), num_channels=4)
        assert len(lists.lists()["test"]) == 1, (bundle, layout)
    stamp = case.msd_file.stat().st_mtime_ns
    again = cached_case(tmp_path, scale=0.12, seed=0)
    assert again.reused and again.msd_file.stat().st_mtime_ns == stamp
    (case.folder / "info.json").write_text(json.dumps(dict(case.info, recipe_version=RECIPE_VERSION - 1)))
    assert not cached_case(tmp_path, scale=0.12, seed=0).reused  # another recipe: made again


def _patch(bundle, model, role, latency):
    return dict(bundle=bundle, model=model, role=role, latency_s=latency)


def _case(wall, ok=True, mem=1000.0):
    return dict(wall_s=wall, ok=ok, peak_rss_mib=mem, errors=[] if ok else ["prediction shape"])


def test_goals_pass_fail_logic():
    from bench.cases import evaluate_goals, swin_glims_ratio

    patches = [_patch("glims", "GLIMS (bundle)", "bundle", 2.0), _patch("glims", "SwinUNETR", "baseline", 6.2),
               _patch("dalight3d", "DALight3D (bundle)", "bundle", 0.8)]
    assert swin_glims_ratio(patches) == pytest.approx(3.1)
    cases = {"dalight3d": _case(59.0), "glims": _case(95.0), "emcad": _case(9.0, ok=False)}
    goals = {g["key"]: g for g in evaluate_goals(patches, cases, threads=2, scale=1.0)}
    assert goals["glims_vs_swinunetr"]["status"] == "pass" and goals["glims_vs_swinunetr"]["figure"] == "3.10x"
    assert goals["case_dalight3d"]["status"] == "pass" and goals["case_dalight3d"]["figure"] == "59.0 s"
    assert goals["case_glims"]["status"] == "fail"
    assert goals["case_emcad"]["status"] == "fail"  # fast, but no prediction of the input's shape: not a pass
    assert goals["case_peak_memory"]["status"] == "pass"

    patches[1]["latency_s"] = 5.8  # 2.9x
    cases = {"dalight3d": _case(61.0), "glims": _case(80.0, mem=None)}
    goals = {g["key"]: g for g in evaluate_goals(patches, cases, threads=2, scale=1.0)}
    assert goals["glims_vs_swinunetr"]["status"] == "fail"
    assert goals["case_dalight3d"]["status"] == "fail" and goals["case_glims"]["status"] == "pass"
    assert goals["case_emcad"]["status"] == "not measured" and goals["case_emcad"]["figure"] is None
    assert goals["case_peak_memory"]["status"] == "fail"  # glims's peak memory missing

    # scaled down or not on 2 threads: not comparable with the goals; what the figure would give is kept
    for threads, scale in ((2, 0.25), (4, 1.0)):
        goals = {g["key"]: g for g in evaluate_goals(patches, {"glims": _case(80.0)}, threads, scale)}
        assert goals["case_glims"]["status"] == "n/a" and goals["case_glims"]["result"] == "pass"
        assert goals["glims_vs_swinunetr"]["status"] == "n/a" and goals["glims_vs_swinunetr"]["result"] == "fail"
        assert goals["case_dalight3d"]["status"] == "not measured"
        assert "2 threads" in goals["case_glims"]["note"]


@pytest.mark.parametrize("argv, message", [
    (["--cases", "--bundle", "eamnet"], "BraTS bundles"),
    (["--cases", "--roi", "32"], "own patch size"),
    (["--cases", "--device", "cuda"], "measures the CPU"),
    (["--cases", "--amp"], "float32"),
    (["--cases", "--case-repeats", "0"], "--case-repeats"),
    (["--cases", "--sweep"], "not allowed with"),
    (["--runtimes", "eager,tensorrt", "--bundle", "glims"], "unknown runtime"),
    (["--runtimes", "eager", "--bundle", "glims", "--batch", "0"], "--batch"),
    (["--runtimes", "eager"], "--bundle NAME or --all"),
])
def test_mode_arguments_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(argv)
    assert message in capsys.readouterr().err


def test_mode_arguments_accepted():
    opts = benchmark.parse_args(["--cases"])
    assert opts.cases and opts.device == "cpu" and opts.keep_freed_memory and opts.case_repeats == 1
    assert opts.case_dir.endswith("build/bench_case")
    opts = benchmark.parse_args(["--cases", "--bundle", "glims", "--bundle", "emcad", "--scale", "0.5"])
    assert opts.bundle == ["glims", "emcad"]
    opts = benchmark.parse_args(["--runtimes", "ov,openvino,ort,eager,inductor", "--bundle", "emcad", "--batch", "32"])
    assert opts.runtimes_list == ["eager", "ov", "ort", "compile"] and opts.batch == 32 and opts.keep_freed_memory


def test_whole_case_command_and_environment():
    from bench.cases import THREAD_VARS, bundle_command, child_env, engine_seconds
    from bench.common import ROOT

    cmd = bundle_command("emcad", ROOT / "d", ROOT / "w.pt", ROOT / "o", roi=(64, 64), python="py")
    assert cmd[:4] == ["py", "-m", "monai.bundle", "run"]
    args = dict(zip(cmd[4::2], cmd[5::2]))
    assert args["--config_file"] == str(ROOT / "bundles" / "emcad" / "configs" / "inference.json")
    assert args["--bundle_root"] == str(ROOT / "bundles" / "emcad") and args["--roi_size"] == "[64,64]"
    assert args["--dataset_dir"] == str(ROOT / "d") and args["--ckpt_path"] == str(ROOT / "w.pt")
    assert "--roi_size" not in bundle_command("glims", ROOT / "d", ROOT / "w.pt", ROOT / "o")
    env = child_env(2, base={"PATH": "/bin", "OMP_NUM_THREADS": "16", "PYTHONPATH": "/x"})
    assert all(env[v] == "2" for v in THREAD_VARS) and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/x"] and env["PATH"] == "/bin"
    log = ("... Engine run finished. Time taken: 00:00:41.250\n"
           "x - Engine run finished. Time taken: 00:01:02.500\n")
    assert engine_seconds(log) == pytest.approx(62.5) and engine_seconds("no engine here") is None


def test_run_child_measures_the_child_not_this_process(tmp_path):
    """Peak memory is the command's own (not this process's, which an exec'd child would inherit in its count), the
    exit status comes through, and a run past its time limit is killed."""
    from bench.cases import run_child

    held = bytearray(600 * 2**20)  # this process: 600 MiB resident
    held[:: 4096] = b"x" * len(held[:: 4096])
    env = dict(os.environ)
    grow = "import sys; b = bytearray(150 * 2**20); b[::4096] = b'y' * len(b[::4096]); sys.exit(3)"
    res = run_child([sys.executable, "-c", grow], env, tmp_path / "grow.log", timeout=120)
    assert res["returncode"] == 3 and not res["timed_out"]
    assert 150 <= res["peak_rss_mib"] < 400, res
    assert res["cpu_s"] >= 0 and res["wall_s"] > 0
    del held
    res = run_child([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"], env,
                    tmp_path / "slow.log", timeout=3)
    assert res["timed_out"] and res["wall_s"] is None and res["peak_rss_mib"] is None
    assert "started" in (tmp_path / "slow.log").read_text()


def test_check_prediction(tmp_path):
    import nibabel as nib
    import numpy as np

    from bench.cases import check_prediction

    assert "found 0" in check_prediction(tmp_path, (4, 5, 6))["error"]
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), np.eye(4)), tmp_path / "case_seg.nii.gz")
    (tmp_path / "datalist_split.json").write_text("{}")
    ok = check_prediction(tmp_path, (4, 5, 6))
    assert ok["ok"] and ok["shape"] == [4, 5, 6] and ok["dtype"] == "uint8" and ok["error"] is None
    bad = check_prediction(tmp_path, (4, 5, 7))
    assert not bad["ok"] and "not the input's" in bad["error"]


def test_cases_tiny_run(tmp_path):
    """The whole --cases mode at a tiny scale on one bundle: peaks, the patch row, the bundle's inference.json run on
    the synthetic case in a fresh process (prediction of the input's shape), goals marked not applicable."""
    md, js = tmp_path / "cases.md", tmp_path / "cases.json"
    report = benchmark.main(["--cases", "--bundle", "dalight3d", "--threads", "1", "--scale", "0.15", "--repeats", "1",
                             "--warmup", "0", "--case-dir", str(tmp_path / "work"), "--out", str(md),
                             "--json", str(js)])
    text = md.read_text()
    for head in ("- Date:", "- Machine: CPU", "torch threads 1", "at start [", "- Versions: torch",
                 "- Command: `python tools/benchmark.py --cases --bundle dalight3d", "**Sizes changed**"):
        assert head in text, head
    table = _table(text)
    assert table[0] == ["network (bundle's inference path)", "patch", "GFLOPs", "latency", "GFLOP/s", "GB moved",
                        "roofline", "latency / roofline", "whole 4x36x36x23 case", "whole-case peak RSS"]
    row = table[2]
    assert row[0] == "DALight-3D" and row[1] == "32^3" and row[8].endswith(" s") and row[9].endswith(" MiB")
    assert "% of the conv peak" in row[4]
    assert float(row[5]) > 0 and row[6].endswith((" s", " ms")) and row[7].endswith("x")
    assert "GB moved: the bytes one forward's ATen ops read and write" in text
    assert "| copy dst.copy_(src), float32, 2 x 38 MiB |" in text and "Memory peak (the faster of the two)" in text
    goal_rows = {r[0]: r for r in table if len(r) == 5}
    floor_cell = goal_rows["whole BraTS case through bundles/dalight3d inference.json, 2 threads"][4]
    assert " window(s) x " in floor_cell and "start-up" in floor_cell

    saved = json.loads(js.read_text())
    assert saved["peaks"]["threads"] == 1
    assert saved["peaks"]["matmul_gflops_per_s"] > 0 and saved["peaks"]["conv3d_gflops_per_s"] > 0
    assert saved["peaks"]["memory_gb_per_s"] == max(m["best_gb_per_s"] for m in saved["peaks"]["memory"])
    patch = saved["patches"][0]
    assert patch["traffic"]["gflops"] == pytest.approx(patch["gflops"])  # the same FLOPs as FlopCounterMode
    assert patch["gb_moved"] > 0 and patch["roofline_s"] > 0 and 0 <= patch["memory_bound_share"] <= 1
    assert patch["latency_over_roofline"] == pytest.approx(patch["latency_s"] / patch["roofline_s"])
    from bench.cases import window_count

    floor = saved["floors"]["dalight3d"]
    assert floor["cropped"] == [21, 25, 21] and floor["windows"] == window_count([21, 25, 21], [32] * 3, 0.5) == 1
    run = saved["cases"]["dalight3d"]
    assert floor["startup_s"] == pytest.approx(run["wall_s"] - run["engine_s"])
    traffic = patch["traffic"]
    assert traffic["sw_batch"] == 4 and 0 < traffic["sw_batch_roofline_s"] <= patch["roofline_s"]
    assert 0 < traffic["param_gb_read"] < traffic["gb_read"]
    assert floor["floor_s"] == pytest.approx(floor["startup_s"] + traffic["sw_batch_roofline_s"])
    goal = next(g for g in saved["goals"] if g["key"] == "case_dalight3d")
    assert goal["floor_s"] == floor["floor_s"] and goal["below_floor"] == (60.0 < floor["floor_s"])
    assert saved["case"]["info"]["field"] == [36, 36, 23] and saved["case"]["info"]["extent"] == [21, 25, 21]
    case = saved["cases"]["dalight3d"]
    assert case["ok"] and case["errors"] == [] and case["prediction"]["shape"] == [36, 36, 23]
    assert case["peak_rss_mib"] > 50 and case["engine_s"] is not None
    assert case["env"]["OMP_NUM_THREADS"] == "1" and "--roi_size '[32,32,32]'" in case["command"]
    assert [g["status"] for g in saved["goals"]] == ["not measured", "n/a", "not measured", "not measured", "n/a"]
    assert report["patches"][0]["gflops"] > 0 and len(report["patches"][0]["latencies_s"]) == 1
    assert (tmp_path / "work" / "logs" / "dalight3d_run1.log").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# roofline: memory peak, traffic of an op sequence, floors of the whole cases
# ---------------------------------------------------------------------------------------------------------------------
def test_memory_kernels_count_bytes_read_and_written():
    from bench.peaks import copy_rate, memory_mib, triad_rate

    assert memory_mib(1.0) == 256 and memory_mib(0.5) == 128 and memory_mib(0.001) == 4
    n = 4 * 2**20 // 4
    copy, triad = copy_rate(4, repeats=2), triad_rate(4, repeats=2)
    assert copy["gbytes"] == pytest.approx(2 * n * 4 / 1e9) and triad["gbytes"] == pytest.approx(3 * n * 4 / 1e9)
    for k in (copy, triad):
        assert len(k["times_s"]) == 2 and k["best_gb_per_s"] == pytest.approx(k["gbytes"] / min(k["times_s"]))
        assert k["best_gb_per_s"] >= k["median_gb_per_s"] > 0


def test_traffic_of_a_tiny_graph():
    """Conv3d + ReLU + add, a view, an expanded view, an out= op and a copy_: bytes and FLOPs counted by hand."""
    import torch

    from bench.traffic import record_forward

    f4 = 4  # bytes of a float32
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 4, 4, 4)
    buf, dst = torch.empty(1, 3, 4, 4, 4), torch.empty(3 * 64)

    def graph(x):
        c = conv(x)
        r = torch.relu(c)
        s = r + c  # two storages read
        d = s + s  # one storage, read once
        flat = d.view(-1)  # a view: nothing moved
        e = conv.bias.view(1, 3, 1, 1, 1).expand_as(c) + c  # the expanded bias: its 3 values, not 192
        torch.mul(e, 2.0, out=buf)  # reads e, writes buf (not read)
        dst.copy_(flat)  # reads flat, writes dst (not read)
        return dst

    with torch.inference_mode():
        records = record_forward(graph, x, params=list(conv.parameters()))
    ops = [r.op for r in records]
    assert ops == ["aten.convolution.default", "aten.relu.default", "aten.add.Tensor", "aten.add.Tensor",
                   "aten.view.default", "aten.view.default", "aten.expand.default", "aten.add.Tensor",
                   "aten.mul.out", "aten.copy_.default"]
    by = {i: (r.bytes_read, r.bytes_written, r.flops) for i, r in enumerate(records)}
    x_b, w_b, b_b, y_b = 2 * 64 * f4, 3 * 2 * 27 * f4, 3 * f4, 3 * 64 * f4
    assert by[0] == (x_b + w_b + b_b, y_b, 2 * (3 * 64) * (2 * 27))  # multiply-add = 2 FLOPs per weight per voxel
    assert by[1] == (y_b, y_b, 0)
    assert by[2] == (2 * y_b, y_b, 0) and by[3] == (y_b, y_b, 0)
    assert by[4] == by[5] == by[6] == (0, 0, 0)
    assert by[7] == (b_b + y_b, y_b, 0)
    assert by[8] == (y_b, y_b, 0) and by[9] == (y_b, y_b, 0)
    # the parameters' bytes among those read: the conv's weight and bias, the expanded bias
    assert [r.param_bytes_read for r in records] == [w_b + b_b, 0, 0, 0, 0, 0, 0, b_b, 0, 0]


def test_traffic_flops_match_flop_counter_and_views_move_nothing():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.traffic import is_view_op, record_forward

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.PReLU(),
                              torch.nn.Flatten(2), torch.nn.Linear(64, 16)).eval()
    x = torch.randn(2, 4, 4, 4, 4)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode():
        with counter:
            net(x)
        records = record_forward(net, x)
    assert sum(r.flops for r in records) == counter.get_total_flops() > 0
    names = {r.op for r in records}
    # composite ops are recorded as the kernels eager PyTorch runs
    assert "aten.native_group_norm.default" in names and "aten.group_norm.default" not in names
    assert "aten.conv3d.default" not in names and "aten.linear.default" not in names
    assert {r.kind for r in records if r.op == "aten.convolution.default"} == {"conv"}
    views = [r for r in records if r.op.rsplit(".", 1)[0] in (
        "aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.permute", "aten.expand", "aten.unsqueeze",
        "aten.squeeze", "aten.alias", "aten.slice", "aten.select")]
    assert views and all(r.bytes == 0 for r in views)
    assert is_view_op(torch.ops.aten.permute.default) and not is_view_op(torch.ops.aten.add_.Tensor)


def test_traffic_records_the_depthwise_fast_path():
    """The CPU fast path of a depth-wise layer (not a graph capture: a dispatch mode sees eager) is what is recorded:
    the fused C kernel as one record from what it reports (when built); with the kernels off, the channels-last
    path's layout copies and the per-sample copy_ back to NCDHW; with the fast path off, one convolution."""
    import torch

    from bench.traffic import record_forward
    from medseg_nets.blocks.depthwise import DepthwiseConv3d

    layer = DepthwiseConv3d(4, 3, dilation=2).eval()
    x = torch.randn(2, 4, 6, 6, 6)
    out_bytes = x.numel() * 4
    with torch.inference_mode():
        kernel = record_forward(layer, x)
        previous = native.set_enabled(False)
        try:
            fast = record_forward(layer, x)
        finally:
            native.set_enabled(previous)
        layer.cpu_fast_path = False
        plain = record_forward(layer, x)
    copies = [r for r in fast if r.op == "aten.copy_.default"]
    assert len(copies) == 2  # from_ndhwc: one per sample
    assert all(r.bytes_read == r.bytes_written == out_bytes // 2 for r in copies)
    assert any(r.op == "aten.clone.default" for r in fast)  # to_ndhwc's contiguous copy
    assert [r.op for r in plain if r.bytes] == ["aten.convolution.default"]
    assert sum(r.flops for r in fast) == sum(r.flops for r in plain) > 0
    assert sum(r.bytes for r in fast) > 2 * sum(r.bytes for r in plain)
    if native.available():
        (rec,) = [r for r in kernel if r.bytes]
        param_bytes = (layer.weight.numel() + layer.bias.numel()) * 4
        assert (rec.op, rec.kind, rec.flops) == ("native.depthwise3d", "conv", sum(r.flops for r in plain))
        assert (rec.bytes_read, rec.bytes_written, rec.param_bytes_read) == (out_bytes + param_bytes, out_bytes,
                                                                            param_bytes)
    else:
        assert kernel == fast


def test_roofline_arithmetic():
    from bench.traffic import OpRecord, roofline

    peaks = dict(conv3d_gflops_per_s=100.0, matmul_gflops_per_s=200.0, memory_gb_per_s=10.0)
    records = [
        OpRecord("aten.convolution.default", "conv", 2_000_000_000, 600_000_000, 400_000_000),  # 0.02 vs 0.1 s
        OpRecord("aten.mm.default", "matmul", 4_000_000_000, 50_000_000, 50_000_000),  # 0.02 vs 0.01 s
        OpRecord("aten.copy_.default", "other", 0, 250_000_000, 250_000_000),  # 0 vs 0.05 s
        OpRecord("aten.copy_.default", "other", 0, 100_000_000, 100_000_000),  # 0 vs 0.02 s
        OpRecord("aten.special.default", "other", 4_000_000_000, 0, 0),  # the higher peak: 0.02 s
    ]
    s = roofline(records, peaks, top=2)
    assert s["roofline_s"] == pytest.approx(0.1 + 0.02 + 0.05 + 0.02 + 0.02)
    assert s["compute_s"] == pytest.approx(0.02 + 0.02 + 0.02) and s["memory_s"] == pytest.approx(0.1 + 0.01 + 0.07)
    assert s["memory_bound_share"] == pytest.approx((0.1 + 0.07) / 0.21)
    assert s["gflops"] == pytest.approx(10.0) and s["gb_moved"] == pytest.approx(1.8)
    assert s["gb_read"] == pytest.approx(1.0) and s["gb_written"] == pytest.approx(0.8)
    assert [(o["op"], o["calls"]) for o in s["top_ops"]] == [("aten.convolution.default", 1),
                                                             ("aten.copy_.default", 2)]
    assert s["top_ops"][1]["gb"] == pytest.approx(0.7)
    assert s["top_ops"][1]["roofline_share"] == pytest.approx(0.07 / 0.21)
    # in a batch of 4 the parameters are read once: per input, 3/4 of their bytes less
    records[0].param_bytes_read = 400_000_000  # the conv: 1.0 GB -> 0.7 GB per input, 0.07 s, still memory-bound
    records[2].param_bytes_read = 200_000_000  # a copy: 0.5 GB -> 0.35 GB, 0.035 s
    b = roofline(records, peaks, batch=4)
    assert b["batch"] == 4 and b["param_gb_read"] == pytest.approx(0.6) and b["gb_moved"] == pytest.approx(1.8)
    assert b["roofline_s"] == pytest.approx(0.07 + 0.02 + 0.035 + 0.02 + 0.02)
    assert roofline(records, peaks)["roofline_s"] == pytest.approx(s["roofline_s"])  # batch 1: as recorded


@pytest.mark.parametrize("image, roi, overlap", [
    ((23, 30, 17), (8, 8, 8), 0.5), ((23, 30, 17), (16, 16, -1), 0.25), ((5, 30, 9), (8, 8, 8), 0.5),
    ((20, 20, 20), (20, 7, 9), (0.5, 0.25, 0.0)),
])
def test_window_count_is_monai_sliding_window(image, roi, overlap):
    """The floor's window count is the number of windows MONAI's sliding_window_inference runs the network on."""
    import torch
    from monai.inferers import sliding_window_inference

    from bench.cases import window_count

    seen = []

    def predictor(x):
        seen.append(x.shape[0])
        return x

    with torch.inference_mode():
        sliding_window_inference(torch.zeros(1, 1, *image), roi, 1, predictor, overlap=overlap)
    assert window_count(image, roi, overlap) == sum(seen) == len(seen)


def test_case_floor_and_unreachable_goals():
    from bench.cases import case_entry, case_floor, evaluate_goals

    cropped = [138, 169, 138]
    glims = case_floor(case_entry("glims"), dict(roofline_s=2.5), dict(wall_s=80.0, engine_s=70.0), cropped)
    # 96^3 windows at overlap 0.5 (step 48): 2 x 3 x 2 over 138 x 169 x 138
    assert glims["windows"] == 12 and glims["calls_per_window"] == 1 and glims["startup_s"] == pytest.approx(10.0)
    assert glims["floor_s"] == pytest.approx(10.0 + 12 * 2.5) and glims["network_floor_s"] == pytest.approx(30.0)
    # EMCAD: one 256 x 256 in-plane window holding every slice, the network once per slice
    emcad = case_floor(case_entry("emcad"), dict(roofline_s=0.05), dict(wall_s=28.0, engine_s=None), cropped)
    assert emcad["roi"] == [256, 256, -1] and emcad["windows"] == 1 and emcad["calls_per_window"] == 138
    assert emcad["startup_s"] is None and emcad["floor_s"] == pytest.approx(138 * 0.05)
    assert case_floor(case_entry("dalight3d"), dict(roofline_s=None), None, cropped) is None
    # the roofline per window in the inferer's batches (weights read once a batch) is the one used when known
    batched = case_floor(case_entry("dalight3d"), dict(roofline_s=0.2, traffic=dict(sw_batch=4,
                                                                                  sw_batch_roofline_s=0.15)),
                         dict(wall_s=20.0, engine_s=12.0), cropped)
    assert batched["windows"] == 4 * 5 * 4 and batched["batch"] == 4 and batched["call_roofline_batch1_s"] == 0.2
    assert batched["floor_s"] == pytest.approx(8.0 + 80 * 0.15)

    patches = [dict(bundle="glims", model="GLIMS (bundle)", role="bundle", latency_s=4.0, roofline_s=2.5),
               dict(bundle="glims", model="SwinUNETR", role="baseline", latency_s=7.0, roofline_s=3.0)]
    cases = {"glims": _case(78.0), "emcad": _case(28.0)}
    goals = {g["key"]: g for g in evaluate_goals(patches, cases, 2, 1.0, floors=dict(glims=glims, emcad=emcad))}
    assert goals["case_glims"]["floor_s"] == pytest.approx(40.0) and goals["case_glims"]["below_floor"] is False
    assert goals["case_emcad"]["below_floor"] is False  # 6.9 s < 10 s
    assert goals["case_dalight3d"]["floor"] is None and goals["case_dalight3d"]["unreachable"] is None
    assert goals["glims_vs_swinunetr"]["ceiling_ratio"] == pytest.approx(7.0 / 2.5)
    assert goals["glims_vs_swinunetr"]["unreachable"] is True  # 2.8x at best: the 3x goal is out of reach
    slow = dict(emcad, floor_s=12.0)
    goals = {g["key"]: g for g in evaluate_goals(patches, cases, 2, 1.0, floors=dict(emcad=slow))}
    assert goals["case_emcad"]["below_floor"] is True and goals["case_emcad"]["status"] == "fail"


# ---------------------------------------------------------------------------------------------------------------------
# --runtimes (was tools/bench_runtimes.py)
# ---------------------------------------------------------------------------------------------------------------------
def test_parse_runtimes():
    from bench.runtimes import parse_runtimes

    assert parse_runtimes("ov,ort") == ["eager", "ov", "ort"]  # eager always, first: the reference
    assert parse_runtimes("onnxruntime, openvino,eager,ov") == ["eager", "ort", "ov"]
    with pytest.raises(ValueError, match="unknown runtime 'tvm'"):
        parse_runtimes("eager,tvm")


def _tiny_net():
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.PReLU(),
                         nn.Conv3d(4, 3, 1)).eval()


def test_time_runtimes_onnx_runtimes(tmp_path):
    """ONNX Runtime and OpenVINO through RuntimeNetwork: one export, shared; outputs within issue 16's tolerance."""
    import torch

    from bench.runtimes import time_runtimes
    from medseg_nets.runtime import available_runtimes

    wanted = [r for r, name in (("ort", "onnxruntime"), ("ov", "openvino")) if name in available_runtimes()]
    if not wanted:
        pytest.skip("neither onnxruntime nor openvino is installed")
    x = torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    rows = {r["runtime"]: r for r in time_runtimes(_tiny_net(), x, ["eager", *wanted], 2, 1, tmp_path)}
    assert list(rows) == ["eager", *wanted]
    assert rows["eager"]["max_abs_diff"] == 0 and rows["eager"]["speedup"] == pytest.approx(1.0)
    for name in wanted:
        r = rows[name]
        assert r["error"] is None and len(r["times_s"]) == 2 and r["median_s"] > 0
        assert r["diff_over_range"] < 1e-4
    assert rows[wanted[0]]["export_reused"] is False
    if len(wanted) == 2:
        assert rows[wanted[1]]["export_reused"] is True  # the second runtime reads the first one's export


def test_time_runtimes_missing_package(tmp_path, monkeypatch):
    import torch

    from bench.runtimes import time_runtimes
    from medseg_nets.runtime import wrapper

    monkeypatch.setattr(wrapper, "_missing_packages", lambda runtime: [runtime])
    rows = time_runtimes(_tiny_net(), torch.randn(1, 2, 8, 8, 8), ["eager", "ov"], 1, 1, tmp_path)
    assert rows[0]["runtime"] == "eager" and len(rows[0]["times_s"]) == 1
    assert rows[1]["error"].startswith("openvino not installed") and rows[1]["times_s"] == []
    assert rows[1]["median_s"] is None and rows[1]["speedup"] is None


def test_runtimes_mode_report(tmp_path):
    md = tmp_path / "rt.md"
    report = benchmark.main(["--runtimes", "eager", "--bundle", "dalight3d", "--roi", "16", "--repeats", "1",
                             "--threads", "1", "--out", str(md)])
    (res,) = report["runtimes"]
    assert res["network"] == "DALight3D (bundle)" and res["input_shape"] == [1, 4, 16, 16, 16]
    assert [r["runtime"] for r in res["rows"]] == ["eager"] and len(res["rows"][0]["times_s"]) == 1
    text = md.read_text()
    assert "# medseg-bundles inference runtimes" in text and "| DALight3D (bundle), 1x4x16x16x16 | eager |" in text


# ---------------------------------------------------------------------------------------------------------------------
# --case-runtime: the bundles' runtime switch on the whole case
# ---------------------------------------------------------------------------------------------------------------------
def test_runtime_from_log_and_cache_clearing(tmp_path):
    from bench.cases import bundle_command, clear_runtime_cache, runtime_from_log

    ran = ("x - RuntimeNetwork: openvino runs DALight3D for input ['B', 4, 64, 64, 64] (new export /a.onnx)\n"
           "x - RuntimeNetwork: openvino output within 8.8e-05 x range of eager PyTorch (max |diff| 0.0007, ...)\n")
    assert runtime_from_log(ran) == dict(runtime="openvino", diff_over_range=8.8e-05, turned_off=None)
    off = ran + "x - RuntimeNetwork: openvino unavailable, running DALight3D in eager PyTorch: output differs\n"
    assert runtime_from_log(off)["runtime"] == "eager" and runtime_from_log(off)["turned_off"] == "output differs"
    assert runtime_from_log("nothing logged")["runtime"] == "eager"
    ckpt = tmp_path / "net.pt"
    for name in ("net.pt", "net.pt.4x64x64x64.onnx", "net.pt.4x64x64x64.json", "other.pt.4x8.onnx"):
        (tmp_path / name).write_text("x")
    assert clear_runtime_cache(ckpt) == ["net.pt.4x64x64x64.json", "net.pt.4x64x64x64.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt", "other.pt.4x8.onnx"]
    cmd = bundle_command("dalight3d", tmp_path, ckpt, tmp_path / "out", runtime="openvino")
    assert cmd[-2:] == ["--runtime", "openvino"]
    assert "--runtime" not in bundle_command("dalight3d", tmp_path, ckpt, tmp_path / "out", runtime="eager")


@pytest.mark.skipif("openvino" not in __import__("medseg_nets.runtime").runtime.available_runtimes(),
                    reason="openvino not installed")
def test_whole_case_with_runtime_openvino(tmp_path):
    """run_whole_case with --case-runtime openvino on a tiny case: a first run that exports (apart), then the timed
    run reusing the export; the log says OpenVINO ran and how close it came to eager PyTorch."""
    import argparse

    from bench.case_data import cached_case
    from bench.cases import case_entry, run_whole_case

    case = cached_case(tmp_path / "case", scale=0.12, seed=0)
    opts = argparse.Namespace(scale=0.12, threads_used=1, case_repeats=1, case_timeout=600.0, case_runtime="openvino")
    row = run_whole_case(case_entry("dalight3d", scale=0.12), case, opts, tmp_path / "work")
    assert row["ok"], row["errors"]
    first = row["first_run"]
    assert first["runtime"] == "openvino" and "exporting DALight3D" in open(first["log"]).read()
    assert row["runtime"] == "openvino" and 0 <= row["runs"][0]["diff_over_range"] <= 1e-4
    assert "(cached export" in open(row["runs"][0]["log"]).read()
    assert row["command"].endswith("--runtime openvino") and row["prediction"]["ok"]


def test_time_runtimes_plain_and_float64(tmp_path):
    """The `plain` row runs the network with its CPU fast-path layers off (a copy: the eager row keeps them), the
    `float64` row in double precision; both near eager, interleaved timings for each."""
    import torch
    import torch.nn as nn

    from bench.runtimes import parse_runtimes, time_runtimes
    from medseg_nets.blocks.cpu import InstanceNorm3d, PointwiseConv3d

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), InstanceNorm3d(4, affine=True), nn.PReLU(),
                        PointwiseConv3d(4, 3)).eval()
    seen = []
    net[1].register_forward_pre_hook(lambda m, i: seen.append(m.cpu_fast_path))
    x = torch.randn(1, 2, 8, 8, 8)
    rows = time_runtimes(net, x, parse_runtimes("plain,float64"), repeats=2, threads=1, work=tmp_path)
    assert [r["runtime"] for r in rows] == ["eager", "plain", "float64"]
    assert all(r["error"] is None and len(r["times_s"]) == 2 for r in rows)
    assert net[1].cpu_fast_path and seen[0] is True  # eager's own net untouched (its forward ran first)
    plain, double = rows[1], rows[2]
    assert 0 <= plain["diff_over_range"] < 1e-5 and 0 < double["diff_over_range"] < 1e-5
