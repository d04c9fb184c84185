"""acrn_hsm_emu.abi against the system <linux/acrn.h>, as the C compiler sees it.

tests/clients/abi_dump.c prints every struct size and alignment, the offset,
size and kind of every (nested) field, every #define/enum constant and every
ioctl number of the header. The same lines are generated here from the
ctypes definitions and the two sets are compared in both directions; each
test reports all mismatches at once. A scan of the header text makes sure
abi_dump itself covers every #define and struct of the header.
"""

from __future__ import annotations

import ctypes
import pathlib
import re
import subprocess

import pytest

from acrn_hsm_emu import abi
from tests.support.cbuild import build_c

HEADER = pathlib.Path("/usr/include/linux/acrn.h")

pytestmark = pytest.mark.skipif(
    not HEADER.exists(), reason="linux-libc-dev's <linux/acrn.h> missing"
)


# ---------------------------------------------------------------------------
# the two sides
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def c_dump() -> dict[str, dict[str, str]]:
    """abi_dump's output, by kind: sizeof/alignof/field/const/ioctl -> key -> rest of line."""
    out = subprocess.run(
        [str(build_c("abi_dump"))], capture_output=True, text=True, check=True
    ).stdout
    return parse_dump(out.splitlines())


def parse_dump(lines: list[str]) -> dict[str, dict[str, str]]:
    parsed: dict[str, dict[str, str]] = {
        k: {} for k in ("sizeof", "alignof", "field", "const", "ioctl")
    }
    for line in lines:
        kind, key, rest = line.split(" ", 2)
        assert key not in parsed[kind], f"abi_dump printed {kind} {key} twice"
        parsed[kind][key] = rest
    return parsed


def _is_record(t: type) -> bool:
    return issubclass(t, ctypes.Structure | ctypes.Union)


def _int_kind(t: type) -> str:
    return "s" if t(-1).value < 0 else "u"


def py_fields(cls: type, prefix: str, base: int = 0) -> dict[str, str]:
    """The 'field' lines abi_dump would print for a ctypes type (same format)."""
    out: dict[str, str] = {}
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for entry in cls._fields_:
        name, ftype = entry[0], entry[1]
        desc = getattr(cls, name)
        off = base + desc.offset
        if name in anonymous:  # C names the members of an anonymous union directly
            out.update(py_fields(ftype, prefix, off))
            continue
        if name.startswith("_"):  # explicit padding, not a C member
            continue
        path = f"{prefix}.{name}"
        if issubclass(ftype, ctypes.Array):
            elem, count = ftype._type_, ftype._length_
            if _is_record(elem):
                out[path] = f"{off} {desc.size} ar{count}"
                for i in range(count):
                    out.update(py_fields(elem, f"{path}[{i}]", off + i * ctypes.sizeof(elem)))
            else:
                out[path] = f"{off} {desc.size} a{count}{_int_kind(elem)}"
        elif _is_record(ftype):
            out[path] = f"{off} {desc.size} r"
            out.update(py_fields(ftype, path, off))
        else:
            out[path] = f"{off} {desc.size} {_int_kind(ftype)}"
    return out


def py_dump() -> dict[str, dict[str, str]]:
    """What abi_dump should print, derived from acrn_hsm_emu.abi only."""
    d: dict[str, dict[str, str]] = {k: {} for k in ("sizeof", "alignof", "field", "const", "ioctl")}
    for cname, cls in abi.UAPI_STRUCTS.items():
        d["sizeof"][cname] = str(ctypes.sizeof(cls))
        d["alignof"][cname] = str(abi.C_ALIGNMENT_OVERRIDES.get(cname, ctypes.alignment(cls)))
        d["field"].update(py_fields(cls, cname))
    for number, name in abi.IOCTL_NAMES.items():
        d["ioctl"][name] = f"0x{number:08x}"
    return d


def compare(
    c: dict[str, dict[str, str]], py: dict[str, dict[str, str]], kinds: tuple[str, ...]
) -> list[str]:
    """Every difference between the C and the Python view, one line each."""
    problems = []
    for kind in kinds:
        for key in sorted(c[kind].keys() | py[kind].keys()):
            cv, pv = c[kind].get(key), py[kind].get(key)
            if cv != pv:
                problems.append(f"{kind} {key}: C says {cv!r}, abi.py says {pv!r}")
    return problems


