"""The platform the mock hypervisor pretends to run on: an ACRN "scenario".

On real hardware ACRN is built for one board and one scenario: the number of
physical CPUs, the VM configuration slots (``vm_configs[]``, whose count is
CONFIG_MAX_VM_NUM), which slot is the Service VM, and the host's power-state
tables. Here the same facts come from a TOML file (format in
``docs/scenario.md``) or from :func:`default_scenario`.

Everything is validated when loaded; a problem raises :class:`ScenarioError`
naming the file, the key and the reason. spec: hv A.0, A.3, A.4, A.5.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acrn_hsm_emu import abi
from acrn_hsm_emu.hypervisor.madt import host_lapics, lapic_ids_for

# enum acrn_vm_severity (vm_config.h): a target passes when <= the Service VM's.
SEVERITY_STANDARD_VM = 0x10
SEVERITY_SERVICE_VM = 0x20
SEVERITY_RTVM = 0x30
SEVERITY_SAFETY_VM = 0x40
SEVERITIES = {
    "standard": SEVERITY_STANDARD_VM,
    "rtvm": SEVERITY_RTVM,
    "safety": SEVERITY_SAFETY_VM,
}

LOAD_ORDERS = ("service", "pre", "post")

MAX_VM_NAME_LEN = 16  # bytes including the terminating NUL
MAX_VCPUS_PER_VM = abi.ACRN_IO_REQUEST_MAX  # one request slot per vCPU
MAX_PCPUS = 64  # cpu_affinity is a u64 bitmap
MAX_VM_NUM = 256  # the PM command carries a relative vmid in 8 bits
MAX_PSTATES = 20  # ACRN's MAX_PSTATE
MAX_CSTATES = 8  # ACRN's MAX_CSTATE
MAX_XAPIC_ID = 0xFE  # 0xFF is the xAPIC broadcast id
VIOAPIC_GSI_COUNT = 48  # GSIs of a post-launched VM's vIOAPIC (hv A.1.1 SET_IRQLINE)

GUEST_FLAG_NAMES: dict[str, int] = {
    "secure_world_enabled": abi.GUEST_FLAG_SECURE_WORLD_ENABLED,
    "lapic_passthrough": abi.GUEST_FLAG_LAPIC_PASSTHROUGH,
    "io_completion_polling": abi.GUEST_FLAG_IO_COMPLETION_POLLING,
    "hide_mtrr": abi.GUEST_FLAG_HIDE_MTRR,
    "rt": abi.GUEST_FLAG_RT,
    "nvmx_enabled": abi.GUEST_FLAG_NVMX_ENABLED,
    "security_vm": abi.GUEST_FLAG_SECURITY_VM,
    "vcat_enabled": abi.GUEST_FLAG_VCAT_ENABLED,
    "tee": abi.GUEST_FLAG_TEE,
    "ree": abi.GUEST_FLAG_REE,
    "pmu_passthrough": abi.GUEST_FLAG_PMU_PASSTHROUGH,
    "vhwp": abi.GUEST_FLAG_VHWP,
    "vtm": abi.GUEST_FLAG_VTM,
}  # GUEST_FLAG_STATIC_VM is not listed: it follows from `static`

# acrn_acpi_generic_address.space_id names (ACPI 6.x table 5.25).
ADDRESS_SPACES = {"system_memory": 0, "system_io": 1, "ffixed_hw": 0x7F}


class ScenarioError(ValueError):
    """A scenario that cannot be used: ``source: key: reason``."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PState:
    """One ``acrn_pstate_data`` entry (PM PX_DATA)."""

    core_frequency_mhz: int
    power_mw: int
    transition_latency_us: int
    bus_master_latency_us: int
    control: int
    status: int

    def pack(self) -> bytes:
        return bytes(
            abi.AcrnPstateData(
                self.core_frequency_mhz,
                self.power_mw,
                self.transition_latency_us,
                self.bus_master_latency_us,
                self.control,
                self.status,
            )
        )


