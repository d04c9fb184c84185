"""The kvm backend inside the hypervisor, without the daemon.

Guest RAM is memory of this process (direct mapping), the HSM is the
FakeHsm of test_hypervisor_vcpu (CF8/CFC folding, answers, notify). These
tests cover what the daemon cannot reach: SET_IRQLINE (FUSE refuses it in the
kernel), several vCPUs, triple faults, memory changes while running, the
vCPU state machine around abandoned requests. The client-facing acceptance
checks are in test_kvm_daemon.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import pathlib
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from test_hypervisor_vcpu import FakeHsm

from acrn_hsm_emu import abi
from acrn_hsm_emu.hypervisor.api import MR_ADD, MR_DEL, MemoryRegionOp
from acrn_hsm_emu.hypervisor.backends import kvm as kvm_mod
from acrn_hsm_emu.hypervisor.hypervisor import Hypervisor
from acrn_hsm_emu.hypervisor.scenario import DEFAULT_SCENARIO_DATA, Scenario, parse_scenario
from acrn_hsm_emu.hypervisor.vm import VmState
from acrn_hsm_emu.hypervisor.workload import Step, Workload
from acrn_hsm_emu.memory import LocalMemory, SharedPage
from tests.guests.build import Guest, assemble
from tests.support.poll import wait_until

pytestmark = pytest.mark.needs_kvm

HANG_GUARD_S = 30.0
WB_RWX = abi.ACRN_MEM_TYPE_WB | abi.ACRN_MEM_ACCESS_RWX
GSI_KEYBOARD = 1


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Guest]:
    out = tmp_path_factory.mktemp("guests")
    made: dict[tuple[str, int], Guest] = {}

    def get(name: str, load: int = 0, bits: int = 32) -> Guest:
        if (name, load) not in made:
            made[(name, load)] = assemble(name, out, load, bits)
        return made[(name, load)]

    return get


def regs(mode: str = "real", vcpu_id: int = 0, **fields: int) -> bytes:
    """acrn_vcpu_regs as vm-sample (real) or the DM's bzImage loader (pm32) set them."""
    v = abi.AcrnVcpuRegs(vcpu_id=vcpu_id)
    r = v.vcpu_regs
    if mode == "real":
        r.cr0, r.cs_sel, r.cs_base, r.cs_ar, r.cs_limit = 0x30, 0xF000, 0, 0x9F, 0xFFFF
    else:
        r.cr0, r.cs_sel, r.cs_base, r.cs_ar, r.cs_limit = 0x31, 0x10, 0, 0xC09B, 0xFFFFFFFF
        r.ds_sel = r.es_sel = r.ss_sel = 0x18
    for name, value in fields.items():
        if name in ("rsp", "rax"):
            setattr(r.gprs, name, value)
        elif name in ("gdt", "idt"):
            getattr(r, name).base, getattr(r, name).limit = value
        else:
            setattr(r, name, value)
    return bytes(v)


