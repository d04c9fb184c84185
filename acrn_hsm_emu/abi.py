"""Binary interface of ``/dev/acrn_hsm``: the layouts and numbers of ``<linux/acrn.h>``.

Everything here mirrors the uapi header (6.1 variant, x86-64) byte for byte:
ctypes structures with the header's field names, the ``#define`` constants,
and the ioctl numbers computed from the structure sizes with Linux's x86
``_IOC`` encoding. ``tests/test_abi.py`` compiles a C program against the
system header and compares every size, offset, constant and ioctl number
with this module, so a wrong offset here fails the test suite.

A second part holds hypervisor-side facts the uapi does not carry but the
emulator needs: hypercall ids, the CPUID leaves, ``GUEST_FLAG_*`` bits,
``acrn_irqline_ops``, ``acrn_intr_monitor`` and the HSM's memory-region
batch (spec: hsm sections 4, 5, 9, 10, 11; hv A.1.1, A.2.2, A.3, A.4, A.5).

Every structure is a plain ctypes type: build one with ``Cls()``, parse with
``Cls.from_buffer_copy(data)`` / ``Cls.from_buffer(bytearray)``, serialise
with ``bytes(obj)``.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    c_int32,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_ulong,
    sizeof,
)

from cdev.ioctl import (  # noqa: F401  (the _IOC encoding, re-exported)
    IOC_DIRBITS,
    IOC_DIRSHIFT,
    IOC_NONE,
    IOC_NRBITS,
    IOC_NRSHIFT,
    IOC_READ,
    IOC_SIZEBITS,
    IOC_SIZESHIFT,
    IOC_TYPEBITS,
    IOC_TYPESHIFT,
    IOC_WRITE,
    io,
    ioc,
    ioc_dir,
    ioc_nr,
    ioc_size,
    ioc_type,
    ior,
    iow,
    iowr,
)

# ---------------------------------------------------------------------------
# uapi constants
# ---------------------------------------------------------------------------

ACRN_IO_REQUEST_MAX = 16  # slots in the shared page, one per vCPU

ACRN_IOREQ_STATE_PENDING = 0
ACRN_IOREQ_STATE_COMPLETE = 1
ACRN_IOREQ_STATE_PROCESSING = 2
ACRN_IOREQ_STATE_FREE = 3

ACRN_IOREQ_TYPE_PORTIO = 0
ACRN_IOREQ_TYPE_MMIO = 1
ACRN_IOREQ_TYPE_PCICFG = 2

ACRN_IOREQ_DIR_READ = 0
ACRN_IOREQ_DIR_WRITE = 1

ACRN_MEM_ACCESS_RIGHT_MASK = 0x00000007
ACRN_MEM_ACCESS_READ = 0x00000001
ACRN_MEM_ACCESS_WRITE = 0x00000002
ACRN_MEM_ACCESS_EXEC = 0x00000004
ACRN_MEM_ACCESS_RWX = ACRN_MEM_ACCESS_READ | ACRN_MEM_ACCESS_WRITE | ACRN_MEM_ACCESS_EXEC

ACRN_MEM_TYPE_MASK = 0x000007C0
ACRN_MEM_TYPE_WB = 0x00000040
ACRN_MEM_TYPE_WT = 0x00000080
ACRN_MEM_TYPE_UC = 0x00000100
ACRN_MEM_TYPE_WC = 0x00000200
ACRN_MEM_TYPE_WP = 0x00000400

ACRN_MEMMAP_RAM = 0
ACRN_MEMMAP_MMIO = 1

ACRN_PTDEV_IRQ_INTX = 0
ACRN_PTDEV_IRQ_MSI = 1
ACRN_PTDEV_IRQ_MSIX = 2

ACRN_PTDEV_QUIRK_ASSIGN = 1 << 0

ACRN_MMIODEV_RES_NUM = 3
ACRN_PCI_NUM_BARS = 6

PMCMD_TYPE_MASK = 0x000000FF
# enum acrn_pm_cmd_type
ACRN_PMCMD_GET_PX_CNT = 0
ACRN_PMCMD_GET_PX_DATA = 1
ACRN_PMCMD_GET_CX_CNT = 2
ACRN_PMCMD_GET_CX_DATA = 3

ACRN_IOEVENTFD_FLAG_PIO = 0x01
ACRN_IOEVENTFD_FLAG_DATAMATCH = 0x02
ACRN_IOEVENTFD_FLAG_DEASSIGN = 0x04

ACRN_IRQFD_FLAG_DEASSIGN = 0x01

ACRN_IOCTL_TYPE = 0xA2

# Not in the uapi but part of the driver's observable contract (acrn_drv.h).
ACRN_INVALID_VMID = 0xFFFF  # vmid of an open file without a VM
ACRN_MEM_MAPPING_MAX = 256  # RAM SET_MEMSEGs per VM before ENOMEM


# ---------------------------------------------------------------------------
# uapi structures
# ---------------------------------------------------------------------------


class AcrnMmioRequest(ctypes.LittleEndianStructure):
    """struct acrn_mmio_request (32 B): the MMIO view of ``acrn_io_request.reqs``."""

    _fields_ = [
        ("direction", c_uint32),
        ("reserved", c_uint32),
        ("address", c_uint64),
        ("size", c_uint64),
        ("value", c_uint64),
    ]


class AcrnPioRequest(ctypes.LittleEndianStructure):
    """struct acrn_pio_request (32 B incl. tail padding): the port I/O view."""

    _fields_ = [
        ("direction", c_uint32),
        ("reserved", c_uint32),
        ("address", c_uint64),
        ("size", c_uint64),
        ("value", c_uint32),
    ]


class AcrnPciRequest(ctypes.LittleEndianStructure):
    """struct acrn_pci_request (48 B): PCICFG view; size/value sit where PIO has them."""

    _fields_ = [
        ("direction", c_uint32),
        ("reserved", c_uint32 * 3),
        ("size", c_uint64),
        ("value", c_uint32),
        ("bus", c_uint32),
        ("dev", c_uint32),
        ("func", c_uint32),
        ("reg", c_uint32),
    ]


class AcrnIoRequestReqs(ctypes.LittleEndianUnion):
    """The 64-byte ``reqs`` union of struct acrn_io_request."""

    _fields_ = [
        ("pio_request", AcrnPioRequest),
        ("pci_request", AcrnPciRequest),
        ("mmio_request", AcrnMmioRequest),
        ("data", c_uint64 * 8),
    ]


class AcrnIoRequest(ctypes.LittleEndianStructure):
    """struct acrn_io_request: one 256-byte slot (C: ``__attribute__((aligned(256)))``).

    ctypes (3.11) cannot express the 256-byte alignment, so the slot is padded
    to 256 bytes explicitly with ``_pad``; the C struct's own tail padding is
    the same bytes. Only its use inside AcrnIoRequestBuffer depends on it.
    """

    _fields_ = [
        ("type", c_uint32),
        ("completion_polling", c_uint32),
        ("reserved0", c_uint32 * 14),
        ("reqs", AcrnIoRequestReqs),
        ("reserved1", c_uint32),
        ("kernel_handled", c_uint32),
        ("processed", c_uint32),
        ("_pad", c_uint8 * 116),  # tail padding up to the 256-byte alignment
    ]


class _AcrnIoRequestBufferU(ctypes.LittleEndianUnion):
    """Anonymous union of struct acrn_io_request_buffer."""

    _fields_ = [
        ("req_slot", AcrnIoRequest * ACRN_IO_REQUEST_MAX),
        ("reserved", c_uint8 * 4096),
    ]


class AcrnIoRequestBuffer(ctypes.LittleEndianStructure):
    """struct acrn_io_request_buffer: the whole 4 KiB request page."""

    _anonymous_ = ("_u",)
    _fields_ = [("_u", _AcrnIoRequestBufferU)]


class AcrnIoreqNotify(ctypes.LittleEndianStructure):
    """struct acrn_ioreq_notify (NOTIFY_REQUEST_FINISH argument, 8 B)."""

    _fields_ = [
        ("vmid", c_uint16),
        ("reserved", c_uint16),
        ("vcpu", c_uint32),
    ]


class AcrnVmCreation(ctypes.LittleEndianStructure):
    """struct acrn_vm_creation (CREATE_VM argument, 48 B, written back whole).

    ``uuid`` is ``guid_t`` in the 6.1 header and ``__u8[16]`` in newer ones;
    same bytes either way (ACRN >= 2.7 reads a VM name there).
    """

    _fields_ = [
        ("vmid", c_uint16),
        ("reserved0", c_uint16),
        ("vcpu_num", c_uint16),
        ("reserved1", c_uint16),
        ("uuid", c_uint8 * 16),
        ("vm_flag", c_uint64),
        ("ioreq_buf", c_uint64),
        ("cpu_affinity", c_uint64),
    ]


class AcrnGpRegs(ctypes.LittleEndianStructure):
    """struct acrn_gp_regs: the 16 general registers, VM-exit index order."""

    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        )
    ]  # fmt: skip


class AcrnDescriptorPtr(ctypes.LittleEndianStructure):
    """struct acrn_descriptor_ptr (packed, 16 B): GDTR/IDTR image."""

    _pack_ = 1  # the header marks it __attribute__((packed)): base sits at offset 2
    _layout_ = "ms"  # Python >= 3.14 wants this with _pack_; ignored by older ones
    _fields_ = [
        ("limit", c_uint16),
        ("base", c_uint64),
        ("reserved", c_uint16 * 3),
    ]


class AcrnRegs(ctypes.LittleEndianStructure):
    """struct acrn_regs (288 B)."""

    _fields_ = [
        ("gprs", AcrnGpRegs),
        ("gdt", AcrnDescriptorPtr),
        ("idt", AcrnDescriptorPtr),
        ("rip", c_uint64),
        ("cs_base", c_uint64),
        ("cr0", c_uint64),
        ("cr4", c_uint64),
        ("cr3", c_uint64),
        ("ia32_efer", c_uint64),
        ("rflags", c_uint64),
        ("reserved_64", c_uint64 * 4),
        ("cs_ar", c_uint32),
        ("cs_limit", c_uint32),
        ("reserved_32", c_uint32 * 3),
        ("cs_sel", c_uint16),
        ("ss_sel", c_uint16),
        ("ds_sel", c_uint16),
        ("es_sel", c_uint16),
        ("fs_sel", c_uint16),
        ("gs_sel", c_uint16),
        ("ldt_sel", c_uint16),
        ("tr_sel", c_uint16),
    ]


class AcrnVcpuRegs(ctypes.LittleEndianStructure):
    """struct acrn_vcpu_regs (SET_VCPU_REGS argument, 296 B)."""

    _fields_ = [
        ("vcpu_id", c_uint16),
        ("reserved", c_uint16 * 3),
        ("vcpu_regs", AcrnRegs),
    ]


class _AcrnVmMemmapU(ctypes.LittleEndianUnion):
    """Anonymous union of struct acrn_vm_memmap: MMIO host PA or RAM user VA."""

    _fields_ = [
        ("service_vm_pa", c_uint64),
        ("vma_base", c_uint64),
    ]


class AcrnVmMemmap(ctypes.LittleEndianStructure):
    """struct acrn_vm_memmap (SET/UNSET_MEMSEG argument, 32 B)."""

    _anonymous_ = ("_u",)
    _fields_ = [
        ("type", c_uint32),
        ("attr", c_uint32),
        ("user_vm_pa", c_uint64),
        ("_u", _AcrnVmMemmapU),
        ("len", c_uint64),
    ]


class AcrnPtdevIrqIntx(ctypes.LittleEndianStructure):
    """The ``intx`` member of struct acrn_ptdev_irq."""

    _fields_ = [
        ("virt_pin", c_uint32),
        ("phys_pin", c_uint32),
        ("is_pic_pin", c_uint32),
    ]


class AcrnPtdevIrq(ctypes.LittleEndianStructure):
    """struct acrn_ptdev_irq (SET/RESET_PTDEV_INTR argument, 20 B)."""

    _fields_ = [
        ("type", c_uint32),
        ("virt_bdf", c_uint16),
        ("phys_bdf", c_uint16),
        ("intx", AcrnPtdevIrqIntx),
    ]


class AcrnPcidev(ctypes.LittleEndianStructure):
    """struct acrn_pcidev (ASSIGN/DEASSIGN_PCIDEV argument, 36 B)."""

    _fields_ = [
        ("type", c_uint32),
        ("virt_bdf", c_uint16),
        ("phys_bdf", c_uint16),
        ("intr_line", c_uint8),
        ("intr_pin", c_uint8),
        ("bar", c_uint32 * ACRN_PCI_NUM_BARS),
    ]


class AcrnMmiodevRes(ctypes.LittleEndianStructure):
    """One element of ``acrn_mmiodev.res``."""

    _fields_ = [
        ("user_vm_pa", c_uint64),
        ("service_vm_pa", c_uint64),
        ("size", c_uint64),
        ("mem_type", c_uint64),
    ]


class AcrnMmiodev(ctypes.LittleEndianStructure):
    """struct acrn_mmiodev (ASSIGN/DEASSIGN_MMIODEV argument, 104 B)."""

    _fields_ = [
        ("name", c_uint8 * 8),
        ("res", AcrnMmiodevRes * ACRN_MMIODEV_RES_NUM),
    ]


class AcrnVdevIdFields(ctypes.LittleEndianStructure):
    """``acrn_vdev.id.fields``: PCI vendor/device, or a legacy device number."""

    _fields_ = [
        ("vendor", c_uint16),
        ("device", c_uint16),
        ("legacy_id", c_uint32),
    ]


class AcrnVdevId(ctypes.LittleEndianUnion):
    """``acrn_vdev.id``."""

    _fields_ = [
        ("value", c_uint64),
        ("fields", AcrnVdevIdFields),
    ]


class AcrnVdev(ctypes.LittleEndianStructure):
    """struct acrn_vdev (CREATE/DESTROY_VDEV argument, 192 B)."""

    _fields_ = [
        ("id", AcrnVdevId),
        ("slot", c_uint64),
        ("io_addr", c_uint32 * ACRN_PCI_NUM_BARS),
        ("io_size", c_uint32 * ACRN_PCI_NUM_BARS),
        ("args", c_uint8 * 128),
    ]


class AcrnMsiEntry(ctypes.LittleEndianStructure):
    """struct acrn_msi_entry (INJECT_MSI argument, also inside acrn_irqfd)."""

    _fields_ = [
        ("msi_addr", c_uint64),
        ("msi_data", c_uint64),
    ]


class AcrnAcpiGenericAddress(ctypes.LittleEndianStructure):
    """struct acrn_acpi_generic_address (packed, 12 B)."""

    _pack_ = 1  # packed in the header: address at offset 4, size 12
    _layout_ = "ms"
    _fields_ = [
        ("space_id", c_uint8),
        ("bit_width", c_uint8),
        ("bit_offset", c_uint8),
        ("access_size", c_uint8),
        ("address", c_uint64),
    ]


class AcrnCstateData(ctypes.LittleEndianStructure):
    """struct acrn_cstate_data (PM CX_DATA result, 32 B)."""

    _fields_ = [
        ("cx_reg", AcrnAcpiGenericAddress),
        ("type", c_uint8),
        ("latency", c_uint32),
        ("power", c_uint64),
    ]


class AcrnPstateData(ctypes.LittleEndianStructure):
    """struct acrn_pstate_data (PM PX_DATA result, 48 B)."""

    _fields_ = [
        ("core_frequency", c_uint64),
        ("power", c_uint64),
        ("transition_latency", c_uint64),
        ("bus_master_latency", c_uint64),
        ("control", c_uint64),
        ("status", c_uint64),
    ]


class AcrnIoeventfd(ctypes.LittleEndianStructure):
    """struct acrn_ioeventfd (IOEVENTFD argument, 32 B)."""

    _fields_ = [
        ("fd", c_uint32),
        ("flags", c_uint32),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("reserved", c_uint32),
        ("data", c_uint64),
    ]


class AcrnIrqfd(ctypes.LittleEndianStructure):
    """struct acrn_irqfd (IRQFD argument, 24 B); note ``fd`` is signed here."""

    _fields_ = [
        ("fd", c_int32),
        ("flags", c_uint32),
        ("msi", AcrnMsiEntry),
    ]


# C name -> class, for tools and the ABI test.
UAPI_STRUCTS: dict[str, type[ctypes.Structure] | type[ctypes.Union]] = {
    "acrn_mmio_request": AcrnMmioRequest,
    "acrn_pio_request": AcrnPioRequest,
    "acrn_pci_request": AcrnPciRequest,
    "acrn_io_request": AcrnIoRequest,
    "acrn_io_request_buffer": AcrnIoRequestBuffer,
    "acrn_ioreq_notify": AcrnIoreqNotify,
    "acrn_vm_creation": AcrnVmCreation,
    "acrn_gp_regs": AcrnGpRegs,
    "acrn_descriptor_ptr": AcrnDescriptorPtr,
    "acrn_regs": AcrnRegs,
    "acrn_vcpu_regs": AcrnVcpuRegs,
    "acrn_vm_memmap": AcrnVmMemmap,
    "acrn_ptdev_irq": AcrnPtdevIrq,
    "acrn_pcidev": AcrnPcidev,
    "acrn_mmiodev": AcrnMmiodev,
    "acrn_vdev": AcrnVdev,
    "acrn_msi_entry": AcrnMsiEntry,
    "acrn_acpi_generic_address": AcrnAcpiGenericAddress,
    "acrn_cstate_data": AcrnCstateData,
    "acrn_pstate_data": AcrnPstateData,
    "acrn_ioeventfd": AcrnIoeventfd,
    "acrn_irqfd": AcrnIrqfd,
}

# C alignment where ctypes cannot reproduce it (aligned(256) on the slot and its page).
C_ALIGNMENT_OVERRIDES: dict[str, int] = {"acrn_io_request": 256, "acrn_io_request_buffer": 256}


# ---------------------------------------------------------------------------
# ioctl numbers
# ---------------------------------------------------------------------------

_T = ACRN_IOCTL_TYPE

ACRN_IOCTL_CREATE_VM = iowr(_T, 0x10, sizeof(AcrnVmCreation))
ACRN_IOCTL_DESTROY_VM = io(_T, 0x11)
ACRN_IOCTL_START_VM = io(_T, 0x12)
ACRN_IOCTL_PAUSE_VM = io(_T, 0x13)
ACRN_IOCTL_RESET_VM = io(_T, 0x15)
ACRN_IOCTL_SET_VCPU_REGS = iow(_T, 0x16, sizeof(AcrnVcpuRegs))

ACRN_IOCTL_INJECT_MSI = iow(_T, 0x23, sizeof(AcrnMsiEntry))
# The argument is the monitor page's address itself; the size is sizeof(unsigned long).
ACRN_IOCTL_VM_INTR_MONITOR = iow(_T, 0x24, sizeof(c_ulong))
# The argument is the 64-bit {gsi, op} value itself, not a pointer.
ACRN_IOCTL_SET_IRQLINE = iow(_T, 0x25, sizeof(c_uint64))

ACRN_IOCTL_NOTIFY_REQUEST_FINISH = iow(_T, 0x31, sizeof(AcrnIoreqNotify))
ACRN_IOCTL_CREATE_IOREQ_CLIENT = io(_T, 0x32)
ACRN_IOCTL_ATTACH_IOREQ_CLIENT = io(_T, 0x33)
ACRN_IOCTL_DESTROY_IOREQ_CLIENT = io(_T, 0x34)
ACRN_IOCTL_CLEAR_VM_IOREQ = io(_T, 0x35)

ACRN_IOCTL_SET_MEMSEG = iow(_T, 0x41, sizeof(AcrnVmMemmap))
ACRN_IOCTL_UNSET_MEMSEG = iow(_T, 0x42, sizeof(AcrnVmMemmap))

ACRN_IOCTL_SET_PTDEV_INTR = iow(_T, 0x53, sizeof(AcrnPtdevIrq))
ACRN_IOCTL_RESET_PTDEV_INTR = iow(_T, 0x54, sizeof(AcrnPtdevIrq))
ACRN_IOCTL_ASSIGN_PCIDEV = iow(_T, 0x55, sizeof(AcrnPcidev))
ACRN_IOCTL_DEASSIGN_PCIDEV = iow(_T, 0x56, sizeof(AcrnPcidev))
ACRN_IOCTL_ASSIGN_MMIODEV = iow(_T, 0x57, sizeof(AcrnMmiodev))
ACRN_IOCTL_DEASSIGN_MMIODEV = iow(_T, 0x58, sizeof(AcrnMmiodev))
ACRN_IOCTL_CREATE_VDEV = iow(_T, 0x59, sizeof(AcrnVdev))
ACRN_IOCTL_DESTROY_VDEV = iow(_T, 0x5A, sizeof(AcrnVdev))

# Encoded size 8, but PX/CX DATA results are 48/32 bytes written to the same address.
ACRN_IOCTL_PM_GET_CPU_STATE = iowr(_T, 0x60, sizeof(c_uint64))

ACRN_IOCTL_IOEVENTFD = iow(_T, 0x70, sizeof(AcrnIoeventfd))
ACRN_IOCTL_IRQFD = iow(_T, 0x71, sizeof(AcrnIrqfd))

del _T

# number -> name of every ioctl above (for logs and dispatch tables).
IOCTL_NAMES: dict[int, str] = {
    value: name
    for name, value in sorted(globals().items())
    if name.startswith("ACRN_IOCTL_") and name != "ACRN_IOCTL_TYPE" and isinstance(value, int)
}
if len(IOCTL_NAMES) != 27:  # two names sharing a number would hide one
    raise ImportError("abi: duplicate ioctl numbers")


# ---------------------------------------------------------------------------
# Offsets inside one 256-byte request slot (for raw reads/writes of client memory)
# ---------------------------------------------------------------------------

IOREQ_SLOT_SIZE = sizeof(AcrnIoRequest)
SLOT_TYPE = AcrnIoRequest.type.offset
SLOT_COMPLETION_POLLING = AcrnIoRequest.completion_polling.offset
SLOT_REQS = AcrnIoRequest.reqs.offset
SLOT_DIRECTION = SLOT_REQS + AcrnPioRequest.direction.offset
SLOT_ADDRESS = SLOT_REQS + AcrnPioRequest.address.offset
SLOT_SIZE = SLOT_REQS + AcrnPioRequest.size.offset
SLOT_VALUE = SLOT_REQS + AcrnPioRequest.value.offset  # u32 for PIO/PCI, u64 for MMIO
SLOT_PCI_BUS = SLOT_REQS + AcrnPciRequest.bus.offset
SLOT_PCI_DEV = SLOT_REQS + AcrnPciRequest.dev.offset
SLOT_PCI_FUNC = SLOT_REQS + AcrnPciRequest.func.offset
SLOT_PCI_REG = SLOT_REQS + AcrnPciRequest.reg.offset
SLOT_KERNEL_HANDLED = AcrnIoRequest.kernel_handled.offset
SLOT_PROCESSED = AcrnIoRequest.processed.offset

# The numbers other modules were written against; a layout change must fail loudly.
_SLOT_EXPECTED = {
    "IOREQ_SLOT_SIZE": (IOREQ_SLOT_SIZE, 256),
    "SLOT_TYPE": (SLOT_TYPE, 0),
    "SLOT_COMPLETION_POLLING": (SLOT_COMPLETION_POLLING, 4),
    "SLOT_REQS": (SLOT_REQS, 64),
    "SLOT_DIRECTION": (SLOT_DIRECTION, 64),
    "SLOT_ADDRESS": (SLOT_ADDRESS, 72),
    "SLOT_SIZE": (SLOT_SIZE, 80),
    "SLOT_VALUE": (SLOT_VALUE, 88),
    "SLOT_PCI_BUS": (SLOT_PCI_BUS, 92),
    "SLOT_PCI_DEV": (SLOT_PCI_DEV, 96),
    "SLOT_PCI_FUNC": (SLOT_PCI_FUNC, 100),
    "SLOT_PCI_REG": (SLOT_PCI_REG, 104),
    "SLOT_KERNEL_HANDLED": (SLOT_KERNEL_HANDLED, 132),
    "SLOT_PROCESSED": (SLOT_PROCESSED, 136),
}
for _name, (_got, _want) in _SLOT_EXPECTED.items():
    if _got != _want:
        raise ImportError(f"abi: {_name} is {_got}, expected {_want}")
# The PCI view must keep size/value where PIO has them (hv post-processing relies on it).
if (AcrnPciRequest.size.offset, AcrnPciRequest.value.offset) != (
    AcrnPioRequest.size.offset,
    AcrnPioRequest.value.offset,
):
    raise ImportError("abi: acrn_pci_request no longer overlays acrn_pio_request")
if sizeof(AcrnIoRequestBuffer) != 4096 or sizeof(AcrnIoRequestReqs) != 64:
    raise ImportError("abi: request page or reqs union has the wrong size")
del _name, _got, _want


# ---------------------------------------------------------------------------
# Hypervisor side (not in the uapi): hypercall ids, spec hsm 9 / hv A.1.1
# ---------------------------------------------------------------------------

HC_ID_BASE = 0x80 << 24  # ACRN hypercall ids are 0x80000000 | index

HC_GET_API_VERSION = HC_ID_BASE | 0x00
HC_SOS_REMOVE_CPU = HC_ID_BASE | 0x01  # ACRN: HC_SERVICE_VM_OFFLINE_CPU
HC_CREATE_VM = HC_ID_BASE | 0x10
HC_DESTROY_VM = HC_ID_BASE | 0x11
HC_START_VM = HC_ID_BASE | 0x12
HC_PAUSE_VM = HC_ID_BASE | 0x13
HC_RESET_VM = HC_ID_BASE | 0x15
HC_SET_VCPU_REGS = HC_ID_BASE | 0x16
HC_INJECT_MSI = HC_ID_BASE | 0x23
HC_VM_INTR_MONITOR = HC_ID_BASE | 0x24
HC_SET_IRQLINE = HC_ID_BASE | 0x25
HC_SET_IOREQ_BUFFER = HC_ID_BASE | 0x30
HC_NOTIFY_REQUEST_FINISH = HC_ID_BASE | 0x31
HC_VM_SET_MEMORY_REGIONS = HC_ID_BASE | 0x42
HC_SET_PTDEV_INTR = HC_ID_BASE | 0x53  # ACRN: HC_SET_PTDEV_INTR_INFO
HC_RESET_PTDEV_INTR = HC_ID_BASE | 0x54  # ACRN: HC_RESET_PTDEV_INTR_INFO
HC_ASSIGN_PCIDEV = HC_ID_BASE | 0x55
HC_DEASSIGN_PCIDEV = HC_ID_BASE | 0x56
HC_ASSIGN_MMIODEV = HC_ID_BASE | 0x57
HC_DEASSIGN_MMIODEV = HC_ID_BASE | 0x58
HC_CREATE_VDEV = HC_ID_BASE | 0x59  # ACRN: HC_ADD_VDEV
HC_DESTROY_VDEV = HC_ID_BASE | 0x5A  # ACRN: HC_REMOVE_VDEV
HC_PM_GET_CPU_STATE = HC_ID_BASE | 0x80

# id -> name, for logs and the status command.
HYPERCALL_NAMES: dict[int, str] = {
    value: name
    for name, value in sorted(globals().items())
    if name.startswith("HC_") and name != "HC_ID_BASE" and isinstance(value, int)
}

# Hypervisor-only request type: a write to an EPT write-protected page (hv A.2.2).
ACRN_IOREQ_TYPE_WP = 3

# ---------------------------------------------------------------------------
# CPUID (spec hsm 10, hv A.3)
# ---------------------------------------------------------------------------

ACRN_CPUID_SIGNATURE_LEAF = 0x40000000  # EAX = highest leaf, EBX=ECX=EDX = "ACRN"
ACRN_CPUID_FEATURES_LEAF = 0x40000001  # EAX bit 0 = privileged (Service) VM
ACRN_CPUID_TIMING_LEAF = 0x40000010  # EAX = TSC frequency in kHz
ACRN_SIGNATURE_REG = 0x4E524341  # b"ACRN" read as a little-endian u32
ACRN_FEATURE_PRIVILEGED_VM = 1 << 0

# ---------------------------------------------------------------------------
# GUEST_FLAG_* (vm_flag of acrn_vm_creation; ACRN hypervisor/include/public/acrn_common.h)
# ---------------------------------------------------------------------------

GUEST_FLAG_SECURE_WORLD_ENABLED = 1 << 0
GUEST_FLAG_LAPIC_PASSTHROUGH = 1 << 1
GUEST_FLAG_IO_COMPLETION_POLLING = 1 << 2  # vCPU polls for COMPLETE; HSM skips the notify hypercall
GUEST_FLAG_HIDE_MTRR = 1 << 3
GUEST_FLAG_RT = 1 << 4
GUEST_FLAG_NVMX_ENABLED = 1 << 5
GUEST_FLAG_SECURITY_VM = 1 << 6
GUEST_FLAG_VCAT_ENABLED = 1 << 7
GUEST_FLAG_STATIC_VM = 1 << 8
GUEST_FLAG_TEE = 1 << 9
GUEST_FLAG_REE = 1 << 10
GUEST_FLAG_PMU_PASSTHROUGH = 1 << 11
GUEST_FLAG_VHWP = 1 << 12  # PX_CNT answers 0 instead of failing (hv A.4)
GUEST_FLAG_VTM = 1 << 13

# Bits CREATE_VM may set; the rest come from the static VM config (hv A.5, vm_config.h).
DM_OWNED_GUEST_FLAG_MASK = (
    GUEST_FLAG_SECURE_WORLD_ENABLED
    | GUEST_FLAG_LAPIC_PASSTHROUGH
    | GUEST_FLAG_RT
    | GUEST_FLAG_IO_COMPLETION_POLLING
)
DM_OWNED_GUEST_FLAG_MASK_DEBUG = (
    DM_OWNED_GUEST_FLAG_MASK | GUEST_FLAG_PMU_PASSTHROUGH
)  # debug builds

# ---------------------------------------------------------------------------
# PM command word (acrn_common.h PMCMD_*; hsm 4.1, hv A.4)
# ---------------------------------------------------------------------------

PMCMD_VMID_MASK = 0xFF000000
PMCMD_VCPUID_MASK = 0x00FF0000
PMCMD_STATE_NUM_MASK = 0x0000FF00
PMCMD_VMID_SHIFT = 24
PMCMD_VCPUID_SHIFT = 16
PMCMD_STATE_NUM_SHIFT = 8

# ---------------------------------------------------------------------------
# SET_IRQLINE value: struct acrn_irqline_ops (hv B.1.2)
# ---------------------------------------------------------------------------

IRQ_SET_HIGH = 0
IRQ_SET_LOW = 1
IRQ_RAISING_PULSE = 2
IRQ_FALLING_PULSE = 3


class AcrnIrqlineOps(ctypes.LittleEndianStructure):
    """struct acrn_irqline_ops: SET_IRQLINE's 64-bit argument value, reinterpreted."""

    _fields_ = [
        ("gsi", c_uint32),
        ("op", c_uint32),
    ]


