"""The ioreq dispatcher: order, CF8/CFC folding, ranges, ATTACH, completion, clearing, faults.

Requests are written into the request page as the hypervisor would (fields,
then PENDING) and a dispatcher pass is run the way an upcall runs it.
"""

from __future__ import annotations

import errno
import struct

import pytest
import structlog
import trio
import trio.testing
from test_hsm_harness import (
    COMPLETE,
    MMIO,
    PCI,
    PENDING,
    PIO,
    PROCESSING,
    RD,
    WR,
    Buf,
    HvProxy,
    VmSetup,
    call,
    creation,
    make_device,
    settle,
)

from acrn_hsm_emu import abi
from acrn_hsm_emu.hsm.acrn_drv import IoreqClient
from acrn_hsm_emu.hsm.ioreq import range_add
from acrn_hsm_emu.memory import MemoryFault
from cdev.device import Deferred


def setup(hv: HvProxy, vcpus: int = 4, client: bool = True, **kw: object) -> tuple[HvProxy, VmSetup]:
    s = VmSetup(make_device(hv, **kw), hv, vcpus=vcpus)
    if client:
        s.create_client()
    return hv, s


def run_pass(s: VmSetup) -> None:
    s.dev.dispatcher.run_pass()


# -- plain dispatch ------------------------------------------------------------


async def test_pending_request_goes_to_the_default_client(hv):
    hv, s = setup(hv)
    s.page.put_u32(s.slot_off(1) + abi.SLOT_KERNEL_HANDLED, 7)
    s.fill(1, MMIO, RD, 0xFE000000, 4, 0x1234)
    run_pass(s)
    assert s.state(1) == PROCESSING and s.kernel_handled(1) == 0
    assert s.vm.default_client.bitmap == 0b10
    assert s.slot_u64(1, abi.SLOT_VALUE) == 0x1234  # nothing else touched
    assert hv.notified == []
    assert s.vm.counters.mmio == 1 and s.vm.counters.default == 1


async def test_only_pending_slots_below_vcpu_num_are_looked_at(hv):
    hv, s = setup(hv, vcpus=2)
    s.fill(0, PIO, WR, 0x60, 1, state=COMPLETE)
    s.fill(1, PIO, WR, 0x60, 1, state=PROCESSING)
    s.fill(2, PIO, WR, 0x60, 1)  # beyond vcpu_num
    run_pass(s)
    assert [s.state(i) for i in range(3)] == [COMPLETE, PROCESSING, PENDING]
    assert s.vm.default_client.bitmap == 0


async def test_without_a_client_the_scan_of_that_vm_stops_at_the_first_request(hv):
    dev = make_device(hv)
    a = VmSetup(dev, hv, vcpus=4)
    b = VmSetup(dev, hv, vcpus=4)  # newer, scanned first
    b.create_client()
    for s in (a, b):
        s.fill(1, PIO, RD, 0x60, 1)
        s.fill(3, PIO, RD, 0xCF8, 4)  # would be completed in-kernel if reached
    run_pass(a)
    assert a.state(1) == PENDING and a.state(3) == PENDING  # aborted at vCPU 1
    assert a.vm.counters.stalled == 1
    assert b.state(1) == PROCESSING and b.state(3) == COMPLETE
    # creating the client does not rescan; the next upcall does
    a.create_client()
    await settle()
    assert a.state(1) == PENDING
    hv.upcall()
    await settle()
    assert a.state(1) == PROCESSING and a.state(3) == COMPLETE


async def test_newest_vm_first_and_vcpu_zero_upward(hv):
    dev = make_device(hv)
    a = VmSetup(dev, hv, vcpus=2)
    b = VmSetup(dev, hv, vcpus=2)
    for s in (a, b):
        s.create_client()
        for v in (1, 0):
            s.fill(v, PIO, RD, 0xCF8, 4)  # completed at once: notify order = scan order
    run_pass(a)
    assert hv.notified == [(b.vmid, 0), (b.vmid, 1), (a.vmid, 0), (a.vmid, 1)]


async def test_upcalls_are_coalesced_into_one_queued_pass(hv):
    hv, s = setup(hv)
    s.fill(0, PIO, RD, 0x60, 1)
    for _ in range(5):
        hv.upcall()
    d = s.dev.dispatcher
    await settle()
    assert d.upcalls == 5
    assert d.passes == 1 and s.state(0) == PROCESSING
    hv.upcall()
    await settle()
    assert d.passes == 2


