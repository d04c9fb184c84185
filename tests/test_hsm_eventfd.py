"""IOEVENTFD and IRQFD: the driver's checks, matching rules and signal counting."""

from __future__ import annotations

import errno
import os
import struct

import pytest
import trio
from test_hsm_harness import (
    COMPLETE,
    MMIO,
    PIO,
    PROCESSING,
    RD,
    WR,
    HvProxy,
    VmSetup,
    count,
    ioeventfd,
    make_device,
    settle,
)

from acrn_hsm_emu import abi

F_PIO = abi.ACRN_IOEVENTFD_FLAG_PIO
F_DATA = abi.ACRN_IOEVENTFD_FLAG_DATAMATCH
F_DEASSIGN = abi.ACRN_IOEVENTFD_FLAG_DEASSIGN


def setup(hv: HvProxy, vcpus: int = 4) -> tuple[HvProxy, VmSetup]:
    s = VmSetup(make_device(hv), hv, vcpus=vcpus)
    s.create_client()
    return hv, s




def access(s: VmSetup, vcpu: int, typ: int, direction: int, addr: int, size: int, value: int = 0) -> None:
    s.fill(vcpu, typ, direction, addr, size, value)
    s.dev.dispatcher.run_pass()


# -- IOEVENTFD assign checks ---------------------------------------------------


async def test_ioeventfd_checks_in_order(hv, fds):
    hv, s = setup(hv)
    efd = fds()
    assert ioeventfd(s, efd, 0xFFFF_FFFF_FFFF_FFFF, 1) == -errno.EINVAL  # wraps
    assert ioeventfd(s, 12345, 0xFFFF_FFFF_FFFF_FFF8, 8) == -errno.EINVAL  # wraps before fd check
    for length in (0, 3, 5, 16):
        assert ioeventfd(s, 12345, 0x1000, length) == -errno.EINVAL  # before the fd check
    assert ioeventfd(s, 12345, 0x1000, 4) == -errno.EBADF
    assert ioeventfd(s, -1, 0x1000, 4) == -errno.EBADF
    assert ioeventfd(s, fds("pipe"), 0x1000, 4) == -errno.EINVAL
    assert ioeventfd(s, efd, 0xFFFF_FFFF_FFFF_FFF8, 4) == 0  # ends just below 2**64
    assert s.vm.ioeventfd_client.ranges == [(MMIO, 0xFFFF_FFFF_FFFF_FFF8, 0xFFFF_FFFF_FFFF_FFFB)]


async def test_ioeventfd_eexist_rule(hv, fds):
    hv, s = setup(hv)
    a, b = fds(), fds()
    assert ioeventfd(s, a, 0x1000, 4) == 0
    assert ioeventfd(s, a, 0x1000, 8) == -errno.EEXIST  # length not compared
    assert ioeventfd(s, a, 0x1000, 4, F_DATA, 7) == -errno.EEXIST  # one side wildcard
    dup = os.dup(a)
    try:
        assert ioeventfd(s, dup, 0x1000, 2) == -errno.EEXIST  # same eventfd, another fd number
    finally:
        os.close(dup)
    assert ioeventfd(s, b, 0x1000, 4) == 0  # another eventfd on the same address
    assert ioeventfd(s, a, 0x1000, 4, F_PIO) == 0  # another type
    assert ioeventfd(s, a, 0x1004, 4) == 0  # another address
    c = fds()
    assert ioeventfd(s, c, 0x2000, 4, F_DATA, 1) == 0
    assert ioeventfd(s, c, 0x2000, 4, F_DATA, 2) == 0  # different data
    assert ioeventfd(s, c, 0x2000, 4, F_DATA, 1) == -errno.EEXIST
    assert ioeventfd(s, c, 0x2000, 4) == -errno.EEXIST  # new one wildcard
    assert len(s.vm.ioeventfds) == 6
    assert s.vm.ioeventfd_client.ranges[0] == (MMIO, 0x2000, 0x2003)  # newest first


# -- IOEVENTFD handling ----------------------------------------------------------


async def test_write_at_the_exact_address_signals_and_completes(hv, fds):
    hv, s = setup(hv)
    efd = fds()
    assert ioeventfd(s, efd, 0x1000, 4) == 0
    access(s, 2, MMIO, WR, 0x1000, 4, 0xAB)
    assert count(efd) == 1
    assert s.state(2) == COMPLETE and s.kernel_handled(2) == 1
    assert hv.notified == [(s.vmid, 2)]
    assert s.vm.default_client.bitmap == 0  # the device model never sees it
    access(s, 2, MMIO, WR, 0x1000, 2)  # narrower access: length >= size
    assert count(efd) == 1
    c = s.vm.counters
    assert (c.range, c.in_kernel, c.default) == (2, 2, 0)


