"""Fixtures that run the real daemon (or a cdev test device) on a real mounted node.

Each daemon gets its own temporary node path, run dir and control socket, so
tests never touch the host's /dev/acrn_hsm. Readiness comes from the daemon's
own sd_notify READY=1 on a socket the fixture listens on.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from acrn_hsm_emu.config import control_socket

_serial = itertools.count()
# Hang guards only (never a bound on speed): under emulation (`make test-vm`, TCG) a Python
# start takes seconds, so the VM run scales them (ACRN_HSM_TEST_SLOW=4).
SLOW = float(os.environ.get("ACRN_HSM_TEST_SLOW", "1"))
REPO = pathlib.Path(__file__).resolve().parent.parent
VENV_BIN = pathlib.Path(sys.executable).parent


def fuse_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mounts a FUSE file system and bind-mounts the node)"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    return None


def cuse_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (registers a CUSE device)"
    if not os.path.exists("/dev/cuse"):
        return "needs CUSE (/dev/cuse): this kernel has no CONFIG_CUSE; `make test-vm` runs the CUSE half"
    return None


# Every test that serves a node runs once per transport (ids [fuse] / [cuse]), each skipping
# where the kernel lacks it; @pytest.mark.transports("fuse") keeps a transport-specific test
# to its own. ACRN_HSM_TEST_TRANSPORTS=cuse (a comma list) deselects the others.
TRANSPORTS = ("fuse", "cuse")
_MISSING = {"fuse": fuse_missing, "cuse": cuse_missing}


def selected_transports() -> tuple[str, ...]:
    raw = os.environ.get("ACRN_HSM_TEST_TRANSPORTS", "")
    chosen = tuple(t.strip() for t in raw.split(",") if t.strip()) or TRANSPORTS
    unknown = set(chosen) - set(TRANSPORTS)
    if unknown:
        raise pytest.UsageError(f"ACRN_HSM_TEST_TRANSPORTS: unknown transport(s) {sorted(unknown)}")
    return chosen


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "transport" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("transports")
        metafunc.parametrize("transport", marker.args if marker else TRANSPORTS, indirect=True)


@pytest.fixture
def transport(request: pytest.FixtureRequest) -> str:
    """The transport this test's node is served over."""
    name: str = request.param
    reason = _MISSING[name]()
    if reason:
        pytest.skip(reason)
    return name


def node_path(tmp: pathlib.Path, transport: str, name: str) -> pathlib.Path:
    """A private node: a file in the test's directory (FUSE), a device under /dev (CUSE names
    its device after the path below /dev); unique across concurrent runs."""
    if transport == "cuse":  # one per test directory, as tmp / name is
        return pathlib.Path(f"/dev/{name}-test-{os.getpid()}-{zlib.crc32(str(tmp).encode()):08x}")
    return tmp / name


def kvm_missing() -> str | None:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"needs a usable /dev/kvm ({e.strerror})"
    os.close(fd)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    fuse_reason = fuse_missing()
    kvm_reason = kvm_missing()
    chosen = selected_transports()
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        t = callspec.params.get("transport") if callspec is not None else None
        (dropped if t is not None and t not in chosen else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    for item in items:
        if fuse_reason and "needs_fuse" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=fuse_reason))
        if kvm_reason and "needs_kvm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=kvm_reason))


