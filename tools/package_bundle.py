#!/usr/bin/env python
"""Package a bundle as the MONAI Model Zoo shares it, and prove that MONAI can download and load the package.

Output (in ``--out``, default ``build/zoo``):
  ``<name>_v<version>.zip``      the folder ``<name>/`` with LICENSE, configs/, docs/, models/ (when it holds files)
                                 and scripts/ (when present); ``<version>`` is metadata.json's ``version``.
                                 Left out: anything else at the top (eval/, runs/, outputs), caches (__pycache__,
                                 .pytest_cache, .ipynb_checkpoints), hidden files, ``*.pyc``, training checkpoints
                                 (``checkpoint_*``).
  ``<name>_v<version>_<file>``   one copy of each weight file of models/ (``*.pt``, ``*.ts``, ``*.pth``, ``*.onnx``,
                                 ``*.safetensors``, ...): the release assets that ``large_files.yml`` points at.

Weights: as in the Model Zoo's repository, trained weights are not stored in the bundle but named in
``<name>/large_files.yml`` (written into the zip when models/ holds weights), the zoo's format:

    large_files:
      - path: "models/model.pt"
        url: "<base-url>/<name>_v<version>_model.pt"
        hash_val: "<sha256 of the file>"
        hash_type: "sha256"

``python -m monai.bundle download_large_files --bundle_path <name>`` fetches them and checks each sha256.
``--base-url`` is where the assets will be published (e.g. a GitHub release:
``https://github.com/<owner>/<repo>/releases/download/<tag>``); by default it is the ``file://`` URL of the output
folder, which works on this machine (and on a shared filesystem) only. With ``--include-weights`` the weights are also
put inside the zip (large_files.yml is still written: MONAI then only checks their sha256). A bundle whose models/
holds no weights is packaged without large_files.yml (or with its own, copied unchanged, if it has one).

``--check``: the round trip a user makes, offline, into a temporary folder:
  1. ``monai.bundle.download(name=<name>, version=<version>, bundle_dir=<tmp>, url="file://.../<zip>")`` (the same as
     ``python -m monai.bundle download --name <name> --version <version> --bundle_dir <tmp> --url file://...``;
     every ``--source`` of MONAI 1.6.1 -- github, monaihosting, ngc, ngc_private, huggingface_hub -- needs a network,
     ``--url`` is the one that works offline, through urllib, which reads ``file://``);
  2. the extracted ``<tmp>/<name>`` holds the packaged files and metadata.json names the version;
  3. with a large_files.yml: ``monai.bundle.download_large_files`` fetches every weight from its url and checks its
     sha256; then ``monai.bundle.load(name, bundle_dir=<tmp>, workflow_type="inference")`` builds ``network_def``
     from the extracted inference.json and loads models/model.pt (checked again with a strict ``load_state_dict``);
  4. otherwise ``network_def`` is instantiated from the extracted inference.json (``ConfigParser``).

Usage:
    python tools/package_bundle.py bundles/dalight3d                  # -> build/zoo/dalight3d_v0.1.1.zip
    python tools/package_bundle.py --all --check                      # every bundle, each round-tripped through MONAI
    python tools/package_bundle.py bundles/glims --out dist --base-url https://github.com/ORG/REPO/releases/download/v1
    python tools/package_bundle.py bundles/glims --include-weights    # weights inside the zip too
The exit status is non-zero when any bundle fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # verify_bundle, when imported from elsewhere

from verify_bundle import BUNDLES_DIR, all_bundles  # noqa: E402

from medseg_nets.utils import file_sha256  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "build" / "zoo"
TOP_LEVEL = ("LICENSE", "configs", "docs", "models", "scripts")  # what a zoo bundle carries
EXCLUDED_DIRS = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints", ".git", "eval", "runs"}
EXCLUDED_FILES = ("*.pyc", "checkpoint_*", ".*")  # compiled files, training checkpoints, hidden files
WEIGHT_SUFFIXES = {".pt", ".pth", ".ts", ".onnx", ".safetensors", ".ckpt", ".bin", ".plan", ".engine"}
LARGE_FILES = "large_files.yml"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same bundle gives the same zip, byte for byte


class PackageError(RuntimeError):
    """The bundle cannot be packaged (missing metadata, version not in the changelog, ...)."""


@dataclass
class Package:
    name: str
    version: str
    zip_path: Path
    files: list[str]  # paths inside the zip, "<name>/..."
    large_files: list[dict] = field(default_factory=list)  # large_files.yml entries
    assets: list[Path] = field(default_factory=list)  # weight copies next to the zip

    @property
    def url(self) -> str:
        return self.zip_path.resolve().as_uri()


def read_version(bundle: Path) -> str:
    meta_file = bundle / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise PackageError(f"{bundle} has no configs/metadata.json: not a bundle folder")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise PackageError(f"{meta_file} is not valid JSON: {e}") from e
    version = meta.get("version")
    if not isinstance(version, str) or not version:
        raise PackageError(f"{meta_file} has no 'version'")
    if version not in meta.get("changelog", {}):
        raise PackageError(f"{meta_file}: version {version} is not a key of the changelog (the Model Zoo requires it)")
    return version


def _excluded(rel: Path) -> bool:
    return any(p in EXCLUDED_DIRS for p in rel.parts[:-1]) or any(fnmatch(rel.name, pat) for pat in EXCLUDED_FILES)


def collect(bundle: Path) -> tuple[list[Path], list[Path], list[str]]:
    """Return (files to package, weight files under models/, what was left out), paths relative to ``bundle``."""
    files, weights, skipped = [], [], []
    for top in sorted(bundle.iterdir()):
        if top.name not in TOP_LEVEL and top.name != LARGE_FILES:
            skipped.append(top.name + ("/" if top.is_dir() else ""))
            continue
        for path in sorted([top] if top.is_file() else (p for p in top.rglob("*") if p.is_file())):
            rel = path.relative_to(bundle)
            if _excluded(rel):
                skipped.append(str(rel))
            elif rel.parts[0] == "models" and path.suffix.lower() in WEIGHT_SUFFIXES:
                weights.append(rel)
            else:
                files.append(rel)
    return files, weights, skipped


def large_files_yml(entries: list[dict]) -> str:
    """The zoo's large_files.yml (JSON strings are valid YAML double-quoted scalars)."""
    lines = ["large_files:"]
    for e in entries:
        lines.append(f"  - path: {json.dumps(e['path'])}")
        lines += [f"    {k}: {json.dumps(e[k])}" for k in ("url", "hash_val", "hash_type")]
    return "\n".join(lines) + "\n"


