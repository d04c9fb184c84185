"""What an administrator does from outside (``acrn-hsm-emu vm list | pause | destroy``),
and the reclaiming of orphaned VMs. Neither is the driver's (docs/fidelity.md).

The driver can leave VMs in the hypervisor that no file reaches any more: one
whose file is closed while ACRN refuses to destroy it, one lost by a second
CREATE_VM on a live file (spec: hsm 3.2), and one a failed CREATE_VM rolled
back while ACRN refused to destroy it (never listed by the HSM at all). On a
real Service VM they stay until reboot and, once the VM slots are full, every
CREATE_VM fails. Here they are *reclaimed* when the process that owned them is
gone (``hsm.orphan_reclaimed``), and ``vm destroy`` removes any of them at once.

VM states come from the hypervisor (the truth of what exists); the HSM's
records say who owns each:

- ``owned``: a VM of an open file;
- ``orphaned``: listed by the HSM, but its file is closed or has lost it;
- ``unclaimed``: in the hypervisor, in no HSM record (a rolled-back CREATE_VM).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, cast

import structlog
import trio

from acrn_hsm_emu.hsm import ioeventfd, irqfd
from acrn_hsm_emu.hsm.acrn_drv import INVALID_VMID, Vm
from acrn_hsm_emu.hsm.vm import vm_destroy
from acrn_hsm_emu.observe.events import BUS

if TYPE_CHECKING:
    from acrn_hsm_emu.hsm.ioreq import Dispatcher
    from acrn_hsm_emu.hypervisor.api import Hypercalls


class HsmDevice(Protocol):
    """What of the HSM device this module uses (hsm.HsmDevice: imported by it, not the reverse)."""

    hv: Hypercalls
    dispatcher: Dispatcher

log = structlog.get_logger("acrn_hsm_emu.hsm")


class AdminError(ValueError):
    """A refusal, one sentence for the control socket's client."""


def claims(vms: Iterable[Vm]) -> dict[int, Vm]:
    """hypervisor vmid -> the HSM record that holds it (live or lost by the quirk)."""
    out: dict[int, Vm] = {}
    for vm in vms:
        if vm.live:
            out[vm.vmid] = vm
        elif vm.lost_vmid is not None:
            out[vm.lost_vmid] = vm
    return out


def ownership(vm: Vm | None) -> str:
    if vm is None:
        return "unclaimed"
    return "owned" if vm.live and not vm.orphaned else "orphaned"


def hv_vms(dev: HsmDevice, snap: dict[str, Any] | None = None) -> dict[int, dict[str, Any]]:
    """The hypervisor's post-launched VMs that exist (not POWERED_OFF), by vmid."""
    snap = dev.hv.snapshot() if snap is None else snap
    vms = cast(list[dict[str, Any]], snap.get("vms", []))
    return {int(v["vmid"]): v for v in vms if v.get("state") != "POWERED_OFF"}