class KvmRig:
    """A kvm-backed hypervisor with one VM whose RAM is a buffer of this process."""

    def __init__(
        self,
        ram_size: int = 0x10000,
        affinity: int = 0x1,
        workload: Workload | None = None,
        scenario: Scenario | None = None,
    ) -> None:
        self.hv = Hypervisor(scenario, backend="kvm", workload=workload)
        buf = bytearray(bytes(abi.AcrnVmCreation(cpu_affinity=affinity)))
        assert self.hv.create_vm(buf) == 0
        out = abi.AcrnVmCreation.from_buffer(buf)
        self.vmid, self.vcpus = out.vmid, out.vcpu_num
        self.mem = LocalMemory()
        self._page_mm, addr = self.mem.alloc_page()
        self.page = SharedPage(self.mem, addr)
        self.hsm = FakeHsm(self.hv, self.vmid, self.page, self.vcpus)
        self.answers: dict[int, int] = {}
        self.hsm.answer = lambda req: self.answers.get(req.get("address", -1), 0)
        self.hv.set_upcall(self.hsm.upcall)
        assert self.hv.set_ioreq_buffer(self.vmid, self.page) == 0
        self.ram: mmap.mmap | None = None
        self.ram_addr = 0
        if ram_size:
            self.ram, self.ram_addr = self.mem.alloc_page(ram_size)
            assert self.map_ram(0, self.ram_addr, ram_size) == 0

    def map_ram(self, gpa: int, addr: int, size: int) -> int:
        ops = [
            MemoryRegionOp(MR_ADD, WB_RWX, gpa + off, (1 << 40) + gpa + off, 4096, self.mem, addr + off)
            for off in range(0, size, 4096)
        ]
        return self.hv.set_memory_regions(self.vmid, ops)

    def load(self, guest: Guest, at: int | None = None) -> None:
        assert self.ram is not None
        at = guest.load if at is None else at
        self.ram[at : at + len(guest.image)] = guest.image

    def u32(self, gpa: int) -> int:
        assert self.ram is not None
        return int.from_bytes(self.ram[gpa : gpa + 4], "little")

    def writes(self, port: int | None = None) -> list[tuple[int, int, int]]:
        """(vcpu, port, value) of the PIO writes seen so far."""
        with self.hsm.lock:
            reqs = list(self.hsm.requests)
        return [
            (r["vcpu"], r["address"], r["value"] & ((1 << (8 * r["size"])) - 1))
            for r in reqs
            if r["type"] == 0 and r["write"] and (port is None or r["address"] == port)
        ]

    def wait_write(self, port: int, count: int = 1) -> None:
        wait_until(lambda: len(self.writes(port)) >= count, f"{count} write(s) to port {port:#x}")

    def state(self) -> str:
        return self.hv.snapshot()["vms"][0]["state"]

    def vcpu(self, i: int) -> dict[str, object]:
        return self.hv.snapshot()["vms"][0]["vcpus"][i]

    def kvm_vm(self) -> kvm_mod.KvmVm:
        backend = self.hv.backend
        assert isinstance(backend, kvm_mod.KvmBackend)
        return backend._vms[self.vmid]

    def close(self) -> None:
        self.hv.shutdown()
        assert kvm_mod.REAPER.drain(HANG_GUARD_S)


@pytest.fixture
def rigs() -> Iterator[Callable[..., KvmRig]]:
    made: list[KvmRig] = []

    def make(*a: object, **kw: object) -> KvmRig:
        r = KvmRig(*a, **kw)  # type: ignore[arg-type]
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


# ----- interrupts ---------------------------------------------------------------------


def test_irqline_ops_drive_the_pic_of_a_real_mode_guest(rigs, guests) -> None:
    """SET_IRQLINE -> KVM_IRQ_LINE with ACRN's op semantics: only rising edges
    interrupt an edge-triggered PIC input; the guest's handler reports each one."""
    r = rigs()
    r.load(guests("irq16"))
    assert r.hv.set_vcpu_regs(r.vmid, regs()) == 0
    assert r.hv.start_vm(r.vmid) == 0
    r.wait_write(0x50)  # PIC programmed, handler installed, interrupts on
    irq = lambda op: r.hv.set_irqline(r.vmid, op << 32 | GSI_KEYBOARD)  # noqa: E731
    assert irq(abi.IRQ_SET_LOW) == 0  # low -> low: nothing
    assert irq(abi.IRQ_RAISING_PULSE) == 0  # up and down: one interrupt
    r.wait_write(0x51, 1)
    assert len(r.writes(0x51)) == 1  # so the SET_LOW before it delivered nothing
    assert irq(abi.IRQ_SET_HIGH) == 0  # rising edge: one
    r.wait_write(0x51, 2)
    assert irq(abi.IRQ_SET_HIGH) == 0  # already high: nothing
    assert irq(abi.IRQ_SET_LOW) == 0
    assert irq(abi.IRQ_FALLING_PULSE) == 0  # low: down (no change), then up: one
    r.wait_write(0x51, 3)
    assert irq(abi.IRQ_RAISING_PULSE) == 0  # the line is high: up (no change), down: none
    assert irq(abi.IRQ_RAISING_PULSE) == 0  # low again: one
    r.wait_write(0x51, 4)
    assert [v for _, _, v in r.writes(0x51)] == [0x21] * 4  # exactly one per rising edge
    lines = r.hv.snapshot()["vms"][0]["irqlines"][str(GSI_KEYBOARD)]
    assert lines["set_high"] == 2 and lines["raising_pulse"] == 3 and lines["falling_pulse"] == 1


