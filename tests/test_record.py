"""Record and replay (docs/record-replay.md): the recorder in the hypervisor, its files, the
replay log, and the CLI's errors.

In process, the hypervisor runs behind tests/test_hypervisor_vcpu.py's fake HSM (both of
its paths: the vCPU's Python request cycle and the daemon's native one). The acceptance
check with a KVM guest and a C device model is tests/test_record_kvm.py.
"""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from acrn_hsm_emu import recording
from acrn_hsm_emu.hypervisor.api import Access
from acrn_hsm_emu.hypervisor.hypervisor import Hypervisor
from acrn_hsm_emu.hypervisor.record import MAX_ACCESSES, Recorder, fold_pci
from acrn_hsm_emu.hypervisor.workload import Step, Workload, pci_address
from tests import test_hypervisor_vcpu
from tests.conftest import VENV_BIN
from tests.support.poll import wait_until
from tests.test_hypervisor_vcpu import MMIO, Rig, answer, expected, inject

EXE = str(VENV_BIN / "acrn-hsm-emu")
rigs = test_hypervisor_vcpu.rigs  # the same fixture: hypervisors with the Python and the native cycle


def record(rig: Rig, **kw: object) -> Recorder:
    rec = rig.hv.record_start(rig.vmid, **kw)  # type: ignore[arg-type]
    assert rec.state == "recording"
    return rec


def steps_of(wl: dict, vcpu: int = 0) -> list[dict]:
    return next(v["steps"] for v in wl["vcpu"] if v["id"] == vcpu)


def replayed(rig: Rig) -> bool:
    summary = rig.hv.replay_summary()
    return summary is not None and bool(summary["complete"])


def replay(rigs, wl: dict, **kw: object) -> Rig:
    """Replay a recording on a fresh hypervisor, to its end."""
    r = rigs(workload=Workload.from_dict(wl), **kw)
    r.start()
    wait_until(lambda: replayed(r), "replay")
    return r


# ----- what is recorded ----------------------------------------------------------------------

SOURCE = [
    Step.pio(0x3F8, 1, write=True, value=0x41),
    Step.pio(0x3FD, 1, repeat=5),  # five equal reads: one step with repeat = 5
    Step.mmio(0xC0000000, 8),
    Step.mmio(0xC0000010, 4, write=True, value=0xDEADBEEF),
    Step.pci(0, 3, 2, 0x10, 4),
    Step.pci(1, 0x1F, 7, 0x1FE, 2, write=True, value=0x1234),  # an extended register
    Step.pio(0xCF8, 4),  # answered by the hypervisor: not recorded
    Step.pio(0x20, 1, write=True, value=0x11),  # vPIC: not recorded
    Step.mmio(0xFEC00000, 4),  # vIOAPIC: not recorded
    Step.cpuid(0x40000000),  # no request: not recorded
]


def test_a_recording_has_the_requests_and_the_answers(rigs, tmp_path: pathlib.Path) -> None:
    r = rigs(workload=Workload.build({0: SOURCE}))
    rec = record(r)
    r.start()
    wait_until(r.done, "the workload")
    rec = r.hv.record_stop(r.vmid)
    assert rec.state == "stopped" and rec.reason == "stopped by request"
    (wl,) = rec.workloads()
    assert wl["name"].startswith("recorded from VM 1 (scripted backend), run 0 of 1")
    assert steps_of(wl) == [
        {"op": "pio", "port": 0x3F8, "size": 1, "write": True, "value": 0x41},
        {"op": "pio", "port": 0x3FD, "size": 1, "expect": expected(SOURCE[1].access), "repeat": 5},
        {"op": "mmio", "addr": 0xC0000000, "size": 8, "expect": expected(SOURCE[2].access)},
        {"op": "mmio", "addr": 0xC0000010, "size": 4, "write": True, "value": 0xDEADBEEF},
        {"op": "pci", "bus": 0, "dev": 3, "func": 2, "reg": 0x10, "size": 4,
         "expect": expected(SOURCE[4].access)},
        {"op": "pci", "bus": 1, "dev": 0x1F, "func": 7, "reg": 0x1FE, "size": 2, "write": True,
         "value": 0x1234},
    ]  # fmt: skip
    assert rec.summary()["accesses"] == 10 and rec.summary()["steps"] == 6
    # the files load back as the same workload, TOML and JSON
    loaded = Workload.from_dict(wl)
    for name in ("rec.toml", "rec.json", "rec.workload"):
        recording.write_workload(tmp_path / name, wl, "a header\nof two lines")
        assert Workload.load(tmp_path / name) == loaded
    assert (tmp_path / "rec.toml").read_text().startswith("# a header\n# of two lines\nname = ")
    assert "port = 0x3fd" in (tmp_path / "rec.toml").read_text()
    assert json.loads((tmp_path / "rec.json").read_text()) == wl


