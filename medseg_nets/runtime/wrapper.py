# Copyright (c) medseg-bundles contributors
# Licensed under the Apache License, Version 2.0
"""A network run by OpenVINO or ONNX Runtime on CPU, exported once and cached next to its checkpoint (issue 16).

:class:`RuntimeNetwork` wraps a bundle's network (an ``nn.Module``) and behaves like it for MONAI's inferers: a
``(B, C, *spatial)`` float32 CPU tensor in, the network's eval-mode output tensor out, any batch size. On the first
eval-mode forward at a given spatial size it exports the network, with the weights it holds at that moment (the
bundle's ``CheckpointLoader`` has loaded them by then), to ONNX through torch's dynamo exporter (dynamic batch axis,
traced at batch 2, as ``tools/export_onnx.py`` does) and loads the file into the runtime with as many threads as
torch uses. The ``.onnx`` file is cached next to the checkpoint as
``<ckpt>.<C>x<spatial>.onnx`` with a ``.json`` sidecar holding its key: the checkpoint file's sha256, a sha256 of the
network's weights as loaded, the network's class, the input shape, and the torch version. A later run with the same key
reuses the file (no export); a changed checkpoint, weights, shape or torch rebuilds it. Without a checkpoint file (random
weights) the export goes to a temporary folder for the life of the object.

Where the runtime cannot run or its first output at a shape is off (``verify``), the wrapper falls back to the network itself (eager PyTorch) and logs why once:
``runtime="eager"``; the optional package missing; the export or the runtime failing; training mode; an input
that is not a float32 CPU tensor; gradients required. ``state_dict``/``load_state_dict`` are the wrapped network's
(same keys), so checkpoints load into either object.

Outputs are not bit-identical to eager PyTorch (different kernels, float32 throughout: no reduced precision is
allowed); the tests hold them to ``1e-4 x`` the output range of the eager output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from medseg_nets.utils.fileio import file_sha256

__all__ = ["RUNTIMES", "RuntimeNetwork", "available_runtimes", "file_sha256"]

logger = logging.getLogger(__name__)

RUNTIMES = ("eager", "openvino", "onnxruntime")
_ALIASES = {"ov": "openvino", "ort": "onnxruntime", "torch": "eager", "pytorch": "eager", "none": "eager"}
_PACKAGES = {"openvino": ("openvino", "onnx", "onnxscript"), "onnxruntime": ("onnxruntime", "onnx", "onnxscript")}
INPUT_NAME, OUTPUT_NAME = "image", "pred"
CACHE_FORMAT = 1  # bump when the export changes in a way that invalidates cached files


def _normalise(runtime: Optional[str]) -> str:
    name = str(runtime or "eager").strip().lower()
    name = _ALIASES.get(name, name)
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    return name


def _missing_packages(runtime: str) -> list[str]:
    missing = []
    for mod in _PACKAGES.get(runtime, ()):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    return missing


def available_runtimes() -> list[str]:
    """The runtimes whose packages import here (``eager`` always)."""
    return [r for r in RUNTIMES if not _missing_packages(r)]


def weights_sha256(net: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and values of ``net``'s state dict (CPU copies)."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        if not torch.is_tensor(t):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class RuntimeNetwork(nn.Module):
    """``network`` run by ``runtime`` (``"openvino"``, ``"onnxruntime"`` or ``"eager"``); see the module doc.

    Args:
        network: the bundle's network (built from ``network_def``); weights are read at the first forward.
        runtime: ``"openvino"`` / ``"ov"``, ``"onnxruntime"`` / ``"ort"``, or ``"eager"`` (the network itself).
        ckpt_path: the checkpoint the weights come from; the export is cached next to it (``cache_dir`` overrides the
            folder). A missing file: no cache on disk.
        cache_dir: folder for the cached export (default: the checkpoint's folder).
        num_threads: runtime threads (default ``torch.get_num_threads()`` at the first export).
        opset: ONNX opset of the export (default: torch's).
        verify: on the first batch at each input shape, also run the network in eager PyTorch and compare; beyond
            ``rtol x`` the range of the eager output, the runtime is turned off (logged) and eager PyTorch runs on.
        rtol: the tolerance of ``verify`` (issue 16: 1e-4 of the logits' range).
        default_kwargs: keyword arguments of the network's forward that the export leaves at their defaults, each
            with the value that means the same as leaving it out, e.g. ``{"identifier": -1}`` for DALight-3D (``-1``
            = no identifier, the same arithmetic as ``None``). A call whose keyword arguments are all named here, each
            ``None`` or a tensor whose every element equals that value, runs the exported network; other keyword
            arguments or values (e.g. real identifiers) run the network in eager PyTorch for that call (logged once).
    """

    def __init__(
        self,
        network: nn.Module,
        runtime: Optional[str] = "openvino",
        ckpt_path: Optional[os.PathLike | str] = None,
        cache_dir: Optional[os.PathLike | str] = None,
        num_threads: Optional[int] = None,
        opset: Optional[int] = None,
        verify: bool = True,
        rtol: float = 1e-4,
        default_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.runtime = _normalise(runtime)
        self.ckpt_path = Path(ckpt_path) if ckpt_path else None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.num_threads = num_threads
        self.opset = opset
        self.verify = bool(verify)
        self.rtol = float(rtol)
        self.default_kwargs = dict(default_kwargs or {})
        self.last_check: Optional[dict[str, float]] = None  # {"max_abs_diff", "range"} of the latest verification
        self._sessions: dict[tuple[int, ...], Any] = {}  # (C, *spatial) -> callable(np array) -> np array
        self._tmpdir: Optional[tempfile.TemporaryDirectory] = None
        self._disabled: Optional[str] = None  # reason the runtime is off for good
        self._warned: set[str] = set()
        self.last_export: Optional[dict[str, Any]] = None  # {"path", "reused", "key"} of the latest session built
        if self.runtime != "eager":
            missing = _missing_packages(self.runtime)
            if missing:
                extra = {"openvino": "openvino", "onnxruntime": "onnx"}[self.runtime]
                self._disable(f"{', '.join(missing)} not installed (pip install -e '.[{extra}]')")

    # ---- the wrapped network's parameters, as if there were no wrapper -------------------------------------------
    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self._sessions.clear()  # new weights: exports are checked against them again at the next forward
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def active_runtime(self) -> str:
        """``eager`` once the runtime has been turned off, else the requested runtime."""
        return "eager" if self._disabled or self.runtime == "eager" else self.runtime

    def _disable(self, reason: str) -> None:
        self._disabled = reason
        logger.warning("RuntimeNetwork: %s unavailable, running %s in eager PyTorch: %s", self.runtime,
                       type(self.network).__name__, reason)

    def _eager_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            logger.info("RuntimeNetwork: eager PyTorch for this call (%s)", reason)

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.runtime == "eager" or self._disabled:
            return self.network(x, *args, **kwargs)
        reason = None
        if args:
            reason = "extra positional forward arguments"
        elif kwargs and (why := self._non_default(kwargs)):
            reason = why
        elif self.training:
            reason = "training mode"
        elif not torch.is_tensor(x) or x.device.type != "cpu" or x.dtype != torch.float32:
            reason = "input is not a float32 CPU tensor"
        elif torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.network.parameters())):
            reason = "gradients enabled (run under torch.no_grad / inference_mode)"
        elif x.dim() < 3:
            reason = "input has no batch and channel axes"
        if reason:
            self._eager_once(reason)
            return self.network(x, *args, **kwargs)
        key = tuple(int(s) for s in x.shape[1:])
        run = self._sessions.get(key)
        if run is not None:
            return torch.from_numpy(run(x.detach().contiguous().numpy()))
        try:
            run = self._build(key)
            y = torch.from_numpy(run(x.detach().contiguous().numpy()))
        except Exception as e:  # export or runtime failure: eager from now on, once logged
            self._sessions.pop(key, None)
            self._disable(f"{type(e).__name__}: {e}")
            return self.network(x, **kwargs)
        if not self.verify:
            return y
        ref = self.network(x, **kwargs)
        if not torch.is_tensor(ref) or ref.shape != y.shape:
            self._sessions.pop(key, None)
            self._disable(f"output {type(ref).__name__} {getattr(ref, 'shape', '')} is not one tensor of shape "
                          f"{tuple(y.shape)}")
            return ref
        diff, rng = float((y - ref).abs().max()), float(ref.max() - ref.min())
        self.last_check = {"max_abs_diff": diff, "range": rng}
        if not diff <= self.rtol * rng:  # also NaN
            self._sessions.pop(key, None)
            self._disable(f"output differs from eager PyTorch by {diff:.3g} > {self.rtol:g} x range {rng:.3g} "
                          f"(input {list(x.shape)})")
        else:
            logger.info("RuntimeNetwork: %s output within %.2g x range of eager PyTorch (max |diff| %.3g, input %s)",
                        self.runtime, diff / rng if rng > 0 else 0.0, diff, list(x.shape))
        return ref

    def _non_default(self, kwargs: dict[str, Any]) -> Optional[str]:
        """Why the keyword arguments of a call are not the export's (``None`` when they are), see ``default_kwargs``."""
        for name, value in kwargs.items():
            if name not in self.default_kwargs:
                return f"keyword argument {name!r} (not in default_kwargs)"
            if value is None:
                continue
            default = self.default_kwargs[name]
            if not torch.is_tensor(value) or not bool((value == default).all()):
                return f"{name} other than {default!r}"
        return None

    # ---- export + cache -----------------------------------------------------------------------------------------
    def _cache_paths(self, shape: tuple[int, ...]) -> tuple[Path, bool]:
        tag = "x".join(str(s) for s in shape)
        if self.ckpt_path is not None and self.ckpt_path.is_file():
            folder = self.cache_dir or self.ckpt_path.parent
            return Path(folder) / f"{self.ckpt_path.name}.{tag}.onnx", True
        if self._tmpdir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="medseg_runtime_")
        return Path(self._tmpdir.name) / f"network.{tag}.onnx", False

    def _key(self, shape: tuple[int, ...]) -> dict[str, Any]:
        ckpt = self.ckpt_path
        return {
            "format": CACHE_FORMAT,
            "network": f"{type(self.network).__module__}.{type(self.network).__qualname__}",
            "input_shape": ["B", *shape],
            "checkpoint": str(ckpt.name) if ckpt is not None else None,
            "checkpoint_sha256": file_sha256(ckpt) if ckpt is not None and ckpt.is_file() else None,
            "weights_sha256": weights_sha256(self.network),
            "opset": self.opset,
            "torch": torch.__version__,
        }

    def _export(self, path: Path, shape: tuple[int, ...]) -> None:
        import onnx

        net = self.network
        was_training = net.training
        net.eval()
        example = torch.zeros((2, *shape), dtype=torch.float32)  # batch 2: torch.export specialises size-1 dims
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME],
                                  "dynamic_axes": {INPUT_NAME: [0], OUTPUT_NAME: [0]}, "dynamo": True,
                                  "external_data": False}
        if self.opset is not None:
            kwargs["opset_version"] = int(self.opset)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (example,), str(tmp), **kwargs)
            onnx.checker.check_model(str(tmp))
            os.replace(tmp, path)
        finally:
            net.train(was_training)
            if tmp.exists():
                tmp.unlink()

    def _build(self, shape: tuple[int, ...]):
        path, persistent = self._cache_paths(shape)
        sidecar = path.with_suffix(".json")
        key = self._key(shape)
        reused = False
        if path.is_file() and sidecar.is_file():
            try:
                reused = json.loads(sidecar.read_text()) == key
            except (OSError, ValueError):
                reused = False
        if not reused:
            logger.info("RuntimeNetwork: exporting %s for input %s to %s", type(self.network).__name__,
                        ["B", *shape], path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if sidecar.exists():
                sidecar.unlink()  # a crash between the two writes must not leave a stale key beside a new file
            self._export(path, shape)
            tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(key, indent=1))
            os.replace(tmp, sidecar)
        threads = int(self.num_threads or torch.get_num_threads())
        run = _openvino_session(path, threads) if self.runtime == "openvino" else _ort_session(path, threads)
        self._sessions[shape] = run
        self.last_export = {"path": path, "reused": reused, "persistent": persistent, "key": key}
        logger.info("RuntimeNetwork: %s runs %s for input %s (%s export %s)", self.runtime, type(self.network).__name__,
                    ["B", *shape], "cached" if reused else "new", path)
        return run


def _openvino_session(path: Path, threads: int):
    import numpy as np
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(path)),
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"},
    )
    request = compiled.create_infer_request()

    def run(x):
        out = request.infer({0: x})[compiled.output(0)]
        return np.array(out, copy=True)  # the request reuses its output buffer

    return run


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x):
        return sess.run(None, {name: x})[0]

    return run
