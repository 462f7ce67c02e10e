"""Tests of the PVTv2 encoder, the EMCAD blocks and network, and the MUTATION loss."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer, SliceInferer
from monai.losses import DiceCELoss
from torch.utils.flop_counter import FlopCounterMode

from medseg_nets.blocks.emcad import CAB, EUCB, LGAG, MSCAM, MSCB, MSDC, SAB, channel_shuffle
from medseg_nets.losses.mutation import MutationLoss, mutation_subsets
from medseg_nets.nets.emcad import EMCADNet
from medseg_nets.nets.pvtv2 import (
    PyramidVisionTransformerV2,
    adapt_input_conv_weight,
    load_pvtv2_pretrained,
    pvt_v2_b0,
)

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def b0_net() -> EMCADNet:
    torch.manual_seed(0)
    return EMCADNet(in_channels=1, out_channels=9, encoder="pvt_v2_b0")


# ------------------------------------------------------------------------------------------------ counts and FLOPs
# (total, decoder, encoder, GFLOPs at 1x1x224x224 with all four heads) of the reference, 9 classes, 1-channel input.
REFERENCE = {
    "pvt_v2_b0": (3_920_923, 506_507, 3_409_760, 1.339),
    "pvt_v2_b2": (26_772_635, 1_913_515, 24_849_856, 8.791),
}


@pytest.mark.parametrize("encoder", sorted(REFERENCE))
def test_param_counts_and_flops(encoder: str) -> None:
    total, decoder, enc, gflops = REFERENCE[encoder]
    with torch.device("meta"):  # shapes only: no weight initialisation cost
        net = EMCADNet(in_channels=1, out_channels=9, encoder=encoder)
    assert n_params(net) == total
    assert n_params(net.decoder) == decoder
    assert n_params(net.encoder) == enc
    heads = sum(c * 9 + 9 for c in net.encoder.embed_dims)
    assert n_params(net.heads) == heads
    assert n_params(net.input_adapter) == 3 + 3 + 6  # 1x1 conv 1->3 with bias, BN(3)
    assert total - decoder - enc == heads + 12
    # one spatial-attention conv shared by the four MSCAMs
    assert sum(1 for p in net.decoder.parameters() if p.shape == (1, 2, 7, 7)) == 1
    assert net.decoder.mscam4.sab is net.decoder.mscam1.sab is net.decoder.sab

    counter = FlopCounterMode(display=False)
    with counter:  # training mode: all four heads, as measured on the reference
        outs = net(torch.empty(1, 1, 224, 224, device="meta"))
    assert len(outs) == 4
    assert round(counter.get_total_flops() / 1e9, 3) == gflops


def test_pvtv2_variants_and_keys() -> None:
    # published sizes incl. the 1000-class head (dim_last * 1000 + 1000): B1 14.0M, B3 45.2M, B4 62.6M, B5 82.0M
    expected = {"b1": 14.0, "b3": 45.2, "b4": 62.6, "b5": 82.0}
    for variant, millions in expected.items():
        with torch.device("meta"):
            enc = PyramidVisionTransformerV2(variant=variant)
        assert round((n_params(enc) + 513_000) / 1e6, 1) == millions
    enc = pvt_v2_b0()
    keys = set(enc.state_dict())
    for key in (
        "patch_embed1.proj.weight",
        "patch_embed1.norm.weight",
        "block1.0.norm1.weight",
        "block1.0.attn.q.weight",
        "block1.0.attn.kv.weight",
        "block1.0.attn.sr.weight",
        "block1.0.attn.norm.weight",
        "block1.0.attn.proj.weight",
        "block1.0.mlp.fc1.weight",
        "block1.0.mlp.dwconv.dwconv.weight",
        "block1.0.mlp.fc2.weight",
        "norm1.weight",
        "patch_embed4.proj.weight",
        "block4.1.attn.q.weight",
        "norm4.bias",
    ):
        assert key in keys, key
    assert "block4.0.attn.sr.weight" not in keys  # sr ratio 1 in the last stage
    feats = enc.eval()(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 16, 24), (1, 64, 8, 12), (1, 160, 4, 6), (1, 256, 2, 3)]


# ------------------------------------------------------------------------------------------------ network behaviour
def test_train_and_eval_outputs(b0_net: EMCADNet) -> None:
    net = b0_net
    x = torch.randn(2, 1, 32, 64)
    net.train()
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 4
    assert all(o.shape == (2, 9, 32, 64) for o in outs)
    loss = MutationLoss()(outs, torch.randint(0, 9, (2, 1, 32, 64)))
    loss.backward()
    assert net.encoder.patch_embed1.proj.weight.grad is not None
    net.zero_grad(set_to_none=True)

    net.eval()
    with torch.no_grad():
        y = net(x)
        # eval output == the last (shallowest) head of the list computed with the same (eval) normalisation
        net.training = True  # only the top-level flag: submodules stay in eval mode
        outs_eval_bn = net(x)
        net.training = False
    assert isinstance(y, torch.Tensor) and y.shape == (2, 9, 32, 64)
    torch.testing.assert_close(y, outs_eval_bn[-1])
    # sizes that are not multiples of 32
    with torch.no_grad():
        assert net(torch.randn(1, 1, 72, 40)).shape == (1, 9, 72, 40)


def test_input_adapters() -> None:
    with torch.device("meta"):
        rgb = EMCADNet(in_channels=3, out_channels=2, encoder="b0")
        four = EMCADNet(in_channels=4, out_channels=3, encoder="b0")
        four_pe = EMCADNet(in_channels=4, out_channels=3, encoder="b0", input_adapter="patch_embed")
    assert rgb.input_adapter is None and rgb.encoder.patch_embed1.proj.in_channels == 3
    assert four.input_adapter[0].in_channels == 4 and four.encoder.patch_embed1.proj.in_channels == 3
    assert four_pe.input_adapter is None and four_pe.encoder.patch_embed1.proj.in_channels == 4
    net = EMCADNet(in_channels=4, out_channels=3, encoder="b0", input_adapter="patch_embed").eval()
    with torch.no_grad():
        assert net(torch.randn(1, 4, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError):
        EMCADNet(encoder="b9")


def test_torchscript_matches_eager(b0_net: EMCADNet) -> None:
    net = b0_net.eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-5, atol=1e-5)
    scripted.train()
    outs = scripted(torch.randn(2, 1, 64, 64))
    assert isinstance(outs, list) and len(outs) == 4
    net.eval()


def test_monai_inferers(b0_net: EMCADNet) -> None:
    net = b0_net.eval()
    with torch.no_grad():
        sw = SlidingWindowInferer(roi_size=(64, 64), sw_batch_size=2, overlap=0.25)
        assert sw(torch.randn(1, 1, 96, 64), net).shape == (1, 9, 96, 64)
        sl = SliceInferer(roi_size=(64, 64), sw_batch_size=2, spatial_dim=2)
        assert sl(torch.randn(1, 1, 64, 64, 2), net).shape == (1, 9, 64, 64, 2)


# ------------------------------------------------------------------------------------------------ volumes (slice_axis)
@pytest.fixture(scope="module")
def slice_nets() -> tuple[EMCADNet, EMCADNet]:
    """The 2D network and the same weights with ``slice_axis=2`` (4 sequences in, 3 regions out, as the bundle)."""
    torch.manual_seed(6)
    net2d = EMCADNet(in_channels=4, out_channels=3, encoder="b0", input_adapter="patch_embed").eval()
    net3d = EMCADNet(in_channels=4, out_channels=3, encoder="b0", input_adapter="patch_embed", slice_axis=2,
                     slice_batch=1).eval()
    assert list(net3d.state_dict()) == list(net2d.state_dict())  # the option adds no parameter or buffer
    net3d.load_state_dict(net2d.state_dict())
    return net2d, net3d


def test_volume_equals_the_2d_network_on_each_padded_slice(slice_nets) -> None:
    net2d, net3d = slice_nets
    torch.manual_seed(7)
    x = torch.randn(2, 4, 40, 50, 3)  # in-plane 40 x 50: zero-padded (centred) to 64 x 64, cropped back
    top, left = 12, 7
    with torch.no_grad():
        y = net3d(x)
        assert y.shape == (2, 3, 40, 50, 3)
        for b in range(2):
            for z in range(3):
                padded = F.pad(x[b : b + 1, :, :, :, z], [left, 64 - 50 - left, top, 64 - 40 - top])
                expected = net2d(padded)[0, :, top : top + 40, left : left + 50]
                assert torch.equal(y[b, :, :, :, z], expected), (b, z)  # one slice a chunk: the same computation
        # several slices a chunk (the bundle runs 8): the same maps up to the round-off of batched kernels, within
        # 1e-4 of the logits' range
        span = float(y.max() - y.min())
        try:
            for slice_batch in (4, 8, 0):
                net3d.slice_batch = slice_batch
                assert float((net3d(x) - y).abs().max()) <= 1e-4 * span, slice_batch
            heads = net3d.forward_heads(x)
        finally:
            net3d.slice_batch = 1
        assert len(heads) == 4 and all(h.shape == (2, 3, 40, 50, 3) for h in heads)
        torch.testing.assert_close(heads[-1], y, rtol=1e-5, atol=1e-5)
        # a 4D input is a batch of slices: exactly the 2D network (no padding added)
        s = torch.randn(2, 4, 40, 50)
        assert torch.equal(net3d(s), net2d(s))
        # slices along axis 0 of the transposed volume: the same slices, the same outputs
        net0 = EMCADNet(in_channels=4, out_channels=3, encoder="b0", input_adapter="patch_embed", slice_axis=0,
                        slice_batch=1).eval()
        net0.load_state_dict(net2d.state_dict())
        assert torch.equal(net0(x.permute(0, 1, 4, 2, 3)), y.permute(0, 1, 4, 2, 3))
    with pytest.raises(ValueError, match="slice_axis=None"):
        net2d(x)
    with pytest.raises(ValueError):
        EMCADNet(in_channels=4, out_channels=3, encoder="b0", slice_axis=3)


def test_volume_agrees_with_slice_inferer_when_the_padding_is_the_same(slice_nets) -> None:
    """The bundle's previous inference (MONAI's SliceInferer, 2D network, one ROI window per slice, zero-padded to
    the ROI) and the slice-wise network compute the same maps when the ROI is the plane's padded size."""
    net2d, net3d = slice_nets
    torch.manual_seed(8)
    x = torch.randn(1, 4, 40, 50, 5)  # padded to 64 x 64 by both
    inferer = SliceInferer(roi_size=(64, 64), spatial_dim=2, sw_batch_size=3, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        torch.testing.assert_close(net3d(x), inferer(x, net2d), rtol=1e-5, atol=1e-5)


def test_volume_training_mode_and_torchscript(slice_nets) -> None:
    _, net3d = slice_nets
    torch.manual_seed(9)
    x = torch.randn(3, 4, 64, 64, 1)  # the bundle's training samples: one-slice volumes
    scripted = torch.jit.script(net3d)
    with torch.no_grad():
        v = torch.randn(1, 4, 40, 50, 3)
        torch.testing.assert_close(scripted(v), net3d(v), rtol=1e-5, atol=1e-5)
    net3d.train()
    try:
        outs = net3d(x)
        assert isinstance(outs, list) and [o.shape for o in outs] == [(3, 3, 64, 64, 1)] * 4
        target = (torch.rand(3, 3, 64, 64, 1) > 0.5).float()
        MutationLoss(sigmoid=True)(outs, target).backward()
        assert net3d.encoder.patch_embed1.proj.weight.grad is not None
    finally:
        net3d.zero_grad(set_to_none=True)
        net3d.eval()


# ------------------------------------------------------------------------------------------------ pretrained loader
def _official_checkpoint(path) -> dict[str, torch.Tensor]:
    """Write a checkpoint in the official layout: a plain state_dict with the classifier head."""
    torch.manual_seed(1)
    src = pvt_v2_b0()  # 3-channel encoder: its state_dict has the official key names
    sd = dict(src.state_dict())
    sd["head.weight"] = torch.randn(1000, 256)
    sd["head.bias"] = torch.randn(1000)
    torch.save(sd, path)
    return sd


def test_pretrained_loader(tmp_path, caplog) -> None:
    path = tmp_path / "pvt_v2_b0.pth"
    sd = _official_checkpoint(path)
    rgb_w = sd["patch_embed1.proj.weight"]

    one = PyramidVisionTransformerV2(in_channels=1, variant="b0")
    res = load_pvtv2_pretrained(one, str(path))
    assert res.missing_keys == [] and res.unexpected_keys == [] and res.mismatched_keys == []
    torch.testing.assert_close(one.patch_embed1.proj.weight, rgb_w.sum(dim=1, keepdim=True))
    torch.testing.assert_close(one.block2[1].attn.kv.weight, sd["block2.1.attn.kv.weight"])
    torch.testing.assert_close(one.norm4.weight, sd["norm4.weight"])

    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": sd, "epoch": 300}, wrapped)
    four = PyramidVisionTransformerV2(in_channels=4, variant="b0")
    load_pvtv2_pretrained(four, str(wrapped))
    w4 = four.patch_embed1.proj.weight
    torch.testing.assert_close(w4[:, :3], rgb_w * 0.75)
    torch.testing.assert_close(w4[:, 3], rgb_w[:, 0] * 0.75)
    torch.testing.assert_close(adapt_input_conv_weight(rgb_w, 3), rgb_w)
    # a constant image gives the same first-layer response through the adapted weights
    const1 = torch.ones(1, 1, 7, 7)
    torch.testing.assert_close(
        nn.functional.conv2d(const1.expand(1, 3, 7, 7), rgb_w),
        nn.functional.conv2d(const1, one.patch_embed1.proj.weight),
    )

    # whole network: the 1x1 adapter keeps the 3-channel patch embedding, loaded unchanged
    net = EMCADNet(in_channels=1, out_channels=2, encoder="b0", encoder_pretrained=str(path))
    torch.testing.assert_close(net.encoder.patch_embed1.proj.weight, rgb_w)

    # strict mode raises on a missing key; non-strict returns it
    del sd["block1.0.attn.q.weight"]
    sd["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save({"state_dict": sd}, broken)
    target = pvt_v2_b0()
    with pytest.raises(RuntimeError, match=r"block1\.0\.attn\.q\.weight"):
        load_pvtv2_pretrained(target, str(broken))
    with caplog.at_level(logging.WARNING, logger="medseg_nets.nets.pvtv2"):
        res = load_pvtv2_pretrained(target, str(broken), strict=False)
    assert "missing 1 (block1.0.attn.q.weight" in caplog.text and "unexpected 1 (extra.weight" in caplog.text
    assert res.missing_keys == ["block1.0.attn.q.weight"]
    assert res.unexpected_keys == ["extra.weight"]


# ------------------------------------------------------------------------------------------------ MUTATION loss
def test_mutation_loss() -> None:
    torch.manual_seed(2)
    assert len(mutation_subsets(4)) == 15 and len(set(mutation_subsets(4))) == 15
    heads = [torch.randn(2, 4, 16, 16) for _ in range(4)]
    target = torch.randint(0, 4, (2, 1, 16, 16))
    base = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.7, lambda_ce=0.3)
    expected = torch.zeros(())
    n_terms = 0
    for mask in range(1, 16):  # explicit loop over the non-empty subsets as bit masks
        mixed = sum(heads[i] for i in range(4) if mask >> i & 1)
        expected = expected + base(mixed, target)
        n_terms += 1
    assert n_terms == 15
    loss = MutationLoss()
    torch.testing.assert_close(loss(heads, target), expected)
    torch.testing.assert_close(MutationLoss(reduction="mean")(heads, target), expected / 15)
    torch.testing.assert_close(loss(heads[0], target), base(heads[0], target))  # single tensor: base loss only
    torch.testing.assert_close(loss(heads[:1], target), base(heads[0], target))

    # any base loss, e.g. from a bundle config
    mse = MutationLoss(loss=nn.MSELoss(reduction="sum"))
    y = torch.randn(2, 4, 16, 16)
    ref = sum(nn.functional.mse_loss(sum(heads[i] for i in s), y, reduction="sum") for s in mutation_subsets(4))
    torch.testing.assert_close(mse(heads, y), ref)

    # sigmoid (overlapping regions) variant: Dice + BCE on a multi-channel binary target
    regions = (torch.rand(2, 3, 16, 16) > 0.5).float()
    sig = MutationLoss(sigmoid=True)(tuple(h[:, :3] for h in heads), regions)
    assert sig.ndim == 0 and torch.isfinite(sig) and sig > 0


# ------------------------------------------------------------------------------------------------ blocks
def test_channel_shuffle_is_permutation() -> None:
    x = torch.arange(12.0).view(1, 12, 1, 1).expand(2, 12, 3, 3)
    y = channel_shuffle(x, 3)
    perm = y[0, :, 0, 0].long().tolist()
    assert sorted(perm) == list(range(12))
    assert perm == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    torch.testing.assert_close(channel_shuffle(y, 4), x)  # inverse: shuffle with C / groups
    torch.testing.assert_close(channel_shuffle(x, 1), x)
    torch.testing.assert_close(channel_shuffle(x, 12), x)


def test_attention_gates() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 32, 8, 8) * 10
    cab, sab = CAB(32), SAB()
    assert cab.fc1.out_channels == 2 and n_params(cab) == 2 * 32 * 2 and n_params(sab) == 98
    g = cab(x)
    assert g.shape == (2, 32, 1, 1) and bool(((g > 0) & (g < 1)).all())
    s = sab(x)
    assert s.shape == (2, 1, 8, 8) and bool(((s > 0) & (s < 1)).all())
    mscam = MSCAM(32).eval()
    assert mscam(x).shape == x.shape


