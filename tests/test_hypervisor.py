"""Hypercalls of the mock hypervisor: state machine, vmid/vCPU policy, CPUID, PM, devices.

spec: acrn-hypervisor-and-dm.md A.0, A.1, A.1.1, A.3, A.4, A.5.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Sequence

import pytest

from acrn_hsm_emu import abi
from acrn_hsm_emu.hypervisor.api import MemoryRegionOp
from acrn_hsm_emu.hypervisor.backends import BackendError, ScriptedBackend
from acrn_hsm_emu.hypervisor.cpuid import hsm_init_check
from acrn_hsm_emu.hypervisor.hypervisor import Hypervisor
from acrn_hsm_emu.hypervisor.scenario import (
    DEFAULT_SCENARIO_DATA,
    parse_bdf,
    parse_scenario,
)
from acrn_hsm_emu.hypervisor.vm import VmState
from acrn_hsm_emu.memory import LocalMemory, SharedPage

EINVAL, ENODEV, ENOTTY, EFAULT = -errno.EINVAL, -errno.ENODEV, -errno.ENOTTY, -errno.EFAULT
SIG = abi.ACRN_SIGNATURE_REG


# ----- helpers ------------------------------------------------------------------------


def scenario(**platform: object) -> object:
    data = {**DEFAULT_SCENARIO_DATA, "platform": {**DEFAULT_SCENARIO_DATA["platform"], **platform}}
    return parse_scenario(data, "<test>")


def scenario_vms(vms: list[dict], **platform: object) -> object:
    data = {"platform": {"pcpus": 4, **platform}, "vm": vms}
    return parse_scenario(data, "<test>")


def creation(name: bytes = b"", affinity: int = 0, flags: int = 0) -> bytearray:
    cv = abi.AcrnVmCreation()
    ctypes.memmove(cv.uuid, name.ljust(16, b"\0"), 16)
    cv.cpu_affinity = affinity
    cv.vm_flag = flags
    return bytearray(bytes(cv))


def create(hv: Hypervisor, **kw: object) -> tuple[int, int, int]:
    """(return value, vmid, vcpu_num) of a CREATE_VM."""
    cv = creation(**kw)
    ret = hv.create_vm(cv)
    out = abi.AcrnVmCreation.from_buffer(cv)
    return ret, out.vmid, out.vcpu_num


def new_page() -> tuple[LocalMemory, SharedPage]:
    mem = LocalMemory()
    _, addr = mem.alloc_page()
    return mem, SharedPage(mem, addr)


def regs(vcpu_id: int = 0, cr0: int = 0x31, cr4: int = 0) -> bytes:
    r = abi.AcrnVcpuRegs()
    r.vcpu_id = vcpu_id
    r.vcpu_regs.cr0 = cr0
    r.vcpu_regs.cr4 = cr4
    return bytes(r)


def msi(addr: int = 0xFEE00000, data: int = 0x41) -> bytes:
    return bytes(abi.AcrnMsiEntry(addr, data))


def pcidev(virt: str = "00:05.0", phys: str = "00:14.0") -> bytes:
    d = abi.AcrnPcidev()
    d.virt_bdf, d.phys_bdf = parse_bdf(virt), parse_bdf(phys)
    return bytes(d)


def mmiodev(gpa: int = 0xF0000000, hpa: int = 0xFE000000, size: int = 0x2000) -> bytes:
    d = abi.AcrnMmiodev()
    d.res[0].user_vm_pa, d.res[0].service_vm_pa, d.res[0].size = gpa, hpa, size
    return bytes(d)


def vdev(ident: int = 0x9710 | 0x9900 << 16, bdf: str = "00:08.0") -> bytes:
    d = abi.AcrnVdev()
    d.id.value = ident
    d.slot = parse_bdf(bdf)
    return bytes(d)


def intx(
    virt: str = "00:05.0",
    phys: str = "00:14.0",
    vpin: int = 5,
    ppin: int = 20,
    pic: int = 0,
    kind: int = abi.ACRN_PTDEV_IRQ_INTX,
) -> bytes:
    i = abi.AcrnPtdevIrq()
    i.type, i.virt_bdf, i.phys_bdf = kind, parse_bdf(virt), parse_bdf(phys)
    i.intx.virt_pin, i.intx.phys_pin, i.intx.is_pic_pin = vpin, ppin, pic
    return bytes(i)


def region(
    gpa: int = 0, size: int = 0x10000, attr: int = 0x47, type_: int = abi.MR_ADD
) -> MemoryRegionOp:
    return MemoryRegionOp(type_, attr, gpa, 0x1_0000_0000 + gpa, size)


def pm_cmd(vmid: int, kind: int, index: int = 0, vcpu: int = 0) -> int:
    return vmid << 24 | vcpu << 16 | index << 8 | kind


def vm_of(hv: Hypervisor, vmid: int) -> dict:
    return next(v for v in hv.snapshot()["vms"] if v["vmid"] == vmid)


@pytest.fixture
def hv():
    h = Hypervisor()
    yield h
    h.shutdown()


# ----- state machine ------------------------------------------------------------------

STATES = ("POWERED_OFF", "CREATED_NOBUF", "CREATED", "RUNNING", "PAUSED")


def in_state(hv: Hypervisor, state: str) -> int:
    """A VM (relative vmid) in ``state``; POWERED_OFF is a free dynamic slot."""
    if state == "POWERED_OFF":
        return 3
    ret, vmid, _ = create(hv)
    assert ret == 0
    if state == "CREATED_NOBUF":
        return vmid
    hv._keep = new_page()  # keep the page mapped for the test's lifetime
    assert hv.set_ioreq_buffer(vmid, hv._keep[1]) == 0
    if state == "CREATED":
        return vmid
    assert hv.start_vm(vmid) == 0
    if state == "PAUSED":
        assert hv.pause_vm(vmid) == 0
    return vmid


CALLS = {
    "destroy_vm": lambda hv, v: hv.destroy_vm(v),
    "start_vm": lambda hv, v: hv.start_vm(v),
    "pause_vm": lambda hv, v: hv.pause_vm(v),
    "reset_vm": lambda hv, v: hv.reset_vm(v),
    "create_vcpu": lambda hv, v: hv.create_vcpu(v),
    "set_vcpu_regs": lambda hv, v: hv.set_vcpu_regs(v, regs()),
    "inject_msi": lambda hv, v: hv.inject_msi(v, msi()),
    "set_irqline": lambda hv, v: hv.set_irqline(v, 4 | abi.IRQ_RAISING_PULSE << 32),
    "set_ioreq_buffer": lambda hv, v: hv.set_ioreq_buffer(v, new_page()[1]),
    "notify_request_finish": lambda hv, v: hv.notify_request_finish(v, 0),
    "set_memory_regions": lambda hv, v: hv.set_memory_regions(v, [region()]),
    "vm_intr_monitor": lambda hv, v: hv.vm_intr_monitor(v, new_page()[1]),
    "get_cpu_state": lambda hv, v: hv.get_cpu_state(
        pm_cmd(v, abi.ACRN_PMCMD_GET_CX_CNT), bytearray(48)
    ),
    "assign_pcidev": lambda hv, v: hv.assign_pcidev(v, pcidev()),
    "deassign_pcidev": lambda hv, v: hv.deassign_pcidev(v, pcidev()),
    "assign_mmiodev": lambda hv, v: hv.assign_mmiodev(v, mmiodev()),
    "deassign_mmiodev": lambda hv, v: hv.deassign_mmiodev(v, mmiodev()),
    "create_vdev": lambda hv, v: hv.create_vdev(v, vdev()),
    "destroy_vdev": lambda hv, v: hv.destroy_vdev(v, vdev()),
    "set_ptdev_intr": lambda hv, v: hv.set_ptdev_intr(v, intx()),
    "reset_ptdev_intr": lambda hv, v: hv.reset_ptdev_intr(v, intx()),
}

# Expected return per state:     OFF      CREATED(no buf)  CREATED  RUNNING  PAUSED
TABLE = {
    "destroy_vm":            (-1,      -1,      -1,      -1,      0),
    "start_vm":              (-1,      -1,      0,       -1,      -1),
    "pause_vm":              (-1,      0,       0,       0,       0),
    "reset_vm":              (-1,      -1,      -1,      -1,      0),
    "create_vcpu":           (0,       0,       0,       0,       0),
    "set_vcpu_regs":         (-1,      0,       0,       -1,      0),
    "inject_msi":            (-1,      0,       0,       0,       0),
    "set_irqline":           (-1,      0,       0,       0,       0),
    "set_ioreq_buffer":      (-1,      0,       0,       -1,      -1),
    "notify_request_finish": (-1,      -1,      0,       0,       0),
    "set_memory_regions":    (-1,      0,       0,       0,       0),
    "vm_intr_monitor":       (EINVAL,  0,       0,       0,       0),
    "get_cpu_state":         (-1,      0,       0,       -1,      0),
    "assign_pcidev":         (EINVAL,  0,       0,       EINVAL,  EINVAL),
    "deassign_pcidev":       (EINVAL,  ENODEV,  ENODEV,  EINVAL,  ENODEV),
    "assign_mmiodev":        (EINVAL,  0,       0,       EINVAL,  EINVAL),
    "deassign_mmiodev":      (EINVAL,  0,       0,       EINVAL,  0),
    "create_vdev":           (EINVAL,  0,       0,       EINVAL,  EINVAL),
    "destroy_vdev":          (EINVAL,  EINVAL,  EINVAL,  EINVAL,  EINVAL),
    "set_ptdev_intr":        (-1,      -1,      -1,      -1,      -1),
    "reset_ptdev_intr":      (-1,      -1,      -1,      -1,      -1),
}  # fmt: skip

# State after the call succeeded (unchanged when absent).
AFTER = {
    ("destroy_vm", "PAUSED"): None,
    ("start_vm", "CREATED"): "RUNNING",
    ("pause_vm", "CREATED_NOBUF"): "PAUSED",
    ("pause_vm", "CREATED"): "PAUSED",
    ("pause_vm", "RUNNING"): "PAUSED",
    ("reset_vm", "PAUSED"): "CREATED",
}


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_state_machine(call: str, state: str) -> None:
    hv = Hypervisor()
    try:
        vmid = in_state(hv, state)
        assert CALLS[call](hv, vmid) == TABLE[call][STATES.index(state)]
        before = "CREATED" if state == "CREATED_NOBUF" else state
        want = AFTER.get((call, state), before)
        slot = next(s for s in hv.snapshot()["slots"] if s["vmid"] == vmid)
        assert slot["state"] == ("POWERED_OFF" if want is None else want)
    finally:
        hv.shutdown()


def test_pause_from_ready_to_poweroff_and_idempotent(hv: Hypervisor) -> None:
    vmid = in_state(hv, "RUNNING")
    hv._slots[vmid].vm.state = VmState.READY_TO_POWEROFF  # an RT guest wrote S5 (hv A.1)
    assert hv.pause_vm(vmid) == 0
    assert vm_of(hv, vmid)["state"] == "PAUSED"
    assert hv.pause_vm(vmid) == 0  # already paused: still 0
    assert vm_of(hv, vmid)["state"] == "PAUSED"


def test_reset_frees_all_slots_and_keeps_the_page(hv: Hypervisor) -> None:
    vmid = in_state(hv, "PAUSED")
    page = hv._keep[1]
    for i in range(16):
        page.store_u32(i * 256 + abi.SLOT_PROCESSED, abi.ACRN_IOREQ_STATE_PROCESSING)
    assert hv.reset_vm(vmid) == 0
    assert [page.load_u32(i * 256 + abi.SLOT_PROCESSED) for i in range(16)] == [3] * 16
    assert hv.start_vm(vmid) == 0  # the buffer survives a reset


def test_set_ioreq_buffer_frees_slots_and_fails_on_unmapped_page(hv: Hypervisor) -> None:
    ret, vmid, _ = create(hv)
    mem, page = new_page()
    assert hv.set_ioreq_buffer(vmid, page) == 0
    assert all(page.load_u32(i * 256 + abi.SLOT_PROCESSED) == 3 for i in range(16))
    mem.remove(page.base)
    assert hv.set_ioreq_buffer(vmid, page) == -1
    assert hv.start_vm(vmid) == -1  # the failed call dropped the buffer, as ACRN does


def test_destroy_clears_records_and_frees_the_slot(hv: Hypervisor) -> None:
    vmid = in_state(hv, "CREATED")
    assert hv.assign_pcidev(vmid, pcidev()) == 0
    assert hv.set_memory_regions(vmid, [region()]) == 0
    assert hv.pause_vm(vmid) == 0
    assert hv.destroy_vm(vmid) == 0
    assert vmid not in [v["vmid"] for v in hv.snapshot()["vms"]]
    ret, again, _ = create(hv)
    assert (ret, again) == (0, vmid)  # name wiped: the same dynamic slot is free again
    assert vm_of(hv, again)["pci_devices"] == [] and vm_of(hv, again)["memory"] == []
    assert hv.assign_pcidev(again, pcidev()) == 0  # the device went back to the Service VM


def test_unknown_targets(hv: Hypervisor) -> None:
    assert hv.start_vm(17) == ENOTTY  # absolute id past CONFIG_MAX_VM_NUM (17 slots)
    assert hv.pause_vm(0xFFFF) == ENOTTY  # wraps to absolute 0xFFFF
    assert hv.notify_request_finish(40, 0) == ENOTTY
    assert hv.get_cpu_state(pm_cmd(200, abi.ACRN_PMCMD_GET_CX_CNT), bytearray(48)) == ENOTTY
    assert hv.start_vm(0) == -1  # relative 0 is the Service VM itself: RUNNING


# ----- vmid / vcpu_num policy ---------------------------------------------------------


def test_zero_filled_create_gets_one_vcpu_and_a_generated_name(hv: Hypervisor) -> None:
    assert create(hv) == (0, 1, 1)
    assert create(hv) == (0, 2, 1)
    v = vm_of(hv, 1)
    assert v["name"] == "ACRN VM_1"
    assert v["cpu_affinity"] == 0x1 and [c["pcpu"] for c in v["vcpus"]] == [0]


def test_affinity_popcount_and_vcpu_order(hv: Hypervisor) -> None:
    ret, vmid, n = create(hv, affinity=0b1010)
    assert (ret, n) == (0, 2)
    assert [c["pcpu"] for c in vm_of(hv, vmid)["vcpus"]] == [1, 3]


def test_affinity_outside_the_platform_fails_and_frees_the_slot(hv: Hypervisor) -> None:
    cv = creation(affinity=1 << 4)
    assert hv.create_vm(cv) == -1
    assert abi.AcrnVmCreation.from_buffer(cv).vmid == 0  # not written back on -1
    assert create(hv, affinity=0x1) == (0, 1, 1)


def test_name_match_and_duplicate(hv: Hypervisor) -> None:
    ret, vmid, _ = create(hv, name=b"vm-a")
    assert (ret, vmid) == (0, 1)
    assert vm_of(hv, 1)["name"] == "vm-a"
    assert create(hv, name=b"vm-a")[0] == -1  # matched the live VM's slot
    # ACRN quirk (hc.c): the failed create wiped the live dynamic slot's name.
    assert vm_of(hv, 1)["name"] == "vm-a"  # the VM keeps its own copy
    assert hv.snapshot()["slots"][1]["name"] == ""


def test_static_slot(hv: Hypervisor) -> None:
    sc = scenario_vms(
        [
            {"load_order": "service", "name": "SOS", "cpu_affinity": 0xF},
            {"load_order": "post", "name": "rtvm", "cpu_affinity": 0xC, "guest_flags": ["rt"]},
            {"load_order": "post", "count": 2, "cpu_affinity": 0x1},
        ]
    )
    h = Hypervisor(sc)
    try:
        assert create(h, name=b"rtvm", affinity=0x3)[0] == -1  # not a subset of 0xC
        assert h.snapshot()["slots"][1]["name"] == "rtvm"  # a static name is never wiped
        assert create(h, name=b"rtvm") == (0, 1, 2)  # 0: all configured pCPUs
        v = vm_of(h, 1)
        assert v["static"] and v["severity"] == 0x30
        # RT is DM-owned: the caller's vm_flag (0 here) replaces the configured bit.
        assert v["guest_flags"] == abi.GUEST_FLAG_STATIC_VM
        assert create(h, name=b"other") == (0, 2, 1)  # a dynamic slot
    finally:
        h.shutdown()


def test_no_free_slot_is_enotty() -> None:
    h = Hypervisor(
        scenario_vms(
            [
                {"load_order": "service", "name": "SOS", "cpu_affinity": 0xF},
                {"load_order": "post", "cpu_affinity": 0x1},
            ]
        )
    )
    try:
        assert create(h)[0] == 0
        assert create(h)[0] == ENOTTY
    finally:
        h.shutdown()


def test_dm_owned_flags_and_lapic_passthrough(hv: Hypervisor) -> None:
    lapic_pt = abi.GUEST_FLAG_LAPIC_PASSTHROUGH
    assert create(hv, flags=lapic_pt)[0] == -1  # LAPIC_PT requires RT
    ret, vmid, _ = create(
        hv,
        flags=lapic_pt
        | abi.GUEST_FLAG_RT
        | abi.GUEST_FLAG_HIDE_MTRR
        | abi.GUEST_FLAG_IO_COMPLETION_POLLING,
    )
    assert ret == 0
    v = vm_of(hv, vmid)
    assert v["guest_flags"] == lapic_pt | abi.GUEST_FLAG_RT | abi.GUEST_FLAG_IO_COMPLETION_POLLING
    assert v["polling"]
    assert v["severity"] == 0x10  # severity is static config, not a DM flag
    assert hv.pause_vm(vmid) == 0 and hv.destroy_vm(vmid) == 0
    assert create(hv) == (0, vmid, 1)
    assert vm_of(hv, vmid)["guest_flags"] == 0  # DM-owned flags cleared at destroy


def test_relative_vmids_and_prelaunched_targets() -> None:
    h = Hypervisor(
        scenario_vms(
            [
                {"load_order": "pre", "name": "safety", "cpu_affinity": 0x8, "severity": "safety"},
                {"load_order": "service", "name": "SOS", "cpu_affinity": 0x7},
                {"load_order": "post", "count": 2, "cpu_affinity": 0x1},
            ]
        )
    )
    try:
        assert create(h) == (0, 1, 1)  # absolute 2, relative to the Service VM at 1
        assert h.pause_vm(0xFFFF) == ENOTTY  # relative -1 = the pre-launched VM
        assert create(h, name=b"safety")[0] == ENOTTY
        assert h.snapshot()["slots"][2]["vmid"] == 1
    finally:
        h.shutdown()


def test_create_failure_itself_returns_0_with_invalid_vmid() -> None:
    h = Hypervisor(scenario(pcpus=20))
    try:
        cv = creation(affinity=(1 << 17) - 1)  # 17 vCPUs: no request slot for the 17th
        cv[4:6] = struct.pack("<H", 7)
        assert h.create_vm(cv) == 0
        out = abi.AcrnVmCreation.from_buffer(cv)
        assert (out.vmid, out.vcpu_num) == (0xFFFF, 7)  # vcpu_num left as given
        assert create(h) == (0, 1, 1)
    finally:
        h.shutdown()


def test_backend_failure_is_a_failed_creation() -> None:
    class Failing(ScriptedBackend):
        def vm_created(self, vmid: int, vcpu_num: int, lapic_ids: Sequence[int] = ()) -> None:
            raise BackendError("no KVM")

    h = Hypervisor(backend=Failing())
    try:
        assert create(h)[:2] == (0, 0xFFFF)
        assert h.snapshot()["slots"][1] == {
            "abs_id": 1,
            "vmid": 1,
            "load_order": "post",
            "static": False,
            "name": "",
            "state": "POWERED_OFF",
        }
    finally:
        h.shutdown()


def test_malformed_creation_struct(hv: Hypervisor) -> None:
    assert hv.create_vm(bytearray(40)) == ENOTTY


# ----- severity ----------------------------------------------------------------------


def test_rt_severity_limits() -> None:
    h = Hypervisor(
        scenario_vms(
            [
                {"load_order": "service", "name": "SOS", "cpu_affinity": 0xF},
                {"load_order": "post", "name": "rt", "cpu_affinity": 0x2, "severity": "rtvm"},
            ]
        )
    )
    try:
        vmid = create(h, name=b"rt")[1]
        keep = new_page()
        assert h.set_ioreq_buffer(vmid, keep[1]) == 0
        assert h.set_memory_regions(vmid, [region()]) == 0  # allowed while not RUNNING
        assert h.start_vm(vmid) == 0
        assert h.notify_request_finish(vmid, 0) == -1
        assert h.inject_msi(vmid, msi()) == -1
        assert h.set_irqline(vmid, 4) == -1
        assert h.set_memory_regions(vmid, [region(gpa=0x100000)]) == -1
        assert h.pause_vm(vmid) == 0  # 0, but a RUNNING RTVM is not paused
        assert vm_of(h, vmid)["state"] == "RUNNING"
    finally:
        h.shutdown()


# ----- vCPU registers, interrupts ------------------------------------------------------


def test_set_vcpu_regs_checks(hv: Hypervisor) -> None:
    vmid = create(hv, affinity=0x3)[1]
    assert hv.set_vcpu_regs(vmid, regs(vcpu_id=1)) == 0
    assert hv.set_vcpu_regs(vmid, regs(vcpu_id=2)) == -1  # never created (OFFLINE)
    assert hv.set_vcpu_regs(vmid, regs(vcpu_id=16)) == -1
    assert hv.set_vcpu_regs(vmid, regs(cr0=0x31 | 1 << 32)) == -1  # CR0 reserved bit
    assert hv.set_vcpu_regs(vmid, regs(cr0=0x31 | 1 << 6)) == -1
    assert hv.set_vcpu_regs(vmid, regs(cr4=1 << 13)) == -1  # VMXE
    assert hv.set_vcpu_regs(vmid, regs(cr0=0x80000011, cr4=0x20)) == 0  # paging + PAE
    assert hv.set_vcpu_regs(vmid, regs()[:100]) == -1
    assert hv.set_vcpu_regs(vmid, b"") == -1
    assert vm_of(hv, vmid)["regs_set"] == [0, 1]


def test_inject_msi_address_check(hv: Hypervisor) -> None:
    vmid = create(hv)[1]
    assert hv.inject_msi(vmid, msi(0xFED00000)) == -1
    assert hv.inject_msi(vmid, msi(0xFEE0_1000, 0x4031)) == 0
    assert hv.inject_msi(vmid, msi(0x1_FEE0_0000)) == 0  # only bits 31:20 are compared
    assert hv.inject_msi(vmid, b"\0" * 8) == -1
    m = vm_of(hv, vmid)["msi"]
    assert m["count"] == 2
    assert m["recent"][0] == {"addr": 0xFEE01000, "data": 0x4031, "vector": 0x31, "dest": 1}


def test_set_irqline_range_and_record(hv: Hypervisor) -> None:
    vmid = create(hv)[1]
    assert hv.set_irqline(vmid, 47 | abi.IRQ_SET_HIGH << 32) == 0
    assert hv.set_irqline(vmid, 48) == -1
    assert hv.set_irqline(vmid, 2 | abi.IRQ_RAISING_PULSE << 32) == 0
    assert hv.set_irqline(vmid, 2 | abi.IRQ_RAISING_PULSE << 32) == 0
    assert hv.set_irqline(vmid, 3 | 9 << 32) == 0  # unknown op: accepted, ignored
    lines = vm_of(hv, vmid)["irqlines"]
    assert lines["47"] == {"level": 1, "set_high": 1}
    assert lines["2"] == {"level": 0, "raising_pulse": 2}
    assert lines["3"] == {"level": 0, "other": 1}


def test_vm_intr_monitor(hv: Hypervisor) -> None:
    vmid = in_state(hv, "CREATED")
    _, page = new_page()
    page.write(0, struct.pack("<II", abi.INTR_CMD_GET_DATA, 49))
    assert hv.vm_intr_monitor(vmid, page) == EINVAL  # buf_cnt > 48
    page.write(0, struct.pack("<II", 7, 0))
    assert hv.vm_intr_monitor(vmid, page) == EINVAL  # unknown command
    assert hv.assign_pcidev(vmid, pcidev()) == 0
    assert hv.set_ptdev_intr(vmid, intx(vpin=5, ppin=20)) == 0
    page.write(0, struct.pack("<II", abi.INTR_CMD_GET_DATA, 48))
    assert hv.vm_intr_monitor(vmid, page) == 0
    assert struct.unpack("<IIQQ", page.read(0, 24)) == (0, 2, 20, 0)
    page.write(0, struct.pack("<IIQ", abi.INTR_CMD_DELAY_INT, 0, 250))
    assert hv.vm_intr_monitor(vmid, page) == 0
    assert vm_of(hv, vmid)["intr_delay_ms"] == 250
    mem = LocalMemory()
    assert hv.vm_intr_monitor(vmid, SharedPage(mem, 0x1000)) == EINVAL  # unmapped page


# ----- memory regions ------------------------------------------------------------------


def test_set_memory_regions(hv: Hypervisor) -> None:
    vmid = create(hv)[1]
    assert hv.set_memory_regions(vmid, []) == -1  # mr_num 0
    ops = [
        region(0, 0x200000, 0x47),
        region(0xE0000000, 0x1000, 0x107),
        region(0xD0000000, 0x1000, abi.ACRN_MEM_TYPE_WC | 3),
        region(0x100000, 0x1234),
    ]  # not a 4 KiB multiple: stops here
    assert hv.set_memory_regions(vmid, ops) == EINVAL
    mem = vm_of(hv, vmid)["memory"]
    assert [(m["gpa"], m["size"], m["type"], m["access"]) for m in mem] == [
        (0, 0x200000, "WB", 7),
        (0xD0000000, 0x1000, "WC", 3),
        (0xE0000000, 0x1000, "UC", 7),
    ]
    # delete a hole: needs the whole range mapped
    assert hv.set_memory_regions(vmid, [region(0x1FF000, 0x2000, 0, abi.MR_DEL)]) == EINVAL
    assert hv.set_memory_regions(vmid, [region(0x1000, 0x1000, 0, abi.MR_DEL)]) == 0
    assert (
        hv.set_memory_regions(vmid, [region(0x4000, 0x1000, 0, 7)]) == 0
    )  # any type != ADD deletes
    mem = vm_of(hv, vmid)["memory"]
    assert [(m["gpa"], m["size"], m["service_vm_pa"]) for m in mem][:3] == [
        (0, 0x1000, 0x1_0000_0000),
        (0x2000, 0x2000, 0x1_0000_2000),
        (0x5000, 0x1FB000, 0x1_0000_5000),
    ]


# ----- devices -------------------------------------------------------------------------


def test_pcidev_and_intx(hv: Hypervisor) -> None:
    vmid = create(hv)[1]
    other = create(hv)[1]
    assert hv.assign_pcidev(vmid, pcidev(phys="00:1c.0")) == ENODEV  # a bridge
    assert hv.assign_pcidev(vmid, pcidev(phys="00:02.0")) == ENODEV  # not on the platform
    assert hv.assign_pcidev(vmid, pcidev()) == 0
    assert hv.assign_pcidev(other, pcidev(virt="00:06.0")) == ENODEV  # already given away
    assert hv.assign_pcidev(vmid, pcidev(phys="00:17.0")) == EFAULT  # virtual BDF taken
    assert hv.set_ptdev_intr(vmid, intx(kind=abi.ACRN_PTDEV_IRQ_MSI)) == -1
    assert hv.set_ptdev_intr(vmid, intx(phys="00:17.0")) == -1  # not that device
    assert hv.set_ptdev_intr(vmid, intx(vpin=48)) == -1
    assert hv.set_ptdev_intr(vmid, intx(vpin=16, pic=1)) == -1
    assert hv.set_ptdev_intr(vmid, intx(ppin=120)) == -1  # host GSI count 120
    assert hv.set_ptdev_intr(vmid, intx()) == 0
    assert hv.assign_pcidev(other, pcidev(phys="00:17.0")) == 0
    assert hv.set_ptdev_intr(other, intx(phys="00:17.0")) == ENODEV  # phys GSI 20 is taken
    v = vm_of(hv, vmid)
    assert v["pci_devices"] == [
        {"virt_bdf": "00:05.0", "phys_bdf": "00:14.0", "intr_line": 0, "intr_pin": 0}
    ]
    assert v["ptdev_intx"][0]["phys_pin"] == 20
    assert hv.reset_ptdev_intr(vmid, intx()) == 0
    assert vm_of(hv, vmid)["ptdev_intx"] == []
    assert hv.deassign_pcidev(vmid, pcidev(phys="00:17.0")) == ENODEV
    assert hv.deassign_pcidev(vmid, pcidev()) == 0
    assert hv.assign_pcidev(other, pcidev(virt="00:06.0")) == 0


def test_mmiodev(hv: Hypervisor) -> None:
    vmid = create(hv)[1]
    assert hv.assign_mmiodev(vmid, mmiodev(size=0x1800)) == EINVAL
    assert hv.assign_mmiodev(vmid, mmiodev()) == 0
    v = vm_of(hv, vmid)
    assert v["mmio_devices"][0]["res"] == [
        {"user_vm_pa": 0xF0000000, "service_vm_pa": 0xFE000000, "size": 0x2000}
    ]
    assert v["memory"][0]["gpa"] == 0xF0000000 and v["memory"][0]["type"] == "UC"
    assert hv.deassign_mmiodev(vmid, mmiodev()) == 0
    v = vm_of(hv, vmid)
    assert v["mmio_devices"] == [] and v["memory"] == []


def test_vdevs() -> None:
    ivshmem = 0x1AF4 | 0x1110 << 16
    for enabled, want in ((True, 0), (False, EINVAL)):
        h = Hypervisor(scenario(ivshmem=enabled))
        try:
            vmid = create(h)[1]
            assert h.create_vdev(vmid, vdev(ivshmem, "00:09.0")) == want
        finally:
            h.shutdown()
    h = Hypervisor()
    try:
        vmid = create(h)[1]
        assert h.create_vdev(vmid, vdev(0x8086 | 0x9D14 << 16, "00:0a.0")) == 0
        assert h.create_vdev(vmid, vdev(0x1234)) == EINVAL
        assert h.create_vdev(vmid, vdev(0x9710 | 0x9900 << 16 | 1 << 32)) == EINVAL  # legacy id
        assert h.create_vdev(vmid, vdev()) == 0
        assert h.create_vdev(vmid, vdev()) == EINVAL  # the BDF is taken
        assert [d["bdf"] for d in vm_of(h, vmid)["vdevs"]] == ["00:08.0", "00:0a.0"]
        assert h.destroy_vdev(vmid, vdev(bdf="00:0b.0")) == EINVAL
        assert h.destroy_vdev(vmid, vdev()) == 0
        assert [d["bdf"] for d in vm_of(h, vmid)["vdevs"]] == ["00:0a.0"]
    finally:
        h.shutdown()


# ----- PM_GET_CPU_STATE ----------------------------------------------------------------


def test_get_cpu_state_cstates(hv: Hypervisor) -> None:
    vmid = create(hv)[1]
    out = bytearray(b"\xaa" * 48)
    assert hv.get_cpu_state(pm_cmd(vmid, abi.ACRN_PMCMD_GET_CX_CNT), out) == 0
    assert out[:8] == struct.pack("<Q", 3)  # zero-extended count
    assert hv.get_cpu_state(pm_cmd(vmid, abi.ACRN_PMCMD_GET_CX_DATA, 0), out) == -1
    assert hv.get_cpu_state(pm_cmd(vmid, abi.ACRN_PMCMD_GET_CX_DATA, 4), out) == -1
    assert hv.get_cpu_state(pm_cmd(vmid, abi.ACRN_PMCMD_GET_CX_DATA, 2, vcpu=3), out) == 0
    c = abi.AcrnCstateData.from_buffer_copy(out[:32])
    assert (c.cx_reg.space_id, c.cx_reg.address, c.type, c.latency, c.power) == (
        0x7F,
        0x21,
        2,
        253,
        500,
    )
    assert hv.get_cpu_state(pm_cmd(vmid, abi.ACRN_PMCMD_GET_PX_CNT), out) == -1
    assert hv.get_cpu_state(pm_cmd(vmid, abi.ACRN_PMCMD_GET_PX_DATA), out) == -1
    assert hv.get_cpu_state(pm_cmd(vmid, 9), out) == -1


def test_get_cpu_state_pstates() -> None:
    h = Hypervisor(scenario(pstate_passthrough=True))
    try:
        vmid = create(h)[1]
        out = bytearray(48)
        assert h.get_cpu_state(pm_cmd(vmid, abi.ACRN_PMCMD_GET_PX_CNT), out) == 0
        assert out[:8] == struct.pack("<Q", 4)
        assert h.get_cpu_state(pm_cmd(vmid, abi.ACRN_PMCMD_GET_PX_DATA, 2), out) == 0
        p = abi.AcrnPstateData.from_buffer_copy(out)
        assert (p.core_frequency, p.power, p.control) == (1600, 11000, 0x1000)
        assert h.get_cpu_state(pm_cmd(vmid, abi.ACRN_PMCMD_GET_PX_DATA, 4), out) == -1
    finally:
        h.shutdown()
    h = Hypervisor(
        scenario_vms(
            [
                {"load_order": "service", "name": "SOS", "cpu_affinity": 0xF},
                {"load_order": "post", "cpu_affinity": 0x1, "guest_flags": ["vhwp"]},
            ]
        )
    )
    try:
        vmid = create(h)[1]
        out = bytearray(b"\xff" * 48)
        assert h.get_cpu_state(pm_cmd(vmid, abi.ACRN_PMCMD_GET_PX_CNT), out) == 0
        assert out[:8] == bytes(8)  # vHWP: continuous P-states, count 0
    finally:
        h.shutdown()


# ----- Service VM, CPUID, module init --------------------------------------------------


def test_service_vm_offline_cpu(hv: Hypervisor) -> None:
    assert hv.service_vm_offline_cpu(0) == -1  # the BSP
    assert hv.service_vm_offline_cpu(2) == 0
    assert hv.service_vm_offline_cpu(2) == 0  # already offline: no match, 0
    assert hv.service_vm_offline_cpu(9) == 0
    assert hv.snapshot()["service_vm"]["offline_lapic_ids"] == [2]


def test_cpuid_leaves(hv: Hypervisor) -> None:
    assert hv.cpuid(0x40000000) == (0x40000010, SIG, SIG, SIG)
    assert hv.cpuid(0x40000001) == (1, 0, 0, 0)
    assert hv.cpuid(0x40000010) == (2_000_000, 0, 0, 0)
    top = hv.cpuid(0x16)
    assert top == (2000, 2000, 100, 0)
    assert hv.cpuid(0x40000005) == top  # no entry: the highest basic leaf
    assert hv.cpuid(0x40000011) == top
    assert hv.cpuid(0x80000008) == top
    assert hv.cpuid(1)[2] & 1 << 31
    vmid = create(hv)[1]
    assert hv.cpuid(0x40000001, vmid=vmid) == (0, 0, 0, 0)  # only the Service VM is privileged
    assert hv.cpuid(0x40000000, vmid=vmid) == (0x40000010, SIG, SIG, SIG)
    with pytest.raises(ValueError):
        hv.cpuid(0, vmid=5)


def test_cpuid_without_acrn_or_privilege() -> None:
    h = Hypervisor(scenario(acrn=False))
    assert h.cpuid(0x40000000)[1:] != (SIG, SIG, SIG)
    assert not h.cpuid(1)[2] & 1 << 31
    assert h.hsm_init_check() == ENODEV
    sc = parse_scenario(
        {
            "platform": {},
            "vm": [
                {"load_order": "service", "name": "SOS", "cpu_affinity": 1, "privileged": False}
            ],
        }
    )
    h = Hypervisor(sc)
    assert h.cpuid(0x40000001) == (0, 0, 0, 0)
    assert h.hsm_init_check() == -errno.EPERM
    assert Hypervisor().hsm_init_check() == 0


def test_init_check_scans_for_the_signature() -> None:
    def at_0x100(leaf: int, sub: int) -> tuple[int, int, int, int]:
        if leaf == 1:
            return (0, 0, 1 << 31, 0)
        if leaf == 0x40000100:
            return (0x40000110, SIG, SIG, SIG)
        if leaf == 0x40000001:
            return (1, 0, 0, 0)
        return (0, 0, 0, 0)

    assert hsm_init_check(at_0x100) == 0
    assert (
        hsm_init_check(lambda leaf, sub: (0, 0, 0, 0) if leaf == 1 else at_0x100(leaf, sub))
        == ENODEV
    )


def test_snapshot_is_json(hv: Hypervisor) -> None:
    import json

    vmid = in_state(hv, "RUNNING")
    hv.inject_msi(vmid, msi())
    hv.set_irqline(vmid, 4)
    hv.assign_pcidev(vmid, pcidev())  # refused while RUNNING, harmless
    snap = json.loads(json.dumps(hv.snapshot()))
    assert snap["platform"].pop("lapic_ids") == list(hv.scenario.lapic_ids)
    assert snap["platform"].pop("lapic_source") == hv.scenario.lapic_source
    assert snap["platform"] == {
        "pcpus": 4,
        "tsc_khz": 2_000_000,
        "acrn": True,
        "privileged": True,
        "max_vm_num": 17,
    }
    assert snap["vms"][0]["state"] == "RUNNING"
    assert snap["vms"][0]["vcpus"][0]["state"] in ("init", "idle")  # the thread's own view
    assert snap["vms"][0]["irqlines"] == {"4": {"level": 1, "set_high": 1}}
