"""The extension ABI inside the HSM: binding, range clients, hand-over, completion, orphans.

This test process is every caller (its memory is reached with RemoteMemory,
as a real client's is); requests are written into the owner's page as the
hypervisor would and a dispatcher pass is run as an upcall runs it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading

import pytest
import structlog
import trio
import trio.testing
from test_hsm_harness import (
    COMPLETE,
    FREE,
    MMIO,
    PCI,
    PIO,
    PROCESSING,
    RD,
    WR,
    Buf,
    HvProxy,
    VmSetup,
    call,
    make_device,
    result,
    settle,
)

from acrn_hsm_emu import abi
from acrn_hsm_emu.client import extension as ext
from acrn_hsm_emu.hsm import HsmDevice, HsmFile
from cdev.device import Deferred, IoctlCall, RequestContext


def ctx(uid: int = 0) -> RequestContext:
    return RequestContext(uid=uid, gid=uid, pid=os.getpid(), tid=threading.get_native_id())


def xcall(f: HsmFile, dev: HsmDevice, cmd: int, data: bytes = b"", uid: int = 0, arg: int = 0):
    size = abi.ioc_size(cmd)
    out = size if abi.ioc_dir(cmd) & abi.IOC_READ else 0
    return dev.ioctl(f, IoctlCall(cmd=cmd, arg=arg, in_data=data, out_size=out, ctx=ctx(uid)))


class Bound:
    """A second open file bound to the VM of ``s``, with a range client and its page."""

    def __init__(self, s: VmSetup, name: str = "dev", uid: int = 0, client: bool = True) -> None:
        self.s = s
        self.dev = s.dev
        self.file = s.dev.open(ctx(uid))
        self.page = Buf()
        self.uid = uid
        r = self.ioctl(ext.ACRN_EMU_IOCTL_BIND_VM, bytes(ext.AcrnEmuBind(vmid=s.vmid)))
        assert result(r) == 0, r
        self.bind = ext.AcrnEmuBind.from_buffer_copy(r[1])
        if client:
            assert self.create(name) == 0

    def ioctl(self, cmd: int, data: bytes = b"", arg: int = 0):
        return xcall(self.file, self.dev, cmd, data, self.uid, arg)

    def create(self, name: str | bytes, buf: int | None = None) -> int:
        raw = name.encode() if isinstance(name, str) else name
        rc = ext.AcrnEmuRangeClient(ioreq_buf=self.page.addr if buf is None else buf)
        ctypes.memmove(ctypes.addressof(rc) + ext.AcrnEmuRangeClient.name.offset, raw, min(len(raw), 16))
        return self.ioctl(ext.ACRN_EMU_IOCTL_CREATE_RANGE_CLIENT, bytes(rc))

    def add(self, typ: int, start: int, end: int, reserved: int = 0) -> int:
        r = ext.AcrnEmuRange(type=typ, reserved=reserved, start=start, end=end)
        return self.ioctl(ext.ACRN_EMU_IOCTL_ADD_RANGE, bytes(r))

    def delete(self, typ: int, start: int, end: int) -> int:
        r = ext.AcrnEmuRange(type=typ, start=start, end=end)
        return self.ioctl(ext.ACRN_EMU_IOCTL_DEL_RANGE, bytes(r))

    def notify(self, vcpu: int, reserved: int = 0) -> int:
        return self.ioctl(abi.ACRN_IOCTL_NOTIFY_REQUEST_FINISH, struct.pack("<HHI", 0, reserved, vcpu))

    def attach(self):
        return self.ioctl(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT)

    def state(self, vcpu: int) -> int:
        return self.page.u32(vcpu * 256 + abi.SLOT_PROCESSED)

    def close(self) -> None:
        self.dev.release(self.file)

    @property
    def client(self):
        return self.file.binding.live_client


def setup(hv: HvProxy, vcpus: int = 4, **kw: object) -> VmSetup:
    s = VmSetup(make_device(hv, **kw), hv, vcpus=vcpus)
    s.create_client()
    return s


def run_pass(s: VmSetup) -> None:
    s.dev.dispatcher.run_pass()


# -- the extension ioctls ---------------------------------------------------------


async def test_version_on_any_file_and_the_gates(hv):
    s = setup(hv)
    f = s.dev.open(ctx())
    r = xcall(f, s.dev, ext.ACRN_EMU_IOCTL_VERSION)
    v = ext.AcrnEmuVersion.from_buffer_copy(r[1])
    assert r[0] == 0 and (v.major, v.minor, v.features, v.reserved) == (1, ext.ACRN_EMU_ABI_MINOR, ext.FEATURES, 0)
    assert xcall(f, s.dev, abi.ACRN_IOCTL_START_VM) == -errno.EINVAL  # the driver's gate holds
    assert xcall(f, s.dev, abi.iow(ext.ACRN_EMU_IOCTL_TYPE, 0x7F, 8), bytes(8)) == -errno.ENOTTY
    compat = IoctlCall(ext.ACRN_EMU_IOCTL_VERSION, 0, b"", 16, ctx(), compat=True)
    assert s.dev.ioctl(f, compat) == -errno.ENOTTY
    for cmd in (ext.ACRN_EMU_IOCTL_CREATE_RANGE_CLIENT, ext.ACRN_EMU_IOCTL_ADD_RANGE,
                ext.ACRN_EMU_IOCTL_DEL_RANGE, ext.ACRN_EMU_IOCTL_DESTROY_RANGE_CLIENT):  # fmt: skip
        assert xcall(f, s.dev, cmd, bytes(abi.ioc_size(cmd))) == -errno.EINVAL  # not bound
    # an owner's file is not bound either, and cannot bind
    assert s.ioctl(ext.ACRN_EMU_IOCTL_ADD_RANGE, 0, bytes(24)) == -errno.EINVAL
    assert s.ioctl(ext.ACRN_EMU_IOCTL_BIND_VM, 0, bytes(ext.AcrnEmuBind(vmid=s.vmid))) == -errno.EBUSY


async def test_bind_checks(hv):
    s = setup(hv, vcpus=2)
    f = s.dev.open(ctx())
    bind = ext.ACRN_EMU_IOCTL_BIND_VM
    assert xcall(f, s.dev, bind, bytes(ext.AcrnEmuBind(vmid=s.vmid + 1))) == -errno.ENOENT
    assert xcall(f, s.dev, bind, bytes(ext.AcrnEmuBind(vmid=s.vmid, flags=1))) == -errno.EINVAL
    assert xcall(f, s.dev, bind, bytes(ext.AcrnEmuBind(vmid=s.vmid, reserved=1))) == -errno.EINVAL
    assert xcall(f, s.dev, bind, b"\0" * 8) == -errno.EFAULT
    r = xcall(f, s.dev, bind, bytes(ext.AcrnEmuBind(vmid=s.vmid)))
    out = ext.AcrnEmuBind.from_buffer_copy(r[1])
    assert (out.vmid, out.vcpu_num, out.owner_uid) == (s.vmid, 2, 0)
    assert xcall(f, s.dev, bind, bytes(ext.AcrnEmuBind(vmid=s.vmid))) == -errno.EBUSY
    assert xcall(f, s.dev, abi.ACRN_IOCTL_CREATE_VM, bytes(48)) == -errno.EBUSY
    for cmd in (abi.ACRN_IOCTL_START_VM, abi.ACRN_IOCTL_PAUSE_VM, abi.ACRN_IOCTL_DESTROY_VM,
                abi.ACRN_IOCTL_CREATE_IOREQ_CLIENT, abi.ACRN_IOCTL_CLEAR_VM_IOREQ):  # fmt: skip
        assert xcall(f, s.dev, cmd) == -errno.EPERM
    assert xcall(f, s.dev, abi.io(abi.ACRN_IOCTL_TYPE, 0x7E)) == -errno.ENOTTY
    assert s.vm.bindings and s.vm.snapshot()["bound_files"] == [{"pid": os.getpid(), "uid": 0, "client": None}]


@pytest.mark.parametrize(
    ("policy", "uid", "owner_uid", "ok"),
    [
        ("owner", 1000, 1000, True),
        ("owner", 1001, 1000, False),
        ("owner", 0, 1000, True),  # root may always
        ("root", 1000, 1000, False),
        ("root", 0, 1000, True),
        ("any", 1234, 1000, True),
    ],
)
async def test_bind_policy(hv, policy, uid, owner_uid, ok):
    s = setup(hv, bind_policy=policy)
    s.vm.owner_uid = owner_uid
    f = s.dev.open(ctx(uid))
    with structlog.testing.capture_logs() as logs:
        r = xcall(f, s.dev, ext.ACRN_EMU_IOCTL_BIND_VM, bytes(ext.AcrnEmuBind(vmid=s.vmid)), uid)
    assert result(r) == (0 if ok else -errno.EPERM)
    if not ok:
        assert logs[0]["event"] == "hsm.bind_refused" and logs[0]["uid"] == uid


async def test_bind_policy_predicate_and_the_creators_uid(hv):
    seen = []
    s = setup(hv, bind_policy=lambda c, vm: seen.append((c.uid, vm.vmid)) or c.uid == 7)
    f7, f8 = s.dev.open(ctx(7)), s.dev.open(ctx(8))
    bind = bytes(ext.AcrnEmuBind(vmid=s.vmid))
    assert result(xcall(f7, s.dev, ext.ACRN_EMU_IOCTL_BIND_VM, bind, 7)) == 0
    assert xcall(f8, s.dev, ext.ACRN_EMU_IOCTL_BIND_VM, bind, 8) == -errno.EPERM
    assert seen == [(7, s.vmid), (8, s.vmid)]
    # CREATE_VM records the caller's uid: the "owner" rule compares with it
    dev = make_device(hv)
    g = dev.open(ctx(1000))
    page, arg = Buf(), Buf()
    from test_hsm_harness import creation

    param = creation(page.addr, cpu_affinity=1)
    arg.put(0, param)
    r = xcall(g, dev, abi.ACRN_IOCTL_CREATE_VM, param, 1000, arg.addr)
    assert result(r) == 0 and g.vm.owner_uid == 1000


async def test_create_range_client_checks(hv):
    s = setup(hv)
    b = Bound(s, client=False)
    assert b.create("") == -errno.EINVAL
    assert b.create(b"x" * 16) == -errno.EINVAL  # no NUL within 16 bytes
    assert b.create(b"tab\there") == -errno.EINVAL
    assert b.create("dev", buf=0x1000) == -errno.EFAULT  # not mapped here
    ro = Buf()
    ro.protect(1)  # PROT_READ
    assert b.create("dev", buf=ro.addr) == -errno.EFAULT
    rc = ext.AcrnEmuRangeClient(name=b"dev", ioreq_buf=b.page.addr, flags=1)
    assert b.ioctl(ext.ACRN_EMU_IOCTL_CREATE_RANGE_CLIENT, bytes(rc)) == -errno.EINVAL
    b.page.put_u32(5 * 256 + abi.SLOT_PROCESSED, 0)
    assert b.create("dev", buf=b.page.addr + 0x123) == 0  # the page containing it
    assert [b.state(i) for i in range(16)] == [FREE] * 16
    assert b.create("dev2") == -errno.EEXIST  # one per file
    other = Bound(s, client=False)
    assert other.create("dev") == -errno.EEXIST  # names are unique within the VM
    assert other.create("dev2") == 0
    snap = [c for c in s.vm.snapshot()["clients"] if "remote" in c]
    assert [c["name"] for c in snap] == ["dev", "dev2"]
    assert snap[0]["remote"] == {
        "pid": os.getpid(), "uid": 0, "request_page": b.page.addr, "served": 0, "orphaned": 0
    }


async def test_add_and_del_range_checks(hv):
    s = setup(hv)
    a, b = Bound(s, "a"), Bound(s, "b")
    bad = [
        (PIO, 0x10, 0x0F, 0),  # end < start
        (3, 0, 1, 0),  # unknown type
        (PIO, 0, 1, 1),  # reserved
        (PIO, 0xFFF0, 0x10000, 0),  # past the port space
        (PCI, 0, 0x10000, 0),  # past bus 255
    ]
    for row in bad:
        assert a.add(*row) == -errno.EINVAL, row
    assert a.add(PIO, 0x3F8, 0x3FF) == 0
    assert a.add(PIO, 0x3F8, 0x3FF) == 0  # a client may overlap itself
    assert a.add(MMIO, 0xFFFF_FFFF_FFFF_F000, 0xFFFF_FFFF_FFFF_FFFF) == 0
    assert a.add(PCI, ext.pci_bdf(0, 3, 0), ext.pci_bdf(0, 3, 7)) == 0
    with structlog.testing.capture_logs() as logs:
        assert b.add(PIO, 0x3FF, 0x400) == -errno.EBUSY
        assert b.add(PCI, ext.pci_bdf(0, 3, 7), ext.pci_bdf(0, 4, 0)) == -errno.EBUSY
        assert b.add(MMIO, 0, 0xFFFF_FFFF_FFFF_FFFF) == -errno.EBUSY
    assert [(e["event"], e["owner"], e["owner_pid"]) for e in logs] == [("hsm.range_busy", "a", os.getpid())] * 3
    assert logs[1]["owner_range"] == "pci 00:03.0-00:03.7" and logs[1]["range"] == "pci 00:03.7-00:04.0"
    assert b.add(PIO, 0x400, 0x40F) == 0 and b.add(MMIO, 0x3F8, 0x3FF) == 0
    assert a.delete(PIO, 0x3F8, 0x3FF) == 0
    assert b.add(PIO, 0x3F8, 0x3FF) == -errno.EBUSY  # a still has the duplicate
    assert a.delete(PIO, 0x3F8, 0x3FF) == 0
    assert a.delete(PIO, 0x3F8, 0x3FF) == -errno.ENOENT
    assert b.add(PIO, 0x3F8, 0x3FF) == 0
    for k in range(ext.ACRN_EMU_MAX_RANGES - len(b.client.ranges)):
        assert b.add(PIO, 0x1000 + k, 0x1000 + k) == 0
    assert b.add(PIO, 0x2000, 0x2000) == -errno.ENOSPC
    c = Bound(s, client=False)
    assert c.add(PIO, 0x5000, 0x5000) == -errno.ENODEV  # bound but no client yet


# -- hand-over and completion ---------------------------------------------------------


async def test_matched_request_is_copied_to_the_clients_page_and_completed_from_it(hv):
    s = setup(hv, vcpus=4)
    b = Bound(s)
    assert b.add(PIO, 0x3F8, 0x3FF) == 0
    s.fill(2, PIO, RD, 0x3FD, 1, value=0xAB)
    run_pass(s)
    # the ACRN slot: PROCESSING, kernel_handled = 1 (ACRN userspace skips it)
    assert s.state(2) == PROCESSING and s.kernel_handled(2) == 1
    assert s.vm.default_client.bitmap == 0 and b.client.bitmap == 0b100
    # the client's slot: the request, PROCESSING, kernel_handled = 0
    off = 2 * 256
    assert b.state(2) == PROCESSING and b.page.u32(off + abi.SLOT_KERNEL_HANDLED) == 0
    assert b.page.u32(off + abi.SLOT_TYPE) == PIO and b.page.u32(off + abi.SLOT_DIRECTION) == RD
    assert b.page.u64(off + abi.SLOT_ADDRESS) == 0x3FD and b.page.u64(off + abi.SLOT_SIZE) == 1
    assert s.vm.counters.remote == 1 and s.vm.counters.range == 1 and s.vm.counters.default == 0
    assert result(b.attach()) == 0  # level-triggered: returns at once
    b.page.put_u32(off + abi.SLOT_VALUE, 0x60)
    assert b.notify(1) == -errno.EINVAL  # not a request this client holds
    assert b.notify(2, reserved=1) == -errno.EINVAL
    assert b.notify(2) == 0
    assert s.state(2) == COMPLETE and s.slot_u32(2, abi.SLOT_VALUE) == 0x60
    assert b.state(2) == FREE and b.client.bitmap == 0
    assert hv.notified == [(s.vmid, 2)]
    assert b.notify(2) == -errno.EINVAL  # completed once only
    assert b.client.served == 1


async def test_mmio_value_is_64_bit_and_a_write_leaves_the_slot_value_alone(hv):
    s = setup(hv)
    b = Bound(s)
    b.add(MMIO, 0xC000_0000, 0xC000_FFFF)
    s.fill(0, MMIO, RD, 0xC000_0008, 8, value=0)
    s.fill(1, MMIO, WR, 0xC000_0010, 4, value=0x55)
    run_pass(s)
    assert b.client.bitmap == 0b11 and b.page.u64(256 + abi.SLOT_VALUE) == 0x55
    b.page.put(abi.SLOT_VALUE, struct.pack("<Q", 0x1122334455667788))
    b.page.put(256 + abi.SLOT_VALUE, struct.pack("<Q", 0xDEAD))  # a write's value is not copied
    assert b.notify(0) == 0 and b.notify(1) == 0
    assert s.slot_u64(0, abi.SLOT_VALUE) == 0x1122334455667788
    assert s.slot_u64(1, abi.SLOT_VALUE) == 0x55


async def test_pci_ranges_take_folded_config_accesses(hv):
    s = setup(hv)
    b = Bound(s)
    b.add(PCI, ext.pci_bdf(0, 3, 0), ext.pci_bdf(0, 3, 7))
    s.vm.pci_conf_addr = 0x8000_0000 | 3 << 11 | 2 << 8 | 0x10  # 00:03.2 reg 0x10
    s.fill(0, PIO, RD, 0xCFE, 2)
    s.vm.default_client.bitmap = 0
    run_pass(s)
    assert b.client.bitmap == 1 and s.kernel_handled(0) == 1
    assert b.page.u32(abi.SLOT_TYPE) == PCI
    assert struct.unpack_from("<IIII", b.page.map, abi.SLOT_PCI_BUS) == (0, 3, 2, 0x12)
    s.vm.pci_conf_addr = 0x8000_0000 | 4 << 11 | 0x10  # another device: the default client
    s.fill(1, PIO, RD, 0xCFC, 4)
    run_pass(s)
    assert s.vm.default_client.bitmap == 0b10 and s.kernel_handled(1) == 0


async def test_only_whole_accesses_inside_a_range_match_and_ioeventfds_come_first(hv):
    s = setup(hv)
    b = Bound(s)
    b.add(PIO, 0x100, 0x103)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        args = struct.pack("<IIQIIQ", efd, abi.ACRN_IOEVENTFD_FLAG_PIO, 0x102, 2, 0, 0)
        assert s.ioctl(abi.ACRN_IOCTL_IOEVENTFD, 0, args) == 0
        s.fill(0, PIO, WR, 0x102, 2, 1)  # the ioeventfd's: signalled, completed in the daemon
        s.fill(1, PIO, WR, 0x100, 4, 1)  # wholly inside the range client's range
        s.fill(2, PIO, WR, 0x102, 4, 1)  # sticks out: default client
        run_pass(s)
        assert os.eventfd_read(efd) == 1 and s.state(0) == COMPLETE
        assert b.client.bitmap == 0b10 and s.vm.default_client.bitmap == 0b100
    finally:
        os.close(efd)


async def test_a_closed_client_completes_what_it_held_with_all_ones(hv):
    s = setup(hv, vcpus=3)
    b = Bound(s)
    b.add(PIO, 0x3F8, 0x3FF)
    b.add(MMIO, 0xD000_0000, 0xD000_0FFF)
    s.fill(0, PIO, RD, 0x3F8, 2, value=0x1234)
    s.fill(1, MMIO, RD, 0xD000_0000, 8, value=0)
    s.fill(2, PIO, WR, 0x3F9, 1, value=0x42)
    run_pass(s)
    assert b.client.bitmap == 0b111
    with structlog.testing.capture_logs() as logs:
        b.close()
    assert [s.state(i) for i in range(3)] == [COMPLETE] * 3
    assert s.slot_u32(0, abi.SLOT_VALUE) == 0xFFFFFFFF
    assert s.slot_u64(1, abi.SLOT_VALUE) == 0xFFFF_FFFF_FFFF_FFFF
    assert s.slot_u32(2, abi.SLOT_VALUE) == 0x42  # a write keeps its value
    assert sorted(hv.notified) == [(s.vmid, 0), (s.vmid, 1), (s.vmid, 2)]
    gone = [e for e in logs if e["event"] == "hsm.range_client_gone"]
    assert gone and gone[0]["client"] == "dev" and gone[0]["reason"] == "file closed"
    assert [c["vcpu"] for c in gone[0]["completed"]] == [0, 1, 2]
    assert s.vm.counters.orphaned == 3 and s.vm.bindings == []
    # its ranges went away: the next request is the default client's
    s.fill(0, PIO, RD, 0x3F8, 2)
    run_pass(s)
    assert s.vm.default_client.bitmap == 1


async def test_a_client_whose_page_faults_is_dropped_and_the_request_answered(hv):
    s = setup(hv)
    b = Bound(s)
    b.add(PIO, 0x60, 0x64)
    waiter = b.attach()
    b.page.unmap()
    async with trio.open_nursery() as n:
        got = []

        async def wait() -> None:
            got.append(await waiter)

        n.start_soon(wait)
        await settle()
        with structlog.testing.capture_logs() as logs:
            s.fill(1, PIO, RD, 0x60, 1)
            run_pass(s)
        await settle()
    assert got == [-errno.ENODEV]
    assert s.state(1) == COMPLETE and s.slot_u32(1, abi.SLOT_VALUE) == 0xFFFFFFFF
    assert [e["event"] for e in logs][:2] == ["hsm.range_client_fault", "hsm.range_client_destroyed"]
    assert b.file.binding.live_client is None and s.vm.counters.orphaned == 1


async def test_destroy_by_its_file_wakes_attach_and_keeps_the_binding(hv):
    s = setup(hv)
    b = Bound(s)
    waiter = b.attach()
    async with trio.open_nursery() as n:
        got = []

        async def wait() -> None:
            got.append(await waiter)

        n.start_soon(wait)
        await settle()
        assert b.client.waiters == 1
        assert b.ioctl(abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT) == 0
        await settle()
    assert got == [-errno.ENODEV]
    assert b.attach() == -errno.ENODEV and b.notify(0) == -errno.ENODEV
    assert b.ioctl(ext.ACRN_EMU_IOCTL_DESTROY_RANGE_CLIENT) == 0
    assert b.create("again") == 0  # the file is still bound


async def test_attach_on_a_bound_file_answers_0_when_interrupted(hv):
    s = setup(hv)
    b = Bound(s)
    c = call(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT)
    waiter = s.dev.ioctl(b.file, c)
    assert isinstance(waiter, Deferred)
    waiter.cancel()  # what cdev does on an interrupt: the device forgets the waiter
    assert s.dev.interrupted(b.file, c) == 0


async def test_owner_destroying_the_vm_ends_the_binding(hv):
    hv.force["destroy_vm"] = lambda vmid: (hv.real.pause_vm(vmid), hv.real.destroy_vm(vmid))[1]
    s = setup(hv)
    b = Bound(s)
    b.add(PIO, 0x70, 0x71)
    s.fill(0, PIO, RD, 0x70, 1)
    run_pass(s)
    waiter = b.attach()
    assert result(waiter) == 0
    notified = len(hv.notified)
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == 0
    assert len(hv.notified) == notified  # nothing completed into a destroyed VM
    assert b.attach() == -errno.ENODEV and b.add(PIO, 0, 1) == -errno.ENODEV
    assert b.ioctl(abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT) == 0
    # a new VM on the owner's file is another VM: the binding stays stale, rebinding works
    s2 = VmSetup(s.dev, hv, vcpus=1)
    r = b.ioctl(ext.ACRN_EMU_IOCTL_BIND_VM, bytes(ext.AcrnEmuBind(vmid=s2.vmid)))
    assert result(r) == 0
    b.close()


async def test_clear_vm_ioreq_waits_for_remote_clients(hv):
    s = setup(hv, clear_round_s=0.001)
    b = Bound(s)
    b.add(PIO, 0x70, 0x71)
    s.fill(0, PIO, RD, 0x70, 1)
    run_pass(s)
    pending = s.ioctl(abi.ACRN_IOCTL_CLEAR_VM_IOREQ)
    assert not isinstance(pending, int)  # a range client holds a request: CLEAR waits
    async with trio.open_nursery() as n:
        got = []

        async def clear() -> None:
            got.append(await pending)

        n.start_soon(clear)
        await trio.testing.wait_all_tasks_blocked()
        assert b.notify(0) == 0
    assert got == [0] and s.state(0) == COMPLETE


async def test_forward_mode_lets_unmatched_ioeventfd_accesses_through(hv):
    s = setup(hv, ioeventfd_mismatch="forward")
    b = Bound(s)
    b.add(PIO, 0x200, 0x20F)  # overlaps the ioeventfd below: allowed, the ioeventfd comes first
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        args = struct.pack("<IIQIIQ", efd, abi.ACRN_IOEVENTFD_FLAG_PIO | abi.ACRN_IOEVENTFD_FLAG_DATAMATCH,
                           0x1000, 2, 0, 5)  # fmt: skip
        assert s.ioctl(abi.ACRN_IOCTL_IOEVENTFD, 0, args) == 0
        args = struct.pack("<IIQIIQ", efd, abi.ACRN_IOEVENTFD_FLAG_PIO, 0x200, 4, 0, 0)
        assert s.ioctl(abi.ACRN_IOCTL_IOEVENTFD, 0, args) == 0
        s.fill(0, PIO, WR, 0x1000, 2, 5)  # matches: signalled, completed
        s.fill(1, PIO, WR, 0x1000, 2, 6)  # another value: on to the default client
        s.fill(2, PIO, RD, 0x1000, 2)  # reads too
        s.fill(3, PIO, RD, 0x201, 1)  # the ioeventfd lets it through: the range client's
        run_pass(s)
        assert os.eventfd_read(efd) == 1 and s.state(0) == COMPLETE
        assert s.vm.default_client.bitmap == 0b0110 and b.client.bitmap == 0b1000
        assert s.vm.counters.default == 2 and s.vm.counters.remote == 1
    finally:
        os.close(efd)
    with pytest.raises(ValueError):
        make_device(hv, ioeventfd_mismatch="maybe")


# -- the hypercall record ----------------------------------------------------------------


async def test_set_irqline_and_inject_msi_are_recorded(hv):
    s = setup(hv)
    assert s.ioctl(abi.ACRN_IOCTL_SET_IRQLINE, 2 << 32 | 4) == 0  # by value: CUSE only
    assert s.ioctl(abi.ACRN_IOCTL_SET_IRQLINE, 0 << 32 | 99) == -errno.EPERM  # GSI >= 48
    msi = bytes(abi.AcrnMsiEntry(msi_addr=0xFEE0_1000, msi_data=0x4041))
    assert s.ioctl(abi.ACRN_IOCTL_INJECT_MSI, 0, msi) == 0
    rec = s.vm.snapshot()["hypercalls"]
    assert rec["counts"] == {
        "set_irqline": {"calls": 2, "failed": 1, "last_ret": -1},
        "inject_msi": {"calls": 1, "failed": 0, "last_ret": 0},
    }
    assert rec["recent"][0] == {"seq": 1, "call": "set_irqline", "ret": 0, "source": "ioctl", "gsi": 4, "op": 2}
    assert rec["recent"][2]["vector"] == 0x41
    # a bound file may raise interrupts too, recorded on the VM
    b = Bound(s)
    assert b.ioctl(abi.ACRN_IOCTL_INJECT_MSI, msi) == 0
    assert s.vm.hypercalls.counts["inject_msi"]["calls"] == 2
    irq = s.hv.real.snapshot()["vms"][0]["irqlines"]
    assert irq["4"]["raising_pulse"] == 1


async def test_the_record_is_bounded_and_reset_by_a_new_vm(hv):
    s = setup(hv)
    for _ in range(100):
        s.ioctl(abi.ACRN_IOCTL_INJECT_MSI, 0, bytes(abi.AcrnMsiEntry(msi_addr=0xFEE0_0000, msi_data=1)))
    rec = s.vm.hypercalls.snapshot()
    assert rec["counts"]["inject_msi"]["calls"] == 100 and len(rec["recent"]) == 32
    assert rec["recent"][-1]["seq"] == 100
    await settle()
