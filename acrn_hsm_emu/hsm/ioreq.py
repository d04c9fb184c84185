"""I/O requests: clients, the dispatcher, CF8/CFC folding, completion, clearing.

What ``ioreq.c`` does, on the trio thread. The request page lives in the
client's process, so every read and write of a slot goes through its
memory accessor: a pass reads the state words, then the heads of the slots
it found PENDING (:class:`SlotScanner`, one syscall), and every change is
written fields first, state word last (spec: hsm 6, 13 "Memory").
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import trio

from acrn_hsm_emu import abi
from acrn_hsm_emu._native import ffi, lib
from acrn_hsm_emu.hsm import acrn_kernel, express
from acrn_hsm_emu.hypervisor.api import FdUpcall, Hypercalls
from acrn_hsm_emu.memory import PAGE_SIZE, MemoryFault, RemoteMemory, SharedPage
from cdev.device import Deferred

if TYPE_CHECKING:
    from acrn_hsm_emu.hsm.vm import Vm

log = structlog.get_logger("acrn_hsm_emu.hsm")

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

_POLLING = abi.SLOT_COMPLETION_POLLING
_VALUE = abi.SLOT_VALUE
_PCI_BUS = abi.SLOT_PCI_BUS
_KH = abi.SLOT_KERNEL_HANDLED
_STATE = abi.SLOT_PROCESSED

# type, completion_polling, direction, address, size, value (u64; PIO uses the low half)
_HEAD = struct.Struct("<II56xI4xQQQ")
_HEAD_LEN = abi.SLOT_PCI_REG + 4  # read up to PCICFG reg, so a fold can be written back whole
assert _HEAD.size == abi.SLOT_VALUE + 8
_U32 = struct.Struct("<I")
_PCI = struct.Struct("<IIII")  # bus, dev, func, reg
_PCI3 = struct.Struct("<III")  # bus, dev, func
_S_PROCESSING = _U32.pack(PROCESSING)
_S_COMPLETE = _U32.pack(COMPLETE)
_KH0 = _U32.pack(0)
_KH1 = _U32.pack(1)
_ALL_ONES = _U32.pack(0xFFFFFFFF)
_ALL_ONES_64 = b"\xff" * 8
_KH0_PROCESSING = struct.pack("<II", 0, PROCESSING)  # kernel_handled, processed: adjacent
assert _STATE == _KH + 4
FREE = abi.ACRN_IOREQ_STATE_FREE
_U64_MASK = (1 << 64) - 1

PCI_CONF_ADDR = 0xCF8
PCI_CONF_DATA = 0xCFC
CONF1_ENABLE = 0x80000000
CLIENT_NAME_MAX = 15  # ACRN_NAME_LEN - 1

# An in-daemon handler gets (vm, vcpu, type, direction, address, size, value) and
# returns a negative errno (request stays PROCESSING, its bit set), 0, or the bytes
# to store in the slot's value field before the request is completed; None lets
# the request go on to the next client (ioeventfd "forward" mode only).
IoreqHandler = Callable[["Vm", int, int, int, int, int, int], "int | bytes | None"]


class Memory(Protocol):
    """Client memory as the HSM uses it: ClientMemory plus the pin-time probe."""

    pid: int

    def read(self, addr: int, n: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...

    def write_then(self, addr: int, data: bytes, addr2: int, data2: bytes) -> None: ...

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
        self.span = (nslots - 1) * SLOT_BYTES + _STATE + 4 if nslots else 0
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
            return ffi.buffer(self._buf, total)[:]
        out = bytearray(2 * self.span)
        for i in range(self.nslots):
            slot = i * SLOT_BYTES
            state = self.mem.load_u32(self.base + slot + _STATE)
            _U32.pack_into(out, slot + _STATE, state)
            if state == PENDING:
                head = self.mem.read(self.base + slot, _HEAD_LEN)
                out[self.span + slot : self.span + slot + _HEAD_LEN] = head
        return bytes(out)


class RequestCounters:
    """Per-VM request counts: by type seen, and by what became of the request."""

    __slots__ = (
        "pio", "mmio", "pci", "other",
        "default", "range", "in_kernel", "remote", "orphaned",
        "cf8", "cleared", "stalled", "notified", "notify_failed",
        "express",
    )  # fmt: skip
    _COUNTS = __slots__[:-1]
    # express path counter -> the count it adds to
    _EXPRESS = (
        ("pio", "pio"), ("mmio", "mmio"), ("defaults", "default"), ("notified", "notified"),
        ("in_kernel", "range"), ("in_kernel", "in_kernel"),
    )  # fmt: skip

    def __init__(self) -> None:
        for name in self._COUNTS:
            setattr(self, name, 0)
        self.express: Any = None  # the VM's struct hsm_xvm, whose counts add to these

    def as_dict(self) -> dict[str, int]:
        out = {name: getattr(self, name) for name in self._COUNTS}
        x = self.express
        if x is not None:
            for field, name in self._EXPRESS:
                out[name] += getattr(x, field)
        return out

    def fold_express(self) -> None:
        """The express path goes: keep what it counted."""
        x = self.express
        if x is not None:
            for field, name in self._EXPRESS:
                setattr(self, name, getattr(self, name) + getattr(x, field))
            self.express = None


class RemotePage:
    """The request page of a range client in another process (extension ABI).

    Same layout as the ACRN page, one slot per vCPU, in the memory of the
    process that created the client (``pid``, whose user is ``uid``).
    """

    __slots__ = ("mem", "base", "pid", "uid")

    def __init__(self, mem: Memory, base: int, pid: int, uid: int) -> None:
        self.mem = mem
        self.base = base
        self.pid = pid
        self.uid = uid


class IoreqClient:
    """struct acrn_ioreq_client.

    A client owns inclusive ranges ``(type, start, end)``, a bitmap of the
    vCPUs whose requests it holds, and a wake-up (the wait queue). With a
    ``handler`` it is an in-daemon client (the kernel's handler thread: the
    ioeventfd client); with a ``remote`` page it is a range client served
    by another process through the extension ABI (docs/extension-abi.md);
    with neither it is served by a waiter, like the default client (ATTACH).
    """

    __slots__ = (
        "name", "vm", "is_default", "destroying", "ranges", "_bits", "_x", "handler", "_waiting",
        "remote", "inflight", "served", "orphaned",
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
        self.handler = handler
        self._waiting: list[Deferred] = []  # blocked ATTACH calls, answered by wake()
        self.remote = remote
        # remote clients: (type, direction) of the request each vCPU's bit stands for
        self.inflight: list[tuple[int, int] | None] = [None] * SLOTS
        self.served = 0  # remote: requests completed by the client
        self.orphaned = 0  # remote: requests completed for it after it went away

    @property
    def bitmap(self) -> int:
        """ioreqs_map: the vCPUs whose requests this client holds."""
        return self._bits if self._x is None else lib.hsm_x_bits(self._x, 0, 0)

    @bitmap.setter
    def bitmap(self, value: int) -> None:
        if self._x is None:
            self._bits = value
        else:
            lib.hsm_x_bits(self._x, value, ~value & _U64_MASK)

    def set_bit(self, vcpu: int) -> None:
        if self._x is None:
            self._bits |= 1 << vcpu
        else:
            lib.hsm_x_bits(self._x, 1 << vcpu, 0)

    def clear_bit(self, vcpu: int) -> None:
        if self._x is None:
            self._bits &= ~(1 << vcpu)
        else:
            lib.hsm_x_bits(self._x, 0, 1 << vcpu)

    def adopt_express(self, x: Any) -> None:
        """The default client of a VM on the express path: its state moves to C."""
        bits = self._bits
        self._x = x
        lib.hsm_x_set_default(x, 1)
        if bits:
            lib.hsm_x_bits(x, bits, 0)

    def leave_express(self) -> None:
        """Back to Python (the VM leaves the express path): C's waiters got ENODEV."""
        x = self._x
        if x is not None:
            self._bits = lib.hsm_x_bits(x, 0, 0)
            self._x = None
            lib.hsm_x_set_default(x, 0)

    def wake(self) -> None:
        """Answer the blocked ATTACH calls if their condition now holds."""
        if self._x is not None:
            if self.destroying:
                self.leave_express()  # C's waiters get ENODEV, its vCPUs stop dispatching
            else:
                lib.hsm_x_wake(self._x)
        if self._waiting and (self.bitmap or self.destroying):
            answer = -errno.ENODEV if self.destroying else 0
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.reply(answer)

    @property
    def waiters(self) -> int:
        x = self._x
        return len(self._waiting) + (x.nparked if x is not None else 0)

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

    def range_add(self, type: int, start: int, end: int, *, newest_first: bool = True) -> int:
        """Add an inclusive range (the driver's list_add puts it first; a remote
        client's list keeps the order it was given in)."""
        if end < start:
            return -errno.EINVAL
        if newest_first:
            self.ranges.insert(0, (type, start, end))
        else:
            self.ranges.append((type, start, end))
        express.sync(self.vm)
        return 0

    def range_del(self, type: int, start: int, end: int) -> bool:
        """Remove the first identical range; False if there is none."""
        try:
            self.ranges.remove((type, start, end))
        except ValueError:
            return False
        express.sync(self.vm)
        return True

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