# ---------------------------------------------------------------------------
# layout, constants, ioctl numbers
# ---------------------------------------------------------------------------


def test_struct_sizes_and_alignment(c_dump):
    problems = compare(c_dump, py_dump(), ("sizeof", "alignof"))
    assert not problems, "\n".join(problems)


def test_every_field_offset_size_and_kind(c_dump):
    problems = compare(c_dump, py_dump(), ("field",))
    assert not problems, f"{len(problems)} field mismatches:\n" + "\n".join(problems)


def test_every_constant(c_dump):
    problems = []
    for name, value in c_dump["const"].items():
        got = getattr(abi, name, None)
        if got != int(value):
            problems.append(f"{name}: header {value}, abi.py {got!r}")
    assert not problems, "\n".join(problems)


def test_every_ioctl_number(c_dump):
    problems = compare(c_dump, py_dump(), ("ioctl",))
    for name, value in c_dump["ioctl"].items():
        if getattr(abi, name, None) != int(value, 16):
            problems.append(f"{name}: header {value}, abi.{name} = {getattr(abi, name, None)!r}")
    assert not problems, "\n".join(problems)


def test_slot_offsets_match_the_compiler(c_dump):
    """The SLOT_* shortcuts equal what the compiler says about acrn_io_request."""
    f = c_dump["field"]

    def off(path: str) -> int:
        return int(f[f"acrn_io_request.{path}"].split()[0])

    expected = {
        "SLOT_TYPE": off("type"),
        "SLOT_COMPLETION_POLLING": off("completion_polling"),
        "SLOT_REQS": off("reqs"),
        "SLOT_DIRECTION": off("reqs.pio_request.direction"),
        "SLOT_ADDRESS": off("reqs.pio_request.address"),
        "SLOT_SIZE": off("reqs.pio_request.size"),
        "SLOT_VALUE": off("reqs.pio_request.value"),
        "SLOT_PCI_BUS": off("reqs.pci_request.bus"),
        "SLOT_PCI_DEV": off("reqs.pci_request.dev"),
        "SLOT_PCI_FUNC": off("reqs.pci_request.func"),
        "SLOT_PCI_REG": off("reqs.pci_request.reg"),
        "SLOT_KERNEL_HANDLED": off("kernel_handled"),
        "SLOT_PROCESSED": off("processed"),
        "IOREQ_SLOT_SIZE": int(c_dump["sizeof"]["acrn_io_request"]),
    }
    problems = [
        f"{k}: C {v}, abi {getattr(abi, k)}" for k, v in expected.items() if getattr(abi, k) != v
    ]
    assert not problems, "\n".join(problems)
    # MMIO and PCI values sit where the PIO value does.
    assert off("reqs.mmio_request.value") == off("reqs.pci_request.value") == abi.SLOT_VALUE


def test_abi_dump_covers_the_whole_header(c_dump):
    """Every #define, enum member and struct of the header appears in abi_dump's output.

    Guards against a newer header adding something abi_dump (and abi.py) miss.
    """
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    defines = set(re.findall(r"^\s*#\s*define\s+(\w+)", text, flags=re.M)) - {"_ACRN_H"}
    enum_members: set[str] = set()
    for body in re.findall(r"enum\s+\w+\s*\{(.*?)\}", text, flags=re.S):
        enum_members |= {m.split("=")[0].strip() for m in body.split(",") if m.strip()}
    structs = set(re.findall(r"^struct\s+(\w+)\s*\{", text, flags=re.M))
    dumped = c_dump["const"].keys() | c_dump["ioctl"].keys()
    missing = sorted((defines | enum_members) - dumped) + sorted(structs - c_dump["sizeof"].keys())
    assert not missing, f"abi_dump.c does not print: {missing}"
    assert structs == set(abi.UAPI_STRUCTS), "abi.UAPI_STRUCTS differs from the header's structs"


