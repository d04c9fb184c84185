"""The command line: one daemon per node, and no sharp edges (issue 19).

Each node's daemon has its own control socket, derived from the node's path;
the control commands find the daemon of the configuration's node, or of
``--node``. Usage errors are one line and exit 2, every argument says what it
does and its default, and nothing is sent to a daemon before the arguments
are checked.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
import subprocess
from collections.abc import Iterator

import pytest

from acrn_hsm_emu import cli, config
from tests.conftest import VENV_BIN, Daemon
from tests.support.answers import pio_answer
from tests.support.cbuild import build_c
from tests.support.poll import wait_until

EXE = str(VENV_BIN / "acrn-hsm-emu")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


def usage_error(p: subprocess.CompletedProcess[str]) -> str:
    """The one line of a usage error (exit 2, nothing on stdout, no traceback)."""
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stdout == "" and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


# -- one daemon per node -----------------------------------------------------------------------


def test_the_default_control_socket_is_the_nodes():
    assert config.Settings().control_path == "/run/acrn-hsm-emu/dev-acrn_hsm.sock"
    assert config.escape_path("/dev/acrn_hsm") == "dev-acrn_hsm"
    assert config.escape_path("/tmp/a-b/.c") == "tmp-a\\x2db-.c"  # as systemd-escape --path
    two = {config.control_socket("/run/x", n) for n in ("/dev/acrn_hsm", "/dev/acrn_hsm2", "/tmp/acrn_hsm")}
    assert len(two) == 3
    # too long for a unix socket: a digest of the path, still one per node
    long_node = "/" + "n" * 120
    path = config.control_socket("/run/acrn-hsm-emu", long_node)
    assert len(path.encode()) <= config.SUN_PATH_MAX and path.startswith("/run/acrn-hsm-emu/node-")
    assert path != config.control_socket("/run/acrn-hsm-emu", long_node + "2")
    # an explicit control wins
    assert config.Settings(control="/x.sock").control_path == "/x.sock"


@pytest.fixture
def two_daemons(daemon_factory, tmp_path: pathlib.Path) -> Iterator[tuple[Daemon, Daemon, pathlib.Path]]:
    """Two daemons on two nodes at once, one run_dir; a configuration naming the first's node."""
    a = daemon_factory()
    b = daemon_factory(name="acrn_hsm_b")
    assert a.control != b.control
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'node = "{a.node}"\nrun_dir = "{a.run_dir}"\n')
    yield a, b, cfg


def test_each_cli_command_reaches_the_daemon_of_its_node(two_daemons):
    a, b, cfg = two_daemons
    conf = ("--config", str(cfg))
    # status names the node; the configuration's node by default, --node's when given
    st_a = json.loads(run("status", *conf, "--json").stdout)
    st_b = json.loads(run("status", *conf, "--node", str(b.node), "--json").stdout)
    assert (st_a["node"], st_a["control"]) == (str(a.node), str(a.control))
    assert (st_b["node"], st_b["control"]) == (str(b.node), str(b.control))
    assert st_a["pid"] == a.proc.pid and st_b["pid"] == b.proc.pid
    assert f"  node {b.node} (" in run("status", *conf, "--node", str(b.node)).stdout.splitlines()[0]
    # without a configuration: the node and the daemon's run_dir
    p = run("status", "--node", str(b.node), "--run-dir", str(b.run_dir), "--json")
    assert json.loads(p.stdout)["pid"] == b.proc.pid, p.stderr
    # cpuid: both answer, each its own
    for d in (a, b):
        p = run("cpuid", "0x40000000", *conf, "--node", str(d.node))
        assert p.returncode == 0 and "ACRNACRNACRN" in p.stdout, p.stderr
    # inject reaches the VM of b's device model only through b
    dm = subprocess.Popen([str(build_c("dm_loop")), str(b.node), "0x1"], stdout=subprocess.PIPE, text=True)
    try:
        assert dm.stdout is not None
        vmid = dm.stdout.readline().split()[0].split("=")[1]
        p = run("inject", "pio-read", "0x3f8", "1", "--vm", vmid, "--node", str(b.node), *conf)
        assert (p.returncode, p.stdout.strip()) == (0, f"{pio_answer(0x3F8, 1):#x}"), p.stderr
        p = run("inject", "--vm", vmid, *conf, "pio-read", "0x3f8", "1")  # a's: no such VM there
        assert (p.returncode, p.stderr) == (1, f"acrn-hsm-emu: daemon: no VM with vmid {vmid}\n")
        assert json.loads(run("status", *conf, "--json").stdout)["hsm"]["vms"] == []
        # vm list: each daemon its own VMs
        assert json.loads(run("vm", "list", "--json", *conf).stdout) == []
        rows = json.loads(run("vm", "list", "--json", *conf, "--node", str(b.node)).stdout)
        assert [(r["vmid"], r["owner_pid"]) for r in rows] == [(int(vmid), dm.pid)]
    finally:
        dm.send_signal(signal.SIGTERM)
        dm.communicate(timeout=60)
    # publish finds b's daemon too (same mount namespace: nothing to publish)
    p = run("publish", *conf, "--node", str(b.node))
    assert p.returncode == 0 and str(b.node) in p.stdout, p.stderr