def test_mscb_residual_only_when_widths_match() -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 16, 8, 8)
    same, wider = MSCB(16, 16).eval(), MSCB(16, 24).eval()
    assert same.use_skip_connection and not wider.use_skip_connection
    assert n_params(same) == 4 * 16 * 16 + 88 * 16  # 1x1 expand, 3 dw convs (1/3/5) + BNs, 1x1 project + BN
    for block in (same, wider):
        nn.init.zeros_(block.pconv2[1].weight)  # zero the last BN: the conv branch outputs 0
        nn.init.zeros_(block.pconv2[1].bias)
    with torch.no_grad():
        torch.testing.assert_close(same(x), x)
        assert torch.count_nonzero(wider(x)) == 0 and wider(x).shape == (2, 24, 8, 8)
    par = MSDC(8, (1, 3, 5), dw_parallel=True).eval()
    seq = MSDC(8, (1, 3, 5), dw_parallel=False).eval()
    seq.load_state_dict(par.state_dict())
    z = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        p, q = par(z), seq(z)
        torch.testing.assert_close(p[0], q[0])
        torch.testing.assert_close(q[1], seq.dwconvs[1](z + q[0]))
    concat = MSCB(16, 16, add=False)
    assert concat.pconv2[0].in_channels == 16 * 2 * 3


def test_lgag_and_eucb() -> None:
    torch.manual_seed(5)
    lgag = LGAG(32, 32, inter_channels=16, kernel_size=3, groups=16).eval()
    assert n_params(lgag) == int(21.5 * 32 + 3)
    g, skip = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        gate = lgag.gate(g, skip)
        assert gate.shape == (2, 1, 8, 8) and bool(((gate > 0) & (gate < 1)).all())
        torch.testing.assert_close(lgag(g, skip), skip * gate)
    eucb = EUCB(32, 16).eval()
    assert n_params(eucb) == 32 * 9 + 2 * 32 + 32 * 16 + 16
    x = torch.randn(1, 32, 5, 7)
    with torch.no_grad():
        y = eucb(x)
        assert y.shape == (1, 16, 10, 14)
        torch.testing.assert_close(eucb(x, [10, 14]), y)
        assert eucb(x, [9, 13]).shape == (1, 16, 9, 13)
    assert math.gcd(64, 32) == MSCB(32, 32).shuffle_groups
