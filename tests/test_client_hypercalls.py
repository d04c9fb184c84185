"""Interrupt, PM and device hypercalls through the node: validated, recorded, in ``status``.

Every ioctl goes through acrn_hsm_emu.client (real ioctls on the node). The
hypervisor's validation decides each result (spec: hv A.1.1); the HSM
records every call per VM (``hypercalls`` in its part of the status) and the
hypervisor shows its resulting state (devices, MSIs, interrupt remappings).
"""

from __future__ import annotations

import ctypes
import errno
import json
import struct

import pytest

from acrn_hsm_emu import abi
from acrn_hsm_emu.client import Page, Vm
from tests.support.ext import Control

pytestmark = pytest.mark.needs_fuse

PHYS = 0x14 << 3  # 00:14.0, a Service-VM device of the default scenario
VIRT = 0x05 << 3  # 00:05.0 in the guest


@pytest.fixture
def hsm_daemon(daemon_factory):
    return daemon_factory("--backend", "scripted")


def expect_errno(err: int, fn, *args) -> None:  # noqa: ANN001
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == err, (fn, e.value)


def pcidev(virt: int = VIRT, phys: int = PHYS) -> abi.AcrnPcidev:
    return abi.AcrnPcidev(type=0, virt_bdf=virt, phys_bdf=phys, intr_line=5, intr_pin=1)


def intx(virt_pin: int, phys_pin: int) -> abi.AcrnPtdevIrq:
    i = abi.AcrnPtdevIrq(type=abi.ACRN_PTDEV_IRQ_INTX, virt_bdf=VIRT, phys_bdf=PHYS)
    i.intx.virt_pin, i.intx.phys_pin = virt_pin, phys_pin
    return i


def test_interrupt_pm_and_device_hypercalls_are_recorded_and_visible(hsm_daemon):
    control = Control(hsm_daemon.control)
    with Vm.create(hsm_daemon.node, cpu_affinity=0x1) as vm:
        node, vmid = vm.node, vm.vmid
        # devices: the hypervisor's checks decide
        node.assign_pcidev(pcidev())
        expect_errno(errno.ENODEV, node.assign_pcidev, pcidev(virt=0x06 << 3))  # phys taken
        node.set_ptdev_intr(intx(5, 16))
        expect_errno(errno.EPERM, node.set_ptdev_intr, intx(60, 16))  # virtual pin >= 48
        mmio = abi.AcrnMmiodev()
        ctypes.memmove(mmio.name, b"tpm", 3)
        mmio.res[0].user_vm_pa, mmio.res[0].service_vm_pa, mmio.res[0].size = 0xFED4_0000, 0xFED4_0000, 0x5000
        node.assign_mmiodev(mmio)
        vdev = abi.AcrnVdev(slot=0x07 << 3)
        vdev.id.fields.vendor, vdev.id.fields.device = 0x1AF4, 0x1110  # ivshmem
        node.create_vdev(vdev)

        # the interrupt monitor page: the hypervisor writes [phys pin, count] pairs into it
        page = Page()
        try:
            struct.pack_into("<II", page.map, 0, abi.INTR_CMD_GET_DATA, 48)
            node.vm_intr_monitor(page)
            buf_cnt = struct.unpack_from("<I", page.map, 4)[0]
            assert buf_cnt == 2 and struct.unpack_from("<QQ", page.map, 8) == (16, 0)

            # P/C states from the scenario (VM CREATED): 3 C-states, no P-state passthrough
            cx_cnt = node.pm_get_cpu_state(vmid << 24 | abi.ACRN_PMCMD_GET_CX_CNT)
            assert struct.unpack("<Q", cx_cnt)[0] == 3
            cx1 = abi.AcrnCstateData.from_buffer_copy(
                node.pm_get_cpu_state(vmid << 24 | 1 << 8 | abi.ACRN_PMCMD_GET_CX_DATA)
            )
            assert (cx1.cx_reg.space_id, cx1.cx_reg.bit_offset, cx1.type, cx1.latency, cx1.power) == (
                0x7F, 2, 1, 1, 1000,
            )  # fmt: skip
            expect_errno(errno.EPERM, node.pm_get_cpu_state, vmid << 24 | abi.ACRN_PMCMD_GET_PX_CNT)

            st = json.loads(hsm_daemon.cli("status", "--json").stdout)
            hv_vm = next(v for v in st["hypervisor"]["vms"] if v["vmid"] == vmid)
            assert hv_vm["pci_devices"][0]["phys_bdf"] in ("00:14.0", PHYS)
            assert len(hv_vm["ptdev_intx"]) == 1 and len(hv_vm["vdevs"]) == 1
            assert len(hv_vm["mmio_devices"]) == 1

            vm.start()
            node.inject_msi(0xFEE0_0000, 0x4031)
            expect_errno(errno.EPERM, node.inject_msi, 0xFED0_0000, 0x31)  # not the LAPIC range
            vm.pause()
            node.destroy_vdev(vdev)
            node.deassign_mmiodev(mmio)
            node.reset_ptdev_intr(intx(5, 16))
            node.deassign_pcidev(pcidev())
        finally:
            page.close()

        rec = control.hsm_vm(vmid)["hypercalls"]
        counts = {k: (v["calls"], v["failed"]) for k, v in rec["counts"].items()}
        assert counts == {
            "assign_pcidev": (2, 1), "set_ptdev_intr": (2, 1), "assign_mmiodev": (1, 0),
            "create_vdev": (1, 0), "vm_intr_monitor": (1, 0), "get_cpu_state": (3, 1),
            "inject_msi": (2, 1), "destroy_vdev": (1, 0), "deassign_mmiodev": (1, 0),
            "reset_ptdev_intr": (1, 0), "deassign_pcidev": (1, 0),
        }  # fmt: skip
        by_call = {}
        for r in rec["recent"]:
            by_call.setdefault(r["call"], []).append(r)
        assert by_call["assign_pcidev"][1] | {"seq": 0} == {
            "seq": 0, "call": "assign_pcidev", "ret": -errno.ENODEV, "source": "ioctl",
            "virt_bdf": "00:06.0", "phys_bdf": "00:14.0", "type": 0,
        }  # fmt: skip
        assert by_call["set_ptdev_intr"][0]["virt_pin"] == 5 and by_call["set_ptdev_intr"][0]["phys_pin"] == 16
        assert by_call["vm_intr_monitor"][0] | {"seq": 0} == {
            "seq": 0, "call": "vm_intr_monitor", "ret": 0, "source": "ioctl",
            "page": page.addr, "cmd": 0, "buf_cnt": 2,
        }  # fmt: skip
        pm = by_call["get_cpu_state"]
        assert [(p["type"], p["state"], p["vmid"], p.get("result")) for p in pm] == [
            (abi.ACRN_PMCMD_GET_CX_CNT, 0, vmid, 3),
            (abi.ACRN_PMCMD_GET_CX_DATA, 1, vmid, bytes(cx1).hex()),
            (abi.ACRN_PMCMD_GET_PX_CNT, 0, vmid, None),
        ]
        assert by_call["create_vdev"][0]["vendor"] == 0x1AF4 and by_call["create_vdev"][0]["slot"] == "00:07.0"
        assert by_call["assign_mmiodev"][0]["dev_name"] == "tpm"
        assert [(m["msi_data"], m["ret"]) for m in by_call["inject_msi"]] == [(0x4031, 0), (0x31, -1)]
        hv_vm = control.hv_vm(vmid)
        assert hv_vm["msi"]["count"] == 1 and hv_vm["pci_devices"] == [] and hv_vm["vdevs"] == []
        # the human-readable status shows the VM; the JSON one has the record whole
        assert f"VM {vmid}" in hsm_daemon.cli("status").stdout


