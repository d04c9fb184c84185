"""What ACRN's own Service VM kernel (``projectacrn/acrn-kernel``) and ACRN
v3.3 add to the ABI of ``<linux/acrn.h>``, for the ``acrn-kernel`` profile.

Upstream Linux does not have these (it answers ENOTTY), so they are kept out
of :mod:`acrn_hsm_emu.abi`, whose every name is checked against the system
header. Numbers and layouts come from acrn-dm v3.3
(``devicemodel/include/public/hsm_ioctl_defs.h``, ``acrn_common.h``) and the
hypervisor's ``include/public/acrn_common.h``; ``tests/test_acrn_kernel_abi.py``
checks them. docs/acrn-dm.md says which kernel behaviours were read from source.
"""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_uint16, c_uint32, c_uint64

from acrn_hsm_emu.abi import ACRN_IOCTL_TYPE, iow

# ----- structures ---------------------------------------------------------------------


class AcrnPioRes(ctypes.Structure):
    _fields_ = [("port_address", c_uint16), ("size", c_uint16)]


class AcrnPioRegion(ctypes.Structure):
    """``struct acrn_pio_region``: a port range handed to (or taken back from) a VM."""

    _fields_ = [("name", c_char * 8), ("res", AcrnPioRes)]


class AcrnAsyncioInfo(ctypes.Structure):
    """``struct acrn_asyncio_info``: HC_ASYNCIO_ASSIGN/DEASSIGN's argument."""

    _fields_ = [
        ("type", c_uint32),  # ACRN_ASYNCIO_PIO / _MMIO
        ("match_data", c_uint32),
        ("addr", c_uint64),
        ("fd", c_uint64),  # what the hypervisor pushes into the ring (the kernel: an eventfd_ctx)
        ("data", c_uint64),
    ]


class AcrnSbufParam(ctypes.Structure):
    """``struct acrn_sbuf_param``: HC_SETUP_SBUF's argument."""

    _fields_ = [
        ("cpu_id", c_uint16),
        ("reserved", c_uint16),
        ("sbuf_id", c_uint32),
        ("gpa", c_uint64),
    ]


class SharedBufHeader(ctypes.Structure):
    """``struct shared_buf``: the 64-byte head of a ring page (hypervisor v3.3 layout)."""

    _fields_ = [
        ("magic", c_uint64),
        ("ele_num", c_uint32),
        ("ele_size", c_uint32),
        ("head", c_uint32),  # offset from the data start: where the reader reads
        ("tail", c_uint32),  # where the writer writes
        ("flags", c_uint32),
        ("reserved", c_uint32),
        ("overrun_cnt", c_uint32),
        ("size", c_uint32),  # ele_num * ele_size
        ("padding", c_uint32 * 6),
    ]


class VmEvent(ctypes.Structure):
    """``struct vm_event``: one element of the VM event ring."""

    _fields_ = [("type", c_uint32), ("event_data", ctypes.c_uint8 * 28)]


class RtcChangeEventData(ctypes.Structure):
    """``struct rtc_change_event_data``: VM_EVENT_RTC_CHG's payload."""

    _fields_ = [("last_time", ctypes.c_int64), ("delta_time", ctypes.c_int64)]


# ----- constants ----------------------------------------------------------------------

SBUF_MAGIC = 0x5AA57AA71AA13AA3
SBUF_HEAD_SIZE = 64
SBUF_MAX_SIZE = 1 << 22
OVERRUN_CNT_EN = 1 << 0
OVERWRITE_EN = 1 << 1

# sbuf ids of HC_SETUP_SBUF (enum in acrn_common.h); the first four are per pCPU
ACRN_TRACE, ACRN_HVLOG, ACRN_SEP, ACRN_SOCWATCH = 0, 1, 2, 3
ACRN_ASYNCIO = 64
ACRN_VM_EVENT = 65

ACRN_ASYNCIO_PIO = 0x01
ACRN_ASYNCIO_MMIO = 0x02
ACRN_ASYNCIO_MAX = 64  # descriptors per VM

ACRN_IOEVENTFD_FLAG_ASYNCIO = 0x08

VM_EVENT_RTC_CHG = 0
VM_EVENT_POWEROFF = 1
VM_EVENT_TRIPLE_FAULT = 2
VM_EVENT_NAMES = {VM_EVENT_RTC_CHG: "rtc_change", VM_EVENT_POWEROFF: "poweroff",
                  VM_EVENT_TRIPLE_FAULT: "triple_fault"}  # fmt: skip

ACRN_INVALID_CPUID = 0xFFFF

# Virtual PM1a control register of a post-launched VM's device model, and the S5
# write the hypervisor synthesises for a triple fault (vm_reset.c, spec hv A.2.7).
VIRTUAL_PM1A_CNT_ADDR = 0x404
VIRTUAL_PM1A_SLP_EN = 1 << 13
S5_WRITE = VIRTUAL_PM1A_SLP_EN | 5 << 10  # 0x3400

# ----- hypercalls (acrn_hv_defs.h) -----------------------------------------------------

HC_ASYNCIO_ASSIGN = 0x80000032
HC_ASYNCIO_DEASSIGN = 0x80000033
HC_SETUP_SBUF = 0x80000044
HC_ASSIGN_PIO_REGION = 0x8000005B
HC_DEASSIGN_PIO_REGION = 0x8000005C

# ----- ioctls (hsm_ioctl_defs.h) ---------------------------------------------------------

_T = ACRN_IOCTL_TYPE
ACRN_IOCTL_ASSIGN_PIO_REGION = iow(_T, 0x5B, ctypes.sizeof(AcrnPioRegion))
ACRN_IOCTL_DEASSIGN_PIO_REGION = iow(_T, 0x5C, ctypes.sizeof(AcrnPioRegion))
# The argument is the ring page's address itself (_IOW of a __u64).
ACRN_IOCTL_SETUP_ASYNCIO = iow(_T, 0x90, ctypes.sizeof(c_uint64))
ACRN_IOCTL_SETUP_VM_EVENT_RING = iow(_T, 0xA0, ctypes.sizeof(c_uint64))
# The argument is the eventfd number itself (_IOW of an int).
ACRN_IOCTL_SETUP_VM_EVENT_FD = iow(_T, 0xA1, ctypes.sizeof(ctypes.c_int))
del _T

IOCTL_NAMES: dict[int, str] = {
    ACRN_IOCTL_ASSIGN_PIO_REGION: "ACRN_IOCTL_ASSIGN_PIO_REGION",
    ACRN_IOCTL_DEASSIGN_PIO_REGION: "ACRN_IOCTL_DEASSIGN_PIO_REGION",
    ACRN_IOCTL_SETUP_ASYNCIO: "ACRN_IOCTL_SETUP_ASYNCIO",
    ACRN_IOCTL_SETUP_VM_EVENT_RING: "ACRN_IOCTL_SETUP_VM_EVENT_RING",
    ACRN_IOCTL_SETUP_VM_EVENT_FD: "ACRN_IOCTL_SETUP_VM_EVENT_FD",
}
