"""Driving a test daemon from outside: C clients, async injections, status polling."""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

from tests.support.answers import pio_answer
from tests.support.cbuild import build_c

# The daemon's flags for where its threads run: the scheduler's choice, or all of
# them on CPU 0 (--service-cpus and --vcpu-cpus), where the vCPUs, the node's
# reader and the device model take turns on one CPU and every hand-off is a
# context switch (pinned vCPUs poll there, yielding).
PLACEMENTS: dict[str, list[str]] = {"free": [], "one-cpu": ["--service-cpus", "0", "--vcpu-cpus", "0"]}


def start_client(client: str, node: object, *args: str) -> tuple[subprocess.Popen[str], int]:
    """Start a tests/clients program that prints ``vmid=N vcpu_num=N`` first; (proc, vmid)."""
    p = subprocess.Popen([str(build_c(client)), str(node), *args], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    header = dict(kv.split("=") for kv in p.stdout.readline().split())
    return p, int(header["vmid"])


def inject_async(daemon: Any, vmid: int, *access: str) -> subprocess.Popen[str]:
    """``acrn-hsm-emu inject`` in the background (it returns once a client answered)."""
    return subprocess.Popen(
        [daemon.args[0], "inject", "--control", str(daemon.control), "--vm", str(vmid),
         "--timeout", "60", *access],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def status(daemon: Any) -> dict[str, Any]:
    return json.loads(daemon.cli("status", "--json").stdout)



def gone(daemon: Any, vmid: int) -> bool:
    """The VM is in neither the HSM's list nor the hypervisor's table."""
    st = status(daemon)
    return all(v["vmid"] != vmid for v in st["hsm"]["vms"]) and all(
        v["vmid"] != vmid for v in st["hypervisor"]["vms"]
    )


def neighbour_works(daemon: Any, vmid: int) -> None:
    """A read injected into a dm_loop-served VM gets dm_loop's answer."""
    out = daemon.cli("inject", "--vm", str(vmid), "pio-read", "0x70", "2").stdout
    assert out.strip() == f"{pio_answer(0x70, 2):#x}"


def stop_clients(good: subprocess.Popen[str], bad: subprocess.Popen[str], timeout: float = 60) -> None:
    """End a test's two clients, if still running: the healthy one by SIGTERM (it
    shuts its VM down and reports), the misbehaving one by SIGKILL."""
    for p, sig in ((bad, signal.SIGKILL), (good, signal.SIGTERM)):
        if p.poll() is None:
            p.send_signal(sig)
    for p in (bad, good):
        p.communicate(timeout=timeout)
