"""Guest memory for the kvm backend: the guest-physical map, op coalescing, and how
a client's RAM is reached (shared mapping or private copy).

No /dev/kvm needed. spec: hv A.1.1 (VM_SET_MEMORY_REGIONS), B.1 step 6 (the DM's
memfd RAM).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hsm_harness import Buf, VmSetup, hypervisor, make_device

from acrn_hsm_emu import abi
from acrn_hsm_emu.hypervisor.api import MR_ADD, MR_DEL, MemoryRegionOp
from acrn_hsm_emu.hypervisor.backends import kvm_memory
from acrn_hsm_emu.hypervisor.backends.scripted import ScriptedBackend
from acrn_hsm_emu.hypervisor.hypervisor import Hypervisor
from acrn_hsm_emu.hypervisor.vm import EptMapping, GuestMemoryMap
from acrn_hsm_emu.memory import LocalMemory, RemoteMemory

PAGE = 4096
WB_RWX = abi.ACRN_MEM_TYPE_WB | abi.ACRN_MEM_ACCESS_RWX

# ----- the guest-physical map ------------------------------------------------------------

_op = st.tuples(
    st.sampled_from(["add", "add", "delete"]),
    st.integers(0, 63),  # first page
    st.integers(1, 16),  # pages
    st.integers(0, 7),  # access
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=40))
def test_map_matches_a_page_by_page_model(ops) -> None:
    """Whatever order of adds and deletes: the same pages, attributes and PAs as a
    dict of pages, and find/covers agree with it."""
    m = GuestMemoryMap()
    model: dict[int, tuple[int, int]] = {}  # page -> (service_vm_pa, access)
    for i, (kind, first, n, access) in enumerate(ops):
        base = (i + 1) << 32
        if kind == "add":
            m.add(EptMapping(first * PAGE, n * PAGE, base, access, "WB"))
            for p in range(first, first + n):
                model[p] = (base + (p - first) * PAGE, access)
        else:
            m.delete(first * PAGE, n * PAGE)
            for p in range(first, first + n):
                model.pop(p, None)
    got: dict[int, tuple[int, int]] = {}
    prev_end = -1
    for e in m:
        assert e.size > 0 and e.gpa >= prev_end  # sorted, no overlap
        prev_end = e.end
        for off in range(0, e.size, PAGE):
            got[(e.gpa + off) // PAGE] = (e.service_vm_pa + off, e.access)
    assert got == model
    for p in range(0, 82):
        found = m.find(p * PAGE + 5)
        assert (found is not None) == (p in model)
        if found is not None:
            assert found.service_vm_pa + (p * PAGE - found.gpa) == model[p][0]
    for first, n in ((0, 1), (3, 5), (10, 20), (60, 4), (70, 3)):
        assert m.covers(first * PAGE, n * PAGE) == all(p in model for p in range(first, first + n))


class Recording(ScriptedBackend):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[MemoryRegionOp] = []

    def memory_changed(self, vmid: int, op: MemoryRegionOp) -> None:
        self.ops.append(op)


def _hv() -> tuple[Hypervisor, Recording, int]:
    backend = Recording()
    hv = Hypervisor(backend=backend)
    buf = bytearray(bytes(abi.AcrnVmCreation()))
    assert hv.create_vm(buf) == 0
    return hv, backend, abi.AcrnVmCreation.from_buffer(buf).vmid


def pages(gpa: int, size: int, mem: object, va: int, svc: int = 1 << 40, attr: int = WB_RWX) -> list[MemoryRegionOp]:
    return [
        MemoryRegionOp(MR_ADD, attr, gpa + off, svc + off, PAGE, mem, va + off)  # type: ignore[arg-type]
        for off in range(0, size, PAGE)
    ]


def test_a_2_gib_segment_is_one_mapping_and_one_backend_call() -> None:
    """The HSM sends one op per 4 KiB page; 524288 of them become one EPT entry."""
    hv, backend, vmid = _hv()
    try:
        mem = LocalMemory()
        size = 2 << 30
        assert hv.set_memory_regions(vmid, pages(0, size, mem, 0x7F00_0000_0000)) == 0
        mapped = hv.snapshot()["vms"][0]["memory"]
        assert [(m["gpa"], m["size"], m["host_va"]) for m in mapped] == [(0, size, 0x7F00_0000_0000)]
        assert [(o.user_vm_pa, o.size, o.host_va, o.backing) for o in backend.ops] == [
            (0, size, 0x7F00_0000_0000, mem)
        ]
    finally:
        hv.shutdown()


def test_only_ops_that_continue_each_other_are_merged() -> None:
    hv, backend, vmid = _hv()
    try:
        a, b = LocalMemory(), LocalMemory()
        ops = (
            pages(0, 2 * PAGE, a, 0x10000)
            + pages(2 * PAGE, PAGE, a, 0x90000, svc=(1 << 40) + 2 * PAGE)  # host VA jumps
            + pages(3 * PAGE, PAGE, b, 0x93000, svc=(1 << 40) + 3 * PAGE)  # other memory
            + pages(4 * PAGE, PAGE, b, 0x94000, svc=(1 << 40) + 4 * PAGE, attr=3)  # other attr
            + pages(6 * PAGE, PAGE, b, 0x96000, svc=(1 << 40) + 6 * PAGE)  # guest PA jumps
            + [MemoryRegionOp(MR_DEL, 0, PAGE, 0, PAGE)]
            + pages(7 * PAGE, PAGE, b, 0x97000, svc=(1 << 40) + 7 * PAGE)
            + [MemoryRegionOp(MR_ADD, WB_RWX, 9 * PAGE, 0, 100)]  # bad size: stops here
            + pages(10 * PAGE, PAGE, b, 0xA0000)
        )
        assert hv.set_memory_regions(vmid, ops) == -22
        assert [(o.type, o.user_vm_pa // PAGE, o.size // PAGE) for o in backend.ops] == [
            (MR_ADD, 0, 2), (MR_ADD, 2, 1), (MR_ADD, 3, 1), (MR_ADD, 4, 1), (MR_ADD, 6, 1),
            (MR_DEL, 1, 1), (MR_ADD, 7, 1),
        ]  # fmt: skip
        mapped = [(m["gpa"] // PAGE, m["size"] // PAGE) for m in hv.snapshot()["vms"][0]["memory"]]
        assert mapped == [(0, 1), (2, 1), (3, 1), (4, 1), (6, 1), (7, 1)]  # nothing after the bad op
    finally:
        hv.shutdown()


async def test_set_memseg_of_2_gib_through_the_hsm() -> None:
    hv = hypervisor()
    backend = Recording()
    hv.real.backend = backend
    try:
        s = VmSetup(make_device(hv), hv)
        ram = Buf(2 << 30)  # untouched anonymous memory: costs nothing
        memmap = abi.AcrnVmMemmap(
            type=abi.ACRN_MEMMAP_RAM, attr=7, user_vm_pa=0, vma_base=ram.addr, len=2 << 30
        )
        assert s.ioctl(abi.ACRN_IOCTL_SET_MEMSEG, 0, bytes(memmap)) == 0
        assert len(hv.regions[-1][1]) == 1  # the HSM's batch: one op over the whole range
        assert [(o.user_vm_pa, o.size, o.host_va) for o in backend.ops] == [(0, 2 << 30, ram.addr)]
        assert len(hv.real.snapshot()["vms"][0]["memory"]) == 1
    finally:
        hv.real.shutdown()


# ----- reaching a client's RAM -------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import mmap, os, sys, ctypes
    fd = os.memfd_create("kvm_mem_test")
    os.ftruncate(fd, 3 * 4096)
    shared = mmap.mmap(fd, 3 * 4096, mmap.MAP_SHARED)
    anon_shared = mmap.mmap(-1, 2 * 4096, mmap.MAP_SHARED)
    private = mmap.mmap(-1, 2 * 4096, mmap.MAP_PRIVATE)
    shared[0:4] = b"shrd"; anon_shared[0:4] = b"anon"; private[4096:4100] = b"priv"
    holed = mmap.mmap(-1, 3 * 4096, mmap.MAP_PRIVATE)
    addr = lambda m: ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = ctypes.CDLL(None)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap(addr(holed) + 4096, 4096)
    print(addr(shared), addr(anon_shared), addr(private), addr(holed), flush=True)
    sys.stdin.readline()
    print(bytes(shared[8:12]), bytes(anon_shared[8:12]), bytes(private[8:12]), flush=True)
    """
)


