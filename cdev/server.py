"""Serving a device at a node path: FUSE file bind-mounted, or a CUSE device.

FUSE mode (kernels without CONFIG_CUSE): a private FUSE file system under
``run_dir`` holds one regular file; it is bind-mounted onto the node path.
The kernel then applies restricted ioctls (``_IOC_SIZE`` bytes by the
direction bits). CUSE mode: a real character device with unrestricted ioctls.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import select
import stat
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from cdev import cuse
from cdev._fuse import ffi, lib
from cdev.cuse import available_transport
from cdev.device import Device
from cdev.session import Session

log = structlog.get_logger("cdev")

FS_TYPE = "fuse.cdev"
CUSE_DEVICE = cuse.CUSE_DEVICE
FUSE_DEVICE = "/dev/fuse"


class ServeError(Exception):
    """Why a node cannot be served: one readable sentence, no traceback needed."""


class SessionEnded(ServeError):
    """The kernel ended a session that was serving (the node is gone)."""


@dataclass(frozen=True, slots=True)
class Mount:
    mount_point: str
    fs_type: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def mounts() -> list[Mount]:
    """This mount namespace's mounts, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 5 or len(rfields) < 2:
                continue
            out.append(Mount(_unescape(fields[4]), rfields[0], _unescape(rfields[1])))
    return out


def is_stale(path: str) -> bool:
    """A FUSE mount whose server is gone answers ENOTCONN.

    statfs always reaches the server (stat may be answered from the attribute
    cache for a second after the server died).
    """
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def detach(path: str) -> None:
    if lib.umount2(path.encode(), lib.MNT_DETACH) != 0:
        err = ffi.errno
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"unmounting {path}: {os.strerror(err)}")


