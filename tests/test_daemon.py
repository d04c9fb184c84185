"""The daemon as a process: readiness, signals, crash recovery, and the CLI."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from tests.conftest import mounted_under
from tests.support.answers import pci_answer, pio_answer
from tests.support.cbuild import build_c

pytestmark = pytest.mark.needs_fuse


def test_sigterm_unmounts_and_exits_zero(daemon_factory, tmp_path):
    d = daemon_factory()
    assert mounted_under(tmp_path), "the node should be mounted while serving"
    assert d.stop(signal.SIGTERM) == 0
    assert not mounted_under(tmp_path)
    assert not d.node.exists(), "the node file the daemon created is removed"
    assert not d.control.exists()
    assert "STOPPING=1" in "\n".join(d.notify.messages) or _drained(d)


def _drained(d) -> bool:
    d.notify.drain()
    return any("STOPPING=1" in m for m in d.notify.messages)


def test_sigint_also_stops_cleanly(daemon_factory, tmp_path):
    d = daemon_factory()
    assert d.stop(signal.SIGINT) == 0
    assert not mounted_under(tmp_path)


def test_restart_after_sigkill_needs_no_manual_cleanup(daemon_factory, tmp_path):
    d = daemon_factory()
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    assert mounted_under(tmp_path), "SIGKILL leaves stale mounts behind"
    d2 = daemon_factory()
    assert "stale mount" in d2.log()
    out = d2.cli("cpuid", "0x40000000").stdout
    assert "ACRNACRNACRN" in out


def test_second_daemon_on_a_busy_node_refuses(daemon_factory):
    daemon_factory()
    second = daemon_factory(start=False)
    proc = subprocess.run(second.args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "busy" in proc.stderr or "another running daemon" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_status_cpuid_cli(hsm_daemon):
    st = json.loads(hsm_daemon.cli("status", "--json").stdout)
    assert st["hsm"]["vms"] == []
    assert st["transport"] == "fuse"
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
    assert p.returncode == 1 and "no vCPU" in p.stderr


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


def test_the_readers_polling_window_stays_shut_for_sparse_requests(hsm_daemon):
    """Requests seconds apart (one `inject` each) never open the express
    reader's polling window beyond its first step: after every sleep the gap
    since its last answer decides, a long one halves the window (to 0 below
    10 us) and only the device model's quick ATTACH after a NOTIFY doubles it
    again. A fixed window would read 200 here (cdev_rx_adapt in fuse_glue.c)."""
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
