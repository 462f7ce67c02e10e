"""medseg_nets.nets.slicewise: a 2D network run slice by slice on a volume (move the slice axis into the batch, pad
to a multiple, chunk, crop, move back)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg_nets.nets.slicewise import padding_to_multiple, slices_to_volume, slicewise, volume_to_slices

torch.set_num_threads(2)


def test_padding_is_centred_to_the_next_multiple():
    assert padding_to_multiple(64, 96, 32) == [0, 0, 0, 0]
    assert padding_to_multiple(40, 50, 32) == [7, 7, 12, 12]  # [left, right, top, bottom] in F.pad order
    assert padding_to_multiple(143, 164, 32) == [14, 14, 8, 9]  # the odd remainder after (as MONAI's sliding window)
    assert padding_to_multiple(5, 7, 1) == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        padding_to_multiple(5, 7, 0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_volume_to_slices_and_back(axis):
    x = torch.arange(2 * 3 * 5 * 6 * 7, dtype=torch.float32).reshape(2, 3, 5, 6, 7)
    slices, pad = volume_to_slices(x, axis, divisor=4)
    n = x.shape[axis + 2]
    plane = [s for i, s in enumerate(x.shape[2:]) if i != axis]
    padded = [-(-s // 4) * 4 for s in plane]
    assert list(slices.shape) == [2 * n, 3, *padded]
    # slice k of batch item b is x's slice k along the axis, zero-padded centred
    for b, k in ((0, 0), (1, n - 1), (1, 2)):
        expected = F.pad(x[b].select(axis + 1, k), pad)
        assert torch.equal(slices[b * n + k], expected)
    assert torch.equal(slices_to_volume(slices, 2, axis, pad), x)


@pytest.mark.parametrize("slice_batch, chunks", [(0, [10]), (1, [1] * 10), (3, [3, 3, 3, 1]), (100, [10])])
def test_slicewise_equals_the_2d_network_on_each_padded_slice(slice_batch, chunks):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 3, padding=1).eval()  # sees the zero padding at the border, like any 2D network
    x = torch.randn(2, 3, 10, 13, 5)
    calls = []

    def net(t):
        calls.append(t.shape[0])
        return conv(t)

    with torch.no_grad():
        y = slicewise(net, x, slice_axis=2, slice_batch=slice_batch, divisor=8)
        pad = padding_to_multiple(10, 13, 8)
        for b in range(2):
            for z in range(5):
                ref = conv(F.pad(x[b : b + 1, :, :, :, z], pad))[0, :, pad[2] : pad[2] + 10, pad[0] : pad[0] + 13]
                torch.testing.assert_close(y[b, :, :, :, z], ref, rtol=1e-6, atol=1e-6)
    assert y.shape == (2, 2, 10, 13, 5)
    assert calls == chunks  # 2 x 5 slices, slice_batch at a time


def test_slicewise_keeps_a_list_of_outputs():
    x = torch.randn(1, 2, 6, 6, 3)
    outs = slicewise(lambda t: [t * 2, t[:, :1] + 1], x, slice_axis=0, slice_batch=2, divisor=4)
    assert isinstance(outs, list) and len(outs) == 2
    torch.testing.assert_close(outs[0], x * 2)
    torch.testing.assert_close(outs[1], x[:, :1] + 1)


def test_bad_inputs():
    with pytest.raises(ValueError, match="volume"):
        volume_to_slices(torch.zeros(1, 2, 8, 8), 2)
    with pytest.raises(ValueError, match="slice_axis"):
        volume_to_slices(torch.zeros(1, 2, 8, 8, 8), 3)


def test_scripted_functions_match_eager():
    scripted_to = torch.jit.script(volume_to_slices)
    scripted_back = torch.jit.script(slices_to_volume)
    x = torch.randn(1, 2, 9, 4, 11)
    s1, p1 = volume_to_slices(x, 1, 8)
    s2, p2 = scripted_to(x, 1, 8)
    assert torch.equal(s1, s2) and p1 == p2
    assert torch.equal(scripted_back(s2, 1, 1, p2), x)
