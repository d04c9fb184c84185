"""The hypervisor as ACRN v3.3 is, for acrn-dm: LAPIC ids, triple faults, the shared
rings (HC_SETUP_SBUF), asynchronous I/O, VM events, the RT vRTC, PIO regions.

No KVM and no HSM: the scripted backend, rings in this process's memory, and the
FakeHsm of test_hypervisor_vcpu where requests must be answered.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import struct

import pytest
import structlog
from test_hypervisor import create, in_state, new_page
from test_hypervisor_vcpu import FakeHsm

from acrn_hsm_emu import abi
from acrn_hsm_emu import acrn_kernel_abi as ak
from acrn_hsm_emu.hypervisor.api import Access
from acrn_hsm_emu.hypervisor.hypervisor import Hypervisor
from acrn_hsm_emu.hypervisor.madt import HostLapics, lapic_ids_for, parse_madt
from acrn_hsm_emu.hypervisor.scenario import (
    DEFAULT_SCENARIO_DATA,
    ScenarioError,
    parse_scenario,
)
from acrn_hsm_emu.hypervisor.workload import Step, Workload
from acrn_hsm_emu.memory import LocalMemory, SharedPage
from acrn_hsm_emu.sbuf import SharedRing, init_page
from tests.support.poll import wait_until

HANG_GUARD_S = 30.0


def scenario(**platform: object) -> object:
    data = copy.deepcopy(DEFAULT_SCENARIO_DATA)
    data["platform"].update(platform)
    return parse_scenario(data, "<acrn test>")


@pytest.fixture
def hv():
    h = Hypervisor(scenario(lapic_ids=[0, 2, 4, 6]))
    yield h
    h.shutdown()


def ring(ele_size: int, flags: int = 0) -> tuple[LocalMemory, SharedPage]:
    mem, page = new_page()
    init_page(page, ele_size, flags)
    return mem, page


# ----- the host's MADT and scenario LAPIC ids ------------------------------------------


def madt(*entries: tuple[int, int, int]) -> bytes:
    """An MADT with (type, apic id, flags) processor entries (type 9 = x2APIC)."""
    body = b""
    for etype, apic, flags in entries:
        if etype == 0:
            body += struct.pack("<BBBBI", 0, 8, 0, apic, flags)
        else:
            body += struct.pack("<BBHIII", 9, 16, 0, apic, flags, 0)
    header = b"APIC" + struct.pack("<I", 44 + len(body)) + bytes(36)
    return header + body


def test_madt_enabled_xapic_entries_in_table_order() -> None:
    table = madt((0, 4, 1), (0, 9, 0), (9, 300, 1), (0, 2, 1))
    assert parse_madt(table) == [4, 2]  # disabled and x2APIC entries do not count (as acrn-dm)
    with pytest.raises(ValueError):
        parse_madt(b"FACP" + bytes(60))


def test_pcpus_beyond_the_host_take_unused_ids() -> None:
    assert lapic_ids_for(4, HostLapics((4, 2), "t")) == (4, 2, 0, 1)
    assert lapic_ids_for(1, HostLapics((4, 2), "t")) == (4,)
    assert lapic_ids_for(3, HostLapics((), "none")) == (0, 1, 2)


def test_scenario_lapic_ids_default_to_the_host() -> None:
    s = scenario()
    assert len(s.lapic_ids) == s.pcpus
    assert s.lapic_source != "scenario"  # the host's MADT, or identity with the reason


@pytest.mark.parametrize(
    "ids, key, reason",
    [
        ([0, 1, 2], "platform.lapic_ids", "3 ids for 4 pCPUs"),
        ([0, 1, 2, 1], "platform.lapic_ids[3]", "also pCPU 1's"),
        ([0, 1, 2, 0xFF], "platform.lapic_ids[3]", "not an xAPIC id"),
        ([0, 1, 2, "3"], "platform.lapic_ids[3]", "must be an integer"),
        ("0,1", "platform.lapic_ids", "must be a list"),
    ],
)
def test_scenario_lapic_ids_are_checked(ids, key, reason) -> None:
    with pytest.raises(ScenarioError) as e:
        scenario(lapic_ids=ids)
    assert e.value.key == key and reason in e.value.reason


def test_vcpus_take_the_lapic_ids_of_their_pcpus(hv) -> None:
    ret, vmid, n = create(hv, affinity=0b1010)
    assert (ret, n) == (0, 2)
    vm = hv.snapshot()["vms"][0]
    assert vm["lapic_ids"] == [2, 6]
    assert [v["lapic_id"] for v in vm["vcpus"]] == [2, 6]
    assert hv.snapshot()["platform"]["lapic_ids"] == [0, 2, 4, 6]


def test_offline_cpu_names_a_service_vm_vcpu_by_its_lapic_id(hv) -> None:
    assert hv.service_vm_offline_cpu(0) == -1  # the BSP (pCPU 0)
    assert hv.service_vm_offline_cpu(1) == 0  # no vCPU has LAPIC id 1: nothing happens
    assert hv.snapshot()["service_vm"]["offline_lapic_ids"] == []
    assert hv.service_vm_offline_cpu(4) == 0
    assert hv.snapshot()["service_vm"]["offline_lapic_ids"] == [4]


# ----- shared rings ------------------------------------------------------------------------


def test_sbuf_put_and_drain_follow_acrns_ring() -> None:
    _, page = ring(8)
    w, r = SharedRing(page), SharedRing(page)
    capacity = (4096 - 64) // 8 - 1  # one slot stays empty
    for i in range(capacity):
        assert w.put(i.to_bytes(8, "little")) == 8
    assert w.put(b"\xff" * 8) == 0 and w.full == 1  # full, no OVERWRITE_EN
    got = r.drain()
    assert [int.from_bytes(b, "little") for b in got] == list(range(capacity))
    assert r.empty() and w.put(bytes(8)) == 8  # the writer goes on after the wrap


def test_sbuf_overwrite_drops_the_oldest_and_counts() -> None:
    _, page = ring(8, ak.OVERWRITE_EN | ak.OVERRUN_CNT_EN)
    w = SharedRing(page)
    capacity = (4096 - 64) // 8 - 1
    for i in range(capacity + 3):
        assert w.put(i.to_bytes(8, "little")) == 8
    got = [int.from_bytes(b, "little") for b in SharedRing(page).drain()]
    assert got == list(range(3, capacity + 3))
    assert ak.SharedBufHeader.from_buffer_copy(page.read(0, 64)).overrun_cnt == 3


def test_setup_sbuf_checks(hv) -> None:
    vmid = in_state(hv, "CREATED")
    _, good = ring(8)
    _, bad = new_page()  # no magic
    assert hv.setup_sbuf(vmid, ak.ACRN_ASYNCIO, None) == -1  # GPA 0
    assert hv.setup_sbuf(vmid, ak.ACRN_ASYNCIO, bad) == -1
    assert hv.setup_sbuf(vmid, ak.ACRN_TRACE, good) == -1  # per-pCPU rings: not modelled
    assert hv.setup_sbuf(vmid, 77, good) == -1
    assert hv.setup_sbuf(3, ak.ACRN_ASYNCIO, good) == -1  # POWERED_OFF slot
    assert hv.setup_sbuf(0x100, ak.ACRN_ASYNCIO, good) == -errno.ENOTTY  # no such target
    assert hv.setup_sbuf(vmid, ak.ACRN_ASYNCIO, good) == 0
    assert hv.setup_sbuf(vmid, ak.ACRN_VM_EVENT, good) == 0
    snap = hv.snapshot()["vms"][0]
    assert snap["asyncio"]["page"] == good.base and snap["vm_event"]["ring"]["page"] == good.base


# ----- asynchronous I/O ------------------------------------------------------------------


def info(addr: int, fd: int, pio: bool = True, match: int = 0, data: int = 0) -> bytes:
    t = ak.ACRN_ASYNCIO_PIO if pio else ak.ACRN_ASYNCIO_MMIO
    return bytes(ak.AcrnAsyncioInfo(type=t, match_data=match, addr=addr, fd=fd, data=data))


def test_asyncio_assign_returns_0_whatever_add_asyncio_decides(hv) -> None:
    vmid = in_state(hv, "CREATED")
    _, page = ring(8)
    assert hv.setup_sbuf(vmid, ak.ACRN_ASYNCIO, page) == 0
    assert hv.asyncio_assign(vmid, info(0x1000, 7)) == 0
    assert hv.asyncio_assign(vmid, info(0x1000, 8)) == 0  # conflict: refused, still 0
    assert hv.asyncio_assign(vmid, info(0, 9)) == 0  # address 0: refused, still 0
    assert hv.asyncio_assign(vmid, info(0x1000, 9, pio=False)) == 0  # MMIO: no conflict
    assert hv.asyncio_assign(vmid, info(0x1000, 9)[:16]) == -1  # the copy fails
    descs = hv.snapshot()["vms"][0]["asyncio"]["descriptors"]
    assert [(d["type"], d["fd"]) for d in descs] == [("mmio", 9), ("pio", 7)]  # newest first
    for i in range(62):
        assert hv.asyncio_assign(vmid, info(0x2000 + i, 10)) == 0
    assert hv.asyncio_assign(vmid, info(0x3000, 10)) == 0  # the 65th: refused
    assert len(hv.snapshot()["vms"][0]["asyncio"]["descriptors"]) == 64
    assert hv.asyncio_deassign(vmid, info(0x1000, 8)) == 0  # not identical: nothing
    assert hv.asyncio_deassign(vmid, info(0x1000, 7)) == 0
    assert len(hv.snapshot()["vms"][0]["asyncio"]["descriptors"]) == 63


def test_a_matching_access_is_pushed_not_sent() -> None:
    """acrn_insert_asyncio: the descriptor's fd goes into the ring, the upcall is
    raised and the vCPU goes on without a request (spec hv A.2.8)."""
    hv = Hypervisor()
    try:
        vmid = in_state(hv, "CREATED")
        page = hv._keep[1]
        hsm = FakeHsm(hv, vmid, page, 1)
        hv.set_upcall(hsm.upcall)
        _, rpage = ring(8)
        assert hv.setup_sbuf(vmid, ak.ACRN_ASYNCIO, rpage) == 0
        assert hv.asyncio_assign(vmid, info(0xC010, 0xABC, match=1, data=1)) == 0
        assert hv.asyncio_assign(vmid, info(0xE0001000, 0xDEF, pio=False)) == 0
        assert hv.start_vm(vmid) == 0
        run = lambda a: hv.inject(vmid, 0, a).result(HANG_GUARD_S)  # noqa: E731
        assert run(Access("pio", True, 0xC010, 2, 1)) == 0
        assert run(Access("pio", True, 0xC010, 2, 0)) == 0  # data 0 does not match: a request
        assert run(Access("mmio", True, 0xE0001000, 2, 5)) == 0  # no data match
        got = [int.from_bytes(b, "little") for b in SharedRing(rpage).drain()]
        assert got == [0xABC, 0xDEF]
        assert [r["address"] for r in hsm.requests] == [0xC010]
        vcpu = hv.snapshot()["vms"][0]["vcpus"][0]
        assert (vcpu["asyncio"], vcpu["requests"]) == (2, 1)
    finally:
        hv.shutdown()


def test_asyncio_ports_leave_the_native_loop(hv) -> None:
    vmid = in_state(hv, "CREATED")
    vm = hv._slots[1].vm
    _, rpage = ring(8)
    assert hv.setup_sbuf(vmid, ak.ACRN_ASYNCIO, rpage) == 0
    bit = lambda p: vm.skip_ports[p >> 3] >> (p & 7) & 1  # noqa: E731
    assert not bit(0xC010)
    assert hv.asyncio_assign(vmid, info(0xC010, 1)) == 0
    assert bit(0xC010)
    assert hv.asyncio_deassign(vmid, info(0xC010, 1)) == 0
    assert not bit(0xC010) and bit(0xCF8) and bit(0xCFC)  # the hypervisor's own stay


# ----- triple fault and VM events ----------------------------------------------------------


def started_with(hv: Hypervisor, workload: Workload, vcpus: int = 1) -> tuple[int, FakeHsm]:
    hv.set_workload(None, workload)  # taken by the vCPUs CREATE_VM makes
    ret, vmid, _ = create(hv, affinity=(1 << vcpus) - 1)
    assert ret == 0
    mem, page = new_page()
    hv._keep = (mem, page)
    assert hv.set_ioreq_buffer(vmid, page) == 0
    hsm = FakeHsm(hv, vmid, page, vcpus)
    hv.set_upcall(hsm.upcall)
    return vmid, hsm


def test_triple_fault_posts_an_event_then_writes_s5() -> None:
    hv = Hypervisor()
    try:
        wl = Workload.build({0: [Step.pio(0x80, 1, write=True, value=1), Step.triple_fault(),
                                 Step.pio(0x81, 1, write=True, value=2)]})  # fmt: skip
        vmid, hsm = started_with(hv, wl)
        _, epage = ring(ctypes.sizeof(ak.VmEvent))
        assert hv.setup_sbuf(vmid, ak.ACRN_VM_EVENT, epage) == 0
        with structlog.testing.capture_logs() as logs:
            assert hv.start_vm(vmid) == 0
            wait_until(lambda: len(hsm.requests) == 2, "the S5 write")
            wait_until(lambda: hv.snapshot()["vms"][0]["vcpus"][0]["state"] == "idle", "idle")
        assert [(r["address"], r["size"], r["value"]) for r in hsm.requests] == [
            (0x80, 1, 1), (ak.VIRTUAL_PM1A_CNT_ADDR, 2, ak.S5_WRITE),
        ]  # fmt: skip  -- nothing after the triple fault
        events = SharedRing(epage).drain()
        assert [ak.VmEvent.from_buffer_copy(e).type for e in events] == [ak.VM_EVENT_TRIPLE_FAULT]
        assert hv.snapshot()["vms"][0]["vm_event"]["sent"] == {"triple_fault": 1}
        assert [e["event"] for e in logs if e["event"].startswith("vm.")].count("vm.triple_fault") == 1
        assert hv.snapshot()["vms"][0]["state"] == "RUNNING"  # the device model pauses it
    finally:
        hv.shutdown()


def test_rt_vrtc_time_writes_post_rtc_change_events() -> None:
    """vrtc.c: for a post-launched (RT) VM, a write to a time register moves the clock
    and posts VM_EVENT_RTC_CHG {last_time, delta_time}; other CMOS bytes do not."""
    hv = Hypervisor()
    try:
        flags = abi.GUEST_FLAG_RT | abi.GUEST_FLAG_IO_COMPLETION_POLLING
        ret, vmid, _ = create(hv, affinity=1, flags=flags)
        assert ret == 0
        mem, page = new_page()
        assert hv.set_ioreq_buffer(vmid, page) == 0
        _, epage = ring(ctypes.sizeof(ak.VmEvent))
        assert hv.setup_sbuf(vmid, ak.ACRN_VM_EVENT, epage) == 0
        assert hv.start_vm(vmid) == 0
        run = lambda a: hv.inject(vmid, 0, a).result(HANG_GUARD_S)  # noqa: E731
        run(Access("pio", True, 0x70, 1, 0x0B))
        run(Access("pio", True, 0x71, 1, 0x06))  # register B: binary, 24 h
        run(Access("pio", True, 0x70, 1, 0x09))  # year
        year = run(Access("pio", False, 0x71, 1))
        run(Access("pio", True, 0x71, 1, (year + 1) % 100))
        run(Access("pio", True, 0x70, 1, 0x20))
        run(Access("pio", True, 0x71, 1, 0x11))  # NVRAM: no event
        events = [ak.VmEvent.from_buffer_copy(e) for e in SharedRing(epage).drain()]
        assert [e.type for e in events] == [ak.VM_EVENT_RTC_CHG]
        data = ak.RtcChangeEventData.from_buffer_copy(bytes(events[0].event_data)[:16])
        assert 365 * 86400 <= data.delta_time <= 366 * 86400 or year == 99
        run(Access("pio", True, 0x70, 1, 0x09))
        assert run(Access("pio", False, 0x71, 1)) == (year + 1) % 100  # the clock moved
    finally:
        hv.shutdown()


def test_vm_events_without_a_ring_are_lost_quietly(hv) -> None:
    in_state(hv, "RUNNING")
    vm = hv._slots[1].vm
    with structlog.testing.capture_logs() as logs:
        assert vm.send_vm_event(ak.VM_EVENT_TRIPLE_FAULT) == -errno.ENODEV
    assert [e["event"] for e in logs] == ["vm.vm_event_not_sent"]
    assert hv.snapshot()["vms"][0]["vm_event"]["lost"] == 1


# ----- PIO regions ---------------------------------------------------------------------


def region(port: int, size: int, name: bytes = b"pio") -> bytes:
    return bytes(ak.AcrnPioRegion(name=name, res=ak.AcrnPioRes(port, size)))


def test_pio_regions_move_between_the_service_vm_and_a_vm(hv) -> None:
    a = in_state(hv, "CREATED")
    b = in_state(hv, "CREATED")
    assert hv.assign_pio_region(a, region(0x2F8, 8)) == 0
    assert hv.assign_pio_region(b, region(0x2FC, 4)) == -errno.EINVAL  # a's now
    assert hv.assign_pio_region(b, region(0xCF8, 8)) == -errno.EINVAL  # the hypervisor's vPCI
    assert hv.assign_pio_region(b, region(0xFFFE, 4)) == -errno.EINVAL  # past the last port
    assert hv.assign_pio_region(b, region(0x2F8, 8)[:8]) == -errno.EINVAL  # the copy fails
    assert hv.deassign_pio_region(b, region(0x2F8, 8)) == -errno.EINVAL  # not b's
    assert hv.snapshot()["vms"][0]["pio_regions"] == [{"port": 0x2F8, "size": 8}]
    assert hv.deassign_pio_region(a, region(0x2F8, 8)) == 0
    assert hv.assign_pio_region(b, region(0x2F8, 8)) == 0  # back with the Service VM, given again
    assert hv.start_vm(b) == 0
    assert hv.assign_pio_region(b, region(0x3F8, 8)) == -errno.EINVAL  # RUNNING
    assert hv.deassign_pio_region(b, region(0x2F8, 8)) == -errno.EINVAL  # RUNNING
    assert hv.pause_vm(b) == 0 and hv.destroy_vm(b) == 0  # destroy gives the ports back
    assert hv.assign_pio_region(a, region(0x2F8, 8)) == 0
