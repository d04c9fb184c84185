"""The express path's C half (hsm/express.py, native/express*.c), driven
directly: raw FUSE requests in, the replies it writes read back from a socket
standing in for the session fd, its effects read from a request page in this
process (reached with process_vm_* as a client's page is).

The daemon-level checks (errno parity with express on and off, the KVM runs)
are in test_hsm_errno.py and test_kvm_daemon.py.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest

from acrn_hsm_emu import abi
from acrn_hsm_emu._native import ffi, lib
from acrn_hsm_emu.client import extension as ext
from tests.support.poll import wait_until

FUSE_IOCTL = 39
FUSE_INTERRUPT = 36
FUSE_GETATTR = 3
FUSE_IOCTL_COMPAT = 1 << 0
FUSE_IOCTL_UNRESTRICTED = 1 << 1
FUSE_IOCTL_RETRY = 1 << 2
FH = 7
ATTACH = abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT
NOTIFY = abi.ACRN_IOCTL_NOTIFY_REQUEST_FINISH
_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
_IOCTL_IN = struct.Struct("<QIIQII")  # fh, flags, cmd, arg, in_size, out_size
_OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
_STATE = abi.SLOT_PROCESSED
_KH = abi.SLOT_KERNEL_HANDLED
_POLLING = abi.SLOT_COMPLETION_POLLING


def ioctl_req(unique: int, cmd: int, data: bytes = b"", fh: int = FH, flags: int = 0, arg: int = 0) -> bytes:
    body = _IOCTL_IN.pack(fh, flags, cmd, arg, len(data), 0) + data
    return _IN_HEADER.pack(_IN_HEADER.size + len(body), FUSE_IOCTL, unique, 2, 0, 0, 1, 0, 0) + body


def interrupt_req(unique: int, target: int) -> bytes:
    body = struct.pack("<Q", target)
    return _IN_HEADER.pack(_IN_HEADER.size + 8, FUSE_INTERRUPT, unique, 0, 0, 0, 0, 0, 0) + body


def notify_arg(vcpu: int, reserved: int = 0, vmid: int = 0) -> bytes:
    return struct.pack("<HHI", vmid, reserved, vcpu)


@dataclass
class Rig:
    x: Any
    table: Any
    sock: socket.socket
    fd: int
    page: int
    buf: Any
    wake: list[int]
    waits: Any  # the vCPUs' native waits (struct hsm_vcpu_wait[2]), idle unless a test arms one

    def feed(self, req: bytes) -> int:
        return lib.hsm_x_prefilter(self.table, self.fd, req, len(req))

    def replies(self) -> list[tuple[int, int]]:
        """(unique, error) of every reply written so far."""
        out = []
        while True:
            try:
                msg = self.sock.recv(4096)
            except BlockingIOError:
                return out
            n, err, unique = _OUT_HEADER.unpack_from(msg)
            assert n == len(msg)
            assert n == (16 if err else 32)  # an ioctl reply: header + fuse_ioctl_out
            out.append((unique, err))

    def u32(self, off: int) -> int:
        return struct.unpack_from("<I", ffi.buffer(self.buf + (self.page - self.base), 4096), off)[0]

    def set_u32(self, off: int, v: int) -> None:
        struct.pack_into("<I", ffi.buffer(self.buf + (self.page - self.base), 4096), off, v)

    @property
    def base(self) -> int:
        return int(ffi.cast("uintptr_t", self.buf))

    def woken(self, vcpu: int) -> int:
        try:
            return os.eventfd_read(self.wake[vcpu])
        except BlockingIOError:
            return 0


@pytest.fixture
def rig() -> Iterator[Rig]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.setblocking(False)
    buf = ffi.new("char[]", 3 * 4096)
    base = int(ffi.cast("uintptr_t", buf))
    page = (base + 4095) & ~4095
    x = ffi.new("struct hsm_xvm *")
    lib.hsm_x_init(x, a.fileno(), FH, os.getpid(), page, 2)
    wake = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    waits = ffi.new("struct hsm_vcpu_wait[2]")
    assert lib.hsm_x_set_wake_fds(x, [os.dup(w) for w in wake], [waits + 0, waits + 1], 2) == 0
    table = ffi.new("struct hsm_express *")
    lib.hsm_x_table_init(table)
    assert lib.hsm_x_register(table, x) == 0
    r = Rig(x, table, b, a.fileno(), page, buf, wake, waits)
    yield r
    lib.hsm_x_close(x)
    for w in wake:
        os.close(w)
    a.close()
    b.close()


def test_without_a_default_client_everything_goes_to_python(rig: Rig) -> None:
    assert rig.feed(ioctl_req(1, ATTACH)) == 0
    assert rig.feed(ioctl_req(2, NOTIFY, notify_arg(0))) == 0
    assert rig.replies() == []


def test_attach_is_level_triggered_and_parks_until_a_bit_is_set(rig: Rig) -> None:
    lib.hsm_x_set_default(rig.x, 1)
    assert rig.feed(ioctl_req(10, ATTACH)) == 1
    assert rig.feed(ioctl_req(11, ATTACH)) == 1
    assert rig.replies() == [] and rig.x.nparked == 2
    lib.hsm_x_wake(rig.x)  # nothing pending: still waiting
    assert rig.replies() == []
    lib.hsm_x_bits(rig.x, 1 << 1, 0)
    lib.hsm_x_wake(rig.x)
    assert rig.replies() == [(10, 0), (11, 0)] and rig.x.nparked == 0
    assert rig.feed(ioctl_req(12, ATTACH)) == 1  # a bit is set: at once
    assert rig.replies() == [(12, 0)]
    assert rig.x.attaches == 3


def test_interrupt_of_a_parked_attach_answers_zero_others_go_to_libfuse(rig: Rig) -> None:
    lib.hsm_x_set_default(rig.x, 1)
    rig.feed(ioctl_req(20, ATTACH))
    assert rig.feed(interrupt_req(21, 99)) == 0  # not ours
    assert rig.feed(interrupt_req(22, 20)) == 1
    assert rig.replies() == [(20, 0)] and rig.x.nparked == 0
    assert rig.feed(interrupt_req(23, 20)) == 0  # answered already


def test_waiting_attach_calls_are_bounded(rig: Rig) -> None:
    lib.hsm_x_set_default(rig.x, 1)
    for u in range(lib.HSM_X_PARKED_MAX):
        assert rig.feed(ioctl_req(100 + u, ATTACH)) == 1
    assert rig.replies() == []
    assert rig.feed(ioctl_req(5000, ATTACH)) == 1
    assert rig.replies() == [(5000, -errno.EAGAIN)] and rig.x.refused == 1


def test_destroying_the_default_client_answers_enodev(rig: Rig) -> None:
    lib.hsm_x_set_default(rig.x, 1)
    rig.feed(ioctl_req(30, ATTACH))
    lib.hsm_x_set_default(rig.x, 0)
    assert rig.replies() == [(30, -errno.ENODEV)]
    assert rig.feed(ioctl_req(31, ATTACH)) == 0  # Python says ENODEV from now on


def test_close_answers_enodev_and_stops_writing(rig: Rig) -> None:
    lib.hsm_x_set_default(rig.x, 1)
    rig.feed(ioctl_req(40, ATTACH))
    lib.hsm_x_close(rig.x)
    assert rig.replies() == [(40, -errno.ENODEV)]
    assert rig.x.fd == -1 and rig.x.nfds == 0
    assert rig.feed(ioctl_req(41, ATTACH)) == 0
    assert rig.feed(ioctl_req(42, NOTIFY, notify_arg(0))) == 0


def test_notify_completes_clears_the_bit_and_wakes_the_vcpu(rig: Rig) -> None:
    lib.hsm_x_set_default(rig.x, 1)
    lib.hsm_x_bits(rig.x, 0b11, 0)
    rig.set_u32(256 + _STATE, abi.ACRN_IOREQ_STATE_PROCESSING)
    assert rig.feed(ioctl_req(50, NOTIFY, notify_arg(1, vmid=77))) == 1  # vmid is not checked
    assert rig.replies() == [(50, 0)]
    assert rig.u32(256 + _STATE) == abi.ACRN_IOREQ_STATE_COMPLETE
    assert lib.hsm_x_bits(rig.x, 0, 0) == 0b01
    assert (rig.woken(0), rig.woken(1)) == (0, 1)
    # completion polling: COMPLETE, no notification
    rig.set_u32(_POLLING, 1)
    assert rig.feed(ioctl_req(51, NOTIFY, notify_arg(0 | 0x10000))) == 1  # vcpu is a u16
    assert rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_COMPLETE and rig.woken(0) == 0
    assert rig.replies() == [(51, 0)] and rig.x.notified == 2


def test_notify_hands_the_completion_to_a_vcpu_waiting_natively(rig: Rig) -> None:
    """HC_NOTIFY_REQUEST_FINISH's native form: for a vCPU armed in its native wait
    (hsm_slot_cycle) the driver's COMPLETE and the hypervisor's FREE are one store,
    and the value the vCPU would read back is handed over in memory."""
    lib.hsm_x_set_default(rig.x, 1)
    lib.hsm_x_bits(rig.x, 0b11, 0)
    w = rig.waits[1]
    w.pid, w.slot, w.mail = os.getpid(), rig.page + 256, lib.HSM_MAIL_ARMED
    rig.set_u32(256 + _STATE, abi.ACRN_IOREQ_STATE_PROCESSING)
    rig.set_u32(256 + abi.SLOT_VALUE, 0x55667788)
    rig.set_u32(256 + abi.SLOT_VALUE + 4, 0x11223344)
    assert rig.feed(ioctl_req(80, NOTIFY, notify_arg(1))) == 1
    assert rig.replies() == [(80, 0)]
    assert rig.u32(256 + _STATE) == abi.ACRN_IOREQ_STATE_FREE
    assert (w.mail, w.handed, w.handoffs) == (lib.HSM_MAIL_HANDED, 0x11223344_55667788, 1)
    # the hypercall's wake-up goes to the native wait it handed the completion to (its
    # futex word), not to the completion eventfd of the vCPU's waits in Python
    assert (rig.woken(0), rig.woken(1), w.wakes, rig.waits[0].wakes) == (0, 0, 1, 0)
    assert (rig.x.notified, rig.x.handed, lib.hsm_x_bits(rig.x, 0, 0)) == (1, 1, 0b01)
    # not armed, armed for another slot, or a slot that polls: COMPLETE, as the driver
    # stores it, and the vCPU reads its slot itself
    for case in ("idle", "other slot", "polling"):
        lib.hsm_x_bits(rig.x, 0b10, 0)
        w.mail = lib.HSM_MAIL_IDLE if case == "idle" else lib.HSM_MAIL_ARMED
        w.slot = rig.page if case == "other slot" else rig.page + 256
        rig.set_u32(256 + _POLLING, int(case == "polling"))
        rig.set_u32(256 + _STATE, abi.ACRN_IOREQ_STATE_PROCESSING)
        wakes = w.wakes
        assert rig.feed(ioctl_req(81, NOTIFY, notify_arg(1))) == 1, case
        assert rig.replies() == [(81, 0)], case
        assert rig.u32(256 + _STATE) == abi.ACRN_IOREQ_STATE_COMPLETE, case
        assert w.mail == (lib.HSM_MAIL_IDLE if case == "idle" else lib.HSM_MAIL_ARMED), case
        # both of the vCPU's waits are woken, wherever it waits
        assert (rig.woken(1), w.wakes - wakes) == (int(case != "polling"),) * 2, case
    assert (rig.x.handed, w.handoffs) == (1, 1)


def test_a_handover_that_cannot_free_the_slot_goes_to_python_untouched(rig: Rig) -> None:
    """The page turned read-only under the notify (the FREE store faults after the
    read succeeded): no effect at all, the vCPU still armed, Python answers."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.hsm_x_set_default(rig.x, 1)
    lib.hsm_x_bits(rig.x, 0b01, 0)
    w = rig.waits[0]
    w.pid, w.slot, w.mail = os.getpid(), rig.page, lib.HSM_MAIL_ARMED
    rig.set_u32(_STATE, abi.ACRN_IOREQ_STATE_PROCESSING)
    assert libc.mprotect(rig.page, 4096, mmap.PROT_READ) == 0
    try:
        assert rig.feed(ioctl_req(90, NOTIFY, notify_arg(0))) == 0
    finally:
        assert libc.mprotect(rig.page, 4096, mmap.PROT_READ | mmap.PROT_WRITE) == 0
    assert rig.replies() == [] and rig.woken(0) == 0
    assert rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_PROCESSING and lib.hsm_x_bits(rig.x, 0, 0) == 1
    assert (w.mail, w.handoffs, rig.x.handed, rig.x.notified) == (lib.HSM_MAIL_ARMED, 0, 0, 0)


