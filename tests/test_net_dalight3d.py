"""Tests of DALight-3D (Mishra et al., arXiv 2605.04518) and its blocks."""

from __future__ import annotations

import hashlib

import pytest
import torch

from conftest import torch_threads
from torch.utils.flop_counter import FlopCounterMode

from medseg_nets.blocks.dalight import (
    SSFB,
    CrossSliceAttention,
    DALightResBlock,
    IdentifierConditionedNorm,
    SeparableConv3d,
    check_identifier,
)
from medseg_nets.nets.dalight3d import DALight3D



@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with torch_threads(1):
        yield


SMALL = dict(base_channels=8, bottleneck_channels=32)  # widths 8/16/32/32, fast on CPU


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def shape_digest(net: torch.nn.Module) -> str:
    shapes = sorted(str(tuple(p.shape)) for p in net.parameters())
    return hashlib.sha256(";".join(shapes).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def small_net() -> DALight3D:
    torch.manual_seed(0)
    return DALight3D(**SMALL).eval()


def perturb_icn(net: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, IdentifierConditionedNorm):
                w = m.embedding.weight
                w.add_(0.5 * torch.randn(w.shape, generator=gen))


# ---------------------------------------------------------------- size
def test_release_parameter_count_and_shapes():
    net = DALight3D(in_channels=4, out_channels=4)
    assert n_params(net) == 2_219_074
    assert len(list(net.parameters())) == 172
    assert len({tuple(p.shape) for p in net.parameters()}) == 54
    assert shape_digest(net) == "fc0046017738cde5"


@pytest.mark.parametrize(
    "switch, exact, rounded",
    [
        ("use_csa", 1_924_522, 1.92),
        ("use_ssfb", 2_209_588, 2.21),
        ("use_icn", 2_194_498, 2.19),
        ("separable", 9_198_682, 9.20),
    ],
)
def test_ablation_counts(switch, exact, rounded):
    count = n_params(DALight3D(**{switch: False}))
    assert count == exact
    assert round(count / 1e6, 2) == rounded


def test_flops_match_reference():
    # FlopCounterMode on the meta device: no computation, same formulas (FLOPs = 2 x MACs)
    net = DALight3D().eval().to("meta")
    for size, gflops in ((64, 75.38), (128, 602.99)):
        with FlopCounterMode(display=False) as counter:
            net(torch.empty(1, 4, size, size, size, device="meta"))
        assert round(counter.get_total_flops() / 1e9, 2) == gflops


def test_separable_conv_parameter_count():
    conv = SeparableConv3d(24, 48)
    assert n_params(conv) == 24 * 27 + 24 * 48
    assert conv(torch.randn(1, 24, 6, 6, 6)).shape == (1, 48, 6, 6, 6)


# ---------------------------------------------------------------- shapes, errors
def test_full_size_forward_shape():
    net = DALight3D().eval()
    with torch.no_grad():
        y = net(torch.randn(1, 4, 16, 16, 16), identifier=torch.tensor([3]))
    assert y.shape == (1, 4, 16, 16, 16)
    assert torch.isfinite(y).all()


def test_output_shape_anisotropic():
    net = DALight3D(in_channels=2, out_channels=3, **SMALL).eval()
    with torch.no_grad():
        y = net(torch.randn(2, 2, 8, 16, 24))
    assert y.shape == (2, 3, 8, 16, 24)


@pytest.mark.parametrize("shape", [(1, 4, 16, 16, 12), (1, 4, 4, 16, 16), (1, 4, 16, 16)])
def test_bad_input_shape_raises(small_net, shape):
    with pytest.raises(ValueError, match="multiple of 8|5D input"):
        small_net(torch.randn(*shape))


def test_wrong_channel_count_raises(small_net):
    with pytest.raises(ValueError, match="4 input channels"):
        small_net(torch.randn(1, 3, 16, 16, 16))


@pytest.mark.parametrize("ident", [[8], [-2], [0, 9], [-5, 1]])
def test_bad_identifier_value_raises(small_net, ident):
    x = torch.randn(len(ident), 4, 16, 16, 16) if len(ident) > 1 else torch.randn(2, 4, 16, 16, 16)
    with pytest.raises(ValueError, match=r"\[-1, 8\)"):
        small_net(x, torch.tensor(ident))


@pytest.mark.parametrize(
    "ident", [torch.tensor([0.0, 1.0]), torch.tensor([0, 1, 2]), torch.tensor([[0, 1]]), torch.tensor([True, False])]
)
def test_bad_identifier_type_or_shape_raises(small_net, ident):
    with pytest.raises(ValueError, match="identifier"):
        small_net(torch.randn(2, 4, 16, 16, 16), ident)


def test_check_identifier_broadcasts():
    out = check_identifier(torch.tensor([3], dtype=torch.int32), 4, 8)
    assert out is not None and out.dtype == torch.long and out.tolist() == [3, 3, 3, 3]
    assert check_identifier(torch.tensor(2), 2, 8).tolist() == [2, 2]
    assert check_identifier(None, 2, 8) is None


# ---------------------------------------------------------------- ICN
def test_icn_identity_at_init_and_conditioning():
    torch.manual_seed(0)
    net = DALight3D(**SMALL).eval()
    x = torch.randn(1, 4, 16, 16, 16).expand(4, -1, -1, -1, -1)
    ids = torch.tensor([-1, 0, 1, 7])
    with torch.no_grad():
        y_none = net(x)
        # at init every identifier reproduces the default path
        torch.testing.assert_close(net(x, ids), y_none)
        perturb_icn(net)
        y = net(x, ids)
        assert (y[1] - y[2]).abs().max() > 1e-3
        assert (y[1] - y[0]).abs().max() > 1e-3
        # the default path (None or -1) does not use the table
        torch.testing.assert_close(y[0], y_none[0])
        torch.testing.assert_close(net(x), y_none)


def test_icn_mixed_batch_and_broadcast():
    torch.manual_seed(0)
    net = DALight3D(**SMALL).eval()
    perturb_icn(net)
    with torch.no_grad():
        # the default scale/shift must differ from the table too
        for m in net.modules():
            if isinstance(m, IdentifierConditionedNorm):
                m.default_scale.mul_(1.3)
        x = torch.randn(2, 4, 16, 16, 16)
        mixed = net(x, torch.tensor([-1, 2]))
        torch.testing.assert_close(mixed[:1], net(x[:1]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mixed[1:], net(x[1:], torch.tensor([2])), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(net(x, torch.tensor([2])), net(x, torch.tensor([2, 2])))
        torch.testing.assert_close(net(x, None), net(x, torch.tensor([-1, -1])))


def test_icn_block_formula():
    torch.manual_seed(0)
    norm = IdentifierConditionedNorm(16, num_identifiers=3)
    assert n_params(norm) == 3 * 32 + 32
    with torch.no_grad():
        norm.embedding.weight.normal_()
    x = torch.randn(2, 16, 4, 4, 4)
    gn = torch.nn.functional.group_norm(x, 8)
    y = norm(x, torch.tensor([1, -1]))
    scale, shift = norm.embedding.weight[1, :16], norm.embedding.weight[1, 16:]
    torch.testing.assert_close(y[0], gn[0] * scale.view(16, 1, 1, 1) + shift.view(16, 1, 1, 1))
    torch.testing.assert_close(y[1], gn[1])


def test_no_icn_ignores_identifier():
    torch.manual_seed(0)
    net = DALight3D(use_icn=False, **SMALL).eval()
    assert not any(isinstance(m, IdentifierConditionedNorm) for m in net.modules())
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor([5])), net(x))
    with pytest.raises(ValueError):
        net(x, torch.tensor([8]))


# ---------------------------------------------------------------- CSA, SE, SSFB
def test_csa_term_constant_over_hw_and_mixes_slices():
    torch.manual_seed(0)
    csa = CrossSliceAttention(16)
    assert csa.key_channels == 8
    x = torch.randn(2, 16, 8, 5, 6)
    delta = csa(x) - x
    assert delta.std(dim=(3, 4)).max() < 1e-6  # added term broadcast over H, W
    assert delta.abs().max() > 1e-4
    x2 = x.clone()
    x2[:, :, 0] += 3.0  # change slice 0 only
    changed = (csa(x2) - x2 - delta).abs().amax(dim=(0, 1, 3, 4))
    assert (changed[1:] > 1e-5).all()  # every other slice's attended term moves


def test_block_routes_through_csa():
    torch.manual_seed(0)
    block = DALightResBlock(16, 16, use_csa=True).eval()
    seen = []
    block.csa.register_forward_hook(lambda mod, inp, out: seen.append(out - inp[0]))
    x = torch.randn(1, 16, 8, 4, 4)
    x2 = x.clone()
    x2[:, :, 0] += 3.0  # change slice 0 only
    with torch.no_grad():
        block(x)
        block(x2)
    term, term2 = seen
    assert term.std(dim=(3, 4)).max() < 1e-6  # the CSA term inside the block is constant over H, W
    # two 3x3x3 convs only reach slices 0..2; the CSA term moves at every slice
    assert ((term2 - term).abs().amax(dim=(0, 1, 3, 4)) > 1e-6).all()
    assert isinstance(DALightResBlock(16, 16, use_csa=False).csa, torch.nn.Identity)


def test_se_gates_in_unit_interval():
    torch.manual_seed(0)
    block = DALightResBlock(16, 32)
    se = block.se
    x = 5 * torch.randn(3, 32, 4, 4, 4)
    gates = se.fc(se.avg_pool(x).view(3, 32))
    assert gates.shape == (3, 32)
    assert ((gates > 0) & (gates < 1)).all()
    torch.testing.assert_close(se(x), x * gates.view(3, 32, 1, 1, 1))
    assert n_params(se) == 32 * 8 + 8 + 8 * 32 + 32


def test_ssfb_shapes_and_gate():
    torch.manual_seed(0)
    ssfb = SSFB(16, rank=8)
    assert ssfb.blend.shape == (1,) and ssfb.blend.item() == 0.5  # the authors' initial alpha
    dec, skip = torch.randn(2, 16, 4, 6, 8), torch.randn(2, 16, 4, 6, 8)
    g = ssfb.channel_gate(dec, skip)
    assert g.shape == (2, 16) and ((g > 0) & (g < 1)).all()
    assert ssfb.attention(dec, skip).shape == skip.shape
    assert ssfb(dec, skip).shape == skip.shape


# ---------------------------------------------------------------- export, AMP, training
def test_torchscript_equals_eager(small_net):
    scripted = torch.jit.script(small_net)
    x = torch.randn(2, 4, 16, 16, 16)
    with torch.no_grad():
        for ident in (None, torch.tensor([1, -1]), torch.tensor([3])):
            torch.testing.assert_close(scripted(x, ident), small_net(x, ident))
    with pytest.raises(Exception, match=r"\[-1, 8\)"):
        scripted(x, torch.tensor([9]))


def test_autocast_bf16_and_backward():
    torch.manual_seed(0)
    net = DALight3D(**SMALL).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(torch.randn(2, 4, 16, 16, 16), torch.tensor([0, -1]))
    assert y.shape == (2, 4, 16, 16, 16) and torch.isfinite(y).all()
    y.float().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
