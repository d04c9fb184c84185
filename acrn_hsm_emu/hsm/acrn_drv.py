"""The HSM's data, as ``acrn_drv.h`` declares the driver's: the VM of an open
file (struct acrn_vm), its ioreq clients, the entries of its ioeventfds,
irqfds and RAM mappings, its request counts, the files bound to it.

Nothing here imports what acts on it (vm.py, ioreq.py, ioeventfd.py,
irqfd.py, mm.py, ranges.py, express.py, acrn_kernel.py): they import this.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import trio

from acrn_hsm_emu import abi
from acrn_hsm_emu._native import ffi, lib
from acrn_hsm_emu.hsm.hypercall_log import HypercallLog
from acrn_hsm_emu.hypervisor.api import Hypercalls
from acrn_hsm_emu.memory import Data, MemoryFault, RemoteMemory, SharedPage
from cdev.device import Deferred, IoctlCall, IoctlResult, RequestContext

INVALID_VMID = abi.ACRN_INVALID_VMID
SLOTS = abi.ACRN_IO_REQUEST_MAX
SLOT_BYTES = abi.IOREQ_SLOT_SIZE
PENDING = abi.ACRN_IOREQ_STATE_PENDING
COMPLETE = abi.ACRN_IOREQ_STATE_COMPLETE
PROCESSING = abi.ACRN_IOREQ_STATE_PROCESSING
PORTIO = abi.ACRN_IOREQ_TYPE_PORTIO
MMIO = abi.ACRN_IOREQ_TYPE_MMIO
PCICFG = abi.ACRN_IOREQ_TYPE_PCICFG
DIR_READ = abi.ACRN_IOREQ_DIR_READ
DIR_WRITE = abi.ACRN_IOREQ_DIR_WRITE
FREE = abi.ACRN_IOREQ_STATE_FREE
CLIENT_NAME_MAX = 15  # ACRN_NAME_LEN - 1
RANGE_KINDS = {PORTIO: "pio", MMIO: "mmio", PCICFG: "pci"}
HEAD_LEN = abi.SLOT_PCI_REG + 4  # a slot's head, read up to PCICFG reg (a fold is written back whole)

# A slot's fields (struct acrn_io_request) and the words the HSM writes into them,
# fields first and the state word last (spec: hsm 6).
SLOT_POLLING = abi.SLOT_COMPLETION_POLLING
SLOT_VALUE = abi.SLOT_VALUE
SLOT_ADDRESS = abi.SLOT_ADDRESS
SLOT_KH = abi.SLOT_KERNEL_HANDLED
SLOT_STATE = abi.SLOT_PROCESSED
U32 = struct.Struct("<I")
PROCESSING_U32 = U32.pack(PROCESSING)
COMPLETE_U32 = U32.pack(COMPLETE)
KH0_U32 = U32.pack(0)
KH1_U32 = U32.pack(1)
KH0_PROCESSING = struct.pack("<II", 0, PROCESSING)  # kernel_handled, processed: adjacent
assert SLOT_STATE == SLOT_KH + 4
ALL_ONES_32 = U32.pack(0xFFFFFFFF)  # what a read of unclaimed hardware gets
ALL_ONES_64 = b"\xff" * 8

_U64_MASK = (1 << 64) - 1
_HELD_KEEP = 0xFFFFFFFF  # hsm_x_client_held: read, change nothing


def _unpack_held(v: int) -> tuple[int, int] | None:
    """struct hsm_xclient's held[vcpu]: (type, direction), or None."""
    return (v >> 8 & 0xFF, v & 0xFF) if v & lib.HSM_X_HELD else None

# An in-daemon handler gets (vm, vcpu, type, direction, address, size, value) and
# returns a negative errno (request stays PROCESSING, its bit set), 0, or the bytes
# to store in the slot's value field before the request is completed; None lets
# the request go on to the next client (ioeventfd "forward" mode only).
IoreqHandler = Callable[["Vm", int, int, int, int, int, int], "int | bytes | None"]


class Memory(Protocol):
    """Client memory as the HSM uses it: ClientMemory plus the pin-time probe."""

    pid: int

    def read(self, addr: int, n: int) -> bytes: ...

    def write(self, addr: int, data: Data) -> None: ...

    def write_then(self, addr: int, data: Data, addr2: int, data2: Data) -> None: ...

    def load_u32(self, addr: int) -> int: ...

    def store_u32(self, addr: int, value: int) -> None: ...

    def check_writable(self, addr: int, n: int) -> None: ...


