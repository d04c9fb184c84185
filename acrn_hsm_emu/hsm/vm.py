"""The VM object of an open file and its life: what ``vm.c`` does.

One :class:`Vm` exists per open file, from open to release, and is reused by
every CREATE_VM on that file, as the kernel's ``struct acrn_vm`` is. That
reuse is where the driver's two re-create quirks come from (spec: hsm 3.2).
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Any

import structlog

from acrn_hsm_emu import abi
from acrn_hsm_emu.hsm import acrn_kernel, ioeventfd, irqfd
from acrn_hsm_emu.hsm.hypercall_log import HypercallLog
from acrn_hsm_emu.hsm.ioreq import (
    SLOTS,
    Dispatcher,
    IoreqClient,
    Memory,
    RequestCounters,
    SlotScanner,
)
from acrn_hsm_emu.memory import SharedPage

if TYPE_CHECKING:
    from acrn_hsm_emu.hsm.ioeventfd import Ioeventfd
    from acrn_hsm_emu.hsm.irqfd import Irqfd
    from acrn_hsm_emu.hsm.mm import RamMapping
    from acrn_hsm_emu.hsm.ranges import Binding

log = structlog.get_logger("acrn_hsm_emu.hsm")

INVALID_VMID = abi.ACRN_INVALID_VMID
_CREATION_IDS = struct.Struct("<HxxH")  # vmid, vcpu_num
_CREATION_BUF = struct.Struct("<32xQ")  # ioreq_buf


def express_snapshot(x: Any) -> dict[str, int] | None:
    """What the VM's express path did (hsm/express.py), None when it has none."""
    if x is None:
        return None
    return {
        "dispatch": x.dispatch,
        "dispatched": x.defaults,
        "notified": x.notified,
        "attaches": x.attaches,
        "attach_refused": x.refused,
        "waiting": x.nparked,
        "ioeventfd": x.in_kernel,
    }


class Vm:
    """struct acrn_vm: the fields an observer of the driver can tell apart."""

    __slots__ = (
        "vmid", "vcpu_num", "nslots", "destroyed", "clearing",
        "mem", "page_base", "ioreq_page", "scanner", "pci_conf_addr",
        "range_clients", "default_client", "ioeventfd_client", "ioeventfds",
        "irqfds", "monitor_page", "ram_mappings", "regions_mapping_count",
        "counters", "opener_pid", "owner_pid", "failed", "orphaned", "lost_vmid",
        "owner_uid", "generation", "bindings", "hypercalls", "mmio_segments",
        "fh", "express", "express_ranges", "express_ioeventfds", "acrn_kernel",
    )  # fmt: skip

    def __init__(self, opener_pid: int, fh: int = 0) -> None:
        self.vmid = INVALID_VMID
        self.fh = fh  # cdev's handle of the file (what the express prefilter matches)
        self.express: Any = None  # struct hsm_xvm while on the express path (express.py)
        self.express_ranges: Any = None  # the range table C reads
        self.express_ioeventfds: Any = None  # the ioeventfd table C reads
        self.vcpu_num = 0
        self.nslots = 0  # slots the dispatcher scans: vcpu_num, at most the page's 16
        self.destroyed = False  # ACRN_VM_FLAG_DESTROYED, sticky (quirk)
        self.clearing = False  # ACRN_VM_FLAG_CLEARING_IOREQ
        self.mem: Memory | None = None  # the creator's memory, for the request page
        self.page_base: int | None = None  # ioreq_buf: None = no request page
        self.ioreq_page: SharedPage | None = None  # what the hypervisor was given
        self.scanner: SlotScanner | None = None
        self.pci_conf_addr = 0  # never reset by a re-create, as in the driver
        self.range_clients: list[IoreqClient] = []  # newest first
        self.default_client: IoreqClient | None = None
        self.ioeventfd_client: IoreqClient | None = None
        self.ioeventfds: list[Ioeventfd] = []
        self.irqfds: list[Irqfd] = []
        self.mmio_segments = 0  # MMIO SET_MEMSEGs in force (the daemon's limit)
        self.monitor_page: SharedPage | None = None
        self.ram_mappings: list[RamMapping] = []
        self.regions_mapping_count = 0  # never reset (quirk)
        self.counters = RequestCounters()
        self.opener_pid = opener_pid
        self.owner_pid = 0  # the process whose memory holds the request page
        self.failed: str | None = None
        self.orphaned = False  # its file is gone but the VM lives on
        self.lost_vmid: int | None = None  # hypervisor VM this object lost (quirk)
        self.owner_uid = 0  # uid of the CREATE_VM caller: the bind permission rule
        self.generation = 0  # bumped by every successful CREATE_VM (bindings check it)
        self.bindings: list[Binding] = []  # other files bound to this VM (extension ABI)
        self.hypercalls = HypercallLog()
        self.acrn_kernel: Any = None  # acrn_kernel.AcrnKernelVm under the acrn-kernel profile

    @property
    def live(self) -> bool:
        return self.vmid != INVALID_VMID

    def snapshot(self) -> dict[str, object]:
        clients = []
        if self.default_client is not None:
            clients.append(self.default_client.snapshot())
        clients.extend(c.snapshot() for c in self.range_clients)
        return {
            "vmid": self.vmid,
            "lost_vmid": self.lost_vmid,
            "vcpu_num": self.vcpu_num,
            "owner_pid": self.owner_pid,
            "opener_pid": self.opener_pid,
            "destroyed_flag": self.destroyed,
            "clearing": self.clearing,
            "orphaned": self.orphaned,
            "failed": self.failed,
            "request_page": self.page_base,
            "pci_conf_addr": self.pci_conf_addr,
            "clients": clients,
            "ram_mappings": len(self.ram_mappings),
            "regions_mapping_count": self.regions_mapping_count,
            "ioeventfds": len(self.ioeventfds),
            "irqfds": len(self.irqfds),
            "express": express_snapshot(self.express),
            "monitor_page": self.monitor_page.base if self.monitor_page else None,
            "counters": self.counters.as_dict(),
            "owner_uid": self.owner_uid,
            "bound_files": [b.snapshot() for b in self.bindings],
            "hypercalls": self.hypercalls.snapshot(),
            "acrn_kernel": None if self.acrn_kernel is None else self.acrn_kernel.snapshot(),
        }