def test_a_socket_of_another_node_is_refused_before_anything_is_done(two_daemons):
    a, b, cfg = two_daemons
    # --control, or $ACRN_HSM_EMU_CONTROL, naming a's daemon while the command means b's node
    p = run("inject", "--control", str(a.control), "--node", str(b.node), "--vm", "1", "pio-read", "0x3f8", "1")
    assert (p.returncode, p.stderr) == (1, f"acrn-hsm-emu: daemon: this daemon serves {a.node}, not {b.node}\n")
    # the variable is for the configuration's node; a named node has its own socket
    p = run("status", "--config", str(cfg), "--node", str(b.node), "--json",
            env={"ACRN_HSM_EMU_CONTROL": str(a.control)})
    assert json.loads(p.stdout)["node"] == str(b.node), p.stderr
    p = run("status", "--json", env={"ACRN_HSM_EMU_CONTROL": str(a.control)})
    assert json.loads(p.stdout)["node"] == str(a.node), p.stderr


def test_a_second_daemon_with_a_taken_socket_never_serves(daemon_factory):
    """A daemon whose control socket is taken stops before its node exists."""
    first = daemon_factory()
    second = daemon_factory("--control", str(first.control), start=False, name="acrn_hsm_b")
    p = subprocess.run(second.args, capture_output=True, text=True, timeout=120, env=second.env)
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if not ln.startswith("{")]
    assert lines == [f"acrn-hsm-emu: control socket {first.control} is in use by another running daemon "
                     f"(is {second.node} served already?); stop it or give this one another --control"]
    assert not os.path.lexists(second.node), "the node was touched"
    assert "READY=1" not in second.notify.lines()
    assert json.loads(first.cli("status", "--json").stdout)["node"] == str(first.node)


# -- sharp edges: one test each --------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "soon"])
def test_inject_timeout_must_be_a_positive_finite_number(value):
    line = usage_error(run("inject", "--vm", "1", f"--timeout={value}", "pio-read", "0x3f8", "1"))
    assert line.startswith(f"acrn-hsm-emu inject: error: argument --timeout: not a positive number of "
                           f"seconds: '{value}' (usage: acrn-hsm-emu inject ")


@pytest.mark.parametrize("argv", [
    ["inject", "pio-read", "0x3f8", "1", "--vm", "1"],
    ["inject", "--vm", "1", "pio-read", "0x3f8", "1"],
    ["inject", "pio-read", "--vm", "1", "0x3f8", "1"],
    ["inject", "pio-read", "0x3f8", "--timeout", "2", "1", "--vm", "1"],
])
def test_options_are_accepted_in_any_order(argv):
    args = cli.parse(argv)
    assert (args.vm, args.access) == (1, ["pio-read", "0x3f8", "1"])
    assert cli.parse(["cpuid", "0x40000000", "--vm", "1", "1"]).subleaf == 1
    assert cli.parse(["status", "--json", "--node", "/dev/x"]).json


