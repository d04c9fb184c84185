"""docs/troubleshooting.md: every message it lists is produced here, and it lists every message.

The page's entries are its ``### `message` `` headings, ``<...>`` standing for
the varying part. Each entry names a trigger below: a situation that makes
the real program print it (command errors: stderr without the
``acrn-hsm-emu: `` prefix; log events: the JSON ``event``). A few cannot
happen on a healthy machine (libfuse failing, CUSE, which our kernels lack):
those are produced by running the daemon's own code with a fault injected.
The reverse check reads the message templates out of the code.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import functools
import io
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
import trio

from tests.conftest import REPO, VENV_BIN, Daemon, mounted_under
from tests.support.cbuild import build_c

PAGE = REPO / "docs" / "troubleshooting.md"
EXE = str(VENV_BIN / "acrn-hsm-emu")
PREFIX = "acrn-hsm-emu: "


def page_messages() -> list[str]:
    return re.findall(r"^### `(.+)`$", PAGE.read_text(), re.M)


def as_regex(message: str) -> re.Pattern[str]:
    parts = re.split(r"(<[^<>]+>)", message)
    return re.compile("".join(".*" if p.startswith("<") and p.endswith(">") else re.escape(p) for p in parts))


def candidates(output: str) -> list[str]:
    """What a reader would look up: each line, without the command prefix, or a log line's event."""
    out = []
    for line in output.splitlines():
        out.append(line)
        if line.startswith(PREFIX):
            out.append(line[len(PREFIX):])
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line)["event"])
    return out


# -- the situations ----------------------------------------------------------------------


class Scene:
    """Shared state of the triggers: a scratch directory, one running daemon, a cache."""

    def __init__(self, tmp: pathlib.Path) -> None:
        self.tmp = tmp
        self._daemon: Daemon | None = None
        self._n = 0

    def dir(self) -> pathlib.Path:
        self._n += 1
        d = self.tmp / f"t{self._n}"
        d.mkdir()
        return d

    @property
    def daemon(self) -> Daemon:
        if self._daemon is None:
            d = self.tmp / "main"
            d.mkdir()
            self._daemon = Daemon(d, "--backend", "scripted").start()
        return self._daemon

    def close(self) -> None:
        if self._daemon is not None and self._daemon.proc is not None:
            assert self._daemon.stop() == 0
            self._daemon.notify.close()


def run(*cmd: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False,
                       env={**os.environ, **(env or {})})
    return p.stdout + p.stderr


def serve(d: pathlib.Path, *args: str, wrap: tuple[str, ...] = (), env: dict[str, str] | None = None) -> str:
    """A daemon that stops by itself: `serve ... -- true` (start errors end it earlier)."""
    return run(*wrap, EXE, "serve", "--node", str(d / "acrn_hsm"), "--run-dir", str(d / "run"),
               "--log-format", "json", "--backend", "scripted", "--transport", "fuse", *args, "--", "true",
               env=env)


def in_namespace(script: str) -> tuple[str, ...]:
    """A private mount namespace running ``script`` (sh), then the command after it."""
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", script + ' && exec "$@"', "sh")


AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def cli(*args: str) -> str:
    return run(EXE, *args)


# configuration -----------------------------------------------------------------------------


def t_config(s: Scene) -> str:
    d = s.dir()
    cfg = d / "config.toml"
    cfg.write_text(textwrap.dedent(f"""\
        bogus = 1
        node = 5
        run_dir = ""
        transport = "usb"
        workload = "relative/ok.toml"
        control = "{'/' + 'x' * 200}"
        node_mode = "rw"
        node_owner = 1.5
        node_group = 4294967295
    """))
    cfg2 = d / "config2.toml"
    cfg2.write_text('node = "relative"\nnode_mode = 660\nnode_owner = "no-such-user-here"\n'
                    'express_poll_us = "soon"\nmetrics_listen = "localhost:http"\n')
    cfg3 = d / "config3.toml"
    cfg3.write_text('express_poll_us = 5000\nservice_cpus = "3-1"\nvcpu_cpus = "4095"\n')
    cfg4 = d / "config4.toml"
    cfg4.write_text('vcpu_cpus = "all"\n')
    return "\n".join([
        cli("check-config", "--config", str(cfg)),
        cli("check-config", "--config", str(cfg2)),
        cli("check-config", "--config", str(cfg3)),
        cli("check-config", "--config", str(cfg4)),
        cli("check-config", "--config", str(d / "missing.toml")),
    ])


def t_syntax(s: Scene) -> str:
    cfg = s.dir() / "config.toml"
    cfg.write_text("node = /dev/acrn_hsm\n")
    return cli("check-config", "--config", str(cfg))


def t_scenario_error(s: Scene) -> str:
    d = s.dir()
    (d / "scenario.toml").write_text("[platform]\npcpus = 0\n")
    return serve(d, "--scenario", str(d / "scenario.toml"))


# start-up ------------------------------------------------------------------------------------

SCENARIO = """\
[platform]
acrn = {acrn}
[[vm]]
load_order = "service"
name = "SOS"
cpu_affinity = 1
privileged = {privileged}
[[vm]]
load_order = "post"
cpu_affinity = 1
"""


def t_not_acrn(s: Scene) -> str:
    d = s.dir()
    (d / "s.toml").write_text(SCENARIO.format(acrn="false", privileged="true"))
    return serve(d, "--scenario", str(d / "s.toml"))


def t_not_privileged(s: Scene) -> str:
    d = s.dir()
    (d / "s.toml").write_text(SCENARIO.format(acrn="true", privileged="false"))
    return serve(d, "--scenario", str(d / "s.toml"))


def t_no_fuse_device(s: Scene) -> str:
    # A container started without --device /dev/fuse.
    return serve(s.dir(), wrap=in_namespace("mount -t tmpfs tmpfs /dev"))


def t_fuse_device_denied(s: Scene) -> str:
    d = s.dir()
    d.chmod(0o777)
    # A user without access to /dev/fuse (CAP_DAC_OVERRIDE only lets it run the venv's Python
    # from /root; access(2) ignores it for a non-root user).
    return serve(d, wrap=(*in_namespace(
        "mount -t tmpfs tmpfs /dev && mknod -m 0600 /dev/fuse c 10 229 && mknod -m 0666 /dev/null c 1 3"),
        *AS_NOBODY, "--inh-caps=+dac_override", "--ambient-caps=+dac_override"))


def t_node_mounted_on(s: Scene) -> str:
    d = s.dir()
    node = d / "acrn_hsm"
    return serve(d, wrap=in_namespace(f"touch {node} && mount --bind {node} {node}"))


def t_mount_dir_taken(s: Scene) -> str:
    other = s.dir()
    return run(EXE, "serve", "--node", str(other / "acrn_hsm"), "--run-dir", str(s.daemon.run_dir),
               "--control", str(other / "control.sock"), "--log-format", "json", "--", "true")