def test_cuses_first_notify_is_answered_with_the_retry_for_its_argument(rig: Rig) -> None:
    """CUSE's first call of an unrestricted ioctl has no argument: the answer (cdev's,
    once the precheck passes) asks the kernel for the 8 bytes at the caller's address."""
    arg = 0x7F00_1234_5000
    first = ioctl_req(70, NOTIFY, b"", flags=FUSE_IOCTL_UNRESTRICTED, arg=arg)
    assert rig.feed(first) == 0  # no default client: Python's to answer
    lib.hsm_x_set_default(rig.x, 1)
    assert rig.feed(ioctl_req(71, NOTIFY, b"", fh=FH + 1, flags=FUSE_IOCTL_UNRESTRICTED, arg=arg)) == 0
    assert rig.feed(first) == 1
    msg = rig.sock.recv(4096)
    n, err, unique = _OUT_HEADER.unpack_from(msg)
    result, flags, in_iovs, out_iovs = struct.unpack_from("<iIII", msg, 16)
    assert (n, err, unique, len(msg)) == (48, 0, 70, 48)
    assert (result, flags, in_iovs, out_iovs) == (0, FUSE_IOCTL_RETRY, 1, 0)
    assert struct.unpack_from("<QQ", msg, 32) == (arg, 8)  # fuse_ioctl_iovec: base, len
    # the retried call, argument included, is then served here
    lib.hsm_x_bits(rig.x, 1, 0)
    rig.set_u32(_STATE, abi.ACRN_IOREQ_STATE_PROCESSING)
    assert rig.feed(ioctl_req(72, NOTIFY, notify_arg(0), flags=FUSE_IOCTL_UNRESTRICTED, arg=arg)) == 1
    assert rig.replies() == [(72, 0)] and rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_COMPLETE