async def test_upcall_from_another_thread_dispatches_on_the_trio_thread(hv):
    hv, s = setup(hv)
    s.fill(2, MMIO, WR, 0xD0000000, 8, 5)
    await trio.to_thread.run_sync(hv.upcall)
    await settle()
    assert s.state(2) == PROCESSING


# -- CF8 / CFC -----------------------------------------------------------------


async def test_cf8_write_latches_whole_value_any_size_and_read_returns_it(hv):
    hv, s = setup(hv)
    s.page.put_u32(s.slot_off(0) + abi.SLOT_KERNEL_HANDLED, 9)
    s.fill(0, PIO, WR, 0xCF8, 2, 0x8001_2345)
    run_pass(s)
    assert s.vm.pci_conf_addr == 0x8001_2345
    assert s.state(0) == COMPLETE and hv.notified == [(s.vmid, 0)]
    assert s.kernel_handled(0) == 9  # left as the hypervisor wrote it
    assert s.vm.default_client.bitmap == 0
    s.fill(0, PIO, RD, 0xCF8, 4, 0xAAAA)
    run_pass(s)
    assert s.slot_u32(0, abi.SLOT_VALUE) == 0x8001_2345
    assert s.state(0) == COMPLETE
    assert s.vm.counters.cf8 == 2 and s.vm.counters.default == 0


async def test_cf8_completion_in_polling_mode_skips_the_notify(hv):
    hv, s = setup(hv)
    s.fill(0, PIO, WR, 0xCF8, 4, 0x8000_0000, polling=1)
    run_pass(s)
    assert s.state(0) == COMPLETE and hv.notified == []


@pytest.mark.parametrize("port", [0xCFC, 0xCFD, 0xCFE, 0xCFF])
async def test_cfc_with_enable_bit_clear_reads_all_ones_and_drops_writes(hv, port):
    hv, s = setup(hv)
    s.vm.pci_conf_addr = 0x7FFF_FFFC
    s.fill(0, PIO, RD, port, 1, 0x12)
    s.fill(1, PIO, WR, port, 4, 0x3456)
    run_pass(s)
    assert s.slot_u32(0, abi.SLOT_VALUE) == 0xFFFFFFFF
    assert s.slot_u32(1, abi.SLOT_VALUE) == 0x3456
    assert s.slot_u32(1, abi.SLOT_TYPE) == PIO
    assert [s.state(0), s.state(1)] == [COMPLETE, COMPLETE]
    assert hv.notified == [(s.vmid, 0), (s.vmid, 1)]
    assert s.vm.default_client.bitmap == 0


def pci_fields(s: VmSetup, vcpu: int) -> tuple[int, int, int, int]:
    return struct.unpack_from("<IIII", s.page.map, s.slot_off(vcpu) + abi.SLOT_PCI_BUS)


@pytest.mark.parametrize(
    "conf,port,expect",
    [
        (0x8000_0000, 0xCFC, (0, 0, 0, 0)),
        (0x80FF_FFFC, 0xCFC, (0xFF, 31, 7, 0xFC)),
        (0x8012_3A44, 0xCFE, (0x12, 7, 2, 0x46)),
        (0x8F01_0810, 0xCFD, (0x01, 1, 0, 0xF11)),  # bits 27:24 become reg bits 11:8
        (0xF501_0803, 0xCFF, (0x01, 1, 0, 0x503)),  # bits 30:28 and 1:0 are not part of reg
    ],
)
async def test_cfc_with_enable_bit_is_folded_into_pcicfg(hv, conf, port, expect):
    hv, s = setup(hv)
    s.vm.pci_conf_addr = conf
    junk = bytes(range(64))
    s.fill(2, PIO, RD, port, 2, 0x77, junk=junk)
    run_pass(s)
    assert s.slot_u32(2, abi.SLOT_TYPE) == PCI
    assert pci_fields(s, 2) == expect
    assert s.slot_u32(2, abi.SLOT_DIRECTION) == RD
    assert s.slot_u64(2, abi.SLOT_SIZE) == 2
    assert s.slot_u32(2, abi.SLOT_VALUE) == 0x77
    assert s.slot_u64(2, abi.SLOT_ADDRESS) == port  # PIO address bytes are not cleared
    assert s.page.bytes(s.slot_off(2) + abi.SLOT_REQS + 4, 4) == junk[4:8]
    assert s.state(2) == PROCESSING and s.kernel_handled(2) == 0
    assert s.vm.default_client.bitmap == 0b100
    assert s.vm.counters.pci == 1 and s.vm.counters.default == 1
    assert hv.notified == []


