"""The interface a device implements to be served by cdev.

cdev knows nothing about what a device means; it hands each open, release and
ioctl of the node to an object implementing :class:`Device`, in the trio
thread. Handlers must not block: an ioctl that has to wait returns a coroutine,
which cdev runs in its own task and answers when it finishes.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import trio


class RequestContext:
    """Who made a request: the kernel's view of the calling thread.

    ``pid`` is the thread group (process) of the calling thread ``tid``. It is
    resolved on first use (a /proc look-up), so requests that never touch the
    caller's memory do not pay for it. ``fh`` is, in an open's context, the
    file handle cdev gives the new file (what a native prefilter sees in the
    kernel's requests for it); 0 elsewhere.
    """

    __slots__ = ("uid", "gid", "tid", "fh", "_pid", "_resolve")

    def __init__(
        self,
        uid: int,
        gid: int,
        pid: int | None = None,
        tid: int = 0,
        resolve: Callable[[int], int] | None = None,
    ) -> None:
        self.uid = uid
        self.gid = gid
        self.tid = tid
        self.fh = 0
        self._pid = pid
        self._resolve = resolve

    @property
    def pid(self) -> int:
        if self._pid is None:
            self._pid = self._resolve(self.tid) if self._resolve is not None else self.tid
        return self._pid

    def __repr__(self) -> str:
        return f"RequestContext(uid={self.uid}, gid={self.gid}, pid={self.pid}, tid={self.tid})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RequestContext):
            return NotImplemented
        return (self.uid, self.gid, self.pid, self.tid) == (other.uid, other.gid, other.pid, other.tid)

    def __hash__(self) -> int:
        return hash((self.uid, self.gid, self.pid, self.tid))


class DeviceError(Exception):
    """Raised by a handler to answer a request with an errno."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or errno.errorcode.get(err, str(err)))
        self.errno = err


class IoctlCall:
    """One ioctl as the device sees it, the same in FUSE and CUSE modes.

    ``in_data`` is what the kernel (FUSE restricted mode) or cdev (CUSE retry)
    fetched from the caller: ``_IOC_SIZE(cmd)`` bytes for ``_IOW``/``_IOWR``
    commands, nothing for ``_IO`` ones or for commands declared by value.
    ``out_size`` is how many bytes the caller accepts back.

    ``ctx`` is who called. cdev gives ``who`` (uid, gid, tid, pid resolver) instead,
    and the :class:`RequestContext` is built on first use: most ioctls never ask,
    and building it is a third of what cdev spends on a call in Python.
    """

    __slots__ = ("cmd", "arg", "in_data", "out_size", "compat", "_ctx", "_who")

    def __init__(
        self,
        cmd: int,
        arg: int,
        in_data: bytes,
        out_size: int,
        ctx: RequestContext | None = None,
        compat: bool = False,  # a 32-bit caller on a 64-bit kernel
        who: tuple[int, int, int, Callable[[int], int]] | None = None,
    ) -> None:
        self.cmd = cmd
        self.arg = arg
        self.in_data = in_data
        self.out_size = out_size
        self.compat = compat
        self._ctx = ctx
        self._who = who

    @property
    def ctx(self) -> RequestContext:
        c = self._ctx
        if c is None:
            assert self._who is not None
            uid, gid, tid, resolve = self._who
            c = self._ctx = RequestContext(uid, gid, None, tid, resolve)
        return c

    def __repr__(self) -> str:
        return (f"IoctlCall(cmd={self.cmd:#x}, arg={self.arg:#x}, in_data={self.in_data!r}, "
                f"out_size={self.out_size}, ctx={self.ctx!r}, compat={self.compat})")


# What a handler gives back: a result (>= 0) with no data, a negative errno,
# or a result and the bytes to copy out to the caller.
IoctlResult = int | tuple[int, bytes]


class Deferred:
    """An answer the device gives later, without a task: the cheap way to wait.

    A handler returns a Deferred it keeps (say, in a list of waiters); cdev
    holds the request, and :meth:`reply` answers it from wherever the device
    learns the answer (another request's handler, an upcall), in the trio
    thread. If the caller is interrupted first, cdev answers with the device's
    :meth:`Device.interrupted` and calls ``on_cancel`` so the device can forget
    the waiter; a later :meth:`reply` is then ignored.
    """

    __slots__ = ("_send", "done", "on_cancel", "call", "result", "_event")

    def __init__(self, on_cancel: Callable[[Deferred], None] | None = None) -> None:
        self._send: Callable[[IoctlResult], None] | None = None
        self.done = False
        self.on_cancel = on_cancel
        self.call: IoctlCall | None = None
        self.result: IoctlResult | None = None
        self._event: trio.Event | None = None

    def reply(self, result: IoctlResult) -> bool:
        """Answer now; False if the request was already answered (interrupted)."""
        if self.done:
            return False
        self.done = True
        self.result = result
        send, self._send = self._send, None
        if send is not None:
            send(result)
        if self._event is not None:
            self._event.set()
        return True

    def cancel(self) -> None:
        """The waiter gives up (an in-process caller going away): forget it."""
        if not self.done:
            self.done = True
            self._send = None
            if self.on_cancel is not None:
                self.on_cancel(self)

    def __await__(self) -> Generator[Any, None, IoctlResult]:
        """In-process callers (tests, Python clients of a device) can await the answer."""
        return self._wait().__await__()

    async def _wait(self) -> IoctlResult:
        if not self.done:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()
        assert self.result is not None
        return self.result


@dataclass(frozen=True, slots=True)
class ArgSpec:
    """How a command's argument really travels, where it differs from _IOC.

    ``by_value``: the argument is a value, not a pointer (nothing is fetched).
    ``in_size``/``out_size``: bytes behind the pointer, overriding _IOC_SIZE.
    Only CUSE (unrestricted ioctls) can honour these; FUSE mode follows _IOC.
    """

    by_value: bool = False
    in_size: int | None = None
    out_size: int | None = None


@runtime_checkable
class Device(Protocol):
    """What cdev calls. Every method runs in the trio thread and must not block."""

    def open(self, ctx: RequestContext) -> object:
        """A new open file: return its handle, or raise DeviceError."""
        ...

    def release(self, handle: object) -> None:
        """The last reference to an open file went away."""
        ...

    def ioctl(
        self, handle: object, call: IoctlCall
    ) -> IoctlResult | Deferred | Awaitable[IoctlResult]:
        """Answer at once, return a :class:`Deferred` to answer later, or return
        a coroutine that cdev runs in its own task."""
        ...

    def precheck(self, handle: object, cmd: int, compat: bool) -> int:
        """Before any of the argument is fetched: 0 to go on, or a negative errno.

        A driver decides some answers before it copies its argument (a state
        check, an unknown command). Under CUSE, cdev asks this before it asks
        the kernel for the argument, so a bad pointer does not turn such an
        answer into EFAULT; under FUSE the kernel has copied it already.
        """
        ...

    def interrupted(self, handle: object, call: IoctlCall) -> IoctlResult:
        """The caller of a waiting ioctl got a signal: choose the answer.

        cdev cancels the waiting coroutine and replies with what this returns.
        The usual answer, and the one :class:`BaseDevice` gives, is ``-EINTR``.
        """
        ...


class NativePrefilter(Protocol):
    """A device's C fast path, offered through ``Device.native_prefilter(fd)``.

    ``fn`` is a C function ``int fn(void *ctx, int fd, const void *req, size_t len)``
    that cdev calls with every raw request of the session (``struct
    fuse_in_header`` and its body) before libfuse decodes it: in the trio
    thread, or in cdev's reader thread while ``threaded`` (below). It
    returns nonzero for a request it answered (by writing the reply to ``fd``)
    or keeps to answer later, from any thread; cdev then forgets that request.
    ``close`` is called before the session's fd is closed: from then on the
    device must not write to it. While ``threaded`` is true (cdev looks after
    each wake-up), a native thread reads the session and calls ``fn`` itself,
    queueing what it leaves for the trio thread: the prefilter's answers then
    never wait for trio, at the price of one more thread hop for the rest.
    ``poll_max_ns`` (optional, default 0: never): the bound of that thread's
    adaptive polling. After a request the prefilter answered, the thread keeps
    reading for a window before it sleeps; the window grows while the next
    request comes within ``poll_max_ns`` of the answer and shrinks when it does
    not, as KVM's halt polling does (``Session.reader_snapshot`` shows it).
    """

    fn: Any
    ctx: Any

    @property
    def threaded(self) -> bool: ...

    def close(self) -> None: ...


class BaseDevice:
    """Defaults for optional parts of :class:`Device`."""

    # Commands whose argument does not follow the _IOC encoding (CUSE only).
    arg_specs: dict[int, ArgSpec] = {}

    def open(self, ctx: RequestContext) -> object:
        return object()

    def native_prefilter(self, fd: int) -> NativePrefilter | None:
        """A C fast path for some requests of a session on ``fd`` (none by default)."""
        return None

    def reader_poll(self) -> tuple[int, int]:
        """How long the session's reader keeps reading after a request before it waits
        (the bound, in ns, of an adaptive window: 0, the default, never polls), and an fd
        whose readiness ends the poll early (the device's other work; -1: none)."""
        return 0, -1

    def release(self, handle: object) -> None:
        return None

    def ioctl(
        self, handle: object, call: IoctlCall
    ) -> IoctlResult | Deferred | Awaitable[IoctlResult]:
        return -errno.ENOTTY

    def precheck(self, handle: object, cmd: int, compat: bool) -> int:
        return 0

    def interrupted(self, handle: object, call: IoctlCall) -> IoctlResult:
        return -errno.EINTR

    # A device with no poll: the node reports always ready, as the kernel
    # does for a file without a poll operation.
    poll: Callable[[object, Callable[[], None]], int] | None = None