def t_no_parent(s: Scene) -> str:
    return serve(s.dir(), "--node", "/nonexistent-acrn-hsm-dir/acrn_hsm")


def t_char_device(s: Scene) -> str:
    return serve(s.dir(), "--node", "/dev/null")


def t_not_regular(s: Scene) -> str:
    d = s.dir()
    (d / "a_directory").mkdir()
    return serve(d, "--node", str(d / "a_directory"))


def t_no_sys_admin(s: Scene) -> str:
    return serve(s.dir(), wrap=("setpriv", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-sys_admin"))


def t_not_served(s: Scene) -> str:
    # The bind "succeeds" but nothing is mounted: the placeholder is what a lookup finds.
    return _serve_with_fault(s.dir() / "node", patches={}, server_patches={"_bind": lambda: None})


def t_cuse_node_path(s: Scene) -> str:
    return "\n".join([
        cli("check-config", "--transport", "cuse", "--node", str(s.dir() / "acrn_hsm")),
        cli("check-config", "--transport", "cuse", "--node", "/dev/acrn!hsm"),
    ])


CUSE_DEV = "mount -t tmpfs tmpfs /dev && mknod -m 0600 /dev/cuse c 10 203 && mknod -m 0666 /dev/null c 1 3"


def t_cuse_node_taken(s: Scene) -> str:
    # A file (say, a FUSE daemon's placeholder) already at the path CUSE would create.
    return serve(s.dir(), "--transport", "cuse", "--node", "/dev/acrn_hsm",
                 wrap=in_namespace(f"{CUSE_DEV} && touch /dev/acrn_hsm"))


def t_cuse_name_taken(s: Scene) -> str:
    # Another server's CUSE device of that name, as sysfs shows it.
    return serve(s.dir(), "--transport", "cuse", "--node", "/dev/acrn_hsm", wrap=in_namespace(
        f"{CUSE_DEV} && mount -t tmpfs tmpfs /sys/class && mkdir -p /sys/class/cuse/acrn_hsm "
        "&& echo 240:0 > /sys/class/cuse/acrn_hsm/dev"))


def t_cuse_name_refused(s: Scene) -> str:
    # Two daemons racing for one name: the second passed the check above, the kernel refuses it.
    if not os.path.exists("/dev/cuse"):
        pytest.skip("needs CUSE (/dev/cuse): `make test-vm` runs it")
    d = s.dir()
    node = f"/dev/acrn-hsm-refused-{os.getpid()}"
    first = Daemon(d, "--backend", "scripted", transport="cuse")
    first.node = pathlib.Path(node)
    first.args[first.args.index("--node") + 1] = node
    first.start()
    code = (
        "import os, sys, cdev.cuse\n"
        "cdev.cuse.registered_devt = lambda name: None\n"
        "real = os.path.lexists\n"
        f"os.path.lexists = lambda p: False if str(p) == {node!r} else real(p)\n"
        "from acrn_hsm_emu.cli import main\n"
        "sys.argv = ['acrn-hsm-emu'] + sys.argv[1:]\n"
        "sys.exit(main())\n"
    )
    try:
        return run(sys.executable, "-c", code, "serve", "--node", node, "--run-dir", str(d / "run2"),
                   "--transport", "cuse", "--backend", "scripted", "--control", str(d / "c2.sock"))
    finally:
        first.stop()


def t_node_lost(s: Scene) -> str:
    # The kernel ends the session under a serving daemon (fusectl's abort file).
    d = Daemon(s.dir(), "--backend", "scripted").start()
    control = pathlib.Path("/sys/fs/fuse/connections")
    if not mounted_under(control):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(control)], check=True)
    minor = os.minor(os.stat(d.run_dir / f"{d.node.name}.fuse").st_dev)
    (control / str(minor) / "abort").write_text("1")
    assert d.proc is not None
    d.proc.wait(timeout=60)
    return d.log()


def t_cannot_serve(s: Scene) -> str:
    return serve(s.dir(), "--node", "/proc/acrn_hsm")


def t_control_in_use(s: Scene) -> str:
    d = s.dir()
    return serve(d, "--control", str(s.daemon.control))


def t_cannot_listen(s: Scene) -> str:
    d = s.dir()
    (d / "control.sock").write_text("not a socket\n")
    return serve(d, "--control", str(d / "control.sock"))


def t_metrics_taken(s: Scene) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        return serve(s.dir(), "--metrics-listen", f"127.0.0.1:{taken.getsockname()[1]}")


def t_stale_mount(s: Scene) -> str:
    d = s.dir()
    first = Daemon(d, "--backend", "scripted").start()
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    first.notify.close()
    try:
        return serve(d)
    finally:
        for mp in reversed(mounted_under(d)):
            subprocess.run(["umount", "-l", mp], check=False)


def t_command_missing(s: Scene) -> str:
    d = s.dir()
    return run(EXE, "serve", "--node", str(d / "n"), "--run-dir", str(d / "run"), "--log-format", "json",
               "--backend", "scripted", "--", "/nonexistent-command")


def t_notify_socket(s: Scene) -> str:
    d = s.dir()
    return "\n".join([
        serve(d, env={"NOTIFY_SOCKET": str(d / "nobody-listens.sock")}),
        serve(d, env={"NOTIFY_SOCKET": "relative.sock", "WATCHDOG_USEC": "soon"}),
    ])


# in-process, with a fault injected into the real code ------------------------------------------


class FaultyLib:
    """cdev's libfuse binding with some functions replaced."""

    def __init__(self, real: Any, **overrides: Callable[..., Any]) -> None:
        self._real = real
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        return self._overrides.get(name) or getattr(self._real, name)


def _serve_with_fault(node: pathlib.Path, *, transport: str = "fuse", patches: dict[str, Any],
                      server_patches: dict[str, Any] | None = None, call: str = "serve",
                      run_dir: pathlib.Path | None = None) -> str:
    """Run cdev's Server on a test device with module attributes patched; the message it raises."""
    import cdev.server as server_mod
    from tests.support.testdev import TestDevice

    run = run_dir or node.parent / "run"
    saved = {k: getattr(server_mod, k) for k in patches}
    for k, v in patches.items():
        setattr(server_mod, k, v)
    message = ""

    async def main() -> None:
        nonlocal message
        try:
            server = server_mod.Server(TestDevice(), node, transport=transport, run_dir=run)
            for k, v in (server_patches or {}).items():
                setattr(server, k, v)
            async with trio.open_nursery() as nursery:
                if call == "serve":
                    await nursery.start(server.serve)
                else:
                    await getattr(server, call)()
                nursery.cancel_scope.cancel()
        except* server_mod.ServeError as group:
            from acrn_hsm_emu.daemon import first_exception

            message = PREFIX + str(first_exception(group))

    try:
        trio.run(main)
    finally:
        for k, v in saved.items():
            setattr(server_mod, k, v)
    assert not mounted_under(run.parent)
    return message


