"""ioeventfd and irqfd through the real node, with the eventfds in a C client's fd table.

tests/clients/ext_ctl.c owns the VM, runs its default client (counting what
it sees) and holds the eventfds; the daemon reaches them with pidfd_getfd.
Guest writes come from ``inject`` on the control socket.
"""

from __future__ import annotations

import json

import pytest

from acrn_hsm_emu import abi
from tests.support.answers import pci_answer, pio_answer
from tests.support.ext import Control, Ctl, RangeProc
from tests.support.poll import wait_until

pytestmark = pytest.mark.needs_fuse


@pytest.fixture
def hsm_daemon(daemon_factory):
    """Guest accesses here come from ``inject``: the scripted backend, whatever ``auto`` picks."""
    return daemon_factory("--backend", "scripted")

F_PIO = abi.ACRN_IOEVENTFD_FLAG_PIO
F_DATA = abi.ACRN_IOEVENTFD_FLAG_DATAMATCH
F_DEASSIGN = abi.ACRN_IOEVENTFD_FLAG_DEASSIGN
MSI_ADDR = 0xFEE0_0000


def running_vm(node) -> tuple[Ctl, int]:
    owner = Ctl(node)
    vmid = int(owner.ok("create 0x1")["vmid"])
    owner.ok("client")
    owner.ok("start")
    return owner, vmid


def seen(owner: Ctl) -> int:
    return int(owner.ok("seen")["total"])


def count(owner: Ctl, fd: str) -> int:
    return int(owner.ok(f"count {fd}")["value"])


def test_ioeventfd_forward_mode_sends_another_value_to_the_default_client(daemon_factory):
    """``ioeventfd_mismatch = "forward"`` (KVM's rule): a non-matching write goes on
    to the default client instead of being dropped as the kernel HSM drops it."""
    daemon = daemon_factory("--ioeventfd-mismatch", "forward")
    control = Control(daemon.control)
    owner, vmid = running_vm(daemon.node)
    try:
        efd = owner.ok("eventfd")["fd"]
        owner.ok(f"ioeventfd {efd} {F_PIO | F_DATA} 0x1000 2 5")
        assert control.inject(vmid, "pio", True, 0x1000, 2, 5) == 0
        assert count(owner, efd) == 1 and seen(owner) == 0  # the match: signalled, unseen
        assert control.inject(vmid, "pio", True, 0x1000, 2, 6) == 0  # another value
        assert control.inject(vmid, "pio", False, 0x1000, 2) == pio_answer(0x1000, 2)
        assert count(owner, efd) == 0 and seen(owner) == 2  # both reached the default client
    finally:
        owner.close()


@pytest.mark.parametrize("express", ["on", "off"])
def test_ioeventfd_datamatch_signals_and_no_client_sees_it(daemon_factory, express):
    """The driver's ioeventfd client, with the express path (its handler then
    runs in C, in the vCPU's thread: hsm_x_ioeventfd) and without (Python's
    dispatcher): the same signals, answers and counts."""
    hsm_daemon = daemon_factory("--backend", "scripted", "--express", express)
    control = Control(hsm_daemon.control)
    owner, vmid = running_vm(hsm_daemon.node)
    try:
        efd = owner.ok("eventfd")["fd"]
        owner.ok(f"ioeventfd {efd} {F_PIO | F_DATA} 0x1000 2 5")
        assert control.hsm_vm(vmid)["ioeventfds"] == 1

        # the datamatch write: signalled, completed, nobody saw it
        assert control.inject(vmid, "pio", True, 0x1000, 2, 5) == 0
        assert count(owner, efd) == 1 and seen(owner) == 0
        for _ in range(3):
            control.inject(vmid, "pio", True, 0x1000, 2, 5)
        assert count(owner, efd) == 3 and seen(owner) == 0

        # the spec's rule (hsm 7): every other access inside the range is the
        # ioeventfd client's too, and signals nothing
        assert control.inject(vmid, "pio", True, 0x1000, 2, 6) == 0  # another value
        assert control.inject(vmid, "pio", True, 0x1001, 1, 5) == 0  # not at the start
        assert control.inject(vmid, "pio", False, 0x1000, 2) == 0  # reads answer 0
        assert count(owner, efd) == 0 and seen(owner) == 0
        # accesses not wholly inside the range go to the default client, whatever the value
        assert control.inject(vmid, "pio", True, 0x1000, 4, 5) == 0
        assert control.inject(vmid, "pio", True, 0x0FFF, 2, 5) == 0
        assert control.inject(vmid, "pio", False, 0x1002, 2) == pio_answer(0x1002, 2)
        assert count(owner, efd) == 0 and seen(owner) == 3

        # MMIO, wildcard: any value at the address signals
        mfd = owner.ok("eventfd")["fd"]
        owner.ok(f"ioeventfd {mfd} 0 0xd0000000 4 0")
        control.inject(vmid, "mmio", True, 0xD000_0000, 4, 0x1234)
        control.inject(vmid, "mmio", True, 0xD000_0000, 2, 0x99)  # length >= access size
        assert count(owner, mfd) == 2 and seen(owner) == 3

        # deassign stops the signalling; the accesses reach the default client again
        owner.ok(f"ioeventfd {efd} {F_PIO | F_DEASSIGN} 0 0 0")
        assert control.inject(vmid, "pio", True, 0x1000, 2, 5) == 0
        assert control.inject(vmid, "pio", True, 0x1000, 2, 6) == 0
        assert count(owner, efd) == 0 and seen(owner) == 5
        owner.ok(f"ioeventfd {mfd} {F_DEASSIGN} 0 0 0")
        control.inject(vmid, "mmio", True, 0xD000_0000, 4, 1)
        assert count(owner, mfd) == 0 and seen(owner) == 6
        vm = control.hsm_vm(vmid)
        assert vm["ioeventfds"] == 0
        ioeventfd_client = next(c for c in vm["clients"] if c["name"] == f"ioeventfd-{vmid}")
        assert ioeventfd_client["ranges"] == [] and ioeventfd_client["in_daemon"]
        # 4 + 3 + 2: every access the ioeventfd client took, counted once either way
        assert vm["counters"]["in_kernel"] == vm["counters"]["range"] == 9
        assert vm["counters"]["default"] == 6
        if express == "on":
            assert vm["express"]["ioeventfd"] == 9  # all of them ran in C
        else:
            assert vm["express"] is None
    finally:
        owner.close()


