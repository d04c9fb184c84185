"""The extension ABI's C header against its Python bindings, as the compiler sees it.

tests/clients/ext_abi_dump.c prints every struct size, field offset and
size, constant and ioctl number of include/acrn_hsm_emu.h; the same lines
are generated from acrn_hsm_emu.client.extension and compared both ways. A
scan of the header text makes sure the dump covers every #define and
struct, and that the repository's include/ path is the packaged header.
"""

from __future__ import annotations

import ctypes
import pathlib
import re
import subprocess

from acrn_hsm_emu import abi
from acrn_hsm_emu.client import extension as ext
from tests.support.ext import build_ext

REPO = pathlib.Path(__file__).resolve().parent.parent


def c_lines() -> set[str]:
    out = subprocess.run([str(build_ext("ext_abi_dump"))], capture_output=True, text=True, check=True)
    return set(out.stdout.splitlines())


def py_lines() -> set[str]:
    lines = set()
    for name, cls in ext.EXT_STRUCTS.items():
        lines.add(f"sizeof {name} {ctypes.sizeof(cls)}")
        for fname, *_ in cls._fields_:
            f = getattr(cls, fname)
            lines.add(f"field {name}.{fname} {f.offset} {f.size}")
    for c in (
        "ACRN_EMU_IOCTL_TYPE", "ACRN_EMU_ABI_MAJOR", "ACRN_EMU_ABI_MINOR",
        "ACRN_EMU_FEATURE_BIND", "ACRN_EMU_FEATURE_RANGE_CLIENT", "ACRN_EMU_FEATURE_PCI_RANGES",
        "ACRN_EMU_FEATURE_VALUE_CALL",
        "ACRN_EMU_RANGE_PIO", "ACRN_EMU_RANGE_MMIO", "ACRN_EMU_RANGE_PCI",
        "ACRN_EMU_NAME_LEN", "ACRN_EMU_MAX_RANGES",
    ):  # fmt: skip
        lines.add(f"const {c} {getattr(ext, c)}")
    lines.add(f"const ACRN_EMU_PCI_BDF(0xab, 0x1f, 7) {ext.pci_bdf(0xAB, 0x1F, 7)}")
    for name, value in ext.EXT_IOCTLS.items():
        lines.add(f"ioctl {name} {value}")
    return lines


def test_header_and_bindings_agree():
    c, py = c_lines(), py_lines()
    assert c - py == set(), f"only in C: {sorted(c - py)}"
    assert py - c == set(), f"only in Python: {sorted(py - c)}"


def test_dump_covers_the_whole_header():
    text = ext.header_path().read_text()
    dump = (REPO / "tests/clients/ext_abi_dump.c").read_text()
    defines = set(re.findall(r"^#define\s+(ACRN_EMU_\w+)", text, re.M))
    structs = set(re.findall(r"^struct\s+(\w+)\s*\{", text, re.M))
    assert structs == set(ext.EXT_STRUCTS)
    for d in defines:
        assert re.search(rf"\b{d}\b", dump), f"ext_abi_dump.c does not print {d}"
    for s in structs:
        fields = re.search(rf"struct {s} \{{(.*?)\}};", text, re.S)
        assert fields is not None
        names = re.findall(r"(\w+)(?:\[\w+\])?;", fields.group(1))
        assert names == [f[0] for f in ext.EXT_STRUCTS[s]._fields_], s


def test_type_byte_is_not_acrns_and_sizes_fit_fuse():
    assert ext.ACRN_EMU_IOCTL_TYPE != abi.ACRN_IOCTL_TYPE
    for value in ext.EXT_IOCTLS.values():
        assert abi.ioc_type(value) == ext.ACRN_EMU_IOCTL_TYPE
        # FUSE restricted ioctls move exactly _IOC_SIZE bytes: every struct is whole in it
        assert abi.ioc_size(value) in {0, *(ctypes.sizeof(c) for c in ext.EXT_STRUCTS.values())}


def test_repository_include_is_the_packaged_header():
    repo_header = REPO / "include" / "acrn_hsm_emu.h"
    assert repo_header.read_bytes() == ext.header_path().read_bytes()
    assert ext.include_dir() == ext.header_path().parent


def test_module_prints_the_include_dir():
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "acrn_hsm_emu.client", "--include-dir"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert pathlib.Path(out.stdout.strip()) == ext.include_dir()
