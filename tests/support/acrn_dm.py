"""Running an unmodified acrn-dm (``ACRN_DM=/path/to/acrn-dm``) against the daemon.

acrn-dm opens ``/dev/acrn_hsm`` by that fixed path and writes under ``/run``, so
each run happens in a private mount namespace (``unshare --mount``) with a
private tmpfs ``/dev`` (the few device nodes needed) and ``/run``: the daemon
serves the node there and runs acrn-dm as its ``serve -- COMMAND`` (docs/acrn-dm.md).
The test guests (tests/guests/dm/) are multiboot ELFs acrn-dm loads with ``-E``.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
GUESTS = REPO / "tests" / "guests" / "dm"
HUGEPAGES = pathlib.Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
HANG_GUARD_S = 120.0  # one run, start to exit: a hang guard only
# /dev of the sandbox: (name, mode, major, minor)
DEV_NODES = (
    ("null", 0o666, 1, 3), ("zero", 0o666, 1, 5), ("full", 0o666, 1, 7),
    ("random", 0o666, 1, 8), ("urandom", 0o666, 1, 9), ("tty", 0o666, 5, 0),
    ("kvm", 0o660, 10, 232), ("fuse", 0o666, 10, 229),
)  # fmt: skip


def missing() -> str | None:
    """Why the acrn-dm check cannot run here, or None."""
    dm = os.environ.get("ACRN_DM")
    if not dm:
        return "set ACRN_DM=/path/to/acrn-dm (v3.3, built as docs/acrn-dm.md says) to run it"
    if not os.access(dm, os.X_OK):
        return f"ACRN_DM={dm} is not an executable file"
    if os.geteuid() != 0:
        return "needs root (a private mount namespace, FUSE, huge pages)"
    for tool in ("unshare", "iasl", "as", "ld"):
        if shutil.which(tool) is None:
            return f"needs {tool} on PATH" + (" (Debian: acpica-tools)" if tool == "iasl" else "")
    for dev in ("/dev/kvm", "/dev/fuse"):
        if not os.path.exists(dev):
            return f"needs {dev}"
    if not pathlib.Path("/sys/firmware/acpi/tables/APIC").exists():
        return "acrn-dm needs the host's MADT (/sys/firmware/acpi/tables/APIC)"
    return None


def build_guest(name: str, out_dir: pathlib.Path, sections: dict[str, int] | None = None) -> pathlib.Path:
    """tests/guests/dm/NAME.S -> OUT_DIR/NAME.elf, linked at 1 MiB (plus ``sections``)."""
    obj = out_dir / f"{name}.o"
    elf = out_dir / f"{name}.elf"
    subprocess.run(["as", "--32", "-I", str(GUESTS), "-o", str(obj), str(GUESTS / f"{name}.S")],
                   check=True, capture_output=True)  # fmt: skip
    extra = [f"--section-start={s}={addr:#x}" for s, addr in (sections or {}).items()]
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x100000", "-e", "_start", "--build-id=none",
                    *extra, "-o", str(elf), str(obj)], check=True, capture_output=True)  # fmt: skip
    return elf


@dataclass
class DmRun:
    """One acrn-dm run: its exit status, the guest's UART (stdout), acrn-dm's log, the daemon's."""

    status: int
    stdout: str
    stderr: str
    daemon_log: str
    command: list[str]

    def report(self) -> str:
        return (
            f"$ {shlex.join(self.command)}\nexit {self.status}\n--- guest (COM1) ---\n{self.stdout}"
            f"--- acrn-dm ---\n{self.stderr[-6000:]}\n--- daemon (last lines) ---\n"
            + "\n".join(self.daemon_log.splitlines()[-40:])
        )

    def events(self) -> list[dict[str, object]]:
        import json

        # each record is one write() (tests/test_logs.py): a line that fails to parse fails the test
        return [json.loads(line) for line in self.daemon_log.splitlines() if line.startswith("{")]


def run(
    work: pathlib.Path,
    guest: pathlib.Path,
    *,
    dm_args: list[str] | None = None,
    cpu_affinity: str = "0",
    memory: str = "128M",
    daemon_args: list[str] | None = None,
    launcher: list[str] | None = None,
    name: str = "vm1",
) -> DmRun:
    """Serve /dev/acrn_hsm in a private namespace and run acrn-dm on ``guest`` there.

    ``launcher``: a command that acrn-dm runs under (``acrn-hsm-emu run --``).
    """
    dm = os.environ["ACRN_DM"]
    work.mkdir(parents=True, exist_ok=True)
    out, err, dlog = work / "dm.out", work / "dm.err", work / "daemon.log"
    dm_cmd = [
        dm, "--cpu_affinity", cpu_affinity, "-m", memory,
        "-s", "0:0,hostbridge", "-s", "1:0,lpc", "-l", "com1,stdio",
        *(dm_args or []), "-E", str(guest), name,
    ]  # fmt: skip
    inner = [*(launcher or []), *dm_cmd]
    command = [
        "unshare", "--mount", "--propagation", "private",
        sys.executable, "-m", "tests.support.acrn_dm", str(work), *(daemon_args or []), "--", *inner,
    ]  # fmt: skip
    before = HUGEPAGES.read_text() if HUGEPAGES.exists() else None
    proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=HANG_GUARD_S)
        status = proc.returncode
        sandbox_err = stderr.decode(errors="replace")
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)  # the daemon, the launcher, acrn-dm: nothing outlives the run
        _, stderr = proc.communicate()
        status = -1
        sandbox_err = f"hang guard: no exit within {HANG_GUARD_S} s\n" + stderr.decode(errors="replace")
    finally:
        if before is not None:  # acrn-dm raises the global huge page count itself
            try:
                HUGEPAGES.write_text(before)
            except OSError:
                pass
    read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
    return DmRun(status, read(out), read(err) + sandbox_err, read(dlog), inner)


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (children first found, then killed)."""
    found = [pid]
    i = 0
    while i < len(found):
        try:
            for task in pathlib.Path(f"/proc/{found[i]}/task").iterdir():
                found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
        i += 1
    for p in reversed(found):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _sandbox(work: pathlib.Path, daemon_args: list[str], command: list[str]) -> int:
    """Inside the namespace: private /dev and /run, then the daemon running ``command``."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/dev"], check=True)
    for node, mode, major, minor in DEV_NODES:
        os.mknod(f"/dev/{node}", mode | 0o020000, os.makedev(major, minor))
        os.chmod(f"/dev/{node}", mode)
    os.symlink("/proc/self/fd", "/dev/fd")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run"], check=True)
    out, err = work / "dm.out", work / "dm.err"
    # acrn-dm's stdout is the guest's COM1; its messages go to both streams
    wrapped = ["sh", "-c", f'exec "$@" >{shlex.quote(str(out))} 2>{shlex.quote(str(err))}', "sh", *command]
    daemon = [
        str(pathlib.Path(sys.executable).parent / "acrn-hsm-emu"), "serve",
        "--node", "/dev/acrn_hsm", "--run-dir", "/run/acrn-hsm-emu", "--transport", "fuse",
        "--backend", "kvm", "--log-format", "json", *daemon_args, "--", *wrapped,
    ]  # fmt: skip
    with open(work / "daemon.log", "wb") as log:
        return subprocess.run(daemon, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


if __name__ == "__main__":
    args = sys.argv[1:]
    sep = args.index("--")
    sys.exit(_sandbox(pathlib.Path(args[0]), args[1:sep], args[sep + 1 :]))
