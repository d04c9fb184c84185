"""The live trace: every ioctl with its answer and the rule behind a refusal, every I/O request
with the client that got it, its answer and its latency (``acrn-hsm-emu trace``).

Cost when nobody listens. A handler that refuses returns ``refuse(errno, why, *args)``
instead of ``-errno``: with no tracer attached that is one attribute test, and the
reason is neither formatted nor stored (:func:`format_reason` runs only for a record
that is sent; ``STATS`` counts what the trace did, which the tests read). The request
paths test :attr:`Trace.requests` once per request; the express path records into a
C ring only while a tracer is attached (``struct hsm_xtrace``, NULL otherwise).

Everything here runs in the trio thread: records are built there and go to each
subscriber's bounded channel without waiting (a slow reader loses records, and is
told how many, rather than slowing the daemon).
"""

from __future__ import annotations

import errno
import struct
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from acrn_hsm_emu import abi
from acrn_hsm_emu import acrn_kernel_abi as ak
from acrn_hsm_emu.client import extension as ext

__all__ = [
    "STATS", "TRACE", "Filter", "Stats", "Subscriber", "Trace", "format_reason", "ioctl_name", "refuse",
]  # fmt: skip


class Stats:
    """What the trace has done in this process (the cost tests read these counters)."""

    __slots__ = ("formatted", "records")

    def __init__(self) -> None:
        self.formatted = 0  # reasons formatted
        self.records = 0  # records built and offered

    def reset(self) -> None:
        self.formatted = 0
        self.records = 0


STATS = Stats()


def format_reason(why: str, args: tuple[object, ...]) -> str:
    """The rule behind a refusal, as the trace shows it: ``why.format(*args)``."""
    STATS.formatted += 1
    try:
        return why.format(*args) if args else why
    except (IndexError, KeyError, ValueError):
        return f"{why} {args!r}"


def refuse(err: int, why: str, *args: object) -> int:
    """``-err``, the answer of a handler that refuses; ``why`` (a ``str.format`` template
    of ``args``) is the rule, kept for the trace only while a tracer listens."""
    if TRACE.active:
        TRACE.reason = (why, args)
    return -err


# -- ioctl names and arguments ------------------------------------------------------------

def _names() -> dict[int, str]:
    names: dict[int, str] = {}
    for module, prefix in ((abi, "ACRN_IOCTL_"), (ak, "ACRN_IOCTL_"), (ext, "ACRN_EMU_IOCTL_")):
        for key, value in vars(module).items():
            if key.startswith(prefix) and key != "ACRN_IOCTL_TYPE" and isinstance(value, int):
                names.setdefault(value, key.removeprefix("ACRN_IOCTL_").removeprefix("ACRN_"))
    return names


_NAMES = _names()


def ioctl_name(cmd: int) -> str:
    """``NOTIFY_REQUEST_FINISH`` for its number; ``ioctl 0x...`` for one we do not know."""
    return _NAMES.get(cmd, f"ioctl {cmd:#x}")


_NOTIFY = struct.Struct("<HHI")
_CREATION = struct.Struct("<HHHH16xQQQ")  # vmid, reserved0, vcpu_num, reserved1, vm_flag, ioreq_buf, cpu_affinity
_MEMMAP = struct.Struct("<IIQQQ")  # type, attr, user_vm_pa, vma_base/service_vm_pa, len
_IOEVENTFD = struct.Struct("<IIQIIQ")  # fd, flags, addr, len, reserved, data
_IRQFD = struct.Struct("<iIQQ")  # fd, flags, msi addr, msi data
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")


