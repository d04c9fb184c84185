"""The daemon: one trio run wiring the hypervisor, the HSM, the node and the control socket.

Nurseries: the node's server (cdev) and the control socket live in one root
nursery; SIGINT/SIGTERM cancel it; clean-up runs shielded in ``finally``.
Readiness (``READY=1``) is sent once the node can be opened and the control
socket listens; then ``STATUS=`` whenever the VM count changes, ``WATCHDOG=1``
when systemd asks for it, and ``STOPPING=1`` on the way out. With a command
(``serve -- CMD``) the daemon runs it once ready and exits with its status.
"""

from __future__ import annotations

import array
import concurrent.futures
import contextlib
import errno
import json
import os
import pathlib
import signal
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog
import trio

from acrn_hsm_emu import launcher, publish, recording
from acrn_hsm_emu.config import DEFAULT_NODE, DEFAULT_RUN_DIR, Settings, format_listen
from acrn_hsm_emu.hsm import admin
from acrn_hsm_emu.hsm.hsm import HsmDevice
from acrn_hsm_emu.hypervisor.api import Access
from acrn_hsm_emu.hypervisor.hypervisor import Hypervisor
from acrn_hsm_emu.hypervisor.vcpu import AccessAborted
from acrn_hsm_emu.memory import MemoryFault
from acrn_hsm_emu.observe import metrics
from acrn_hsm_emu.observe.events import BUS
from acrn_hsm_emu.observe.pending import PendingAges
from acrn_hsm_emu.observe.trace import TRACE, Filter
from acrn_hsm_emu.sdnotify import Notifier
from cdev.server import ServeError, Server, SessionEnded

log = structlog.get_logger("acrn_hsm_emu.daemon")
ErrorT = TypeVar("ErrorT", bound=BaseException)

__all__ = [
    "DEFAULT_NODE", "DEFAULT_RUN_DIR", "Daemon", "SessionEnded", "Settings", "StartError", "first_exception",
]

STATUS_POLL_S = 1.0  # how often the VM count is compared for STATUS= (and pending requests sampled)
STREAMS = ("trace", "events")  # control commands that stream until the client hangs up
STREAM_BATCH = 256  # records sent in one write at most
# The service manager's variables are the daemon's, not its command's.
_SERVICE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


class StartError(Exception):
    """The daemon cannot start: one readable sentence."""


