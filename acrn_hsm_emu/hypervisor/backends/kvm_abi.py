"""The slice of the KVM userspace API (``<linux/kvm.h>``, x86-64) the kvm backend uses.

Layouts and ioctl numbers are written from the header's definitions (facts,
not code) and checked against the installed header by a compiled test
(``tests/test_kvm_abi.py`` with ``tests/clients/kvm_abi_dump.c``). Structs the
backend only saves and restores whole (FPU, LAPIC, XCRS, ...) are handled as
opaque byte images of the right size.
"""

from __future__ import annotations

import ctypes
import fcntl
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64

from cdev.ioctl import io, ior, iow, iowr

KVMIO = 0xAE
KVM_API_VERSION = 12

def _io(nr: int) -> int:
    return io(KVMIO, nr)


def _ior(nr: int, size: int) -> int:
    return ior(KVMIO, nr, size)


def _iow(nr: int, size: int) -> int:
    return iow(KVMIO, nr, size)


def _iowr(nr: int, size: int) -> int:
    return iowr(KVMIO, nr, size)


class KvmRegs(ctypes.Structure):
    """struct kvm_regs (144 B)."""

    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class KvmSegment(ctypes.Structure):
    """struct kvm_segment (24 B): a segment register with its hidden part."""

    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    """struct kvm_dtable (16 B): GDTR/IDTR."""

    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    """struct kvm_sregs (312 B)."""

    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * 4),
    ]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region (32 B)."""

    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class KvmCpuidEntry2(ctypes.Structure):
    """struct kvm_cpuid_entry2 (40 B)."""

    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class KvmMsi(ctypes.Structure):
    """struct kvm_msi (32 B)."""

    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("flags", c_uint32),
        ("devid", c_uint32),
        ("pad", c_uint8 * 12),
    ]


class KvmIrqLevel(ctypes.Structure):
    """struct kvm_irq_level (8 B)."""

    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class KvmIrqRoutingEntry(ctypes.Structure):
    """struct kvm_irq_routing_entry (48 B), irqchip flavour of the union."""

    _fields_ = [
        ("gsi", c_uint32),
        ("type", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32),
        ("irqchip", c_uint32),
        ("pin", c_uint32),
        ("upad", c_uint32 * 6),
    ]


class KvmMsrEntry(ctypes.Structure):
    """struct kvm_msr_entry (16 B)."""

    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


# Sizes of the structs handled as opaque images (checked by the compiled test).
SIZEOF_KVM_FPU = 416
SIZEOF_KVM_LAPIC_STATE = 1024
SIZEOF_KVM_XCRS = 392
SIZEOF_KVM_VCPU_EVENTS = 64
SIZEOF_KVM_DEBUGREGS = 128
SIZEOF_KVM_MP_STATE = 4
SIZEOF_KVM_IRQCHIP = 520
SIZEOF_KVM_CPUID2_HEADER = 8  # u32 nent, u32 padding, then the entries
SIZEOF_KVM_MSRS_HEADER = 8  # u32 nmsrs, u32 pad
SIZEOF_KVM_MSR_LIST_HEADER = 4  # u32 nmsrs, then u32 indices
SIZEOF_KVM_IRQ_ROUTING_HEADER = 8  # u32 nr, u32 flags
SIZEOF_KVM_SIGNAL_MASK_HEADER = 4  # u32 len, then the sigset bytes

# system ioctls (/dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, SIZEOF_KVM_MSR_LIST_HEADER)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, SIZEOF_KVM_CPUID2_HEADER)
# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, ctypes.sizeof(KvmIrqLevel))
KVM_GET_IRQCHIP = _iowr(0x62, SIZEOF_KVM_IRQCHIP)
KVM_SET_IRQCHIP = _ior(0x63, SIZEOF_KVM_IRQCHIP)
KVM_SET_GSI_ROUTING = _iow(0x6A, SIZEOF_KVM_IRQ_ROUTING_HEADER)
KVM_SIGNAL_MSI = _iow(0xA5, ctypes.sizeof(KvmMsi))
KVM_SET_BOOT_CPU_ID = _io(0x78)
# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(KvmSregs))
KVM_GET_MSRS = _iowr(0x88, SIZEOF_KVM_MSRS_HEADER)
KVM_SET_MSRS = _iow(0x89, SIZEOF_KVM_MSRS_HEADER)
KVM_SET_SIGNAL_MASK = _iow(0x8B, SIZEOF_KVM_SIGNAL_MASK_HEADER)
KVM_GET_FPU = _ior(0x8C, SIZEOF_KVM_FPU)
KVM_SET_FPU = _iow(0x8D, SIZEOF_KVM_FPU)
KVM_GET_LAPIC = _ior(0x8E, SIZEOF_KVM_LAPIC_STATE)
KVM_SET_LAPIC = _iow(0x8F, SIZEOF_KVM_LAPIC_STATE)
KVM_SET_CPUID2 = _iow(0x90, SIZEOF_KVM_CPUID2_HEADER)
KVM_GET_MP_STATE = _ior(0x98, SIZEOF_KVM_MP_STATE)
KVM_SET_MP_STATE = _iow(0x99, SIZEOF_KVM_MP_STATE)
KVM_GET_VCPU_EVENTS = _ior(0x9F, SIZEOF_KVM_VCPU_EVENTS)
KVM_SET_VCPU_EVENTS = _iow(0xA0, SIZEOF_KVM_VCPU_EVENTS)
KVM_GET_DEBUGREGS = _ior(0xA1, SIZEOF_KVM_DEBUGREGS)
KVM_SET_DEBUGREGS = _iow(0xA2, SIZEOF_KVM_DEBUGREGS)
KVM_GET_XCRS = _ior(0xA6, SIZEOF_KVM_XCRS)
KVM_SET_XCRS = _iow(0xA7, SIZEOF_KVM_XCRS)

IOCTL_NAMES = (
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_MSR_INDEX_LIST", "KVM_CHECK_EXTENSION",
    "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU",
    "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR",
    "KVM_CREATE_IRQCHIP", "KVM_IRQ_LINE", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP",
    "KVM_SET_GSI_ROUTING", "KVM_SIGNAL_MSI", "KVM_SET_BOOT_CPU_ID", "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS",
    "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_GET_MSRS", "KVM_SET_MSRS", "KVM_SET_SIGNAL_MASK",
    "KVM_GET_FPU", "KVM_SET_FPU", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_SET_CPUID2",
    "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS",
    "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", "KVM_GET_XCRS", "KVM_SET_XCRS",
)  # fmt: skip

# capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_SET_BOOT_CPU_ID = 34
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_XCRS = 56
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MAX_VCPU_ID = 128

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
EXIT_NAMES = {
    v: k[len("KVM_EXIT_") :].lower()
    for k, v in dict(globals()).items()
    if k.startswith("KVM_EXIT_") and isinstance(v, int)
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_MEM_READONLY = 1 << 1

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_IOAPIC_NUM_PINS = 24

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1

# struct kvm_run: the offsets the run loop reads and writes.
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_UNION = 32
RUN_IO = RUN_UNION  # u8 direction, u8 size, u16 port, u32 count, u64 data_offset
RUN_MMIO = RUN_UNION  # u64 phys_addr, u8 data[8], u32 len, u8 is_write
RUN_MMIO_DATA = RUN_UNION + 8
RUN_INTERNAL = RUN_UNION  # u32 suberror, u32 ndata, u64 data[16]
RUN_SYSTEM_EVENT = RUN_UNION  # u32 type, u32 ndata, u64 data[16]
RUN_FAIL_ENTRY = RUN_UNION  # u64 hardware_entry_failure_reason, u32 cpu


def ioctl(fd: int, request: int, arg: int | bytes | bytearray | ctypes.Structure = 0) -> int:
    """``ioctl(2)`` with the GIL released (``fcntl.ioctl``): its return value, or OSError.

    A buffer argument is passed mutable, so the kernel's writes land in it
    (give a ``bytearray`` or a ctypes struct to read them). An integer is passed as a C int, as
    fcntl does: values above INT_MAX go in two's complement, which the
    kernel's truncation of the 32-bit addresses used here undoes.
    """
    if isinstance(arg, int):
        if arg > 0x7FFFFFFF:
            arg -= 1 << 32
        return fcntl.ioctl(fd, request, arg)
    if isinstance(arg, bytes):
        arg = bytearray(arg)
    return fcntl.ioctl(fd, request, arg, True)
