"""The request path: vCPU threads, slots, upcall, completion, workloads, inject, faults.

The HSM is played by :class:`FakeHsm`: an upcall that scans the slots, folds
CF8/CFC like the driver, marks PROCESSING, answers reads, marks COMPLETE and
calls notify_request_finish (unless the slot polls). spec: hv A.2.3 - A.2.6.

Every test runs twice (the ``rigs`` fixture): with the page in this process's
LocalMemory and a plain callable upcall (the vCPU's Python path), and as the
daemon runs, with the page reached through process_vm_* and an eventfd upcall
served by another thread (the native request cycle, ``hsm_slot_cycle``).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable

import pytest
import structlog

from acrn_hsm_emu import abi
from acrn_hsm_emu._native import lib as _lib
from acrn_hsm_emu.hypervisor.api import Access, FdUpcall
from acrn_hsm_emu.hypervisor.hypervisor import Hypervisor
from acrn_hsm_emu.hypervisor.vcpu import AccessAborted, Vcpu
from acrn_hsm_emu.hypervisor.workload import Step, Workload, pci_address
from acrn_hsm_emu.memory import LocalMemory, RemoteMemory, SharedPage
from tests.support.poll import wait_until

PENDING, COMPLETE, PROCESSING, FREE = 0, 1, 2, 3
PIO, MMIO, PCICFG = 0, 1, 2
HANG_GUARD_S = 30.0


def answer(req: dict) -> int:
    """What the fake device model reads back: a pure function of the request."""
    if req["type"] == PCICFG:
        key = req["bus"] << 16 | req["dev"] << 11 | req["func"] << 8 | req["reg"]
    else:
        key = req["address"]
    return (key * 0x9E3779B97F4A7C15 + req["size"]) & ((1 << (8 * req["size"])) - 1)


def expected(access: Access) -> int:
    """answer() for the request a guest access turns into after CF8/CFC folding."""
    if access.kind == "pci":
        a = access.addr
        reg = (a & 0xFF) | (a >> 16) & 0xF00
        req = {
            "type": PCICFG,
            "bus": a >> 16 & 0xFF,
            "dev": a >> 11 & 0x1F,
            "func": a >> 8 & 7,
            "reg": reg,
            "size": access.size,
        }
    else:
        req = {
            "type": PIO if access.kind == "pio" else MMIO,
            "address": access.addr,
            "size": access.size,
        }
    return answer(req)


class FakeHsm:
    """The HSM's part of the request cycle, for one VM."""

    def __init__(
        self, hv: Hypervisor, vmid: int, page: SharedPage, vcpus: int, defer: bool = False,
        handoff: bool = False,
    ) -> None:
        self.hv, self.vmid, self.page, self.vcpus = hv, vmid, page, vcpus
        self.defer = defer  # leave requests PROCESSING until complete() is called
        # complete as the express reader does: the notify's native form frees the
        # slot and hands the value to a vCPU waiting natively (hsm_vcpu_finish)
        self.handoff = handoff
        self.handed = 0
        self.lock = threading.Lock()
        self.latch = 0
        self.requests: list[dict] = []  # as the hypervisor wrote them, in arrival order
        self.notifies = 0
        self.upcalls = 0
        self.outstanding = threading.Event()
        self.answer: Callable[[dict], int] = answer

    def upcall(self) -> None:
        with self.lock:
            self.upcalls += 1
            for i in range(self.vcpus):
                off = i * 256
                if self.page.load_u32(off + abi.SLOT_PROCESSED) != PENDING:
                    continue
                raw = self.page.read(off, 256)
                typ, polling = struct.unpack_from("<II", raw, 0)
                d, a, s = struct.unpack_from("<I4xQQ", raw, 64)
                value = struct.unpack_from("<Q" if typ == MMIO else "<I", raw, 88)[0]
                req = {
                    "vcpu": i,
                    "type": typ,
                    "polling": polling,
                    "write": bool(d),
                    "address": a,
                    "size": s,
                    "value": value,
                    "raw": raw,
                }
                self.requests.append(req)
                if typ == PIO and a == 0xCF8:  # latched and answered by the driver
                    if d:
                        self.latch = value
                    else:
                        self.page.write(off + 88, struct.pack("<I", self.latch))
                    self._complete(i)
                    continue
                if typ == PIO and 0xCFC <= a <= 0xCFF and self.latch & 1 << 31:
                    l8 = self.latch
                    req.update(
                        type=PCICFG,
                        bus=l8 >> 16 & 0xFF,
                        dev=l8 >> 11 & 0x1F,
                        func=l8 >> 8 & 7,
                        reg=(l8 & 0xFC) + (l8 >> 16 & 0xF00) + a - 0xCFC,
                    )
                    self.page.write(off, struct.pack("<I", PCICFG))
                    self.page.write(
                        off + 92,
                        struct.pack("<IIII", req["bus"], req["dev"], req["func"], req["reg"]),
                    )
                self.page.store_u32(off + abi.SLOT_PROCESSED, PROCESSING)
                if self.defer:
                    self.outstanding.set()
                    continue
                self._answer(i, req)

    def _answer(self, i: int, req: dict) -> None:
        if not req["write"]:
            v = self.answer(req)
            self.page.write(i * 256 + 88, struct.pack("<Q" if req["type"] == MMIO else "<I", v))
        self._complete(i)

    def _complete(self, i: int) -> None:
        polling = self.page.load_u32(i * 256 + abi.SLOT_COMPLETION_POLLING)
        if self.handoff and not polling:
            waits = self.hv.notify_waits(self.vmid)
            assert waits is not None
            value = struct.unpack("<Q", self.page.read(i * 256 + 88, 8))[0]
            rc = _lib.hsm_vcpu_finish(waits[i], os.getpid(), self.page.base + i * 256, value, 0)
            assert rc >= 0
            if rc:  # the slot is FREE, the value handed: only the wake-up is left
                self.handed += 1
                self.notifies += 1
                assert self.hv.notify_request_finish(self.vmid, i) == 0
                return
        self.page.store_u32(i * 256 + abi.SLOT_PROCESSED, COMPLETE)
        if not polling:
            self.notifies += 1
            assert self.hv.notify_request_finish(self.vmid, i) == 0

    def complete(self, i: int, value: int | None = None) -> None:
        """Finish a deferred request (value overrides the answer)."""
        with self.lock:
            req = [r for r in self.requests if r["vcpu"] == i][-1]
            if value is not None:
                self.answer = lambda r, v=value, old=self.answer: v if r is req else old(r)
            self.outstanding.clear()
            self._answer(i, req)


