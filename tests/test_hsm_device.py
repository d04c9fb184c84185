"""HsmDevice: the gate, CREATE/DESTROY_VM and their quirks, the ioctl table's errno rows."""

from __future__ import annotations

import errno
import mmap
import struct

import pytest
import structlog
from test_hsm_harness import (
    EPERM,
    Buf,
    VmSetup,
    call,
    creation,
    ctx,
    hypervisor,
    ioctl,
    make_device,
    pause_then_destroy,
    result,
)

from acrn_hsm_emu import abi

ALL_IOCTLS = sorted(abi.IOCTL_NAMES)


@pytest.fixture
def hv_pstate():
    h = hypervisor(pstate_passthrough=True)
    yield h
    h.real.shutdown()

UNKNOWN = [0xDEADBEEF, abi.io(abi.ACRN_IOCTL_TYPE, 0x99), abi.iow(abi.ACRN_IOCTL_TYPE, 0x61, 8), 0]


# -- the gate -------------------------------------------------------------------


async def test_gate_before_create_vm_is_einval_for_everything(hv):
    dev = make_device(hv)
    f = dev.open(ctx())
    for cmd in [c for c in ALL_IOCTLS if c != abi.ACRN_IOCTL_CREATE_VM] + UNKNOWN:
        # a bad pointer must not matter: the gate runs before the argument is read
        assert ioctl(dev, f, cmd, 0x10, b"") == -errno.EINVAL, abi.IOCTL_NAMES.get(cmd, hex(cmd))
    assert hv.calls == []


async def test_unknown_numbers_with_a_vm_are_enotty(hv):
    s = VmSetup(make_device(hv), hv)
    for cmd in UNKNOWN:
        assert s.ioctl(cmd) == -errno.ENOTTY


async def test_compat_callers_get_enotty_for_every_ioctl(hv):
    dev = make_device(hv)
    f = dev.open(ctx())
    page = Buf()
    param = creation(page.addr)
    assert ioctl(dev, f, abi.ACRN_IOCTL_CREATE_VM, page.addr, param, compat=True) == -errno.ENOTTY
    s = VmSetup(dev, hv)
    for cmd in ALL_IOCTLS + UNKNOWN:
        assert s.ioctl(cmd, compat=True) == -errno.ENOTTY
    assert hv.names().count("create_vm") == 1


async def test_each_open_file_has_its_own_vm_and_the_list_is_newest_first(hv):
    dev = make_device(hv)
    a = VmSetup(dev, hv)
    b = VmSetup(dev, hv)
    assert a.vmid != b.vmid
    assert dev.dispatcher.vms == (b.vm, a.vm)
    snap = dev.snapshot()
    assert [v["vmid"] for v in snap["vms"]] == [b.vmid, a.vmid]
    assert snap["open_files"] == 2 and snap["files_with_vm"] == 2
    assert snap["vms"][0]["state"] == "CREATED"  # from the hypervisor's snapshot
    assert [v["id"] for v in snap["vms"][0]["vcpus"]] == [0, 1, 2, 3]
    assert snap["vms"][0]["owner_pid"] == ctx().pid


# -- CREATE_VM ------------------------------------------------------------------


@pytest.mark.parametrize("field", ["reserved0", "reserved1"])
async def test_create_vm_reserved_fields_einval_without_hypercall(hv, field):
    dev = make_device(hv)
    f = dev.open(ctx())
    page = Buf()
    param = creation(page.addr, **{field: 1})
    assert ioctl(dev, f, abi.ACRN_IOCTL_CREATE_VM, page.addr, param) == -errno.EINVAL
    assert hv.calls == []