def test_ioeventfd_errno_rows_of_the_spec(hsm_daemon):
    """spec: hsm 7 (assign/deassign checks, in order) and hsm 4 (reserved, the gate)."""
    fresh = Ctl(hsm_daemon.node)
    owner, _vmid = running_vm(hsm_daemon.node)
    try:
        e = fresh.ok("eventfd")["fd"]
        assert fresh.err(f"ioeventfd {e} 0 0x1000 4 0") == "EINVAL"  # no VM on this file yet

        efd = owner.ok("eventfd")["fd"]
        other = owner.ok("eventfd")["fd"]
        pipe = owner.ok("pipe")["fd"]
        rows = [
            (f"{efd} 0 0x1000 4 0 1", "EINVAL"),  # reserved != 0
            (f"{efd} 0 0xffffffffffffffff 1 0", "EINVAL"),  # addr + len wraps
            ("999 0 0xfffffffffffffff8 8 0", "EINVAL"),  # wrap is checked before the fd
            (f"{efd} 0 0x1000 0 0", "EINVAL"),  # len not 1, 2, 4, 8
            (f"{efd} 0 0x1000 3 0", "EINVAL"),
            ("999 0 0x1000 16 0", "EINVAL"),  # len is checked before the fd
            ("999 0 0x1000 4 0", "EBADF"),  # fd not open in the caller
            ("0xffffffff 0 0x1000 4 0", "EBADF"),
            (f"{pipe} 0 0x1000 4 0", "EINVAL"),  # not an eventfd
            (f"{efd} 0 0xfffffffffffffff8 4 0", None),  # ends just below 2**64
            (f"{efd} 0 0x2000 4 0", None),
            (f"{efd} 0 0x2000 8 0", "EEXIST"),  # same eventfd and address: length not compared
            (f"{efd} {F_DATA} 0x2000 4 7", "EEXIST"),  # one side wildcard
            (f"{other} 0 0x2000 4 0", None),  # another eventfd on the same address
            (f"{efd} {F_PIO} 0x2000 4 0", None),  # another type
            (f"{efd} {F_DATA} 0x3000 4 1", None),
            (f"{efd} {F_DATA} 0x3000 4 2", None),  # different data
            (f"{efd} {F_DATA} 0x3000 4 1", "EEXIST"),
            (f"{efd} 0 0x3000 4 0", "EEXIST"),  # new one wildcard
            (f"{efd} 0x80 0x4000 4 0", None),  # unknown flag bits ignored
            (f"999 {F_DEASSIGN} 0 0 0", "EBADF"),
            (f"{pipe} {F_DEASSIGN} 0 0 0", "EINVAL"),
        ]
        problems = []
        for args, want in rows:
            answer = owner.cmd(f"ioeventfd {args}")
            got = None if answer == "ok" else answer.split()[1]
            if got != want:
                problems.append(f"ioeventfd {args}: {got or 'ok'}, want {want or 'ok'}")
        assert not problems, "\n".join(problems)

        unused = owner.ok("eventfd")["fd"]
        owner.ok(f"ioeventfd {unused} {F_DEASSIGN} 0 0 0")  # nothing to remove: still 0
        owner.ok(f"ioeventfd {efd} {F_DEASSIGN} 0 0 0")  # removes the first entry of that eventfd
        assert Control(hsm_daemon.control).status()["hsm"]["vms"][0]["ioeventfds"] == 6  # 7 assigned, 1 removed
    finally:
        owner.close()
        fresh.close()