def test_a_negative_vm_is_refused_before_anything_is_sent(tmp_path):
    listening = tmp_path / "listening.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(listening))
        srv.listen(1)
        srv.setblocking(False)
        for args in (["inject", "--vm", "-1", "pio-read", "0x3f8", "1"], ["cpuid", "0", "--vm", "-1"],
                     ["inject", "--vm", "65535", "pio-read", "0x3f8", "1"],
                     ["inject", "--vm", "1", "--vcpu", "-1", "pio-read", "0x3f8", "1"]):
            line = usage_error(run(*args, "--control", str(listening)))
            assert "error: argument --v" in line and ": not a " in line, line
        with pytest.raises(BlockingIOError):
            srv.accept()  # nobody connected


def test_a_missing_vm_has_one_wording_and_vm_0_is_the_service_vm(hsm_daemon):
    inject = hsm_daemon.cli("inject", "--vm", "7", "pio-read", "0x3f8", "1", check=False)
    cpuid = hsm_daemon.cli("cpuid", "--vm", "7", "0", check=False)
    assert inject.returncode == cpuid.returncode == 1
    assert inject.stderr == cpuid.stderr == "acrn-hsm-emu: daemon: no VM with vmid 7\n"
    p = hsm_daemon.cli("inject", "--vm", "0", "pio-read", "0x3f8", "1", check=False)
    assert p.stderr == ("acrn-hsm-emu: daemon: VM 0 is the Service VM, whose accesses are not trapped: "
                        "inject into a User VM\n")
    assert "post-launched" not in p.stderr
    # the Service VM's CPUID view is VM 0's
    assert hsm_daemon.cli("cpuid", "--vm", "0", "0x40000001").stdout == hsm_daemon.cli("cpuid", "0x40000001").stdout


def test_access_sizes_are_listed_not_a_tuple():
    line = usage_error(run("inject", "--vm", "1", "pio-read", "0x3f8", "3"))
    assert line == "acrn-hsm-emu: pio access size must be one of 1, 2, 4, not 3"
    line = usage_error(run("inject", "--vm", "1", "mmio-read", "0x1000", "3"))
    assert line == "acrn-hsm-emu: mmio access size must be one of 1, 2, 4, 8, not 3"


def _parsers() -> list[argparse.ArgumentParser]:
    top, subs = cli.build_parser()
    return [top, *subs.values()]


def test_help_has_no_markup():
    for parser in _parsers():
        text = parser.format_help()
        for markup in ("``", ":func:", ":class:", ":meth:", ".. "):
            assert markup not in text, (parser.prog, markup)
    p = run("--help")
    assert p.returncode == 0 and "``" not in p.stdout


def test_every_argument_has_help_with_its_default():
    missing = []
    for parser in _parsers():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            text = (action.help or "").lower()
            ok = "default" in text or "required" in text or action.nargs == 0 and bool(text)
            if not ok:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}: {action.help!r}")
    assert not missing, "\n".join(missing)