PSTATE_SCENARIO = """
[platform]
pcpus = 2
pstate_passthrough = true

[[platform.pstate]]
core_frequency_mhz = 2400
power_mw = 20000
transition_latency_us = 10
bus_master_latency_us = 10
control = 0x1800
status = 0x1800

[[platform.pstate]]
core_frequency_mhz = 1200
power_mw = 8000
transition_latency_us = 12
bus_master_latency_us = 11
control = 0x0c00
status = 0x0c00

[[vm]]
load_order = "service"
name = "ACRN_Service_VM"
cpu_affinity = 0x3

[[vm]]
load_order = "post"
count = 2
cpu_affinity = 0x1
"""


def test_pm_p_states_come_from_the_scenario(daemon_factory, tmp_path):
    path = tmp_path / "pstates.toml"
    path.write_text(PSTATE_SCENARIO)
    daemon = daemon_factory("--backend", "scripted", "--scenario", str(path))
    with Vm.create(daemon.node) as vm:
        cmd = vm.vmid << 24
        assert struct.unpack("<Q", vm.node.pm_get_cpu_state(cmd | abi.ACRN_PMCMD_GET_PX_CNT))[0] == 2
        # 48 bytes through an ioctl whose encoded size is 8: the HSM writes them itself
        px = abi.AcrnPstateData.from_buffer_copy(
            vm.node.pm_get_cpu_state(cmd | 1 << 8 | abi.ACRN_PMCMD_GET_PX_DATA)
        )
        assert (px.core_frequency, px.power, px.transition_latency, px.bus_master_latency,
                px.control, px.status) == (1200, 8000, 12, 11, 0xC00, 0xC00)  # fmt: skip
        expect_errno(errno.EPERM, vm.node.pm_get_cpu_state, cmd | 2 << 8 | abi.ACRN_PMCMD_GET_PX_DATA)
        assert struct.unpack("<Q", vm.node.pm_get_cpu_state(cmd | abi.ACRN_PMCMD_GET_CX_CNT))[0] == 0
        rec = Control(daemon.control).hsm_vm(vm.vmid)["hypercalls"]
        assert rec["counts"]["get_cpu_state"] == {"calls": 4, "failed": 1, "last_ret": 0}
        assert rec["recent"][1]["result"] == bytes(px).hex()
