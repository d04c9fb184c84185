"""Where a CUSE device appears, and how to tell it is ours: no libfuse needed.

The kernel names a CUSE device after the ``DEVNAME=`` its server gives and
devtmpfs creates ``/dev/DEVNAME`` (a ``/`` in the name makes subdirectories,
as ``snd/controlC0`` does), so only paths below ``/dev`` can be served. Its
class device is ``/sys/class/cuse/NAME`` with ``/`` spelled ``!`` (kobject
names cannot hold a slash); its ``dev`` file gives the dynamic major:minor.
"""

from __future__ import annotations

import os
import posixpath

CUSE_DEVICE = "/dev/cuse"
DEV_DIR = "/dev"
SYS_CLASS = "/sys/class/cuse"


class CuseNameError(ValueError):
    """A node path CUSE cannot serve."""


def device_name(node: str | os.PathLike[str]) -> str:
    """The ``DEVNAME`` that makes the kernel create ``node`` (e.g. ``acrn_hsm``)."""
    path = posixpath.normpath(os.fspath(node))
    if not path.startswith(DEV_DIR + "/") or path == DEV_DIR + "/":
        raise CuseNameError(
            f"CUSE creates its device as /dev/NAME, so it cannot serve {os.fspath(node)}: "
            'give a path under /dev or use transport = "fuse"'
        )
    name = path[len(DEV_DIR) + 1 :]
    if any(part in ("", ".", "..") for part in name.split("/")) or "!" in name:
        raise CuseNameError(f"{os.fspath(node)} is not a device name CUSE can register")
    return name


def class_dir(name: str) -> str:
    """``/sys/class/cuse/<kobject name>`` of the device ``name``."""
    return f"{SYS_CLASS}/{name.replace('/', '!')}"


def registered_devt(name: str) -> int | None:
    """The device number the kernel gave CUSE device ``name``, or None if none has it."""
    try:
        with open(f"{class_dir(name)}/dev") as f:
            major, minor = f.read().strip().split(":")
    except (OSError, ValueError):
        return None
    return os.makedev(int(major), int(minor))


def available_transport(requested: str, node: str | os.PathLike[str] | None = None) -> str:
    """Resolve ``auto``: ``cuse`` where the kernel has it and CUSE can make ``node`` (a path
    under /dev), else ``fuse``, which serves any path."""
    if requested != "auto":
        return requested
    if not os.path.exists(CUSE_DEVICE):
        return "fuse"
    if node is not None:
        try:
            device_name(node)
        except CuseNameError:
            return "fuse"
    return "cuse"
