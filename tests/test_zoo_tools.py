"""Model Zoo tooling: tools/package_bundle.py (zip, large_files.yml, a round trip through ``monai.bundle download``)
and the multi-bundle command line of tools/verify_bundle.py.

The Model Zoo checks of each bundle (tools/verify_bundle.py) run in that bundle's own tests/test_bundle_<name>.py;
they are not repeated here. Nothing is written into bundles/: weights are faked in a copy of a bundle.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, run_cli

import package_bundle  # noqa: E402  (tools/ is on sys.path through conftest)
import verify_bundle  # noqa: E402

BUNDLES = verify_bundle.all_bundles()
COPY = "dalight3d"  # the bundle copied for the fake-weights cases (a small network)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _zip_names(pkg) -> set[str]:
    with zipfile.ZipFile(pkg.zip_path) as zf:
        return set(zf.namelist())


def test_every_bundle_is_found():
    names = [b.name for b in BUNDLES]
    assert names == sorted(names) and {"dalight3d", "eamnet", "emcad", "glims"} <= set(names)


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_package_and_round_trip_through_monai_download(bundle, tmp_path):
    """The zip holds <name>/ with the bundle's shared files only; MONAI downloads it from its file:// url, extracts
    it, and network_def is instantiated from the extracted inference.json."""
    lines: list[str] = []
    pkg = package_bundle.package(bundle, tmp_path / "out", log=lines.append)
    version = package_bundle.read_version(bundle)
    assert pkg.zip_path == tmp_path / "out" / f"{bundle.name}_v{version}.zip"
    names = _zip_names(pkg)
    expected = {f"{bundle.name}/{p.relative_to(bundle).as_posix()}" for p in bundle.rglob("*")
                if p.is_file() and p.relative_to(bundle).parts[0] in ("LICENSE", "configs", "docs")
                and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert names == expected
    assert {f"{bundle.name}/configs/metadata.json", f"{bundle.name}/configs/inference.json",
            f"{bundle.name}/LICENSE", f"{bundle.name}/docs/README.md"} <= names
    assert not any("/eval/" in n or "/runs/" in n or "large_files" in n for n in names)  # no weights, no yml
    assert pkg.large_files == [] and pkg.assets == []

    dl = tmp_path / "download"
    assert package_bundle.check(pkg, work_dir=dl, log=lines.append) == [], "\n".join(lines)
    extracted = dl / bundle.name / "configs" / "inference.json"
    assert extracted.read_bytes() == (bundle / "configs" / "inference.json").read_bytes()
    assert any("network_def (" in line and "instantiated from the extracted inference.json" in line for line in lines)


def test_zip_is_reproducible(tmp_path):
    bundle = ROOT / "bundles" / COPY
    a = package_bundle.package(bundle, tmp_path / "a", log=lambda s: None)
    b = package_bundle.package(bundle, tmp_path / "b", log=lambda s: None)
    assert _sha256(a.zip_path) == _sha256(b.zip_path)


def test_command_lines_package_then_monai_bundle_download(tmp_path, capsys):
    """The tool's command line, then MONAI's own: ``python -m monai.bundle download --url file://...``."""
    out = tmp_path / "zoo"
    assert package_bundle.main([str(ROOT / "bundles" / COPY), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"PASS {COPY}" in stdout and "1 of 1 bundle(s) packaged" in stdout
    zip_path = next(out.glob(f"{COPY}_v*.zip"))
    version = zip_path.stem.split("_v")[-1]
    run_cli(["download", "--name", COPY, "--version", version, "--bundle_dir", str(tmp_path / "dl"),
             "--url", zip_path.as_uri()])
    assert (tmp_path / "dl" / COPY / "configs" / "metadata.json").is_file()
    assert (tmp_path / "dl" / COPY / "LICENSE").is_file()


@pytest.fixture()
def bundle_with_weights(tmp_path) -> Path:
    """A copy of a bundle with fake (randomly initialised) weights and the clutter a training run leaves."""
    from monai.bundle import ConfigParser

    src = ROOT / "bundles" / COPY
    copy = tmp_path / "bundles" / COPY
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("eval", "runs", "models", "__pycache__"))
    parser = ConfigParser()
    parser.read_config(str(copy / "configs" / "inference.json"))
    parser["bundle_root"] = str(copy)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    (copy / "models").mkdir()
    torch.save(net.state_dict(), copy / "models" / "model.pt")
    torch.jit.script(torch.nn.Identity()).save(str(copy / "models" / "model.ts"))  # a stand-in TorchScript file
    torch.save({"network": {}}, copy / "models" / "checkpoint_latest.pt")  # training checkpoint: never shared
    (copy / "eval").mkdir()
    (copy / "eval" / "val_metrics.json").write_text("{}")
    (copy / "configs" / "__pycache__").mkdir()
    (copy / "configs" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (copy / "docs" / ".DS_Store").write_bytes(b"\0")
    return copy


def test_weights_go_to_large_files_yml_with_sha256(bundle_with_weights, tmp_path):
    bundle, out = bundle_with_weights, tmp_path / "out"
    lines: list[str] = []
    pkg = package_bundle.package(bundle, out, log=lines.append)
    names = _zip_names(pkg)
    assert f"{COPY}/large_files.yml" in names
    assert not any(n.startswith(f"{COPY}/models/") for n in names)  # weights kept out of the zip
    assert not any("checkpoint_" in n or "/eval/" in n or ".pyc" in n or ".DS_Store" in n for n in names)

    with zipfile.ZipFile(pkg.zip_path) as zf:
        spec = yaml.safe_load(zf.read(f"{COPY}/large_files.yml"))
    entries = {e["path"]: e for e in spec["large_files"]}
    assert set(entries) == {"models/model.pt", "models/model.ts"}  # not the training checkpoint
    version = package_bundle.read_version(bundle)
    for path, e in entries.items():
        assert set(e) == {"path", "url", "hash_val", "hash_type"} and e["hash_type"] == "sha256"
        assert e["hash_val"] == _sha256(bundle / path)  # the sha256 of the bundle's own file
        asset = out / f"{COPY}_v{version}_{Path(path).name}"
        assert e["url"] == asset.as_uri()  # default base url: the output folder
        assert asset.read_bytes() == (bundle / path).read_bytes()

    # MONAI downloads the zip, fetches the weights from their urls with the sha256 check, and loads model.pt
    lines.clear()
    dl = tmp_path / "download"
    assert package_bundle.check(pkg, work_dir=dl, log=lines.append) == [], "\n".join(lines)
    assert (dl / COPY / "models" / "model.pt").read_bytes() == (bundle / "models" / "model.pt").read_bytes()
    assert any("monai.bundle.load built network_def" in line for line in lines)
    assert any("2 large file(s) fetched, sha256 verified" in line for line in lines)


def test_include_weights_and_base_url(bundle_with_weights, tmp_path):
    pkg = package_bundle.package(bundle_with_weights, tmp_path / "out", base_url="https://example.org/rel/",
                                 include_weights=True, log=lambda s: None)
    with zipfile.ZipFile(pkg.zip_path) as zf:
        assert zf.read(f"{COPY}/models/model.pt") == (bundle_with_weights / "models" / "model.pt").read_bytes()
        spec = yaml.safe_load(zf.read(f"{COPY}/large_files.yml"))
    assert all(e["url"].startswith("https://example.org/rel/" + COPY) for e in spec["large_files"])
    # the weights are in the zip: MONAI only checks their sha256, nothing is fetched (the url is not reachable)
    assert package_bundle.check(pkg, work_dir=tmp_path / "dl", log=lambda s: None) == []


def test_tampered_weights_fail_the_check(bundle_with_weights, tmp_path):
    pkg = package_bundle.package(bundle_with_weights, tmp_path / "out", log=lambda s: None)
    asset = next(a for a in pkg.assets if a.name.endswith("model.pt"))
    asset.write_bytes(asset.read_bytes()[:-1] + b"x")
    with pytest.raises(Exception, match="hash check"):
        package_bundle.check(pkg, work_dir=tmp_path / "dl", log=lambda s: None)


def test_package_refuses_a_version_missing_from_the_changelog(tmp_path, capsys):
    copy = tmp_path / COPY
    shutil.copytree(ROOT / "bundles" / COPY, copy, ignore=shutil.ignore_patterns("eval", "models"))
    meta = copy / "configs" / "metadata.json"
    meta.write_text(meta.read_text().replace('"version": "', '"version": "9.9.9-', 1))
    assert package_bundle.main([str(copy), "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {COPY}" in out and "not a key of the changelog" in out
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.zip"))


def test_verify_bundle_command_line_all_and_summary(monkeypatch, capsys):
    """--all selects every bundle; the summary names each and the exit status is non-zero when one fails
    (the checks themselves are stubbed: each bundle's own test runs them for real)."""
    seen = []

    def fake_verify(bundle, n=4, export=True, log=print):
        seen.append(Path(bundle).name)
        return ["metadata: stub failure"] if Path(bundle).name == "eamnet" else []

    monkeypatch.setattr(verify_bundle, "verify", fake_verify)
    assert verify_bundle.main(["--all", "--skip-export"]) == 1
    out = capsys.readouterr().out
    assert seen == [b.name for b in BUNDLES]
    assert "FAIL eamnet (1 failure(s))" in out and "PASS dalight3d" in out and "1 of" in out
    seen.clear()
    # a bundle named twice (as a path and through --all) is checked once
    assert verify_bundle.main([str(ROOT / "bundles" / "dalight3d"), "--all"]) == 1 and seen.count("dalight3d") == 1
    assert verify_bundle.main([str(ROOT / "bundles" / "dalight3d")]) == 0
    with pytest.raises(SystemExit):
        verify_bundle.main([])
