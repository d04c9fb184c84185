"""The I/O request flow end to end: scripted guest accesses, the HSM, an acrn-dm-style C client.

tests/clients/dm_loop.c plays acrn-dm (CREATE_VM with a static page,
CREATE_IOREQ_CLIENT, START_VM, ATTACH / scan / handle / NOTIFY) and answers
every read with a value derived from the request (tests/support/answers.py).
The workload carries those values as expectations, so a request answered
wrongly, lost or delivered twice shows up in the counts on one side or the
other.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import pytest

from acrn_hsm_emu.hypervisor.vm import VPIC_PORTS
from acrn_hsm_emu.hypervisor.workload import Step, Workload
from tests.support.answers import mmio_answer, pci_answer, pio_answer
from tests.support.cbuild import build_c
from tests.support.hsmctl import PLACEMENTS

pytestmark = pytest.mark.needs_fuse

PCI_FOLDED = {0xCF8, 0xCF9, 0xCFA, 0xCFB, 0xCFC, 0xCFD, 0xCFE, 0xCFF}
# Ports the hypervisor answers itself (vPIC, ELCR): they never reach the Service VM.
RESERVED = PCI_FOLDED | set(VPIC_PORTS)


def mixed_program(rng: random.Random, n: int) -> tuple[list[Step], dict[str, int]]:
    steps: list[Step] = []
    counts = {"pio": 0, "mmio": 0, "pci": 0}
    for _ in range(n):
        kind = rng.choice(("pio", "mmio", "pci"))
        write = rng.random() < 0.4
        if kind == "pio":
            size = rng.choice((1, 2, 4))
            port = rng.randrange(0, 0x10000 - 4)
            while port in RESERVED or port + size - 1 in RESERVED:
                port = rng.randrange(0, 0x10000 - 4)
            value = rng.randrange(1 << (8 * size))
            steps.append(
                Step.pio(port, size, write=True, value=value)
                if write
                else Step.pio(port, size, expect=pio_answer(port, size))
            )
        elif kind == "mmio":
            size = rng.choice((1, 2, 4, 8))
            gpa = rng.randrange(0xE0000000, 0xFFFFF000)
            value = rng.randrange(1 << (8 * size))
            steps.append(
                Step.mmio(gpa, size, write=True, value=value)
                if write
                else Step.mmio(gpa, size, expect=mmio_answer(gpa, size))
            )
        else:
            size = rng.choice((1, 2, 4))
            bus, dev, fn = rng.randrange(4), rng.randrange(32), rng.randrange(8)
            reg = rng.randrange(0, 0x1000 if rng.random() < 0.2 else 0x100, size)
            value = rng.randrange(1 << (8 * size))
            steps.append(
                Step.pci(bus, dev, fn, reg, size, write=True, value=value)
                if write
                else Step.pci(bus, dev, fn, reg, size, expect=pci_answer(bus, dev, fn, reg, size))
            )
        counts[kind] += 1
    return steps, counts


def vm_status(daemon, vmid: int) -> dict:
    st = json.loads(daemon.cli("status", "--json").stdout)
    return next(v for v in st["hypervisor"]["vms"] if v["vmid"] == vmid)


def wait_workload_done(daemon, vmid: int, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout  # hang guard only
    while time.monotonic() < deadline:
        vm = vm_status(daemon, vmid)
        if vm["fault"]:
            raise AssertionError(f"VM faulted: {vm['fault']}")
        if vm["vcpus"] and all(v["workload_done"] for v in vm["vcpus"]):
            return vm
        time.sleep(0.2)
    raise TimeoutError(f"workload not done: {vm_status(daemon, vmid)['vcpus']}")


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_dm_style_client_serves_10000_mixed_accesses_over_2_vcpus(daemon_factory, tmp_path, placement):
    rng = random.Random(20261121)
    per_vcpu = 5000
    programs, totals = {}, {"pio": 0, "mmio": 0, "pci": 0}
    for vcpu in (0, 1):
        steps, counts = mixed_program(rng, per_vcpu)
        programs[vcpu] = steps
        for k, v in counts.items():
            totals[k] += v
    workload = Workload.build(programs, name="mixed-10k")
    path = tmp_path / "workload.json"
    path.write_text(json.dumps(workload.to_dict()))
    daemon = daemon_factory("--workload", str(path), *PLACEMENTS[placement])

    dm = subprocess.Popen(
        [str(build_c("dm_loop")), str(daemon.node), "0x3"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert dm.stdout is not None
        header = dict(kv.split("=") for kv in dm.stdout.readline().split())
        vmid, vcpu_num = int(header["vmid"]), int(header["vcpu_num"])
        assert vcpu_num == 2
        vm = wait_workload_done(daemon, vmid)
    finally:
        dm.send_signal(signal.SIGTERM)
        out, _ = dm.communicate(timeout=60)
    assert dm.returncode == 0, out
    handled = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split()[1:])
    stats = dict(kv.split("=") for kv in out.strip().splitlines()[-2].split()[1:])

    # The guest side: every access performed once, every read got the client's answer.
    for v in vm["vcpus"]:
        assert v["accesses"] == per_vcpu, v
        assert v["mismatches"] == 0, v
    # The client side: each request handled exactly once, by type.
    assert int(handled["total"]) == 2 * per_vcpu
    assert int(handled["pio"]) == totals["pio"]
    assert int(handled["mmio"]) == totals["mmio"]
    assert int(handled["pci"]) == totals["pci"]
    assert int(handled["vcpu0"]) == per_vcpu and int(handled["vcpu1"]) == per_vcpu
    assert stats["attach_end"] == "ENODEV"
    assert int(stats["notify_errors"]) == 0 and int(stats["bad_type"]) == 0

    # The HSM folded every PCI access: CF8 latched in the daemon, CFC became PCICFG.
    st = json.loads(daemon.cli("status", "--json").stdout)
    assert not st["hsm"]["vms"], "the VM is gone after the client destroyed it"
