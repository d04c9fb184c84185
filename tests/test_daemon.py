"""The daemon as a process: readiness, signals, crash recovery, and the CLI."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from acrn_hsm_emu.config import format_cpus
from tests.conftest import mounted_under
from tests.support.answers import pci_answer, pio_answer
from tests.support.cbuild import build_c


def served(d) -> bool:
    """The node is in place: a mount of our FUSE file, or the kernel's CUSE device."""
    if d.transport == "cuse":
        return d.node.is_char_device()
    return str(d.node) in mounted_under(d.tmp)


def test_sigterm_unmounts_and_exits_zero(daemon_factory, tmp_path):
    d = daemon_factory()
    assert served(d), "the node should be in place while serving"
    assert d.stop(signal.SIGTERM) == 0
    assert not mounted_under(tmp_path)
    assert not d.node.exists(), "the node the daemon made is removed"
    assert not d.control.exists()
    assert "STOPPING=1" in "\n".join(d.notify.messages) or _drained(d)


def _drained(d) -> bool:
    d.notify.drain()
    return any("STOPPING=1" in m for m in d.notify.messages)


def test_sigint_also_stops_cleanly(daemon_factory, tmp_path):
    d = daemon_factory()
    assert d.stop(signal.SIGINT) == 0
    assert not mounted_under(tmp_path)
    assert not d.node.exists()


def test_restart_after_sigkill_needs_no_manual_cleanup(daemon_factory, tmp_path):
    """SIGKILL while a device model has a running VM: the device model's next ioctls and a new
    open get ENOTCONN or ENOENT (never ENOTTY); the restarted daemon leaves nothing behind and
    serves a new device model."""
    d = daemon_factory()
    dm = subprocess.Popen([str(build_c("dm_loop")), str(d.node), "0x1"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    assert dm.stdout is not None and dm.stdout.readline().startswith("vmid=1 ")
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    dm.terminate()  # its teardown ioctls now reach a dead daemon
    _, dm_err = dm.communicate(timeout=60)
    assert "ENOTTY" not in dm_err and ("ENOTCONN" in dm_err or "ENODEV" in dm_err), dm_err
    opened = subprocess.run([str(build_c("hsm_open")), str(d.node)], capture_output=True, text=True,
                            timeout=60, check=True).stdout.strip()
    assert opened in ("open=Transport endpoint is not connected create=-",
                      "open=No such file or directory create=-"), opened
    if d.transport == "fuse":
        assert mounted_under(tmp_path), "SIGKILL leaves stale mounts behind"
        assert d.node.is_file(), "and the placeholder file"
    else:
        assert not d.node.exists(), "the kernel removes a CUSE device with its server"
    d2 = daemon_factory()
    if d.transport == "fuse":
        assert "cdev.stale_mount_removed" in d2.log()
        assert "cdev.stale_node_taken_over" in d2.log()
    out = d2.cli("cpuid", "0x40000000").stdout
    assert "ACRNACRNACRN" in out
    dm = subprocess.Popen([str(build_c("dm_loop")), str(d2.node), "0x1"], stdout=subprocess.PIPE, text=True)
    assert dm.stdout is not None and dm.stdout.readline().startswith("vmid=1 "), "a new device model works"
    assert d2.cli("inject", "--vm", "1", "pio-read", "0x3f8", "1").stdout.strip()
    dm.terminate()
    assert dm.wait(timeout=60) == 0
    assert d2.stop() == 0
    assert not d2.node.exists(), "the taken-over placeholder goes with the clean stop"
    assert not mounted_under(tmp_path)


@pytest.mark.transports("fuse")
def test_a_file_that_is_not_ours_is_left_in_place(daemon_factory):
    """FUSE binds over whatever regular file is at the node path; a file no run of ours
    made (no record in the run dir) is not removed at the stop."""
    d = daemon_factory(start=False)
    d.node.write_text("the administrator's\n")
    d.start()
    assert served(d)
    assert d.stop() == 0
    assert d.node.read_text() == "the administrator's\n"
    d.node.unlink()


def test_second_daemon_on_a_busy_node_refuses(daemon_factory, tmp_path):
    first = daemon_factory()
    second = daemon_factory(start=False)
    proc = subprocess.run(second.args, capture_output=True, text=True, timeout=60, env=second.env)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("{")]  # not the JSON log
    # the node's control socket is taken: refused before the node is looked at
    assert lines == [f"acrn-hsm-emu: control socket {first.control} is in use by another running daemon "
                     f"(is {first.node} served already?); stop it or give this one another --control"]
    # with a socket of its own, the node itself is found busy
    proc = subprocess.run([*second.args, "--control", str(tmp_path / "second.sock")],
                          capture_output=True, text=True, timeout=60, env=second.env)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith(f"acrn-hsm-emu: node path {first.node} is busy"), proc.stderr
    assert not (tmp_path / "second.sock").exists()
    assert "Traceback" not in proc.stderr
    # The first one still serves.
    assert "ACRNACRNACRN" in first.cli("cpuid", "0x40000000").stdout


@pytest.mark.transports("cuse")
def test_a_second_daemon_racing_for_a_cuse_name_is_refused_by_the_kernel(daemon_factory):
    """Past the start-up check (the name looked free), the kernel still refuses a second
    CUSE device of the same name: the daemon must see that, not report ready."""
    first = daemon_factory()
    second = daemon_factory(start=False)
    # Bypass the early check: the node path is the first daemon's, seen as free by a fake.
    code = (
        "import os, sys, cdev.cuse\n"
        "cdev.cuse.registered_devt = lambda name: None\n"
        "real = os.path.lexists\n"
        f"os.path.lexists = lambda p: False if str(p) == {str(first.node)!r} else real(p)\n"
        "from acrn_hsm_emu.cli import main\n"
        "sys.argv = ['acrn-hsm-emu'] + sys.argv[1:]\n"
        "sys.exit(main())\n"
    )
    # its own control socket: the node's default one is the first daemon's
    proc = subprocess.run([sys.executable, "-c", code, *second.args[1:], "--control", str(second.tmp / "c2.sock")],
                          capture_output=True, text=True, timeout=120, env=second.env)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("{")]
    assert lines == [
        f"acrn-hsm-emu: node path {first.node} is busy: the kernel refused CUSE device "
        f"{first.node.name} (another daemon registered that name first)"
    ], proc.stderr
    assert "READY=1" not in second.notify.lines()
    assert "ACRNACRNACRN" in first.cli("cpuid", "0x40000000").stdout


