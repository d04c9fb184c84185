"""Compile the C clients in tests/clients against the system headers."""

from __future__ import annotations

import pathlib
import subprocess

CLIENTS = pathlib.Path(__file__).resolve().parent.parent / "clients"
BIN = CLIENTS / "bin"


def build_c(name: str, *extra: str) -> pathlib.Path:
    """Build tests/clients/NAME.c into tests/clients/bin/NAME (rebuilt when older)."""
    src = CLIENTS / f"{name}.c"
    out = BIN / name
    BIN.mkdir(exist_ok=True)
    deps = [src, *CLIENTS.glob("*.h")]
    if not out.exists() or any(d.stat().st_mtime > out.stat().st_mtime for d in deps):
        cmd = ["cc", "-O2", "-Wall", "-Werror", "-pthread", "-o", str(out), str(src), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {src.name} failed:\n{proc.stderr}")
    return out
