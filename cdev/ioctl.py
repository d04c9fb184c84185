"""The _IOC encoding and what it means for moving an ioctl's data.

FUSE (restricted ioctls) lets the kernel move ``_IOC_SIZE(cmd)`` bytes by the
direction bits; CUSE (unrestricted) leaves it to the server, which asks the
kernel with a retry reply naming the caller's memory as iovecs. This module
decides those iovecs, so that a device sees the same ``in_data`` either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdev.device import ArgSpec

# Linux generic (x86) ioctl number layout: include/uapi/asm-generic/ioctl.h.
IOC_NRBITS = 8
IOC_TYPEBITS = 8
IOC_SIZEBITS = 14  # x86 uses the generic 14-bit size field
IOC_DIRBITS = 2

IOC_NRSHIFT = 0
IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS
IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS
IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1  # userspace writes, driver reads (the "W" of _IOW)
IOC_READ = 2  # driver writes back into the argument


def ioc(dir: int, type: int, nr: int, size: int) -> int:  # argument names as in _IOC()
    """Encode an ioctl number exactly like the kernel's ``_IOC`` macro."""
    # Out-of-range parts would silently bleed into neighbouring fields.
    if not 0 <= dir < 1 << IOC_DIRBITS:
        raise ValueError(f"ioctl dir out of range: {dir}")
    if not 0 <= type < 1 << IOC_TYPEBITS:
        raise ValueError(f"ioctl type out of range: {type}")
    if not 0 <= nr < 1 << IOC_NRBITS:
        raise ValueError(f"ioctl nr out of range: {nr}")
    if not 0 <= size < 1 << IOC_SIZEBITS:
        raise ValueError(f"ioctl size out of range: {size}")
    return (
        (dir << IOC_DIRSHIFT)
        | (type << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | (size << IOC_SIZESHIFT)
    )


def io(type: int, nr: int) -> int:
    """``_IO``: no argument data (the raw argument still reaches the driver)."""
    return ioc(IOC_NONE, type, nr, 0)


def iow(type: int, nr: int, size: int) -> int:
    """``_IOW``: the driver reads ``size`` bytes from the argument."""
    return ioc(IOC_WRITE, type, nr, size)


def ior(type: int, nr: int, size: int) -> int:
    """``_IOR``: the driver writes ``size`` bytes to the argument."""
    return ioc(IOC_READ, type, nr, size)


def iowr(type: int, nr: int, size: int) -> int:
    """``_IOWR``: both directions."""
    return ioc(IOC_READ | IOC_WRITE, type, nr, size)


def ioc_dir(cmd: int) -> int:
    """``_IOC_DIR``: IOC_NONE / IOC_WRITE / IOC_READ bits of ``cmd``."""
    return (cmd >> IOC_DIRSHIFT) & ((1 << IOC_DIRBITS) - 1)


def ioc_type(cmd: int) -> int:
    """``_IOC_TYPE``: the magic byte (e.g. 0xAE for KVM)."""
    return (cmd >> IOC_TYPESHIFT) & ((1 << IOC_TYPEBITS) - 1)


def ioc_nr(cmd: int) -> int:
    """``_IOC_NR``: the command number within its type."""
    return (cmd >> IOC_NRSHIFT) & ((1 << IOC_NRBITS) - 1)


def ioc_size(cmd: int) -> int:
    """``_IOC_SIZE``: bytes FUSE copies in/out in restricted mode."""
    return (cmd >> IOC_SIZESHIFT) & ((1 << IOC_SIZEBITS) - 1)


@dataclass(frozen=True, slots=True)
class Transfer:
    """Bytes to fetch from, and to copy back to, the caller's ``arg`` address."""

    in_size: int
    out_size: int


def transfer_for(cmd: int, spec: ArgSpec | None = None) -> Transfer:
    """What moves for ``cmd``: by the _IOC bits, unless ``spec`` says otherwise."""
    if spec is not None and spec.by_value:
        return Transfer(0, 0)
    direction = ioc_dir(cmd)
    size = ioc_size(cmd)
    in_size = size if direction & IOC_WRITE else 0
    out_size = size if direction & IOC_READ else 0
    if spec is not None:
        if spec.in_size is not None:
            in_size = spec.in_size
        if spec.out_size is not None:
            out_size = spec.out_size
    return Transfer(in_size, out_size)


def needs_retry(transfer: Transfer, in_bufsz: int, out_bufsz: int) -> bool:
    """CUSE: the first call of an unrestricted ioctl arrives without data.

    Ask the kernel to fetch/prepare what the command needs, unless this call
    already carries it (the retried one).
    """
    return in_bufsz < transfer.in_size or out_bufsz < transfer.out_size
