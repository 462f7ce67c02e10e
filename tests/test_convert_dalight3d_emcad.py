"""The authors' DALight-3D and EMCAD checkpoints: key maps (every key of the full-size listings, on the meta device),
clear errors, and equivalence with outputs of the authors' own code (``../shared/reference``, see its README)."""

from __future__ import annotations

import json

import pytest
import torch

from medseg_nets.convert import AuthorsCheckpointError, convert_authors_state_dict
from medseg_nets.convert import dalight3d as conv_dalight
from medseg_nets.convert import emcad as conv_emcad
from medseg_nets.nets import DALight3D, EMCADNet

from conftest import REFERENCE_DIR, load_reference, torch_threads


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    with torch_threads(2):
        yield


def listing(name: str) -> dict:
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: the authors' reference listings are not beside this checkout")
    return json.loads(path.read_text())


def meta_state_dict(shapes: dict) -> dict:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def tolerance(ref: torch.Tensor) -> float:
    return 1e-4 + 1e-4 * ref.abs().max().item()


def seeded_input(ref: dict) -> torch.Tensor:
    return torch.randn(*ref["input_shape"], generator=torch.Generator().manual_seed(ref["input_seed"]))


# ---------------------------------------------------------------- key maps, full size, meta device
def test_dalight3d_listing_loads_strict_on_meta():
    shapes = listing("dalight3d_authors_keys.json")
    sd = convert_authors_state_dict("dalight3d", {"model": meta_state_dict(shapes), "epoch": 3})
    with torch.device("meta"):
        net = DALight3D()  # the bundle's / release defaults
    net.load_state_dict(sd, strict=True)
    assert conv_dalight.network_kwargs(meta_state_dict(shapes))["bottleneck_channels"] == 432
    assert sd["encoder.0.norm1.embedding.weight"].shape == (8, 48)  # gamma | beta tables joined
    assert sd["fusion.1.blend"].shape == (1,)


@pytest.mark.parametrize("variant", ["pvt_v2_b0", "pvt_v2_b2"])
def test_emcad_listing_loads_strict_on_meta(variant):
    shapes = listing("emcad_authors_keys.json")[variant]
    # as train_synapse.py saves it when trained on several GPUs (nn.DataParallel)
    ckpt = {f"module.{k}": v for k, v in meta_state_dict(shapes).items()}
    sd = convert_authors_state_dict("emcad", ckpt)
    kwargs = conv_emcad.network_kwargs(meta_state_dict(shapes))
    assert kwargs["encoder"] == variant and kwargs["in_channels"] == 1 and kwargs["out_channels"] == 9
    with torch.device("meta"):
        net = EMCADNet(in_channels=1, out_channels=9, encoder=variant)
    net.load_state_dict(sd, strict=True)
    assert sum(p.numel() for p in net.parameters()) == {"pvt_v2_b0": 3_920_923, "pvt_v2_b2": 26_772_635}[variant]


def test_emcad_older_head_order_recognised():
    shapes = listing("emcad_authors_keys.json")["pvt_v2_b0"]
    sd = meta_state_dict(shapes)
    old = {}
    for k, v in sd.items():  # older lib/networks.py: out_head1 on the deepest map
        old[k.replace("out_head", "out_head_") if k.startswith("out_head") else k] = v
    old = {(f"out_head{5 - int(k[9])}{k[10:]}" if k.startswith("out_head_") else k): v for k, v in old.items()}
    assert old["out_head1.weight"].shape[1] == 256
    converted = convert_authors_state_dict("emcad", old)
    assert converted["heads.0.weight"].shape == (9, 256, 1, 1) and converted["heads.3.weight"].shape == (9, 32, 1, 1)


# ---------------------------------------------------------------- errors name the key
def test_unknown_key_named():
    sd = meta_state_dict(listing("dalight3d_authors_keys.json"))
    sd["decoder.extra_block.weight"] = torch.empty(3, device="meta")
    with pytest.raises(AuthorsCheckpointError, match=r"decoder\.extra_block\.weight"):
        convert_authors_state_dict("dalight3d", sd)
    sd = meta_state_dict(listing("emcad_authors_keys.json")["pvt_v2_b0"])
    sd["backbone.head.weight"] = torch.empty(1000, 256, device="meta")
    with pytest.raises(AuthorsCheckpointError, match=r"backbone\.head\.weight.*load_pvtv2_pretrained"):
        convert_authors_state_dict("emcad", sd)


def test_unknown_tensor_of_known_module_named():
    sd = meta_state_dict(listing("dalight3d_authors_keys.json"))
    sd["encoder.init_conv.0.bias"] = torch.empty(24, device="meta")  # the stem conv has no bias
    with pytest.raises(AuthorsCheckpointError, match=r"encoder\.init_conv\.0\.bias"):
        convert_authors_state_dict("dalight3d", sd)


def test_evidential_head_refused_with_reason():
    sd = meta_state_dict(listing("dalight3d_authors_keys.json"))
    for k in [k for k in sd if k.startswith("head.head.")]:
        sd[k.replace("head.head.", "head.net.")] = sd.pop(k)
    with pytest.raises(AuthorsCheckpointError, match=r"head\.net\.0\.weight.*evidential"):
        convert_authors_state_dict("dalight3d", sd)


