"""The daemon's own bounds (the kernel has none of these): each refusal has its errno."""

from __future__ import annotations

import errno
import os
import struct

import structlog
from test_hsm_harness import (
    Buf,
    VmSetup,
    creation,
    ctx,
    ioctl,
    make_device,
    result,
)

from acrn_hsm_emu import abi
from acrn_hsm_emu.hsm.limits import Limits


def limited(hv, **kw):
    return make_device(hv, limits=Limits(**kw))


async def test_vms_per_process_eagain(hv):
    dev = limited(hv, vms_per_process=2)
    VmSetup(dev, hv, vcpus=1)
    VmSetup(dev, hv, vcpus=1)
    f = dev.open(ctx())
    page = Buf()
    param = creation(page.addr, cpu_affinity=1)
    with structlog.testing.capture_logs() as logs:
        r = ioctl(dev, f, abi.ACRN_IOCTL_CREATE_VM, 0, param, out_size=48)
    assert result(r) == -errno.EAGAIN
    assert any(e["event"] == "hsm.limit" and e["limit"] == "vms_per_process" for e in logs)
    assert hv.real.snapshot()["vms"].__len__() == 2  # no hypercall was made for the third


async def test_vms_per_process_counts_a_vm_lost_by_a_second_create(hv):
    """A VM the second-CREATE_VM quirk took from its file still belongs to its process
    (until the process is gone and the VM is reclaimed): it counts against the limit."""
    dev = limited(hv, vms_per_process=2)
    s = VmSetup(dev, hv, vcpus=1)
    page = Buf()
    assert s.ioctl(abi.ACRN_IOCTL_CREATE_VM, page.addr, creation(page.addr, cpu_affinity=1), out_size=48) \
        == -errno.EINVAL  # the quirk: the file lost its VM
    assert s.vm.lost_vmid is not None
    VmSetup(dev, hv, vcpus=1)  # the second of this process
    f = dev.open(ctx())
    with structlog.testing.capture_logs() as logs:
        r = ioctl(dev, f, abi.ACRN_IOCTL_CREATE_VM, 0, creation(Buf().addr, cpu_affinity=1), out_size=48)
    assert result(r) == -errno.EAGAIN
    assert any(e["event"] == "hsm.limit" and e["limit"] == "vms_per_process" for e in logs)


async def test_mmio_segments_per_vm_enomem_and_unset_frees_one(hv):
    dev = limited(hv, mmio_segments_per_vm=2)
    s = VmSetup(dev, hv, vcpus=1)

    def memseg(cmd: int, gpa: int) -> int:
        return s.ioctl(cmd, 0, struct.pack("<IIQQQ", abi.ACRN_MEMMAP_MMIO, 7, gpa, 0xF000_0000 + gpa, 4096))

    assert memseg(abi.ACRN_IOCTL_SET_MEMSEG, 0x1000_0000) == 0
    assert memseg(abi.ACRN_IOCTL_SET_MEMSEG, 0x1000_1000) == 0
    assert memseg(abi.ACRN_IOCTL_SET_MEMSEG, 0x1000_2000) == -errno.ENOMEM
    assert memseg(abi.ACRN_IOCTL_UNSET_MEMSEG, 0x1000_0000) == 0
    assert memseg(abi.ACRN_IOCTL_SET_MEMSEG, 0x1000_2000) == 0


async def test_ioeventfds_and_irqfds_per_vm_enospc(hv):
    dev = limited(hv, ioeventfds_per_vm=1, irqfds_per_vm=1)
    s = VmSetup(dev, hv, vcpus=1)
    fds = [os.eventfd(0) for _ in range(4)]
    try:
        def ioeventfd(fd: int, addr: int, flags: int = abi.ACRN_IOEVENTFD_FLAG_PIO) -> int:
            return s.ioctl(abi.ACRN_IOCTL_IOEVENTFD, 0, struct.pack("<IIQIIQ", fd, flags, addr, 2, 0, 0))

        def irqfd(fd: int, flags: int = 0) -> int:
            return s.ioctl(abi.ACRN_IOCTL_IRQFD, 0, struct.pack("<iIQQ", fd, flags, 0xFEE00000, 0x30))

        assert ioeventfd(fds[0], 0x500) == 0
        assert ioeventfd(fds[1], 0x510) == -errno.ENOSPC
        # Deassigning is never refused, and frees the place.
        assert ioeventfd(fds[0], 0x500, abi.ACRN_IOEVENTFD_FLAG_PIO | abi.ACRN_IOEVENTFD_FLAG_DEASSIGN) == 0
        assert ioeventfd(fds[1], 0x510) == 0
        assert irqfd(fds[2]) == 0
        assert irqfd(fds[3]) == -errno.ENOSPC
        assert irqfd(fds[2], abi.ACRN_IRQFD_FLAG_DEASSIGN) == 0
        assert irqfd(fds[3]) == 0
    finally:
        for fd in fds:
            os.close(fd)