def _connection_aborted(fd: int) -> bool:
    """The kernel aborted the connection on ``fd``: its poll says POLLERR."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in p.poll(0))


class Server:
    """Serve ``device`` at ``node``. Use :meth:`serve` inside a trio nursery."""

    def __init__(
        self,
        device: Device,
        node: str | os.PathLike[str],
        *,
        transport: str = "auto",
        run_dir: str | os.PathLike[str] = "/run/cdev",
        mode: int = 0o600,
        uid: int = 0,
        gid: int = 0,
        max_waiting: int = 4096,
        max_waiting_per_pid: int = 256,
    ) -> None:
        self.device = device
        self.node = pathlib.Path(node)
        self.transport = available_transport(transport, node)
        if self.transport not in ("fuse", "cuse"):
            raise ServeError(f"unknown transport {transport!r} (auto, fuse or cuse)")
        self.run_dir = pathlib.Path(run_dir)
        if self.transport == "cuse":
            try:
                self.name = cuse.device_name(self.node)
            except cuse.CuseNameError as e:
                raise ServeError(str(e)) from None
        else:
            self.name = self.node.name
        self.session = Session(
            device,
            name=self.name,
            mode=mode,
            uid=uid,
            gid=gid,
            max_waiting=max_waiting,
            max_waiting_per_pid=max_waiting_per_pid,
        )
        self._keep: list[Any] = []  # C strings libfuse holds on to
        self._created: list[pathlib.Path] = []
        self._bound = False
        self._mounted = False

    @property
    def mount_dir(self) -> pathlib.Path:
        return self.run_dir / f"{self.name}.fuse"

    # -- set-up --------------------------------------------------------

    def _args(self, extra: list[str]) -> Any:
        argv = [ffi.new("char[]", a.encode()) for a in ["cdev", *extra]]
        self._keep.extend(argv)
        arr = ffi.new("char *[]", argv)
        self._keep.append(arr)
        args = ffi.new("struct fuse_args *")
        args.argc = len(argv)
        args.argv = arr
        args.allocated = 0
        self._keep.append(args)
        return args

    @staticmethod
    def _free_setup(args: Any, ops: Any) -> None:
        """After the session's creation: libfuse keeps a copy of the operations, and
        parsing the arguments allocated new ones (found by ``make sanitize``)."""
        lib.free(ops)
        lib.fuse_opt_free_args(args)

    def _check_fuse_device(self, path: str) -> None:
        if not os.path.exists(path):
            raise ServeError(
                f"{path} does not exist: load the fuse module (modprobe fuse) "
                "or, in a container, pass --device /dev/fuse"
            )
        if not os.access(path, os.R_OK | os.W_OK):
            raise ServeError(f"no permission to open {path}: run as root (or with CAP_SYS_ADMIN)")

    def clean_stale(self) -> None:
        """Remove mounts a crashed run left at the node path or our mount dir."""
        ours = {str(self.node), str(self.mount_dir)}
        for m in reversed(mounts()):
            if m.mount_point not in ours:
                continue
            if m.fs_type == FS_TYPE and is_stale(m.mount_point):
                log.warning("cdev.stale_mount_removed", path=m.mount_point)
                detach(m.mount_point)
            elif m.mount_point == str(self.node):
                what = "another cdev server" if m.fs_type == FS_TYPE else m.fs_type
                raise ServeError(f"node path {self.node} is busy: {what} is mounted on it")
            elif m.fs_type == FS_TYPE:
                raise ServeError(
                    f"{self.mount_dir} is served by another running daemon; stop it first"
                )

    def _prepare_node(self) -> None:
        parent = self.node.parent
        if not parent.is_dir():
            raise ServeError(f"cannot create {self.node}: {parent} is not a directory")
        if self.node.is_symlink() or (self.node.exists() and not self.node.is_file()):
            if self.node.is_char_device():
                raise ServeError(
                    f"node path {self.node} is busy: a real character device is there "
                    "(a kernel driver owns that path)"
                )
            raise ServeError(f"node path {self.node} is busy: not a regular file")
        record = self.run_dir / f"{self.name}.node"  # which file is our placeholder
        if self.node.exists():
            if self._recorded(record) != self._identity(self.node):
                return  # somebody else's file: bound over, and left as it was
            # An earlier run was killed before it could remove its placeholder.
            log.info("cdev.stale_node_taken_over", path=str(self.node))
        else:
            fd = os.open(self.node, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
            record.write_text(self._identity(self.node) + "\n")
        self._created.insert(0, record)
        self._created.append(self.node)

    @staticmethod
    def _identity(path: pathlib.Path) -> str:
        st = os.stat(path)
        return f"{st.st_dev}:{st.st_ino}"

    @staticmethod
    def _recorded(record: pathlib.Path) -> str | None:
        try:
            return record.read_text().strip()
        except OSError:
            return None

    def _start_fuse(self) -> int:
        self._check_fuse_device(FUSE_DEVICE)
        self.clean_stale()
        for d in (self.run_dir, self.mount_dir):
            if not d.is_dir():
                d.mkdir(mode=0o755, parents=True, exist_ok=True)
                self._created.insert(0, d)
        self._prepare_node()
        opts = f"allow_other,default_permissions,fsname=cdev:{self.name},subtype=cdev"
        args = self._args(["-o", opts])
        ops = lib.cdev_new_ops()
        se = lib.fuse_session_new(args, ops, lib.cdev_ops_size(), self.session.userdata)
        self._free_setup(args, ops)
        if se == ffi.NULL:
            raise ServeError("libfuse could not create a session (see the libfuse log line)")
        self.session.se = se
        if lib.fuse_session_mount(se, str(self.mount_dir).encode()) != 0:
            raise ServeError(f"mounting FUSE at {self.mount_dir} failed (see the libfuse log line)")
        self._mounted = True
        return lib.fuse_session_fd(se)

    def _bind(self) -> None:
        """Runs in a worker thread: the bind looks the source up through our own loop."""
        src = str(self.mount_dir / self.name).encode()
        if lib.mount(src, str(self.node).encode(), ffi.NULL, lib.MS_BIND, ffi.NULL) != 0:
            err = ffi.errno
            raise ServeError(f"bind-mounting onto {self.node} failed: {os.strerror(err)}")
        self._bound = True

    def _start_cuse(self, ready: trio.Event) -> int:
        self._check_fuse_device(CUSE_DEVICE)
        if cuse.registered_devt(self.name) is not None:
            raise ServeError(f"node path {self.node} is busy: a CUSE device named {self.name} exists already")
        if os.path.lexists(self.node):
            what = "a character device" if self.node.is_char_device() else "a file"
            raise ServeError(f"node path {self.node} is busy: {what} is there already")
        devname = ffi.new("char[]", f"DEVNAME={self.name}".encode())
        argv = ffi.new("const char *[]", [devname])
        ci = ffi.new("struct cuse_info *")
        ci.dev_info_argc = 1
        ci.dev_info_argv = argv
        ci.flags = lib.CUSE_UNRESTRICTED_IOCTL
        ops = lib.cdev_new_cuse_ops()
        self._keep.extend([devname, argv, ci])
        args = self._args([])
        se = lib.cuse_lowlevel_new(args, ci, ops, self.session.userdata)
        self._free_setup(args, ops)
        if se == ffi.NULL:
            raise ServeError("libfuse could not create a CUSE session")
        self.session.se = se
        fd = os.open(CUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        if lib.fuse_session_mount(se, f"/dev/fd/{fd}".encode()) != 0:
            os.close(fd)
            raise ServeError(f"attaching to {CUSE_DEVICE} failed")
        self._mounted = True
        self.session.on_init_done = ready.set
        return lib.fuse_session_fd(se)

    # -- running --------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mount, report started once the node is in place, serve until cancelled.

        Raises :class:`SessionEnded` if the kernel ends the session while it serves.
        """
        try:
            ready = trio.Event()
            ended = False

            async def run_session(fd: int) -> None:
                nonlocal ended
                try:
                    await self.session.run(fd)
                finally:
                    ended = True
                    ready.set()  # nothing more will come: wake the set-up below

            if self.transport == "fuse":
                fd = self._start_fuse()
            else:
                fd = self._start_cuse(ready)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_session, fd)
                if self.transport == "cuse":
                    await ready.wait()
                    # libfuse reports init done as soon as it has answered; the kernel
                    # may still have refused the name (it then aborts the connection).
                    if ended or _connection_aborted(fd):
                        raise ServeError(
                            f"node path {self.node} is busy: the kernel refused CUSE device "
                            f"{self.name} (another daemon registered that name first)"
                        )
                    await self._wait_cuse_node()
                else:
                    await trio.to_thread.run_sync(self._bind)
                    await self._check_bound()
                log.info("cdev.node_ready", node=str(self.node), transport=self.transport)
                task_status.started()
            raise SessionEnded(f"the kernel ended the session serving {self.node}; the node is gone")
        finally:
            with trio.CancelScope(shield=True):
                self.teardown()

    async def _wait_cuse_node(self) -> None:
        """CUSE: until devtmpfs (or udev) shows our device at the node path (a stat:
        an open would need the node's permissions and the unit's device policy)."""
        for _ in range(200):
            devt = cuse.registered_devt(self.name)
            with contextlib.suppress(OSError):
                st = os.stat(self.node)
                if devt is not None and stat.S_ISCHR(st.st_mode) and st.st_rdev == devt:
                    return
            await trio.sleep(0.05)
        raise ServeError(f"{self.node} did not appear (is devtmpfs mounted on /dev?)")

    async def _check_bound(self) -> None:
        """FUSE: the node now answers from our own loop (a stat, not an open, as above)."""
        path = str(self.node)
        try:
            st = await trio.to_thread.run_sync(os.stat, path)
        except OSError as e:
            reason = e.strerror
        else:
            if stat.S_ISREG(st.st_mode) and st.st_dev != os.stat(self.node.parent).st_dev:
                return
            reason = "the placeholder file is still there"
        raise ServeError(f"{path} is not served after binding: {reason}")

    def teardown(self) -> None:
        """Unmount and remove what this server created; safe to call twice."""
        if self._bound:
            with contextlib.suppress(OSError):
                detach(str(self.node))
            self._bound = False
        se = self.session.se
        if se != ffi.NULL:
            if self._mounted:
                lib.fuse_session_unmount(se)
                self._mounted = False
                if self.transport == "fuse":
                    # libfuse leaves the mount alone when the connection was aborted
                    with contextlib.suppress(OSError):
                        detach(str(self.mount_dir))
            lib.fuse_session_destroy(se)
            self.session.se = ffi.NULL
        for path in self._created:
            with contextlib.suppress(OSError):
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink()
        self._created.clear()
