"""irqfd: an eventfd whose signals inject an MSI into the VM (``irqfd.c``).

The kernel hooks the eventfd's wait queue and injects once per wake-up. Here
a trio task waits for the daemon's duplicate to become readable, reads the
counter (N signals coalesced) and injects N MSIs (spec: hsm 8, 13).
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog
import trio

from acrn_hsm_emu import abi
from acrn_hsm_emu.hsm import eventfd
from acrn_hsm_emu.hsm.hypercall_log import decode
from acrn_hsm_emu.hypervisor.api import Hypercalls

if TYPE_CHECKING:
    from acrn_hsm_emu.hsm.vm import Vm

log = structlog.get_logger("acrn_hsm_emu.hsm")

FLAG_DEASSIGN = abi.ACRN_IRQFD_FLAG_DEASSIGN
# Signals injected per wake-up at most: a counter raised by a huge write must
# not stall the trio thread (the kernel injects once per write, whatever its value).
MAX_BURST = 4096

_ARGS = struct.Struct("<iI16s")  # fd, flags, msi (acrn_msi_entry)


Spawner = Callable[[Callable[[], Awaitable[None]]], None]


class Irqfd:
    """struct hsm_irqfd."""

    __slots__ = ("vm", "hv", "fd", "msi", "scope", "closed", "injected", "failures", "owner")

    def __init__(self, vm: Vm, hv: Hypercalls, fd: int, msi: bytes, owner: object = None) -> None:
        self.owner = owner  # None: the VM's own file; else the binding that assigned it
        self.vm = vm
        self.hv = hv
        self.fd = fd
        self.msi = msi
        self.scope = trio.CancelScope()
        self.closed = False
        self.injected = 0
        self.failures = 0

    def inject(self) -> None:
        """acrn_msi_inject; failures are only logged, as in the driver."""
        ret = self.hv.inject_msi(self.vm.vmid, self.msi)
        self.injected += 1
        self.vm.hypercalls.record("inject_msi", ret, "irqfd", **decode("inject_msi", self.msi))
        if ret < 0:
            self.failures += 1
            level = log.warning if self.failures == 1 else log.debug
            level("hsm.irqfd_inject_failed", vmid=self.vm.vmid, ret=ret, failures=self.failures)

    async def watch(self) -> None:
        """The wake function: one MSI per signal counted."""
        try:
            with self.scope:
                while not self.closed:
                    await trio.lowlevel.wait_readable(self.fd)
                    if self.closed:
                        break
                    n = eventfd.read_counter(self.fd)
                    for _ in range(min(n, MAX_BURST)):
                        self.inject()
                    if n > MAX_BURST:
                        log.debug("hsm.irqfd_burst_capped", vmid=self.vm.vmid, signals=n)
        except trio.ClosedResourceError:
            pass
        except Exception:
            log.exception("hsm.irqfd_watch_failed", vmid=self.vm.vmid)

    def shutdown(self) -> None:
        """hsm_irqfd_shutdown: stop watching and drop the eventfd."""
        if self.closed:
            return
        self.closed = True
        self.scope.cancel()
        try:
            trio.lowlevel.notify_closing(self.fd)
        except RuntimeError:
            pass  # outside trio (daemon teardown)
        try:
            os.close(self.fd)
        except OSError:
            pass


def irqfd_init(vm: Vm) -> None:
    vm.irqfds = []


def irqfd_deinit(vm: Vm) -> None:
    for irqfd in vm.irqfds:
        irqfd.shutdown()
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
        irqfd.shutdown()
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
            return -errno.EBUSY
    irqfd = Irqfd(vm, hv, dup, msi, owner)
    vm.irqfds.append(irqfd)
    # The driver polls once: an eventfd already signalled gets one MSI now.
    if eventfd.read_counter(dup) > 0:
        irqfd.inject()
    spawner(irqfd.watch)
    log.debug("hsm.irqfd_assigned", vmid=vm.vmid, fd=fd)
    return 0


def _deassign(vm: Vm, pid: int, fd: int) -> int:
    irqfd = eventfd.find_same(pid, fd, vm.irqfds, lambda q: q.fd)
    if isinstance(irqfd, int):
        return irqfd
    if irqfd is not None:
        vm.irqfds.remove(irqfd)
        irqfd.shutdown()
        log.debug("hsm.irqfd_deassigned", vmid=vm.vmid, fd=fd)
    return 0
