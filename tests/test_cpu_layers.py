"""Tests of the CPU forwards of medseg_nets.blocks.cpu (PointwiseConv3d, InstanceNorm3d) and of GLIMS's fused DACB
branches: the numbers, parameters and keys of the PyTorch layers they replace, gradients included, and the whole
networks within 1e-4 of their output range of the plain PyTorch path (issue 16: "outputs unchanged")."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg_nets.blocks.cpu import InstanceNorm3d, PointwiseConv3d, pointwise_conv3d
from medseg_nets.blocks.depthwise import set_cpu_fast_path
from medseg_nets.blocks.glims import DACB
from medseg_nets.nets.dalight3d import DALight3D
from medseg_nets.nets.glims import GLIMS

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 rounding of another summation order


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.max() - b.min()))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_pointwise_matches_conv3d(bias, batch):
    torch.manual_seed(0)
    conv = PointwiseConv3d(5, 7, bias=bias)
    x = torch.randn(batch, 5, 6, 7, 3)
    ref = F.conv3d(x, conv.weight, conv.bias)
    torch.testing.assert_close(conv(x), ref, **TOL)
    torch.testing.assert_close(pointwise_conv3d(x, conv.weight, conv.bias), ref, **TOL)
    assert conv(x).is_contiguous()
    # a channels-last or otherwise non-contiguous input takes nn.Conv3d's forward
    xl = x.contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(conv(xl), ref, **TOL)
    torch.testing.assert_close(conv(x.transpose(2, 4)), F.conv3d(x.transpose(2, 4), conv.weight, conv.bias), **TOL)


def test_pointwise_gradients_and_keys():
    torch.manual_seed(0)
    fast = PointwiseConv3d(4, 6)
    plain = nn.Conv3d(4, 6, 1)
    assert list(fast.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 4, 5, 5, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 6, 5, 5, 5)
    (fast(x) * g).sum().backward()
    (plain(x2) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, **TOL)
    torch.testing.assert_close(fast.bias.grad, plain.bias.grad, **TOL)


@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_matches_pytorch(affine):
    torch.manual_seed(0)
    norm = InstanceNorm3d(5, affine=affine)
    plain = nn.InstanceNorm3d(5, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    assert list(norm.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(norm.state_dict())
    # an offset ten times the spread: a statistics kernel that lost precision would show here
    x = torch.randn(2, 5, 9, 8, 7) + 10.0
    for module in (norm, plain):
        module.train()
    torch.testing.assert_close(norm(x), plain(x), **TOL)
    torch.testing.assert_close(norm.eval()(x), plain.eval()(x), **TOL)
    xl = x.contiguous(memory_format=torch.channels_last_3d)  # channels-last: PyTorch's instance norm
    torch.testing.assert_close(norm(xl), plain(x), **TOL)
    with pytest.raises(ValueError, match="5D"):
        norm(x[0])


def test_instance_norm_precision_at_full_size():
    """At a GLIMS full-resolution map (48 x 96^3) the fast forward is as close to float64 as PyTorch's."""
    torch.manual_seed(0)
    x = torch.randn(1, 48, 96, 96, 96) * 2.0 + 10.0
    ref = F.instance_norm(x.double())
    with torch.no_grad():
        assert _rel(InstanceNorm3d(48)(x).double(), ref) < 1e-6
        assert _rel(F.instance_norm(x).double(), ref) < 1e-6