@dataclass(frozen=True, slots=True)
class CState:
    """One ``acrn_cstate_data`` entry (PM CX_DATA): C1 is the first one."""

    space_id: int
    bit_width: int
    bit_offset: int
    access_size: int
    address: int
    type: int
    latency_us: int
    power_mw: int

    def pack(self) -> bytes:
        reg = abi.AcrnAcpiGenericAddress(
            self.space_id, self.bit_width, self.bit_offset, self.access_size, self.address
        )
        return bytes(abi.AcrnCstateData(reg, self.type, self.latency_us, self.power_mw))


@dataclass(frozen=True, slots=True)
class VmSlot:
    """One VM configuration slot (``vm_configs[i]``); its index is the absolute vmid."""

    load_order: str  # "service", "pre" or "post"
    name: str = ""  # empty for a dynamic slot
    static: bool = False  # post-launched with a fixed name (GUEST_FLAG_STATIC_VM)
    cpu_affinity: int = 0
    guest_flags: int = 0  # configured flags, STATIC_VM included
    severity: int = SEVERITY_STANDARD_VM
    privileged: bool = False  # Service VM only: CPUID 0x40000001 bit 0

    @property
    def dynamic(self) -> bool:
        return self.load_order == "post" and not self.static


@dataclass(frozen=True)
class Scenario:
    """A validated platform description; build with :func:`load_scenario` or :func:`parse_scenario`."""

    pcpus: int
    tsc_khz: int
    acrn: bool
    vms: tuple[VmSlot, ...]
    release: bool = False
    ivshmem: bool = True
    host_gsi_count: int = 120
    pstate_passthrough: bool = False
    pstates: tuple[PState, ...] = ()
    cstates: tuple[CState, ...] = ()
    pci_devices: tuple[int, ...] = ()  # physical BDFs the Service VM owns (u16 bus<<8|dev<<3|func)
    pci_bridges: tuple[int, ...] = ()
    source: str = "<default>"
    # LAPIC id of each pCPU (ACRN gives a vCPU the id of its pCPU); () = the host's MADT
    lapic_ids: tuple[int, ...] = ()
    lapic_source: str = "scenario"
    service_vm_id: int = field(init=False)

    def __post_init__(self) -> None:
        ids = [i for i, s in enumerate(self.vms) if s.load_order == "service"]
        object.__setattr__(self, "service_vm_id", ids[0] if ids else -1)
        if not self.lapic_ids:
            host = host_lapics()
            object.__setattr__(self, "lapic_ids", lapic_ids_for(self.pcpus, host))
            source = host.source if host.ids else f"identity ({host.source})"
            if host.ids and len(host.ids) < self.pcpus:
                source += f", pCPUs {len(host.ids)}-{self.pcpus - 1} on ids the host does not use"
            object.__setattr__(self, "lapic_source", source)

    def lapic_id(self, pcpu: int) -> int:
        """The LAPIC id of pCPU ``pcpu``."""
        return self.lapic_ids[pcpu]

    @property
    def max_vm_num(self) -> int:
        """CONFIG_MAX_VM_NUM: the number of slots."""
        return len(self.vms)

    @property
    def pcpu_mask(self) -> int:
        return (1 << self.pcpus) - 1

    @property
    def service_vm(self) -> VmSlot:
        return self.vms[self.service_vm_id]

    @property
    def privileged(self) -> bool:
        return self.service_vm.privileged

    @property
    def dm_owned_flags(self) -> int:
        """Bits CREATE_VM may set (vm_config.h; PMU passthrough only in debug builds)."""
        return abi.DM_OWNED_GUEST_FLAG_MASK if self.release else abi.DM_OWNED_GUEST_FLAG_MASK_DEBUG


def default_scenario() -> Scenario:
    """4 pCPUs at 2 GHz, ACRN present, a privileged Service VM at absolute id 0 on
    all pCPUs, and 16 dynamic post-launched slots whose default affinity is pCPU 0."""
    return parse_scenario(DEFAULT_SCENARIO_DATA, "<default>")