class RecordingMemory(LocalMemory):
    """LocalMemory that logs every write, to check what lands in which order."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[int, bytes]] = []

    def write(self, addr: int, data: bytes) -> None:
        self.writes.append((addr, bytes(data)))
        super().write(addr, data)

    def store_u32(self, addr: int, value: int) -> None:
        self.writes.append((addr, struct.pack("<I", value)))
        super().store_u32(addr, value)


class Rig:
    """A hypervisor with one VM, its request page and a fake HSM."""

    def __init__(
        self,
        workload: Workload | None = None,
        affinity: int = 0x1,
        flags: int = 0,
        defer: bool = False,
        memory: LocalMemory | None = None,
        native: bool = False,
        handoff: bool = False,
    ) -> None:
        self.hv = Hypervisor(workload=workload)
        cv = abi.AcrnVmCreation(cpu_affinity=affinity, vm_flag=flags)
        buf = bytearray(bytes(cv))
        assert self.hv.create_vm(buf) == 0
        out = abi.AcrnVmCreation.from_buffer(buf)
        self.vmid, self.vcpus = out.vmid, out.vcpu_num
        self.native = native and memory is None
        self._server: threading.Thread | None = None
        if self.native:
            # the daemon's setting: the page through process_vm_* (here on our own
            # pid), the upcall an eventfd that another thread waits for
            self.mmap = mmap.mmap(-1, mmap.PAGESIZE)
            view = (ctypes.c_char * mmap.PAGESIZE).from_buffer(self.mmap)
            addr = ctypes.addressof(view)
            del view  # no export left: unmap() can close the mapping
            self.mem = RemoteMemory(os.getpid())
            self.page = SharedPage(self.mem, addr)
            self.hsm = FakeHsm(self.hv, self.vmid, self.page, self.vcpus, defer, handoff)
            self.upcall = FdUpcall()
            self._stop = os.eventfd(0, os.EFD_CLOEXEC)
            self._server = threading.Thread(target=self._serve, daemon=True)
            self._server.start()
            self.hv.set_upcall(self.upcall)
        else:
            self.mem = memory or LocalMemory()
            self.mmap, addr = self.mem.alloc_page()
            self.page = SharedPage(self.mem, addr)
            self.hsm = FakeHsm(self.hv, self.vmid, self.page, self.vcpus, defer)
            self.hv.set_upcall(self.hsm.upcall)
        assert self.hv.set_ioreq_buffer(self.vmid, self.page) == 0

    def _serve(self) -> None:
        """The HSM's side of an eventfd upcall: a scan per readiness."""
        p = select.poll()
        p.register(self.upcall.fd, select.POLLIN)
        p.register(self._stop, select.POLLIN)
        while True:
            ready = {fd for fd, _ in p.poll()}
            if self._stop in ready:
                return
            if self.upcall.take():
                try:
                    self.hsm.upcall()
                except Exception:  # the page is gone (fault tests): later scans fail too
                    pass

    def unmap(self) -> None:
        """The client died: its page is gone."""
        if self.native:
            self.mmap.close()
        else:
            self.mem.remove(self.page.base)

    def start(self) -> None:
        assert self.hv.start_vm(self.vmid) == 0

    def vm(self) -> dict:
        return self.hv.snapshot()["vms"][0]

    def vcpu(self, i: int = 0) -> dict:
        return self.vm()["vcpus"][i]

    def done(self) -> bool:
        return all(v["workload_done"] for v in self.vm()["vcpus"])

    def slot_state(self, i: int = 0) -> int:
        return self.page.load_u32(i * 256 + abi.SLOT_PROCESSED)

    def close(self) -> None:
        self.hv.shutdown()
        if self._server is not None:
            os.eventfd_write(self._stop, 1)
            self._server.join(HANG_GUARD_S)
            os.close(self._stop)


