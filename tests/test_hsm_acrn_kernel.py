"""The ``acrn-kernel`` ABI profile: what ACRN's own Service VM kernel adds, errno
for errno (hsm/acrn_kernel.py), and the rings carrying real traffic between the
mock hypervisor, the HSM and a caller (this process, as in test_hsm_harness).
Under ``upstream`` (the default) the same numbers are unknown ioctls.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest
import trio
from test_hsm_harness import (
    PIO,
    PROCESSING,
    WR,
    Buf,
    HvProxy,
    VmSetup,
    call,
    count,
    creation,
    ctx,
    ioeventfd,
    make_device,
    pause_then_destroy,
    result,
    settle,
)

from acrn_hsm_emu import abi
from acrn_hsm_emu import acrn_kernel_abi as ak
from acrn_hsm_emu.hypervisor.api import Access
from acrn_hsm_emu.hypervisor.workload import Step, Workload

HANG_GUARD_S = 30.0
NEW = (
    ak.ACRN_IOCTL_SETUP_ASYNCIO,
    ak.ACRN_IOCTL_SETUP_VM_EVENT_RING,
    ak.ACRN_IOCTL_SETUP_VM_EVENT_FD,
    ak.ACRN_IOCTL_ASSIGN_PIO_REGION,
    ak.ACRN_IOCTL_DEASSIGN_PIO_REGION,
)
F_ASYNCIO = ak.ACRN_IOEVENTFD_FLAG_ASYNCIO


def ring_page(ele_size: int, magic: int = ak.SBUF_MAGIC, size: int | None = None) -> Buf:
    """A ring page as acrn-dm prepares it (vm_init_asyncio, sbuf_init)."""
    b = Buf()
    ele_num = (4096 - 64) // ele_size
    h = ak.SharedBufHeader(magic=magic, ele_num=ele_num, ele_size=ele_size,
                           size=ele_num * ele_size if size is None else size)  # fmt: skip
    b.put(0, bytes(h))
    return b


def kernel(hv: HvProxy, vcpus: int = 1, **kw: object) -> VmSetup:
    s = VmSetup(make_device(hv, profile="acrn-kernel", **kw), hv, vcpus=vcpus)
    s.create_client()
    return s




async def readable(fd: int) -> None:
    with trio.fail_after(HANG_GUARD_S):  # hang guard only
        await trio.lowlevel.wait_readable(fd)


# ----- the profile switch --------------------------------------------------------------


async def test_upstream_answers_enotty_and_einval_before_a_vm(hv) -> None:
    s = VmSetup(make_device(hv), hv, vcpus=1)
    fresh = s.dev.open(ctx())
    for cmd in NEW:
        assert s.ioctl(cmd, 0x1000, bytes(8)) == -errno.ENOTTY
        assert s.dev.ioctl(fresh, call(cmd, 0x1000, bytes(8))) == -errno.EINVAL
    assert "setup_sbuf" not in hv.names()


async def test_acrn_kernel_keeps_the_gate_before_create_vm(hv) -> None:
    dev = make_device(hv, profile="acrn-kernel")
    f = dev.open(ctx())
    for cmd in NEW:
        assert dev.ioctl(f, call(cmd, 0x1000, bytes(8))) == -errno.EINVAL


def test_an_unknown_profile_is_refused(hv) -> None:
    with pytest.raises(ValueError):
        make_device(hv, profile="vhm")


# ----- SETUP_ASYNCIO -----------------------------------------------------------------------


async def test_setup_asyncio_errno_in_the_drivers_order(hv) -> None:
    s = kernel(hv)
    gone = Buf()
    gone.unmap()
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_ASYNCIO, gone.addr) == -errno.EFAULT  # pin fails
    ro = ring_page(8)
    ro.protect(1)  # PROT_READ: FOLL_WRITE fails
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_ASYNCIO, ro.addr) == -errno.EFAULT
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_ASYNCIO, ring_page(8, magic=1).addr) == -errno.EINVAL
    big = ring_page(8, size=ak.SBUF_MAX_SIZE)  # size + 64 > 4 MiB
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_ASYNCIO, big.addr) == -errno.EINVAL
    hv.force["setup_sbuf"] = -1
    page = ring_page(8)
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_ASYNCIO, page.addr + 100) == -errno.EPERM  # hypercall's -1
    del hv.force["setup_sbuf"]
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_ASYNCIO, page.addr + 100) == 0  # the page holding it
    assert hv.calls_of("setup_sbuf")[-1][:2] == (s.vmid, ak.ACRN_ASYNCIO)
    assert hv.calls_of("setup_sbuf")[-1][2].base == page.addr
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_ASYNCIO, ring_page(8).addr) == -errno.EEXIST
    assert (ro.size, big.size, page.size) == (4096, 4096, 4096)  # all still mapped


@pytest.mark.parametrize("quirks, again", [(True, -errno.EEXIST), (False, 0)])
async def test_asyncio_page_mark_outlives_destroy(hv, quirks, again) -> None:
    """acrn_asyncio_free clears the ring but not asyncio_page, and CREATE_VM does not
    reset it: a second VM on the same file gets EEXIST (quirks on)."""
    hv.force["destroy_vm"] = pause_then_destroy(hv)
    s = kernel(hv, quirks=quirks)
    pages = [ring_page(8), ring_page(8)]
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_ASYNCIO, pages[0].addr) == 0
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == 0
    param = creation(s.page.addr, cpu_affinity=1)
    s.arg.put(0, param)
    assert result(s.ioctl(abi.ACRN_IOCTL_CREATE_VM, s.arg.addr, param, out_size=48)) == 0
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_ASYNCIO, pages[1].addr) == again


# ----- asyncio ioeventfds and the ring's traffic -----------------------------------------------


async def test_asyncio_ioeventfd_checks(hv, fds) -> None:
    s = kernel(hv)
    efd = fds()
    assert ioeventfd(s, efd, 0xC010, 2, F_ASYNCIO | 1) == -errno.ENODEV  # no ring yet
    page = ring_page(8)
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_ASYNCIO, page.addr) == 0
    assert ioeventfd(s, efd, 0xC010, 2, F_ASYNCIO | 1, reserved=1) == -errno.EINVAL
    assert ioeventfd(s, 999, 0xC010, 2, F_ASYNCIO | 1) == -errno.EBADF
    assert ioeventfd(s, fds("pipe"), 0xC010, 2, F_ASYNCIO | 1) == -errno.EINVAL
    assert ioeventfd(s, efd, 0xC010, 3, F_ASYNCIO | 1) == 0  # no length check
    assert ioeventfd(s, efd, 0xC010, 2, F_ASYNCIO | 1) == 0  # a conflict: refused, still 0
    dup = os.dup(efd)
    assert ioeventfd(s, dup, 0xE0000000, 2, F_ASYNCIO) == 0  # MMIO, the same eventfd
    os.close(dup)
    descs = hv.real.snapshot()["vms"][0]["asyncio"]["descriptors"]
    assert [(d["type"], d["addr"], d["match_data"]) for d in descs] == [
        ("mmio", 0xE0000000, 0), ("pio", 0xC010, 0),
    ]  # fmt: skip  -- never a data match
    assert descs[0]["fd"] == descs[1]["fd"]  # one eventfd, one context
    assert s.vm.ioeventfds == []  # no kernel ioeventfd was made
    assert ioeventfd(s, efd, 0xC010, 2, F_ASYNCIO | 1 | 4) == 0  # DEASSIGN
    assert len(hv.real.snapshot()["vms"][0]["asyncio"]["descriptors"]) == 1
    assert page.u32(16) == page.u32(20) == 0  # nothing pushed yet


async def test_upstream_ignores_the_asyncio_flag(hv, fds) -> None:
    s = VmSetup(make_device(hv), hv, vcpus=1)
    efd = fds()
    assert ioeventfd(s, efd, 0xC010, 2, F_ASYNCIO | 1) == 0  # an ordinary ioeventfd
    assert len(s.vm.ioeventfds) == 1


async def test_virtio_kicks_travel_through_the_asyncio_ring(hv, fds) -> None:
    """A guest's kick matches the descriptor: the hypervisor pushes it into the ring
    and goes on; the next upcall's pass drains the ring and signals the eventfd."""
    s = kernel(hv)
    efd = fds()
    page = ring_page(8)
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_ASYNCIO, page.addr) == 0
    assert ioeventfd(s, efd, 0xC010, 2, F_ASYNCIO | 1) == 0
    assert s.ioctl(abi.ACRN_IOCTL_START_VM) == 0
    for i in range(5):
        fut = hv.real.inject(s.vmid, 0, Access("pio", True, 0xC010, 2, i))
        await trio.to_thread.run_sync(fut.result, HANG_GUARD_S)
    total = 0
    while total < 5:
        await readable(efd)
        total += count(efd)
    assert total == 5
    assert s.state(0) != PROCESSING  # no request went through the slot
    snap = s.dev.snapshot()["vms"][0]["acrn_kernel"]["asyncio"]
    assert snap["gets"] == 5 and snap["eventfds"][0]["signals"] == 5
    assert hv.real.snapshot()["vms"][0]["vcpus"][0]["asyncio"] == 5
    head, tail = page.u32(16), page.u32(20)
    assert head == tail == 40  # five u64 elements consumed


