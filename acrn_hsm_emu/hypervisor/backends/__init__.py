"""Where guest accesses come from: scripted workloads or real code under KVM.

``base.py`` is the interface (a backend produces accesses and consumes read
results; the vCPU machinery does the rest); ``scripted.py`` replays a
workload; ``kvm.py`` runs the guest's own code. :func:`make_backend` picks one
by name, :func:`resolve_backend` turns ``auto`` into the best one this host
can run.
"""

from __future__ import annotations

import structlog

from acrn_hsm_emu.hypervisor.backends.base import Backend, BackendError, VcpuBackend, VcpuHost
from acrn_hsm_emu.hypervisor.backends.scripted import ScriptedBackend
from acrn_hsm_emu.hypervisor.workload import Workload

BACKENDS = ("scripted", "kvm")

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "ScriptedBackend",
    "VcpuBackend",
    "VcpuHost",
    "kvm_usable",
    "make_backend",
    "resolve_backend",
]

_log = structlog.get_logger("acrn_hsm_emu.hypervisor")


def resolve_backend(name: str) -> str:
    """``auto`` -> ``kvm`` when /dev/kvm opens and speaks KVM, else ``scripted`` (logged)."""
    if name != "auto":
        return name
    from acrn_hsm_emu.hypervisor.backends.kvm import kvm_usable as why_not

    reason = why_not()
    chosen = "kvm" if reason is None else "scripted"
    _log.info("hypervisor.backend_chosen", backend=chosen, requested="auto",
              reason=reason or "/dev/kvm is usable")  # fmt: skip
    return chosen


def kvm_usable() -> bool:
    from acrn_hsm_emu.hypervisor.backends.kvm import kvm_usable as why_not

    return why_not() is None


def make_backend(name: str, workload: Workload | None = None) -> Backend:
    """The backend called ``name``; ValueError for an unknown one, OSError/ValueError
    when KVM cannot be used."""
    if name == "scripted":
        return ScriptedBackend(workload)
    if name == "kvm":
        from acrn_hsm_emu.hypervisor.backends.kvm import KvmBackend

        return KvmBackend(workload)
    raise ValueError(f"unknown vCPU backend {name!r} (known: {', '.join(BACKENDS)})")