def test_version():
    p = run("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"acrn-hsm-emu {cli._version()}"
    assert cli._version()[0].isdigit()


def test_an_unknown_option_shows_the_subcommands_usage():
    line = usage_error(run("status", "--bogus"))
    assert line.startswith("acrn-hsm-emu status: error: unrecognized arguments: --bogus "
                           "(usage: acrn-hsm-emu status [-h] ")


@pytest.mark.parametrize("argv", [
    [], ["bogus"], ["status", "--bogus"], ["inject", "pio-read", "0x3f8", "1"], ["inject", "--vm", "1"],
    ["inject", "--vm", "x", "pio-read", "0x3f8", "1"], ["inject", "--vm", "1", "pio-read", "0x3f8"],
    ["cpuid"], ["cpuid", "0x1", "0x2", "0x3"], ["cpuid", "-1"], ["status", "--node", "relative"],
    ["check-config", "--bogus"], ["run"], ["serve", "--transport"],
    ["vm"], ["vm", "list", "3"], ["vm", "pause"], ["vm", "reboot", "1"], ["vm", "destroy", "-1"],
    ["vm", "destroy", "1", "2"],
])
def test_every_usage_error_is_one_line_with_exit_2(argv):
    usage_error(run(*argv))


# -- vm list | pause | destroy, and orphans reclaimed ----------------------------------------

# CREATE_VM on a file, with a fresh request page (kept mapped): the vmid, or -errno.
QUIRK_CREATE = r"""
import ctypes, fcntl, mmap, os, sys
from acrn_hsm_emu import abi
pages = []

def create(fd):
    page = mmap.mmap(-1, 4096)
    pages.append(page)
    c = abi.AcrnVmCreation(cpu_affinity=1)
    c.ioreq_buf = ctypes.addressof(ctypes.c_char.from_buffer(page))
    buf = bytearray(bytes(c))
    try:
        fcntl.ioctl(fd, abi.ACRN_IOCTL_CREATE_VM, buf)
    except OSError as e:
        return -e.errno
    return abi.AcrnVmCreation.from_buffer(buf).vmid
"""

# CREATE_VM twice on one file (the driver's second-CREATE_VM quirk: the file loses its first
# VM, which stays in the hypervisor), prints both answers, then exits without clean-up when
# told (a line on stdin).
QUIRK_CLIENT = QUIRK_CREATE + r"""
fd = os.open(sys.argv[1], os.O_RDWR)
print(create(fd), create(fd), flush=True)
os.close(fd)  # the file goes: its lost VM is orphaned
sys.stdin.readline()
"""

# QUIRK_CLIENT's calls in N processes one after another, forked from one interpreter (a
# Python start is seconds under TCG): each orphans a VM and exits; a line gives its pid, its
# answers, and a line on stdin lets the next one start.
QUIRK_FORKER = QUIRK_CREATE + r"""
r, w = os.pipe()
for _ in range(int(sys.argv[2])):
    pid = os.fork()
    if pid == 0:
        fd = os.open(sys.argv[1], os.O_RDWR)
        os.write(w, f"{create(fd)} {create(fd)}".encode())
        os._exit(0)  # without closing anything: the process goes, its file with it
    os.waitpid(pid, 0)
    print(pid, os.read(r, 64).decode(), flush=True)
    sys.stdin.readline()
"""


def _script(script: str, *args: str) -> subprocess.Popen[str]:
    """One of the scripts above, talked to through its stdin and stdout."""
    p = subprocess.Popen([str(VENV_BIN / "python"), "-c", script, *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=pathlib.Path(__file__).parent.parent)  # fmt: skip
    assert p.stdin is not None and p.stdout is not None
    return p


def quirk_client(node: pathlib.Path) -> tuple[subprocess.Popen[str], int]:
    """A process that orphaned a VM through the quirk and is still alive; (process, lost vmid)."""
    p = _script(QUIRK_CLIENT, str(node))
    assert p.stdout is not None
    first, second = (int(x) for x in p.stdout.readline().split())
    assert first >= 1 and second < 0, (first, second)  # the second CREATE_VM fails (EINVAL)
    return p, first


def vm_rows(d: Daemon) -> dict[int, dict[str, object]]:
    return {r["vmid"]: r for r in json.loads(d.cli("vm", "list", "--json").stdout)}


def test_vm_list_pause_destroy_an_owned_vm(hsm_daemon):
    assert hsm_daemon.cli("vm", "list").stdout == "no VMs\n"
    dm = subprocess.Popen([str(build_c("dm_loop")), str(hsm_daemon.node), "0x1"], stdout=subprocess.PIPE, text=True)
    try:
        assert dm.stdout is not None
        vmid = int(dm.stdout.readline().split()[0].split("=")[1])
        row = vm_rows(hsm_daemon)[vmid]
        assert (row["state"], row["owner"], row["owner_pid"], row["vcpus"]) == ("RUNNING", "owned", dm.pid, 1)
        assert f"VM {vmid}: RUNNING  vcpus 1  owned  pid {dm.pid}" in hsm_daemon.cli("vm", "list").stdout
        assert hsm_daemon.cli("vm", "pause", str(vmid)).stdout == f"VM {vmid} paused\n"
        assert vm_rows(hsm_daemon)[vmid]["state"] == "PAUSED"
        assert hsm_daemon.cli("vm", "destroy", str(vmid)).stdout == f"VM {vmid} destroyed\n"
        assert vmid not in vm_rows(hsm_daemon)
        assert json.loads(hsm_daemon.cli("status", "--json").stdout)["hsm"]["vms"] == []
    finally:
        dm.kill()
        dm.wait()
    # refusals: one line each, nothing done
    for args, message in (
        (("vm", "destroy", "7"), "no VM with vmid 7"),
        (("vm", "pause", "0"), "VM 0 is the Service VM: only User VMs can be paused or destroyed"),
    ):
        p = hsm_daemon.cli(*args, check=False)
        assert (p.returncode, p.stderr) == (1, f"acrn-hsm-emu: daemon: {message}\n")
    assert "control.vm_command" in hsm_daemon.log() and "hsm.admin.vm_destroyed" in hsm_daemon.log()


def test_vm_destroy_removes_a_vm_orphaned_by_the_second_create_vm(hsm_daemon):
    client, lost = quirk_client(hsm_daemon.node)
    try:
        rows = vm_rows(hsm_daemon)
        assert rows[lost]["owner"] == "orphaned" and rows[lost]["owner_pid"] == client.pid
        # the rolled-back second VM, if ACRN refused to destroy it, is listed as unclaimed
        assert all(r["owner"] == "unclaimed" for v, r in rows.items() if v != lost)
        assert hsm_daemon.cli("vm", "destroy", str(lost)).stdout == f"VM {lost} destroyed\n"
        rows = vm_rows(hsm_daemon)
        assert lost not in rows
        st = json.loads(hsm_daemon.cli("status", "--json").stdout)
        assert all(v["lost_vmid"] != lost for v in st["hsm"]["vms"])
        for vmid in rows:  # unclaimed leftovers go the same way
            hsm_daemon.cli("vm", "destroy", str(vmid))
        assert vm_rows(hsm_daemon) == {}
    finally:
        client.communicate("\n", timeout=60)
    # a new device model is served as ever
    dm = subprocess.Popen([str(build_c("dm_loop")), str(hsm_daemon.node), "0x1"], stdout=subprocess.PIPE, text=True)
    try:
        assert dm.stdout is not None
        vmid = dm.stdout.readline().split()[0].split("=")[1]
        out = hsm_daemon.cli("inject", "--vm", vmid, "pio-read", "0x3f8", "1").stdout
        assert out.strip() == f"{pio_answer(0x3F8, 1):#x}"
    finally:
        dm.send_signal(signal.SIGTERM)
        dm.communicate(timeout=60)


def _reclaims(d: Daemon) -> set[tuple[int, int]]:
    """(vmid, pid) of each reclaim the daemon logged."""
    return {(e["vmid"], e["pid"]) for e in d.events("hsm.orphan_reclaimed")}


def test_orphans_are_reclaimed_once_their_owner_process_is_gone(hsm_daemon):
    slots = json.loads(hsm_daemon.cli("status", "--json").stdout)["hypervisor"]["platform"]["max_vm_num"]
    client, lost = quirk_client(hsm_daemon.node)
    assert vm_rows(hsm_daemon)[lost]["owner"] == "orphaned"  # kept while its owner lives
    client.communicate("\n", timeout=60)
    # Hang guard only: the daemon logs the reclaim once it sees the process gone.
    for _ in range(100000):
        if lost not in vm_rows(hsm_daemon):
            break
    assert vm_rows(hsm_daemon) == {}, hsm_daemon.log()
    reclaimed = hsm_daemon.events("hsm.orphan_reclaimed")
    assert any(e["vmid"] == lost and e["pid"] == client.pid and e["level"] == "info" for e in reclaimed), reclaimed
    # More quirk clients than the hypervisor has VM slots: none wedges the daemon (each one's
    # CREATE_VM finds a slot, since the one before was reclaimed).
    forker = _script(QUIRK_FORKER, str(hsm_daemon.node), str(slots + 1))
    assert forker.stdin is not None and forker.stdout is not None
    for k in range(slots + 1):
        pid, first, second = (int(x) for x in forker.stdout.readline().split())
        assert first >= 1 and second < 0, (k, first, second, hsm_daemon.log())
        mine = (first, pid)
        wait_until(lambda mine=mine: mine in _reclaims(hsm_daemon), f"client {k}'s orphan reclaimed")
        forker.stdin.write("\n")
        forker.stdin.flush()
    assert forker.wait(timeout=60) == 0
    assert vm_rows(hsm_daemon) == {}
