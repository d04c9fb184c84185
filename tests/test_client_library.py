"""acrn_hsm_emu.client against the real daemon: a VM owner and range clients in this process.

Guest accesses are injected through the control socket from a worker
thread (the inject waits for the answer, which the serve tasks give).
"""

from __future__ import annotations

import errno
import json
import os

import pytest
import trio

from acrn_hsm_emu.client import (
    MMIO,
    PCI,
    PIO,
    IoRequest,
    NodeFile,
    RangeClient,
    Vm,
    extension,
    pci_bdf,
)
from acrn_hsm_emu.client import extension as ext
from tests.support.ext import Control, daemon_log_events

pytestmark = pytest.mark.needs_fuse


@pytest.fixture
def hsm_daemon(daemon_factory):
    """Guest accesses here come from ``inject``: the scripted backend, whatever ``auto`` picks."""
    return daemon_factory("--backend", "scripted")


async def inject(control: Control, vmid: int, kind: str, write: bool, addr: int, size: int,
                 value: int = 0, vcpu: int = 0) -> int:  # fmt: skip
    return await trio.to_thread.run_sync(
        lambda: control.inject(vmid, kind, write, addr, size, value, vcpu)
    )


async def test_vm_owner_serves_its_default_client_with_an_async_handler(hsm_daemon):
    control = Control(hsm_daemon.control)
    seen: list[IoRequest] = []

    async def handler(req: IoRequest) -> int:
        seen.append(req)
        await trio.sleep(0)  # a real await inside the handler
        return 0x1122334455667788 if req.type == MMIO else 0xABCD

    with Vm.create(hsm_daemon.node, cpu_affinity=0x3, name="lib-test") as vm:
        assert vm.vcpu_num == 2
        ram = vm.map_ram(0x100000, 0x3000)
        ram.write(0x100010, b"guest")
        assert ram.read(0x100010, 5) == b"guest" and ram.size == 0x3000
        async with trio.open_nursery() as nursery:
            await nursery.start(vm.serve, handler)
            vm.start()
            assert await inject(control, vm.vmid, "pio", False, 0x70, 2) == 0xABCD
            assert await inject(control, vm.vmid, "mmio", False, 0xE000_0000, 8, vcpu=1) == 0x1122334455667788
            assert await inject(control, vm.vmid, "mmio", False, 0xE000_0000, 2) == 0x7788  # cut to size
            assert await inject(control, vm.vmid, "pio", True, 0x80, 1, 0x5A) == 0
            assert await inject(control, vm.vmid, "pci", True, 3 << 11 | 2 << 8 | 0x44, 4, 7) == 0
            nursery.cancel_scope.cancel()
        st = control.hsm_vm(vm.vmid)
        assert st["ram_mappings"] == 1 and st["state"] == "RUNNING"
        hv = control.hv_vm(vm.vmid)
        assert hv["name"] == "lib-test"
        mapped = [m for m in hv["memory"] if 0x100000 <= m["gpa"] < 0x103000]
        assert sum(m["size"] for m in mapped) == 0x3000  # one op per page, maybe merged
    assert [(r.vcpu, r.kind, r.write, r.address, r.size) for r in seen[:4]] == [
        (0, "pio", False, 0x70, 2),
        (1, "mmio", False, 0xE000_0000, 8),
        (0, "mmio", False, 0xE000_0000, 2),
        (0, "pio", True, 0x80, 1),
    ]
    assert seen[3].value == 0x5A
    pci = seen[4]
    assert (pci.type, pci.bus, pci.dev, pci.func, pci.reg, pci.value) == (PCI, 0, 3, 2, 0x44, 7)
    assert str(pci) == "vcpu 0 pci 00:03.2 reg 0x44 size 4 write 0x7"
    # closing paused and destroyed the VM
    assert not control.status()["hsm"]["vms"]


