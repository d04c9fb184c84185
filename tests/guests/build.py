"""Assemble and link the test guests with binutils (see README.md)."""

from __future__ import annotations

import pathlib
import subprocess
from dataclasses import dataclass

HERE = pathlib.Path(__file__).resolve().parent


@dataclass(frozen=True)
class Guest:
    """A flat guest image and where its symbols are (guest-physical addresses)."""

    path: pathlib.Path
    load: int
    symbols: dict[str, int]

    @property
    def image(self) -> bytes:
        return self.path.read_bytes()


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return proc.stdout


def assemble(name: str, out_dir: pathlib.Path, load: int = 0, bits: int = 32) -> Guest:
    """tests/guests/NAME.S -> OUT_DIR/NAME.bin, linked to run at guest-physical ``load``.

    ``bits`` picks the assembler/linker target: 32 (``as --32``, for .code16 and
    .code32 sources) or 64.
    """
    src = HERE / f"{name}.S"
    out_dir.mkdir(parents=True, exist_ok=True)
    obj = out_dir / f"{name}.o"
    elf = out_dir / f"{name}.elf"
    out = out_dir / f"{name}.bin"
    emul = "elf_i386" if bits == 32 else "elf_x86_64"
    _run("as", f"--{bits}", "-I", str(HERE), "-o", str(obj), str(src))  # -I: .include files
    _run("ld", "-m", emul, "-Ttext", hex(load), "-e", "_start", "-o", str(elf), str(obj))
    _run("objcopy", "-O", "binary", "-j", ".text", str(elf), str(out))
    symbols = {}
    for line in _run("nm", str(elf)).splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols[parts[2]] = int(parts[0], 16)
    return Guest(out, load, symbols)


def page_tables_64(base: int) -> bytes:
    """Identity page tables at ``base`` (4 pages: PML4, PDPT, two PDs of 2 MiB pages)
    mapping guest-physical 0-1 GiB and 3-4 GiB. CR3 = ``base``."""
    present_rw = 0x3
    large = 0x80
    pml4 = bytearray(4096)
    pdpt = bytearray(4096)
    pd_low = bytearray(4096)
    pd_high = bytearray(4096)
    pml4[0:8] = (base + 0x1000 | present_rw).to_bytes(8, "little")
    pdpt[0:8] = (base + 0x2000 | present_rw).to_bytes(8, "little")
    pdpt[24:32] = (base + 0x3000 | present_rw).to_bytes(8, "little")
    for i in range(512):
        pd_low[8 * i : 8 * i + 8] = (i << 21 | present_rw | large).to_bytes(8, "little")
        pd_high[8 * i : 8 * i + 8] = ((3 << 30) + (i << 21) | present_rw | large).to_bytes(
            8, "little"
        )
    return bytes(pml4 + pdpt + pd_low + pd_high)