def test_comparison_catches_a_wrong_offset(c_dump):
    """Self-test of the checker: a one-byte shift anywhere must be reported."""
    mutated = {k: dict(v) for k, v in c_dump.items()}
    key = "acrn_vcpu_regs.vcpu_regs.idt.base"
    off, size, kind = mutated["field"][key].split()
    mutated["field"][key] = f"{int(off) + 1} {size} {kind}"
    problems = compare(mutated, py_dump(), ("field",))
    assert problems == [
        f"field {key}: C says '{int(off) + 1} {size} {kind}', abi.py says '{off} {size} {kind}'"
    ]

    class Shifted(ctypes.LittleEndianStructure):  # acrn_descriptor_ptr without packing
        _fields_ = abi.AcrnDescriptorPtr._fields_

    got = py_fields(Shifted, "acrn_descriptor_ptr")
    want = {k: v for k, v in c_dump["field"].items() if k.startswith("acrn_descriptor_ptr.")}
    assert got != want


# ---------------------------------------------------------------------------
# _IOC helpers and the ioctl table, independent of the compiler
# ---------------------------------------------------------------------------

# From spec hsm section 4 (numbers as the kernel computes them on x86-64).
SPEC_IOCTLS = {
    "ACRN_IOCTL_CREATE_VM": 0xC030A210,
    "ACRN_IOCTL_DESTROY_VM": 0xA211,
    "ACRN_IOCTL_START_VM": 0xA212,
    "ACRN_IOCTL_PAUSE_VM": 0xA213,
    "ACRN_IOCTL_RESET_VM": 0xA215,
    "ACRN_IOCTL_SET_VCPU_REGS": 0x4128A216,
    "ACRN_IOCTL_INJECT_MSI": 0x4010A223,
    "ACRN_IOCTL_VM_INTR_MONITOR": 0x4008A224,
    "ACRN_IOCTL_SET_IRQLINE": 0x4008A225,
    "ACRN_IOCTL_NOTIFY_REQUEST_FINISH": 0x4008A231,
    "ACRN_IOCTL_CREATE_IOREQ_CLIENT": 0xA232,
    "ACRN_IOCTL_ATTACH_IOREQ_CLIENT": 0xA233,
    "ACRN_IOCTL_DESTROY_IOREQ_CLIENT": 0xA234,
    "ACRN_IOCTL_CLEAR_VM_IOREQ": 0xA235,
    "ACRN_IOCTL_SET_MEMSEG": 0x4020A241,
    "ACRN_IOCTL_UNSET_MEMSEG": 0x4020A242,
    "ACRN_IOCTL_SET_PTDEV_INTR": 0x4014A253,
    "ACRN_IOCTL_RESET_PTDEV_INTR": 0x4014A254,
    "ACRN_IOCTL_ASSIGN_PCIDEV": 0x4024A255,
    "ACRN_IOCTL_DEASSIGN_PCIDEV": 0x4024A256,
    "ACRN_IOCTL_ASSIGN_MMIODEV": 0x4068A257,
    "ACRN_IOCTL_DEASSIGN_MMIODEV": 0x4068A258,
    "ACRN_IOCTL_CREATE_VDEV": 0x40C0A259,
    "ACRN_IOCTL_DESTROY_VDEV": 0x40C0A25A,
    "ACRN_IOCTL_PM_GET_CPU_STATE": 0xC008A260,
    "ACRN_IOCTL_IOEVENTFD": 0x4020A270,
    "ACRN_IOCTL_IRQFD": 0x4018A271,
}


def test_ioctl_numbers_match_spec_table():
    problems = [
        f"{n}: spec 0x{v:08x}, abi 0x{getattr(abi, n):08x}"
        for n, v in SPEC_IOCTLS.items()
        if getattr(abi, n) != v
    ]
    assert not problems, "\n".join(problems)
    assert abi.IOCTL_NAMES == {v: n for n, v in SPEC_IOCTLS.items()}


@pytest.mark.parametrize("name", sorted(SPEC_IOCTLS))
def test_ioc_decode_roundtrip(name):
    cmd = getattr(abi, name)
    assert abi.ioc_type(cmd) == abi.ACRN_IOCTL_TYPE
    assert abi.ioc(abi.ioc_dir(cmd), abi.ioc_type(cmd), abi.ioc_nr(cmd), abi.ioc_size(cmd)) == cmd
    # _IO ioctls carry no size; everything else carries exactly one of the sizes below.
    if abi.ioc_dir(cmd) == abi.IOC_NONE:
        assert abi.ioc_size(cmd) == 0
    else:
        assert abi.ioc_size(cmd) in {ctypes.sizeof(c) for c in abi.UAPI_STRUCTS.values()} | {8}


