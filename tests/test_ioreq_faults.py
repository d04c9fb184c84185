"""Clients that go away with a request in hand: the VM is torn down, the daemon goes on."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.support.answers import pio_answer
from tests.support.cbuild import build_c

pytestmark = pytest.mark.needs_fuse


def start(client: str, node, *args: str) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen([client, str(node), *args], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    header = dict(kv.split("=") for kv in p.stdout.readline().split())
    return p, int(header["vmid"])


def inject_async(daemon, vmid: int, *access: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [daemon.args[0], "inject", "--control", str(daemon.control), "--vm", str(vmid), *access],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def status(daemon) -> dict:
    return json.loads(daemon.cli("status", "--json").stdout)


def wait_until(pred, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout  # hang guard only
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["close", "kill"])
def test_owner_gone_mid_request_frees_the_vm_and_spares_others(hsm_daemon, how):
    hold = str(build_c("hsm_hold"))
    dm = str(build_c("dm_loop"))
    # A healthy VM next to the one that will fail.
    good, good_vmid = start(dm, hsm_daemon.node, "0x1")
    bad, bad_vmid = start(hold, hsm_daemon.node, "close" if how == "close" else "hang")
    try:
        pending = inject_async(hsm_daemon, bad_vmid, "pio-read", "0x60", "1")
        assert bad.stdout is not None
        assert bad.stdout.readline().strip() == "holding vcpu=0"
        if how == "close":
            assert bad.stdout.readline().strip() == "closed"
        else:
            bad.send_signal(signal.SIGKILL)
            bad.wait(timeout=30)
        # The vCPU's access is abandoned, never answered with a made-up value.
        out, err = pending.communicate(timeout=60)
        assert pending.returncode == 1, (out, err)
        # The VM is gone from the HSM and the hypervisor; its vCPU threads stopped.
        wait_until(
            lambda: all(v["vmid"] != bad_vmid for v in status(hsm_daemon)["hsm"]["vms"]),
            "the failed VM is still listed",
        )
        hv_vms = status(hsm_daemon)["hypervisor"]["vms"]
        assert all(v["vmid"] != bad_vmid for v in hv_vms)
        # The other VM is served as before.
        out = hsm_daemon.cli("inject", "--vm", str(good_vmid), "pio-read", "0x70", "1").stdout
        assert out.strip() == f"{pio_answer(0x70, 1):#x}"
    finally:
        for p in (bad, good):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if p is good else signal.SIGKILL)
                p.communicate(timeout=30)
    assert good.returncode == 0
