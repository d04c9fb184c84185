"""The scripted backend: vCPUs replay a workload instead of running guest code.

Each vCPU walks its :class:`~acrn_hsm_emu.hypervisor.workload.VcpuProgram`:
an I/O step is handed to the request machinery (``repeat`` times), a CPUID
step is answered by the hypervisor's CPUID model, a sleep step waits
(interruptibly). Expected values are compared as results come back; every
mismatch is counted on the vCPU and logged. RESET_VM rewinds to the start;
a VM whose vCPU has no program idles and performs only injected accesses.

Replaying a recording (docs/record-replay.md) reads :class:`ReplayLog`: every
difference with where it happened, and how far each vCPU got, kept beyond the
VM's life.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from typing import Any

from acrn_hsm_emu.hypervisor.api import Access, MemoryRegionOp
from acrn_hsm_emu.hypervisor.backends.base import VcpuHost
from acrn_hsm_emu.hypervisor.workload import CPUID_REGS, Step, VcpuProgram, Workload, pci_reg


class ReplayLog:
    """What replaying workloads found, for ``acrn-hsm-emu replay`` and ``status``: each
    difference (the first :attr:`LIMIT` listed) and each vCPU's progress, its runs that
    ended (the last :attr:`RUNS`) as well as the live ones."""

    LIMIT = 1000
    RUNS = 256

    def __init__(self) -> None:
        self.differences: list[dict[str, Any]] = []
        self.count = 0
        self.ended: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.RUNS)
        self.live: set[ScriptedVcpu] = set()
        self.lock = threading.Lock()

    def difference(self, d: dict[str, Any]) -> None:
        with self.lock:
            self.count += 1
            if len(self.differences) < self.LIMIT:
                self.differences.append(d)

    def summary(self) -> dict[str, Any]:
        """``differences`` (count), ``listed`` (the first ones), ``vcpus`` (progress of each
        vCPU run: ended ones first), ``complete`` (every one ran its program to the end)."""
        with self.lock:
            live = [v.progress() for v in self.live]
            vcpus = [*self.ended, *(p for p in live if p is not None)]
            return {
                "differences": self.count,
                "listed": list(self.differences),
                "vcpus": vcpus,
                "complete": bool(vcpus) and all(p["complete"] for p in vcpus),
            }


class ScriptedBackend:
    """One workload for every VM, optionally replaced per VM with :meth:`set_workload`."""

    name = "scripted"

    def __init__(self, workload: Workload | None = None) -> None:
        self.workload = workload
        self._per_vm: dict[int, Workload | None] = {}
        self._lock = threading.Lock()
        self.replay = ReplayLog()

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

    def irq_gate(self, vmid: int) -> Any:
        return None  # every interrupt goes through the hypervisor's Python

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
        self._program: VcpuProgram | None = None
        self._started = False
        self.reset()
        with backend.replay.lock:
            backend.replay.live.add(self)

    def _log_progress(self) -> None:
        """The run that ends (reset, close) into the replay log, if it ran."""
        progress = self.progress() if self._started else None
        if progress is not None:
            log = self._backend.replay
            with log.lock:
                log.ended.append(progress)

    def progress(self) -> dict[str, Any] | None:
        """How far this vCPU got since its last reset (None: it has no program):
        accesses replayed of the program's total, ``complete``."""
        if self._program is None:
            return None
        prog = self._program
        total = prog.accesses_per_run * prog.repeat if prog.repeat else None
        replayed = self._replayed + self._posted  # an access posted then abandoned reached the DM
        return {
            "vm": self._vmid,
            "vcpu": self._vcpu_id,
            "replayed": replayed,
            "total": total,
            "complete": self._done or (total is not None and replayed >= total),
            "position": self.position,
        }

    def reset(self) -> None:
        self._log_progress()
        self._started = False
        self._replayed = 0  # accesses completed since the reset
        self._posted = 0  # 1: the current access reached the device model, then was abandoned
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
        self._started = True
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
                            self._differs(host, step, want, have, reg)
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
        self._replayed += 1
        self._posted = 0
        if step.expect is not None and value != step.expect and self._host is not None:
            self._differs(self._host, step, step.expect, value)
        self._advance()

    def abandoned(self) -> None:
        if self._s5:
            return  # the hypervisor's own write, not a step
        self._posted = 1

    def kick(self) -> None:
        pass  # run() never blocks except in host.sleep_until, which the host wakes

    def close(self) -> None:
        self._host = None
        log = self._backend.replay
        with log.lock:
            log.live.discard(self)
        self._log_progress()
        self._program = None  # logged once

    def _differs(self, host: VcpuHost, step: Step, expected: int, got: int, reg: str = "") -> None:
        host.mismatch(self._describe(step, reg), expected, got)
        a = step.access
        if a is None:
            what = f"cpuid {step.leaf:#x}.{step.subleaf} {reg}"
        elif a.kind == "pci":
            what = (f"pci read {a.addr >> 16 & 0xFF:02x}:{a.addr >> 11 & 0x1F:02x}.{a.addr >> 8 & 7} "
                    f"reg {pci_reg(a.addr):#x} size {a.size}")
        else:
            what = f"{a.kind} read {a.addr:#x} size {a.size}"
        self._backend.replay.difference({
            "vm": self._vmid, "vcpu": self._vcpu_id, "step": self._index, "pass": self._run,
            "rep": self._rep, "access": what, "expected": expected, "got": got,
        })  # fmt: skip

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