async def test_range_clients_from_the_library(hsm_daemon):
    control = Control(hsm_daemon.control)
    owner_seen: list[IoRequest] = []
    with Vm.create(hsm_daemon.node, cpu_affinity=0x1) as vm:
        async with trio.open_nursery() as nursery:
            await nursery.start(vm.serve, lambda r: owner_seen.append(r) or 1)
            vm.start()
            with NodeFile(hsm_daemon.node) as f:
                v = f.ext_version()
                assert v is not None and (v.major, v.minor) == (ext.ACRN_EMU_ABI_MAJOR, ext.ACRN_EMU_ABI_MINOR)
                assert v.features == extension.FEATURES

            dev = RangeClient.open(
                vm.vmid, "libdev", hsm_daemon.node,
                ranges=[("pio", 0x4000, 0x40FF), ("mmio", 0xC100_0000, 0xC100_0FFF)],
            )  # fmt: skip
            dev.add_pci((0, 5, 0), (0, 5, 7))
            assert dev.vcpu_num == 1 and dev.owner_uid == 0
            got: list[IoRequest] = []

            async def dev_handler(req: IoRequest) -> int | None:
                got.append(req)
                return None if req.write else 0xD0 + len(got)

            with dev:
                await nursery.start(dev.serve, dev_handler)
                assert await inject(control, vm.vmid, "pio", False, 0x4010, 1) == 0xD1
                assert await inject(control, vm.vmid, "mmio", True, 0xC100_0008, 4, 9) == 0
                assert await inject(control, vm.vmid, "pci", False, 5 << 11 | 3 << 8 | 0x10, 2) == 0xD3
                assert await inject(control, vm.vmid, "pio", False, 0x40FF, 2) == 1  # not wholly inside
                dev.del_range("pio", 0x4000, 0x40FF)
                assert await inject(control, vm.vmid, "pio", False, 0x4010, 1) == 1
                with pytest.raises(OSError) as e:
                    dev.del_range("pio", 0x4000, 0x40FF)  # not ours any more: from the node
                assert e.value.errno == errno.ENOENT
            # leaving the block destroyed the client; the cancelled serve is gone too
            assert await inject(control, vm.vmid, "mmio", False, 0xC100_0000, 4) == 1
            nursery.cancel_scope.cancel()
    assert [(r.kind, r.write) for r in got] == [("pio", False), ("mmio", True), ("pci", False)]
    assert got[1].value == 9 and (got[2].bus, got[2].dev, got[2].func) == (0, 5, 3)
    assert len(owner_seen) == 3
    events = [e["event"] for e in daemon_log_events(hsm_daemon)]
    assert "hsm.range_client_created" in events and "hsm.range_client_destroyed" in events


async def test_cancelled_serve_then_close_reaps_the_attach_thread(hsm_daemon):
    with Vm.create(hsm_daemon.node, cpu_affinity=0x1) as vm:
        dev = RangeClient.open(vm.vmid, "idle", hsm_daemon.node, ranges=[("pio", 0x10, 0x1F)])
        with trio.move_on_after(0.05):  # cancel a serve that waits in ATTACH (not a timing check)
            await dev.serve(lambda r: 0)
        assert dev._attach_done is not None and not dev._attach_done.is_set()
        done = dev._attach_done
        dev.close()  # destroys the client: the ATTACH in the worker thread returns ENODEV
        assert done.is_set() and dev.node.fd == -1
    assert PIO == 0 and MMIO == 1 and pci_bdf(0, 5, 7) == 0x2F