def test_dacb_fused_branches_match_plain_forward_and_backward():
    torch.manual_seed(0)
    block = DACB(6)
    for m in block.modules():  # non-trivial affine parameters for the fused GroupNorm / PReLU
        if isinstance(m, (nn.GroupNorm, nn.PReLU)):
            with torch.no_grad():
                for p in m.parameters():
                    p.uniform_(0.2, 1.5)
    x = torch.randn(2, 6, 10, 9, 8, requires_grad=True)
    g = torch.randn(2, 6, 10, 9, 8)
    grads = {}
    for fast in (True, False):
        set_cpu_fast_path(block, fast)
        block.zero_grad()
        xi = x.detach().clone().requires_grad_(True)
        y = block(xi)
        (y * g).sum().backward()
        grads[fast] = (y.detach(), xi.grad, [p.grad.clone() for p in block.parameters() if p.requires_grad])
    torch.testing.assert_close(grads[True][0], grads[False][0], **TOL)
    torch.testing.assert_close(grads[True][1], grads[False][1], rtol=1e-4, atol=1e-4)
    for a, b in zip(grads[True][2], grads[False][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_set_cpu_fast_path_reaches_every_fast_layer():
    block = DACB(4)
    # 3 depth-wise convolutions, 2 point-wise convolutions, 3 instance norms, the block's fused path
    assert set_cpu_fast_path(block, False) == 9
    assert not any(getattr(m, "cpu_fast_path", False) for m in block.modules())
    assert set_cpu_fast_path(block, True) == 9


@pytest.mark.parametrize(
    "make,x",
    [
        (lambda: GLIMS(4, 3, feature_size=6, img_size=64), torch.randn(2, 4, 64, 64, 64)),
        (lambda: GLIMS.authors_release(4, 3, feature_size=6, img_size=64), torch.randn(1, 4, 64, 64, 32)),
        (
            lambda: DALight3D(4, 4, base_channels=8, bottleneck_channels=64, ssfb_rank=4, num_identifiers=2),
            torch.randn(2, 4, 32, 32, 16),
        ),
    ],
    ids=["glims", "glims-authors", "dalight3d"],
)
def test_networks_match_the_plain_pytorch_path(make, x):
    """The networks with every CPU fast path on give their plain PyTorch outputs (nn.Conv3d, nn.InstanceNorm3d,
    unfused DACB) within 1e-4 of the output range: issue 16's bound for a change of kernel or layout."""
    torch.manual_seed(0)
    net = make().eval()
    with torch.no_grad():
        fast = net(x)
        assert set_cpu_fast_path(net, False) > 0
        plain = net(x)
        set_cpu_fast_path(net, True)
    assert fast.shape == plain.shape
    assert _rel(fast, plain) < 1e-4


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_patch_convolutions_match_pytorch(k, bias):
    """Kernel == stride convolutions as one matrix product (space-to-depth / depth-to-space): the numbers, keys and
    gradients of nn.Conv3d / nn.ConvTranspose3d; sizes not divisible by k take nn.Conv3d's forward."""
    from medseg_nets.blocks.cpu import PatchConv3d, PatchConvTranspose3d

    torch.manual_seed(k)
    down = PatchConv3d(3, 5, k, bias=bias)
    up = PatchConvTranspose3d(5, 3, k, bias=bias)
    assert down.state_dict().keys() == nn.Conv3d(3, 5, k, stride=k, bias=bias).state_dict().keys()
    assert up.state_dict().keys() == nn.ConvTranspose3d(5, 3, k, stride=k, bias=bias).state_dict().keys()
    x = torch.randn(2, 3, 2 * k, 3 * k, k, requires_grad=True)
    y = down(x)
    ref = F.conv3d(x, down.weight, down.bias, stride=k)
    torch.testing.assert_close(y, ref, **TOL)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref, **TOL)
    u = torch.randn(2, 5, 3, 2, 4)
    torch.testing.assert_close(up(u), F.conv_transpose3d(u, up.weight, up.bias, stride=k), **TOL)
    if bias:
        torch.testing.assert_close(down(x, skip_bias=True), ref - down.bias.view(1, 5, 1, 1, 1), **TOL)
    odd = torch.randn(1, 3, 2 * k + 1, k, k)
    torch.testing.assert_close(down(odd), F.conv3d(odd, down.weight, down.bias, stride=k), **TOL)
    scripted = torch.jit.script(down)
    torch.testing.assert_close(scripted(x.detach()), ref.detach(), **TOL)


def test_conv_norm_prelu_parts_equal_the_concatenation():
    from medseg_nets import native
    from medseg_nets.blocks.cpu import ConvNormPReLU

    torch.manual_seed(0)
    block = ConvNormPReLU(PointwiseConv3d(7, 4), InstanceNorm3d(4), nn.PReLU()).eval()
    a, b = torch.randn(2, 3, 5, 6, 7), torch.randn(2, 4, 5, 6, 7)
    with torch.no_grad():
        ref = block[2](block[1](block[0](torch.cat([a, b], 1))))
        torch.testing.assert_close(block.forward_parts([a, b]), ref, **TOL)
        previous = native.set_enabled(False)
        try:
            torch.testing.assert_close(block.forward_parts([a, b]), ref, **TOL)
        finally:
            native.set_enabled(previous)
