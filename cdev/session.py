"""One libfuse session, driven from trio, answering for one :class:`Device`.

The trio thread waits for the session fd, receives a buffer and lets libfuse
decode it; libfuse calls back into this module (``extern "Python"``), which
answers at once or starts a task and answers when the task is done. Replies
are only ever sent from the trio thread.
"""

from __future__ import annotations

import errno
import inspect
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from cdev._fuse import ffi, lib
from cdev.device import Deferred, Device, DeviceError, IoctlCall, IoctlResult, RequestContext
from cdev.ioctl import Transfer, needs_retry, transfer_for

log = structlog.get_logger("cdev")

ROOT_INO = 1
NODE_INO = 2
_NULL = ffi.NULL
# looked up once: the per-request path reads these (lib's attributes are not free)
_UNRESTRICTED = lib.FUSE_IOCTL_UNRESTRICTED
_COMPAT = lib.FUSE_IOCTL_COMPAT
_VOID_P = ffi.typeof("void *")
ANSWERED = lib.CDEV_ANSWERED  # op_ioctl: replied already, or the request waits


class _Waiting:
    """An ioctl whose answer a task is still working out."""

    __slots__ = ("req", "handle", "call", "scope", "replied", "cdata", "out_size", "deferred", "key")

    def __init__(self, req: Any, handle: object, call: IoctlCall, out_size: int) -> None:
        self.req = req
        self.handle = handle
        self.call = call
        self.out_size = out_size
        self.scope: trio.CancelScope | None = None  # a task's, when one waits
        self.replied = False
        self.cdata: Any = None
        self.deferred: Deferred | None = None
        self.key = 0  # the process it is counted against (TidResolver.hint)


