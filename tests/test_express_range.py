"""A range client's request cycle on the express path, through the real node.

The range client here is this test process (a bound file, a request page in
an anonymous mapping), so each step of its cycle is checked: the request in
its page, ATTACH answered at once or parked, NOTIFY's effects, its errno for
bad arguments. With ``--express on`` the daemon's status must show that C
served it (the express section's range counts); with ``--express off`` the
same steps must give the same answers from Python.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import signal
import struct
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from acrn_hsm_emu import abi
from acrn_hsm_emu.client import extension as ext
from tests.support.answers import pio_answer
from tests.support.ext import Control, Ctl, RangeProc, daemon_log_events, inject_async
from tests.support.poll import wait_until

pytestmark = pytest.mark.needs_fuse

ATTACH = abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT
NOTIFY = abi.ACRN_IOCTL_NOTIFY_REQUEST_FINISH
DESTROY = abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT
START, END = 0x6000, 0x60FF


def ioctl_errno(fd: int, cmd: int, arg: bytes | int = 0) -> int:
    """0, or the errno the ioctl failed with."""
    try:
        fcntl.ioctl(fd, cmd, arg)
    except OSError as e:
        return e.errno
    return 0


def notify(vcpu: int, reserved: int = 0) -> bytes:
    return struct.pack("<HHI", 0, reserved, vcpu)


class Client:
    """A range client in this process: a file bound to ``vmid``, its page, one PIO range."""

    def __init__(self, node: str, vmid: int, name: str) -> None:
        self.fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
        self.page = mmap.mmap(-1, mmap.PAGESIZE)
        self._anchor = ctypes.c_char.from_buffer(self.page)
        addr = ctypes.addressof(self._anchor)
        bind = bytearray(bytes(ext.AcrnEmuBind(vmid=vmid)))
        fcntl.ioctl(self.fd, ext.ACRN_EMU_IOCTL_BIND_VM, bind)
        fcntl.ioctl(self.fd, ext.ACRN_EMU_IOCTL_CREATE_RANGE_CLIENT,
                    bytes(ext.AcrnEmuRangeClient(name=name.encode(), ioreq_buf=addr)))  # fmt: skip
        fcntl.ioctl(self.fd, ext.ACRN_EMU_IOCTL_ADD_RANGE,
                    bytes(ext.AcrnEmuRange(type=ext.ACRN_EMU_RANGE_PIO, start=START, end=END)))  # fmt: skip

    def slot(self, vcpu: int) -> tuple[int, int, int, int, int, int]:
        """kernel_handled, state, direction, address, size, value of ``vcpu``'s slot."""
        off = vcpu << 8
        kh, state = struct.unpack_from("<II", self.page, off + abi.SLOT_KERNEL_HANDLED)
        direction, addr, size, value = struct.unpack_from("<I4xQQQ", self.page, off + 64)
        return kh, state, direction, addr, size, value

    def answer(self, vcpu: int, value: int) -> None:
        struct.pack_into("<Q", self.page, (vcpu << 8) + 88, value)

    def close(self) -> None:
        del self._anchor
        self.page.close()
        os.close(self.fd)


def _parked(control: Control, vmid: int, name: str) -> int:
    for c in control.hsm_vm(vmid)["clients"]:
        if c["name"] == name:
            return int(c["waiters"])
    return -1


