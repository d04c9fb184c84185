"""The deployable service: the systemd unit, make install/uninstall, the unit's syscall filter."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

from acrn_hsm_emu.config import control_socket
from tests.conftest import REPO, VENV_BIN, Installed, mounted_under
from tests.support.cbuild import build_c
from tests.test_kvm_daemon import guests  # noqa: F401 (a fixture, for the strace run)

UNIT = REPO / "systemd" / "acrn-hsm-emu.service"


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, values in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


# -- the unit ----------------------------------------------------------------------------


def test_systemd_analyze_verify_passes(installed: Installed):
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(installed.unit)], capture_output=True, text=True, check=False
    )
    # verify exits 0 on unknown keys and bad values too: they are warnings, so none is allowed.
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_verify_would_catch_a_broken_unit(installed: Installed, tmp_path):
    """The check above can fail: a misspelt key and a bad value are reported."""
    text = installed.unit.read_text().replace("ProtectSystem=", "ProtectSytem=")
    text = text.replace("DeviceAllow=/dev/fuse rw", "DeviceAllow=/dev/fuse rwx")
    bad = tmp_path / "acrn-hsm-emu.service"
    bad.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, check=False)
    assert "Unknown key" in proc.stderr and "Invalid device rights" in proc.stderr


def test_installed_unit_is_the_repo_unit_with_the_install_paths(installed: Installed):
    expected = (
        UNIT.read_text()
        .replace("/usr/local/bin/", f"{installed.prefix}/bin/")
        .replace("/usr/local/share/doc/acrn-hsm-emu", f"{installed.prefix}/share/doc/acrn-hsm-emu")
        .replace("/etc/acrn-hsm-emu/", f"{installed.sysconfdir}/acrn-hsm-emu/")
    )
    assert installed.unit.read_text() == expected
    s = unit_settings(expected)
    assert s["ExecStart"] == [f"{installed.exe} serve --config {installed.config}"]


def test_unit_declares_what_the_issue_asks():
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert "/dev/fuse rw" in s["DeviceAllow"] and "/dev/kvm rw" in s["DeviceAllow"]
    assert s["ProtectSystem"] == ["strict"] and s["ProtectHome"] == ["yes"]
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["RuntimeDirectory"] == ["acrn-hsm-emu"]
    assert s["Restart"] == ["on-failure"] and s["RestartPreventExitStatus"] == ["2"]
    assert s["WatchdogSec"] and s["CapabilityBoundingSet"]
    assert "--config /etc/acrn-hsm-emu/config.toml" in s["ExecStart"][0]
    # The sandbox's /dev must be the host's: the node lives there.
    assert s.get("PrivateDevices", ["no"]) == ["no"]


def test_security_exposure_is_ok(installed: Installed):
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(installed.unit)],
        capture_output=True, text=True, check=False,
    )
    m = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert m[2] in ("PERFECT", "SAFE", "OK"), m[0]


# -- make install / uninstall ------------------------------------------------------------


def test_installed_copy_runs_on_the_system_python(installed: Installed):
    assert installed.exe.read_text().startswith("#!/usr/bin/python3 -I\n")
    p = subprocess.run([str(installed.exe), "check-config", "--config", str(installed.config)],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"# {installed.config}: ok\n")
    assert 'node = "/dev/acrn_hsm"' in p.stdout and 'node_mode = "0600"' in p.stdout
    assert (installed.prefix / "share/doc/acrn-hsm-emu/README.md").is_file()
    assert (installed.prefix / "share/doc/acrn-hsm-emu/troubleshooting.md").is_file()


def test_the_examples_and_c_clients_are_installed_where_the_docs_say(installed: Installed, tmp_path):
    doc = installed.prefix / "share/doc/acrn-hsm-emu"
    lib = installed.prefix / "lib/acrn-hsm-emu"
    for name in ("examples/launch.py", "examples/uart.py", "examples/hello.S", "clients/dm_loop.c",
                 "clients/hsm_errno.c"):
        assert (doc / name).is_file(), name
    # the examples run on the system Python with the installed package (configuration.md)
    for example in ("launch.py", "uart.py"):
        p = subprocess.run(["/usr/bin/python3", str(doc / "examples" / example), "--help"], capture_output=True,
                           text=True, timeout=120, check=False, env={**os.environ, "PYTHONPATH": str(lib)})
        assert p.returncode == 0 and p.stdout.startswith("usage: "), p.stderr
    # the C clients build with system headers only
    p = subprocess.run(["cc", "-O2", "-pthread", "-o", str(tmp_path / "dm_loop"), str(doc / "clients/dm_loop.c")],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr


def files_under(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def test_install_keeps_an_edited_config_and_uninstall_removes_the_rest(tmp_path):
    dest = tmp_path / "dest"
    inst = Installed(pathlib.Path("/opt/acrn-hsm-emu-staged"))  # the paths as packaged; never created
    cfg = dest / str(inst.config).lstrip("/")
    cfg.parent.mkdir(parents=True)
    cfg.write_text('node_mode = "0660"\n')
    out = inst.make("install", DESTDIR=str(dest)).stdout
    assert f"install: keeping {cfg}" in out
    assert cfg.read_text() == 'node_mode = "0660"\n'
    staged = files_under(dest)
    prefix = str(inst.prefix).lstrip("/")
    for f in (f"{prefix}/bin/acrn-hsm-emu", f"{prefix}/lib/systemd/system/acrn-hsm-emu.service",
              f"{prefix}/lib/acrn-hsm-emu/acrn_hsm_emu/cli.py", f"{prefix}/lib/acrn-hsm-emu/trio/__init__.py"):
        assert f in staged
    assert any(re.fullmatch(rf"{prefix}/lib/acrn-hsm-emu/cdev/_fuse\..*so", f) for f in staged)
    # The staged files name the final paths, not DESTDIR.
    launcher = (dest / prefix / "bin/acrn-hsm-emu").read_text()
    assert f'sys.path.insert(0, "{inst.prefix}/lib/acrn-hsm-emu")' in launcher
    assert str(dest) not in launcher + (dest / prefix / "lib/systemd/system/acrn-hsm-emu.service").read_text()

    out = inst.make("uninstall", DESTDIR=str(dest)).stdout
    assert f"uninstall: keeping the modified {cfg}" in out
    assert files_under(dest) == [str(cfg.relative_to(dest))]
    cfg.unlink()
    inst.make("uninstall", DESTDIR=str(dest))  # idempotent; now the config directory goes too
    assert not cfg.parent.exists()


# -- the unit's system call filter covers what the daemon does ---------------------------


def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"],
                         capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and line.startswith(" "):
            current.append(line.strip())
    return groups


def allowed_syscalls(filter_words: list[str]) -> set[str]:
    groups = syscall_groups()

    def expand(word: str, seen: set[str]) -> set[str]:
        if not word.startswith("@"):
            return {word}
        if word in seen:
            return set()
        seen.add(word)
        return set().union(*(expand(w, seen) for w in groups[word]))

    return set().union(*(expand(w, set()) for w in filter_words))


@pytest.mark.needs_fuse
def test_syscall_filter_allows_every_call_the_daemon_makes(tmp_path, request):
    """strace the daemon through a whole errno table, a device model, real guests (where KVM
    works: backend auto picks it) and a clean stop."""
    from tests.conftest import NotifyListener, kvm_missing
    from tests.test_hsm_errno import run_client
    from tests.test_kvm_daemon import vm_sample

    assemble = None if kvm_missing() else request.getfixturevalue("guests")

    words = unit_settings(UNIT.read_text())["SystemCallFilter"][0].split()
    allowed = allowed_syscalls(words)
    trace = tmp_path / "strace.out"
    node = tmp_path / "acrn_hsm"
    notify = NotifyListener(tmp_path / "notify.sock")
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", str(trace), str(VENV_BIN / "acrn-hsm-emu"), "serve",
         "--node", str(node), "--run-dir", str(tmp_path / "run"), "--log-format", "json"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NOTIFY_SOCKET": notify.address,
                                                   "WATCHDOG_USEC": "2000000"},
    )
    daemon_pid = None
    try:
        notify.wait_for("READY=1", timeout=120)
        cli = [str(VENV_BIN / "acrn-hsm-emu")]
        ctl = ["--control", control_socket(str(tmp_path / "run"), str(node))]
        status = subprocess.run([*cli, "status", "--json", *ctl], check=True, capture_output=True,
                                text=True, timeout=120)
        daemon_pid = json.loads(status.stdout)["pid"]  # strace's child: signals go to it, not strace
        _rows, problems, _ = run_client(str(node), "default")
        assert not problems, problems
        dm = subprocess.Popen([str(build_c("dm_loop")), str(node), "0x1"], stdout=subprocess.PIPE, text=True)
        assert dm.stdout is not None
        vmid = dm.stdout.readline().split()[0].split("=")[1]
        subprocess.run([*cli, "inject", *ctl, "--vm", vmid, "pio-read", "0x3f8", "1"], check=True,
                       capture_output=True, timeout=120)
        subprocess.run([*cli, "status", *ctl], check=True, capture_output=True, timeout=120)
        dm.send_signal(signal.SIGTERM)
        dm.communicate(timeout=60)
        if assemble is not None:
            served = type("Served", (), {"node": node, "log": lambda self: ""})()
            vm_sample(served, "-f", "-g", f"{assemble('shared16').path}@0")  # shared RAM
            vm_sample(served, "-g", f"{assemble('cpuid16').path}@0")  # private RAM, copied
    finally:
        if daemon_pid is not None:
            os.kill(daemon_pid, signal.SIGTERM)
        else:
            proc.kill()
        rc = proc.wait(timeout=120)
        log.close()
        notify.close()
    assert rc == 0, (tmp_path / "daemon.log").read_text()
    assert not mounted_under(tmp_path)
    called = set()
    for line in trace.read_text().splitlines():
        m = re.match(r"^\d+\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]", line)
        if m and not line.split(None, 1)[1].startswith(("+++", "---")):
            called.add(m[1])
    assert {"mount", "process_vm_readv", "ioctl"} <= called, sorted(called)
    if assemble is not None:
        assert "KVM_RUN" in trace.read_text()
    missing = sorted(called - allowed)
    assert not missing, f"the unit's SystemCallFilter={' '.join(words)} lacks {missing}"



# -- publish where there is nothing to publish ---------------------------------------------


@pytest.mark.needs_fuse
def test_publish_in_the_daemons_own_namespace_does_nothing(hsm_daemon):
    before = mounted_under(hsm_daemon.node)
    p = hsm_daemon.cli("publish", "--control", str(hsm_daemon.control), "--node", str(hsm_daemon.node))
    assert p.stdout == f"{hsm_daemon.node} is served in this mount namespace already: nothing to publish\n"
    assert mounted_under(hsm_daemon.node) == before == [str(hsm_daemon.node)]


@pytest.mark.needs_fuse
def test_publish_has_nothing_to_do_for_a_cuse_node(tmp_path):
    """A CUSE node is a device every namespace sees: publish succeeds (the unit's ExecStartPost)."""
    from tests.test_troubleshooting import FAKE_DAEMON

    sock = tmp_path / "control.sock"
    fake = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", FAKE_DAEMON,
         str(sock), "/dev/acrn_hsm", "cuse", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "listening"
        p = subprocess.run([str(VENV_BIN / "acrn-hsm-emu"), "publish", "--control", str(sock)],
                           capture_output=True, text=True, timeout=60, check=False)
    finally:
        fake.kill()
        fake.wait()
    assert (p.returncode, p.stderr) == (0, "")
    assert p.stdout == "/dev/acrn_hsm is a cuse device node, visible everywhere: nothing to publish\n"


# -- an installed copy, without the repository: the docs' lines for it -------------------


@pytest.mark.needs_fuse
def test_the_installed_examples_and_clients_run_as_documented(installed: Installed, hsm_daemon, tmp_path):
    """docs/configuration.md's two lines for an installed copy, with its prefix and the test's node:
    the installed launch.py (on the installed package, run by the system python3, outside the
    repository) creates and starts VM 1; the installed dm_loop.c builds and serves the next VM."""
    from tests.test_docs_commands import documented_shell_lines

    lines = [c for _, c in documented_shell_lines() if "/usr/local/share/doc/acrn-hsm-emu/" in c]
    assert len(lines) == 2, lines
    node = str(hsm_daemon.node)
    launch = lines[0].replace("/usr/local", str(installed.prefix)) + f" --node {node}"
    env_word, *argv = launch.split()
    env = {**os.environ, env_word.split("=")[0]: env_word.split("=")[1]}
    p = subprocess.Popen(argv, cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "vmid=1", p.stderr.read() if p.stderr else ""
        build = lines[1].replace("/usr/local", str(installed.prefix)).replace("/dev/acrn_hsm", node)
        dm = subprocess.Popen(build, shell=True, cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
        try:
            assert dm.stdout is not None
            assert dm.stdout.readline().strip() == "vmid=2 vcpu_num=1"
        finally:
            os.killpg(dm.pid, signal.SIGTERM)
            dm.communicate(timeout=60)
    finally:
        p.terminate()
        p.communicate(timeout=60)
