"""irqfd into a real guest: with the KVM backend, an eventfd signal becomes the guest's interrupt.

The VM's owner is this test, through acrn_hsm_emu.client (create, RAM,
registers, default client). tests/clients/ext_irqfd_guest.S enables its
local APIC, reports "ready" on port 0x50 and halts; its handler for vector
0x41 writes the vector to port 0x51. The eventfd lives in this process; the
daemon takes it with pidfd_getfd.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest
import trio

from acrn_hsm_emu import abi
from acrn_hsm_emu.client import IoRequest, Vm
from acrn_hsm_emu.hypervisor.backends import BACKENDS

pytestmark = [
    pytest.mark.needs_fuse,
    pytest.mark.needs_kvm,
    pytest.mark.skipif("kvm" not in BACKENDS, reason="the KVM vCPU backend is not available"),
]

GUEST = pathlib.Path(__file__).resolve().parent / "clients" / "ext_irqfd_guest.S"
LOAD = 0x1000
MSI_ADDR = 0xFEE0_0000  # LAPIC of APIC id 0, physical destination
VECTOR = 0x41


def build_guest(tmp: pathlib.Path) -> tuple[bytes, dict[str, int]]:
    obj, elf, out = tmp / "g.o", tmp / "g.elf", tmp / "g.bin"
    subprocess.run(["as", "--32", "-o", str(obj), str(GUEST)], check=True)
    subprocess.run(
        ["ld", "-m", "elf_i386", "-Ttext", hex(LOAD), "-e", "_start", "-o", str(elf), str(obj)],
        check=True,
    )
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(elf), str(out)], check=True)
    nm = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    symbols = {p[2]: int(p[0], 16) for p in (line.split() for line in nm.splitlines()) if len(p) == 3}
    return out.read_bytes(), symbols


def protected_mode_regs(sym: dict[str, int]) -> abi.AcrnVcpuRegs:
    r = abi.AcrnVcpuRegs()
    g = r.vcpu_regs
    g.cr0 = 0x11  # PE, ET
    g.rflags = 0x2
    g.rip = sym["_start"]
    g.cs_sel, g.cs_base, g.cs_limit, g.cs_ar = 0x10, 0, 0xFFFFFFFF, 0xC09B
    g.ss_sel = g.ds_sel = g.es_sel = g.fs_sel = g.gs_sel = 0x18
    g.gdt.base, g.gdt.limit = sym["gdt"], sym["gdt_end"] - sym["gdt"] - 1
    g.idt.base, g.idt.limit = sym["idt"], sym["idt_end"] - sym["idt"] - 1
    return r


async def test_irqfd_signal_is_received_by_a_kvm_guest(daemon_factory, tmp_path):
    image, sym = build_guest(tmp_path)
    daemon = daemon_factory("--backend", "kvm")
    ready = trio.Event()
    vectors: list[int] = []
    got_interrupt = trio.Event()

    def handler(req: IoRequest) -> int:
        if req.kind == "pio" and req.write and req.address == 0x50:
            ready.set()
        elif req.kind == "pio" and req.write and req.address == 0x51:
            vectors.append(req.value & 0xFF)
            got_interrupt.set()
        return 0

    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        with Vm.create(daemon.node, cpu_affinity=0x1) as vm:
            vm.map_ram(0, 0x10000).write(LOAD, image)
            vm.set_vcpu_regs(protected_mode_regs(sym))
            async with trio.open_nursery() as nursery:
                await nursery.start(vm.serve, handler)
                vm.start()
                with trio.fail_after(60):  # hang guard
                    await ready.wait()
                vm.node.irqfd(efd, MSI_ADDR, VECTOR)
                os.eventfd_write(efd, 1)
                with trio.fail_after(60):  # hang guard
                    await got_interrupt.wait()
                nursery.cancel_scope.cancel()
            assert vectors == [VECTOR]
            st = await trio.to_thread.run_sync(lambda: daemon.cli("status", "--json").stdout)
            hv_vm = next(v for v in json.loads(st)["hypervisor"]["vms"] if v["vmid"] == vm.vmid)
            assert hv_vm["msi"]["count"] == 1
    finally:
        os.close(efd)
