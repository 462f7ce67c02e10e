"""Runtime A/B for one network (issue 16): eager PyTorch, torch.compile (inductor), ONNX Runtime, OpenVINO (CPU).

Interleaved timings (each rep runs every runtime once, in turn), after one warm-up call that also gives the max abs
difference from eager (and that difference relative to the range of the eager output). Random weights (seed 0),
2 threads, glibc malloc keeping freed memory as the bundles run. ONNX export as tools/export_onnx.py does it (dynamo,
dynamic batch traced at batch 2); ONNX Runtime with all graph optimisations and 2 intra-op threads; OpenVINO CPU with
f32 precision, latency hint, 2 threads.

    python tools/bench_runtimes.py glims --reps 5 --runtimes eager,ort,ov          # 1x4x96^3
    python tools/bench_runtimes.py dalight --runtimes eager,ort,ov,compile         # 1x4x64^3
    python tools/bench_runtimes.py emcad --batch 32 --runtimes eager,ort,ov        # 32x4x256^2 (SliceInferer batch)
    python tools/bench_runtimes.py swin --runtimes eager,ov                        # MONAI SwinUNETR(48) 1x4x96^3
"""
import argparse, shutil, json, os, sys, time, statistics, tempfile, warnings
import torch
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ROOT)
from medseg_nets.utils import keep_freed_memory
p = argparse.ArgumentParser()
p.add_argument("net"); p.add_argument("--reps", type=int, default=5)
p.add_argument("--runtimes", default="eager,ort,ov,compile")
p.add_argument("--batch", type=int, default=1)
p.add_argument("--json", default=None, help="write the figures here")
a = p.parse_args()
torch.set_num_threads(2); keep_freed_memory("cpu", True)
torch.manual_seed(0)
def build():
    from monai.bundle import ConfigParser
    if a.net == "swin":
        from monai.networks.nets import SwinUNETR
        return SwinUNETR(spatial_dims=3, in_channels=4, out_channels=3, feature_size=48), [4, 96, 96, 96]
    b = {"glims": "glims", "dalight": "dalight3d", "emcad": "emcad"}[a.net]
    cp = ConfigParser(); cp.read_config(os.path.join(ROOT, "bundles", b, "configs", "inference.json"))
    net = cp.get_parsed_content("network_def")
    shape = {"glims": [4, 96, 96, 96], "dalight": [4, 64, 64, 64], "emcad": [4, 256, 256]}[a.net]
    return net, shape
net, shape = build(); net.eval()
x = torch.randn([a.batch, *shape], generator=torch.Generator().manual_seed(1))
log = lambda *m: print(*m, flush=True)
with torch.no_grad():
    ref = net(x)
rng = float(ref.max() - ref.min())
log(f"{a.net} input {list(x.shape)} out range {rng:.4g} load {os.getloadavg()}")
fns = {"eager": lambda: net(x)}
res = {}
tmp = tempfile.mkdtemp(prefix="speed16_")
rts = a.runtimes.split(",")
if "ort" in rts or "ov" in rts:
    onnx_path = os.path.join(tmp, "m.onnx")
    t0 = time.perf_counter()
    xb = torch.randn([2, *shape])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (xb,), onnx_path, dynamo=True, input_names=["image"], output_names=["pred"],
                          dynamic_axes={"image": [0], "pred": [0]}, external_data=False)
    res["export_s"] = time.perf_counter() - t0; log(f"onnx export {res['export_s']:.1f}s")
if "ort" in rts:
    import onnxruntime as ort
    so = ort.SessionOptions(); so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 2; so.inter_op_num_threads = 1; so.log_severity_level = 3
    t0 = time.perf_counter()
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    res["ort_init_s"] = time.perf_counter() - t0
    xn = x.numpy()
    fns["ort"] = lambda: torch.from_numpy(sess.run(None, {"image": xn})[0])
if "ov" in rts:
    try:
        import openvino as ov
        core = ov.Core()
        t0 = time.perf_counter()
        m = core.read_model(onnx_path)
        cm = core.compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32",
                                           "PERFORMANCE_HINT": "LATENCY"})
        res["ov_init_s"] = time.perf_counter() - t0
        req = cm.create_infer_request(); xn2 = x.numpy()
        fns["ov"] = lambda: torch.from_numpy(req.infer({0: xn2})[0].copy())
    except Exception as e:
        log("openvino unavailable:", repr(e)[:300])
if "compile" in rts:
    t0 = time.perf_counter()
    cnet = torch.compile(net)
    with torch.no_grad():
        cnet(x)
    res["compile_s"] = time.perf_counter() - t0; log(f"compile+first {res['compile_s']:.1f}s")
    fns["compile"] = lambda: cnet(x)
times = {k: [] for k in fns}; diffs = {}
with torch.no_grad():
    for k, f in fns.items():  # warm-up + diff
        y = f(); diffs[k] = float((y - ref).abs().max())
        log(f"{k}: max abs diff {diffs[k]:.3g} rel-to-range {diffs[k]/rng:.3g}")
    for r in range(a.reps):
        for k, f in fns.items():
            t0 = time.perf_counter(); f(); times[k].append(time.perf_counter() - t0)
        log(f"rep {r}: " + " ".join(f"{k}={v[-1]:.3f}" for k, v in times.items()) + f" load {os.getloadavg()[0]:.2f}")
med = {k: statistics.median(v) for k, v in times.items()}
log("MEDIANS " + " ".join(f"{k}={v:.3f}s(x{med['eager']/v:.2f})" for k, v in med.items()))
res.update(net=a.net, batch=a.batch, medians=med, times=times, diffs=diffs, range=rng, load_end=os.getloadavg())
if a.json:
    json.dump(res, open(a.json, "w"), indent=1)
shutil.rmtree(tmp, ignore_errors=True)
