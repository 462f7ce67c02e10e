"""Tests of medseg_nets.native (fused C kernels, built with the machine's C compiler on first use) and of the layers
that use them: each kernel against the PyTorch operations it replaces (float32 rounding of another summation order),
the layers' fused paths against their PyTorch paths, when the fused path is taken and when not (autograd,
TorchScript, FLOP counting, kernels off), and the build's cache and its fallbacks.

CI machines have gcc: the kernels must build there (``MEDSEG_NETS_NATIVE=0`` in the environment skips this module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from medseg_nets import native
from medseg_nets.blocks.cpu import ConvNormPReLU, InstanceNorm3d, PointwiseConv3d
from medseg_nets.blocks.depthwise import DepthwiseConv3d, set_cpu_fast_path
from medseg_nets.blocks.glims import DACB
from medseg_nets.nets.glims import GLIMS

pytestmark = pytest.mark.skipif(
    os.environ.get("MEDSEG_NETS_NATIVE", "1") == "0", reason="native kernels turned off (MEDSEG_NETS_NATIVE=0)"
)

REPO = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.max() - b.min()))


class _NativeOff:
    """The layers' PyTorch paths for the duration of a ``with``."""

    def __enter__(self) -> None:
        self.previous = native.set_enabled(False)

    def __exit__(self, *exc: object) -> None:
        native.set_enabled(self.previous)


def test_kernels_build_here():
    assert native.status() == "on", native.status()
    assert native.available()


