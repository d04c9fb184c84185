"""Record and replay's acceptance check (issue 20): a recording made with a KVM guest replays
on the scripted backend with zero differences, and a changed device model answer is
reported as a difference.

The real daemon (``--backend kvm``) serves a FUSE node; tests/clients/vm_sample.c runs a
guest from tests/guests/ and answers its reads as its flags say. ``acrn-hsm-emu record``
captures the VM's requests; ``acrn-hsm-emu replay`` serves a node of its own with the
scripted backend (no guest runs) and runs the same device model against the recording.
"""

from __future__ import annotations

import pathlib
import subprocess
from collections.abc import Callable

import pytest

from acrn_hsm_emu.hypervisor.workload import Workload
from tests.conftest import SLOW, VENV_BIN
from tests.guests.build import Guest, assemble
from tests.support.cbuild import build_c

pytestmark = [pytest.mark.needs_kvm, pytest.mark.needs_fuse, pytest.mark.transports("fuse")]

EXE = str(VENV_BIN / "acrn-hsm-emu")
HANG_GUARD_S = 120 * SLOW


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Guest]:
    out = tmp_path_factory.mktemp("guests")
    made: dict[str, Guest] = {}

    def get(name: str, load: int = 0) -> Guest:
        if name not in made:
            made[name] = assemble(name, out, load)
        return made[name]

    return get


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=HANG_GUARD_S, check=False)


def record(daemon, out: pathlib.Path, *dm_args: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    p = run("record", "--control", str(daemon.control), "--vm", "1", "-o", str(out), *extra,
            "--", str(build_c("vm_sample")), "-q", *dm_args, str(daemon.node))  # fmt: skip
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}\n{daemon.log()}"
    return p


def replay(tmp: pathlib.Path, rec: pathlib.Path, *dm_args: str, extra: tuple[str, ...] = ()
           ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``replay`` on a node of its own (scripted backend), the device model run against it."""
    d = tmp / f"replay-{len(list(tmp.glob('replay-*')))}"
    d.mkdir()
    node = d / "acrn_hsm"
    p = run("replay", "--node", str(node), "--run-dir", str(d / "run"), "--transport", "fuse",
            "--log-format", "json", *extra, str(rec),
            "--", str(build_c("vm_sample")), "-q", *dm_args, str(node))  # fmt: skip
    assert "Traceback" not in p.stderr, p.stderr
    assert not node.exists()
    return p


MMIO16 = ("-M", "0x20020=0xbeef", "-P", "0xcafef00d")


def test_a_kvm_recording_replays_without_differences_and_a_changed_answer_is_one(
    daemon_factory, guests, tmp_path: pathlib.Path
) -> None:
    """mmio16: MMIO writes and a read, port writes, a CF8/CFC configuration read, a data-port
    write without CF8, a CF8 read (the hypervisor's) and the done port."""
    d = daemon_factory("--backend", "kvm")
    g = f"{guests('mmio16').path}@0"
    rec = tmp_path / "rec.toml"
    p = record(d, rec, "-g", g, *MMIO16)
    assert "vCPU 0: 9 accesses" in p.stdout and "recording ended: VM destroyed" in p.stdout
    wl = Workload.load(rec)
    assert wl.name.startswith("recorded from VM 1 (kvm backend), run 0 of 1")
    steps = [s.to_dict() for s in wl.programs[0].steps]
    assert steps == [
        {"op": "mmio", "addr": 0x20010, "size": 4, "write": True, "value": 0x12345678},
        {"op": "mmio", "addr": 0x20031, "size": 1, "write": True, "value": 0x5A},
        {"op": "mmio", "addr": 0x20020, "size": 2, "expect": 0xBEEF},
        {"op": "pio", "port": 0x36, "size": 2, "write": True, "value": 0xBEEF},
        {"op": "pci", "bus": 0, "dev": 3, "func": 2, "reg": 0x10, "size": 4, "expect": 0xCAFEF00D},
        {"op": "pio", "port": 0x37, "size": 4, "write": True, "value": 0xCAFEF00D},
        {"op": "pio", "port": 0xCFE, "size": 1, "write": True, "value": 0x77},  # the HSM folds it again
        {"op": "pio", "port": 0x38, "size": 4, "write": True, "value": 0},  # the CF8 read is not here
        {"op": "pio", "port": 0x1F, "size": 1, "write": True, "value": 1},  # the DM's last answer
    ]  # fmt: skip
    assert "backend=kvm" in d.log() or '"backend": "kvm"' in d.log()

    same = replay(tmp_path, rec, "-g", g, *MMIO16)
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.splitlines()[-3:] == [
        f"replay of {rec}:",
        "  VM 1 vCPU 0: 9 of 9 accesses replayed, complete",
        "replay: no differences",
    ]

    changed = replay(tmp_path, rec, "-g", g, "-M", "0x20020=0xbeee", "-P", "0xcafef00d")
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert changed.stdout.splitlines()[-4:] == [
        f"replay of {rec}:",
        "  VM 1 vCPU 0: 9 of 9 accesses replayed, complete",
        "  difference: VM 1 vCPU 0 step 2: mmio read 0x20020 size 2: expected 0xbeef, got 0xbeee",
        "replay: 1 difference",
    ]
    pci = replay(tmp_path, rec, "-g", g, "-M", "0x20020=0xbeef", "-P", "0xcafef00e")
    assert pci.returncode == 1
    assert ("  difference: VM 1 vCPU 0 step 4: pci read 00:03.2 reg 0x10 size 4: expected 0xcafef00d, "
            "got 0xcafef00e") in pci.stdout.splitlines()


def test_two_vcpus_and_a_count(daemon_factory, guests, tmp_path: pathlib.Path) -> None:
    """smppio32: the BSP starts an AP, both write port 0x10 for ever; the recording stops
    after 600 accesses while the guest runs on. Its replay (both vCPUs' programs, run side
    by side) completes, and the device model, which would go on, is stopped by the replay."""
    d = daemon_factory("--backend", "kvm")
    g = guests("smppio32", 0x1000)
    dm = ("-C", "0x3", "-r", "pm32", "-e", "0x1000", "-g", f"{g.path}@0x1000", "-n", "3000")
    rec = tmp_path / "smp.json"
    p = record(d, rec, *dm, extra=("--count", "600"))
    assert "recording ended: count reached" in p.stdout
    wl = Workload.load(rec)
    assert sorted(wl.programs) == [0, 1]
    assert sum(prog.accesses_per_run for prog in wl.programs.values()) == 600
    for prog in wl.programs.values():  # equal writes fold into a step's repeat
        assert {(s.access.addr, s.access.value) for s in prog.steps if s.access} <= {(0x10, 0x41), (0x10, 0)}
        assert len(prog.steps) <= 3

    rp = replay(tmp_path, rec, *dm[:-1], "100000000", extra=("--grace", "0.5"))
    assert rp.returncode == 0, rp.stdout + rp.stderr
    lines = rp.stdout.splitlines()
    assert "  (the device model still ran 0.5 s after the end: stopped)" in lines
    assert lines[-1] == "replay: no differences"
    done = sorted(line for line in lines if "accesses replayed, complete" in line)
    assert [line.split(":")[0] for line in done] == ["  VM 1 vCPU 0", "  VM 1 vCPU 1"]
