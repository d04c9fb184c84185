"""Recording a VM's I/O requests as a workload (``acrn-hsm-emu record``, docs/record-replay.md).

A :class:`Recorder` is attached to one VM (``Vm.recorder``, and each vCPU's
``Vcpu.recorder``). A vCPU that has one calls :meth:`Recorder.access` for every
guest access that reached the HSM: posted to its request slot (a PCI access:
its CF8 write or its data-port access) or put into the asyncio ring. What the
hypervisor answered itself (CF8 reads, vPIC, vIOAPIC, an RT VM's RTC) never
reaches the HSM and is not recorded. Reads carry the answer the device model
gave as ``expect``; a read whose answer never came back (the VM was paused,
reset or destroyed meanwhile, or the access went into the asyncio ring, whose
reads get a stale value) has none.

Each vCPU's accesses become that vCPU's steps, in order; a step equal to the
one before it is folded into its ``repeat``. A 4-byte write of a canonical
address to 0xCF8 (enable bit set, bits 30:28 and 1:0 clear) directly followed,
on the same vCPU, by a data-port access that stays within the dword is
recorded as one ``pci`` step, which replays as exactly the same two requests
and, unlike two raw ``pio`` steps, under the VM's PCI lock, so vCPUs replaying
side by side cannot clobber each other's CF8 address. Anything else is
recorded as it was, raw.

RESET_VM ends a run: the steps after it go to a new run (a workload of its own,
since a workload replays from its start at every START_VM).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog

from acrn_hsm_emu import acrn_kernel_abi as ak
from acrn_hsm_emu.hypervisor.api import Access
from acrn_hsm_emu.hypervisor.workload import pci_reg

_log = structlog.get_logger(__name__)

MAX_ACCESSES = 1_000_000  # a recording's hard limit: about 100 MB of Python objects at worst
_CF8, _CFC = 0xCF8, 0xCFC
_S5 = Access("pio", True, ak.VIRTUAL_PM1A_CNT_ADDR, 2, ak.S5_WRITE)


def fold_pci(cf8: int, port: int, size: int) -> int | None:
    """The ``pci`` access address of a CF8 value and a data-port access, or None when
    the pair does not replay identically as one ``pci`` step."""
    off = port - _CFC
    if cf8 & 0xF0000003 != 0x80000000 or not 0 <= off <= 3 or off + size > 4:
        return None
    return (cf8 & 0x0FFFFFFC) + off


def step_dict(access: Access, answer: int | None) -> dict[str, Any]:
    """The workload step (docs/workload.md) for one access; ``answer``: a read's ``expect``."""
    a = access
    if a.kind == "pio":
        d: dict[str, Any] = {"op": "pio", "port": a.addr}
    elif a.kind == "mmio":
        d = {"op": "mmio", "addr": a.addr}
    else:
        reg = pci_reg(a.addr)
        d = {"op": "pci", "bus": a.addr >> 16 & 0xFF, "dev": a.addr >> 11 & 0x1F,
             "func": a.addr >> 8 & 7, "reg": reg}  # fmt: skip
    d["size"] = a.size
    if a.write:
        d["write"] = True
        d["value"] = a.value
    elif answer is not None:
        d["expect"] = answer & ((1 << (8 * a.size)) - 1)
    return d