def test_irqline_above_the_kvm_ioapic_is_recorded_not_delivered(rigs) -> None:
    r = rigs(ram_size=0)
    with structlog.testing.capture_logs() as logs:
        assert r.hv.set_irqline(r.vmid, abi.IRQ_RAISING_PULSE << 32 | 40) == 0  # ACRN: 48 GSIs
        assert r.hv.set_irqline(r.vmid, abi.IRQ_RAISING_PULSE << 32 | 40) == 0
    assert [e["gsi"] for e in logs if e["event"] == "kvm.irqline_not_delivered"] == [40]
    assert r.hv.snapshot()["vms"][0]["irqlines"]["40"]["raising_pulse"] == 2


def test_an_irqline_op_acrn_does_not_define_drives_nothing(rigs) -> None:
    """An op outside ACRN's four (hsm_kvm_irq_op's table) makes no KVM call: with the VM's fd
    swapped for /dev/null's, any call would be refused and logged. Recorded as "other"."""
    r = rigs(ram_size=0)
    with kvm_refusing(r), structlog.testing.capture_logs() as logs:
        assert r.hv.set_irqline(r.vmid, 7 << 32 | 4) == 0
        assert r.hv.set_irqline(r.vmid, abi.IRQ_SET_HIGH << 32 | 4) == 0  # the rig refuses
    assert [e["event"] for e in logs if e["event"].startswith("kvm.")] == ["kvm.irqline_failed"]
    assert r.hv.snapshot()["vms"][0]["irqlines"]["4"] == {"level": 1, "other": 1, "set_high": 1}


@contextlib.contextmanager
def kvm_refusing(r: Any) -> Iterator[None]:
    """The rig's one KVM VM answers every VM ioctl with ENOTTY: its fd is /dev/null's meanwhile."""
    (kvm_vm,) = r.hv.backend._vms.values()
    real = kvm_vm.fd
    with open("/dev/null", "rb") as null:
        kvm_vm.fd = null.fileno()
        try:
            yield
        finally:
            kvm_vm.fd = real


def test_an_msi_goes_to_kvm_and_a_refusal_is_logged_not_raised(rigs) -> None:
    """INJECT_MSI's KVM_SIGNAL_MSI (hsm_kvm_signal_msi, in C): accepted by a real KVM VM; a
    refusal by the kernel (here: the VM's fd swapped for /dev/null's) is a warning with the
    kernel's reason, and the hypercall still answers as ACRN does (it only queues the MSI)."""
    r = rigs(ram_size=0)
    msi = struct.pack("<QQ", 0xFEE00000, 0x41)  # struct acrn_msi_entry: fixed, vector 0x41
    assert r.hv.inject_msi(r.vmid, msi) == 0
    with kvm_refusing(r), structlog.testing.capture_logs() as logs:
        assert r.hv.inject_msi(r.vmid, msi) == 0
    (failed,) = [e for e in logs if e["event"] == "kvm.msi_failed"]
    assert failed["error"] == os.strerror(errno.ENOTTY) and failed["data"] == "0x41"
    assert r.hv.snapshot()["vms"][0]["msi"]["count"] == 2


