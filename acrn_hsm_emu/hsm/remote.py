"""Range clients in other processes (extension ABI): what happens to their requests.

A request in such a client's range is copied into the client's own page
(:func:`hand_over`, from the dispatcher's pass); NOTIFY_REQUEST_FINISH on the
client's file completes it in the VM's page (:func:`complete`); a client that
goes away has what it held completed as unclaimed hardware answers
(:func:`gone`). The driver has no such clients (docs/extension-abi.md); the
ioctls that make them are in ranges.py.
"""

from __future__ import annotations

import errno
import struct
from typing import Protocol

import structlog

from acrn_hsm_emu.hsm import express
from acrn_hsm_emu.hsm.acrn_drv import (
    ALL_ONES_32,
    ALL_ONES_64,
    COMPLETE,
    COMPLETE_U32,
    DIR_READ,
    DIR_WRITE,
    FREE,
    KH0_PROCESSING,
    KH1_U32,
    MMIO,
    PORTIO,
    PROCESSING_U32,
    RANGE_KINDS,
    SLOT_ADDRESS,
    SLOT_KH,
    SLOT_POLLING,
    SLOT_STATE,
    SLOT_VALUE,
    SLOTS,
    IoreqClient,
    RemotePage,
    Vm,
)
from acrn_hsm_emu.memory import MemoryFault
from acrn_hsm_emu.observe.events import BUS
from acrn_hsm_emu.observe.trace import TRACE, refuse

log = structlog.get_logger("acrn_hsm_emu.hsm")



class Completer(Protocol):
    """What this needs of the dispatcher (ioreq.Dispatcher)."""

    def complete_slot(self, vm: Vm, vcpu: int, off: int, polling: int, value: bytes | None) -> None: ...

    def notify(self, vm: Vm, vcpu: int) -> int: ...

    def fail_vm(self, vm: Vm, exc: BaseException) -> None: ...


def all_ones(typ: int) -> bytes:
    """What a read of unclaimed hardware gets: the value field's width of ones."""
    return ALL_ONES_64 if typ == MMIO else ALL_ONES_32


def create(vm: Vm, name: str, remote: RemotePage) -> IoreqClient:
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
    if BUS.listeners:
        BUS.emit("client.created", vmid=vm.vmid, client=client.name, kind="range", pid=remote.pid)
    return client


def hand_over(
    d: Completer, vm: Vm, client: IoreqClient, remote: RemotePage, vcpu: int, off: int,
    polling: int, typ: int, direction: int, head: bytes,
) -> None:  # fmt: skip
    """Copy a request into a remote range client's page, then mark the ACRN slot.

    The client sees PROCESSING with kernel_handled = 0 in its own page;
    the ACRN slot gets kernel_handled = 1 so ACRN userspace skips it.
    """
    coff = remote.base + (vcpu << 8)
    assert vm.mem is not None
    try:
        remote.mem.write_then(coff, head, coff + SLOT_KH, KH0_PROCESSING)
    except MemoryFault as e:
        # The client's page is gone (process exiting, page unmapped): answer
        # as unclaimed hardware does and drop the client.
        log.warning(
            "hsm.range_client_fault",
            vmid=vm.vmid, client=client.name, pid=remote.pid, vcpu=vcpu, error=str(e),
        )  # fmt: skip
        vm.counters.orphaned += 1
        client.orphaned += 1
        d.complete_slot(vm, vcpu, off, polling, all_ones(typ) if direction == DIR_READ else None)
        if BUS.listeners:
            BUS.emit("client.fault", vmid=vm.vmid, client=client.name, pid=remote.pid, vcpu=vcpu, error=str(e))
        if TRACE.requests:
            _traced(vm, vcpu, typ, direction, head, client.name, "client_fault")
        drop(d, client, "request page unreachable")
        return
    vm.mem.write_then(off + SLOT_KH, KH1_U32, off + SLOT_STATE, PROCESSING_U32)
    client.set_bit(vcpu)
    client.hold(vcpu, (typ, direction))
    vm.counters.remote += 1
    if TRACE.requests:
        _traced(vm, vcpu, typ, direction, head, client.name, None)
    client.wake()


def _traced(vm: Vm, vcpu: int, typ: int, direction: int, head: bytes, client: str, outcome: str | None) -> None:
    """The trace's view of a hand-over (only called while tracing)."""
    addr, size, value = struct.unpack_from("<QQQ", head, SLOT_ADDRESS)
    kind = RANGE_KINDS.get(typ, str(typ))
    if outcome is None:
        TRACE.dispatched(vm.vmid, vcpu, kind, direction == DIR_WRITE, addr, size, value, client)
    else:
        TRACE.immediate(vm.vmid, vcpu, kind, direction == DIR_WRITE, addr, size, value,
                        int.from_bytes(all_ones(typ), "little"), client, outcome)