@pytest.fixture(params=["python", "native", "native-handoff"])
def rigs(request):
    """The vCPU's Python path; its native cycle; the native cycle with completions
    handed over by the notify's native form, as the express reader gives them."""
    made: list[Rig] = []

    def make(*a: object, **kw: object) -> Rig:
        r = Rig(*a, native=request.param != "python", handoff=request.param == "native-handoff", **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def inject(rig: Rig, access: Access, vcpu: int = 0) -> int:
    return rig.hv.inject(rig.vmid, vcpu, access).result(HANG_GUARD_S)


# ----- slot filling -------------------------------------------------------------------


def test_pio_write_slot_content_and_order(rigs) -> None:
    mem = RecordingMemory()
    r = rigs(memory=mem)
    r.start()
    mem.writes.clear()
    assert inject(r, Access("pio", True, 0x3F8, 1, 0x41)) == 0
    base = r.page.base
    # one write of type..reqs, then PENDING, (the fake HSM's PROCESSING/COMPLETE), then FREE
    (a0, head), (a1, state) = mem.writes[0], mem.writes[1]
    assert (a0, len(head)) == (base, 128)
    assert (a1, state) == (base + abi.SLOT_PROCESSED, struct.pack("<I", PENDING))
    assert mem.writes[-1] == (base + abi.SLOT_PROCESSED, struct.pack("<I", FREE))
    req = r.hsm.requests[0]
    assert (req["type"], req["write"], req["address"], req["size"], req["value"]) == (
        PIO,
        True,
        0x3F8,
        1,
        0x41,
    )
    assert req["polling"] == 0
    assert r.slot_state() == FREE
    assert r.hsm.notifies == 1 and r.vcpu()["requests"] == 1


def test_reads_and_union_leftovers(rigs) -> None:
    r = rigs()
    r.start()
    assert inject(r, Access("mmio", True, 0xD000_0000, 8, 0x1122334455667788)) == 0
    assert inject(r, Access("mmio", False, 0xD000_0010, 8)) == answer(
        {"type": MMIO, "address": 0xD000_0010, "size": 8}
    )
    got = inject(r, Access("pio", False, 0x71, 2))
    assert got == answer({"type": PIO, "address": 0x71, "size": 2})
    mmio_w, mmio_r, pio_r = r.hsm.requests
    assert (mmio_w["type"], mmio_w["value"]) == (MMIO, 0x1122334455667788)
    assert mmio_r["value"] == 0x1122334455667788  # a read's value field is stale
    # The whole 64-byte union is copied: the PIO read still carries the MMIO read's
    # high value bytes at 92..95 (the PCI `bus` position).
    hi = answer({"type": MMIO, "address": 0xD000_0010, "size": 8}) >> 32
    assert struct.unpack_from("<I", pio_r["raw"], 92)[0] == hi


def test_pci_access_is_cf8_then_cfc(rigs) -> None:
    r = rigs()
    r.start()
    acc = Access("pci", False, pci_address(0, 3, 1, 0x10A), 2)
    assert inject(r, acc) == expected(acc)
    cf8, cfc = r.hsm.requests
    assert (cf8["type"], cf8["write"], cf8["address"], cf8["size"]) == (PIO, True, 0xCF8, 4)
    assert cf8["value"] == 0x80000000 | 3 << 11 | 1 << 8 | 0x08 | 0x1 << 24
    assert (cfc["address"], cfc["size"], cfc["write"]) == (0xCFE, 2, False)
    assert (cfc["bus"], cfc["dev"], cfc["func"], cfc["reg"]) == (0, 3, 1, 0x10A)
    acc = Access("pci", True, pci_address(1, 0, 0, 4), 4, 0xDEAD)
    assert inject(r, acc) == 0
    assert r.hsm.requests[-1]["value"] == 0xDEAD and r.hsm.requests[-1]["reg"] == 4
    assert r.vcpu()["accesses"] == 2 and r.vcpu()["requests"] == 4


def test_accesses_the_hypervisor_answers_itself(rigs) -> None:
    r = rigs()
    r.start()
    inject(r, Access("pio", True, 0xCF8, 4, 0x8F001234))  # forwarded, and latched
    assert inject(r, Access("pio", False, 0xCF8, 4)) == 0x80001234  # reserved bits masked
    assert inject(r, Access("pio", False, 0xCF8, 2)) == 0xFFFF
    inject(r, Access("pio", True, 0xCF8, 1, 0x12))  # other widths: dropped
    inject(r, Access("pio", False, 0xCFC, 4))  # the data port clears the latch
    assert inject(r, Access("pio", False, 0xCF8, 4)) == 0
    inject(r, Access("pio", True, 0x21, 1, 0xFB))  # vPIC
    assert inject(r, Access("pio", False, 0x21, 1)) == 0xFB
    inject(r, Access("mmio", True, 0xFEC00010, 4, 7))  # vIOAPIC
    assert [q["address"] for q in r.hsm.requests] == [0xCF8, 0xCFC]
    assert r.vcpu()["hv_handled"] == 7


# ----- completion modes ---------------------------------------------------------------


def test_notify_arriving_before_the_wait_is_not_lost(rigs) -> None:
    # FakeHsm completes and notifies inside the upcall, i.e. before the vCPU waits.
    r = rigs(workload=Workload.build({0: [Step.pio(0x80, 1, write=True, value=1, repeat=500)]}))
    r.start()
    wait_until(r.done, "workload")
    assert r.hsm.notifies == 500 and r.vcpu()["requests"] == 500


def test_polling_mode(rigs) -> None:
    steps = [Step.pio(0x60, 1, expect=answer({"type": PIO, "address": 0x60, "size": 1}), repeat=50)]
    r = rigs(workload=Workload.build({0: steps}), flags=abi.GUEST_FLAG_IO_COMPLETION_POLLING)
    assert r.vm()["polling"]
    r.start()
    wait_until(r.done, "workload")
    assert r.hsm.notifies == 0
    assert all(q["polling"] == 1 for q in r.hsm.requests)
    assert r.vcpu()["mismatches"] == 0 and r.vcpu()["accesses"] == 50
    assert r.hv.notify_request_finish(r.vmid, 0) == 0  # accepted, wakes nobody


def test_polling_mode_with_late_completion(rigs) -> None:
    r = rigs(flags=abi.GUEST_FLAG_IO_COMPLETION_POLLING, defer=True)
    r.start()
    fut = r.hv.inject(r.vmid, 0, Access("mmio", False, 0x1000, 4))
    assert r.hsm.outstanding.wait(HANG_GUARD_S)
    time.sleep(0.01)  # let the vCPU back off into its slower polling
    assert not fut.done()
    r.hsm.complete(0, 0xCAFE)
    assert fut.result(HANG_GUARD_S) == 0xCAFE


# ----- workloads ----------------------------------------------------------------------


def test_mismatch_is_counted_and_logged(rigs) -> None:
    good = answer({"type": PIO, "address": 0x61, "size": 1})
    wl = Workload.build(
        {
            0: [
                Step.pio(0x61, 1, expect=good),
                Step.pio(0x61, 1, expect=good ^ 1),
                Step.cpuid(0x40000000, expect={"eax": 0x40000010, "ebx": 0}),
                Step.cpuid(0x40000010, expect=[2_000_000, 0, 0, 0]),
            ]
        }
    )
    r = rigs(workload=wl)
    with structlog.testing.capture_logs() as logs:
        r.start()
        wait_until(r.done, "workload")
    v = r.vcpu()
    assert v["mismatches"] == 2 and v["cpuid"] == 2 and v["accesses"] == 2
    bad = [e for e in logs if e["event"] == "workload.mismatch"]
    assert [(e["expected"], e["got"]) for e in bad] == [
        (f"{good ^ 1:#x}", f"{good:#x}"),
        ("0x0", f"{abi.ACRN_SIGNATURE_REG:#x}"),
    ]
    assert bad[0]["vmid"] == r.vmid and bad[0]["vcpu"] == 0


def test_pause_reset_restart(rigs) -> None:
    first = Step.pio(0x10, 1, write=True, value=1)
    wl = Workload.build({0: [first, Step.pio(0x11, 1, write=True, value=2, repeat=1000)]}, repeat=0)
    r = rigs(workload=wl)
    r.start()
    wait_until(lambda: r.vcpu()["accesses"] > 100, "progress")
    assert r.hv.pause_vm(r.vmid) == 0
    wait_until(lambda: r.vcpu()["state"] == "zombie", "the vCPU to stop")
    stopped = r.vcpu()["accesses"]
    time.sleep(0.02)
    assert r.vcpu()["accesses"] == stopped  # nothing happens while paused
    assert r.slot_state() == FREE
    assert r.hv.reset_vm(r.vmid) == 0
    n = len(r.hsm.requests)
    assert r.hv.start_vm(r.vmid) == 0
    wait_until(lambda: len(r.hsm.requests) > n, "restart")
    assert r.hsm.requests[n]["address"] == 0x10  # from the beginning


def test_pause_while_a_request_is_outstanding(rigs) -> None:
    r = rigs(
        workload=Workload.build({0: [Step.pio(0x20 + 0x100, 1), Step.pio(0x200, 1)]}), defer=True
    )
    r.start()
    assert r.hsm.outstanding.wait(HANG_GUARD_S)
    assert r.vcpu()["state"] == "waiting"
    assert r.hv.pause_vm(r.vmid) == 0
    r.hsm.complete(0)  # the device model finishes after the pause
    wait_until(lambda: r.slot_state() == FREE, "the zombie vCPU to free its slot")
    wait_until(lambda: r.vcpu()["state"] == "zombie", "zombie")
    assert r.vcpu()["accesses"] == 0  # the result was dropped, the step not done
    assert len(r.hsm.requests) == 1
    assert r.hv.reset_vm(r.vmid) == 0 and r.hv.start_vm(r.vmid) == 0
    assert r.hsm.outstanding.wait(HANG_GUARD_S)
    assert [q["address"] for q in r.hsm.requests] == [0x120, 0x120]


def test_reset_abandons_a_request_nobody_completes(rigs) -> None:
    r = rigs(defer=True)
    r.start()
    fut = r.hv.inject(r.vmid, 0, Access("pio", False, 0x300, 4))
    queued = r.hv.inject(r.vmid, 0, Access("pio", False, 0x304, 4))
    assert r.hsm.outstanding.wait(HANG_GUARD_S)
    assert r.hv.pause_vm(r.vmid) == 0 and r.hv.reset_vm(r.vmid) == 0
    with pytest.raises(AccessAborted):
        fut.result(HANG_GUARD_S)
    with pytest.raises(AccessAborted):
        queued.result(HANG_GUARD_S)
    assert r.slot_state() == FREE
    assert r.hv.pause_vm(r.vmid) == 0 and r.hv.destroy_vm(r.vmid) == 0


def test_ten_thousand_accesses_on_two_vcpus(rigs) -> None:
    def program(seed: int) -> list[Step]:
        steps: list[Step] = []
        for i in range(5000):
            k = (i * 7 + seed) % 5
            if k == 0:
                acc = Access("pio", False, 0x1000 + (i % 64) * 4, (1, 2, 4)[i % 3])
            elif k == 1:
                acc = Access("mmio", False, 0xC000_0000 + i * 8, (1, 2, 4, 8)[i % 4])
            elif k == 2:
                acc = Access("pci", False, pci_address(i % 4, i % 32, i % 8, (i * 4) % 0x1000), 4)
            elif k == 3:
                steps.append(Step.mmio(0xC100_0000 + i * 8, 8, write=True, value=i))
                continue
            else:
                steps.append(Step.pio(0x80, 1, write=True, value=i & 0xFF))
                continue
            kind = {"pio": Step.pio, "mmio": Step.mmio}
            if acc.kind == "pci":
                a = acc.addr
                steps.append(
                    Step.pci(
                        a >> 16 & 0xFF,
                        a >> 11 & 0x1F,
                        a >> 8 & 7,
                        (a & 0xFF) | (a >> 16) & 0xF00,
                        4,
                        expect=expected(acc),
                    )
                )
            else:
                steps.append(kind[acc.kind](acc.addr, acc.size, expect=expected(acc)))
        return steps

    wl = Workload.build({0: program(0), 1: program(3)})
    assert sum(p.accesses_per_run for p in wl.programs.values()) == 10_000
    r = rigs(workload=wl, affinity=0x3)
    native_cycles = []
    real = Vcpu._post_wait_native

    def counted(self: Vcpu, *a: object) -> int:
        native_cycles.append(1)
        return real(self, *a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Vcpu, "_post_wait_native", counted)
        r.start()
        wait_until(r.done, "10,000 accesses")
    v0, v1 = r.vm()["vcpus"]
    assert (v0["accesses"], v1["accesses"]) == (5000, 5000)
    assert v0["mismatches"] == 0 and v1["mismatches"] == 0
    assert r.hsm.notifies == v0["requests"] + v1["requests"]
    assert {q["vcpu"] for q in r.hsm.requests} == {0, 1}
    # which path served them: all native in the daemon's setting, none otherwise
    assert len(native_cycles) == (v0["requests"] + v1["requests"] if r.native else 0)
    # the notify's native form took every completion where it was offered: the vCPU
    # waiting natively is armed for it from before its request is posted
    assert r.hsm.handed == (r.hsm.notifies if r.hsm.handoff else 0)
    assert v0["completions_handed"] + v1["completions_handed"] == r.hsm.handed


def test_wrong_answers_are_caught(rigs) -> None:
    """The checks above can fail: a device model answering wrongly is noticed."""
    steps = [
        Step.mmio(0x1000 * i, 4, expect=expected(Access("mmio", False, 0x1000 * i, 4)))
        for i in range(20)
    ]
    r = rigs(workload=Workload.build({0: steps}))
    r.hsm.answer = lambda req: answer(req) ^ (req["address"] == 0x5000)
    r.start()
    wait_until(r.done, "workload")
    assert r.vcpu()["mismatches"] == 1


def test_workload_per_vm_and_vcpus_without_program(rigs) -> None:
    r = rigs(workload=Workload.build({1: [Step.pio(0x90, 1, write=True, value=1)]}), affinity=0x3)
    r.start()
    wait_until(lambda: r.vm()["vcpus"][1]["workload_done"], "vcpu 1")
    assert r.vm()["vcpus"][0]["workload"] == "no workload"
    wait_until(lambda: r.vm()["vcpus"][0]["state"] == "idle", "vcpu 0 idle")
    r.hv.set_workload(r.vmid, Workload.build({0: [Step.pio(0x91, 1, write=True, value=1)]}))
    assert r.hv.pause_vm(r.vmid) == 0 and r.hv.reset_vm(r.vmid) == 0 and r.hv.start_vm(r.vmid) == 0
    wait_until(lambda: r.vm()["vcpus"][0]["workload_done"], "vcpu 0")
    assert [q["address"] for q in r.hsm.requests] == [0x90, 0x91]


def test_sleep_is_interrupted_by_pause_and_inject(rigs) -> None:
    r = rigs(
        workload=Workload.build({0: [Step.sleep(600), Step.pio(0x99, 1, write=True, value=1)]})
    )
    r.start()
    wait_until(lambda: r.vcpu()["state"] == "running", "the sleep")
    assert inject(r, Access("pio", False, 0x42, 1)) == answer(
        {"type": PIO, "address": 0x42, "size": 1}
    )
    assert r.hv.pause_vm(r.vmid) == 0
    wait_until(lambda: r.vcpu()["state"] == "zombie", "pause during a sleep")
    assert [q["address"] for q in r.hsm.requests] == [0x42]


# ----- inject -------------------------------------------------------------------------


def test_inject(rigs) -> None:
    r = rigs(affinity=0x3)
    early = r.hv.inject(r.vmid, 1, Access("pio", False, 0x70, 1))  # queued until START
    time.sleep(0.01)
    assert not early.done()
    r.start()
    assert early.result(HANG_GUARD_S) == answer({"type": PIO, "address": 0x70, "size": 1})
    with pytest.raises(ValueError):
        r.hv.inject(r.vmid, 2, Access("pio", False, 0x70, 1)).result(HANG_GUARD_S)
    with pytest.raises(ValueError):
        r.hv.inject(99, 0, Access("pio", False, 0x70, 1)).result(HANG_GUARD_S)
    with pytest.raises(ValueError):
        r.hv.inject(r.vmid, 0, Access("pio", False, 0x70, 3)).result(HANG_GUARD_S)
    assert r.vm()["vcpus"][1]["injected"] == 1


def test_rtc_ports_forwarded_for_standard_vm_and_local_for_rt(rigs) -> None:
    r = rigs()
    r.start()
    assert inject(r, Access("pio", False, 0x71, 1)) == answer(
        {"type": PIO, "address": 0x71, "size": 1}
    )
    rt = rigs(flags=abi.GUEST_FLAG_RT | abi.GUEST_FLAG_IO_COMPLETION_POLLING)
    rt.start()
    assert inject(rt, Access("pio", True, 0x70, 1, 0x0E)) == 0  # vRTC in the hypervisor:
    assert inject(rt, Access("pio", False, 0x71, 1)) == 0  # a CMOS byte, zero at first
    assert inject(rt, Access("pio", True, 0x71, 1, 0x5A)) == 0
    assert inject(rt, Access("pio", False, 0x71, 1)) == 0x5A
    assert inject(rt, Access("pio", False, 0x64, 1)) == 0xFF  # answered all-ones
    assert rt.hsm.requests == []


# ----- faults -------------------------------------------------------------------------


def test_a_fault_on_the_page_stops_the_vm_only(rigs) -> None:
    wl = Workload.build(
        {0: [Step.pio(0x80, 1, write=True, value=1)], 1: [Step.pio(0x84, 1)]}, repeat=0
    )
    r = rigs(workload=wl, affinity=0x3)
    other = rigs(workload=Workload.build({0: [Step.pio(0x80, 1, write=True, value=1, repeat=10)]}))
    with structlog.testing.capture_logs() as logs:
        r.start()
        wait_until(lambda: r.vcpu(0)["accesses"] > 10, "progress")
        r.unmap()  # the client died: its page is gone
        wait_until(lambda: all(v["state"] == "faulted" for v in r.vm()["vcpus"]), "faulted")
    assert r.vm()["fault"]
    assert [e["event"] for e in logs].count("vm.request_page_fault") == 1
    with pytest.raises(AccessAborted):
        r.hv.inject(r.vmid, 0, Access("pio", False, 0x80, 1)).result(HANG_GUARD_S)
    other.start()
    wait_until(other.done, "the other VM")
    # the faulted VM can still be torn down; the threads end
    assert r.hv.pause_vm(r.vmid) == 0 and r.hv.reset_vm(r.vmid) == 0  # reset logs the fault
    assert r.hv.destroy_vm(r.vmid) == -1 and r.hv.pause_vm(r.vmid) == 0
    vm = r.hv._slots[r.vmid].vm
    assert r.hv.destroy_vm(r.vmid) == 0
    assert all(not v._thread.is_alive() for v in vm.vcpus)


def test_a_crashing_upcall_is_logged_not_fatal(rigs) -> None:
    r = rigs(defer=True)
    calls = []

    def bad_upcall() -> None:
        calls.append(1)
        r.hsm.upcall()
        raise RuntimeError("boom")

    r.hv.set_upcall(bad_upcall)
    r.start()
    with structlog.testing.capture_logs() as logs:
        fut = r.hv.inject(r.vmid, 0, Access("pio", False, 0x80, 1))
        assert r.hsm.outstanding.wait(HANG_GUARD_S)
        r.hsm.complete(0, 5)
        assert fut.result(HANG_GUARD_S) == 5
    assert any(e["event"] == "vcpu.upcall_failed" for e in logs)


def test_destroy_and_shutdown_end_the_threads(rigs) -> None:
    r = rigs(workload=Workload.build({0: [Step.sleep(600)]}), affinity=0x3)
    r.start()
    vm = r.hv._slots[r.vmid].vm
    r.hv.shutdown()
    assert all(not v._thread.is_alive() for v in vm.vcpus)
    assert [v["state"] for v in r.vm()["vcpus"]] == ["stopped", "stopped"]
