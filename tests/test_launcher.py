"""``acrn-hsm-emu run -- CMD``: value-argument ioctls (SET_IRQLINE) reach a FUSE node.

Under FUSE the kernel refuses SET_IRQLINE with EFAULT before the daemon sees
it (its argument is the packed {gsi, op} value, which the kernel takes for an
address). tests/clients/irq_dm.c, a device model written against plain
<linux/acrn.h>, runs KVM guests that route a GSI through the IOAPIC to a
LAPIC vector (irqapic32) and through the 8259 PIC (irqpic16), raises the line
with each ACRN op from a second thread and reads the vectors the guest's
handler reports on a port: without the launcher the call fails with EFAULT,
with it every op does what ACRN's does, also for the same client linked
statically. tests/clients/value_ioctl.c issues value ioctls on command, with
and without the launcher, for the launcher's own behaviour and the fuzzing.
Every wait is a hang guard, never a timing check.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acrn_hsm_emu import abi
from acrn_hsm_emu.client import extension as ext
from tests.conftest import REPO, VENV_BIN, wait_in_syscall
from tests.guests.build import Guest, assemble
from tests.support.cbuild import BIN, CLIENTS, build_c
from tests.support.ext import readline

EXE = str(VENV_BIN / "acrn-hsm-emu")
HANG_GUARD_S = 60.0
SET_IRQLINE = abi.ACRN_IOCTL_SET_IRQLINE
EVENT_FD = ext.SETUP_VM_EVENT_FD
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))

# ACRN's op semantics on an edge-triggered input, one op after another on one line
# (spec: hv B.1.2): the interrupts each op raises. The line starts low.
OPS = ["low", "raise", "high", "high", "low", "fall", "raise", "raise"]
EDGES = [False, True, True, False, False, True, False, True]


def launcher(node: pathlib.Path | str, *command: str, level: str = "warning") -> list[str]:
    return [EXE, "run", "--node", str(node), "--log-format", "json", "--log-level", level, "--", *command]


def events(text: str, name: str | None = None) -> list[dict[str, Any]]:
    """Every record, whole: the command shares the daemon's output (serve), and each
    process writes a record in one write() (test_logs.py), so none is cut or mixed."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            e = json.loads(line)
            if name is None or e.get("event") == name:
                out.append(e)
    return out


def static_build(name: str) -> pathlib.Path:
    """tests/clients/NAME.c linked -static (no dynamic loader, nothing to preload)."""
    src, out = CLIENTS / f"{name}.c", BIN / f"{name}-static"
    BIN.mkdir(exist_ok=True)
    if not out.exists() or src.stat().st_mtime > out.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-pthread", "-static", "-o", str(out), str(src)],
                       check=True, capture_output=True)  # fmt: skip
    return out


def seccomp_filters(status: str) -> int:
    return int(next(x for x in status.splitlines() if x.startswith("Seccomp_filters:")).split()[1])


def own_filters() -> int:
    return seccomp_filters(pathlib.Path("/proc/self/status").read_text())


# -- the launcher on its own (a FUSE node not needed) -------------------------------