def complete(d: Completer, client: IoreqClient, vcpu: int) -> int:
    """NOTIFY_REQUEST_FINISH on a range client's file (extension ABI).

    Only a request the client holds can be completed (else EINVAL); a
    read's value is copied from the client's page into the ACRN slot.
    The client's slot goes back to FREE. A fault on the VM's own page
    raises MemoryFault, as default_complete does.
    """
    vm = client.vm
    remote = client.remote
    assert remote is not None
    if vcpu >= vm.vcpu_num or vcpu >= SLOTS:
        return refuse(errno.EINVAL, "vcpu={}, but VM {} has {} vCPU(s)", vcpu, vm.vmid, vm.vcpu_num)
    if not client.bitmap >> vcpu & 1:
        return refuse(errno.EINVAL, "range client {} holds no request of vcpu {}", client.name, vcpu)
    held = client.held(vcpu)
    typ, direction = held if held is not None else (PORTIO, DIR_WRITE)
    coff = remote.base + (vcpu << 8)
    value: bytes | None = None
    try:
        if direction == DIR_READ:
            value = remote.mem.read(coff + SLOT_VALUE, 8 if typ == MMIO else 4)
        remote.mem.store_u32(coff + SLOT_STATE, FREE)
    except MemoryFault as e:
        log.debug("hsm.range_client_page_fault", client=client.name, vcpu=vcpu, error=str(e))
        # the request stays with the client
        return refuse(errno.EFAULT, "the client's request page is unreachable: {}", e)
    client.clear_bit(vcpu)
    client.hold(vcpu, None)
    client.count_served()
    vm.counters.notified += 1
    return _complete_value(d, vm, vcpu, value)


def _complete_value(
    d: Completer, vm: Vm, vcpu: int, value: bytes | None, outcome: str = "completed"
) -> int:
    """Complete a slot with an optional read value: polling first, COMPLETE, notify."""
    if vm.page_base is None or vm.mem is None:  # the VM was destroyed meanwhile
        return refuse(errno.ENODEV, "the VM was destroyed meanwhile")
    off = vm.page_base + (vcpu << 8)
    polling = vm.mem.load_u32(off + SLOT_POLLING)
    if TRACE.requests:
        TRACE.completed(vm.vmid, vcpu, int.from_bytes(value, "little") if value is not None else None,
                        outcome=outcome)
    if value is None:
        vm.mem.store_u32(off + SLOT_STATE, COMPLETE)
    else:
        vm.mem.write_then(off + SLOT_VALUE, value, off + SLOT_STATE, COMPLETE_U32)
    if polling:
        return 0
    return d.notify(vm, vcpu)


def _complete_orphans(d: Completer, client: IoreqClient) -> list[dict[str, object]]:
    """Complete what a vanished range client held: reads get all ones."""
    vm = client.vm
    done: list[dict[str, object]] = []
    for vcpu in range(SLOTS):
        if not client.bitmap >> vcpu & 1:
            continue
        client.clear_bit(vcpu)
        held = client.held(vcpu)
        client.hold(vcpu, None)
        if held is None:
            continue
        typ, direction = held
        read = direction == DIR_READ
        try:
            ret = _complete_value(d, vm, vcpu, all_ones(typ) if read else None, "orphaned")
        except MemoryFault as e:
            d.fail_vm(vm, e)
            ret = -errno.EFAULT
        client.orphaned += 1
        vm.counters.orphaned += 1
        done.append({"vcpu": vcpu, "kind": RANGE_KINDS.get(typ, str(typ)), "read": read, "ret": ret})
    return done


def drop(d: Completer, client: IoreqClient, reason: str) -> None:
    """Unlink a remote range client from inside a dispatcher pass (no pause/resume)."""
    vm = client.vm
    if client.destroying:
        return
    client.destroying = True
    client.wake()
    vm.range_clients = [c for c in vm.range_clients if c is not client]
    client.ranges.clear()
    express.sync(vm)
    gone(d, client, reason, False)


def gone(d: Completer, client: IoreqClient, reason: str, vm_gone: bool) -> None:
    """The client is destroyed or dropped: complete what it held (unless its VM goes), log it."""
    vm = client.vm
    remote = client.remote
    assert remote is not None
    if vm_gone:
        client.bitmap = 0
        for vcpu in range(SLOTS):
            client.hold(vcpu, None)
        log.info("hsm.range_client_destroyed", vmid=vm.vmid, client=client.name, reason=reason)
        return
    done = _complete_orphans(d, client)
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