def _failing(err: int, ret: Any = -1) -> Callable[..., Any]:
    from cdev._fuse import ffi

    def f(*_a: Any) -> Any:
        ffi.errno = err
        return ret

    return f


def t_libfuse_session(s: Scene) -> str:
    from cdev._fuse import ffi, lib

    return _serve_with_fault(s.dir() / "node", patches={
        "lib": FaultyLib(lib, fuse_session_new=lambda *a: ffi.NULL)})


def t_bind_fails(s: Scene) -> str:
    from cdev._fuse import lib

    return _serve_with_fault(s.dir() / "node", patches={
        "lib": FaultyLib(lib, mount=_failing(errno.EPERM))})


def t_cuse_session(s: Scene) -> str:
    from cdev._fuse import ffi, lib

    return _serve_with_fault(
        pathlib.Path(f"/dev/acrn-hsm-test-{os.getpid()}"), transport="cuse", run_dir=s.dir() / "run",
        patches={"lib": FaultyLib(lib, cuse_lowlevel_new=lambda *a: ffi.NULL)},
        server_patches={"_check_fuse_device": lambda _path: None})


def t_cuse_attach(s: Scene) -> str:
    from cdev._fuse import ffi, lib

    fake_session = ffi.new("char[1]")
    return _serve_with_fault(
        pathlib.Path(f"/dev/acrn-hsm-test-{os.getpid()}"), transport="cuse", run_dir=s.dir() / "run",
        patches={
            "CUSE_DEVICE": "/dev/null",  # opens; the kernel's refusal is the mount below
            "lib": FaultyLib(lib, cuse_lowlevel_new=lambda *a: fake_session,
                             fuse_session_mount=lambda *a: -1, fuse_session_destroy=lambda *a: None),
        },
        server_patches={"_check_fuse_device": lambda _path: None})


def t_did_not_appear(s: Scene) -> str:
    import trio as trio_mod

    async def no_wait(_seconds: float) -> None:
        await trio_mod.lowlevel.checkpoint()

    # The node never exists (a CUSE node devtmpfs never made); the 10 s of polling run without sleeping.
    return _serve_with_fault(pathlib.Path(f"/dev/acrn-hsm-never-{os.getpid()}"), transport="cuse",
                             run_dir=s.dir() / "run", patches={"trio": _TrioWithSleep(no_wait)},
                             call="_wait_cuse_node")


class _TrioWithSleep:
    def __init__(self, sleep: Callable[[float], Any]) -> None:
        self.sleep = sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def t_unknown_transport(s: Scene) -> str:
    from cdev.server import ServeError, Server
    from tests.support.testdev import TestDevice

    try:
        Server(TestDevice(), s.dir() / "node", transport="usb")
    except ServeError as e:
        return PREFIX + str(e)
    return ""


def _daemon_object(s: Scene) -> Any:
    from acrn_hsm_emu.config import load
    from acrn_hsm_emu.daemon import Daemon as DaemonObj

    d = s.dir()
    return DaemonObj(load(None, {"node": str(d / "acrn_hsm"), "run_dir": str(d / "run"), "backend": "scripted"}))


def t_internal_error(s: Scene) -> str:
    daemon = _daemon_object(s)

    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    daemon.status = broken
    with structlog.testing.capture_logs() as logs:
        reply, _fd = trio.run(daemon._control_request, b'{"cmd": "status"}')
    daemon.hypervisor.shutdown()
    return "\n".join([f"{PREFIX}daemon: {reply['error']}", *(json.dumps({"event": e["event"]}) for e in logs)])


def t_connection_failed(s: Scene) -> str:
    """A control connection whose handling breaks: logged, the daemon object goes on."""
    daemon = _daemon_object(s)

    async def broken(stream: Any) -> None:
        raise RuntimeError("boom")

    daemon._control_connection = broken  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        trio.run(daemon._control_client, None)
    daemon.hypervisor.shutdown()
    return "\n".join(json.dumps({"event": e["event"]}) for e in logs)


def t_node_tree(s: Scene) -> str:
    daemon = _daemon_object(s)
    daemon.server = type("FakeServer", (), {"transport": "fuse"})()
    reply, fd = daemon._node_tree()  # the node does not exist: no mount to clone
    daemon.hypervisor.shutdown()
    assert fd is None
    return f"{PREFIX}daemon: {reply['error']}"


def t_unpublish_fails(s: Scene) -> str:
    import cdev.server as server_mod
    from acrn_hsm_emu import cli as cli_mod

    node = s.dir() / "acrn_hsm"
    saved = server_mod.mounts, server_mod.detach

    def detach(_path: str) -> None:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    server_mod.mounts = lambda: [server_mod.Mount(str(node), server_mod.FS_TYPE, "cdev:acrn_hsm")]
    server_mod.detach = detach
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = cli_mod.main(["unpublish", "--node", str(node), "--control", str(node.parent / "none.sock")])
    finally:
        server_mod.mounts, server_mod.detach = saved
    assert rc == 1
    return err.getvalue()


# the control socket --------------------------------------------------------------------------


def ctl(s: Scene, *args: str, wrap: tuple[str, ...] = ()) -> str:
    return run(*wrap, EXE, args[0], "--control", str(s.daemon.control), *args[1:])


def t_no_socket(s: Scene) -> str:
    return cli("status", "--control", str(s.dir() / "none.sock"))


