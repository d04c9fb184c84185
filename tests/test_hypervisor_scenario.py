"""Scenario files: the documented example, validation errors, derived values."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from acrn_hsm_emu import abi
from acrn_hsm_emu.hypervisor.scenario import (
    ScenarioError,
    default_scenario,
    load_scenario,
    parse_bdf,
    parse_scenario,
)

DOC = Path(__file__).parent.parent / "docs" / "scenario.md"
SERVICE = {"load_order": "service", "name": "SOS", "cpu_affinity": 0x3}


def doc_example(tmp_path: Path) -> Path:
    block = re.search(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/scenario.md lost its example"
    p = tmp_path / "example.toml"
    p.write_text(block.group(1))
    return p


def test_documented_example_is_the_default(tmp_path: Path) -> None:
    loaded = load_scenario(doc_example(tmp_path))
    default = default_scenario()
    assert dataclasses.replace(loaded, source="x") == dataclasses.replace(default, source="x")
    assert default.max_vm_num == 17 and default.service_vm_id == 0
    assert default.pcpus == 4 and default.privileged and default.acrn
    assert sum(s.dynamic for s in default.vms) == 16
    assert all(s.cpu_affinity == 0x1 for s in default.vms[1:])
    assert default.pci_devices == (parse_bdf("00:14.0"), parse_bdf("00:17.0"), parse_bdf("00:1f.3"))
    assert default.dm_owned_flags & abi.GUEST_FLAG_PMU_PASSTHROUGH


def test_derived_values() -> None:
    sc = parse_scenario(
        {
            "platform": {"pcpus": 8, "release": True},
            "vm": [
                {"load_order": "pre", "name": "safety", "cpu_affinity": 0x80, "severity": "safety"},
                SERVICE,
                {
                    "load_order": "post",
                    "name": "rt",
                    "cpu_affinity": 0x30,
                    "guest_flags": ["rt", "lapic_passthrough"],
                },
                {"load_order": "post", "count": 3},
            ],
        }
    )
    assert sc.max_vm_num == 6 and sc.service_vm_id == 1
    rt = sc.vms[2]
    assert rt.static and rt.severity == 0x30
    assert (
        rt.guest_flags
        == abi.GUEST_FLAG_RT | abi.GUEST_FLAG_LAPIC_PASSTHROUGH | abi.GUEST_FLAG_STATIC_VM
    )
    assert sc.vms[3].dynamic and sc.vms[3].cpu_affinity == 0
    assert not sc.dm_owned_flags & abi.GUEST_FLAG_PMU_PASSTHROUGH


@pytest.mark.parametrize(("data", "key", "reason"), [
    ({"platform": {"pcpus": 0}, "vm": [SERVICE]}, "platform.pcpus", "out of range"),
    ({"platform": {"pcpus": "4"}, "vm": [SERVICE]}, "platform.pcpus", "must be an integer"),
    ({"platform": {"cores": 4}, "vm": [SERVICE]}, "platform.cores", "unknown key"),
    ({"platform": {"acrn": 1}, "vm": [SERVICE]}, "platform.acrn", "true or false"),
    ({"platform": {"pci_devices": ["00:1g.0"]}, "vm": [SERVICE]}, "platform.pci_devices[0]", "BDF"),
    ({"platform": {"pci_devices": ["00:14.0"], "pci_bridges": ["00:14.0"]}, "vm": [SERVICE]},
     "platform.pci_bridges", "also in pci_devices"),
    ({"platform": {"cstate": [{"space_id": "pci"}]}, "vm": [SERVICE]}, "platform.cstate[0].space_id", "not one of"),
    ({"platform": {"pstate": [{"core_frequency_mhz": 1}]}, "vm": [SERVICE]}, "platform.pstate[0].power_mw", "missing"),
    ({"platform": {}}, "vm", "missing"),
    ({"platform": {}, "vm": [{"load_order": "post", "count": 2}]}, "vm", "exactly one"),
    ({"platform": {}, "vm": [SERVICE, SERVICE]}, "vm[1].name", "already used"),
    ({"platform": {}, "vm": [{**SERVICE, "load_order": "sos"}]}, "vm[0].load_order", "must be one of"),
    ({"platform": {"pcpus": 4}, "vm": [{**SERVICE, "cpu_affinity": 0x10}]}, "vm[0].cpu_affinity", "lacks"),
    ({"platform": {}, "vm": [{**SERVICE, "cpu_affinity": 0}]}, "vm[0].cpu_affinity", "at least one"),
    ({"platform": {}, "vm": [{**SERVICE, "name": "x" * 16}]}, "vm[0].name", "longer than 15"),
    ({"platform": {}, "vm": [SERVICE, {"load_order": "post", "name": "a", "static": False}]},
     "vm[1].name", "dynamic slot has no name"),
    ({"platform": {}, "vm": [SERVICE, {"load_order": "post", "static": True}]}, "vm[1].name", "needs a name"),
    ({"platform": {}, "vm": [SERVICE, {"load_order": "post", "guest_flags": ["turbo"]}]},
     "vm[1].guest_flags[0]", "not one of"),
    ({"platform": {}, "vm": [SERVICE, {"load_order": "post", "guest_flags": 0x100}]},
     "vm[1].guest_flags", "STATIC_VM"),
    ({"platform": {}, "vm": [SERVICE, {"load_order": "post", "severity": "safety"}]},
     "vm[1].severity", "pre-launched"),
    ({"platform": {}, "vm": [{**SERVICE, "severity": "rtvm"}]}, "vm[0].severity", "fixed"),
    ({"platform": {}, "vm": [SERVICE, {"load_order": "post", "privileged": True}]},
     "vm[1].privileged", "only the Service VM"),
    ({"platform": {}, "vm": [SERVICE, {"load_order": "pre", "name": "p", "cpu_affinity": 1, "count": 2}]},
     "vm[1].count", "only dynamic"),
    ({"platform": {"pcpus": 64}, "vm": [{**SERVICE, "cpu_affinity": (1 << 17) - 1}]},
     "vm[0].cpu_affinity", "more than 16"),
])  # fmt: skip
def test_errors_name_the_key(data: dict, key: str, reason: str) -> None:
    with pytest.raises(ScenarioError) as e:
        parse_scenario(data, "board.toml")
    assert e.value.key == key
    assert reason in e.value.reason
    assert str(e.value).startswith(f"board.toml: {key}: ")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"nope.toml: \(file\)"):
        load_scenario(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[platform\npcpus = 4\n")
    with pytest.raises(ScenarioError, match=r"bad.toml: \(syntax\)"):
        load_scenario(bad)
