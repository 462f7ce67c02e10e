"""medseg_nets.utils.keep_freed_memory: glibc malloc reuses freed memory for large CPU tensors (no page faults on
the second allocation), is off when the switch or the device says so, and every bundle config calls it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medseg_nets.utils import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]

# allocate, touch and free a 256 MiB tensor four times; print the minor page faults of rounds 2 to 4
_PROBE = """
import resource, sys, torch
from medseg_nets.utils import keep_freed_memory
taken = keep_freed_memory("cpu", sys.argv[1])
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for i in range(4):
    before = faults()
    t = torch.ones(64 * 2**20)
    del t
    counts.append(faults() - before)
print(taken, *counts[1:])
"""


def _later_round_faults(enabled: str) -> tuple[bool, list[int]]:
    out = subprocess.run([sys.executable, "-c", _PROBE, enabled], capture_output=True, text=True, check=True)
    taken, *faults = out.stdout.split()
    return taken == "True", [int(f) for f in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_second_allocation_reuses_memory():
    taken, faults = _later_round_faults("true")
    if not taken:
        pytest.skip("not glibc")
    plain_taken, plain_faults = _later_round_faults("false")
    assert not plain_taken
    pages = 256 * 2**20 // 4096
    assert min(plain_faults) > pages // 2  # by default the freed block is unmapped: touching it again faults
    # kept: a later round reuses a freed block (a small allocation in between can split the first one, so that one
    # round grows the heap instead)
    assert min(faults) < pages // 20, faults


def test_switched_off():
    assert keep_freed_memory("cpu", "false") is False
    assert keep_freed_memory("cpu", False) is False
    assert keep_freed_memory("cuda") is False
    with pytest.raises(ValueError, match="boolean"):
        keep_freed_memory("cpu", "maybe")


@pytest.mark.parametrize("config", ["train", "evaluate", "inference", "multi_gpu_train"])
def test_every_bundle_config_calls_it(config):
    for bundle in sorted(p.parent.parent.name for p in ROOT.glob("bundles/*/configs/metadata.json")):
        c = json.loads((ROOT / "bundles" / bundle / "configs" / f"{config}.json").read_text())
        assert c["initialize"][0] == "$medseg_nets.utils.keep_freed_memory(@device, @cpu_keep_freed_memory)", bundle
        if config in ("train", "inference"):
            assert c["cpu_keep_freed_memory"] is True, bundle
