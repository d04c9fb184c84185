"""Issue 4's acceptance checks: guests' own instructions make the I/O requests.

The real daemon (``--backend kvm``) serves a FUSE node; tests/clients/vm_sample.c
(a vm-sample-style launcher: zero-filled CREATE_VM, posix_memalign'd or memfd
RAM, SET_MEMSEG, SET_VCPU_REGS, one ioreq client) runs guests from
tests/guests/, assembled here with binutils, and prints every request it
handles.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import pathlib
import re
import signal
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from acrn_hsm_emu import abi
from acrn_hsm_emu.client import extension as ext
from tests.guests.build import Guest, assemble, page_tables_64
from tests.support.cbuild import build_c
from tests.support.ext import Ctl
from tests.support.hsmctl import PLACEMENTS, status
from tests.support.poll import wait_until

pytestmark = [pytest.mark.needs_kvm, pytest.mark.needs_fuse]

HANG_GUARD_S = 60.0
_KV = re.compile(r"(\w+)=(\S+)")


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Guest]:
    out = tmp_path_factory.mktemp("guests")
    made: dict[str, Guest] = {}

    def get(name: str, load: int = 0, bits: int = 32) -> Guest:
        if name not in made:
            made[name] = assemble(name, out, load, bits)
        return made[name]

    return get


KVM_DAEMON = ("--backend", "kvm", "--log-level", "debug")


@pytest.fixture
def kvm_daemon(daemon_factory):
    return daemon_factory(*KVM_DAEMON)


@dataclass
class Run:
    """What vm_sample printed."""

    lines: list[str]
    reqs: list[dict[str, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for line in self.lines:
            if line.startswith("req "):
                d: dict[str, object] = {}
                for k, v in _KV.findall(line):
                    d[k] = v if k in ("type", "dir") else int(v, 0)
                self.reqs.append(d)

    def writes(self, port: int) -> list[int]:
        return [
            r["value"] for r in self.reqs  # type: ignore[misc]
            if r["type"] == "pio" and r["dir"] == "w" and r["addr"] == port
        ]

    def first(self, prefix: str) -> dict[str, int]:
        for line in self.lines:
            if line.startswith(prefix + " "):
                return {k: int(v, 0) for k, v in _KV.findall(line)}
        raise AssertionError(f"no {prefix!r} line in {self.lines}")


def vm_sample(daemon, *args: str) -> Run:
    proc = subprocess.run(
        [str(build_c("vm_sample")), *args, str(daemon.node)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{daemon.log()}"
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("done requests="), lines
    return Run(lines)


def events(daemon, name: str) -> list[dict[str, object]]:
    out = []
    for line in daemon.log().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == name:
            out.append(e)
    return out


def kvm_fds(pid: int) -> list[str]:
    out = []
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("anon_inode:kvm-"):
            out.append(target)
    return out


# ----- the acceptance checks ------------------------------------------------------------


def test_cpuid_leaves_reach_a_vm_sample_client(kvm_daemon, guests) -> None:
    """A 16-bit guest writes CPUID 0x40000000/0x40000001 to ports; the client,
    with private memory and vm-sample's real-mode registers, reads "ACRN"."""
    run = vm_sample(kvm_daemon, "-g", f"{guests('cpuid16').path}@0")
    assert run.lines[0].startswith("vmid=") and run.lines[0].endswith("ram=private")
    sig = b"".join(v.to_bytes(4, "little") for v in run.writes(0x10))
    assert sig == b"ACRNACRNACRN"
    assert run.writes(0x11) == [0x40000010]  # the highest hypervisor leaf
    assert run.writes(0x12) == [0]  # features: bit 0 (privileged) clear for a User VM
    assert run.writes(0x13)[0] >> 31 == 1  # CPUID.1:ECX[31]: a hypervisor is present
    assert run.writes(0x14) == [2_000_000]  # TSC kHz from the scenario
    copied = events(kvm_daemon, "kvm.private_memory_copied")
    assert len(copied) == 1 and "not seen by the other" in str(copied[0]["note"])