@pytest.mark.parametrize(
    "req",
    [
        ioctl_req(60, NOTIFY, notify_arg(0, reserved=1)),  # EINVAL, from Python
        ioctl_req(60, NOTIFY, notify_arg(2)),  # vcpu >= vcpu_num: EINVAL, from Python
        ioctl_req(60, NOTIFY, b""),  # restricted (FUSE) yet no argument: not the kernel's way
        ioctl_req(60, NOTIFY, notify_arg(0), fh=FH + 1),  # another file
        ioctl_req(60, ATTACH, flags=FUSE_IOCTL_COMPAT),  # ENOTTY, from Python
        ioctl_req(60, abi.ACRN_IOCTL_CREATE_IOREQ_CLIENT),
        _IN_HEADER.pack(40, FUSE_GETATTR, 60, 2, 0, 0, 0, 0, 0) + bytes(16),
        b"\x00" * 8,  # shorter than a header
    ],
)
def test_anything_else_goes_to_python_untouched(rig: Rig, req: bytes) -> None:
    lib.hsm_x_set_default(rig.x, 1)
    lib.hsm_x_bits(rig.x, 1, 0)
    rig.set_u32(_STATE, abi.ACRN_IOREQ_STATE_PROCESSING)
    assert rig.feed(req) == 0
    assert rig.replies() == []
    assert rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_PROCESSING and lib.hsm_x_bits(rig.x, 0, 0) == 1


def test_notify_on_an_unreachable_page_goes_to_python(rig: Rig) -> None:
    x = ffi.new("struct hsm_xvm *")
    lib.hsm_x_init(x, rig.fd, FH, os.getpid(), 0x1000, 1)  # page 0x1000: unmapped
    wait = ffi.new("struct hsm_vcpu_wait *")
    fd = os.dup(rig.wake[0])
    # each vCPU's native wait comes with its eventfd: a vCPU waits on one or the other
    assert lib.hsm_x_set_wake_fds(x, [fd], ffi.NULL, 1) == -errno.EINVAL
    assert lib.hsm_x_set_wake_fds(x, [fd], [ffi.NULL], 1) == -errno.EINVAL
    assert lib.hsm_x_set_wake_fds(x, [fd], [wait], 1) == 0
    lib.hsm_x_set_default(x, 1)
    lib.hsm_x_bits(x, 1, 0)
    lib.hsm_x_unregister(rig.table, rig.x)
    lib.hsm_x_register(rig.table, x)
    assert rig.feed(ioctl_req(70, NOTIFY, notify_arg(0))) == 0  # Python meets the fault
    assert lib.hsm_x_bits(x, 0, 0) == 1 and rig.replies() == []
    lib.hsm_x_unregister(rig.table, x)
    lib.hsm_x_close(x)
    lib.hsm_x_register(rig.table, rig.x)


def _head(typ: int, addr: int, size: int, write: bool = False, value: int = 0) -> Any:
    head = ffi.new("unsigned char[]", 128)
    struct.pack_into("<I", ffi.buffer(head), 0, typ)
    struct.pack_into("<IIQQQ", ffi.buffer(head), 64, int(write), 0, addr, size, value)
    return head


def test_post_dispatches_a_plain_request_and_answers_the_waiter(rig: Rig) -> None:
    lib.hsm_x_set_default(rig.x, 1)
    lib.hsm_x_configure(rig.x, 1, ffi.NULL, 0)
    rig.feed(ioctl_req(80, ATTACH))
    rig.set_u32(256 + _KH, 1)
    slot = rig.page + 256
    assert lib.hsm_x_post(rig.x, os.getpid(), slot, _head(abi.ACRN_IOREQ_TYPE_MMIO, 0xC000_0000, 4)) == 1
    assert rig.u32(256 + _STATE) == abi.ACRN_IOREQ_STATE_PROCESSING and rig.u32(256 + _KH) == 0
    assert struct.unpack_from("<Q", ffi.buffer(rig.buf + (rig.page - rig.base) + 256 + 72, 8))[0] == 0xC000_0000
    assert lib.hsm_x_bits(rig.x, 0, 0) == 0b10
    assert rig.replies() == [(80, 0)]
    assert (rig.x.mmio, rig.x.pio, rig.x.defaults) == (1, 0, 1)


class Cycle:
    """One vCPU's ``hsm_slot_cycle`` (the real post path: gate, express, upcall)
    run in a thread; :meth:`abandon` ends its wait for a completion."""

    def __init__(self, rig: Rig, x: Any, slot: int, head: Any) -> None:
        self.gate = ffi.new("struct hsm_gate *")
        lib.hsm_gate_init(self.gate)
        lib.hsm_gate_set(self.gate, 1)
        self.upcall = os.eventfd(0, os.EFD_NONBLOCK)
        self.w = ffi.new("struct hsm_vcpu_wait *")
        self.w.pid = os.getpid()
        self.w.slot = slot
        self.w.probe_ms = 1000
        self.w.head = head
        self.value = ffi.new("uint64_t *")
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, args=(x,))
        self.thread.start()

    def _run(self, x: Any) -> None:
        up = ffi.cast("struct hsm_native_upcall *", x)  # its first member (x stays the rig's)
        self.rc = lib.hsm_slot_cycle(self.w, self.gate, self.upcall, up, 0, self.value)

    def posted(self) -> bool:
        """Returned, or waiting for the completion."""
        return self.rc is not None or bool(self.w.waiting)

    def abandon(self) -> int:
        if self.rc is None:
            lib.hsm_vcpu_abandon(self.w, 0)  # wakes the wait too (it sleeps on a futex)
        self.thread.join(30)
        assert self.rc is not None
        return self.rc

    def upcalls(self) -> int:
        try:
            return os.eventfd_read(self.upcall)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.upcall)


def post(rig: Rig, x: Any, slot: int, head: Any) -> tuple[Cycle, int]:
    """Post through hsm_slot_cycle; (the cycle, its result once abandoned)."""
    c = Cycle(rig, x, slot, head)
    wait_until(c.posted, "hsm_slot_cycle to post and wait, or return")
    return c, c.abandon()


@pytest.mark.parametrize(
    ("why", "head", "dispatch"),
    [
        ("CF8", _head(abi.ACRN_IOREQ_TYPE_PORTIO, 0xCF8, 4, True), 1),
        ("CFE", _head(abi.ACRN_IOREQ_TYPE_PORTIO, 0xCFE, 2), 1),
        ("a range client's port", _head(abi.ACRN_IOREQ_TYPE_PORTIO, 0x4010, 1), 1),
        ("not a PIO/MMIO request", _head(abi.ACRN_IOREQ_TYPE_PCICFG, 0x10, 4), 1),
        ("dispatch off (clearing, no page, ...)", _head(abi.ACRN_IOREQ_TYPE_PORTIO, 0x80, 1), 0),
    ],
)
def test_post_leaves_the_rest_pending_for_the_upcall(rig: Rig, why: str, head: Any, dispatch: int) -> None:
    lib.hsm_x_set_default(rig.x, 1)
    ranges = ffi.new("struct hsm_xrange[1]")
    ranges[0].type = abi.ACRN_IOREQ_TYPE_PORTIO
    ranges[0].start, ranges[0].end = 0x4000, 0x40FF
    lib.hsm_x_configure(rig.x, dispatch, ranges, 1)
    rig.feed(ioctl_req(90, ATTACH))
    rig.set_u32(_STATE, abi.ACRN_IOREQ_STATE_FREE)
    assert lib.hsm_x_post(rig.x, os.getpid(), rig.page, head) == 0, why
    assert rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_FREE  # not taken: nothing written yet
    c, rc = post(rig, rig.x, rig.page, head)
    assert rc == lib.HSM_SC_ABANDONED
    assert rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_PENDING and c.upcalls() == 1
    assert lib.hsm_x_bits(rig.x, 0, 0) == 0 and rig.replies() == [] and rig.x.defaults == 0
    c.close()


