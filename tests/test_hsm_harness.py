"""Shared pieces for the HSM unit tests: the test process as the ioctl caller.

The caller's memory is this very process: pages are anonymous mmaps whose
real addresses go into the ioctl arguments, and the HSM reaches them with
RemoteMemory(os.getpid()), exactly as it reaches a real client.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import mmap
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

import trio.testing

from acrn_hsm_emu import abi
from acrn_hsm_emu.hsm import HsmDevice, HsmFile
from acrn_hsm_emu.hypervisor.api import MemoryRegionOp
from acrn_hsm_emu.hypervisor.hypervisor import Hypervisor
from acrn_hsm_emu.hypervisor.scenario import DEFAULT_SCENARIO_DATA, Scenario, parse_scenario
from acrn_hsm_emu.memory import SharedPage
from cdev.device import IoctlCall, RequestContext

PAGE = 4096
EPERM = -errno.EPERM  # what ACRN's -1 looks like to the caller


# Slot vocabulary the HSM tests share.
PIO = abi.ACRN_IOREQ_TYPE_PORTIO
MMIO = abi.ACRN_IOREQ_TYPE_MMIO
PCI = abi.ACRN_IOREQ_TYPE_PCICFG
RD = abi.ACRN_IOREQ_DIR_READ
WR = abi.ACRN_IOREQ_DIR_WRITE
PENDING = abi.ACRN_IOREQ_STATE_PENDING
COMPLETE = abi.ACRN_IOREQ_STATE_COMPLETE
PROCESSING = abi.ACRN_IOREQ_STATE_PROCESSING
FREE = abi.ACRN_IOREQ_STATE_FREE

class HvProxy:
    """The real mock hypervisor, every hypercall recorded, any one forceable.

    ``calls`` holds ``(name, *args)`` per hypercall (``returns`` what each
    gave back). ``force[name]`` replaces a hypercall: an int is returned
    without calling the hypervisor, a callable is called instead of it.
    Everything else is the real :class:`Hypervisor`'s behaviour.
    """

    def __init__(self, real: Hypervisor) -> None:
        self.real = real
        self.calls: list[tuple[Any, ...]] = []
        self.returns: list[int] = []
        self.force: dict[str, int | Callable[..., int]] = {}
        self.upcall_fn: Callable[[], None] | None = None
        self.regions: list[tuple[int, list[MemoryRegionOp]]] = []
        self._lock = threading.Lock()

    # -- test helpers --------------------------------------------------------

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def calls_of(self, name: str) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == name]

    @property
    def notified(self) -> list[tuple[int, int]]:
        return [(c[0], c[1]) for c in self.calls_of("notify_request_finish")]

    @property
    def msis(self) -> list[tuple[int, bytes]]:
        return [(c[0], c[1]) for c in self.calls_of("inject_msi")]

    @property
    def live(self) -> set[int]:
        """vmids of the post-launched VMs the hypervisor holds (not POWERED_OFF)."""
        return {v["vmid"] for v in self.real.snapshot()["vms"]}

    def state(self, vmid: int) -> str:
        return {v["vmid"]: v["state"] for v in self.real.snapshot()["vms"]}[vmid]

    def upcall(self) -> None:
        """Raise the upcall, as a vCPU does after filling a slot."""
        assert self.upcall_fn is not None
        self.upcall_fn()

    def last_return(self, name: str) -> int:
        for c, r in zip(reversed(self.calls), reversed(self.returns), strict=True):
            if c[0] == name:
                return r
        raise AssertionError(f"no {name} call")

    # -- the Hypercalls seam ---------------------------------------------------

    def _call(self, name: str, record: tuple[Any, ...], *args: Any) -> int:
        forced = self.force.get(name)
        if forced is None:
            ret = getattr(self.real, name)(*args)
        elif callable(forced):
            ret = forced(*args)
        else:
            ret = forced
        with self._lock:
            self.calls.append((name, *record))
            self.returns.append(ret)
        return ret

    def set_upcall(self, upcall: Callable[[], None] | None) -> None:
        self.upcall_fn = upcall
        self.real.set_upcall(upcall)

    def create_vm(self, param: bytearray) -> int:
        return self._call("create_vm", (bytes(param),), param)

    def set_ioreq_buffer(self, vmid: int, page: SharedPage) -> int:
        return self._call("set_ioreq_buffer", (vmid, page.base), vmid, page)

    def vm_intr_monitor(self, vmid: int, page: SharedPage) -> int:
        return self._call("vm_intr_monitor", (vmid, page.base), vmid, page)

    def set_memory_regions(self, vmid: int, regions: list[MemoryRegionOp]) -> int:
        self.regions.append((vmid, regions))
        return self._call("set_memory_regions", (vmid, len(regions)), vmid, regions)

    def get_cpu_state(self, cmd: int, out: bytearray) -> int:
        return self._call("get_cpu_state", (cmd,), cmd, out)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if name not in HYPERCALLS:
            return attr
        return lambda *args: self._call(name, args, *args)


HYPERCALLS = {
    "destroy_vm", "start_vm", "pause_vm", "reset_vm", "set_vcpu_regs",
    "notify_request_finish", "inject_msi", "set_irqline", "set_ptdev_intr",
    "reset_ptdev_intr", "assign_pcidev", "deassign_pcidev", "assign_mmiodev",
    "deassign_mmiodev", "create_vdev", "destroy_vdev", "service_vm_offline_cpu",
    "setup_sbuf", "asyncio_assign", "asyncio_deassign", "assign_pio_region", "deassign_pio_region",
}  # fmt: skip


def scenario(pcpus: int = 4, pstate_passthrough: bool = False) -> Scenario:
    """The default scenario, with more pCPUs (vCPUs) or P-state passthrough if asked."""
    data = copy.deepcopy(DEFAULT_SCENARIO_DATA)
    data["platform"]["pcpus"] = pcpus
    data["platform"]["pstate_passthrough"] = pstate_passthrough
    data["vm"][0]["cpu_affinity"] = (1 << pcpus) - 1
    return parse_scenario(data, "<tests>")


def hypervisor(**kw: Any) -> HvProxy:
    return HvProxy(Hypervisor(scenario(**kw)))


def pause_then_destroy(hv: HvProxy) -> Callable[[int], int]:
    """A destroy the hypervisor accepts in any state: pause first, as the DM would."""

    def destroy(vmid: int) -> int:
        hv.real.pause_vm(vmid)
        return hv.real.destroy_vm(vmid)

    return destroy


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

    def __init__(self, dev: HsmDevice, hv: HvProxy, vcpus: int = 4, **fields: int) -> None:
        self.dev = dev
        self.hv = hv
        self.file = dev.open(ctx())
        self.page = Buf()
        self.arg = Buf()
        fields.setdefault("cpu_affinity", (1 << vcpus) - 1)
        param = creation(self.page.addr, **fields)
        self.arg.put(0, param)
        r = ioctl(dev, self.file, abi.ACRN_IOCTL_CREATE_VM, self.arg.addr, param, out_size=48)
        assert result(r) == 0, r
        out = abi.AcrnVmCreation.from_buffer_copy(r[1])
        self.vmid = out.vmid
        self.vcpu_num = out.vcpu_num
        assert self.vcpu_num == bin(fields["cpu_affinity"]).count("1")

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
    await trio.testing.wait_all_tasks_blocked()


def make_device(hv: HvProxy, **kw: Any) -> HsmDevice:
    return HsmDevice(hv, **kw)


def ioeventfd(s: VmSetup, fd: int, addr: int, length: int, flags: int = 0, data: int = 0, reserved: int = 0) -> int:
    """ACRN_IOCTL_IOEVENTFD on the VM's file (struct acrn_ioeventfd)."""
    args = struct.pack("<IIQIIQ", fd & 0xFFFFFFFF, flags, addr, length, reserved, data)
    return s.ioctl(abi.ACRN_IOCTL_IOEVENTFD, 0, args)


def count(fd: int) -> int:
    """An eventfd's counter, read (0 when it was not signalled)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