def mounted_under(path: pathlib.Path) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace."""
    prefix = str(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


class NotifyListener:
    """A fake systemd NOTIFY_SOCKET: collects what the daemon sends."""

    def __init__(self, path: pathlib.Path | None = None, abstract: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract is not None:
            self.sock.bind(b"\0" + abstract.encode())
            self.address = "@" + abstract
        else:
            assert path is not None
            self.sock.bind(str(path))
            self.address = str(path)
        self.messages: list[str] = []

    def wait_for(self, field: str, timeout: float = 30.0 * SLOW) -> None:
        """Hang guard only: returns as soon as ``field`` arrives."""
        self.wait_until(lambda line: line == field, field, timeout)

    def wait_until(self, match: Any, what: str = "", timeout: float = 30.0 * SLOW) -> str:
        """Hang guard only: the first line (of any message) for which ``match(line)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                if match(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what or match} not received; got {self.messages}")
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                self.messages.append(self.sock.recv(4096).decode())

    def lines(self) -> list[str]:
        """Every field received so far, in order (a message may carry several)."""
        return [line for m in self.messages for line in m.split("\n")]

    def drain(self) -> None:
        while select.select([self.sock], [], [], 0)[0]:
            self.messages.append(self.sock.recv(4096).decode())

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """A running ``acrn-hsm-emu serve`` on a private node."""

    def __init__(
        self,
        tmp: pathlib.Path,
        *extra: str,
        env: dict[str, str] | None = None,
        notify: NotifyListener | None = None,
        transport: str = "fuse",
        name: str = "acrn_hsm",
    ) -> None:
        self.tmp = tmp
        self.transport = transport
        self.node = node_path(tmp, transport, name)
        self.run_dir = tmp / "run"
        # the daemon's default: one control socket per node (docs/configuration.md)
        self.control = pathlib.Path(
            extra[extra.index("--control") + 1] if "--control" in extra
            else control_socket(str(self.run_dir), str(self.node))
        )
        self.log_path = tmp / ("daemon.log" if name == "acrn_hsm" else f"daemon-{name}.log")
        self.notify = notify or NotifyListener(tmp / f"notify-{next(_serial)}.sock")
        self.args = [
            str(VENV_BIN / "acrn-hsm-emu"),
            "serve",
            "--node",
            str(self.node),
            "--run-dir",
            str(self.run_dir),
            "--log-format",
            "json",
            "--transport",
            transport,
            *extra,
        ]
        self.env = {**os.environ, "NOTIFY_SOCKET": self.notify.address, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self.notify.messages.clear()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        try:
            self.notify.wait_for("READY=1")
        except TimeoutError:
            self.proc.kill()
            raise RuntimeError(f"daemon did not become ready:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The log's records (of event ``name``), each line one whole record (test_logs.py)."""
        records = [json.loads(ln) for ln in self.log().splitlines() if ln.startswith("{")]
        return [e for e in records if name is None or e["event"] == name]

    def cli(self, *args: str, check: bool = True, timeout: float = 60 * SLOW) -> subprocess.CompletedProcess[str]:
        cmd = [str(VENV_BIN / "acrn-hsm-emu"), *args]
        if args and args[0] in ("status", "inject", "cpuid", "vm"):
            cmd[2:2] = ["--control", str(self.control)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{cmd} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=30 * SLOW)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            raise AssertionError(f"daemon did not stop on signal {sig}:\n{self.log()}") from None
        self._log.close()
        return rc


@pytest.fixture
def daemon_factory(tmp_path: pathlib.Path, transport: str) -> Iterator[Any]:
    made: list[Daemon] = []

    def make(
        *extra: str,
        start: bool = True,
        env: dict[str, str] | None = None,
        notify: NotifyListener | None = None,
        name: str = "acrn_hsm",
    ) -> Daemon:
        d = Daemon(tmp_path, *extra, env=env, notify=notify, transport=transport, name=name)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            rc = d.stop()
            assert rc == 0, f"daemon exited {rc}:\n{d.log()}"
        d.notify.close()
        assert "Traceback" not in d.log(), d.log()
    for d in made:  # every daemon stopped: whatever a killed one left, the next one cleared
        if d.proc is not None:
            assert not os.path.lexists(d.node), f"{d.node} left behind"
    leftovers = mounted_under(tmp_path)
    for mp in reversed(leftovers):
        subprocess.run(["umount", "-l", mp], check=False)
    assert not leftovers, f"mounts left behind: {leftovers}"


@pytest.fixture
def fds() -> Iterator[Any]:
    """``fds()`` makes a non-blocking eventfd, ``fds("pipe")`` a pipe's read end; all closed after."""
    opened: list[int] = []

    def make(kind: str = "eventfd") -> int:
        if kind == "eventfd":
            fd = os.eventfd(0, os.EFD_NONBLOCK)
            opened.append(fd)
            return fd
        r, w = os.pipe()
        opened.extend((r, w))
        return r

    yield make
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture
def hsm_daemon(daemon_factory: Any) -> Daemon:
    """The daemon with its defaults (scripted backend, built-in scenario)."""
    return daemon_factory()


class CdevServer:
    """``python -m cdev`` serving tests/support/testdev.py on a private node."""

    def __init__(self, tmp: pathlib.Path, *extra: str, transport: str = "fuse") -> None:
        self.node = node_path(tmp, transport, "testdev")
        self.log_path = tmp / "cdev.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "cdev", "--device", "tests.support.testdev:TestDevice",
                "--node", str(self.node), "--run-dir", str(tmp / "run"), "--transport", transport,
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"READY":
            self.proc.kill()
            raise RuntimeError(f"cdev server did not start:\n{self.log_path.read_text()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30 * SLOW)
        self._log.close()
        return rc


@pytest.fixture
def cdev_server(tmp_path: pathlib.Path, transport: str, request: pytest.FixtureRequest) -> Iterator[CdevServer]:
    marker = request.node.get_closest_marker("cdev_args")
    server = CdevServer(tmp_path, *(marker.args if marker else ()), transport=transport)
    yield server
    if server.proc.poll() is None:
        assert server.stop() == 0
    assert "Traceback" not in server.log_path.read_text()
    assert not mounted_under(tmp_path)
    assert not server.node.exists(), f"{server.node} left behind"


def wait_in_syscall(pid: int, timeout: float = 30.0 * SLOW) -> None:
    """Hang guard: until some thread of ``pid`` sits in ioctl(2) (syscall 16 on x86-64)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
            try:
                if (task / "syscall").read_text().split()[0] == "16":
                    return
            except (OSError, IndexError):
                pass
        time.sleep(0.01)
    raise TimeoutError(f"pid {pid} never blocked in ioctl")


# -- an installed copy (make install into a scratch prefix), for the service tests --------


class Installed:
    """``make install PREFIX=<base>/prefix SYSCONFDIR=<base>/etc``: runnable, like /usr/local."""

    def __init__(self, base: pathlib.Path) -> None:
        self.base = base
        self.prefix = base / "prefix"
        self.sysconfdir = base / "etc"
        self.exe = self.prefix / "bin" / "acrn-hsm-emu"
        self.unit = self.prefix / "lib" / "systemd" / "system" / "acrn-hsm-emu.service"
        self.config = self.sysconfdir / "acrn-hsm-emu" / "config.toml"

    def make(self, target: str, **variables: str) -> subprocess.CompletedProcess[str]:
        """Run a Makefile target; the venv is taken as it is (-o: never rebuilt mid-run)."""
        args = {"PREFIX": str(self.prefix), "SYSCONFDIR": str(self.sysconfdir), **variables}
        proc = subprocess.run(
            ["make", "--no-print-directory", "-C", str(REPO), "-o", ".venv/.installed", target,
             *(f"{k}={v}" for k, v in args.items())],
            capture_output=True, text=True, timeout=600, check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(f"make {target} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc


@pytest.fixture(scope="session")
def installed() -> Iterator[Installed]:
    """One installed copy per run, outside /home, /root and /tmp (the unit hides those)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (installs under /run)")
    import tempfile

    base = pathlib.Path(tempfile.mkdtemp(prefix="acrn-hsm-emu-test-", dir="/run"))
    base.chmod(0o755)
    inst = Installed(base)
    try:
        inst.make("install")
        yield inst
        inst.make("uninstall")
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


@pytest.fixture
def hv() -> Iterator[Any]:
    """The real mock hypervisor behind a recording proxy, for in-process HSM tests."""
    from test_hsm_harness import hypervisor

    h = hypervisor()
    yield h
    h.real.shutdown()