def test_an_irqline_refused_by_kvm_is_logged_not_raised(rigs) -> None:
    """SET_IRQLINE's KVM_IRQ_LINE calls (hsm_kvm_irq_op: a pulse's two levels in one native
    call): a refusal by the kernel is a warning with its reason; the hypercall answers 0."""
    r = rigs(ram_size=0)
    with kvm_refusing(r), structlog.testing.capture_logs() as logs:
        assert r.hv.set_irqline(r.vmid, abi.IRQ_RAISING_PULSE << 32 | 4) == 0
    (failed,) = [e for e in logs if e["event"] == "kvm.irqline_failed"]  # once: the pulse stops there
    assert failed["gsi"] == 4 and failed["error"] == os.strerror(errno.ENOTTY)
    assert r.hv.snapshot()["vms"][0]["irqlines"]["4"]["raising_pulse"] == 1


# ----- vCPUs --------------------------------------------------------------------------


@pytest.mark.skipif(
    pathlib.Path("/sys/module/kvm_pvm").exists(),
    reason="this host's KVM is PVM, which does not deliver an INIT/SIPI sent to one APIC ID "
    "(the all-excluding-self shorthand works: test_kvm_daemon's SMP guests)",
)
def test_start_runs_the_bsp_only_aps_wait_for_init_sipi(rigs, guests) -> None:
    """Two vCPUs: START_VM runs vCPU 0; vCPU 1 stays in KVM waiting for INIT/SIPI,
    which the BSP's own code sends, as on ACRN."""
    r = rigs(ram_size=0x20000, affinity=0x3)
    assert r.vcpus == 2
    g = guests("smp32", 0x1000)
    r.load(g)
    assert r.hv.set_vcpu_regs(r.vmid, regs("pm32", rip=0x1000)) == 0
    assert r.hv.start_vm(r.vmid) == 0
    r.wait_write(0x1F)
    order = [(vcpu, port) for vcpu, port, _ in r.writes()]
    assert order.index((0, 0x1E)) < order.index((1, 0x1D))  # the AP ran only after the SIPI
    assert [p for v, p in order if v == 1] == [0x1D, 0x1F]
    assert [v for _, p, v in r.writes(0x1D)] == [0xA9]
    assert [p for v, p in order if v == 0] == [0x60, 0x1E]


def test_without_a_sipi_the_ap_never_runs(rigs, guests) -> None:
    r = rigs(affinity=0x3)
    r.load(guests("cpuid16"))
    assert r.hv.set_vcpu_regs(r.vmid, regs()) == 0
    assert r.hv.set_vcpu_regs(r.vmid, regs(vcpu_id=1)) == 0  # registers alone do not start it
    assert r.hv.start_vm(r.vmid) == 0
    r.wait_write(0x1F)
    assert {vcpu for vcpu, _, _ in r.writes()} == {0}
    ap = r.kvm_vm().vcpus[1]
    wait_until(lambda: ap.in_guest, "the AP to block in KVM_RUN")  # parked in the kernel
    assert r.hv.pause_vm(r.vmid) == 0
    assert not ap.in_guest  # kicked out of KVM_RUN before PAUSE_VM returned
    vcpus = r.hv.snapshot()["vms"][0]["vcpus"]
    assert vcpus[1]["requests"] == 0


