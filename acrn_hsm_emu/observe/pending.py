"""Each VM's requests in flight and how long they have been (``status``'s "pending").

No clock is read on the request path for this: the daemon samples the request pages
once a second (its status loop) and at each ``status``, and a request's age is the
time since a sample first saw it. A request is told apart from the next one of the
same vCPU by the vCPU's count of completed cycles (its cycle ring's ``n``), which
only moves when a request ends. So an age is a lower bound, to within a second.
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING, Any

from acrn_hsm_emu.hsm.acrn_drv import COMPLETE, PENDING, PROCESSING, RANGE_KINDS, SLOT_STATE, U32
from acrn_hsm_emu.memory import MemoryFault

if TYPE_CHECKING:
    from acrn_hsm_emu.hsm.hsm import HsmDevice
    from acrn_hsm_emu.hypervisor.hypervisor import Hypervisor

_HEAD = struct.Struct("<II56xI4xQQQ")  # type, polling, direction, address, size, value
_KH = 132  # kernel_handled
_STATES = {PENDING: "pending", PROCESSING: "processing", COMPLETE: "complete"}


class PendingAges:
    """First sightings of the requests in flight, by (vmid, vcpu, cycles completed)."""

    def __init__(self) -> None:
        self.first_seen: dict[tuple[int, int, int], float] = {}

    def sample(self, device: HsmDevice, hv: Hypervisor) -> list[dict[str, Any]]:
        now = time.monotonic()
        cycles = {(vmid, vcpu): int(ring.ring.n) for vmid, _state, vcpus in hv.vcpu_cycles()
                  for vcpu, ring in vcpus}  # fmt: skip
        out: list[dict[str, Any]] = []
        seen: set[tuple[int, int, int]] = set()
        for vm in device.dispatcher.vms:
            if not vm.live or vm.mem is None or vm.page_base is None or vm.failed is not None:
                continue
            try:
                data = vm.mem.read(vm.page_base, vm.nslots << 8)  # one process_vm_readv
            except MemoryFault:
                continue
            holders: dict[int, str] = {}
            clients = ([vm.default_client] if vm.default_client is not None else []) + vm.range_clients
            for c in clients:
                bits = c.bitmap
                for i in range(vm.nslots):
                    if bits >> i & 1:
                        holders.setdefault(i, c.name)
            for i in range(vm.nslots):
                state = U32.unpack_from(data, (i << 8) + SLOT_STATE)[0]
                if state not in _STATES:
                    continue
                typ, _polling, direction, addr, size, value = _HEAD.unpack_from(data, i << 8)
                key = (vm.vmid, i, cycles.get((vm.vmid, i), -1))
                seen.add(key)
                first = self.first_seen.setdefault(key, now)
                kh = U32.unpack_from(data, (i << 8) + _KH)[0]
                write = direction == 1
                out.append({
                    "vmid": vm.vmid,
                    "vcpu": i,
                    "state": _STATES[state],
                    "kind": RANGE_KINDS.get(typ, str(typ)),
                    "write": write,
                    "addr": addr,
                    "size": size,
                    "value": value if write else None,
                    "client": holders.get(i) if state == PROCESSING else None,
                    "kernel_handled": bool(kh),
                    "age_s": round(now - first, 3),
                })  # fmt: skip
        for key in set(self.first_seen) - seen:
            del self.first_seen[key]
        return out