async def test_reads_in_range_return_zero(hv, fds):
    hv, s = setup(hv)
    efd = fds()
    assert ioeventfd(s, efd, 0x1000, 8) == 0
    assert ioeventfd(s, efd, 0x60, 2, F_PIO) == 0
    s.fill(0, MMIO, RD, 0x1000, 8, 0xFFFF_FFFF_FFFF_FFFF)
    s.fill(1, PIO, RD, 0x61, 1, 0xFFFF_FFFF_FFFF_FFFF)
    s.dev.dispatcher.run_pass()
    assert s.slot_u64(0, abi.SLOT_VALUE) == 0
    assert s.slot_u32(1, abi.SLOT_VALUE) == 0
    assert s.slot_u32(1, abi.SLOT_VALUE + 4) == 0xFFFF_FFFF  # PIO value is a u32
    assert [s.state(0), s.state(1)] == [COMPLETE, COMPLETE]
    assert count(efd) == 0


@pytest.mark.parametrize(
    "addr,size,value",
    [
        (0x1002, 2, 1),  # inside the range, not at its start
        (0x1004, 4, 1),
        (0x1000, 8, 1),  # wider than a 4-byte range: not contained, goes to the DM
    ],
)
async def test_other_writes_in_range_are_dropped(hv, fds, addr, size, value):
    hv, s = setup(hv)
    efd = fds()
    assert ioeventfd(s, efd, 0x1000, 8 if addr != 0x1000 else 4) == 0
    access(s, 0, MMIO, WR, addr, size, value)
    assert count(efd) == 0
    if addr == 0x1000:  # not contained in [0x1000, 0x1003]: the device model gets it
        assert s.state(0) == PROCESSING and s.vm.default_client.bitmap == 1
    else:
        assert s.state(0) == COMPLETE and s.vm.default_client.bitmap == 0


async def test_datamatch_and_pio_value_is_a_u32(hv, fds):
    hv, s = setup(hv)
    a, b = fds(), fds()
    assert ioeventfd(s, a, 0x60, 4, F_PIO | F_DATA, 0x1234) == 0
    assert ioeventfd(s, b, 0x60, 4, F_PIO) == 0
    access(s, 0, PIO, WR, 0x60, 4, 0x5555_0000_0000_1234)  # only the low 32 bits count
    assert (count(a), count(b)) == (1, 0)  # first match in assignment order
    access(s, 0, PIO, WR, 0x60, 4, 0x99)
    assert (count(a), count(b)) == (0, 1)
    c = fds()
    assert ioeventfd(s, c, 0x2000, 8, F_DATA, 0x5555_0000_0000_1234) == 0
    access(s, 0, MMIO, WR, 0x2000, 8, 0x5555_0000_0000_1234)  # MMIO compares 64 bits
    assert count(c) == 1
    access(s, 0, MMIO, WR, 0x2000, 8, 0x1234)
    assert count(c) == 0 and s.state(0) == COMPLETE  # eaten


async def test_ioeventfd_on_cf8_or_cfc_never_fires(hv, fds):
    hv, s = setup(hv)
    efd = fds()
    assert ioeventfd(s, efd, 0xCF8, 4, F_PIO) == 0
    assert ioeventfd(s, efd, 0xCFC, 4, F_PIO) == 0
    access(s, 0, PIO, WR, 0xCF8, 4, 0x8000_0000)
    access(s, 0, PIO, WR, 0xCFC, 4, 1)
    assert count(efd) == 0
    assert s.slot_u32(0, abi.SLOT_TYPE) == abi.ACRN_IOREQ_TYPE_PCICFG


async def test_deassign(hv, fds):
    hv, s = setup(hv)
    a, b = fds(), fds()
    assert ioeventfd(s, a, 0x1000, 4) == 0
    assert ioeventfd(s, a, 0x2000, 4) == 0
    assert ioeventfd(s, b, 0x1000, 4) == 0
    assert ioeventfd(s, 4321, 0, 0, F_DEASSIGN) == -errno.EBADF
    assert ioeventfd(s, fds("pipe"), 0, 0, F_DEASSIGN) == -errno.EINVAL
    assert ioeventfd(s, fds(), 0, 0, F_DEASSIGN) == 0  # nothing matched: still 0
    assert ioeventfd(s, a, 0x9999, 1, F_DEASSIGN) == 0  # the first entry of a, whatever addr
    assert [(p.addr, p.length) for p in s.vm.ioeventfds] == [(0x2000, 4), (0x1000, 4)]
    assert sorted(s.vm.ioeventfd_client.ranges) == [(MMIO, 0x1000, 0x1003), (MMIO, 0x2000, 0x2003)]
    access(s, 0, MMIO, WR, 0x1000, 4)
    assert (count(a), count(b)) == (0, 1)
    assert ioeventfd(s, b, 0, 0, F_DEASSIGN) == 0
    access(s, 1, MMIO, WR, 0x1000, 4)
    assert s.state(1) == PROCESSING and s.vm.default_client.bitmap == 0b10


