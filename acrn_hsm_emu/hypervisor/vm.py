"""A VM as the hypervisor keeps it: state, request page, vCPUs, and records.

spec: hv A.1 (states), A.1.1 (what each hypercall records), A.2.1 (the
accesses the hypervisor answers itself instead of forwarding them).
"""

from __future__ import annotations

import bisect
import collections
import enum
import errno
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from acrn_hsm_emu import abi
from acrn_hsm_emu import acrn_kernel_abi as ak
from acrn_hsm_emu._native import ffi as _ffi
from acrn_hsm_emu._native import lib as _lib
from acrn_hsm_emu.hypervisor.scenario import SEVERITY_SERVICE_VM, VmSlot, format_bdf
from acrn_hsm_emu.hypervisor.vrtc import VRtc
from acrn_hsm_emu.memory import ClientMemory, MemoryFault, SharedPage
from acrn_hsm_emu.sbuf import SharedRing

if TYPE_CHECKING:
    from acrn_hsm_emu.hypervisor.api import MemoryRegionOp, NativeUpcall
    from acrn_hsm_emu.hypervisor.record import Recorder
    from acrn_hsm_emu.hypervisor.vcpu import Vcpu

_log = structlog.get_logger(__name__)

PAGE_SIZE = 4096


@dataclass(frozen=True)
class Placement:
    """Where vCPU threads run. ``vcpu_cpus`` stand for the scenario's pCPUs: a
    vCPU on pCPU n is pinned to ``vcpu_cpus[n % len]``, as ACRN runs a vCPU on
    its pCPU, and waiting for a completion it polls up to ``poll_ns`` before it
    sleeps (``hsm_slot_cycle``), as KVM polls before halting. Empty: anywhere in
    ``anywhere`` (the process's CPUs when the hypervisor was made; the daemon
    may narrow its own threads later), and no polling."""

    vcpu_cpus: tuple[int, ...]
    anywhere: frozenset[int]
    poll_ns: int = 0

    @property
    def completion_poll_ns(self) -> int:
        """How long a vCPU polls for its completion: only a pinned one does."""
        return self.poll_ns if self.vcpu_cpus else 0

    def snapshot(self) -> dict[str, object]:
        return {
            "vcpu_cpus": list(self.vcpu_cpus) or None,
            "vcpu_poll_us": self.completion_poll_ns // 1000,
        }

    def host_cpus(self, pcpu: int) -> frozenset[int]:
        if self.vcpu_cpus:
            return frozenset({self.vcpu_cpus[pcpu % len(self.vcpu_cpus)]})
        return self.anywhere


class VmState(enum.IntEnum):
    """``enum vm_state`` (vm.h)."""

    POWERED_OFF = 0
    CREATED = 1
    RUNNING = 2
    READY_TO_POWEROFF = 3
    PAUSED = 4


MEM_TYPES = (  # first match wins, as in hc.c add_vm_memory_region
    (abi.ACRN_MEM_TYPE_WB, "WB"),
    (abi.ACRN_MEM_TYPE_WT, "WT"),
    (abi.ACRN_MEM_TYPE_WC, "WC"),
    (abi.ACRN_MEM_TYPE_WP, "WP"),
)


def mem_type(attr: int) -> str:
    """EPT memory type ACRN derives from a region's ``prot`` (UC if none is set)."""
    for bit, name in MEM_TYPES:
        if attr & bit:
            return name
    return "UC"


@dataclass(frozen=True, slots=True)
class EptMapping:
    """One guest-physical range of the VM's EPT."""

    gpa: int
    size: int
    service_vm_pa: int
    access: int  # RWX bits
    mem_type: str
    backing: ClientMemory | None = None
    host_va: int | None = None

    @classmethod
    def from_op(cls, op: MemoryRegionOp) -> EptMapping:
        """The mapping an MR_ADD op of SET_MEMORY_REGIONS describes."""
        return cls(
            op.user_vm_pa,
            op.size,
            op.service_vm_pa,
            op.attr & abi.ACRN_MEM_ACCESS_RWX,
            mem_type(op.attr),
            op.backing,
            op.host_va,
        )

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def piece(self, start: int, end: int) -> EptMapping:
        off = start - self.gpa
        return EptMapping(
            start,
            end - start,
            self.service_vm_pa + off,
            self.access,
            self.mem_type,
            self.backing,
            None if self.host_va is None else self.host_va + off,
        )


