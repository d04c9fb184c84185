"""Scripted workloads: what each vCPU of a VM does when no real guest code runs.

A workload lists, per vCPU, a sequence of steps: port I/O and MMIO reads and
writes, PCI configuration accesses through 0xCF8/0xCFC, CPUID queries, and
sleeps, each with a repeat count and optional expected values. The scripted
backend (``backends/scripted.py``) replays it after START_VM. The file format
(TOML or JSON, same structure) is documented in ``docs/workload.md``;
:meth:`Workload.build` makes one in code.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acrn_hsm_emu.hypervisor.api import Access
from acrn_hsm_emu.hypervisor.scenario import MAX_VCPUS_PER_VM

PIO_SIZES = (1, 2, 4)
MMIO_SIZES = (1, 2, 4, 8)
OPS = ("pio", "mmio", "pci", "cpuid", "sleep", "triple_fault")
CPUID_REGS = ("eax", "ebx", "ecx", "edx")


class WorkloadError(ValueError):
    """A workload that cannot be used: ``source: where: reason``."""


def pci_address(bus: int, dev: int, func: int, reg: int) -> int:
    """``Access.addr`` of a PCI configuration access.

    The layout is the 0xCF8 one without the enable bit: bus 23:16, device
    15:11, function 10:8, register bits 7:0 in 7:0 and register bits 11:8 in
    27:24, so extended (PCIe) registers fit too.
    """
    return bus << 16 | dev << 11 | func << 8 | (reg & 0xFF) | (reg & 0xF00) << 16


def pci_reg(addr: int) -> int:
    """Register number of a PCI ``Access.addr`` (inverse of :func:`pci_address`)."""
    return (addr & 0xFF) | (addr >> 16) & 0xF00


def check_access(access: Access) -> None:
    """Raise ValueError if a guest could not perform ``access``."""
    kind, size, addr = access.kind, access.size, access.addr
    if kind == "pio":
        if size not in PIO_SIZES:
            raise ValueError(f"pio size must be 1, 2 or 4, not {size}")
        if not 0 <= addr <= 0xFFFF:
            raise ValueError(f"port {addr:#x} is not in [0, 0xffff]")
    elif kind == "mmio":
        if size not in MMIO_SIZES:
            raise ValueError(f"mmio size must be 1, 2, 4 or 8, not {size}")
        if not 0 <= addr < 2**64:
            raise ValueError(f"address {addr:#x} does not fit in 64 bits")
    elif kind == "pci":
        if size not in PIO_SIZES:
            raise ValueError(f"pci size must be 1, 2 or 4, not {size}")
        if addr & ~0x0FFFFFFF or addr < 0:
            raise ValueError(f"pci address {addr:#x} has bits above 27 set")
        if (pci_reg(addr) & 3) + size > 4:
            raise ValueError(f"a {size}-byte access at register {pci_reg(addr):#x} crosses a dword")
    else:
        raise ValueError(f"access kind must be pio, mmio or pci, not {kind!r}")
    if not 0 <= access.value < 1 << (8 * size):
        raise ValueError(f"value {access.value:#x} does not fit in {size} bytes")


@dataclass(frozen=True, slots=True)
class Step:
    """One workload step; build with the class methods (``Step.pio(...)`` ...)."""

    op: str
    access: Access | None = None  # pio / mmio / pci
    expect: int | None = None  # expected read value
    leaf: int = 0  # cpuid
    subleaf: int = 0
    expect_regs: tuple[int | None, int | None, int | None, int | None] | None = None
    seconds: float = 0.0  # sleep
    repeat: int = 1

    @classmethod
    def pio(
        cls,
        port: int,
        size: int,
        *,
        write: bool = False,
        value: int = 0,
        expect: int | None = None,
        repeat: int = 1,
    ) -> Step:
        return cls._io(Access("pio", write, port, size, value), expect, repeat)

    @classmethod
    def mmio(
        cls,
        gpa: int,
        size: int,
        *,
        write: bool = False,
        value: int = 0,
        expect: int | None = None,
        repeat: int = 1,
    ) -> Step:
        return cls._io(Access("mmio", write, gpa, size, value), expect, repeat)

    @classmethod
    def pci(
        cls,
        bus: int,
        dev: int,
        func: int,
        reg: int,
        size: int,
        *,
        write: bool = False,
        value: int = 0,
        expect: int | None = None,
        repeat: int = 1,
    ) -> Step:
        if not (0 <= bus <= 0xFF and 0 <= dev <= 0x1F and 0 <= func <= 7 and 0 <= reg <= 0xFFF):
            raise ValueError(
                f"pci {bus:#x}:{dev:#x}.{func} reg {reg:#x}: bus <= ff, dev <= 1f, "
                "func <= 7, reg <= fff"
            )
        return cls._io(
            Access("pci", write, pci_address(bus, dev, func, reg), size, value), expect, repeat
        )

    @classmethod
    def cpuid(
        cls,
        leaf: int,
        subleaf: int = 0,
        *,
        expect: Mapping[str, int] | Iterable[int | None] | None = None,
        repeat: int = 1,
    ) -> Step:
        """``expect``: {"eax": .., ...} (any subset) or 4 values, None = don't care."""
        regs = None
        if expect is not None:
            if isinstance(expect, Mapping):
                unknown = set(expect) - set(CPUID_REGS)
                if unknown:
                    raise ValueError(f"cpuid expect: unknown register {sorted(unknown)[0]!r}")
                values = [expect.get(r) for r in CPUID_REGS]
            else:
                values = list(expect)
                if len(values) != 4:
                    raise ValueError("cpuid expect needs 4 values (eax, ebx, ecx, edx)")
            for v in values:
                if v is not None and not 0 <= v <= 0xFFFFFFFF:
                    raise ValueError(f"cpuid expect value {v:#x} does not fit in 32 bits")
            regs = (values[0], values[1], values[2], values[3])
        if not (0 <= leaf <= 0xFFFFFFFF and 0 <= subleaf <= 0xFFFFFFFF):
            raise ValueError("cpuid leaf and subleaf are 32-bit")
        _check_repeat(repeat)
        return cls("cpuid", leaf=leaf, subleaf=subleaf, expect_regs=regs, repeat=repeat)

    @classmethod
    def sleep(cls, seconds: float, *, repeat: int = 1) -> Step:
        if not 0 <= seconds <= 3600:
            raise ValueError(f"sleep of {seconds} s is not in [0, 3600]")
        _check_repeat(repeat)
        return cls("sleep", seconds=seconds, repeat=repeat)

    @classmethod
    def triple_fault(cls) -> Step:
        """The guest triple-faults here: the hypervisor's reaction (spec hv A.2.7)
        follows, and the vCPU runs no further step until RESET_VM."""
        return cls("triple_fault")

    @classmethod
    def _io(cls, access: Access, expect: int | None, repeat: int) -> Step:
        check_access(access)
        if expect is not None:
            if access.write:
                raise ValueError("`expect` is for reads; a write has no result")
            if not 0 <= expect < 1 << (8 * access.size):
                raise ValueError(f"expect {expect:#x} does not fit in {access.size} bytes")
        _check_repeat(repeat)
        return cls(access.kind, access=access, expect=expect, repeat=repeat)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"op": self.op}
        a = self.access
        if a is not None:
            if a.kind == "pio":
                d["port"] = a.addr
            elif a.kind == "mmio":
                d["addr"] = a.addr
            else:
                reg = pci_reg(a.addr)
                d.update(
                    bus=a.addr >> 16 & 0xFF, dev=a.addr >> 11 & 0x1F, func=a.addr >> 8 & 7, reg=reg
                )
            d["size"] = a.size
            if a.write:
                d["write"] = True
                d["value"] = a.value
            if self.expect is not None:
                d["expect"] = self.expect
        elif self.op == "cpuid":
            d["leaf"] = self.leaf
            if self.subleaf:
                d["subleaf"] = self.subleaf
            if self.expect_regs is not None:
                d["expect"] = {
                    r: v for r, v in zip(CPUID_REGS, self.expect_regs, strict=True) if v is not None
                }
        elif self.op == "sleep":
            d["us"] = round(self.seconds * 1e6)
        if self.repeat != 1:
            d["repeat"] = self.repeat
        return d