@pytest.mark.parametrize("k,dil", [(3, 1), (3, 2), (3, 3), (5, 1), (3, 4), (1, 1)])
@pytest.mark.parametrize("shape", [(2, 3, 9, 7, 20), (1, 2, 5, 6, 33), (1, 1, 4, 4, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_depthwise_matches_conv3d(k, dil, shape, threads):
    torch.manual_seed(k * 10 + dil)
    c = shape[1]
    x = torch.randn(shape)
    w = torch.randn(c, 1, k, k, k)
    b = torch.randn(c)
    ref = F.conv3d(x, w, b, padding=dil * (k // 2), dilation=dil, groups=c)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = native.depthwise3d(x, w, b, dil)
        y0 = native.depthwise3d(x, w, None, dil)
        # the statistics the kernel gathers as it writes the output, through the norm they feed
        normed = native.depthwise3d_branches(x, [w], [b], [dil], norm_weights=[None])
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y0, ref - b.view(1, c, 1, 1, 1), rtol=1e-5, atol=1e-5)
    expected = F.group_norm(ref.double(), c, eps=1e-5).float()
    torch.testing.assert_close(normed, expected, rtol=1e-4, atol=1e-4)


def test_depthwise_branches_read_the_input_once_and_match_each_convolution():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 7, 9, 21)
    ws = [torch.randn(3, 1, 3, 3, 3) for _ in range(3)]
    bs = [torch.randn(3), None, torch.randn(3)]
    z = native.depthwise3d_branches(x, ws, bs, [1, 2, 4])
    ref = torch.cat([F.conv3d(x, w, b, padding=d, dilation=d, groups=3) for w, b, d in zip(ws, bs, [1, 2, 4])], 1)
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="branches"):
        native.depthwise3d_branches(x, ws, bs[:2], [1, 2, 3])
    # with each branch's GroupNorm(C, C) + PReLU applied in the kernel
    gws = [torch.rand(3) + 0.5, None, torch.rand(3) + 0.5]
    gbs = [torch.randn(3), torch.randn(3), None]
    acts = [torch.rand(1), torch.rand(3), None]
    y = native.depthwise3d_branches(x, ws, bs, [1, 2, 4], norm_weights=gws, norm_biases=gbs, prelu_weights=acts,
                                    eps=1e-3)
    parts = []
    for i, (gw, gb, a) in enumerate(zip(gws, gbs, acts)):
        part = F.group_norm(ref[:, 3 * i : 3 * i + 3], 3, gw, gb, 1e-3)
        parts.append(part if a is None else F.prelu(part, a))
    torch.testing.assert_close(y, torch.cat(parts, 1), rtol=1e-5, atol=1e-5)


def test_statistics_without_cancellation():
    """A channel far from zero (mean 1000, std 1e-2): shifted sums keep its variance, as group norm's does."""
    torch.manual_seed(0)
    x = 1000.0 + 0.01 * torch.randn(1, 2, 8, 8, 40)
    ref = F.group_norm(x.double(), 2, eps=1e-8).float()
    y = native.norm_act(x, eps=1e-8)
    assert _rel(y, ref) < 1e-3
    # the depth-wise kernel's own statistics: an identity convolution (centre tap 1) plus a bias, then its norm
    identity = torch.zeros(2, 1, 3, 3, 3)
    identity[:, 0, 1, 1, 1] = 1.0
    bias = torch.tensor([5.0, -7.0])
    y = native.depthwise3d_branches(x, [identity], [bias], [1], norm_weights=[None], eps=1e-8)
    ref = F.group_norm((x + bias.view(1, 2, 1, 1, 1)).double(), 2, eps=1e-8).float()
    assert _rel(y, ref) < 1e-3


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("slopes", [0, 1, 4])
def test_norm_act_matches_group_norm_prelu(residual, affine, slopes):
    torch.manual_seed(slopes + 2 * affine + 4 * residual)
    x = 3.0 * torch.randn(2, 4, 5, 6, 7) + 2.0
    r = torch.randn_like(x) if residual else None
    w = torch.randn(4) if affine else None
    b = torch.randn(4) if affine else None
    a = torch.rand(slopes) if slopes else None
    ref = F.group_norm(x + r if residual else x, 4, w, b, 1e-5)
    if a is not None:
        ref = F.prelu(ref, a)
    torch.testing.assert_close(native.norm_act(x, residual=r, weight=w, bias=b, prelu_weight=a), ref, rtol=1e-5,
                               atol=1e-5)
    inplace = x.clone()
    out = native.norm_act(inplace, out=inplace, residual=r, weight=w, bias=b, prelu_weight=a)
    assert out.data_ptr() == inplace.data_ptr()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_argument_checks():
    x = torch.randn(1, 2, 4, 4, 4)
    with pytest.raises(ValueError, match="contiguous"):
        native.depthwise3d(x.transpose(2, 4), torch.randn(2, 1, 3, 3, 3), None)
    with pytest.raises(ValueError, match="weight"):
        native.depthwise3d(x, torch.randn(2, 1, 2, 2, 2), None)
    with pytest.raises(ValueError, match="float32"):
        native.depthwise3d(x.double(), torch.randn(2, 1, 3, 3, 3).double(), None)
    with pytest.raises(ValueError, match="prelu_weight"):
        native.norm_act(x, prelu_weight=torch.ones(3))
    with pytest.raises(ValueError, match="residual"):
        native.norm_act(x, residual=torch.zeros(1, 2, 4, 4))


def test_depthwise_layer_takes_kernel_in_inference_only():
    torch.manual_seed(0)
    conv = DepthwiseConv3d(3, 3, 2)
    x = torch.randn(1, 3, 6, 8, 10)  # multiples of the dilation: the channels-last path counts no padded FLOPs
    ref = F.conv3d(x, conv.weight, conv.bias, padding=2, dilation=2, groups=3)
    calls = []
    original = native.depthwise3d

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    native.depthwise3d = spy
    try:
        y = conv(x)  # autograd on: the PyTorch path, gradients flow
        assert y.requires_grad and not calls
        with torch.no_grad():
            torch.testing.assert_close(conv(x), ref.detach(), rtol=1e-5, atol=1e-5)
            assert len(calls) == 1
            with FlopCounterMode(display=False) as counter:  # counters see the PyTorch convolution
                conv(x)
            with FlopCounterMode(display=False) as reference:
                F.conv3d(x, conv.weight, conv.bias, padding=2, dilation=2, groups=3)
            assert len(calls) == 1 and counter.get_total_flops() == reference.get_total_flops() > 0
            with _NativeOff():
                conv(x)
            conv.cpu_fast_path = False
            conv(x)
            assert len(calls) == 1
    finally:
        native.depthwise3d = original


def test_conv_norm_prelu_fused_path_and_keys():
    torch.manual_seed(0)
    block = ConvNormPReLU(PointwiseConv3d(6, 5), InstanceNorm3d(5), nn.PReLU()).eval()
    plain = nn.Sequential(nn.Conv3d(6, 5, 1), nn.InstanceNorm3d(5), nn.PReLU())
    assert block.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(block.state_dict())
    x = torch.randn(2, 6, 5, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(block(x), plain(x), rtol=1e-5, atol=1e-5)
        # a strided convolution (not point-wise) keeps its bias; GroupNorm(C, C) with affine is per channel too
        strided = ConvNormPReLU(nn.Conv3d(6, 4, 2, stride=2), nn.GroupNorm(4, 4), nn.PReLU(4)).eval()
        nn.init.normal_(strided[1].weight)
        nn.init.normal_(strided[1].bias)
        ref = strided[2](strided[1](strided[0](x)))
        torch.testing.assert_close(strided(x), ref, rtol=1e-5, atol=1e-5)
    scripted = torch.jit.script(block)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), plain(x), rtol=1e-5, atol=1e-5)


def test_dacb_native_matches_pytorch_path():
    torch.manual_seed(0)
    block = DACB(4, 8).eval()
    for m in block.modules():  # non-trivial affine parameters and slopes
        if isinstance(m, (nn.GroupNorm, nn.PReLU)):
            for p in m.parameters():
                nn.init.uniform_(p, 0.1, 1.5)
    x = torch.randn(2, 4, 10, 9, 11)
    with torch.no_grad():
        y = block(x)
        with _NativeOff():
            ref = block(x)
        set_cpu_fast_path(block, False)
        plain = block(x)
    assert _rel(y, ref) < 1e-5 and _rel(y, plain) < 1e-5
    assert not torch.equal(y, ref)  # the fused kernels did run (another summation order)


def test_csab_spatial_convolution_as_depthwise_kernel():
    """CSAB's 2 -> 1 channel 7^3 spatial convolution as the sum of two depth-wise convolutions (the native kernel)."""
    from medseg_nets.blocks.glims import CSAB

    torch.manual_seed(0)
    att = CSAB(6).eval()
    x = torch.randn(2, 6, 9, 10, 11)
    with torch.no_grad():
        pooled = torch.cat([torch.amax(x, dim=1, keepdim=True), torch.mean(x, dim=1, keepdim=True)], dim=1)
        torch.testing.assert_close(att._spatial_native(pooled), att.spatial(pooled), rtol=1e-5, atol=1e-5)
        y = att(x)
        with _NativeOff():
            assert att._spatial_native(pooled) is None
            ref = att(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_glims_native_within_tolerance_of_pytorch_path():
    """Issue 16: the whole network within 1e-4 of the output range of the PyTorch path (float64 for scale)."""
    torch.manual_seed(0)
    net = GLIMS(in_channels=4, out_channels=3, feature_size=6).eval()
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        y = net(x)
        with _NativeOff():
            ref = net(x)
        exact = net.double()(x.double()).float()
    assert _rel(y, ref) < 1e-4
    assert _rel(y, exact) < 1e-4


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=600)


def test_build_cache_and_fallbacks(tmp_path):
    """The library is built once into $MEDSEG_NETS_CACHE and reused; without a compiler, or with
    MEDSEG_NETS_NATIVE=0, the layers run their PyTorch path and say why once."""
    code = (
        "import logging, torch; logging.basicConfig(level=logging.WARNING)\n"
        "from medseg_nets import native\n"
        "from medseg_nets.blocks.glims import DACB\n"
        "print(native.status())\n"
        "b = DACB(2, 4).eval()\n"
        "with torch.no_grad(): y = b(torch.randn(1, 2, 5, 5, 5))\n"
        "print(tuple(y.shape))\n"
    )
    cache = tmp_path / "cache"
    first = _run(code, {"MEDSEG_NETS_CACHE": str(cache)})
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["on", "(1, 2, 5, 5, 5)"]
    built = sorted((cache / "native").glob("kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    second = _run(code, {"MEDSEG_NETS_CACHE": str(cache)})
    assert second.returncode == 0 and second.stdout.splitlines()[0] == "on"
    assert sorted((cache / "native").glob("kernels-*.so")) == built and built[0].stat().st_mtime_ns == stamp
    no_cc = _run(code, {"MEDSEG_NETS_CACHE": str(tmp_path / "other"), "CC": str(tmp_path / "no-such-cc")})
    assert no_cc.returncode == 0, no_cc.stderr
    assert no_cc.stdout.splitlines()[0].startswith("unavailable")
    assert no_cc.stdout.splitlines()[1] == "(1, 2, 5, 5, 5)"
    assert no_cc.stderr.count("native CPU kernels unavailable") == 1
    off = _run(code, {"MEDSEG_NETS_NATIVE": "0", "MEDSEG_NETS_CACHE": str(tmp_path / "off")})
    assert off.returncode == 0 and off.stdout.splitlines()[0] == "off (MEDSEG_NETS_NATIVE=0)"
    assert not (tmp_path / "off").exists()