def test_ioc_helpers():
    # Values straight from the Linux encoding: dir<<30 | size<<16 | type<<8 | nr.
    assert abi.io(0xA2, 0x11) == 0xA211
    assert abi.iow(0xA2, 0x25, 8) == 0x4008A225
    assert abi.ior(0xA2, 0x01, 4) == 0x8004A201
    assert abi.iowr(0xA2, 0x10, 48) == 0xC030A210
    cmd = abi.iowr(0x12, 0x34, 0x3FFF)
    assert (abi.ioc_dir(cmd), abi.ioc_type(cmd), abi.ioc_nr(cmd), abi.ioc_size(cmd)) == (
        3,
        0x12,
        0x34,
        0x3FFF,
    )
    for bad in ((4, 0, 0, 0), (0, 256, 0, 0), (0, 0, 256, 0), (0, 0, 0, 1 << 14), (0, 0, -1, 0)):
        with pytest.raises(ValueError):
            abi.ioc(*bad)


# ---------------------------------------------------------------------------
# hypervisor-side layouts and numbers (not in the uapi)
# ---------------------------------------------------------------------------


def _offsets(cls: type) -> dict[str, tuple[int, int]]:
    return {f[0]: (getattr(cls, f[0]).offset, getattr(cls, f[0]).size) for f in cls._fields_}


def test_intr_monitor_layout():
    assert ctypes.sizeof(abi.AcrnIntrMonitor) == 392
    assert ctypes.alignment(abi.AcrnIntrMonitor) == 8
    assert _offsets(abi.AcrnIntrMonitor) == {"cmd": (0, 4), "buf_cnt": (4, 4), "buffer": (8, 384)}
    assert abi.AcrnIntrMonitor.buffer.size // 8 == 2 * abi.MAX_PTDEV_NUM == 48
    assert (abi.INTR_CMD_GET_DATA, abi.INTR_CMD_DELAY_INT) == (0, 1)


def test_memory_region_layouts():
    assert ctypes.sizeof(abi.VmMemoryRegionOp) == 32
    assert _offsets(abi.VmMemoryRegionOp) == {
        "type": (0, 4),
        "attr": (4, 4),
        "user_vm_pa": (8, 8),
        "service_vm_pa": (16, 8),
        "size": (24, 8),
    }
    assert ctypes.sizeof(abi.VmMemoryRegionBatch) == 24
    assert _offsets(abi.VmMemoryRegionBatch) == {
        "vmid": (0, 2),
        "reserved": (2, 6),
        "regions_num": (8, 4),
        "regions_gpa": (16, 8),
    }
    assert (abi.MR_ADD, abi.MR_DEL) == (0, 2)


def test_irqline_ops_is_the_ioctl_value():
    assert ctypes.sizeof(abi.AcrnIrqlineOps) == 8
    value = 9 | abi.IRQ_FALLING_PULSE << 32  # how acrn-dm packs it: gsi low, op high
    ops = abi.AcrnIrqlineOps.from_buffer_copy(value.to_bytes(8, "little"))
    assert (ops.gsi, ops.op) == (9, abi.IRQ_FALLING_PULSE)
    assert (abi.IRQ_SET_HIGH, abi.IRQ_SET_LOW, abi.IRQ_RAISING_PULSE, abi.IRQ_FALLING_PULSE) == (
        0,
        1,
        2,
        3,
    )


def test_hypercall_ids():
    expected = {
        "HC_SOS_REMOVE_CPU": 0x80000001,
        "HC_CREATE_VM": 0x80000010,
        "HC_DESTROY_VM": 0x80000011,
        "HC_START_VM": 0x80000012,
        "HC_PAUSE_VM": 0x80000013,
        "HC_RESET_VM": 0x80000015,
        "HC_SET_VCPU_REGS": 0x80000016,
        "HC_INJECT_MSI": 0x80000023,
        "HC_VM_INTR_MONITOR": 0x80000024,
        "HC_SET_IRQLINE": 0x80000025,
        "HC_SET_IOREQ_BUFFER": 0x80000030,
        "HC_NOTIFY_REQUEST_FINISH": 0x80000031,
        "HC_VM_SET_MEMORY_REGIONS": 0x80000042,
        "HC_SET_PTDEV_INTR": 0x80000053,
        "HC_RESET_PTDEV_INTR": 0x80000054,
        "HC_ASSIGN_PCIDEV": 0x80000055,
        "HC_DEASSIGN_PCIDEV": 0x80000056,
        "HC_ASSIGN_MMIODEV": 0x80000057,
        "HC_DEASSIGN_MMIODEV": 0x80000058,
        "HC_CREATE_VDEV": 0x80000059,
        "HC_DESTROY_VDEV": 0x8000005A,
        "HC_PM_GET_CPU_STATE": 0x80000080,
    }
    problems = [
        f"{n}: 0x{v:08x} != 0x{getattr(abi, n, 0):08x}"
        for n, v in expected.items()
        if getattr(abi, n, None) != v
    ]
    assert not problems, "\n".join(problems)
    assert len(set(abi.HYPERCALL_NAMES)) == len(abi.HYPERCALL_NAMES)
    for name, value in expected.items():
        assert abi.HYPERCALL_NAMES[value] == name