def test_the_recording_replays_without_differences_and_a_changed_answer_is_one(rigs) -> None:
    r = rigs(workload=Workload.build({0: SOURCE}))
    record(r)
    r.start()
    wait_until(r.done, "the workload")
    (wl,) = r.hv.record_stop(r.vmid).workloads()

    same = replay(rigs, wl)
    summary = same.hv.replay_summary()
    assert summary["differences"] == 0 and summary["listed"] == []
    assert summary["vcpus"] == [{"vm": same.vmid, "vcpu": 0, "replayed": 10, "total": 10,
                                 "complete": True, "position": "done after 1 run(s)"}]  # fmt: skip
    assert same.vcpu()["mismatches"] == 0

    changed = rigs(workload=Workload.from_dict(wl))
    changed.hsm.answer = lambda req: answer(req) ^ 1 if req["type"] == MMIO else answer(req)
    changed.start()
    wait_until(lambda: replayed(changed), "replay")
    summary = changed.hv.replay_summary()
    want = expected(SOURCE[2].access)
    assert summary["differences"] == 1
    assert summary["listed"] == [{"vm": changed.vmid, "vcpu": 0, "step": 2, "pass": 0, "rep": 0,
                                  "access": "mmio read 0xc0000000 size 8", "expected": want,
                                  "got": want ^ 1}]  # fmt: skip
    lines, agreed = recording.replay_report(summary, "rec.toml")
    assert not agreed
    assert lines[-1] == "replay: 1 difference"
    assert f"  difference: VM 1 vCPU 0 step 2: mmio read 0xc0000000 size 8: expected {want:#x}, " \
        f"got {want ^ 1:#x}" in lines
    # the hypervisor's status carries the same
    assert changed.hv.snapshot()["replay"]["differences"] == 1


def test_cf8_cfc_pairs_fold_when_they_replay_identically(rigs) -> None:
    r = rigs()
    record(r)
    r.start()
    canonical = 0x80000000 | pci_address(0, 3, 2, 0x10)
    inject(r, Access("pio", True, 0xCF8, 4, canonical))
    inject(r, Access("pio", False, 0xCFE, 2))  # -> pci reg 0x12, 2 bytes
    inject(r, Access("pio", False, 0xCFC, 4))  # no CF8 before it: raw
    inject(r, Access("pio", True, 0xCF8, 4, canonical | 1))  # bits 1:0 set: raw
    inject(r, Access("pio", False, 0xCFC, 4))
    inject(r, Access("pio", True, 0xCF8, 4, canonical))  # then not the data port: raw
    inject(r, Access("pio", True, 0x80, 1, 7))
    inject(r, Access("pio", True, 0xCF8, 2, 0))  # a 2-byte CF8 write: dropped by the hypervisor
    inject(r, Access("pio", True, 0xCF8, 4, canonical))  # held at the stop: written raw
    (wl,) = r.hv.record_stop(r.vmid).workloads()
    pci12 = r.hsm.answer({"type": 2, "bus": 0, "dev": 3, "func": 2, "reg": 0x12, "size": 2})
    assert [(s["op"], s.get("port", s.get("reg"))) for s in steps_of(wl)] == [
        ("pci", 0x12), ("pio", 0xCFC), ("pio", 0xCF8), ("pio", 0xCFC), ("pio", 0xCF8),
        ("pio", 0x80), ("pio", 0xCF8),
    ]  # fmt: skip
    assert steps_of(wl)[0]["expect"] == pci12
    assert steps_of(wl)[2]["value"] == canonical | 1
    # and the replay sends the device model the same requests
    again = replay(rigs, wl)
    assert again.hv.replay_summary()["differences"] == 0
    assert [(q["type"], q["address"]) for q in again.hsm.requests] == [
        (q["type"], q["address"]) for q in r.hsm.requests
    ]


