"""Range clients in other processes: the extension ABI's side of the HSM.

The driver only lets in-kernel code register address ranges; everything
else reaches ACRN userspace through the one default client. Here a process
other than the VM's creator binds an open file to the VM, creates a named
range client whose request page lives in its own memory, and registers
PIO, MMIO and PCI ranges. The dispatcher (ioreq.py) copies a matched
request into that page and completes it when the client answers.
Numbers, structs and errno: docs/extension-abi.md, include/acrn_hsm_emu.h.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from typing import Literal

import structlog

from acrn_hsm_emu.client import extension as ext
from acrn_hsm_emu.hsm import remote
from acrn_hsm_emu.hsm.acrn_drv import (
    CLIENT_NAME_MAX,
    MMIO,
    PCICFG,
    PORTIO,
    RANGE_KINDS,
    SLOTS,
    Binding,
    IoreqClient,
    RemotePage,
    Vm,
)
from acrn_hsm_emu.hsm.ioreq import Dispatcher, range_add, range_del
from acrn_hsm_emu.memory import PAGE_SIZE, MemoryFault
from acrn_hsm_emu.observe.trace import refuse
from cdev.device import RequestContext

log = structlog.get_logger("acrn_hsm_emu.hsm")

# Who may bind a file to a VM: "owner" = the VM creator's uid or root (the
# default), "root" = root only, "any" = everybody, or a predicate.
BindPolicy = Literal["owner", "root", "any"] | Callable[[RequestContext, Vm], bool]

_FREE_STATE = (3).to_bytes(4, "little")  # ACRN_IOREQ_STATE_FREE
_STATE_OFF = 136
_PIO_MAX = 0xFFFF
_BDF_MAX = 0xFFFF


def may_bind(policy: BindPolicy, ctx: RequestContext, vm: Vm) -> bool:
    if callable(policy):
        return bool(policy(ctx, vm))
    if policy == "any":
        return True
    if ctx.uid == 0:
        return True
    return policy == "owner" and ctx.uid == vm.owner_uid


def find_vm(d: Dispatcher, vmid: int) -> Vm | None:
    """The listed VM with that vmid (newest first, as the dispatcher sees them)."""
    for vm in d.vms:
        if vm.live and vm.vmid == vmid:
            return vm
    return None


def bind(
    d: Dispatcher, policy: BindPolicy, ctx: RequestContext, args: bytes
) -> tuple[int, Binding | None, bytes]:
    """ACRN_EMU_IOCTL_BIND_VM: (result, binding, bytes to copy back)."""
    req = ext.AcrnEmuBind.from_buffer_copy(args[: ctypes.sizeof(ext.AcrnEmuBind)])
    if req.flags or req.reserved:
        return refuse(errno.EINVAL, "flags={:#x} reserved={:#x}: must be 0", req.flags, req.reserved), None, b""
    vm = find_vm(d, req.vmid)
    if vm is None:
        return refuse(errno.ENOENT, "no VM with vmid {}", req.vmid), None, b""
    if not may_bind(policy, ctx, vm):
        log.warning(
            "hsm.bind_refused",
            vmid=vm.vmid, uid=ctx.uid, pid=ctx.pid, owner_uid=vm.owner_uid,
            policy=policy if isinstance(policy, str) else "custom",
        )  # fmt: skip
        return refuse(errno.EPERM, "the bind policy refuses uid {} (the VM's owner is uid {})", ctx.uid,
                      vm.owner_uid), None, b""
    binding = Binding(vm, ctx)
    vm.bindings.append(binding)
    req.vcpu_num = vm.vcpu_num
    req.owner_uid = vm.owner_uid
    log.info("hsm.file_bound", vmid=vm.vmid, pid=ctx.pid, uid=ctx.uid)
    return 0, binding, bytes(req)


def create_client(
    d: Dispatcher, binding: Binding, ctx: RequestContext, args: bytes, fh: int = 0
) -> int:
    """ACRN_EMU_IOCTL_CREATE_RANGE_CLIENT (``fh``: the bound file's cdev handle, which
    lets the express path answer the client's ATTACH and NOTIFY; 0 unknown)."""
    req = ext.AcrnEmuRangeClient.from_buffer_copy(args[: ctypes.sizeof(ext.AcrnEmuRangeClient)])
    if req.flags or req.reserved:
        return refuse(errno.EINVAL, "flags={:#x} reserved={:#x}: must be 0", req.flags, req.reserved)
    raw = bytes(req)[: ext.ACRN_EMU_NAME_LEN]
    if b"\0" not in raw:
        return refuse(errno.EINVAL, "the name is not NUL-terminated within {} bytes", ext.ACRN_EMU_NAME_LEN)
    name_b = raw.split(b"\0", 1)[0]
    if not 1 <= len(name_b) <= CLIENT_NAME_MAX or not name_b.isascii() or not name_b.decode().isprintable():
        return refuse(errno.EINVAL, "name {!r}: 1 to {} printable ASCII characters", name_b, CLIENT_NAME_MAX)
    name = name_b.decode()
    if binding.live_client is not None:
        return refuse(errno.EEXIST, "this file has a range client already")
    vm = binding.vm
    for c in vm.range_clients:
        if c.name == name:
            return refuse(errno.EEXIST, "VM {} has a client named {!r} already", vm.vmid, name)
    base = req.ioreq_buf & ~(PAGE_SIZE - 1)
    mem = d.memory(ctx.pid)
    try:
        mem.check_writable(base, PAGE_SIZE)
        for i in range(SLOTS):  # as the hypervisor frees every slot of a new page
            mem.write(base + i * 256 + _STATE_OFF, _FREE_STATE)
    except MemoryFault as e:
        log.debug("hsm.range_page_pin_failed", vmid=vm.vmid, pid=ctx.pid, error=str(e))
        return refuse(errno.EFAULT, "the client's request page is not writable ({})", e)
    binding.client = remote.create(vm, name, RemotePage(mem, base, ctx.pid, ctx.uid, fh))
    return 0


def _parse_range(args: bytes) -> tuple[int, int, int] | int:
    r = ext.AcrnEmuRange.from_buffer_copy(args[: ctypes.sizeof(ext.AcrnEmuRange)])
    if r.reserved or r.type not in (PORTIO, MMIO, PCICFG) or r.end < r.start:
        return refuse(errno.EINVAL, "type={} start={:#x} end={:#x} reserved={:#x}: a PIO, MMIO or PCI range, "
                      "start <= end, reserved 0", r.type, r.start, r.end, r.reserved)
    if r.type == PORTIO and r.end > _PIO_MAX:
        return refuse(errno.EINVAL, "end={:#x}: ports stop at {:#x}", r.end, _PIO_MAX)
    if r.type == PCICFG and r.end > _BDF_MAX:
        return refuse(errno.EINVAL, "end={:#x}: BDFs stop at {:#x}", r.end, _BDF_MAX)
    return r.type, r.start, r.end


def _describe(typ: int, start: int, end: int) -> str:
    if typ == PCICFG:
        def bdf(v: int) -> str:
            return f"{v >> 8:02x}:{(v >> 3) & 0x1F:02x}.{v & 7}"

        return f"pci {bdf(start)}-{bdf(end)}"
    return f"{RANGE_KINDS[typ]} {start:#x}-{end:#x}"


def _client_range(binding: Binding, args: bytes) -> tuple[IoreqClient, tuple[int, int, int]] | int:
    """The bound range client and the parsed range of an ADD/DEL_RANGE, or -errno."""
    client = binding.live_client
    if client is None:
        return refuse(errno.ENODEV, "this file has no range client (CREATE_RANGE_CLIENT first)")
    parsed = _parse_range(args)
    if isinstance(parsed, int):
        return parsed
    return client, parsed


def add_range(binding: Binding, args: bytes) -> int:
    """ACRN_EMU_IOCTL_ADD_RANGE: no overlap with another client's range (EBUSY)."""
    got = _client_range(binding, args)
    if isinstance(got, int):
        return got
    client, (typ, start, end) = got
    vm = binding.vm
    for other in vm.range_clients:
        if other is client or other.remote is None:
            continue  # own ranges may overlap; the ioeventfd client keeps precedence
        for otyp, ostart, oend in other.ranges:
            if otyp == typ and ostart <= end and start <= oend:
                log.warning(
                    "hsm.range_busy",
                    vmid=vm.vmid,
                    client=client.name,
                    pid=client.remote.pid if client.remote else None,
                    range=_describe(typ, start, end),
                    owner=other.name,
                    owner_pid=other.remote.pid,
                    owner_range=_describe(otyp, ostart, oend),
                )
                return refuse(errno.EBUSY, "{} overlaps {} of client {!r}", _describe(typ, start, end),
                              _describe(otyp, ostart, oend), other.name)
    if len(client.ranges) >= ext.ACRN_EMU_MAX_RANGES:
        return refuse(errno.ENOSPC, "the client has {} ranges, the most", ext.ACRN_EMU_MAX_RANGES)
    range_add(client, typ, start, end, newest_first=False)
    log.info("hsm.range_added", vmid=vm.vmid, client=client.name, range=_describe(typ, start, end))
    return 0


def del_range(binding: Binding, args: bytes) -> int:
    """ACRN_EMU_IOCTL_DEL_RANGE: the first identical range; ENOENT if none."""
    got = _client_range(binding, args)
    if isinstance(got, int):
        return got
    client, parsed = got
    if not range_del(client, *parsed):
        return refuse(errno.ENOENT, "the client has no range {}", _describe(*parsed))
    log.info("hsm.range_deleted", vmid=binding.vm.vmid, client=client.name, range=_describe(*parsed))
    return 0


def unbind(d: Dispatcher, binding: Binding, reason: str) -> None:
    """The bound file is closing (or rebinding): its client goes, requests completed."""
    client = binding.live_client
    if client is not None:
        d.client_destroy(client, reason)
    binding.client = None
    vm = binding.vm
    vm.bindings = [b for b in vm.bindings if b is not binding]
