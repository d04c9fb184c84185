"""Helpers for the extension-ABI tests: the C clients ext_ctl / ext_range and the control socket.

ext_ctl (tests/clients/ext_ctl.c) is one open file of the node driven by
command lines; ext_range (tests/clients/ext_range.c) is a range client
process. Both are compiled against <linux/acrn.h> and the package's
acrn_hsm_emu.h. Every wait here is a hang guard, never a timing assertion.
"""

from __future__ import annotations

import json
import os
import pathlib
import select
import signal
import subprocess
from typing import Any

from acrn_hsm_emu.cli import control_call
from acrn_hsm_emu.client.extension import header_path, include_dir
from tests.support.cbuild import BIN, build_c

HANG_GUARD = 60.0


def build_ext(name: str) -> pathlib.Path:
    """Build tests/clients/NAME.c with the extension header (rebuilt when the header changes)."""
    out = BIN / name
    if out.exists() and header_path().stat().st_mtime > out.stat().st_mtime:
        out.unlink()
    return build_c(name, f"-I{include_dir()}")


def readline(proc: subprocess.Popen[str], what: str, timeout: float = HANG_GUARD) -> str:
    assert proc.stdout is not None
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    if not r:
        raise TimeoutError(f"no line from {what} (pid {proc.pid})")
    line = proc.stdout.readline()
    if not line:
        raise EOFError(f"{what} exited ({proc.poll()}) without answering")
    return line.strip()


def kv(words: list[str]) -> dict[str, str]:
    return dict(w.split("=", 1) for w in words if "=" in w)


class Ctl:
    """One ext_ctl process: ``cmd("bind 1")`` -> "ok ..." / "err EPERM"."""

    def __init__(self, node: pathlib.Path | str, user: int | None = None) -> None:
        kw: dict[str, Any] = {}
        if user is not None:
            kw = {"user": user, "group": user, "extra_groups": []}
        self.proc = subprocess.Popen(
            [str(build_ext("ext_ctl")), str(node)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kw,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cmd(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return readline(self.proc, f"ext_ctl {line!r}")

    def ok(self, line: str) -> dict[str, str]:
        answer = self.cmd(line)
        assert answer.split()[0] == "ok", f"{line!r}: {answer}"
        return kv(answer.split()[1:])

    def err(self, line: str) -> str:
        """The errno name of a command that must fail."""
        answer = self.cmd(line)
        assert answer.split()[0] == "err", f"{line!r} should fail: {answer}"
        return answer.split()[1]

    def close(self) -> int:
        if self.proc.poll() is None:
            try:
                self.cmd("quit")
            except (EOFError, BrokenPipeError, TimeoutError):
                self.proc.kill()
        return self.proc.wait(timeout=HANG_GUARD)


class RangeProc:
    """An ext_range process; ``ready`` holds its first line's fields."""

    def __init__(self, node: pathlib.Path | str, vmid: int, name: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(build_ext("ext_range")), str(node), str(vmid), name, *args],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.first = readline(self.proc, f"ext_range {name}")
        words = self.first.split()
        self.ok = words[0] == "ready"
        self.ready = kv(words[1:])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> tuple[dict[str, str], dict[str, str]]:
        """SIGTERM; the process must exit 0; its (stats, handled) lines."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=HANG_GUARD)
        assert self.proc.returncode == 0, (self.proc.returncode, out)
        lines = out.strip().splitlines()
        return kv(lines[-2].split()[1:]), kv(lines[-1].split()[1:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=HANG_GUARD)


class Control:
    """The daemon's control socket, spoken directly (no CLI start-up per call)."""

    def __init__(self, path: pathlib.Path | str) -> None:
        self.path = str(path)

    def status(self) -> dict[str, Any]:
        return control_call(self.path, {"cmd": "status"})

    def inject(self, vmid: int, kind: str, write: bool, addr: int, size: int, value: int = 0,
               vcpu: int = 0) -> int:  # fmt: skip
        access = {"kind": kind, "write": write, "addr": addr, "size": size, "value": value}
        return control_call(
            self.path,
            {"cmd": "inject", "vm": vmid, "vcpu": vcpu, "access": access, "timeout": HANG_GUARD},
            timeout=HANG_GUARD + 5,
        )

    def hsm_vm(self, vmid: int) -> dict[str, Any]:
        return next(v for v in self.status()["hsm"]["vms"] if v["vmid"] == vmid)

    def hv_vm(self, vmid: int) -> dict[str, Any]:
        return next(v for v in self.status()["hypervisor"]["vms"] if v["vmid"] == vmid)


def inject_async(daemon: Any, vmid: int, *access: str, vcpu: int = 0) -> subprocess.Popen[str]:
    """``acrn-hsm-emu inject`` in the background (for accesses that will wait)."""
    return subprocess.Popen(
        [daemon.args[0], "inject", "--control", str(daemon.control), "--vm", str(vmid),
         "--vcpu", str(vcpu), "--timeout", str(int(HANG_GUARD)), *access],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip



def daemon_log_events(daemon: Any) -> list[dict[str, Any]]:
    out = []
    for line in daemon.log().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def open_path_to(path: pathlib.Path) -> list[tuple[pathlib.Path, int]]:
    """Give "others" search (x) permission on every directory above ``path``; returns what to restore."""
    changed = []
    for d in [*reversed(path.parents)]:
        mode = d.stat().st_mode & 0o7777
        if not mode & 0o001:
            os.chmod(d, mode | 0o001)
            changed.append((d, mode))
    return changed


def restore_modes(changed: list[tuple[pathlib.Path, int]]) -> None:
    for d, mode in reversed(changed):
        os.chmod(d, mode)
