"""The unit's sandbox without systemd: the installed daemon under the same restrictions.

There is no systemd as PID 1 here, so these tests build what the unit asks
systemd for, from the unit file itself: a private mount namespace that is a
*slave* of the host's (what any of ProtectSystem=/ProtectHome=/PrivateTmp=
make), every mount read-only but /dev, /proc, /sys and the writable
directories (ProtectSystem=strict, RuntimeDirectory=), empty /home, /root
(ProtectHome=), private /tmp and /var/tmp (PrivateTmp=), a private network
namespace (PrivateNetwork=), the capability bounding set and no_new_privs
(CapabilityBoundingSet=, NoNewPrivileges=), PR_SET_MDWE
(MemoryDenyWriteExecute=) and UMask=. Not built: the device cgroup and the
seccomp filter (tests/test_service.py checks the filter against strace).

The host side then does what the unit's ExecStartPost=+/ExecStopPost=+ do
(publish, unpublish) and runs unmodified C clients on the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import pwd
import signal
import stat
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import Installed, NotifyListener, mounted_under
from tests.support.answers import pio_answer
from tests.support.cbuild import build_c
from tests.test_hsm_errno import compare_rows, expected_table, run_client
from tests.test_kvm_daemon import events, guests, vm_sample  # noqa: F401 (guests: a fixture)
from tests.test_service import UNIT, unit_settings

pytestmark = pytest.mark.needs_fuse

# Runs as /usr/bin/python3 inside `unshare --mount --net --propagation slave`.
SANDBOX = r"""
import ctypes, os, subprocess, sys
writable, caps, umask, cmd = sys.argv[1].split(":"), sys.argv[2], int(sys.argv[3], 8), sys.argv[4:]
def mount(*a):
    subprocess.run(["mount", *a], check=True)
for p in writable:                                   # RuntimeDirectory= and the node's directory
    mount("--bind", p, p)
api = ("/dev", "/proc", "/sys")
for line in open("/proc/self/mountinfo").read().splitlines():
    mp = line.split()[4]
    if mp in writable or any(mp == a or mp.startswith(a + "/") for a in api):
        continue
    subprocess.run(["mount", "-o", "remount,bind,ro", mp], check=False)   # ProtectSystem=strict
for d in ("/home", "/root", "/run/user"):             # ProtectHome=yes
    if os.path.isdir(d):
        mount("-t", "tmpfs", "-o", "ro,mode=0755", "tmpfs", d)
for d in ("/tmp", "/var/tmp"):                        # PrivateTmp=yes
    mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", d)
libc = ctypes.CDLL(None, use_errno=True)               # PR_SET_MDWE: MemoryDenyWriteExecute=yes
if libc.prctl(65, 1, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
    sys.exit("PR_SET_MDWE failed")                    # EINVAL: a kernel before 6.3, where systemd
                                                      # uses a seccomp filter instead (not built here)
os.umask(umask)
os.execvp("setpriv", ["setpriv", "--no-new-privs", "--inh-caps=-all", f"--bounding-set=-all,{caps}", *cmd])
"""


def unit_caps(drop: str | None = None) -> list[str]:
    words = unit_settings(UNIT.read_text())["CapabilityBoundingSet"][0].split()
    return [w for w in words if w != drop]


class SandboxedDaemon:
    """The installed daemon in the unit's sandbox; node and runtime directory host-visible."""

    def __init__(self, inst: Installed, caps: list[str], config: str = "", backend: str = "scripted",
                 node: pathlib.Path | None = None, transport: str = "fuse") -> None:
        self.inst = inst
        self.root = inst.base / f"svc-{uuid.uuid4().hex[:8]}"
        self.dev = self.root / "dev"  # stands for /dev: writable in the sandbox, shared with the host
        self.run_dir = self.root / "run" / "acrn-hsm-emu"  # RuntimeDirectory=
        for d in (self.dev, self.run_dir):
            d.mkdir(parents=True)
        self.root.chmod(0o755)
        self.dev.chmod(0o755)
        self.node = node or self.dev / "acrn_hsm"  # CUSE: a path under the real /dev
        self.control = self.run_dir / "control.sock"
        self.config = self.root / "config.toml"
        self.config.write_text(
            f'node = "{self.node}"\nrun_dir = "{self.run_dir}"\nlog_format = "json"\n'
            f'backend = "{backend}"\ntransport = "{transport}"\ncontrol = "{self.control}"\n{config}'
        )
        self.caps = ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
        self.log_path = self.root / "daemon.log"
        self.notify = NotifyListener(self.root / "notify.sock")  # like /run/systemd/notify
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> SandboxedDaemon:
        s = unit_settings(UNIT.read_text())
        cmd = [
            "unshare", "--mount", "--net", "--propagation", "slave",
            "/usr/bin/python3", "-c", SANDBOX,
            f"{self.dev}:{self.run_dir}", self.caps, s["UMask"][0],
            str(self.inst.exe), "serve", "--config", str(self.config),
        ]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NOTIFY_SOCKET": self.notify.address}
        self.notify.messages.clear()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd="/")
        for _ in range(120 if wait else 0):  # hang guard: 60 s, or the daemon's exit
            with contextlib.suppress(TimeoutError):
                self.notify.wait_for("READY=1", timeout=0.5)
                return self
            if self.proc.poll() is not None:
                break
        if wait:
            self.proc.kill()
            raise AssertionError(f"sandboxed daemon not ready:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The installed CLI on the host, as ExecStartPost=+ runs it."""
        return subprocess.run([str(self.inst.exe), args[0], "--config", str(self.config), *args[1:]],
                              capture_output=True, text=True, timeout=120, check=False)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=60)
        self._log.close()
        return rc