async def test_create_vm_writes_back_all_48_bytes_and_uses_the_page_containing_ioreq_buf(hv):
    dev = make_device(hv)
    f = dev.open(ctx())
    page = Buf()
    arg = Buf()
    unaligned = page.addr + 0x123
    param = creation(unaligned, vm_flag=0x5, cpu_affinity=0x7, vcpu_num=9)
    arg.put(0, param)
    r = ioctl(dev, f, abi.ACRN_IOCTL_CREATE_VM, arg.addr, param, out_size=48)
    assert result(r) == 0
    out = abi.AcrnVmCreation.from_buffer_copy(r[1])
    assert (out.vmid, out.vcpu_num, out.vm_flag, out.ioreq_buf, out.cpu_affinity) == (1, 3, 5, unaligned, 7)
    assert len(r[1]) == 48
    assert hv.calls[1] == ("set_ioreq_buffer", 1, page.addr)  # page start, no alignment check
    assert f.vm.vcpu_num == 3 and f.vm.page_base == page.addr
    # what the hypervisor got is the caller's struct as given
    assert hv.calls[0] == ("create_vm", param)


async def test_create_vm_refused_by_the_hypervisor_is_einval(hv):
    dev = make_device(hv)
    f = dev.open(ctx())
    page = Buf()
    param = creation(page.addr, cpu_affinity=0x30)  # pCPUs the platform does not have
    assert ioctl(dev, f, abi.ACRN_IOCTL_CREATE_VM, page.addr, param) == -errno.EINVAL
    assert hv.last_return("create_vm") == EPERM
    assert f.vm.vmid == abi.ACRN_INVALID_VMID and "set_ioreq_buffer" not in hv.names()


async def test_create_vm_hypercall_errno_is_hidden_as_einval(hv):
    hv.force["create_vm"] = -errno.ENOSPC
    dev = make_device(hv)
    f = dev.open(ctx())
    page = Buf()
    assert ioctl(dev, f, abi.ACRN_IOCTL_CREATE_VM, page.addr, creation(page.addr)) == -errno.EINVAL
    assert f.vm.vmid == abi.ACRN_INVALID_VMID


async def test_create_vm_invalid_vmid_from_hypervisor_is_failure(hv):
    def create_fails_inside(param):  # ACRN: create_vm() failed, the hypercall still 0
        struct.pack_into("<H", param, 0, 0xFFFF)
        return 0

    hv.force["create_vm"] = create_fails_inside
    dev = make_device(hv)
    f = dev.open(ctx())
    page = Buf()
    assert ioctl(dev, f, abi.ACRN_IOCTL_CREATE_VM, page.addr, creation(page.addr)) == -errno.EINVAL
    assert hv.names() == ["create_vm"]
    assert ioctl(dev, f, abi.ACRN_IOCTL_START_VM) == -errno.EINVAL


@pytest.mark.parametrize("how", ["unmapped", "readonly", "set_ioreq_buffer"])
async def test_create_vm_rollback_destroys_the_new_vm(hv, how):
    dev = make_device(hv)
    f = dev.open(ctx())
    page = Buf()
    arg = Buf()
    param = creation(page.addr)
    arg.put(0, param)
    if how == "unmapped":
        page.unmap()
    elif how == "readonly":
        page.protect(mmap.PROT_READ)
    else:
        hv.force["set_ioreq_buffer"] = -errno.ENOMEM
    assert ioctl(dev, f, abi.ACRN_IOCTL_CREATE_VM, arg.addr, param, out_size=48) == -errno.EINVAL
    assert ("destroy_vm", 1) in hv.calls
    # ACRN destroys only PAUSED VMs, so the rolled-back VM stays behind in the hypervisor
    assert hv.last_return("destroy_vm") == EPERM and hv.live == {1}
    assert f.vm.vmid == abi.ACRN_INVALID_VMID
    assert dev.dispatcher.vms == ()
    assert arg.bytes(0, 48) == param  # nothing written back
    assert ioctl(dev, f, abi.ACRN_IOCTL_PAUSE_VM) == -errno.EINVAL