DEFAULT_SCENARIO_DATA: dict[str, Any] = {
    "platform": {
        "pcpus": 4,
        "tsc_khz": 2_000_000,
        "acrn": True,
        "release": False,
        "ivshmem": True,
        "host_gsi_count": 120,
        "pstate_passthrough": False,
        "pci_devices": ["00:14.0", "00:17.0", "00:1f.3"],
        "pci_bridges": ["00:1c.0"],
        "pstate": [
            {"core_frequency_mhz": f, "power_mw": p, "transition_latency_us": 10,
             "bus_master_latency_us": 10, "control": c, "status": c}
            for f, p, c in ((2001, 15000, 0x1400), (2000, 15000, 0x1400),
                            (1600, 11000, 0x1000), (800, 5000, 0x0800))
        ],
        "cstate": [
            {"space_id": "ffixed_hw", "bit_width": 1, "bit_offset": 2, "access_size": 1,
             "address": 0x00, "type": 1, "latency_us": 1, "power_mw": 1000},
            {"space_id": "ffixed_hw", "bit_width": 1, "bit_offset": 2, "access_size": 1,
             "address": 0x21, "type": 2, "latency_us": 253, "power_mw": 500},
            {"space_id": "system_io", "bit_width": 8, "bit_offset": 0, "access_size": 1,
             "address": 0x1816, "type": 3, "latency_us": 1048, "power_mw": 100},
        ],
    },
    "vm": [
        {"load_order": "service", "name": "ACRN_Service_VM", "cpu_affinity": 0xF,
         "privileged": True},
        {"load_order": "post", "count": 16, "cpu_affinity": 0x1, "severity": "standard"},
    ],
}  # fmt: skip


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario TOML file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ScenarioError(str(p), "(file)", e.strerror or str(e)) from e
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(str(p), "(syntax)", str(e)) from e
    return parse_scenario(data, str(p))


def parse_scenario(data: Mapping[str, Any], source: str = "<dict>") -> Scenario:
    """Validate a scenario given as the dict a TOML file parses to."""
    return _Parser(source).scenario(data)


def parse_bdf(text: str) -> int:
    """``"BB:DD.F"`` (hex) -> ``bus << 8 | dev << 3 | func``; ValueError if malformed."""
    try:
        bus_s, rest = text.split(":")
        dev_s, func_s = rest.split(".")
        bus, dev, func = int(bus_s, 16), int(dev_s, 16), int(func_s, 16)
    except ValueError:
        raise ValueError(f"{text!r} is not a BDF like '00:1f.3'") from None
    if not (0 <= bus <= 0xFF and 0 <= dev <= 0x1F and 0 <= func <= 7):
        raise ValueError(f"{text!r}: bus <= ff, device <= 1f, function <= 7")
    return bus << 8 | dev << 3 | func


def format_bdf(bdf: int) -> str:
    return f"{bdf >> 8:02x}:{(bdf >> 3) & 0x1F:02x}.{bdf & 7}"