async def test_folded_pcicfg_ignores_range_clients(hv):
    hv, s = setup(hv)
    s.vm.pci_conf_addr = 0x8000_0000
    rc = s.dev.dispatcher.client_create(s.vm, "r", False)
    range_add(rc, PIO, 0, 0xFFFF)
    range_add(rc, PCI, 0, 0xFFFF)
    s.fill(0, PIO, WR, 0xCFC, 4, 1)
    run_pass(s)
    assert s.vm.default_client.bitmap == 1 and rc.bitmap == 0


@pytest.mark.parametrize("port", [0xCF9, 0xCFA, 0xCFB, 0xCF7, 0xD00])
async def test_other_ports_near_cf8_are_not_intercepted(hv, port):
    hv, s = setup(hv)
    s.vm.pci_conf_addr = 0x8000_0000
    s.fill(0, PIO, WR, port, 1, 6)
    run_pass(s)
    assert s.slot_u32(0, abi.SLOT_TYPE) == PIO and s.state(0) == PROCESSING
    assert s.vm.pci_conf_addr == 0x8000_0000


async def test_mmio_at_cf8_is_not_intercepted(hv):
    hv, s = setup(hv)
    s.fill(0, MMIO, WR, 0xCF8, 4, 0x8000_0000)
    run_pass(s)
    assert s.vm.pci_conf_addr == 0 and s.state(0) == PROCESSING


async def test_pci_latch_survives_a_recreate_on_the_same_file(hv):
    hv, s = setup(hv)
    s.fill(0, PIO, WR, 0xCF8, 4, 0x8000_0800)
    run_pass(s)
    assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == 0
    page = Buf()
    s.page = page
    assert s.ioctl(abi.ACRN_IOCTL_CREATE_VM, page.addr, creation(page.addr), out_size=48)[0] == 0
    assert s.vm.pci_conf_addr == 0x8000_0800


# -- range clients -------------------------------------------------------------


@pytest.mark.parametrize(
    "addr,size,hit",
    [
        (0x1000, 1, True),
        (0x1000, 8, True),
        (0x1007, 1, True),
        (0x1006, 2, True),
        (0x1007, 2, False),  # straddles the end
        (0x0FFF, 2, False),  # starts before
        (0x1008, 1, False),
    ],
)
async def test_range_match_is_inclusive_and_needs_the_whole_access(hv, addr, size, hit):
    hv, s = setup(hv)
    rc = s.dev.dispatcher.client_create(s.vm, "remote", False)
    assert range_add(rc, MMIO, 0x1000, 0x1007) == 0
    s.fill(0, MMIO, WR, addr, size, 1)
    run_pass(s)
    assert s.state(0) == PROCESSING
    assert (rc.bitmap, s.vm.default_client.bitmap) == ((1, 0) if hit else (0, 1))
    assert s.kernel_handled(0) == (1 if hit else 0)


async def test_range_types_must_match_and_newest_client_wins(hv):
    hv, s = setup(hv)
    d = s.dev.dispatcher
    old = d.client_create(s.vm, "old", False)
    new = d.client_create(s.vm, "new", False)
    range_add(old, PIO, 0x60, 0x64)
    range_add(new, PIO, 0x60, 0x60)
    range_add(new, MMIO, 0x64, 0x64)
    s.fill(0, PIO, WR, 0x60, 1)
    s.fill(1, PIO, WR, 0x64, 1)
    run_pass(s)
    assert new.bitmap == 0b01 and old.bitmap == 0b10
    assert range_add(old, PIO, 5, 4) == -errno.EINVAL


async def test_a_range_client_without_default_client_still_gets_its_requests(hv):
    hv, s = setup(hv, client=False)
    rc = s.dev.dispatcher.client_create(s.vm, "r", False)
    range_add(rc, PIO, 0x70, 0x71)
    s.fill(0, PIO, WR, 0x70, 1)
    s.fill(1, PIO, WR, 0x80, 1)
    s.fill(2, PIO, WR, 0x71, 1)
    run_pass(s)
    assert rc.bitmap == 0b001  # the scan stopped at vCPU 1
    assert s.state(2) == PENDING