def vm_create(
    d: Dispatcher, vm: Vm, param: bytearray, pid: int, quirks: bool, uid: int = 0
) -> int:
    """acrn_vm_create; 0, or -EINVAL for every failure (the driver hides the errno)."""
    if not quirks and vm.live:
        return -errno.EINVAL  # refuse a second VM on a live file up front
    ret = d.hv.create_vm(param)
    vmid, vcpu_num = _CREATION_IDS.unpack_from(param)
    if ret < 0 or vmid == INVALID_VMID:
        log.debug("hsm.create_vm_refused", ret=ret, vmid=vmid)
        return -errno.EINVAL
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
        return -errno.EINVAL
    vm.owner_uid = uid
    vm.generation += 1
    vm.mmio_segments = 0  # a new VM in the hypervisor: no MMIO regions yet
    vm.bindings = []
    vm.hypercalls = HypercallLog()
    d.list_add(vm)
    ioeventfd.ioeventfd_init(d, vm)
    irqfd.irqfd_init(vm)
    log.info("hsm.vm_created", vmid=vmid, vcpu_num=vcpu_num, pid=pid)
    return 0


def vm_destroy(d: Dispatcher, vm: Vm) -> int:
    """acrn_vm_destroy, newer order: the hypercall first, teardown only on success."""
    if not vm.live or vm.destroyed:
        return 0
    vm.destroyed = True
    ret = d.hv.destroy_vm(vm.vmid)
    if ret < 0:
        vm.destroyed = False
        log.info("hsm.destroy_vm_refused", vmid=vm.vmid, ret=ret)
        return ret
    d.list_del(vm)
    ioeventfd.ioeventfd_deinit(d, vm)
    irqfd.irqfd_deinit(vm)
    d.ioreq_deinit(vm)
    rings = _ring_counts(vm)
    acrn_kernel.deinit(vm, d.quirks)
    vm.monitor_page = None
    vm.ram_mappings = []  # unpin; regions_mapping_count is left as is
    vm.bindings = []  # bound files now answer ENODEV (their generation is gone)
    log.info("hsm.vm_destroyed", vmid=vm.vmid, **rings)
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
