"""A VM's life: what ``vm.c`` does (acrn_vm_create, acrn_vm_destroy).

The :class:`~acrn_hsm_emu.hsm.acrn_drv.Vm` of an open file exists from open
to release and is reused by every CREATE_VM on that file, as the kernel's
``struct acrn_vm`` is. That reuse is where the driver's two re-create quirks
come from (spec: hsm 3.2).
"""

from __future__ import annotations

import errno
import struct

import structlog

from acrn_hsm_emu.hsm import acrn_kernel, ioeventfd, irqfd
from acrn_hsm_emu.hsm.acrn_drv import INVALID_VMID, SLOTS, SlotScanner, Vm
from acrn_hsm_emu.hsm.hypercall_log import HypercallLog
from acrn_hsm_emu.hsm.ioreq import Dispatcher
from acrn_hsm_emu.observe.events import BUS
from acrn_hsm_emu.observe.trace import TRACE, refuse

log = structlog.get_logger("acrn_hsm_emu.hsm")

_CREATION_IDS = struct.Struct("<HxxH")  # vmid, vcpu_num
_CREATION_BUF = struct.Struct("<32xQ")  # ioreq_buf


def vm_create(
    d: Dispatcher, vm: Vm, param: bytearray, pid: int, quirks: bool, uid: int = 0
) -> int:
    """acrn_vm_create; 0, or -EINVAL for every failure (the driver hides the errno)."""
    if not quirks and vm.live:  # refuse a second VM on a live file up front
        return refuse(errno.EINVAL, "this file has VM {} already (quirks off)", vm.vmid)
    ret = d.hv.create_vm(param)
    vmid, vcpu_num = _CREATION_IDS.unpack_from(param)
    if ret < 0 or vmid == INVALID_VMID:
        log.debug("hsm.create_vm_refused", ret=ret, vmid=vmid)
        return refuse(errno.EINVAL, "the hypervisor refused create_vm ({}): the driver answers EINVAL",
                      errno.errorcode.get(-ret, ret) if ret < 0 else "no vmid")
    had_page = vm.page_base is not None
    if vm.destroyed:
        if quirks:
            log.warning(
                "hsm.quirk.sticky_destroyed",
                vmid=vmid,
                note="VM created on a file whose earlier VM was destroyed: "
                "DESTROY_VM and close will not destroy it (kernel behaviour)",
            )
        else:
            vm.destroyed = False
            vm.regions_mapping_count = 0
    # The driver re-initialises the range-client list even when a VM is live.
    vm.range_clients = []
    old_vmid = vm.vmid
    vm.vmid = vmid
    vm.vcpu_num = vcpu_num
    vm.nslots = min(vcpu_num, SLOTS)
    (ioreq_buf,) = _CREATION_BUF.unpack_from(param)
    ret = d.ioreq_init(vm, pid, ioreq_buf)
    if ret < 0:
        d.hv.destroy_vm(vmid)
        vm.vmid = INVALID_VMID
        if had_page:
            d.express_remove(vm, old_vmid)  # the lost VM goes back to the Python path
            vm.lost_vmid = old_vmid
            assert vm.mem is not None and vm.page_base is not None
            # the old page is now scanned for the new VM's vCPU count
            vm.scanner = SlotScanner(vm.mem, vm.page_base, vm.nslots)
            log.warning(
                "hsm.quirk.second_create_vm",
                lost_vmid=old_vmid,
                note="CREATE_VM on a file with a live VM: the file lost its VM, "
                "which stays in the hypervisor and the dispatch list (kernel behaviour)",
            )
        log.debug("hsm.create_vm_failed", vmid=vmid, err=ret)
        return refuse(errno.EINVAL, "the request page could not be set up ({}): the driver answers EINVAL",
                      errno.errorcode.get(-ret, ret))
    vm.owner_uid = uid
    vm.generation += 1
    vm.mmio_segments = 0  # a new VM in the hypervisor: no MMIO regions yet
    vm.bindings = []
    fresh = HypercallLog()
    fresh.native = vm.hypercalls.native  # this VM's native INJECT_MSI, which ioreq_init's express path set
    fresh.fold()  # anything it did already: nothing, unless a racing thread's INJECT_MSI
    vm.hypercalls = fresh
    d.list_add(vm)
    ioeventfd.ioeventfd_init(d, vm)
    irqfd.irqfd_init(vm)
    log.info("hsm.vm_created", vmid=vmid, vcpu_num=vcpu_num, pid=pid)
    if BUS.listeners:
        BUS.emit("vm.created", vmid=vmid, vcpu_num=vcpu_num, pid=pid)
    return 0


def vm_destroy(d: Dispatcher, vm: Vm, *, quiet: bool = False, by: str = "ioctl") -> int:
    """acrn_vm_destroy, newer order: the hypercall first, teardown only on success.

    ``quiet``: a refusal the caller handles itself (a release pauses the VM and
    tries again, and logs the outcome as one line) is not logged here. ``by``: who
    destroys it, for the ``vm.destroyed`` event (ioctl, release, admin).
    """
    if not vm.live or vm.destroyed:
        return 0
    vm.destroyed = True
    ret = d.hv.destroy_vm(vm.vmid)
    if ret < 0:
        vm.destroyed = False
        if not quiet:
            log.info("hsm.destroy_vm_refused", vmid=vm.vmid, ret=ret)
        return refuse(-ret, "the hypervisor refused destroy_vm for VM {} (ACRN destroys only a paused VM)",
                      vm.vmid)
    d.list_del(vm)
    ioeventfd.ioeventfd_deinit(d, vm)
    irqfd.irqfd_deinit(vm)
    d.ioreq_deinit(vm)  # the express path's trace records are drained here
    if TRACE.requests:
        TRACE.abandon(vm.vmid)
    rings = _ring_counts(vm)
    acrn_kernel.deinit(vm, d.quirks)
    vm.monitor_page = None
    vm.ram_mappings = []  # unpin; regions_mapping_count is left as is
    vm.bindings = []  # bound files now answer ENODEV (their generation is gone)
    log.info("hsm.vm_destroyed", vmid=vm.vmid, **rings)
    if BUS.listeners:
        BUS.emit("vm.destroyed", vmid=vm.vmid, by=by)
    vm.vmid = INVALID_VMID
    return 0


def _ring_counts(vm: Vm) -> dict[str, int]:
    """What the acrn-kernel profile's rings carried, for the destroy log line."""
    st = vm.acrn_kernel
    if st is None:
        return {}
    return {
        "asyncio_signals": sum(a.signals for a in st.asyncio_fds),
        "vm_event_signals": st.vm_event_signals,
    }
