"""Whole request cycles: the hypervisor's vCPU threads fill slots and raise upcalls,
the test plays the device model (ATTACH, scan, answer, NOTIFY)."""

from __future__ import annotations

import errno
import os
import struct

import trio
from test_hsm_harness import PROCESSING, HvProxy, VmSetup, make_device, settle

from acrn_hsm_emu import abi
from acrn_hsm_emu.hypervisor.api import Access


def started(hv: HvProxy, vcpus: int = 2, **fields: int) -> VmSetup:
    s = VmSetup(make_device(hv), hv, vcpus=vcpus, **fields)
    s.create_client()
    assert s.ioctl(abi.ACRN_IOCTL_START_VM) == 0
    return s


async def serve(s: VmSetup, answer: int) -> list[tuple[int, ...]]:
    """One round of a device model: wait, take every request meant for us, answer it."""
    r = s.ioctl(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT)
    if not isinstance(r, int):
        r = await r
    assert r == 0
    seen = []
    for v in range(s.vcpu_num):
        if s.state(v) != PROCESSING or s.kernel_handled(v) != 0:
            continue
        off = s.slot_off(v)
        typ = s.slot_u32(v, abi.SLOT_TYPE)
        direction = s.slot_u32(v, abi.SLOT_DIRECTION)
        if typ == abi.ACRN_IOREQ_TYPE_PCICFG:
            where = struct.unpack_from("<IIII", s.page.map, off + abi.SLOT_PCI_BUS)
        else:
            where = (s.slot_u64(v, abi.SLOT_ADDRESS),)
        seen.append((v, typ, direction, *where))
        if direction == abi.ACRN_IOREQ_DIR_READ:
            s.page.put(off + abi.SLOT_VALUE, struct.pack("<Q", answer))
        assert s.notify(v) == 0
    return seen


async def result_of(fut: object) -> int:
    return await trio.to_thread.run_sync(fut.result)  # type: ignore[attr-defined]


async def test_pio_read_round_trip(hv):
    s = started(hv)
    fut = hv.real.inject(s.vmid, 1, Access("pio", False, 0x60, 1))
    assert await serve(s, 0x5A) == [(1, abi.ACRN_IOREQ_TYPE_PORTIO, 0, 0x60)]
    assert await result_of(fut) == 0x5A
    assert s.vm.counters.pio == 1 and s.vm.counters.default == 1
    assert hv.notified == [(s.vmid, 1)]


async def test_mmio_write_round_trip(hv):
    s = started(hv)
    fut = hv.real.inject(s.vmid, 0, Access("mmio", True, 0xD000_0010, 4, 0xCAFE))
    assert await serve(s, 0) == [(0, abi.ACRN_IOREQ_TYPE_MMIO, 1, 0xD000_0010)]
    assert s.slot_u64(0, abi.SLOT_VALUE) == 0xCAFE
    assert await result_of(fut) == 0


async def test_pci_config_read_is_folded_for_the_device_model(hv):
    s = started(hv)
    bdf_reg = (0 << 16) | (3 << 11) | (1 << 8) | 0x10
    fut = hv.real.inject(s.vmid, 0, Access("pci", False, bdf_reg, 4))
    seen = await serve(s, 0x1234_5678)
    assert seen == [(0, abi.ACRN_IOREQ_TYPE_PCICFG, 0, 0, 3, 1, 0x10)]
    assert await result_of(fut) == 0x1234_5678
    assert s.vm.pci_conf_addr & 0x8000_0000
    assert s.vm.counters.pci == 1


async def test_requests_of_several_vcpus(hv):
    s = started(hv, vcpus=3)
    futs = [hv.real.inject(s.vmid, v, Access("pio", False, 0x70 + v, 1)) for v in range(3)]
    seen: list[tuple[int, ...]] = []
    while len(seen) < 3:
        seen += await serve(s, 0x11)
    assert sorted(x[0] for x in seen) == [0, 1, 2]
    assert [await result_of(f) for f in futs] == [0x11] * 3


async def test_polling_vm_completes_without_notify_hypercall(hv):
    s = started(hv, vm_flag=abi.GUEST_FLAG_IO_COMPLETION_POLLING)
    fut = hv.real.inject(s.vmid, 0, Access("pio", False, 0x64, 1))
    assert await serve(s, 0x1C) == [(0, abi.ACRN_IOREQ_TYPE_PORTIO, 0, 0x64)]
    assert s.slot_u32(0, abi.SLOT_COMPLETION_POLLING) == 1
    assert await result_of(fut) == 0x1C
    assert hv.notified == []


async def test_ioeventfd_write_never_reaches_the_device_model(hv):
    s = started(hv)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        args = struct.pack("<IIQIIQ", efd, 0, 0xD000_0000, 4, 0, 0)
        assert s.ioctl(abi.ACRN_IOCTL_IOEVENTFD, 0, args) == 0
        assert await result_of(hv.real.inject(s.vmid, 0, Access("mmio", True, 0xD000_0000, 4, 1))) == 0
        assert os.eventfd_read(efd) == 1
        assert await result_of(hv.real.inject(s.vmid, 1, Access("mmio", False, 0xD000_0000, 4))) == 0
        assert s.vm.default_client.bitmap == 0
        assert s.vm.counters.in_kernel == 2 and s.vm.counters.default == 0
    finally:
        os.close(efd)


async def test_irqfd_signals_reach_the_hypervisor(hv):
    s = started(hv)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        args = struct.pack("<iIQQ", efd, 0, 0xFEE0_1000, 0x41)
        assert s.ioctl(abi.ACRN_IOCTL_IRQFD, 0, args) == 0
        for _ in range(3):
            os.eventfd_write(efd, 1)
            await settle()
        snap = {v["vmid"]: v for v in hv.real.snapshot()["vms"]}[s.vmid]
        assert snap["msi"]["count"] == 3
        assert snap["msi"]["recent"][-1]["vector"] == 0x41
    finally:
        os.close(efd)


async def test_pause_destroy_release_with_a_waiting_device_model(hv):
    s = started(hv)
    got: list[int] = []

    async def attach() -> None:
        r = s.ioctl(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT)
        got.append(r if isinstance(r, int) else await r)

    async with trio.open_nursery() as n:
        n.start_soon(attach)
        await settle()
        assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0
        assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == 0
    assert got == [-errno.ENODEV]
    s.dev.release(s.file)
    assert hv.live == set() and s.dev.snapshot()["vms"] == []