@pytest.fixture
def child():
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    addrs = [int(x) for x in proc.stdout.readline().split()]
    yield proc, addrs
    proc.kill()
    proc.wait()


def test_shared_mappings_are_mapped_shared_and_private_ones_copied(child) -> None:
    proc, (shared, anon_shared, private, _) = child
    mem = RemoteMemory(proc.pid)
    pieces = []
    try:
        for gpa, va, size in ((0, shared, 3 * PAGE), (0x10000, anon_shared, 2 * PAGE), (0x20000, private, 2 * PAGE)):
            got = kvm_memory.resolve(gpa, size, proc.pid, va, False, vmid=1)
            assert len(got) == 1 and (got[0].gpa, got[0].size, got[0].client_va) == (gpa, size, va)
            pieces += got
        assert [p.kind for p in pieces] == ["shared", "shared", "copy"]
        assert "memfd:kvm_mem_test" in pieces[0].desc
        read = lambda p, off, n: (ctypes_buf(p.addr + off, n))  # noqa: E731
        assert read(pieces[0], 0, 4) == b"shrd" and read(pieces[1], 0, 4) == b"anon"
        assert read(pieces[2], PAGE, 4) == bytes(4)  # not filled before START_VM
        assert pieces[2].fill(lambda: False)
        assert read(pieces[2], PAGE, 4) == b"priv"
        for p in pieces:  # the guest writes ...
            write_buf(p.addr + 8, b"gst!")
        assert mem.read(shared + 8, 4) == b"gst!" and mem.read(anon_shared + 8, 4) == b"gst!"
        assert mem.read(private + 8, 4) == bytes(4)  # ... a copy is not seen by the client
        mem.write(shared + 12, b"cli!")  # the client writes: seen through the shared mapping
        assert read(pieces[0], 12, 4) == b"cli!"
        assert pieces[2].fill(lambda: False)  # a new START_VM: copied again, guest writes gone
        assert read(pieces[2], 8, 4) == bytes(4) and read(pieces[2], PAGE, 4) == b"priv"
    finally:
        for p in pieces:
            p.release()
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().split() == ["b'gst!'", "b'gst!'", "b'\\x00\\x00\\x00\\x00'"]


def test_unmapped_client_ranges_are_left_out(child) -> None:
    proc, (_, _, _, holed) = child
    with structlog.testing.capture_logs() as logs:
        got = kvm_memory.resolve(0, 3 * PAGE, proc.pid, holed, False, vmid=1)
    try:
        assert [(p.gpa, p.size, p.kind) for p in got] == [(0, PAGE, "copy"), (2 * PAGE, PAGE, "copy")]
        holes = [(e["gpa"], e["size"]) for e in logs if e["event"] == "kvm.memory_hole"]
        assert holes == [(hex(PAGE), hex(PAGE))]
    finally:
        for p in got:
            p.release()


def test_own_memory_is_used_directly() -> None:
    buf = Buf(2 * PAGE)
    (p,) = kvm_memory.resolve(0, 2 * PAGE, os.getpid(), buf.addr, True, vmid=1)
    assert (p.kind, p.addr, p.readonly, p.unmap) == ("direct", buf.addr, True, None)


def ctypes_buf(addr: int, n: int) -> bytes:
    import ctypes

    return ctypes.string_at(addr, n)


def write_buf(addr: int, data: bytes) -> None:
    import ctypes

    ctypes.memmove(addr, data, len(data))
