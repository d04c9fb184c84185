"""ioeventfd: guest writes that signal an eventfd instead of reaching the client.

What ``ioeventfd.c`` does. Each VM has one in-daemon range client,
``ioeventfd-<vmid>``, owning one range per assigned ioeventfd; its handler
answers reads with 0 and signals the first entry whose address *equals* the
access address, so other accesses inside a range are consumed and dropped
(spec: hsm 7).
"""

from __future__ import annotations

import errno
import struct

import structlog

from acrn_hsm_emu import abi
from acrn_hsm_emu.hsm import eventfd, express
from acrn_hsm_emu.hsm.acrn_drv import MMIO, PORTIO, Ioeventfd, Vm
from acrn_hsm_emu.hsm.ioreq import Dispatcher, range_add, range_del
from acrn_hsm_emu.observe.trace import refuse

log = structlog.get_logger("acrn_hsm_emu.hsm")

FLAG_PIO = abi.ACRN_IOEVENTFD_FLAG_PIO
FLAG_DATAMATCH = abi.ACRN_IOEVENTFD_FLAG_DATAMATCH
FLAG_DEASSIGN = abi.ACRN_IOEVENTFD_FLAG_DEASSIGN

_ZERO_PIO = bytes(4)
_ZERO_MMIO = bytes(8)
_ARGS = struct.Struct("<IIQIIQ")  # fd, flags, addr, len, reserved, data


def handler(vm: Vm, vcpu: int, typ: int, direction: int, addr: int, size: int, value: int) -> int | bytes:
    """acrn_ioeventfd_handler, run by the dispatcher for requests in the client's ranges."""
    if typ == MMIO:
        if direction == abi.ACRN_IOREQ_DIR_READ:
            return _ZERO_MMIO
    else:
        if direction == abi.ACRN_IOREQ_DIR_READ:
            return _ZERO_PIO
        value &= 0xFFFFFFFF
    for p in vm.ioeventfds:
        if p.type == typ and p.addr == addr and p.length >= size and (p.wildcard or p.data == value):
            eventfd.signal(p.fd)
            break
    return 0


# The express path's C runs this handler itself, in the vCPU's thread
# (hsm_x_ioeventfd in native/express_dispatch.c; express.sync tells it the
# entries): keep the two alike.
handler.express_native = True  # type: ignore[attr-defined]


def forward_handler(
    vm: Vm, vcpu: int, typ: int, direction: int, addr: int, size: int, value: int
) -> int | None:
    """``mismatch="forward"`` (not the driver): signal a matching write, let the rest through.

    Reads and writes that match no entry go on to the device model, as
    KVM's ioeventfds do, instead of being consumed (spec: hsm 7).
    """
    if direction == abi.ACRN_IOREQ_DIR_READ:
        return None
    if typ != MMIO:
        value &= 0xFFFFFFFF
    for p in vm.ioeventfds:
        if p.type == typ and p.addr == addr and p.length >= size and (p.wildcard or p.data == value):
            eventfd.signal(p.fd)
            return 0
    return None


def ioeventfd_init(d: Dispatcher, vm: Vm) -> None:
    vm.ioeventfds = []
    h = forward_handler if d.ioeventfd_mismatch == "forward" else handler
    vm.ioeventfd_client = d.client_create(vm, f"ioeventfd-{vm.vmid}", False, h)


def ioeventfd_deinit(d: Dispatcher, vm: Vm) -> None:
    if vm.ioeventfd_client is not None:
        d.client_destroy(vm.ioeventfd_client)
        vm.ioeventfd_client = None
    close_all(vm)


def close_all(vm: Vm) -> None:
    """Forget every entry and close its eventfd (the VM or the daemon goes)."""
    _forget(vm, list(vm.ioeventfds))


def _forget(vm: Vm, entries: list[Ioeventfd], event: str | None = None) -> None:
    """Take ``entries`` out of the VM (and their ranges out of its client), then
    close their fds: in that order, because the express path's C may signal an
    entry until ``express.sync`` has told it the list without it."""
    client = vm.ioeventfd_client
    for p in entries:
        if client is not None:
            range_del(client, p.type, p.addr, p.addr + p.length - 1)
        vm.ioeventfds.remove(p)
    express.sync(vm)
    for p in entries:
        p.close()
        if event is not None:
            log.debug(event, vmid=vm.vmid, **p.snapshot())


def ioeventfd_config(vm: Vm, pid: int, args: bytes, owner: object = None) -> int:
    """IOEVENTFD after the reserved check: assign or deassign.

    ``owner``: the binding of a bound file (extension ABI) assigning it, so
    that its entries go when that file closes; None for the VM's own file.
    """
    fd, flags, addr, length, _reserved, data = _ARGS.unpack_from(args)
    if flags & FLAG_DEASSIGN:
        return _deassign(vm, pid, fd)
    return _assign(vm, pid, fd, flags, addr, length, data, owner)


def drop_owned(vm: Vm, owner: object) -> None:
    """A bound file closed: its ioeventfds go (with one identical range each)."""
    _forget(vm, [p for p in vm.ioeventfds if p.owner is owner], "hsm.ioeventfd_dropped")


def _assign(
    vm: Vm, pid: int, fd: int, flags: int, addr: int, length: int, data: int, owner: object = None
) -> int:
    if addr + length > 0xFFFFFFFFFFFFFFFF:
        return refuse(errno.EINVAL, "addr={:#x} len={}: the range wraps", addr, length)
    if length not in (1, 2, 4, 8):
        return refuse(errno.EINVAL, "len={}: must be 1, 2, 4 or 8", length)
    try:
        dup = eventfd.fdget(pid, fd)
    except eventfd.EventfdError as e:
        return -e.errno
    typ = PORTIO if flags & FLAG_PIO else MMIO
    wildcard = not flags & FLAG_DATAMATCH
    p = Ioeventfd(dup, addr, 0 if wildcard else data, length, typ, wildcard, owner)
    for q in vm.ioeventfds:
        if (
            q.addr == addr
            and q.type == typ
            and (q.wildcard or wildcard or q.data == p.data)
            and eventfd.same(q.fd, dup)
        ):
            p.close()
            return refuse(errno.EEXIST, "fd {} already signals addr={:#x} len={} with this data match",
                          fd, addr, length)
    client = vm.ioeventfd_client
    assert client is not None
    vm.ioeventfds.append(p)  # before its range: C never sees the range without the entry
    ret = range_add(client, typ, addr, addr + length - 1)  # syncs the express path
    if ret < 0:
        vm.ioeventfds.remove(p)
        express.sync(vm)  # before the close, as in _forget
        p.close()
        return ret
    log.debug("hsm.ioeventfd_assigned", vmid=vm.vmid, **p.snapshot())
    return 0


def _deassign(vm: Vm, pid: int, fd: int) -> int:
    p = eventfd.find_same(pid, fd, vm.ioeventfds, lambda q: q.fd)
    if isinstance(p, int):
        return p
    if p is not None:
        _forget(vm, [p], "hsm.ioeventfd_deassigned")
    return 0