def test_a_read_answer_reaches_the_guest_register(kvm_daemon, guests) -> None:
    """IN, then OUT of the value plus one, for 1, 2 and 4 bytes; string I/O per element."""
    run = vm_sample(
        kvm_daemon, "-g", f"{guests('roundtrip16').path}@0",
        "-a", "0x30=0x41", "-a", "0x32=0x1234", "-a", "0x34=0xfffffffe", "-a", "0x41=0x4142",
    )  # fmt: skip
    assert run.writes(0x31) == [0x42]
    assert run.writes(0x33) == [0x1235]
    assert run.writes(0x35) == [0xFFFFFFFF]
    assert bytes(run.writes(0x40)) == b"ACRN"  # rep outsb: four 1-byte requests
    ins = [r for r in run.reqs if r["addr"] == 0x41]
    assert [(r["dir"], r["size"]) for r in ins] == [("r", 2), ("r", 2)]  # rep insw
    assert run.writes(0x42) == [0x41424142]  # both words landed in guest memory
    reads = [r for r in run.reqs if r["dir"] == "r"]
    assert [(r["addr"], r["size"]) for r in reads][:3] == [(0x30, 1), (0x32, 2), (0x34, 4)]


def test_unmapped_gpa_is_mmio_and_cf8_cfc_is_pcicfg(kvm_daemon, guests) -> None:
    run = vm_sample(
        kvm_daemon, "-g", f"{guests('mmio16').path}@0", "-M", "0x20020=0xbeef", "-P", "0xcafef00d",
    )  # fmt: skip
    mmio = [(r["dir"], r["addr"], r["size"], r["value"]) for r in run.reqs if r["type"] == "mmio"]
    assert mmio == [
        ("w", 0x20010, 4, 0x12345678),
        ("w", 0x20031, 1, 0x5A),
        ("r", 0x20020, 2, 0xBEEF),
    ]
    assert run.writes(0x36) == [0xBEEF]
    pci = [
        (r["dir"], r["bus"], r["dev"], r["func"], r["reg"], r["size"])
        for r in run.reqs
        if r["type"] == "pci"
    ]
    assert pci == [("r", 0, 3, 2, 0x10, 4), ("w", 0, 3, 2, 0x12, 1)]
    assert run.writes(0x37) == [0xCAFEF00D]
    assert [r for r in run.reqs if r["type"] == "pio" and r["addr"] in (0xCF8, 0xCFC, 0xCFE)] == []
    assert run.writes(0x38) == [0]  # CF8 read: the hypervisor's latch, cleared by the CFC access


def pm32_args(g: Guest) -> list[str]:
    s = g.symbols
    return [
        "-m", "0x20000", "-g", f"{g.path}@{g.load:#x}", "-r", "pm32", "-e", hex(g.load),
        "-s", "0x8000", "-G", f"{s['gdt']:#x}:{s['gdt_end'] - s['gdt'] - 1:#x}",
        "-I", f"{s['idt']:#x}:{s['idt_end'] - s['idt'] - 1:#x}",
    ]  # fmt: skip


def test_32bit_protected_mode_guest(kvm_daemon, guests) -> None:
    g = guests("pm32", 0x1000)
    run = vm_sample(kvm_daemon, *pm32_args(g), "-M", "0xd0000010=41", "-d", "0x50")
    assert run.writes(0x10) == [0xC0DE3232]
    mmio = [(r["dir"], r["addr"], r["size"], r["value"]) for r in run.reqs if r["type"] == "mmio"]
    assert mmio == [("w", 0xD0000000, 4, 0x11223344), ("r", 0xD0000010, 4, 41)]
    assert run.writes(0x11) == [42]
    assert run.writes(0x50) == [1]  # it got as far as enabling its local APIC


