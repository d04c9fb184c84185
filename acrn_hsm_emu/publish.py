"""Showing a FUSE-served node to another mount namespace (a systemd sandbox -> the host).

A unit with ProtectSystem=, ProtectHome=, PrivateTmp= ... runs the daemon in
its own mount namespace, made a *slave* of the host's: the daemon's FUSE
mount and its bind onto the node path never reach the host. So the daemon
clones its node's mount into a detached tree (``open_tree(OPEN_TREE_CLONE)``)
and hands the descriptor over the control socket; ``acrn-hsm-emu publish``,
run outside the sandbox (``ExecStartPost=+``), attaches that tree at the same
path with ``move_mount(2)``. The daemon's own teardown unlinks the node file,
which dissolves the published mount too; ``unpublish`` (``ExecStopPost=+``)
clears what a crashed daemon left.

Nothing here is ACRN-specific. Linux 5.2 or later.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# x86-64 numbers (asm-generic uses the same ones for these two).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100


def _check(ret: int, path: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return ret


def clone_tree(path: str) -> int:
    """A detached copy of the mount at ``path``, as a descriptor another namespace can attach."""
    return _check(
        _libc.syscall(
            ctypes.c_long(SYS_OPEN_TREE),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(path.encode()),
            ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
        ),
        path,
    )


def attach_tree(fd: int, path: str) -> None:
    """Mount the detached tree ``fd`` at ``path`` in this mount namespace."""
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_MOVE_MOUNT),
            ctypes.c_int(fd),
            ctypes.c_char_p(b""),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(path.encode()),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        ),
        path,
    )


def mount_namespace(pid: int | str = "self") -> int:
    """The identity (nsfs inode) of a process's mount namespace."""
    return os.stat(f"/proc/{pid}/ns/mnt").st_ino