# ----- VM events ------------------------------------------------------------------------------


async def test_vm_event_ring_and_fd_errno(hv, fds) -> None:
    s = kernel(hv)
    gone = Buf()
    gone.unmap()
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_VM_EVENT_RING, gone.addr) == -errno.EFAULT
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_VM_EVENT_RING, ring_page(32, magic=7).addr) == -errno.EINVAL
    page = ring_page(32)
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_VM_EVENT_RING, page.addr) == 0
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_VM_EVENT_RING, ring_page(32).addr) == -errno.EEXIST
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_VM_EVENT_FD, 999) == -errno.EBADF
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_VM_EVENT_FD, 0xFFFFFFFF) == -errno.EBADF  # (int) -1
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_VM_EVENT_FD, fds("pipe")) == -errno.EINVAL
    efd = fds()
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_VM_EVENT_FD, efd) == 0
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_VM_EVENT_FD, fds()) == -errno.EEXIST
    assert hv.calls_of("setup_sbuf")[-1][:2] == (s.vmid, ak.ACRN_VM_EVENT)


async def test_a_triple_fault_arrives_as_an_event_and_an_s5_request(hv, fds) -> None:
    """spec hv A.2.7 through the HSM: the VM_EVENT_TRIPLE_FAULT lands in the device
    model's ring and its eventfd fires; the S5 write reaches the default client."""
    hv.real.set_workload(None, Workload.build({0: [Step.triple_fault()]}))
    s = kernel(hv)
    page = ring_page(ctypes.sizeof(ak.VmEvent))
    efd = fds()
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_VM_EVENT_RING, page.addr) == 0
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_VM_EVENT_FD, efd) == 0
    assert s.ioctl(abi.ACRN_IOCTL_START_VM) == 0
    await readable(efd)
    assert count(efd) >= 1
    assert page.u32(20) == 32  # tail: one event
    assert ak.VmEvent.from_buffer_copy(page.bytes(64, 32)).type == ak.VM_EVENT_TRIPLE_FAULT
    with trio.fail_after(HANG_GUARD_S):
        while s.state(0) != PROCESSING:
            await trio.sleep(0.001)
    assert s.slot_u32(0, abi.SLOT_TYPE) == PIO and s.slot_u32(0, abi.SLOT_DIRECTION) == WR
    assert s.slot_u64(0, abi.SLOT_ADDRESS) == 0x404 and s.slot_u64(0, abi.SLOT_SIZE) == 2
    assert s.slot_u32(0, abi.SLOT_VALUE) == 0x3400
    assert s.notify(0) == 0
    await settle()
    assert s.dev.snapshot()["vms"][0]["acrn_kernel"]["vm_event"]["signals"] >= 1