def test_a_triple_fault_becomes_an_s5_write_to_pm1a_cnt(rigs, guests) -> None:
    """spec hv A.2.7: for a post-launched VM ACRN sends the device model a PORTIO
    write of 0x3400 (SLP_EN | SLP_TYP 5) to 0x404, size 2, so that it powers off; the
    vCPU runs no guest code after it. (No VM event ring here: the event is lost.)"""
    r = rigs()
    r.load(guests("triple32", 0x1000))
    triple = regs("pm32", rip=0x1000, idt=(0, 0))
    assert r.hv.set_vcpu_regs(r.vmid, triple) == 0
    with structlog.testing.capture_logs() as logs:
        assert r.hv.start_vm(r.vmid) == 0
        r.wait_write(0x404)
        wait_until(lambda: r.vcpu(0)["state"] == "idle", "the vCPU to stop")
    assert [(p, v) for _, p, v in r.writes()] == [(0x60, 0xC3), (0x404, 0x3400)]
    s5 = [q for q in r.hsm.requests if q["address"] == 0x404]
    assert s5[0]["size"] == 2 and s5[0]["write"]
    assert r.state() == "RUNNING"  # the device model decides: it pauses and destroys
    faults = [e for e in logs if e["event"] == "vm.triple_fault"]
    assert len(faults) == 1 and faults[0]["vmid"] == r.vmid and faults[0]["log_level"] == "warning"
    assert [e["event"] for e in logs].count("vm.vm_event_not_sent") == 1
    assert r.vcpu(0)["triple_faults"] == 1
    # the device model's shutdown (or reset) follows ACRN's state rules
    assert r.hv.pause_vm(r.vmid) == 0
    assert r.hv.reset_vm(r.vmid) == 0
    assert r.hv.set_vcpu_regs(r.vmid, triple) == 0
    assert r.hv.start_vm(r.vmid) == 0
    wait_until(lambda: len(r.writes(0x404)) == 2, "the second S5 write")
    assert [v for _, _, v in r.writes(0x60)] == [0xC3, 0xC3]


def _lapic_scenario(ids: list[int]) -> Scenario:
    data = {**DEFAULT_SCENARIO_DATA, "platform": {**DEFAULT_SCENARIO_DATA["platform"], "lapic_ids": ids}}
    return parse_scenario(data, "<lapic test>")


@pytest.mark.parametrize("affinity", [0x2, 0x6])
def test_vcpus_have_the_lapic_ids_of_their_pcpus(rigs, guests, affinity) -> None:
    """ACRN gives vCPU i the LAPIC id of its pCPU (the i-th set bit of the
    affinity): acrn-dm writes those ids into the guest's MADT. The BSP keeps its
    role whatever its id; with two vCPUs the AP boots on the BSP's start-up IPI."""
    ids = [0, 5, 3, 9]
    r = rigs(ram_size=0x10000, affinity=affinity, scenario=_lapic_scenario(ids))
    g = guests("apicid32", 0x1000)
    r.load(g)
    assert r.ram is not None
    r.ram[0x7004] = r.vcpus
    assert r.hv.set_vcpu_regs(r.vmid, regs("pm32", rip=0x1000)) == 0
    assert r.hv.start_vm(r.vmid) == 0
    r.wait_write(0x1F)
    pcpus = [i for i in range(4) if affinity >> i & 1]
    bsp = ids[pcpus[0]]
    assert [v for _, _, v in r.writes(0x10)] == [bsp]  # LAPIC ID register
    assert [v for _, _, v in r.writes(0x11)] == [bsp]  # CPUID.1 EBX[31:24]
    if len(pcpus) > 1:
        assert [(vcpu, v) for vcpu, _, v in r.writes(0x12)] == [(1, ids[pcpus[1]])]
    assert [v["lapic_id"] for v in r.hv.snapshot()["vms"][0]["vcpus"]] == [ids[p] for p in pcpus]


def test_registers_kvm_cannot_run_are_refused(rigs) -> None:
    r = rigs(ram_size=0)
    bad = [
        regs(cr0=0x80000010),  # paging without protection
        regs("pm32", cr0=0x80000011, ia32_efer=0x100),  # long mode without PAE
        regs("pm32", ia32_efer=0x400),  # LMA without LME and paging
        regs("pm32", cs_ar=0xA09B),  # 64-bit code segment outside long mode
    ]
    for b in bad:
        assert r.hv.set_vcpu_regs(r.vmid, b) == -1
    assert r.hv.snapshot()["vms"][0]["regs_set"] == []
    assert r.hv.set_vcpu_regs(r.vmid, regs("pm32", cr0=0x80000011, cr4=0x20, ia32_efer=0x100)) == 0


