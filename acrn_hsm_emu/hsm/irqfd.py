"""irqfd: an eventfd whose signals inject an MSI into the VM (``irqfd.c``).

The kernel hooks the eventfd's wait queue and injects once per wake-up. Here
a trio task waits for the daemon's duplicate to become readable, reads the
counter (N signals coalesced) and injects N MSIs (spec: hsm 8, 13).
"""

from __future__ import annotations

import errno
import functools
import os
import struct
from collections.abc import Awaitable, Callable

import structlog
import trio

from acrn_hsm_emu import abi
from acrn_hsm_emu.hsm import eventfd
from acrn_hsm_emu.hsm.acrn_drv import Irqfd, Vm
from acrn_hsm_emu.hypervisor.api import Hypercalls
from acrn_hsm_emu.observe.trace import refuse

log = structlog.get_logger("acrn_hsm_emu.hsm")

FLAG_DEASSIGN = abi.ACRN_IRQFD_FLAG_DEASSIGN
# Signals injected per wake-up at most: a counter raised by a huge write must
# not stall the trio thread (the kernel injects once per write, whatever its value).
MAX_BURST = 4096

_ARGS = struct.Struct("<iI16s")  # fd, flags, msi (acrn_msi_entry)


Spawner = Callable[[Callable[[], Awaitable[None]]], None]


def _inject(irqfd: Irqfd) -> None:
    """acrn_irqfd_inject (acrn_msi_inject); failures are only logged, as in the driver."""
    vm = irqfd.vm
    ret = irqfd.hv.inject_msi(vm.vmid, irqfd.msi)
    irqfd.injected += 1
    vm.hypercalls.record_arg("inject_msi", ret, irqfd.msi, "irqfd")
    if ret < 0:
        irqfd.failures += 1
        level = log.warning if irqfd.failures == 1 else log.debug
        level("hsm.irqfd_inject_failed", vmid=vm.vmid, ret=ret, failures=irqfd.failures)


async def _watch(irqfd: Irqfd) -> None:
    """hsm_irqfd_wakeup: one MSI per signal counted."""
    try:
        with irqfd.scope:
            while not irqfd.closed:
                await trio.lowlevel.wait_readable(irqfd.fd)
                if irqfd.closed:
                    break
                n = eventfd.read_counter(irqfd.fd)
                for _ in range(min(n, MAX_BURST)):
                    _inject(irqfd)
                if n > MAX_BURST:
                    log.debug("hsm.irqfd_burst_capped", vmid=irqfd.vm.vmid, signals=n)
    except trio.ClosedResourceError:
        pass
    except Exception:
        log.exception("hsm.irqfd_watch_failed", vmid=irqfd.vm.vmid)


def _shutdown(irqfd: Irqfd) -> None:
    """hsm_irqfd_shutdown: stop watching and drop the eventfd."""
    if irqfd.closed:
        return
    irqfd.closed = True
    irqfd.scope.cancel()
    try:
        trio.lowlevel.notify_closing(irqfd.fd)
    except RuntimeError:
        pass  # outside trio (daemon teardown)
    try:
        os.close(irqfd.fd)
    except OSError:
        pass


def irqfd_init(vm: Vm) -> None:
    vm.irqfds = []


def irqfd_deinit(vm: Vm) -> None:
    for irqfd in vm.irqfds:
        _shutdown(irqfd)
    vm.irqfds = []


def irqfd_config(
    vm: Vm, hv: Hypercalls, spawner: Spawner, pid: int, args: bytes, owner: object = None
) -> int:
    """IRQFD: assign or deassign; ``owner`` as for ioeventfd_config."""
    fd, flags, msi = _ARGS.unpack_from(args)
    if flags & FLAG_DEASSIGN:
        return _deassign(vm, pid, fd)
    return _assign(vm, hv, spawner, pid, fd, msi, owner)


def drop_owned(vm: Vm, owner: object) -> None:
    """A bound file closed: its irqfds are shut down."""
    for irqfd in [i for i in vm.irqfds if i.owner is owner]:
        vm.irqfds.remove(irqfd)
        _shutdown(irqfd)
        log.debug("hsm.irqfd_dropped", vmid=vm.vmid)


def _assign(
    vm: Vm, hv: Hypercalls, spawner: Spawner, pid: int, fd: int, msi: bytes, owner: object = None
) -> int:
    try:
        dup = eventfd.fdget(pid, fd)
    except eventfd.EventfdError as e:
        return -e.errno
    for other in vm.irqfds:
        if eventfd.same(other.fd, dup):
            os.close(dup)
            return refuse(errno.EBUSY, "that eventfd is an irqfd of this VM already")
    irqfd = Irqfd(vm, hv, dup, msi, owner)
    vm.irqfds.append(irqfd)
    # The driver polls once: an eventfd already signalled gets one MSI now.
    if eventfd.read_counter(dup) > 0:
        _inject(irqfd)
    spawner(functools.partial(_watch, irqfd))
    log.debug("hsm.irqfd_assigned", vmid=vm.vmid, fd=fd)
    return 0


def _deassign(vm: Vm, pid: int, fd: int) -> int:
    irqfd = eventfd.find_same(pid, fd, vm.irqfds, lambda q: q.fd)
    if isinstance(irqfd, int):
        return irqfd
    if irqfd is not None:
        vm.irqfds.remove(irqfd)
        _shutdown(irqfd)
        log.debug("hsm.irqfd_deassigned", vmid=vm.vmid, fd=fd)
    return 0