class _Parser:
    """Validation with readable errors; one instance per source."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, reason: str) -> ScenarioError:
        return ScenarioError(self.source, key, reason)

    def table(self, data: object, key: str, allowed: set[str]) -> Mapping[str, Any]:
        if not isinstance(data, Mapping):
            raise self.fail(key, f"must be a table, not {type(data).__name__}")
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise self.fail(
                f"{key}.{unknown[0]}" if key else unknown[0],
                f"unknown key (known: {', '.join(sorted(allowed))})",
            )
        return data

    def int_(
        self,
        data: Mapping[str, Any],
        key: str,
        where: str,
        lo: int,
        hi: int,
        default: int | None = None,
    ) -> int:
        full = f"{where}.{key}" if where else key
        if key not in data:
            if default is None:
                raise self.fail(full, "missing")
            return default
        v = data[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(full, f"must be an integer, not {v!r}")
        if not lo <= v <= hi:
            raise self.fail(full, f"{v:#x} is out of range [{lo:#x}, {hi:#x}]")
        return v

    def bool_(self, data: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
        v = data.get(key, default)
        if not isinstance(v, bool):
            raise self.fail(f"{where}.{key}", f"must be true or false, not {v!r}")
        return v

    def str_(self, data: Mapping[str, Any], key: str, where: str, default: str) -> str:
        v = data.get(key, default)
        if not isinstance(v, str):
            raise self.fail(f"{where}.{key}", f"must be a string, not {v!r}")
        return v

    def bdfs(self, data: Mapping[str, Any], key: str) -> tuple[int, ...]:
        v = data.get(key, [])
        if not isinstance(v, list):
            raise self.fail(f"platform.{key}", "must be a list of 'BB:DD.F' strings")
        out: list[int] = []
        for i, item in enumerate(v):
            if not isinstance(item, str):
                raise self.fail(f"platform.{key}[{i}]", f"must be a 'BB:DD.F' string, not {item!r}")
            try:
                bdf = parse_bdf(item)
            except ValueError as e:
                raise self.fail(f"platform.{key}[{i}]", str(e)) from None
            if bdf in out:
                raise self.fail(f"platform.{key}[{i}]", f"{item} is listed twice")
            out.append(bdf)
        return tuple(out)

    def scenario(self, data: Mapping[str, Any]) -> Scenario:
        top = self.table(data, "", {"platform", "vm"})
        plat = self.table(top.get("platform", {}), "platform", {
            "pcpus", "tsc_khz", "acrn", "release", "ivshmem", "host_gsi_count",
            "pstate_passthrough", "pci_devices", "pci_bridges", "pstate", "cstate", "lapic_ids",
        })  # fmt: skip
        pcpus = self.int_(plat, "pcpus", "platform", 1, MAX_PCPUS, default=4)
        lapic_ids = self.lapic_ids(plat, pcpus)
        tsc_khz = self.int_(plat, "tsc_khz", "platform", 1, 0xFFFFFFFF, default=2_000_000)
        pci_devices = self.bdfs(plat, "pci_devices")
        pci_bridges = self.bdfs(plat, "pci_bridges")
        both = set(pci_devices) & set(pci_bridges)
        if both:
            raise self.fail(
                "platform.pci_bridges", f"{format_bdf(min(both))} is also in pci_devices"
            )
        pstates = tuple(
            self.pstate(e, f"platform.pstate[{i}]")
            for i, e in enumerate(self.array(plat, "pstate", MAX_PSTATES))
        )
        cstates = tuple(
            self.cstate(e, f"platform.cstate[{i}]")
            for i, e in enumerate(self.array(plat, "cstate", MAX_CSTATES))
        )
        vms = self.vms(top.get("vm"), pcpus)
        return Scenario(
            pcpus=pcpus,
            tsc_khz=tsc_khz,
            acrn=self.bool_(plat, "acrn", "platform", True),
            release=self.bool_(plat, "release", "platform", False),
            ivshmem=self.bool_(plat, "ivshmem", "platform", True),
            host_gsi_count=self.int_(plat, "host_gsi_count", "platform", 1, 0xFFFF, default=120),
            pstate_passthrough=self.bool_(plat, "pstate_passthrough", "platform", False),
            pstates=pstates,
            cstates=cstates,
            pci_devices=pci_devices,
            pci_bridges=pci_bridges,
            vms=vms,
            source=self.source,
            lapic_ids=lapic_ids,
        )

    def lapic_ids(self, plat: Mapping[str, Any], pcpus: int) -> tuple[int, ...]:
        """``platform.lapic_ids``: one xAPIC id per pCPU, all different; () when absent."""
        if "lapic_ids" not in plat:
            return ()
        v = plat["lapic_ids"]
        if not isinstance(v, list):
            raise self.fail("platform.lapic_ids", "must be a list of LAPIC ids, one per pCPU")
        if len(v) != pcpus:
            raise self.fail(
                "platform.lapic_ids", f"{len(v)} ids for {pcpus} pCPUs (one per pCPU, pCPU 0 first)"
            )
        seen: dict[int, int] = {}
        for i, item in enumerate(v):
            if isinstance(item, bool) or not isinstance(item, int):
                raise self.fail(f"platform.lapic_ids[{i}]", f"must be an integer, not {item!r}")
            if not 0 <= item <= MAX_XAPIC_ID:
                raise self.fail(
                    f"platform.lapic_ids[{i}]", f"{item:#x} is not an xAPIC id [0, {MAX_XAPIC_ID:#x}]"
                )
            if item in seen:
                raise self.fail(f"platform.lapic_ids[{i}]", f"{item} is also pCPU {seen[item]}'s")
            seen[item] = i
        return tuple(v)

    def array(self, data: Mapping[str, Any], key: str, limit: int) -> list[Any]:
        v = data.get(key, [])
        if not isinstance(v, list):
            raise self.fail(f"platform.{key}", f"must be an array of tables ([[platform.{key}]])")
        if len(v) > limit:
            raise self.fail(f"platform.{key}", f"{len(v)} entries, at most {limit}")
        return v

    def pstate(self, e: object, where: str) -> PState:
        keys = ("core_frequency_mhz", "power_mw", "transition_latency_us",
                "bus_master_latency_us", "control", "status")  # fmt: skip
        t = self.table(e, where, set(keys))
        return PState(*(self.int_(t, k, where, 0, 2**64 - 1) for k in keys))

    def cstate(self, e: object, where: str) -> CState:
        t = self.table(
            e,
            where,
            {
                "space_id",
                "bit_width",
                "bit_offset",
                "access_size",
                "address",
                "type",
                "latency_us",
                "power_mw",
            },
        )
        space = t.get("space_id")
        if isinstance(space, str):
            if space not in ADDRESS_SPACES:
                raise self.fail(
                    f"{where}.space_id",
                    f"{space!r} is not one of {', '.join(ADDRESS_SPACES)} or a number",
                )
            t = {**t, "space_id": ADDRESS_SPACES[space]}
        return CState(
            space_id=self.int_(t, "space_id", where, 0, 0xFF),
            bit_width=self.int_(t, "bit_width", where, 0, 0xFF),
            bit_offset=self.int_(t, "bit_offset", where, 0, 0xFF),
            access_size=self.int_(t, "access_size", where, 0, 0xFF),
            address=self.int_(t, "address", where, 0, 2**64 - 1),
            type=self.int_(t, "type", where, 0, 0xFF),
            latency_us=self.int_(t, "latency_us", where, 0, 0xFFFFFFFF),
            power_mw=self.int_(t, "power_mw", where, 0, 2**64 - 1),
        )

    def flags(self, v: object, where: str) -> int:
        if isinstance(v, int) and not isinstance(v, bool):
            if not 0 <= v < 2**64:
                raise self.fail(where, f"{v:#x} does not fit in 64 bits")
            if v & abi.GUEST_FLAG_STATIC_VM:
                raise self.fail(where, "STATIC_VM (bit 8) follows from `static`; do not set it")
            return v
        if not isinstance(v, list):
            raise self.fail(where, "must be a list of flag names or an integer")
        out = 0
        for i, name in enumerate(v):
            if name not in GUEST_FLAG_NAMES:
                raise self.fail(
                    f"{where}[{i}]", f"{name!r} is not one of {', '.join(GUEST_FLAG_NAMES)}"
                )
            out |= GUEST_FLAG_NAMES[name]
        return out

    def vms(self, v: object, pcpus: int) -> tuple[VmSlot, ...]:
        if v is None:
            raise self.fail(
                "vm", 'missing: at least the Service VM slot ([[vm]] load_order = "service")'
            )
        if not isinstance(v, list) or not v:
            raise self.fail("vm", "must be a non-empty array of tables ([[vm]])")
        slots: list[VmSlot] = []
        names: dict[str, str] = {}
        pcpu_mask = (1 << pcpus) - 1
        for i, entry in enumerate(v):
            where = f"vm[{i}]"
            t = self.table(
                entry,
                where,
                {
                    "load_order",
                    "name",
                    "static",
                    "cpu_affinity",
                    "guest_flags",
                    "severity",
                    "privileged",
                    "count",
                },
            )
            order = t.get("load_order")
            if order not in LOAD_ORDERS:
                raise self.fail(
                    f"{where}.load_order", f"must be one of {', '.join(LOAD_ORDERS)}, not {order!r}"
                )
            name = self.str_(t, "name", where, "")
            if len(name.encode()) >= MAX_VM_NAME_LEN:
                raise self.fail(
                    f"{where}.name", f"{name!r} is longer than {MAX_VM_NAME_LEN - 1} bytes"
                )
            if "\0" in name:
                raise self.fail(f"{where}.name", "must not contain NUL")
            static = self.bool_(t, "static", where, bool(name) or order != "post")
            if order != "post" and not static:
                raise self.fail(f"{where}.static", f"a {order}-launched slot is always static")
            if static and not name:
                raise self.fail(
                    f"{where}.name", "a static slot needs a name (CREATE_VM matches it)"
                )
            if not static and name:
                raise self.fail(
                    f"{where}.name", "a dynamic slot has no name: CREATE_VM gives it one"
                )
            if name:
                if name in names:
                    raise self.fail(f"{where}.name", f"{name!r} is already used by {names[name]}")
                names[name] = where
            affinity = self.int_(t, "cpu_affinity", where, 0, 2**64 - 1, default=0)
            if affinity & ~pcpu_mask:
                raise self.fail(
                    f"{where}.cpu_affinity",
                    f"{affinity:#x} names pCPUs the platform lacks (pcpus = {pcpus})",
                )
            if affinity == 0 and order != "post":
                raise self.fail(
                    f"{where}.cpu_affinity", f"a {order}-launched VM needs at least one pCPU"
                )
            if affinity.bit_count() > MAX_VCPUS_PER_VM:
                raise self.fail(f"{where}.cpu_affinity", f"more than {MAX_VCPUS_PER_VM} vCPUs")
            flags = self.flags(t.get("guest_flags", []), f"{where}.guest_flags")
            if static and order == "post":
                flags |= abi.GUEST_FLAG_STATIC_VM
            if order == "service":
                if "severity" in t:
                    raise self.fail(
                        f"{where}.severity", "the Service VM's severity is fixed (0x20)"
                    )
                severity = SEVERITY_SERVICE_VM
            else:
                severity = self.severity(t, where, order, flags)
            if "privileged" in t and order != "service":
                raise self.fail(f"{where}.privileged", "only the Service VM slot has this key")
            privileged = self.bool_(t, "privileged", where, True) if order == "service" else False
            count = self.int_(t, "count", where, 1, MAX_VM_NUM, default=1)
            if count > 1 and (order != "post" or static):
                raise self.fail(
                    f"{where}.count", "only dynamic post-launched slots can be repeated"
                )
            slot = VmSlot(order, name, static, affinity, flags, severity, privileged)
            slots.extend([slot] * count)
        services = [i for i, s in enumerate(slots) if s.load_order == "service"]
        if len(services) != 1:
            raise self.fail(
                "vm", f'exactly one slot must have load_order = "service" (found {len(services)})'
            )
        if len(slots) > MAX_VM_NUM:
            raise self.fail("vm", f"{len(slots)} slots, at most {MAX_VM_NUM}")
        return tuple(slots)

    def severity(self, t: Mapping[str, Any], where: str, order: str, flags: int) -> int:
        v = t.get("severity")
        if v is None:
            return SEVERITY_RTVM if flags & abi.GUEST_FLAG_RT else SEVERITY_STANDARD_VM
        if isinstance(v, str):
            if v not in SEVERITIES:
                raise self.fail(f"{where}.severity", f"{v!r} is not one of {', '.join(SEVERITIES)}")
            v = SEVERITIES[v]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFF:
            raise self.fail(f"{where}.severity", f"must be a name or a u8, not {v!r}")
        if order == "post" and v == SEVERITY_SAFETY_VM:
            raise self.fail(f"{where}.severity", "a safety VM is pre-launched")
        return v