def test_a_dispatched_post_raises_no_upcall(rig: Rig) -> None:
    lib.hsm_x_set_default(rig.x, 1)
    lib.hsm_x_configure(rig.x, 1, ffi.NULL, 0)
    rig.feed(ioctl_req(95, ATTACH))
    c, rc = post(rig, rig.x, rig.page, _head(abi.ACRN_IOREQ_TYPE_PORTIO, 0x80, 1, True, 7))
    assert rc == lib.HSM_SC_ABANDONED
    assert rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_PROCESSING and c.upcalls() == 0
    assert lib.hsm_x_bits(rig.x, 0, 0) == 1 and rig.replies() == [(95, 0)]
    c.close()


def test_post_of_a_request_straddling_a_range_goes_to_the_default_client(rig: Rig) -> None:
    """in_range wants the whole access inside a range; a partial overlap is the default's."""
    lib.hsm_x_set_default(rig.x, 1)
    ranges = ffi.new("struct hsm_xrange[1]")
    ranges[0].type = abi.ACRN_IOREQ_TYPE_PORTIO
    ranges[0].start, ranges[0].end = 0x4000, 0x40FF
    lib.hsm_x_configure(rig.x, 1, ranges, 1)
    assert lib.hsm_x_post(rig.x, os.getpid(), rig.page, _head(abi.ACRN_IOREQ_TYPE_PORTIO, 0x40FF, 2)) == 1
    assert rig.x.pio == 1


@pytest.mark.parametrize("dispatch", [1, 0])
def test_post_to_an_unreachable_page_is_a_fault(rig: Rig, dispatch: int) -> None:
    """Dispatched here or posted PENDING, a page that is gone is the vCPU's fault to report."""
    x = ffi.new("struct hsm_xvm *")
    lib.hsm_x_init(x, rig.fd, FH, os.getpid(), 0x1000, 1)  # page 0x1000: unmapped
    lib.hsm_x_set_default(x, 1)
    lib.hsm_x_configure(x, dispatch, ffi.NULL, 0)
    assert x.dispatch == dispatch
    c, rc = post(rig, x, 0x1000, _head(abi.ACRN_IOREQ_TYPE_PORTIO, 0x80, 1))
    assert rc == -errno.EFAULT and c.w.stage == lib.HSM_SC_POST
    assert lib.hsm_x_bits(x, 0, 0) == 0 and x.defaults == 0
    c.close()
    lib.hsm_x_close(x)


def _ioeventfd_rig(rig: Rig, entries: list[tuple[int, int, int, int, bool]], ranges: list[tuple[int, int, int, int]]) -> tuple[list[int], Any]:
    """The VM's ioeventfds ((type, addr, length, data, wildcard) each, with a fresh
    eventfd) and ranges ((type, start, end, handler)), as express.sync pushes them."""
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in entries]
    table = ffi.new("struct hsm_xioeventfd[]", max(1, len(entries)))
    for k, (typ, addr, length, data, wildcard) in enumerate(entries):
        table[k].type, table[k].addr, table[k].length = typ, addr, length
        table[k].data, table[k].wildcard, table[k].fd = data, int(wildcard), fds[k]
    lib.hsm_x_set_ioeventfds(rig.x, table, len(entries))
    arr = ffi.new("struct hsm_xrange[]", max(1, len(ranges)))
    for k, (typ, start, end, handler) in enumerate(ranges):
        arr[k].type, arr[k].start, arr[k].end, arr[k].handler = typ, start, end, handler
    lib.hsm_x_set_default(rig.x, 1)
    lib.hsm_x_configure(rig.x, 1, arr, len(ranges))
    return fds, (table, arr)


