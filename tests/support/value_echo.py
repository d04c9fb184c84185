"""A node that says what the extension's VALUE_CALL brought it (tests/test_launcher.py).

Served with ``python -m cdev --device tests.support.value_echo:ValueEcho``. For
SETUP_VM_EVENT_FD (a value that is an fd of the process making the call) the
result is the inode number of that file, taken from the caller as the daemon
takes an eventfd (``pidfd_getfd``), or -EBADF; for SET_IRQLINE, the low 16 bits
of the value. Any other ioctl: ENOTTY.
"""

from __future__ import annotations

import ctypes
import errno
import os

from acrn_hsm_emu.client import extension as ext
from cdev.device import BaseDevice, IoctlCall, IoctlResult, RequestContext

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438  # x86-64


def inode_of(pid: int, fd: int) -> int:
    """The inode of ``pid``'s ``fd``, or -errno."""
    pidfd = _libc.syscall(SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if pidfd < 0:
        return -ctypes.get_errno()
    try:
        mine = _libc.syscall(SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0))
        if mine < 0:
            return -ctypes.get_errno()
        try:
            return os.fstat(mine).st_ino & 0x7FFFFFFF  # an ioctl result is an int
        finally:
            os.close(mine)
    finally:
        os.close(pidfd)


class ValueEcho(BaseDevice):
    def open(self, ctx: RequestContext) -> object:
        return ctx

    def ioctl(self, handle: object, call: IoctlCall) -> IoctlResult:
        if call.cmd != ext.ACRN_EMU_IOCTL_VALUE_CALL or len(call.in_data) < 24:
            return -errno.ENOTTY
        vc = ext.AcrnEmuValueCall.from_buffer_copy(call.in_data[:24])
        if vc.cmd == ext.SETUP_VM_EVENT_FD:
            fd = vc.arg & 0xFFFFFFFF
            fd = fd - (1 << 32) if fd >> 31 else fd  # the int the caller passed
            vc.result = inode_of(call.ctx.pid, fd) if fd >= 0 else -errno.EBADF
        else:
            vc.result = vc.arg & 0xFFFF
        return 0, bytes(vc)