def run(*argv: str, node: str = "/nonexistent/acrn_hsm", **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(launcher(node, *argv), capture_output=True, text=True, timeout=HANG_GUARD_S, **kw)


def test_exit_status_passes_through():
    assert run("sh", "-c", "exit 7").returncode == 7
    assert run("true").returncode == 0
    assert run("sh", "-c", "kill -USR1 $$").returncode == 128 + signal.SIGUSR1


def test_command_not_found_is_127_not_executable_126(tmp_path):
    p = run("no-such-command-here")
    assert p.returncode == 127
    assert "acrn-hsm-emu: cannot run no-such-command-here: command not found" in p.stderr
    p = run("/nonexistent/dm")
    assert p.returncode == 127 and "cannot run /nonexistent/dm: No such file or directory" in p.stderr
    (tmp_path / "model").write_text("not a program\n")
    p = run(str(tmp_path / "model"))
    assert p.returncode == 126 and f"cannot run {tmp_path}/model: Permission denied" in p.stderr
    (tmp_path / "model").chmod(0o755)
    p = run(str(tmp_path / "model"))
    assert p.returncode == 126 and f"cannot run {tmp_path}/model: Exec format error" in p.stderr
    p = run()
    assert p.returncode == 2 and "usage: acrn-hsm-emu run" in p.stderr


def test_children_inherit_the_filter_and_a_device_node_needs_none():
    mine = own_filters()
    inner = run("sh", "-c", "sh -c 'cat /proc/self/status'")
    assert seccomp_filters(inner.stdout) == mine + 1  # the grandchild is under the launcher's filter
    plain = run("sh", "-c", "cat /proc/self/status", node="/dev/null")  # a character device: CUSE-like
    assert seccomp_filters(plain.stdout) == mine


def test_signals_reach_the_command():
    script = 'trap "echo got-TERM; exit 9" TERM; trap "echo got-HUP" HUP; echo up; while :; do sleep 0.05; done'
    p = subprocess.Popen(launcher("/nonexistent/acrn_hsm", "sh", "-c", script), stdout=subprocess.PIPE, text=True)
    try:
        assert readline(p, "the command") == "up"
        p.send_signal(signal.SIGHUP)
        assert readline(p, "the command") == "got-HUP"  # it lives on
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=HANG_GUARD_S)
    finally:
        if p.poll() is None:
            p.kill()
    assert out.strip() == "got-TERM"
    assert p.returncode == 9


