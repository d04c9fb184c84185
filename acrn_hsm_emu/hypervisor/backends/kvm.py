"""The kvm backend: a User VM's own instructions produce its I/O requests.

Each post-launched VM is a KVM VM with an in-kernel irqchip (PIC, IOAPIC,
LAPICs: the devices ACRN keeps for itself, spec hv A.2.1), each vCPU a KVM
vCPU run by the vCPU thread of the shared machinery (``vcpu.py``). The backend
only turns exits into :class:`~acrn_hsm_emu.hypervisor.api.Access` objects and
puts read results back; slots, upcall, CF8 latch and completion are the same
code the scripted backend uses. ``docs/kvm.md`` has the whole design.

- Memory: SET_MEMSEG RAM ranges become KVM memory slots (``kvm_memory.py``),
  applied by a vCPU thread before it enters the guest.
- Registers: SET_VCPU_REGS (``acrn_regs``) becomes KVM regs/sregs, applied
  before the next KVM_RUN; RESET_VM restores the state KVM gave the vCPU
  when it was created (the architectural reset state).
- Exits: KVM_EXIT_IO -> PORTIO (string I/O element by element),
  KVM_EXIT_MMIO -> MMIO; shutdown, triple fault and unrunnable guests pause
  the VM with one log line. HLT stays in the kernel (in-kernel LAPIC).
- Kicks: the vCPU thread blocks ``KICK_SIGNAL`` and lets KVM unblock it only
  inside KVM_RUN (KVM_SET_SIGNAL_MASK); a kick is a ``pthread_kill``. A kick
  that arrives outside KVM_RUN stays pending, so the next KVM_RUN returns at
  once: no kick is lost and no signal handler is needed.
- A VM without any RAM has no code to run: its vCPUs replay the scripted
  workload instead (if any), as the scripted backend would.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import queue
import signal
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from acrn_hsm_emu import abi, logs
from acrn_hsm_emu._native import ffi as _ffi
from acrn_hsm_emu._native import lib as _lib
from acrn_hsm_emu.hypervisor.api import MR_ADD, Access, MemoryRegionOp
from acrn_hsm_emu.hypervisor.backends import kvm_abi as k
from acrn_hsm_emu.hypervisor.backends.base import BackendError, VcpuHost
from acrn_hsm_emu.hypervisor.backends.kvm_memory import HostPiece, resolve
from acrn_hsm_emu.hypervisor.backends.scripted import ScriptedBackend, ScriptedVcpu
from acrn_hsm_emu.hypervisor.vm import EptMapping, GuestMemoryMap
from acrn_hsm_emu.hypervisor.workload import Workload

_log = structlog.get_logger(__name__)

KICK_SIGNAL = signal.SIGURG  # default action "ignore": a stray process-wide one is harmless
DEVICE = "/dev/kvm"
REQUIRED_CAPS = {
    "IRQCHIP": k.KVM_CAP_IRQCHIP,
    "USER_MEMORY": k.KVM_CAP_USER_MEMORY,
    "IRQ_ROUTING": k.KVM_CAP_IRQ_ROUTING,
    "SIGNAL_MSI": k.KVM_CAP_SIGNAL_MSI,
    "IMMEDIATE_EXIT": k.KVM_CAP_IMMEDIATE_EXIT,
    "EXT_CPUID": k.KVM_CAP_EXT_CPUID,
    "MP_STATE": k.KVM_CAP_MP_STATE,
}
# Where KVM may put its private real-mode helper pages (only used by VMX hosts
# without unrestricted guest): the top of the 0xFExxxxxx MMIO hole, never RAM on
# an ACRN guest's memory map.
TSS_ADDR = 0xFEFFD000
IDENTITY_MAP_ADDR = 0xFEFFC000
PAUSE_BUDGET_S = 0.05  # PAUSE_VM waits at most this long for vCPUs to leave the guest
_HYPERVISOR_LEAVES = range(0x40000000, abi.ACRN_CPUID_TIMING_LEAF + 1)
# MSRs saved at vCPU creation and restored by RESET_VM (those KVM lists are kept).
_RESET_MSRS = (
    0x174, 0x175, 0x176,  # SYSENTER_CS/ESP/EIP
    0x277,  # PAT
    0x1A0,  # MISC_ENABLE
    0x6E0,  # TSC_DEADLINE
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # STAR LSTAR CSTAR SFMASK
    0xC0000102, 0xC0000103,  # KERNEL_GS_BASE, TSC_AUX
)  # fmt: skip
_VCPU_STATE = (  # (name, get, set, size), in restore order
    ("sregs", k.KVM_GET_SREGS, k.KVM_SET_SREGS, ctypes.sizeof(k.KvmSregs)),
    ("regs", k.KVM_GET_REGS, k.KVM_SET_REGS, ctypes.sizeof(k.KvmRegs)),
    ("xcrs", k.KVM_GET_XCRS, k.KVM_SET_XCRS, k.SIZEOF_KVM_XCRS),
    ("fpu", k.KVM_GET_FPU, k.KVM_SET_FPU, k.SIZEOF_KVM_FPU),
    ("lapic", k.KVM_GET_LAPIC, k.KVM_SET_LAPIC, k.SIZEOF_KVM_LAPIC_STATE),
    ("events", k.KVM_GET_VCPU_EVENTS, k.KVM_SET_VCPU_EVENTS, k.SIZEOF_KVM_VCPU_EVENTS),
    ("debugregs", k.KVM_GET_DEBUGREGS, k.KVM_SET_DEBUGREGS, k.SIZEOF_KVM_DEBUGREGS),
    ("mp_state", k.KVM_GET_MP_STATE, k.KVM_SET_MP_STATE, k.SIZEOF_KVM_MP_STATE),
)

_U32 = struct.Struct("<I")
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
_EXIT_IO, _EXIT_MMIO, _EXIT_INTR = k.KVM_EXIT_IO, k.KVM_EXIT_MMIO, k.KVM_EXIT_INTR
_EXIT_REASON = k.RUN_EXIT_REASON
_ONES = b"\xff" * 8

# Data segments SET_VCPU_REGS does not describe (acrn_regs has only selectors):
# real mode: base = selector << 4, 64 KiB, read/write data; protected and long
# mode: flat 4 GiB read/write data. VMX access-rights format.
_AR_DATA_REAL = 0x0093
_AR_DATA_FLAT = 0xC093
_AR_TSS_BUSY = 0x008B
_AR_LDT = 0x0082
_CR0_PE = 1
_CR0_PG = 1 << 31
_CR4_PAE = 1 << 5
_CR4_PCIDE = 1 << 17
_EFER_LME = 1 << 8
_EFER_LMA = 1 << 10


# ----- registers ---------------------------------------------------------------------


def _set_segment(seg: k.KvmSegment, base: int, limit: int, selector: int, ar: int) -> None:
    """A segment register from its VMX form (base, limit, selector, access rights)."""
    seg.base, seg.limit, seg.selector = base, limit & 0xFFFFFFFF, selector
    seg.type = ar & 0xF
    seg.s = ar >> 4 & 1
    seg.dpl = ar >> 5 & 3
    seg.present = ar >> 7 & 1
    seg.avl = ar >> 12 & 1
    seg.l = ar >> 13 & 1
    seg.db = ar >> 14 & 1
    seg.g = ar >> 15 & 1
    seg.unusable = ar >> 16 & 1


def regs_problem(r: abi.AcrnRegs) -> str | None:
    """Why KVM would refuse these registers (beyond ACRN's reserved-bit check), or None."""
    long_mode = bool(r.ia32_efer & _EFER_LME and r.cr0 & _CR0_PG)
    if r.cr0 & _CR0_PG and not r.cr0 & _CR0_PE:
        return "CR0.PG without CR0.PE"
    if long_mode and not r.cr4 & _CR4_PAE:
        return "long mode (EFER.LME, CR0.PG) without CR4.PAE"
    if not long_mode and r.ia32_efer & _EFER_LMA:
        return "EFER.LMA without EFER.LME and CR0.PG"
    if not long_mode and r.cs_ar >> 13 & 1:
        return "a 64-bit code segment (cs_ar L bit) outside long mode"
    if long_mode and r.cs_ar >> 13 & 1 and r.cs_ar >> 14 & 1:
        return "cs_ar with both L and D/B set"
    if r.cr4 & _CR4_PCIDE and not long_mode:
        return "CR4.PCIDE outside long mode"
    return None


def acrn_to_kvm(r: abi.AcrnRegs, regs: k.KvmRegs, sregs: k.KvmSregs) -> None:
    """Load ``acrn_regs`` into KVM register images (which start as the reset state)."""
    g = r.gprs
    for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    ):  # fmt: skip
        setattr(regs, name, getattr(g, name))
    regs.rip = r.rip
    regs.rflags = r.rflags | 2  # bit 1 is always set
    _set_segment(sregs.cs, r.cs_base, r.cs_limit, r.cs_sel, r.cs_ar)
    protected = bool(r.cr0 & _CR0_PE)
    for name, sel in (
        ("ss", r.ss_sel), ("ds", r.ds_sel), ("es", r.es_sel), ("fs", r.fs_sel), ("gs", r.gs_sel),
    ):  # fmt: skip
        if protected:
            _set_segment(getattr(sregs, name), 0, 0xFFFFFFFF, sel, _AR_DATA_FLAT)
        else:
            _set_segment(getattr(sregs, name), sel << 4, 0xFFFF, sel, _AR_DATA_REAL)
    _set_segment(sregs.tr, 0, 0xFFFF, r.tr_sel, _AR_TSS_BUSY)
    _set_segment(sregs.ldt, 0, 0xFFFF, r.ldt_sel, _AR_LDT)
    sregs.gdt.base, sregs.gdt.limit = r.gdt.base, r.gdt.limit
    sregs.idt.base, sregs.idt.limit = r.idt.base, r.idt.limit
    sregs.cr0, sregs.cr3, sregs.cr4 = r.cr0, r.cr3, r.cr4
    efer = r.ia32_efer & ~_EFER_LMA
    if efer & _EFER_LME and r.cr0 & _CR0_PG:
        efer |= _EFER_LMA  # the CPU sets LMA when paging turns on with LME
    sregs.efer = efer


