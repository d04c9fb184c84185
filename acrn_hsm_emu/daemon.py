"""The daemon: one trio run wiring the hypervisor, the HSM, the node and the control socket.

Nurseries: the node's server (cdev) and the control socket live in one root
nursery; SIGINT/SIGTERM cancel it; clean-up runs shielded in ``finally``.
Readiness (``READY=1``) is sent once the node can be opened and the control
socket listens.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import os
import pathlib
import signal
import socket
import stat
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from acrn_hsm_emu.hsm.device import HsmDevice
from acrn_hsm_emu.hypervisor.api import Access
from acrn_hsm_emu.hypervisor.hypervisor import Hypervisor
from acrn_hsm_emu.hypervisor.vcpu import AccessAborted
from acrn_hsm_emu.memory import MemoryFault
from acrn_hsm_emu.sdnotify import Notifier
from cdev.server import ServeError, Server

log = structlog.get_logger("acrn_hsm_emu.daemon")

DEFAULT_RUN_DIR = "/run/acrn-hsm-emu"
DEFAULT_NODE = "/dev/acrn_hsm"


class StartError(Exception):
    """The daemon cannot start: one readable sentence."""


@dataclass
class Settings:
    node: str = DEFAULT_NODE
    transport: str = "auto"
    backend: str = "scripted"
    scenario: str | None = None
    workload: str | None = None
    run_dir: str = DEFAULT_RUN_DIR
    control: str | None = None  # default: <run_dir>/control.sock
    node_mode: int = 0o600
    node_uid: int = 0
    node_gid: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def control_path(self) -> str:
        return self.control or os.path.join(self.run_dir, "control.sock")


async def await_future(fut: concurrent.futures.Future[Any]) -> Any:
    """Wait for a thread-side future without blocking the trio thread."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    fut.add_done_callback(lambda _f: token.run_sync_soon(done.set))
    await done.wait()
    return fut.result()


def parse_access(spec: dict[str, Any]) -> Access:
    """An Access from the control protocol's fields (validated by the hypervisor too)."""
    kind = spec.get("kind")
    if kind not in ("pio", "mmio", "pci"):
        raise ValueError(f"unknown access kind {kind!r} (pio, mmio or pci)")
    return Access(
        kind=str(kind),
        write=bool(spec.get("write")),
        addr=int(spec["addr"]),
        size=int(spec["size"]),
        value=int(spec.get("value", 0)),
    )


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.notifier = Notifier()
        try:
            self.hypervisor = Hypervisor(
                settings.scenario, backend=settings.backend, workload=settings.workload
            )
        except (OSError, ValueError) as e:
            raise StartError(str(e)) from None
        # The driver's module init (spec: hsm section 1), against the scenario's CPUID.
        rc = self.hypervisor.hsm_init_check()
        if rc == -errno.ENODEV:
            raise StartError(
                "the scenario's platform is not ACRN (no ACRNACRNACRN CPUID signature): "
                "the HSM would not load (ENODEV)"
            )
        if rc == -errno.EPERM:
            raise StartError(
                "the scenario's Service VM is not privileged (CPUID 0x40000001 bit 0 clear): "
                "the HSM would not load (EPERM)"
            )
        self.device: HsmDevice | None = None
        self.server: Server | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Installed first, so a signal during start-up also stops us cleanly.
        signals = trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
        try:
            with signals as signal_aiter, trio.CancelScope() as root:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._signals, signal_aiter, root)
                    await self._serve(nursery, task_status)
        finally:
            self.notifier.notify("STOPPING=1")
            with trio.CancelScope(shield=True):
                if self.device is not None:
                    self.device.close()
                self.hypervisor.shutdown()
            log.info("stopped")

    async def _serve(self, nursery: trio.Nursery, task_status: trio.TaskStatus[None]) -> None:
        s = self.settings
        self.device = HsmDevice(self.hypervisor, nursery=nursery)
        try:
            self.server = Server(
                self.device,
                s.node,
                transport=s.transport,
                run_dir=s.run_dir,
                mode=s.node_mode,
                uid=s.node_uid,
                gid=s.node_gid,
            )
            await nursery.start(self.server.serve)
            await nursery.start(self._control_server)
        except ServeError as e:
            raise StartError(str(e)) from None
        nursery.start_soon(self._status_loop)
        self.notifier.notify("READY=1", self._status_line())
        log.info(
            "serving",
            node=s.node,
            transport=self.server.transport,
            backend=s.backend,
            control=s.control_path,
            pid=os.getpid(),
        )
        task_status.started()

    def _status_line(self) -> str:
        vms = len(self.device.snapshot()["vms"]) if self.device else 0
        return f"STATUS=serving {self.settings.node}: {vms} VM(s)"

    async def _signals(self, signals: Any, scope: trio.CancelScope) -> None:
        async for signum in signals:
            log.info("shutting down", signal=signal.Signals(signum).name)
            scope.cancel()
            return

    async def _status_loop(self) -> None:
        """STATUS= when the VM count changes; WATCHDOG=1 at half the interval."""
        interval = self.notifier.watchdog_interval()
        last = ""
        while True:
            line = self._status_line()
            if line != last:
                self.notifier.notify(line)
                last = line
            if interval is not None:
                self.notifier.notify("WATCHDOG=1")
            await trio.sleep(min(interval or 1.0, 1.0))

    # -- control socket -------------------------------------------------

    async def _control_server(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        path = self.settings.control_path
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)  # a crashed run's socket
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._control_client, [listener], handler_nursery=nursery)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def _control_client(self, stream: trio.SocketStream) -> None:
        # Only root or the daemon's own user may talk to it, whatever the mode says.
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        peer_uid = int.from_bytes(creds[4:8], "little")
        if peer_uid not in (0, os.geteuid()):
            log.warning("control connection refused", uid=peer_uid)
            await stream.aclose()
            return
        buf = b""
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    reply = await self._control_request(line)
                    try:
                        await stream.send_all(json.dumps(reply).encode() + b"\n")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return

    async def _control_request(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            cmd = req.get("cmd")
            if cmd == "status":
                return {"ok": True, "result": self.status()}
            if cmd == "cpuid":
                vm = req.get("vm")
                regs = self.hypervisor.cpuid(
                    int(req["leaf"]), int(req.get("subleaf", 0)), None if vm is None else int(vm)
                )
                return {"ok": True, "result": list(regs)}
            if cmd == "inject":
                access = parse_access(req["access"])
                fut = self.hypervisor.inject(int(req["vm"]), int(req["vcpu"]), access)
                with trio.fail_after(float(req.get("timeout", 30))):
                    value = await await_future(fut)
                return {"ok": True, "result": value}
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        except trio.TooSlowError:
            return {"ok": False, "error": "the access did not complete (is a client serving the VM?)"}
        except (AccessAborted, MemoryFault) as e:
            return {"ok": False, "error": f"the access was abandoned: {e}"}
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            return {"ok": False, "error": str(e) or type(e).__name__}
        except Exception as e:
            log.exception("control request failed")
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    def status(self) -> dict[str, Any]:
        assert self.device is not None
        return {
            "pid": os.getpid(),
            "node": self.settings.node,
            "transport": self.server.transport if self.server else None,
            "backend": self.settings.backend,
            "hsm": self.device.snapshot(),
            "hypervisor": self.hypervisor.snapshot(),
        }