MemoryFactory = Callable[[int], Memory]


class SlotScanner:
    """Reads every scanned slot's state word and *then* its head.

    The order matters: a head is only trusted when a state word read before
    it said PENDING (the hypervisor writes the head, then the state). For
    another process this is one process_vm_readv of the same span twice
    (two remote iovecs, processed in order): the first copy supplies the
    state words, the second the heads. One syscall per pass whatever the
    vCPU count; a copy of a few KiB costs far less than a syscall per slot.
    """

    __slots__ = ("mem", "base", "nslots", "span", "_pid", "_buf", "_local", "_remote")

    def __init__(self, mem: Memory, base: int, nslots: int) -> None:
        self.mem = mem
        self.base = base
        self.nslots = nslots
        self.span = (nslots - 1) * SLOT_BYTES + SLOT_STATE + 4 if nslots else 0
        self._pid = mem.pid if isinstance(mem, RemoteMemory) and nslots else None
        if self._pid is not None:
            self._buf = ffi.new("char[]", 2 * self.span)
            self._local = ffi.new("struct iovec[1]")
            self._local[0].iov_base = self._buf
            self._local[0].iov_len = 2 * self.span
            self._remote = ffi.new("struct iovec[2]")
            for k in range(2):
                self._remote[k].iov_base = ffi.cast("void *", base)
                self._remote[k].iov_len = self.span

    def scan(self) -> bytes:
        """The span twice: states are read at ``i*256+136``, heads at ``span + i*256``."""
        if self._pid is not None:
            total = 2 * self.span
            n = lib.process_vm_readv(self._pid, self._local, 1, self._remote, 2, 0)
            if n != total:
                err = ffi.errno if n < 0 else errno.EFAULT  # short read
                raise MemoryFault(err, f"scan of the request page at {self.base:#x} in pid {self._pid}")
            data: bytes = ffi.buffer(self._buf, total)[:]
            return data
        out = bytearray(2 * self.span)
        for i in range(self.nslots):
            slot = i * SLOT_BYTES
            state = self.mem.load_u32(self.base + slot + SLOT_STATE)
            U32.pack_into(out, slot + SLOT_STATE, state)
            if state == PENDING:
                head = self.mem.read(self.base + slot, HEAD_LEN)
                out[self.span + slot : self.span + slot + HEAD_LEN] = head
        return bytes(out)


@dataclass(slots=True, eq=False)
class RequestCounters:
    """Per-VM request counts: by type seen, and by what became of the request."""

    # by type seen
    pio: int = 0
    mmio: int = 0
    pci: int = 0
    other: int = 0
    # where they went
    default: int = 0
    range: int = 0
    in_kernel: int = 0
    remote: int = 0
    orphaned: int = 0
    # completed by CF8/CFC, by clearing; scans aborted; NOTIFY ioctls, failed notify hypercalls
    cf8: int = 0
    cleared: int = 0
    stalled: int = 0
    notified: int = 0
    notify_failed: int = 0
    express: Any = None  # the VM's struct hsm_xvm, whose counts add to these

    # express path counter -> the count it adds to
    _EXPRESS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("pio", "pio"), ("mmio", "mmio"), ("defaults", "default"), ("notified", "notified"),
        ("in_kernel", "range"), ("in_kernel", "in_kernel"), ("remote", "range"), ("remote", "remote"),
    )  # fmt: skip

    def as_dict(self) -> dict[str, int]:
        out = {name: getattr(self, name) for name in _COUNTS}
        x = self.express
        if x is not None:
            lib.hsm_x_lock(x)  # the vCPUs and the reader move them: one consistent reading
            try:
                for field, name in self._EXPRESS:
                    out[name] += getattr(x, field)
            finally:
                lib.hsm_x_unlock(x)
        return out

    def fold_express(self) -> None:
        """The express path goes: keep what it counted."""
        x = self.express
        if x is not None:
            for field, name in self._EXPRESS:
                setattr(self, name, getattr(self, name) + getattr(x, field))
            self.express = None


_COUNTS = tuple(f.name for f in fields(RequestCounters) if f.name != "express")