def test_inject_msi_reaches_the_guest_interrupt_handler(kvm_daemon, guests) -> None:
    """The guest installs a handler for vector 0x41 and halts with interrupts on;
    INJECT_MSI (fixed, vector 0x41, APIC 0) makes the handler write port 0x51."""
    run = vm_sample(kvm_daemon, *pm32_args(guests("pm32", 0x1000)), "-x", "0x50:1:msi:0x41")
    assert "msi data=0x41" in run.lines
    assert run.lines.index("msi data=0x41") < next(
        i for i, line in enumerate(run.lines) if "addr=0x51" in line
    )
    assert run.writes(0x51) == [0x41]
    assert run.writes(0x1F) == [1]
    # at --log-level debug the daemon says so (the line is skipped, not filtered, above it)
    msi = events(kvm_daemon, "kvm.msi")
    assert [(e["addr"], e["data"], e["delivered"]) for e in msi] == [("0xfee00000", "0x41", True)]


def test_64bit_long_mode_guest(kvm_daemon, guests, tmp_path) -> None:
    g = guests("long64", 0x1000, 64)
    tables = tmp_path / "pt.bin"
    tables.write_bytes(page_tables_64(0x10000))
    run = vm_sample(
        kvm_daemon, "-m", "0x20000", "-g", f"{g.path}@0x1000", "-g", f"{tables}@0x10000",
        "-r", "long", "-e", "0x1000", "-c", "0x10000", "-s", "0x8000",
        "-M", "0xd0000010=0xaabbccdd11223344",
    )  # fmt: skip
    mmio = [(r["dir"], r["addr"], r["size"], r["value"]) for r in run.reqs if r["type"] == "mmio"]
    assert mmio == [("w", 0xD0000008, 8, 0x1122334455667788), ("r", 0xD0000010, 8, 0xAABBCCDD11223344)]
    assert run.writes(0x10) == [0x11223344]
    assert run.writes(0x11) == [0x11223344] and run.writes(0x12) == [0xAABBCCDD]


def test_memfd_ram_is_shared_both_ways(kvm_daemon, guests) -> None:
    """RAM backed by a memfd: the client sees the guest's store, the guest the client's."""
    run = vm_sample(
        kvm_daemon, "-f", "-g", f"{guests('shared16').path}@0",
        "-x", "0x15:1:peek:0x600", "-x", "0x15:1:poke:0x604:0x5eed1234",
    )  # fmt: skip
    assert run.lines[0].endswith("ram=memfd")
    assert run.first("peek") == {"gpa": 0x600, "value": 0xFEEDBEEF}
    assert run.writes(0x16) == [0x5EED1234]
    assert events(kvm_daemon, "kvm.private_memory_copied") == []
    slots = events(kvm_daemon, "kvm.memory_slot")
    assert [(s["kind"], s["gpa"]) for s in slots] == [("shared", "0x0")]
    assert "memfd:vm_sample_ram" in str(slots[0]["file"])


HUGEPAGES = pathlib.Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


@pytest.fixture
def huge_page() -> Any:
    """One free 2 MiB huge page, reserved for the test (root) and given back after."""
    try:
        total = int((HUGEPAGES / "nr_hugepages").read_text())
        free = int((HUGEPAGES / "free_hugepages").read_text())
    except OSError:
        pytest.skip("this kernel has no 2 MiB huge pages")
    if free < 1:
        try:
            (HUGEPAGES / "nr_hugepages").write_text(str(total + 1))
        except OSError as e:
            pytest.skip(f"cannot reserve a 2 MiB huge page: {e.strerror}")
        if int((HUGEPAGES / "free_hugepages").read_text()) < 1:
            (HUGEPAGES / "nr_hugepages").write_text(str(total))
            pytest.skip("no memory for a 2 MiB huge page")
    yield
    if free < 1:
        (HUGEPAGES / "nr_hugepages").write_text(str(total))


