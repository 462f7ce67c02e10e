#!/usr/bin/env python
"""Write a bundle that is another bundle with other data: its configs generated from the base bundle's.

A variant is described by ``tools/variants/<name>.json``::

    {"base": "glims",
     "omit": ["configs/inference_authors.json"],  # base config files that do not apply to the variant's data
     "configs": {<top-level id>: <value>, ...},   # replace the base's id in every config file that has it;
                                                   # an id the base lacks goes where it is referred to (@id)
     "metadata": {...}}                            # merged into the base's metadata.json

and written to ``bundles/<name>/``: ``configs/*.json`` (each of the base's config files with the ids it has replaced,
in the base's order), ``configs/metadata.json`` (dicts merged key by key, other values replaced; ``changelog`` and
``version`` are the variant's own), ``configs/logging.conf`` and ``LICENSE`` copied. The model card
(``docs/README.md``) and ``docs/data_license.txt`` are the variant's own, written by hand. So the variant differs
from its base only where the data differ, with no logic copied: change the base, then regenerate.

    python tools/make_variant.py glims_btcv           # (re)write bundles/glims_btcv
    python tools/make_variant.py --all --check        # exit 1 listing the files that are out of sync
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ROOT / "tools" / "variants"
COPIED = ("configs/logging.conf", "LICENSE")


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=4, ensure_ascii=False) + "\n"


def render(name: str) -> dict[str, str | bytes]:
    """Relative path in ``bundles/<name>`` -> content, for every generated file."""
    spec = json.loads((VARIANTS / f"{name}.json").read_text())
    base = ROOT / "bundles" / spec["base"]
    overrides: dict[str, Any] = spec["configs"]
    files: dict[str, str | bytes] = {}
    used: set[str] = set()
    omit = set(spec.get("omit", []))
    config_files = [f for f in sorted((base / "configs").glob("*.json")) if f"configs/{f.name}" not in omit]
    base_ids = {k for f in config_files for k in json.loads(f.read_text())}
    new_ids = [k for k in overrides if k not in base_ids]
    for f in config_files:
        if f.name == "metadata.json":
            continue
        config = json.loads(f.read_text())
        for k in config:
            if k in overrides:
                config[k] = copy.deepcopy(overrides[k])
                used.add(k)
        # ids the base has nowhere (e.g. BTCV's intensity_range) go into the files that refer to them
        changed = True
        while changed:
            text, changed = json.dumps(config), False
            for k in new_ids:
                if k not in config and re.search(rf"@{re.escape(k)}(?![\w#])|@{re.escape(k)}#", text):
                    config[k] = copy.deepcopy(overrides[k])
                    used.add(k)
                    changed = True
        files[f"configs/{f.name}"] = _dump(config)
    unused = sorted(set(overrides) - used)
    if unused:
        raise ValueError(f"tools/variants/{name}.json: ids {unused} are neither in {base}/configs/*.json nor used")
    meta = json.loads((base / "configs" / "metadata.json").read_text())
    over = spec["metadata"]
    meta = _merge({k: v for k, v in meta.items() if k not in ("changelog", "version")}, over)
    meta = {"schema": meta.pop("schema"), "version": over["version"], "changelog": over["changelog"], **meta}
    files["configs/metadata.json"] = _dump(meta)
    for rel in COPIED:
        files[rel] = (base / rel).read_bytes()
    return files


def out_of_sync(name: str) -> list[str]:
    """Generated files that differ from what ``render`` gives, and config files that it no longer generates."""
    dst = ROOT / "bundles" / name
    files = render(name)
    bad = []
    for rel, content in files.items():
        p = dst / rel
        data = content if isinstance(content, bytes) else content.encode()
        if not p.is_file() or p.read_bytes() != data:
            bad.append(str(p.relative_to(ROOT)))
    bad += [str(p.relative_to(ROOT)) for p in sorted((dst / "configs").glob("*.json")) if f"configs/{p.name}" not in files]
    return bad


def write(name: str) -> list[Path]:
    dst = ROOT / "bundles" / name
    written = []
    for rel, content in render(name).items():
        p = dst / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        written.append(p)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="variants (tools/variants/<name>.json)")
    p.add_argument("--all", action="store_true", help="every variant in tools/variants")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file differs")
    a = p.parse_args(argv)
    names = sorted(f.stem for f in VARIANTS.glob("*.json")) if a.all else a.names
    if not names:
        p.error("name a variant or pass --all")
    status = 0
    for name in names:
        if a.check:
            bad = out_of_sync(name)
            if bad:
                status = 1
                print(f"{name}: out of sync with its base, run `python tools/make_variant.py {name}`: "
                      + ", ".join(bad))
            else:
                print(f"{name}: in sync")
        else:
            for path in write(name):
                print(f"wrote {path.relative_to(ROOT)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