def test_acrn_regs_become_kvm_segments() -> None:
    """cs_ar in VMX access-rights format; the other segments derived from the mode."""
    from acrn_hsm_emu.hypervisor.backends import kvm_abi as k

    r = abi.AcrnVcpuRegs.from_buffer_copy(
        regs("pm32", rip=0x1234, rsp=0x8000, gdt=(0x1040, 0x1F), idt=(0x1060, 0x20F), tr_sel=0x28)
    ).vcpu_regs
    kr, ks = k.KvmRegs(), k.KvmSregs()
    kvm_mod.acrn_to_kvm(r, kr, ks)
    assert (kr.rip, kr.rsp, kr.rflags) == (0x1234, 0x8000, 2)
    cs = ks.cs
    assert (cs.selector, cs.base, cs.limit, cs.type, cs.s, cs.dpl, cs.present) == (0x10, 0, 0xFFFFFFFF, 0xB, 1, 0, 1)
    assert (cs.l, cs.db, cs.g, cs.avl, cs.unusable) == (0, 1, 1, 0, 0)
    for seg in (ks.ds, ks.es, ks.ss):
        assert (seg.selector, seg.base, seg.limit, seg.type, seg.db, seg.g) == (0x18, 0, 0xFFFFFFFF, 3, 1, 1)
    assert (ks.tr.selector, ks.tr.type, ks.tr.present) == (0x28, 0xB, 1)
    assert (ks.gdt.base, ks.gdt.limit, ks.idt.base, ks.idt.limit) == (0x1040, 0x1F, 0x1060, 0x20F)
    # real mode: data segment bases follow their selectors
    r = abi.AcrnVcpuRegs.from_buffer_copy(regs(ds_sel=0x2000)).vcpu_regs
    kvm_mod.acrn_to_kvm(r, kr, ks)
    assert (ks.cs.selector, ks.cs.base, ks.cs.limit, ks.cs.type) == (0xF000, 0, 0xFFFF, 0xF)
    assert (ks.ds.base, ks.ds.limit, ks.ds.type, ks.ds.db) == (0x20000, 0xFFFF, 3, 0)
    # long mode: LMA follows LME and paging
    r = abi.AcrnVcpuRegs.from_buffer_copy(
        regs("pm32", cr0=0x80000031, cr4=0x20, ia32_efer=0x100, cs_ar=0xA09B)
    ).vcpu_regs
    kvm_mod.acrn_to_kvm(r, kr, ks)
    assert ks.efer == 0x500 and ks.cs.l == 1 and ks.cs.db == 0


# ----- requests, pause and reset -------------------------------------------------------


def test_pause_kicks_a_spinning_vcpu_and_reset_restarts_it(rigs, guests) -> None:
    r = rigs()
    r.load(guests("spin16"))
    assert r.hv.set_vcpu_regs(r.vmid, regs()) == 0
    assert r.hv.start_vm(r.vmid) == 0
    r.wait_write(0x60)
    first = r.u32(0x500)
    wait_until(lambda: r.u32(0x500) != first, "the guest to count")
    assert r.hv.pause_vm(r.vmid) == 0
    frozen = r.u32(0x500)
    assert not r.kvm_vm().vcpus[0].in_guest
    time.sleep(0.05)
    assert r.u32(0x500) == frozen  # stopped when PAUSE_VM returned
    assert r.hv.reset_vm(r.vmid) == 0
    r.ram[0x500:0x504] = bytes(4)
    assert r.hv.set_vcpu_regs(r.vmid, regs()) == 0
    assert r.hv.start_vm(r.vmid) == 0
    r.wait_write(0x60, 2)
    wait_until(lambda: r.u32(0x500) != 0, "the guest to count again")