@pytest.fixture
def sandboxes(installed: Installed) -> Iterator[list[SandboxedDaemon]]:
    made: list[SandboxedDaemon] = []
    yield made
    for sb in made:
        if sb.proc is not None and sb.proc.poll() is None:
            sb.stop(signal.SIGKILL)
            sb.cli("unpublish")  # as ExecStopPost=+ would after a failed test
        sb.notify.close()
        assert "Traceback" not in sb.log(), sb.log()
        leftovers = mounted_under(sb.root)
        for mp in reversed(leftovers):
            subprocess.run(["umount", "-l", mp], check=False)
        assert not leftovers, f"mounts left on the host: {leftovers}"
        subprocess.run(["rm", "-rf", "--one-file-system", str(sb.root)], check=False)


def test_hardened_daemon_serves_the_host_through_publish(installed, sandboxes):
    nobody = pwd.getpwnam("nobody")
    # Owner nobody, 0600: the node locks root out; the daemon's readiness never opens it.
    sb = SandboxedDaemon(installed, unit_caps(), 'node_owner = "nobody"\nnode_mode = "0600"\n')
    sandboxes.append(sb)
    sb.start()
    # In the sandbox the node is served; the host sees only the placeholder file.
    assert not mounted_under(sb.node)
    assert os.path.getsize(sb.node) == 0 and os.stat(sb.node).st_uid == 0

    p = sb.cli("publish")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"published {sb.node}")
    assert mounted_under(sb.node) == [str(sb.node)]
    st = os.stat(sb.node)
    assert (st.st_uid, st.st_mode & 0o777) == (nobody.pw_uid, 0o600)
    again = sb.cli("publish")
    assert (again.returncode, again.stdout.strip()) == (0, f"{sb.node} is published already")

    # Unmodified C clients on the host: the whole errno table, then a device model.
    rows, problems, _ = run_client(str(sb.node), "default")
    problems += compare_rows(rows, expected_table("fuse"))
    assert not problems, "\n".join(problems)
    dm = subprocess.Popen([str(build_c("dm_loop")), str(sb.node), "0x1"], stdout=subprocess.PIPE, text=True)
    assert dm.stdout is not None
    vmid = dm.stdout.readline().split()[0].split("=")[1]
    value = sb.cli("inject", "--vm", vmid, "pio-read", "0x3f8", "1")
    assert value.stdout.strip() == f"{pio_answer(0x3F8, 1):#x}", value.stderr
    st = json.loads(sb.cli("status", "--json").stdout)
    assert [v["owner_pid"] for v in st["hsm"]["vms"]] == [dm.pid]
    dm.send_signal(signal.SIGTERM)
    out, _ = dm.communicate(timeout=60)
    assert dm.returncode == 0, out

    assert sb.stop() == 0
    # The daemon's teardown unlinked the node: that dissolved the published mount too.
    assert not os.path.lexists(sb.node)
    assert not mounted_under(sb.root)
    p = sb.cli("unpublish")
    assert (p.returncode, p.stdout.strip()) == (0, f"nothing published at {sb.node}")
    sb.notify.drain()
    assert sb.notify.lines()[-1] == "STOPPING=1"