def _signals(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


PIO, MMIO = abi.ACRN_IOREQ_TYPE_PORTIO, abi.ACRN_IOREQ_TYPE_MMIO
IOEVENTFD = lib.HSM_XRANGE_IOEVENTFD


def test_the_ioeventfd_handler_runs_in_the_vcpus_post(rig: Rig) -> None:
    """acrn_ioeventfd_handler as hsm/ioeventfd.py's handler: a matching write
    signals the first match, anything else in the range is consumed; reads get
    0; the slot ends kernel_handled 1 and COMPLETE, the vCPU is woken, the
    device model hears nothing (no bit, no ATTACH answer)."""
    fds, keep = _ioeventfd_rig(
        rig,
        [(PIO, 0x1000, 2, 5, False), (PIO, 0x1000, 2, 0, True), (MMIO, 0xD000_0000, 4, 0, True)],
        [(PIO, 0x1000, 0x1001, IOEVENTFD), (MMIO, 0xD000_0000, 0xD000_0003, IOEVENTFD)],
    )
    rig.feed(ioctl_req(70, ATTACH))
    pid, slot = os.getpid(), rig.page + 256
    cases = [  # head, which eventfd signals (None: none)
        (_head(PIO, 0x1000, 2, True, 5), 0),  # datamatch: the first entry
        (_head(PIO, 0x1000, 2, True, 0x1_0000_0005), 0),  # PIO compares 32 bits
        (_head(PIO, 0x1000, 2, True, 6), 1),  # another value: the wildcard
        (_head(PIO, 0x1001, 1, True, 5), None),  # inside the range, not at an address
        (_head(MMIO, 0xD000_0000, 2, True, 9), 2),  # length >= size
    ]
    for n, (head, which) in enumerate(cases):
        rig.set_u32(256 + _STATE, abi.ACRN_IOREQ_STATE_FREE)
        assert lib.hsm_x_post(rig.x, pid, slot, head) == 1
        assert rig.u32(256 + _STATE) == abi.ACRN_IOREQ_STATE_COMPLETE and rig.u32(256 + _KH) == 1
        assert [_signals(f) for f in fds] == [1 if k == which else 0 for k in range(3)], n
        assert rig.woken(1) == 1
    for typ, addr, width in ((PIO, 0x1000, 4), (MMIO, 0xD000_0000, 8)):
        # a read whose value field arrives all ones: the handler's 0 goes over it
        assert lib.hsm_x_post(rig.x, pid, slot, _head(typ, addr, 2, False, 2**64 - 1)) == 1
        value = struct.unpack_from("<Q", ffi.buffer(rig.buf + (rig.page - rig.base), 4096), 256 + 88)[0]
        assert value == (2**64 - 1) & ~((1 << 8 * width) - 1)  # 4 (PIO) or 8 (MMIO) bytes of 0
        assert [_signals(f) for f in fds] == [0, 0, 0] and rig.woken(1) == 1
    assert rig.x.in_kernel == 7 and rig.x.pio == 5 and rig.x.mmio == 2 and rig.x.defaults == 0
    assert lib.hsm_x_bits(rig.x, 0, 0) == 0 and rig.replies() == [] and rig.x.nparked == 1
    for f in fds:
        os.close(f)
    del keep


def test_the_ioeventfd_handler_leaves_a_polling_vcpu_unwoken_and_other_clients_to_python(rig: Rig) -> None:
    """completion_polling: COMPLETE only, as the dispatcher does. A range of
    another client found first, and a VM without completion eventfds, go to
    Python before any effect."""
    fds, keep = _ioeventfd_rig(
        rig, [(PIO, 0x1000, 2, 0, True)],
        [(PIO, 0x1000, 0x1000, lib.HSM_XRANGE_OTHER), (PIO, 0x1000, 0x1001, IOEVENTFD)],
    )
    pid, slot = os.getpid(), rig.page
    head = _head(PIO, 0x1001, 1, True, 1)
    struct.pack_into("<I", ffi.buffer(head), 4, 1)  # completion_polling
    assert lib.hsm_x_post(rig.x, pid, slot, head) == 1
    assert rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_COMPLETE and rig.woken(0) == 0
    rig.set_u32(_STATE, abi.ACRN_IOREQ_STATE_FREE)
    assert lib.hsm_x_post(rig.x, pid, slot, _head(PIO, 0x1000, 1, True, 1)) == 0  # the other client's
    assert rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_FREE and _signals(fds[0]) == 0
    x = ffi.new("struct hsm_xvm *")  # no completion eventfds: Python's dispatcher notifies
    lib.hsm_x_init(x, rig.fd, FH, pid, rig.page, 1)
    lib.hsm_x_set_ioeventfds(x, keep[0], 1)
    lib.hsm_x_set_default(x, 1)
    lib.hsm_x_configure(x, 1, keep[1] + 1, 1)
    assert lib.hsm_x_post(x, pid, slot, _head(PIO, 0x1000, 2, True, 1)) == 0
    assert rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_FREE and _signals(fds[0]) == 0
    lib.hsm_x_close(x)
    os.close(fds[0])


# -- a range client in another process (extension ABI), served here ---------------------

RFH = FH + 100  # the range client's bound file
CLIENT = lib.HSM_XRANGE_CLIENT


def _client_rig(rig: Rig, ranges: list[tuple[int, int, int]]) -> tuple[int, int, Any]:
    """A range client served by C (its page: the rig's second page), its ranges
    named in the VM's table as express.sync pushes them: (its number, its page, keep)."""
    cpage = rig.page + 4096
    k = lib.hsm_x_client_add(rig.x, RFH, os.getpid(), cpage)
    assert k >= 0
    arr = ffi.new("struct hsm_xrange[]", max(1, len(ranges)))
    for n, (typ, start, end) in enumerate(ranges):
        arr[n].type, arr[n].start, arr[n].end, arr[n].handler, arr[n].client = typ, start, end, CLIENT, k
    lib.hsm_x_set_default(rig.x, 1)
    lib.hsm_x_configure(rig.x, 1, arr, len(ranges))
    return k, cpage, arr


def _page(rig: Rig, page: int) -> Any:
    return ffi.buffer(rig.buf + (page - rig.base), 4096)


def test_a_range_clients_cycle_is_served_here(rig: Rig) -> None:
    """remote.hand_over and remote.complete in C: the request goes to the client's
    page (kernel_handled 0, PROCESSING), the ACRN slot is kernel_handled 1 and
    PROCESSING, the client's ATTACH is answered; its NOTIFY copies a read's answer
    back, frees its slot, completes the ACRN slot and wakes the vCPU."""
    k, cpage, keep = _client_rig(rig, [(PIO, 0x6000, 0x60FF)])
    cbuf = _page(rig, cpage)
    assert rig.feed(ioctl_req(300, ATTACH, fh=RFH)) == 1
    assert rig.x.clients[k].nparked == 1 and rig.x.nparked == 0 and rig.replies() == []
    rig.feed(ioctl_req(301, ATTACH))  # the default client's waiter is not answered
    slot = rig.page + 256
    assert lib.hsm_x_post(rig.x, os.getpid(), slot, _head(PIO, 0x6004, 2)) == 1
    assert rig.replies() == [(300, 0)]
    assert struct.unpack_from("<II", cbuf, 256 + _KH) == (0, abi.ACRN_IOREQ_STATE_PROCESSING)
    assert struct.unpack_from("<QQ", cbuf, 256 + 72) == (0x6004, 2)
    assert (rig.u32(256 + _KH), rig.u32(256 + _STATE)) == (1, abi.ACRN_IOREQ_STATE_PROCESSING)
    assert lib.hsm_x_client_bits(rig.x, k, 0, 0) == 0b10 and lib.hsm_x_bits(rig.x, 0, 0) == 0
    held = lib.hsm_x_client_held(rig.x, k, 1, 0xFFFFFFFF)
    assert held == lib.HSM_X_HELD | PIO << 8 | abi.ACRN_IOREQ_DIR_READ
    assert (rig.x.remote, rig.x.pio, rig.x.defaults, rig.x.clients[k].dispatched) == (1, 1, 0, 1)
    # a level-triggered ATTACH: at once while the bit is set
    assert rig.feed(ioctl_req(302, ATTACH, fh=RFH)) == 1 and rig.replies() == [(302, 0)]
    # the client answers the read in its page, then NOTIFY on its file
    struct.pack_into("<Q", cbuf, 256 + 88, 0x1_0000_BEEF)
    rig.set_u32(256 + 88 + 4, 0xAAAA)  # a PIO answer is 4 bytes: the ACRN slot's high half stays
    assert rig.feed(ioctl_req(303, NOTIFY, notify_arg(1), fh=RFH)) == 1
    assert rig.replies() == [(303, 0)]
    assert struct.unpack_from("<I", cbuf, 256 + _STATE)[0] == abi.ACRN_IOREQ_STATE_FREE
    assert rig.u32(256 + 88) == 0xBEEF and rig.u32(256 + 92) == 0xAAAA
    assert rig.u32(256 + _STATE) == abi.ACRN_IOREQ_STATE_COMPLETE and rig.woken(1) == 1
    assert lib.hsm_x_client_bits(rig.x, k, 0, 0) == 0
    assert lib.hsm_x_client_held(rig.x, k, 1, 0xFFFFFFFF) == 0
    assert (rig.x.clients[k].served, rig.x.notified) == (1, 1)
    # an MMIO read answers 8 bytes; its vCPU waits natively: the answer and FREE are
    # stored in one call and the value handed over (hsm_vcpu_finish)
    _, _, keep2 = _client_rig_again(rig, k, [(MMIO, 0xC000_0000, 0xC000_0FFF)])
    w = rig.waits[0]
    w.pid, w.slot, w.mail = os.getpid(), rig.page, lib.HSM_MAIL_ARMED
    assert lib.hsm_x_post(rig.x, os.getpid(), rig.page, _head(MMIO, 0xC000_0008, 8)) == 1
    struct.pack_into("<Q", cbuf, 88, 0x1122_3344_5566_7788)
    assert rig.feed(ioctl_req(304, NOTIFY, notify_arg(0), fh=RFH)) == 1
    assert struct.unpack_from("<Q", ffi.buffer(rig.buf + (rig.page - rig.base), 4096), 88)[0] == 0x1122_3344_5566_7788
    assert rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_FREE
    assert (w.mail, w.handed, rig.x.handed) == (lib.HSM_MAIL_HANDED, 0x1122_3344_5566_7788, 1)
    assert rig.replies() == [(304, 0)] and (rig.woken(0), w.wakes) == (0, 1)  # its native wait's wake-up
    del keep, keep2


def test_cuses_first_notify_on_a_range_clients_file_is_answered_with_the_retry(rig: Rig) -> None:
    k, cpage, keep = _client_rig(rig, [(PIO, 0x6000, 0x60FF)])
    assert rig.feed(ioctl_req(305, NOTIFY, b"", fh=RFH, flags=FUSE_IOCTL_UNRESTRICTED, arg=0x5000)) == 1
    msg = rig.sock.recv(4096)
    assert _OUT_HEADER.unpack_from(msg) == (48, 0, 305)
    assert struct.unpack_from("<iIIIQQ", msg, 16) == (0, FUSE_IOCTL_RETRY, 1, 0, 0x5000, 8)
    lib.hsm_x_client_remove(rig.x, k, -errno.ENODEV)  # no longer served here: Python's
    assert rig.feed(ioctl_req(306, NOTIFY, b"", fh=RFH, flags=FUSE_IOCTL_UNRESTRICTED, arg=0x5000)) == 0
    del keep


def _client_rig_again(rig: Rig, k: int, ranges: list[tuple[int, int, int]]) -> tuple[int, int, Any]:
    arr = ffi.new("struct hsm_xrange[]", max(1, len(ranges)))
    for n, (typ, start, end) in enumerate(ranges):
        arr[n].type, arr[n].start, arr[n].end, arr[n].handler, arr[n].client = typ, start, end, CLIENT, k
    lib.hsm_x_configure(rig.x, 1, arr, len(ranges))
    return k, rig.page + 4096, arr


def test_a_write_leaves_the_acrn_slots_value_alone(rig: Rig) -> None:
    k, cpage, keep = _client_rig(rig, [(PIO, 0x6000, 0x60FF)])
    assert lib.hsm_x_post(rig.x, os.getpid(), rig.page, _head(PIO, 0x6000, 1, True, 0x42)) == 1
    struct.pack_into("<Q", _page(rig, cpage), 88, 0xDEAD)
    assert rig.feed(ioctl_req(310, NOTIFY, notify_arg(0), fh=RFH)) == 1
    assert rig.u32(88) == 0x42 and rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_COMPLETE
    del keep


@pytest.mark.parametrize(
    ("why", "req"),
    [
        ("reserved set: EINVAL", ioctl_req(320, NOTIFY, notify_arg(0, reserved=1), fh=RFH)),
        ("vcpu >= vcpu_num: EINVAL", ioctl_req(320, NOTIFY, notify_arg(2), fh=RFH)),
        ("a vcpu it holds no request of: EINVAL", ioctl_req(320, NOTIFY, notify_arg(1), fh=RFH)),
        ("restricted (FUSE) yet no argument", ioctl_req(320, NOTIFY, b"", fh=RFH)),
        ("32-bit caller: ENOTTY", ioctl_req(320, ATTACH, flags=FUSE_IOCTL_COMPAT, fh=RFH)),
        ("another file", ioctl_req(320, NOTIFY, notify_arg(0), fh=RFH + 1)),
    ],
)
def test_a_range_clients_doubtful_notify_goes_to_python_untouched(rig: Rig, why: str, req: bytes) -> None:
    k, cpage, keep = _client_rig(rig, [(PIO, 0x6000, 0x60FF)])
    assert lib.hsm_x_post(rig.x, os.getpid(), rig.page, _head(PIO, 0x6000, 2)) == 1
    assert rig.feed(req) == 0, why
    assert rig.replies() == []
    assert rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_PROCESSING and lib.hsm_x_client_bits(rig.x, k, 0, 0) == 1
    assert struct.unpack_from("<I", _page(rig, cpage), _STATE)[0] == abi.ACRN_IOREQ_STATE_PROCESSING
    del keep


def test_a_range_clients_page_out_of_reach_leaves_the_request_to_python(rig: Rig) -> None:
    """hand_over's fault (the client's page is gone) is Python's to handle: nothing taken."""
    k = lib.hsm_x_client_add(rig.x, RFH, os.getpid(), 0x1000)  # unmapped
    arr = ffi.new("struct hsm_xrange[1]")
    arr[0].type, arr[0].start, arr[0].end, arr[0].handler, arr[0].client = PIO, 0x6000, 0x60FF, CLIENT, k
    lib.hsm_x_set_default(rig.x, 1)
    lib.hsm_x_configure(rig.x, 1, arr, 1)
    rig.set_u32(_STATE, abi.ACRN_IOREQ_STATE_FREE)
    assert lib.hsm_x_post(rig.x, os.getpid(), rig.page, _head(PIO, 0x6000, 2)) == 0
    assert rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_FREE and lib.hsm_x_client_bits(rig.x, k, 0, 0) == 0
    # a NOTIFY whose answer cannot be read from its page: Python's EFAULT, nothing done
    lib.hsm_x_client_bits(rig.x, k, 1, 0)
    lib.hsm_x_client_held(rig.x, k, 0, lib.HSM_X_HELD | PIO << 8 | abi.ACRN_IOREQ_DIR_READ)
    rig.set_u32(_STATE, abi.ACRN_IOREQ_STATE_PROCESSING)
    assert rig.feed(ioctl_req(330, NOTIFY, notify_arg(0), fh=RFH)) == 0
    assert rig.u32(_STATE) == abi.ACRN_IOREQ_STATE_PROCESSING and lib.hsm_x_client_bits(rig.x, k, 0, 0) == 1


def test_a_removed_range_client_answers_its_waiters_enodev_and_its_requests_go_to_python(rig: Rig) -> None:
    k, cpage, keep = _client_rig(rig, [(PIO, 0x6000, 0x60FF)])
    rig.feed(ioctl_req(340, ATTACH, fh=RFH))
    rig.feed(ioctl_req(341, ATTACH, fh=RFH))
    assert rig.feed(interrupt_req(342, 341)) == 1  # interrupted: 0, as the driver's wait
    assert rig.replies() == [(341, 0)]
    lib.hsm_x_client_remove(rig.x, k, -errno.ENODEV)
    assert rig.replies() == [(340, -errno.ENODEV)]
    assert rig.feed(ioctl_req(343, ATTACH, fh=RFH)) == 0  # Python: no client on this file
    rig.set_u32(_STATE, abi.ACRN_IOREQ_STATE_FREE)
    assert lib.hsm_x_post(rig.x, os.getpid(), rig.page, _head(PIO, 0x6000, 2)) == 0  # stale range
    # the number is free again; the VM's close answers every client's waiters
    assert lib.hsm_x_client_add(rig.x, RFH, os.getpid(), cpage) == k
    rig.feed(ioctl_req(344, ATTACH, fh=RFH))
    lib.hsm_x_close(rig.x)
    assert rig.replies() == [(344, -errno.ENODEV)] and not rig.x.clients[k].live
    assert lib.hsm_x_client_add(rig.x, RFH, os.getpid(), cpage) == -errno.ENOSPC  # closed
    del keep


def test_range_clients_are_bounded_and_bounded_in_waiters(rig: Rig) -> None:
    ks = [lib.hsm_x_client_add(rig.x, RFH + n, os.getpid(), rig.page + 4096) for n in range(lib.HSM_X_CLIENTS_MAX)]
    assert sorted(ks) == list(range(lib.HSM_X_CLIENTS_MAX))
    assert lib.hsm_x_client_add(rig.x, RFH + 99, os.getpid(), rig.page + 4096) == -errno.ENOSPC
    for u in range(lib.HSM_X_PARKED_MAX):
        assert rig.feed(ioctl_req(1000 + u, ATTACH, fh=RFH)) == 1
    assert rig.feed(ioctl_req(5000, ATTACH, fh=RFH)) == 1
    assert rig.replies() == [(5000, -errno.EAGAIN)] and rig.x.refused == 1


def test_ioreq_client_reads_a_c_served_range_clients_state(rig: Rig) -> None:
    """Python's views of an adopted range client (bitmap, held, waiters, served) are C's;
    leaving takes them back and answers its waiters ENODEV."""
    from acrn_hsm_emu.hsm.acrn_drv import IoreqClient, RemotePage

    read = abi.ACRN_IOREQ_DIR_READ
    page = RemotePage(cast(Any, None), rig.page + 4096, os.getpid(), 0, RFH)
    c = IoreqClient(cast(Any, None), "rc", False, None, page)
    c.set_bit(3)
    c.hold(3, (PIO, read))
    assert c.adopt_range(rig.x)
    k = c.express_number
    assert k is not None and lib.hsm_x_client_bits(rig.x, k, 0, 0) == 1 << 3 and c.held(3) == (PIO, read)
    assert rig.feed(ioctl_req(400, ATTACH, fh=RFH)) == 1 and rig.replies() == [(400, 0)]
    c.clear_bit(3)
    assert rig.feed(ioctl_req(401, ATTACH, fh=RFH)) == 1 and c.waiters == 1 and rig.replies() == []
    c.set_bit(1)  # a Python pass hands a request over: its wake answers C's waiters
    c.wake()
    assert rig.replies() == [(401, 0)] and c.waiters == 0 and c.bitmap == 1 << 1
    rig.x.clients[k].served = 2
    c.count_served()
    assert c.served == 3
    c.clear_bit(1)
    c.hold(1, (MMIO, read))
    rig.feed(ioctl_req(402, ATTACH, fh=RFH))
    c.set_bit(5)  # no wake: the waiter stays until the destroy, which answers ENODEV
    assert rig.replies() == []
    c.destroying = True
    c.wake()
    assert rig.replies() == [(402, -errno.ENODEV)]
    assert c.express_number is None and not rig.x.clients[k].live
    assert (c.bitmap, c.held(1), c.served) == (1 << 5, (MMIO, read), 3)
    assert rig.feed(ioctl_req(403, ATTACH, fh=RFH)) == 0  # Python's from now on


# ----- INJECT_MSI and SET_IRQLINE through the VM's native gate (native/irq_gate.h) -----

MSI = abi.ACRN_IOCTL_INJECT_MSI
IRQLINE = abi.ACRN_IOCTL_SET_IRQLINE
LAPIC = 0xFEE00000
_VALUE_CALL = struct.Struct("<IIQq")  # struct acrn_emu_value_call: cmd, reserved, arg, result


def msi_arg(addr: int, data: int) -> bytes:
    return struct.pack("<QQ", addr, data)  # struct acrn_msi_entry


def ops(gsi: int, op: int) -> int:
    return op << 32 | gsi  # struct acrn_irqline_ops, as the value it is passed as


def value_call_req(unique: int, value: int, cmd: int = IRQLINE, reserved: int = 0, out_size: int = 24) -> bytes:
    data = _VALUE_CALL.pack(cmd, reserved, value, 0)
    body = _IOCTL_IN.pack(FH, 0, ext.ACRN_EMU_IOCTL_VALUE_CALL, 0x5000, len(data), out_size) + data
    return _IN_HEADER.pack(_IN_HEADER.size + len(body), FUSE_IOCTL, unique, 2, 0, 0, 1, 0, 0) + body


def take(gate: Any, who: int) -> list[tuple[int, int, int]]:
    out = ffi.new("struct hsm_irq_rec[]", lib.HSM_IRQ_RING)
    k = lib.hsm_irq_take(gate, who, out, lib.HSM_IRQ_RING)
    return [(r.kind, r.a, r.b) for r in out[0:k]]


@pytest.fixture
def kvm_vm() -> Iterator[int]:
    """A bare KVM VM with its in-kernel irqchip and a vCPU (LAPIC 0): what KVM_SIGNAL_MSI
    needs to deliver (with no LAPIC to take it, KVM answers -1: EPERM)."""
    import fcntl

    from acrn_hsm_emu.hypervisor.backends import kvm_abi as k

    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        pytest.skip(f"needs /dev/kvm: {e.strerror}")
    try:
        vm = fcntl.ioctl(kvm, k.KVM_CREATE_VM, 0)
        fcntl.ioctl(vm, k.KVM_CREATE_IRQCHIP, 0)
        vcpu = fcntl.ioctl(vm, k.KVM_CREATE_VCPU, 0)
    finally:
        os.close(kvm)
    yield vm
    os.close(vcpu)
    os.close(vm)


@pytest.fixture
def gate(rig: Rig, kvm_vm: int) -> Iterator[Any]:
    g = ffi.new("struct hsm_irq_gate *")
    lib.hsm_irq_gate_init(g)
    lib.hsm_irq_gate_set(g, kvm_vm)
    lib.hsm_x_set_irq(rig.x, g)
    yield g
    lib.hsm_x_set_irq(rig.x, ffi.NULL)


def test_inject_msi_is_answered_through_the_gate_and_recorded(rig: Rig, gate: Any) -> None:
    assert rig.feed(ioctl_req(400, MSI, msi_arg(LAPIC, 0x41))) == 1
    assert rig.replies() == [(400, 0)]
    assert rig.x.msis == 1 and gate.n == 1
    assert take(gate, lib.HSM_IRQ_HV) == [(lib.HSM_IRQ_MSI, LAPIC, 0x41)]
    assert take(gate, lib.HSM_IRQ_HV) == []  # each consumer takes once
    assert take(gate, lib.HSM_IRQ_HSM) == [(lib.HSM_IRQ_MSI, LAPIC, 0x41)]  # the other on its own


def test_set_irqline_is_answered_through_the_gate_plain_or_carried(rig: Rig, gate: Any) -> None:
    # CUSE's plain call: unrestricted, the value is the argument, nothing fetched
    plain = ioctl_req(410, IRQLINE, b"", flags=FUSE_IOCTL_UNRESTRICTED, arg=ops(4, abi.IRQ_RAISING_PULSE))
    assert rig.feed(plain) == 1
    assert rig.replies() == [(410, 0)]
    # FUSE: the launcher's VALUE_CALL, answered with its 24 bytes, result 0
    assert rig.feed(value_call_req(411, ops(5, abi.IRQ_SET_HIGH))) == 1
    msg = rig.sock.recv(4096)
    n, err, unique = _OUT_HEADER.unpack_from(msg)
    assert (n, err, unique) == (16 + 16 + 24, 0, 411)
    assert struct.unpack_from("<i", msg, 16)[0] == 0  # fuse_ioctl_out.result
    assert _VALUE_CALL.unpack_from(msg, 32) == (IRQLINE, 0, ops(5, abi.IRQ_SET_HIGH), 0)
    assert rig.x.irqlines == 2
    line = lib.HSM_IRQ_LINE
    assert take(gate, lib.HSM_IRQ_HSM) == [(line, ops(4, abi.IRQ_RAISING_PULSE), 0), (line, ops(5, abi.IRQ_SET_HIGH), 0)]


@pytest.mark.parametrize(
    "req",
    [
        ioctl_req(420, IRQLINE, b"", flags=FUSE_IOCTL_UNRESTRICTED, arg=ops(24, 0)),  # no KVM pin: Python
        ioctl_req(420, IRQLINE, b"", flags=FUSE_IOCTL_UNRESTRICTED, arg=ops(4, 4)),  # an op driving nothing
        ioctl_req(420, IRQLINE, struct.pack("<Q", ops(4, 0))),  # FUSE's restricted call: EFAULT's, Python
        value_call_req(420, ops(4, 0), reserved=1),  # EINVAL, from Python
        value_call_req(420, 0, cmd=abi.ACRN_IOCTL_START_VM),  # not a value call: EINVAL, from Python
        value_call_req(420, ops(4, 0), out_size=0),  # nowhere for the answer
        value_call_req(420, ops(48, 0)),  # ACRN refuses GSI 48: Python's -EPERM
    ],
)
def test_an_irqline_the_gate_cannot_take_goes_to_python_with_nothing_done(rig: Rig, gate: Any, req: bytes) -> None:
    assert rig.feed(req) == 0
    assert rig.replies() == [] and rig.x.irqlines == 0 and gate.n == 0


def test_every_call_is_kept_until_both_consumers_took_it_and_a_full_ring_refuses(rig: Rig, gate: Any) -> None:
    alert = os.eventfd(0, os.EFD_NONBLOCK)
    lib.hsm_irq_gate_alert(gate, alert)
    try:
        half = lib.HSM_IRQ_RING // 2
        for i in range(half - 1):
            assert rig.feed(ioctl_req(1000 + i, MSI, msi_arg(LAPIC, i & 0xFF))) == 1
            rig.replies()  # the socket standing in for /dev/fuse has a bounded buffer
        with pytest.raises(BlockingIOError):
            os.eventfd_read(alert)
        assert rig.feed(ioctl_req(999, MSI, msi_arg(LAPIC, 0))) == 1
        assert os.eventfd_read(alert) == 1  # half full: a fold is due, said once
        assert len(take(gate, lib.HSM_IRQ_HV)) == half  # one consumer alone frees nothing
        for i in range(half):
            assert rig.feed(ioctl_req(5000 + i, MSI, msi_arg(LAPIC, i & 0xFF))) == 1
            rig.replies()
        assert rig.feed(ioctl_req(9999, MSI, msi_arg(LAPIC, 1))) == 0  # full: Python's, nothing done
        assert rig.replies() == []
        assert gate.n == lib.HSM_IRQ_RING
        with pytest.raises(BlockingIOError):
            os.eventfd_read(alert)  # still the one alert
        recs = take(gate, lib.HSM_IRQ_HSM)
        assert len(recs) == lib.HSM_IRQ_RING and recs[-1] == (lib.HSM_IRQ_MSI, LAPIC, (half - 1) & 0xFF)
        assert len(take(gate, lib.HSM_IRQ_HV)) == half
        assert rig.feed(ioctl_req(10000, MSI, msi_arg(LAPIC, 2))) == 1  # room again
    finally:
        lib.hsm_irq_gate_alert(gate, -1)
        os.close(alert)


@pytest.mark.parametrize(
    "why",
    ["not the LAPIC's address", "a tracer listens", "the gate is closed", "no gate", "KVM refuses",
     "a range client's file", "no argument (FUSE)"],
)
def test_an_msi_the_gate_cannot_take_goes_to_python_with_nothing_done(rig: Rig, gate: Any, why: str) -> None:
    req = ioctl_req(600, MSI, msi_arg(LAPIC, 0x41))
    trace = None
    efd = -1
    if why == "not the LAPIC's address":
        req = ioctl_req(600, MSI, msi_arg(0xFED00000, 0x41))  # the hypervisor's refusal is Python's
    elif why == "a tracer listens":
        trace = ffi.new("struct hsm_xtrace *")
        trace.size = 4
        trace.buf = ffi.new("struct hsm_xtrace_rec[]", 4)
        lib.hsm_x_set_trace(rig.x, trace)
    elif why == "the gate is closed":
        lib.hsm_irq_gate_set(gate, -1)  # DESTROY_VM closes it before the fd goes
    elif why == "no gate":
        lib.hsm_x_set_irq(rig.x, ffi.NULL)
    elif why == "KVM refuses":
        efd = os.eventfd(0)
        lib.hsm_irq_gate_set(gate, efd)  # not a KVM VM: ENOTTY, nothing injected
    elif why == "a range client's file":
        assert lib.hsm_x_client_add(rig.x, FH + 5, os.getpid(), rig.page) == 0
        req = ioctl_req(600, MSI, msi_arg(LAPIC, 0x41), fh=FH + 5)  # extension.py: bound_ioctl
    else:
        req = ioctl_req(600, MSI, b"")
    assert rig.feed(req) == 0
    assert rig.replies() == [] and rig.x.msis == 0 and gate.n == 0
    if trace is not None:
        lib.hsm_x_set_trace(rig.x, ffi.NULL)
    if efd >= 0:
        os.close(efd)


def test_cuses_first_inject_msi_is_answered_with_the_retry_for_its_argument(rig: Rig, gate: Any) -> None:
    arg = 0x7F00_1234_6000
    first = ioctl_req(700, MSI, b"", flags=FUSE_IOCTL_UNRESTRICTED, arg=arg)
    assert rig.feed(ioctl_req(701, MSI, b"", fh=FH + 1, flags=FUSE_IOCTL_UNRESTRICTED, arg=arg)) == 0
    assert rig.feed(first) == 1
    msg = rig.sock.recv(4096)
    n, err, unique = _OUT_HEADER.unpack_from(msg)
    result, flags, in_iovs, out_iovs = struct.unpack_from("<iIII", msg, 16)
    assert (n, err, unique, result, flags, in_iovs, out_iovs) == (48, 0, 700, 0, FUSE_IOCTL_RETRY, 1, 0)
    assert struct.unpack_from("<QQ", msg, 32) == (arg, 16)  # the 16 bytes of acrn_msi_entry
    assert rig.feed(ioctl_req(702, MSI, msi_arg(LAPIC, 0x42), flags=FUSE_IOCTL_UNRESTRICTED, arg=arg)) == 1
    assert rig.replies() == [(702, 0)] and gate.n == 1
    lib.hsm_x_set_irq(rig.x, ffi.NULL)  # without a gate the retry is Python's too
    assert rig.feed(first) == 0