def test_hugetlb_memfd_ram_is_shared(kvm_daemon, guests, huge_page) -> None:
    """acrn-dm's kind of RAM: a MFD_HUGETLB memfd."""
    run = vm_sample(
        kvm_daemon, "-H", "-m", "0x200000", "-g", f"{guests('shared16').path}@0",
        "-x", "0x15:1:peek:0x600", "-x", "0x15:1:poke:0x604:0x5eed1234",
    )  # fmt: skip
    assert run.lines[0].endswith("ram=hugetlb")
    assert run.first("peek") == {"gpa": 0x600, "value": 0xFEEDBEEF}
    assert run.writes(0x16) == [0x5EED1234]


def test_private_ram_is_a_copy(kvm_daemon, guests) -> None:
    """posix_memalign'd RAM is copied at START_VM: the documented one-way snapshot."""
    run = vm_sample(
        kvm_daemon, "-g", f"{guests('shared16').path}@0",
        "-x", "0x15:1:peek:0x600", "-x", "0x15:1:poke:0x604:0x5eed1234",
    )  # fmt: skip
    assert run.first("peek") == {"gpa": 0x600, "value": 0}
    assert run.writes(0x16) == [0]
    assert len(events(kvm_daemon, "kvm.private_memory_copied")) == 1


def test_pause_stops_a_spinning_guest_and_reset_reruns_it(kvm_daemon, guests) -> None:
    """The guest counts in RAM without any I/O. PAUSE_VM returns and the count
    stands still; RESET_VM + START_VM runs from the architectural reset state
    (F000:FFF0, mapped to the image's reset vector); RESET_VM + SET_VCPU_REGS +
    START_VM runs from the registers again."""
    run = vm_sample(
        kvm_daemon, "-f", "-m", "0x100000", "-A", "0xffff0000:0xf0000:0x10000",
        "-g", f"{guests('spin16').path}@0", "-g", f"{guests('reset16', 0xF0000).path}@0xf0000",
        "-x", "0x60:1:pause:0x500", "-x", "0x60:1:reset",
        "-x", "0x60:2:pause:0x500", "-x", "0x60:2:resetregs",
        "-x", "0x60:3:pause:0x500", "-x", "0x60:3:stop",
    )  # fmt: skip
    assert run.writes(0x60) == [0xA1, 0xB2, 0xA1]
    paused = [
        {k: int(v, 0) for k, v in _KV.findall(line)} for line in run.lines if line.startswith("paused")
    ]
    assert len(paused) == 3
    for p in paused:
        assert p["after_pause"] == p["later"]  # stopped by the time PAUSE_VM returned
        assert p["after_pause"] >= p["running_count"]
    assert run.lines.count("reset") == 1 and run.lines.count("resetregs") == 1


