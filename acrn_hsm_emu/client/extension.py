"""Python bindings of the extension ABI (``include/acrn_hsm_emu.h``).

Constants, ctypes layouts and ioctl numbers of acrn-hsm-emu's own ioctls
(type byte 0xA3, next to ACRN's 0xA2): bind an open file to an existing VM,
create a range client with its own request page, add and remove ranges;
carry an ACRN ioctl whose argument is a value by pointer (VALUE_CALL).
``tests/test_ext_abi.py`` compiles the C header and checks every number and
offset here against it. Meaning and errno: ``docs/extension-abi.md``.
"""

from __future__ import annotations

import ctypes
import pathlib
from ctypes import c_char, c_int64, c_uint16, c_uint32, c_uint64, sizeof

from acrn_hsm_emu import abi
from cdev.ioctl import io, ior, iow, iowr

ACRN_EMU_IOCTL_TYPE = 0xA3

ACRN_EMU_ABI_MAJOR = 1
ACRN_EMU_ABI_MINOR = 1

ACRN_EMU_FEATURE_BIND = 1 << 0
ACRN_EMU_FEATURE_RANGE_CLIENT = 1 << 1
ACRN_EMU_FEATURE_PCI_RANGES = 1 << 2
ACRN_EMU_FEATURE_VALUE_CALL = 1 << 3
FEATURES = (
    ACRN_EMU_FEATURE_BIND | ACRN_EMU_FEATURE_RANGE_CLIENT | ACRN_EMU_FEATURE_PCI_RANGES
    | ACRN_EMU_FEATURE_VALUE_CALL
)  # fmt: skip

ACRN_EMU_RANGE_PIO = 0
ACRN_EMU_RANGE_MMIO = 1
ACRN_EMU_RANGE_PCI = 2
RANGE_TYPES = {"pio": ACRN_EMU_RANGE_PIO, "mmio": ACRN_EMU_RANGE_MMIO, "pci": ACRN_EMU_RANGE_PCI}
RANGE_NAMES = {v: k for k, v in RANGE_TYPES.items()}

ACRN_EMU_NAME_LEN = 16
ACRN_EMU_MAX_RANGES = 64


def pci_bdf(bus: int, dev: int, func: int) -> int:
    """``ACRN_EMU_PCI_BDF``: the packed bus/device/function of a PCI range end."""
    return (bus & 0xFF) << 8 | (dev & 0x1F) << 3 | (func & 0x7)


class AcrnEmuVersion(ctypes.LittleEndianStructure):
    """struct acrn_emu_version (16 B)."""

    _fields_ = [
        ("major", c_uint32),
        ("minor", c_uint32),
        ("features", c_uint32),
        ("reserved", c_uint32),
    ]


class AcrnEmuBind(ctypes.LittleEndianStructure):
    """struct acrn_emu_bind (16 B)."""

    _fields_ = [
        ("vmid", c_uint16),
        ("vcpu_num", c_uint16),
        ("flags", c_uint32),
        ("owner_uid", c_uint32),
        ("reserved", c_uint32),
    ]


class AcrnEmuRangeClient(ctypes.LittleEndianStructure):
    """struct acrn_emu_range_client (32 B)."""

    _fields_ = [
        ("name", c_char * ACRN_EMU_NAME_LEN),
        ("ioreq_buf", c_uint64),
        ("flags", c_uint32),
        ("reserved", c_uint32),
    ]


class AcrnEmuRange(ctypes.LittleEndianStructure):
    """struct acrn_emu_range (24 B)."""

    _fields_ = [
        ("type", c_uint32),
        ("reserved", c_uint32),
        ("start", c_uint64),
        ("end", c_uint64),
    ]


class AcrnEmuValueCall(ctypes.LittleEndianStructure):
    """struct acrn_emu_value_call (24 B)."""

    _fields_ = [
        ("cmd", c_uint32),
        ("reserved", c_uint32),
        ("arg", c_uint64),
        ("result", c_int64),
    ]


EXT_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "acrn_emu_version": AcrnEmuVersion,
    "acrn_emu_bind": AcrnEmuBind,
    "acrn_emu_range_client": AcrnEmuRangeClient,
    "acrn_emu_range": AcrnEmuRange,
    "acrn_emu_value_call": AcrnEmuValueCall,
}

_T = ACRN_EMU_IOCTL_TYPE

ACRN_EMU_IOCTL_VERSION = ior(_T, 0x00, sizeof(AcrnEmuVersion))
ACRN_EMU_IOCTL_BIND_VM = iowr(_T, 0x01, sizeof(AcrnEmuBind))
ACRN_EMU_IOCTL_CREATE_RANGE_CLIENT = iow(_T, 0x02, sizeof(AcrnEmuRangeClient))
ACRN_EMU_IOCTL_DESTROY_RANGE_CLIENT = io(_T, 0x03)
ACRN_EMU_IOCTL_ADD_RANGE = iow(_T, 0x04, sizeof(AcrnEmuRange))
ACRN_EMU_IOCTL_DEL_RANGE = iow(_T, 0x05, sizeof(AcrnEmuRange))
ACRN_EMU_IOCTL_VALUE_CALL = iowr(_T, 0x06, sizeof(AcrnEmuValueCall))

EXT_IOCTLS: dict[str, int] = {
    name: value for name, value in globals().items() if name.startswith("ACRN_EMU_IOCTL_")
    and name != "ACRN_EMU_IOCTL_TYPE"
}  # fmt: skip


# SETUP_VM_EVENT_FD of ACRN's own kernel (projectacrn/acrn-kernel), not in <linux/acrn.h>:
# _IOW(0xA2, 0xA1, __u32) with the eventfd number as the argument value (spec: hv B.0).
SETUP_VM_EVENT_FD = iow(abi.ACRN_IOCTL_TYPE, 0xA1, 4)

# The ACRN ioctls whose argument is a value that is not a readable address: FUSE
# restricted ioctls fail them with EFAULT in the kernel. VALUE_CALL accepts these and
# the launcher (acrn_hsm_emu/launcher.py) traps exactly these.
VALUE_CALLS: dict[int, str] = {
    abi.ACRN_IOCTL_SET_IRQLINE: "SET_IRQLINE",
    SETUP_VM_EVENT_FD: "SETUP_VM_EVENT_FD",
}
# Those whose value is a file descriptor: in a VALUE_CALL it names a file of the process
# making the VALUE_CALL (the launcher passes its own copy of the trapped caller's fd).
FD_VALUE_CALLS = frozenset({SETUP_VM_EVENT_FD})


def include_dir() -> pathlib.Path:
    """The directory holding the installed ``acrn_hsm_emu.h`` (for ``cc -I``)."""
    return pathlib.Path(__file__).resolve().parent / "include"


def header_path() -> pathlib.Path:
    return include_dir() / "acrn_hsm_emu.h"
