"""``/dev/acrn_hsm`` as a cdev device: open, release and the ioctl table (``hsm.c``).

Every errno here is the driver's (spec: hsm 2, 4, 12). Arguments arrive as
the bytes cdev fetched (``call.in_data``); by-value arguments (SET_IRQLINE,
VM_INTR_MONITOR) are taken from ``call.arg``; whatever the driver writes to
the caller's memory beyond the encoded ioctl size (PM_GET_CPU_STATE) or
must probe before replying (CREATE_VM) goes through the caller's memory.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import structlog
import trio

from acrn_hsm_emu import abi
from acrn_hsm_emu import acrn_kernel_abi as ak
from acrn_hsm_emu.client import extension as ext
from acrn_hsm_emu.hsm import acrn_kernel, admin, ioeventfd, irqfd, mm
from acrn_hsm_emu.hsm.acrn_drv import INVALID_VMID, Handler, HsmFile, MemoryFactory, Vm
from acrn_hsm_emu.hsm.acrn_kernel import PROFILES, AcrnKernel
from acrn_hsm_emu.hsm.express import Express
from acrn_hsm_emu.hsm.extension import BOUND_ALLOWED, Extension
from acrn_hsm_emu.hsm.hypercall_log import decode
from acrn_hsm_emu.hsm.ioreq import ClearOp, Dispatcher, notify_vcpu
from acrn_hsm_emu.hsm.limits import Limits
from acrn_hsm_emu.hsm.limits import refuse as refuse_limit
from acrn_hsm_emu.hsm.ranges import BindPolicy
from acrn_hsm_emu.hsm.vm import vm_create, vm_destroy
from acrn_hsm_emu.hypervisor.api import Hypercalls
from acrn_hsm_emu.memory import PAGE_SIZE, MemoryFault, RemoteMemory, SharedPage
from acrn_hsm_emu.observe.events import BUS
from acrn_hsm_emu.observe.trace import TRACE, decode_args, decode_out, refuse
from cdev.device import ArgSpec, BaseDevice, Deferred, IoctlCall, IoctlResult, RequestContext

log = structlog.get_logger("acrn_hsm_emu.hsm")

_R = TypeVar("_R")

PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit


def process_exiting(pid: int) -> bool:
    """Whether ``pid`` is gone, a zombie, or in do_exit (closing its files on the way out)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) "
    return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & PF_EXITING)

CREATE_VM = abi.ACRN_IOCTL_CREATE_VM
ATTACH_IOREQ_CLIENT = abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT
CLEAR_VM_IOREQ = abi.ACRN_IOCTL_CLEAR_VM_IOREQ

_CREATION_SIZE = 48
_RESERVED_CREATION = struct.Struct("<2xH2xH")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_IOEVENTFD_HEAD = struct.Struct("<IIQ")  # fd, flags, addr
# Byte ranges of acrn_vcpu_regs that must be zero: reserved[3], gdt.reserved,
# idt.reserved, reserved_64[4], reserved_32[3] (spec: hsm 11).
_VCPU_REGS_RESERVED = ((2, 8), (146, 152), (162, 168), (224, 256), (264, 276))
# ACRN's own kernel's ioctls, which the upstream profile does not know (a reason says so)
_ACRN_KERNEL_CMDS = frozenset(
    v for k, v in vars(ak).items() if k.startswith("ACRN_IOCTL_") and k != "ACRN_IOCTL_TYPE" and isinstance(v, int)
)
_PM_RESULT_SIZE = {
    abi.ACRN_PMCMD_GET_PX_CNT: 8,
    abi.ACRN_PMCMD_GET_CX_CNT: 8,
    abi.ACRN_PMCMD_GET_PX_DATA: 48,
    abi.ACRN_PMCMD_GET_CX_DATA: 32,
}