@pytest.mark.parametrize(
    "network, listing_name, key, ours",
    [
        ("dalight3d", "dalight3d_authors_keys.json", "decoder.skip_fusions.2.low_rank_attn.out_proj.bias",
         "fusion.2.out.bias"),
        ("dalight3d", "dalight3d_authors_keys.json", "encoder.downsamples.1.weight", "downsample.2.weight"),
        ("dalight3d", "dalight3d_authors_keys.json", "decoder.stages.1.norm2.default_beta",
         "decoder.1.norm2.default_shift"),
        ("emcad", "emcad_authors_keys.json", "decoder.lgag2.psi.1.running_var", "decoder.lgag2.psi.1.running_var"),
        ("emcad", "emcad_authors_keys.json", "out_head3.bias", "heads.1.bias"),
        ("emcad", "emcad_authors_keys.json", "backbone.block3.1.attn.kv.weight", "encoder.block3.1.attn.kv.weight"),
    ],
)
def test_missing_key_named_both_ways(network, listing_name, key, ours):
    shapes = listing(listing_name)
    shapes = shapes["pvt_v2_b0"] if network == "emcad" else shapes
    sd = meta_state_dict(shapes)
    del sd[key]
    with pytest.raises(AuthorsCheckpointError, match="lacks") as err:
        convert_authors_state_dict(network, sd)
    assert repr(key) in str(err.value) and repr(ours) in str(err.value)


def test_half_of_icn_pair_named():
    sd = meta_state_dict(listing("dalight3d_authors_keys.json"))
    del sd["encoder.stages.3.norm2.scanner_beta.weight"]
    with pytest.raises(AuthorsCheckpointError, match=r"encoder\.stages\.3\.norm2\.scanner_beta\.weight"):
        convert_authors_state_dict("dalight3d", sd)


def test_wrong_shape_named():
    sd = meta_state_dict(listing("dalight3d_authors_keys.json"))
    sd["decoder.stages.0.se.fc.0.bias"] = torch.empty(25, device="meta")
    with pytest.raises(AuthorsCheckpointError, match=r"decoder\.stages\.0\.se\.fc\.0\.bias.*\(25,\)"):
        convert_authors_state_dict("dalight3d", sd)


# ---------------------------------------------------------------- equivalence with the authors' outputs
@pytest.fixture(scope="module")
def dalight_ref():
    ref = load_reference("dalight3d_authors.pt")
    net = DALight3D(**conv_dalight.network_kwargs(ref["checkpoint"])).eval()
    net.load_state_dict(convert_authors_state_dict("dalight3d", ref["checkpoint"]), strict=True)
    return ref, net


def test_dalight3d_equals_authors_without_identifier(dalight_ref):
    ref, net = dalight_ref
    s = ref["output_stride"]
    with torch.no_grad():
        y = net(seeded_input(ref))[..., ::s, ::s, ::s]
    assert y.shape == ref["output"].shape
    assert (y - ref["output"]).abs().max().item() <= tolerance(ref["output"])


def test_dalight3d_equals_authors_with_identifier(dalight_ref):
    ref, net = dalight_ref
    s = ref["output_stride"]
    with torch.no_grad():
        y = net(seeded_input(ref), torch.tensor([int(ref["scanner_id"].reshape(-1)[0])]))[..., ::s, ::s, ::s]
    expected = ref["output_with_scanner_id"]
    assert (y - expected).abs().max().item() <= tolerance(expected)
    # the identifier matters: the two stored outputs differ by far more than the tolerance
    assert (ref["output"] - expected).abs().max().item() > 100 * tolerance(expected)


@pytest.fixture(scope="module")
def emcad_ref():
    ref = load_reference("emcad_b0_authors.pt")
    kwargs = conv_emcad.network_kwargs(ref["checkpoint"])
    net = EMCADNet(**kwargs, activation=ref["config"]["activation"]).eval()
    net.load_state_dict(convert_authors_state_dict("emcad", ref["checkpoint"]), strict=True)
    s = ref["output_stride"]
    with torch.no_grad():
        heads = [y[..., ::s, ::s] for y in net.forward_heads(seeded_input(ref))]
        final = net(seeded_input(ref))[..., ::s, ::s]
    return ref, heads, final


def test_emcad_all_heads_equal_authors(emcad_ref):
    ref, heads, final = emcad_ref
    assert len(heads) == len(ref["outputs"]) == 4
    for ours, theirs in zip(heads, ref["outputs"]):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= tolerance(theirs)
    # the eval-mode output is the finest head, P[-1], as the authors' test code uses
    assert (final - ref["outputs"][-1]).abs().max().item() <= tolerance(ref["outputs"][-1])
    # negative control: the heads differ from each other by far more than the tolerance
    assert (heads[0] - ref["outputs"][-1]).abs().max().item() > 10 * tolerance(ref["outputs"][-1])
