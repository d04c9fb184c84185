"""The host's processor LAPIC ids, from its ACPI MADT.

ACRN numbers physical CPUs in the order of the MADT's enabled processor
entries and gives every vCPU the LAPIC id of the pCPU it runs on; acrn-dm
reads the same table (``/sys/firmware/acpi/tables/APIC``,
``acpi_parser.c:parse_madt``) to turn ``--cpu_affinity`` LAPIC ids into pCPU
indexes and to write the guest's MADT. A scenario's pCPUs therefore default to
this table (docs/scenario.md, ``lapic_ids``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HOST_MADT = "/sys/firmware/acpi/tables/APIC"
_MADT_HEADER = 44  # ACPI table header (36) + local APIC address (4) + flags (4)
_TYPE_LOCAL_APIC = 0  # struct acpi_madt_local_apic: type, length, processor id, apic id, flags
_ENABLED = 1


@dataclass(frozen=True)
class HostLapics:
    """The enabled xAPIC ids in table order, or why there are none."""

    ids: tuple[int, ...]
    source: str  # "host MADT (PATH)" or the reason it could not be used


def parse_madt(table: bytes) -> list[int]:
    """The LAPIC ids of the enabled processor (type 0) entries, in table order.
    x2APIC entries are not counted, as acrn-dm does not count them."""
    if len(table) < _MADT_HEADER or table[:4] != b"APIC":
        raise ValueError("not an ACPI MADT (signature APIC)")
    (length,) = struct.unpack_from("<I", table, 4)
    end = min(length, len(table))
    ids: list[int] = []
    pos = _MADT_HEADER
    while pos + 2 <= end:
        etype, elen = table[pos], table[pos + 1]
        if elen < 2:
            break
        if etype == _TYPE_LOCAL_APIC and elen >= 8 and pos + 8 <= end:
            apic_id = table[pos + 3]
            (flags,) = struct.unpack_from("<I", table, pos + 4)
            if flags & _ENABLED:
                ids.append(apic_id)
        pos += elen
    return ids


def host_lapics(path: str = HOST_MADT) -> HostLapics:
    """The host's enabled LAPIC ids, or an empty tuple with the reason."""
    try:
        with open(path, "rb") as f:
            table = f.read()
    except OSError as e:
        return HostLapics((), f"{path}: {e.strerror}")
    try:
        ids = parse_madt(table)
    except ValueError as e:
        return HostLapics((), f"{path}: {e}")
    if not ids:
        return HostLapics((), f"{path}: no enabled xAPIC entry")
    return HostLapics(tuple(ids), f"host MADT ({path})")


def lapic_ids_for(pcpus: int, host: HostLapics) -> tuple[int, ...]:
    """LAPIC ids of pCPUs 0..pcpus-1: the host's, in MADT order, then (a scenario
    with more pCPUs than the host) the lowest ids the host does not use."""
    ids = list(host.ids[:pcpus])
    used = set(ids)
    candidate = 0
    while len(ids) < pcpus:
        if candidate not in used:
            ids.append(candidate)
            used.add(candidate)
        candidate += 1
    return tuple(ids)
