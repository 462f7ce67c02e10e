"""Tests of GLIMS (arXiv 2404.17854) and its blocks: reference counts and FLOPs, shapes, deep supervision, blocks,
TorchScript, autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from monai.losses import DeepSupervisionLoss, DiceLoss

from medseg_nets import native
from medseg_nets.blocks.glims import (
    CSAB,
    DACB,
    DMSFBlock,
    DMSUBlock,
    PatchExpand3D,
    PatchMerging3D,
    PositionEmbedding3D,
    SwinStage3D,
    SwinUpStage3D,
)
from medseg_nets.nets.glims import GLIMS

# reference (authors' code, feature_size 24, 96^3): see docs/networks.md
REFERENCE_PARAMS = {(4, 3): 47_163_349, (1, 14): 47_167_281}
REFERENCE_GFLOPS = 113.97  # FlopCounterMode, 1x4x96^3
NUM_DACB = 16  # each holds one frozen, unused PReLU of the reference


def _net(in_channels: int, out_channels: int) -> GLIMS:
    with torch.device("meta"):
        return GLIMS(in_channels=in_channels, out_channels=out_channels, feature_size=24)


@pytest.fixture(scope="module")
def small_net() -> GLIMS:
    torch.manual_seed(0)
    return GLIMS(in_channels=4, out_channels=3, feature_size=6).eval()  # 6 | 48, 12 | 96, 24 | 192


@pytest.mark.parametrize("io", [(4, 3), (1, 14)])
def test_param_count_reference(io):
    net = _net(*io)
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert total == REFERENCE_PARAMS[io]
    assert trainable == total - NUM_DACB


def test_flops_reference():
    net = _net(4, 3).eval()
    x = torch.empty(1, 4, 96, 96, 96, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        y = net(x)
    assert y.shape == (1, 3, 96, 96, 96)
    assert counter.get_total_flops() / 1e9 == pytest.approx(REFERENCE_GFLOPS, abs=0.01)


@pytest.mark.parametrize("size", [(32, 32, 32), (64, 32, 32)])
def test_forward_eval(small_net, size):
    with torch.no_grad():
        y = small_net(torch.randn(1, 4, *size))
    assert y.shape == (1, 3, *size)
    assert torch.isfinite(y).all()


def test_forward_train_deep_supervision():
    torch.manual_seed(0)
    net = GLIMS(in_channels=1, out_channels=2, feature_size=6).train()
    x = torch.randn(1, 1, 32, 32, 32)
    y = net(x)
    assert y.shape == (1, 4, 2, 32, 32, 32)  # main + heads on d2 (2F), d3 (4F), d4 (8F), all at input size
    loss = DeepSupervisionLoss(DiceLoss(sigmoid=True))(list(torch.unbind(y, dim=1)), torch.ones(1, 2, 32, 32, 32))
    loss.backward()
    # every trainable parameter takes part (DistributedDataParallel-safe); the spare PReLUs are frozen and unused
    assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []
    spare = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert len(spare) == NUM_DACB and all(n.endswith("spare_act.weight") for n in spare)
    net_nods = GLIMS(in_channels=1, out_channels=2, feature_size=6, deep_supervision=False).train()
    with torch.no_grad():
        assert net_nods(x).shape == (1, 2, 32, 32, 32)


@pytest.mark.parametrize("size", [(48, 64, 64), (64, 64, 40), (16, 32, 32)])
def test_bad_size(small_net, size):
    with pytest.raises(ValueError, match="multiple of 32"):
        small_net(torch.randn(1, 4, *size))


def test_bad_heads_and_img_size():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        GLIMS(feature_size=16)
    with pytest.raises(ValueError, match="multiples of 32"):
        GLIMS(feature_size=12, img_size=80)


def test_dacb_shape_and_residual():
    torch.manual_seed(0)
    block = DACB(8).eval()
    assert block.embed[0].out_channels == 16 and block.embed[0].in_channels == 24  # [Z_1, Z_2, Z_3] -> 2C
    assert [b[0].dilation for b in block.branches] == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
    x = torch.randn(2, 8, 12, 10, 8)
    assert block(x).shape == x.shape
    # with the projection zeroed (P_2 = PReLU(IN(0)) = 0) the block reduces to PReLU(IN(x)): the input is added
    with torch.no_grad():
        block.project[0].weight.zero_()
        block.project[0].bias.zero_()
        assert torch.allclose(block(x), block.act(block.norm(x)), atol=1e-5)


def test_dmsf_dmsu_shapes():
    x = torch.randn(1, 8, 8, 8, 16)
    skip, down = DMSFBlock(8, 16)(x)
    assert skip.shape == x.shape and down.shape == (1, 16, 4, 4, 8)
    up = DMSUBlock(16, 8)
    assert up.dacb1.embed[0].out_channels == 16  # DACB at C_out with embedding C_in
    assert up(down, skip).shape == x.shape


@pytest.mark.parametrize("norm", ["instance", "layer"])
def test_csab_gates(norm):
    torch.manual_seed(0)
    att = CSAB(16, spatial_norm=norm)
    assert att.spatial.weight.shape == (1, 2, 7, 7, 7) and att.mlp[0].out_features == 8
    x = 10 * torch.randn(2, 16, 8, 8, 8)
    ch, sp = att.attention_maps(x)
    assert ch.shape == (2, 16, 1, 1, 1) and sp.shape == (2, 1, 8, 8, 8)
    for g in (ch, sp):
        assert bool(((g > 0) & (g < 1)).all())
    assert torch.allclose(att(x), x * ch * sp)
    if norm == "layer":  # the reference's channel LayerNorm of a one-channel map: a constant spatial gate
        assert float(sp.detach().std()) < 1e-6
    else:
        assert float(sp.detach().std()) > 1e-2


def test_swin_stage_shifted_windows_and_position_embedding():
    # a map longer than the window exercises padding, shifted windows and the attention mask
    torch.manual_seed(0)
    stage = SwinStage3D(dim=16, depth=2, num_heads=2, window_size=(7, 7, 7), grid=(16, 4, 9)).eval()
    x = torch.randn(1, 16, 16, 4, 9)
    with torch.no_grad():
        y = stage(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert stage(torch.randn(1, 16, 8, 4, 4)).shape == (1, 16, 8, 4, 4)  # embedding resampled
    pe = PositionEmbedding3D(4, (2, 3, 4))
    z = torch.zeros(1, 4, 2, 3, 4)
    assert torch.equal(pe(z).flatten(2), pe.position_embeddings.detach())
    assert pe(torch.zeros(2, 4, 4, 6, 8)).shape == (2, 4, 4, 6, 8)
    up = SwinUpStage3D(dim=8, depth=2, num_heads=2, grid=(4, 4, 4))
    assert up(torch.randn(1, 16, 2, 2, 2), torch.randn(1, 8, 4, 4, 4)).shape == (1, 8, 4, 4, 4)


def test_patch_merging_and_expanding_layout():
    x = torch.randn(1, 1, 4, 4, 6)
    for mode in ("merging", "mergingv2"):
        merge = PatchMerging3D(1, mode)
        merge.norm = nn.Identity()
        with torch.no_grad():
            merge.reduction.weight.copy_(torch.tensor([[1.0] * 8, [0.0] * 8]))
            y = merge(x)
        assert y.shape == (1, 2, 2, 2, 3)
        block_sum = torch.nn.functional.avg_pool3d(x, 2) * 8
        # mergingv2 takes each of the 8 voxels once; MONAI's legacy order takes two of them twice
        assert torch.allclose(y[:, :1], block_sum, atol=1e-5) == (mode == "mergingv2")
    expand = PatchExpand3D(2)
    expand.norm = nn.Identity()
    with torch.no_grad():
        expand.expand.weight.copy_(torch.stack([torch.arange(8.0), torch.zeros(8)], dim=1))
        y = expand(torch.cat([torch.ones(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2)], dim=1))
    assert y.shape == (1, 1, 4, 4, 4)
    for pd in range(2):
        for ph in range(2):
            for pw in range(2):  # channel (p_h, p_w, p_d) of the 4C vector goes to voxel offset (p_d, p_h, p_w)
                assert float(y[0, 0, pd, ph, pw]) == (ph * 2 + pw) * 2 + pd


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_matches_eager(small_net):
    scripted = torch.jit.script(small_net)
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad(), torch.jit.optimized_execution(False):  # skip the profiling passes: faster on CPU
        out = scripted(x)  # TorchScript runs the PyTorch layers, never the native kernels
        previous = native.set_enabled(False)
        try:
            assert torch.allclose(out, small_net(x), atol=1e-5)  # the same path in eager
        finally:
            native.set_enabled(previous)
        # eager with the fused kernels (when built) within float32 rounding of it (issue 16: 1e-4 of the range)
        assert float((out - small_net(x)).abs().max()) <= 1e-4 * float(out.max() - out.min())
    # the reference's spatial norm variant of CSAB scripts too
    att = CSAB(8, spatial_norm="layer")
    y = torch.randn(1, 8, 4, 4, 4)
    with torch.no_grad():
        assert torch.allclose(torch.jit.script(att)(y), att(y), atol=1e-6)


def test_autocast_bfloat16(small_net):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = small_net(x)
    assert y.shape == (1, 3, 32, 32, 32) and torch.isfinite(y).all()
    # block by block bf16 follows fp32 closely (at random init the whole U path amplifies rounding ~30x)
    blocks = [
        (DACB(12), (torch.randn(1, 12, 16, 16, 16),)),
        (SwinStage3D(24, 2, 2, grid=(4, 4, 4)), (torch.randn(1, 24, 8, 8, 8),)),
        (CSAB(12), (torch.randn(1, 12, 16, 16, 16),)),
    ]
    for block, args in blocks:
        block.eval()
        with torch.no_grad():
            ref = block(*args)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = block(*args).float()
        assert float((out - ref).norm() / ref.norm()) < 0.03


def test_gradient_checkpointing_same_outputs_and_gradients():
    """gradient_checkpointing recomputes encoders, skip attentions and decoders in the backward pass: same training
    outputs and gradients; eval mode and TorchScript are unaffected."""
    torch.manual_seed(0)
    plain = GLIMS(4, 3, feature_size=3).train()
    ckpt = GLIMS(4, 3, feature_size=3, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 4, 32, 32, 32)
    y_plain, y_ckpt = plain(x), ckpt(x)
    torch.testing.assert_close(y_ckpt, y_plain)
    y_plain.square().mean().backward()
    y_ckpt.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, msg=name)
    ckpt.eval()
    previous = native.set_enabled(False)  # TorchScript runs the PyTorch layers: compare with them in eager
    try:
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.script(ckpt)(x), plain.eval()(x))
    finally:
        native.set_enabled(previous)
