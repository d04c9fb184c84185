"""Range clients in other processes, through the real node (extension ABI).

The VM's owner is tests/clients/ext_ctl.c (CREATE_VM, default client that
answers as dm_loop does); the range clients are tests/clients/ext_range.c
processes, each answering reads with dm_loop's formula XOR its own tag, so
the value a guest read gets names the process that answered it. Guest
accesses come from a scripted workload (mismatches are counted by the
vCPUs) or from ``inject``.
"""

from __future__ import annotations

import json
import os
import random
import signal

import pytest

from acrn_hsm_emu.hypervisor.vm import VPIC_PORTS
from acrn_hsm_emu.hypervisor.workload import Step, Workload
from tests.support.answers import mmio_answer, pci_answer, pci_key, pio_answer, width_mask
from tests.support.ext import (
    Control,
    Ctl,
    RangeProc,
    daemon_log_events,
    inject_async,
    open_path_to,
    restore_modes,
)
from tests.support.poll import wait_until

pytestmark = pytest.mark.needs_fuse


@pytest.fixture
def hsm_daemon(daemon_factory):
    """Guest accesses here come from ``inject``: the scripted backend, whatever ``auto`` picks."""
    return daemon_factory("--backend", "scripted")

RESERVED = {0xCF8, 0xCF9, 0xCFA, 0xCFB, 0xCFC, 0xCFD, 0xCFE, 0xCFF} | set(VPIC_PORTS)
A_START, A_END, A_TAG = 0x5000, 0x50FF, 0x5A5A5A5A  # PIO client
B_START, B_END, B_TAG = 0xC000_0000, 0xC00F_FFFF, 0x0123_4567_89AB_CDEF  # MMIO client
M64 = (1 << 64) - 1


def inside(addr: int, size: int, start: int, end: int) -> bool:
    return start <= addr and addr + size - 1 <= end


def overlaps_reserved(port: int, size: int) -> bool:
    return any(p in RESERVED for p in range(port, port + size))


class Expect:
    """What each process must have handled, accumulated while the program is built."""

    def __init__(self) -> None:
        self.n = {"a": 0, "b": 0, "default": 0}
        self.writes = {"a": 0, "b": 0, "default": 0}
        self.wsum = {"a": 0, "b": 0, "default": 0}

    def add(self, who: str, write: bool, key: int, value: int) -> None:
        self.n[who] += 1
        if write:
            self.writes[who] += 1
            self.wsum[who] = (self.wsum[who] + key * 31 + value) & M64


def mixed_program(rng: random.Random, n: int, exp: Expect) -> list[Step]:
    steps: list[Step] = []
    for _ in range(n):
        kind = rng.choice(("a", "a", "b", "b", "pio", "mmio", "pci", "edge"))
        write = rng.random() < 0.4
        if kind == "edge":  # accesses that touch a range but are not wholly inside it
            kind = rng.choice(("pio", "mmio"))
            if kind == "pio":
                size = rng.choice((2, 4))
                port = rng.choice((A_START - 1, A_END - size + 2, A_END))
            else:
                size = rng.choice((2, 4, 8))
                port = rng.choice((B_START - 1, B_END - size + 2, B_END))
            assert not inside(port, size, A_START, A_END) and not inside(port, size, B_START, B_END)
            value = rng.randrange(1 << (8 * size))
            if kind == "pio":
                steps.append(Step.pio(port, size, write=True, value=value) if write
                             else Step.pio(port, size, expect=pio_answer(port, size)))
            else:
                steps.append(Step.mmio(port, size, write=True, value=value) if write
                             else Step.mmio(port, size, expect=mmio_answer(port, size)))
            exp.add("default", write, port, value)
            continue
        if kind in ("a", "pio"):
            size = rng.choice((1, 2, 4))
            if kind == "a":
                port = rng.randrange(A_START, A_END - size + 2)
                answer = pio_answer(port, size) ^ (A_TAG & width_mask(size))
            else:
                port = rng.randrange(0, 0x10000 - 4)
                while overlaps_reserved(port, size) or not (
                    port + size - 1 < A_START or port > A_END
                ):
                    port = rng.randrange(0, 0x10000 - 4)
                answer = pio_answer(port, size)
            value = rng.randrange(1 << (8 * size))
            steps.append(Step.pio(port, size, write=True, value=value) if write
                         else Step.pio(port, size, expect=answer))
            exp.add("a" if kind == "a" else "default", write, port, value)
        elif kind in ("b", "mmio"):
            size = rng.choice((1, 2, 4, 8))
            if kind == "b":
                gpa = rng.randrange(B_START, B_END - size + 2)
                answer = mmio_answer(gpa, size) ^ (B_TAG & width_mask(size))
            else:
                gpa = rng.randrange(0xD000_0000, 0xFE00_0000)
                answer = mmio_answer(gpa, size)
            value = rng.randrange(1 << (8 * size))
            steps.append(Step.mmio(gpa, size, write=True, value=value) if write
                         else Step.mmio(gpa, size, expect=answer))
            exp.add("b" if kind == "b" else "default", write, gpa, value)
        else:
            size = rng.choice((1, 2, 4))
            bus, dev, fn = rng.randrange(4), rng.randrange(32), rng.randrange(8)
            reg = rng.randrange(0, 0x100, size)
            value = rng.randrange(1 << (8 * size))
            steps.append(Step.pci(bus, dev, fn, reg, size, write=True, value=value) if write
                         else Step.pci(bus, dev, fn, reg, size, expect=pci_answer(bus, dev, fn, reg, size)))
            exp.add("default", write, pci_key(bus, dev, fn, reg), value)
    return steps


