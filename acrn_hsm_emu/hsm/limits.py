"""The daemon's own limits on what one client may hold, and how a refusal is answered."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from acrn_hsm_emu.observe.events import BUS
from acrn_hsm_emu.observe.trace import refuse as trace_refuse

log = structlog.get_logger("acrn_hsm_emu.hsm")


@dataclass(frozen=True)
class Limits:
    """Bounds the kernel does not have, so one client cannot exhaust the daemon.

    Each refusal is logged (``hsm.limit``) and answered with an errno that says
    what ran out: EAGAIN for a process's VMs (as RLIMIT_NPROC does for fork),
    ENOMEM for memory segments (as the driver's 256 RAM mappings), ENOSPC for
    eventfds and range clients (like the extension's range limit).
    """

    vms_per_process: int = 16
    mmio_segments_per_vm: int = 1024
    ioeventfds_per_vm: int = 256
    irqfds_per_vm: int = 256
    range_clients_per_vm: int = 16


def refuse(limit: str, value: int, err: int, **kw: object) -> int:
    """Log a refusal (``hsm.limit``), tell the events' listeners (``limit.reached``) and the
    trace (the limit as the reason), and answer -err."""
    log.warning("hsm.limit", limit=limit, value=value, **kw)
    if BUS.listeners:
        BUS.emit("limit.reached", limit=limit, value=value, vmid=kw.get("vmid"), pid=kw.get("pid"))
    return trace_refuse(err, "the daemon's limit {} ({}) is reached", limit, value)