class TidResolver:
    """Thread id -> process id, as /proc says, cached and re-checked cheaply.

    The FUSE header carries the calling thread; memory access needs its
    process. A cached answer is trusted only while /proc/PID/task/TID exists,
    so a recycled thread id can never be attributed to the wrong process.
    """

    def __init__(self) -> None:
        self._cache: dict[int, int] = {}

    def __call__(self, tid: int) -> int:
        if tid <= 0:
            return tid
        pid = self._cache.get(tid)
        if pid is not None:
            if pid == tid or os.path.exists(f"/proc/{pid}/task/{tid}"):
                return pid
            del self._cache[tid]
        pid = self._lookup(tid)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[tid] = pid
        return pid

    def hint(self, tid: int) -> int:
        """The process of ``tid`` for bookkeeping only: a cached answer is taken
        without the /proc check (never use it to reach memory)."""
        pid = self._cache.get(tid)
        return pid if pid is not None else self(tid)

    @staticmethod
    def _lookup(tid: int) -> int:
        try:
            with open(f"/proc/{tid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Tgid:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return tid  # gone already: the thread id is the best we know


class Session:
    """The request handlers of one served node (FUSE file or CUSE device)."""

    def __init__(
        self,
        device: Device,
        *,
        name: str,
        mode: int = 0o600,
        uid: int = 0,
        gid: int = 0,
        max_waiting: int = 4096,
        max_waiting_per_pid: int = 256,
        receive_batch: int = 16,
    ) -> None:
        self.device = device
        self.receive_batch = max(1, receive_batch)  # requests read per readiness
        # Bounds on ioctls left waiting (each holds a task): one process cannot
        # exhaust the daemon; past them the call fails at once with EAGAIN.
        self.max_waiting = max_waiting
        self.max_waiting_per_pid = max_waiting_per_pid
        self._waiting_by_pid: dict[int, int] = {}
        self.name = name.encode()
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.arg_specs = dict(getattr(device, "arg_specs", {}) or {})
        self._transfers: dict[int, Transfer] = {}  # per command, as transfer_for decides it
        self._precheck: Callable[[object, int, bool], int] = getattr(
            device, "precheck", lambda handle, cmd, compat: 0
        )
        self.se: Any = _NULL
        self.nursery: trio.Nursery | None = None
        self.on_init_done: Callable[[], None] | None = None
        self._files: dict[int, object] = {}
        self._next_fh = 1
        self._waiting: set[_Waiting] = set()
        self._resolve = TidResolver()
        self._self_handle = ffi.new_handle(self)
        self._closing = False
        self._rx_failed = False  # the native reader could not start: do not retry
        self._prefilter: Any = None
        self._rx: Any = _NULL  # the native reader while it runs (cdev_rx)
        self._poll: Any = ffi.new("struct cdev_poll *")  # this thread's reader's polling
        self._poll.also_fd = -1

    # -- plumbing --------------------------------------------------------

    @property
    def userdata(self) -> Any:
        return self._self_handle

    def context(self, req: Any) -> RequestContext:
        c = lib.fuse_req_ctx(req)
        tid = c.pid
        return RequestContext(c.uid, c.gid, None, tid, self._resolve)

    def open_files(self) -> int:
        return len(self._files)

    async def run(self, fd: int) -> None:
        """Receive and process requests until the session ends or we are cancelled."""
        os.set_blocking(fd, False)
        buf = ffi.new("struct fuse_buf *")
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                try:
                    await self._receive_loop(fd, buf)
                finally:
                    self._closing = True
                    self._fail_waiting()
                    nursery.cancel_scope.cancel()
        finally:
            self.nursery = None
            if buf.mem != _NULL:
                lib.free(buf.mem)
                buf.mem = _NULL

    async def _receive_loop(self, fd: int, buf: Any) -> None:
        # Per readiness, up to RECEIVE_BATCH requests: a read that only says
        # EAGAIN costs one cheap syscall, a trip through trio's scheduler and
        # epoll costs far more, and under load (several vCPUs, several clients)
        # requests queue up. wait_readable is the checkpoint that lets the tasks
        # these requests started run. The batch itself is read in C, where the
        # device's prefilter (if it has one) takes the requests it answers natively.
        #
        # While the prefilter says it expects most of the traffic (``threaded``), a
        # native thread reads the session instead (cdev_rx): what the prefilter
        # answers then never waits for this thread, and the rest is queued for it,
        # in order. Only one of the two reads at a time.
        se = self.se
        batch = self.receive_batch
        wait_readable = trio.lowlevel.wait_readable
        offer = getattr(self.device, "native_prefilter", None)
        prefilter = self._prefilter = offer(fd) if offer is not None else None
        fn = prefilter.fn if prefilter is not None else _NULL
        ctx = prefilter.ctx if prefilter is not None else _NULL
        # Polling after each request (cdev_receive_poll), bounded by what the device says,
        # ended early by its other work's fd: Device.reader_poll() -> (bound in ns, fd or -1).
        pl = self._poll
        offer_poll = getattr(self.device, "reader_poll", None)  # BaseDevice's: never poll
        pl.max_ns, pl.also_fd = offer_poll() if offer_poll is not None else (0, -1)
        rx: Any = _NULL
        more = False
        checkpoint = trio.lowlevel.checkpoint
        try:
            while True:
                if prefilter is not None and bool(prefilter.threaded) != (rx != _NULL):
                    rx = self._rx = self._switch_reader(rx, fn, ctx)
                if rx == _NULL:
                    if lib.fuse_session_exited(se):
                        return
                    if more:  # the batch ran out with requests still there: let the other tasks run
                        await checkpoint()
                    else:
                        await wait_readable(fd)
                    _CURRENT[0] = self  # the callbacks of this call are this session's (_session)
                    try:
                        res = lib.cdev_receive_poll(se, buf, batch, fn, ctx, pl)
                    finally:
                        _CURRENT[0] = None
                    more = res == 1
                    if res == 0:  # unmounted (ENODEV) or an aborted request
                        if lib.fuse_session_exited(se):
                            return
                    elif res < 0 and res not in (-errno.EAGAIN, -errno.EINTR):
                        raise OSError(-res, f"reading the FUSE device: {os.strerror(-res)}")
                else:
                    await wait_readable(rx.notify_fd)
                    _CURRENT[0] = self
                    try:
                        ended = lib.cdev_rx_process(se, rx, batch, pl) < 0
                    finally:
                        _CURRENT[0] = None
                    if ended:
                        return  # the session ended
        finally:
            self._rx = _NULL
            if rx != _NULL:
                lib.cdev_rx_stop(rx)
                lib.cdev_rx_free(rx, errno.ENODEV)  # what is still queued: the device is going
            if prefilter is not None:
                prefilter.close()  # before the fd goes: nothing native writes to it after

    def _switch_reader(self, rx: Any, fn: Any, ctx: Any) -> Any:
        """Start the native reader, or stop it and process what it queued."""
        if rx == _NULL:
            if self._rx_failed:
                return _NULL
            rx = lib.cdev_rx_start(self.se, fn, ctx, int(getattr(self._prefilter, "poll_max_ns", 0)))
            if rx == _NULL:
                self._rx_failed = True
                log.warning("cdev.native_reader_unavailable")
            return rx
        lib.cdev_rx_stop(rx)
        while lib.cdev_rx_process(self.se, rx, 1 << 20, _NULL) > 0:
            pass
        lib.cdev_rx_free(rx, 0)  # empty by now
        return _NULL

    def reader_snapshot(self) -> dict[str, Any]:
        """Who reads the node now, and the native reader's counters while it does."""
        rx = self._rx
        if rx == _NULL:
            pl = self._poll
            return {
                "native": False,
                "poll_max_us": int(pl.max_ns) // 1000,
                "poll_window_us": int(pl.window_ns) // 1000,
                "poll_hits": int(pl.hits),
                "poll_misses": int(pl.misses),
            }
        return {
            "native": True,
            "answered": int(rx.taken),  # by the prefilter, in that thread
            "queued": int(rx.forwarded),  # for the trio thread
            "poll_max_us": int(rx.poll_max_ns) // 1000,
            "poll_window_us": int(rx.poll_window_ns) // 1000,
            "poll_hits": int(rx.poll_hits),
            "poll_misses": int(rx.poll_misses),
        }

    def _fail_waiting(self) -> None:
        """Shutdown: every request still waiting gets ENODEV (the device is going)."""
        for w in list(self._waiting):
            if w.deferred is not None:
                w.deferred.done = True
                w.deferred._send = None
            if not w.replied:
                w.replied = True
                lib.fuse_reply_err(w.req, errno.ENODEV)
            if w.scope is not None:
                w.scope.cancel()
        self._waiting.clear()
        self._waiting_by_pid.clear()

    # -- operations -------------------------------------------------------

    def fill_attr(self, st: Any, ino: int) -> None:
        st.st_ino = ino
        if ino == ROOT_INO:
            st.st_mode = stat.S_IFDIR | 0o755
            st.st_nlink = 2
            st.st_uid = 0
            st.st_gid = 0
        else:
            st.st_mode = stat.S_IFREG | self.mode
            st.st_nlink = 1
            st.st_uid = self.uid
            st.st_gid = self.gid
        st.st_size = 0

    def op_lookup(self, req: Any, parent: int, name: bytes) -> None:
        if parent != ROOT_INO or name != self.name:
            lib.fuse_reply_err(req, errno.ENOENT)
            return
        e = ffi.new("struct fuse_entry_param *")
        e.ino = NODE_INO
        e.attr_timeout = 1.0
        e.entry_timeout = 1.0
        self.fill_attr(e.attr, NODE_INO)
        lib.fuse_reply_entry(req, e)

    def op_getattr(self, req: Any, ino: int) -> None:
        if ino not in (ROOT_INO, NODE_INO):
            lib.fuse_reply_err(req, errno.ENOENT)
            return
        st = ffi.new("struct stat *")
        self.fill_attr(st, ino)
        lib.fuse_reply_attr(req, st, 1.0)

    def op_opendir(self, req: Any, ino: int, fi: Any) -> None:
        if ino != ROOT_INO:
            lib.fuse_reply_err(req, errno.ENOTDIR)
            return
        lib.fuse_reply_open(req, fi)

    def op_readdir(self, req: Any, ino: int, size: int, off: int) -> None:
        entries = [(b".", ROOT_INO), (b"..", ROOT_INO), (self.name, NODE_INO)]
        buf = ffi.new("char[]", max(size, 1))
        used = 0
        st = ffi.new("struct stat *")
        for i, (name, ino2) in enumerate(entries):
            if i < off:
                continue
            self.fill_attr(st, ino2)
            n = lib.fuse_add_direntry(req, buf + used, size - used, name, st, i + 1)
            if n > size - used:
                break
            used += n
        lib.fuse_reply_buf(req, buf, used)

    def op_open(self, req: Any, ino: int, fi: Any) -> None:
        if ino == ROOT_INO:
            lib.fuse_reply_err(req, errno.EISDIR)
            return
        if self._closing:
            lib.fuse_reply_err(req, errno.ENODEV)
            return
        fh = self._next_fh
        self._next_fh += 1
        ctx = self.context(req)
        ctx.fh = fh
        try:
            handle = self.device.open(ctx)
        except DeviceError as e:
            lib.fuse_reply_err(req, e.errno)
            return
        self._files[fh] = handle
        fi.fh = fh
        lib.cdev_fi_setup(fi, 1, 1)  # no page cache, no seeking: a character device
        lib.fuse_reply_open(req, fi)

    def op_release(self, req: Any, fi: Any) -> None:
        handle = self._files.pop(fi.fh, None)
        if handle is not None:
            try:
                self.device.release(handle)
            except Exception:
                log.exception("cdev.release_failed", fh=fi.fh)
        lib.fuse_reply_err(req, 0)

    def op_ioctl(
        self,
        req: Any,
        fh: int,
        cmd: int,
        arg: int,
        flags: int,
        in_buf: Any,
        in_bufsz: int,
        out_bufsz: int,
        uid: int,
        gid: int,
        tid: int,
    ) -> int:
        """The device's answer to the ioctl: a result or -errno for C to reply with
        (fuse_glue.c), or ANSWERED when this replied itself or keeps the request.
        The caller's RequestContext is built only if the device asks (IoctlCall.ctx)."""
        handle = self._files.get(fh)
        if handle is None:
            return -errno.EBADF
        if flags & _UNRESTRICTED:
            transfer = self._transfers.get(cmd)
            if transfer is None:
                transfer = self._transfers[cmd] = transfer_for(cmd, self.arg_specs.get(cmd))
            if needs_retry(transfer, in_bufsz, out_bufsz):
                # What the device answers before fetching the argument comes first.
                err = self._precheck(handle, cmd, bool(flags & _COMPAT))
                if err < 0:
                    return err
                self._retry(req, arg, transfer.in_size, transfer.out_size)
                return ANSWERED
            out_size = transfer.out_size
        else:
            out_size = out_bufsz
        in_data = ffi.unpack(in_buf, in_bufsz) if in_bufsz else b""  # a const char *
        call = IoctlCall(cmd, arg, in_data, out_size, None, bool(flags & _COMPAT), (uid, gid, tid, self._resolve))
        try:
            result = self.device.ioctl(handle, call)
        except DeviceError as e:
            return -e.errno
        if type(result) is int:
            return result
        if type(result) is tuple:
            return self._reply_ioctl(req, result, out_size)
        if isinstance(result, Deferred):
            self._defer(req, handle, call, out_size, result)
        elif inspect.isawaitable(result):
            self._start_waiting(req, handle, call, out_size, result)
        else:
            return self._reply_ioctl(req, result, out_size)
        return ANSWERED

    def _retry(self, req: Any, arg: int, in_size: int, out_size: int) -> None:
        addr = ffi.cast(_VOID_P, arg)
        in_iov = ffi.new("struct iovec *")
        in_iov.iov_base = addr
        in_iov.iov_len = in_size
        out_iov = ffi.new("struct iovec *")
        out_iov.iov_base = addr
        out_iov.iov_len = out_size
        lib.fuse_reply_ioctl_retry(
            req,
            in_iov if in_size else _NULL,
            1 if in_size else 0,
            out_iov if out_size else _NULL,
            1 if out_size else 0,
        )

    @staticmethod
    def _reply_ioctl(req: Any, result: IoctlResult, out_size: int) -> int:
        """Reply to ``req`` with ``result`` now (from a task, or with data); ANSWERED."""
        if isinstance(result, tuple):
            value, data = result
        else:
            value, data = result, b""
        if value < 0:
            lib.fuse_reply_err(req, -value)
            return ANSWERED
        if len(data) > out_size:
            data = data[:out_size]
        if data:
            lib.fuse_reply_ioctl(req, value, ffi.from_buffer(data), len(data))
        else:
            lib.fuse_reply_ioctl(req, value, _NULL, 0)
        return ANSWERED

    def _defer(self, req: Any, handle: object, call: IoctlCall, out_size: int, d: Deferred) -> None:
        """Hold the request until the device calls ``d.reply`` (or the caller is interrupted)."""
        if d.done:  # answered before it was handed back
            return
        w = self._admit(req, handle, call, out_size)
        if w is None:
            d.done = True
            if d.on_cancel is not None:
                d.on_cancel(d)
            return
        w.deferred = d
        d.call = call

        def send(result: IoctlResult, w: _Waiting = w) -> None:
            self._forget(w)
            if not w.replied:
                w.replied = True
                self._reply_ioctl(w.req, result, w.out_size)

        d._send = send
        lib.cdev_req_interrupt_func(req, w.cdata)  # may interrupt at once

    def _admit(self, req: Any, handle: object, call: IoctlCall, out_size: int) -> _Waiting | None:
        """Count a request that will wait; past the bounds refuse it (EAGAIN) and give None."""
        pid = self._resolve.hint(call.ctx.tid)
        mine = self._waiting_by_pid.get(pid, 0)
        if len(self._waiting) >= self.max_waiting or mine >= self.max_waiting_per_pid:
            self._refuse_waiting(req, pid, mine)
            return None
        self._waiting_by_pid[pid] = mine + 1
        w = _Waiting(req, handle, call, out_size)
        w.key = pid
        w.cdata = ffi.new_handle(w)
        self._waiting.add(w)
        return w

    def _refuse_waiting(self, req: Any, pid: int, mine: int) -> None:
        log.warning(
            "cdev.waiting_request_refused",
            pid=pid,
            waiting=len(self._waiting),
            waiting_for_pid=mine,
            limit=self.max_waiting,
            limit_per_pid=self.max_waiting_per_pid,
        )
        lib.fuse_reply_err(req, errno.EAGAIN)

    def _forget(self, w: _Waiting) -> None:
        if w not in self._waiting:
            return
        self._waiting.discard(w)
        left = self._waiting_by_pid.get(w.key, 1) - 1
        if left > 0:
            self._waiting_by_pid[w.key] = left
        else:
            self._waiting_by_pid.pop(w.key, None)

    def _start_waiting(
        self,
        req: Any,
        handle: object,
        call: IoctlCall,
        out_size: int,
        coro: Awaitable[IoctlResult],
    ) -> None:
        assert self.nursery is not None
        w = self._admit(req, handle, call, out_size)
        if w is None:
            if inspect.iscoroutine(coro):
                coro.close()
            return
        w.scope = trio.CancelScope()
        self.nursery.start_soon(self._run_waiting, w, coro)
        # Registered last: libfuse calls it at once if the caller was already interrupted.
        lib.cdev_req_interrupt_func(req, w.cdata)

    async def _run_waiting(self, w: _Waiting, coro: Awaitable[IoctlResult]) -> None:
        result: IoctlResult = -errno.EIO
        assert w.scope is not None
        try:
            with w.scope:
                result = await coro
        except Exception:
            log.exception("cdev.ioctl_handler_failed", cmd=hex(w.call.cmd))
            result = -errno.EIO
        finally:
            if inspect.iscoroutine(coro):
                coro.close()  # never started: cancelled before it ran
            self._forget(w)
        if not w.replied:
            w.replied = True
            self._reply_ioctl(w.req, result, w.out_size)

    def on_interrupt(self, w: _Waiting) -> None:
        """The kernel says the caller got a signal: the device picks the answer."""
        if w.replied:
            return
        w.replied = True
        d = w.deferred
        if d is not None:
            d.done = True
            d._send = None
            self._forget(w)
            if d.on_cancel is not None:
                try:
                    d.on_cancel(d)
                except Exception:
                    log.exception("cdev.on_cancel_failed", cmd=hex(w.call.cmd))
        try:
            result = self.device.interrupted(w.handle, w.call)
        except Exception:
            log.exception("cdev.interrupt_handler_failed", cmd=hex(w.call.cmd))
            result = -errno.EINTR
        self._reply_ioctl(w.req, result, w.out_size)
        if w.scope is not None:
            w.scope.cancel()

    def op_poll(self, req: Any, fi: Any, ph: Any) -> None:
        poll = getattr(self.device, "poll", None)
        handle = self._files.get(fi.fh)
        if poll is None or handle is None:
            if ph != _NULL:
                lib.fuse_pollhandle_destroy(ph)
            # ENOSYS makes the kernel report the file as always ready, as it
            # does for a character device with no poll operation.
            lib.fuse_reply_err(req, errno.ENOSYS if handle is not None else errno.EBADF)
            return

        def wake(ph: Any = ph) -> None:
            if ph != _NULL:
                lib.fuse_lowlevel_notify_poll(ph)
                lib.fuse_pollhandle_destroy(ph)

        try:
            mask = poll(handle, wake)
        except DeviceError as e:
            lib.fuse_reply_err(req, e.errno)
            return
        lib.fuse_reply_poll(req, mask)

    def op_read(self, req: Any) -> None:
        # A character device without read/write handlers answers EINVAL.
        lib.fuse_reply_err(req, errno.EINVAL)


# -- the C entry points ------------------------------------------------------


# The session whose receive call is running in this (the trio) thread: libfuse calls the
# operations below from inside it, so they need not look the session up from the request.
_CURRENT: list[Session | None] = [None]


def _session(req: Any) -> Session:
    session = _CURRENT[0]
    if session is None:
        session = ffi.from_handle(lib.fuse_req_userdata(req))
    return session


def _guarded(req: Any, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:
        log.exception("cdev.request_handler_failed")
        lib.fuse_reply_err(req, errno.EIO)


@ffi.def_extern()
def cdev_ll_init(userdata: Any, conn: Any) -> None:
    return None


@ffi.def_extern()
def cdev_ll_lookup(req: Any, parent: int, name: Any) -> None:
    _guarded(req, lambda: _session(req).op_lookup(req, parent, ffi.string(name)))


@ffi.def_extern()
def cdev_ll_getattr(req: Any, ino: int, fi: Any) -> None:
    _guarded(req, lambda: _session(req).op_getattr(req, ino))


@ffi.def_extern()
def cdev_ll_open(req: Any, ino: int, fi: Any) -> None:
    _guarded(req, lambda: _session(req).op_open(req, ino if ino else NODE_INO, fi))


@ffi.def_extern()
def cdev_ll_release(req: Any, ino: int, fi: Any) -> None:
    _guarded(req, lambda: _session(req).op_release(req, fi))


@ffi.def_extern()
def cdev_ll_opendir(req: Any, ino: int, fi: Any) -> None:
    _guarded(req, lambda: _session(req).op_opendir(req, ino, fi))


@ffi.def_extern()
def cdev_ll_readdir(req: Any, ino: int, size: int, off: int, fi: Any) -> None:
    _guarded(req, lambda: _session(req).op_readdir(req, ino, size, off))


@ffi.def_extern()
def cdev_ll_read(req: Any, ino: int, size: int, off: int, fi: Any) -> None:
    _guarded(req, lambda: _session(req).op_read(req))


@ffi.def_extern()
def cdev_ll_write(req: Any, ino: int, buf: Any, size: int, off: int, fi: Any) -> None:
    _guarded(req, lambda: _session(req).op_read(req))


@ffi.def_extern()
def cdev_ll_ioctl(
    req: Any,
    fh: int,
    cmd: int,
    arg: int,
    flags: int,
    in_buf: Any,
    in_bufsz: int,
    out_bufsz: int,
    uid: int,
    gid: int,
    tid: int,
) -> int:
    try:
        session = _CURRENT[0] or _session(req)
        return session.op_ioctl(req, fh, cmd, arg, flags, in_buf, in_bufsz, out_bufsz, uid, gid, tid)
    except Exception:
        log.exception("cdev.ioctl_dispatch_failed", cmd=hex(cmd))
        return -errno.EIO


@ffi.def_extern()
def cdev_ll_poll(req: Any, ino: int, fi: Any, ph: Any) -> None:
    _guarded(req, lambda: _session(req).op_poll(req, fi, ph))


@ffi.def_extern()
def cdev_cuse_init_done(userdata: Any) -> None:
    session: Session = ffi.from_handle(userdata)
    if session.on_init_done is not None:
        session.on_init_done()


@ffi.def_extern()
def cdev_interrupt(req: Any, data: Any) -> None:
    w: _Waiting = ffi.from_handle(data)
    try:
        _session(req).on_interrupt(w)
    except Exception:
        log.exception("cdev.interrupt_failed")


_FUSE_LEVELS = ["critical", "critical", "critical", "error", "warning", "info", "info", "debug"]


@ffi.def_extern()
def cdev_log(level: int, msg: Any) -> None:
    text = ffi.string(msg).decode(errors="replace")
    name = _FUSE_LEVELS[level] if 0 <= level < len(_FUSE_LEVELS) else "info"
    getattr(log, name)("libfuse", message=text)


lib.cdev_install_log()