def decode_args(cmd: int, arg: int, data: bytes) -> dict[str, Any]:
    """The arguments of an ioctl worth showing (only called while tracing)."""
    from acrn_hsm_emu.hsm.hypercall_log import decode  # the HSM imports this module

    try:
        if cmd == abi.ACRN_IOCTL_NOTIFY_REQUEST_FINISH and len(data) >= _NOTIFY.size:
            vmid, reserved, vcpu = _NOTIFY.unpack_from(data)
            out: dict[str, Any] = {"vmid": vmid, "vcpu": vcpu}
            if reserved:
                out["reserved"] = reserved
            return out
        if cmd == abi.ACRN_IOCTL_CREATE_VM and len(data) >= _CREATION.size:
            _v, _r0, _n, _r1, flags, buf, aff = _CREATION.unpack_from(data)
            return {"vm_flag": flags, "ioreq_buf": buf, "cpu_affinity": aff}
        if cmd in (abi.ACRN_IOCTL_SET_MEMSEG, abi.ACRN_IOCTL_UNSET_MEMSEG) and len(data) >= _MEMMAP.size:
            typ, attr, gpa, va, length = _MEMMAP.unpack_from(data)
            return {"type": "mmio" if typ == abi.ACRN_MEMMAP_MMIO else "ram" if typ == abi.ACRN_MEMMAP_RAM
                    else typ, "attr": attr, "user_vm_pa": gpa, "vma_base": va, "len": length}
        if cmd == abi.ACRN_IOCTL_IOEVENTFD and len(data) >= _IOEVENTFD.size:
            fd, flags, addr, length, _res, value = _IOEVENTFD.unpack_from(data)
            return {"fd": fd, "flags": flags, "addr": addr, "len": length, "data": value}
        if cmd == abi.ACRN_IOCTL_IRQFD and len(data) >= _IRQFD.size:
            fd, flags, maddr, mdata = _IRQFD.unpack_from(data)
            return {"fd": fd, "flags": flags, "msi_addr": maddr, "msi_data": mdata}
        if cmd == abi.ACRN_IOCTL_INJECT_MSI:
            return decode("inject_msi", data)
        if cmd == abi.ACRN_IOCTL_SET_IRQLINE:
            return decode("set_irqline", arg)
        if cmd == abi.ACRN_IOCTL_PM_GET_CPU_STATE and len(data) >= 8:
            return decode("get_cpu_state", _U64.unpack_from(data)[0])
        if cmd == abi.ACRN_IOCTL_SET_VCPU_REGS and len(data) >= 2:
            return {"vcpu_id": _U16.unpack_from(data)[0]}
        if cmd == abi.ACRN_IOCTL_VM_INTR_MONITOR:
            return {"page": arg}
    except struct.error:
        pass
    if data:
        return {"arg": arg, "bytes": len(data)}
    return {"arg": arg} if arg else {}


def decode_out(cmd: int, data: bytes) -> dict[str, Any]:
    """What an ioctl gave back worth showing (CREATE_VM's vmid and vCPU count)."""
    if cmd == abi.ACRN_IOCTL_CREATE_VM and len(data) >= _CREATION.size:
        vmid, _r0, vcpu_num, *_ = _CREATION.unpack_from(data)
        return {"vmid": vmid, "vcpu_num": vcpu_num}
    return {}


def errno_name(err: int) -> str:
    return errno.errorcode.get(err, f"errno {err}")


# -- subscribers ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filter:
    """What one ``trace`` client wants: ioctls, requests, one VM or vCPU, only errors."""

    ioctls: bool = True
    requests: bool = True
    vm: int | None = None
    vcpu: int | None = None
    errors: bool = False

    @classmethod
    def from_request(cls, req: dict[str, Any]) -> Filter:
        """From the control request's fields; ValueError names the one that is wrong."""

        def opt_int(name: str) -> int | None:
            v = req.get(name)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 0xFFFF:
                raise ValueError(f"trace: {name} must be a number from 0 to 65534, not {v!r}")
            return v

        what = req.get("what", "all")
        if what not in ("all", "ioctls", "requests"):
            raise ValueError(f"trace: what must be all, ioctls or requests, not {what!r}")
        return cls(
            ioctls=what != "requests",
            requests=what != "ioctls",
            vm=opt_int("vm"),
            vcpu=opt_int("vcpu"),
            errors=bool(req.get("errors", False)),
        )

    def wants(self, rec: dict[str, Any]) -> bool:
        kind = rec["type"]
        if kind == "ioctl":
            if not self.ioctls:
                return False
        elif kind == "request":
            if not self.requests:
                return False
        else:
            return True  # lost, and other notes, reach everyone
        if self.vm is not None and rec.get("vm") != self.vm:
            return False
        if self.vcpu is not None and rec.get("vcpu") != self.vcpu:
            return False
        return not self.errors or bool(rec.get("error"))