def test_fold_pci() -> None:
    assert fold_pci(0x80001A10, 0xCFC, 4) == pci_address(0, 3, 2, 0x10)
    assert fold_pci(0x8F001A10, 0xCFD, 2) == pci_address(0, 3, 2, 0xF11)
    assert fold_pci(0x80001A10, 0xCFE, 4) is None  # crosses the dword
    assert fold_pci(0x00001A10, 0xCFC, 4) is None  # no enable bit
    assert fold_pci(0x90001A10, 0xCFC, 4) is None  # reserved bits
    assert fold_pci(0x80001A12, 0xCFC, 4) is None


def test_reset_starts_a_new_run(rigs, tmp_path: pathlib.Path) -> None:
    r = rigs()
    rec = record(r)
    r.start()
    inject(r, Access("pio", True, 0x10, 1, 1))
    assert r.hv.pause_vm(r.vmid) == 0 and r.hv.reset_vm(r.vmid) == 0  # run 0 ends
    assert r.hv.start_vm(r.vmid) == 0
    assert r.hv.pause_vm(r.vmid) == 0 and r.hv.reset_vm(r.vmid) == 0  # nothing in it: no run
    assert r.hv.start_vm(r.vmid) == 0
    inject(r, Access("pio", False, 0x11, 1))
    assert r.hv.pause_vm(r.vmid) == 0 and r.hv.destroy_vm(r.vmid) == 0
    assert rec.state == "stopped" and rec.reason == "VM destroyed"
    assert r.hv.recording(r.vmid) is rec  # kept until collected
    runs = r.hv.record_stop(r.vmid).workloads()
    assert [steps_of(wl)[0]["port"] for wl in runs] == [0x10, 0x11]
    assert runs[1]["name"].split(", ")[1] == "run 1 of 2"
    paths = recording.run_paths(tmp_path / "rec.toml", 2)
    assert [p.name for p in paths] == ["rec.toml", "rec.run1.toml"]


def test_each_vcpu_records_its_own_steps(rigs) -> None:
    programs = {
        0: [Step.pio(0x40, 1, write=True, value=0), Step.pio(0x41, 2, repeat=3)],
        1: [Step.mmio(0xD0000000, 4), Step.pci(0, 1, 0, 0, 4)],
    }
    r = rigs(workload=Workload.build(programs), affinity=0x3)
    record(r)
    r.start()
    wait_until(r.done, "the workload")
    (wl,) = r.hv.record_stop(r.vmid).workloads()
    assert [v["id"] for v in wl["vcpu"]] == [0, 1]
    assert [s["op"] for s in steps_of(wl, 1)] == ["mmio", "pci"]
    assert steps_of(wl, 0)[1]["repeat"] == 3
    again = replay(rigs, wl, affinity=0x3)
    summary = again.hv.replay_summary()
    assert summary["differences"] == 0
    assert sorted((p["vcpu"], p["replayed"]) for p in summary["vcpus"]) == [(0, 4), (1, 2)]


