"""The mock ACRN hypervisor: the :class:`~acrn_hsm_emu.hypervisor.api.Hypercalls` the HSM calls.

Each method is the ACRN hypercall of the same name, with ACRN's target
lookup (relative vmids, ``parse_target_vm``), state preconditions and return
values (spec: hv A.0, A.1, A.1.1, A.4, A.5). Every method returns quickly and
never waits for a vCPU thread beyond a short join of threads already told to
stop; it is safe to call from any thread.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import functools
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from acrn_hsm_emu import abi
from acrn_hsm_emu import acrn_kernel_abi as ak
from acrn_hsm_emu._native import ffi as _ffi
from acrn_hsm_emu._native import lib as _lib
from acrn_hsm_emu.hypervisor import cpuid as cpuid_mod
from acrn_hsm_emu.hypervisor.api import Access, MemoryRegionOp, NativeUpcall
from acrn_hsm_emu.hypervisor.backends import Backend, BackendError, VcpuBackend, make_backend
from acrn_hsm_emu.hypervisor.backends.scripted import ReplayLog
from acrn_hsm_emu.hypervisor.record import Recorder
from acrn_hsm_emu.hypervisor.scenario import (
    MAX_VCPUS_PER_VM,
    VIOAPIC_GSI_COUNT,
    Scenario,
    VmSlot,
    default_scenario,
    format_bdf,
    load_scenario,
)
from acrn_hsm_emu.hypervisor.vcpu import AccessAborted, Vcpu
from acrn_hsm_emu.hypervisor.vm import (
    PAGE_SIZE,
    PCI_CONFIG_DATA,
    AsyncioDesc,
    EptMapping,
    Placement,
    Vm,
    VmState,
)
from acrn_hsm_emu.hypervisor.workload import Workload, check_access
from acrn_hsm_emu.memory import MemoryFault, SharedPage
from acrn_hsm_emu.sbuf import SharedRing

_log = structlog.get_logger(__name__)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

ENOTTY = -errno.ENOTTY  # dispatch: no such target (hv A.0)
_FAIL = -1  # ACRN's generic failure
_FOLD_BATCH = 256  # records a fold takes from a native gate per call
_MSI = struct.Struct("<QQ")  # struct acrn_msi_entry: msi_addr, msi_data
assert _MSI.size == ctypes.sizeof(abi.AcrnMsiEntry)

_FREE = abi.ACRN_IOREQ_STATE_FREE
_JOIN_BUDGET_S = 0.1  # total wait for stopped vCPU threads in one hypercall

# CR0 bits a guest may set (PE MP EM TS ET NE WP AM NW CD PG); the rest are reserved.
CR0_ALLOWED = 0x3F | 1 << 16 | 1 << 18 | 0b111 << 29
# CR4 bits a guest may set: VME..UMIP (0-11), FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP, PKE.
# Reserved here: LA57, VMXE (no nested VMX), SMXE, CET, PKS and everything above.
CR4_ALLOWED = 0xFFF | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 20 | 1 << 21 | 1 << 22

# Emulated devices CREATE_VDEV knows (hc.c emul_dev_ops_tbl): full 64-bit id.value.
VDEV_IVSHMEM = 0x1AF4 | 0x1110 << 16
VDEV_MCS9900 = 0x9710 | 0x9900 << 16
VDEV_VROOT_PORT = 0x8086 | 0x9D14 << 16
_VDEV_IDS = frozenset({VDEV_IVSHMEM, VDEV_MCS9900, VDEV_VROOT_PORT})

# EPT memory types in acrn_mmiodev.res.mem_type (bits 5:3).
_EPT_MT = {0: "UC", 1: "WC", 4: "WT", 5: "WP", 6: "WB"}
# Ports the hypervisor traps in the Service VM (vPCI, its vRTC, the reset port and
# keyboard status): not the Service VM's to give away with HC_ASSIGN_PIO_REGION.
SERVICE_VM_TRAPPED_PORTS = frozenset({*range(0xCF8, 0xD00), 0x70, 0x71, 0x64})
_VPIC_PINS = 16


def valid_cr0_cr4(cr0: int, cr4: int) -> bool:
    """``is_valid_cr0_cr4``, reduced to reserved bits: none may be set."""
    return not (cr0 & ~CR0_ALLOWED) and not (cr4 & ~CR4_ALLOWED)


@dataclass(eq=False)
class _Slot:
    """Runtime part of a ``vm_configs[]`` entry: what CREATE/DESTROY change in it."""

    config: VmSlot
    name: bytes  # compared like strncmp(.., 16); empty = free dynamic slot
    guest_flags: int
    vm: Vm | None = None  # None: POWERED_OFF

    @property
    def state(self) -> VmState:
        return VmState.POWERED_OFF if self.vm is None else self.vm.state


class Hypervisor:
    """ACRN as seen from the Service VM. ``Hypervisor(scenario, backend="scripted", workload=None)``."""

    def __init__(
        self,
        scenario: Scenario | str | Path | None = None,
        backend: str | Backend = "scripted",
        workload: Workload | str | Path | None = None,
        vcpu_cpus: Sequence[int] = (),
        vcpu_poll_us: int = 200,
    ) -> None:
        if scenario is None:
            scenario = default_scenario()
        elif not isinstance(scenario, Scenario):
            scenario = load_scenario(scenario)
        self.scenario = scenario
        self.placement = Placement(tuple(vcpu_cpus), frozenset(os.sched_getaffinity(0)), vcpu_poll_us * 1000)
        if workload is not None and not isinstance(workload, Workload):
            workload = Workload.load(workload)
        if isinstance(backend, str):
            self.backend: Backend = make_backend(backend, workload)
        else:
            self.backend = backend
            if workload is not None:
                self.set_workload(None, workload)
        self._lock = threading.RLock()
        self._irq_out = _ffi.new("struct hsm_irq_rec[]", _FOLD_BATCH)  # _fold_irqs's, locked
        self._recorders: dict[int, Recorder] = {}  # by relative vmid, until collected
        self._upcall: Callable[[], None] | None = None
        self._sid = scenario.service_vm_id
        self._max = scenario.max_vm_num
        self._dm_owned = scenario.dm_owned_flags
        self._slots = [_Slot(c, c.name.encode(), c.guest_flags) for c in scenario.vms]
        self._pci_owner: dict[int, int] = {}  # phys BDF -> abs id of the VM it was given to
        self._intx_owner: dict[int, int] = {}  # phys GSI -> abs id
        self._pio_owner: dict[int, int] = {}  # port -> abs id of the VM it was given to
        self._offline_lapics: set[int] = set()
        for abs_id, slot in enumerate(self._slots):  # hv boot: Service VM and pre-launched VMs
            if slot.config.load_order != "post":
                vm = self._new_vm(abs_id, slot, slot.config.cpu_affinity)
                vm.vcpu_num = slot.config.cpu_affinity.bit_count()
                vm.state = VmState.RUNNING
                slot.vm = vm
        _log.info(
            "hypervisor.boot",
            scenario=scenario.source,
            pcpus=scenario.pcpus,
            max_vm_num=self._max,
            service_vm_id=self._sid,
            acrn=scenario.acrn,
            privileged=scenario.privileged,
            backend=self.backend.name,
            vcpu_cpus=list(self.placement.vcpu_cpus) or "any",
        )

    # ----- helpers -------------------------------------------------------------------

    def _rel(self, abs_id: int) -> int:
        return (abs_id - self._sid) & 0xFFFF  # vmid_2_rel_vmid

    def _target(self, vmid: int) -> _Slot | int:
        """``parse_target_vm`` + dispatch checks for a relative vmid: the slot or -ENOTTY."""
        abs_id = (self._sid + (vmid & 0xFFFF)) & 0xFFFF
        if abs_id >= self._max:
            return ENOTTY
        slot = self._slots[abs_id]
        if slot.config.load_order == "pre":
            return ENOTTY
        return slot

    def _vm(self, vmid: int) -> Vm | int:
        """The target's VM, or what a hypercall answers without one (-ENOTTY, -1)."""
        slot = self._target(vmid)
        if isinstance(slot, int):
            return slot
        return _FAIL if slot.vm is None else slot.vm

    def _new_vm(self, abs_id: int, slot: _Slot, affinity: int) -> Vm:
        name = slot.name.decode(errors="replace")
        return Vm(
            abs_id,
            self._rel(abs_id),
            slot.config,
            name,
            slot.guest_flags,
            affinity,
            lambda: self._upcall,
            self.placement,
            functools.partial(cpuid_mod.cpuid, self.scenario, service_vm=abs_id == self._sid),
        )

    def _find_name(self, name: bytes) -> int | None:
        for i, s in enumerate(self._slots):
            if s.name == name:
                return i
        return None

    def _unused_slot(self) -> int | None:
        """``get_unused_vmid``: the first dynamic slot with an empty name."""
        for i, s in enumerate(self._slots):
            if not s.name and s.config.dynamic:
                return i
        return None

    # ----- the HSM seam --------------------------------------------------------------

    def set_upcall(self, upcall: Callable[[], None] | None) -> None:
        self._upcall = upcall

    def set_workload(self, vmid: int | None, workload: Workload | None) -> None:
        """Scripted backend: the workload of VM ``vmid`` (None: every VM), used from the
        next START_VM after CREATE or RESET."""
        setter = getattr(self.backend, "set_workload", None)
        if setter is None:
            raise ValueError(f"the {self.backend.name} backend does not take workloads")
        setter(vmid, workload)

    # ----- VM lifecycle ----------------------------------------------------------------

    def create_vm(self, param: bytearray) -> int:
        """HC_CREATE_VM (hc.c ``hcall_create_vm``, vm.c ``create_vm``; spec hv A.5)."""
        if len(param) != ctypes.sizeof(abi.AcrnVmCreation):
            return ENOTTY  # the copy in parse_target_vm fails: no target
        cv = abi.AcrnVmCreation.from_buffer(param)  # written back in place
        name = bytes(cv.uuid).split(b"\0", 1)[0]
        with self._lock:
            abs_id = self._find_name(name) if name else None
            if abs_id is None:
                abs_id = self._unused_slot()
                if abs_id is None:
                    _log.warning("hypercall.create_vm.no_slot", name=name.decode(errors="replace"))
                    return ENOTTY
                self._slots[abs_id].name = name
            slot = self._slots[abs_id]
            if slot.config.load_order == "pre":
                return ENOTTY
            ret = _FAIL
            vm = None
            if slot.vm is None:
                slot.guest_flags = (slot.guest_flags & ~self._dm_owned) | (
                    cv.vm_flag & self._dm_owned
                )
                # Dynamic slots: the caller's pCPUs must exist; 0 takes the slot's default
                # affinity (our choice, see docs/scenario.md). Static: a subset of the config.
                allowed = (
                    self.scenario.pcpu_mask if slot.config.dynamic else slot.config.cpu_affinity
                )
                lapic_pt = slot.guest_flags & abi.GUEST_FLAG_LAPIC_PASSTHROUGH
                if cv.cpu_affinity & ~allowed:
                    _log.info(
                        "hypercall.create_vm.bad_affinity",
                        abs_id=abs_id,
                        cpu_affinity=hex(cv.cpu_affinity),
                        allowed=hex(allowed),
                    )
                elif lapic_pt and not slot.guest_flags & abi.GUEST_FLAG_RT:
                    _log.info("hypercall.create_vm.lapic_pt_without_rt", abs_id=abs_id)
                else:
                    vm = self._create(abs_id, slot, cv.cpu_affinity or slot.config.cpu_affinity)
                    if vm is None:
                        cv.vmid = abi.ACRN_INVALID_VMID
                    else:
                        cv.vmid, cv.vcpu_num = vm.vmid, vm.vcpu_num
                    ret = 0
            if vm is None and slot.config.dynamic:
                slot.name = b""  # the slot is free again (ACRN also does this for a live VM)
            return ret

    def _create(self, abs_id: int, slot: _Slot, affinity: int) -> Vm | None:
        """``create_vm`` proper: the new VM (CREATED, vCPU threads idle), or None."""
        if not slot.name:
            slot.name = f"ACRN VM_{abs_id}".encode()  # vm.c names unnamed VMs after their id
        pcpus = [i for i in range(affinity.bit_length()) if affinity >> i & 1]
        if len(pcpus) > MAX_VCPUS_PER_VM:
            _log.warning("hypercall.create_vm.too_many_vcpus", abs_id=abs_id, vcpus=len(pcpus))
            return None
        rel = self._rel(abs_id)
        vm = self._new_vm(abs_id, slot, affinity)
        vm.vcpu_num = len(pcpus)
        vm.lapic_ids = tuple(self.scenario.lapic_id(p) for p in pcpus)  # vCPU i: its pCPU's id
        made: list[VcpuBackend] = []
        try:
            self.backend.vm_created(rel, vm.vcpu_num, vm.lapic_ids)
            for i in range(len(pcpus)):
                made.append(self.backend.create_vcpu(rel, i))
        except BackendError as e:
            _log.error("hypercall.create_vm.backend_failed", abs_id=abs_id, error=str(e))
            for b in made:  # never started: their threads will not close them
                b.close()
            self.backend.vm_destroyed(rel)
            return None
        vm.vcpus = [Vcpu(vm, i, p, b) for i, (p, b) in enumerate(zip(pcpus, made, strict=True))]
        slot.vm = vm
        rec = self._recorders.get(rel)
        if rec is not None:
            rec.attach(vm)  # armed by `acrn-hsm-emu record` before the VM existed
        for v in vm.vcpus:
            v.start_thread()
        _log.info(
            "vm.created",
            vmid=rel,
            abs_id=abs_id,
            name=vm.name,
            vcpus=vm.vcpu_num,
            cpu_affinity=hex(affinity),
            lapic_ids=list(vm.lapic_ids),
            guest_flags=hex(vm.guest_flags),
            polling=vm.polling,
        )
        return vm

    def destroy_vm(self, vmid: int) -> int:
        """HC_DESTROY_VM: only from PAUSED (``shutdown_vm``)."""
        with self._lock:
            slot = self._target(vmid)
            if isinstance(slot, int):
                return slot
            vm = slot.vm
            if vm is None or vm.state != VmState.PAUSED:
                return _FAIL
            with vm.lock:
                vm.state = VmState.POWERED_OFF
            for v in vm.vcpus:
                v.stop()
            deadline = time.monotonic() + _JOIN_BUDGET_S
            for v in vm.vcpus:
                if not v.join(max(0.0, deadline - time.monotonic())):
                    _log.warning("vm.vcpu_thread_lingers", vmid=vm.vmid, vcpu=v.vcpu_id)
            if vm.recorder is not None:  # after the threads: their last accesses are in
                vm.recorder.stop("VM destroyed")
            if slot.config.load_order == "post":
                self.backend.vm_destroyed(vm.vmid)
            self._release_devices(vm)
            vm.clear_records()
            with vm.ring_lock:
                vm.asyncio_ring = None
                vm.vm_event_ring = None
                vm.asyncio_descs = []
            slot.vm = None
            slot.guest_flags &= ~self._dm_owned
            if slot.config.dynamic:
                slot.name = b""
            _log.info("vm.destroyed", vmid=vm.vmid, abs_id=vm.abs_id)
            return 0

    def start_vm(self, vmid: int) -> int:
        """HC_START_VM: CREATED with the request buffer set."""
        with self._lock:
            slot = self._target(vmid)
            if isinstance(slot, int):
                return slot
            vm = slot.vm
            if vm is None or vm.state != VmState.CREATED or vm.page is None:
                return _FAIL
            with vm.lock:
                vm.state = VmState.RUNNING
            if slot.config.load_order == "post":
                self.backend.vm_started(vm.vmid)
            for v in vm.vcpus:
                v.kick()
            _log.info("vm.started", vmid=vm.vmid)
            return 0

    def pause_vm(self, vmid: int) -> int:
        """HC_PAUSE_VM: 0 in every state but POWERED_OFF, changing it only when ACRN would."""
        with self._lock:
            slot = self._target(vmid)
            if isinstance(slot, int):
                return slot
            vm = slot.vm
            if vm is None:
                return _FAIL
            if (vm.state == VmState.RUNNING and vm.severity_pass) or vm.state in (
                VmState.CREATED,
                VmState.READY_TO_POWEROFF,
            ):
                with vm.lock:
                    vm.state = VmState.PAUSED
                for v in vm.vcpus:
                    v.kick()
                if slot.config.load_order == "post":
                    self.backend.vm_paused(vm.vmid)  # a short wait for kicked vCPUs
                _log.info("vm.paused", vmid=vm.vmid)
            return 0

    def reset_vm(self, vmid: int) -> int:
        """HC_RESET_VM: PAUSED -> CREATED, all 16 slots FREE, vCPUs cold-reset."""
        with self._lock:
            slot = self._target(vmid)
            if isinstance(slot, int):
                return slot
            vm = slot.vm
            if vm is None or vm.state != VmState.PAUSED:
                return _FAIL
            if vm.recorder is not None:
                vm.recorder.new_run()  # the vCPUs are paused: no access is being recorded
            with vm.lock:
                vm.unreset = {v.vcpu_id for v in vm.vcpus}
                for v in vm.vcpus:
                    v.reset()
                fault = vm.fault
                if vm.page is not None:
                    try:
                        _free_slots(vm.page)
                        fault = None
                    except MemoryFault as e:
                        _log.warning("vm.reset_page_fault", vmid=vm.vmid, error=str(e))
                vm.fault = fault
                vm.reset_devices()
                vm.state = VmState.CREATED
            if slot.config.load_order == "post":
                self.backend.vm_reset(vm.vmid)
            for v in vm.vcpus:
                v.fail_queued("VM reset")
            _log.info("vm.reset", vmid=vm.vmid)
            return 0

    def create_vcpu(self, vmid: int) -> int:
        """HC_CREATE_VCPU: an obsolete no-op."""
        return 0

    def set_vcpu_regs(self, vmid: int, regs: bytes) -> int:
        """HC_SET_VCPU_REGS: not POWERED_OFF, not RUNNING, an existing vCPU, sane CR0/CR4."""
        with self._lock:
            slot = self._target(vmid)
            if isinstance(slot, int):
                return slot
            vm = slot.vm
            if vm is None or vm.state == VmState.RUNNING or not regs:
                return _FAIL
            if len(regs) != ctypes.sizeof(abi.AcrnVcpuRegs):
                return _FAIL
            r = abi.AcrnVcpuRegs.from_buffer_copy(regs)
            if r.vcpu_id >= self.scenario.pcpus or r.vcpu_id >= vm.vcpu_num:
                return _FAIL  # past MAX_VCPUS_PER_VM, or an OFFLINE (never created) vCPU
            if not valid_cr0_cr4(r.vcpu_regs.cr0, r.vcpu_regs.cr4):
                return _FAIL
            if slot.config.load_order == "post":
                try:
                    self.backend.vcpu_regs(vm.vmid, r.vcpu_id, bytes(regs))
                except BackendError:
                    return _FAIL  # a combination the CPU cannot run (logged by the backend)
            vm.regs[r.vcpu_id] = bytes(regs)
            return 0

    # ----- I/O requests ----------------------------------------------------------------

    def set_ioreq_buffer(self, vmid: int, page: SharedPage) -> int:
        """HC_SET_IOREQ_BUFFER: CREATED only; all 16 slots set FREE."""
        with self._lock:
            slot = self._target(vmid)
            if isinstance(slot, int):
                return slot
            vm = slot.vm
            if vm is None or vm.state != VmState.CREATED:
                return _FAIL
            with vm.lock:
                try:
                    _free_slots(page)
                except MemoryFault as e:  # ACRN: the GPA does not translate
                    _log.warning("hypercall.set_ioreq_buffer.fault", vmid=vm.vmid, error=str(e))
                    vm.page = None
                    return _FAIL
                vm.page = page
                vm.fault = None
            return 0

    def notify_request_finish(self, vmid: int, vcpu: int) -> int:
        """HC_NOTIFY_REQUEST_FINISH: wake the vCPU (notification mode). Lock-free: hot path."""
        slot = self._target(vmid)
        if isinstance(slot, int):
            return slot
        vm = slot.vm
        if vm is None or not vm.severity_pass or vm.page is None:
            return _FAIL
        vcpu &= 0xFFFF
        if vcpu >= vm.vcpu_num:
            return _FAIL
        if not vm.polling:
            vm.vcpus[vcpu].notify()
        return 0

    def set_native_upcall(self, vmid: int, handler: NativeUpcall | None) -> int:
        """A handler of VM ``vmid``'s requests that its vCPUs call in C, in their own
        thread, instead of raising the upcall (api.NativeUpcall), or None. Takes
        effect from each vCPU's next native cycle, which keeps the handler alive."""
        with self._lock:
            vm = self._vm(vmid)
            if isinstance(vm, int):
                return vm
            vm.native_upcall = handler
            return 0

    def notify_fds(self, vmid: int) -> list[int] | None:
        """What HC_NOTIFY_REQUEST_FINISH writes, for native callers: a duplicate of
        each vCPU's completion eventfd (the caller closes them), or None where the
        hypercall would do something else (no such VM, no request buffer, polling
        mode, not the Service VM's to serve)."""
        with self._lock:
            vm = self._vm(vmid)
            if isinstance(vm, int) or not vm.severity_pass or vm.page is None or vm.polling:
                return None
            fds: list[int] = []
            try:
                for v in vm.vcpus:
                    fds.append(os.dup(v.wake_fd))
            except OSError:
                for fd in fds:
                    os.close(fd)
                return None
            return fds

    def notify_waits(self, vmid: int) -> list[Any] | None:
        """HC_NOTIFY_REQUEST_FINISH's native form, for native callers: each
        vCPU's ``struct hsm_vcpu_wait *`` for ``hsm_vcpu_finish`` (the list keeps
        them alive), or None where :meth:`notify_fds` gives none."""
        with self._lock:
            vm = self._vm(vmid)
            if isinstance(vm, int) or not vm.severity_pass or vm.page is None or vm.polling:
                return None
            return [v.native_wait for v in vm.vcpus]

    # ----- memory --------------------------------------------------------------------

    def set_memory_regions(self, vmid: int, regions: list[MemoryRegionOp]) -> int:
        """HC_VM_SET_MEMORY_REGIONS: apply in order, stop at the first bad region."""
        with self._lock:
            slot = self._target(vmid)
            if isinstance(slot, int):
                return slot
            vm = slot.vm
            if vm is None or not (vm.severity_pass or vm.state != VmState.RUNNING):
                return _FAIL
            post = slot.config.load_order == "post"

            def apply(op: MemoryRegionOp) -> None:
                if op.type == abi.MR_ADD:
                    vm.memory.add(EptMapping.from_op(op))
                else:
                    vm.memory.delete(op.user_vm_pa, op.size)
                if post:
                    self.backend.memory_changed(vm.vmid, op)

            # ADD ops that continue each other (the HSM sends one per 4 KiB page) are
            # applied as one: same effect, in order, without n^2 work on big segments.
            run: _AddRun | None = None
            ret = _FAIL  # stays -1 for an empty batch
            for op in regions:
                if op.size % PAGE_SIZE:
                    ret = -errno.EINVAL
                    break
                ret = 0
                if op.type == abi.MR_ADD:
                    if run is not None and run.extend(op):
                        continue
                    if run is not None:
                        apply(run.op())
                    run = _AddRun(op)
                    continue
                if run is not None:
                    apply(run.op())
                    run = None
                if not vm.memory.covers(op.user_vm_pa, op.size):  # any other type deletes
                    ret = -errno.EINVAL
                    break
                apply(op)
            if run is not None:
                apply(run.op())
            return ret

    # ----- interrupts ------------------------------------------------------------------

    def inject_msi(self, vmid: int, msi: bytes) -> int:
        """HC_INJECT_MSI: recorded; the address must target the LAPIC range (0xFEExxxxx)."""
        with self._lock:
            slot = self._target(vmid)
            if isinstance(slot, int):
                return slot
            vm = slot.vm
            if vm is None or not vm.severity_pass or len(msi) != _MSI.size:
                return _FAIL
            addr, data = _MSI.unpack(msi)  # struct acrn_msi_entry
            if (addr >> 20) & 0xFFF != 0xFEE:
                return _FAIL
            self._fold_irqs(vm)  # what the native forms did came first
            vm.msi_count += 1
            vm.msi_recent.append((addr, data))
            if slot.config.load_order == "post":
                self.backend.inject_msi(vm.vmid, addr, data)
            return 0

    def irq_gate(self, vmid: int) -> Any:
        """HC_INJECT_MSI's and HC_SET_IRQLINE's native forms for callers outside Python
        (the express path): the VM's ``struct hsm_irq_gate *`` (native/irq_gate.h), where
        both hypercalls' checks pass for the VM whatever the argument (it exists, it is
        post-launched, the Service VM may target it) and the backend injects natively;
        else None. What they did is replayed into the VM's records here, in order
        (:meth:`fold_native_irqs`), before any record of this hypercall's and when read."""
        with self._lock:
            slot = self._target(vmid)
            if isinstance(slot, int) or slot.vm is None or not slot.vm.severity_pass:
                return None
            if slot.config.load_order != "post":
                return None
            return self.backend.irq_gate(slot.vm.vmid)

    def fold_native_irqs(self, vmid: int) -> None:
        with self._lock:
            slot = self._target(vmid)
            if not isinstance(slot, int) and slot.vm is not None:
                self._fold_irqs(slot.vm)

    def _fold_irqs(self, vm: Vm) -> None:
        """Locked: the calls the VM's native interrupt hypercalls made since the last
        fold, replayed into its records as the hypercalls here record them."""
        g = self.backend.irq_gate(vm.vmid)
        if g is None or g.n == g.taken[_lib.HSM_IRQ_HV]:  # only this moves taken[HV]
            return
        out = self._irq_out
        while True:
            k = _lib.hsm_irq_take(g, _lib.HSM_IRQ_HV, out, _FOLD_BATCH)
            for r in out[0:k]:
                if r.kind == _lib.HSM_IRQ_MSI:
                    vm.msi_count += 1
                    vm.msi_recent.append((r.a, r.b))
                else:
                    vm.record_irqline(r.a & 0xFFFFFFFF, r.a >> 32)
            if k < _FOLD_BATCH:
                return

    def set_irqline(self, vmid: int, value: int) -> int:
        """HC_SET_IRQLINE: ``value`` is acrn_irqline_ops itself (gsi low, op high)."""
        with self._lock:
            slot = self._target(vmid)
            if isinstance(slot, int):
                return slot
            vm = slot.vm
            if vm is None or not vm.severity_pass:
                return _FAIL
            self._fold_irqs(vm)  # what the native forms did came first
            gsi, op = value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF
            gsi_count = (
                VIOAPIC_GSI_COUNT
                if slot.config.load_order == "post"
                else self.scenario.host_gsi_count
            )
            if gsi >= gsi_count:
                return _FAIL
            vm.record_irqline(gsi, op)
            if slot.config.load_order == "post":
                self.backend.set_irqline(vm.vmid, gsi, op)
            return 0

    def vm_intr_monitor(self, vmid: int, page: SharedPage) -> int:
        """HC_VM_INTR_MONITOR: reads/writes ``acrn_intr_monitor`` in the page itself."""
        with self._lock:
            slot = self._target(vmid)
            if isinstance(slot, int):
                return slot
            vm = slot.vm
            if vm is None:
                return -errno.EINVAL
            try:
                cmd, buf_cnt = struct.unpack("<II", page.read(0, 8))
                if buf_cnt > abi.MAX_PTDEV_NUM * 2:
                    return -errno.EINVAL
                if cmd == abi.INTR_CMD_GET_DATA:
                    words: list[int] = []
                    limit = (buf_cnt - 2) & 0xFFFFFFFF  # ACRN's u32 test: at least one entry
                    for (_pin, _pic), irq in sorted(vm.ptdev_intx.items()):
                        words += [irq.intx.phys_pin, 0]  # no physical interrupts here: count 0
                        if len(words) > limit or len(words) >= abi.MAX_PTDEV_NUM * 2:
                            break
                    if words:
                        page.write(8, struct.pack(f"<{len(words)}Q", *words))
                    page.write(4, _U32.pack(len(words)))
                elif cmd == abi.INTR_CMD_DELAY_INT:
                    vm.intr_delay_ms = _U64.unpack(page.read(8, 8))[0]
                else:
                    return -errno.EINVAL
            except MemoryFault:
                return -errno.EINVAL  # the page does not translate
            return 0

    # ----- ACRN's own kernel: shared rings, asynchronous I/O, port regions (hv A.2.8) ------

    def setup_sbuf(
        self, vmid: int, sbuf_id: int, page: SharedPage | None, cpu_id: int = ak.ACRN_INVALID_CPUID
    ) -> int:
        """HC_SETUP_SBUF (``hcall_setup_sbuf``, ``sbuf_setup_common``): adopt a ring page
        whose header carries SBUF_MAGIC, as the VM's asyncio (64) or VM event (65) ring.
        ``page`` None stands for a zero GPA. The per-pCPU trace/log rings (ids 0-3) are
        the hypervisor's own debugging and are not modelled (-1, logged)."""
        with self._lock:
            vm = self._vm(vmid)
            if isinstance(vm, int):
                return vm
            if page is None:
                return _FAIL
            if sbuf_id not in (ak.ACRN_ASYNCIO, ak.ACRN_VM_EVENT):
                _log.info("hypercall.setup_sbuf.unsupported", vmid=vm.vmid, sbuf_id=sbuf_id, cpu_id=cpu_id)
                return _FAIL
            try:
                ring = SharedRing(page)
            except MemoryFault as e:
                _log.info("hypercall.setup_sbuf.fault", vmid=vm.vmid, error=str(e))
                return _FAIL
            if not ring.geometry.valid:
                return _FAIL  # init_asyncio / init_vm_event: magic mismatch
            with vm.ring_lock:
                if sbuf_id == ak.ACRN_ASYNCIO:
                    vm.asyncio_ring = ring
                    self._set_asyncio(vm, [])  # INIT_LIST_HEAD(&vm->aiodesc_queue)
                else:
                    vm.vm_event_ring = ring
            _log.info("vm.sbuf_set", vmid=vm.vmid,
                      ring="asyncio" if sbuf_id == ak.ACRN_ASYNCIO else "vm_event", page=hex(page.base))
            return 0

    def asyncio_assign(self, vmid: int, info: bytes) -> int:
        """HC_ASYNCIO_ASSIGN: ``add_asyncio``. It refuses address 0, a conflicting
        descriptor and a 65th one, but the hypercall returns 0 all the same."""
        with self._lock:
            vm = self._vm(vmid)
            if isinstance(vm, int):
                return vm
            if len(info) != ctypes.sizeof(ak.AcrnAsyncioInfo):
                return _FAIL
            desc = AsyncioDesc.from_bytes(info)
            if not desc.addr:
                _log.info("hypercall.asyncio_assign.refused", vmid=vm.vmid, reason="address 0")
            elif any(d.conflicts(desc) for d in vm.asyncio_descs):
                _log.info("hypercall.asyncio_assign.refused", vmid=vm.vmid, reason="already registered",
                          addr=hex(desc.addr))
            elif len(vm.asyncio_descs) >= ak.ACRN_ASYNCIO_MAX:
                _log.warning("hypercall.asyncio_assign.refused", vmid=vm.vmid, reason="64 descriptors")
            else:
                self._set_asyncio(vm, [desc, *vm.asyncio_descs])  # list_add: newest first
            return 0

    def asyncio_deassign(self, vmid: int, info: bytes) -> int:
        """HC_ASYNCIO_DEASSIGN: ``remove_asyncio`` of an identical descriptor; 0 either way."""
        with self._lock:
            vm = self._vm(vmid)
            if isinstance(vm, int):
                return vm
            if len(info) != ctypes.sizeof(ak.AcrnAsyncioInfo):
                return _FAIL
            desc = AsyncioDesc.from_bytes(info)
            keep = list(vm.asyncio_descs)
            for i, d in enumerate(keep):
                if desc.addr and d.same(desc):
                    del keep[i]
                    self._set_asyncio(vm, keep)
                    break
            else:
                _log.info("hypercall.asyncio_deassign.not_found", vmid=vm.vmid, addr=hex(desc.addr))
            return 0

    def _set_asyncio(self, vm: Vm, descs: list[AsyncioDesc]) -> None:
        """New descriptors; the ports they name leave the vCPUs' native loops (which
        do not look for descriptors), MMIO ones take the whole VM off them."""
        base = vm.hv_ports | set(range(PCI_CONFIG_DATA, PCI_CONFIG_DATA + 4))
        before = vm.asyncio_ports()
        vm.asyncio_descs = descs
        after = vm.asyncio_ports()
        for port in after - before:
            vm.skip_ports[port >> 3] |= 1 << (port & 7)
        for port in before - after - base:
            vm.skip_ports[port >> 3] &= ~(1 << (port & 7)) & 0xFF
        for v in vm.vcpus:
            v.kick()  # a vCPU in a native loop comes back to see them

    def assign_pio_region(self, vmid: int, region: bytes) -> int:
        """HC_ASSIGN_PIO_REGION: CREATED only; every port of the range must be one the
        Service VM reaches directly; they then go to the VM (-EINVAL otherwise)."""
        with self._lock:
            t = self._device_target(vmid, (VmState.CREATED,), -errno.EINVAL, region, ak.AcrnPioRegion)
            if isinstance(t, int):
                return t
            vm, r = t
            ports = range(r.res.port_address, r.res.port_address + r.res.size)
            if any(p > 0xFFFF or p in SERVICE_VM_TRAPPED_PORTS or p in self._pio_owner for p in ports):
                return -errno.EINVAL  # has_direct_pio_access(service_vm, ...) fails
            for p in ports:
                self._pio_owner[p] = vm.abs_id
            vm.pio_regions.append((r.res.port_address, r.res.size))
            _log.info("vm.pio_region_assigned", vmid=vm.vmid, port=hex(r.res.port_address), size=r.res.size)
            return 0

    def deassign_pio_region(self, vmid: int, region: bytes) -> int:
        """HC_DEASSIGN_PIO_REGION: CREATED or PAUSED; every port must be the VM's."""
        with self._lock:
            t = self._device_target(
                vmid, (VmState.CREATED, VmState.PAUSED), -errno.EINVAL, region, ak.AcrnPioRegion
            )
            if isinstance(t, int):
                return t
            vm, r = t
            ports = range(r.res.port_address, r.res.port_address + r.res.size)
            if any(self._pio_owner.get(p) != vm.abs_id for p in ports):
                return -errno.EINVAL  # has_direct_pio_access(target_vm, ...) fails
            for p in ports:
                del self._pio_owner[p]
            key = (r.res.port_address, r.res.size)
            if key in vm.pio_regions:
                vm.pio_regions.remove(key)
            return 0

    # ----- devices -------------------------------------------------------------------

    def _device_target(
        self,
        vmid: int,
        states: tuple[VmState, ...],
        fail: int,
        arg: bytes,
        cls: type[ctypes.Structure],
    ) -> tuple[Vm, Any] | int:
        """Common preamble: target, state, argument size; the VM and the parsed struct."""
        slot = self._target(vmid)
        if isinstance(slot, int):
            return slot
        vm = slot.vm
        if vm is None or vm.state not in states or len(arg) != ctypes.sizeof(cls):
            return fail
        return vm, cls.from_buffer_copy(arg)

    def assign_pcidev(self, vmid: int, dev: bytes) -> int:
        """HC_ASSIGN_PCIDEV: a Service-VM-owned non-bridge device from the scenario."""
        with self._lock:
            t = self._device_target(vmid, (VmState.CREATED,), -errno.EINVAL, dev, abi.AcrnPcidev)
            if isinstance(t, int):
                return t
            vm, d = t
            if d.phys_bdf not in self.scenario.pci_devices or d.phys_bdf in self._pci_owner:
                return -errno.ENODEV
            if d.virt_bdf in vm.pcidevs or d.virt_bdf in vm.vdevs:
                return -errno.EFAULT  # the vdev cannot be initialised there
            vm.pcidevs[d.virt_bdf] = d
            self._pci_owner[d.phys_bdf] = vm.abs_id
            _log.info(
                "vm.pcidev_assigned",
                vmid=vm.vmid,
                phys=format_bdf(d.phys_bdf),
                virt=format_bdf(d.virt_bdf),
            )
            return 0

    def deassign_pcidev(self, vmid: int, dev: bytes) -> int:
        """HC_DEASSIGN_PCIDEV: CREATED or PAUSED; back to the Service VM."""
        with self._lock:
            t = self._device_target(
                vmid, (VmState.CREATED, VmState.PAUSED), -errno.EINVAL, dev, abi.AcrnPcidev
            )
            if isinstance(t, int):
                return t
            vm, d = t
            have = vm.pcidevs.get(d.virt_bdf)
            if have is None or have.phys_bdf != d.phys_bdf:
                return -errno.ENODEV
            del vm.pcidevs[d.virt_bdf]
            self._pci_owner.pop(d.phys_bdf, None)
            for key in [k for k, i in vm.ptdev_intx.items() if i.virt_bdf == d.virt_bdf]:
                self._intx_owner.pop(vm.ptdev_intx.pop(key).intx.phys_pin, None)
            return 0

    def assign_mmiodev(self, vmid: int, dev: bytes) -> int:
        """HC_ASSIGN_MMIODEV: every resource page-aligned; mapped into the VM's EPT."""
        with self._lock:
            t = self._device_target(vmid, (VmState.CREATED,), -errno.EINVAL, dev, abi.AcrnMmiodev)
            if isinstance(t, int):
                return t
            vm, d = t
            if not all(_aligned(r.user_vm_pa, r.service_vm_pa, r.size) for r in d.res):
                return -errno.EINVAL
            for r in d.res:
                vm.memory.add(
                    EptMapping(
                        r.user_vm_pa,
                        r.size,
                        r.service_vm_pa,
                        abi.ACRN_MEM_ACCESS_RWX,
                        _EPT_MT.get((r.mem_type >> 3) & 7, "UC"),
                    )
                )
            vm.mmiodevs.append(d)
            return 0

    def deassign_mmiodev(self, vmid: int, dev: bytes) -> int:
        """HC_DEASSIGN_MMIODEV: CREATED or PAUSED; unmapped from the VM, back to the Service VM."""
        with self._lock:
            t = self._device_target(
                vmid, (VmState.CREATED, VmState.PAUSED), -errno.EINVAL, dev, abi.AcrnMmiodev
            )
            if isinstance(t, int):
                return t
            vm, d = t
            for r in d.res:
                if vm.memory.covers(r.user_vm_pa, r.size):
                    if not _aligned(r.user_vm_pa, r.size):
                        return -errno.EINVAL
                    vm.memory.delete(r.user_vm_pa, r.size)
            if not all(_aligned(r.user_vm_pa, r.service_vm_pa, r.size) for r in d.res):
                return -errno.EINVAL  # re-adding to the Service VM checks alignment
            raw = bytes(d)
            vm.mmiodevs = [m for m in vm.mmiodevs if bytes(m) != raw]
            return 0

    def create_vdev(self, vmid: int, dev: bytes) -> int:
        """HC_CREATE_VDEV: ivshmem (if enabled), PCI vUART (MCS9900) or a virtual root port."""
        with self._lock:
            t = self._device_target(vmid, (VmState.CREATED,), -errno.EINVAL, dev, abi.AcrnVdev)
            if isinstance(t, int):
                return t
            vm, d = t
            ident = d.id.value
            if ident not in _VDEV_IDS or (ident == VDEV_IVSHMEM and not self.scenario.ivshmem):
                return -errno.EINVAL
            bdf = d.slot & 0xFFFF
            if bdf in vm.vdevs or bdf in vm.pcidevs:
                return -errno.EINVAL
            vm.vdevs[bdf] = d
            return 0

    def destroy_vdev(self, vmid: int, dev: bytes) -> int:
        """HC_DESTROY_VDEV: CREATED or PAUSED; the vdev at ``slot`` must exist."""
        with self._lock:
            t = self._device_target(
                vmid, (VmState.CREATED, VmState.PAUSED), -errno.EINVAL, dev, abi.AcrnVdev
            )
            if isinstance(t, int):
                return t
            vm, d = t
            bdf = d.slot & 0xFFFF
            if d.id.value not in _VDEV_IDS or bdf not in vm.vdevs:
                return -errno.EINVAL
            del vm.vdevs[bdf]
            return 0

    def _intx_target(
        self, vmid: int, states: tuple[VmState, ...], irq: bytes
    ) -> tuple[Vm, abi.AcrnPtdevIrq] | int:
        t = self._device_target(vmid, states, _FAIL, irq, abi.AcrnPtdevIrq)
        if isinstance(t, int):
            return t
        vm, i = t
        if i.type != abi.ACRN_PTDEV_IRQ_INTX:
            return _FAIL
        dev = vm.pcidevs.get(i.virt_bdf)
        if dev is None or dev.phys_bdf != i.phys_bdf:
            return _FAIL
        pins = _VPIC_PINS if i.intx.is_pic_pin else VIOAPIC_GSI_COUNT
        if i.intx.virt_pin >= pins:
            return _FAIL
        return vm, i

    def set_ptdev_intr(self, vmid: int, irq: bytes) -> int:
        """HC_SET_PTDEV_INTR: INTx of an assigned device; the physical GSI must exist."""
        with self._lock:
            t = self._intx_target(vmid, (VmState.CREATED,), irq)
            if isinstance(t, int):
                return t
            vm, i = t
            phys = i.intx.phys_pin
            if phys >= self.scenario.host_gsi_count:
                return _FAIL
            owner = self._intx_owner.get(phys)
            if owner is not None and owner != vm.abs_id:
                return -errno.ENODEV  # remapped to another VM already
            key = (i.intx.virt_pin, bool(i.intx.is_pic_pin))
            old = vm.ptdev_intx.get(key)
            if old is not None and old.intx.phys_pin != phys:
                self._intx_owner.pop(old.intx.phys_pin, None)
            vm.ptdev_intx[key] = i
            self._intx_owner[phys] = vm.abs_id
            return 0

    def reset_ptdev_intr(self, vmid: int, irq: bytes) -> int:
        """HC_RESET_PTDEV_INTR: CREATED or PAUSED; drops the virtual pin's remapping."""
        with self._lock:
            t = self._intx_target(vmid, (VmState.CREATED, VmState.PAUSED), irq)
            if isinstance(t, int):
                return t
            vm, i = t
            old = vm.ptdev_intx.pop((i.intx.virt_pin, bool(i.intx.is_pic_pin)), None)
            if old is not None and self._intx_owner.get(old.intx.phys_pin) == vm.abs_id:
                del self._intx_owner[old.intx.phys_pin]
            return 0

    def _release_devices(self, vm: Vm) -> None:
        for port in [p for p, owner in self._pio_owner.items() if owner == vm.abs_id]:
            del self._pio_owner[port]
        vm.pio_regions = []
        for d in vm.pcidevs.values():
            self._pci_owner.pop(d.phys_bdf, None)
        for i in vm.ptdev_intx.values():
            if self._intx_owner.get(i.intx.phys_pin) == vm.abs_id:
                del self._intx_owner[i.intx.phys_pin]

    # ----- power management, CPUs ------------------------------------------------------

    def get_cpu_state(self, cmd: int, out: bytearray) -> int:
        """HC_PM_GET_CPU_STATE (hc.c ``hcall_get_cpu_pm_state``; spec hv A.4)."""
        with self._lock:
            slot = self._target((cmd & abi.PMCMD_VMID_MASK) >> abi.PMCMD_VMID_SHIFT)
            if isinstance(slot, int):
                return slot
            vm = slot.vm
            if vm is None or vm.state not in (VmState.CREATED, VmState.PAUSED):
                return _FAIL
            sc = self.scenario
            kind = cmd & abi.PMCMD_TYPE_MASK
            index = (cmd & abi.PMCMD_STATE_NUM_MASK) >> abi.PMCMD_STATE_NUM_SHIFT
            if kind == abi.ACRN_PMCMD_GET_PX_CNT:
                if vm.guest_flags & abi.GUEST_FLAG_VHWP:
                    return _put(out, _U64.pack(0))
                if not sc.pstate_passthrough or not sc.pstates:
                    return _FAIL  # is_pt_pstate() is false in current ACRN
                return _put(out, _U64.pack(len(sc.pstates)))  # u8 count, zero-extended
            if kind == abi.ACRN_PMCMD_GET_PX_DATA:
                if not sc.pstate_passthrough or index >= len(sc.pstates):
                    return _FAIL
                return _put(out, sc.pstates[index].pack())
            if kind == abi.ACRN_PMCMD_GET_CX_CNT:
                return _put(out, _U64.pack(len(sc.cstates)))
            if kind == abi.ACRN_PMCMD_GET_CX_DATA:
                if not 1 <= index <= len(sc.cstates):
                    return _FAIL  # C-state indexes start at 1
                return _put(out, sc.cstates[index - 1].pack())
            return _FAIL

    def service_vm_offline_cpu(self, lapic_id: int) -> int:
        """HC_SERVICE_VM_OFFLINE_CPU: the Service VM vCPU with that LAPIC id (its pCPU's);
        the BSP refuses."""
        with self._lock:
            service = self._slots[self._sid]
            lapic_id &= 0xFFFFFFFF
            aff = service.config.cpu_affinity
            lapics = [self.scenario.lapic_id(i) for i in range(aff.bit_length()) if aff >> i & 1]
            if lapic_id in lapics and lapic_id not in self._offline_lapics:
                if lapics.index(lapic_id) == 0:
                    return _FAIL  # the BSP
                self._offline_lapics.add(lapic_id)
                _log.info("service_vm.cpu_offlined", lapic_id=lapic_id)
            return 0

    # ----- emulator controls ---------------------------------------------------------

    def cpuid(
        self, leaf: int, subleaf: int = 0, vmid: int | None = None
    ) -> tuple[int, int, int, int]:
        """CPUID in the Service VM (``vmid`` None) or in VM ``vmid`` (relative)."""
        service = True
        if vmid is not None and vmid != 0:  # relative vmid 0: the Service VM
            slot = self._target(vmid)
            if isinstance(slot, int) or slot.vm is None:
                raise ValueError(f"no VM with vmid {vmid}")
            service = slot.vm.abs_id == self._sid
        return cpuid_mod.cpuid(self.scenario, leaf, subleaf, service_vm=service)

    def hsm_init_check(self) -> int:
        """What the HSM's module init decides on this platform: 0, -ENODEV or -EPERM."""
        return cpuid_mod.hsm_init_check(lambda leaf, sub: self.cpuid(leaf, sub))

    def inject(self, vmid: int, vcpu: int, access: Access) -> concurrent.futures.Future[int]:
        """Have vCPU ``vcpu`` of VM ``vmid`` perform ``access`` (queued until the VM runs)."""
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        try:
            check_access(access)
        except ValueError as e:
            future.set_exception(e)
            return future
        with self._lock:
            slot = self._target(vmid)
            vm = None if isinstance(slot, int) else slot.vm
            # one wording per case, the same as cpuid's (the control socket's errors)
            if vmid & 0xFFFF == 0:
                future.set_exception(
                    ValueError("VM 0 is the Service VM, whose accesses are not trapped: inject into a User VM")
                )
            elif vm is None:
                future.set_exception(ValueError(f"no VM with vmid {vmid}"))
            elif not vm.vcpus or not 0 <= vcpu < vm.vcpu_num:
                future.set_exception(ValueError(f"VM {vmid} has no vCPU {vcpu}"))
            elif vm.fault is not None:
                future.set_exception(AccessAborted(f"VM faulted: {vm.fault}"))
            else:
                vm.vcpus[vcpu].inject(access, future)
        return future

    # ----- record and replay (record.py, docs/record-replay.md) -------------------------

    def record_start(self, vmid: int, count: int | None = None) -> Recorder:
        """Record VM ``vmid``'s requests: now if it exists, else from its CREATE_VM."""
        with self._lock:
            slot = self._target(vmid)
            if vmid & 0xFFFF == 0:
                raise ValueError("VM 0 is the Service VM, whose accesses are not trapped: record a User VM")
            if isinstance(slot, int) or slot.config.load_order != "post":
                raise ValueError(f"vmid {vmid} is not a post-launched VM slot of this scenario")
            old = self._recorders.get(vmid)
            if old is not None:
                raise ValueError(f"VM {vmid} is being recorded already (state {old.state}); "
                                 "stop that recording first")  # fmt: skip
            rec = Recorder(vmid, count=count, backend=self.backend.name)
            self._recorders[vmid] = rec
            _log.info("record.started", vmid=vmid, count=count, vm_exists=slot.vm is not None)
            if slot.vm is not None and slot.vm.state != VmState.POWERED_OFF:
                rec.attach(slot.vm)
            return rec

    def record_stop(self, vmid: int) -> Recorder:
        """Stop recording VM ``vmid`` (if it still records) and hand the recording over."""
        with self._lock:
            rec = self._recorders.pop(vmid, None)
            if rec is None:
                raise ValueError(f"VM {vmid} is not being recorded")
            rec.stop("stopped by request")
            return rec

    def recording(self, vmid: int) -> Recorder | None:
        with self._lock:
            return self._recorders.get(vmid)

    def replay_summary(self) -> dict[str, Any] | None:
        """What replaying the workload found so far (scripted backend with a workload)."""
        log = getattr(self.backend, "replay", None)
        if not isinstance(log, ReplayLog):
            return None
        summary = log.summary()
        return summary if summary["vcpus"] or summary["differences"] else None

    def vm_ids(self) -> list[int]:
        """The vmids of the post-launched VMs that exist (not POWERED_OFF); cheap, unlike
        :meth:`snapshot` (the HSM's reaper asks at every release, hsm/admin.py)."""
        with self._lock:
            return [
                self._rel(i)
                for i, s in enumerate(self._slots)
                if s.vm is not None and s.config.load_order == "post" and s.vm.state != VmState.POWERED_OFF
            ]

    def vcpu_cycles(self) -> list[tuple[int, str, list[tuple[int, Any]]]]:
        """Each User VM's vmid, state and vCPUs' request cycle rings (``vcpu.CycleRing``):
        what the metrics read at scrape time (observe/metrics.py), cheaper than a snapshot."""
        with self._lock:
            return [
                (self._rel(i), s.vm.state.name, [(v.vcpu_id, v.cycles) for v in s.vm.vcpus])
                for i, s in enumerate(self._slots)
                if s.vm is not None and s.config.load_order == "post" and s.vm.state != VmState.POWERED_OFF
            ]

    def snapshot(self) -> dict[str, Any]:
        """State for ``acrn-hsm-emu status`` (JSON-serialisable; format in docs/scenario.md)."""
        with self._lock:
            for s in self._slots:
                if s.vm is not None:
                    self._fold_irqs(s.vm)  # what the native interrupt hypercalls did
            sc = self.scenario
            service = self._slots[self._sid]
            return {
                "backend": self.backend.name,
                "scenario": sc.source,
                "platform": {
                    "pcpus": sc.pcpus,
                    "lapic_ids": list(sc.lapic_ids),
                    "lapic_source": sc.lapic_source,
                    "tsc_khz": sc.tsc_khz,
                    "acrn": sc.acrn,
                    "privileged": sc.privileged,
                    "max_vm_num": self._max,
                },
                "upcall": self._upcall is not None,
                "service_vm": {
                    "abs_id": self._sid,
                    "name": service.name.decode(errors="replace"),
                    "state": service.state.name,
                    "cpu_affinity": service.config.cpu_affinity,
                    "offline_lapic_ids": sorted(self._offline_lapics),
                },
                "slots": [
                    {
                        "abs_id": i,
                        "vmid": self._rel(i),
                        "load_order": s.config.load_order,
                        "static": s.config.static,
                        "name": s.name.decode(errors="replace"),
                        "state": s.state.name,
                    }
                    for i, s in enumerate(self._slots)
                ],
                "vms": [
                    s.vm.snapshot()
                    for s in self._slots
                    if s.vm is not None and s.config.load_order == "post"
                ],
                "recordings": [r.summary() for r in self._recorders.values()],
                "replay": self.replay_summary(),
            }

    def shutdown(self) -> None:
        """Stop every vCPU thread (daemon exit); VMs stay in the table, frozen."""
        with self._lock:
            vcpus = [v for s in self._slots if s.vm is not None for v in s.vm.vcpus]
            for v in vcpus:
                v.stop()
            deadline = time.monotonic() + 1.0
            for v in vcpus:
                if not v.join(max(0.0, deadline - time.monotonic())):
                    _log.warning("hypervisor.vcpu_thread_lingers", vmid=v.vmid, vcpu=v.vcpu_id)
            self.backend.shutdown()
        _log.info("hypervisor.shutdown", vcpus=len(vcpus))


