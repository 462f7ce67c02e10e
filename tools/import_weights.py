#!/usr/bin/env python
"""Import weights trained with the authors' own code into a bundle: ``models/model.pt`` with its provenance.

    python tools/import_weights.py --bundle dalight3d --from authors best_model.pth
    python tools/import_weights.py --bundle emcad --from authors best.pth --bundle-root /path/to/copy/of/emcad
    python tools/import_weights.py --bundle glims --from authors fold4_model.pt --model-file models/model_2.pt

Steps, all before anything is written:
  1. load the checkpoint (``torch.load(..., weights_only=True)``) and convert it with
     ``medseg_nets.convert.convert_authors_state_dict(<bundle>, checkpoint)`` (wrappers and ``module.`` prefixes
     removed, every key mapped explicitly; an unknown or missing key is an error naming it);
  2. build the bundle's network from its own ``configs/inference.json`` ``network_def`` (``monai.bundle.ConfigParser``)
     and compare: a key or a shape that does not fit is an error naming the file, what differs and how to proceed;
  3. ``load_state_dict(strict=True)`` and one forward pass in eval mode on a small synthetic input with the bundle's
     channels and a spatial size allowed by metadata.json (``8*n`` -> 32): the output must be finite.
Then (each file written atomically):
  - ``<bundle>/models/model.pt`` (or the ``--model-file``, e.g. ``models/model_2.pt`` for a second ensemble member
    such as glims' ``ckpt_path_2``): the converted state dict;
  - ``configs/metadata.json``: a ``weights`` record for that file (source file, its sha256, the file's sha256, url,
    converter, date, command); records of other files are kept;
  - ``<bundle>/large_files.yml``: the Model Zoo entries (path, url, sha256) of every file with a ``weights`` record,
    the format ``tools/package_bundle.py`` writes and accepts (packaging rewrites the urls with ``--base-url``);
  - ``docs/README.md``: the file's row of the model card's weights table (between ``<!-- weights-table -->``
    markers).
Any failure: one message naming the file and what was expected, exit status 1, nothing written.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # package_bundle, when imported from elsewhere

from package_bundle import large_files_yml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ("glims", "emcad", "dalight3d")  # bundles whose network has a converter in medseg_nets.convert
TABLE_BEGIN, TABLE_END = "<!-- weights-table -->", "<!-- /weights-table -->"
TABLE_HEADER = (
    "| file | source | source sha256 | file sha256 | imported (UTC) | command |\n"
    "|---|---|---|---|---|---|\n"
)


class WeightsImportError(RuntimeError):
    """A checkpoint that cannot be imported into the bundle; the message says why and how to proceed."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _describe(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def build_network(bundle_root: Path):
    """The bundle's ``network_def`` and its arguments, from its own configs/inference.json."""
    from monai.bundle import ConfigParser

    config_file = bundle_root / "configs" / "inference.json"
    if not config_file.is_file():
        raise WeightsImportError(f"{bundle_root} has no configs/inference.json: not a bundle folder")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(bundle_root)
    network_def = parser.get("network_def")
    if not isinstance(network_def, dict) or "_target_" not in network_def:
        raise WeightsImportError(f"{config_file}: network_def is not a plain '_target_' entry")
    net = parser.get_parsed_content("network_def", instantiate=True)
    return net, {k: v for k, v in network_def.items() if not k.startswith("_")}