# -- ATTACH ----------------------------------------------------------------------


async def test_attach_is_level_triggered(hv):
    hv, s = setup(hv)
    s.fill(0, PIO, RD, 0x60, 1)
    run_pass(s)
    assert s.ioctl(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT) == 0  # bit set: at once
    assert s.ioctl(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT) == 0  # still set
    assert s.notify(0) == 0
    waiter = s.ioctl(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT)
    assert isinstance(waiter, Deferred) and not waiter.done  # nothing pending: it waits
    waiter.cancel()
    assert s.vm.default_client.waiters == 0


async def test_attach_waits_for_a_dispatched_request(hv):
    hv, s = setup(hv)
    got: list[int] = []

    async def attach() -> None:
        got.append(await s.ioctl(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT))

    async with trio.open_nursery() as n:
        n.start_soon(attach)
        await settle()
        assert got == [] and s.vm.default_client.waiters == 1
        s.fill(3, PIO, WR, 0x60, 1)
        hv.upcall()
    assert got == [0]
    assert s.state(3) == PROCESSING


async def test_attach_gets_enodev_when_the_client_is_destroyed_from_another_thread(hv):
    hv, s = setup(hv)
    got: list[int] = []

    async def attach() -> None:
        got.append(await s.ioctl(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT))

    async with trio.open_nursery() as n:
        for _ in range(2):
            n.start_soon(attach)
        await settle()
        assert s.ioctl(abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT) == 0
    assert got == [-errno.ENODEV, -errno.ENODEV]
    assert s.ioctl(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT) == -errno.ENODEV


async def test_attach_destroyed_with_bits_set_still_enodev(hv):
    hv, s = setup(hv)
    client = s.vm.default_client
    s.fill(0, PIO, RD, 0x60, 1)
    run_pass(s)
    waiter = client.wait()
    s.dev.dispatcher.client_destroy(client)
    assert await waiter == -errno.ENODEV
    assert s.state(0) == PROCESSING  # nobody completes it


async def test_client_destroy_queues_a_pass_and_a_new_client_starts_empty(hv):
    hv, s = setup(hv)
    s.fill(0, PIO, RD, 0x60, 1)
    run_pass(s)
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT) == 0
    s.fill(1, PIO, RD, 0x61, 1)
    s.create_client()
    passes = s.dev.dispatcher.passes
    await settle()
    assert s.dev.dispatcher.passes == passes + 1  # ioreq_resume
    assert s.vm.default_client.bitmap == 0b10
    assert s.state(0) == PROCESSING


async def test_client_destroy_drains_a_queued_pass_first(hv):
    hv, s = setup(hv)
    client = s.vm.default_client
    s.fill(0, PIO, RD, 0x60, 1)
    hv.upcall()  # queued, not yet run
    s.dev.dispatcher.client_destroy(client)
    # the drained pass ran while the client still existed
    assert client.bitmap == 1 and s.state(0) == PROCESSING


async def test_interrupted_attach_answers_zero_and_leaves_the_client(hv):
    hv, s = setup(hv)
    c = call(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT)
    waiter = s.dev.ioctl(s.file, c)
    assert isinstance(waiter, Deferred)
    waiter.cancel()  # what cdev does on an interrupt: the device forgets the waiter
    assert s.vm.default_client.waiters == 0
    assert s.dev.interrupted(s.file, c) == 0
    assert s.vm.default_client is not None


# -- completion ------------------------------------------------------------------


async def test_notify_completes_and_clears_the_bit(hv):
    hv, s = setup(hv)
    s.fill(1, PIO, RD, 0x60, 1)
    run_pass(s)
    s.page.put_u32(s.slot_off(1) + abi.SLOT_VALUE, 0x42)  # the DM's answer
    assert s.notify(1) == 0
    assert s.state(1) == COMPLETE and s.vm.default_client.bitmap == 0
    assert hv.notified == [(s.vmid, 1)]
    assert s.slot_u32(1, abi.SLOT_VALUE) == 0x42


async def test_polling_mode_completion_is_read_from_the_slot_before_complete(hv):
    hv, s = setup(hv)
    s.fill(0, MMIO, RD, 0x1000, 4, polling=1)
    run_pass(s)
    assert s.notify(0) == 0
    assert s.state(0) == COMPLETE and hv.notified == []