def test_recording_starts_at_create_vm_and_stops_at_a_count() -> None:
    hv = Hypervisor(workload=Workload.build({0: [Step.pio(0x80, 1, write=True, value=1, repeat=50)]}))
    try:
        rec = hv.record_start(1, count=3)
        assert rec.state == "armed"
        rig = Rig.__new__(Rig)  # the Rig's set-up, on this hypervisor
        _attach_rig(rig, hv)
        assert rec.state == "recording"
        rig.start()
        wait_until(lambda: rec.state == "stopped", "the count")
        assert rec.reason == "count reached" and rec.accesses == 3
        assert steps_of(rec.workloads()[0]) == [
            {"op": "pio", "port": 0x80, "size": 1, "write": True, "value": 1, "repeat": 3}
        ]
        assert hv.snapshot()["recordings"][0]["state"] == "stopped"
        wait_until(rig.done, "the workload (not recorded any more)")
        assert rec.accesses == 3
    finally:
        hv.shutdown()


def _attach_rig(rig: Rig, hv: Hypervisor) -> None:
    """Rig.__init__ on an existing hypervisor (python path)."""
    from acrn_hsm_emu import abi
    from acrn_hsm_emu.memory import LocalMemory, SharedPage
    from tests.test_hypervisor_vcpu import FakeHsm

    rig.hv = hv
    buf = bytearray(bytes(abi.AcrnVmCreation(cpu_affinity=1)))
    assert hv.create_vm(buf) == 0
    out = abi.AcrnVmCreation.from_buffer(buf)
    rig.vmid, rig.vcpus, rig.native, rig._server = out.vmid, out.vcpu_num, False, None
    rig.mem = LocalMemory()
    rig.mmap, addr = rig.mem.alloc_page()
    rig.page = SharedPage(rig.mem, addr)
    rig.hsm = FakeHsm(hv, rig.vmid, rig.page, rig.vcpus)
    hv.set_upcall(rig.hsm.upcall)
    assert hv.set_ioreq_buffer(rig.vmid, rig.page) == 0


def test_a_triple_fault_is_one_step(rigs) -> None:
    r = rigs(workload=Workload.build({0: [Step.pio(0x60, 1, write=True, value=2), Step.triple_fault()]}))
    record(r)
    r.start()
    wait_until(r.done, "the workload")
    (wl,) = r.hv.record_stop(r.vmid).workloads()
    assert [s["op"] for s in steps_of(wl)] == ["pio", "triple_fault"]  # the S5 write is in the step
    again = replay(rigs, wl)  # complete at the triple fault step; its S5 write follows
    wait_until(lambda: len(again.hsm.requests) == 2, "the S5 write")
    assert [(q["address"], q["value"]) for q in again.hsm.requests] == [(0x60, 2), (0x404, 0x3400)]


def test_an_abandoned_read_has_no_expect_and_counts_as_replayed(rigs) -> None:
    r = rigs(workload=Workload.build({0: [Step.pio(0x70, 1, write=True, value=1), Step.pio(0x71, 4)]}),
             defer=True)
    record(r)
    r.start()
    wait_until(lambda: len(r.hsm.requests) == 1, "the write")
    r.hsm.complete(0)
    wait_until(lambda: len(r.hsm.requests) == 2, "the read")
    assert r.hv.pause_vm(r.vmid) == 0  # the device model stops before answering
    r.hsm.complete(0)
    wait_until(lambda: r.vcpu()["state"] == "zombie", "the pause")
    assert r.hv.destroy_vm(r.vmid) == 0
    (wl,) = r.hv.record_stop(r.vmid).workloads()
    assert steps_of(wl)[1] == {"op": "pio", "port": 0x71, "size": 4}
    # replayed against a device model that pauses at the same place, it is complete
    again = rigs(workload=Workload.from_dict(wl), defer=True)
    again.start()
    wait_until(lambda: len(again.hsm.requests) == 1, "the write")
    again.hsm.complete(0)
    wait_until(lambda: len(again.hsm.requests) == 2, "the read")
    assert again.hv.pause_vm(again.vmid) == 0 and again.hv.destroy_vm(again.vmid) == 0
    summary = again.hv.replay_summary()
    assert summary["complete"] and summary["vcpus"][0]["replayed"] == 2