class GuestMemoryMap:
    """The guest-physical map built by SET_MEMORY_REGIONS: sorted, non-overlapping.

    Lookups and updates bisect a parallel list of start addresses, so adding,
    deleting or finding a range costs O(log n) comparisons plus the pieces it
    touches (and one C-level list move), whatever the number of mappings.
    """

    def __init__(self) -> None:
        self._maps: list[EptMapping] = []
        self._starts: list[int] = []

    def __iter__(self) -> Iterator[EptMapping]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def add(self, m: EptMapping) -> None:
        """Map ``m``, replacing whatever overlapped it."""
        if m.size == 0:
            return
        i = self._carve(m.gpa, m.end)
        self._maps.insert(i, m)
        self._starts.insert(i, m.gpa)

    def find(self, gpa: int) -> EptMapping | None:
        """The mapping holding ``gpa``, or None."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self._maps[i].end:
            return self._maps[i]
        return None

    def covers(self, gpa: int, size: int) -> bool:
        """Every byte of [gpa, gpa+size) is mapped (ACRN's ``ept_is_valid_mr``)."""
        if size == 0:
            return True
        pos, end = gpa, gpa + size
        i = bisect.bisect_right(self._starts, pos) - 1
        if i < 0:
            return False
        maps = self._maps
        while i < len(maps):
            m = maps[i]
            if m.gpa > pos:
                return False
            if m.end > pos:
                pos = m.end
                if pos >= end:
                    return True
            i += 1
        return False

    def delete(self, gpa: int, size: int) -> None:
        if size:
            self._carve(gpa, gpa + size)

    def clear(self) -> None:
        self._maps.clear()
        self._starts.clear()

    def _carve(self, start: int, end: int) -> int:
        """Unmap [start, end); returns the index where a mapping at ``start`` belongs."""
        maps = self._maps
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or maps[i].end <= start:
            i += 1
        j = i
        while j < len(maps) and maps[j].gpa < end:
            j += 1
        if i == j:
            return i
        keep: list[EptMapping] = []
        first, last = maps[i], maps[j - 1]
        if first.gpa < start:
            keep.append(first.piece(first.gpa, start))
        if last.end > end:
            keep.append(last.piece(end, last.end))
        maps[i:j] = keep
        self._starts[i:j] = [m.gpa for m in keep]
        return i + (1 if keep and keep[0].gpa < start else 0)


IRQ_OPS = {
    abi.IRQ_SET_HIGH: "set_high",
    abi.IRQ_SET_LOW: "set_low",
    abi.IRQ_RAISING_PULSE: "raising_pulse",
    abi.IRQ_FALLING_PULSE: "falling_pulse",
}

# Ports the hypervisor emulates itself for a post-launched VM (hv A.2.1).
VPIC_PORTS = frozenset({0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1})  # vPIC and ELCR
RTC_PORTS = frozenset({0x70, 0x71})  # vRTC, RT VMs only
PCI_CONFIG_ADDR = 0xCF8
PCI_CONFIG_DATA = 0xCFC
KBD_STATUS_PORT = 0x64  # RT VMs: reads answered all-ones by the hypervisor
VIOAPIC_BASE = 0xFEC00000  # vIOAPIC MMIO page, handled in the hypervisor
VIOAPIC_END = VIOAPIC_BASE + 0x1000
_VM_EVENT_DATA = ak.VmEvent.event_data.size
_ASYNCIO_SPIN_S = 0.0005  # a full asyncio ring: wait this long for the HSM to drain it, then retry


@dataclass(frozen=True, slots=True)
class AsyncioDesc:
    """One ``asyncio_desc`` (io_req.c): an access that is pushed, not sent."""

    type: int  # ACRN_ASYNCIO_PIO / _MMIO
    match_data: int
    addr: int
    fd: int  # the value pushed into the asyncio ring
    data: int

    @classmethod
    def from_bytes(cls, raw: bytes) -> AsyncioDesc:
        i = ak.AcrnAsyncioInfo.from_buffer_copy(raw)
        return cls(i.type, i.match_data, i.addr, i.fd, i.data)

    def conflicts(self, other: AsyncioDesc) -> bool:
        """``asyncio_is_conflict``: same address and type, and no data to tell them apart."""
        return (
            self.addr == other.addr
            and self.type == other.type
            and (not self.match_data or not other.match_data or self.data == other.data)
        )

    def same(self, other: AsyncioDesc) -> bool:
        """What ``remove_asyncio`` compares."""
        return (
            self.type == other.type
            and self.addr == other.addr
            and self.fd == other.fd
            and (self.match_data == 0) == (other.match_data == 0)
            and self.data == other.data
        )

    def snapshot(self) -> dict[str, int | str]:
        return {"type": "pio" if self.type == ak.ACRN_ASYNCIO_PIO else "mmio", "addr": self.addr,
                "fd": self.fd, "match_data": self.match_data, "data": self.data}  # fmt: skip


class Vm:
    """A VM that left POWERED_OFF; dropped again at DESTROY_VM (``shutdown_vm``)."""

    def __init__(
        self,
        abs_id: int,
        vmid: int,
        slot: VmSlot,
        name: str,
        guest_flags: int,
        cpu_affinity: int,
        upcall: Callable[[], Callable[[], None] | None],
        placement: Placement,
        cpuid: Callable[[int, int], tuple[int, int, int, int]],
    ) -> None:
        self.abs_id = abs_id
        self.vmid = vmid  # relative, as the Service VM sees it
        self.slot = slot
        self.name = name
        self.guest_flags = guest_flags
        self.cpu_affinity = cpu_affinity
        # The gate a vCPU's native request cycle checks (hsm_slot_cycle): open
        # while RUNNING without a fault; kept by the state and fault setters.
        self.gate = _ffi.new("struct hsm_gate *")
        _lib.hsm_gate_init(self.gate)
        self._state = VmState.CREATED
        self._fault: str | None = None
        self.lock = threading.Lock()  # state changes vs. a vCPU posting a request
        # Guest side: a kernel serialises CF8/CFC pairs (Linux pci_config_lock); the
        # scripted "pci" access does too, so vCPUs do not clobber each other's address.
        self.pci_lock = threading.Lock()
        self.page: SharedPage | None = None
        self.polling = slot.load_order == "post" and bool(
            guest_flags & abi.GUEST_FLAG_IO_COMPLETION_POLLING
        )  # vm.c: post-launched only
        self.vcpus: list[Vcpu] = []
        self.recorder: Recorder | None = None  # while recorded (record.py); also on each vCPU
        self.lapic_ids: tuple[int, ...] = ()  # of vCPU 0, 1, ...: the LAPIC ids of their pCPUs
        self.unreset: set[int] = set()  # vCPUs yet to apply a RESET_VM (see Vcpu._loop)
        self.vcpu_num = 0  # vCPUs created (post-launched: len(vcpus))
        self.get_upcall = upcall
        self.placement = placement
        # api.NativeUpcall: what a vCPU's native request cycle calls instead of
        # raising the upcall (set_native_upcall); None: the upcall.
        self.native_upcall: NativeUpcall | None = None
        self.cpuid = cpuid
        # records
        self.memory = GuestMemoryMap()
        self.regs: dict[int, bytes] = {}
        self.msi_count = 0
        self.msi_recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=16)
        self.irqlines: dict[int, dict[str, int]] = {}
        self.pcidevs: dict[int, abi.AcrnPcidev] = {}  # by virtual BDF
        self.mmiodevs: list[abi.AcrnMmiodev] = []
        self.vdevs: dict[int, abi.AcrnVdev] = {}  # by BDF (acrn_vdev.slot)
        self.ptdev_intx: dict[tuple[int, bool], abi.AcrnPtdevIrq] = {}  # by (virt pin, pic)
        self.intr_delay_ms = 0
        # what the hypervisor answers itself (hv A.2.1)
        self.cf8_latch = 0
        self._hv_regs: dict[int, int] = {}
        # shared rings of ACRN's own kernel (HC_SETUP_SBUF), spec hv A.2.8
        self.ring_lock = threading.Lock()  # vCPUs put into the rings concurrently
        self.asyncio_ring: SharedRing | None = None
        self.asyncio_descs: list[AsyncioDesc] = []
        self.asyncio_pushed = 0
        self.vm_event_ring: SharedRing | None = None
        self.vm_events: dict[str, int] = {}  # sent, by type name
        self.vm_events_lost = 0  # no ring, or the ring was full
        self.pio_regions: list[tuple[int, int]] = []  # (port, size) given to this VM
        self.vrtc = VRtc(self._rtc_changed)
        rt = bool(guest_flags & abi.GUEST_FLAG_RT)
        lapic_pt = bool(guest_flags & abi.GUEST_FLAG_LAPIC_PASSTHROUGH)
        ports = {PCI_CONFIG_ADDR}
        if not lapic_pt:
            ports |= VPIC_PORTS
        if rt:
            ports |= RTC_PORTS | {KBD_STATUS_PORT}
        self.hv_ports = frozenset(ports)
        # the same for native code, with the data ports (they reset the CF8 latch)
        self.skip_ports = _ffi.new("unsigned char[8192]")
        for port in ports | set(range(PCI_CONFIG_DATA, PCI_CONFIG_DATA + 4)):
            self.skip_ports[port >> 3] |= 1 << (port & 7)

    @property
    def state(self) -> VmState:
        return self._state

    @state.setter
    def state(self, state: VmState) -> None:
        """Set under ``lock``; also closes or opens the native gate."""
        self._state = state
        _lib.hsm_gate_set(self.gate, state == VmState.RUNNING and self._fault is None)

    @property
    def fault(self) -> str | None:
        """Why the request page faulted (the client died?): the vCPUs are stopped."""
        return self._fault

    @fault.setter
    def fault(self, fault: str | None) -> None:
        self._fault = fault
        _lib.hsm_gate_set(self.gate, self._state == VmState.RUNNING and fault is None)

    @property
    def severity_pass(self) -> bool:
        """``is_severity_pass``: the target is not more critical than the Service VM."""
        return self.slot.severity <= SEVERITY_SERVICE_VM

    def report_fault(self, vcpu_id: int, exc: Exception) -> None:
        """The request page faulted (the client died?): stop every vCPU of the VM."""
        with self.lock:
            if self.fault is None:
                # logged before it is recorded: whoever sees the fault finds the line
                _log.error("vm.request_page_fault", vmid=self.vmid, vcpu=vcpu_id, error=str(exc))
                self.fault = f"vcpu {vcpu_id}: {exc}"
        for v in self.vcpus:
            v.kick()

    def upcall(self) -> None:
        fn = self.get_upcall()
        if fn is not None:
            fn()

    def hv_pio(self, port: int, size: int, write: bool, value: int) -> int | None:
        """A port access the hypervisor answers itself: the read value (0 for a
        write), or None when it goes to the Service VM. ``port`` is in ``hv_ports``."""
        mask = (1 << (8 * size)) - 1
        if port == PCI_CONFIG_ADDR:
            if not write:  # every CF8 read is answered here (vpci_pio_cfgaddr_read)
                return (self.cf8_latch if size == 4 else 0xFFFFFFFF) & mask
            if size != 4:
                return 0  # CF8 writes of other widths are dropped
            self.cf8_latch = value & ~0x7F000003 & 0xFFFFFFFF  # reserved bits masked
            return None  # latched, and still forwarded
        if port == KBD_STATUS_PORT:
            return None if write else mask
        if port in RTC_PORTS:  # RT VMs: the hypervisor's vRTC
            if write:
                self.vrtc.write(port, value & mask)
                return 0
            return self.vrtc.read(port) & mask
        if write:
            self._hv_regs[port] = value & mask
            return 0
        return self._hv_regs.get(port, 0) & mask

    def hv_mmio(self, gpa: int, size: int, write: bool, value: int) -> int:
        """vIOAPIC access: a minimal register file (writes stored, reads give them back)."""
        mask = (1 << (8 * size)) - 1
        if write:
            self._hv_regs[gpa] = value & mask
            return 0
        return self._hv_regs.get(gpa, 0) & mask

    def reset_devices(self) -> None:
        """RESET_VM: the hypervisor-side device state (CF8 latch, vPIC, vIOAPIC) is cleared."""
        self.cf8_latch = 0
        self._hv_regs.clear()
        self.vrtc.reset()

    # ----- VM events and asynchronous I/O (spec hv A.2.7, A.2.8) ---------------------

    def send_vm_event(self, event_type: int, data: bytes = b"") -> int:
        """``send_vm_event``: into the VM event ring, then the upcall; -ENODEV without
        a ring (or when it is full or gone), as ACRN returns."""
        name = ak.VM_EVENT_NAMES.get(event_type, str(event_type))
        element = event_type.to_bytes(4, "little") + data[:_VM_EVENT_DATA].ljust(_VM_EVENT_DATA, b"\0")
        with self.ring_lock:
            ring = self.vm_event_ring
            sent = 0
            if ring is not None:
                try:
                    sent = ring.put(element)
                except MemoryFault as e:
                    _log.warning("vm.vm_event_ring_fault", vmid=self.vmid, error=str(e))
        if sent <= 0:
            self.vm_events_lost += 1
            _log.info("vm.vm_event_not_sent", vmid=self.vmid, vm_event=name,
                      reason="no VM event ring" if ring is None else "ring full or unreachable")
            return -errno.ENODEV
        self.vm_events[name] = self.vm_events.get(name, 0) + 1
        _log.info("vm.vm_event_sent", vmid=self.vmid, vm_event=name)
        self.upcall()
        return 0

    def _rtc_changed(self, last_time: int, delta: int) -> None:
        if self.slot.load_order == "post":  # vrtc.c: post-launched VMs only
            data = bytes(ak.RtcChangeEventData(last_time=last_time, delta_time=delta))
            self.send_vm_event(ak.VM_EVENT_RTC_CHG, data)

    def asyncio_match(self, asyncio_type: int, addr: int, value: int) -> AsyncioDesc | None:
        """``get_asyncio_desc``: the descriptor an access matches (the direction is not
        looked at, as in ACRN), or None."""
        if self.asyncio_ring is None or not addr:
            return None
        for d in self.asyncio_descs:
            if d.addr == addr and d.type == asyncio_type and (not d.match_data or d.data == value):
                return d
        return None

    def push_asyncio(self, desc: AsyncioDesc, stopped: Callable[[], bool]) -> bool:
        """``acrn_insert_asyncio``: the descriptor's fd into the ring (waiting while it
        is full), then the upcall; False if ``stopped()`` became true meanwhile.
        Raises MemoryFault when the ring page is gone."""
        element = desc.fd.to_bytes(8, "little")
        while True:
            with self.ring_lock:
                ring = self.asyncio_ring
                if ring is None:
                    return False
                if ring.put(element):
                    self.asyncio_pushed += 1
                    break
            self.upcall()  # the HSM drains the ring at every pass
            if stopped():
                return False
            time.sleep(_ASYNCIO_SPIN_S)
        self.upcall()
        return True

    def asyncio_ports(self) -> set[int]:
        return {d.addr for d in self.asyncio_descs if d.type == ak.ACRN_ASYNCIO_PIO and d.addr < 0x10000}

    def has_asyncio_mmio(self) -> bool:
        return self.asyncio_ring is not None and any(
            d.type == ak.ACRN_ASYNCIO_MMIO for d in self.asyncio_descs
        )

    def record_irqline(self, gsi: int, op: int) -> None:
        line = self.irqlines.get(gsi)
        if line is None:
            line = self.irqlines[gsi] = {"level": 0}
        name = IRQ_OPS.get(op, "other")
        line[name] = line.get(name, 0) + 1
        if op in (abi.IRQ_SET_HIGH, abi.IRQ_FALLING_PULSE):  # a falling pulse ends high
            line["level"] = 1
        elif op in (abi.IRQ_SET_LOW, abi.IRQ_RAISING_PULSE):
            line["level"] = 0

    def clear_records(self) -> None:
        """What ``shutdown_vm`` tears down (vPCI, ptirq entries, EPT)."""
        self.memory.clear()
        self.pcidevs.clear()
        self.mmiodevs.clear()
        self.vdevs.clear()
        self.ptdev_intx.clear()

    def snapshot(self) -> dict[str, Any]:
        return {
            "vmid": self.vmid,
            "abs_id": self.abs_id,
            "name": self.name,
            "load_order": self.slot.load_order,
            "static": self.slot.static,
            "state": self.state.name,
            "guest_flags": self.guest_flags,
            "cpu_affinity": self.cpu_affinity,
            "severity": self.slot.severity,
            "vcpu_num": self.vcpu_num,
            "polling": self.polling,
            "ioreq_buffer": self.page is not None,
            "fault": self.fault,
            "vcpus": [v.snapshot() for v in self.vcpus],
            "msi": {
                "count": self.msi_count,
                "recent": [
                    {"addr": a, "data": d, "vector": d & 0xFF, "dest": (a >> 12) & 0xFF}
                    for a, d in self.msi_recent
                ],
            },
            "irqlines": {str(g): dict(v) for g, v in sorted(self.irqlines.items())},
            "memory": [
                {
                    "gpa": m.gpa,
                    "size": m.size,
                    "service_vm_pa": m.service_vm_pa,
                    "access": m.access,
                    "type": m.mem_type,
                    "host_va": m.host_va,
                }
                for m in self.memory
            ],
            "pci_devices": [
                {
                    "virt_bdf": format_bdf(v),
                    "phys_bdf": format_bdf(d.phys_bdf),
                    "intr_line": d.intr_line,
                    "intr_pin": d.intr_pin,
                }
                for v, d in sorted(self.pcidevs.items())
            ],
            "mmio_devices": [
                {
                    "name": bytes(d.name).rstrip(b"\0").decode(errors="replace"),
                    "res": [
                        {
                            "user_vm_pa": r.user_vm_pa,
                            "service_vm_pa": r.service_vm_pa,
                            "size": r.size,
                        }
                        for r in d.res
                        if r.size
                    ],
                }
                for d in self.mmiodevs
            ],
            "vdevs": [
                {"bdf": format_bdf(b), "vendor": d.id.fields.vendor, "device": d.id.fields.device}
                for b, d in sorted(self.vdevs.items())
            ],
            "ptdev_intx": [
                {
                    "virt_pin": p,
                    "pic": pic,
                    "phys_pin": i.intx.phys_pin,
                    "virt_bdf": format_bdf(i.virt_bdf),
                    "phys_bdf": format_bdf(i.phys_bdf),
                }
                for (p, pic), i in sorted(self.ptdev_intx.items())
            ],
            "intr_delay_ms": self.intr_delay_ms,
            "regs_set": sorted(self.regs),
            "lapic_ids": list(self.lapic_ids),
            "asyncio": None if self.asyncio_ring is None else {
                **self.asyncio_ring.snapshot(), "pushed": self.asyncio_pushed,
                "descriptors": [d.snapshot() for d in self.asyncio_descs],
            },
            "vm_event": {
                "ring": None if self.vm_event_ring is None else self.vm_event_ring.snapshot(),
                "sent": dict(self.vm_events), "lost": self.vm_events_lost,
            },
            "pio_regions": [{"port": p, "size": n} for p, n in self.pio_regions],
        }  # fmt: skip
