"""A small device for testing cdev through a real mounted node.

Commands (type 'T'), mirrored in tests/clients/cdev_client.c:
  1 REWRITE  _IOWR 16 bytes: answers each byte + 1, result 0
  2 RAW      _IO: records the raw argument, answers 7
  3 LASTARG  _IOR u64: the last raw argument RAW saw on this file
  4 FAIL     _IO: answers -arg (a negative errno chosen by the caller)
  5 WAIT     _IO: waits for WAKE (a Deferred reply); interrupted -> EINTR (the default)
  6 WAIT0    _IO: waits for WAKE (in a task); interrupted -> 0 (the device's choice)
  7 WAKE     _IO: wakes every waiter, answers how many
  8 WHO      _IOR 16 bytes: pid, tid, uid, gid of the caller (u32 each)
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Awaitable

import trio

from cdev.device import BaseDevice, Deferred, IoctlCall, IoctlResult, RequestContext


def _ioc(d: int, nr: int, size: int) -> int:
    return (d << 30) | (size << 16) | (ord("T") << 8) | nr


REWRITE = _ioc(3, 1, 16)
RAW = _ioc(0, 2, 0)
LASTARG = _ioc(2, 3, 8)
FAIL = _ioc(0, 4, 0)
WAIT = _ioc(0, 5, 0)
WAIT0 = _ioc(0, 6, 0)
WAKE = _ioc(0, 7, 0)
WHO = _ioc(2, 8, 16)


class _File:
    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.last_arg = 0


class TestDevice(BaseDevice):
    def __init__(self) -> None:
        self.wake = trio.Event()
        self.waiters = 0
        self.deferred: list[Deferred] = []

    def open(self, ctx: RequestContext) -> object:
        return _File(ctx)

    def ioctl(
        self, handle: object, call: IoctlCall
    ) -> IoctlResult | Deferred | Awaitable[IoctlResult]:
        assert isinstance(handle, _File)
        cmd = call.cmd
        if cmd == REWRITE:
            return 0, bytes((b + 1) & 0xFF for b in call.in_data)
        if cmd == RAW:
            handle.last_arg = call.arg
            return 7
        if cmd == LASTARG:
            return 0, struct.pack("<Q", handle.last_arg)
        if cmd == FAIL:
            return -call.arg
        if cmd == WAIT:
            d = Deferred(on_cancel=self.deferred.remove)
            self.deferred.append(d)
            return d
        if cmd == WAIT0:
            return self._wait()
        if cmd == WAKE:
            n = self.waiters + len(self.deferred)
            self.wake.set()
            self.wake = trio.Event()
            waiting, self.deferred = self.deferred, []
            for d in waiting:
                d.reply(1)
            return n
        if cmd == WHO:
            c = call.ctx
            return 0, struct.pack("<4I", c.pid, c.tid, c.uid, c.gid)
        return -errno.ENOTTY

    async def _wait(self) -> IoctlResult:
        self.waiters += 1
        try:
            await self.wake.wait()
        finally:
            self.waiters -= 1
        return 1

    def interrupted(self, handle: object, call: IoctlCall) -> IoctlResult:
        return 0 if call.cmd == WAIT0 else -errno.EINTR
