"""The UART example run as docs/client.md says: launch.py owns the VM, uart.py prints its output.

Without KVM the guest is scripted: the test injects the writes a guest
printing "hello" makes. With the KVM backend examples/hello.S really runs
and prints through 0x3F8.
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys

import pytest

from acrn_hsm_emu.hypervisor.backends import BACKENDS
from tests.support.ext import Control, readline

pytestmark = pytest.mark.needs_fuse

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def start_launch(node: pathlib.Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "launch.py"), "--node", str(node), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = readline(p, "launch.py")
    assert line.startswith("vmid="), line
    return p, int(line.split("=")[1])


def start_uart(node: pathlib.Path, vmid: int) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "uart.py"), "--vm", str(vmid), "--node", str(node)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert p.stderr is not None
    line = p.stderr.readline().decode()
    assert line.startswith(f"uart: serving ports 0x3f8-0x3ff of VM {vmid}"), line
    return p


def read_exactly(p: subprocess.Popen[bytes], n: int) -> bytes:
    import select

    assert p.stdout is not None
    fd = p.stdout.fileno()
    out = b""
    while len(out) < n:
        if not select.select([fd], [], [], 60)[0]:  # hang guard
            raise TimeoutError(f"uart.py printed only {out!r}")
        chunk = p.stdout.raw.read(n - len(out))  # type: ignore[attr-defined]
        if not chunk:
            raise EOFError(f"uart.py exited after {out!r}")
        out += chunk
    return out


def stop(p: subprocess.Popen, what: str) -> str:
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, (what, p.returncode, err)
    return err if isinstance(err, str) else err.decode()


def test_uart_example_prints_what_a_scripted_guest_writes(daemon_factory):
    daemon = daemon_factory("--backend", "scripted")
    control = Control(daemon.control)
    launch, vmid = start_launch(daemon.node, "--start")
    uart = None
    try:
        uart = start_uart(daemon.node, vmid)
        # what examples/hello.S does: poll LSR for THRE, write the byte
        for byte in b"hello\n":
            assert control.inject(vmid, "pio", False, 0x3FD, 1) == 0x60
            assert control.inject(vmid, "pio", True, 0x3F8, 1, byte) == 0
        assert read_exactly(uart, 6) == b"hello\n"
        # the divisor latch and scratch register keep what the guest writes
        control.inject(vmid, "pio", True, 0x3FB, 1, 0x83)
        control.inject(vmid, "pio", True, 0x3F8, 1, 0x0C)
        assert control.inject(vmid, "pio", False, 0x3F8, 1) == 0x0C
        control.inject(vmid, "pio", True, 0x3FB, 1, 0x03)
        control.inject(vmid, "pio", True, 0x3FF, 1, 0x5A)
        assert control.inject(vmid, "pio", False, 0x3FF, 1) == 0x5A
        # COM2 is nobody's: the launcher's default client answers all ones
        assert control.inject(vmid, "pio", False, 0x2F8, 1) == 0xFF
        vm = control.hsm_vm(vmid)
        assert [c["name"] for c in vm["clients"] if "remote" in c] == ["uart"]
        assert "stopped after 6 byte(s)" in stop(uart, "uart.py")
        uart = None
        # with the UART gone its ports fall back to the launcher
        assert control.inject(vmid, "pio", False, 0x3FD, 1) == 0xFF
        err = stop(launch, "launch.py")
        assert "unclaimed vcpu 0 pio 0x2f8 size 1 read" in err and "VM destroyed" in err
    finally:
        for p in (uart, launch):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate(timeout=60)
    assert not control.status()["hsm"]["vms"]


@pytest.mark.needs_kvm
@pytest.mark.skipif("kvm" not in BACKENDS, reason="the KVM vCPU backend is not available yet")
def test_uart_example_prints_hello_from_a_kvm_guest(daemon_factory):
    daemon = daemon_factory("--backend", "kvm")
    launch, vmid = start_launch(daemon.node, str(EXAMPLES / "hello.S"))
    uart = None
    try:
        uart = start_uart(daemon.node, vmid)
        assert launch.stdin is not None
        launch.stdin.write("\n")  # "press Enter to start the VM"
        launch.stdin.flush()
        assert read_exactly(uart, 6) == b"hello\n"
        stop(uart, "uart.py")
        uart = None
        stop(launch, "launch.py")
    finally:
        for p in (uart, launch):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate(timeout=60)


@pytest.mark.needs_kvm
@pytest.mark.skipif("kvm" not in BACKENDS, reason="the KVM vCPU backend is not available yet")
def test_hello_without_a_uart_is_logged_by_the_launcher(daemon_factory):
    """docs/kvm.md: `launch.py examples/hello.S --start` with nobody on COM1: the launcher, the
    default client, logs the guest's port accesses (the LSR polls at 0x3fd) on stderr."""
    daemon = daemon_factory("--backend", "kvm")
    launch, _vmid = start_launch(daemon.node, str(EXAMPLES / "hello.S"), "--start")
    try:
        assert launch.stderr is not None
        seen = []
        for line in launch.stderr:
            seen.append(line)
            if line.startswith("launch: unclaimed") and "0x3fd" in line:
                break
        else:
            raise AssertionError("".join(seen))
    finally:
        stop(launch, "launch.py")