def msis(control: Control, vmid: int) -> list[tuple[int, int]]:
    return [(m["addr"], m["data"]) for m in control.hv_vm(vmid)["msi"]["recent"]]


def test_irqfd_signals_inject_msis_visible_in_status(hsm_daemon):
    control = Control(hsm_daemon.control)
    owner, vmid = running_vm(hsm_daemon.node)
    try:
        efd = owner.ok("eventfd")["fd"]
        owner.ok(f"irqfd {efd} 0 {MSI_ADDR} 0x31")
        assert control.hsm_vm(vmid)["irqfds"] == 1
        owner.ok(f"signal {efd} 3")
        wait_until(lambda: control.hv_vm(vmid)["msi"]["count"] == 3, "3 MSIs from 3 signals")
        assert msis(control, vmid) == [(MSI_ADDR, 0x31)] * 3
        record = control.hsm_vm(vmid)["hypercalls"]
        assert record["counts"]["inject_msi"] == {"calls": 3, "failed": 0, "last_ret": 0}
        assert record["recent"][-1] == {
            "seq": 3, "call": "inject_msi", "ret": 0, "source": "irqfd",
            "msi_addr": MSI_ADDR, "msi_data": 0x31, "vector": 0x31,
        }  # fmt: skip

        # the driver's errno rows (spec: hsm 8)
        pipe = owner.ok("pipe")["fd"]
        assert owner.err(f"irqfd {efd} 0 {MSI_ADDR} 0x32") == "EBUSY"  # same eventfd
        assert owner.err(f"irqfd 999 0 {MSI_ADDR} 0x32") == "EBADF"
        assert owner.err(f"irqfd -1 0 {MSI_ADDR} 0x32") == "EBADF"
        assert owner.err(f"irqfd {pipe} 0 {MSI_ADDR} 0x32") == "EINVAL"
        assert owner.err("irqfd 999 1 0 0") == "EBADF"
        unused = owner.ok("eventfd")["fd"]
        owner.ok(f"irqfd {unused} 1 0 0")  # deassigning what is not there: 0

        # a second irqfd; the first deassigned stops injecting (its counter is no longer read)
        second = owner.ok("eventfd")["fd"]
        owner.ok(f"irqfd {second} 0 {MSI_ADDR} 0x32")
        owner.ok(f"irqfd {efd} 1 0 0")
        owner.ok(f"signal {efd} 2")
        owner.ok(f"signal {second} 1")
        wait_until(lambda: (MSI_ADDR, 0x32) in msis(control, vmid), "the second irqfd's MSI")
        assert msis(control, vmid).count((MSI_ADDR, 0x31)) == 3
        assert count(owner, efd) == 2  # nobody consumed the deassigned one's signals
        assert control.hsm_vm(vmid)["irqfds"] == 1

        # an MSI the guest's hypervisor refuses (not 0xFEExxxxx) is only logged, recorded as failed
        bad = owner.ok("eventfd")["fd"]
        owner.ok(f"irqfd {bad} 0 0xfed00000 0x40")
        owner.ok(f"signal {bad} 1")
        wait_until(
            lambda: control.hsm_vm(vmid)["hypercalls"]["counts"]["inject_msi"]["failed"] == 1,
            "the refused injection recorded",
        )
    finally:
        owner.close()
    assert not Control(hsm_daemon.control).status()["hsm"]["vms"]  # irqfds shut down with the VM