def wait_workload_done(ctl: Control, vmid: int) -> dict:
    def done() -> dict | None:
        vm = ctl.hv_vm(vmid)
        if vm["fault"]:
            raise AssertionError(f"VM faulted: {vm['fault']}")
        return vm if vm["vcpus"] and all(v["workload_done"] for v in vm["vcpus"]) else None

    return wait_until(done, "workload not done", timeout=600)


def test_two_range_clients_and_the_default_client_split_a_mixed_workload(daemon_factory, tmp_path):
    rng = random.Random(20261121)
    per_vcpu = 1500
    exp = Expect()
    programs = {vcpu: mixed_program(rng, per_vcpu, exp) for vcpu in (0, 1)}
    path = tmp_path / "workload.json"
    path.write_text(json.dumps(Workload.build(programs, name="ext-mixed").to_dict()))
    daemon = daemon_factory("--backend", "scripted", "--workload", str(path))
    control = Control(daemon.control)

    owner = Ctl(daemon.node)
    a = b = None
    try:
        vmid = int(owner.ok("create 0x3")["vmid"])
        owner.ok("client")
        owner.ok(f"forbid pio {A_START} {A_END}")
        owner.ok(f"forbid mmio {B_START} {B_END}")
        a = RangeProc(daemon.node, vmid, "uart-a", "--tag", hex(A_TAG), f"pio:{A_START}-{A_END}")
        b = RangeProc(daemon.node, vmid, "mmio-b", "--tag", hex(B_TAG), f"mmio:{B_START}-{B_END}")
        assert a.ok and b.ok, (a.first, b.first)
        assert a.ready == {"vcpu_num": "2", "owner_uid": "0"}

        st = control.hsm_vm(vmid)
        remote = {c["name"]: c for c in st["clients"] if "remote" in c}
        assert remote["uart-a"]["remote"]["pid"] == a.pid
        assert remote["uart-a"]["ranges"] == [{"type": 0, "kind": "pio", "start": A_START, "end": A_END}]
        assert remote["mmio-b"]["ranges"] == [{"type": 1, "kind": "mmio", "start": B_START, "end": B_END}]

        owner.ok("start")  # the workload runs now, with every client in place
        vm = wait_workload_done(control, vmid)
        for v in vm["vcpus"]:
            assert v["accesses"] == per_vcpu and v["mismatches"] == 0, v  # every read: right process

        a_stats, a_done = a.stop()
        b_stats, b_done = b.stop()
        seen = owner.ok("seen")
    finally:
        for p in (a, b):
            if p is not None:
                p.kill()
        owner.close()

    for stats in (a_stats, b_stats):
        assert stats == {"attach_end": "ENODEV", "notify_errors": "0", "outside": "0"}
    assert int(a_done["total"]) == int(a_done["pio"]) == exp.n["a"]
    assert int(a_done["writes"]) == exp.writes["a"] and int(a_done["wsum"]) == exp.wsum["a"]
    assert int(b_done["total"]) == int(b_done["mmio"]) == exp.n["b"]
    assert int(b_done["writes"]) == exp.writes["b"] and int(b_done["wsum"]) == exp.wsum["b"]
    # the owner's loop saw everything else, and nothing of the range clients' (kernel_handled)
    assert int(seen["forbidden"]) == 0
    assert int(seen["total"]) == exp.n["default"]
    assert int(seen["writes"]) == exp.writes["default"] and int(seen["wsum"]) == exp.wsum["default"]
    assert exp.n["a"] > 500 and exp.n["b"] > 500 and exp.n["default"] > 1000


