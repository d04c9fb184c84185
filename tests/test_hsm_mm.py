"""SET_MEMSEG / UNSET_MEMSEG: RAM pinning checks, the 4 KiB op batch, the 256-slot table."""

from __future__ import annotations

import errno
import mmap
import struct

import pytest
from test_hsm_harness import EPERM, Buf, HvProxy, VmSetup, creation, make_device

from acrn_hsm_emu import abi
from acrn_hsm_emu.hsm.mm import FAKE_PA_BASE
from acrn_hsm_emu.hypervisor.api import MR_ADD, MR_DEL

RAM = abi.ACRN_MEMMAP_RAM
MMIO = abi.ACRN_MEMMAP_MMIO
WB = abi.ACRN_MEM_TYPE_WB
UC = abi.ACRN_MEM_TYPE_UC


def memmap(typ: int, attr: int, gpa: int, host: int, length: int) -> bytes:
    return struct.pack("<IIQQQ", typ, attr, gpa, host, length)


def setup(hv: HvProxy) -> tuple[HvProxy, VmSetup]:
    return hv, VmSetup(make_device(hv), hv)


def set_memseg(s: VmSetup, *a: int) -> int:
    return s.ioctl(abi.ACRN_IOCTL_SET_MEMSEG, 0, memmap(*a))


def unset_memseg(s: VmSetup, *a: int) -> int:
    return s.ioctl(abi.ACRN_IOCTL_UNSET_MEMSEG, 0, memmap(*a))


async def test_ram_is_one_op_over_its_whole_pages(hv):
    hv, s = setup(hv)
    ram = Buf(4 * 4096)
    ram.put(4096, b"guest")
    # len is truncated to pages; vma_base is used from its page start; attr keeps RWX only
    assert set_memseg(s, RAM, 0xFFFF_FFFF, 0x10_0000, ram.addr + 5, 3 * 4096 + 100) == 0
    vmid, ops = hv.regions[-1]
    assert vmid == s.vmid and len(ops) == 1
    (op,) = ops
    assert op.type == MR_ADD
    assert op.attr == WB | 7
    assert op.user_vm_pa == 0x10_0000
    assert op.size == 3 * 4096
    assert op.host_va == ram.addr
    assert op.backing is not None and op.backing.pid == s.file.ctx.pid
    assert op.service_vm_pa >= FAKE_PA_BASE
    assert op.backing.read(op.host_va + 4096, 5) == b"guest"  # the hypervisor can reach the bytes
    assert s.vm.regions_mapping_count == 1 and s.vm.ram_mappings[0].size == 3 * 4096 + 100


async def test_fake_physical_addresses_never_overlap(hv):
    hv, s = setup(hv)
    ram = Buf(2 * 4096)
    assert set_memseg(s, RAM, 3, 0, ram.addr, 2 * 4096) == 0
    assert set_memseg(s, RAM, 3, 0x10000, ram.addr, 4096) == 0
    other = VmSetup(s.dev, hv)
    assert set_memseg(other, RAM, 3, 0, ram.addr, 4096) == 0
    assert [vmid for vmid, _ in hv.regions] == [s.vmid, s.vmid, other.vmid]
    spans = sorted((op.service_vm_pa, op.service_vm_pa + op.size) for _, ops in hv.regions for op in ops)
    assert len(spans) == 3
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))


@pytest.mark.parametrize("length", [0, 1, 4095])
async def test_ram_shorter_than_a_page_is_einval(hv, length):
    hv, s = setup(hv)
    ram = Buf()
    assert set_memseg(s, RAM, 3, 0, ram.addr, length) == -errno.EINVAL
    assert "set_memory_regions" not in hv.names()


async def test_ram_length_is_kept_in_an_int_by_the_driver(hv):
    hv, s = setup(hv)
    ram = Buf()
    assert set_memseg(s, RAM, 3, 0, ram.addr, 1 << 44) == -errno.EINVAL  # 2**32 pages -> 0
    assert set_memseg(s, RAM, 3, 0, ram.addr, 1 << 43) == -errno.ENOMEM  # negative count


