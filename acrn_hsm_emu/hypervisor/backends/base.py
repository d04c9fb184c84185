"""The seam between the vCPU request machinery and where guest accesses come from.

The machinery (``hypervisor/vcpu.py``) owns one OS thread per vCPU, the
request slot, the upcall, the wait for completion, pause/reset/stop and the
counters. A backend only produces the guest's next access and consumes the
read result, so a new backend does not touch the request path:

- ``scripted`` replays a :class:`~acrn_hsm_emu.hypervisor.workload.Workload`.
- ``kvm`` (``kvm.py``, ``docs/kvm.md``) opens a KVM VM in
  :meth:`Backend.vm_created`, maps guest RAM from
  :meth:`Backend.memory_changed` (``MemoryRegionOp.backing`` / ``host_va``
  say where the bytes are), loads registers from :meth:`Backend.vcpu_regs`,
  and in :meth:`VcpuBackend.run` calls KVM_RUN: a KVM_EXIT_IO / KVM_EXIT_MMIO
  becomes the returned :class:`Access`, the value given to
  :meth:`VcpuBackend.complete` goes into the exit's data before the next
  KVM_RUN; :meth:`VcpuBackend.kick` (another thread) signals the thread so
  KVM_RUN returns for a pause. Interrupts reach it through
  :meth:`Backend.inject_msi` and :meth:`Backend.set_irqline`.

Threading contract: every ``VcpuBackend`` method except :meth:`kick` is
called only from that vCPU's own thread. ``Backend`` methods are called from
the hypercall caller's thread with the hypervisor lock held, so they must be
quick and must not wait for vCPU threads (:meth:`Backend.vm_paused` may wait
a few milliseconds for kicked vCPUs to leave the guest, as ACRN's pause does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from acrn_hsm_emu.hypervisor.api import Access, MemoryRegionOp

if TYPE_CHECKING:
    from acrn_hsm_emu.hypervisor.vcpu import NativeCycle

Regs = tuple[int, int, int, int]


class BackendError(Exception):
    """The backend could not set a VM up; CREATE_VM then reports vmid 0xFFFF."""


class VcpuHost(Protocol):
    """What the machinery offers a running backend (the vCPU object itself)."""

    vcpu_id: int

    @property
    def vmid(self) -> int:
        """Relative vmid, as the Service VM sees it."""
        ...

    @property
    def interrupted(self) -> bool:
        """True when the backend should return from :meth:`VcpuBackend.run` at once
        (pause, reset, stop, or an injected access waiting)."""
        ...

    def cpuid(self, leaf: int, subleaf: int) -> Regs:
        """CPUID as this VM sees it (counted in the vCPU's ``cpuid`` counter)."""
        ...

    def sleep_until(self, deadline: float) -> bool:
        """Sleep until ``time.monotonic() >= deadline``; False if interrupted first."""
        ...

    def native_cycle(self) -> NativeCycle | None:
        """What a native run loop needs to do plain requests itself, when that
        applies now (else None: return them from :meth:`VcpuBackend.run`)."""
        ...

    def mismatch(self, what: str, expected: object, got: object) -> None:
        """Count and log a result that differs from the expected one."""
        ...

    def cpuid_model(self, leaf: int, subleaf: int) -> Regs:
        """CPUID as the hypervisor models it for this VM (not counted): what a
        backend that runs real code programs into its CPU."""
        ...

    def guest_stop(self, event: str, **details: object) -> None:
        """The guest cannot run: pause the VM, as ACRN would stop it, with one log
        line ``event`` carrying ``details``."""
        ...

    def triple_fault(self, **details: object) -> Access | None:
        """The guest triple-faulted. For a post-launched VM ACRN posts a
        VM_EVENT_TRIPLE_FAULT and sends the device model a PM1a_CNT S5 write
        (spec hv A.2.7): that write is returned, for the backend to hand back from
        :meth:`VcpuBackend.run` (its :meth:`VcpuBackend.complete` puts nothing into
        the guest). None: the VM was paused instead."""
        ...


class VcpuBackend(Protocol):
    """One vCPU's source of guest accesses."""

    @property
    def idle(self) -> bool:
        """Nothing to run until something external happens (workload finished, HLT)."""
        ...

    @property
    def done(self) -> bool:
        """The workload (if any) ran to its end; for snapshots."""
        ...

    @property
    def position(self) -> str:
        """Where the vCPU is, for snapshots (e.g. ``"run 1 step 42"``)."""
        ...

    def run(self, host: VcpuHost) -> Access | None:
        """Run the guest until its next access; None to let the machinery look
        around (interrupted, idle, or nothing to do right now)."""
        ...

    def complete(self, value: int) -> None:
        """The access returned by the last :meth:`run` is done; ``value`` is what
        a read got (after the width mask), 0 for a write."""
        ...

    def abandoned(self) -> None:
        """The access returned by the last :meth:`run` reached the device model but
        was abandoned (PAUSE_VM, RESET_VM, stop): no :meth:`complete` follows; the next
        :meth:`run` may return it again."""
        ...

    def reset(self) -> None:
        """Cold reset (RESET_VM): start over from the beginning at the next run.
        An access abandoned by PAUSE_VM gets no :meth:`complete`; a reset follows
        before the VM can run again."""
        ...

    def kick(self) -> None:
        """From any thread: make a blocking :meth:`run` return soon."""
        ...

    def close(self) -> None:
        """The vCPU is going away (its thread calls this last)."""
        ...


class Backend(Protocol):
    """Per-hypervisor factory and VM-level hooks."""

    name: str

    def vm_created(self, vmid: int, vcpu_num: int, lapic_ids: Sequence[int] = ()) -> None:
        """CREATE_VM; raise :class:`BackendError` to make the creation itself fail.
        ``lapic_ids``: the LAPIC id of each vCPU (that of its pCPU; vCPU 0 is the BSP)."""
        ...

    def create_vcpu(self, vmid: int, vcpu_id: int) -> VcpuBackend: ...

    def vm_destroyed(self, vmid: int) -> None: ...

    def memory_changed(self, vmid: int, op: MemoryRegionOp) -> None:
        """One SET_MEMORY_REGIONS op the hypervisor accepted."""
        ...

    def vcpu_regs(self, vmid: int, vcpu_id: int, regs: bytes) -> None:
        """SET_VCPU_REGS passed the hypervisor's checks (296-byte acrn_vcpu_regs); takes
        effect when the vCPU next starts. Raise :class:`BackendError` to refuse them
        (the hypercall then fails with -1)."""
        ...

    def vm_started(self, vmid: int) -> None:
        """START_VM: the VM is RUNNING (its vCPUs are kicked right after)."""
        ...

    def vm_paused(self, vmid: int) -> None:
        """PAUSE_VM: the VM is PAUSED and its vCPUs were kicked."""
        ...

    def vm_reset(self, vmid: int) -> None:
        """RESET_VM: the VM is CREATED again; each vCPU's :meth:`VcpuBackend.reset`
        follows on its own thread."""
        ...

    def inject_msi(self, vmid: int, addr: int, data: int) -> None:
        """INJECT_MSI accepted by the hypervisor."""
        ...

    def irq_gate(self, vmid: int) -> Any:
        """The VM's ``struct hsm_irq_gate *`` (native/irq_gate.h: HC_INJECT_MSI and
        HC_SET_IRQLINE for callers outside Python, open while the VM lives), or None where
        interrupts are not injected natively."""
        ...

    def set_irqline(self, vmid: int, gsi: int, op: int) -> None:
        """SET_IRQLINE accepted by the hypervisor (op: ACRN's SET_HIGH .. FALLING_PULSE)."""
        ...

    def shutdown(self) -> None:
        """The hypervisor shuts down (vCPU threads stopped): release everything."""
        ...