def test_the_command_dies_with_a_killed_launcher():
    """Without its supervisor the command's trapped calls would fail: it goes too."""
    from tests.support.poll import wait_until

    p = subprocess.Popen(launcher("/nonexistent/acrn_hsm", "sh", "-c", "echo $$; exec sleep 600"),
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    child = int(readline(p, "the command"))
    p.kill()
    p.wait(timeout=HANG_GUARD_S)

    def dead() -> bool:
        try:
            status = pathlib.Path(f"/proc/{child}/status").read_text()
        except FileNotFoundError:
            return True
        return "\nState:\tZ" in status

    wait_until(dead, "the command to be killed with the launcher")


# -- a daemon: the value call, the launcher's choices -----------------------------


class ValueIoctl:
    """tests/clients/value_ioctl.c, with or without the launcher."""

    def __init__(self, node: pathlib.Path, launched: bool, level: str = "warning",
                 prefix: list[str] | None = None) -> None:  # fmt: skip
        argv = [str(build_c("value_ioctl")), str(node)]
        if prefix is not None:
            argv = [*prefix, *argv]
        elif launched:
            argv = launcher(node, *argv, level=level)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        words = readline(self.proc, "value_ioctl").split()
        assert words[0] == "ready", words
        info = dict(w.split("=") for w in words[1:])
        self.pid, self.vmid = int(info["pid"]), int(info["vmid"])
        self.fds = {k: int(info[k]) for k in ("vm", "novm", "null", "closed")}

    def call(self, fd: int | str, cmd: int, arg: int, thread: int = 0) -> int:
        """The errno of ioctl(fd, cmd, arg), 0 on success."""
        n = self.fds[fd] if isinstance(fd, str) else fd
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"call {thread} {n} {cmd:x} {arg:x}\n")
        self.proc.stdin.flush()
        words = readline(self.proc, "value_ioctl").split()
        assert words[0] == "ret", words
        return int(words[3])

    def command(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return readline(self.proc, "value_ioctl")

    def close(self) -> tuple[int, str]:
        out, err = self.proc.communicate("quit\n", timeout=HANG_GUARD_S)
        return self.proc.returncode, err


@pytest.fixture
def clients() -> Iterator[Callable[..., ValueIoctl]]:
    made: list[ValueIoctl] = []

    def make(*a: Any, **kw: Any) -> ValueIoctl:
        c = ValueIoctl(*a, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()


def irqline(gsi: int, op: int) -> int:
    return op << 32 | gsi


@pytest.mark.transports("fuse")  # CUSE passes value arguments itself
def test_the_launcher_carries_set_irqline_on_the_callers_vm(hsm_daemon, clients):
    """Two device models, one VM each: each call lands on its caller's VM, from either
    thread; everything not on the node, or not trapped, goes to the kernel as before."""
    plain = clients(hsm_daemon.node, launched=False)
    assert plain.call("vm", SET_IRQLINE, irqline(4, abi.IRQ_RAISING_PULSE)) == errno.EFAULT  # FUSE, no launcher
    a = clients(hsm_daemon.node, launched=True, level="debug")
    b = clients(hsm_daemon.node, launched=True)
    assert a.call("vm", SET_IRQLINE, irqline(7, abi.IRQ_RAISING_PULSE)) == 0
    assert a.call("vm", SET_IRQLINE, irqline(7, abi.IRQ_SET_HIGH), thread=1) == 0  # not the group leader
    assert b.call("vm", SET_IRQLINE, irqline(9, abi.IRQ_FALLING_PULSE), thread=1) == 0
    assert b.call("vm", SET_IRQLINE, irqline(48, abi.IRQ_SET_HIGH)) == errno.EPERM  # the hypercall's -1
    assert a.call("novm", SET_IRQLINE, irqline(7, 0)) == errno.EINVAL  # the driver's gate
    assert a.call("vm", EVENT_FD, 5) == errno.ENOTTY  # as the driver (under CUSE) answers it
    assert a.call("novm", EVENT_FD, 5) == errno.EINVAL
    assert a.call("vm", SET_IRQLINE | 0xFFFF_FFFF_0000_0000, irqline(7, 1)) == 0  # the kernel's u32 cmd
    assert a.call("null", SET_IRQLINE, irqline(7, 1)) == errno.ENOTTY  # not the node: the kernel's answer
    assert a.call("closed", SET_IRQLINE, 4) == errno.EBADF
    assert a.call(-1, SET_IRQLINE, 4) == errno.EBADF
    assert a.call("vm", abi.ACRN_IOCTL_INJECT_MSI, 8) == errno.EFAULT  # not trapped: untouched
    hv = {v["vmid"]: v for v in json.loads(hsm_daemon.cli("status", "--json").stdout)["hypervisor"]["vms"]}
    assert set(hv[a.vmid]["irqlines"]) == {"7"} and set(hv[b.vmid]["irqlines"]) == {"9"}
    assert hv[a.vmid]["irqlines"]["7"]["raising_pulse"] == 1 and hv[a.vmid]["irqlines"]["7"]["set_high"] == 1
    hsm = {v["vmid"]: v for v in json.loads(hsm_daemon.cli("status", "--json").stdout)["hsm"]["vms"]}
    assert hsm[b.vmid]["hypercalls"]["counts"]["set_irqline"] == {"calls": 2, "failed": 1, "last_ret": -1}
    rc, err = a.close()
    assert rc == 0
    calls = events(err, "launcher.call")
    assert [e["outcome"] for e in calls] == ["carried"] * 6 + ["passed"] * 3
    assert calls[0]["tid"] == a.pid and calls[1]["tid"] != a.pid  # the second thread's own id
    done = events(err, "launcher.command_exited")[0]
    assert done["carried"] == 6 and done["passed"] == 3 and done["status"] == 0


# The launcher with pidfd_open(PIDFD_THREAD) (Linux 6.9) left unused, as on older kernels.
OLD_KERNEL_LAUNCHER = """
import sys
from acrn_hsm_emu import launcher, logs
logs.configure("json", "debug")
sys.exit(launcher.Launcher(sys.argv[2:], sys.argv[1], verbose=True, thread_pidfd=False).run())
"""


def irqline_calls(daemon: Any, vmid: int) -> int:
    vms = json.loads(daemon.cli("status", "--json").stdout)["hsm"]["vms"]
    counts = next(v for v in vms if v["vmid"] == vmid)["hypercalls"]["counts"]
    return int(counts.get("set_irqline", {"calls": 0})["calls"])


@pytest.mark.transports("fuse")
def test_many_threads_and_signals_each_call_carried_once(hsm_daemon, clients):
    """Four threads calling at once; then with a SIGALRM every 50 us (a handler without
    SA_RESTART): a call interrupted before the supervisor took it fails with EINTR, as a
    restartable system call does, and is not carried; one it took completes (Linux 5.19+:
    the caller then waits killably), so no pulse happens twice."""
    c = clients(hsm_daemon.node, launched=True, level="info")
    words = c.command("storm 4 300 7 0").split()
    assert words == ["storm", "ok=1200", "eintr=0", "other=0"]
    assert irqline_calls(hsm_daemon, c.vmid) == 1200
    got = dict(w.split("=") for w in c.command("storm 4 300 7 50").split()[1:])
    ok, eintr = int(got["ok"]), int(got["eintr"])
    assert ok + eintr == 1200 and got["other"] == "0"
    calls = irqline_calls(hsm_daemon, c.vmid) - 1200
    rc, err = c.close()
    assert rc == 0, err
    killable = events(err, "launcher.command_started")[0]["killable_wait"]
    assert calls == ok if killable else calls >= ok
    assert events(err, "launcher.command_exited")[0]["carried"] == 1200 + calls


@pytest.mark.transports("fuse")
def test_a_command_killed_in_the_middle_of_calls(hsm_daemon, clients):
    """SIGKILL while its threads' calls are trapped: the launcher reports 128+9, the
    daemon goes on serving."""
    c = clients(hsm_daemon.node, launched=True)
    assert c.proc.stdin is not None
    c.proc.stdin.write("storm 4 1000000 7 0\n")
    c.proc.stdin.flush()
    wait_in_syscall(c.pid)
    os.kill(c.pid, signal.SIGKILL)
    _out, err = c.proc.communicate(timeout=HANG_GUARD_S)
    assert c.proc.returncode == 128 + signal.SIGKILL and "Traceback" not in err, err
    other = clients(hsm_daemon.node, launched=True)
    assert other.call("vm", SET_IRQLINE, irqline(7, abi.IRQ_RAISING_PULSE)) == 0


@pytest.mark.transports("fuse")  # CUSE passes value arguments itself
def test_a_thread_is_found_through_proc_where_pidfd_open_cannot_take_it(hsm_daemon, clients):
    """Before Linux 6.9, pidfd_open takes only a process: the trapped thread's process
    comes from /proc/TID/status."""
    c = clients(hsm_daemon.node, launched=True,
                prefix=[sys.executable, "-c", OLD_KERNEL_LAUNCHER, str(hsm_daemon.node)])  # fmt: skip
    assert c.call("vm", SET_IRQLINE, irqline(6, abi.IRQ_RAISING_PULSE), thread=1) == 0
    assert c.call("vm", SET_IRQLINE, irqline(6, abi.IRQ_RAISING_PULSE), thread=0) == 0
    assert c.call("null", SET_IRQLINE, irqline(6, 0), thread=1) == errno.ENOTTY
    hv = json.loads(hsm_daemon.cli("status", "--json").stdout)["hypervisor"]["vms"]
    assert next(v for v in hv if v["vmid"] == c.vmid)["irqlines"]["6"]["raising_pulse"] == 2
    rc, err = c.close()
    assert rc == 0
    calls = events(err, "launcher.call")
    assert [e["outcome"] for e in calls] == ["carried", "carried", "passed"]
    assert calls[0]["tid"] != c.pid and calls[1]["tid"] == c.pid


@pytest.mark.transports("fuse")  # CUSE passes value arguments itself
def test_the_errno_table_under_the_launcher_is_the_drivers_for_value_ioctls(hsm_daemon):
    """tests/clients/hsm_errno.c (every ioctl's error cases) under the launcher: the rows
    of SET_IRQLINE and SETUP_VM_EVENT_FD get the driver's answers, which FUSE alone turns
    into EFAULT; every other row, FUSE's own effects included, stays as it was."""
    from tests.test_hsm_errno import FUSE_OVERRIDES, ROW_RE, compare_rows, expected_table

    p = subprocess.run(launcher(hsm_daemon.node, str(build_c("hsm_errno")), str(hsm_daemon.node), "default"),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0 and "END" in p.stdout.splitlines(), p.stdout + p.stderr
    rows = {m[1]: (int(m[2]), m[3]) for line in p.stdout.splitlines() if (m := ROW_RE.match(line))}
    carried = {row for row, (value, _why) in FUSE_OVERRIDES.items() if "argument is a value" in _why}
    assert carried == {"gate.set_irqline", "lifecycle.after_set_irqline", "interrupts.set_irqline",
                       "interrupts.set_irqline_pulse", "interrupts.set_irqline_bad_gsi",
                       "unknown.setup_vm_event_fd"}  # fmt: skip
    kernel = expected_table("cuse")
    want = {row: kernel[row] if row in carried else value for row, value in expected_table("fuse").items()}
    assert not (problems := compare_rows(rows, want)), "\n".join(problems)


def test_value_call_directly(hsm_daemon):
    """ACRN_EMU_IOCTL_VALUE_CALL itself: the carried call's answer in ``result``."""
    import fcntl

    def value_call(fd: int, cmd: int, arg: int, reserved: int = 0) -> tuple[int, int]:
        vc = ext.AcrnEmuValueCall(cmd=cmd, arg=arg, reserved=reserved)
        buf = bytearray(bytes(vc))
        try:
            fcntl.ioctl(fd, ext.ACRN_EMU_IOCTL_VALUE_CALL, buf)
        except OSError as e:
            return e.errno, 0
        return 0, ext.AcrnEmuValueCall.from_buffer(buf).result

    fd = os.open(hsm_daemon.node, os.O_RDWR)
    try:
        assert value_call(fd, SET_IRQLINE, irqline(4, 2)) == (0, -errno.EINVAL)  # no VM on this file
        assert value_call(fd, abi.ACRN_IOCTL_START_VM, 0) == (errno.EINVAL, 0)  # not a value call
        assert value_call(fd, ext.ACRN_EMU_IOCTL_VALUE_CALL, 0) == (errno.EINVAL, 0)
        assert value_call(fd, SET_IRQLINE, 4, reserved=1) == (errno.EINVAL, 0)
        vm = abi.AcrnVmCreation()
        page = bytearray(4096 * 2)
        import ctypes

        cpage = (ctypes.c_char * len(page)).from_buffer(page)
        vm.ioreq_buf = (ctypes.addressof(cpage) + 4095) & ~4095
        buf = bytearray(bytes(vm))
        fcntl.ioctl(fd, abi.ACRN_IOCTL_CREATE_VM, buf)
        assert value_call(fd, SET_IRQLINE, irqline(4, 2)) == (0, 0)
        assert value_call(fd, SET_IRQLINE, irqline(47, 0)) == (0, 0)
        assert value_call(fd, SET_IRQLINE, irqline(48, 0)) == (0, -errno.EPERM)
        assert value_call(fd, EVENT_FD, 3) == (0, -errno.ENOTTY)
        version = bytearray(16)
        fcntl.ioctl(fd, ext.ACRN_EMU_IOCTL_VERSION, version)
        v = ext.AcrnEmuVersion.from_buffer(version)
        assert (v.major, v.minor) == (1, 1) and v.features & ext.ACRN_EMU_FEATURE_VALUE_CALL
        del cpage
    finally:
        os.close(fd)


def test_the_client_library_raises_lines_through_a_fuse_node(hsm_daemon):
    """acrn_hsm_emu.client needs no launcher: NodeFile.set_irqline uses VALUE_CALL itself
    where the node has it, and keeps the driver's errno."""
    from acrn_hsm_emu.client.node import NodeFile, Page

    page = Page()
    with NodeFile(hsm_daemon.node) as f:
        vmid = f.create_vm(page.addr).vmid
        f.set_irqline(5, abi.IRQ_RAISING_PULSE)
        with pytest.raises(OSError) as e:
            f.set_irqline(48, abi.IRQ_SET_HIGH)
        assert e.value.errno == errno.EPERM
        hv = json.loads(hsm_daemon.cli("status", "--json").stdout)["hypervisor"]["vms"]
        assert next(v for v in hv if v["vmid"] == vmid)["irqlines"]["5"]["raising_pulse"] == 1
    page.close()


@pytest.mark.transports("fuse")  # CUSE passes value arguments itself
def test_a_daemon_without_value_calls_gets_the_kernels_answer(cdev_server):
    """A node that does not know VALUE_CALL (an older daemon; here cdev's test device):
    the launcher logs it once and lets the kernel answer, as without the launcher."""
    p = subprocess.run(
        launcher(cdev_server.node, sys.executable, "-c", _RAW_CALLS, str(cdev_server.node), level="info"),
        capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(errno.EFAULT), str(errno.EFAULT)]  # FUSE's answer, both times
    refused = events(p.stderr, "launcher.value_ioctl_refused")
    assert len(refused) == 1 and refused[0]["error"] == "ENOTTY"  # once, not per call
    assert events(p.stderr, "launcher.command_exited")[0]["refused"] == 2


# Two SET_IRQLINE calls on a node (value arguments that are not addresses).
_RAW_CALLS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
fd = os.open(sys.argv[1], os.O_RDWR)
for _ in range(2):
    libc.ioctl(fd, 0x4008A225, 0x200000004)
    print(ctypes.get_errno())
"""


@pytest.mark.transports("fuse")
def test_fuzz_value_call_contents(hsm_daemon):
    """VALUE_CALL with random contents, on a file with a VM and one without: the ioctl
    fails only with EINVAL (its own checks), a carried call's result is an errno the
    driver gives, and the daemon stays up without a traceback."""
    import fcntl

    from acrn_hsm_emu.client.node import NodeFile, Page

    page = Page()
    with NodeFile(hsm_daemon.node) as vm, NodeFile(hsm_daemon.node) as novm:
        vm.create_vm(page.addr)

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(st.booleans(), st.one_of(st.sampled_from(sorted(ext.VALUE_CALLS)), st.integers(0, 2**32 - 1)),
               st.integers(0, 2**32 - 1) | st.just(0), st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1))
        def one(with_vm: bool, cmd: int, reserved: int, arg: int, result: int) -> None:  # fmt: skip
            f = vm if with_vm else novm
            buf = bytearray(bytes(ext.AcrnEmuValueCall(cmd=cmd, reserved=reserved, arg=arg, result=result)))
            try:
                fcntl.ioctl(f.fd, ext.ACRN_EMU_IOCTL_VALUE_CALL, buf)
            except OSError as e:
                assert e.errno == errno.EINVAL and (reserved or cmd not in ext.VALUE_CALLS), (e, hex(cmd))
                return
            assert cmd in ext.VALUE_CALLS and not reserved
            out = ext.AcrnEmuValueCall.from_buffer(buf).result
            assert out in (0, -errno.EINVAL, -errno.EPERM, -errno.ENOTTY), out

        one()
    page.close()
    assert json.loads(hsm_daemon.cli("status", "--json").stdout)["pid"] == hsm_daemon.proc.pid
    assert "Traceback" not in hsm_daemon.log()


# -- interrupts into KVM guests ----------------------------------------------------


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], Guest]:
    out = tmp_path_factory.mktemp("guests")
    made: dict[str, Guest] = {}

    def get(name: str, load: int) -> Guest:
        if name not in made:
            made[name] = assemble(name, out, load)
        return made[name]

    return get


def dm_argv(guests: Callable[[str, int], Guest], path: str, binary: pathlib.Path, node: pathlib.Path,
            ops: list[str] = OPS) -> list[str]:  # fmt: skip
    """irq_dm raising ``ops`` on the line of ``path`` ("pic" or "ioapic")."""
    if path == "pic":  # GSI 1 -> PIC IR1 -> vector 0x21; fence GSI 3 -> IR3 -> 0x23
        g = guests("irqpic16", 0)
        args = ["-g", f"{g.path}@0", "-l", "1", "-f", "3:0x23"]
    else:  # GSI 4 -> IOAPIC pin 4 -> vector 0x44; fence GSI 5 -> pin 5 -> 0x35
        g = guests("irqapic32", 0x1000)
        s = g.symbols
        args = ["-g", f"{g.path}@0x1000", "-r", "pm32", "-e", "0x1000", "-G", f"{s['gdt']:#x}:0x1f",
                "-I", f"{s['idt']:#x}:{s['idt_end'] - s['idt'] - 1:#x}", "-l", "4", "-f", "5:0x35"]
    return [str(binary), *args, "-o", ",".join(ops), str(node)]


def op_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("op ")]


@pytest.fixture
def kvm_daemon(daemon_factory):
    return daemon_factory("--backend", "kvm")


@pytest.mark.needs_kvm
@pytest.mark.transports("fuse")  # CUSE passes value arguments itself
@pytest.mark.parametrize("path", ["pic", "ioapic"])
def test_without_the_launcher_set_irqline_fails_with_efault(kvm_daemon, guests, path):
    """What issue 16 is about: the kernel (FUSE) refuses the call before the daemon sees it."""
    p = subprocess.run(dm_argv(guests, path, build_c("irq_dm"), kvm_daemon.node), capture_output=True,
                       text=True, timeout=HANG_GUARD_S)  # fmt: skip
    assert p.returncode == 3, p.stdout + p.stderr
    assert op_lines(p.stdout) == ["op 0 low ret=-1 errno=EFAULT"]
    assert "set_irqline" not in kvm_daemon.cli("status", "--json").stdout  # never reached the daemon


@pytest.mark.needs_kvm
@pytest.mark.parametrize("link", ["dynamic", "static"])
@pytest.mark.parametrize("path", ["pic", "ioapic"])
def test_with_the_launcher_each_op_reaches_the_guest(kvm_daemon, guests, path, link):
    """Each op does what ACRN's does on an edge-triggered input: one interrupt per
    rising edge, none otherwise; the guest's handler reports each one."""
    binary = build_c("irq_dm") if link == "dynamic" else static_build("irq_dm")
    p = subprocess.run(launcher(kvm_daemon.node, *dm_argv(guests, path, binary, kvm_daemon.node)),
                       capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr + kvm_daemon.log()
    vector = "0x21" if path == "pic" else "0x44"
    assert op_lines(p.stdout) == [
        f"op {i} {op} ret=0 vectors={vector if edge else ''}" for i, (op, edge) in enumerate(zip(OPS, EDGES, strict=True))
    ]
    assert p.stdout.splitlines()[-1] == "done"


@pytest.mark.needs_kvm
def test_serve_runs_its_command_through_the_launcher(daemon_factory, guests, tmp_path):
    """``serve -- CMD``: CMD (here a shell running the device model: a child of CMD)
    gets its interrupts through, and the daemon exits with CMD's status."""
    d = daemon_factory("--backend", "kvm", start=False)
    node = d.node
    script = " ".join(dm_argv(guests, "ioapic", build_c("irq_dm"), node, ["raise", "fall"])) + "; exit $?"
    d.args += ["--", "sh", "-c", script]
    d.start()
    assert d.proc is not None
    assert d.proc.wait(timeout=HANG_GUARD_S) == 0, d.log()
    log = d.log()
    assert "op 0 raise ret=0 vectors=0x44" in log and "op 1 fall ret=0 vectors=0x44" in log
    exited = events(log, "launcher.command_exited")
    assert len(exited) == 1, log
    assert exited[0]["carried"] == 4  # two ops, two fences


# -- fuzzing the trapped path -----------------------------------------------------------

FDS = ["vm", "novm", "null", "closed", -1, 0, 1 << 20]


def expected(fd: int | str, cmd: int, arg: int) -> int | None:
    """What the driver answers to a trapped call on the node (as through CUSE); None where
    the answer is the kernel's, which the launcher must not change."""
    low = cmd & 0xFFFF_FFFF
    if fd not in ("vm", "novm") or low not in ext.VALUE_CALLS:
        return None
    if fd == "novm":
        return errno.EINVAL
    if low == EVENT_FD:
        return errno.ENOTTY
    return 0 if arg & 0xFFFF_FFFF < 48 else errno.EPERM  # the vIOAPIC's 48 GSIs (hv A.2)


def commands() -> st.SearchStrategy[int]:
    """Trapped numbers (upper bits as the caller left them), neighbours that are not."""
    trapped = st.sampled_from(sorted(ext.VALUE_CALLS))
    return st.one_of(
        trapped,
        st.builds(lambda c, hi: c | hi << 32, trapped, st.integers(1, 0xFFFF_FFFF)),
        st.sampled_from([SET_IRQLINE + 1, SET_IRQLINE ^ 0x40000000, EVENT_FD - 1, 0xA225,
                         abi.ioc(1, 0xA2, 0x25, 4), ext.ACRN_EMU_IOCTL_VALUE_CALL]),
    )  # fmt: skip


@pytest.mark.transports("fuse")  # the trapped path exists only there
def test_fuzz_the_trapped_path(hsm_daemon, clients):
    """Random fds, request numbers and values from both threads of a launched client,
    side by side with an unlaunched one: on the node, a trapped call gets the driver's
    answer; anything else gets exactly what the unlaunched client got. The daemon and
    the launcher stay up, the calls land on the caller's VM, nothing logs a traceback."""
    launched = clients(hsm_daemon.node, launched=True)
    plain = clients(hsm_daemon.node, launched=False)
    carried = {"n": 0}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.sampled_from(FDS), commands(), st.integers(0, 2**64 - 1) | st.integers(0, 64),
           st.integers(0, 1))  # fmt: skip
    def one(fd: int | str, cmd: int, arg: int, thread: int) -> None:
        got = launched.call(fd, cmd, arg, thread)
        want = expected(fd, cmd, arg)
        if want is None:  # untouched: a random value is no mapped address in either process
            assert got == plain.call(fd, cmd, arg, thread), (fd, hex(cmd), hex(arg))
        else:
            assert got == want, (fd, hex(cmd), hex(arg))
            if fd == "vm" and cmd & 0xFFFF_FFFF == SET_IRQLINE:
                carried["n"] += 1

    one()
    st_json = json.loads(hsm_daemon.cli("status", "--json").stdout)
    counts = next(v for v in st_json["hsm"]["vms"] if v["vmid"] == launched.vmid)["hypercalls"]["counts"]
    assert carried["n"] > 0 and counts.get("set_irqline", {"calls": 0})["calls"] == carried["n"]
    assert launched.call("vm", SET_IRQLINE, irqline(3, abi.IRQ_RAISING_PULSE)) == 0  # still carrying
    rc, err = launched.close()
    assert rc == 0 and "Traceback" not in err
    assert "Traceback" not in hsm_daemon.log()


# A device model handing a file to SETUP_VM_EVENT_FD (ACRN's kernel), as acrn-dm does.
_EVENT_FD_CALLS = """
import ctypes, os, sys, tempfile
libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
node = os.open(sys.argv[1], os.O_RDWR)
with tempfile.TemporaryFile() as f:
    for fd in (f.fileno(), 999):
        r = libc.ioctl(node, 0x4004A2A1, fd)
        print(os.fstat(fd).st_ino & 0x7FFFFFFF if fd == f.fileno() else -1, r, ctypes.get_errno() if r < 0 else 0)
"""


@pytest.mark.needs_fuse
def test_an_fd_value_is_carried_as_the_launchers_copy_of_the_callers_file(tmp_path):
    """SETUP_VM_EVENT_FD's value is an fd number of the caller, and the daemon takes the
    file from whoever makes the call (pidfd_getfd): the launcher carries its own copy of
    the caller's file, so the daemon gets the caller's file. tests/support/value_echo.py
    answers with the inode of what it got."""
    node = tmp_path / "echo"
    server = subprocess.Popen(
        [sys.executable, "-m", "cdev", "--device", "tests.support.value_echo:ValueEcho", "--node", str(node),
         "--run-dir", str(tmp_path / "run"), "--transport", "fuse"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert readline(server, "the echo node") == "READY"
        p = subprocess.run(launcher(node, sys.executable, "-c", _EVENT_FD_CALLS, str(node)),
                           capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
        assert p.returncode == 0, p.stderr
        (ino, ret, err), bad = (line.split() for line in p.stdout.splitlines())
        assert int(ino) > 0 and ret == ino and err == "0"  # the caller's own file
        assert bad == ["-1", "-1", str(errno.EBADF)]  # not an open fd: -1 went instead
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=HANG_GUARD_S)
    assert not node.exists() or not os.path.ismount(node)
