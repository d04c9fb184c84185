"""Fuzzing the ABI through the real node, next to a valid client that must not notice.

Random ioctl numbers, sizes and struct contents (valid numbers with invalid
fields, bad addresses for ioreq_buf / vma_base / the argument itself, fds
that are not eventfds or not open), interleaved with valid sequences. Every
call must end in success or an errno the driver can give; the daemon never
answers EIO (cdev's answer when a handler raised), never logs a traceback,
and the valid client's workload completes with every value right.

Pointers only ever aim at scratch pages of this process or at unmapped
addresses: the daemon writes through them as the kernel would, and must not
scribble over the test's own heap. ``FUZZ_EXAMPLES`` scales the run
(``make fuzz`` runs a long one).
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import signal
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acrn_hsm_emu import abi
from tests.support.cbuild import build_c
from tests.test_ioreq_flow import mixed_program, wait_workload_done

pytestmark = pytest.mark.needs_fuse

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
# What the driver (or FUSE in front of it) may answer; EIO would mean a handler crashed.
ALLOWED = {
    0, errno.EINVAL, errno.EFAULT, errno.ENOTTY, errno.EPERM, errno.EEXIST, errno.ENODEV,
    errno.EBADF, errno.EBUSY, errno.ENOMEM, errno.EINTR,
}  # fmt: skip
UNMAPPED = 0x7FFF_0000_0000  # never mapped in a normal process
CALLS = {"n": 0}
OUTCOMES: dict[str, int] = {}


class Scratch:
    """Pages the daemon may write into: the only real pointers the fuzzer hands out."""

    def __init__(self) -> None:
        self.rw = mmap.mmap(-1, 16 * 4096)
        self.rw_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.rw))
        self.ro = mmap.mmap(-1, 4096)
        self.ro_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.ro))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(self.ro_addr, 4096, mmap.PROT_READ) == 0

    def pointers(self) -> st.SearchStrategy[int]:
        return st.one_of(
            st.sampled_from([0, 8, UNMAPPED, 0xFFFF_FFFF_FFFF_F000, self.ro_addr]),
            st.integers(0, 15).map(lambda i: self.rw_addr + i * 4096),
            st.integers(0, 16 * 4096 - 64).map(lambda off: self.rw_addr + off),
        )


SCRATCH: Scratch | None = None


def scratch() -> Scratch:
    global SCRATCH
    if SCRATCH is None:
        SCRATCH = Scratch()
    return SCRATCH


def _alarm(signum: int, frame: object) -> None:
    pass  # only there to interrupt a blocking ioctl (ATTACH answers 0 on a signal)


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def do_ioctl(fd: int, cmd: int, arg: int | bytes) -> int:
    """One call, as C makes it (64-bit raw argument or a buffer); the errno, 0 on success.

    A blocked call is interrupted after 50 ms (ATTACH answers 0 on a signal).
    """
    CALLS["n"] += 1
    buf = ctypes.create_string_buffer(bytes(arg), len(arg)) if isinstance(arg, bytes) else None
    ptr = ctypes.addressof(buf) if buf is not None else arg
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    try:
        ret = _LIBC.ioctl(fd, cmd, ptr)
        return 0 if ret >= 0 else ctypes.get_errno()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


UAPI = [
    abi.ACRN_IOCTL_CREATE_VM, abi.ACRN_IOCTL_DESTROY_VM, abi.ACRN_IOCTL_START_VM,
    abi.ACRN_IOCTL_PAUSE_VM, abi.ACRN_IOCTL_RESET_VM, abi.ACRN_IOCTL_SET_VCPU_REGS,
    abi.ACRN_IOCTL_INJECT_MSI, abi.ACRN_IOCTL_VM_INTR_MONITOR, abi.ACRN_IOCTL_SET_IRQLINE,
    abi.ACRN_IOCTL_NOTIFY_REQUEST_FINISH, abi.ACRN_IOCTL_CREATE_IOREQ_CLIENT,
    abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT, abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT,
    abi.ACRN_IOCTL_CLEAR_VM_IOREQ, abi.ACRN_IOCTL_SET_MEMSEG, abi.ACRN_IOCTL_UNSET_MEMSEG,
    abi.ACRN_IOCTL_SET_PTDEV_INTR, abi.ACRN_IOCTL_RESET_PTDEV_INTR, abi.ACRN_IOCTL_ASSIGN_PCIDEV,
    abi.ACRN_IOCTL_DEASSIGN_PCIDEV, abi.ACRN_IOCTL_ASSIGN_MMIODEV, abi.ACRN_IOCTL_DEASSIGN_MMIODEV,
    abi.ACRN_IOCTL_CREATE_VDEV, abi.ACRN_IOCTL_DESTROY_VDEV, abi.ACRN_IOCTL_PM_GET_CPU_STATE,
    abi.ACRN_IOCTL_IOEVENTFD, abi.ACRN_IOCTL_IRQFD,
]  # fmt: skip


def fds() -> st.SearchStrategy[int]:
    return st.sampled_from([-1, 0, 1, 2, 999, EVENTFD[0] if EVENTFD else 999])


EVENTFD: list[int] = []


@st.composite
def call(draw: st.DrawFn) -> tuple[int, int | bytes]:
    """One ioctl: a known command with fuzzed contents, or a random number."""
    sc = scratch()
    kind = draw(st.sampled_from(["uapi", "uapi", "uapi", "random"]))
    if kind == "random":
        cmd = draw(st.one_of(
            st.integers(0, 0xFFFFFFFF),
            st.builds(lambda d, nr, size: abi.ioc(d, 0xA2, nr, size),
                      st.integers(0, 3), st.integers(0, 255), st.integers(0, 512)),
        ))  # fmt: skip
        size = abi.ioc_size(cmd)
        if abi.ioc_dir(cmd) and size:
            return cmd, draw(st.binary(min_size=size, max_size=size))
        return cmd, draw(sc.pointers())
    cmd = draw(st.sampled_from([c for c in UAPI if c != abi.ACRN_IOCTL_CREATE_VM]))
    return _uapi_call(draw, sc, cmd)


@st.composite
def fuzzed_create(draw: st.DrawFn) -> tuple[int, bytes]:
    """CREATE_VM with fuzzed fields. At most one per file: a second one on a live
    file loses the first VM for good (the driver's quirk, reproduced), which
    would use up the hypervisor's VM slots and starve the rest of the run."""
    sc = scratch()
    vm = abi.AcrnVmCreation()
    vm.ioreq_buf = draw(sc.pointers())
    vm.cpu_affinity = draw(st.sampled_from([0, 1, 3, 0xF, 0x10, 0xFFFF]))
    vm.vcpu_num = draw(st.integers(0, 0xFFFF))
    if draw(st.booleans()):
        vm.reserved0 = draw(st.integers(0, 0xFFFF))
    return abi.ACRN_IOCTL_CREATE_VM, bytes(vm)


def _uapi_call(draw: st.DrawFn, sc: Scratch, cmd: int) -> tuple[int, int | bytes]:
    size = abi.ioc_size(cmd)
    if cmd in (abi.ACRN_IOCTL_SET_IRQLINE, abi.ACRN_IOCTL_VM_INTR_MONITOR):
        return cmd, draw(st.one_of(sc.pointers(), st.integers(0, 2**64 - 1)))
    if cmd == abi.ACRN_IOCTL_PM_GET_CPU_STATE:
        # The daemon writes up to 48 bytes at the argument: give it scratch or nothing.
        return cmd, draw(sc.pointers())
    if abi.ioc_dir(cmd) == 0 or size == 0:
        return cmd, draw(st.integers(0, 2**64 - 1))
    data = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if cmd in (abi.ACRN_IOCTL_SET_MEMSEG, abi.ACRN_IOCTL_UNSET_MEMSEG):
        struct.pack_into("<IIQQQ", data, 0, draw(st.integers(0, 3)), draw(st.integers(0, 0xFFF)),
                         draw(st.integers(0, 2**40)), draw(sc.pointers()),
                         draw(st.sampled_from([0, 100, 4096, 8192, 16 * 4096, 2**40])))
    elif cmd in (abi.ACRN_IOCTL_IOEVENTFD, abi.ACRN_IOCTL_IRQFD):
        struct.pack_into("<i", data, 0, draw(fds()))
        if cmd == abi.ACRN_IOCTL_IOEVENTFD:
            struct.pack_into("<I", data, 16, draw(st.sampled_from([0, 1, 2, 3, 4, 8, 0xFFFF])))
    elif cmd == abi.ACRN_IOCTL_NOTIFY_REQUEST_FINISH and draw(st.booleans()):
        struct.pack_into("<HHI", data, 0, 0, 0, draw(st.integers(0, 20)))
    return cmd, bytes(data)


@pytest.fixture
def fuzz_target(daemon_factory, tmp_path):
    """The daemon with a workload, and a valid dm_loop client serving it throughout."""
    import random

    from acrn_hsm_emu.hypervisor.workload import Workload

    rng = random.Random(7)
    programs = {v: mixed_program(rng, 1000)[0] for v in (0, 1)}
    path = tmp_path / "workload.json"
    path.write_text(json.dumps(Workload.build(programs).to_dict()))
    daemon = daemon_factory("--workload", str(path))
    dm = subprocess.Popen([str(build_c("dm_loop")), str(daemon.node), "0x3"], stdout=subprocess.PIPE, text=True)
    assert dm.stdout is not None
    header = dict(kv.split("=") for kv in dm.stdout.readline().split())
    yield daemon, dm, int(header["vmid"])
    if dm.poll() is None:
        dm.send_signal(signal.SIGTERM)
        dm.communicate(timeout=60)


def test_fuzz_ioctls_beside_a_valid_client(fuzz_target):
    daemon, dm, vmid = fuzz_target
    old = signal.signal(signal.SIGALRM, _alarm)
    EVENTFD[:] = [os.eventfd(0)]
    bad: list[str] = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["none", "fuzzed", "vm", "vm", "running"]), st.integers(0, 15),
           fuzzed_create(), st.lists(call(), min_size=1, max_size=25))
    def run(prefix: str, page: int, create: tuple[int, bytes],
            calls: list[tuple[int, int | bytes]]) -> None:
        fd = os.open(daemon.node, os.O_RDWR)
        try:
            if prefix == "fuzzed":
                calls = [create, *calls]
            elif prefix != "none":  # a valid start, so the fuzzed calls get past the gate
                vm = abi.AcrnVmCreation()
                vm.ioreq_buf = scratch().rw_addr + page * 4096
                valid = [(abi.ACRN_IOCTL_CREATE_VM, bytes(vm))]
                if prefix == "running":
                    valid += [(abi.ACRN_IOCTL_CREATE_IOREQ_CLIENT, 0), (abi.ACRN_IOCTL_START_VM, 0)]
                calls = valid + calls
            for cmd, arg in calls:
                err = do_ioctl(fd, cmd, arg)
                key = f"{abi.IOCTL_NAMES.get(cmd, 'other')}:{errno.errorcode.get(err, err)}"
                OUTCOMES[key] = OUTCOMES.get(key, 0) + 1
                if err not in ALLOWED:
                    bad.append(f"cmd {cmd:#x} arg {arg!r:.80} -> {errno.errorcode.get(err, err)}")
        finally:
            os.close(fd)  # release destroys whatever VM the sequence made

    try:
        run()
    finally:
        signal.signal(signal.SIGALRM, old)
        os.close(EVENTFD.pop())
    print(f"fuzz: {CALLS['n']} ioctl calls tried")
    print("fuzz outcomes:", ", ".join(f"{k}={v}" for k, v in sorted(OUTCOMES.items())))
    # The fuzzer must get past the gate, or it tests nothing but EINVAL.
    assert sum(v for k, v in OUTCOMES.items() if k.endswith(":0") and "CREATE_VM" in k) >= 5
    assert not bad, "\n".join(bad[:20])
    assert daemon.proc.poll() is None, "the daemon died"
    vm = wait_workload_done(daemon, vmid)
    assert all(v["mismatches"] == 0 for v in vm["vcpus"]), vm["vcpus"]
    dm.send_signal(signal.SIGTERM)
    out, _ = dm.communicate(timeout=60)
    assert dm.returncode == 0, out
    assert "handled total=2000" in out
    log = daemon.log()
    assert "Traceback" not in log
    assert '"level": "error"' not in log and '"level": "critical"' not in log, log[-3000:]