@pytest.mark.parametrize("how", ["unmapped", "readonly", "readonly_tail", "hole"])
async def test_ram_not_mapped_writable_is_efault(hv, how):
    hv, s = setup(hv)
    ram = Buf(4 * 4096)
    if how == "unmapped":
        ram.unmap()
    elif how == "readonly":
        ram.protect(mmap.PROT_READ)
    elif how == "readonly_tail":
        ram.protect(mmap.PROT_READ, 3 * 4096, 4096)
    else:
        ram.unmap(2 * 4096, 4096)
    assert set_memseg(s, RAM, 3, 0, ram.addr, 4 * 4096) == -errno.EFAULT
    assert s.vm.regions_mapping_count == 0 and "set_memory_regions" not in hv.names()
    if how in ("readonly_tail", "hole"):  # the part before the bad page is fine
        assert set_memseg(s, RAM, 3, 0, ram.addr, 2 * 4096) == 0


async def test_256_ram_mappings_then_enomem(hv):
    hv, s = setup(hv)
    ram = Buf()
    for i in range(256):
        assert set_memseg(s, RAM, 3, i * 4096, ram.addr, 4096) == 0, i
    assert set_memseg(s, RAM, 3, 0x100_0000, ram.addr, 4096) == -errno.ENOMEM
    assert len(hv.regions) == 256
    # MMIO does not use the table
    assert set_memseg(s, MMIO, 3, 0xF000_0000, 0xE000_0000, 4096) == 0
    # a bad range still reports EFAULT first (pinning precedes the slot check)
    assert set_memseg(s, RAM, 3, 0, 0x10, 4096) == -errno.EFAULT


async def test_ram_hypercall_failure_releases_the_slot(hv):
    hv, s = setup(hv)
    ram = Buf()
    hv.force["set_memory_regions"] = EPERM
    assert set_memseg(s, RAM, 3, 0, ram.addr, 4096) == EPERM
    assert s.vm.regions_mapping_count == 0 and s.vm.ram_mappings == []


async def test_mapping_count_survives_destroy_and_recreate(hv):
    hv, s = setup(hv)
    ram = Buf()
    for i in range(200):
        assert set_memseg(s, RAM, 3, i * 4096, ram.addr, 4096) == 0
    assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == 0
    assert s.vm.ram_mappings == []
    page = Buf()
    assert s.ioctl(abi.ACRN_IOCTL_CREATE_VM, page.addr, creation(page.addr), out_size=48)[0] == 0
    for i in range(56):
        assert set_memseg(s, RAM, 3, i * 4096, ram.addr, 4096) == 0
    assert set_memseg(s, RAM, 3, 0, ram.addr, 4096) == -errno.ENOMEM


async def test_mmio_is_one_uncached_op(hv):
    hv, s = setup(hv)
    assert set_memseg(s, MMIO, 0xFFFF_FFFF, 0xF000_0000, 0xE000_1000, 0x2000) == 0
    (vmid, (op,)) = hv.regions[-1]
    assert (op.type, op.attr, op.user_vm_pa, op.service_vm_pa, op.size) == (
        MR_ADD, UC | 7, 0xF000_0000, 0xE000_1000, 0x2000,
    )  # fmt: skip
    assert op.backing is None
    # no alignment check in the driver: the hypervisor's answer comes back unchanged
    assert set_memseg(s, MMIO, 1, 0xF000_0000, 0xE000_1234, 0x1801) == -errno.EINVAL
    assert hv.regions[-1][1][0].size == 0x1801


async def test_other_memmap_types_are_einval(hv):
    hv, s = setup(hv)
    assert set_memseg(s, 2, 3, 0, 0, 4096) == -errno.EINVAL
    assert unset_memseg(s, 2, 3, 0, 0, 4096) == -errno.EINVAL
    assert "set_memory_regions" not in hv.names()


async def test_unset_memseg_of_nothing_is_the_hypervisors_call(hv):
    hv, s = setup(hv)
    assert unset_memseg(s, MMIO, 0, 0xF000_0000, 0, 0x1000) == -errno.EINVAL  # not mapped
    assert hv.calls[-1] == ("set_memory_regions", s.vmid, 1)


async def test_unset_memseg_mmio_deletes_and_ram_cannot_be_unset(hv):
    hv, s = setup(hv)
    ram = Buf()
    assert set_memseg(s, RAM, 3, 0, ram.addr, 4096) == 0
    assert unset_memseg(s, RAM, 3, 0, ram.addr, 4096) == -errno.EINVAL
    assert set_memseg(s, MMIO, 3, 0xF000_0000, 0xE000_0000, 0x2000) == 0
    assert unset_memseg(s, MMIO, 7, 0xF000_0000, 0x1234, 0x2000) == 0
    (vmid, (op,)) = hv.regions[-1]
    assert (op.type, op.attr, op.user_vm_pa, op.service_vm_pa, op.size) == (MR_DEL, 0, 0xF000_0000, 0, 0x2000)
