"""Shared pieces for the HSM unit tests: the test process as the ioctl caller.

The caller's memory is this very process: pages are anonymous mmaps whose
real addresses go into the ioctl arguments, and the HSM reaches them with
RemoteMemory(os.getpid()), exactly as it reaches a real client.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from acrn_hsm_emu import abi
from acrn_hsm_emu.hsm import HsmDevice, HsmFile
from acrn_hsm_emu.hypervisor.api import MemoryRegionOp
from acrn_hsm_emu.memory import SharedPage
from cdev.device import IoctlCall, RequestContext

PAGE = 4096
EPERM = -errno.EPERM  # what ACRN's -1 looks like to the caller


class FakeHypervisor:
    """A minimal ``Hypercalls``: records every call, answers as configured."""

    def __init__(self, vcpu_num: int = 4) -> None:
        self.vcpu_num = vcpu_num
        self.next_vmid = 1
        self.calls: list[tuple[Any, ...]] = []
        self.ret: dict[str, int] = {}  # hypercall name -> forced return value
        self.create_vmid: int | None = None  # force the vmid create_vm writes
        self.upcall: Callable[[], None] | None = None
        self.pages: dict[int, SharedPage] = {}
        self.monitor: dict[int, SharedPage] = {}
        self.regions: list[tuple[int, list[MemoryRegionOp]]] = []
        self.notified: list[tuple[int, int]] = []
        self.msis: list[tuple[int, bytes]] = []
        self.cpu_state = bytes(range(1, 49))
        self.live: set[int] = set()
        self._lock = threading.Lock()

    def _r(self, name: str, *args: Any) -> int:
        with self._lock:
            self.calls.append((name, *args))
        return self.ret.get(name, 0)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def set_upcall(self, upcall: Callable[[], None] | None) -> None:
        self.upcall = upcall

    def create_vm(self, param: bytearray) -> int:
        ret = self._r("create_vm", bytes(param))
        if ret < 0:
            return ret
        vmid = self.create_vmid if self.create_vmid is not None else self.next_vmid
        self.next_vmid += 1
        struct.pack_into("<H", param, 0, vmid)
        struct.pack_into("<H", param, 4, self.vcpu_num)
        self.live.add(vmid)
        return 0

    def destroy_vm(self, vmid: int) -> int:
        ret = self._r("destroy_vm", vmid)
        if ret == 0:
            self.live.discard(vmid)
        return ret

    def start_vm(self, vmid: int) -> int:
        return self._r("start_vm", vmid)

    def pause_vm(self, vmid: int) -> int:
        return self._r("pause_vm", vmid)

    def reset_vm(self, vmid: int) -> int:
        return self._r("reset_vm", vmid)

    def set_vcpu_regs(self, vmid: int, regs: bytes) -> int:
        return self._r("set_vcpu_regs", vmid, regs)

    def set_ioreq_buffer(self, vmid: int, page: SharedPage) -> int:
        ret = self._r("set_ioreq_buffer", vmid, page.base)
        if ret == 0:
            self.pages[vmid] = page
            for i in range(16):
                page.store_u32(i * 256 + abi.SLOT_PROCESSED, abi.ACRN_IOREQ_STATE_FREE)
        return ret

    def notify_request_finish(self, vmid: int, vcpu: int) -> int:
        self.notified.append((vmid, vcpu))
        return self._r("notify_request_finish", vmid, vcpu)

    def set_memory_regions(self, vmid: int, regions: list[MemoryRegionOp]) -> int:
        ret = self._r("set_memory_regions", vmid, len(regions))
        self.regions.append((vmid, regions))
        return ret

    def inject_msi(self, vmid: int, msi: bytes) -> int:
        self.msis.append((vmid, msi))
        return self._r("inject_msi", vmid, msi)

    def set_irqline(self, vmid: int, value: int) -> int:
        return self._r("set_irqline", vmid, value)

    def vm_intr_monitor(self, vmid: int, page: SharedPage) -> int:
        ret = self._r("vm_intr_monitor", vmid, page.base)
        if ret == 0:
            self.monitor[vmid] = page
        return ret

    def set_ptdev_intr(self, vmid: int, irq: bytes) -> int:
        return self._r("set_ptdev_intr", vmid, irq)

    def reset_ptdev_intr(self, vmid: int, irq: bytes) -> int:
        return self._r("reset_ptdev_intr", vmid, irq)

    def assign_pcidev(self, vmid: int, dev: bytes) -> int:
        return self._r("assign_pcidev", vmid, dev)

    def deassign_pcidev(self, vmid: int, dev: bytes) -> int:
        return self._r("deassign_pcidev", vmid, dev)

    def assign_mmiodev(self, vmid: int, dev: bytes) -> int:
        return self._r("assign_mmiodev", vmid, dev)

    def deassign_mmiodev(self, vmid: int, dev: bytes) -> int:
        return self._r("deassign_mmiodev", vmid, dev)

    def create_vdev(self, vmid: int, dev: bytes) -> int:
        return self._r("create_vdev", vmid, dev)

    def destroy_vdev(self, vmid: int, dev: bytes) -> int:
        return self._r("destroy_vdev", vmid, dev)

    def get_cpu_state(self, cmd: int, out: bytearray) -> int:
        ret = self._r("get_cpu_state", cmd)
        if ret == 0:
            out[:] = self.cpu_state
        return ret

    def service_vm_offline_cpu(self, lapic_id: int) -> int:
        return self._r("service_vm_offline_cpu", lapic_id)

    def snapshot(self) -> dict[str, object]:
        return {"vms": [{"vmid": v, "state": "created"} for v in sorted(self.live)]}

    def shutdown(self) -> None:
        pass


class Buf:
    """An anonymous mapping of this process, reachable by address."""

    def __init__(self, size: int = PAGE, prot: int = mmap.PROT_READ | mmap.PROT_WRITE) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._c = (ctypes.c_char * size).from_buffer(self.map)
        self.addr = ctypes.addressof(self._c)
        if prot != mmap.PROT_READ | mmap.PROT_WRITE:
            self.protect(prot)

    def protect(self, prot: int, off: int = 0, n: int | None = None) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(self.addr + off, self.size - off if n is None else n, prot) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")

    def unmap(self, off: int = 0, n: int | None = None) -> None:
        """Really unmap (some of) the pages: the HSM then faults on them.

        The Python mmap object still believes it owns them, so nothing may
        touch this Buf's bytes afterwards.
        """
        libc = ctypes.CDLL(None, use_errno=True)
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        if libc.munmap(self.addr + off, self.size - off if n is None else n) != 0:
            raise OSError(ctypes.get_errno(), "munmap")

    def u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.map, off)[0]

    def u64(self, off: int) -> int:
        return struct.unpack_from("<Q", self.map, off)[0]

    def put(self, off: int, data: bytes) -> None:
        self.map[off : off + len(data)] = data

    def put_u32(self, off: int, value: int) -> None:
        struct.pack_into("<I", self.map, off, value)

    def bytes(self, off: int, n: int) -> bytes:
        return bytes(self.map[off : off + n])


def ctx() -> RequestContext:
    return RequestContext(uid=0, gid=0, pid=os.getpid(), tid=threading.get_native_id())


def call(cmd: int, arg: int = 0, data: bytes = b"", out_size: int | None = None, compat: bool = False) -> IoctlCall:
    """An ioctl as cdev hands it over in FUSE restricted mode."""
    size = abi.ioc_size(cmd)
    direction = abi.ioc_dir(cmd)
    if out_size is None:
        out_size = size if direction & abi.IOC_READ else 0
    return IoctlCall(cmd=cmd, arg=arg, in_data=data, out_size=out_size, ctx=ctx(), compat=compat)


def ioctl(dev: HsmDevice, f: HsmFile, cmd: int, arg: int = 0, data: bytes = b"", **kw: Any) -> Any:
    """Issue one ioctl; a waiting one comes back as its awaitable."""
    return dev.ioctl(f, call(cmd, arg, data, **kw))


def result(r: Any) -> int:
    """The ioctl's return value, whether or not it also copies data out."""
    if isinstance(r, tuple):
        return r[0]
    assert isinstance(r, int), f"expected an immediate answer, got {r!r}"
    return r