# ----- teardown off the hot threads --------------------------------------------------


class _Reaper:
    """One background thread for slow teardown (closing a KVM VM takes ~15 ms)."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.pending = 0

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self.pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="kvm-reaper", daemon=True)
                self._thread.start()
        self._q.put(fn)

    def _run(self) -> None:
        while True:
            fn = self._q.get()
            try:
                fn()
            except Exception:
                _log.exception("kvm.teardown_failed")
            finally:
                with self._lock:
                    self.pending -= 1

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted teardown ran (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self.pending:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True


REAPER = _Reaper()


# ----- the backend -------------------------------------------------------------------


class KvmBackend:
    """VMs run under KVM. ``KvmBackend(workload=None)``: the workload serves VMs without RAM."""

    name = "kvm"

    def __init__(self, workload: Workload | None = None, device: str = DEVICE) -> None:
        self._scripted = ScriptedBackend(workload)
        self.fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        try:
            api = k.ioctl(self.fd, k.KVM_GET_API_VERSION)
            if api != k.KVM_API_VERSION:
                raise ValueError(f"{device}: KVM API version {api}, need {k.KVM_API_VERSION}")
            missing = [n for n, c in REQUIRED_CAPS.items() if k.ioctl(self.fd, k.KVM_CHECK_EXTENSION, c) <= 0]
            if missing:
                raise ValueError(f"{device}: KVM lacks {', '.join(missing)}")
            self.run_size = k.ioctl(self.fd, k.KVM_GET_VCPU_MMAP_SIZE)
            self.memslots = k.ioctl(self.fd, k.KVM_CHECK_EXTENSION, k.KVM_CAP_NR_MEMSLOTS)
            self.readonly_mem = k.ioctl(self.fd, k.KVM_CHECK_EXTENSION, k.KVM_CAP_READONLY_MEM) > 0
            self.tss = k.ioctl(self.fd, k.KVM_CHECK_EXTENSION, k.KVM_CAP_SET_TSS_ADDR) > 0
            self.identity_map = (
                k.ioctl(self.fd, k.KVM_CHECK_EXTENSION, k.KVM_CAP_SET_IDENTITY_MAP_ADDR) > 0
            )
            self.supported_cpuid = self._supported_cpuid()
            self.reset_msrs = self._msr_list()
        except BaseException:
            os.close(self.fd)
            raise
        self._vms: dict[int, KvmVm] = {}
        _log.info(
            "kvm.backend_ready",
            device=device,
            api=api,
            memslots=self.memslots,
            cpuid_entries=len(self.supported_cpuid),
            kick_signal=KICK_SIGNAL.name,
        )

    def _supported_cpuid(self) -> list[k.KvmCpuidEntry2]:
        n = 64
        while True:
            buf = bytearray(k.SIZEOF_KVM_CPUID2_HEADER + n * ctypes.sizeof(k.KvmCpuidEntry2))
            _U32.pack_into(buf, 0, n)
            try:
                k.ioctl(self.fd, k.KVM_GET_SUPPORTED_CPUID, buf)
            except OSError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            got = _U32.unpack_from(buf, 0)[0]
            size = ctypes.sizeof(k.KvmCpuidEntry2)
            return [
                k.KvmCpuidEntry2.from_buffer_copy(buf, k.SIZEOF_KVM_CPUID2_HEADER + i * size)
                for i in range(got)
            ]

    def _msr_list(self) -> list[int]:
        buf = bytearray(k.SIZEOF_KVM_MSR_LIST_HEADER + 4 * 1024)
        _U32.pack_into(buf, 0, 1024)
        try:
            k.ioctl(self.fd, k.KVM_GET_MSR_INDEX_LIST, buf)
        except OSError:
            return []
        n = _U32.unpack_from(buf, 0)[0]
        have = set(struct.unpack_from(f"<{n}I", buf, 4))
        return [m for m in _RESET_MSRS if m in have]

    # ----- scripted fallback -------------------------------------------------------

    def set_workload(self, vmid: int | None, workload: Workload | None) -> None:
        """The workload replayed by the vCPUs of VMs without guest RAM."""
        self._scripted.set_workload(vmid, workload)

    # ----- Backend -----------------------------------------------------------------

    def vm_created(self, vmid: int, vcpu_num: int, lapic_ids: Sequence[int] = ()) -> None:
        ids = tuple(lapic_ids) or tuple(range(vcpu_num))
        limit = max(k.ioctl(self.fd, k.KVM_CHECK_EXTENSION, k.KVM_CAP_MAX_VCPU_ID), 1)
        if max(ids, default=0) >= limit:
            raise BackendError(f"KVM takes vCPU (APIC) ids below {limit}, not {max(ids)}")
        try:
            self._vms[vmid] = KvmVm(self, vmid, ids)
        except OSError as e:
            raise BackendError(f"KVM VM: {e}") from e

    def create_vcpu(self, vmid: int, vcpu_id: int) -> KvmVcpu:
        vm = self._vms[vmid]
        try:
            return vm.add_vcpu(vcpu_id, self._scripted.create_vcpu(vmid, vcpu_id))
        except OSError as e:
            raise BackendError(f"KVM vCPU {vcpu_id}: {e}") from e

    def vm_destroyed(self, vmid: int) -> None:
        vm = self._vms.pop(vmid, None)
        if vm is not None:
            _lib.hsm_irq_gate_set(vm.irq_gate, -1)  # no native interrupt after this; then the fd can go
            vm.release()
        self._scripted.vm_destroyed(vmid)

    def memory_changed(self, vmid: int, op: MemoryRegionOp) -> None:
        vm = self._vms.get(vmid)
        if vm is not None:
            vm.memory_changed(op)

    def vcpu_regs(self, vmid: int, vcpu_id: int, regs: bytes) -> None:
        r = abi.AcrnVcpuRegs.from_buffer_copy(regs).vcpu_regs
        problem = regs_problem(r)
        if problem is not None:
            _log.info("kvm.vcpu_regs_refused", vmid=vmid, vcpu=vcpu_id, reason=problem)
            raise BackendError(problem)
        vm = self._vms.get(vmid)
        if vm is not None and vcpu_id < len(vm.vcpus):
            vm.vcpus[vcpu_id].set_regs(r)

    def vm_started(self, vmid: int) -> None:
        vm = self._vms.get(vmid)
        if vm is not None:
            vm.started()

    def vm_paused(self, vmid: int) -> None:
        vm = self._vms.get(vmid)
        if vm is not None:
            vm.wait_out_of_guest(PAUSE_BUDGET_S)

    def vm_reset(self, vmid: int) -> None:
        vm = self._vms.get(vmid)
        if vm is not None:
            vm.reset()

    def inject_msi(self, vmid: int, addr: int, data: int) -> None:
        vm = self._vms.get(vmid)
        if vm is not None:
            vm.inject_msi(addr, data)

    def irq_gate(self, vmid: int) -> Any:
        if logs.DEBUG:
            return None  # every MSI has its debug line (KvmVm.inject_msi): Python injects them
        vm = self._vms.get(vmid)
        return vm.irq_gate if vm is not None else None

    def set_irqline(self, vmid: int, gsi: int, op: int) -> None:
        vm = self._vms.get(vmid)
        if vm is not None:
            vm.set_irqline(gsi, op)

    def shutdown(self) -> None:
        """Daemon exit: free every KVM VM (vCPU threads are already stopped)."""
        for vmid in list(self._vms):
            self.vm_destroyed(vmid)
        REAPER.submit(functools.partial(os.close, self.fd))


def _key(m: EptMapping) -> tuple[Any, ...]:
    return (m.gpa, m.size, id(m.backing), m.host_va, m.access)


class KvmVm:
    """One KVM VM: its fd, irqchip, memory slots and vCPUs."""

    def __init__(self, backend: KvmBackend, vmid: int, lapic_ids: Sequence[int] = (0,)) -> None:
        self.backend = backend
        self.vmid = vmid
        self.lapic_ids = tuple(lapic_ids)  # KVM's vCPU id is the initial APIC id
        self.fd = k.ioctl(backend.fd, k.KVM_CREATE_VM, 0)
        try:
            if self.lapic_ids and self.lapic_ids[0] != 0:
                # vCPU 0 is the BSP whatever its APIC id; KVM would make it an AP
                # waiting for INIT/SIPI (KVM_SET_BOOT_CPU_ID must precede the vCPUs)
                k.ioctl(self.fd, k.KVM_SET_BOOT_CPU_ID, self.lapic_ids[0])
            if backend.identity_map:
                k.ioctl(self.fd, k.KVM_SET_IDENTITY_MAP_ADDR, struct.pack("<Q", IDENTITY_MAP_ADDR))
            if backend.tss:
                k.ioctl(self.fd, k.KVM_SET_TSS_ADDR, TSS_ADDR)
            k.ioctl(self.fd, k.KVM_CREATE_IRQCHIP)
            k.ioctl(self.fd, k.KVM_SET_GSI_ROUTING, _gsi_routing())
            self._irqchips = []
            for chip in (k.KVM_IRQCHIP_PIC_MASTER, k.KVM_IRQCHIP_PIC_SLAVE, k.KVM_IRQCHIP_IOAPIC):
                buf = bytearray(k.SIZEOF_KVM_IRQCHIP)
                _U32.pack_into(buf, 0, chip)
                k.ioctl(self.fd, k.KVM_GET_IRQCHIP, buf)
                self._irqchips.append(bytes(buf))
        except OSError:
            os.close(self.fd)
            raise
        self.vcpus: list[KvmVcpu] = []
        # the native forms of HC_INJECT_MSI and HC_SET_IRQLINE on this VM (native/irq_gate.h),
        # closed at DESTROY_VM
        self.irq_gate = _ffi.new("struct hsm_irq_gate *")
        _lib.hsm_irq_gate_init(self.irq_gate)
        _lib.hsm_irq_gate_set(self.irq_gate, self.fd)
        self._refs = 1  # the backend's; each vCPU adds one
        self._refs_lock = threading.Lock()
        # desired memory: written by the hypercall thread, read by the vCPU that syncs
        self._desired = GuestMemoryMap()
        self._desired_lock = threading.Lock()
        self._gen = 0  # bumped by every memory change
        self._copy_gen = 0  # bumped by every START_VM: private memory is copied again
        # applied memory: vCPU threads only, under _sync_lock
        self._sync_lock = threading.Lock()
        self._applied: dict[tuple[Any, ...], list[tuple[int, HostPiece]]] = {}
        self._applied_gen = 0
        self._filled_gen = 0
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._copy_logged = False
        self._unrouted_gsis: set[int] = set()

    # ----- lifetime ----------------------------------------------------------------

    def add_vcpu(self, vcpu_id: int, scripted: ScriptedVcpu) -> KvmVcpu:
        v = KvmVcpu(self, vcpu_id, scripted)
        self.vcpus.append(v)
        with self._refs_lock:
            self._refs += 1
        return v

    def release(self) -> None:
        """Drop one reference (the backend's at DESTROY_VM, a vCPU's at its end)."""
        with self._refs_lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            REAPER.submit(self._teardown)

    def _teardown(self) -> None:
        for v in self.vcpus:
            v.free()
        os.close(self.fd)
        pieces = [p for entries in self._applied.values() for _, p in entries]
        for p in pieces:
            p.release()
        self._applied.clear()
        _log.info("kvm.vm_freed", vmid=self.vmid, vcpus=len(self.vcpus), memory_pieces=len(pieces))

    def kick_all(self) -> None:
        for v in self.vcpus:
            v.kick()

    def wait_out_of_guest(self, budget: float) -> None:
        """After a pause kick: wait (briefly) until no vCPU executes guest code."""
        deadline = time.monotonic() + budget
        while any(v.in_guest for v in self.vcpus):
            if time.monotonic() > deadline:
                _log.warning("kvm.vcpu_slow_to_pause", vmid=self.vmid)
                return
            time.sleep(0.0002)

    # ----- memory ------------------------------------------------------------------

    @property
    def has_ram(self) -> bool:
        return len(self._desired) > 0

    def memory_changed(self, op: MemoryRegionOp) -> None:
        """A SET_MEMORY_REGIONS op (hypercall thread): recorded; vCPUs apply it."""
        with self._desired_lock:
            if op.type == MR_ADD and op.backing is not None and op.host_va is not None:
                self._desired.add(EptMapping.from_op(op))
            else:  # MMIO (no bytes behind it here) or a delete: not guest RAM
                self._desired.delete(op.user_vm_pa, op.size)
            self._gen += 1
        self.kick_all()  # a running vCPU applies it before it re-enters the guest

    def started(self) -> None:
        with self._desired_lock:
            self._copy_gen += 1

    def sync(self, interrupted: Callable[[], bool]) -> bool:
        """Make the KVM slots match the desired memory (vCPU thread). False if interrupted."""
        if self._applied_gen == self._gen and self._filled_gen == self._copy_gen:
            return True
        while not self._sync_lock.acquire(timeout=0.05):
            if interrupted():
                return False
        try:
            with self._desired_lock:
                gen, copy_gen = self._gen, self._copy_gen
                desired = {_key(m): m for m in self._desired}
            if gen != self._applied_gen:
                for key in [key for key in self._applied if key not in desired]:
                    self._unmap(key)
                for key, m in desired.items():
                    if key not in self._applied:
                        self._map(key, m)
                self._applied_gen = gen
            if copy_gen != self._filled_gen:
                copies = [p for e in self._applied.values() for _, p in e if p.kind == "copy"]
                for p in copies:
                    if not p.fill(interrupted):
                        return False
                if copies and not self._copy_logged:
                    self._copy_logged = True
                    _log.warning(
                        "kvm.private_memory_copied",
                        vmid=self.vmid,
                        ranges=[f"{p.gpa:#x}+{p.size:#x} (pid {p.pid} {p.desc})" for p in copies],
                        note="guest RAM is private memory of the client: copied at START_VM; "
                        "later writes by the guest or the client are not seen by the other",
                    )
                self._filled_gen = copy_gen
            return True
        finally:
            self._sync_lock.release()

    def _set_slot(self, slot: int, flags: int, gpa: int, size: int, addr: int) -> None:
        region = k.KvmUserspaceMemoryRegion(slot, flags, gpa, size, addr)
        k.ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, region)

    def _map(self, key: tuple[Any, ...], m: EptMapping) -> None:
        assert m.backing is not None and m.host_va is not None
        readonly = not m.access & abi.ACRN_MEM_ACCESS_WRITE
        pieces = resolve(m.gpa, m.size, m.backing.pid, m.host_va, readonly, self.vmid)
        entries: list[tuple[int, HostPiece]] = []
        for p in pieces:
            slot = self._free_slots.pop() if self._free_slots else self._next_slot
            if slot == self._next_slot:
                self._next_slot += 1
            flags = k.KVM_MEM_READONLY if p.readonly and self.backend.readonly_mem else 0
            try:
                self._set_slot(slot, flags, p.gpa, p.size, p.addr)
            except OSError as e:
                _log.error(
                    "kvm.memory_slot_failed", vmid=self.vmid, gpa=hex(p.gpa), size=hex(p.size),
                    error=str(e),
                )  # fmt: skip
                self._free_slots.append(slot)
                p.release()
                continue
            entries.append((slot, p))
            _log.debug(
                "kvm.memory_slot", vmid=self.vmid, slot=slot, gpa=hex(p.gpa), size=hex(p.size),
                kind=p.kind, pid=p.pid, client_va=hex(p.client_va), file=p.desc,
            )  # fmt: skip
        self._applied[key] = entries

    def _unmap(self, key: tuple[Any, ...]) -> None:
        for slot, p in self._applied.pop(key):
            try:
                self._set_slot(slot, 0, p.gpa, 0, 0)
            except OSError as e:
                _log.error("kvm.memory_slot_failed", vmid=self.vmid, slot=slot, error=str(e))
                continue  # KVM may still use the pages: keep them mapped
            self._free_slots.append(slot)
            p.release()

    # ----- reset and interrupts (hypercall thread) --------------------------------

    def reset(self) -> None:
        """RESET_VM: irqchip back to its power-on state; registers set before are dropped."""
        for image in self._irqchips:
            try:
                k.ioctl(self.fd, k.KVM_SET_IRQCHIP, image)
            except OSError as e:
                _log.error("kvm.irqchip_reset_failed", vmid=self.vmid, error=str(e))
        for v in self.vcpus:
            v.drop_regs()

    def inject_msi(self, addr: int, data: int) -> None:
        delivered = _lib.hsm_kvm_signal_msi(self.fd, addr, data & 0xFFFFFFFF)  # struct kvm_msi, filled in C
        if delivered < 0:
            _log.warning("kvm.msi_failed", vmid=self.vmid, addr=hex(addr), data=hex(data),
                         error=os.strerror(-delivered))
            return
        if logs.DEBUG:  # per interrupt: not even a filtered call otherwise
            _log.debug("kvm.msi", vmid=self.vmid, addr=hex(addr), data=hex(data), delivered=delivered > 0)

    def set_irqline(self, gsi: int, op: int) -> None:
        """ACRN's op as the KVM_IRQ_LINE levels it drives (hsm_kvm_irq_op, which holds the
        one table of them; an op it does not know drives nothing: the hypervisor records
        it as "other")."""
        if gsi >= k.KVM_IOAPIC_NUM_PINS:
            if gsi not in self._unrouted_gsis:
                self._unrouted_gsis.add(gsi)
                _log.info(
                    "kvm.irqline_not_delivered", vmid=self.vmid, gsi=gsi,
                    reason=f"KVM's IOAPIC has {k.KVM_IOAPIC_NUM_PINS} pins",
                )  # fmt: skip
            return
        ret = _lib.hsm_kvm_irq_op(self.fd, gsi, op)
        if ret < 0:
            _log.warning("kvm.irqline_failed", vmid=self.vmid, gsi=gsi, error=os.strerror(-ret))


def _gsi_routing() -> bytes:
    """ACRN's wiring (spec hv B.1.2): GSI n drives vIOAPIC pin n; GSIs below 16 also
    drive vPIC pin n, except GSI 2, which drives vPIC pin 0 (pin 2 is the cascade)."""
    entries = []
    for gsi in range(k.KVM_IOAPIC_NUM_PINS):
        entries.append(
            k.KvmIrqRoutingEntry(
                gsi=gsi, type=k.KVM_IRQ_ROUTING_IRQCHIP, irqchip=k.KVM_IRQCHIP_IOAPIC, pin=gsi
            )
        )
        if gsi < 16:
            pin = 0 if gsi == 2 else gsi
            chip = k.KVM_IRQCHIP_PIC_MASTER if pin < 8 else k.KVM_IRQCHIP_PIC_SLAVE
            entries.append(
                k.KvmIrqRoutingEntry(
                    gsi=gsi, type=k.KVM_IRQ_ROUTING_IRQCHIP, irqchip=chip, pin=pin % 8
                )
            )
    return struct.pack("<II", len(entries), 0) + b"".join(bytes(e) for e in entries)


class KvmVcpu:
    """One KVM vCPU; every method but :meth:`kick`, :meth:`set_regs` and :meth:`drop_regs`
    runs on the vCPU's own thread."""

    def __init__(self, vm: KvmVm, vcpu_id: int, scripted: ScriptedVcpu) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        # the LAPIC id of the vCPU's pCPU, as on ACRN; KVM makes its vCPU id the APIC id
        self.apic_id = vm.lapic_ids[vcpu_id] if vcpu_id < len(vm.lapic_ids) else vcpu_id
        self.fd = k.ioctl(vm.fd, k.KVM_CREATE_VCPU, self.apic_id)
        try:
            self.run_mm = mmap.mmap(
                self.fd, vm.backend.run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
            self._reset_state = self._save_state()
        except BaseException:
            os.close(self.fd)
            raise
        self._scripted = scripted
        self._mode: str | None = None  # "kvm" or "scripted", chosen at the first run
        self._pending: tuple[k.KvmRegs, k.KvmSregs] | None = None
        self._regs_lock = threading.Lock()
        self._tid: int | None = None  # pthread id while the thread can be kicked
        self._tid_lock = threading.Lock()
        self._cpuid_set = False
        self._ran = False  # KVM_RUN was entered at least once
        self._in_guest = False
        # hsm_kvm_loop's state: PIO/MMIO exits that are plain requests are done in C
        self._fast = _ffi.new("struct hsm_kvm_fast *")
        self._fast.vcpu_fd = self.fd
        self._fast.kick_signal = int(KICK_SIGNAL)
        self._run_c = _ffi.from_buffer(self.run_mm)  # released before run_mm closes
        self._fast.run = self._run_c
        self._fast_skip: Any = None  # keeps the skip map the struct points at alive
        # an exit being turned into requests: port I/O (possibly string) or MMIO
        self._io: list[int] | None = None  # [port, size, write, count, data_offset, index]
        self._mmio_read: int = 0  # MMIO read outstanding: its length
        self._shut_down = False  # triple-faulted: runs no guest code until RESET_VM
        self._s5 = False  # the hypervisor's S5 write for that triple fault is outstanding
        self.exits: dict[str, int] = {}

    # ----- state -------------------------------------------------------------------

    def _save_state(self) -> list[tuple[int, bytes]]:
        state = []
        for _name, get, set_, size in _VCPU_STATE:
            buf = bytearray(size)
            try:
                k.ioctl(self.fd, get, buf)
            except OSError:
                continue  # not offered by this KVM: not restored either
            state.append((set_, bytes(buf)))
            if set_ == k.KVM_SET_REGS:  # MSRs right after the registers
                msrs = self._get_msrs()
                if msrs is not None:
                    state.append((k.KVM_SET_MSRS, msrs))
        return state

    def _get_msrs(self) -> bytes | None:
        indexes = self.vm.backend.reset_msrs
        if not indexes:
            return None
        buf = bytearray(k.SIZEOF_KVM_MSRS_HEADER + 16 * len(indexes))
        _U32.pack_into(buf, 0, len(indexes))
        for i, idx in enumerate(indexes):
            _U32.pack_into(buf, k.SIZEOF_KVM_MSRS_HEADER + 16 * i, idx)
        try:
            n = k.ioctl(self.fd, k.KVM_GET_MSRS, buf)
        except OSError:
            return None
        _U32.pack_into(buf, 0, n)
        return bytes(buf[: k.SIZEOF_KVM_MSRS_HEADER + 16 * n])

    def _restore_state(self) -> None:
        for set_, image in self._reset_state:
            try:
                k.ioctl(self.fd, set_, image)
            except OSError as e:
                _log.error("kvm.vcpu_reset_failed", vmid=self.vm.vmid, vcpu=self.vcpu_id,
                           ioctl=hex(set_), error=str(e))  # fmt: skip

    def _initial(self, request: int) -> bytes:
        for set_, image in self._reset_state:
            if set_ == request:
                return image
        raise RuntimeError(f"no reset image for ioctl {request:#x}")

    def set_regs(self, r: abi.AcrnRegs) -> None:
        """SET_VCPU_REGS (hypercall thread): applied before the guest next runs."""
        regs = k.KvmRegs.from_buffer_copy(self._initial(k.KVM_SET_REGS))
        sregs = k.KvmSregs.from_buffer_copy(self._initial(k.KVM_SET_SREGS))
        acrn_to_kvm(r, regs, sregs)
        with self._regs_lock:
            self._pending = (regs, sregs)
        with self._tid_lock:
            self._fast.attention += 1  # a native loop returns to apply them

    def drop_regs(self) -> None:
        """RESET_VM (hypercall thread): registers set before the reset are lost."""
        with self._regs_lock:
            self._pending = None

    # ----- VcpuBackend -------------------------------------------------------------

    @property
    def in_guest(self) -> bool:
        """In KVM_RUN, or about to enter it (a kick makes it leave at once)."""
        return self._in_guest or bool(self._fast.in_guest)

    @property
    def idle(self) -> bool:
        if self._shut_down and not self._s5:
            return True
        return self._mode == "scripted" and self._scripted.idle

    @property
    def done(self) -> bool:
        return self._mode == "scripted" and self._scripted.done

    @property
    def position(self) -> str:
        if self._mode == "scripted":
            return "no guest RAM: " + self._scripted.position
        if self._mode is None:
            return "kvm: not started"
        counts = dict(self.exits)
        for name, n in (("io", self._fast.io_exits), ("mmio", self._fast.mmio_exits)):
            if n:
                counts[name] = counts.get(name, 0) + int(n)
        exits = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
        return f"kvm: {exits or 'no exits yet'}"

    def run(self, host: VcpuHost) -> Access | None:
        if self._mode is None:
            self._mode = "kvm" if self.vm.has_ram else "scripted"
            if self._mode == "scripted" and self.vcpu_id == 0:
                _log.info("kvm.no_guest_ram", vmid=self.vm.vmid, runs="the scripted workload")
        if self._mode == "scripted":
            return self._scripted.run(host)
        if self._tid is None:
            try:
                self._setup_thread(host)
            except OSError as e:
                host.guest_stop("vm.kvm_vcpu_setup_failed", vcpu=self.vcpu_id, error=str(e))
                return None
        io = self._io
        if io is not None:  # string I/O: the next element
            return self._io_access(io)
        fd = self.fd
        run = self.run_mm

        def interrupted() -> bool:
            return host.interrupted

        fast = self._fast
        while True:
            attention = fast.attention  # before the checks: a later kick is seen
            if not self.vm.sync(interrupted):
                return None
            if self._pending is not None and not self._apply_regs(host):
                return None
            self._in_guest = True
            if host.interrupted:
                self._in_guest = False
                return None
            self._ran = True
            native = host.native_cycle()
            if native is not None:
                # KVM_RUN and the plain request exits in C, without the GIL; what it
                # returns for is handled below as if Python's KVM_RUN had returned it
                self._in_guest = False
                if self._fast_skip is not native.skip_ports:
                    self._fast_skip = native.skip_ports
                    fast.skip_ports = native.skip_ports
                    fast.skip_mmio_lo, fast.skip_mmio_hi = native.mmio_lo, native.mmio_hi
                rc = _lib.hsm_kvm_loop(
                    fast, attention, native.wait, native.gate, native.upcall.fd, native.upcall_ptr
                )
                if rc == _lib.HSM_KL_ATTENTION:
                    continue
                if rc < 0:
                    self._count("error")
                    host.guest_stop("vm.kvm_run_failed", error=os.strerror(-rc))
                    return None
            else:
                try:
                    k.ioctl(fd, k.KVM_RUN)
                except OSError as e:
                    self._in_guest = False
                    if e.errno in (errno.EINTR, errno.EAGAIN):
                        self._eat_kicks()
                        continue
                    self._count("error")
                    host.guest_stop("vm.kvm_run_failed", error=str(e))
                    return None
                self._in_guest = False
            reason = _U32.unpack_from(run, _EXIT_REASON)[0]
            if reason == _EXIT_IO:
                d, size, port, count, off = _IO.unpack_from(run, k.RUN_IO)
                self._count("io")
                io = self._io = [port, size, d == k.KVM_EXIT_IO_OUT, count, off, 0]
                return self._io_access(io)
            if reason == _EXIT_MMIO:
                gpa, data, length, is_write = _MMIO.unpack_from(run, k.RUN_MMIO)
                self._count("mmio")
                if length not in (1, 2, 4, 8):
                    _log.warning("kvm.mmio_size_refused", vmid=self.vm.vmid, gpa=hex(gpa), size=length)
                    if not is_write:
                        run[k.RUN_MMIO_DATA : k.RUN_MMIO_DATA + length] = _ONES[:length]
                    continue
                if is_write:
                    self._mmio_read = 0
                    value = int.from_bytes(data[:length], "little")
                    return Access("mmio", True, gpa, length, value)
                self._mmio_read = length
                return Access("mmio", False, gpa, length)
            if reason in (_EXIT_INTR, k.KVM_EXIT_HLT, k.KVM_EXIT_IRQ_WINDOW_OPEN):
                self._eat_kicks()
                continue
            if reason == k.KVM_EXIT_SHUTDOWN:
                return self._triple_fault(host)
            self._exit_stops_vm(host, reason)
            return None

    def complete(self, value: int) -> None:
        if self._s5:
            self._s5 = False  # the hypervisor's own write: nothing goes back into the guest
            return
        if self._mode == "scripted":
            self._scripted.complete(value)
            return
        io = self._io
        if io is not None:
            port, size, write, count, off, i = io
            if not write:
                at = off + i * size
                self.run_mm[at : at + size] = value.to_bytes(size, "little")
            if i + 1 >= count:
                self._io = None
            else:
                io[5] = i + 1
        elif self._mmio_read:
            n = self._mmio_read
            self.run_mm[k.RUN_MMIO_DATA : k.RUN_MMIO_DATA + n] = value.to_bytes(n, "little")
            self._mmio_read = 0

    def abandoned(self) -> None:
        if self._mode == "scripted":
            self._scripted.abandoned()

    def reset(self) -> None:
        """RESET_VM (vCPU thread): back to the state KVM created the vCPU in."""
        self._scripted.reset()
        self._mode = None
        self._io = None
        self._mmio_read = 0
        self._shut_down = False
        self._s5 = False
        if not self._ran:
            return
        # Let KVM finish an exit it still holds (an I/O abandoned by PAUSE_VM) without
        # running guest code, so nothing of the old run leaks into the reset state.
        run = self.run_mm
        run[k.RUN_IMMEDIATE_EXIT] = 1
        try:
            k.ioctl(self.fd, k.KVM_RUN)
        except OSError:
            pass
        run[k.RUN_IMMEDIATE_EXIT] = 0
        self._eat_kicks()
        self._restore_state()

    def kick(self) -> None:
        with self._tid_lock:
            self._fast.attention += 1  # before the signal: the native loop checks it
            if self._tid is not None:
                signal.pthread_kill(self._tid, KICK_SIGNAL)

    def close(self) -> None:
        """The vCPU thread ends: no more kicks; the VM frees the fds when all are gone."""
        with self._tid_lock:
            self._tid = None
        self._scripted.close()
        self.vm.release()

    def free(self) -> None:
        """Teardown (reaper thread, after the thread ended)."""
        self._fast.run = _ffi.NULL
        _ffi.release(self._run_c)
        self.run_mm.close()
        os.close(self.fd)

    # ----- internals ---------------------------------------------------------------

    def _count(self, what: str) -> None:
        self.exits[what] = self.exits.get(what, 0) + 1

    def _setup_thread(self, host: VcpuHost) -> None:
        if not self._cpuid_set:
            self._set_cpuid(host)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
        bits = 0
        for s in old:
            if s != KICK_SIGNAL:
                bits |= 1 << (int(s) - 1)
        k.ioctl(self.fd, k.KVM_SET_SIGNAL_MASK, struct.pack("<IQ", 8, bits))
        with self._tid_lock:
            self._tid = threading.get_ident()

    def _set_cpuid(self, host: VcpuHost) -> None:
        """The host's CPUID as KVM offers it, plus ACRN's leaves from the scenario."""
        hv_bit = 1 << 31
        entries = []
        for src in self.vm.backend.supported_cpuid:
            if 0x40000000 <= src.function <= 0x4FFFFFFF:
                continue  # KVM's own paravirt leaves: this is ACRN
            e = k.KvmCpuidEntry2.from_buffer_copy(src)
            if e.function == 1:
                e.ecx = (e.ecx & ~hv_bit) | (host.cpuid_model(1, 0)[2] & hv_bit)
                e.ebx = (e.ebx & 0x00FFFFFF) | (self.apic_id << 24)  # initial APIC id
            elif e.function in (0xB, 0x1F):
                e.edx = self.apic_id  # x2APIC id
            entries.append(e)
        for leaf in _HYPERVISOR_LEAVES:
            eax, ebx, ecx, edx = host.cpuid_model(leaf, 0)
            entries.append(k.KvmCpuidEntry2(function=leaf, eax=eax, ebx=ebx, ecx=ecx, edx=edx))
        buf = struct.pack("<II", len(entries), 0) + b"".join(bytes(e) for e in entries)
        k.ioctl(self.fd, k.KVM_SET_CPUID2, buf)
        self._cpuid_set = True

    def _apply_regs(self, host: VcpuHost) -> bool:
        with self._regs_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return True
        regs, sregs = pending
        try:
            k.ioctl(self.fd, k.KVM_SET_SREGS, sregs)
            k.ioctl(self.fd, k.KVM_SET_REGS, regs)
        except OSError as e:
            host.guest_stop("vm.vcpu_regs_rejected", vcpu=self.vcpu_id, error=str(e))
            return False
        return True

    def _io_access(self, io: list[int]) -> Access:
        port, size, write, count, off, i = io
        if write:
            at = off + i * size
            value = int.from_bytes(self.run_mm[at : at + size], "little")
            return Access("pio", True, port, size, value)
        return Access("pio", False, port, size)

    def _eat_kicks(self) -> None:
        while signal.sigtimedwait((KICK_SIGNAL,), 0) is not None:
            pass

    def _triple_fault(self, host: VcpuHost) -> Access | None:
        """KVM_EXIT_SHUTDOWN: the vCPU stops running guest code until RESET_VM and
        the hypervisor reacts as ACRN does (the S5 write it returns, or a pause)."""
        self._count("shutdown")
        self._shut_down = True
        regs = k.KvmRegs()
        try:
            k.ioctl(self.fd, k.KVM_GET_REGS, regs)
            rip = hex(regs.rip)
        except OSError:
            rip = "?"
        access = host.triple_fault(exit="shutdown", rip=rip)
        self._s5 = access is not None
        return access

    def _exit_stops_vm(self, host: VcpuHost, reason: int) -> None:
        name = k.EXIT_NAMES.get(reason, str(reason))
        self._count(name)
        run = self.run_mm
        details: dict[str, object] = {"vcpu": self.vcpu_id, "exit": name}
        if reason == k.KVM_EXIT_SYSTEM_EVENT:
            details["type"] = _U32.unpack_from(run, k.RUN_SYSTEM_EVENT)[0]
        elif reason == k.KVM_EXIT_INTERNAL_ERROR:
            details["suberror"] = _U32.unpack_from(run, k.RUN_INTERNAL)[0]
        elif reason == k.KVM_EXIT_FAIL_ENTRY:
            details["hardware_reason"] = hex(struct.unpack_from("<Q", run, k.RUN_FAIL_ENTRY)[0])
        regs = k.KvmRegs()
        try:
            k.ioctl(self.fd, k.KVM_GET_REGS, regs)
            details["rip"] = hex(regs.rip)
        except OSError:
            pass
        host.guest_stop("vm.guest_cannot_run", **details)


def kvm_usable(device: str = DEVICE) -> str | None:
    """None if ``device`` opens and speaks KVM API 12, else why not."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{device}: {e.strerror}"
    try:
        if k.ioctl(fd, k.KVM_GET_API_VERSION) != k.KVM_API_VERSION:
            return f"{device}: unexpected KVM API version"
    except OSError as e:
        return f"{device}: {e.strerror}"
    finally:
        os.close(fd)
    return None
