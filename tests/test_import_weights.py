"""tools/import_weights.py on copies of the dalight3d, emcad and glims bundles (never the repository's bundles/), with
checkpoints in the authors' layout made from our networks' state dicts through the converters' own key maps."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import import_weights
from conftest import ROOT, torch_threads
from medseg_nets.convert import convert_authors_state_dict
from medseg_nets.blocks.glims import relative_position_index
from medseg_nets.convert import dalight3d as conv_dalight
from medseg_nets.convert import emcad as conv_emcad
from medseg_nets.convert import glims as conv_glims
from medseg_nets.convert._rules import inverse_key
from medseg_nets.nets import DALight3D, EMCADNet
from medseg_nets.nets.glims import GLIMS


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    with torch_threads(2):
        yield


def to_authors_layout(sd: dict, rules) -> dict:
    """Our state dict in the authors' key layout (the inverse of a converter's rules)."""
    out = {}
    for key, value in sd.items():
        name = inverse_key(key, rules)
        assert name is not None, key
        if name.endswith(".scanner_gamma+scanner_beta.weight"):  # DALight-3D ICN: one table -> two embeddings
            prefix, half = name[: -len(".scanner_gamma+scanner_beta.weight")], value.shape[1] // 2
            out[f"{prefix}.scanner_gamma.weight"] = value[:, :half].clone()
            out[f"{prefix}.scanner_beta.weight"] = value[:, half:].clone()
        elif name.endswith(".alpha"):
            out[name] = value.reshape(())
        else:
            out[name] = value.clone()
    return out


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def bundle_copy(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(ROOT / "bundles" / name, dst, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    return dst


@pytest.fixture(scope="module")
def dalight_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    torch.manual_seed(0)
    net = DALight3D()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    authors = to_authors_layout(net.state_dict(), conv_dalight.RULES)
    path = tmp_path_factory.mktemp("ckpt") / "best_model.pth"
    torch.save({"module." + k: v for k, v in authors.items()}, path)  # as saved from DataParallel
    return path, net.state_dict()


def test_dalight3d_import_writes_weights_and_provenance(tmp_path, dalight_checkpoint, capsys):
    ckpt, expected = dalight_checkpoint
    root = bundle_copy(tmp_path, "dalight3d")
    argv = ["--bundle", "dalight3d", "--from", "authors", str(ckpt), "--bundle-root", str(root)]
    assert import_weights.main(argv) == 0
    assert "note: the network attends across slices along spatial axis 2" in capsys.readouterr().out
    model = root / "models" / "model.pt"
    sd = torch.load(model, weights_only=True)
    assert set(sd) == set(expected) and all(torch.equal(sd[k], expected[k]) for k in sd)
    model_sha = hashlib.sha256(model.read_bytes()).hexdigest()
    source_sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    record = json.loads((root / "configs" / "metadata.json").read_text())["weights"]["models/model.pt"]
    assert record["sha256"] == model_sha and record["source_sha256"] == source_sha
    assert record["converter"] == "medseg_nets.convert.dalight3d" and "import_weights.py" in record["command"]
    assert f'hash_val: "{model_sha}"' in (root / "large_files.yml").read_text()
    card = (root / "docs" / "README.md").read_text()
    assert source_sha in card and model_sha in card
    # a second import replaces the row, it does not add one
    assert import_weights.main(argv) == 0
    assert (root / "docs" / "README.md").read_text().count("| `models/model.pt` |") == 1
    # tools/package_bundle.py accepts it: the same sha256 for models/model.pt in its large_files.yml
    import package_bundle

    pkg = package_bundle.package(root, out_dir=tmp_path / "zoo", log=lambda s: None)
    assert [(e["path"], e["hash_val"]) for e in pkg.large_files] == [("models/model.pt", model_sha)]


@pytest.fixture(scope="module")
def emcad_b0_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    torch.manual_seed(0)
    net = EMCADNet(in_channels=1, out_channels=9, encoder="pvt_v2_b0")
    # the SAB shared by the four MSCAMs is one module (decoder.sab) in the authors' network
    ours = {k: v for k, v in net.state_dict().items() if not (k.startswith("decoder.mscam") and ".sab." in k)}
    authors = to_authors_layout(ours, conv_emcad.RULES)
    path = tmp_path_factory.mktemp("ckpt") / "best.pth"
    torch.save(authors, path)
    assert set(convert_authors_state_dict("emcad", authors)) == set(net.state_dict())
    return path, net.state_dict()


def test_emcad_synapse_checkpoint_refused_nothing_written(tmp_path, emcad_b0_checkpoint, capsys):
    ckpt, _ = emcad_b0_checkpoint
    root = bundle_copy(tmp_path, "emcad")
    before = tree_digest(root)
    rc = import_weights.main(["--bundle", "emcad", "--from", "authors", str(ckpt), "--bundle-root", str(root)])
    err = capsys.readouterr().err
    assert rc == 1
    assert str(ckpt) in err and "does not fit" in err
    assert "out_channels=9" in err and "out_channels=3" in err and "'pvt_v2_b0'" in err and "to proceed" in err
    assert tree_digest(root) == before and not (root / "models").exists()


def test_emcad_import_into_a_bundle_set_to_the_checkpoint(tmp_path, emcad_b0_checkpoint):
    """The 'how to proceed' path: a copy of the bundle whose network_def is the checkpoint's network."""
    ckpt, expected = emcad_b0_checkpoint
    root = bundle_copy(tmp_path, "emcad")
    config_file = root / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    config["network_def"].update(in_channels=1, out_channels=9, encoder="pvt_v2_b0", input_adapter="conv")
    config_file.write_text(json.dumps(config, indent=4))
    assert import_weights.main(["--bundle", "emcad", "--from", "authors", str(ckpt), "--bundle-root", str(root)]) == 0
    sd = torch.load(root / "models" / "model.pt", weights_only=True)
    assert set(sd) == set(expected) and all(torch.equal(sd[k], expected[k]) for k in sd)