def test_irqfd_and_ioeventfd_of_a_bound_file_go_with_it(hsm_daemon):
    """A range-client process may assign its own eventfds; they go when its file closes."""
    control = Control(hsm_daemon.control)
    owner, vmid = running_vm(hsm_daemon.node)
    dev = Ctl(hsm_daemon.node)
    try:
        dev.ok(f"bind {vmid}")
        dev.ok("rc virtio")
        dev.ok("range pio 0x6000 0x601f")
        kick, irq = dev.ok("eventfd")["fd"], dev.ok("eventfd")["fd"]
        dev.ok(f"ioeventfd {kick} {F_PIO | F_DATA} 0x6010 2 0")
        dev.ok(f"irqfd {irq} 0 {MSI_ADDR} 0x41")
        assert control.inject(vmid, "pio", True, 0x6010, 2, 0) == 0
        assert count(dev, kick) == 1  # the ioeventfd is matched before the range client
        dev.ok(f"signal {irq} 1")
        wait_until(lambda: (MSI_ADDR, 0x41) in msis(control, vmid), "the bound file's MSI")
        assert dev.err("create 0x1") == "EBUSY" and dev.err("pause") == "EPERM"
        assert dev.err("destroy") == "EPERM"
        vm = control.hsm_vm(vmid)
        assert vm["ioeventfds"] == 1 and vm["irqfds"] == 1
        assert vm["bound_files"] == [{"pid": dev.pid, "uid": 0, "client": "virtio"}]
    finally:
        dev.close()
    vm = control.hsm_vm(vmid)
    assert vm["ioeventfds"] == 0 and vm["irqfds"] == 0 and vm["bound_files"] == []
    assert control.inject(vmid, "pio", True, 0x6010, 2, 0) == 0 and seen(owner) == 1
    owner.close()


def test_range_client_serves_beside_ioeventfds_and_pci_ranges(hsm_daemon):
    control = Control(hsm_daemon.control)
    owner, vmid = running_vm(hsm_daemon.node)
    rp = None
    try:
        rp = RangeProc(hsm_daemon.node, vmid, "pcidev", "--tag", "0xff00", "pci:0x18-0x18")
        assert rp.ok
        # bus 0 dev 3 fn 0 is the range client's, fn 1 is not
        key = 3 << 11 | 0x10
        assert control.inject(vmid, "pci", False, key, 4) == pci_answer(0, 3, 0, 0x10, 4) ^ 0xFF00
        assert control.inject(vmid, "pci", False, key | 1 << 8, 4) == pci_answer(0, 3, 1, 0x10, 4)
        assert control.inject(vmid, "pci", True, key | 4, 2, 0x7) == 0
        stats, done = rp.stop()
        assert done["pci"] == "2" and done["writes"] == "1" and stats["outside"] == "0"
        assert seen(owner) == 1
    finally:
        if rp is not None:
            rp.kill()
        owner.close()


@pytest.mark.parametrize("express", ["on", "off"])
def test_ioeventfds_come_and_go_while_a_vcpu_writes_and_nothing_is_lost(daemon_factory, tmp_path, express):
    """A vCPU writes port 0x500 in a loop while an ioeventfd on it is assigned
    and deassigned, 25 times. While assigned, its eventfd counts writes and
    the device model sees none; once DEASSIGN has returned, it is never
    signalled again (on the express path C lets go of the entry before the
    daemon closes its duplicate). Every request is counted once, by the
    default client or by the ioeventfd client, and the daemon serves on."""
    wl = tmp_path / "loop.json"
    steps = [{"op": "pio", "port": 0x500, "size": 4, "write": True, "value": 7}]
    wl.write_text(json.dumps({"vcpu": [{"id": 0, "repeat": 0, "steps": steps}]}))
    daemon = daemon_factory("--backend", "scripted", "--workload", str(wl), "--express", express)
    control = Control(daemon.control)
    owner, vmid = running_vm(daemon.node)
    try:
        for _ in range(25):
            efd = owner.ok("eventfd")["fd"]
            owner.ok(f"ioeventfd {efd} {F_PIO | F_DATA} 0x500 4 7")
            wait_until(lambda efd=efd: count(owner, efd) > 0, "the ioeventfd to be signalled")
            owner.ok(f"ioeventfd {efd} {F_PIO | F_DEASSIGN} 0 0 0")
            count(owner, efd)  # drain what came before the deassign
            before = seen(owner)
            wait_until(lambda n=before + 20: seen(owner) >= n, "the device model to see the writes again")
            assert count(owner, efd) == 0  # nothing after DEASSIGN returned
            owner.ok(f"closefd {efd}")
        owner.ok("pause")
        c = control.hsm_vm(vmid)["counters"]
        assert c["pio"] == c["default"] + c["range"] and c["range"] == c["in_kernel"] > 0
        assert c["stalled"] == c["orphaned"] == 0
        assert control.hsm_vm(vmid)["ioeventfds"] == 0
    finally:
        owner.close()
    errors = [ln for ln in daemon.log().splitlines() if '"level": "error"' in ln or "Traceback" in ln]
    assert errors == []  # an exiting owner included (hsm.vm_owner_exiting is info)