async def test_create_vm_copy_out_fault_destroys_the_vm_and_gives_efault(hv):
    hv.force["destroy_vm"] = pause_then_destroy(hv)  # a hypervisor that accepts it
    dev = make_device(hv)
    f = dev.open(ctx())
    page = Buf()
    arg = Buf()
    param = creation(page.addr)
    arg.put(0, param)
    arg.protect(mmap.PROT_READ)  # the kernel could copy in, but not back out
    assert ioctl(dev, f, abi.ACRN_IOCTL_CREATE_VM, arg.addr, param, out_size=48) == -errno.EFAULT
    assert hv.names() == ["create_vm", "set_ioreq_buffer", "destroy_vm"]
    assert f.vm.vmid == abi.ACRN_INVALID_VMID
    assert dev.dispatcher.vms == () and hv.live == set()


async def test_create_vm_copy_out_fault_when_hypervisor_refuses_destroy_keeps_the_vm(hv):
    # ACRN destroys only PAUSED VMs: a CREATED one survives the driver's destroy
    dev = make_device(hv)
    f = dev.open(ctx())
    page = Buf()
    arg = Buf()
    param = creation(page.addr)
    arg.protect(mmap.PROT_READ)
    assert ioctl(dev, f, abi.ACRN_IOCTL_CREATE_VM, arg.addr, param, out_size=48) == -errno.EFAULT
    assert hv.last_return("destroy_vm") == EPERM
    assert f.vm.vmid == 1 and dev.dispatcher.vms == (f.vm,)
    assert ioctl(dev, f, abi.ACRN_IOCTL_START_VM) == 0


# -- DESTROY_VM and release -----------------------------------------------------


async def test_destroy_vm_failure_tears_nothing_down(hv):
    s = VmSetup(make_device(hv), hv)
    s.create_client()
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == EPERM  # not PAUSED
    assert s.vm.default_client is not None and s.vm.ioeventfd_client is not None
    assert s.dev.dispatcher.vms == (s.vm,)
    assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == 0  # DESTROYED was cleared on failure
    assert s.dev.dispatcher.vms == ()


async def test_destroy_vm_tears_down_and_returns_the_file_to_the_gate(hv):
    s = VmSetup(make_device(hv), hv)
    s.create_client()
    waiter = s.ioctl(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT)
    assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == 0
    assert await waiter == -errno.ENODEV
    assert hv.live == set()
    assert s.dev.dispatcher.vms == ()
    assert s.vm.page_base is None and s.vm.default_client is None and s.vm.ioeventfd_client is None
    assert s.ioctl(abi.ACRN_IOCTL_START_VM) == -errno.EINVAL
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == -errno.EINVAL  # gate, not the VM
    assert hv.names().count("destroy_vm") == 1


async def test_release_destroys_the_vm(hv):
    dev = make_device(hv)
    s = VmSetup(dev, hv)
    assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0
    dev.release(s.file)
    assert ("destroy_vm", s.vmid) in hv.calls
    assert dev.dispatcher.vms == () and dev.files == set() and hv.live == set()


async def test_release_without_vm_makes_no_hypercall(hv):
    dev = make_device(hv)
    dev.release(dev.open(ctx()))
    assert hv.calls == []


async def test_release_when_destroy_is_refused_keeps_the_vm_listed_and_orphaned(hv):
    dev = make_device(hv)
    dev.release_pauses = False  # the kernel's behaviour, not the emulator's default
    s = VmSetup(dev, hv)
    assert s.ioctl(abi.ACRN_IOCTL_START_VM) == 0  # a running VM cannot be destroyed
    with structlog.testing.capture_logs() as logs:
        dev.release(s.file)
    assert dev.dispatcher.vms == (s.vm,) and s.vm.orphaned
    assert hv.state(s.vmid) == "RUNNING"
    assert any(e["event"] == "hsm.vm_orphaned" for e in logs)


# -- the re-create quirks -------------------------------------------------------