class RemotePage:
    """The request page of a range client in another process (extension ABI).

    Same layout as the ACRN page, one slot per vCPU, in the memory of the
    process that created the client (``pid``, whose user is ``uid``).
    """

    __slots__ = ("mem", "base", "pid", "uid", "fh")

    def __init__(self, mem: Memory, base: int, pid: int, uid: int, fh: int = 0) -> None:
        self.mem = mem
        self.base = base
        self.pid = pid
        self.uid = uid
        self.fh = fh  # the bound file's cdev handle (what the express prefilter matches), 0 unknown


class IoreqClient:
    """struct acrn_ioreq_client.

    A client owns inclusive ranges ``(type, start, end)``, a bitmap of the
    vCPUs whose requests it holds, and a wake-up (the wait queue). With a
    ``handler`` it is an in-daemon client (the kernel's handler thread: the
    ioeventfd client); with a ``remote`` page it is a range client served
    by another process through the extension ABI (docs/extension-abi.md);
    with neither it is served by a waiter, like the default client (ATTACH).
    Its ranges change through ioreq.range_add/range_del (the express path
    learns of it there). The default client, and a range client the express
    path serves (``_xk``: its number there), keep their bitmap, what each bit
    holds and their blocked ATTACH calls in C; these accessors read them there.
    """

    __slots__ = (
        "name", "vm", "is_default", "destroying", "ranges", "_bits", "_x", "_xk", "handler", "_waiting",
        "remote", "_held", "_served", "orphaned",
    )  # fmt: skip

    def __init__(
        self,
        vm: Vm,
        name: str,
        is_default: bool,
        handler: IoreqHandler | None = None,
        remote: RemotePage | None = None,
    ) -> None:
        self.name = name[:CLIENT_NAME_MAX]
        self.vm = vm
        self.is_default = is_default
        self.destroying = False
        self.ranges: list[tuple[int, int, int]] = []
        self._bits = 0
        self._x: Any = None  # the VM's express path, which keeps the bitmap and waiters
        self._xk = -1  # a range client's number on the express path (-1: the default client's)
        self.handler = handler
        self._waiting: list[Deferred] = []  # blocked ATTACH calls, answered by wake()
        self.remote = remote
        # remote clients: (type, direction) of the request each vCPU's bit stands for
        self._held: list[tuple[int, int] | None] = [None] * SLOTS
        self._served = 0  # remote: requests completed by the client (on the Python path)
        self.orphaned = 0  # remote: requests completed for it after it went away

    def _xbits(self, set: int, clear: int) -> int:
        if self._xk < 0:
            return lib.hsm_x_bits(self._x, set, clear)
        return lib.hsm_x_client_bits(self._x, self._xk, set, clear)

    @property
    def bitmap(self) -> int:
        """ioreqs_map: the vCPUs whose requests this client holds."""
        return self._bits if self._x is None else self._xbits(0, 0)

    @bitmap.setter
    def bitmap(self, value: int) -> None:
        if self._x is None:
            self._bits = value
        else:
            self._xbits(value, ~value & _U64_MASK)

    def set_bit(self, vcpu: int) -> None:
        if self._x is None:
            self._bits |= 1 << vcpu
        else:
            self._xbits(1 << vcpu, 0)

    def clear_bit(self, vcpu: int) -> None:
        if self._x is None:
            self._bits &= ~(1 << vcpu)
        else:
            self._xbits(0, 1 << vcpu)

    def held(self, vcpu: int) -> tuple[int, int] | None:
        """A remote client's (type, direction) of the request ``vcpu``'s bit stands for."""
        if self._x is None or self._xk < 0:
            return self._held[vcpu]
        return _unpack_held(lib.hsm_x_client_held(self._x, self._xk, vcpu, _HELD_KEEP))

    def hold(self, vcpu: int, what: tuple[int, int] | None) -> None:
        if self._x is None or self._xk < 0:
            self._held[vcpu] = what
        else:
            v = 0 if what is None else lib.HSM_X_HELD | (what[0] & 0xFF) << 8 | (what[1] & 0xFF)
            lib.hsm_x_client_held(self._x, self._xk, vcpu, v)

    @property
    def served(self) -> int:
        """Remote: requests completed by the client (here and by the express path)."""
        x = self._x
        return self._served + (int(x.clients[self._xk].served) if x is not None and self._xk >= 0 else 0)

    def count_served(self) -> None:
        self._served += 1

    @property
    def express_number(self) -> int | None:
        """A remote client's number on the VM's express path, None when Python serves it."""
        return self._xk if self._x is not None and self._xk >= 0 else None

    def adopt_range(self, x: Any) -> bool:
        """A remote range client moves to the express path, if it has room: its
        bitmap, held requests and ATTACH calls then live in C. Not while ATTACH
        calls wait in Python (C would not answer them): a later sync tries again."""
        remote = self.remote
        if self._x is not None or remote is None or not remote.fh or self.destroying or self._waiting:
            return False
        k = lib.hsm_x_client_add(x, remote.fh, remote.pid, remote.base)
        if k < 0:
            return False
        bits, held = self._bits, self._held
        self._x, self._xk = x, k
        for vcpu, what in enumerate(held):
            if what is not None:
                self.hold(vcpu, what)
        if bits:
            self._xbits(bits, 0)
        return True

    def adopt_express(self, x: Any) -> None:
        """The default client of a VM on the express path: its state moves to C."""
        bits = self._bits
        self._x = x
        lib.hsm_x_set_default(x, 1)
        if bits:
            lib.hsm_x_bits(x, bits, 0)

    def leave_express(self) -> None:
        """Back to Python (destroyed, or the VM leaves the express path): C's waiters got ENODEV."""
        x = self._x
        if x is None:
            return
        if self._xk < 0:
            self._bits = lib.hsm_x_bits(x, 0, 0)
            self._x = None
            lib.hsm_x_set_default(x, 0)
            return
        k = self._xk
        lib.hsm_x_lock(x)  # nothing moves between the reading and the removal
        try:
            self._bits = lib.hsm_x_client_bits(x, k, 0, 0)
            self._held = [_unpack_held(lib.hsm_x_client_held(x, k, v, _HELD_KEEP)) for v in range(SLOTS)]
            self._served += int(x.clients[k].served)
            lib.hsm_x_client_remove(x, k, -errno.ENODEV)
        finally:
            lib.hsm_x_unlock(x)
        self._x, self._xk = None, -1

    def wake(self) -> None:
        """Answer the blocked ATTACH calls if their condition now holds."""
        if self._x is not None:
            if self.destroying:
                self.leave_express()  # C's waiters get ENODEV, its vCPUs stop dispatching
            elif self._xk < 0:
                lib.hsm_x_wake(self._x)
            else:
                lib.hsm_x_client_wake(self._x, self._xk)
        if self._waiting and (self.bitmap or self.destroying):
            answer = -errno.ENODEV if self.destroying else 0
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.reply(answer)

    @property
    def waiters(self) -> int:
        x = self._x
        if x is None:
            return len(self._waiting)
        return len(self._waiting) + int(x.nparked if self._xk < 0 else x.clients[self._xk].nparked)

    def attach(self) -> int | Deferred:
        """ATTACH_IOREQ_CLIENT: level-triggered, 0 at once when a request is pending."""
        return 0 if self.bitmap else self.wait()

    def wait(self) -> Deferred:
        """acrn_ioreq_client_wait: level-triggered, ENODEV on destroy.

        A Deferred, answered by :meth:`wake` from the dispatcher pass that sets a
        bit (or from the destroy): no task per waiting ATTACH.
        """
        d = Deferred(on_cancel=self._forget)
        self._waiting.append(d)
        return d

    def _forget(self, d: Deferred) -> None:
        if d in self._waiting:
            self._waiting.remove(d)

    def snapshot(self) -> dict[str, object]:
        snap: dict[str, object] = {
            "name": self.name,
            "default": self.is_default,
            "in_daemon": self.handler is not None,
            "ranges": [
                {"type": t, "kind": RANGE_KINDS.get(t, str(t)), "start": s, "end": e}
                for t, s, e in self.ranges
            ],
            "pending": self.bitmap,
            "waiters": self.waiters,
        }
        if self.remote is not None:
            snap["remote"] = {
                "pid": self.remote.pid,
                "uid": self.remote.uid,
                "request_page": self.remote.base,
                "served": self.served,
                "orphaned": self.orphaned,
            }
        return snap