def test_an_incomplete_replay_is_reported() -> None:
    summary = {"differences": 0, "listed": [], "complete": False, "vcpus": [
        {"vm": 1, "vcpu": 0, "replayed": 3, "total": 9, "complete": False, "position": "run 0 step 3 rep 0"},
    ]}  # fmt: skip
    lines, agreed = recording.replay_report(summary, "rec.toml")
    assert not agreed
    assert lines[1] == "  VM 1 vCPU 0: 3 of 9 accesses replayed, INCOMPLETE, stopped at run 0 step 3 rep 0"
    assert lines[-1] == "replay: no differences, and the replay did not complete"
    assert recording.replay_report(None, "rec.toml")[1] is False


def test_recording_refusals() -> None:
    hv = Hypervisor()
    try:
        with pytest.raises(ValueError, match="VM 0 is the Service VM"):
            hv.record_start(0)
        with pytest.raises(ValueError, match="not a post-launched VM slot"):
            hv.record_start(500)
        hv.record_start(2)
        with pytest.raises(ValueError, match="VM 2 is being recorded already"):
            hv.record_start(2)
        with pytest.raises(ValueError, match="VM 3 is not being recorded"):
            hv.record_stop(3)
        with pytest.raises(ValueError, match="unknown record action 'go'"):
            recording.control(hv, {"action": "go", "vm": 2})
        assert recording.control(hv, {"action": "status", "vm": 2})["state"] == "armed"
        stopped = recording.control(hv, {"action": "stop", "vm": 2})
        assert stopped["workloads"] == [] and stopped["reason"] == "stopped by request"
    finally:
        hv.shutdown()
    assert Recorder(1, count=MAX_ACCESSES * 2).limit == MAX_ACCESSES


def test_no_recording_no_detour(rigs) -> None:
    """Off, a vCPU offers backends its native cycle; on, it does not (they must come back)."""
    r = rigs()
    v = r.hv._slots[r.hv._sid + r.vmid].vm.vcpus[0]
    assert v.recorder is None
    native = v.native_cycle() is not None
    assert native == r.native
    record(r)
    assert v.recorder is not None and v.native_cycle() is None
    r.hv.record_stop(r.vmid)
    assert v.recorder is None and (v.native_cycle() is not None) == native