async def test_sticky_destroyed_makes_a_recreated_vm_indestructible(hv):
    dev = make_device(hv)
    s = VmSetup(dev, hv)
    assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == 0
    page = Buf()
    param = creation(page.addr)
    with structlog.testing.capture_logs() as logs:
        r = s.ioctl(abi.ACRN_IOCTL_CREATE_VM, page.addr, param, out_size=48)
    assert result(r) == 0
    assert any(e["event"] == "hsm.quirk.sticky_destroyed" for e in logs)
    vmid2 = s.vm.vmid
    assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == 0
    assert hv.names().count("destroy_vm") == 1  # the second DESTROY did nothing
    assert s.vm.vmid == vmid2 and dev.dispatcher.vms == (s.vm,)
    dev.release(s.file)
    assert hv.names().count("destroy_vm") == 1
    assert dev.dispatcher.vms == (s.vm,) and s.vm.orphaned
    assert vmid2 in hv.live


async def test_sticky_destroyed_is_fixed_without_quirks(hv):
    dev = make_device(hv, quirks=False)
    s = VmSetup(dev, hv)
    assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == 0
    page = Buf()
    assert result(s.ioctl(abi.ACRN_IOCTL_CREATE_VM, page.addr, creation(page.addr), out_size=48)) == 0
    assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_VM) == 0
    assert hv.names().count("destroy_vm") == 2 and dev.dispatcher.vms == ()


async def test_second_create_on_a_live_file_loses_the_first_vm(hv):
    dev = make_device(hv)
    s = VmSetup(dev, hv)
    s.create_client()
    first = s.vmid
    page = Buf()
    with structlog.testing.capture_logs() as logs:
        r = s.ioctl(abi.ACRN_IOCTL_CREATE_VM, page.addr, creation(page.addr), out_size=48)
    assert r == -errno.EINVAL
    assert any(e["event"] == "hsm.quirk.second_create_vm" and e["lost_vmid"] == first for e in logs)
    assert ("destroy_vm", first + 1) in hv.calls  # the new VM is rolled back (ACRN refuses)
    assert first in hv.live  # the original one is orphaned in the hypervisor
    assert s.vm.vmid == abi.ACRN_INVALID_VMID and s.vm.lost_vmid == first
    assert dev.dispatcher.vms == (s.vm,)  # ... and still in the dispatch list
    assert s.vm.range_clients == []  # the client list was re-initialised
    assert s.vm.default_client is not None
    assert s.ioctl(abi.ACRN_IOCTL_START_VM) == -errno.EINVAL
    dev.release(s.file)
    assert s.vm.orphaned and dev.snapshot()["vms"][0]["lost_vmid"] == first


async def test_second_create_refused_by_hypervisor_leaves_the_first_vm(hv):
    dev = make_device(hv)
    s = VmSetup(dev, hv)
    hv.force["create_vm"] = EPERM
    page = Buf()
    assert s.ioctl(abi.ACRN_IOCTL_CREATE_VM, page.addr, creation(page.addr)) == -errno.EINVAL
    assert s.vm.vmid == s.vmid and s.ioctl(abi.ACRN_IOCTL_START_VM) == 0


async def test_second_create_without_quirks_is_refused_up_front(hv):
    dev = make_device(hv, quirks=False)
    s = VmSetup(dev, hv)
    page = Buf()
    assert s.ioctl(abi.ACRN_IOCTL_CREATE_VM, page.addr, creation(page.addr)) == -errno.EINVAL
    assert hv.names().count("create_vm") == 1 and s.vm.vmid == s.vmid


# -- lifecycle and pass-through ioctls ------------------------------------------


@pytest.mark.parametrize(
    "cmd,name",
    [
        (abi.ACRN_IOCTL_START_VM, "start_vm"),
        (abi.ACRN_IOCTL_PAUSE_VM, "pause_vm"),
        (abi.ACRN_IOCTL_RESET_VM, "reset_vm"),
    ],
)
async def test_lifecycle_ioctls_ignore_the_argument_and_return_the_hypercall(hv, cmd, name):
    s = VmSetup(make_device(hv), hv)
    r = s.ioctl(cmd, 0x77)
    assert hv.calls[-1] == (name, s.vmid)
    assert r == hv.last_return(name)
    hv.force[name] = EPERM
    assert s.ioctl(cmd) == EPERM