def test_reset_drops_an_abandoned_request_and_old_registers(rigs, guests) -> None:
    """PAUSE_VM while the guest waits for an IN: the request is abandoned; after
    RESET_VM the guest starts over from the registers given after the reset."""
    r = rigs()
    r.load(guests("roundtrip16"))
    r.hsm.defer = True  # leave requests PROCESSING
    assert r.hv.set_vcpu_regs(r.vmid, regs()) == 0
    assert r.hv.start_vm(r.vmid) == 0
    wait_until(r.hsm.outstanding.is_set, "the IN from port 0x30")
    assert r.hv.pause_vm(r.vmid) == 0
    assert r.hv.set_vcpu_regs(r.vmid, regs(rip=0x3)) == 0  # set while PAUSED, then lost
    assert r.hv.reset_vm(r.vmid) == 0
    r.hsm.defer = False
    r.answers[0x30] = 0x10
    assert r.hv.set_vcpu_regs(r.vmid, regs()) == 0
    assert r.hv.start_vm(r.vmid) == 0
    r.wait_write(0x1F)
    assert r.writes(0x31) == [(0, 0x31, 0x11)]  # ran from rip 0 with the new answer
    with r.hsm.lock:
        reads = [q["address"] for q in r.hsm.requests if not q["write"] and q["type"] == 0]
    assert reads[:2] == [0x30, 0x30]  # the abandoned IN, then the fresh one


def test_ram_added_while_running_is_used_before_the_guest_resumes(rigs, guests) -> None:
    """The guest's access to 0x20020 is MMIO until RAM appears there; the vCPU
    applies the new memory slot before it re-enters the guest."""
    r = rigs()
    r.load(guests("mmio16"))
    extra, extra_addr = r.mem.alloc_page(0x1000)
    extra[0x20:0x22] = (0x7A7B).to_bytes(2, "little")
    r.hsm.defer = True  # the test completes each request itself
    assert r.hv.set_vcpu_regs(r.vmid, regs()) == 0
    assert r.hv.start_vm(r.vmid) == 0
    mapped = False
    while True:
        wait_until(r.hsm.outstanding.is_set, "a request")
        with r.hsm.lock:
            req = r.hsm.requests[-1]
        if req["type"] == 1 and req["address"] == 0x20031:  # the last MMIO write
            assert r.map_ram(0x20000, extra_addr, 0x1000) == 0
            mapped = True
        r.hsm.complete(req["vcpu"])
        if req["type"] == 0 and req["address"] == 0x1F:
            break
    assert mapped
    assert [v for _, _, v in r.writes(0x36)] == [0x7A7B]  # read from the new RAM, not MMIO
    with r.hsm.lock:
        mmio = [(q["write"], q["address"]) for q in r.hsm.requests if q["type"] == 1]
    assert mmio == [(True, 0x20010), (True, 0x20031)]
    assert r.hv.set_memory_regions(r.vmid, [MemoryRegionOp(MR_DEL, 0, 0x20000, 0, 0x1000)]) == 0


def test_a_vm_without_ram_replays_the_workload(rigs) -> None:
    wl = Workload.build({0: [Step.pio(0x80, 1, write=True, value=7)]})
    r = rigs(ram_size=0, workload=wl)
    with structlog.testing.capture_logs() as logs:
        assert r.hv.start_vm(r.vmid) == 0
        wait_until(lambda: r.writes(0x80) == [(0, 0x80, 7)], "the scripted write")
        # the vCPU marks its workload done after the write's completion: wait for that
        # too (under ASan the snapshot right after the write came before it)
        wait_until(lambda: r.hv.snapshot()["vms"][0]["vcpus"][0]["workload_done"], "the workload done")
    assert any(e["event"] == "kvm.no_guest_ram" for e in logs)
    v = r.hv.snapshot()["vms"][0]["vcpus"][0]
    assert v["workload"].startswith("no guest RAM: ") and v["workload_done"]
    assert r.writes(0x80) == [(0, 0x80, 7)]  # and nothing more


