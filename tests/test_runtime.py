"""medseg_nets.runtime.RuntimeNetwork: OpenVINO / ONNX Runtime against eager PyTorch, the export cache (issue 16)."""

import logging

import pytest
import torch
import torch.nn as nn

from medseg_nets.runtime import RuntimeNetwork, available_runtimes
from medseg_nets.runtime import wrapper as rt_wrapper

RUNTIMES = [
    pytest.param(r, marks=pytest.mark.skipif(r not in available_runtimes(), reason=f"{r} not installed"))
    for r in ("openvino", "onnxruntime")
]


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(2, 8, 3, padding=1),
        nn.InstanceNorm3d(8, affine=True),
        nn.PReLU(),
        nn.Conv3d(8, 8, 3, padding=2, dilation=2, groups=8),
        nn.Conv3d(8, 3, 1),
    ).eval()


def within_tolerance(y: torch.Tensor, ref: torch.Tensor) -> bool:
    rng = float(ref.max() - ref.min())
    return float((y - ref).abs().max()) <= 1e-4 * rng


def save_ckpt(net: nn.Module, path):
    torch.save(net.state_dict(), path)
    return path


def test_eager_is_the_network():
    net = tiny_net()
    wrapped = RuntimeNetwork(net, runtime="eager")
    x = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(wrapped(x), net(x))
    assert list(wrapped.state_dict()) == list(net.state_dict())


def test_unknown_runtime():
    with pytest.raises(ValueError, match="unknown runtime"):
        RuntimeNetwork(tiny_net(), runtime="tensorrt-please")


def test_missing_package_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(rt_wrapper, "_missing_packages", lambda runtime: ["openvino"])
    net = tiny_net()
    with caplog.at_level(logging.WARNING):
        wrapped = RuntimeNetwork(net, runtime="openvino")
    assert wrapped.active_runtime == "eager"
    assert "openvino not installed" in caplog.text
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(wrapped(x), net(x))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_matches_eager_any_batch_and_caches(runtime, tmp_path):
    net = tiny_net()
    ckpt = save_ckpt(net, tmp_path / "model.pt")
    wrapped = RuntimeNetwork(net, runtime=runtime, ckpt_path=ckpt).eval()
    for b in (1, 3, 2):  # sliding-window batches of varying size, batch 1 first
        x = torch.randn(b, 2, 12, 12, 12)
        with torch.no_grad():
            y, ref = wrapped(x), net(x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert within_tolerance(y, ref), float((y - ref).abs().max())
    assert wrapped.active_runtime == runtime
    cached = tmp_path / "model.pt.2x12x12x12.onnx"
    assert cached.is_file() and cached.with_suffix(".json").is_file()
    assert wrapped.last_export["reused"] is False

    # a new process with the same checkpoint: the cached export is reused
    again = RuntimeNetwork(tiny_net(), runtime=runtime, ckpt_path=ckpt).eval()
    again.load_state_dict(torch.load(ckpt, weights_only=True))
    mtime = cached.stat().st_mtime_ns
    x = torch.randn(2, 2, 12, 12, 12)
    with torch.no_grad():
        assert within_tolerance(again(x), net(x))
    assert again.last_export["reused"] is True and cached.stat().st_mtime_ns == mtime

    # the checkpoint changes: the export is rebuilt with the new weights
    net2 = tiny_net(seed=1)
    save_ckpt(net2, ckpt)
    third = RuntimeNetwork(tiny_net(), runtime=runtime, ckpt_path=ckpt).eval()
    third.load_state_dict(torch.load(ckpt, weights_only=True))
    with torch.no_grad():
        y, ref = third(x), net2(x)
    assert third.last_export["reused"] is False
    assert within_tolerance(y, ref)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_weights_loaded_after_wrapping_are_used(runtime, tmp_path):
    """The bundle's CheckpointLoader loads into the network after the wrapper is built (no checkpoint file: temp)."""
    net = tiny_net()
    wrapped = RuntimeNetwork(net, runtime=runtime, ckpt_path=tmp_path / "absent.pt").eval()
    net.load_state_dict(tiny_net(seed=3).state_dict())
    x = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad():
        assert within_tolerance(wrapped(x), net(x))
    assert wrapped.last_export["persistent"] is False
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_training_and_grad_run_eager(runtime):
    net = tiny_net()
    wrapped = RuntimeNetwork(net, runtime=runtime)
    x = torch.randn(1, 2, 8, 8, 8)
    wrapped.train()
    assert torch.equal(wrapped(x), net(x))
    wrapped.eval()
    y = wrapped(x)  # grad enabled, parameters require grad: eager, differentiable
    assert y.requires_grad
    assert wrapped._sessions == {}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_monai_sliding_window(runtime):
    from monai.inferers import SlidingWindowInferer

    net = tiny_net()
    wrapped = RuntimeNetwork(net, runtime=runtime).eval()
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=3, overlap=0.5, mode="gaussian")
    x = torch.randn(1, 2, 14, 13, 12)
    with torch.no_grad():
        y, ref = inferer(x, wrapped), inferer(x, net)
    assert within_tolerance(y, ref)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_verify_falls_back_beyond_tolerance(runtime, caplog):
    net = tiny_net()
    wrapped = RuntimeNetwork(net, runtime=runtime, rtol=0.0).eval()  # nothing passes a zero tolerance...
    x = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        y = wrapped(x)
        if wrapped.last_check["max_abs_diff"] == 0:
            pytest.skip("the runtime matched eager bit for bit")
        assert torch.equal(y, net(x))
        assert wrapped.active_runtime == "eager" and "differs from eager" in caplog.text
        assert torch.equal(wrapped(x), net(x))