async def test_lifecycle_follows_the_hypervisors_states(hv):
    s = VmSetup(make_device(hv), hv)
    assert s.ioctl(abi.ACRN_IOCTL_RESET_VM) == EPERM  # only from PAUSED
    assert s.ioctl(abi.ACRN_IOCTL_START_VM) == 0
    assert s.ioctl(abi.ACRN_IOCTL_START_VM) == EPERM
    assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0
    assert s.ioctl(abi.ACRN_IOCTL_PAUSE_VM) == 0  # idempotent
    assert s.ioctl(abi.ACRN_IOCTL_RESET_VM) == 0
    assert hv.state(s.vmid) == "CREATED"


@pytest.mark.parametrize(
    "cmd,name,size",
    [
        (abi.ACRN_IOCTL_INJECT_MSI, "inject_msi", 16),
        (abi.ACRN_IOCTL_SET_PTDEV_INTR, "set_ptdev_intr", 20),
        (abi.ACRN_IOCTL_RESET_PTDEV_INTR, "reset_ptdev_intr", 20),
        (abi.ACRN_IOCTL_ASSIGN_PCIDEV, "assign_pcidev", 36),
        (abi.ACRN_IOCTL_DEASSIGN_PCIDEV, "deassign_pcidev", 36),
        (abi.ACRN_IOCTL_ASSIGN_MMIODEV, "assign_mmiodev", 104),
        (abi.ACRN_IOCTL_DEASSIGN_MMIODEV, "deassign_mmiodev", 104),
        (abi.ACRN_IOCTL_CREATE_VDEV, "create_vdev", 192),
        (abi.ACRN_IOCTL_DESTROY_VDEV, "destroy_vdev", 192),
    ],
)
async def test_opaque_struct_ioctls_pass_the_copy_to_the_hypercall(hv, cmd, name, size):
    s = VmSetup(make_device(hv), hv)
    assert abi.ioc_size(cmd) == size
    data = bytes((i * 7 + 1) & 0xFF for i in range(size))
    r = s.ioctl(cmd, 0x1000, data)
    assert hv.calls[-1] == (name, s.vmid, data)
    assert r == hv.last_return(name)  # whatever the hypervisor said, unchanged
    hv.force[name] = -errno.ENODEV
    assert s.ioctl(cmd, 0x1000, data) == -errno.ENODEV


RESERVED_REGS = [(2, 8), (146, 152), (162, 168), (224, 256), (264, 276)]


@pytest.mark.parametrize("lo,hi", RESERVED_REGS)
async def test_set_vcpu_regs_reserved_bytes_einval(hv, lo, hi):
    s = VmSetup(make_device(hv), hv)
    for off in (lo, hi - 1):
        regs = bytearray(296)
        regs[off] = 1
        assert s.ioctl(abi.ACRN_IOCTL_SET_VCPU_REGS, 0, bytes(regs)) == -errno.EINVAL
    assert "set_vcpu_regs" not in hv.names()


async def test_set_vcpu_regs_passes_everything_else(hv):
    s = VmSetup(make_device(hv), hv)
    regs = bytearray(b"\xaa" * 296)
    for lo, hi in RESERVED_REGS:
        regs[lo:hi] = bytes(hi - lo)
    # the reserved ranges are exactly where the abi says
    r = abi.AcrnVcpuRegs.from_buffer_copy(bytes(regs))
    assert list(r.reserved) == [0, 0, 0] and list(r.vcpu_regs.reserved_64) == [0] * 4
    assert list(r.vcpu_regs.reserved_32) == [0] * 3
    assert list(r.vcpu_regs.gdt.reserved) == [0] * 3 and list(r.vcpu_regs.idt.reserved) == [0] * 3
    assert s.ioctl(abi.ACRN_IOCTL_SET_VCPU_REGS, 0, bytes(regs)) == EPERM  # CR0/CR4 junk
    assert hv.calls[-1] == ("set_vcpu_regs", s.vmid, bytes(regs))
    clean = bytearray(296)
    struct.pack_into("<H", clean, 0, 1)  # vCPU 1
    assert s.ioctl(abi.ACRN_IOCTL_SET_VCPU_REGS, 0, bytes(clean)) == 0


