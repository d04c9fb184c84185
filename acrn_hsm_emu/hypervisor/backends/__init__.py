"""Where guest accesses come from: scripted workloads or real code under KVM.

``base.py`` is the interface (a backend produces accesses and consumes read
results; the vCPU machinery does the rest); ``scripted.py`` replays a
workload. :func:`make_backend` picks one by name.
"""

from __future__ import annotations

from acrn_hsm_emu.hypervisor.backends.base import Backend, BackendError, VcpuBackend, VcpuHost
from acrn_hsm_emu.hypervisor.backends.scripted import ScriptedBackend
from acrn_hsm_emu.hypervisor.workload import Workload

BACKENDS = ("scripted",)

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "ScriptedBackend",
    "VcpuBackend",
    "VcpuHost",
    "make_backend",
    "resolve_backend",
]


def resolve_backend(name: str) -> str:
    """``auto`` -> the best backend this host can run (kvm when it exists and works)."""
    if name != "auto":
        return name
    return "kvm" if "kvm" in BACKENDS and kvm_usable() else "scripted"


def kvm_usable() -> bool:
    import os

    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def make_backend(name: str, workload: Workload | None = None) -> Backend:
    """The backend called ``name``; ValueError for an unknown one."""
    if name == "scripted":
        return ScriptedBackend(workload)
    raise ValueError(f"unknown vCPU backend {name!r} (known: {', '.join(BACKENDS)})")