# ---------------------------------------------------------------------------
# VM_INTR_MONITOR page: struct acrn_intr_monitor (hv A.4)
# ---------------------------------------------------------------------------

MAX_PTDEV_NUM = 24
INTR_CMD_GET_DATA = 0  # write [phys irq, count] pairs, buf_cnt = words written
INTR_CMD_DELAY_INT = 1  # buffer[0] = injection delay in ms (0 cancels)


class AcrnIntrMonitor(ctypes.LittleEndianStructure):
    """struct acrn_intr_monitor (392 B) at the start of the monitor page."""

    _fields_ = [
        ("cmd", c_uint32),
        ("buf_cnt", c_uint32),
        ("buffer", c_uint64 * (MAX_PTDEV_NUM * 2)),
    ]


# ---------------------------------------------------------------------------
# HC_VM_SET_MEMORY_REGIONS batch (spec hsm 5; acrn_drv.h in the kernel)
# ---------------------------------------------------------------------------

MR_ADD = 0
MR_DEL = 2  # the hypervisor deletes for any type other than MR_ADD


class VmMemoryRegionOp(ctypes.LittleEndianStructure):
    """struct vm_memory_region_op (32 B): one EPT add/delete."""

    _fields_ = [
        ("type", c_uint32),
        ("attr", c_uint32),
        ("user_vm_pa", c_uint64),
        ("service_vm_pa", c_uint64),
        ("size", c_uint64),
    ]


class VmMemoryRegionBatch(ctypes.LittleEndianStructure):
    """struct vm_memory_region_batch header (24 B); ops follow in the same buffer."""

    _fields_ = [
        ("vmid", c_uint16),
        ("reserved", c_uint16 * 3),
        ("regions_num", c_uint32),
        ("regions_gpa", c_uint64),  # natural alignment puts it at 16
    ]


# Hypervisor-side layouts and their sizes from the spec (checked by tests/test_abi.py).
HV_STRUCT_SIZES: dict[type[ctypes.Structure], int] = {
    AcrnIrqlineOps: 8,
    AcrnIntrMonitor: 392,
    VmMemoryRegionOp: 32,
    VmMemoryRegionBatch: 24,
}
for _cls, _size in HV_STRUCT_SIZES.items():
    if sizeof(_cls) != _size:
        raise ImportError(f"abi: {_cls.__name__} is {sizeof(_cls)} bytes, expected {_size}")
del _cls, _size