# ----- the command line's errors -------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("args", "code", "message"), [
    (["record", "-o", "x.toml"], 2, "the following arguments are required: --vm"),
    (["record", "--vm", "1"], 2, "the following arguments are required: -o/--output"),
    (["record", "--vm", "1", "-o", "x.toml", "--count", "0"], 2, "argument --count: not a positive number"),
    (["record", "--vm", "1", "-o", "x.toml", "--duration", "-1"], 2, "not a positive number of seconds"),
    (["record", "--vm", "1", "-o", "/no/such/dir/x.toml"], 2,
     "cannot write the recording to /no/such/dir/x.toml: /no/such/dir is not a writable directory"),
    (["record", "--vm", "1", "-o", "x.toml", "--control", "/no/such.sock"], 1,
     "no daemon control socket at /no/such.sock"),
    (["replay", "rec.toml"], 2, "usage: acrn-hsm-emu replay [options] RECORDING -- COMMAND [ARGS...]"),
    (["replay"], 2, "the following arguments are required: RECORDING"),
    (["replay", "--backend", "kvm", "rec.toml", "--", "true"], 2, "unrecognized arguments"),
])  # fmt: skip
def test_cli_errors(args: list[str], code: int, message: str, tmp_path: pathlib.Path) -> None:
    p = subprocess.run([EXE, *args], capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert p.returncode == code, p.stderr
    assert message in p.stderr
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr


def test_replay_of_a_bad_file_is_one_line(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "rec.toml"
    bad.write_text('[[vcpu]]\nid = 0\nsteps = [{ op = "pio", port = 0x80, size = 3 }]\n')
    p = cli("replay", str(bad), "--", "true")
    assert p.returncode == 2
    assert p.stderr == f"acrn-hsm-emu: {bad}: vcpu[0].steps[0]: pio size must be 1, 2 or 4, not 3\n"
    p = cli("replay", str(tmp_path / "missing.toml"), "--", "true")
    assert p.returncode == 2 and "No such file or directory" in p.stderr
    assert len(p.stderr.splitlines()) == 1


def test_help_names_every_default() -> None:
    for sub in ("record", "replay"):
        out = cli(sub, "--help").stdout
        assert "default" in out
    out = " ".join(cli("record", "--help").stdout.split())
    for flag in ("--count N", "--duration SECONDS", "-o FILE, --output FILE", "--vm VMID"):
        assert flag in out


# ----- through the daemon, without KVM ----------------------------------------------------------


@pytest.mark.needs_fuse
@pytest.mark.transports("fuse")
def test_record_injected_accesses_until_ctrl_c_then_replay_them(hsm_daemon, tmp_path: pathlib.Path) -> None:
    """dm_loop serves VM 1 of a scripted daemon; `record` (no command) records the
    accesses `inject` makes, `status` shows it, Ctrl-C ends it and writes the file;
    `replay` runs a fresh dm_loop against it, which serves on for ever: stopped after the
    grace time, no differences."""
    import signal

    from tests.support.cbuild import build_c

    dm = subprocess.Popen([str(build_c("dm_loop")), str(hsm_daemon.node), "0x1"], stdout=subprocess.PIPE,
                          text=True)  # fmt: skip
    rec_file = tmp_path / "rec.toml"
    try:
        assert dm.stdout is not None and dm.stdout.readline().startswith("vmid=1 ")
        rec = subprocess.Popen([EXE, "record", "--control", str(hsm_daemon.control), "--vm", "1", "-o",
                                str(rec_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: "record VM 1: recording, 0 accesses" in hsm_daemon.cli("status").stdout, "recording")
        values = [hsm_daemon.cli("inject", "--vm", "1", *a).stdout.strip() for a in (
            ("pio-read", "0x3f8", "1"), ("pio-read", "0x3f8", "1"), ("mmio-read", "0xd0000000", "8"),
            ("pci-read", "00:03.0", "0x10", "4"), ("pio-write", "0x80", "1", "0x55"),
        )]  # fmt: skip
        assert "record VM 1: recording, 5 accesses" in hsm_daemon.cli("status").stdout
        rec.send_signal(signal.SIGINT)
        out, err = rec.communicate(timeout=60)
        assert rec.returncode == 0, err
        assert "recording ended: stopped by request" in out
    finally:
        dm.terminate()
        dm.communicate(timeout=60)
    steps = [s.to_dict() for s in Workload.load(rec_file).programs[0].steps]
    assert steps == [
        {"op": "pio", "port": 0x3F8, "size": 1, "expect": int(values[0], 16), "repeat": 2},
        {"op": "mmio", "addr": 0xD0000000, "size": 8, "expect": int(values[2], 16)},
        {"op": "pci", "bus": 0, "dev": 3, "func": 0, "reg": 0x10, "size": 4, "expect": int(values[3], 16)},
        {"op": "pio", "port": 0x80, "size": 1, "write": True, "value": 0x55},
    ]

    node = tmp_path / "replay" / "acrn_hsm"
    node.parent.mkdir()
    p = subprocess.run([EXE, "replay", "--node", str(node), "--run-dir", str(node.parent / "run"),
                        "--transport", "fuse", "--log-format", "json", "--grace", "0.3", str(rec_file),
                        "--", str(build_c("dm_loop")), str(node), "0x1"],
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[-4:] == [
        f"replay of {rec_file}:",
        "  VM 1 vCPU 0: 5 of 5 accesses replayed, complete",
        "  (the device model still ran 0.3 s after the end: stopped)",
        "replay: no differences",
    ]