def test_crash_then_unpublish_then_restart(installed, sandboxes):
    """Restart=on-failure with ExecStopPost=+unpublish: nothing stale survives a SIGKILL."""
    sb = SandboxedDaemon(installed, unit_caps())
    sandboxes.append(sb)
    sb.start()
    assert sb.cli("publish").returncode == 0
    assert sb.stop(signal.SIGKILL) == -signal.SIGKILL
    assert mounted_under(sb.node) == [str(sb.node)], "the crash leaves the host a dead mount"
    refused = sb.cli("unpublish")
    assert refused.returncode == 0, refused.stderr
    assert refused.stdout.strip() == f"unpublished {sb.node}"
    assert not mounted_under(sb.root) and not os.path.lexists(sb.node)

    sb.start()  # a new sandbox, as systemd's restart makes
    assert sb.cli("publish").returncode == 0
    rows, problems, _ = run_client(str(sb.node), "lifecycle")
    assert rows and not problems, problems
    assert sb.stop() == 0
    assert not mounted_under(sb.root) and not os.path.lexists(sb.node)


def test_unpublish_refuses_while_the_daemon_runs(installed, sandboxes):
    sb = SandboxedDaemon(installed, unit_caps())
    sandboxes.append(sb)
    sb.start()
    assert sb.cli("publish").returncode == 0
    p = sb.cli("unpublish")
    assert p.returncode == 1
    assert p.stderr == (f"acrn-hsm-emu: the daemon still answers on {sb.control}: "
                        "stop it before unpublishing\n")
    assert mounted_under(sb.node) == [str(sb.node)]
    assert sb.stop() == 0


@pytest.mark.transports("cuse")
def test_hardened_daemon_serves_a_cuse_node(installed, sandboxes, transport, tmp_path):
    """Under CUSE the sandbox needs no publishing: the kernel makes the device in the
    host's /dev, whatever the daemon's mount namespace; CAP_CHOWN gives it the
    configured owner and mode; the stop removes it."""
    from tests.conftest import node_path

    nobody = pwd.getpwnam("nobody")
    node = node_path(tmp_path, transport, "acrn_hsm")
    sb = SandboxedDaemon(installed, unit_caps(), 'node_owner = "nobody"\nnode_mode = "0640"\n',
                         node=node, transport="cuse")
    sandboxes.append(sb)
    sb.start()
    st = os.stat(node)
    assert stat.S_ISCHR(st.st_mode), "a real character device on the host"
    assert (st.st_uid, st.st_mode & 0o777) == (nobody.pw_uid, 0o640)
    p = sb.cli("publish")
    assert p.returncode == 0 and "nothing to publish" in p.stdout, p
    rows, problems, _ = run_client(str(node), "default")
    problems += compare_rows(rows, expected_table("cuse"))
    assert not problems, "\n".join(problems)
    dm = subprocess.Popen([str(build_c("dm_loop")), str(node), "0x1"], stdout=subprocess.PIPE, text=True)
    assert dm.stdout is not None
    vmid = dm.stdout.readline().split()[0].split("=")[1]
    value = sb.cli("inject", "--vm", vmid, "pio-read", "0x3f8", "1")
    assert value.stdout.strip() == f"{pio_answer(0x3F8, 1):#x}", value.stderr
    dm.send_signal(signal.SIGTERM)
    out, _ = dm.communicate(timeout=60)
    assert dm.returncode == 0, out
    assert sb.stop() == 0
    assert not os.path.lexists(node)


@pytest.mark.transports("cuse")
def test_without_cap_chown_a_cuse_node_cannot_be_given_its_owner(installed, sandboxes, transport, tmp_path):
    from tests.conftest import node_path

    node = node_path(tmp_path, transport, "acrn_hsm")
    sb = SandboxedDaemon(installed, unit_caps(drop="CAP_CHOWN"), 'node_owner = "nobody"\n',
                         node=node, transport="cuse")
    sandboxes.append(sb)
    sb.start(wait=False)
    assert sb.proc is not None and sb.proc.wait(timeout=120) == 1
    assert f"acrn-hsm-emu: cannot serve {node}: {node}: Operation not permitted" in sb.log(), sb.log()
    assert not os.path.lexists(node)


