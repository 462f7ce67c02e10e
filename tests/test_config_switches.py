"""Switches given on the command line (``--amp false``) must mean what they say in every bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from medseg_nets.utils import as_bool

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


@pytest.mark.parametrize("text,expected", [("false", False), ("False", False), ("0", False), ("no", False),
                                           ("off", False), ("true", True), ("TRUE", True), ("1", True),
                                           ("yes", True), (True, True), (False, False), (0, False)])
def test_as_bool_spellings(text, expected):
    assert as_bool(text) is expected


def test_as_bool_rejects_other_words():
    with pytest.raises(ValueError, match="expected a boolean"):
        as_bool("maybe")


def _amp_values(node, path=""):
    """Every ``"amp": ...`` value below an engine in a config (the top-level default excluded)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "amp" and path:
                yield f"{path}#{k}", v
            yield from _amp_values(v, f"{path}#{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _amp_values(v, f"{path}#{i}")


@pytest.mark.parametrize("bundle", sorted(p.name for p in BUNDLES.iterdir() if (p / "configs").is_dir()))
def test_engines_parse_amp_switch(bundle):
    """Each engine's ``amp`` goes through ``as_bool``, so that ``--amp false`` turns AMP off (a raw string would
    be truthy)."""
    found = 0
    for name in ("train.json", "inference.json"):
        config = json.loads((BUNDLES / bundle / "configs" / name).read_text())
        for where, value in _amp_values(config):
            found += 1
            assert value == "$medseg_nets.utils.as_bool(@amp)", f"{bundle}/{name} {where}: {value!r}"
    assert found >= 3
    parser = ConfigParser({"amp": "false", "probe": "$medseg_nets.utils.as_bool(@amp)"},
                          globals={"medseg_nets": "medseg_nets"})
    assert parser.get_parsed_content("probe") is False
