"""Tests of medseg_nets.blocks.depthwise: the channels-last CPU path of depth-wise 3D convolutions gives the numbers
of nn.Conv3d (forward and gradients), keeps nn.Conv3d's parameters, and stays out of captured graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from medseg_nets.blocks.depthwise import (
    DepthwiseConv3d,
    depthwise_conv3d_ndhwc,
    from_ndhwc,
    set_cpu_fast_path,
    to_ndhwc,
)
from medseg_nets.blocks.glims import DACB

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 rounding: the path is bit-identical where measured, not promised


def _plain(conv: DepthwiseConv3d, x: torch.Tensor) -> torch.Tensor:
    return F.conv3d(x, conv.weight, conv.bias, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


def test_layout_round_trip():
    x = torch.randn(2, 3, 4, 5, 6)
    xl = to_ndhwc(x)
    assert xl.shape == (2, 4, 5, 6, 3) and xl.is_contiguous()
    y = from_ndhwc(xl)
    assert y.is_contiguous() and torch.equal(y, x)


@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("size", [(12, 12, 12), (7, 10, 11)])  # divisible by 2 and 3 / by neither
@pytest.mark.parametrize("kernel,bias,batch", [(3, True, 1), (3, False, 2), (5, True, 2)])
def test_matches_conv3d(dilation, size, kernel, bias, batch):
    torch.manual_seed(0)
    conv = DepthwiseConv3d(5, kernel, dilation, bias=bias)
    x = torch.randn(batch, 5, *size)
    with torch.no_grad():
        y = conv(x)
        ref = _plain(conv, x)
    assert y.shape == ref.shape == x.shape
    assert y.is_contiguous()
    torch.testing.assert_close(y, ref, **TOL)


def test_gradients_match_conv3d():
    torch.manual_seed(0)
    conv = DepthwiseConv3d(4, 3, 2)
    x = torch.randn(2, 4, 9, 8, 7, requires_grad=True)
    g = torch.randn(2, 4, 9, 8, 7)
    (conv(x) * g).sum().backward()
    fast = [x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()]
    x.grad = None
    conv.zero_grad()
    (_plain(conv, x) * g).sum().backward()
    for a, b in zip(fast, [x.grad, conv.weight.grad, conv.bias.grad]):
        torch.testing.assert_close(a, b, **TOL)


def test_channels_last_input_and_switch_off():
    torch.manual_seed(0)
    conv = DepthwiseConv3d(6, 3, 3)
    x = torch.randn(1, 6, 9, 9, 9)
    with torch.no_grad():
        ref = _plain(conv, x)
        torch.testing.assert_close(conv(x.contiguous(memory_format=torch.channels_last_3d)), ref, **TOL)
        torch.testing.assert_close(depthwise_conv3d_ndhwc(to_ndhwc(x), conv.weight, conv.bias, 3), ref, **TOL)
        torch.testing.assert_close(conv(x, to_ndhwc(x)), ref, **TOL)
        conv.cpu_fast_path = False
        assert torch.equal(conv(x), ref)


def test_same_parameters_as_conv3d():
    torch.manual_seed(3)
    ours = DepthwiseConv3d(8, 3, 2)
    torch.manual_seed(3)
    ref = nn.Conv3d(8, 8, 3, padding=2, dilation=2, groups=8)
    assert isinstance(ours, nn.Conv3d)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    with pytest.raises(ValueError, match="odd"):
        DepthwiseConv3d(8, 2)


def test_flops_are_those_of_the_convolution():
    conv = DepthwiseConv3d(4, 3, 2).eval()
    x = torch.randn(1, 4, 12, 12, 12)
    counts = []
    for fast in (True, False):
        conv.cpu_fast_path = fast
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            conv(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 4 * 27 * 12**3


def test_graph_capture_takes_the_plain_convolution():
    torch.manual_seed(0)
    block = DACB(4).eval()
    x = torch.randn(1, 4, 6, 6, 6)
    exported = torch.export.export(block, (x,))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("permute" in op or "pad" in op for op in ops), ops
    assert "permute" not in str(torch.jit.trace(block, (x,)).graph)
    scripted = torch.jit.script(block)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), block(x), **TOL)
        torch.testing.assert_close(exported.module()(x), block(x), **TOL)


def test_dacb_shared_channels_last_input_matches_plain():
    torch.manual_seed(0)
    block = DACB(6).eval()
    x = torch.randn(2, 6, 12, 10, 9)
    with torch.no_grad():
        fast = block(x)
        assert set_cpu_fast_path(block, False) == 9
        assert not any(branch[0].cpu_fast_path for branch in block.branches)
        plain = block(x)
    torch.testing.assert_close(fast, plain, **TOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_small_maps_and_other_dtypes(dtype):
    """Maps smaller than the dilation (all padding) and non-float32 tensors give the plain convolution's values."""
    torch.manual_seed(0)
    for size in [(1, 1, 1), (2, 3, 1)]:
        for dilation in (2, 3):
            conv = DepthwiseConv3d(3, 3, dilation).to(dtype)
            x = torch.randn(1, 3, *size, dtype=dtype)
            with torch.no_grad():
                torch.testing.assert_close(conv(x), _plain(conv, x))
