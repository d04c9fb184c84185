"""A per-VM record of the interrupt, PM and device hypercalls the HSM made.

The kernel keeps no such record; it is what makes INJECT_MSI, SET_IRQLINE,
VM_INTR_MONITOR, PM_GET_CPU_STATE, SET/RESET_PTDEV_INTR,
ASSIGN/DEASSIGN_PCIDEV/MMIODEV, CREATE/DESTROY_VDEV and irqfd injections
observable in ``acrn-hsm-emu status``: per hypercall the number of calls,
of failures and the last return value, and the most recent calls with
their decoded arguments. The hypervisor's validation decides the return
values (spec: hv A.1.1); its own state (MSIs received, IRQ line levels,
devices) is in the hypervisor's part of the status.
"""

from __future__ import annotations

import collections
import ctypes
import struct
from typing import Any

from acrn_hsm_emu import abi
from acrn_hsm_emu._native import ffi, lib

RECENT = 32


def _bdf(v: int) -> str:
    return f"{(v >> 8) & 0xFF:02x}:{(v >> 3) & 0x1F:02x}.{v & 7}"


def _struct(cls: type[ctypes.Structure], data: bytes) -> Any:
    n = ctypes.sizeof(cls)
    return cls.from_buffer_copy(bytes(data[:n]).ljust(n, b"\0"))


def decode(name: str, arg: bytes | int) -> dict[str, Any]:
    """The interesting fields of a hypercall's argument, JSON-friendly."""
    try:
        if name == "inject_msi" and isinstance(arg, bytes | bytearray):
            m = _struct(abi.AcrnMsiEntry, arg)
            return {"msi_addr": m.msi_addr, "msi_data": m.msi_data, "vector": m.msi_data & 0xFF}
        if name == "set_irqline" and isinstance(arg, int):
            return {"gsi": arg & 0xFFFFFFFF, "op": (arg >> 32) & 0xFFFFFFFF}
        if name in ("set_ptdev_intr", "reset_ptdev_intr") and isinstance(arg, bytes | bytearray):
            i = _struct(abi.AcrnPtdevIrq, arg)
            return {
                "type": i.type, "virt_bdf": _bdf(i.virt_bdf), "phys_bdf": _bdf(i.phys_bdf),
                "virt_pin": i.intx.virt_pin, "phys_pin": i.intx.phys_pin,
                "pic_pin": bool(i.intx.is_pic_pin),
            }  # fmt: skip
        if name in ("assign_pcidev", "deassign_pcidev") and isinstance(arg, bytes | bytearray):
            p = _struct(abi.AcrnPcidev, arg)
            return {"virt_bdf": _bdf(p.virt_bdf), "phys_bdf": _bdf(p.phys_bdf), "type": p.type}
        if name in ("assign_mmiodev", "deassign_mmiodev") and isinstance(arg, bytes | bytearray):
            d = _struct(abi.AcrnMmiodev, arg)
            return {
                "dev_name": bytes(d.name).split(b"\0", 1)[0].decode(errors="replace"),
                "res": [
                    {"user_vm_pa": r.user_vm_pa, "service_vm_pa": r.service_vm_pa, "size": r.size}
                    for r in d.res
                    if r.size
                ],
            }
        if name in ("create_vdev", "destroy_vdev") and isinstance(arg, bytes | bytearray):
            v = _struct(abi.AcrnVdev, arg)
            return {
                "vendor": v.id.fields.vendor, "device": v.id.fields.device,
                "slot": _bdf(v.slot & 0xFFFF),
            }  # fmt: skip
        if name == "get_cpu_state" and isinstance(arg, int):
            return {
                "type": arg & abi.PMCMD_TYPE_MASK,
                "state": (arg & abi.PMCMD_STATE_NUM_MASK) >> abi.PMCMD_STATE_NUM_SHIFT,
                "vcpu": (arg & abi.PMCMD_VCPUID_MASK) >> abi.PMCMD_VCPUID_SHIFT,
                "vmid": (arg & abi.PMCMD_VMID_MASK) >> abi.PMCMD_VMID_SHIFT,
            }
        if name == "vm_intr_monitor" and isinstance(arg, int):
            return {"page": arg}
    except (ValueError, AttributeError):
        pass
    return {}


# A call in the ring: its fields, or (seq, name, ret, source, arg) for decode() to read
# when a snapshot asks (record_arg).
_Entry = dict[str, Any] | tuple[int, str, int, str, "bytes | int"]


_MSI = struct.Struct("<QQ")  # struct acrn_msi_entry
_BATCH = 256
_OUT = ffi.new("struct hsm_irq_rec[]", _BATCH)  # fold's (the trio thread's)


class HypercallLog:
    """Counts per hypercall and a ring of the latest calls, for one VM.

    ``native``: the VM's native interrupt hypercalls (``struct hsm_irq_gate *``) while
    the express path answers INJECT_MSI and SET_IRQLINE through them; each call they
    made is replayed here as the ioctl's handler records it, before any call recorded
    here and whenever the log is read (:meth:`fold`), so that the calls keep their order.
    """

    __slots__ = ("counts", "recent", "seq", "native")

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self.recent: collections.deque[_Entry] = collections.deque(maxlen=RECENT)
        self.seq = 0
        self.native: Any = None

    def fold(self) -> None:
        """Take in the calls made natively since the last fold."""
        g = self.native
        if g is None or g.n == g.taken[lib.HSM_IRQ_HSM]:  # only this (the trio thread) moves taken
            return
        while True:
            k = lib.hsm_irq_take(g, lib.HSM_IRQ_HSM, _OUT, _BATCH)
            for r in _OUT[0:k]:
                if r.kind == lib.HSM_IRQ_MSI:
                    self._add("inject_msi", 0, "ioctl", _MSI.pack(r.a, r.b))
                else:
                    self._add("set_irqline", 0, "ioctl", r.a)
            if k < _BATCH:
                return

    def _count(self, name: str, ret: int) -> None:
        c = self.counts.get(name)
        if c is None:
            c = self.counts[name] = {"calls": 0, "failed": 0, "last_ret": 0}
        c["calls"] += 1
        if ret < 0:
            c["failed"] += 1
        c["last_ret"] = ret
        self.seq += 1

    def _add(self, name: str, ret: int, source: str, arg: bytes | int) -> None:
        self._count(name, ret)
        self.recent.append((self.seq, name, ret, source, arg))

    def record(self, name: str, ret: int, source: str = "ioctl", /, **fields: Any) -> None:
        if self.native is not None:
            self.fold()
        self._count(name, ret)
        self.recent.append({"seq": self.seq, "call": name, "ret": ret, "source": source, **fields})

    def record_arg(self, name: str, ret: int, arg: bytes | int, source: str = "ioctl") -> None:
        """:meth:`record` with the fields :func:`decode` finds in ``arg``, decoded only when a
        snapshot asks: the way of the calls a device model makes all the time (interrupts)."""
        if self.native is not None:
            self.fold()
        self._add(name, ret, source, arg)

    def snapshot(self) -> dict[str, Any]:
        self.fold()
        recent = [
            e if isinstance(e, dict) else {"seq": e[0], "call": e[1], "ret": e[2], "source": e[3], **decode(e[1], e[4])}
            for e in self.recent
        ]
        return {"counts": {k: dict(v) for k, v in self.counts.items()}, "recent": recent}
