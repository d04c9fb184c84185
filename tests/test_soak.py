"""Load and soak: 16 VMs x 2 vCPUs, one acrn-dm-style client process each.

Counts are compared per vCPU on both sides (the hypervisor's accesses and
mismatches, dm_loop's handled counts): nothing lost, nothing handled twice,
every read answered right. The daemon's RSS and open fds are sampled before
the VMs exist and after they are gone. ``SOAK_REQUESTS`` sets the total
(``make soak`` runs 1,000,000; the suite runs 50,000).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess

import pytest

from acrn_hsm_emu.hypervisor.workload import Workload
from tests.support.cbuild import build_c
from tests.test_ioreq_flow import mixed_program, wait_workload_done

pytestmark = pytest.mark.needs_fuse

VMS = 16
VCPUS = 2
TOTAL = int(os.environ.get("SOAK_REQUESTS", "50000"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_soak_16_vms_2_vcpus(daemon_factory, tmp_path):
    per_vcpu = TOTAL // (VMS * VCPUS)
    rng = random.Random(1234)
    programs = {v: mixed_program(rng, per_vcpu)[0] for v in range(VCPUS)}
    expected = {"pio": 0, "mmio": 0, "pci": 0}
    for steps in programs.values():
        for s in steps:
            assert s.access is not None
            expected[s.access.kind] += 1
    path = tmp_path / "workload.json"
    path.write_text(json.dumps(Workload.build(programs, name="soak").to_dict()))
    daemon = daemon_factory("--workload", str(path), "--log-level", "warning")
    pid = daemon.proc.pid
    rss0, fds0 = rss_kib(pid), fd_count(pid)

    dm = build_c("dm_loop")
    clients: list[tuple[subprocess.Popen[str], int]] = []
    try:
        for _ in range(VMS):
            p = subprocess.Popen([str(dm), str(daemon.node), "0x3"], stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None
            header = dict(kv.split("=") for kv in p.stdout.readline().split())
            assert int(header["vcpu_num"]) == VCPUS, header
            clients.append((p, int(header["vmid"])))
        rss_busy = rss_kib(pid)
        vms = {vmid: wait_workload_done(daemon, vmid, timeout=3600) for _, vmid in clients}
    finally:
        outs = []
        for p, _ in clients:
            p.send_signal(signal.SIGTERM)
            outs.append(p.communicate(timeout=120)[0])
    lost = dup = 0
    for (p, vmid), out in zip(clients, outs, strict=True):
        assert p.returncode == 0, out
        handled = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split()[1:])
        for v in vms[vmid]["vcpus"]:
            assert v["mismatches"] == 0, (vmid, v)
            n = int(handled[f"vcpu{v['id']}"])
            lost += max(0, per_vcpu - n)
            dup += max(0, n - per_vcpu)
            assert v["accesses"] == per_vcpu, (vmid, v)
        for kind in ("pio", "mmio", "pci"):
            assert int(handled[kind]) == expected[kind], (vmid, kind, handled)
    st = json.loads(daemon.cli("status", "--json").stdout)
    assert st["hsm"]["vms"] == [] and st["hypervisor"]["vms"] == []
    rss1, fds1 = rss_kib(pid), fd_count(pid)
    print(
        f"soak: requests={per_vcpu * VMS * VCPUS} lost={lost} duplicated={dup} "
        f"rss_kib start={rss0} busy={rss_busy} end={rss1} fds start={fds0} end={fds1}"
    )
    assert lost == 0 and dup == 0
    assert fds1 == fds0, "file descriptors leaked"
    # Generous on purpose (allocator slack), but a per-request leak would blow it.
    assert rss1 < rss0 + 64 * 1024, f"RSS grew from {rss0} to {rss1} KiB"
