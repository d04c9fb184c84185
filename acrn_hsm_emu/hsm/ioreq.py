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

import structlog
import trio

from acrn_hsm_emu import abi
from acrn_hsm_emu._native import lib
from acrn_hsm_emu.hsm import acrn_kernel, express, remote
from acrn_hsm_emu.hsm.acrn_drv import (
    ALL_ONES_32,
    COMPLETE,
    COMPLETE_U32,
    DIR_READ,
    DIR_WRITE,
    HEAD_LEN,
    KH0_U32,
    KH1_U32,
    MMIO,
    PCICFG,
    PENDING,
    PORTIO,
    PROCESSING_U32,
    SLOT_KH,
    SLOT_POLLING,
    SLOT_STATE,
    SLOT_VALUE,
    SLOTS,
    U32,
    IoreqClient,
    IoreqHandler,
    MemoryFactory,
    RequestCounters,
    SlotScanner,
    Vm,
)
from acrn_hsm_emu.hypervisor.api import FdUpcall, Hypercalls
from acrn_hsm_emu.memory import PAGE_SIZE, MemoryFault, SharedPage
from acrn_hsm_emu.observe.events import BUS
from acrn_hsm_emu.observe.trace import TRACE, refuse

log = structlog.get_logger("acrn_hsm_emu.hsm")

_PCI_BUS = abi.SLOT_PCI_BUS

# type, completion_polling, direction, address, size, value (u64; PIO uses the low half)
_HEAD = struct.Struct("<II56xI4xQQQ")
assert _HEAD.size == abi.SLOT_VALUE + 8
_PCI = struct.Struct("<IIII")  # bus, dev, func, reg
_PCI3 = struct.Struct("<III")  # bus, dev, func
_NOTIFY = struct.Struct("<HHI")  # struct acrn_ioreq_notify: vmid, reserved, vcpu
_U64_MASK = (1 << 64) - 1
_KINDS = {PORTIO: "pio", MMIO: "mmio", PCICFG: "pci"}