def test_destroy_and_close_free_the_kvm_vm(kvm_daemon, guests) -> None:
    pid = kvm_daemon.proc.pid
    vm_sample(kvm_daemon, "-g", f"{guests('cpuid16').path}@0")
    wait_until(lambda: kvm_fds(pid) == [], "DESTROY_VM to free the KVM VM")
    # a client killed while its guest spins: release pauses and destroys the VM
    proc = subprocess.Popen(
        [str(build_c("vm_sample")), "-f", "-g", f"{guests('spin16').path}@0", str(kvm_daemon.node)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "addr=0x60" in line:
                break
        fds = kvm_fds(pid)
        assert "anon_inode:kvm-vm" in fds and any(f.startswith("anon_inode:kvm-vcpu") for f in fds)
        assert "memfd:vm_sample_ram" in pathlib.Path(f"/proc/{pid}/maps").read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=HANG_GUARD_S)
    wait_until(lambda: kvm_fds(pid) == [], "the closed file to free the KVM VM")
    wait_until(
        lambda: "memfd:vm_sample_ram" not in pathlib.Path(f"/proc/{pid}/maps").read_text(),
        "the guest RAM mapping to go",
    )
    assert len(events(kvm_daemon, "kvm.vm_freed")) == 2


@pytest.mark.parametrize("kind", ["pio", "mmio"])
def test_every_vcpu_of_an_smp_guest_is_served(kvm_daemon, guests, kind) -> None:
    """Two vCPUs run the benchmark guest: the BSP starts the AP with INIT and a
    start-up IPI, then both loop on one access. Each request arrives in its own
    vCPU's slot with the guest's value, while the other vCPU keeps exiting (the
    native loop of each runs beside the other), and PAUSE_VM at the end stops both."""
    g = guests(f"smp{kind}32", 0x1000)
    run = vm_sample(
        kvm_daemon, "-C", "0x3", "-r", "pm32", "-e", "0x1000", "-g", f"{g.path}@0x1000", "-n", "3000"
    )
    assert 3000 <= len(run.reqs) <= 3001  # the client finishes the slots one ATTACH gave it
    by_vcpu = {v: [r for r in run.reqs if r["vcpu"] == v] for v in (0, 1)}
    assert all(len(reqs) > 100 for reqs in by_vcpu.values()), {v: len(r) for v, r in by_vcpu.items()}
    want = ("pio", 0x10, 1) if kind == "pio" else ("mmio", 0x20000, 1)
    assert {(r["type"], r["addr"], r["size"], r["dir"], r["value"]) for r in run.reqs} == {(*want, "w", 0x41)}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_reset_with_requests_in_flight_on_every_vcpu(daemon_factory, guests, placement) -> None:
    """Four vCPUs loop on port writes; twice the client pauses, resets and restarts
    the VM while requests are in flight (some done by the native loop, some posted
    and abandoned). Each time the guest starts over, the APs are woken again, and
    nothing is lost or logged as an error: with the threads where the scheduler
    puts them, and all of them on one CPU (pinned vCPUs poll there, yielding)."""
    kvm_daemon = daemon_factory(*KVM_DAEMON, *PLACEMENTS[placement])
    g = guests("smppio32", 0x1000)
    run = vm_sample(
        kvm_daemon, "-C", "0xf", "-r", "pm32", "-e", "0x1000", "-g", f"{g.path}@0x1000",
        "-x", "0x10:500:resetregs", "-x", "0x10:1500:resetregs", "-n", "3000",
    )  # fmt: skip
    assert [line for line in run.lines if line == "resetregs"] == ["resetregs", "resetregs"]
    assert 3000 <= len(run.reqs) <= 3003
    last_reset = len(run.lines) - 1 - run.lines[::-1].index("resetregs")
    after = Run(run.lines[last_reset:]).reqs
    assert {r["vcpu"] for r in after} == {0, 1, 2, 3}  # the APs run again after a reset
    assert not [e for e in events(kvm_daemon, "vcpu.crashed")]
    assert not [line for line in kvm_daemon.log().splitlines() if '"level": "error"' in line]


def test_auto_picks_kvm_and_logs_it(daemon_factory) -> None:
    d = daemon_factory()  # --backend auto
    st = json.loads(d.cli("status", "--json").stdout)
    assert st["backend"] == "kvm"
    chosen = events(d, "hypervisor.backend_chosen")
    assert len(chosen) == 1 and chosen[0]["backend"] == "kvm" and chosen[0]["requested"] == "auto"
    assert events(d, "kvm.backend_ready")


@pytest.mark.parametrize("express", ["on", "off", "no-polling"])
def test_the_express_path_serves_the_default_client_and_can_be_turned_off(
    daemon_factory, guests, express
) -> None:
    """Two vCPUs loop on port writes. With the express path (the default) the
    vCPUs dispatch their requests in C and the prefilter answers ATTACH and
    NOTIFY, in a native reader that polls between requests (adaptive, at most
    200 us by default) or, with ``--express-poll-us 0``, never: status shows it
    did, and the VM's request counts are the same figures either way
    (hsm/express.py). With ``--express off`` it is absent and the trio thread
    reads the node."""
    flags = ["--express-poll-us", "0"] if express == "no-polling" else ["--express", express]
    d = daemon_factory("--backend", "kvm", *flags)
    g = guests("smppio32", 0x1000)
    proc = subprocess.Popen(
        [str(build_c("vm_sample")), "-q", "-C", "0x3", "-r", "pm32", "-e", "0x1000",
         "-g", f"{g.path}@0x1000", "-n", "10000000", str(d.node)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        vm: dict[str, Any] = {}
        reader: dict[str, Any] = {}

        def served() -> bool:
            nonlocal vm, reader
            st = json.loads(d.cli("status", "--json").stdout)
            vms, reader = st["hsm"]["vms"], st["reader"]
            vm = vms[0] if vms else {}
            return bool(vm) and vm["counters"]["default"] >= 2000

        wait_until(served, "2000 requests")
    finally:
        proc.kill()
        proc.wait()
    c = vm["counters"]
    assert c["pio"] >= c["default"] >= 2000 and c["notified"] >= 2000
    assert c["stalled"] == c["range"] == c["cf8"] == 0
    x = vm["express"]
    if express == "off":
        assert x is None
        # the trio thread reads the node, polling for the device model's next call
        # (reader_poll): its window opened (a hit, or one that ran out). Whether a window
        # caught a call is timing: 0 hits in 2000 requests happens here in about one
        # run of three, before this session's change too (7303414)
        assert not reader["native"] and reader["poll_max_us"] == 200, reader
        assert reader["poll_hits"] + reader["poll_misses"] > 0, reader
    else:
        assert reader["native"] and reader["answered"] >= c["notified"]
        if express == "on":  # back-to-back requests: the window opened and caught some
            assert reader["poll_max_us"] == 200 and reader["poll_hits"] > 0
        else:
            assert reader["poll_max_us"] == reader["poll_window_us"] == reader["poll_hits"] == 0
        assert x["dispatch"] == 1 and x["attach_refused"] == 0
        # everything went the express way (the two loops make nothing else); the
        # counts are read a few microseconds apart while the vCPUs run on
        assert abs(c["default"] - x["dispatched"]) <= 16 and abs(c["notified"] - x["notified"]) <= 16
        assert x["attaches"] >= c["notified"] // 2
        # and each NOTIFY found its vCPU waiting in its native cycle: the slot freed
        # and the value handed over with it (Hypercalls.notify_waits)
        assert abs(x["handed"] - x["notified"]) <= 16 and x["handed"] >= 2000
    wait_until(lambda: not json.loads(d.cli("status", "--json").stdout)["hsm"]["vms"], "the VM to go")


def test_interrupts_are_answered_natively_and_recorded_in_order(daemon_factory) -> None:
    """At the default log level INJECT_MSI and SET_IRQLINE (the launcher's VALUE_CALL under
    FUSE; under CUSE also the plain call) on a VM's own file are answered by the express
    path through the VM's native interrupt hypercalls (KVM_SIGNAL_MSI, KVM_IRQ_LINE from C).
    The hypervisor's records and the HSM's hypercall log replay every call, in order with
    the calls only Python answers (an MSI outside the LAPIC's range, a GSI above KVM's
    pins, one above ACRN's)."""
    d = daemon_factory("--backend", "kvm")
    fd = os.open(d.node, os.O_RDWR)
    page = mmap.mmap(-1, 4096)  # the request page
    try:
        creation = abi.AcrnVmCreation()
        creation.cpu_affinity = 1
        creation.ioreq_buf = ctypes.addressof(ctypes.c_char.from_buffer(page))
        out = bytearray(bytes(creation))
        fcntl.ioctl(fd, abi.ACRN_IOCTL_CREATE_VM, out)
        vmid = abi.AcrnVmCreation.from_buffer(out).vmid

        def msi(addr: int, data: int) -> int:
            try:
                return fcntl.ioctl(fd, abi.ACRN_IOCTL_INJECT_MSI, bytearray(struct.pack("<QQ", addr, data)), True)
            except OSError as e:
                return -e.errno

        def irqline(gsi: int, op: int) -> int:
            vc = bytearray(bytes(ext.AcrnEmuValueCall(cmd=abi.ACRN_IOCTL_SET_IRQLINE, arg=op << 32 | gsi)))
            fcntl.ioctl(fd, ext.ACRN_EMU_IOCTL_VALUE_CALL, vc)
            return ext.AcrnEmuValueCall.from_buffer(vc).result

        calls = [  # (what, native?, answer)
            (lambda: msi(0xFEE00000, 0x41), True, 0),
            (lambda: irqline(4, abi.IRQ_RAISING_PULSE), True, 0),
            (lambda: msi(0xFED00000, 0x42), False, -errno.EPERM),  # the hypervisor refuses
            (lambda: irqline(30, abi.IRQ_SET_HIGH), False, 0),  # ACRN's vIOAPIC, no KVM pin: recorded
            (lambda: irqline(48, abi.IRQ_SET_HIGH), False, -errno.EPERM),  # ACRN has 48 GSIs
            (lambda: irqline(4, abi.IRQ_SET_HIGH), True, 0),
            (lambda: msi(0xFEE00000, 0x43), True, 0),
        ]
        if d.transport == "cuse":  # the plain call: CUSE passes the value itself
            calls.append((lambda: fcntl.ioctl(fd, abi.ACRN_IOCTL_SET_IRQLINE, abi.IRQ_SET_LOW << 32 | 4), True, 0))
        assert [call() for call, _, _ in calls] == [answer for _, _, answer in calls]
        st = status(d)
        (vm,) = [v for v in st["hsm"]["vms"] if v["vmid"] == vmid]
        natives = sum(1 for _, native, _ in calls if native)
        assert vm["express"]["msi"] + vm["express"]["irqline"] == natives
        log = vm["hypercalls"]
        recent = [(e["call"], e["ret"], e.get("msi_data", e.get("gsi"))) for e in log["recent"]]
        expected = [("inject_msi", 0, 0x41), ("set_irqline", 0, 4), ("inject_msi", -1, 0x42),
                    ("set_irqline", 0, 30), ("set_irqline", -1, 48), ("set_irqline", 0, 4),
                    ("inject_msi", 0, 0x43)]  # fmt: skip
        if d.transport == "cuse":
            expected.append(("set_irqline", 0, 4))
        assert recent[-len(expected):] == expected
        assert log["counts"]["inject_msi"] == {"calls": 3, "failed": 1, "last_ret": 0}
        (hv_vm,) = [v for v in st["hypervisor"]["vms"] if v["vmid"] == vmid]
        assert hv_vm["msi"]["count"] == 2
        assert [m["data"] for m in hv_vm["msi"]["recent"]] == [0x41, 0x43]
        line = hv_vm["irqlines"]["4"]
        assert line["raising_pulse"] == 1 and line["set_high"] == 1
        assert line["level"] == (0 if d.transport == "cuse" else 1)  # the last op's level
        assert hv_vm["irqlines"]["30"]["set_high"] == 1 and "48" not in hv_vm["irqlines"]
    finally:
        os.close(fd)
        page.close()


def test_a_full_native_ring_sends_the_calls_to_python_and_loses_none(daemon_factory) -> None:
    """Between two folds the gate records at most HSM_IRQ_RING calls; the express path
    asks for a fold at half (its eventfd), so a device model's burst goes through C
    without the ring filling, and every call is in the records."""
    d = daemon_factory("--backend", "kvm")
    c = Ctl(d.node)
    vmid = int(c.ok("create 1")["vmid"])
    n = 10000  # > 2 x HSM_IRQ_RING
    for i in range(n):
        c.ok(f"msi 0xfee00000 {i & 0xFF}")
    st = status(d)
    (vm,) = [v for v in st["hsm"]["vms"] if v["vmid"] == vmid]
    assert vm["hypercalls"]["counts"]["inject_msi"]["calls"] == n
    assert [e["msi_data"] for e in vm["hypercalls"]["recent"]] == [i & 0xFF for i in range(n - 32, n)]
    (hv_vm,) = [v for v in st["hypervisor"]["vms"] if v["vmid"] == vmid]
    assert hv_vm["msi"]["count"] == n
    assert vm["express"]["msi"] > n // 2  # most of them natively
    c.close()