class Recorder:
    """One VM's recording. :meth:`access` and :meth:`triple_fault` run on vCPU
    threads; the rest on the caller's (the daemon's trio thread), all under ``lock``
    for moments only."""

    def __init__(self, vmid: int, *, count: int | None = None, backend: str = "") -> None:
        self.vmid = vmid
        self.limit = min(count, MAX_ACCESSES) if count else MAX_ACCESSES
        self.count = count
        self.backend = backend
        self.state = "armed"  # -> recording (attached to the VM) -> stopped
        self.reason = ""  # why it stopped
        self.accesses = 0  # guest accesses recorded (a folded pci pair counts once)
        self.started = time.time()
        self.lock = threading.Lock()
        self.vm: Any = None  # the Vm while attached
        # per run: vcpu -> [[step dict, repeat], ...]
        self.runs: list[dict[int, list[list[Any]]]] = [{}]
        self._cf8: dict[int, int] = {}  # vcpu -> a CF8 write waiting for its data-port access
        self._s5: set[int] = set()  # vcpus whose next access is the triple fault's S5 write

    # ----- attaching (hypervisor, its lock held) ----------------------------------------

    def attach(self, vm: Any) -> None:
        """Start recording ``vm`` (a hypervisor ``Vm``); its vCPUs leave native loops."""
        with self.lock:
            if self.state != "armed":
                return
            self.state = "recording"
            self.vm = vm
        vm.recorder = self
        for v in vm.vcpus:
            v.recorder = self
            v.kick()  # a vCPU in a native KVM loop comes back to Python, which records
        _log.info("record.attached", vmid=self.vmid, vcpus=len(vm.vcpus))

    def stop(self, reason: str) -> None:
        """Stop recording (any thread); what was recorded stays."""
        with self.lock:
            if self.state == "stopped":
                return
            self._flush_all()
            self.state = "stopped"
            self.reason = reason
            vm, self.vm = self.vm, None
        if vm is not None:
            vm.recorder = None
            for v in vm.vcpus:
                v.recorder = None
        _log.info("record.stopped", vmid=self.vmid, reason=reason, accesses=self.accesses,
                  runs=len(self.runs_with_steps()))  # fmt: skip

    def new_run(self) -> None:
        """RESET_VM: what follows is a new run (when this one recorded anything)."""
        with self.lock:
            if self.state != "recording":
                return
            self._flush_all()
            self._s5.clear()
            if any(self.runs[-1].values()):
                self.runs.append({})
                _log.info("record.new_run", vmid=self.vmid, run=len(self.runs) - 1)

    # ----- from vCPU threads ---------------------------------------------------------------

    def access(self, vcpu: int, access: Access, answer: int | None) -> None:
        """``access`` reached the HSM; ``answer``: what a read got (None: no answer came)."""
        stop = False
        with self.lock:
            if self.state != "recording":
                return
            if vcpu in self._s5:
                self._s5.discard(vcpu)
                if access == _S5:
                    return  # the hypervisor's own write after a triple fault: in that step
            cf8 = self._cf8.pop(vcpu, None)
            if access.kind == "pio" and access.write and access.addr == _CF8 and access.size == 4:
                if cf8 is not None:
                    self._add(vcpu, Access("pio", True, _CF8, 4, cf8), None)
                self._cf8[vcpu] = access.value  # held: its data-port access may follow
                stop = self.accesses + 1 >= self.limit
                if stop:
                    self._flush_all()
            else:
                if cf8 is not None:
                    addr = None
                    if access.kind == "pio":
                        addr = fold_pci(cf8, access.addr, access.size)
                    if addr is None:
                        self._add(vcpu, Access("pio", True, _CF8, 4, cf8), None)
                    else:
                        access = Access("pci", access.write, addr, access.size, access.value)
                self._add(vcpu, access, answer)
                stop = self.accesses >= self.limit
        if stop:
            self.stop("count reached" if self.count and self.accesses >= self.count else
                      f"the limit of {MAX_ACCESSES} accesses reached")  # fmt: skip

    def triple_fault(self, vcpu: int) -> None:
        """The vCPU triple-faulted: a ``triple_fault`` step, which replays the VM event and
        the S5 write the hypervisor sends next (that write is not recorded again)."""
        with self.lock:
            if self.state != "recording":
                return
            cf8 = self._cf8.pop(vcpu, None)
            if cf8 is not None:
                self._add(vcpu, Access("pio", True, _CF8, 4, cf8), None)
            self.runs[-1].setdefault(vcpu, []).append([{"op": "triple_fault"}, 1])
            self._s5.add(vcpu)

    # ----- internals (lock held) -------------------------------------------------------------

    def _add(self, vcpu: int, access: Access, answer: int | None) -> None:
        d = step_dict(access, answer)
        steps = self.runs[-1].setdefault(vcpu, [])
        if steps and steps[-1][0] == d:
            steps[-1][1] += 1
        else:
            steps.append([d, 1])
        self.accesses += 1

    def _flush_all(self) -> None:
        for vcpu, cf8 in sorted(self._cf8.items()):
            self._add(vcpu, Access("pio", True, _CF8, 4, cf8), None)
        self._cf8.clear()

    # ----- results ---------------------------------------------------------------------------

    def runs_with_steps(self) -> list[dict[int, list[list[Any]]]]:
        return [r for r in self.runs if any(r.values())]

    def workloads(self) -> list[dict[str, Any]]:
        """One workload (the structure of docs/workload.md) per run that recorded anything."""
        with self.lock:
            runs = self.runs_with_steps()
            out = []
            for i, run in enumerate(runs):
                vcpus = []
                for vcpu, steps in sorted(run.items()):
                    vcpus.append({"id": vcpu, "repeat": 1, "steps": [
                        {**d, "repeat": n} if n > 1 else dict(d) for d, n in steps
                    ]})  # fmt: skip
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
                out.append({
                    "name": f"recorded from VM {self.vmid} ({self.backend or 'unknown'} backend), "
                            f"run {i} of {len(runs)}, {when}",
                    "vcpu": vcpus,
                })  # fmt: skip
            return out

    def summary(self) -> dict[str, Any]:
        """For ``status`` and ``record``: state, counts, the reason it stopped."""
        with self.lock:
            runs = self.runs_with_steps()
            return {
                "vm": self.vmid,
                "state": self.state,
                "reason": self.reason or None,
                "accesses": self.accesses,
                "steps": sum(len(s) for r in runs for s in r.values()),
                "runs": len(runs),
                "vcpus": sorted({v for r in runs for v, s in r.items() if s}),
                "count": self.count,
            }
