"""The express path (C: hsm_x_route in native/express_dispatch.c) and the Python
dispatcher (hsm/ioreq.py) decide the same thing: where a vCPU's request goes.

A table of requests goes through both, on the clients of one VM: the Python
dispatcher runs a pass over the VM; C gets the VM's rules from
``express.configure``, as the daemon's ``express.sync`` gives them, and its post
is called with the same request. While the rules let the vCPUs dispatch, C
must take exactly the plain PIO/MMIO requests that Python gives to the default
client or to the ioeventfd client's handler, and give each to the same one;
everything else it leaves to Python. Otherwise it takes nothing.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_hsm_harness import MMIO, PCI, PIO, RD, WR, Buf, VmSetup, make_device

from acrn_hsm_emu import abi
from acrn_hsm_emu._native import ffi, lib
from acrn_hsm_emu.hsm import express
from acrn_hsm_emu.hsm.ioreq import range_add

FREE = abi.ACRN_IOREQ_STATE_FREE
U64 = (1 << 64) - 1

PIO_ADDRS = [0x0, 0x60, 0xCF8, 0xCF9, 0xCFB, 0xCFC, 0xCFD, 0xCFF, 0xD00, 0xFFF, 0x1000, 0x1002,
             0x1003, 0x1004, 0x10FF, 0x1100, 0xFFFF]  # fmt: skip
MMIO_ADDRS = [0x0, 0xCF8, 0xFFF, 0x1000, 0x1004, 0x1007, 0x1008, 0xFFF8, U64 - 3, U64]
REQUESTS = [
    *((PIO, a, n, d) for a, n, d in itertools.product(PIO_ADDRS, (1, 2, 4), (RD, WR))),
    *((MMIO, a, n, d) for a, n, d in itertools.product(MMIO_ADDRS, (1, 2, 4, 8), (RD, WR))),
    (PCI, 0x0, 4, RD),
    (7, 0x1000, 4, WR),  # a type the HSM does not know
]

IOEVENTFD_RANGES = [(PIO, 0x1000, 0x1003), (MMIO, 0x1000, 0x1007), (PIO, 0xCFC, 0xCFF)]


def configure(s: VmSetup, config: str, other_calls: list[int]) -> None:
    """The VM's clients for one column of the table."""
    vm = s.vm
    if config != "no default client":
        s.create_client()
    if config != "default only":
        assert vm.ioeventfd_client is not None
        for t, lo, hi in IOEVENTFD_RANGES:
            range_add(vm.ioeventfd_client, t, lo, hi)
    if config == "another client first":
        def other(*args: int) -> int:
            other_calls.append(1)
            return 0

        c = s.dev.dispatcher.client_create(vm, "other", False, other)  # searched before ioeventfd's
        range_add(c, PIO, 0x1000, 0x10FF)
        range_add(c, MMIO, 0x0, 0xFFF)
    if config == "clearing":
        vm.clearing = True


def python_decides(s: VmSetup, typ: int, addr: int, size: int, direction: int, other_calls: list[int]) -> str:
    """Where the Python pass sent the request: "default", "ioeventfd" or "python"
    (anything C does not do: another client, CF8/CFC, clearing, no client)."""
    vm = s.vm
    before, calls = vm.counters.as_dict(), len(other_calls)
    s.fill(0, typ, direction, addr, size, 0x8000_1000, polling=1)  # a CF8 write enables CFC
    s.dev.dispatcher.run_pass()
    after = vm.counters.as_dict()
    for client in (vm.default_client, vm.ioeventfd_client):
        if client is not None:
            client.clear_bit(0)
    s.page.put_u32(s.slot_off(0) + abi.SLOT_PROCESSED, FREE)
    plain = typ in (PIO, MMIO) and after["cf8"] == before["cf8"] and after["pci"] == before["pci"]
    if plain and after["default"] == before["default"] + 1:
        return "default"
    if plain and after["in_kernel"] == before["in_kernel"] + 1 and len(other_calls) == calls:
        return "ioeventfd"
    return "python"


class CPath:
    """One VM's express path in C, its rules from the Python VM."""

    def __init__(self, vm: Any) -> None:
        self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.page = Buf()
        self.x = ffi.new("struct hsm_xvm *")
        lib.hsm_x_init(self.x, self.sock[0].fileno(), 7, os.getpid(), self.page.addr, 2)
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        self.waits = ffi.new("struct hsm_vcpu_wait[2]")
        assert lib.hsm_x_set_wake_fds(self.x, fds, [self.waits + 0, self.waits + 1], 2) == 0  # C owns the fds
        lib.hsm_x_set_default(self.x, 1 if vm.default_client is not None else 0)
        self.keep = (express.set_ioeventfds(self.x, vm), express.configure(self.x, vm))

    def decides(self, typ: int, addr: int, size: int, direction: int) -> str:
        head = bytearray(128)
        struct.pack_into("<II", head, 0, typ, 1)  # type, completion_polling (no wake-up)
        struct.pack_into("<IIQQQ", head, 64, direction, 0, addr, size, 0x8000_1000)
        defaults, in_kernel = self.x.defaults, self.x.in_kernel
        r = lib.hsm_x_post(self.x, os.getpid(), self.page.addr, ffi.from_buffer(head))
        lib.hsm_x_bits(self.x, 0, U64)
        assert r in (0, 1), r
        if r == 0:
            return "python"
        if self.x.defaults == defaults + 1:
            return "default"
        assert self.x.in_kernel == in_kernel + 1
        return "ioeventfd"

    def close(self) -> None:
        lib.hsm_x_close(self.x)
        for s in self.sock:
            s.close()


# What the Python pass does with the table's requests, by column: C must match it.
COLUMNS = {
    "default only": {"default", "python"},
    "ioeventfd ranges": {"default", "ioeventfd", "python"},
    "another client first": {"default", "ioeventfd", "python"},
    "no default client": {"ioeventfd", "python"},  # C's dispatch is off: it takes nothing
    "clearing": {"python"},
}


@pytest.fixture(params=list(COLUMNS))
async def paths(
    hv: Any, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[str, VmSetup, CPath, list[int]]]:
    s = VmSetup(make_device(hv), hv, vcpus=2)
    other_calls: list[int] = []
    configure(s, request.param, other_calls)
    c = CPath(s.vm)
    yield request.param, s, c, other_calls
    c.close()


async def test_c_and_python_send_every_request_to_the_same_place(paths):
    column, s, c, other_calls = paths
    table = {req: (python_decides(s, *req, other_calls), c.decides(*req)) for req in REQUESTS}
    assert {p for p, _ in table.values()} == COLUMNS[column]  # the table is not vacuous
    assert bool(c.x.dispatch) == (column not in ("no default client", "clearing"))
    if c.x.dispatch:
        differ = {req: d for req, d in table.items() if d[0] != d[1]}
        assert differ == {}, f"(type, addr, size, dir): (python, c) {differ}"
    else:  # no default client, or clearing
        assert {c_says for _, c_says in table.values()} == {"python"}
