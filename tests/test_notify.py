"""systemd's notify protocol, as a service manager sees it: READY, STATUS, WATCHDOG, STOPPING.

A fake NOTIFY_SOCKET (a path, or the abstract '@' form) collects what the
daemon sends while a device model creates and destroys a VM.
"""

from __future__ import annotations

import re
import signal
import subprocess
import uuid

import pytest

from tests.conftest import NotifyListener, mounted_under
from tests.support.cbuild import build_c

pytestmark = pytest.mark.needs_fuse

VMS = re.compile(r"^STATUS=serving .*: (\d+) VM\(s\)$")


def vm_count(line: str) -> int | None:
    m = VMS.match(line)
    return int(m[1]) if m else None


def start_dm(node) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [str(build_c("dm_loop")), str(node), "0x1"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("vmid="), "dm_loop did not create its VM"
    return proc


def stop_dm(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    if request.param == "path":
        n = NotifyListener(tmp_path / "notify.sock")
    else:
        n = NotifyListener(abstract=f"acrn-hsm-emu-test-{uuid.uuid4().hex}")
    yield n
    n.close()


def test_ready_status_stopping_in_order(daemon_factory, listener):
    d = daemon_factory(notify=listener)
    assert listener.address == d.env["NOTIFY_SOCKET"]
    # READY=1 means the node is served: a mount now, not the bare placeholder file (FUSE),
    # or the kernel's character device (CUSE).
    if d.transport == "fuse":
        assert str(d.node) in mounted_under(d.node)
    else:
        assert d.node.is_char_device()
    first = listener.lines()
    assert first[0] == "READY=1"
    assert vm_count(first[1]) == 0, first

    dm = start_dm(d.node)
    try:
        listener.wait_until(lambda line: vm_count(line) == 1, "STATUS with 1 VM")
    finally:
        stop_dm(dm)
    listener.wait_until(lambda _line: _zero_after_one(listener.lines()), "STATUS back to 0 VMs")
    assert d.stop() == 0
    listener.drain()
    lines = listener.lines()
    assert lines.count("READY=1") == 1
    assert lines[-1] == "STOPPING=1", lines
    counts = [vm_count(x) for x in lines if vm_count(x) is not None]
    # STATUS is sent on change only: 0 (with READY), 1 while the VM lives, 0 after.
    assert counts == [0, 1, 0], lines
    assert lines.index("READY=1") < lines.index("STOPPING=1")


def _zero_after_one(lines: list[str]) -> bool:
    counts = [vm_count(x) for x in lines if vm_count(x) is not None]
    return 1 in counts and 0 in counts[counts.index(1):]


def test_watchdog_pings_when_asked(daemon_factory, tmp_path):
    listener = NotifyListener(tmp_path / "wd.sock")
    # 2 ms: the daemon pings every 1 ms, i.e. at every pass of its status loop.
    d = daemon_factory(notify=listener, env={"WATCHDOG_USEC": "2000"})
    for n in range(1, 4):
        listener.wait_until(lambda _line, n=n: listener.lines().count("WATCHDOG=1") >= n, f"{n} pings")
    assert d.stop() == 0
    listener.drain()
    assert listener.lines()[-1] == "STOPPING=1"
    assert listener.lines().index("READY=1") < listener.lines().index("WATCHDOG=1")


def test_no_watchdog_for_another_pid(daemon_factory, tmp_path):
    """WATCHDOG_PID names the process the watchdog is meant for; not us: no pings."""
    listener = NotifyListener(tmp_path / "wd.sock")
    d = daemon_factory(notify=listener, env={"WATCHDOG_USEC": "2000", "WATCHDOG_PID": "1"})
    # A whole VM life: the status loop ran many passes, each of which would have pinged.
    dm = start_dm(d.node)
    listener.wait_until(lambda line: vm_count(line) == 1, "STATUS with 1 VM")
    stop_dm(dm)
    listener.wait_until(lambda _l: _zero_after_one(listener.lines()), "STATUS back to 0 VMs")
    assert d.stop() == 0
    listener.drain()
    assert "WATCHDOG=1" not in listener.lines()
    assert listener.lines()[-1] == "STOPPING=1"


def test_command_does_not_inherit_the_notify_socket(daemon_factory, tmp_path):
    """``serve -- CMD``: the command must not be able to speak for the daemon."""
    out = tmp_path / "env.txt"
    d = daemon_factory(
        "--", "sh", "-c", f'echo "N=$NOTIFY_SOCKET W=$WATCHDOG_USEC" > {out}',
        env={"WATCHDOG_USEC": "60000000"},
    )
    assert d.proc is not None
    assert d.proc.wait(timeout=60) == 0, d.log()
    assert out.read_text().strip() == "N= W="
    d.notify.drain()
    assert d.notify.lines()[-1] == "STOPPING=1"
