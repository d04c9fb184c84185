"""Guest memory segments: SET_MEMSEG / UNSET_MEMSEG (``mm.c``).

RAM is "pinned" by checking the caller's range is mapped and writable, the
way GUP would fail, then described to the hypervisor page by page: one
4 KiB ``MemoryRegionOp`` per page, with a synthesised, stable fake host
physical address and the real location (caller's memory, virtual address)
so the hypervisor can reach the bytes (spec: hsm 5, 13 "Memory").
"""

from __future__ import annotations

import errno
import struct

import structlog

from acrn_hsm_emu import abi
from acrn_hsm_emu.hsm.acrn_drv import Memory, RamMapping, Vm
from acrn_hsm_emu.hsm.ioreq import Dispatcher
from acrn_hsm_emu.hypervisor.api import MR_ADD, MR_DEL, MemoryRegionOp
from acrn_hsm_emu.memory import PAGE_SIZE, MemoryFault, RemoteMemory
from acrn_hsm_emu.observe.trace import refuse

log = structlog.get_logger("acrn_hsm_emu.hsm")

PAGE_SHIFT = 12
MAPPING_MAX = abi.ACRN_MEM_MAPPING_MAX
_MEMMAP = struct.Struct("<IIQQQ")  # type, attr, user_vm_pa, service_vm_pa|vma_base, len

# Fake "physical" addresses handed out for pinned RAM start here (1 TiB), well
# above anything a test machine has, and only grow: a mapping keeps its range
# for its whole life and no two mappings share one.
FAKE_PA_BASE = 1 << 40


class FakePhysAllocator:
    """Hands out fake, page-granular, never-reused host physical ranges."""

    def __init__(self, base: int = FAKE_PA_BASE) -> None:
        self.next = base

    def alloc(self, npages: int) -> int:
        pa = self.next
        self.next += npages << PAGE_SHIFT
        return pa


def check_range_writable(mem: Memory, start: int, length: int) -> None:
    """Fail with MemoryFault where pinning [start, start+length) writable would fail.

    For another process this reads /proc/PID/maps (mapped, contiguous, 'w'),
    which costs nothing per page and does not touch the bytes; other memory
    implementations are asked directly.
    """
    if not isinstance(mem, RemoteMemory):
        mem.check_writable(start, length)
        return
    end = start + length
    cur = start
    try:
        with open(f"/proc/{mem.pid}/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                span, perms, _ = line.split(" ", 2)
                lo_s, hi_s = span.split("-")
                hi = int(hi_s, 16)
                if hi <= cur:
                    continue
                if int(lo_s, 16) > cur or perms[1] != "w":
                    break
                cur = hi
                if cur >= end:
                    return
    except OSError as e:
        raise MemoryFault(e.errno or errno.EFAULT, f"maps of pid {mem.pid}: {e}") from e
    raise MemoryFault(errno.EFAULT, f"{length:#x} bytes at {start:#x} in pid {mem.pid} are not all mapped writable")


def memseg_map(d: Dispatcher, vm: Vm, pid: int, pa: FakePhysAllocator, args: bytes) -> int:
    """acrn_vm_memseg_map."""
    typ, attr, user_vm_pa, host, length = _MEMMAP.unpack_from(args)
    if typ == abi.ACRN_MEMMAP_RAM:
        return _ram_map(d, vm, pid, pa, attr, user_vm_pa, host, length)
    if typ != abi.ACRN_MEMMAP_MMIO:
        return refuse(errno.EINVAL, "type={}: neither ACRN_MEMMAP_RAM nor ACRN_MEMMAP_MMIO", typ)
    op = MemoryRegionOp(
        type=MR_ADD,
        attr=abi.ACRN_MEM_TYPE_UC | (attr & abi.ACRN_MEM_ACCESS_RIGHT_MASK),
        user_vm_pa=user_vm_pa,
        service_vm_pa=host,
        size=length,
    )
    return d.hv.set_memory_regions(vm.vmid, [op])


def memseg_unmap(d: Dispatcher, vm: Vm, args: bytes) -> int:
    """acrn_vm_memseg_unmap: MMIO only; RAM cannot be unmapped."""
    typ, _attr, user_vm_pa, _host, length = _MEMMAP.unpack_from(args)
    if typ != abi.ACRN_MEMMAP_MMIO:
        return refuse(errno.EINVAL, "type={}: only MMIO can be unmapped", typ)
    op = MemoryRegionOp(type=MR_DEL, attr=0, user_vm_pa=user_vm_pa, service_vm_pa=0, size=length)
    return d.hv.set_memory_regions(vm.vmid, [op])


def _ram_map(
    d: Dispatcher, vm: Vm, pid: int, pa: FakePhysAllocator,
    attr: int, user_vm_pa: int, vma_base: int, length: int,
) -> int:  # fmt: skip
    """acrn_vm_ram_map, the pinned-pages path (the VM_PFNMAP path is not reproduced)."""
    nr_pages = (length >> PAGE_SHIFT) & 0xFFFFFFFF  # the driver keeps it in an int
    if nr_pages >= 1 << 31:
        nr_pages -= 1 << 32
    if nr_pages == 0:
        return refuse(errno.EINVAL, "len={:#x}: less than one page", length)
    if nr_pages < 0:  # the page array allocation fails
        return refuse(errno.ENOMEM, "len={:#x}: the page count does not fit the driver's int", length)
    start = vma_base & ~(PAGE_SIZE - 1)
    mem = d.memory(pid)
    try:
        check_range_writable(mem, start, nr_pages << PAGE_SHIFT)
    except MemoryFault as e:
        log.debug("hsm.ram_pin_failed", vmid=vm.vmid, pid=pid, error=str(e))
        return refuse(errno.EFAULT, "vma_base={:#x} len={:#x}: cannot pin the pages ({})",
                      start, nr_pages << PAGE_SHIFT, e)
    if vm.regions_mapping_count >= MAPPING_MAX:
        log.warning("hsm.memseg_slots_exhausted", vmid=vm.vmid, max=MAPPING_MAX)
        return refuse(errno.ENOMEM, "the VM has {} RAM mappings, the driver's most", MAPPING_MAX)
    service_vm_pa = pa.alloc(nr_pages)
    mapping = RamMapping(user_vm_pa, length, start, nr_pages, service_vm_pa, mem)
    vm.ram_mappings.append(mapping)
    vm.regions_mapping_count += 1
    op_attr = abi.ACRN_MEM_TYPE_WB | (attr & abi.ACRN_MEM_ACCESS_RIGHT_MASK)
    # The driver emits one op per page, or per huge page where the pages are
    # compound. Our fake host addresses are contiguous over the whole range, as
    # if it were one compound page, so one op says the same thing to the
    # hypervisor and keeps a 2 GiB SET_MEMSEG from costing 524,288 objects.
    ops = [MemoryRegionOp(MR_ADD, op_attr, user_vm_pa, service_vm_pa, nr_pages << PAGE_SHIFT, mem, start)]
    ret = d.hv.set_memory_regions(vm.vmid, ops)
    if ret < 0:
        vm.regions_mapping_count -= 1
        vm.ram_mappings.remove(mapping)
        log.debug("hsm.ram_map_refused", vmid=vm.vmid, ret=ret)
        return ret
    log.debug("hsm.ram_mapped", vmid=vm.vmid, **mapping.snapshot())
    return 0