def _check_repeat(repeat: int) -> None:
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an integer >= 1, not {repeat!r}")


@dataclass(frozen=True, slots=True)
class VcpuProgram:
    """One vCPU's steps, run ``repeat`` times (0: forever, until PAUSE_VM)."""

    steps: tuple[Step, ...]
    repeat: int = 1

    @property
    def accesses_per_run(self) -> int:
        """Guest I/O accesses one pass performs (a PCI step counts once)."""
        return sum(s.repeat for s in self.steps if s.access is not None)


@dataclass(frozen=True)
class Workload:
    """Per-vCPU programs; a vCPU without one idles (only injected accesses)."""

    programs: Mapping[int, VcpuProgram] = field(default_factory=dict)
    name: str = ""

    @classmethod
    def build(
        cls,
        programs: Mapping[int, Iterable[Step] | VcpuProgram],
        *,
        repeat: int = 1,
        name: str = "",
    ) -> Workload:
        """Make a workload in code: ``Workload.build({0: [Step.pio(...), ...], 1: ...})``."""
        out: dict[int, VcpuProgram] = {}
        for vcpu, prog in programs.items():
            if not 0 <= vcpu < MAX_VCPUS_PER_VM:
                raise ValueError(f"vcpu {vcpu} is not in [0, {MAX_VCPUS_PER_VM - 1}]")
            if not isinstance(prog, VcpuProgram):
                prog = VcpuProgram(tuple(prog), repeat)
            if prog.repeat < 0:
                raise ValueError(f"vcpu {vcpu}: repeat must be >= 0")
            out[vcpu] = prog
        return cls(out, name)

    @classmethod
    def load(cls, path: str | Path) -> Workload:
        """Read a workload file: ``.json`` is JSON, anything else TOML."""
        p = Path(path)
        try:
            with p.open("rb") as f:
                data = json.load(f) if p.suffix == ".json" else tomllib.load(f)
        except OSError as e:
            raise WorkloadError(f"{p}: {e.strerror or e}") from e
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WorkloadError(f"{p}: syntax: {e}") from e
        return cls.from_dict(data, str(p))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Workload:
        return _Loader(source).workload(data)

    def to_dict(self) -> dict[str, Any]:
        """The file structure (JSON-serialisable); ``from_dict(to_dict())`` round-trips."""
        d: dict[str, Any] = {
            "vcpu": [
                {"id": v, "repeat": p.repeat, "steps": [s.to_dict() for s in p.steps]}
                for v, p in sorted(self.programs.items())
            ]
        }
        if self.name:
            d["name"] = self.name
        return d