async def test_set_irqline_argument_is_the_value(hv):
    s = VmSetup(make_device(hv), hv)
    value = (2 << 32) | 4
    assert s.ioctl(abi.ACRN_IOCTL_SET_IRQLINE, value, b"") == 0
    assert hv.calls[-1] == ("set_irqline", s.vmid, value)


async def test_vm_intr_monitor_pins_the_page_at_the_argument(hv):
    s = VmSetup(make_device(hv), hv)
    bad = Buf()
    bad.protect(mmap.PROT_READ)
    assert s.ioctl(abi.ACRN_IOCTL_VM_INTR_MONITOR, bad.addr, b"\0" * 8) == -errno.EFAULT
    assert "vm_intr_monitor" not in hv.names()
    page = Buf()
    assert s.ioctl(abi.ACRN_IOCTL_VM_INTR_MONITOR, page.addr + 8, b"\0" * 8) == 0
    assert hv.calls[-1] == ("vm_intr_monitor", s.vmid, page.addr)
    assert s.vm.monitor_page is not None and s.vm.monitor_page.base == page.addr
    hv.force["vm_intr_monitor"] = -errno.EINVAL
    other = Buf()
    assert s.ioctl(abi.ACRN_IOCTL_VM_INTR_MONITOR, other.addr, b"\0" * 8) == -errno.EINVAL
    assert s.vm.monitor_page.base == page.addr  # the old page stays on failure


@pytest.mark.parametrize("typ,index,n", [(0, 0, 8), (1, 2, 48), (2, 0, 8), (3, 1, 32)])
async def test_pm_get_cpu_state_writes_the_result_size(hv_pstate, typ, index, n):
    hv = hv_pstate
    s = VmSetup(make_device(hv), hv)
    buf = Buf()
    buf.put(0, b"\xee" * 64)
    cmd = (s.vmid << 24) | (index << 8) | typ
    expect = bytearray(48)
    assert hv.real.get_cpu_state(cmd, expect) == 0
    r = s.ioctl(abi.ACRN_IOCTL_PM_GET_CPU_STATE, buf.addr, struct.pack("<Q", cmd), out_size=8)
    assert r == (0, bytes(expect[:8]))
    assert hv.calls[-1] == ("get_cpu_state", cmd)
    assert buf.bytes(0, n) == bytes(expect[:n]) and any(expect[:n])
    assert buf.bytes(n, 64 - n) == b"\xee" * (64 - n)


async def test_pm_get_cpu_state_unknown_type_and_failure_write_nothing(hv):
    s = VmSetup(make_device(hv), hv)
    buf = Buf()
    buf.put(0, b"\xee" * 64)
    cmd = s.vmid << 24
    assert s.ioctl(abi.ACRN_IOCTL_PM_GET_CPU_STATE, buf.addr, struct.pack("<Q", cmd | 4), out_size=8) == 0
    assert "get_cpu_state" not in hv.names()
    # no P-state passthrough in this scenario: PX_DATA fails in the hypervisor
    assert s.ioctl(abi.ACRN_IOCTL_PM_GET_CPU_STATE, buf.addr, struct.pack("<Q", cmd | 1), out_size=8) == EPERM
    assert buf.bytes(0, 64) == b"\xee" * 64


