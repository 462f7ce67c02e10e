"""Tests of GLIMS (arXiv 2404.17854) and its blocks: counts, shapes, deep supervision, blocks, TorchScript, autocast."""

from __future__ import annotations

import pytest
import torch

from monai.losses import DeepSupervisionLoss, DiceLoss

from medseg_nets.blocks.glims import CSAB, DACB, SwinStage3D
from medseg_nets.nets.glims import GLIMS

# reference (authors' code, feature_size 24, 96^3): see docs/networks.md
REFERENCE_PARAMS = {(4, 3): 47_163_349, (1, 14): 47_167_281}
# this implementation (the gap is explained in the GLIMS docstring)
MEASURED_PARAMS = {(4, 3): 36_914_463, (1, 14): 36_918_395}


def _count(in_channels: int, out_channels: int) -> int:
    with torch.device("meta"):
        net = GLIMS(in_channels=in_channels, out_channels=out_channels, feature_size=24)
    return sum(p.numel() for p in net.parameters())


@pytest.fixture(scope="module")
def small_net() -> GLIMS:
    torch.manual_seed(0)
    return GLIMS(in_channels=4, out_channels=3, feature_size=12).eval()


@pytest.mark.parametrize("io", [(4, 3), (1, 14)])
def test_param_count(io):
    assert _count(*io) == MEASURED_PARAMS[io]


def test_in_out_channel_dependence_matches_reference():
    # stem (in -> F) and the four heads (F, 2F, 4F, 8F -> out) are the only in/out dependent parameters
    assert _count(1, 14) - _count(4, 3) == REFERENCE_PARAMS[(1, 14)] - REFERENCE_PARAMS[(4, 3)] == 3_932


@pytest.mark.xfail(strict=True, reason="10,248,886 parameters of the reference are not reproduced (see GLIMS docstring)")
@pytest.mark.parametrize("io", [(4, 3), (1, 14)])
def test_param_count_reference(io):
    assert _count(*io) == REFERENCE_PARAMS[io]


@pytest.mark.parametrize("size", [(32, 32, 32), (64, 32, 32)])
def test_forward_eval(small_net, size):
    with torch.no_grad():
        y = small_net(torch.randn(1, 4, *size))
    assert y.shape == (1, 3, *size)
    assert torch.isfinite(y).all()


def test_forward_train_deep_supervision():
    torch.manual_seed(0)
    net = GLIMS(in_channels=1, out_channels=2, feature_size=12).train()
    x = torch.randn(2, 1, 32, 32, 64)
    y = net(x)
    assert y.shape == (2, 4, 2, 32, 32, 64)  # main + heads at 2F, 4F, 8F, all at input size
    loss = DeepSupervisionLoss(DiceLoss(sigmoid=True))(list(torch.unbind(y, dim=1)), torch.ones(2, 2, 32, 32, 64))
    loss.backward()
    assert net.stem.weight.grad is not None and net.ds_heads[2].weight.grad is not None
    net_nods = GLIMS(in_channels=1, out_channels=2, feature_size=12, deep_supervision=False).train()
    assert net_nods(x).shape == (2, 2, 32, 32, 64)


@pytest.mark.parametrize("size", [(48, 64, 64), (64, 64, 40), (16, 32, 32)])
def test_bad_size(small_net, size):
    with pytest.raises(ValueError, match="multiple of 32"):
        small_net(torch.randn(1, 4, *size))


def test_bad_heads():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        GLIMS(feature_size=16)


def test_dacb_shape_and_residual():
    torch.manual_seed(0)
    block = DACB(8).eval()
    x = torch.randn(2, 8, 12, 10, 8)
    assert block(x).shape == x.shape
    # with the projection zeroed the block reduces to PReLU(IN(x)): the input is added back
    with torch.no_grad():
        block.project.weight.zero_()
        block.project.bias.zero_()
        assert torch.allclose(block(x), block.act(block.norm(x)), atol=1e-6)


def test_csab_gates():
    torch.manual_seed(0)
    for k in (1, 7):
        att = CSAB(16, spatial_kernel_size=k)
        x = 10 * torch.randn(2, 16, 8, 8, 8)
        ch, sp = att.attention_maps(x)
        assert ch.shape == (2, 16, 1, 1, 1) and sp.shape == (2, 1, 8, 8, 8)
        for g in (ch, sp):
            assert bool(((g > 0) & (g < 1)).all())
        assert torch.allclose(att(x), x * ch * sp)


def test_swin_stage_shifted_windows():
    # a map longer than the window exercises padding, shifted windows and the attention mask
    torch.manual_seed(0)
    stage = SwinStage3D(dim=16, depth=2, num_heads=2, window_size=(7, 7, 7)).eval()
    x = torch.randn(1, 16, 16, 4, 9)
    with torch.no_grad():
        y = stage(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_matches_eager(small_net):
    scripted = torch.jit.script(small_net)
    x = torch.randn(1, 4, 32, 32, 64)
    with torch.no_grad():
        assert torch.allclose(scripted(x), small_net(x), atol=1e-5)


def test_autocast_bfloat16(small_net):
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        ref = small_net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = small_net(x)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1