# Each capability of the bounding set, and what breaks without it.
NEEDED = {
    "CAP_SYS_ADMIN": "mounting FUSE at",
    "CAP_SYS_PTRACE": "",  # the daemon starts; its clients fail (below)
}


def test_readiness_does_not_open_the_node(installed, sandboxes):
    """Readiness is a look-up, not an open: a node that locks root out (owner nobody,
    0600) still comes up without CAP_DAC_OVERRIDE (which stays in the unit for the KVM
    backend's opening of other users' guest-RAM files)."""
    sb = SandboxedDaemon(installed, unit_caps(drop="CAP_DAC_OVERRIDE"),
                         'node_owner = "nobody"\nnode_mode = "0600"\n')
    sandboxes.append(sb)
    sb.start()
    assert sb.cli("publish").returncode == 0
    st = os.stat(sb.node)
    assert (st.st_uid, st.st_mode & 0o777) == (pwd.getpwnam("nobody").pw_uid, 0o600)
    assert sb.stop() == 0


@pytest.mark.parametrize("cap", sorted(NEEDED))
def test_each_capability_is_needed(installed, sandboxes, cap):
    sb = SandboxedDaemon(installed, unit_caps(drop=cap), 'node_owner = "nobody"\nnode_mode = "0600"\n')
    sandboxes.append(sb)
    if cap != "CAP_SYS_PTRACE":
        sb.start(wait=False)
        assert sb.proc is not None
        assert sb.proc.wait(timeout=60) == 1
        log = sb.log()
        assert "acrn-hsm-emu: " in log and NEEDED[cap] in log and "Traceback" not in log, log
        return
    # Without CAP_SYS_PTRACE the daemon starts but cannot reach a device model's memory
    # (a root process holds capabilities the daemon lacks): CREATE_VM cannot "pin" its
    # request page, and fails with the EINVAL the driver gives for any creation failure.
    sb.start()
    assert sb.cli("publish").returncode == 0
    rows, _problems, _ = run_client(str(sb.node), "lifecycle")
    assert expected_table("fuse")["lifecycle.create_vm"] == "0"
    assert rows["lifecycle.create_vm"] == (-1, "EINVAL"), rows
    assert sb.stop() == 0


def test_the_sandbox_is_real(installed, sandboxes):
    """The restrictions above do apply to the daemon (so the passes above mean something)."""
    sb = SandboxedDaemon(installed, unit_caps())
    sandboxes.append(sb)
    sb.start()
    st = json.loads(sb.cli("status", "--json").stdout)
    pid = st["pid"]
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["NoNewPrivs"].strip() == "1"
    # CAP_CHOWN 0, CAP_DAC_OVERRIDE 1, CAP_SYS_PTRACE 19, CAP_SYS_ADMIN 21
    assert int(fields["CapBnd"], 16) == (1 << 0) | (1 << 1) | (1 << 19) | (1 << 21)
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    mounts = pathlib.Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    root = next(line for line in mounts if line.split()[4] == "/")
    assert " ro," in f" {root.split()[5]}," or root.split()[5].startswith("ro")
    assert sb.stop() == 0


@pytest.mark.needs_kvm
def test_kvm_backend_under_the_sandbox(installed, sandboxes, guests):  # noqa: F811
    """The KVM backend's needs are in the unit too: /dev/kvm, /proc/PID/map_files
    (CAP_SYS_ADMIN) for shared RAM, no W+X memory (MemoryDenyWriteExecute)."""
    sb = SandboxedDaemon(installed, unit_caps(), 'log_level = "debug"\n', backend="kvm")
    sandboxes.append(sb)
    sb.start()
    assert sb.cli("publish").returncode == 0
    shared = vm_sample(sb, "-f", "-g", f"{guests('shared16').path}@0",
                       "-x", "0x15:1:peek:0x600", "-x", "0x15:1:poke:0x604:0x5eed1234")
    assert shared.first("peek") == {"gpa": 0x600, "value": 0xFEEDBEEF}
    assert shared.writes(0x16) == [0x5EED1234]
    private = vm_sample(sb, "-g", f"{guests('cpuid16').path}@0")
    assert b"".join(v.to_bytes(4, "little") for v in private.writes(0x10)) == b"ACRNACRNACRN"
    assert [s["kind"] for s in events(sb, "kvm.memory_slot")][:1] == ["shared"]
    assert sb.stop() == 0