def creation(ioreq_buf: int, **fields: int) -> bytes:
    c = abi.AcrnVmCreation()
    c.ioreq_buf = ioreq_buf
    for k, v in fields.items():
        setattr(c, k, v)
    return bytes(c)


class VmSetup:
    """One open file with a created VM, its request page and its creation struct."""

    def __init__(self, dev: HsmDevice, hv: FakeHypervisor, **fields: int) -> None:
        self.dev = dev
        self.hv = hv
        self.file = dev.open(ctx())
        self.page = Buf()
        self.arg = Buf()
        param = creation(self.page.addr, **fields)
        self.arg.put(0, param)
        r = ioctl(dev, self.file, abi.ACRN_IOCTL_CREATE_VM, self.arg.addr, param, out_size=48)
        assert result(r) == 0, r
        out = abi.AcrnVmCreation.from_buffer_copy(r[1])
        self.vmid = out.vmid
        self.vcpu_num = out.vcpu_num

    @property
    def vm(self) -> Any:
        return self.file.vm

    def ioctl(self, cmd: int, arg: int = 0, data: bytes = b"", **kw: Any) -> Any:
        return ioctl(self.dev, self.file, cmd, arg, data, **kw)

    def create_client(self) -> None:
        assert self.ioctl(abi.ACRN_IOCTL_CREATE_IOREQ_CLIENT) == 0

    def notify(self, vcpu: int, reserved: int = 0, vmid: int = 0) -> int:
        return self.ioctl(abi.ACRN_IOCTL_NOTIFY_REQUEST_FINISH, 0, struct.pack("<HHI", vmid, reserved, vcpu))

    # -- slots in the request page --------------------------------------------

    def slot_off(self, vcpu: int) -> int:
        return vcpu * 256

    def fill(
        self, vcpu: int, type: int, direction: int, address: int, size: int, value: int = 0,
        polling: int = 0, state: int = abi.ACRN_IOREQ_STATE_PENDING, junk: bytes | None = None,
    ) -> None:  # fmt: skip
        """What the hypervisor does: fields, then PENDING."""
        off = self.slot_off(vcpu)
        self.page.put_u32(off + abi.SLOT_TYPE, type)
        self.page.put_u32(off + abi.SLOT_COMPLETION_POLLING, polling)
        if junk is not None:
            self.page.put(off + abi.SLOT_REQS, junk)
        self.page.put_u32(off + abi.SLOT_DIRECTION, direction)
        struct.pack_into("<QQQ", self.page.map, off + abi.SLOT_ADDRESS, address, size, value)
        self.page.put_u32(off + abi.SLOT_PROCESSED, state)

    def state(self, vcpu: int) -> int:
        return self.page.u32(self.slot_off(vcpu) + abi.SLOT_PROCESSED)

    def kernel_handled(self, vcpu: int) -> int:
        return self.page.u32(self.slot_off(vcpu) + abi.SLOT_KERNEL_HANDLED)

    def slot_u32(self, vcpu: int, off: int) -> int:
        return self.page.u32(self.slot_off(vcpu) + off)

    def slot_u64(self, vcpu: int, off: int) -> int:
        return self.page.u64(self.slot_off(vcpu) + off)


async def settle() -> None:
    """Let every task run until all are blocked (irqfd watchers, waiters)."""
    import trio.testing

    await trio.testing.wait_all_tasks_blocked()


def make_device(hv: FakeHypervisor, **kw: Any) -> HsmDevice:
    return HsmDevice(hv, **kw)


Waiting = Awaitable[Any]