async def test_destroy_releases_the_ioeventfds(hv, fds):
    hv, s = setup(hv)
    efd = fds()
    assert ioeventfd(s, efd, 0x1000, 4) == 0
    held = s.vm.ioeventfds[0].fd
    assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == 0
    with pytest.raises(OSError):
        os.fstat(held)


# -- IRQFD ------------------------------------------------------------------------


def irqfd(s: VmSetup, fd: int, flags: int = 0, addr: int = 0xFEE0_0000, data: int = 0x31) -> int:
    return s.ioctl(abi.ACRN_IOCTL_IRQFD, 0, struct.pack("<iIQQ", fd, flags, addr, data))


MSI = struct.pack("<QQ", 0xFEE0_0000, 0x31)


async def test_irqfd_checks(hv, fds):
    hv, s = setup(hv)
    assert irqfd(s, 9999) == -errno.EBADF
    assert irqfd(s, -1) == -errno.EBADF
    assert irqfd(s, fds("pipe")) == -errno.EINVAL
    a = fds()
    assert irqfd(s, a) == 0
    assert irqfd(s, a, addr=1) == -errno.EBUSY
    dup = os.dup(a)
    try:
        assert irqfd(s, dup) == -errno.EBUSY
    finally:
        os.close(dup)
    assert irqfd(s, fds()) == 0
    assert len(s.vm.irqfds) == 2
    await settle()


async def test_irqfd_injects_one_msi_per_signal(hv, fds):
    hv, s = setup(hv)
    a = fds()
    assert irqfd(s, a, addr=0xFEE0_1000, data=0x45) == 0
    await settle()
    assert hv.msis == []
    os.eventfd_write(a, 1)
    await settle()
    assert hv.msis == [(s.vmid, struct.pack("<QQ", 0xFEE0_1000, 0x45))]
    for _ in range(3):
        os.eventfd_write(a, 1)
    await settle()
    assert len(hv.msis) == 4
    os.eventfd_write(a, 2)  # coalesced with nothing else: two signals counted
    await settle()
    assert len(hv.msis) == 6


async def test_irqfd_already_signalled_at_assign_injects_once(hv, fds):
    hv, s = setup(hv)
    a = fds()
    os.eventfd_write(a, 5)
    assert irqfd(s, a) == 0
    assert hv.msis == [(s.vmid, MSI)]  # during the ioctl, as the driver's poll does
    await settle()
    assert len(hv.msis) == 1


async def test_irqfd_injection_failure_is_only_logged(hv, fds):
    hv, s = setup(hv)
    a = fds()
    assert irqfd(s, a, addr=0x1000) == 0  # not an MSI address: the hypervisor refuses
    os.eventfd_write(a, 1)
    await settle()
    os.eventfd_write(a, 1)
    await settle()
    assert len(hv.msis) == 2 and s.vm.irqfds[0].failures == 2
    assert hv.returns[-1] == -errno.EPERM


async def test_irqfd_deassign_stops_injection(hv, fds):
    hv, s = setup(hv)
    a, b = fds(), fds()
    assert irqfd(s, a) == 0
    assert irqfd(s, b, addr=0xFEE0_2000) == 0
    await settle()
    assert irqfd(s, 7777, abi.ACRN_IRQFD_FLAG_DEASSIGN) == -errno.EBADF
    assert irqfd(s, fds("pipe"), abi.ACRN_IRQFD_FLAG_DEASSIGN) == -errno.EINVAL
    assert irqfd(s, fds(), abi.ACRN_IRQFD_FLAG_DEASSIGN) == 0
    assert irqfd(s, a, abi.ACRN_IRQFD_FLAG_DEASSIGN) == 0
    await settle()
    os.eventfd_write(a, 1)
    os.eventfd_write(b, 1)
    await settle()
    assert hv.msis == [(s.vmid, struct.pack("<QQ", 0xFEE0_2000, 0x31))]
    assert irqfd(s, a) == 0  # free again
    await settle()


async def test_destroy_vm_shuts_irqfds_down(hv, fds):
    hv, s = setup(hv)
    a = fds()
    assert irqfd(s, a) == 0
    await settle()
    assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == 0
    await settle()
    os.eventfd_write(a, 1)
    await settle()
    assert hv.msis == []
    assert count(a) == 1  # nobody reads it any more


async def test_irqfd_watchers_can_run_in_a_given_nursery(hv, fds):
    async with trio.open_nursery() as n:
        s = VmSetup(make_device(hv, nursery=n), hv)
        a = fds()
        assert irqfd(s, a) == 0
        os.eventfd_write(a, 1)
        await settle()
        assert len(hv.msis) == 1
        assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0
        s.dev.release(s.file)
        s.dev.close()  # the dispatcher's task runs in the nursery too, until close
    assert s.vm.irqfds == []