RANGE_KINDS = {PORTIO: "pio", MMIO: "mmio", PCICFG: "pci"}


class Dispatcher:
    """The global VM list, the upcall, and everything ioreq.c does with slots."""

    def __init__(self, hv: Hypercalls, memory: MemoryFactory, clear_round_s: float = 0.01) -> None:
        self.hv = hv
        self.memory = memory
        self.clear_round_s = clear_round_s
        self.vms: tuple[Vm, ...] = ()  # acrn_vm_list: newest first
        # The upcall is an eventfd (vCPUs raise it without the GIL); serve_upcalls
        # waits for it and runs the pass: queue_work on an ordered queue, since
        # upcalls raised before the pass starts all fold into that one pass.
        self.upcall = FdUpcall()
        self._serving = trio.CancelScope()
        self.upcalls = 0
        self.passes = 0
        # ioeventfd: accesses in a range that signal nothing are consumed ("drop",
        # the driver) or go on to the device model ("forward"); see ioeventfd.py
        self.ioeventfd_mismatch = "drop"
        # The session's express path (express.py), when the device is served by cdev.
        self.express: express.Express | None = None
        self.quirks = True  # the driver's quirks (HsmDevice's setting)

    # -- the global VM list ------------------------------------------------

    def list_add(self, vm: Vm) -> None:
        self.vms = (vm, *self.vms)

    def list_del(self, vm: Vm) -> None:
        self.vms = tuple(v for v in self.vms if v is not vm)

    # -- upcall and passes (queue_work semantics) --------------------------

    async def serve_upcalls(self) -> None:
        """The work queue's worker: one pass per readiness of the upcall fd, until
        :meth:`close` (or cancellation)."""
        fd = self.upcall.fd
        with self._serving:
            while True:
                await trio.lowlevel.wait_readable(fd)
                self._take_and_pass()

    def close(self) -> None:
        """Stop serving upcalls (the fd itself goes with the last holder of ``upcall``)."""
        self._serving.cancel()

    def _take_and_pass(self) -> None:
        n = self.upcall.take()
        if n:
            self.upcalls += n
            self.run_pass()

    def pause(self) -> None:
        """ioreq_pause: drain, i.e. run a queued pass now, before a client goes."""
        self._take_and_pass()

    def resume(self) -> None:
        """ioreq_resume: queue one pass in case requests were missed (counted as an upcall)."""
        self.upcall()

    def run_pass(self) -> None:
        """ioreq_dispatcher: every VM, newest first."""
        self.passes += 1
        for vm in self.vms:
            if vm.acrn_kernel is not None and vm.failed is None:
                try:  # ACRN's kernel: the asyncio ring first (ioreq_dispatcher)
                    acrn_kernel.dispatch(vm)
                except MemoryFault as e:
                    self.fail_vm(vm, e)
            if vm.page_base is None:
                break  # the driver stops at a VM without a request page
            if vm.failed is not None:
                continue
            try:
                self.dispatch(vm)
            except MemoryFault as e:
                self.fail_vm(vm, e)

    def fail_vm(self, vm: Vm, exc: BaseException) -> None:
        """The VM's request page became unreachable: stop serving that VM only.

        ESRCH is the owner exiting: its memory goes before its files, so a pass
        between the two finds no page (the kernel's pinned page would still be
        there). Its release follows and destroys the VM: that is no error.
        """
        if vm.failed is None:
            vm.failed = str(exc)
            if getattr(exc, "errno", None) == errno.ESRCH:
                log.info(
                    "hsm.vm_owner_exiting",
                    vmid=vm.vmid,
                    pid=vm.owner_pid,
                    note="the owner's memory is gone; VM no longer dispatched, it goes with its file",
                )
            else:
                log.error(
                    "hsm.vm_failed",
                    vmid=vm.vmid,
                    pid=vm.owner_pid,
                    error=str(exc),
                    note="request page unreachable; VM no longer dispatched",
                )
            express.sync(vm)

    # -- the per-VM scan (hot path) ----------------------------------------

    def dispatch(self, vm: Vm) -> None:
        """acrn_ioreq_dispatch: slots 0..vcpu_num-1, PENDING ones, in the driver's order.

        On the express path the VM's lock is held for the pass: a vCPU then
        cannot dispatch a request between the scan and what the pass writes.
        """
        x = vm.express
        if x is None:
            self._dispatch(vm)
            return
        lib.hsm_x_lock(x)
        try:
            self._dispatch(vm)
        finally:
            lib.hsm_x_unlock(x)

    def _dispatch(self, vm: Vm) -> None:
        mem = vm.mem
        scanner = vm.scanner
        assert mem is not None and vm.page_base is not None and scanner is not None
        base = vm.page_base
        data = scanner.scan()
        span = scanner.span
        counters = vm.counters
        for i in range(scanner.nslots):
            if _U32.unpack_from(data, (i << 8) + _STATE)[0] != PENDING:
                continue
            off = base + (i << 8)
            head = span + (i << 8)
            typ, polling, direction, addr, size, value = _HEAD.unpack_from(data, head)

            if vm.clearing:
                counters.cleared += 1
                self._count_type(counters, typ)
                self._finish(vm, i, off, polling, None)
                continue

            client: IoreqClient | None = None
            folded: bytearray | None = None
            if typ == PORTIO and (addr == PCI_CONF_ADDR or PCI_CONF_DATA <= addr <= PCI_CONF_DATA + 3):
                # handle_cf8cfc
                conf = vm.pci_conf_addr
                if addr == PCI_CONF_ADDR:
                    counters.pio += 1
                    counters.cf8 += 1
                    if direction == DIR_WRITE:
                        vm.pci_conf_addr = value & 0xFFFFFFFF
                        self._finish(vm, i, off, polling, None)
                    else:
                        self._finish(vm, i, off, polling, _U32.pack(conf))
                    continue
                if not conf & CONF1_ENABLE:
                    counters.pio += 1
                    counters.cf8 += 1
                    self._finish(vm, i, off, polling, _ALL_ONES if direction == DIR_READ else None)
                    continue
                folded = bytearray(data[head : head + _HEAD_LEN])
                _U32.pack_into(folded, 0, PCICFG)
                _PCI.pack_into(
                    folded, _PCI_BUS,
                    (conf >> 16) & 0xFF,
                    (conf >> 11) & 0x1F,
                    (conf >> 8) & 0x7,
                    (conf & 0xFC) + ((conf >> 16) & 0xF00) + (addr - PCI_CONF_DATA),
                )  # fmt: skip
                mem.write(off, bytes(folded))
                counters.pci += 1
                typ = PCICFG
            else:
                self._count_type(counters, typ)

            if vm.range_clients:
                if typ == PORTIO or typ == MMIO:
                    last = (addr + size - 1) & _U64_MASK
                    for c in vm.range_clients:
                        for rtype, start, end in c.ranges:
                            if rtype == typ and start <= addr and last <= end:
                                client = c
                                break
                        if client is not None:
                            break
                elif typ == PCICFG:
                    # extension: PCI ranges match bus/dev/func (the driver has no such ranges)
                    bus, dev, func = _PCI3.unpack_from(
                        folded if folded is not None else data,
                        _PCI_BUS if folded is not None else head + _PCI_BUS,
                    )
                    bdf = (bus & 0xFF) << 8 | (dev & 0x1F) << 3 | (func & 0x7)
                    for c in vm.range_clients:
                        if c.remote is None:
                            continue  # in_range: in-daemon clients never match PCICFG
                        for rtype, start, end in c.ranges:
                            if rtype == PCICFG and start <= bdf <= end:
                                client = c
                                break
                        if client is not None:
                            break

            if client is None:
                client = vm.default_client
                if client is None:
                    counters.stalled += 1
                    return  # no client: abort this VM's scan, the request stays PENDING
                counters.default += 1
                mem.write_then(off + _KH, _KH0, off + _STATE, _S_PROCESSING)
                client.set_bit(i)
                client.wake()
                continue

            counters.range += 1
            handler = client.handler
            if handler is None:
                remote = client.remote
                if remote is not None:  # a range client in another process
                    self._hand_over(
                        vm, client, remote, i, off, polling, typ, direction,
                        bytes(folded) if folded is not None else data[head : head + _HEAD_LEN],
                    )  # fmt: skip
                    continue
                mem.write_then(off + _KH, _KH1, off + _STATE, _S_PROCESSING)
                client.set_bit(i)
                client.wake()
                continue
            # In-daemon client: its handler runs here rather than in a thread, so
            # the request goes straight from PENDING to COMPLETE.
            result = handler(vm, i, typ, direction, addr, size, value)
            if result is None:
                # Not consumed (ioeventfd "forward" mode, not the driver's): the
                # request goes on to a later range client or the default client.
                counters.range -= 1
                self._pass_on(vm, client, i, off, polling, typ, direction, addr, size, data, head)
                continue
            if isinstance(result, int) and result < 0:
                mem.write_then(off + _KH, _KH1, off + _STATE, _S_PROCESSING)
                client.set_bit(i)
                log.debug("hsm.ioreq_handler_failed", client=client.name, vcpu=i, err=result)
                continue
            counters.in_kernel += 1
            if isinstance(result, bytes):
                mem.write(off + _VALUE, result)
            mem.write_then(off + _KH, _KH1, off + _STATE, _S_COMPLETE)
            if not polling:
                self._notify(vm, i)

    def _pass_on(
        self, vm: Vm, after: IoreqClient, vcpu: int, off: int, polling: int, typ: int,
        direction: int, addr: int, size: int, data: bytes, head: int,
    ) -> None:  # fmt: skip
        """Deliver a PIO/MMIO request an in-daemon client let through: the next match, else default."""
        last = (addr + size - 1) & _U64_MASK
        clients = vm.range_clients
        start_at = clients.index(after) + 1 if after in clients else len(clients)
        for c in clients[start_at:]:
            if c.remote is not None and any(
                rtype == typ and start <= addr and last <= end for rtype, start, end in c.ranges
            ):
                vm.counters.range += 1
                self._hand_over(
                    vm, c, c.remote, vcpu, off, polling, typ, direction, data[head : head + _HEAD_LEN]
                )
                return
        client = vm.default_client
        assert vm.mem is not None
        if client is None:
            vm.counters.stalled += 1
            return  # stays PENDING until a client exists (this pass goes on with other slots)
        vm.counters.default += 1
        vm.mem.write_then(off + _KH, _KH0, off + _STATE, _S_PROCESSING)
        client.set_bit(vcpu)
        client.wake()

    def _hand_over(
        self, vm: Vm, client: IoreqClient, remote: RemotePage, vcpu: int, off: int,
        polling: int, typ: int, direction: int, head: bytes,
    ) -> None:  # fmt: skip
        """Copy a request into a remote range client's page, then mark the ACRN slot.

        The client sees PROCESSING with kernel_handled = 0 in its own page;
        the ACRN slot gets kernel_handled = 1 so ACRN userspace skips it.
        """
        coff = remote.base + (vcpu << 8)
        assert vm.mem is not None
        try:
            remote.mem.write_then(coff, head, coff + _KH, _KH0_PROCESSING)
        except MemoryFault as e:
            # The client's page is gone (process exiting, page unmapped): answer
            # as unclaimed hardware does and drop the client.
            log.warning(
                "hsm.range_client_fault",
                vmid=vm.vmid, client=client.name, pid=remote.pid, vcpu=vcpu, error=str(e),
            )  # fmt: skip
            vm.counters.orphaned += 1
            client.orphaned += 1
            self._finish(vm, vcpu, off, polling, _all_ones(typ) if direction == DIR_READ else None)
            self.remote_drop(client, "request page unreachable")
            return
        vm.mem.write_then(off + _KH, _KH1, off + _STATE, _S_PROCESSING)
        client.set_bit(vcpu)
        client.inflight[vcpu] = (typ, direction)
        vm.counters.remote += 1
        client.wake()

    @staticmethod
    def _count_type(counters: RequestCounters, typ: int) -> None:
        if typ == PORTIO:
            counters.pio += 1
        elif typ == MMIO:
            counters.mmio += 1
        elif typ == PCICFG:
            counters.pci += 1
        else:
            counters.other += 1

    def _finish(self, vm: Vm, vcpu: int, off: int, polling: int, value: bytes | None) -> None:
        """ioreq_complete_request with the polling flag already read from the slot."""
        mem = vm.mem
        assert mem is not None
        if value is None:
            mem.store_u32(off + _STATE, COMPLETE)
        else:
            mem.write_then(off + _VALUE, value, off + _STATE, _S_COMPLETE)
        if not polling:
            self._notify(vm, vcpu)

    def _notify(self, vm: Vm, vcpu: int) -> int:
        ret = self.hv.notify_request_finish(vm.vmid, vcpu)
        if ret < 0:
            vm.counters.notify_failed += 1
            # the first failure of a VM is an error; repeating it per request would flood
            level = log.error if vm.counters.notify_failed == 1 else log.debug
            level("hsm.notify_failed", vmid=vm.vmid, vcpu=vcpu, ret=ret)
        return ret

    # -- completion ---------------------------------------------------------

    def complete(self, vm: Vm, vcpu: int) -> int:
        """ioreq_complete_request: polling read first, COMPLETE, notify unless polling."""
        if vcpu >= SLOTS or vm.page_base is None or vm.mem is None:
            return -errno.EINVAL  # the kernel would index past the page here
        off = vm.page_base + (vcpu << 8)
        polling = vm.mem.load_u32(off + _POLLING)
        vm.mem.store_u32(off + _STATE, COMPLETE)
        if polling:
            return 0
        return self._notify(vm, vcpu)

    def client_complete(self, client: IoreqClient, vcpu: int) -> int:
        """acrn_ioreq_complete_request."""
        vm = client.vm
        if vcpu >= vm.vcpu_num:
            return -errno.EINVAL
        client.clear_bit(vcpu)
        return self.complete(vm, vcpu)

    def default_complete(self, vm: Vm, vcpu: int) -> int:
        """NOTIFY_REQUEST_FINISH: the default client's slot, whatever its state."""
        client = vm.default_client
        if client is None:
            return 0
        vm.counters.notified += 1
        return self.client_complete(client, vcpu)

    def _complete_value(self, vm: Vm, vcpu: int, value: bytes | None) -> int:
        """Complete a slot with an optional read value: polling first, COMPLETE, notify."""
        if vm.page_base is None or vm.mem is None:
            return -errno.ENODEV  # the VM was destroyed meanwhile
        off = vm.page_base + (vcpu << 8)
        polling = vm.mem.load_u32(off + _POLLING)
        if value is None:
            vm.mem.store_u32(off + _STATE, COMPLETE)
        else:
            vm.mem.write_then(off + _VALUE, value, off + _STATE, _S_COMPLETE)
        if polling:
            return 0
        return self._notify(vm, vcpu)

    def remote_complete(self, client: IoreqClient, vcpu: int) -> int:
        """NOTIFY_REQUEST_FINISH on a range client's file (extension ABI).

        Only a request the client holds can be completed (else EINVAL); a
        read's value is copied from the client's page into the ACRN slot.
        The client's slot goes back to FREE. A fault on the VM's own page
        raises MemoryFault, as default_complete does.
        """
        vm = client.vm
        remote = client.remote
        assert remote is not None
        if vcpu >= vm.vcpu_num or vcpu >= SLOTS or not client.bitmap >> vcpu & 1:
            return -errno.EINVAL
        held = client.inflight[vcpu]
        typ, direction = held if held is not None else (PORTIO, DIR_WRITE)
        coff = remote.base + (vcpu << 8)
        value: bytes | None = None
        try:
            if direction == DIR_READ:
                value = remote.mem.read(coff + _VALUE, 8 if typ == MMIO else 4)
            remote.mem.store_u32(coff + _STATE, FREE)
        except MemoryFault as e:
            log.debug("hsm.range_client_page_fault", client=client.name, vcpu=vcpu, error=str(e))
            return -errno.EFAULT  # the request stays with the client
        client.clear_bit(vcpu)
        client.inflight[vcpu] = None
        client.served += 1
        vm.counters.notified += 1
        return self._complete_value(vm, vcpu, value)

    def _complete_orphans(self, client: IoreqClient) -> list[dict[str, object]]:
        """Complete what a vanished range client held: reads get all ones."""
        vm = client.vm
        done: list[dict[str, object]] = []
        for vcpu in range(SLOTS):
            if not client.bitmap >> vcpu & 1:
                continue
            client.clear_bit(vcpu)
            held = client.inflight[vcpu]
            client.inflight[vcpu] = None
            if held is None:
                continue
            typ, direction = held
            read = direction == DIR_READ
            try:
                ret = self._complete_value(vm, vcpu, _all_ones(typ) if read else None)
            except MemoryFault as e:
                self.fail_vm(vm, e)
                ret = -errno.EFAULT
            client.orphaned += 1
            vm.counters.orphaned += 1
            done.append({"vcpu": vcpu, "kind": RANGE_KINDS.get(typ, str(typ)), "read": read, "ret": ret})
        return done

    # -- clients ------------------------------------------------------------

    def client_create(
        self, vm: Vm, name: str, is_default: bool, handler: IoreqHandler | None = None
    ) -> IoreqClient:
        """acrn_ioreq_client_create (no pass is queued: the driver does not rescan)."""
        client = IoreqClient(vm, name, is_default, handler)
        if is_default:
            vm.default_client = client
            if vm.express is not None:
                client.adopt_express(vm.express)
        else:
            vm.range_clients.insert(0, client)
        express.sync(vm)
        log.debug("hsm.client_created", vmid=vm.vmid, client=client.name)
        return client

    def remote_create(self, vm: Vm, name: str, remote: RemotePage) -> IoreqClient:
        """A range client in another process (extension ABI).

        It is matched after the VM's in-daemon clients (the ioeventfd client
        keeps precedence, as the VM owner's ioeventfds are its fast path) and
        after the range clients created before it.
        """
        client = IoreqClient(vm, name, False, None, remote)
        vm.range_clients = [*vm.range_clients, client]
        express.sync(vm)
        log.info(
            "hsm.range_client_created",
            vmid=vm.vmid, client=client.name, pid=remote.pid, uid=remote.uid,
        )  # fmt: skip
        return client

    def client_destroy(self, client: IoreqClient, reason: str = "destroyed", *, vm_gone: bool = False) -> None:
        """acrn_ioreq_client_destroy: pause (drain), mark, wake, unlink, resume (a pass).

        A remote range client's in-flight requests are completed (reads get
        all ones, as unclaimed hardware answers) unless the VM itself is
        going away (``vm_gone``); the driver leaves an in-kernel client's
        requests PROCESSING, but no in-kernel client can vanish mid-request.
        """
        vm = client.vm
        self.pause()
        client.destroying = True
        client.wake()
        if client.is_default:
            if vm.default_client is client:
                vm.default_client = None
        else:
            vm.range_clients = [c for c in vm.range_clients if c is not client]
        client.ranges.clear()
        express.sync(vm)
        if client.remote is not None:
            self._remote_gone(client, reason, vm_gone)
        else:
            log.debug("hsm.client_destroyed", vmid=vm.vmid, client=client.name)
        self.resume()

    def remote_drop(self, client: IoreqClient, reason: str) -> None:
        """Unlink a remote range client from inside a dispatcher pass (no pause/resume)."""
        vm = client.vm
        if client.destroying:
            return
        client.destroying = True
        client.wake()
        vm.range_clients = [c for c in vm.range_clients if c is not client]
        client.ranges.clear()
        express.sync(vm)
        self._remote_gone(client, reason, False)

    def _remote_gone(self, client: IoreqClient, reason: str, vm_gone: bool) -> None:
        vm = client.vm
        remote = client.remote
        assert remote is not None
        if vm_gone:
            client.bitmap = 0
            client.inflight = [None] * SLOTS
            log.info("hsm.range_client_destroyed", vmid=vm.vmid, client=client.name, reason=reason)
            return
        done = self._complete_orphans(client)
        if done:
            log.warning(
                "hsm.range_client_gone",
                vmid=vm.vmid, client=client.name, pid=remote.pid, reason=reason,
                completed=done,
                note="its requests were completed as unclaimed (reads: all ones)",
            )  # fmt: skip
        else:
            log.info(
                "hsm.range_client_destroyed",
                vmid=vm.vmid, client=client.name, pid=remote.pid, reason=reason,
            )  # fmt: skip

    # -- request page ---------------------------------------------------------

    def ioreq_init(self, vm: Vm, pid: int, buf: int) -> int:
        """acrn_ioreq_init: "pin" the caller's page containing ``buf`` and hand it over."""
        if vm.page_base is not None:
            return -errno.EEXIST
        base = buf & ~(PAGE_SIZE - 1)
        mem = self.memory(pid)
        try:
            mem.check_writable(base, PAGE_SIZE)
        except MemoryFault as e:
            log.debug("hsm.ioreq_pin_failed", vmid=vm.vmid, pid=pid, error=str(e))
            return -errno.EFAULT
        # The hypervisor gets an accessor of its own: nothing of the trio thread's
        # is shared with its vCPU threads.
        page = SharedPage(self.memory(pid), base)
        ret = self.hv.set_ioreq_buffer(vm.vmid, page)
        if ret < 0:
            return ret
        vm.mem = mem
        vm.page_base = base
        vm.ioreq_page = page
        vm.scanner = SlotScanner(mem, base, vm.nslots)
        vm.owner_pid = pid
        vm.failed = None
        if self.express is not None:
            self.express.add(vm)
        return 0

    def ioreq_deinit(self, vm: Vm) -> None:
        """acrn_ioreq_deinit: range clients, then the default one, then the page."""
        for client in list(vm.range_clients):
            self.client_destroy(client, "VM destroyed", vm_gone=True)
        if vm.default_client is not None:
            self.client_destroy(vm.default_client)
        self.express_remove(vm)
        vm.page_base = None
        vm.mem = None
        vm.ioreq_page = None
        vm.scanner = None

    def express_remove(self, vm: Vm, vmid: int | None = None) -> None:
        """Take ``vm`` off the express path (its page goes, or it loses its vmid)."""
        if self.express is not None:
            self.express.remove(vm, vmid)

    # -- CLEAR_VM_IOREQ -------------------------------------------------------

    def request_clear(self, vm: Vm) -> ClearOp:
        """acrn_ioreq_request_clear, split so its bounded wait can run as a task."""
        vm.clearing = True
        express.sync(vm)
        return ClearOp(self, vm)