class Subscriber:
    """One listener: a bounded channel; what does not fit is counted, then reported."""

    def __init__(self, flt: Filter, capacity: int = 8192) -> None:
        self.filter = flt
        self.send, self.receive = trio.open_memory_channel[dict[str, Any]](capacity)
        self.lost = 0

    def offer(self, rec: dict[str, Any]) -> None:
        if not self.filter.wants(rec):
            return
        try:
            if self.lost:
                self.send.send_nowait({"type": "lost", "t": rec.get("t"), "count": self.lost})
                self.lost = 0
            self.send.send_nowait(rec)
        except trio.WouldBlock:
            self.lost += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class Trace:
    """The hub: who listens, the reason of the refusal being answered, requests in flight."""

    def __init__(self) -> None:
        self.active = False  # anyone listening: refusals keep their reasons
        self.ioctls = False  # anyone wants ioctls
        self.requests = False  # anyone wants requests
        self.reason: tuple[str, tuple[object, ...]] | None = None
        self.subscribers: list[Subscriber] = []
        # told when `active` changes; draining native records (the express path): held weakly,
        # so that a device (an HSM of a test) that goes away without closing is forgotten
        self._hooks: list[weakref.WeakMethod[Callable[[], None]]] = []
        self._flushes: list[weakref.WeakMethod[Callable[[], None]]] = []
        # (vmid, vcpu) -> the request handed to a client, until its completion
        self.inflight: dict[tuple[int, int], dict[str, Any]] = {}

    # -- listeners --

    def subscribe(self, flt: Filter, capacity: int = 8192) -> Subscriber:
        sub = Subscriber(flt, capacity)
        self.subscribers.append(sub)
        self._update()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)
            sub.send.close()
        self._update()

    def _update(self) -> None:
        was = self.active
        subs = self.subscribers
        self.ioctls = any(s.filter.ioctls for s in subs)
        self.requests = any(s.filter.requests for s in subs)
        self.active = bool(subs)
        if not self.active:
            self.inflight.clear()
            self.reason = None
        if was != self.active:
            for ref in list(self._hooks):
                hook = ref()
                if hook is not None:
                    hook()

    def watch(self, on_change: Callable[[], None], flush: Callable[[], None]) -> None:
        """A device's methods: ``on_change`` when `active` changes, ``flush`` to drain native records."""
        self._hooks.append(weakref.WeakMethod(on_change))
        self._flushes.append(weakref.WeakMethod(flush))

    def unwatch(self, on_change: Callable[[], None], flush: Callable[[], None]) -> None:
        self._hooks = [h for h in self._hooks if h() not in (None, on_change)]
        self._flushes = [f for f in self._flushes if f() not in (None, flush)]

    def flush(self) -> None:
        """Bring in what native code recorded so far (before a Python record that may follow it)."""
        for ref in list(self._flushes):
            f = ref()
            if f is not None:
                f()

    def emit(self, rec: dict[str, Any]) -> None:
        STATS.records += 1
        for s in list(self.subscribers):
            s.offer(rec)

    # -- ioctls --

    def take_reason(self) -> str | None:
        r, self.reason = self.reason, None
        return None if r is None else format_reason(*r)

    def ioctl(
        self, *, vm: int | None, pid: int, cmd: int, args: dict[str, Any], result: int | str,
        reason: str | None = None, out: dict[str, Any] | None = None, path: str = "python",
        t: float | None = None,
    ) -> None:  # fmt: skip
        error = isinstance(result, int) and result < 0
        rec: dict[str, Any] = {
            "type": "ioctl",
            "t": time.time() if t is None else t,
            "vm": vm,
            "pid": pid,
            "ioctl": ioctl_name(cmd),
            "cmd": cmd,
            "args": args,
            "result": result,
            "error": error,
            "errno": errno_name(-result) if error and isinstance(result, int) else None,
            "reason": reason,
            "path": path,
        }
        if "vcpu" in args:
            rec["vcpu"] = args["vcpu"]
        if out:
            rec["out"] = out
        self.emit(rec)

    # -- requests --

    def dispatched(
        self, vm: int, vcpu: int, kind: str, write: bool, addr: int, size: int, value: int,
        client: str, path: str = "python", t_ns: int | None = None,
    ) -> None:  # fmt: skip
        """A request handed to a client that answers later (NOTIFY_REQUEST_FINISH)."""
        self.inflight[(vm, vcpu)] = {
            "vm": vm, "vcpu": vcpu, "kind": kind, "write": write, "addr": addr, "size": size,
            "value": value if write else None, "client": client, "path": path,
            "t_ns": time.monotonic_ns() if t_ns is None else t_ns,
        }  # fmt: skip

    def completed(
        self, vm: int, vcpu: int, answer: int | None, *, path: str = "python", t_ns: int | None = None,
        outcome: str = "completed", client: str | None = None,
    ) -> None:  # fmt: skip
        """The request of ``vcpu`` completed: one record, with its latency from the hand-over."""
        now = time.monotonic_ns() if t_ns is None else t_ns
        held = self.inflight.pop((vm, vcpu), None)
        if held is None:  # dispatched before the tracer came
            held = {"vm": vm, "vcpu": vcpu, "kind": None, "write": None, "addr": None, "size": None,
                    "value": None, "client": client, "path": path, "t_ns": None}  # fmt: skip
        self._request(held, answer, now, outcome, path)

    def abandon(self, vm: int, why: str = "abandoned") -> None:
        """The VM's requests in flight will not complete (the VM goes): one record each."""
        for key in [k for k in self.inflight if k[0] == vm]:
            held = self.inflight.pop(key)
            self._request(held, None, time.monotonic_ns(), why, held["path"])

    def immediate(
        self, vm: int, vcpu: int, kind: str, write: bool, addr: int, size: int, value: int,
        answer: int | None, client: str, outcome: str = "completed", path: str = "python",
        t_ns: int | None = None,
    ) -> None:  # fmt: skip
        """A request answered where it was dispatched (CF8/CFC, an in-daemon client, a stall)."""
        now = time.monotonic_ns() if t_ns is None else t_ns
        held = {"vm": vm, "vcpu": vcpu, "kind": kind, "write": write, "addr": addr, "size": size,
                "value": value if write else None, "client": client, "path": path, "t_ns": now}  # fmt: skip
        self._request(held, answer, now, outcome, path)

    def _request(self, held: dict[str, Any], answer: int | None, now_ns: int, outcome: str, path: str) -> None:
        t0 = held.pop("t_ns")
        write = held["write"]
        size = held["size"]
        if answer is not None and size:
            answer &= (1 << (8 * min(int(size), 8))) - 1
        rec = {
            "type": "request",
            "t": time.time() - (time.monotonic_ns() - now_ns) / 1e9,
            **held,
            "answer": None if write else answer,
            "latency_us": None if t0 is None else round((now_ns - t0) / 1000, 1),
            "outcome": outcome,
            "error": outcome not in ("completed", "in_daemon"),
            "completed_by": path,
        }
        self.emit(rec)


TRACE = Trace()