def t_socket_denied(s: Scene) -> str:
    # CAP_DAC_READ_SEARCH: enough to run the venv's Python from /root, not to write to a socket.
    return ctl(s, "status", wrap=(*AS_NOBODY, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"))


def t_socket_refused(s: Scene) -> str:
    path = s.dir() / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a killed daemon leaves
        return cli("status", "--control", str(path))


def t_other_user(s: Scene) -> str:
    as_other = (*AS_NOBODY, "--inh-caps=+dac_override", "--ambient-caps=+dac_override")
    out = ctl(s, "status", wrap=as_other)
    return out + "\n" + s.daemon.log()


def t_no_answer(s: Scene) -> str:
    from acrn_hsm_emu import cli as cli_mod

    path = s.dir() / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen(1)  # accepts (in the kernel), never answers
        try:
            cli_mod.control_call(str(path), {"cmd": "status"}, timeout=0.2)
        except cli_mod.CliError as e:
            return PREFIX + str(e)
    return ""


def t_hypervisor_refuses(s: Scene) -> str:
    return ctl(s, "inject", "--vm", "9", "pio-read", "0x3f8", "1")


def t_access_timeout_and_abandoned(s: Scene) -> str:
    hold = subprocess.Popen([str(build_c("hsm_hold")), str(s.daemon.node), "hang"],
                            stdout=subprocess.PIPE, text=True)
    assert hold.stdout is not None
    try:
        vmid = hold.stdout.readline().split()[0].split("=")[1]
        # The first access reaches the client, which holds it: the inject gives up.
        late = ctl(s, "inject", "--vm", vmid, "--timeout", "0.5", "pio-read", "0x3f8", "1")
        assert hold.stdout.readline().startswith("holding"), late
        # The next one waits behind it until the client dies and its VM goes.
        waiting = subprocess.Popen([EXE, "inject", "--control", str(s.daemon.control), "--vm", vmid,
                                    "pio-read", "0x3f8", "1"], stderr=subprocess.PIPE, text=True)
        _wait_vcpu_queued(s, int(vmid))
    finally:
        hold.kill()
        hold.wait()
    _out, err = waiting.communicate(timeout=120)
    return late + err


def _wait_vcpu_queued(s: Scene, vmid: int) -> None:
    """Hang guard: until the daemon reports the second access queued on the vCPU."""
    for _ in range(2000):
        st = json.loads(ctl(s, "status", "--json"))
        vm = next((v for v in st["hypervisor"]["vms"] if v.get("vmid") == vmid), None)
        if vm and any(c.get("queued", 0) >= 1 for c in vm.get("vcpus", [])):
            return
    raise AssertionError("the second access never queued")


def raw_request(s: Scene, payload: bytes) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(60)
        c.connect(str(s.daemon.control))
        c.sendall(payload + b"\n")
        reply = json.loads(c.makefile("rb").readline())
    return f"{PREFIX}daemon: {reply['error']}"


def t_raw_protocol(s: Scene) -> str:
    return "\n".join([
        raw_request(s, b'{"cmd": "reboot"}'),
        raw_request(s, b"[1, 2]"),
        raw_request(s, b'{"cmd": "inject", "vm": 1, "vcpu": 0, "access": {"kind": "msr"}}'),
    ])


def t_trace_arguments(s: Scene) -> str:
    return "\n".join([
        cli("trace", "--ioctls", "--requests", "--control", str(s.tmp / "no-daemon.sock")),
        raw_request(s, b'{"cmd": "trace", "vm": -1}'),
        raw_request(s, b'{"cmd": "trace", "what": "everything"}'),
    ])


def t_inject_arguments(s: Scene) -> str:
    none = ["--control", str(s.tmp / "no-daemon.sock")]
    cases = [
        ["--vm", "1", "pio-read", "zz", "1"],
        ["--vm", "1", "pci-read", "0:zz", "0", "4"],
        ["--vm", "1", "pci-read", "00:20.0", "0", "4"],
        ["--vm", "1", "bogus"],
        ["--vm", "1", "pio-read", "0x3f8"],
        ["--vm", "1", "pci-read", "00:1f.0", "0x1000", "4"],
        ["--vm", "1", "pio-read", "0x3f8", "3"],
        ["--vm", "1", "pio-write", "0x3f8", "1", "0x100"],
        ["--vm", "1", "pio-read", "0x10000", "1"],
        ["--vm", "1", "mmio-read", "0x10000000000000000", "4"],
        ["--vm", "one", "pio-read", "0x3f8", "1"],
    ]
    return "\n".join(cli("inject", *none, *c) for c in cases)


def t_cli_validation(s: Scene) -> str:
    none = ["--control", str(s.tmp / "no-daemon.sock")]
    return "\n".join([
        cli("inject", *none, "--vm", "-1", "pio-read", "0x3f8", "1"),
        cli("inject", *none, "--vm", "1", "--vcpu", "-2", "pio-read", "0x3f8", "1"),
        cli("inject", *none, "--vm", "1", "--timeout", "nan", "pio-read", "0x3f8", "1"),
        cli("cpuid", *none, "0x100000000"),
        cli("status", "--node", "relative/acrn_hsm"),
    ])


def _control_ok(s: Scene, request: dict[str, Any]) -> None:
    from acrn_hsm_emu.cli import control_call

    control_call(str(s.daemon.control), request)


def t_record(s: Scene) -> str:
    d = s.dir()
    out = str(d / "rec.toml")
    first = ctl(s, "record", "--vm", "0", "-o", out)
    _control_ok(s, {"cmd": "record", "action": "start", "vm": 3})
    try:
        return "\n".join([
            first,
            ctl(s, "record", "--vm", "500", "-o", out),
            ctl(s, "record", "--vm", "3", "-o", out),
            raw_request(s, b'{"cmd": "record", "action": "status", "vm": 4}'),
            raw_request(s, b'{"cmd": "record", "action": "go", "vm": 3}'),
            ctl(s, "record", "--vm", "2", "-o", out, "--duration", "0.2"),  # no VM 2 meanwhile
        ])
    finally:
        _control_ok(s, {"cmd": "record", "action": "stop", "vm": 3})


def t_record_abandoned(s: Scene) -> str:
    """A raw client starts a recording with a 1 s lease and never asks again."""
    _control_ok(s, {"cmd": "record", "action": "start", "vm": 5, "lease": 1})
    for _ in range(100000):  # hang guard only: until the daemon has dropped it
        if '"record.abandoned"' in s.daemon.log():
            break
        time.sleep(0.05)
    return s.daemon.log()


def t_record_cli(s: Scene) -> str:
    d = s.dir()
    none = ["--control", str(s.tmp / "no-daemon.sock")]
    return "\n".join([
        cli("record", *none, "--vm", "1", "-o", str(d)),
        cli("record", *none, "--vm", "1", "-o", str(d / "no" / "rec.toml")),
        cli("record", *none, "--vm", "1", "-o", str(d / "rec.toml"), "--count", "0"),
        cli("replay", str(d / "rec.toml")),
    ])


def t_wrong_node(s: Scene) -> str:
    # A --control naming another node's daemon: refused, nothing done.
    return ctl(s, "status", "--node", str(s.tmp / "another" / "acrn_hsm"))


def t_vm_refusals(s: Scene) -> str:
    return "\n".join([
        ctl(s, "vm", "destroy", "9"),
        ctl(s, "vm", "pause", "0"),
        ctl(s, "inject", "--vm", "0", "pio-read", "0x3f8", "1"),
    ])


def t_vm_admin(s: Scene) -> str:
    dm = subprocess.Popen([str(build_c("dm_loop")), str(s.daemon.node), "0x1"], stdout=subprocess.PIPE, text=True)
    assert dm.stdout is not None
    try:
        vmid = dm.stdout.readline().split()[0].split("=")[1]
        out = ctl(s, "vm", "pause", vmid) + ctl(s, "vm", "destroy", vmid)
    finally:
        dm.kill()
        dm.wait()
    return out + s.daemon.log()


def t_no_such_vcpu(s: Scene) -> str:
    hold = subprocess.Popen([str(build_c("hsm_hold")), str(s.daemon.node), "hang"],
                            stdout=subprocess.PIPE, text=True)
    assert hold.stdout is not None
    try:
        vmid = hold.stdout.readline().split()[0].split("=")[1]
        return ctl(s, "inject", "--vm", vmid, "--vcpu", "5", "pio-read", "0x3f8", "1")
    finally:
        hold.kill()
        hold.wait()


class _RefusingHypervisor:
    """A hypervisor holding VM 3 that refuses ``refuse`` (pause_vm or destroy_vm) with -1."""

    def __init__(self, refuse: str) -> None:
        self.refuse = refuse

    def snapshot(self) -> dict[str, Any]:
        return {"vms": [{"vmid": 3, "state": "RUNNING", "vcpus": []}]}

    def vm_ids(self) -> list[int]:
        return [3]

    def pause_vm(self, vmid: int) -> int:
        return -1 if self.refuse == "pause_vm" else 0

    def destroy_vm(self, vmid: int) -> int:
        return -1 if self.refuse == "destroy_vm" else 0


def _fake_device(refuse: str, *vms: Any) -> Any:
    import types

    return types.SimpleNamespace(hv=_RefusingHypervisor(refuse), dispatcher=types.SimpleNamespace(vms=vms))


def t_vm_hypervisor_refuses(s: Scene) -> str:
    from acrn_hsm_emu.hsm import admin

    out = []
    for refuse, call in (("pause_vm", admin.pause), ("destroy_vm", admin.destroy)):
        try:
            call(_fake_device(refuse), 3)
        except admin.AdminError as e:
            out.append(f"{PREFIX}daemon: {e}")
    return "\n".join(out)


def t_orphan_reclaimed(s: Scene) -> str:
    from tests.test_cli import quirk_client

    client, lost = quirk_client(s.daemon.node)
    client.communicate("\n", timeout=60)
    for _ in range(100000):  # hang guard only: until the daemon has reclaimed it
        if '"hsm.orphan_reclaimed"' in s.daemon.log():
            break
    return s.daemon.log()


def t_orphan_not_reclaimed(s: Scene) -> str:
    from acrn_hsm_emu.hsm import admin
    from acrn_hsm_emu.hsm.vm import Vm

    vm = Vm(4242)
    vm.orphaned, vm.lost_vmid = True, 3
    reaper = admin.Reaper(_fake_device("pause_vm", vm), lambda _fn: None)
    with structlog.testing.capture_logs() as logs:
        reaper.reclaim(4242)
    return "\n".join(json.dumps({"event": e["event"]}) for e in logs)


def t_reaper_cannot_watch(s: Scene) -> str:
    from acrn_hsm_emu.hsm import admin

    reaper = admin.Reaper(_fake_device("none"), lambda _fn: None)
    with structlog.testing.capture_logs() as logs:
        trio.run(reaper._when_gone, -5)  # pidfd_open refuses it (EINVAL)
    return "\n".join(json.dumps({"event": e["event"]}) for e in logs)


def _in_hsm(scene: Callable[[Any, Any], None]) -> str:
    """Run ``scene(device, hypervisor)`` on an in-process HSM (tests/test_hsm_harness.py);
    the log events it produced."""
    from test_hsm_harness import hypervisor, make_device

    events: list[dict[str, Any]] = []

    async def main() -> None:
        hv = hypervisor()
        try:
            with structlog.testing.capture_logs() as logs:
                scene(make_device(hv), hv)
            events.extend(logs)
        finally:
            hv.real.shutdown()

    trio.run(main)
    return "\n".join(json.dumps({"event": e["event"]}) for e in events)


def t_destroy_running_vm(s: Scene) -> str:
    from test_hsm_harness import VmSetup

    from acrn_hsm_emu import abi

    def scene(dev: Any, hv: Any) -> None:
        vm = VmSetup(dev, hv, vcpus=1)
        assert vm.ioctl(abi.ACRN_IOCTL_START_VM) == 0
        assert vm.ioctl(abi.ACRN_IOCTL_DESTROY_VM) < 0  # ACRN destroys only a paused VM

    return _in_hsm(scene)


def t_memseg_slots_exhausted(s: Scene) -> str:
    import struct

    from test_hsm_harness import Buf, VmSetup

    from acrn_hsm_emu import abi
    from acrn_hsm_emu.hsm.mm import MAPPING_MAX

    def scene(dev: Any, hv: Any) -> None:
        vm = VmSetup(dev, hv, vcpus=1)
        vm.vm.regions_mapping_count = MAPPING_MAX  # as after 256 RAM SET_MEMSEGs (never reset)
        ram = Buf(4096)
        arg = struct.pack("<IIQQQ", abi.ACRN_MEMMAP_RAM, 7, 0x10_0000, ram.addr, 4096)
        assert vm.ioctl(abi.ACRN_IOCTL_SET_MEMSEG, 0, arg) == -errno.ENOMEM

    return _in_hsm(scene)


# publish / unpublish --------------------------------------------------------------------------

FAKE_DAEMON = r"""
import json, os, socket, sys
path, node, mode = sys.argv[1:4]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(1)
print("listening", flush=True)
conn, _ = srv.accept()
conn.makefile("rb").readline()
transport = "cuse" if mode == "cuse" else "fuse"
result = {"node": node, "pid": os.getpid(), "transport": transport}
reply = (json.dumps({"ok": True, "result": result}) + "\n").encode()
if mode in ("nofd", "cuse"):
    conn.sendall(reply)
else:
    fd = os.open(sys.argv[4], os.O_RDONLY)  # not a mount tree: move_mount refuses it
    socket.send_fds(conn, [reply], [fd])
conn.recv(1)
"""


def _publish_to_fake(s: Scene, node: pathlib.Path, mode: str, wrap: str = "true") -> str:
    """`publish` against a fake daemon in another mount namespace."""
    d = s.dir()
    sock = d / "control.sock"
    fake = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", FAKE_DAEMON,
         str(sock), str(node), mode, str(d)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "listening"
        return run(*in_namespace(wrap), EXE, "publish", "--control", str(sock))
    finally:
        fake.kill()
        fake.wait()


def t_publish_no_fd(s: Scene) -> str:
    return _publish_to_fake(s, s.dir() / "acrn_hsm", "nofd")


def t_publish_not_visible(s: Scene) -> str:
    return _publish_to_fake(s, s.dir() / "not-here", "fd")


def t_publish_mounted(s: Scene) -> str:
    node = s.dir() / "acrn_hsm"
    node.touch()
    return _publish_to_fake(s, node, "fd", wrap=f"mount --bind {node} {node}")


def t_publish_refused(s: Scene) -> str:
    node = s.dir() / "acrn_hsm"
    node.touch()
    return _publish_to_fake(s, node, "fd")


def t_unpublish_live(s: Scene) -> str:
    return run(EXE, "unpublish", "--control", str(s.daemon.control), "--node", str(s.daemon.node))


# run: the launcher -------------------------------------------------------------------------


def launch(node: pathlib.Path | str, *command: str, wrap: tuple[str, ...] = (), level: str = "warning",
           stdin: str | None = None) -> str:  # fmt: skip
    p = subprocess.run([*wrap, EXE, "run", "--node", str(node), "--log-format", "json", "--log-level", level,
                        "--", *command], input=stdin, capture_output=True, text=True, timeout=120,
                       check=False)  # fmt: skip
    return p.stdout + p.stderr


def t_run_usage(s: Scene) -> str:
    return cli("run", "--node", str(s.dir() / "acrn_hsm"))


def t_run_command_missing(s: Scene) -> str:
    node = s.dir() / "acrn_hsm"
    return launch(node, "no-such-device-model") + launch(node, "/nonexistent/acrn-dm")


def t_run_no_seccomp(s: Scene) -> str:
    # seccomp(2) failing with ENOSYS: what a kernel without it answers
    return launch(s.dir() / "acrn_hsm", "true", wrap=(str(build_c("no_seccomp")), "all", str(errno.ENOSYS)))


def t_run_filter_refused(s: Scene) -> str:
    # a profile that lets the launcher probe seccomp but not install a filter
    return launch(s.dir() / "acrn_hsm", "true", wrap=(str(build_c("no_seccomp")), "filter", str(errno.EPERM)))


# Two SET_IRQLINE calls on the node named first (value arguments, not addresses).
RAW_IRQLINE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
fd = os.open(sys.argv[1], os.O_RDWR)
for _ in range(2):
    libc.ioctl(fd, 0x4008A225, 0x200000004)
    print(ctypes.get_errno())
"""


def t_run_refused(s: Scene) -> str:
    from tests.conftest import CdevServer

    server = CdevServer(s.dir())  # cdev's test device: it does not know the extension's VALUE_CALL
    try:
        return launch(server.node, sys.executable, "-c", RAW_IRQLINE, str(server.node))
    finally:
        assert server.stop() == 0


def t_run_cannot_take_fd(s: Scene) -> str:
    from tests.support.ext import open_path_to, restore_modes

    d = s.dir()
    daemon = Daemon(d, "--backend", "scripted", "--node-mode", "0666").start()
    changed = open_path_to(daemon.node)
    try:
        # the launcher as nobody; the device model, nobody too, makes itself non-dumpable
        as_nobody = (*AS_NOBODY, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search")
        vm_fd = 3  # value_ioctl's first open: the node, with a VM
        return launch(daemon.node, str(build_c("value_ioctl")), str(daemon.node), wrap=as_nobody,
                      stdin=f"nodump\ncall 0 {vm_fd} 4008a225 200000004\n")  # fmt: skip
    finally:
        restore_modes(changed)
        assert daemon.stop() == 0
        daemon.notify.close()


# The supervisor thread's serving call fails (a fault injected); the command's trapped
# SET_IRQLINE must then fail with ENOSYS instead of waiting for ever.
SUPERVISOR_FAULT = RAW_IRQLINE.replace("range(2)", "range(1)")
SUPERVISOR_STOPS = """
import sys
from acrn_hsm_emu import launcher, logs

real = launcher.lib


class Faulty:
    def __getattr__(self, name):
        return getattr(real, name)

    def launch_serve(self, sup, ev, verbose):
        ev.kind, ev.step, ev.err = real.LAUNCH_EV_ERROR, real.LAUNCH_STEP_NOTIF_RECV, 9
        return ev.kind


launcher.lib = Faulty()
logs.configure("json", "warning")
sys.exit(launcher.run([sys.executable, "-c", sys.argv[2], sys.argv[1]], sys.argv[1]))
"""


def t_run_supervisor_stopped(s: Scene) -> str:
    node = s.daemon.node
    p = subprocess.run([sys.executable, "-c", SUPERVISOR_STOPS, str(node), SUPERVISOR_FAULT],
                       capture_output=True, text=True, timeout=120, check=False, cwd=REPO)  # fmt: skip
    assert p.returncode == 0 and p.stdout.split() == [str(errno.ENOSYS)], p.stdout + p.stderr
    return p.stdout + p.stderr


# -- which situation produces which message -------------------------------------------------

TRIGGERS: dict[str, Callable[[Scene], str]] = {
    name.removeprefix("t_"): fn for name, fn in list(globals().items()) if name.startswith("t_")
}

MESSAGES = {
    "<file>: (file): <reason>": "config",
    "<file>: (syntax): <reason>": "syntax",
    "<source>: <key>: unknown key (<hint>known keys: <keys>)": "config",
    "<source>: <key>: must be a string, not <value>": "config",
    "<source>: <key>: must be a non-empty string without NUL": "config",
    "<source>: <key>: must be one of <choices>, not <value>": "config",
    "<source>: <key>: must be an absolute path, not <value>": "config",
    "<source>: <key>: is <n> bytes long; a unix socket path has at most <max>": "config",
    '<source>: <key>: must be an octal mode like "0660", not <value>': "config",
    "<source>: <key>: must be a whole number from <lo> to <hi>, not <value>": "config",
    "<source>: <key>: must be from <lo> to <hi>, not <n>": "config",
    "<source>: <key>: <value> is not a permission mode within 0777<hint>": "config",
    '<source>: <key>: must be a CPU list like "1" or "0,2-3", not <value>': "config",
    "<source>: <key>: <range> is a range that ends before it starts": "config",
    "<source>: <key>: this process may not run on CPU <cpus> (it may run on <allowed>)": "config",
    "<source>: <key>: must be a <kind> name or number, not <value>": "config",
    "<source>: <key>: <kind> id <n> is out of range": "config",
    "<source>: <key>: no such <kind> <name>": "config",
    "<file>: <key>: <reason>": "scenario_error",
    "the scenario's platform is not ACRN (no ACRNACRNACRN CPUID signature): the HSM would not load (ENODEV)":
        "not_acrn",
    "the scenario's Service VM is not privileged (CPUID 0x40000001 bit 0 clear): the HSM would not load (EPERM)":
        "not_privileged",
    "<device> does not exist: load the fuse module (modprobe fuse) or, in a container, pass --device /dev/fuse":
        "no_fuse_device",
    "no permission to open <device>: run as root (or with CAP_SYS_ADMIN)": "fuse_device_denied",
    "node path <node> is busy: <what> is mounted on it": "node_mounted_on",
    "<mount dir> is served by another running daemon; stop it first": "mount_dir_taken",
    "cannot create <node>: <parent> is not a directory": "no_parent",
    "node path <node> is busy: a real character device is there (a kernel driver owns that path)":
        "char_device",
    "node path <node> is busy: not a regular file": "not_regular",
    "libfuse could not create a session (see the libfuse log line)": "libfuse_session",
    "mounting FUSE at <mount dir> failed (see the libfuse log line)": "no_sys_admin",
    "bind-mounting onto <node> failed: <reason>": "bind_fails",
    "libfuse could not create a CUSE session": "cuse_session",
    "attaching to <device> failed": "cuse_attach",
    "<node> is not served after binding: <reason>": "not_served",
    "<node> did not appear (is devtmpfs mounted on /dev?)": "did_not_appear",
    '<source>: <key>: CUSE creates its device as /dev/NAME, so it cannot serve <node>: give a path under '
    '/dev or use transport = "fuse"': "cuse_node_path",
    "<source>: <key>: <node> is not a device name CUSE can register": "cuse_node_path",
    "node path <node> is busy: <what> is there already": "cuse_node_taken",
    "node path <node> is busy: a CUSE device named <name> exists already": "cuse_name_taken",
    "node path <node> is busy: the kernel refused CUSE device <name> (another daemon registered that "
    "name first)": "cuse_name_refused",
    "the kernel ended the session serving <node>; the node is gone": "node_lost",
    "daemon.node_lost": "node_lost",
    "unknown transport <name> (auto, fuse or cuse)": "unknown_transport",
    "cannot serve <node>: <reason>": "cannot_serve",
    "control socket <path> is in use by another running daemon (is <node> served already?); stop it or give "
    "this one another --control": "control_in_use",
    "cannot listen on the control socket <path>: <reason>": "cannot_listen",
    "cannot serve metrics on <address>: <reason>": "metrics_taken",
    "<source>: <key>: must be \"off\", a port, or HOST:PORT (like \"127.0.0.1:9464\"), not <value>": "config",
    "--ioctls and --requests exclude each other (neither: both)": "trace_arguments",
    "daemon: trace: <name> must be a number from 0 to 65534, not <value>": "trace_arguments",
    "daemon: trace: what must be all, ioctls or requests, not <value>": "trace_arguments",
    "no daemon control socket at <path> (is acrn-hsm-emu serve running?)": "no_socket",
    "permission denied on <path>: the control socket is for root": "socket_denied",
    "cannot reach the daemon at <path>: <reason>": "socket_refused",
    "the daemon closed the control connection": "other_user",
    "the daemon did not answer within <seconds> s": "no_answer",
    "daemon: <reason>": "hypervisor_refuses",
    "daemon: the access did not complete (is a client serving the VM?)": "access_timeout_and_abandoned",
    "daemon: the access was abandoned: <reason>": "access_timeout_and_abandoned",
    "daemon: unknown command <name>": "raw_protocol",
    "daemon: a request is a JSON object": "raw_protocol",
    "daemon: unknown access kind <kind> (pio, mmio or pci)": "raw_protocol",
    "daemon: <exception>: <reason>": "internal_error",
    "daemon: cannot clone the mount of <node>: <reason>": "node_tree",
    "not a number: <text>": "inject_arguments",
    "not a PCI address BUS:DEV.FN (hex): <text>": "inject_arguments",
    "PCI device number <n> is above 31": "inject_arguments",
    "ACCESS must start with one of: <kinds>": "inject_arguments",
    "usage: <access> <operands>": "inject_arguments",
    "PCI register <reg> is outside 0..0xfff": "inject_arguments",
    "<kind> access size must be one of <sizes>, not <size>": "inject_arguments",
    "value <value> does not fit in <size> byte(s)": "inject_arguments",
    "port <port> is outside 0..0xffff": "inject_arguments",
    "address <address> is outside 64 bits": "inject_arguments",
    "acrn-hsm-emu <command>: error: <reason>": "inject_arguments",
    "<command>: error: argument <option>: not a VM id (0 to 65534): <text>": "cli_validation",
    "<command>: error: argument <option>: not a vCPU index (0 to 65534): <text>": "cli_validation",
    "<command>: error: argument <option>: not a 32-bit value: <text>": "cli_validation",
    "<command>: error: argument <option>: not a positive number of seconds: <text>": "cli_validation",
    "daemon: this daemon serves <node>, not <node>": "wrong_node",
    "daemon: VM 0 is the Service VM, whose accesses are not trapped: record a User VM": "record",
    "daemon: vmid <n> is not a post-launched VM slot of this scenario": "record",
    "daemon: VM <n> is being recorded already (state <state>); stop that recording first": "record",
    "daemon: VM <n> is not being recorded": "record",
    "record.abandoned": "record_abandoned",
    "daemon: unknown record action <action> (start, status or stop)": "record",
    "nothing was recorded from VM <n> (<reason>): did it run any I/O?": "record",
    "cannot write the recording to <file>: <reason>": "record_cli",
    "<command>: error: argument <option>: not a positive number: <text>": "record_cli",
    "usage: acrn-hsm-emu replay [options] RECORDING -- COMMAND [ARGS...]": "record_cli",
    "daemon: no VM with vmid <n>": "vm_refusals",
    "daemon: VM <n> has no vCPU <n>": "no_such_vcpu",
    "daemon: VM 0 is the Service VM, whose accesses are not trapped: inject into a User VM": "vm_refusals",
    "daemon: VM 0 is the Service VM: only User VMs can be paused or destroyed": "vm_refusals",
    "daemon: the hypervisor refused to pause VM <n> (error <ret>)": "vm_hypervisor_refuses",
    "daemon: the hypervisor refused to destroy VM <n> (error <ret>)": "vm_hypervisor_refuses",
    "hsm.orphan_reclaimed": "orphan_reclaimed",
    "control.vm_command": "vm_admin",
    "hsm.admin.vm_paused": "vm_admin",
    "hsm.admin.vm_destroyed": "vm_admin",
    "hsm.destroy_vm_refused": "destroy_running_vm",
    "hsm.memseg_slots_exhausted": "memseg_slots_exhausted",
    "hsm.orphan_not_reclaimed": "orphan_not_reclaimed",
    "hsm.reaper.cannot_watch": "reaper_cannot_watch",
    "the daemon sent no mount to publish": "publish_no_fd",
    "cannot publish <node>: the daemon's node file is not visible here (its directory must be shared with "
    "the daemon: no PrivateDevices=/PrivateTmp= there)": "publish_not_visible",
    "cannot publish <node>: <fs type> is mounted on it": "publish_mounted",
    "cannot publish <node>: <reason>": "publish_refused",
    "the daemon still answers on <path>: stop it before unpublishing": "unpublish_live",
    "cannot unpublish <node>: <reason>": "unpublish_fails",
    "usage: acrn-hsm-emu run [options] -- COMMAND [ARGS...]": "run_usage",
    "cannot run <command>: <reason>": "run_command_missing",
    "this kernel cannot hand system calls to a supervisor (<step>: <reason>): acrn-hsm-emu run needs "
    "seccomp user notification and pidfd_getfd (Linux 5.6 or later); run the command without it "
    "(value-argument ioctls then fail with EFAULT under FUSE), or serve the node with CUSE": "run_no_seccomp",
    "cannot start <command> under the seccomp filter: <step>: <reason>": "run_filter_refused",
    "launcher.value_ioctl_refused": "run_refused",
    "launcher.caller_fd_not_taken": "run_cannot_take_fd",
    "launcher.supervisor_stopped": "run_supervisor_stopped",
    "daemon.cannot_start": "cannot_serve",
    "cdev.stale_mount_removed": "stale_mount",
    "control.connection_refused": "other_user",
    "control.request_failed": "internal_error",
    "control.connection_failed": "connection_failed",
    "daemon.command_not_started": "command_missing",
    "sdnotify.send_failed": "notify_socket",
    "sdnotify.bad_socket_address": "notify_socket",
    "sdnotify.bad_watchdog_usec": "notify_socket",
}

# Messages whose generic form would also match other entries: the trigger must show the specific
# text, so each is checked against this exact line too.
SPECIFIC = {
    "<file>: <key>: <reason>": re.compile(r".*/scenario\.toml: platform\.pcpus: .*"),
    "daemon: <reason>": re.compile(r"daemon: no VM with vmid 9"),
    "daemon: <exception>: <reason>": re.compile(r"daemon: RuntimeError: boom"),
    "cannot publish <node>: <reason>": re.compile(r"cannot publish .*: Invalid argument"),
    "cannot serve <node>: <reason>": re.compile(r"cannot serve /proc/acrn_hsm: /proc/acrn_hsm: .*"),
    "cannot unpublish <node>: <reason>": re.compile(r"cannot unpublish .*: Device or resource busy"),
    "cannot run <command>: <reason>": re.compile(r"cannot run no-such-device-model: command not found"),
    "cannot write the recording to <file>: <reason>": re.compile(r"cannot write the recording to .*/no/rec\.toml: "
                                                                 r".*/no is not a writable directory"),
    "cannot start <command> under the seccomp filter: <step>: <reason>":
        re.compile(r"cannot start true under the seccomp filter: seccomp\(SECCOMP_SET_MODE_FILTER, .*\): "
                   r"Operation not permitted"),
}


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str]]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse (the daemon runs for real)")
    scene = Scene(tmp_path_factory.mktemp("troubleshooting"))

    @functools.cache
    def output(trigger: str) -> str:
        return TRIGGERS[trigger](scene)

    yield output
    scene.close()
    assert not mounted_under(scene.tmp), mounted_under(scene.tmp)


def test_the_page_and_the_triggers_list_the_same_messages():
    listed = page_messages()
    assert len(listed) == len(set(listed)), "a message is listed twice"
    assert sorted(listed) == sorted(MESSAGES), (
        f"on the page only: {sorted(set(listed) - set(MESSAGES))}\n"
        f"triggered only: {sorted(set(MESSAGES) - set(listed))}"
    )
    assert set(MESSAGES.values()) == set(TRIGGERS), set(TRIGGERS) ^ set(MESSAGES.values())


@pytest.mark.parametrize("message", page_messages())
def test_message_is_produced(produced, message):
    output = produced(MESSAGES[message])
    lines = candidates(output)
    assert any(as_regex(message).fullmatch(line) for line in lines), f"{message!r} not in:\n{output}"
    if message in SPECIFIC:
        assert any(SPECIFIC[message].fullmatch(line) for line in lines), output
    assert "Traceback" not in output or message in ("control.request_failed",), output


# -- the reverse: every message in the code is on the page ------------------------------------

SOURCES = ["acrn_hsm_emu/cli.py", "acrn_hsm_emu/daemon.py", "acrn_hsm_emu/config.py",
           "acrn_hsm_emu/sdnotify.py", "cdev/server.py", "cdev/cuse.py", "acrn_hsm_emu/launcher.py",
           "acrn_hsm_emu/hsm/admin.py", "acrn_hsm_emu/recording.py"]
RAISED = {"CliError", "ServeError", "SessionEnded", "StartError", "ValueError", "ConfigError",
          "ArgumentTypeError", "CuseNameError", "LaunchError", "AdminError"}


def template(node: ast.AST) -> str | None:
    """A string expression with each formatted part as {}; None when not a literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = template(node.left), template(node.right)
        return None if left is None or right is None else left + right
    return None


def is_logger(node: ast.AST) -> bool:
    """``log`` or ``structlog.get_logger(...)``."""
    if isinstance(node, ast.Name):
        return node.id == "log"
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get_logger"


def code_messages() -> dict[str, str]:
    """template -> where, for messages raised, replied or logged at warning and above."""
    found: dict[str, str] = {}
    for rel in SOURCES:
        tree = ast.parse((REPO / rel).read_text())
        for n in ast.walk(tree):
            texts: list[ast.AST] = []
            if isinstance(n, ast.Call):
                f = n.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name in RAISED and n.args:
                    a = n.args[0]
                    texts = list(a.elts) if isinstance(a, ast.List) else [a]
                if isinstance(f, ast.Attribute) and f.attr in ("warning", "error", "exception", "critical") \
                        and is_logger(f.value):
                    texts = [n.args[0]]
            elif isinstance(n, ast.Dict):
                keys = [k.value if isinstance(k, ast.Constant) else None for k in n.keys]
                if "error" in keys:
                    texts = [n.values[keys.index("error")]]
                    found_prefix = "daemon: "
                    for t in texts:
                        if (tm := template(t)) is not None:
                            found[found_prefix + tm] = f"{rel}:{n.lineno}"
                    continue
            elif isinstance(n, ast.FunctionDef) and n.name == "_unknown":
                texts = [r.value for r in ast.walk(n) if isinstance(r, ast.Return) and r.value is not None]
            for t in texts:
                tm = template(t)
                if tm is not None and tm.strip("{}: ") != "":
                    found[tm] = f"{rel}:{n.lineno}"
    return found


def normalise(message: str) -> str:
    return re.sub(r"<[^<>]+>", "{}", message)


def test_every_message_in_the_code_is_on_the_page():
    page = {normalise(m) for m in page_messages()}
    missing = []
    for tm, where in sorted(code_messages().items()):
        forms = {tm, "{}: {}: " + tm, "daemon: " + tm, "{}: error: argument {}: " + tm}
        if not forms & page:
            missing.append(f"{where}: {tm!r}")
    assert not missing, "not on docs/troubleshooting.md:\n" + "\n".join(missing)


def test_the_reverse_check_can_fail():
    assert "node path {} is busy: not a regular file" in code_messages()
    assert "the daemon closed the control connection" in code_messages()
    assert "daemon: the access did not complete (is a client serving the VM?)" in code_messages()
    assert "must be an absolute path, not {}" in code_messages()
    assert "daemon.cannot_start" in code_messages()
