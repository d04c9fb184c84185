"""Clients that go away with a request in hand: the VM is torn down, the daemon goes on."""

from __future__ import annotations

import json
import signal

import pytest

from tests.support.ext import daemon_log_events
from tests.support.hsmctl import gone, inject_async, neighbour_works, start_client, stop_clients
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
        stop_clients(good, bad)
    assert good.returncode == 0


def test_too_many_callers_blocked_in_attach_are_refused_and_logged(hsm_daemon):
    """The express path parks at most 256 ATTACH_IOREQ_CLIENT callers per VM
    (the driver parks any number: a bound so that one client cannot hold the
    daemon's memory); the next ones fail with EAGAIN, which the daemon logs
    once per burst with the count, as the Python path logs its own refusals.
    The parked callers stay parked, and the daemon serves other VMs."""
    good, good_vmid = start_client("dm_loop", hsm_daemon.node, "0x1")
    flood, flood_vmid = start_client("hsm_hold", hsm_daemon.node, "flood", "260")
    try:
        assert flood.stdout is not None
        assert flood.stdout.readline().strip() == "refused=4 other_errors=0"

        def logged() -> list[dict]:
            return [e for e in daemon_log_events(hsm_daemon)
                    if e.get("event") == "hsm.attach_refused" and e.get("vmid") == flood_vmid]

        wait_until(lambda: sum(e["refused"] for e in logged()) == 4, "the refusals to be logged")
        assert all(e["limit"] == 256 and e["level"] == "warning" for e in logged())
        st = json.loads(hsm_daemon.cli("status", "--json").stdout)
        vm = next(v for v in st["hsm"]["vms"] if v["vmid"] == flood_vmid)
        assert vm["express"]["waiting"] == 256 and vm["express"]["attach_refused"] == 4
        neighbour_works(hsm_daemon, good_vmid)
    finally:
        stop_clients(good, flood)
    # The killed client's VM goes with its parked callers.
    wait_until(lambda: gone(hsm_daemon, flood_vmid), "the flooding VM is still listed")
