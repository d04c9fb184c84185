"""cdev through a real mounted node, driven by a C client (issue: the device node)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess

import pytest

from tests.conftest import wait_in_syscall
from tests.support.cbuild import build_c

pytestmark = pytest.mark.needs_fuse


@pytest.fixture(scope="module")
def client() -> str:
    return str(build_c("cdev_client"))


def run(client: str, node, *args: str) -> str:
    proc = subprocess.run([client, str(node), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_iowr_handler_rewrites_struct(cdev_server, client):
    out = run(client, cdev_server.node, "rewrite")
    expected = "".join(f"{(i * 3 + 1) & 0xFF:02x}" for i in range(16))
    assert out.strip() == f"ret=0 bytes={expected}"


def test_io_result_and_raw_argument(cdev_server, client):
    out = run(client, cdev_server.node, "raw", "0x1234567890ab")
    assert out.strip() == "ret=7 lastarg_ret=0 lastarg=0x1234567890ab"


@pytest.mark.parametrize("err", [errno.EPERM, errno.ENODEV, errno.EBUSY, errno.ENOTTY])
def test_negative_errno_reaches_client(cdev_server, client, err):
    out = run(client, cdev_server.node, "fail", str(err))
    assert out.strip() == f"ret=-1 errno={err}"


def start_waiter(client: str, node, cmd: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([client, str(node), cmd], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().startswith("waiting")
    wait_in_syscall(p.pid)
    return p


def test_blocking_ioctl_woken_by_another_process(cdev_server, client):
    waiter = start_waiter(client, cdev_server.node, "wait")
    assert run(client, cdev_server.node, "wake").strip() == "ret=1"
    out, _ = waiter.communicate(timeout=30)
    assert out.strip() == "ret=1 errno=0 handled=0"


@pytest.mark.parametrize(
    ("cmd", "expected"),
    [("wait", f"ret=-1 errno={errno.EINTR} handled=1"), ("wait0", "ret=0 errno=0 handled=1")],
)
def test_interrupted_ioctl_answers_what_the_device_chose(cdev_server, client, cmd, expected):
    waiter = start_waiter(client, cdev_server.node, cmd)
    os.kill(waiter.pid, signal.SIGUSR1)
    out, _ = waiter.communicate(timeout=30)
    assert out.strip().splitlines()[-1] == expected
    # The device forgot the waiter: a later WAKE finds nobody.
    assert run(client, cdev_server.node, "wake").strip() == "ret=0"


def test_ctx_pid_is_the_process_for_a_second_thread(cdev_server, client):
    main_line, thread_line = run(client, cdev_server.node, "who-thread").splitlines()
    main_pid = int(main_line.split("=")[1])
    # "thread tid=T ret=R pid=P tid=T2": the caller's own view, then the device's.
    words = thread_line.split()[1:]
    own_tid, ret, pid, seen_tid = (int(w.split("=")[1]) for w in words)
    assert ret == 0
    assert own_tid != main_pid
    assert pid == main_pid
    assert seen_tid == own_tid


def test_read_and_write_answer_einval(cdev_server):
    fd = os.open(cdev_server.node, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.read(fd, 8)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            os.write(fd, b"x")
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)


@pytest.mark.cdev_args("--max-waiting-per-pid", "3")
def test_waiting_requests_are_bounded_per_process(cdev_server, client):
    p = subprocess.Popen([client, str(cdev_server.node), "waits", "5"], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    refused = [p.stdout.readline().strip() for _ in range(2)]
    assert refused == [f"ret=-1 errno={errno.EAGAIN}"] * 2
    wait_in_syscall(p.pid)
    assert run(client, cdev_server.node, "wake").strip() == "ret=3"
    out, _ = p.communicate(timeout=30)
    assert out.strip().splitlines() == ["ret=1 errno=0"] * 3
    assert "cdev.waiting_request_refused" in cdev_server.log_path.read_text()