def first_exception(group: BaseExceptionGroup[ErrorT]) -> ErrorT:
    """The first leaf of a (nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc  # type: ignore[return-value]


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


RECORD_LEASE_S = 10.0  # a recording nobody asked about for this long is dropped


class Daemon:
    def __init__(
        self,
        settings: Settings,
        command: Sequence[str] = (),
        tasks: Sequence[Callable[[Daemon, trio.CancelScope], Awaitable[None]]] = (),
    ) -> None:
        self.settings = settings
        self.command = list(command)
        self.tasks = list(tasks)  # started once serving, with the root scope (replay's watch)
        self._record_leases: dict[int, tuple[float, float]] = {}  # vmid -> (deadline, lease)
        self.exit_code = 0  # the command's exit status, when there is one
        self.notifier = Notifier()
        try:
            self.hypervisor = Hypervisor(
                settings.scenario,
                backend=settings.backend,
                workload=settings.workload,
                vcpu_cpus=settings.vcpu_cpus,
                vcpu_poll_us=settings.vcpu_poll_us,
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
        self._made_dirs: list[pathlib.Path] = []
        self.pending = PendingAges()
        self.metrics_registry: Any = None
        self.metrics_endpoint: metrics.Endpoint | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Installed first, so a signal during start-up also stops us cleanly.
        signals = trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
        try:
            with signals as signal_aiter, trio.CancelScope() as root:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._signals, signal_aiter, root)
                    await self._serve(nursery, task_status)
                    if self.command:
                        nursery.start_soon(self._run_command, root)
                    for task in self.tasks:
                        nursery.start_soon(task, self, root)
        finally:
            self.notifier.notify("STOPPING=1")
            with trio.CancelScope(shield=True):
                if self.device is not None:
                    self.device.close()
                self.hypervisor.shutdown()
                for d in self._made_dirs:
                    with contextlib.suppress(OSError):  # kept when not empty
                        d.rmdir()
            log.info("daemon.stopped")

    async def _serve(self, nursery: trio.Nursery, task_status: trio.TaskStatus[None]) -> None:
        s = self.settings
        self.device = HsmDevice(
            self.hypervisor,
            nursery=nursery,
            ioeventfd_mismatch="forward" if self.settings.ioeventfd_mismatch == "forward" else "drop",
            express=self.settings.express == "on",
            express_poll_us=self.settings.express_poll_us,
            profile=self.settings.abi,
        )
        # The control socket first: a second daemon for this node stops here, before serving it.
        control = await self._listen(s.control_path, s.node)
        served = False
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
            if self.server.transport == "cuse":
                self._own_device_node()
            served = True
        # The server's errors may come wrapped in the groups of its own nursery.
        except* ServeError as group:
            raise StartError(str(first_exception(group))) from None
        except* OSError as group:
            e = first_exception(group)
            reason = f"{e.filename}: {e.strerror}" if e.filename else e.strerror or str(e)
            raise StartError(f"cannot serve {s.node}: {reason}") from None
        finally:
            if not served:
                control.close()
                with contextlib.suppress(OSError):
                    os.unlink(s.control_path)
        await nursery.start(self._control_server, control)
        self.metrics_registry = metrics.registry(metrics.HsmCollector(self.device, self.hypervisor))
        if s.metrics_listen is not None:
            await self._serve_metrics(nursery, *s.metrics_listen)
        status = self._status_line()
        self.notifier.notify("READY=1", status)
        nursery.start_soon(self._status_loop, status)
        nursery.start_soon(self._record_leases_loop)
        log.info(
            "daemon.serving",
            node=s.node,
            transport=self.server.transport,
            backend=s.backend,
            control=s.control_path,
            config=s.config_file or "none (built-in defaults)",
            scenario=s.scenario_file or "built-in",
            abi=s.abi,
            pid=os.getpid(),
        )
        task_status.started()

    async def _serve_metrics(self, nursery: trio.Nursery, host: str, port: int) -> None:
        endpoint = metrics.Endpoint(self.metrics_registry)
        try:
            await nursery.start(endpoint.serve, host, port)
        except OSError as e:
            where = format_listen((host, port))
            raise StartError(f"cannot serve metrics on {where}: {e.strerror or e}") from None
        self.metrics_endpoint = endpoint
        assert endpoint.address is not None
        log.info("metrics.serving", address=endpoint.address[0], port=endpoint.address[1])

    def _own_device_node(self) -> None:
        """CUSE: the kernel makes the node root's and 0600; apply the configured owner and mode.

        (A FUSE node carries them in its attributes: cdev's session answers getattr with them.)
        """
        s = self.settings
        # the mode while root still owns it: after the chown, chmod would need CAP_FOWNER,
        # which the unit does not grant
        os.chmod(s.node, s.node_mode)
        os.chown(s.node, s.node_uid, s.node_gid)

    def _status_line(self) -> str:
        # the count only: a full snapshot summarises every vCPU's cycle ring, which
        # with 32 vCPUs held the trio thread ~0.2 s of every second
        vms = len(self.device.dispatcher.vms) if self.device else 0
        s = self.settings
        transport = self.server.transport if self.server else s.transport
        return f"STATUS=serving {s.node} ({transport}, {s.backend}): {vms} VM(s)"

    async def _signals(self, signals: Any, scope: trio.CancelScope) -> None:
        async for signum in signals:
            log.info("daemon.shutting_down", signal=signal.Signals(signum).name)
            scope.cancel()
            return

    async def _status_loop(self, last: str) -> None:
        """STATUS= when the VM count changes; WATCHDOG=1 every half watchdog interval.

        The pings come from the trio loop itself, so a stuck loop stops them.
        """
        watchdog = self.notifier.watchdog_interval()
        next_ping = trio.current_time()
        while True:
            line = self._status_line()
            if line != last:
                self.notifier.notify(line)
                last = line
            if self.device is not None:
                self.pending.sample(self.device, self.hypervisor)
            if watchdog is not None and trio.current_time() >= next_ping:
                self.notifier.notify("WATCHDOG=1")
                next_ping = trio.current_time() + watchdog
            await trio.sleep(min(watchdog or STATUS_POLL_S, STATUS_POLL_S))

    async def _run_command(self, scope: trio.CancelScope) -> None:
        """``serve -- CMD``: run CMD against the ready node, then stop with its exit status.

        CMD runs through the launcher (``acrn-hsm-emu run``, launcher.py), a process of its
        own, so that its value-argument ioctls (SET_IRQLINE) reach a FUSE node too."""
        env = {k: v for k, v in os.environ.items() if k not in _SERVICE_ENV}
        s = self.settings
        log.info("daemon.command_started", argv=self.command)
        try:
            launcher.resolve(self.command[0])
            argv = launcher.argv_for(s.node, self.command, s.log_format, s.log_level)
            # On cancellation (SIGTERM to us) trio terminates it, then kills it after 5 s;
            # the launcher passes the signal on to CMD.
            proc = await trio.run_process(argv, check=False, stdin=None, env=env)
        except (OSError, launcher.LaunchError) as e:
            error = e.strerror or str(e) if isinstance(e, OSError) else str(e)
            log.error("daemon.command_not_started", argv=self.command, error=error)
            self.exit_code = 127
        else:
            rc = proc.returncode
            self.exit_code = rc if rc >= 0 else 128 - rc
            log.info("daemon.command_exited", argv=self.command, status=self.exit_code)
        scope.cancel()

    # -- control socket -------------------------------------------------

    async def _control_server(
        self, sock: trio.socket.SocketType, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        path = self.settings.control_path
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._control_client, [listener], handler_nursery=nursery)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def _listen(self, path: str, node: str) -> trio.socket.SocketType:
        """Bind and listen (accepting starts once the node is served); StartError if taken."""
        try:
            parent = pathlib.Path(path).parent
            if not parent.is_dir():
                parent.mkdir(mode=0o755, parents=True)
                self._made_dirs.append(parent)  # removed at the stop, as cdev removes its own
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as probe:
                        # Accepted, or a full backlog (EAGAIN): someone listens. Refused: a crashed run's.
                        if probe.connect_ex(path) in (0, errno.EAGAIN):
                            raise StartError(
                                f"control socket {path} is in use by another running daemon "
                                f"(is {node} served already?); stop it or give this one another --control"
                            )
                        os.unlink(path)
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)  # the socket is created 0600
            try:
                await sock.bind(path)
            except OSError:
                sock.close()
                raise
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            sock.listen(16)
        except OSError as e:
            raise StartError(f"cannot listen on the control socket {path}: {e.strerror or e}") from None
        return sock

    async def _control_client(self, stream: trio.SocketStream) -> None:
        """One control connection; whatever goes wrong in it ends it, never the daemon."""
        try:
            await self._control_connection(stream)
        except Exception:  # an exception group of them too (a stream's nursery)
            log.exception("control.connection_failed")

    async def _control_connection(self, stream: trio.SocketStream) -> None:
        # Only root or the daemon's own user may talk to it, whatever the mode says.
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        peer_uid = int.from_bytes(creds[4:8], "little")
        if peer_uid not in (0, os.geteuid()):
            log.warning("control.connection_refused", uid=peer_uid)
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
                    stream_req = self._stream_request(line)
                    if stream_req is not None:
                        await self._stream(stream, stream_req)
                        return
                    reply, fd = await self._control_request(line)
                    payload = json.dumps(reply).encode() + b"\n"
                    try:
                        if fd is None:
                            await stream.send_all(payload)
                        else:
                            fds = array.array("i", [fd])
                            await stream.socket.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        return
                    finally:
                        if fd is not None:
                            os.close(fd)

    @staticmethod
    def _stream_request(line: bytes) -> dict[str, Any] | None:
        """The request, when it asks for a stream (trace, events); else None."""
        try:
            req = json.loads(line)
        except ValueError:
            return None
        return req if isinstance(req, dict) and req.get("cmd") in STREAMS else None

    async def _stream(self, stream: trio.SocketStream, req: dict[str, Any]) -> None:
        """``trace`` or ``events``: a reply, then one JSON line per record until the client
        hangs up (what it sends meanwhile is ignored). Records that do not fit in the
        connection's queue are dropped and counted, never waited for."""
        want = req.get("node")
        reply: dict[str, Any]
        if want is not None and want != self.settings.node:
            reply = {"ok": False, "error": f"this daemon serves {self.settings.node}, not {want}"}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            return
        if req["cmd"] == "trace":
            try:
                flt = Filter.from_request(req)
            except ValueError as e:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(json.dumps({"ok": False, "error": str(e)}).encode() + b"\n")
                return
            sub = TRACE.subscribe(flt)
            receive: trio.MemoryReceiveChannel[dict[str, Any]] = sub.receive
            log.info("trace.client_attached", filter=req.get("what", "all"), vm=flt.vm, vcpu=flt.vcpu,
                     errors=flt.errors, tracers=len(TRACE.subscribers))

            def stop() -> None:
                TRACE.unsubscribe(sub)
                log.info("trace.client_detached", tracers=len(TRACE.subscribers))
        else:
            send, receive = BUS.listen(recent=bool(req.get("recent")))
            log.info("events.client_attached", listeners=len(BUS.listeners))

            def stop() -> None:
                BUS.unlisten(send)
                log.info("events.client_detached", listeners=len(BUS.listeners))

        try:
            await stream.send_all(json.dumps({"ok": True, "result": {"streaming": req["cmd"]}}).encode() + b"\n")
            async with trio.open_nursery() as nursery:

                async def hang_up() -> None:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        while await stream.receive_some(4096):
                            pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(hang_up)
                async for rec in receive:
                    batch = [rec]
                    while len(batch) < STREAM_BATCH:
                        try:
                            batch.append(receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    try:
                        await stream.send_all(b"".join(json.dumps(r).encode() + b"\n" for r in batch))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        break  # the client went away (killed, Ctrl-C): the end of its stream
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            stop()

    async def _control_request(self, line: bytes) -> tuple[dict[str, Any], int | None]:
        """The reply to one request line, and a descriptor to pass along with it (node-tree)."""
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a request is a JSON object")
            cmd = req.get("cmd")
            want = req.get("node")  # the node the client means (the CLI's --node); None: any
            if want is not None and want != self.settings.node:
                return {"ok": False, "error": f"this daemon serves {self.settings.node}, not {want}"}, None
            if cmd == "status":
                return {"ok": True, "result": self.status()}, None
            if cmd == "cpuid":
                vm = req.get("vm")
                regs = self.hypervisor.cpuid(
                    int(req["leaf"]), int(req.get("subleaf", 0)), None if vm is None else int(vm)
                )
                return {"ok": True, "result": list(regs)}, None
            if cmd == "inject":
                access = parse_access(req["access"])
                fut = self.hypervisor.inject(int(req["vm"]), int(req["vcpu"]), access)
                with trio.fail_after(float(req.get("timeout", 30))):
                    value = await await_future(fut)
                return {"ok": True, "result": value}, None
            if cmd == "node-tree":
                return self._node_tree()
            if cmd == "record":  # hypervisor/record.py, recording.py
                result = {**recording.control(self.hypervisor, req), "node": self.settings.node}
                self._record_lease(req)
                return {"ok": True, "result": result}, None
            if cmd == "metrics":
                return {"ok": True, "result": metrics.exposition(self.metrics_registry).decode()}, None
            if cmd in ("vm-list", "vm-pause", "vm-destroy"):
                return {"ok": True, "result": self._vm_command(cmd, req)}, None
            return {"ok": False, "error": f"unknown command {cmd!r}"}, None
        except trio.TooSlowError:
            return {"ok": False, "error": "the access did not complete (is a client serving the VM?)"}, None
        except (AccessAborted, MemoryFault) as e:
            return {"ok": False, "error": f"the access was abandoned: {e}"}, None
        except (ValueError, KeyError, TypeError, OverflowError, json.JSONDecodeError) as e:
            return {"ok": False, "error": str(e) or type(e).__name__}, None
        except Exception as e:
            log.exception("control.request_failed")
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}, None

    def _record_lease(self, req: dict[str, Any]) -> None:
        """A recording lives while its ``record`` asks about it: each request renews its lease
        (``lease`` seconds, set at start; the CLI polls every 0.1 s); stop ends it."""
        vmid = int(req["vm"])
        if req.get("action") == "stop":
            self._record_leases.pop(vmid, None)
            return
        lease = self._record_leases.get(vmid, (0.0, float(req.get("lease") or RECORD_LEASE_S)))[1]
        if req.get("action") == "start":
            lease = float(req.get("lease") or RECORD_LEASE_S)
        self._record_leases[vmid] = (trio.current_time() + lease, lease)

    async def _record_leases_loop(self) -> None:
        """Drop the recordings whose ``record`` went away without stopping them (SIGKILL):
        nothing would ever collect them, and a recording grows with the VM's I/O."""
        while True:
            await trio.sleep(0.5)
            now = trio.current_time()
            for vmid, (deadline, lease) in list(self._record_leases.items()):
                if now < deadline:
                    continue
                del self._record_leases[vmid]
                if self.hypervisor.recording(vmid) is None:
                    continue
                rec = self.hypervisor.record_stop(vmid)
                log.warning("record.abandoned", vmid=vmid, lease_s=lease, accesses=rec.summary().get("accesses"))

    def _vm_command(self, cmd: str, req: dict[str, Any]) -> Any:
        """``acrn-hsm-emu vm``: list, pause or destroy any User VM (hsm/admin.py)."""
        assert self.device is not None
        if cmd == "vm-list":
            return admin.vm_list(self.device)
        vmid = int(req["vm"])
        log.info("control.vm_command", command=cmd, vmid=vmid)
        if cmd == "vm-pause":
            admin.pause(self.device, vmid)
        else:
            admin.destroy(self.device, vmid)
        return None

    def _node_tree(self) -> tuple[dict[str, Any], int | None]:
        """For ``publish``: a detached clone of the node's mount (FUSE), and where it belongs."""
        assert self.server is not None
        node = self.settings.node
        result = {"node": node, "pid": os.getpid(), "transport": self.server.transport}
        if self.server.transport != "fuse":
            return {"ok": True, "result": result}, None  # a device node: every namespace sees it
        try:
            fd = publish.clone_tree(node)
        except OSError as e:
            return {"ok": False, "error": f"cannot clone the mount of {node}: {e.strerror}"}, None
        return {"ok": True, "result": result}, fd

    def status(self) -> dict[str, Any]:
        assert self.device is not None
        hv = self.hypervisor.snapshot()
        return {
            "pid": os.getpid(),
            "node": self.settings.node,
            "control": self.settings.control_path,
            "transport": self.server.transport if self.server else None,
            "reader": self.server.session.reader_snapshot() if self.server else {"native": False},
            "backend": self.settings.backend,
            "abi": self.settings.abi,
            "placement": {
                "service_cpus": sorted(os.sched_getaffinity(0)),
                **self.hypervisor.placement.snapshot(),
            },
            "hsm": self.device.snapshot(hv),
            "hypervisor": hv,
            "pending": self.pending.sample(self.device, self.hypervisor),
            "metrics": None if self.metrics_endpoint is None or self.metrics_endpoint.address is None
            else {"address": self.metrics_endpoint.address[0], "port": self.metrics_endpoint.address[1]},
            "observers": {"tracers": len(TRACE.subscribers), "event_listeners": len(BUS.listeners)},
        }