def test_cpuid_and_guest_flags():
    assert abi.ACRN_SIGNATURE_REG.to_bytes(4, "little") == b"ACRN"
    assert (
        abi.ACRN_CPUID_SIGNATURE_LEAF,
        abi.ACRN_CPUID_FEATURES_LEAF,
        abi.ACRN_CPUID_TIMING_LEAF,
    ) == (
        0x40000000,
        0x40000001,
        0x40000010,
    )
    assert abi.ACRN_FEATURE_PRIVILEGED_VM == 1
    bits = {
        "SECURE_WORLD_ENABLED": 0,
        "LAPIC_PASSTHROUGH": 1,
        "IO_COMPLETION_POLLING": 2,
        "HIDE_MTRR": 3,
        "RT": 4,
        "NVMX_ENABLED": 5,
        "SECURITY_VM": 6,
        "VCAT_ENABLED": 7,
        "STATIC_VM": 8,
        "TEE": 9,
        "REE": 10,
        "PMU_PASSTHROUGH": 11,
        "VHWP": 12,
        "VTM": 13,
    }
    problems = [n for n, b in bits.items() if getattr(abi, f"GUEST_FLAG_{n}") != 1 << b]
    assert not problems
    assert abi.DM_OWNED_GUEST_FLAG_MASK == 0b10111


def test_structs_round_trip_bytes():
    """The classes are usable as wire formats: build, serialise, parse back."""
    regs = abi.AcrnVcpuRegs(vcpu_id=1)
    regs.vcpu_regs.gdt.base = 0x1122334455667788
    regs.vcpu_regs.gdt.limit = 0xFFFF
    raw = bytes(regs)
    assert len(raw) == 296
    assert raw[8 + 128 : 8 + 128 + 10] == bytes.fromhex("ffff8877665544332211")
    memmap = abi.AcrnVmMemmap(type=abi.ACRN_MEMMAP_RAM, vma_base=0x7F0000001000, len=4096)
    assert abi.AcrnVmMemmap.from_buffer_copy(bytes(memmap)).service_vm_pa == 0x7F0000001000
    page = abi.AcrnIoRequestBuffer()
    page.req_slot[3].reqs.pci_request.reg = 0x104
    assert int.from_bytes(bytes(page)[3 * 256 + abi.SLOT_PCI_REG :][:4], "little") == 0x104


def test_the_native_request_cycle_uses_the_same_slot_layout():
    """The C (native/slot.h) has its own copy of the offsets."""
    from acrn_hsm_emu._native import lib

    assert (lib.HSM_SLOT_VALUE, lib.HSM_SLOT_STATE) == (abi.SLOT_VALUE, abi.SLOT_PROCESSED)
    assert (lib.HSM_SLOT_POLLING, lib.HSM_SLOT_DIRECTION, lib.HSM_SLOT_ADDRESS, lib.HSM_SLOT_SIZE,
            lib.HSM_SLOT_KH) == (abi.SLOT_COMPLETION_POLLING, abi.SLOT_DIRECTION, abi.SLOT_ADDRESS,
                                 abi.SLOT_SIZE, abi.SLOT_KERNEL_HANDLED)
    assert (lib.HSM_STATE_PENDING, lib.HSM_STATE_COMPLETE, lib.HSM_STATE_FREE) == (
        abi.ACRN_IOREQ_STATE_PENDING,
        abi.ACRN_IOREQ_STATE_COMPLETE,
        abi.ACRN_IOREQ_STATE_FREE,
    )