class Ioeventfd:
    """struct hsm_ioeventfd; ``fd`` is the daemon's duplicate of the caller's eventfd."""

    __slots__ = ("fd", "addr", "data", "length", "type", "wildcard", "owner")

    def __init__(
        self, fd: int, addr: int, data: int, length: int, type: int, wildcard: bool,
        owner: object = None,
    ) -> None:  # fmt: skip
        self.owner = owner  # None: the VM's own file; else the binding that assigned it
        self.fd = fd
        self.addr = addr
        self.data = data
        self.length = length
        self.type = type
        self.wildcard = wildcard

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass

    def snapshot(self) -> dict[str, object]:
        return {
            "type": "pio" if self.type == PORTIO else "mmio",
            "addr": self.addr,
            "length": self.length,
            "data": None if self.wildcard else self.data,
        }


class Irqfd:
    """struct hsm_irqfd (its watcher and the injection it does: irqfd.py)."""

    __slots__ = ("vm", "hv", "fd", "msi", "scope", "closed", "injected", "failures", "owner")

    def __init__(self, vm: Vm, hv: Hypercalls, fd: int, msi: bytes, owner: object = None) -> None:
        self.owner = owner  # None: the VM's own file; else the binding that assigned it
        self.vm = vm
        self.hv = hv
        self.fd = fd
        self.msi = msi
        self.scope = trio.CancelScope()
        self.closed = False
        self.injected = 0
        self.failures = 0