# ----- PIO regions ------------------------------------------------------------------------


async def test_pio_region_ioctls(hv) -> None:
    s = kernel(hv)
    region = bytes(ak.AcrnPioRegion(name=b"uart2", res=ak.AcrnPioRes(0x2F8, 8)))
    assert s.ioctl(ak.ACRN_IOCTL_ASSIGN_PIO_REGION, 0, region[:8]) == -errno.EFAULT
    assert s.ioctl(ak.ACRN_IOCTL_ASSIGN_PIO_REGION, 0, region) == 0
    assert s.ioctl(ak.ACRN_IOCTL_ASSIGN_PIO_REGION, 0, region) == -errno.EINVAL  # taken
    assert s.ioctl(ak.ACRN_IOCTL_DEASSIGN_PIO_REGION, 0, region) == 0
    assert s.ioctl(ak.ACRN_IOCTL_DEASSIGN_PIO_REGION, 0, region) == -errno.EINVAL
    recent = s.dev.snapshot()["vms"][0]["hypercalls"]["counts"]
    assert recent["assign_pio_region"] == {"calls": 2, "failed": 1, "last_ret": -errno.EINVAL}


async def test_an_rt_vms_rtc_write_arrives_as_an_event(hv, fds) -> None:
    """An RT VM's RTC is the hypervisor's: a write to a time register posts a
    VM_EVENT_RTC_CHG, which reaches the device model's ring and eventfd."""
    flags = abi.GUEST_FLAG_RT | abi.GUEST_FLAG_IO_COMPLETION_POLLING
    s = VmSetup(make_device(hv, profile="acrn-kernel"), hv, vcpus=1, vm_flag=flags)
    page = ring_page(ctypes.sizeof(ak.VmEvent))
    efd = fds()
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_VM_EVENT_RING, page.addr) == 0
    assert s.ioctl(ak.ACRN_IOCTL_SETUP_VM_EVENT_FD, efd) == 0
    assert s.ioctl(abi.ACRN_IOCTL_START_VM) == 0
    for access in (Access("pio", True, 0x70, 1, 0x02), Access("pio", True, 0x71, 1, 0x59)):
        fut = hv.real.inject(s.vmid, 0, access)  # minutes := 59 (BCD)
        await trio.to_thread.run_sync(fut.result, HANG_GUARD_S)
    await readable(efd)
    ev = ak.VmEvent.from_buffer_copy(page.bytes(64, 32))
    assert ev.type == ak.VM_EVENT_RTC_CHG
    data = ak.RtcChangeEventData.from_buffer_copy(bytes(ev.event_data)[:16])
    assert data.last_time > 0 and -3600 < data.delta_time < 3600