def fuse_connection(d) -> pathlib.Path:
    """/sys/fs/fuse/connections/N of the daemon's FUSE mount (N: the minor of its st_dev)."""
    control = pathlib.Path("/sys/fs/fuse/connections")
    if not any(m for m in mounted_under(control)):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(control)], check=True)
    st = os.stat(d.run_dir / f"{d.node.name}.fuse")
    return control / str(os.minor(st.st_dev))


@pytest.mark.transports("fuse")  # a CUSE connection is not in fusectl: only its server ends it
def test_a_session_the_kernel_ends_stops_the_daemon(daemon_factory):
    """Aborting the connection (the fusectl abort file, or `umount -f`) takes the node
    away: the daemon says so in one line and exits 1, it does not go on serving nothing."""
    d = daemon_factory()
    (fuse_connection(d) / "abort").write_text("1")
    assert d.proc is not None
    rc = d.proc.wait(timeout=60)
    assert rc == 1, d.log()
    lost = d.events("daemon.node_lost")
    assert len(lost) == 1 and lost[0]["level"] == "error", d.events()
    assert lost[0]["reason"] == f"the kernel ended the session serving {d.node}; the node is gone"
    assert f"acrn-hsm-emu: {lost[0]['reason']}" in d.log().splitlines()
    assert not d.node.exists()
    assert not mounted_under(d.tmp)