# -- CLEAR_VM_IOREQ ----------------------------------------------------------------


async def test_clearing_completes_pending_requests_without_looking(hv):
    hv, s = setup(hv)
    s.vm.clearing = True
    s.fill(0, PIO, WR, 0xCF8, 4, 0x8000_0000)  # not even latched
    s.fill(1, MMIO, RD, 0x1000, 4)
    run_pass(s)
    assert [s.state(0), s.state(1)] == [COMPLETE, COMPLETE]
    assert s.vm.pci_conf_addr == 0 and s.vm.default_client.bitmap == 0
    assert hv.notified == [(s.vmid, 0), (s.vmid, 1)]
    assert s.vm.counters.cleared == 2


async def test_clear_vm_ioreq_completes_the_default_clients_requests(hv):
    hv, s = setup(hv, vcpus=3)
    for v in range(3):
        s.fill(v, PIO, RD, 0x60 + v, 1)
    run_pass(s)
    s.vm.default_client.bitmap |= 1 << 5  # a stale bit beyond vcpu_num is ignored
    assert s.ioctl(abi.ACRN_IOCTL_CLEAR_VM_IOREQ) == 0
    assert [s.state(v) for v in range(3)] == [COMPLETE] * 3
    assert hv.notified == [(s.vmid, 0), (s.vmid, 1), (s.vmid, 2)]
    assert s.vm.default_client.bitmap == 1 << 5
    assert not s.vm.clearing


async def test_clear_vm_ioreq_waits_for_range_clients_ten_rounds(hv, autojump_clock):
    hv, s = setup(hv, clear_round_s=0.01)
    rc = s.dev.dispatcher.client_create(s.vm, "remote", False)
    range_add(rc, PIO, 0x70, 0x70)
    s.fill(0, PIO, WR, 0x70, 1)
    s.fill(1, PIO, WR, 0x60, 1)
    run_pass(s)
    assert rc.bitmap == 1
    waiter = s.ioctl(abi.ACRN_IOCTL_CLEAR_VM_IOREQ)
    assert not isinstance(waiter, int)
    assert s.vm.clearing
    t0 = trio.current_time()
    with structlog.testing.capture_logs() as logs:
        assert await waiter == 0
    assert trio.current_time() - t0 == pytest.approx(0.10)  # 10 rounds of HZ/100
    assert any(e["event"] == "hsm.clear_vm_ioreq_timeout" for e in logs)
    assert s.state(1) == COMPLETE and s.state(0) == PROCESSING  # range request left alone
    assert not s.vm.clearing


async def test_clear_vm_ioreq_stops_waiting_when_the_range_client_is_done(hv, autojump_clock):
    hv, s = setup(hv, clear_round_s=0.01)
    d = s.dev.dispatcher
    rc = d.client_create(s.vm, "remote", False)
    range_add(rc, PIO, 0x70, 0x70)
    s.fill(0, PIO, WR, 0x70, 1)
    run_pass(s)
    got: list[int] = []

    async def clear() -> None:
        got.append(await s.ioctl(abi.ACRN_IOCTL_CLEAR_VM_IOREQ))

    t0 = trio.current_time()
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as n:
            n.start_soon(clear)
            await trio.sleep(0.025)
            assert got == [] and s.vm.clearing
            assert d.client_complete(rc, 0) == 0
    assert got == [0]
    assert trio.current_time() - t0 == pytest.approx(0.03)  # ended after the 3rd round
    assert not any(e["event"] == "hsm.clear_vm_ioreq_timeout" for e in logs)
    assert not s.vm.clearing and s.state(0) == COMPLETE


async def test_interrupted_clear_vm_ioreq_finishes_and_answers_zero(hv):
    hv, s = setup(hv, clear_round_s=3600)
    rc = s.dev.dispatcher.client_create(s.vm, "remote", False)
    range_add(rc, PIO, 0x70, 0x70)
    s.fill(0, PIO, WR, 0x70, 1)
    s.fill(1, PIO, WR, 0x60, 1)
    run_pass(s)
    c = call(abi.ACRN_IOCTL_CLEAR_VM_IOREQ)
    waiter = s.dev.ioctl(s.file, c)
    assert not isinstance(waiter, int)
    waiter.close()  # never started: cdev cancelled it
    assert s.dev.interrupted(s.file, c) == 0
    assert not s.vm.clearing and s.state(1) == COMPLETE


