"""The _IOC encoding and what it means for moving an ioctl's data.

FUSE (restricted ioctls) lets the kernel move ``_IOC_SIZE(cmd)`` bytes by the
direction bits; CUSE (unrestricted) leaves it to the server, which asks the
kernel with a retry reply naming the caller's memory as iovecs. This module
decides those iovecs, so that a device sees the same ``in_data`` either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdev.device import ArgSpec

# Linux generic (x86) ioctl number layout.
IOC_NRBITS = 8
IOC_TYPEBITS = 8
IOC_SIZEBITS = 14
IOC_NRSHIFT = 0
IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS
IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS
IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1  # userspace writes, the driver reads: data flows in
IOC_READ = 2  # the driver writes: data flows out


def ioc_dir(cmd: int) -> int:
    return (cmd >> IOC_DIRSHIFT) & 0x3


def ioc_size(cmd: int) -> int:
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