def synthetic_input(bundle_root: Path, net_args: dict[str, Any]):
    import torch

    meta = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    spatial = []
    for s in image["spatial_shape"]:
        if isinstance(s, int):
            spatial.append(s)
        elif str(s) == "*":  # any size (e.g. the number of slices of a volume): a small one
            spatial.append(2)
        else:  # "k*n": the smallest multiple of k that is at least 32
            k = int(str(s).split("*")[0])
            spatial.append(k * max(1, -(-32 // k)))
    channels = int(net_args.get("in_channels", image["num_channels"]))
    return torch.randn(1, channels, *spatial, generator=torch.Generator().manual_seed(0))


def _mismatch(path: Path, bundle: str, converted: dict, own: dict, net_args: dict, state_dict: dict) -> str:
    missing = [k for k in own if k not in converted]
    extra = [k for k in converted if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(converted[k].shape)} vs bundle {tuple(own[k].shape)}"
        for k in own
        if k in converted and tuple(converted[k].shape) != tuple(own[k].shape)
    ]
    lines = [f"{path}: the checkpoint does not fit the {bundle} bundle's network (configs/inference.json network_def)"]
    if shapes:
        lines.append(f"  {len(shapes)} shape(s) differ: " + "; ".join(shapes[:6]) + (" ..." if len(shapes) > 6 else ""))
    if missing:
        lines.append(f"  {len(missing)} key(s) the bundle's network needs are not in it: {', '.join(missing[:6])}")
    if extra:
        lines.append(f"  {len(extra)} key(s) the bundle's network does not have: {', '.join(extra[:6])}")
    module = importlib.import_module(f"medseg_nets.convert.{bundle}")
    if hasattr(module, "network_kwargs"):
        try:
            lines.append(f"  the checkpoint is a network with {_describe(module.network_kwargs(state_dict))}")
        except Exception:  # the description is a courtesy; the mismatch itself is the error
            pass
    lines.append(f"  the bundle's network_def has {_describe(net_args)}")
    lines.append(
        "  to proceed: use a checkpoint trained for this bundle's inputs and outputs, or copy the bundle and set its "
        "network_def (all configs) to the checkpoint's arguments, then run this command with --bundle-root on the copy"
    )
    return "\n".join(lines)


def prepare(bundle: str, checkpoint: Path, bundle_root: Path) -> tuple[bytes, str, dict]:
    """Convert and verify; return (model.pt bytes, source sha256, summary). Writes nothing."""
    import torch

    from medseg_nets.convert import AuthorsCheckpointError, convert_authors_state_dict, unwrap_checkpoint

    if not checkpoint.is_file():
        raise WeightsImportError(
            f"{checkpoint}: no such file (expected a checkpoint saved by the authors' {bundle} code)"
        )
    if not (bundle_root / "configs" / "metadata.json").is_file():
        raise WeightsImportError(f"{bundle_root}: not a bundle folder (configs/metadata.json missing)")
    raw = checkpoint.read_bytes()
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsImportError(
            f"{checkpoint}: not a PyTorch checkpoint of tensors ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err
    try:
        importlib.import_module(f"medseg_nets.convert.{bundle}")
    except ModuleNotFoundError as err:
        raise WeightsImportError(
            f"{checkpoint}: this installation of medseg_nets has no converter for {bundle} "
            f"(medseg_nets.convert.{bundle})"
        ) from err
    try:
        state_dict = unwrap_checkpoint(obj)
        converted = convert_authors_state_dict(bundle, obj)
    except AuthorsCheckpointError as err:
        raise WeightsImportError(f"{checkpoint}: not an authors' {bundle} checkpoint: {err}") from err
    net, net_args = build_network(bundle_root)
    own = net.state_dict()
    if set(own) != set(converted) or any(tuple(own[k].shape) != tuple(converted[k].shape) for k in own):
        raise WeightsImportError(_mismatch(checkpoint, bundle, converted, own, net_args, state_dict))
    net.load_state_dict(converted, strict=True)
    net.eval()
    x = synthetic_input(bundle_root, net_args)
    with torch.no_grad():
        y = net(x)
    outputs = [y] if torch.is_tensor(y) else list(y.values()) if isinstance(y, dict) else list(y)
    if not outputs or not all(torch.is_tensor(o) and torch.isfinite(o).all() for o in outputs):
        raise WeightsImportError(f"{checkpoint}: the converted weights give non-finite outputs on a synthetic input")
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, buf)
    summary = {"parameters": sum(p.numel() for p in net.parameters()), "input": list(x.shape),
               "output": [list(o.shape) for o in outputs]}
    module = importlib.import_module(f"medseg_nets.convert.{bundle}")
    summary["notes"] = list(module.import_notes(net_args)) if hasattr(module, "import_notes") else []
    return buf.getvalue(), sha256_bytes(raw), summary


def model_file(value: str) -> str:
    """``--model-file``: a ``.pt`` file under the bundle's models/, as a relative POSIX path."""
    path = Path(value)
    if path.is_absolute() or ".." in path.parts or path.parts[:1] != ("models",) or path.suffix != ".pt":
        raise argparse.ArgumentTypeError(f"{value!r}: expected a .pt file under models/, e.g. models/model_2.pt")
    return path.as_posix()


def weights_table(readme: str, row: str, file: str = "models/model.pt") -> str:
    """The model card with ``row`` as the ``file`` row of its weights table (added when absent)."""
    if TABLE_BEGIN in readme and TABLE_END in readme:
        head, rest = readme.split(TABLE_BEGIN, 1)
        body, tail = rest.split(TABLE_END, 1)
        rows = [r for r in body.strip().splitlines()[2:] if r.strip() and not r.startswith(f"| `{file}` |")]
        return head + TABLE_BEGIN + "\n" + TABLE_HEADER + "".join(r + "\n" for r in rows + [row]) + TABLE_END + tail
    section = f"\n## Weights\n{TABLE_BEGIN}\n{TABLE_HEADER}{row}\n{TABLE_END}\n"
    return readme.rstrip("\n") + "\n" + section


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", required=True, choices=BUNDLES)
    ap.add_argument("--from", dest="source", required=True, choices=["authors"],
                    help="where the checkpoint comes from (the authors' own training code)")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--bundle-root", type=Path, default=None, help="bundle folder (default bundles/<bundle>)")
    ap.add_argument("--model-file", type=model_file, default="models/model.pt",
                    help="where the converted weights go, under the bundle's models/ (default models/model.pt; "
                         "e.g. models/model_2.pt for glims' second ensemble member, ckpt_path_2)")
    ap.add_argument("--url", default=None,
                    help="url for large_files.yml (default: the file:// url of the model file; "
                         "tools/package_bundle.py --base-url sets the published one)")
    args = ap.parse_args(argv)
    bundle_root = (args.bundle_root or ROOT / "bundles" / args.bundle).resolve()
    checkpoint = args.checkpoint.resolve()
    try:
        model_bytes, source_sha, summary = prepare(args.bundle, checkpoint, bundle_root)
    except WeightsImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    from medseg_nets.utils.fileio import atomic_write, atomic_write_text

    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    given = argv if argv is not None else sys.argv[1:]
    command = "python tools/import_weights.py " + " ".join(shlex.quote(a) for a in given)
    model_path = bundle_root / args.model_file
    model_sha = sha256_bytes(model_bytes)
    meta_file = bundle_root / "configs" / "metadata.json"
    readme_file = bundle_root / "docs" / "README.md"
    meta = json.loads(meta_file.read_text())
    records = meta.setdefault("weights", {})
    records[args.model_file] = {
        "source": f"{args.source}: {checkpoint.name}",
        "source_sha256": source_sha,
        "sha256": model_sha,
        "url": args.url or model_path.as_uri(),
        "converter": f"medseg_nets.convert.{args.bundle}",
        "date": now.isoformat(),
        "command": command,
    }
    large = large_files_yml([
        {"path": file, "url": rec.get("url") or (bundle_root / file).as_uri(), "hash_val": rec["sha256"],
         "hash_type": "sha256"}
        for file, rec in sorted(records.items())
        if file == args.model_file or (bundle_root / file).is_file()
    ])
    row = (f"| `{args.model_file}` | authors' checkpoint `{checkpoint.name}` (converted by "
           f"`medseg_nets.convert.{args.bundle}`) | `{source_sha}` | `{model_sha}` | {now:%Y-%m-%d %H:%M} | "
           f"`{command}` |")
    readme = weights_table(readme_file.read_text() if readme_file.is_file() else "", row, args.model_file)

    atomic_write(model_path, lambda tmp: Path(tmp).write_bytes(model_bytes))
    atomic_write_text(bundle_root / "large_files.yml", large)
    atomic_write_text(meta_file, json.dumps(meta, indent=4) + "\n")
    atomic_write_text(readme_file, readme)
    print(f"wrote {model_path} (sha256 {model_sha}; {summary['parameters']:,} parameters; forward "
          f"{summary['input']} -> {summary['output']} finite) from {checkpoint} (sha256 {source_sha})")
    print(f"recorded in {meta_file.name} 'weights', {readme_file.relative_to(bundle_root)} and large_files.yml")
    for note in summary["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