@pytest.mark.parametrize("express", ["on", "off"])
def test_a_range_clients_cycle_and_errnos_with_and_without_the_express_path(daemon_factory, express):
    d = daemon_factory("--backend", "scripted", "--express", express)
    control = Control(d.control)
    owner = Ctl(d.node)
    c = None
    errs: dict[str, int] = {}
    try:
        vmid = int(owner.ok("create 0x3")["vmid"])
        owner.ok("client")
        owner.ok("start")
        c = Client(str(d.node), vmid, "rc")
        if express == "on":
            assert control.hsm_vm(vmid)["express"]["range_clients"] == 1
        errs["notify not held"] = ioctl_errno(c.fd, NOTIFY, notify(0))
        errs["notify vcpu >= vcpu_num"] = ioctl_errno(c.fd, NOTIFY, notify(2))
        errs["notify reserved"] = ioctl_errno(c.fd, NOTIFY, notify(0, reserved=1))

        # a read on vCPU 1: ATTACH parks until it is handed over, then the client answers
        got: list[int] = []
        t = threading.Thread(target=lambda: got.append(ioctl_errno(c.fd, ATTACH)))  # type: ignore[union-attr]
        t.start()
        wait_until(lambda: _parked(control, vmid, "rc") == 1, "ATTACH parked")
        reader = inject_async(d, vmid, "pio-read", hex(START + 4), "2", vcpu=1)
        t.join(timeout=60)
        assert got == [0]
        kh, state, direction, addr, size, _ = c.slot(1)
        assert (kh, state, direction, addr, size) == (0, abi.ACRN_IOREQ_STATE_PROCESSING, 0, START + 4, 2)
        assert ioctl_errno(c.fd, ATTACH) == 0  # level-triggered: at once while held
        c.answer(1, 0xBEEF)
        errs["notify"] = ioctl_errno(c.fd, NOTIFY, notify(1))
        out, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        assert out.strip() == "0xbeef"
        assert c.slot(1)[1] == abi.ACRN_IOREQ_STATE_FREE
        errs["notify again"] = ioctl_errno(c.fd, NOTIFY, notify(1))

        # a write on vCPU 0
        writer = inject_async(d, vmid, "pio-write", hex(START), "1", "0x5a")
        assert ioctl_errno(c.fd, ATTACH) == 0
        assert c.slot(0)[2:] == (1, START, 1, 0x5A)
        errs["notify write"] = ioctl_errno(c.fd, NOTIFY, notify(0))
        writer.communicate(timeout=60)
        assert writer.returncode == 0

        vm = control.hsm_vm(vmid)
        assert vm["counters"]["remote"] == 2 and vm["counters"]["notified"] == 2
        (rc,) = [x for x in vm["clients"] if x["name"] == "rc"]
        assert rc["remote"]["served"] == 2 and rc["pending"] == 0
        if express == "on":  # C served all of it
            x = vm["express"]
            assert (x["range_dispatched"], x["notified"], x["attaches"]) == (2, 2, 4)
            # both vCPUs waited in their native cycle: the answers went to them in memory
            assert x["handed"] == 2

        # destroyed while an ATTACH is parked: ENODEV, then the file has no client
        got.clear()
        t = threading.Thread(target=lambda: got.append(ioctl_errno(c.fd, ATTACH)))  # type: ignore[union-attr]
        t.start()
        wait_until(lambda: _parked(control, vmid, "rc") == 1, "ATTACH parked")
        assert ioctl_errno(c.fd, DESTROY) == 0
        t.join(timeout=60)
        errs["parked attach, destroyed"] = got[0]
        errs["attach, no client"] = ioctl_errno(c.fd, ATTACH)
        errs["notify, no client"] = ioctl_errno(c.fd, NOTIFY, notify(0))
        vm = control.hsm_vm(vmid)
        assert not [x for x in vm["clients"] if x["name"] == "rc"]
        if express == "on":
            assert vm["express"]["range_clients"] == 0
        # its range is the default client's again
        assert control.inject(vmid, "pio", False, START, 1) == pio_answer(START, 1)
    finally:
        if c is not None:
            c.close()
        owner.close()
    assert errs == {
        "notify not held": errno.EINVAL,
        "notify vcpu >= vcpu_num": errno.EINVAL,
        "notify reserved": errno.EINVAL,
        "notify": 0,
        "notify again": errno.EINVAL,
        "notify write": 0,
        "parked attach, destroyed": errno.ENODEV,
        "attach, no client": errno.ENODEV,
        "notify, no client": errno.ENODEV,
    }


@contextlib.contextmanager
def _served_range_client(daemon_factory: Any, cpus: str) -> Iterator[tuple[Any, Control, int, RangeProc]]:
    """A daemon with the express path on, a started VM (vCPUs ``cpus``) with its default
    client, and a range client ("dev", one PIO range) in another process."""
    d = daemon_factory("--backend", "scripted", "--express", "on")
    owner = Ctl(d.node)
    p: Any = None
    try:
        vmid = int(owner.ok(f"create {cpus}")["vmid"])
        owner.ok("client")
        owner.ok("start")
        p = RangeProc(d.node, vmid, "dev", "--tag", "0x1", f"pio:{START:#x}-{END:#x}")
        assert p.ok, p.first
        yield d, Control(d.control), vmid, p
    finally:
        if p is not None:
            p.kill()
        owner.close()


def test_a_range_client_killed_while_parked_leaves_the_express_path(daemon_factory):
    """Its file closes with its ATTACH parked in C: the client goes (C's waiter
    answered, its number freed), its range goes back to the default client."""
    with _served_range_client(daemon_factory, "0x3") as (d, control, vmid, p):
        assert control.inject(vmid, "pio", False, START + 2, 2) == pio_answer(START + 2, 2) ^ 1
        wait_until(lambda: _parked(control, vmid, "dev") == 1, "its loop's ATTACH parked")
        x = control.hsm_vm(vmid)["express"]
        assert (x["range_clients"], x["range_dispatched"]) == (1, 1)
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait(timeout=60)
        wait_until(lambda: _parked(control, vmid, "dev") == -1, "the client gone")
        vm = control.hsm_vm(vmid)
        assert vm["express"]["range_clients"] == 0
        assert control.inject(vmid, "pio", False, START + 2, 2) == pio_answer(START + 2, 2)
        gone = [e for e in daemon_log_events(d) if e.get("event") == "hsm.range_client_destroyed"]
        assert gone and gone[-1]["client"] == "dev" and gone[-1]["reason"] == "file closed"


def test_a_range_clients_request_served_by_c_is_traced_with_its_name(daemon_factory):
    tracer: Any = None
    with _served_range_client(daemon_factory, "0x1") as (d, control, vmid, p):
        try:
            tracer = subprocess.Popen(
                [d.args[0], "trace", "--control", str(d.control), "--requests", "--vm", str(vmid),
                 "--count", "1", "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            wait_until(lambda: control.status()["observers"]["tracers"] > 0, "the tracer attached")
            assert control.inject(vmid, "pio", False, START + 2, 2) == pio_answer(START + 2, 2) ^ 1
            out, err = tracer.communicate(timeout=60)
            assert tracer.returncode == 0, err
            rec = json.loads(out)
            assert (rec["type"], rec["kind"], rec["addr"], rec["client"], rec["answer"], rec["path"]) == (
                "request", "pio", START + 2, "dev", pio_answer(START + 2, 2) ^ 1, "express")
            assert control.hsm_vm(vmid)["express"]["range_dispatched"] == 1
        finally:
            if tracer is not None and tracer.poll() is None:
                tracer.kill()
                tracer.wait()