class HsmDevice(BaseDevice):
    """The ACRN Hypervisor Service Module, served by cdev.

    ``hypervisor``: the mock ACRN (its upcall is installed here).
    ``memory``: how to reach a caller's memory from its pid (RemoteMemory).
    ``quirks``: reproduce the driver's re-create bugs (spec: hsm 3.2).
    ``nursery``: where the dispatcher and irqfd watchers run (default: trio system tasks).
    ``clear_round_s``: one CLEAR_VM_IOREQ wait round (the driver's HZ/100).
    ``release_pauses``: on the last close of a file whose VM still runs, pause
    it so that it can be destroyed (the kernel would orphan it; docs/hsm.md).
    ``bind_policy``: who may bind a file to a VM with the extension ABI:
    "owner" (the VM creator's uid, or root), "root", "any", or a predicate
    ``(ctx, vm) -> bool``; a refusal is EPERM.
    ``ioeventfd_mismatch``: "drop" (the driver: an access in an ioeventfd's
    range that signals nothing is consumed) or "forward" (it goes on to the
    device model, as with KVM); docs/extension-abi.md.
    ``express``: when served by cdev, do the default client's request cycle
    in C where nothing else is involved (hsm/express.py); off, every request
    takes the Python path (same answers, slower). ``express_poll_us``: the
    bound of cdev's reader's adaptive polling after an express answer (0:
    never; the window grows while requests come back to back and shrinks when
    they do not, docs/performance.md).
    ``profile``: the ABI, "upstream" (Linux's driver: what ``<linux/acrn.h>`` has, ENOTTY
    for the rest) or "acrn-kernel" (ACRN's own Service VM kernel, which adds
    SETUP_ASYNCIO, the VM event ring and eventfd, ASSIGN/DEASSIGN_PIO_REGION
    and asyncio ioeventfds: hsm/acrn_kernel.py, docs/acrn-dm.md).
    """

    arg_specs: dict[int, ArgSpec] = {
        abi.ACRN_IOCTL_SET_IRQLINE: ArgSpec(by_value=True),
        abi.ACRN_IOCTL_VM_INTR_MONITOR: ArgSpec(by_value=True),
        abi.ACRN_IOCTL_PM_GET_CPU_STATE: ArgSpec(in_size=8, out_size=48),
    }

    def __init__(
        self,
        hypervisor: Hypercalls,
        *,
        memory: MemoryFactory = RemoteMemory,
        quirks: bool = True,
        nursery: trio.Nursery | None = None,
        clear_round_s: float = 0.01,
        release_pauses: bool = True,
        bind_policy: BindPolicy = "owner",
        ioeventfd_mismatch: Literal["drop", "forward"] = "drop",
        limits: Limits | None = None,
        express: bool = True,
        express_poll_us: int = 200,
        profile: str = "upstream",
    ) -> None:
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, not {profile!r}")
        self.profile = profile
        self.limits = limits if limits is not None else Limits()
        self.express_enabled = express
        self.express_poll_us = express_poll_us
        self.hv = hypervisor
        self.release_pauses = release_pauses
        self.bind_policy = bind_policy
        self.quirks = quirks
        self._nursery = nursery
        self.dispatcher = Dispatcher(hypervisor, memory, clear_round_s)
        if ioeventfd_mismatch not in ("drop", "forward"):
            raise ValueError(f"ioeventfd_mismatch must be 'drop' or 'forward', not {ioeventfd_mismatch!r}")
        self.dispatcher.ioeventfd_mismatch = ioeventfd_mismatch
        self.dispatcher.quirks = quirks
        self.fake_pa = mm.FakePhysAllocator()
        self.files: set[HsmFile] = set()
        self._clears: dict[int, ClearOp] = {}
        self._table: dict[int, Handler] = {
            abi.ACRN_IOCTL_CREATE_VM: self._create_vm,
            abi.ACRN_IOCTL_DESTROY_VM: self._destroy_vm,
            abi.ACRN_IOCTL_START_VM: self._state_call("start_vm", "vm.started"),
            abi.ACRN_IOCTL_PAUSE_VM: self._state_call("pause_vm", "vm.paused"),
            abi.ACRN_IOCTL_RESET_VM: self._state_call("reset_vm", "vm.reset"),
            abi.ACRN_IOCTL_SET_VCPU_REGS: self._set_vcpu_regs,
            abi.ACRN_IOCTL_INJECT_MSI: self._pass("inject_msi", 16),
            abi.ACRN_IOCTL_VM_INTR_MONITOR: self._vm_intr_monitor,
            abi.ACRN_IOCTL_SET_IRQLINE: self._set_irqline,
            abi.ACRN_IOCTL_NOTIFY_REQUEST_FINISH: self._notify_request_finish,
            abi.ACRN_IOCTL_CREATE_IOREQ_CLIENT: self._create_ioreq_client,
            abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT: self._attach_ioreq_client,
            abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT: self._destroy_ioreq_client,
            abi.ACRN_IOCTL_CLEAR_VM_IOREQ: self._clear_vm_ioreq,
            abi.ACRN_IOCTL_SET_MEMSEG: self._set_memseg,
            abi.ACRN_IOCTL_UNSET_MEMSEG: self._unset_memseg,
            abi.ACRN_IOCTL_SET_PTDEV_INTR: self._pass("set_ptdev_intr", 20),
            abi.ACRN_IOCTL_RESET_PTDEV_INTR: self._pass("reset_ptdev_intr", 20),
            abi.ACRN_IOCTL_ASSIGN_PCIDEV: self._pass("assign_pcidev", 36),
            abi.ACRN_IOCTL_DEASSIGN_PCIDEV: self._pass("deassign_pcidev", 36),
            abi.ACRN_IOCTL_ASSIGN_MMIODEV: self._pass("assign_mmiodev", 104),
            abi.ACRN_IOCTL_DEASSIGN_MMIODEV: self._pass("deassign_mmiodev", 104),
            abi.ACRN_IOCTL_CREATE_VDEV: self._pass("create_vdev", 192),
            abi.ACRN_IOCTL_DESTROY_VDEV: self._pass("destroy_vdev", 192),
            abi.ACRN_IOCTL_PM_GET_CPU_STATE: self._pm_get_cpu_state,
            abi.ACRN_IOCTL_IOEVENTFD: self._ioeventfd,
            abi.ACRN_IOCTL_IRQFD: self._irqfd,
        }
        self.acrn_kernel: AcrnKernel | None = None
        if profile == "acrn-kernel":
            self.acrn_kernel = AcrnKernel(hypervisor, quirks)
            self._table.update({
                ak.ACRN_IOCTL_SETUP_ASYNCIO: self._setup_asyncio,
                ak.ACRN_IOCTL_SETUP_VM_EVENT_RING: self._setup_vm_event_ring,
                ak.ACRN_IOCTL_SETUP_VM_EVENT_FD: self._setup_vm_event_fd,
                ak.ACRN_IOCTL_ASSIGN_PIO_REGION: self._pio_region(True),
                ak.ACRN_IOCTL_DEASSIGN_PIO_REGION: self._pio_region(False),
            })  # fmt: skip
            # their arguments are values (page addresses, an fd), not pointers
            self.arg_specs = {
                **type(self).arg_specs,
                ak.ACRN_IOCTL_SETUP_ASYNCIO: ArgSpec(by_value=True),
                ak.ACRN_IOCTL_SETUP_VM_EVENT_RING: ArgSpec(by_value=True),
                ak.ACRN_IOCTL_SETUP_VM_EVENT_FD: ArgSpec(by_value=True),
            }
        self.extension = Extension(
            self.dispatcher, self.limits, bind_policy, self.ioctl, self._table,
            self._ioeventfd, self._irqfd,
        )  # fmt: skip
        # ioctls refused, by (command, errno): the metrics' errors (observe/metrics.py)
        self.ioctl_errors: dict[tuple[int, int], int] = {}
        self._express_drain: trio.CancelScope | None = None
        TRACE.watch(self._trace_changed, self._drain_express)
        hypervisor.set_upcall(self.dispatcher.upcall)
        self._spawn(self.dispatcher.serve_upcalls)
        # orphaned VMs go when their owner process does (not the driver's: hsm/admin.py)
        self.reaper = admin.Reaper(self, self._spawn)

    # -- cdev Device ------------------------------------------------------------

    def open(self, ctx: RequestContext) -> HsmFile:
        f = HsmFile(ctx)
        self.files.add(f)
        if BUS.listeners:
            BUS.emit("file.opened", pid=ctx.pid, uid=ctx.uid)
        return f

    def reader_poll(self) -> tuple[int, int]:
        """cdev's reader in the trio thread polls for the next request up to
        ``express_poll_us`` after each one (adaptively), and stops at once when a vCPU
        raises the upcall: (bound in ns, the upcall's eventfd)."""
        return self.express_poll_us * 1000, self.dispatcher.upcall.fd

    def native_prefilter(self, fd: int) -> Express | None:
        """cdev's session on ``fd`` starts: the express path answers ATTACH and
        NOTIFY_REQUEST_FINISH of the VMs created from now on (hsm/express.py)."""
        if not self.express_enabled:
            return None
        if self.dispatcher.express is not None:
            self.dispatcher.express.close()
        path = self.dispatcher.express = Express(fd, self.hv, self.express_poll_us)
        self._spawn(path.watch_alerts)
        if TRACE.active:
            self._trace_changed()
        return path

    def release(self, handle: object) -> None:
        assert isinstance(handle, HsmFile)
        self.files.discard(handle)
        if BUS.listeners:
            BUS.emit("file.closed", pid=handle.ctx.pid, vmid=handle.vm.vmid if handle.vm.live else None)
        if handle.binding is not None:
            self.extension.unbind(handle, "file closed")
        vm = handle.vm
        ret = vm_destroy(self.dispatcher, vm, quiet=self.release_pauses, by="release")
        if ret < 0 and self.release_pauses and vm.live:
            # ACRN destroys only PAUSED VMs, so the kernel would leave a VM whose
            # owner died running in the hypervisor with nobody to serve it. We
            # pause it first, as the device model's own teardown does (docs/hsm.md).
            vmid = vm.vmid
            if self.hv.pause_vm(vmid) == 0:
                ret = vm_destroy(self.dispatcher, vm, by="release")
            # one line for what happened and what it did (the driver would leave the VM running)
            pid = vm.owner_pid or handle.ctx.pid
            how = "exited" if process_exiting(pid) else "closed the node"
            outcome = "paused and destroyed" if ret == 0 else f"pause or destroy refused ({ret})"
            log.log(
                logging.INFO if ret == 0 else logging.WARNING,
                "hsm.release_paused_running_vm",
                summary=f"device model pid {pid} {how} with VM {vmid} running: VM {vmid} {outcome}",
                pid=pid,
                vmid=vmid,
                outcome=outcome,
                note="its device model exited or closed the node with the VM running; "
                "the kernel would leave the VM running, orphaned",
            )
        if any(v is vm for v in self.dispatcher.vms):
            # The driver frees the object while it is still listed; we keep the VM.
            vm.orphaned = True
            reason = (
                "destroy refused by the hypervisor" if ret < 0
                else "sticky DESTROYED flag (kernel quirk)" if vm.live
                else "lost by a second CREATE_VM (kernel quirk)"
            )  # fmt: skip
            log.warning(
                "hsm.vm_orphaned",
                vmid=vm.vmid if vm.live else vm.lost_vmid,
                reason=reason,
                ret=ret,
            )
            if BUS.listeners:
                BUS.emit("vm.orphaned", vmid=vm.vmid if vm.live else vm.lost_vmid, reason=reason)
        self.reaper.released(vm, handle.ctx.pid)

    def precheck(self, handle: object, cmd: int, compat: bool) -> int:
        """What cdev asks under CUSE before it fetches the argument (:meth:`gate`): a
        refusal here is the ioctl's answer, so it is counted and traced as one."""
        if not TRACE.active:
            return self._counted(cmd, self.gate(handle, cmd, compat))
        TRACE.flush()
        TRACE.reason = None
        err = self._counted(cmd, self.gate(handle, cmd, compat))
        reason = TRACE.take_reason()
        if err < 0 and TRACE.ioctls:
            assert isinstance(handle, HsmFile)
            vm = handle.binding.vm if handle.binding is not None else handle.vm
            TRACE.ioctl(vm=vm.vmid if vm.live else None, pid=handle.ctx.pid, cmd=cmd, args={}, result=err,
                        reason=reason)
        return err

    def _counted(self, cmd: int, result: _R) -> _R:
        """``result``, an ioctl's answer; a refusal counted by (command, errno) for the metrics."""
        if isinstance(result, int) and result < 0:
            key = (cmd, -result)
            self.ioctl_errors[key] = self.ioctl_errors.get(key, 0) + 1
        return result

    def gate(self, handle: object, cmd: int, compat: bool) -> int:
        """The driver's answers that come before it copies any argument: no
        compat_ioctl, the VM state gate, an unknown command (spec: hsm ioctl
        dispatch). :meth:`precheck` (what cdev asks first under CUSE) and :meth:`ioctl` start with it."""
        if compat:
            return refuse(errno.ENOTTY, "a 32-bit caller: the driver has no compat_ioctl")
        assert isinstance(handle, HsmFile)
        if (cmd >> 8) & 0xFF == ext.ACRN_EMU_IOCTL_TYPE:
            if cmd in self.extension.table:
                return 0
            return refuse(errno.ENOTTY, "not an ioctl of the extension ABI")
        if handle.binding is not None:
            if cmd in BOUND_ALLOWED:
                return 0
            if cmd == CREATE_VM:  # the file serves another VM
                return refuse(errno.EBUSY, "this file is bound to VM {} (extension ABI)", handle.binding.vmid)
            if cmd in self._table:
                return refuse(errno.EPERM, "a file bound to VM {} may not do this (extension ABI)",
                              handle.binding.vmid)
            return refuse(errno.ENOTTY, "not an ioctl of the HSM")
        if handle.vm.vmid == INVALID_VMID and cmd != CREATE_VM:
            return refuse(errno.EINVAL, "no VM on this file: CREATE_VM first (or it was destroyed)")
        if cmd in self._table:
            return 0
        if self.profile == "upstream" and cmd in _ACRN_KERNEL_CMDS:
            return refuse(errno.ENOTTY, "an ioctl of ACRN's own kernel; this daemon serves the upstream ABI")
        return refuse(errno.ENOTTY, "not an ioctl of the HSM")

    def ioctl(self, handle: object, call: IoctlCall) -> IoctlResult | Deferred | Awaitable[IoctlResult]:
        if TRACE.active:
            return self._traced_ioctl(handle, call)
        result = self._ioctl(handle, call)
        if type(result) is int and result < 0:  # _counted, inline: every ioctl passes here
            errors = self.ioctl_errors
            key = (call.cmd, -result)
            errors[key] = errors.get(key, 0) + 1
        return result

    def _traced_ioctl(self, handle: object, call: IoctlCall) -> IoctlResult | Deferred | Awaitable[IoctlResult]:
        """:meth:`ioctl` while a tracer listens: the same answer, and its record."""
        TRACE.flush()  # what the express path did comes first
        TRACE.reason = None
        result = self._counted(call.cmd, self._ioctl(handle, call))
        reason = TRACE.take_reason()
        if not TRACE.ioctls:
            return result
        assert isinstance(handle, HsmFile)
        vm = handle.binding.vm if handle.binding is not None else handle.vm
        vmid = vm.vmid if vm.live else None
        args = decode_args(call.cmd, call.arg, call.in_data)
        if isinstance(result, int):
            TRACE.ioctl(vm=vmid, pid=call.ctx.pid, cmd=call.cmd, args=args, result=result, reason=reason)
            return result
        if isinstance(result, tuple):
            out = decode_out(call.cmd, result[1])
            TRACE.ioctl(vm=out.get("vmid", vmid), pid=call.ctx.pid, cmd=call.cmd, args=args,
                        result=result[0], reason=reason, out=out)
            return result
        if isinstance(result, Deferred):
            TRACE.ioctl(vm=vmid, pid=call.ctx.pid, cmd=call.cmd, args=args, result="waits")
            return result
        return self._traced_wait(result, vmid, call, args)

    async def _traced_wait(
        self, waiting: Awaitable[IoctlResult], vmid: int | None, call: IoctlCall, args: dict[str, Any]
    ) -> IoctlResult:
        result = await waiting
        if TRACE.ioctls:
            value = result[0] if isinstance(result, tuple) else result
            TRACE.ioctl(vm=vmid, pid=call.ctx.pid, cmd=call.cmd, args=args, result=value,
                        reason=TRACE.take_reason())
        return result

    def _ioctl(self, handle: object, call: IoctlCall) -> IoctlResult | Deferred | Awaitable[IoctlResult]:
        err = self.gate(handle, call.cmd, call.compat)
        if err < 0:
            return err
        assert isinstance(handle, HsmFile)
        cmd = call.cmd
        if (cmd >> 8) & 0xFF == ext.ACRN_EMU_IOCTL_TYPE:
            return self.extension.table[cmd](handle, call)
        if handle.binding is not None:
            return self.extension.bound_ioctl(handle, handle.binding, call)
        return self._table[cmd](handle.vm, call)

    def interrupted(self, handle: object, call: IoctlCall) -> IoctlResult:
        if call.cmd == ATTACH_IOREQ_CLIENT:
            return 0  # the driver's wait ignores signals
        if call.cmd == CLEAR_VM_IOREQ:
            op = self._clears.pop(id(call), None)
            if op is not None:
                op.finish()  # a signal cuts the sleeps short; the clearing still ends
            return 0
        return -errno.EINTR

    # -- daemon side --------------------------------------------------------------

    def snapshot(self, hv_snapshot: dict[str, Any] | None = None) -> dict[str, Any]:
        """State for ``acrn-hsm-emu status``: every listed VM, newest first, with the
        hypervisor's state and vCPUs of each (from ``hv_snapshot`` when the caller
        already took one: summarising every vCPU's cycle ring is not free)."""
        hv_vms = self._hv_vms(hv_snapshot)
        vms = []
        for vm in self.dispatcher.vms:
            s = vm.snapshot()
            key = vm.vmid if vm.live else vm.lost_vmid
            hv_vm = hv_vms.get(key, {}) if key is not None else {}
            s["state"] = hv_vm.get("state")
            s["vcpus"] = hv_vm.get("vcpus")
            vms.append(s)
        return {
            "open_files": len(self.files),
            "files_with_vm": sum(1 for f in self.files if f.vm.live),
            "upcalls": self.dispatcher.upcalls,
            "dispatch_passes": self.dispatcher.passes,
            "quirks": self.quirks,
            "vms": vms,
        }

    def _hv_vms(self, snap: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
        """The hypervisor's view of each post-launched VM, by vmid."""
        if snap is None:
            try:
                snap = self.hv.snapshot()
            except Exception as e:  # status must not fail because of the hypervisor
                log.debug("hsm.hv_snapshot_failed", error=str(e))
                return {}
        vms = snap.get("vms", []) if isinstance(snap, dict) else []
        items = vms.values() if isinstance(vms, dict) else vms
        return {int(i["vmid"]): i for i in items if isinstance(i, dict) and "vmid" in i}

    def close(self) -> None:
        """Daemon exit: drop the upcall, end the dispatcher's task (in ``nursery``,
        which therefore waits for this call), and drop every eventfd this device holds."""
        TRACE.unwatch(self._trace_changed, self._drain_express)
        if self._express_drain is not None:
            self._express_drain.cancel()
        self.hv.set_upcall(None)
        self.dispatcher.close()
        for vm in self.dispatcher.vms:
            irqfd.irqfd_deinit(vm)
            ioeventfd.close_all(vm)
            acrn_kernel.deinit(vm, self.quirks)

    # -- the trace's view of the express path ---------------------------------------

    def _trace_changed(self) -> None:
        """A tracer came or the last one went: the express path records, or stops."""
        path = self.dispatcher.express
        if path is not None and not path.closed:
            path.set_tracing(TRACE.active)
        if TRACE.active and self._express_drain is None and path is not None:
            try:
                self._spawn(self._drain_loop)
            except RuntimeError:  # not in a trio run (a device of a finished test)
                pass
        elif not TRACE.active and self._express_drain is not None:
            self._express_drain.cancel()

    def _drain_express(self) -> None:
        path = self.dispatcher.express
        if path is not None and not path.closed:
            path.drain()

    async def _drain_loop(self) -> None:
        """While traced: bring the express path's records in, every 20 ms."""
        with trio.CancelScope() as scope:
            self._express_drain = scope
            try:
                while TRACE.active:
                    self._drain_express()
                    await trio.sleep(0.02)
            finally:
                self._express_drain = None

    def _spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn)
        else:
            trio.lowlevel.spawn_system_task(fn)

    # -- ioctls -------------------------------------------------------------------

    def _pass(self, name: str, size: int) -> Handler:
        """An ioctl that copies ``size`` bytes and hands them to one hypercall (recorded)."""

        hypercall = getattr(self.hv, name)

        def handler(vm: Vm, call: IoctlCall) -> IoctlResult:
            if len(call.in_data) < size:
                return refuse(errno.EFAULT, "the argument could not be read ({} of {} bytes)",
                              len(call.in_data), size)
            data = bytes(call.in_data[:size])
            ret: int = hypercall(vm.vmid, data)
            vm.hypercalls.record_arg(name, ret, data)
            if ret < 0:
                return refuse(-ret, "the hypervisor refused {} ({})", name, decode(name, data))
            return ret

        return handler

    def _state_call(self, name: str, event: str) -> Handler:
        """START_VM, PAUSE_VM, RESET_VM: the hypercall's answer is the ioctl's."""

        def handler(vm: Vm, call: IoctlCall) -> IoctlResult:
            ret: int = getattr(self.hv, name)(vm.vmid)
            if ret < 0:
                return refuse(-ret, "the hypervisor refused {} for VM {} in state {}", name, vm.vmid,
                              self.hv_state(vm.vmid))
            if BUS.listeners:
                BUS.emit(event, vmid=vm.vmid, **({"by": "ioctl"} if event == "vm.paused" else {}))
            return ret

        return handler

    def hv_state(self, vmid: int) -> str:
        """The VM's state in the hypervisor, for a reason (only formatted while tracing)."""
        return str(self._hv_vms(None).get(vmid, {}).get("state", "unknown"))

    def _set_irqline(self, vm: Vm, call: IoctlCall) -> IoctlResult:
        ret = self.hv.set_irqline(vm.vmid, call.arg)
        vm.hypercalls.record_arg("set_irqline", ret, call.arg)
        if ret < 0:
            return refuse(-ret, "the hypervisor refused set_irqline ({})", decode("set_irqline", call.arg))
        return ret

    def _create_vm(self, vm: Vm, call: IoctlCall) -> IoctlResult:
        if len(call.in_data) < _CREATION_SIZE:
            return refuse(errno.EFAULT, "the argument could not be read")
        param = bytearray(call.in_data[:_CREATION_SIZE])
        r0, r1 = _RESERVED_CREATION.unpack_from(param)
        if r0 | r1:
            return refuse(errno.EINVAL, "reserved0={:#x}, reserved1={:#x}: both must be 0", r0, r1)
        pid = call.ctx.pid
        # a VM lost by a second CREATE_VM is still this process's until reclaimed (hsm/admin.py)
        mine = sum(1 for v in self.dispatcher.vms if v.owner_pid == pid and (v.live or v.lost_vmid is not None))
        if mine >= self.limits.vms_per_process:
            return refuse_limit("vms_per_process", self.limits.vms_per_process, errno.EAGAIN, pid=pid)
        ret = vm_create(self.dispatcher, vm, param, pid, self.quirks, call.ctx.uid)
        if ret < 0:
            return ret
        # The kernel copies the struct back and destroys the VM if that faults;
        # FUSE copies our reply only after we answer, so probe the destination now.
        try:
            self.dispatcher.memory(pid).check_writable(call.arg, _CREATION_SIZE)
        except MemoryFault as e:
            log.debug("hsm.create_vm_copy_out_failed", vmid=vm.vmid, error=str(e))
            vm_destroy(self.dispatcher, vm)
            return refuse(errno.EFAULT, "the result could not be written back to {:#x}: the VM was destroyed",
                          call.arg)
        return 0, bytes(param)

    def _destroy_vm(self, vm: Vm, call: IoctlCall) -> IoctlResult:
        return vm_destroy(self.dispatcher, vm)

    def _set_vcpu_regs(self, vm: Vm, call: IoctlCall) -> IoctlResult:
        data = call.in_data
        if len(data) < 296:
            return refuse(errno.EFAULT, "the argument could not be read")
        for lo, hi in _VCPU_REGS_RESERVED:
            if any(data[lo:hi]):
                return refuse(errno.EINVAL, "reserved bytes {}..{} of acrn_vcpu_regs are {}: must be 0",
                              lo, hi - 1, bytes(data[lo:hi]).hex())
        ret = self.hv.set_vcpu_regs(vm.vmid, bytes(data[:296]))
        if ret < 0:
            return refuse(-ret, "the hypervisor refused set_vcpu_regs for VM {} (state {})", vm.vmid,
                          self.hv_state(vm.vmid))
        return ret

    def _vm_intr_monitor(self, vm: Vm, call: IoctlCall) -> IoctlResult:
        pid = call.ctx.pid
        try:
            self.dispatcher.memory(pid).check_writable(call.arg & ~(PAGE_SIZE - 1), PAGE_SIZE)
        except MemoryFault:
            return refuse(errno.EFAULT, "the page at {:#x} is not writable in pid {}", call.arg, pid)
        page = SharedPage(self.dispatcher.memory(pid), call.arg)
        ret = self.hv.vm_intr_monitor(vm.vmid, page)
        fields = decode("vm_intr_monitor", page.base)
        try:
            fields["cmd"], fields["buf_cnt"] = struct.unpack("<II", page.read(0, 8))
        except MemoryFault:
            pass
        vm.hypercalls.record("vm_intr_monitor", ret, **fields)
        if ret < 0:
            return ret
        vm.monitor_page = page  # the previous one is released
        return ret

    def _notify_request_finish(self, vm: Vm, call: IoctlCall) -> IoctlResult:
        vcpu = notify_vcpu(call.in_data)
        if vcpu < 0:
            return vcpu
        try:
            return self.dispatcher.default_complete(vm, vcpu)
        except MemoryFault as e:
            self.dispatcher.fail_vm(vm, e)
            return refuse(errno.EFAULT, "the request page is unreachable: {}", e)

    def _create_ioreq_client(self, vm: Vm, call: IoctlCall) -> IoctlResult:
        if vm.default_client is not None:
            return refuse(errno.EEXIST, "VM {} has a default client already", vm.vmid)
        self.dispatcher.client_create(vm, "acrndm", True, pid=call.ctx.pid)
        return 0

    def _attach_ioreq_client(self, vm: Vm, call: IoctlCall) -> IoctlResult | Deferred | Awaitable[IoctlResult]:
        client = vm.default_client
        if client is None:
            return refuse(errno.ENODEV, "VM {} has no default client: CREATE_IOREQ_CLIENT first", vm.vmid)
        return client.attach()

    def _destroy_ioreq_client(self, vm: Vm, call: IoctlCall) -> IoctlResult:
        if vm.default_client is not None:
            self.dispatcher.client_destroy(vm.default_client)
        return 0

    def _clear_vm_ioreq(self, vm: Vm, call: IoctlCall) -> IoctlResult | Deferred | Awaitable[IoctlResult]:
        op = self.dispatcher.request_clear(vm)
        if not op.range_pending():
            return op.finish()
        self._clears[id(call)] = op
        return self._clear_wait(op, id(call))

    async def _clear_wait(self, op: ClearOp, key: int) -> IoctlResult:
        try:
            return await op.wait_and_finish()
        finally:
            self._clears.pop(key, None)

    def _set_memseg(self, vm: Vm, call: IoctlCall) -> IoctlResult:
        if len(call.in_data) < 32:
            return refuse(errno.EFAULT, "the argument could not be read")
        mmio = _U32.unpack_from(call.in_data)[0] == abi.ACRN_MEMMAP_MMIO
        if mmio and vm.mmio_segments >= self.limits.mmio_segments_per_vm:
            return refuse_limit("mmio_segments_per_vm", self.limits.mmio_segments_per_vm,
                           errno.ENOMEM, vmid=vm.vmid)
        ret = mm.memseg_map(self.dispatcher, vm, call.ctx.pid, self.fake_pa, call.in_data)
        if mmio and ret == 0:
            vm.mmio_segments += 1
        return ret

    def _unset_memseg(self, vm: Vm, call: IoctlCall) -> IoctlResult:
        if len(call.in_data) < 32:
            return refuse(errno.EFAULT, "the argument could not be read")
        ret = mm.memseg_unmap(self.dispatcher, vm, call.in_data)
        if ret == 0 and vm.mmio_segments:
            vm.mmio_segments -= 1
        return ret

    def _pm_get_cpu_state(self, vm: Vm, call: IoctlCall) -> IoctlResult:
        if len(call.in_data) < 8:
            return refuse(errno.EFAULT, "the argument could not be read")
        (cmd,) = _U64.unpack_from(call.in_data)
        n = _PM_RESULT_SIZE.get(cmd & abi.PMCMD_TYPE_MASK)
        if n is None:
            return 0  # unknown sub-command: success, nothing written
        out = bytearray(48)  # zero-filled, as the newer driver's kzalloc
        ret = self.hv.get_cpu_state(cmd, out)
        fields = decode("get_cpu_state", cmd)
        if ret >= 0:
            fields["result"] = _U64.unpack_from(out)[0] if n == 8 else out[:n].hex()
        vm.hypercalls.record("get_cpu_state", ret, **fields)
        if ret < 0:
            return refuse(-ret, "the hypervisor refused get_cpu_state ({})", fields)
        result = bytes(out[:n])
        # The encoded size is 8; the driver writes up to 48 bytes to the same address.
        try:
            self.dispatcher.memory(call.ctx.pid).write(call.arg, result)
        except MemoryFault:
            return refuse(errno.EFAULT, "the result could not be written to {:#x}", call.arg)
        k = min(n, call.out_size)
        return (ret, result[:k]) if k > 0 else ret

    def _ioeventfd(self, vm: Vm, call: IoctlCall, owner: object = None) -> IoctlResult:
        data = call.in_data
        if len(data) < 32:
            return refuse(errno.EFAULT, "the argument could not be read")
        if data[20:24] != b"\0\0\0\0":
            return refuse(errno.EINVAL, "reserved={:#x}, must be 0", int.from_bytes(data[20:24], "little"))
        fd, flags, addr = _IOEVENTFD_HEAD.unpack_from(data)
        if self.acrn_kernel is not None and flags & ak.ACRN_IOEVENTFD_FLAG_ASYNCIO:
            st = self.acrn_kernel.state(vm)
            if len(st.asyncio_fds) >= self.limits.ioeventfds_per_vm:
                return refuse_limit("ioeventfds_per_vm", self.limits.ioeventfds_per_vm, errno.ENOSPC,
                               vmid=vm.vmid)
            return self.acrn_kernel.ioeventfd_asyncio(vm, call.ctx.pid, fd, flags, addr)
        assigning = not flags & abi.ACRN_IOEVENTFD_FLAG_DEASSIGN
        if assigning and len(vm.ioeventfds) >= self.limits.ioeventfds_per_vm:
            return refuse_limit("ioeventfds_per_vm", self.limits.ioeventfds_per_vm, errno.ENOSPC,
                           vmid=vm.vmid)
        return ioeventfd.ioeventfd_config(vm, call.ctx.pid, data, owner)

    def _irqfd(self, vm: Vm, call: IoctlCall, owner: object = None) -> IoctlResult:
        if len(call.in_data) < 24:
            return refuse(errno.EFAULT, "the argument could not be read")
        assigning = not _U32.unpack_from(call.in_data, 4)[0] & abi.ACRN_IRQFD_FLAG_DEASSIGN
        if assigning and len(vm.irqfds) >= self.limits.irqfds_per_vm:
            return refuse_limit("irqfds_per_vm", self.limits.irqfds_per_vm, errno.ENOSPC, vmid=vm.vmid)
        return irqfd.irqfd_config(vm, self.hv, self._spawn, call.ctx.pid, call.in_data, owner)

    # -- ACRN's own kernel (abi = "acrn-kernel") -----------------------------------

    def _setup_asyncio(self, vm: Vm, call: IoctlCall) -> IoctlResult:
        assert self.acrn_kernel is not None
        return self.acrn_kernel.setup_asyncio(vm, self.dispatcher.memory(call.ctx.pid), call.arg)

    def _setup_vm_event_ring(self, vm: Vm, call: IoctlCall) -> IoctlResult:
        assert self.acrn_kernel is not None
        return self.acrn_kernel.setup_vm_event_ring(vm, self.dispatcher.memory(call.ctx.pid), call.arg)

    def _setup_vm_event_fd(self, vm: Vm, call: IoctlCall) -> IoctlResult:
        assert self.acrn_kernel is not None
        fd = call.arg & 0xFFFFFFFF  # the int the caller passed
        return self.acrn_kernel.setup_vm_event_fd(vm, call.ctx.pid, fd - (1 << 32) if fd >> 31 else fd)

    def _pio_region(self, assign: bool) -> Handler:
        def handler(vm: Vm, call: IoctlCall) -> IoctlResult:
            assert self.acrn_kernel is not None
            return self.acrn_kernel.pio_region(vm, call.in_data, assign)

        return handler

