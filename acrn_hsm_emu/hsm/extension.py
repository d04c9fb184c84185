"""The extension ABI's ioctls (type 0xA3: version, bind, range clients, value
calls) and the ACRN ioctls of a file bound to another file's VM; the driver
has none of this (docs/extension-abi.md). What the range clients then do is
in ranges.py and remote.py.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Awaitable, Callable

from acrn_hsm_emu import abi
from acrn_hsm_emu.client import extension as ext
from acrn_hsm_emu.hsm import ioeventfd, irqfd, ranges, remote
from acrn_hsm_emu.hsm.acrn_drv import Binding, Handler, HsmFile, Vm
from acrn_hsm_emu.hsm.ioreq import Dispatcher, notify_vcpu
from acrn_hsm_emu.hsm.limits import Limits
from acrn_hsm_emu.hsm.limits import refuse as refuse_limit
from acrn_hsm_emu.hsm.ranges import BindPolicy
from acrn_hsm_emu.memory import MemoryFault
from acrn_hsm_emu.observe.trace import refuse
from cdev.device import Deferred, IoctlCall, IoctlResult

ATTACH_IOREQ_CLIENT = abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT

# ACRN ioctls a bound file may issue; they act on the bound VM. The VM's
# life and configuration stay with its owner's file (EPERM here).
BOUND_ALLOWED = {
    abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT,
    abi.ACRN_IOCTL_NOTIFY_REQUEST_FINISH,
    abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT,
    abi.ACRN_IOCTL_INJECT_MSI,
    abi.ACRN_IOCTL_SET_IRQLINE,
    abi.ACRN_IOCTL_IOEVENTFD,
    abi.ACRN_IOCTL_IRQFD,
}

AcrnIoctl = Callable[[HsmFile, IoctlCall], "IoctlResult | Deferred | Awaitable[IoctlResult]"]
OwnedIoctl = Callable[[Vm, IoctlCall, object], IoctlResult]


class Extension:
    """The device's extension ioctls (``table``) and bound files (``bound_ioctl``).

    ``acrn_ioctl``: the device's ioctl entry (a value call is one ACRN ioctl
    on the same file); ``acrn_table``: its ACRN handlers; ``acrn_ioeventfd``,
    ``acrn_irqfd``: its IOEVENTFD and IRQFD handlers, given the binding that
    owns what they assign.
    """

    def __init__(
        self, dispatcher: Dispatcher, limits: Limits, bind_policy: BindPolicy,
        acrn_ioctl: AcrnIoctl, acrn_table: dict[int, Handler],
        acrn_ioeventfd: OwnedIoctl, acrn_irqfd: OwnedIoctl,
    ) -> None:  # fmt: skip
        self.dispatcher = dispatcher
        self.limits = limits
        self.bind_policy = bind_policy
        self.acrn_ioctl = acrn_ioctl
        self.acrn_table = acrn_table
        self.acrn_ioeventfd = acrn_ioeventfd
        self.acrn_irqfd = acrn_irqfd
        self.table: dict[int, Callable[[HsmFile, IoctlCall], IoctlResult]] = {
            ext.ACRN_EMU_IOCTL_VERSION: self.version,
            ext.ACRN_EMU_IOCTL_BIND_VM: self.bind,
            ext.ACRN_EMU_IOCTL_CREATE_RANGE_CLIENT: self.create_client,
            ext.ACRN_EMU_IOCTL_DESTROY_RANGE_CLIENT: self.destroy_client,
            ext.ACRN_EMU_IOCTL_ADD_RANGE: self.add_range,
            ext.ACRN_EMU_IOCTL_DEL_RANGE: self.del_range,
            ext.ACRN_EMU_IOCTL_VALUE_CALL: self.value_call,
        }

    def bound_ioctl(
        self, f: HsmFile, binding: Binding, call: IoctlCall
    ) -> IoctlResult | Deferred | Awaitable[IoctlResult]:
        cmd = call.cmd  # one of BOUND_ALLOWED: the device's precheck saw to it
        if cmd == abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT:
            return self.destroy_client(f, call)  # 0 even when there is nothing left
        if not binding.valid:
            return refuse(errno.ENODEV, "the VM this file was bound to is gone")
        vm = binding.vm
        if cmd == ATTACH_IOREQ_CLIENT:
            client = binding.live_client
            if client is None:
                return refuse(errno.ENODEV, "this file has no range client (CREATE_RANGE_CLIENT first)")
            return client.attach()
        if cmd == abi.ACRN_IOCTL_NOTIFY_REQUEST_FINISH:
            vcpu = notify_vcpu(call.in_data)
            if vcpu < 0:
                return vcpu
            client = binding.live_client
            if client is None:
                return refuse(errno.ENODEV, "this file has no range client (CREATE_RANGE_CLIENT first)")
            try:
                return remote.complete(self.dispatcher, client, vcpu)
            except MemoryFault as e:
                self.dispatcher.fail_vm(vm, e)
                return refuse(errno.EFAULT, "the client's request page is unreachable ({})", e)
        if cmd == abi.ACRN_IOCTL_IOEVENTFD:
            return self.acrn_ioeventfd(vm, call, binding)
        if cmd == abi.ACRN_IOCTL_IRQFD:
            return self.acrn_irqfd(vm, call, binding)
        return self.acrn_table[cmd](vm, call)  # INJECT_MSI, SET_IRQLINE

    def unbind(self, f: HsmFile, reason: str) -> None:
        binding = f.binding
        assert binding is not None
        f.binding = None
        if binding.valid:
            ioeventfd.drop_owned(binding.vm, binding)
            irqfd.drop_owned(binding.vm, binding)
        ranges.unbind(self.dispatcher, binding, reason)

    def value_call(self, f: HsmFile, call: IoctlCall) -> IoctlResult:
        """An ACRN ioctl whose argument is a value, carried by pointer (FUSE cannot pass
        it): the same call on this file, its answer in ``result`` (docs/extension-abi.md)."""
        size = ctypes.sizeof(ext.AcrnEmuValueCall)
        if len(call.in_data) < size:
            return refuse(errno.EFAULT, "the argument is not readable")
        vc = ext.AcrnEmuValueCall.from_buffer_copy(call.in_data[:size])
        if vc.reserved or vc.cmd not in ext.VALUE_CALLS:
            return refuse(errno.EINVAL, "cmd={:#x} reserved={:#x}: a value-argument ACRN ioctl, reserved 0",
                          vc.cmd, vc.reserved)
        carried = IoctlCall(cmd=vc.cmd, arg=vc.arg, in_data=b"", out_size=0, ctx=call.ctx,
                            compat=call.compat)  # fmt: skip
        ret = self.acrn_ioctl(f, carried)
        if isinstance(ret, tuple):
            ret = ret[0]  # a value call has nowhere to copy data to
        # every value call is answered at once (ext.VALUE_CALLS: none of them waits)
        assert isinstance(ret, int), f"value call {vc.cmd:#x} did not answer at once"
        vc.result = ret
        return 0, bytes(vc)

    def version(self, f: HsmFile, call: IoctlCall) -> IoctlResult:
        v = ext.AcrnEmuVersion(ext.ACRN_EMU_ABI_MAJOR, ext.ACRN_EMU_ABI_MINOR, ext.FEATURES, 0)
        return 0, bytes(v)

    def bind(self, f: HsmFile, call: IoctlCall) -> IoctlResult:
        if len(call.in_data) < ctypes.sizeof(ext.AcrnEmuBind):
            return refuse(errno.EFAULT, "the argument is not readable")
        if f.vm.live:
            return refuse(errno.EBUSY, "this file owns VM {}: bind another file", f.vm.vmid)
        if f.binding is not None:
            if f.binding.valid:
                return refuse(errno.EBUSY, "this file is bound to VM {} already", f.binding.vm.vmid)
            self.unbind(f, "rebinding")
        ret, binding, out = ranges.bind(self.dispatcher, self.bind_policy, call.ctx, call.in_data)
        if ret < 0:
            return ret
        f.binding = binding
        return 0, out

    def _bound(self, f: HsmFile) -> Binding | int:
        if f.binding is None:
            return refuse(errno.EINVAL, "this file is not bound to a VM (BIND_VM first)")
        if not f.binding.valid:
            return refuse(errno.ENODEV, "the VM this file was bound to is gone")
        return f.binding

    def create_client(self, f: HsmFile, call: IoctlCall) -> IoctlResult:
        b = self._bound(f)
        if isinstance(b, int):
            return b
        if len(call.in_data) < ctypes.sizeof(ext.AcrnEmuRangeClient):
            return refuse(errno.EFAULT, "the argument is not readable")
        remote = sum(1 for c in b.vm.range_clients if c.remote is not None)
        if remote >= self.limits.range_clients_per_vm:
            return refuse_limit("range_clients_per_vm", self.limits.range_clients_per_vm, errno.ENOSPC,
                           vmid=b.vm.vmid)
        return ranges.create_client(self.dispatcher, b, call.ctx, call.in_data, f.ctx.fh)

    def destroy_client(self, f: HsmFile, call: IoctlCall) -> IoctlResult:
        b = f.binding
        if b is None:
            return refuse(errno.EINVAL, "this file is not bound to a VM (BIND_VM first)")
        client = b.live_client
        if client is not None:
            self.dispatcher.client_destroy(client, "destroyed by its file")
        return 0

    def add_range(self, f: HsmFile, call: IoctlCall) -> IoctlResult:
        return self._range(f, call, ranges.add_range)

    def del_range(self, f: HsmFile, call: IoctlCall) -> IoctlResult:
        return self._range(f, call, ranges.del_range)

    def _range(
        self, f: HsmFile, call: IoctlCall, op: Callable[[Binding, bytes], int]
    ) -> IoctlResult:
        b = self._bound(f)
        if isinstance(b, int):
            return b
        if len(call.in_data) < ctypes.sizeof(ext.AcrnEmuRange):
            return refuse(errno.EFAULT, "the argument is not readable")
        return op(b, call.in_data)