def vm_list(dev: HsmDevice, snap: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every User VM the hypervisor holds, with its state and who owns it."""
    held = claims(dev.dispatcher.vms)
    rows = []
    for vmid, v in sorted(hv_vms(dev, snap).items()):
        rec = held.get(vmid)
        rows.append({
            "vmid": vmid,
            "name": v.get("name"),
            "state": v.get("state"),
            "vcpus": len(v.get("vcpus") or []),
            "owner": ownership(rec),
            "owner_pid": (rec.owner_pid or rec.opener_pid) if rec is not None else None,
        })
    return rows


def _check(dev: HsmDevice, vmid: int) -> None:
    if vmid & 0xFFFF == 0:
        raise AdminError("VM 0 is the Service VM: only User VMs can be paused or destroyed")
    if vmid not in hv_vms(dev):
        raise AdminError(f"no VM with vmid {vmid}")


def pause(dev: HsmDevice, vmid: int) -> None:
    _check(dev, vmid)
    ret = dev.hv.pause_vm(vmid)
    if ret < 0:
        raise AdminError(f"the hypervisor refused to pause VM {vmid} (error {ret})")
    log.info("hsm.admin.vm_paused", vmid=vmid)
    if BUS.listeners:
        BUS.emit("vm.paused", vmid=vmid, by="admin")


def destroy(dev: HsmDevice, vmid: int) -> None:
    """Pause and destroy VM ``vmid`` whoever holds it. An owned VM goes as its device model's
    DESTROY_VM would take it (the file stays open, without a VM); any other is removed with
    its HSM record."""
    _check(dev, vmid)
    rec = claims(dev.dispatcher.vms).get(vmid)
    owner = ownership(rec)
    ret = dev.hv.pause_vm(vmid)  # ACRN destroys only a paused VM
    if ret < 0:
        raise AdminError(f"the hypervisor refused to pause VM {vmid} (error {ret})")
    if rec is not None and owner == "owned" and not rec.destroyed:
        ret = vm_destroy(dev.dispatcher, rec, by="admin")
    else:
        ret = dev.hv.destroy_vm(vmid)
        if ret == 0 and rec is not None:
            forget(dev, rec)
        if ret == 0 and BUS.listeners:
            BUS.emit("vm.destroyed", vmid=vmid, by="admin")
    if ret < 0:
        raise AdminError(f"the hypervisor refused to destroy VM {vmid} (error {ret})")
    log.info("hsm.admin.vm_destroyed", vmid=vmid, owner=owner)


def forget(dev: HsmDevice, vm: Vm) -> None:
    """Drop an HSM record whose hypervisor VM is gone: what vm_destroy does after its hypercall."""
    d = dev.dispatcher
    d.list_del(vm)
    ioeventfd.ioeventfd_deinit(d, vm)
    irqfd.irqfd_deinit(vm)
    d.ioreq_deinit(vm)
    vm.monitor_page = None
    vm.ram_mappings = []
    vm.bindings = []
    vm.vmid = INVALID_VMID
    vm.lost_vmid = None


def _remove(dev: HsmDevice, vmid: int) -> int:
    ret = dev.hv.pause_vm(vmid)
    return ret if ret < 0 else dev.hv.destroy_vm(vmid)


class Reaper:
    """Reclaims orphaned and unclaimed VMs once the process that held them is gone."""

    def __init__(self, dev: HsmDevice, spawn: Callable[[Callable[[], Any]], None]) -> None:
        self.dev = dev
        self._spawn = spawn
        self.watched: set[int] = set()  # pids whose exit we wait for
        self.reclaimed = 0

    def released(self, vm: Vm, pid: int) -> None:
        """A file of process ``pid`` was released; its VM ``vm`` may be orphaned."""
        held = claims(self.dev.dispatcher.vms)
        orphaned = any(v is vm for v in self.dev.dispatcher.vms)
        unclaimed = any(vmid not in held for vmid in self._hv_vmids())
        if not (orphaned or unclaimed):
            return
        owner = (vm.owner_pid or vm.opener_pid) if orphaned else pid
        if owner in self.watched:
            return
        self.watched.add(owner)
        self._spawn(lambda: self._when_gone(owner))

    def _hv_vmids(self) -> list[int]:
        try:
            return list(self.dev.hv.vm_ids())
        except Exception as e:  # the reaper must never fail a release (a test double may lack it)
            log.debug("hsm.reaper.snapshot_failed", error=str(e))
            return []

    async def _when_gone(self, pid: int) -> None:
        try:
            fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = None
        except OSError as e:
            self.watched.discard(pid)
            log.warning("hsm.reaper.cannot_watch", pid=pid, error=e.strerror)
            return
        try:
            if fd is not None:
                await trio.lowlevel.wait_readable(fd)  # readable once the process has exited
        finally:
            if fd is not None:
                os.close(fd)
            self.watched.discard(pid)
        self.reclaim(pid)

    def reclaim(self, pid: int) -> None:
        """Process ``pid`` is gone: destroy its orphans, and every unclaimed VM."""
        dev = self.dev
        existing = set(self._hv_vmids())
        for vm in [v for v in dev.dispatcher.vms if v.orphaned and (v.owner_pid or v.opener_pid) == pid]:
            vmid = vm.vmid if vm.live else vm.lost_vmid
            # a record may hold no VM: a second CREATE_VM on a file that had lost its VM
            # already records the lost vmid as 0xFFFF (status showed "VM 65535, state None")
            ret = _remove(dev, vmid) if vmid in existing else 0
            if ret < 0:
                log.warning("hsm.orphan_not_reclaimed", vmid=vmid, pid=pid, ret=ret)
                continue
            forget(dev, vm)
            self.reclaimed += 1
            log.info("hsm.orphan_reclaimed", vmid=vmid, pid=pid,
                     note="the owner process is gone; the kernel would keep this VM until reboot")
        held = claims(dev.dispatcher.vms)
        for vmid in self._hv_vmids():
            if vmid in held:
                continue
            ret = _remove(dev, vmid)
            if ret < 0:
                log.warning("hsm.orphan_not_reclaimed", vmid=vmid, pid=pid, ret=ret)
                continue
            self.reclaimed += 1
            log.info("hsm.orphan_reclaimed", vmid=vmid, pid=pid,
                     note="unclaimed: a CREATE_VM rolled back that ACRN refused to destroy")