class RamMapping:
    """struct vm_memory_mapping: one RAM SET_MEMSEG, recorded until VM destroy."""

    __slots__ = ("user_vm_pa", "size", "host_va", "npages", "service_vm_pa", "memory")

    def __init__(
        self, user_vm_pa: int, size: int, host_va: int, npages: int, service_vm_pa: int, memory: Memory
    ) -> None:
        self.user_vm_pa = user_vm_pa
        self.size = size
        self.host_va = host_va
        self.npages = npages
        self.service_vm_pa = service_vm_pa
        self.memory = memory

    def snapshot(self) -> dict[str, object]:
        return {
            "user_vm_pa": self.user_vm_pa,
            "size": self.size,
            "host_va": self.host_va,
            "pid": self.memory.pid,
            "service_vm_pa": self.service_vm_pa,
        }


class Binding:
    """An open file bound to another file's VM, and its range client if any.

    The VM object is reused by its file for every CREATE_VM, so the binding
    also remembers the VM's generation: once that VM is destroyed the
    binding is stale (ENODEV) even if the object holds a new VM.
    """

    __slots__ = ("vm", "vmid", "generation", "client", "ctx")

    def __init__(self, vm: Vm, ctx: RequestContext) -> None:
        self.vm = vm
        self.vmid = vm.vmid
        self.generation = vm.generation
        self.client: IoreqClient | None = None
        self.ctx = ctx

    @property
    def valid(self) -> bool:
        vm = self.vm
        return vm.live and vm.vmid == self.vmid and vm.generation == self.generation

    @property
    def live_client(self) -> IoreqClient | None:
        c = self.client
        return None if c is None or c.destroying else c

    def snapshot(self) -> dict[str, object]:
        c = self.live_client
        return {"pid": self.ctx.pid, "uid": self.ctx.uid, "client": c.name if c else None}


def express_snapshot(x: Any) -> dict[str, int] | None:
    """What the VM's express path did (hsm/express.py), None when it has none."""
    if x is None:
        return None
    return {
        "dispatch": x.dispatch,
        "dispatched": x.defaults,
        "notified": x.notified,
        # of those, completions handed to a vCPU waiting in its native cycle, the
        # slot freed with the notify (Hypercalls.notify_waits)
        "handed": x.handed,
        "attaches": x.attaches,
        "attach_refused": x.refused,
        "waiting": x.nparked,
        "ioeventfd": x.in_kernel,
        # range clients served here: requests handed over, clients (their NOTIFY and ATTACH
        # calls count in notified, attaches and attach_refused with the default client's)
        "range_dispatched": x.remote,
        "range_clients": sum(1 for k in range(lib.HSM_X_CLIENTS_MAX) if x.clients[k].live),
        # INJECT_MSI and SET_IRQLINE calls answered here (the VM's native interrupt
        # hypercalls, Hypercalls.irq_gate)
        "msi": x.msis,
        "irqline": x.irqlines,
    }