@pytest.mark.parametrize("kind", ["not_a_checkpoint", "unknown_key", "missing_file"])
def test_bad_checkpoints_fail_clearly(tmp_path, dalight_checkpoint, capsys, kind):
    root = bundle_copy(tmp_path, "dalight3d")
    before = tree_digest(root)
    path = tmp_path / "bad.pth"
    if kind == "not_a_checkpoint":
        path.write_text("not a checkpoint")
    elif kind == "unknown_key":
        sd = torch.load(dalight_checkpoint[0], weights_only=True)
        sd["module.encoder.extra.weight"] = torch.zeros(2)
        torch.save(sd, path)
    rc = import_weights.main(["--bundle", "dalight3d", "--from", "authors", str(path), "--bundle-root", str(root)])
    err = capsys.readouterr().err
    assert rc == 1 and str(path) in err and err.count("error:") == 1
    expected = {"not_a_checkpoint": "not a PyTorch checkpoint", "unknown_key": "'encoder.extra.weight'",
                "missing_file": "no such file"}[kind]
    assert expected in err
    assert tree_digest(root) == before


def glims_checkpoint(path: Path, seed: int, feature_size: int) -> dict:
    """A seeded ``GLIMS.authors_release`` saved as the authors' trainer saves it (``{"epoch", "best_acc",
    "state_dict"}``, their names, their relative-position-index buffers); returns our state dict."""
    torch.manual_seed(seed)
    net = GLIMS.authors_release(4, 3, feature_size)
    authors = to_authors_layout(net.state_dict(), conv_glims.RULES)
    index = relative_position_index([7, 7, 7], [7, 7, 7], torch.device("cpu"))
    for key in [k for k in authors if k.endswith(".attn.relative_position_bias_table")]:
        authors[key.replace("bias_table", "index")] = index.clone()
    torch.save({"epoch": 100, "best_acc": 0.9, "state_dict": authors}, path)
    return net.state_dict()


def test_glims_import_two_ensemble_members(tmp_path, capsys):
    """Two authors' checkpoints (feature size 6) into a glims bundle copy set to that size: models/model.pt and,
    with --model-file, models/model_2.pt (inference_authors.json's ckpt_path_2), both recorded."""
    feature = 6
    root = bundle_copy(tmp_path, "glims")
    for config_name in ("inference.json", "inference_authors.json"):
        config_file = root / "configs" / config_name
        config = json.loads(config_file.read_text())
        config["network_def"]["feature_size"] = feature
        config_file.write_text(json.dumps(config, indent=4))
    expected, shas = {}, {}
    for file, seed in (("models/model.pt", 1), ("models/model_2.pt", 2)):
        ckpt = tmp_path / f"fold{seed}_model.pt"
        expected[file] = glims_checkpoint(ckpt, seed, feature)
        argv = ["--bundle", "glims", "--from", "authors", str(ckpt), "--bundle-root", str(root)]
        if file != "models/model.pt":
            argv += ["--model-file", file]
        assert import_weights.main(argv) == 0
        out = capsys.readouterr().out
        assert "finite" in out and "note: the weights compute the authors' network in GLIMS.authors_release" in out
        shas[file] = hashlib.sha256((root / file).read_bytes()).hexdigest()
        record = json.loads((root / "configs" / "metadata.json").read_text())["weights"][file]
        assert record["sha256"] == shas[file] and record["converter"] == "medseg_nets.convert.glims"
        assert record["source_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    large = (root / "large_files.yml").read_text()
    card = (root / "docs" / "README.md").read_text()
    for file, sha in shas.items():
        assert f'- path: "{file}"' in large and f'hash_val: "{sha}"' in large
        assert card.count(f"| `{file}` |") == 1 and sha in card
    # both load strict into the authors' network and give finite outputs
    for file, want in expected.items():
        sd = torch.load(root / file, weights_only=True)
        assert set(sd) == set(want) and all(torch.equal(sd[k], want[k]) for k in sd)
        net = GLIMS.authors_release(4, 3, feature).eval()  # img_size 96: embeddings resampled for 32^3
        net.load_state_dict(sd, strict=True)
        with torch.no_grad():
            assert torch.isfinite(net(torch.randn(1, 4, 32, 32, 32))).all()
    # the card's ensemble: inference_authors.json with ckpt_path_2 builds a two-member ensemble of these files
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(root / "configs" / "inference.json"), str(root / "configs" / "inference_authors.json")])
    parser.update({"bundle_root": str(root), "ckpt_path_2": str(root / "models" / "model_2.pt")})
    ensemble = parser.get_parsed_content("ensemble")
    assert ensemble.checkpoints == [str(root / f) for f in expected]


def test_model_file_outside_models_refused(tmp_path, capsys):
    root = bundle_copy(tmp_path, "glims")
    with pytest.raises(SystemExit):
        import_weights.main(["--bundle", "glims", "--from", "authors", str(tmp_path / "x.pt"), "--bundle-root",
                             str(root), "--model-file", "../model.pt"])
    assert "expected a .pt file under models/" in capsys.readouterr().err
