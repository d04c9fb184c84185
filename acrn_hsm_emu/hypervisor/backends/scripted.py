"""The scripted backend: vCPUs replay a workload instead of running guest code.

Each vCPU walks its :class:`~acrn_hsm_emu.hypervisor.workload.VcpuProgram`:
an I/O step is handed to the request machinery (``repeat`` times), a CPUID
step is answered by the hypervisor's CPUID model, a sleep step waits
(interruptibly). Expected values are compared as results come back; every
mismatch is counted on the vCPU and logged. RESET_VM rewinds to the start;
a VM whose vCPU has no program idles and performs only injected accesses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from acrn_hsm_emu.hypervisor.api import Access, MemoryRegionOp
from acrn_hsm_emu.hypervisor.backends.base import VcpuHost
from acrn_hsm_emu.hypervisor.workload import CPUID_REGS, Step, VcpuProgram, Workload


class ScriptedBackend:
    """One workload for every VM, optionally replaced per VM with :meth:`set_workload`."""

    name = "scripted"

    def __init__(self, workload: Workload | None = None) -> None:
        self.workload = workload
        self._per_vm: dict[int, Workload | None] = {}
        self._lock = threading.Lock()

    def set_workload(self, vmid: int | None, workload: Workload | None) -> None:
        """Workload for VM ``vmid`` (None: the default for all VMs); used from the next reset/start."""
        with self._lock:
            if vmid is None:
                self.workload = workload
            else:
                self._per_vm[vmid] = workload

    def program_for(self, vmid: int, vcpu_id: int) -> VcpuProgram | None:
        with self._lock:
            wl = self._per_vm.get(vmid, self.workload)
        return None if wl is None else wl.programs.get(vcpu_id)

    def vm_created(self, vmid: int, vcpu_num: int, lapic_ids: Sequence[int] = ()) -> None:
        pass

    def create_vcpu(self, vmid: int, vcpu_id: int) -> ScriptedVcpu:
        return ScriptedVcpu(self, vmid, vcpu_id)

    def vm_destroyed(self, vmid: int) -> None:
        with self._lock:
            self._per_vm.pop(vmid, None)

    def memory_changed(self, vmid: int, op: MemoryRegionOp) -> None:
        pass

    def vcpu_regs(self, vmid: int, vcpu_id: int, regs: bytes) -> None:
        pass

    def vm_started(self, vmid: int) -> None:
        pass

    def vm_paused(self, vmid: int) -> None:
        pass

    def vm_reset(self, vmid: int) -> None:
        pass

    def inject_msi(self, vmid: int, addr: int, data: int) -> None:
        pass  # recorded by the hypervisor; there is no guest to interrupt

    def set_irqline(self, vmid: int, gsi: int, op: int) -> None:
        pass

    def shutdown(self) -> None:
        pass


class ScriptedVcpu:
    """Replays one vCPU's program; all methods but :meth:`kick` run on the vCPU thread."""

    def __init__(self, backend: ScriptedBackend, vmid: int, vcpu_id: int) -> None:
        self._backend = backend
        self._vmid = vmid
        self._vcpu_id = vcpu_id
        self._host: VcpuHost | None = None
        self.reset()

    def reset(self) -> None:
        self._program = self._backend.program_for(self._vmid, self._vcpu_id)
        self._steps: tuple[Step, ...] = self._program.steps if self._program else ()
        self._run = 0  # completed passes over the steps
        self._index = 0
        self._rep = 0  # completed repetitions of the current step
        self._sleep_until: float | None = None
        self._done = not self._steps
        self._s5 = False  # the hypervisor's S5 write for a triple fault is outstanding

    @property
    def idle(self) -> bool:
        return self._done

    @property
    def done(self) -> bool:
        return self._done and bool(self._steps)

    @property
    def position(self) -> str:
        if self._program is None:
            return "no workload"
        if self._done:
            return f"done after {self._run} run(s)"
        return f"run {self._run} step {self._index} rep {self._rep}"

    def run(self, host: VcpuHost) -> Access | None:
        self._host = host
        steps = self._steps
        while not self._done:
            if host.interrupted:
                return None
            step = steps[self._index]
            if step.access is not None:
                return step.access
            if step.op == "triple_fault":
                access = host.triple_fault(step=self._index, run=self._run)
                self._done = True  # a triple-faulted vCPU runs nothing more until RESET_VM
                self._s5 = access is not None
                return access
            if step.op == "cpuid":
                got = host.cpuid(step.leaf, step.subleaf)
                if step.expect_regs is not None:
                    for reg, want, have in zip(CPUID_REGS, step.expect_regs, got, strict=True):
                        if want is not None and want != have:
                            host.mismatch(self._describe(step, reg), want, have)
            else:  # sleep
                if self._sleep_until is None:
                    self._sleep_until = time.monotonic() + step.seconds
                if not host.sleep_until(self._sleep_until):
                    return None  # resumes the same sleep on the next run
                self._sleep_until = None
            self._advance()
        return None

    def complete(self, value: int) -> None:
        if self._s5:
            self._s5 = False  # the hypervisor's own write: nothing to compare or advance
            return
        step = self._steps[self._index]
        if step.expect is not None and value != step.expect and self._host is not None:
            self._host.mismatch(self._describe(step), step.expect, value)
        self._advance()

    def kick(self) -> None:
        pass  # run() never blocks except in host.sleep_until, which the host wakes

    def close(self) -> None:
        self._host = None

    def _advance(self) -> None:
        self._rep += 1
        if self._rep < self._steps[self._index].repeat:
            return
        self._rep = 0
        self._index += 1
        if self._index < len(self._steps):
            return
        self._index = 0
        self._run += 1
        assert self._program is not None
        if self._program.repeat and self._run >= self._program.repeat:
            self._done = True

    def _describe(self, step: Step, reg: str = "") -> str:
        a = step.access
        where = f"step {self._index} (run {self._run})"
        if a is None:
            return f"{where} cpuid {step.leaf:#x}.{step.subleaf} {reg}"
        return f"{where} {a.kind} read {a.addr:#x} size {a.size}"