def test_cpuid_of_a_guest_is_the_scenario_plus_the_host(rigs, guests) -> None:
    r = rigs()
    r.load(guests("cpuid16"))
    assert r.hv.set_vcpu_regs(r.vmid, regs()) == 0
    assert r.hv.start_vm(r.vmid) == 0
    r.wait_write(0x1F)
    got = {port: [v for _, _, v in r.writes(port)] for port in (0x10, 0x11, 0x12, 0x13, 0x14)}
    assert b"".join(v.to_bytes(4, "little") for v in got[0x10]) == b"ACRNACRNACRN"
    assert got[0x11] == [r.hv.cpuid(0x40000000, vmid=r.vmid)[0]] == [0x40000010]
    assert got[0x12] == [0]  # a post-launched VM is not privileged
    assert got[0x14] == [r.hv.scenario.tsc_khz]
    assert got[0x13][0] >> 31 == 1


def test_destroy_frees_the_kvm_vm(rigs, guests) -> None:
    r = rigs()
    r.load(guests("spin16"))
    assert r.hv.set_vcpu_regs(r.vmid, regs()) == 0
    assert r.hv.start_vm(r.vmid) == 0
    r.wait_write(0x60)
    vm = r.kvm_vm()
    fds = [vm.fd, *(v.fd for v in vm.vcpus)]
    assert all(_fd_is_kvm(fd) for fd in fds)
    assert r.hv.pause_vm(r.vmid) == 0
    assert r.hv.destroy_vm(r.vmid) == 0
    assert kvm_mod.REAPER.drain(HANG_GUARD_S)
    assert not any(_fd_is_kvm(fd) for fd in fds)
    assert r.vmid not in r.hv.backend._vms  # type: ignore[attr-defined]


def _fd_is_kvm(fd: int) -> bool:
    try:
        return "kvm" in pathlib.Path(f"/proc/self/fd/{fd}").readlink().name
    except OSError:
        return False


def test_state_machine_unchanged(rigs) -> None:
    """The kvm backend leaves ACRN's hypercall state rules alone."""
    r = rigs(ram_size=0)
    assert r.hv.set_vcpu_regs(r.vmid, regs()) == 0
    assert r.hv.reset_vm(r.vmid) == -1  # not PAUSED
    assert r.hv.start_vm(r.vmid) == 0
    assert r.hv.set_vcpu_regs(r.vmid, regs()) == -1  # RUNNING
    assert r.hv.destroy_vm(r.vmid) == -1
    assert r.hv.pause_vm(r.vmid) == 0
    assert r.hv.pause_vm(r.vmid) == 0
    assert r.state() == VmState.PAUSED.name
    assert r.hv.set_vcpu_regs(r.vmid, regs()) == 0


def test_kick_signal_is_harmless_process_wide() -> None:
    """A stray KICK_SIGNAL sent to the process does nothing (default action: ignore)."""
    import os
    import signal

    assert signal.getsignal(kvm_mod.KICK_SIGNAL) == signal.SIG_DFL
    os.kill(os.getpid(), kvm_mod.KICK_SIGNAL)
    assert ctypes.sizeof(ctypes.c_int) == 4  # still alive


def test_injected_accesses_interleave_with_a_running_guest(rigs, guests) -> None:
    """``inject`` (the control socket's) kicks the vCPU out of the guest, performs the
    access between two KVM_RUNs, and the guest goes on."""
    from acrn_hsm_emu.hypervisor.api import Access

    r = rigs()
    r.load(guests("spin16"))
    r.answers[0x71] = 0x5A
    assert r.hv.set_vcpu_regs(r.vmid, regs()) == 0
    assert r.hv.start_vm(r.vmid) == 0
    r.wait_write(0x60)
    got = r.hv.inject(r.vmid, 0, Access("pio", False, 0x71, 1)).result(HANG_GUARD_S)
    assert got == 0x5A
    count = r.u32(0x500)
    wait_until(lambda: r.u32(0x500) != count, "the guest to go on counting")
    assert r.hv.snapshot()["vms"][0]["vcpus"][0]["injected"] == 1