class WithIdentifier(nn.Module):
    """A tiny network with a keyword argument whose -1 means the same as leaving it out (DALight-3D's identifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net()
        self.shift = nn.Parameter(torch.tensor([0.0, 5.0, -5.0]))

    def forward(self, x: torch.Tensor, identifier=None) -> torch.Tensor:
        y = self.net(x)
        if identifier is None:
            return y
        ident = identifier.expand(x.shape[0])
        table = self.shift[ident.clamp(min=0)].view(-1, 1, 1, 1, 1)
        return y + torch.where(ident.view(-1, 1, 1, 1, 1) >= 0, table, torch.zeros_like(table))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_default_kwargs_run_the_export_other_values_eager(runtime, caplog):
    net = WithIdentifier().eval()
    wrapped = RuntimeNetwork(net, runtime=runtime, default_kwargs={"identifier": -1}).eval()
    x = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad(), caplog.at_level(logging.INFO):
        y = wrapped(x, identifier=torch.tensor([-1]))  # first call: export, checked against eager
        assert wrapped.last_export is not None and wrapped.active_runtime == runtime
        assert within_tolerance(y, net(x))
        y = wrapped(x, identifier=torch.tensor([-1, -1]))  # the runtime's own output now
        assert within_tolerance(y, net(x)) and not torch.equal(y, net(x, identifier=torch.tensor([1])))
        assert torch.equal(wrapped(x, identifier=torch.tensor([1])), net(x, identifier=torch.tensor([1])))
        assert "identifier other than -1" in caplog.text
        with pytest.raises(TypeError):  # a keyword the network does not take reaches it, in eager PyTorch
            wrapped(x, scale=torch.tensor([1.0]))
        assert "keyword argument 'scale'" in caplog.text
    assert wrapped.active_runtime == runtime  # eager for those calls only


def test_bundle_config_lines(tmp_path):
    """The config lines proposed for a bundle's inference.json parse and wrap the network CheckpointLoader loads."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {
            "imports": ["$import medseg_nets"],
            "ckpt_path": str(tmp_path / "model.pt"),
            "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 2, "out_channels": 3, "kernel_size": 1},
            "network": "$@network_def.to('cpu')",
            "runtime": "eager",
            "runtime_network": {
                "_target_": "medseg_nets.runtime.RuntimeNetwork",
                "network": "@network",
                "runtime": "@runtime",
                "ckpt_path": "@ckpt_path",
            },
        }
    )
    wrapped = parser.get_parsed_content("runtime_network")
    assert isinstance(wrapped, RuntimeNetwork) and wrapped.network is parser.get_parsed_content("network")
    assert wrapped.active_runtime == "eager"
