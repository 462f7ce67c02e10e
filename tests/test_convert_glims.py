"""The authors' GLIMS checkpoints (yaziciz/GLIMS) converted to medseg_nets.nets.GLIMS: key mapping and equivalence."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REFERENCE_DIR, load_reference

from medseg_nets.blocks.glims import SwinStage3D, relative_position_index
from medseg_nets.convert import AuthorsCheckpointError, convert_authors_state_dict
from medseg_nets.convert.glims import authors_keys, convert, map_key
from medseg_nets.nets.glims import AUTHORS_RELEASE, GLIMS

LISTINGS = {"brats_4to3": (4, 3), "btcv_1to14": (1, 14)}


def _listing(name: str) -> dict:
    path = REFERENCE_DIR / "glims_authors_keys.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent: the authors' reference outputs are not beside this checkout")
    return json.loads(path.read_text())[name]


def _meta_state_dict(listing: dict) -> dict:
    return {k: torch.empty(shape, device="meta") for k, shape in listing.items()}


@pytest.mark.parametrize("name", sorted(LISTINGS))
def test_full_size_listing_loads_strict(name):
    listing = _listing(name)
    wrapped = {"module." + k: v for k, v in _meta_state_dict(listing).items()}  # as saved from DataParallel
    checkpoint = {"epoch": 3, "best_acc": 0.5, "state_dict": wrapped}
    sd = convert_authors_state_dict("glims", checkpoint)
    in_ch, out_ch = LISTINGS[name]
    with torch.device("meta"):
        net = GLIMS.authors_release(in_ch, out_ch, feature_size=24)
    net.load_state_dict(sd, strict=True)
    # every key mapped to its own parameter: only the derived relative-position-index buffers are dropped
    dropped = [k for k in listing if k.endswith("attn.relative_position_index")]
    assert len(dropped) == 2 + 6 + 2 + 6 + 2
    assert len(sd) == len(listing) - len(dropped) == len(net.state_dict())
    for k, shape in listing.items():
        if k not in dropped:
            assert list(sd[map_key(k)].shape) == shape, k


@pytest.mark.parametrize("name", sorted(LISTINGS))
def test_authors_key_inventory_is_the_release(name):
    """The parameters a checkpoint must hold are exactly the release's (the index buffers aside)."""
    listing = _listing(name)
    params = {k for k in listing if not k.endswith("attn.relative_position_index")}
    assert set(authors_keys()) == params and len(authors_keys()) == len(params)


def test_unknown_key_named():
    sd = _meta_state_dict(_listing("brats_4to3"))
    sd["csab1.ChannelGate.mlp.5.weight"] = torch.empty(3, device="meta")
    with pytest.raises(AuthorsCheckpointError, match=r"csab1\.ChannelGate\.mlp\.5\.weight"):
        convert(sd)
    sd = _meta_state_dict(_listing("brats_4to3"))
    sd["decoder.extra"] = torch.empty(3, device="meta")
    with pytest.raises(AuthorsCheckpointError, match=r"decoder\.extra"):
        convert_authors_state_dict("glims", {"state_dict": sd})


@pytest.mark.parametrize(
    "key",
    [
        "t4.layer.blocks.1.attn.qkv.weight",
        "dmsu_3.l2.prelu.weight",
        "t4_post.layer.upsample.norm_layer.bias",
        "out4.conv.conv.bias",
    ],
)
def test_missing_key_named(key):
    sd = _meta_state_dict(_listing("btcv_1to14"))
    del sd[key]
    with pytest.raises(AuthorsCheckpointError, match="lacks 1 parameter.*" + key.replace(".", r"\.")):
        convert(sd)


def test_missing_swin_block_named():
    """A checkpoint whose bottleneck has one block instead of the release's two: the second block is named."""
    sd = _meta_state_dict(_listing("brats_4to3"))
    for k in [k for k in sd if k.startswith("t4.layer.blocks.1.")]:
        del sd[k]
    with pytest.raises(AuthorsCheckpointError, match=r"t4\.layer\.blocks\.1\."):
        convert(sd)


def test_authors_release_arguments():
    with torch.device("meta"):
        net = GLIMS.authors_release(4, 3, feature_size=12, img_size=64)
    assert net.skip_attention[0].channel_last_norm and not net.swin_up_norm
    assert net.swin_enc2.cropped_index and net.swin_up.stage.cropped_index
    assert set(AUTHORS_RELEASE) == {"csab_spatial_norm", "relative_position", "swin_up_norm"}
    with pytest.raises(ValueError, match="relative_position"):
        GLIMS.authors_release(4, 3, feature_size=12, relative_position="offsets")


def test_cropped_relative_position_index():
    """``"cropped"``: the first n rows/columns of the full window's index (the release's ``[:n, :n]``); it differs
    from the true offsets of a clamped window except where only the first axis is shorter."""
    cpu = torch.device("cpu")
    full = relative_position_index([7, 7, 7], [7, 7, 7], cpu)
    for window in ([6, 6, 6], [3, 3, 3], [7, 7, 2]):
        n = window[0] * window[1] * window[2]
        cropped = relative_position_index(window, [7, 7, 7], cpu, cropped=True)
        assert torch.equal(cropped, full[:n, :n])
        assert not torch.equal(cropped, relative_position_index(window, [7, 7, 7], cpu))
    n = 5 * 7 * 7
    assert torch.equal(relative_position_index([5, 7, 7], [7, 7, 7], cpu, cropped=True), full[:n, :n])
    assert torch.equal(relative_position_index([5, 7, 7], [7, 7, 7], cpu), full[:n, :n])
    with pytest.raises(ValueError, match="relative_position"):
        SwinStage3D(24, 2, 3, relative_position="crop")


def test_matches_authors_output():
    """The authors' GLIMS.py output (feature size 12, their checkpoint layout, seeded input): converted weights in
    ``GLIMS.authors_release`` give the same output."""
    ref = load_reference("glims_authors_f12.pt")
    cfg = ref["config"]
    net = GLIMS.authors_release(cfg["in_channels"], cfg["out_channels"], cfg["feature_size"], img_size=cfg["img_size"])
    net.load_state_dict(convert_authors_state_dict("glims", ref["checkpoint"]), strict=True)
    net.eval()
    x = torch.randn(*ref["input_shape"], generator=torch.Generator().manual_seed(ref["input_seed"]))
    s = ref["output_stride"]
    with torch.no_grad():
        y = net(x)[..., ::s, ::s, ::s]
    expected = ref["output"]
    assert y.shape == expected.shape
    tol = 1e-4 + 1e-4 * expected.abs().max().item()
    assert (y - expected).abs().max().item() <= tol
