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
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from cdev._fuse import ffi, lib
from cdev.device import Device
from cdev.session import Session

log = structlog.get_logger("cdev")

FS_TYPE = "fuse.cdev"
CUSE_DEVICE = "/dev/cuse"
FUSE_DEVICE = "/dev/fuse"


class ServeError(Exception):
    """Why a node cannot be served: one readable sentence, no traceback needed."""


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


def available_transport(requested: str) -> str:
    """Resolve ``auto`` to ``cuse`` where the kernel has it, else ``fuse``."""
    if requested == "auto":
        return "cuse" if os.path.exists(CUSE_DEVICE) else "fuse"
    return requested


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
        self.transport = available_transport(transport)
        if self.transport not in ("fuse", "cuse"):
            raise ServeError(f"unknown transport {transport!r} (auto, fuse or cuse)")
        self.run_dir = pathlib.Path(run_dir)
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
                log.warning("removing stale mount from an earlier run", path=m.mount_point)
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
        if not self.node.exists():
            fd = os.open(self.node, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
            self._created.append(self.node)

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
        self._keep.append(ops)
        se = lib.fuse_session_new(args, ops, lib.cdev_ops_size(), self.session.userdata)
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
        devname = ffi.new("char[]", f"DEVNAME={self.name}".encode())
        argv = ffi.new("const char *[]", [devname])
        ci = ffi.new("struct cuse_info *")
        ci.dev_info_argc = 1
        ci.dev_info_argv = argv
        ci.flags = lib.CUSE_UNRESTRICTED_IOCTL
        ops = lib.cdev_new_cuse_ops()
        self._keep.extend([devname, argv, ci, ops])
        se = lib.cuse_lowlevel_new(self._args([]), ci, ops, self.session.userdata)
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
        """Mount, report started once the node can be opened, serve until cancelled."""
        try:
            cuse_ready = trio.Event()
            if self.transport == "fuse":
                fd = self._start_fuse()
            else:
                fd = self._start_cuse(cuse_ready)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.session.run, fd)
                if self.transport == "cuse":
                    await cuse_ready.wait()
                else:
                    await trio.to_thread.run_sync(self._bind)
                await self._wait_openable()
                log.info("node ready", node=str(self.node), transport=self.transport)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                self.teardown()

    async def _wait_openable(self) -> None:
        """Open the node from a worker thread: our own loop answers the open."""
        path = str(self.node)
        for _ in range(200):
            try:
                fd = await trio.to_thread.run_sync(os.open, path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
                    raise ServeError(f"{path} cannot be opened: {e.strerror}") from None
                await trio.sleep(0.05)  # CUSE: udev/devtmpfs has not made it yet
                continue
            await trio.to_thread.run_sync(os.close, fd)
            return
        raise ServeError(f"{path} did not appear")

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
            lib.fuse_session_destroy(se)
            self.session.se = ffi.NULL
        for path in self._created:
            with contextlib.suppress(OSError):
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink()
        self._created.clear()
