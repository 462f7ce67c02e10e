"""Tests of EAM-Net (Wang et al., BIBM 2025, arXiv 2512.07275) and its blocks."""

from __future__ import annotations

import pytest
import torch

from conftest import torch_threads
from monai.losses import DeepSupervisionLoss, DiceCELoss

from medseg_nets.blocks.eamnet import CMAM, MRCF, ExternalAttention, ExternalAttentionBridge, TopKChannelSelect
from medseg_nets.nets.eamnet import EAMNet

NARROW = (8, 16, 32, 64, 64)  # behaviour tests: same topology as the default, a fraction of the width
FULL_PARAMS = 4_538_506  # EAMNet(in_channels=3, out_channels=1) with the default widths (24, 48, 96, 192, 384)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with torch_threads(1):
        yield


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_full_size_parameter_count_and_forward():
    torch.manual_seed(0)
    net = EAMNet(in_channels=3, out_channels=1)
    n = _count(net)
    assert n == FULL_PARAMS
    assert abs(n - 4.6e6) / 4.6e6 < 0.02  # paper: 4.6M
    with torch.no_grad():
        y = net.eval()(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 1, 64, 64)
    assert torch.isfinite(y).all()


def test_external_attention_double_normalisation():
    torch.manual_seed(0)
    ea = ExternalAttention(16, memory_size=8).eval()
    x = torch.randn(2, 16, 8, 6)
    attn = ea.attention(x)
    assert attn.shape == (2, 8, 48)
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(dim=1), torch.ones(2, 48))  # L1 over the memory slots
    # the formula: softmax over the positions, then L1 over the slots
    logits = ea.memory_key(torch.flatten(ea.proj_in(x), 2))
    soft = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(soft.sum(dim=-1), torch.ones(2, 8))
    torch.testing.assert_close(attn, soft / soft.sum(dim=1, keepdim=True))
    assert ea(x).shape == x.shape


@pytest.mark.parametrize("ratio,k", [(0.5, 5), (0.25, 2), (1.0, 10), (0.01, 1)])
def test_topk_keeps_largest_l1_channels(ratio, k):
    torch.manual_seed(0)
    sel = TopKChannelSelect(10, ratio).eval()
    assert sel.k == k
    x = torch.randn(3, 10, 5, 5)
    y = sel(x)
    l1 = x.abs().sum(dim=(2, 3))
    for b in range(3):
        kept = (y[b].abs().sum(dim=(1, 2)) > 0).nonzero().flatten()
        assert kept.numel() == k
        assert set(kept.tolist()) == set(torch.topk(l1[b], k).indices.tolist())
        torch.testing.assert_close(y[b, kept], x[b, kept])  # kept channels unchanged
        dropped = [c for c in range(10) if c not in kept.tolist()]
        assert (y[b, dropped] == 0).all()  # the others exactly zero


def test_topk_straight_through_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    ste = TopKChannelSelect(8, 0.5, straight_through=True).train()
    y = ste(x)
    torch.testing.assert_close(y, ste.eval()(x))  # same values as the hard mask
    assert (y.abs().sum(dim=(2, 3)) > 0).sum(dim=1).tolist() == [4, 4]
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.ones_like(x))  # the mask is the identity in backward
    hard = TopKChannelSelect(8, 0.5, straight_through=False).train()
    (g,) = torch.autograd.grad(hard(x).sum(), x)
    torch.testing.assert_close(g, hard.mask(x).expand_as(x))


def test_bridge_keeps_skip_and_shape():
    torch.manual_seed(0)
    eab = ExternalAttentionBridge(12, memory_size=8, topk_ratio=0.5).eval()
    x = torch.randn(2, 12, 8, 8)
    y = eab(x)
    assert y.shape == x.shape and (y >= 0).all()
    # top-k on the memory read-out: output = ReLU(skip + read-out with 6 channels kept)
    torch.testing.assert_close(y, torch.relu(x + eab.select(eab.attention(x))))


def test_mrcf_shape_and_kept_group():
    torch.manual_seed(0)
    m = MRCF(16).eval()
    assert [b[0].dilation for b in m.branches] == [(3, 3), (5, 5), (7, 7)]
    assert all(b[0].groups == 4 for b in m.branches)  # depth-wise (cheap ghost op) on each 4-channel group
    x = torch.randn(2, 16, 12, 12)
    assert m(x).shape == x.shape
    mixed = m.mix(x)
    assert mixed.shape == x.shape
    torch.testing.assert_close(mixed[:, :4], x[:, :4])  # the kept group enters the concat unchanged
    assert not torch.allclose(mixed[:, 4:], x[:, 4:])
    with pytest.raises(ValueError):
        MRCF(18)


def test_cmam_both_directions_contribute(monkeypatch):
    torch.manual_seed(0)
    cmam = CMAM(16, pool_size=4).eval()
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    y = cmam(x)
    assert y.shape == x.shape
    # each cross direction reads keys/values from the other view
    y.sum().backward()
    assert cmam.kv_c.weight.grad.abs().sum() > 0  # spatial direction: K, V from the channel view
    assert cmam.kv_s.weight.grad.abs().sum() > 0  # channel direction: K, V from the spatial view
    assert cmam.q_s.weight.grad.abs().sum() > 0 and cmam.q_c.weight.grad.abs().sum() > 0
    with torch.no_grad():
        full = cmam(x)
        for path in ("spatial_path", "channel_path"):
            with monkeypatch.context() as mp:
                mp.setattr(cmam, path, lambda xs, xc: torch.zeros_like(xs))
                assert not torch.allclose(cmam(x), full, atol=1e-4), path


def test_train_and_eval_outputs():
    torch.manual_seed(0)
    net = EAMNet(in_channels=3, out_channels=1, features=NARROW)
    x = torch.randn(2, 3, 64, 64)
    net.train()
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 2 * len(NARROW) + 1
    assert all(o.shape == (2, 1, 64, 64) for o in outs)
    target = (torch.rand(2, 1, 64, 64) > 0.5).float()
    loss_fn = DeepSupervisionLoss(DiceCELoss(sigmoid=True), weight_mode="same")  # soft Dice + BCE, as the paper
    loss_fn(outs, target).backward()
    assert all(p.grad is not None for p in net.parameters())  # every head is used in training
    net.eval()
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 1, 64, 64)
    assert torch.isfinite(loss_fn(y, target))  # validation: the same loss takes the single tensor
    plain = EAMNet(in_channels=1, out_channels=3, features=NARROW, deep_supervision=False).train()
    y = plain(torch.randn(2, 1, 32, 48))
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 32, 48)


def test_bad_size_raises():
    net = EAMNet(features=NARROW).eval()
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 3, 64, 72))
    with pytest.raises(ValueError, match="divisible by 4"):
        EAMNet(features=(8, 16, 32)).eval()(torch.randn(1, 3, 42, 64))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_matches_eager():
    torch.manual_seed(0)
    net = EAMNet(features=NARROW)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net.train()(x)  # move the BN running statistics off their initial values
    net.eval()
    scripted = torch.jit.script(net)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))
        net.train()
        scripted.train()
        eager_list, script_list = net(x), scripted(x)
    assert isinstance(script_list, list) and len(script_list) == len(eager_list)
    for a, b in zip(script_list, eager_list):
        torch.testing.assert_close(a, b)