def _add(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def package(bundle: str | Path, out_dir: str | Path = DEFAULT_OUT, base_url: str | None = None,
            include_weights: bool = False, log: Callable[[str], None] = print) -> Package:
    """Write ``<out_dir>/<name>_v<version>.zip`` (and the weight assets); return what was written."""
    from medseg_nets.utils.fileio import atomic_write

    bundle = Path(bundle).resolve()
    if not bundle.is_dir():
        raise PackageError(f"{bundle} is not a folder")
    name, version = bundle.name, read_version(bundle)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    files, weights, skipped = collect(bundle)
    for required in ("configs/metadata.json", "configs/inference.json", "LICENSE"):
        if Path(required) not in files:
            raise PackageError(f"{bundle} lacks {required} (required by the Model Zoo)")
    prefix = f"{name}_v{version}"
    base = (base_url or out_dir.as_uri()).rstrip("/")

    entries, assets = [], []
    for rel in weights:
        asset = out_dir / f"{prefix}_{'_'.join(rel.parts[1:])}"
        atomic_write(asset, lambda tmp, src=bundle / rel: shutil.copyfile(src, tmp))
        assets.append(asset)
        entries.append({"path": rel.as_posix(), "url": f"{base}/{asset.name}", "hash_val": file_sha256(asset),
                        "hash_type": "sha256"})
    if entries and Path(LARGE_FILES) in files:
        log(f"  {name}: models/ holds weights, so its {LARGE_FILES} is replaced by a new one")
        files.remove(Path(LARGE_FILES))

    contents: list[tuple[str, Path | bytes]] = [(f"{name}/{rel.as_posix()}", bundle / rel) for rel in files]
    if entries:
        contents.append((f"{name}/{LARGE_FILES}", large_files_yml(entries).encode()))
        if include_weights:
            contents += [(f"{name}/{rel.as_posix()}", bundle / rel) for rel in weights]
    contents.sort(key=lambda c: c[0])

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w") as zf:
            for arcname, src in contents:
                _add(zf, arcname, src if isinstance(src, bytes) else src.read_bytes())

    zip_path = atomic_write(out_dir / f"{prefix}.zip", write)
    log(f"  wrote {zip_path} ({len(contents)} files, sha256 {file_sha256(zip_path)})")
    if skipped:
        log(f"  left out: {', '.join(skipped)}")
    for e, asset in zip(entries, assets):
        where = "in the zip and " if include_weights else ""
        log(f"  weight {e['path']}: {where}{asset.name}, sha256 {e['hash_val']}, url {e['url']}")
    if entries and base_url is None:
        log("  note: the urls in large_files.yml are file:// urls of this machine; pass --base-url to publish")
    return Package(name, version, zip_path, [c[0] for c in contents], entries, assets)


def check(pkg: Package, work_dir: str | Path | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Download ``pkg`` with ``monai.bundle.download`` from its file:// url, extract it, fetch its large files and
    build ``network_def`` from the extracted inference.json. Return the failures (empty: MONAI accepts it)."""
    if work_dir is not None:
        return _check(pkg, Path(work_dir), log)
    with tempfile.TemporaryDirectory() as tmp:
        return _check(pkg, Path(tmp), log)


def _check(pkg: Package, bundle_dir: Path, log: Callable[[str], None]) -> list[str]:
    import torch
    from monai.bundle import ConfigParser, download, download_large_files, load

    bundle_dir.mkdir(parents=True, exist_ok=True)
    log(f"  check: python -m monai.bundle download --name {pkg.name} --version {pkg.version} "
        f"--bundle_dir {bundle_dir} --url {pkg.url}")
    with warnings.catch_warnings():  # download() takes no hash for a url: the zip's sha256 is compared below
        warnings.filterwarnings("ignore", message="No hash value provided")
        download(name=pkg.name, version=pkg.version, bundle_dir=str(bundle_dir), url=pkg.url, progress=False)
    if file_sha256(bundle_dir / f"{pkg.name}.zip") != file_sha256(pkg.zip_path):
        return [f"the downloaded {pkg.name}.zip differs from {pkg.zip_path}"]
    root = bundle_dir / pkg.name
    missing = [f for f in pkg.files if not (bundle_dir / f).is_file()]
    if missing:
        return [f"not extracted from the zip: {missing}"]
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    if meta.get("version") != pkg.version:
        return [f"extracted metadata.json has version {meta.get('version')}, expected {pkg.version}"]
    log(f"  check: extracted {len(pkg.files)} files into {root}")

    if (root / LARGE_FILES).is_file():
        log(f"  check: python -m monai.bundle download_large_files --bundle_path {root}")
        download_large_files(bundle_path=str(root))  # raises HashCheckError on a sha256 mismatch
        for e in pkg.large_files:
            if file_sha256(root / e["path"]) != e["hash_val"]:
                return [f"{e['path']}: sha256 differs from large_files.yml after download"]
        log(f"  check: {len(pkg.large_files)} large file(s) fetched, sha256 verified")

    weights = root / "models" / "model.pt"
    if weights.is_file():
        net = load(name=pkg.name, bundle_dir=str(bundle_dir), workflow_type="inference", device="cpu",
                   progress=False)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        log(f"  check: monai.bundle.load built network_def ({type(net).__name__}) and loaded models/model.pt")
    else:
        parser = ConfigParser()
        parser.read_config(str(root / "configs" / "inference.json"))
        parser.read_meta(str(root / "configs" / "metadata.json"))
        parser["bundle_root"] = str(root)
        net = parser.get_parsed_content("network_def")
        log(f"  check: network_def ({type(net).__name__}, {sum(p.numel() for p in net.parameters()):,} parameters) "
            "instantiated from the extracted inference.json (no weights to load)")
    if (root / "models" / "model.ts").is_file():
        torch.jit.load(str(root / "models" / "model.ts"), map_location="cpu")
        log("  check: models/model.ts loads with torch.jit.load")
    if not isinstance(net, torch.nn.Module):
        return [f"network_def is a {type(net).__name__}, not a torch.nn.Module"]
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="*", help="bundle folders, e.g. bundles/dalight3d")
    p.add_argument("--all", action="store_true", help=f"every bundle under {BUNDLES_DIR} (with configs/metadata.json)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    p.add_argument("--base-url", default=None,
                   help="where the weight assets will be published; default: the file:// url of --out")
    p.add_argument("--include-weights", action="store_true", help="also put the weights inside the zip")
    p.add_argument("--check", action="store_true",
                   help="download the zip with monai.bundle into a temporary folder and build network_def from it")
    a = p.parse_args(argv)
    bundles = [Path(b) for b in a.bundles] + (all_bundles() if a.all else [])
    bundles = list(dict.fromkeys(b.resolve() for b in bundles))
    if not bundles:
        p.error("name at least one bundle folder, or --all")
    results: dict[str, list[str]] = {}
    for b in bundles:
        print(f"{b.name}:")
        try:
            pkg = package(b, a.out, a.base_url, a.include_weights)
            errors = check(pkg) if a.check else []
        except Exception as e:  # a failure of one bundle does not stop the others
            errors = [f"{type(e).__name__}: {e}"]
        results[b.name] = errors
        print(f"{'PASS' if not errors else 'FAIL'} {b.name}" + "".join(f"\n    {e}" for e in errors))
    failed = [n for n, e in results.items() if e]
    print(f"\nsummary: {len(results) - len(failed)} of {len(results)} bundle(s) packaged"
          + (" and checked" if a.check else "") + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
