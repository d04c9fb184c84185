"""Clients that go away with a request in hand: the VM is torn down, the daemon goes on."""

from __future__ import annotations

import signal

import pytest

from tests.support.hsmctl import gone, inject_async, neighbour_works, start_client
from tests.support.poll import wait_until

pytestmark = pytest.mark.needs_fuse


@pytest.mark.parametrize("how", ["close", "kill"])
def test_owner_gone_mid_request_frees_the_vm_and_spares_others(hsm_daemon, how):
    # A healthy VM next to the one that will fail.
    good, good_vmid = start_client("dm_loop", hsm_daemon.node, "0x1")
    bad, bad_vmid = start_client("hsm_hold", hsm_daemon.node, "close" if how == "close" else "hang")
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
        wait_until(lambda: gone(hsm_daemon, bad_vmid), "the failed VM is still listed")
        # The other VM is served as before.
        neighbour_works(hsm_daemon, good_vmid)
    finally:
        for p in (bad, good):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if p is good else signal.SIGKILL)
                p.communicate(timeout=30)
    assert good.returncode == 0