async def test_library_errors_carry_the_ioctl_errno(hsm_daemon):
    with Vm.create(hsm_daemon.node, cpu_affinity=0x1) as vm:
        with pytest.raises(OSError) as e:
            RangeClient.open(vm.vmid + 5, "nobody-here", hsm_daemon.node)
        assert e.value.errno == errno.ENOENT
        dev = RangeClient.open(vm.vmid, "a", hsm_daemon.node, ranges=[("pio", 0x3F8, 0x3FF)])
        with dev, pytest.raises(OSError) as e:
            RangeClient.open(vm.vmid, "b", hsm_daemon.node, ranges=[("pio", 0x3F8, 0x3F8)])
        assert e.value.errno == errno.EBUSY
        with pytest.raises(OSError) as e:
            RangeClient.open(vm.vmid, "bad\x01name", hsm_daemon.node)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            vm.node.inject_msi(0xFED0_0000, 0x30)  # the hypervisor's -1
        assert e.value.errno == errno.EPERM
        vm.node.set_irqline(4, 0)  # by pointer (VALUE_CALL): FUSE cannot pass the value
        with pytest.raises(OSError) as e:
            vm.node.set_irqline(48, 0)  # the hypervisor's -1
        assert e.value.errno == errno.EPERM
        with NodeFile(hsm_daemon.node) as f:
            with pytest.raises(OSError) as e:
                f.start_vm()
            assert e.value.errno == errno.EINVAL  # the driver's gate: no VM on this file
            with pytest.raises(OSError) as e:
                f.create_range_client("x", 0)
            assert e.value.errno == errno.EINVAL  # not bound
            f.bind_vm(vm.vmid)
            with pytest.raises(OSError) as e:
                f.bind_vm(vm.vmid)
            assert e.value.errno == errno.EBUSY
            with pytest.raises(OSError) as e:
                f.create_range_client("x", 0)  # the page at 0 is not mapped
            assert e.value.errno == errno.EFAULT
            with pytest.raises(OSError) as e:
                f.attach_ioreq_client()  # no range client on this file
            assert e.value.errno == errno.ENODEV
            with pytest.raises(OSError) as e:
                f.pause_vm()
            assert e.value.errno == errno.EPERM
        vm.destroy_ioreq_client()
        vm.pause()
        vm.node.destroy_vm()
        with pytest.raises(OSError) as e:
            vm.node.start_vm()
        assert e.value.errno == errno.EINVAL
    assert os.path.exists(hsm_daemon.node)


QUIET_PROGRAM = """
import sys
from acrn_hsm_emu.client import Vm
with Vm.create(sys.argv[1], cpu_affinity=0x1, name="quiet") as vm:
    print(f"vmid={vm.vmid}")
"""


def test_the_library_is_quiet_unless_the_program_configures_logs(hsm_daemon):
    """A program that never configured structlog sees only its own output (the library's
    debug lines, e.g. client.vm_created, are dropped; warnings would go to stderr)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    p = subprocess.run([sys.executable, "-c", QUIET_PROGRAM, str(hsm_daemon.node)], capture_output=True,
                       text=True, timeout=120, check=False, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("vmid=") and p.stdout.count("\n") == 1, p.stdout
    assert p.stderr == ""


def test_the_example_in_client_md_runs(hsm_daemon, tmp_path):
    """docs/client.md's first block, as written (only the node path changed): it creates a VM,
    serves it, stops at the guest's `out 0x80` (injected here: the scripted backend runs no
    guest code) and destroys the VM on the way out."""
    import re
    import subprocess
    import sys

    from tests.conftest import REPO

    doc = (REPO / "docs" / "client.md").read_text()
    block = re.search(r"```python\n(.*?)```", doc, re.S)
    assert block is not None
    program = tmp_path / "hello_vm.py"
    program.write_text(block.group(1).replace('"/dev/acrn_hsm"', repr(str(hsm_daemon.node))))
    p = subprocess.Popen([sys.executable, str(program)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=REPO)
    assert p.stdout is not None
    vmid = p.stdout.readline().strip().removeprefix("vmid=")
    inj = hsm_daemon.cli("inject", "--vm", vmid, "pio-write", "0x80", "1", "0x41", check=False)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert inj.returncode == 0, inj.stderr
    assert "0x80" in out and err == "", (out, err)
    assert json.loads(hsm_daemon.cli("status", "--json").stdout)["hsm"]["vms"] == []