def test_overlap_is_ebusy_with_a_log_line_naming_the_owner(hsm_daemon):
    owner = Ctl(hsm_daemon.node)
    a = None
    try:
        vmid = int(owner.ok("create 0x1")["vmid"])
        owner.ok("client")
        a = RangeProc(hsm_daemon.node, vmid, "uart", "pio:0x3f8-0x3ff", "pci:0x18-0x1f")
        assert a.ok, a.first
        # the same ranges, a partial overlap, inclusive ends touching: all refused
        for r in ("pio:0x3f8-0x3ff", "pio:0x3f0-0x3f8", "pio:0x3ff-0x400", "pci:0x1f-0x1f"):
            other = RangeProc(hsm_daemon.node, vmid, "other", r)
            assert other.first == "error add_range EBUSY", (r, other.first)
            assert other.proc.wait(timeout=60) == 4
        # adjacent ranges and another type on the same numbers are fine
        c = Ctl(hsm_daemon.node)
        try:
            c.ok(f"bind {vmid}")
            c.ok("rc neighbour")
            c.ok("range pio 0x3f0 0x3f7")
            c.ok("range pio 0x400 0x40f")
            c.ok("range mmio 0x3f8 0x3ff")
            c.ok("range pci 0x20 0x27")
            assert c.err("range pio 0x3fc 0x3fc") == "EBUSY"
            assert c.err("rc again") == "EEXIST"  # one range client per file
        finally:
            c.close()
        busy = [e for e in daemon_log_events(hsm_daemon) if e.get("event") == "hsm.range_busy"]
        assert busy and all(e["owner"] == "uart" and e["owner_pid"] == a.pid for e in busy), busy
        assert {e["range"] for e in busy} >= {"pio 0x3f0-0x3f8", "pci 00:03.7-00:03.7"}
        assert {e["owner_range"] for e in busy} == {"pio 0x3f8-0x3ff", "pci 00:03.0-00:03.7"}
    finally:
        if a is not None:
            a.kill()
        owner.close()


NOBODY = 65534


def test_binding_to_another_users_vm_is_eperm(daemon_factory):
    daemon = daemon_factory("--backend", "scripted", "--node-mode", "666")
    changed = open_path_to(daemon.node)  # so that the refusal is the HSM's, not the path's
    root_owner = nobody_owner = None
    try:
        root_owner = Ctl(daemon.node)
        root_vm = int(root_owner.ok("create 0x1")["vmid"])

        # a real other uid opens the node (mode 0666) and is refused by the HSM
        intruder = Ctl(daemon.node, user=NOBODY)
        try:
            assert intruder.ok("version")["major"] == "1"
            assert intruder.err(f"bind {root_vm}") == "EPERM"
            assert intruder.err("rc sneaky") == "EINVAL"  # still unbound
            # its own VM: it may bind a second file of its own to it
            nobody_owner = Ctl(daemon.node, user=NOBODY)
            nobody_vm = int(nobody_owner.ok("create 0x2")["vmid"])
            assert intruder.ok(f"bind {nobody_vm}") == {"vcpu_num": "1", "owner_uid": str(NOBODY)}
            intruder.ok("rc nobodys-dev")
        finally:
            intruder.close()
        # root may bind to anybody's VM
        admin = Ctl(daemon.node)
        try:
            assert admin.ok(f"bind {nobody_vm}")["owner_uid"] == str(NOBODY)
        finally:
            admin.close()
        refused = [e for e in daemon_log_events(daemon) if e.get("event") == "hsm.bind_refused"]
        assert refused and refused[0]["uid"] == NOBODY and refused[0]["owner_uid"] == 0
    finally:
        for c in (nobody_owner, root_owner):
            if c is not None:
                c.close()
        restore_modes(changed)
    assert os.stat(daemon.node).st_mode & 0o777 == 0o666