_STEP_KEYS = {
    "pio": {"port", "size", "write", "value", "expect"},
    "mmio": {"addr", "size", "write", "value", "expect"},
    "pci": {"bus", "dev", "func", "reg", "size", "write", "value", "expect"},
    "cpuid": {"leaf", "subleaf", "expect"},
    "sleep": {"us", "ms"},
    "triple_fault": set(),
}


class _Loader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, reason: str) -> WorkloadError:
        return WorkloadError(f"{self.source}: {where}: {reason}")

    def int_(self, d: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
        if key not in d:
            if default is None:
                raise self.fail(where, f"missing `{key}`")
            return default
        v = d[key]
        if isinstance(v, str):  # JSON has no hex literals: accept "0x3f8"
            try:
                v = int(v, 0)
            except ValueError:
                raise self.fail(f"{where}.{key}", f"{d[key]!r} is not a number") from None
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(f"{where}.{key}", f"must be an integer, not {v!r}")
        return v

    def workload(self, data: Mapping[str, Any]) -> Workload:
        if not isinstance(data, Mapping):
            raise self.fail("(top)", "must be a table")
        unknown = set(data) - {"name", "repeat", "vcpu"}
        if unknown:
            raise self.fail(sorted(unknown)[0], "unknown key (known: name, repeat, vcpu)")
        name = data.get("name", "")
        if not isinstance(name, str):
            raise self.fail("name", "must be a string")
        default_repeat = self.int_(data, "repeat", "(top)", 1)
        vcpus = data.get("vcpu", [])
        if not isinstance(vcpus, list):
            raise self.fail("vcpu", "must be an array of tables ([[vcpu]])")
        programs: dict[int, VcpuProgram] = {}
        for i, v in enumerate(vcpus):
            where = f"vcpu[{i}]"
            if not isinstance(v, Mapping):
                raise self.fail(where, "must be a table")
            unknown = set(v) - {"id", "repeat", "steps"}
            if unknown:
                raise self.fail(
                    f"{where}.{sorted(unknown)[0]}", "unknown key (known: id, repeat, steps)"
                )
            vid = self.int_(v, "id", where)
            if not 0 <= vid < MAX_VCPUS_PER_VM:
                raise self.fail(f"{where}.id", f"{vid} is not in [0, {MAX_VCPUS_PER_VM - 1}]")
            if vid in programs:
                raise self.fail(f"{where}.id", f"vcpu {vid} is listed twice")
            repeat = self.int_(v, "repeat", where, default_repeat)
            if repeat < 0:
                raise self.fail(f"{where}.repeat", "must be >= 0 (0 = forever)")
            steps = v.get("steps", [])
            if not isinstance(steps, list):
                raise self.fail(f"{where}.steps", "must be an array of tables")
            programs[vid] = VcpuProgram(
                tuple(self.step(s, f"{where}.steps[{j}]") for j, s in enumerate(steps)), repeat
            )
        return Workload(programs, name)

    def step(self, s: object, where: str) -> Step:
        if not isinstance(s, Mapping):
            raise self.fail(where, "must be a table")
        op = s.get("op")
        if op not in OPS:
            raise self.fail(f"{where}.op", f"must be one of {', '.join(OPS)}, not {op!r}")
        allowed = _STEP_KEYS[op] | {"op", "repeat"}
        unknown = set(s) - allowed
        if unknown:
            raise self.fail(
                f"{where}.{sorted(unknown)[0]}",
                f"unknown key for {op} (known: {', '.join(sorted(allowed))})",
            )
        repeat = self.int_(s, "repeat", where, 1)
        try:
            if op == "triple_fault":
                if repeat != 1:
                    raise ValueError("a triple fault happens once (no `repeat`)")
                return Step.triple_fault()
            if op == "sleep":
                if ("us" in s) == ("ms" in s):
                    raise ValueError("give exactly one of `us` or `ms`")
                us = self.int_(s, "us", where) if "us" in s else self.int_(s, "ms", where) * 1000
                return Step.sleep(us / 1e6, repeat=repeat)
            if op == "cpuid":
                expect = s.get("expect")
                if expect is not None:
                    if isinstance(expect, Mapping):
                        expect = {k: self.int_(expect, k, f"{where}.expect") for k in expect}
                    elif isinstance(expect, list):
                        expect = [
                            None if x is None else self.int_({"v": x}, "v", f"{where}.expect")
                            for x in expect
                        ]
                    else:
                        raise ValueError("`expect` is a table {eax = ..} or a list of 4 values")
                return Step.cpuid(
                    self.int_(s, "leaf", where),
                    self.int_(s, "subleaf", where, 0),
                    expect=expect,
                    repeat=repeat,
                )
            write = s.get("write", False)
            if not isinstance(write, bool):
                raise ValueError("`write` must be true or false")
            if not write and "value" in s:
                raise ValueError("`value` is for writes (write = true)")
            kw: dict[str, Any] = {
                "write": write,
                "value": self.int_(s, "value", where, 0),
                "expect": self.int_(s, "expect", where) if "expect" in s else None,
                "repeat": repeat,
            }
            size = self.int_(s, "size", where)
            if op == "pio":
                return Step.pio(self.int_(s, "port", where), size, **kw)
            if op == "mmio":
                return Step.mmio(self.int_(s, "addr", where), size, **kw)
            return Step.pci(
                self.int_(s, "bus", where, 0),
                self.int_(s, "dev", where),
                self.int_(s, "func", where, 0),
                self.int_(s, "reg", where),
                size,
                **kw,
            )
        except ValueError as e:
            if isinstance(e, WorkloadError):
                raise
            raise self.fail(where, str(e)) from None