def _all_ones(typ: int) -> bytes:
    """What a read of unclaimed hardware gets: the value field's width of ones."""
    return _ALL_ONES_64 if typ == MMIO else _ALL_ONES


class ClearOp:
    """One CLEAR_VM_IOREQ in progress: wait for range clients, then finish once."""

    __slots__ = ("dispatcher", "vm", "done")

    ROUNDS = 10

    def __init__(self, dispatcher: Dispatcher, vm: Vm) -> None:
        self.dispatcher = dispatcher
        self.vm = vm
        self.done = False

    def range_pending(self) -> bool:
        return any(c.bitmap for c in self.vm.range_clients)

    async def wait_and_finish(self) -> int:
        try:
            retry = self.ROUNDS
            while True:
                pending = self.range_pending()
                if pending:
                    await trio.sleep(self.dispatcher.clear_round_s)
                retry -= 1
                if not (pending and retry > 0):
                    break
            if retry == 0:
                log.warning("hsm.clear_vm_ioreq_timeout", vmid=self.vm.vmid)
        finally:
            self.finish()  # a signal ends the sleeps early; the driver still finishes
        return 0

    def finish(self) -> int:
        """Complete every request the default client holds, then drop CLEARING."""
        if self.done:
            return 0
        self.done = True
        vm = self.vm
        d = self.dispatcher
        try:
            client = vm.default_client
            if client is not None:
                for vcpu in range(SLOTS):
                    if client.bitmap >> vcpu & 1 and vcpu < vm.vcpu_num:
                        d.client_complete(client, vcpu)
                        vm.counters.cleared += 1
        except MemoryFault as e:
            d.fail_vm(vm, e)
        finally:
            vm.clearing = False
            express.sync(vm)
        return 0


__all__ = [
    "RANGE_KINDS",
    "ClearOp",
    "Dispatcher",
    "IoreqClient",
    "IoreqHandler",
    "Memory",
    "MemoryFactory",
    "RemotePage",
    "RequestCounters",
    "SlotScanner",
]