# -- faults and counters ----------------------------------------------------------


async def test_a_vanished_request_page_fails_only_that_vm(hv):
    dev = make_device(hv)
    a = VmSetup(dev, hv, vcpus=2)
    b = VmSetup(dev, hv, vcpus=2)
    for s in (a, b):
        s.create_client()
    a.fill(0, PIO, RD, 0x60, 1)
    b.fill(0, PIO, RD, 0x60, 1)
    b.page.unmap()  # the client died or unmapped it
    with structlog.testing.capture_logs() as logs:
        dev.dispatcher.run_pass()
        a.fill(1, PIO, RD, 0x61, 1)
        dev.dispatcher.run_pass()
    fails = [e for e in logs if e["event"] == "hsm.vm_failed"]
    assert len(fails) == 1 and fails[0]["vmid"] == b.vmid
    assert b.vm.failed is not None and a.vm.failed is None
    assert a.state(0) == PROCESSING and a.state(1) == PROCESSING
    assert b.notify(0) == -errno.EFAULT
    snap = dev.snapshot()
    assert [v["failed"] is not None for v in snap["vms"]] == [True, False]
    assert dev.ioctl(b.file, call(abi.ACRN_IOCTL_PAUSE_VM)) == 0  # the daemon goes on
    dev.release(b.file)


async def test_an_owner_exiting_between_memory_and_files_is_no_error(hv):
    """A process's memory goes before its files: a pass in between reads ESRCH.
    The VM stops being dispatched, as for any fault, but that is the owner
    exiting, logged at info; its release follows."""
    dev = make_device(hv)
    a = VmSetup(dev, hv, vcpus=1)
    a.create_client()
    a.fill(0, PIO, RD, 0x60, 1)

    class Gone:  # the scan as RemoteMemory fails it once the process has no memory
        def scan(self) -> bytes:
            raise MemoryFault(errno.ESRCH, f"scan of the request page in pid {a.vm.owner_pid}")

    a.vm.scanner = Gone()  # type: ignore[assignment]
    with structlog.testing.capture_logs() as logs:
        dev.dispatcher.run_pass()
    assert [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("hsm.vm_")] == [
        ("hsm.vm_owner_exiting", "info")
    ]
    assert a.vm.failed is not None
    dev.release(a.file)


async def test_counters_in_the_snapshot(hv):
    hv, s = setup(hv)
    s.fill(0, PIO, WR, 0xCF8, 4, 0x8000_0000)
    s.fill(1, MMIO, WR, 0x1000, 4)
    run_pass(s)
    s.fill(0, PIO, RD, 0xCFC, 4)
    run_pass(s)
    c = s.dev.snapshot()["vms"][0]["counters"]
    assert (c["pio"], c["mmio"], c["pci"], c["cf8"], c["default"]) == (1, 1, 1, 1, 2)
    clients = s.dev.snapshot()["vms"][0]["clients"]
    assert clients[0]["name"] == "acrndm" and clients[0]["pending"] == 0b11
    assert clients[1]["name"] == f"ioeventfd-{s.vmid}" and clients[1]["in_daemon"]


async def test_ioreq_client_names_are_truncated(hv):
    hv, s = setup(hv)
    c = IoreqClient(s.vm, "x" * 40, False)
    assert c.name == "x" * 15


async def test_vm_lost_by_a_second_create_is_still_dispatched_but_cannot_notify(hv):
    hv, s = setup(hv)
    page = Buf()
    assert s.ioctl(abi.ACRN_IOCTL_CREATE_VM, page.addr, creation(page.addr, cpu_affinity=1)) == -errno.EINVAL
    assert s.vm.vmid == abi.ACRN_INVALID_VMID and s.vm.nslots == 1  # the new VM's vCPU count
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            s.fill(0, PIO, WR, 0xCF8, 4, 0x8000_0000)
            s.fill(1, PIO, WR, 0xCF8, 4, 0x8000_0000)  # beyond the new vcpu_num: not scanned
            run_pass(s)
    assert s.state(0) == COMPLETE and s.state(1) == PENDING
    assert hv.notified == [(0xFFFF, 0)] * 3 and hv.returns[-1] < 0
    assert s.vm.counters.notify_failed == 3
    assert [e["log_level"] for e in logs if e["event"] == "hsm.notify_failed"] == ["error", "debug", "debug"]