def test_range_client_killed_holding_a_read_resumes_the_vcpu_with_all_ones(hsm_daemon):
    control = Control(hsm_daemon.control)
    owner = Ctl(hsm_daemon.node)
    holder = mmio = None
    try:
        vmid = int(owner.ok("create 0x3")["vmid"])
        owner.ok("client")
        owner.ok("start")
        holder = RangeProc(hsm_daemon.node, vmid, "holder", "--hold", "pio:0x3f8-0x3ff")
        mmio = RangeProc(hsm_daemon.node, vmid, "mmio", "--tag", "0x77", "mmio:0xc0000000-0xc0000fff")
        assert holder.ok and mmio.ok

        waiting = inject_async(hsm_daemon, vmid, "pio-read", "0x3fa", "2", vcpu=1)
        line = holder.proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert line == "holding vcpu=1 kind=pio addr=0x3fa read=1", line
        assert control.hsm_vm(vmid)["counters"]["remote"] == 1
        # meanwhile vCPU 0 and the other clients go on
        assert control.inject(vmid, "mmio", False, 0xC000_0010, 4) == mmio_answer(0xC000_0010, 4) ^ 0x77
        assert control.inject(vmid, "pio", False, 0x80, 1) == pio_answer(0x80, 1)

        holder.proc.send_signal(signal.SIGKILL)
        holder.proc.wait(timeout=60)
        out, err = waiting.communicate(timeout=90)
        assert waiting.returncode == 0, err
        assert out.strip() == "0xffff"  # all ones, as unclaimed hardware answers

        gone = wait_until(
            lambda: [e for e in daemon_log_events(hsm_daemon) if e.get("event") == "hsm.range_client_gone"],
            "no hsm.range_client_gone log line",
        )
        assert gone[0]["client"] == "holder" and gone[0]["pid"] == holder.pid
        assert gone[0]["completed"] == [{"vcpu": 1, "kind": "pio", "read": True, "ret": 0}]
        # its ranges went back to the owner; the VM keeps running; the others go on
        assert control.inject(vmid, "pio", False, 0x3FA, 2, vcpu=1) == pio_answer(0x3FA, 2)
        assert control.inject(vmid, "mmio", True, 0xC000_0020, 8, 5, vcpu=1) == 0
        assert control.inject(vmid, "mmio", False, 0xC000_0020, 8) == mmio_answer(0xC000_0020, 8) ^ 0x77
        vm = control.hsm_vm(vmid)
        assert vm["state"] == "RUNNING" and vm["counters"]["orphaned"] == 1
        assert [c["name"] for c in vm["clients"] if "remote" in c] == ["mmio"]
        stats, done = mmio.stop()
        assert stats["attach_end"] == "ENODEV" and done["total"] == "3" and done["writes"] == "1"
        assert int(owner.ok("seen")["total"]) == 2
    finally:
        for p in (holder, mmio):
            if p is not None:
                p.kill()
        owner.close()


def test_range_client_closing_in_order_and_the_vm_owner_leaving(hsm_daemon):
    """A clean close answers nothing wrongly; an owner's destroy ends the range client's ATTACH."""
    control = Control(hsm_daemon.control)
    owner = Ctl(hsm_daemon.node)
    a = None
    try:
        vmid = int(owner.ok("create 0x1")["vmid"])
        owner.ok("client")
        owner.ok("start")
        a = RangeProc(hsm_daemon.node, vmid, "dev", "--tag", "0x1", "pio:0x100-0x1ff")
        assert control.inject(vmid, "pio", False, 0x100, 1) == pio_answer(0x100, 1) ^ 1
        owner.ok("pause")
        owner.ok("destroy")  # the owner's teardown: the range client's ATTACH ends with ENODEV
        out, _ = a.proc.communicate(timeout=60)
        assert a.proc.returncode == 0, out
        assert "stats attach_end=ENODEV" in out
        assert not control.status()["hsm"]["vms"]
    finally:
        if a is not None:
            a.kill()
        owner.close()