def _free_slots(page: SharedPage) -> None:
    for i in range(abi.ACRN_IO_REQUEST_MAX):
        page.store_u32(i * abi.IOREQ_SLOT_SIZE + abi.SLOT_PROCESSED, _FREE)


def _put(out: bytearray, data: bytes) -> int:
    n = min(len(out), len(data))  # never grow the caller's buffer
    out[:n] = data[:n]
    return 0


def _aligned(*values: int) -> bool:
    return not any(v % PAGE_SIZE for v in values)


class _AddRun:
    """Consecutive MR_ADD ops that continue each other: guest, service-VM and host
    addresses all contiguous, same attributes, same backing."""

    __slots__ = ("first", "size")

    def __init__(self, op: MemoryRegionOp) -> None:
        self.first = op
        self.size = op.size

    def extend(self, op: MemoryRegionOp) -> bool:
        f, n = self.first, self.size
        if (
            op.user_vm_pa != f.user_vm_pa + n
            or op.service_vm_pa != f.service_vm_pa + n
            or op.attr != f.attr
            or op.backing is not f.backing
            or (op.host_va is None) != (f.host_va is None)
            or (f.host_va is not None and op.host_va != f.host_va + n)
        ):
            return False
        self.size = n + op.size
        return True

    def op(self) -> MemoryRegionOp:
        f = self.first
        if self.size == f.size:
            return f
        return MemoryRegionOp(
            f.type, f.attr, f.user_vm_pa, f.service_vm_pa, self.size, f.backing, f.host_va
        )
