"""Taking, recognising and comparing a caller's eventfds (``eventfd_ctx_fdget``).

IOEVENTFD and IRQFD name an fd of the *calling* process. We duplicate it into
the daemon with pidfd_open + pidfd_getfd (which also keeps the eventfd alive,
as the kernel's context reference does), recognise an eventfd by its
``anon_inode:[eventfd]`` link, and compare two with kcmp(KCMP_FILE), since all
eventfds share one anonymous inode (spec: hsm 13 "eventfds").
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Callable, Sequence
from typing import TypeVar

import structlog

from acrn_hsm_emu._native import ffi, lib

log = structlog.get_logger("acrn_hsm_emu.hsm")

_EVENTFD_LINK = "anon_inode:[eventfd]"
_ONE = (1).to_bytes(8, "little")


class EventfdError(Exception):
    """The fd cannot be used as an eventfd; ``errno`` is what the ioctl returns."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or os.strerror(err))
        self.errno = err


def fdget(pid: int, fd: int) -> int:
    """Duplicate ``fd`` of process ``pid`` into this process; must be an eventfd.

    Raises EventfdError(EBADF) when the fd is not open there, EINVAL when it
    is not an eventfd. The caller owns (and must close) the returned fd.
    """
    if fd < 0 or fd > 0x7FFFFFFF:
        raise EventfdError(errno.EBADF, f"fd {fd} out of range")
    pidfd = lib.hsm_pidfd_open(pid, 0)
    if pidfd < 0:
        err = ffi.errno
        # The caller vanished (or is invisible to us): nothing of it can be resolved.
        raise EventfdError(errno.EBADF, f"pidfd_open({pid}): {os.strerror(err)}")
    try:
        dup = lib.hsm_pidfd_getfd(pidfd, fd, 0)
        if dup < 0:
            err = ffi.errno
            if err != errno.EBADF:
                log.warning("hsm.pidfd_getfd_failed", pid=pid, fd=fd, error=os.strerror(err))
            raise EventfdError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
    finally:
        os.close(pidfd)
    try:
        link = os.readlink(f"/proc/self/fd/{dup}")
    except OSError:
        link = ""
    if link != _EVENTFD_LINK:
        os.close(dup)
        raise EventfdError(errno.EINVAL, f"fd {fd} of pid {pid} is {link or 'unknown'}, not an eventfd")
    return dup


T = TypeVar("T")


def find_same(pid: int, fd: int, entries: Sequence[T], fd_of: Callable[[T], int]) -> T | int | None:
    """The first entry whose eventfd is the caller's ``fd`` (compared by kcmp).

    -EBADF / -EINVAL when ``fd`` is not an open eventfd of ``pid``, None when no
    entry uses it: what both deassign paths (ioeventfd, irqfd) look up.
    """
    try:
        dup = fdget(pid, fd)
    except EventfdError as e:
        return -e.errno
    try:
        return next((e for e in entries if same(fd_of(e), dup)), None)
    finally:
        os.close(dup)


def same(fd1: int, fd2: int) -> bool:
    """Whether two fds of this process name the same open eventfd."""
    me = os.getpid()
    return lib.hsm_kcmp_file(me, me, fd1, fd2) == 0


def signal(fd: int) -> None:
    """eventfd_signal: add one to the counter."""
    try:
        os.write(fd, _ONE)
    except OSError as e:  # counter saturated on a non-blocking eventfd, or fd gone
        log.debug("hsm.eventfd_signal_failed", fd=fd, error=str(e))


def read_counter(fd: int) -> int:
    """Read (and so reset) the counter without ever blocking; 0 when not signalled."""
    buf = bytearray(8)
    try:
        n = os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # Kernels without IOCB_NOWAIT on eventfd: readable now means one read will not block.
        if not select.select([fd], [], [], 0)[0]:
            return 0
        try:
            n = os.readv(fd, [buf])
        except BlockingIOError:
            return 0
    if n != 8:
        return 0
    return int.from_bytes(buf, "little")