PCI_CONF_ADDR = 0xCF8
PCI_CONF_DATA = 0xCFC
CONF1_ENABLE = 0x80000000


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
            if BUS.listeners:
                BUS.emit("vm.failed", vmid=vm.vmid, pid=vm.owner_pid, error=str(exc))
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
        tr = TRACE.requests  # once per pass: nothing more while nobody traces
        for i in range(scanner.nslots):
            if U32.unpack_from(data, (i << 8) + SLOT_STATE)[0] != PENDING:
                continue
            off = base + (i << 8)
            head = span + (i << 8)
            typ, polling, direction, addr, size, value = _HEAD.unpack_from(data, head)

            if vm.clearing:
                counters.cleared += 1
                self._count_type(counters, typ)
                self.complete_slot(vm, i, off, polling, None)
                if tr:
                    _traced(vm, i, typ, direction, addr, size, value, "(clearing)", None, "cleared")
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
                        self.complete_slot(vm, i, off, polling, None)
                    else:
                        self.complete_slot(vm, i, off, polling, U32.pack(conf))
                    if tr:
                        _traced(vm, i, typ, direction, addr, size, value, "(cf8)", conf, "completed")
                    continue
                if not conf & CONF1_ENABLE:
                    counters.pio += 1
                    counters.cf8 += 1
                    self.complete_slot(vm, i, off, polling, ALL_ONES_32 if direction == DIR_READ else None)
                    if tr:
                        _traced(vm, i, typ, direction, addr, size, value, "(cfc, cf8 disabled)",
                                0xFFFFFFFF, "completed")
                    continue
                folded = bytearray(data[head : head + HEAD_LEN])
                U32.pack_into(folded, 0, PCICFG)
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
                    if tr:
                        _traced(vm, i, typ, direction, addr, size, value, "(none)", None, "stalled")
                    return  # no client: abort this VM's scan, the request stays PENDING
                counters.default += 1
                mem.write_then(off + SLOT_KH, KH0_U32, off + SLOT_STATE, PROCESSING_U32)
                client.set_bit(i)
                if tr:
                    TRACE.dispatched(vm.vmid, i, _KINDS.get(typ, str(typ)), direction == DIR_WRITE, addr,
                                     size, value, client.name)
                client.wake()
                continue

            counters.range += 1
            handler = client.handler
            if handler is None:
                page = client.remote
                if page is not None:  # a range client in another process
                    remote.hand_over(
                        self, vm, client, page, i, off, polling, typ, direction,
                        bytes(folded) if folded is not None else data[head : head + HEAD_LEN],
                    )  # fmt: skip
                    continue
                mem.write_then(off + SLOT_KH, KH1_U32, off + SLOT_STATE, PROCESSING_U32)
                client.set_bit(i)
                if tr:
                    TRACE.dispatched(vm.vmid, i, _KINDS.get(typ, str(typ)), direction == DIR_WRITE, addr,
                                     size, value, client.name)
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
                mem.write_then(off + SLOT_KH, KH1_U32, off + SLOT_STATE, PROCESSING_U32)
                client.set_bit(i)
                log.debug("hsm.ioreq_handler_failed", client=client.name, vcpu=i, err=result)
                if tr:
                    _traced(vm, i, typ, direction, addr, size, value, client.name, None, "handler_failed")
                continue
            counters.in_kernel += 1
            if isinstance(result, bytes):
                mem.write(off + SLOT_VALUE, result)
            mem.write_then(off + SLOT_KH, KH1_U32, off + SLOT_STATE, COMPLETE_U32)
            if tr:
                _traced(vm, i, typ, direction, addr, size, value, client.name,
                        int.from_bytes(result, "little") if isinstance(result, bytes) else 0, "completed")
            if not polling:
                self.notify(vm, i)

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
                remote.hand_over(
                    self, vm, c, c.remote, vcpu, off, polling, typ, direction,
                    data[head : head + HEAD_LEN],
                )  # fmt: skip
                return
        client = vm.default_client
        assert vm.mem is not None
        if client is None:
            vm.counters.stalled += 1
            return  # stays PENDING until a client exists (this pass goes on with other slots)
        vm.counters.default += 1
        vm.mem.write_then(off + SLOT_KH, KH0_U32, off + SLOT_STATE, PROCESSING_U32)
        client.set_bit(vcpu)
        if TRACE.requests:
            TRACE.dispatched(vm.vmid, vcpu, _KINDS.get(typ, str(typ)), direction == DIR_WRITE, addr, size,
                             int.from_bytes(data[head + abi.SLOT_VALUE : head + abi.SLOT_VALUE + 8], "little"),
                             client.name)
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

    def complete_slot(self, vm: Vm, vcpu: int, off: int, polling: int, value: bytes | None) -> None:
        """ioreq_complete_request with the polling flag already read from the slot."""
        mem = vm.mem
        assert mem is not None
        if value is None:
            mem.store_u32(off + SLOT_STATE, COMPLETE)
        else:
            mem.write_then(off + SLOT_VALUE, value, off + SLOT_STATE, COMPLETE_U32)
        if not polling:
            self.notify(vm, vcpu)

    def notify(self, vm: Vm, vcpu: int) -> int:
        ret = self.hv.notify_request_finish(vm.vmid, vcpu)
        if ret < 0:
            vm.counters.notify_failed += 1
            # the first failure of a VM is an error; repeating it per request would flood
            level = log.error if vm.counters.notify_failed == 1 else log.debug
            level("hsm.notify_failed", vmid=vm.vmid, vcpu=vcpu, ret=ret)
            if BUS.listeners:
                BUS.emit("notify.failed", vmid=vm.vmid, vcpu=vcpu, ret=ret)
        return ret

    # -- completion ---------------------------------------------------------

    def complete(self, vm: Vm, vcpu: int) -> int:
        """ioreq_complete_request: polling read first, COMPLETE, notify unless polling."""
        if vcpu >= SLOTS:  # the kernel would index past the page here
            return refuse(errno.EINVAL, "vcpu={} is past the request page's {} slots", vcpu, SLOTS)
        if vm.page_base is None or vm.mem is None:
            return refuse(errno.EINVAL, "VM {} has no request page", vm.vmid)
        off = vm.page_base + (vcpu << 8)
        polling = vm.mem.load_u32(off + SLOT_POLLING)
        if TRACE.requests:  # the answer, before the vCPU may free the slot
            TRACE.completed(vm.vmid, vcpu, int.from_bytes(vm.mem.read(off + SLOT_VALUE, 8), "little"))
        vm.mem.store_u32(off + SLOT_STATE, COMPLETE)
        if polling:
            return 0
        return self.notify(vm, vcpu)

    def client_complete(self, client: IoreqClient, vcpu: int) -> int:
        """acrn_ioreq_complete_request."""
        vm = client.vm
        if vcpu >= vm.vcpu_num:
            return refuse(errno.EINVAL, "vcpu={}, but VM {} has {} vCPU(s)", vcpu, vm.vmid, vm.vcpu_num)
        client.clear_bit(vcpu)
        return self.complete(vm, vcpu)

    def default_complete(self, vm: Vm, vcpu: int) -> int:
        """NOTIFY_REQUEST_FINISH: the default client's slot, whatever its state."""
        client = vm.default_client
        if client is None:
            return 0
        vm.counters.notified += 1
        return self.client_complete(client, vcpu)

    # -- clients ------------------------------------------------------------

    def client_create(
        self, vm: Vm, name: str, is_default: bool, handler: IoreqHandler | None = None,
        pid: int | None = None,
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
        if BUS.listeners:
            BUS.emit("client.created", vmid=vm.vmid, client=client.name,
                     kind="default" if is_default else "in-daemon", pid=pid)
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
            remote.gone(self, client, reason, vm_gone)
        else:
            log.debug("hsm.client_destroyed", vmid=vm.vmid, client=client.name)
        if BUS.listeners:
            kind = "default" if client.is_default else "range" if client.remote is not None else "in-daemon"
            BUS.emit("client.destroyed", vmid=vm.vmid, client=client.name, kind=kind, reason=reason)
        self.resume()

    # -- request page ---------------------------------------------------------

    def ioreq_init(self, vm: Vm, pid: int, buf: int) -> int:
        """acrn_ioreq_init: "pin" the caller's page containing ``buf`` and hand it over."""
        if vm.page_base is not None:
            return refuse(errno.EEXIST, "VM {} has a request page already", vm.vmid)
        base = buf & ~(PAGE_SIZE - 1)
        mem = self.memory(pid)
        try:
            mem.check_writable(base, PAGE_SIZE)
        except MemoryFault as e:
            log.debug("hsm.ioreq_pin_failed", vmid=vm.vmid, pid=pid, error=str(e))
            return refuse(errno.EFAULT, "ioreq_buf={:#x}: its page is not writable in pid {} ({})", buf, pid, e)
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


def notify_vcpu(arg: bytes) -> int:
    """The vCPU of an ``acrn_ioreq_notify`` argument, or -EFAULT/-EINVAL as the driver."""
    if len(arg) < _NOTIFY.size:
        return refuse(errno.EFAULT, "the argument could not be read")
    vcpu: int
    _vmid, reserved, vcpu = _NOTIFY.unpack_from(arg)
    if reserved:
        return refuse(errno.EINVAL, "reserved={:#x}, must be 0", reserved)
    return vcpu & 0xFFFF


def _traced(
    vm: Vm, vcpu: int, typ: int, direction: int, addr: int, size: int, value: int, client: str,
    answer: int | None, outcome: str,
) -> None:  # fmt: skip
    """A request answered where it was dispatched, for the trace (only called while tracing)."""
    TRACE.immediate(vm.vmid, vcpu, _KINDS.get(typ, str(typ)), direction == DIR_WRITE, addr, size, value,
                    answer, client, outcome)


def range_add(
    client: IoreqClient, type: int, start: int, end: int, *, newest_first: bool = True
) -> int:
    """acrn_ioreq_range_add: an inclusive range (the driver's list_add puts it first;
    a remote client's list keeps the order it was given in)."""
    if end < start:
        return refuse(errno.EINVAL, "range {:#x}..{:#x} ends before it starts", start, end)
    if newest_first:
        client.ranges.insert(0, (type, start, end))
    else:
        client.ranges.append((type, start, end))
    express.sync(client.vm)
    return 0

def range_del(client: IoreqClient, type: int, start: int, end: int) -> bool:
    """acrn_ioreq_range_del: the first identical range; False if there is none."""
    try:
        client.ranges.remove((type, start, end))
    except ValueError:
        return False
    express.sync(client.vm)
    return True


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
    "ClearOp",
    "Dispatcher",
    "notify_vcpu",
    "range_add",
    "range_del",
]