def test_status_cpuid_cli(hsm_daemon):
    st = json.loads(hsm_daemon.cli("status", "--json").stdout)
    assert st["hsm"]["vms"] == []
    assert st["transport"] == hsm_daemon.transport
    text = hsm_daemon.cli("status").stdout
    assert "no VMs" in text
    out = hsm_daemon.cli("cpuid", "0x40000000").stdout
    assert "eax=0x40000010" in out and "signature='ACRNACRNACRN'" in out
    out = hsm_daemon.cli("cpuid", "0x40000001").stdout
    assert out.startswith("eax=0x00000001")


def test_cli_errors_are_readable(hsm_daemon, tmp_path):
    p = hsm_daemon.cli("status", "--control", str(tmp_path / "nope.sock"), check=False)
    assert p.returncode == 1 and "no daemon control socket" in p.stderr
    p = hsm_daemon.cli("inject", "--vm", "1", "pio-read", "0x3f8", "3", check=False)
    assert p.returncode == 2 and "size must be one of" in p.stderr
    p = hsm_daemon.cli("inject", "--vm", "9", "pio-read", "0x3f8", "1", check=False)
    assert p.returncode == 1 and p.stderr == "acrn-hsm-emu: daemon: no VM with vmid 9\n"


def test_inject_through_a_served_vm(hsm_daemon):
    dm = build_c("dm_loop")
    proc = subprocess.Popen([str(dm), str(hsm_daemon.node), "0x1"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        header = proc.stdout.readline().split()
        vmid = int(header[0].split("=")[1])
        out = hsm_daemon.cli("inject", "--vm", str(vmid), "pio-read", "0x3f8", "1").stdout
        assert out.strip() == f"{pio_answer(0x3F8, 1):#x}"
        out = hsm_daemon.cli("inject", "--vm", str(vmid), "pci-read", "00:1f.3", "0x40", "4").stdout
        assert out.strip() == f"{pci_answer(0, 0x1F, 3, 0x40, 4):#x}"
        assert hsm_daemon.cli("inject", "--vm", str(vmid), "mmio-write", "0xfed00000", "8", "0x1122").stdout == ""
        st = json.loads(hsm_daemon.cli("status", "--json").stdout)
        vm = next(v for v in st["hsm"]["vms"] if v["vmid"] == vmid)
        assert vm["owner_pid"] == proc.pid
        text = hsm_daemon.cli("status").stdout
        assert f"VM {vmid}" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "pio=1" in out and "pci=1" in out and "mmio=1" in out


# Under CUSE each NOTIFY is two calls back to back (the first has no argument; the
# reader answers it with the retry and the kernel sends it again at once), so an
# exchange opens the window as far as the gap inside it, by design: what that gap is
# under the emulation (TCG) where the CUSE half runs says nothing. The retry's own
# answer is checked byte for byte in test_express.py.
@pytest.mark.transports("fuse")
def test_the_readers_polling_window_stays_shut_for_sparse_requests(hsm_daemon):
    """Requests seconds apart (one `inject` each) never open the express
    reader's polling window beyond its first step: after every sleep the gap
    since its last answer decides, a long one halves the window (to 0 below
    10 us) and only the device model's quick ATTACH after a NOTIFY doubles it
    again. A fixed window would read 200 here (cdev_rx_adapt in native/fuse_glue.c)."""
    dm = build_c("dm_loop")
    proc = subprocess.Popen([str(dm), str(hsm_daemon.node), "0x1"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        vmid = int(proc.stdout.readline().split()[0].split("=")[1])
        for _ in range(5):
            out = hsm_daemon.cli("inject", "--vm", str(vmid), "pio-read", "0x3f8", "1").stdout
            assert out.strip() == f"{pio_answer(0x3F8, 1):#x}"
        reader = json.loads(hsm_daemon.cli("status", "--json").stdout)["reader"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert reader["native"] and reader["answered"] >= 10  # 5 x (NOTIFY + ATTACH)
    assert reader["poll_max_us"] == 200
    assert reader["poll_window_us"] <= 10 and reader["poll_hits"] == 0


def threads_of(pid: int) -> list[tuple[str, str]]:
    """(name, Cpus_allowed_list) of each thread of ``pid``."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            name = f.read().strip()
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            allowed = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("Cpus_allowed_list:"))
        out.append((name, allowed))
    return out


# Placement does not depend on the transport, and its polling premise (completions within
# 200 us) does not hold under the emulation (TCG) where the CUSE half runs.
@pytest.mark.transports("fuse")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="placement needs two CPUs this process may use")
@pytest.mark.parametrize("placement", ["pinned", "pinned-no-polling", "unset"])
def test_service_and_vcpu_cpus_place_the_threads_as_acrn_partitions_pcpus(daemon_factory, tmp_path, placement):
    """--service-cpus confines the daemon's own threads; --vcpu-cpus pins each
    vCPU thread to the CPU standing for its pCPU (pCPU n on the n-th listed,
    wrapping): a VM on pCPUs 1 and 2 with the list "A,B" has vCPU 0 on B and
    vCPU 1 on A, and a pinned vCPU polls for its completions (unless
    --vcpu-poll-us 0). Unset, vCPU threads may run anywhere, not only where
    the daemon's threads are confined, and never poll."""
    cpus = sorted(os.sched_getaffinity(0))
    a, b = cpus[0], cpus[-1]
    wl = tmp_path / "writes.json"
    steps = [{"op": "pio", "port": 0x500, "size": 4, "write": True, "value": 1}]
    wl.write_text(json.dumps({"vcpu": [{"id": v, "repeat": 0, "steps": steps} for v in (0, 1)]}))
    flags = ["--backend", "scripted", "--workload", str(wl), "--service-cpus", str(a)]
    if placement != "unset":
        flags += ["--vcpu-cpus", f"{a},{b}"]
    if placement == "pinned-no-polling":
        flags += ["--vcpu-poll-us", "0"]
    d = daemon_factory(*flags)
    dm = build_c("dm_loop")
    proc = subprocess.Popen([str(dm), str(d.node), "0x6"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        vmid = int(proc.stdout.readline().split()[0].split("=")[1])
        for _ in range(600):  # until both vCPUs have done some requests
            st = json.loads(d.cli("status", "--json").stdout)
            vm = next(v for v in st["hypervisor"]["vms"] if v["vmid"] == vmid)
            if min(v["requests"] for v in vm["vcpus"]) >= 500:
                break
            time.sleep(0.05)
        threads = threads_of(d.proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    pinned = placement != "unset"
    everywhere = format_cpus(cpus)
    expected = {f"vm{vmid}-vcpu0": str(b), f"vm{vmid}-vcpu1": str(a)} if pinned else {
        f"vm{vmid}-vcpu0": everywhere, f"vm{vmid}-vcpu1": everywhere}
    assert {n: allowed for n, allowed in threads if n.startswith(f"vm{vmid}-vcpu")} == expected, threads
    others = [(n, allowed) for n, allowed in threads if not n.startswith("vm")]
    assert "cdev-rx" in {n for n, _ in others}, threads  # the express reader, named
    assert all(allowed == str(a) for _, allowed in others), threads
    assert [v["pcpu"] for v in vm["vcpus"]] == [1, 2]
    assert [v["host_cpus"] for v in vm["vcpus"]] == ([[b], [a]] if pinned else [cpus, cpus])
    assert min(v["requests"] for v in vm["vcpus"]) >= 500, vm
    polled = [v["completions_polled"] for v in vm["vcpus"]]
    if placement == "pinned":  # most completions come within 200 us of the request
        assert all(n > 0 for n in polled), vm
    else:
        assert polled == [0, 0], vm
    assert st["placement"] == {
        "service_cpus": [a],
        "vcpu_cpus": [a, b] if pinned else None,
        "vcpu_poll_us": {"pinned": 200, "pinned-no-polling": 0, "unset": 0}[placement],
    }
