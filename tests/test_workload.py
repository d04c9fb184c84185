"""Workload files and the generator API."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from acrn_hsm_emu.hypervisor.api import Access
from acrn_hsm_emu.hypervisor.workload import (
    Step,
    VcpuProgram,
    Workload,
    WorkloadError,
    check_access,
    pci_address,
    pci_reg,
)

DOC = Path(__file__).parent.parent / "docs" / "workload.md"


def test_documented_example(tmp_path: Path) -> None:
    block = re.search(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/workload.md lost its example"
    p = tmp_path / "smoke.toml"
    p.write_text(block.group(1))
    wl = Workload.load(p)
    assert wl.name == "uart-and-pci-probe"
    p0, p1 = wl.programs[0], wl.programs[1]
    assert p0.repeat == 1 and p1.repeat == 0
    assert [s.op for s in p0.steps] == [
        "pio",
        "pio",
        "mmio",
        "mmio",
        "pci",
        "pci",
        "cpuid",
        "sleep",
    ]
    assert p0.accesses_per_run == 105
    uart = p0.steps[0].access
    assert uart == Access("pio", True, 0x3F8, 1, 0x41)
    assert p0.steps[1].expect == 0x60 and p0.steps[1].access.write is False
    pci = p0.steps[5]
    assert pci.access == Access("pci", True, pci_address(0, 3, 0, 4), 2, 7)
    assert p0.steps[6].expect_regs == (0x40000010, 0x4E524341, None, None)
    assert p0.steps[7].seconds == pytest.approx(0.0005)


def test_json_and_round_trip(tmp_path: Path) -> None:
    data = {
        "vcpu": [
            {
                "id": 2,
                "steps": [
                    {
                        "op": "pci",
                        "bus": 1,
                        "dev": "0x1f",
                        "func": 7,
                        "reg": "0x1fc",
                        "size": 4,
                        "expect": 5,
                    },
                    {"op": "cpuid", "leaf": 1, "expect": [None, 0, None, 7]},
                    {"op": "sleep", "ms": 2, "repeat": 3},
                    {
                        "op": "mmio",
                        "addr": "0xfffffffffffff000",
                        "size": 8,
                        "write": True,
                        "value": "0xffffffffffffffff",
                    },
                ],
            }
        ]
    }
    p = tmp_path / "w.json"
    p.write_text(json.dumps(data))
    wl = Workload.load(p)
    step = wl.programs[2].steps[0]
    assert pci_reg(step.access.addr) == 0x1FC and step.access.addr >> 11 & 0x1F == 0x1F
    assert wl.programs[2].steps[1].expect_regs == (None, 0, None, 7)
    assert Workload.from_dict(json.loads(json.dumps(wl.to_dict()))) == wl


@pytest.mark.parametrize(("step", "where", "reason"), [
    ({"op": "pio", "port": 0x80, "size": 8}, "steps[0]", "1, 2 or 4"),
    ({"op": "pio", "port": 0x10000, "size": 1}, "steps[0]", "not in [0, 0xffff]"),
    ({"op": "mmio", "addr": 0, "size": 3}, "steps[0]", "1, 2, 4 or 8"),
    ({"op": "pio", "port": 0x80, "size": 1, "write": True, "value": 0x100}, "steps[0]", "does not fit"),
    ({"op": "pio", "port": 0x80, "size": 1, "value": 1}, "steps[0]", "for writes"),
    ({"op": "pio", "port": 0x80, "size": 1, "write": True, "expect": 1}, "steps[0]", "for reads"),
    ({"op": "pio", "port": 0x80, "size": 1, "expect": 0x100}, "steps[0]", "does not fit"),
    ({"op": "pci", "dev": 1, "reg": 3, "size": 2}, "steps[0]", "crosses a dword"),
    ({"op": "pci", "dev": 32, "reg": 0, "size": 4}, "steps[0]", "dev <= 1f"),
    ({"op": "pci", "reg": 0, "size": 4}, "steps[0]", "missing `dev`"),
    ({"op": "pio", "port": 0x80, "size": 1, "repeat": 0}, "steps[0]", "repeat must be"),
    ({"op": "sleep"}, "steps[0]", "exactly one of"),
    ({"op": "cpuid", "leaf": 1, "expect": {"esi": 1}}, "steps[0]", "unknown register"),
    ({"op": "cpuid", "leaf": 1, "expect": [1, 2]}, "steps[0]", "4 values"),
    ({"op": "halt"}, "steps[0].op", "must be one of"),
    ({"op": "pio", "port": 0x80, "size": 1, "width": 1}, "steps[0].width", "unknown key"),
    ({"op": "pio", "port": "eighty", "size": 1}, "steps[0].port", "not a number"),
])  # fmt: skip
def test_step_errors(step: dict, where: str, reason: str) -> None:
    with pytest.raises(WorkloadError) as e:
        Workload.from_dict({"vcpu": [{"id": 0, "steps": [step]}]}, "w.toml")
    msg = str(e.value)
    assert msg.startswith(f"w.toml: vcpu[0].{where}: "), msg
    assert reason in msg


@pytest.mark.parametrize(("data", "msg"), [
    ({"vcpus": []}, "w.toml: vcpus: unknown key"),
    ({"vcpu": [{"id": 16}]}, "w.toml: vcpu[0].id: 16 is not in [0, 15]"),
    ({"vcpu": [{"id": 0}, {"id": 0}]}, "w.toml: vcpu[1].id: vcpu 0 is listed twice"),
    ({"vcpu": [{"id": 0, "repeat": -1}]}, "w.toml: vcpu[0].repeat: must be >= 0"),
    ({"vcpu": [{"steps": []}]}, "w.toml: vcpu[0]: missing `id`"),
    ({"vcpu": {"id": 0}}, "w.toml: vcpu: must be an array"),
])  # fmt: skip
def test_structure_errors(data: dict, msg: str) -> None:
    with pytest.raises(WorkloadError) as e:
        Workload.from_dict(data, "w.toml")
    assert str(e.value).startswith(msg)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="missing.toml"):
        Workload.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(WorkloadError, match=r"bad.json: syntax"):
        Workload.load(bad)


def test_build_api() -> None:
    wl = Workload.build(
        {
            0: [Step.pio(0x80, 1, write=True, value=1)] * 10_000,
            1: VcpuProgram((Step.sleep(0),), repeat=0),
        },
        repeat=2,
        name="big",
    )
    assert wl.programs[0].repeat == 2 and wl.programs[0].accesses_per_run == 10_000
    assert wl.programs[1].repeat == 0
    with pytest.raises(ValueError):
        Workload.build({16: []})
    with pytest.raises(ValueError):
        Step.pci(0, 0, 8, 0, 4)
    with pytest.raises(ValueError):
        Step.sleep(-1)


def test_check_access() -> None:
    check_access(Access("pci", False, pci_address(255, 31, 7, 0xFFC), 4))
    for bad in (
        Access("pci", False, 1 << 28, 4),
        Access("ecam", False, 0, 4),
        Access("mmio", True, 0, 2, 0x10000),
        Access("pio", False, -1, 1),
    ):
        with pytest.raises(ValueError):
            check_access(bad)