async def test_pm_get_cpu_state_copy_out_fault_is_efault(hv):
    s = VmSetup(make_device(hv), hv)
    buf = Buf()
    buf.protect(mmap.PROT_READ)
    cmd = (s.vmid << 24) | 2  # CX_CNT: succeeds in the hypervisor
    assert s.ioctl(abi.ACRN_IOCTL_PM_GET_CPU_STATE, buf.addr, struct.pack("<Q", cmd), out_size=8) == -errno.EFAULT
    assert hv.last_return("get_cpu_state") == 0


# -- ioreq client ioctls ----------------------------------------------------------


async def test_ioreq_client_ioctls(hv):
    s = VmSetup(make_device(hv), hv)
    assert s.ioctl(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT) == -errno.ENODEV
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT) == 0
    assert s.ioctl(abi.ACRN_IOCTL_CREATE_IOREQ_CLIENT) == 0
    assert s.vm.default_client.name == "acrndm"
    assert s.ioctl(abi.ACRN_IOCTL_CREATE_IOREQ_CLIENT) == -errno.EEXIST
    assert s.ioctl(abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT) == 0
    assert s.vm.default_client is None
    assert s.ioctl(abi.ACRN_IOCTL_CREATE_IOREQ_CLIENT) == 0
    assert s.vm.ioeventfd_client.name == f"ioeventfd-{s.vmid}"


async def test_notify_request_finish_rules(hv):
    s = VmSetup(make_device(hv), hv, vcpus=2)
    assert s.notify(0, reserved=1) == -errno.EINVAL
    assert s.notify(0) == 0  # no default client: nothing done
    assert hv.notified == [] and s.state(0) == abi.ACRN_IOREQ_STATE_FREE
    s.create_client()
    assert s.notify(2) == -errno.EINVAL  # vcpu >= vcpu_num
    assert s.notify(0x10001, vmid=0x55) == 0  # truncated to vcpu 1; vmid ignored
    assert hv.notified == [(s.vmid, 1)]
    assert s.state(1) == abi.ACRN_IOREQ_STATE_COMPLETE  # whatever the state was (FREE)
    s.fill(0, abi.ACRN_IOREQ_TYPE_PORTIO, 0, 0x60, 1, polling=1, state=abi.ACRN_IOREQ_STATE_PROCESSING)
    assert s.notify(0) == 0
    assert s.state(0) == abi.ACRN_IOREQ_STATE_COMPLETE and hv.notified == [(s.vmid, 1)]
    hv.force["notify_request_finish"] = -errno.ENOTTY
    assert s.notify(1) == -errno.ENOTTY  # the hypercall's error, unchanged


async def test_clear_vm_ioreq_without_waiting_returns_zero_at_once(hv):
    s = VmSetup(make_device(hv), hv)
    assert s.ioctl(abi.ACRN_IOCTL_CLEAR_VM_IOREQ) == 0
    assert not s.vm.clearing


async def test_ioeventfd_reserved_field_einval(hv):
    s = VmSetup(make_device(hv), hv)
    args = struct.pack("<IIQIIQ", 0, 0, 0x1000, 4, 1, 0)
    assert s.ioctl(abi.ACRN_IOCTL_IOEVENTFD, 0, args) == -errno.EINVAL


async def test_arg_specs_declare_the_by_value_and_oversized_ioctls(hv):
    dev = make_device(hv)
    specs = dev.arg_specs
    assert specs[abi.ACRN_IOCTL_SET_IRQLINE].by_value
    assert specs[abi.ACRN_IOCTL_VM_INTR_MONITOR].by_value
    pm = specs[abi.ACRN_IOCTL_PM_GET_CPU_STATE]
    assert (pm.in_size, pm.out_size) == (8, 48)


async def test_interrupted_answers(hv):
    dev = make_device(hv)
    s = VmSetup(dev, hv)
    assert dev.interrupted(s.file, call(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT)) == 0
    assert dev.interrupted(s.file, call(abi.ACRN_IOCTL_CLEAR_VM_IOREQ)) == 0
    assert dev.interrupted(s.file, call(abi.ACRN_IOCTL_START_VM)) == -errno.EINTR