class Vm:
    """struct acrn_vm: the fields an observer of the driver can tell apart."""

    __slots__ = (
        "vmid", "vcpu_num", "nslots", "destroyed", "clearing",
        "mem", "page_base", "ioreq_page", "scanner", "pci_conf_addr",
        "range_clients", "default_client", "ioeventfd_client", "ioeventfds",
        "irqfds", "monitor_page", "ram_mappings", "regions_mapping_count",
        "counters", "opener_pid", "owner_pid", "failed", "orphaned", "lost_vmid",
        "owner_uid", "generation", "bindings", "hypercalls", "mmio_segments",
        "fh", "express", "express_ranges", "express_ioeventfds", "acrn_kernel",
    )  # fmt: skip

    def __init__(self, opener_pid: int, fh: int = 0) -> None:
        self.vmid = INVALID_VMID
        self.fh = fh  # cdev's handle of the file (what the express prefilter matches)
        self.express: Any = None  # struct hsm_xvm while on the express path (express.py)
        self.express_ranges: Any = None  # the range table C reads
        self.express_ioeventfds: Any = None  # the ioeventfd table C reads
        self.vcpu_num = 0
        self.nslots = 0  # slots the dispatcher scans: vcpu_num, at most the page's 16
        self.destroyed = False  # ACRN_VM_FLAG_DESTROYED, sticky (quirk)
        self.clearing = False  # ACRN_VM_FLAG_CLEARING_IOREQ
        self.mem: Memory | None = None  # the creator's memory, for the request page
        self.page_base: int | None = None  # ioreq_buf: None = no request page
        self.ioreq_page: SharedPage | None = None  # what the hypervisor was given
        self.scanner: SlotScanner | None = None
        self.pci_conf_addr = 0  # never reset by a re-create, as in the driver
        self.range_clients: list[IoreqClient] = []  # newest first
        self.default_client: IoreqClient | None = None
        self.ioeventfd_client: IoreqClient | None = None
        self.ioeventfds: list[Ioeventfd] = []
        self.irqfds: list[Irqfd] = []
        self.mmio_segments = 0  # MMIO SET_MEMSEGs in force (the daemon's limit)
        self.monitor_page: SharedPage | None = None
        self.ram_mappings: list[RamMapping] = []
        self.regions_mapping_count = 0  # never reset (quirk)
        self.counters = RequestCounters()
        self.opener_pid = opener_pid
        self.owner_pid = 0  # the process whose memory holds the request page
        self.failed: str | None = None
        self.orphaned = False  # its file is gone but the VM lives on
        self.lost_vmid: int | None = None  # hypervisor VM this object lost (quirk)
        self.owner_uid = 0  # uid of the CREATE_VM caller: the bind permission rule
        self.generation = 0  # bumped by every successful CREATE_VM (bindings check it)
        self.bindings: list[Binding] = []  # other files bound to this VM (extension ABI)
        self.hypercalls = HypercallLog()
        self.acrn_kernel: Any = None  # acrn_kernel.AcrnKernelVm under the acrn-kernel profile

    @property
    def live(self) -> bool:
        return self.vmid != INVALID_VMID

    def snapshot(self) -> dict[str, object]:
        clients = []
        if self.default_client is not None:
            clients.append(self.default_client.snapshot())
        clients.extend(c.snapshot() for c in self.range_clients)
        return {
            "vmid": self.vmid,
            "lost_vmid": self.lost_vmid,
            "vcpu_num": self.vcpu_num,
            "owner_pid": self.owner_pid,
            "opener_pid": self.opener_pid,
            "destroyed_flag": self.destroyed,
            "clearing": self.clearing,
            "orphaned": self.orphaned,
            "failed": self.failed,
            "request_page": self.page_base,
            "pci_conf_addr": self.pci_conf_addr,
            "clients": clients,
            "ram_mappings": len(self.ram_mappings),
            "regions_mapping_count": self.regions_mapping_count,
            "ioeventfds": len(self.ioeventfds),
            "irqfds": len(self.irqfds),
            "express": express_snapshot(self.express),
            "monitor_page": self.monitor_page.base if self.monitor_page else None,
            "counters": self.counters.as_dict(),
            "owner_uid": self.owner_uid,
            "bound_files": [b.snapshot() for b in self.bindings],
            "hypercalls": self.hypercalls.snapshot(),
            "acrn_kernel": None if self.acrn_kernel is None else self.acrn_kernel.snapshot(),
        }


class HsmFile:
    """One open file of the node: its VM object, for the file's whole life.

    ``binding``: set when the file was bound to another file's VM through
    the extension ABI (it then serves a range client, docs/extension-abi.md).
    """

    __slots__ = ("vm", "ctx", "binding")

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.vm = Vm(ctx.pid, ctx.fh)
        self.binding: Binding | None = None


# An ioctl handler of the devices table (hsm.py): the VM, the call; an answer now or later.
Handler = Callable[[Vm, IoctlCall], "IoctlResult | Deferred | Awaitable[IoctlResult]"]
