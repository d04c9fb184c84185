"""kvm_abi.py against the installed <linux/kvm.h>: ioctl numbers, constants, layouts.

A C program compiled against the system header prints what the header says;
every number the backend uses is compared with it. Needs no /dev/kvm.
"""

from __future__ import annotations

import ctypes

import pytest

from acrn_hsm_emu.hypervisor.backends import kvm_abi as k
from tests.support.cbuild import build_c


@pytest.fixture(scope="module")
def header() -> dict[str, int]:
    import subprocess

    out = subprocess.run(
        [str(build_c("kvm_abi_dump"))], capture_output=True, text=True, check=True
    ).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def test_ioctl_numbers(header) -> None:
    for name in k.IOCTL_NAMES:
        assert getattr(k, name) == header[name], name


def test_constants(header) -> None:
    assert k.KVMIO == header["KVMIO"]
    assert k.KVM_API_VERSION == header["KVM_API_VERSION"]
    names = [n for n in header if n.startswith(("KVM_CAP_", "KVM_EXIT_", "KVM_IRQ", "KVM_MP_"))]
    names += ["KVM_MEM_READONLY", "KVM_IOAPIC_NUM_PINS"]
    assert len(names) > 30
    for name in names:
        assert getattr(k, name) == header[name], name


STRUCTS = {
    "kvm_regs": k.KvmRegs,
    "kvm_segment": k.KvmSegment,
    "kvm_dtable": k.KvmDtable,
    "kvm_sregs": k.KvmSregs,
    "kvm_userspace_memory_region": k.KvmUserspaceMemoryRegion,
    "kvm_cpuid_entry2": k.KvmCpuidEntry2,
    "kvm_msi": k.KvmMsi,
    "kvm_irq_level": k.KvmIrqLevel,
    "kvm_irq_routing_entry": k.KvmIrqRoutingEntry,
    "kvm_msr_entry": k.KvmMsrEntry,
}

OPAQUE = {
    "kvm_fpu": k.SIZEOF_KVM_FPU,
    "kvm_lapic_state": k.SIZEOF_KVM_LAPIC_STATE,
    "kvm_xcrs": k.SIZEOF_KVM_XCRS,
    "kvm_vcpu_events": k.SIZEOF_KVM_VCPU_EVENTS,
    "kvm_debugregs": k.SIZEOF_KVM_DEBUGREGS,
    "kvm_mp_state": k.SIZEOF_KVM_MP_STATE,
    "kvm_irqchip": k.SIZEOF_KVM_IRQCHIP,
    "kvm_cpuid2": k.SIZEOF_KVM_CPUID2_HEADER,
    "kvm_msrs": k.SIZEOF_KVM_MSRS_HEADER,
    "kvm_msr_list": k.SIZEOF_KVM_MSR_LIST_HEADER,
    "kvm_irq_routing": k.SIZEOF_KVM_IRQ_ROUTING_HEADER,
    "kvm_signal_mask": k.SIZEOF_KVM_SIGNAL_MASK_HEADER,
}


def test_struct_sizes(header) -> None:
    for name, cls in STRUCTS.items():
        assert ctypes.sizeof(cls) == header[f"sizeof.{name}"], name
    for name, size in OPAQUE.items():
        assert size == header[f"sizeof.{name}"], name


def test_field_offsets(header) -> None:
    renamed = {"u.irqchip.irqchip": "irqchip", "u.irqchip.pin": "pin"}
    checked = 0
    for key, value in header.items():
        if not key.startswith("offsetof.") or key.startswith("offsetof.kvm_run."):
            continue
        _, struct, field = key.split(".", 2)
        cls = STRUCTS[struct]
        assert getattr(cls, renamed.get(field, field)).offset == value, key
        checked += 1
    assert checked > 60


def test_kvm_run_offsets(header) -> None:
    run = {
        "immediate_exit": k.RUN_IMMEDIATE_EXIT,
        "exit_reason": k.RUN_EXIT_REASON,
        "io.direction": k.RUN_IO,
        "io.size": k.RUN_IO + 1,
        "io.port": k.RUN_IO + 2,
        "io.count": k.RUN_IO + 4,
        "io.data_offset": k.RUN_IO + 8,
        "mmio.phys_addr": k.RUN_MMIO,
        "mmio.data": k.RUN_MMIO_DATA,
        "mmio.len": k.RUN_MMIO + 16,
        "mmio.is_write": k.RUN_MMIO + 20,
        "internal.suberror": k.RUN_INTERNAL,
        "system_event.type": k.RUN_SYSTEM_EVENT,
        "fail_entry.hardware_entry_failure_reason": k.RUN_FAIL_ENTRY,
    }
    for field, offset in run.items():
        assert header[f"offsetof.kvm_run.{field}"] == offset, field
