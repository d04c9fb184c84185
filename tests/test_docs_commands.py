"""Every ``acrn-hsm-emu`` command line README.md and docs/ show is one the CLI accepts.

The lines are taken from code (fenced blocks and indented blocks, with ``\\``
continuations joined); a shell prompt, ``sudo``, a path to the program, a
trailing comment and what follows ``&&``, ``|``, ``>`` or ``&`` are dropped,
and synopsis lines (``[--config FILE]``) are skipped. Each is parsed by the
real parser: an option renamed or removed breaks this test, not the reader.
What the commands do is tested where it is implemented (test_cli.py,
test_daemon.py, test_client_uart.py, ...).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from collections.abc import Iterator

import pytest

from acrn_hsm_emu import cli
from acrn_hsm_emu.config import control_socket
from tests.conftest import REPO, mounted_under

PROG = re.compile(r"^(?:\$ )?(?:sudo )?(?:\S*bin/)?acrn-hsm-emu(?= |$)(.*)$")


def documented() -> Iterator[tuple[str, str]]:
    for f in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        lines = f.read_text().splitlines()
        fenced = False
        for n, line in enumerate(lines, 1):
            if line.strip().startswith("```"):
                fenced = not fenced
                continue
            if not (fenced or line.startswith("    ")):
                continue
            text, k = line.strip(), n
            while text.endswith("\\") and k < len(lines):
                text, k = text[:-1] + " " + lines[k].strip(), k + 1
            m = PROG.match(text)
            if m:
                yield f"{f.relative_to(REPO)}:{n}", m.group(1)


def argv_of(rest: str) -> list[str] | None:
    """The arguments of one documented command; None for a synopsis."""
    rest = re.sub(r"\s+#.*$", "", rest)
    for sep in (" && ", " | ", " > ", ";"):
        rest = rest.split(sep)[0]
    argv = shlex.split(rest.strip().removesuffix("&").strip())
    if any(a.startswith("[") or a == "..." for a in argv):
        return None
    return argv


COMMANDS = list(documented())


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 20, COMMANDS  # the extraction still finds them (22 when written)


@pytest.mark.parametrize("where,rest", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses(where: str, rest: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = argv_of(rest)
    if argv is None:
        pytest.skip("a synopsis")
    if argv in (["--help"], ["--version"]) or "--help" in argv:
        return
    try:
        cli.parse(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: acrn-hsm-emu {' '.join(argv)}: exit {e.code}: {capsys.readouterr().err}")


def runnable_control_commands() -> list[tuple[str, list[str]]]:
    """The documented status/inject/cpuid/vm commands that need only a daemon with VM 1."""
    out = []
    for where, rest in COMMANDS:
        argv = argv_of(rest)
        if not argv or argv[0] not in ("status", "inject", "cpuid", "vm") or any("$" in a for a in argv):
            continue
        if {"--node", "--run-dir", "--control", "--config"} & set(argv) or argv[:2] in (["vm", "pause"],
                                                                                      ["vm", "destroy"]):
            continue  # another daemon's, or one that ends VM 1
        if "--watch" in argv:
            continue  # runs until Ctrl-C: tests/test_observe.py runs it and stops it
        out.append((where, argv))
    return out


def test_the_documented_control_commands_run(hsm_daemon):
    """README's tour (and the docs' other status/inject/cpuid/vm lines) against a daemon whose
    VM 1 a device model serves: each exits 0."""

    from tests.support.cbuild import build_c

    commands = runnable_control_commands()
    assert len(commands) >= 5, commands
    dm = subprocess.Popen([str(build_c("dm_loop")), str(hsm_daemon.node), "0x1"], stdout=subprocess.PIPE, text=True)
    try:
        assert dm.stdout is not None and dm.stdout.readline().startswith("vmid=1 ")
        failed = []
        for where, argv in commands:
            p = hsm_daemon.cli(*argv, "--node", str(hsm_daemon.node), "--run-dir", str(hsm_daemon.run_dir),
                               check=False)
            if p.returncode != 0:
                failed.append(f"{where}: acrn-hsm-emu {' '.join(argv)}: {p.stderr}")
        assert not failed, "\n".join(failed)
    finally:
        dm.terminate()
        dm.communicate(timeout=60)


# -- every other shell line of the docs: run by a test, or said why not ------------------------

SHELL = re.compile(r"^(?:\$ )?(?:sudo )?(?:make|cc|docker|systemctl|journalctl|/tmp/\S+|\.venv/bin/python|"
                   r"VMTEST_FILES=\S+|PYTHONPATH=\S+)(?= |$)")

# A documented line (comment dropped, spaces collapsed) -> the file that runs it, and the text in that
# file that does. A line here that the docs no longer show fails, as does a needle gone from its file.
RUN_BY: dict[str, tuple[str, str]] = {
    "make run": ("tests/test_docs_commands.py", '"make", "run"'),
    "make test": (".ci/run", "\nmake test\n"),
    "cc -O2 -pthread -o /tmp/dm_loop tests/clients/dm_loop.c": (
        "tests/test_docs_commands.py", "def test_the_readme_tour_as_written"),
    "/tmp/dm_loop /dev/acrn_hsm 0x1": ("tests/test_docs_commands.py", "def test_the_readme_tour_as_written"),
    ".venv/bin/python -m tests.test_hsm_errno /dev/acrn_hsm": (
        "tests/test_hsm_errno.py", "def test_the_verdict_the_readme_shows"),
    "make install": ("vmtest/guest/service.sh", "make --no-print-directory -o .venv/.installed install"),
    "systemctl enable --now acrn-hsm-emu": ("vmtest/guest/service.sh", 'systemctl enable --now "$unit"'),
    "systemctl status acrn-hsm-emu": ("vmtest/guest/service.sh", 'systemctl status "$unit" --no-pager'),
    "journalctl -u acrn-hsm-emu -o cat": ("vmtest/guest/service.sh", 'journalctl -u "$unit" -o cat'),
    "make test-vm": (".ci/run", "\nmake test-vm\n"),
    'make test-vm ARGS="-k service"': ("vmtest/test_vm.py", "def test_service"),
    'VMTEST_FILES="tests/test_hsm_errno.py" make test-vm ARGS="-k suite"': ("vmtest/vm.py", "VMTEST_FILES"),
    "make lint": ("Makefile", "test: setup apt-test lint"),
    "make sanitize": (".ci/run", "\nmake sanitize\n"),
    ".venv/bin/python examples/launch.py examples/hello.S": ("tests/test_client_uart.py", '"hello.S"'),
    ".venv/bin/python examples/uart.py --vm 1": ("tests/test_client_uart.py", '"uart.py"), "--vm"'),
    ".venv/bin/python examples/launch.py --start &": ("tests/test_client_uart.py", '"--start")'),
    ".venv/bin/python examples/uart.py --vm 1 &": ("tests/test_client_uart.py", '"uart.py"), "--vm"'),
    ".venv/bin/python examples/launch.py examples/hello.S --start": (
        "tests/test_client_uart.py", '"hello.S"), "--start")'),
    "PYTHONPATH=/usr/local/lib/acrn-hsm-emu python3 /usr/local/share/doc/acrn-hsm-emu/examples/launch.py --start": (
        "tests/test_service.py", "def test_the_installed_examples_and_clients_run_as_documented"),
    "cc -O2 -pthread -o dm_loop /usr/local/share/doc/acrn-hsm-emu/clients/dm_loop.c && ./dm_loop /dev/acrn_hsm 0x1": (
        "tests/test_service.py", "def test_the_installed_examples_and_clients_run_as_documented"),
    'cc -I"$(python -m acrn_hsm_emu.client --include-dir)" my_model.c': (
        "tests/test_ext_abi.py", '"acrn_hsm_emu.client", "--include-dir"'),
}
# Lines no test runs, and why.
NOT_RUN = {
    "docker build -f Containerfile -t acrn-hsm-emu .":
        "no Docker engine on the CI machines; tests/test_container.py builds what the Containerfile stages "
        "(make install DESTDIR=) and runs it in the namespaces `docker run` makes",
    "docker run --rm --init --device /dev/fuse --cap-add SYS_ADMIN --cap-add SYS_PTRACE "
    "--security-opt apparmor=unconfined acrn-hsm-emu": "as docker build (tests/test_container.py)",
    "docker run --rm --init --device /dev/fuse --cap-add SYS_ADMIN --cap-add SYS_PTRACE "
    '--security-opt apparmor=unconfined -v "$PWD/my-tests:/tests:ro" acrn-hsm-emu serve -- /tests/run.sh':
        "as docker build (tests/test_container.py runs `serve -- CMD` as the container's PID 1)",
    "make bench": "a 20-minute benchmark, not a test; run by hand on a quiet machine (docs/performance.md)",
    'make bench ARGS="--publish"': "as make bench",
}


def documented_shell_lines() -> Iterator[tuple[str, str]]:
    for f in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        lines = f.read_text().splitlines()
        fenced, lang = False, ""
        for n, line in enumerate(lines, 1):
            s = line.strip()
            if s.startswith("```"):
                fenced, lang = not fenced, s[3:]
                continue
            if not (fenced or line.startswith("    ")) or (fenced and lang not in ("", "sh", "console", "bash")):
                continue
            k = n
            while s.endswith("\\") and k < len(lines):
                s, k = s[:-1] + " " + lines[k].strip(), k + 1
            if SHELL.match(s):
                s = re.sub(r"\s+#.*$", "", s).removeprefix("$ ").removeprefix("sudo ")
                yield f"{f.relative_to(REPO)}:{n}", " ".join(s.split())


def test_every_shell_line_of_the_docs_is_run_by_a_test_or_says_why_not():
    shown = dict((cmd, where) for where, cmd in documented_shell_lines())
    assert len(shown) >= 20, shown
    unaccounted = [f"{where}: {cmd}" for cmd, where in shown.items() if cmd not in RUN_BY and cmd not in NOT_RUN]
    assert not unaccounted, "documented but run by no test (add the test, or a NOT_RUN reason):\n" + "\n".join(
        unaccounted)
    assert not (set(RUN_BY) | set(NOT_RUN)) - set(shown), "listed here, no longer in the docs"
    for cmd, (rel, needle) in RUN_BY.items():
        assert needle in (REPO / rel).read_text(), f"{cmd!r}: {rel} no longer contains {needle!r}"


@pytest.mark.needs_fuse
def test_make_run_as_the_readme_says(tmp_path):
    """`make run` (README), with ARGS for a private node: it serves, prints nothing but make's own
    recipe lines and the daemon's log (no pip or setuptools chatter), and stops on Ctrl-C."""
    node = tmp_path / "acrn_hsm"
    args = f"--node {node} --run-dir {tmp_path / 'run'} --transport fuse --backend scripted --log-format json"
    p = subprocess.Popen(["make", "--no-print-directory", "run", f"ARGS={args}"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert p.stdout is not None
    lines = []
    try:
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if '"daemon.serving"' in line:
                break
        assert os.path.exists(control_socket(str(tmp_path / "run"), str(node))), lines
    finally:
        os.killpg(p.pid, signal.SIGINT)
        rest, _ = p.communicate(timeout=120)
    lines += rest.splitlines()
    assert p.returncode in (0, -signal.SIGINT), "\n".join(lines)  # make dies of the Ctrl-C it relays
    assert '"daemon.stopped"' in lines[-1], "\n".join(lines)
    chatter = [ln for ln in lines if not ln.startswith("{") and not ln.startswith(".venv/bin/acrn-hsm-emu serve ")]
    assert chatter == [], "\n".join(chatter)
    assert not os.path.lexists(node) and not mounted_under(tmp_path)


def test_the_readme_tour_as_written(hsm_daemon, tmp_path):
    """README's first steps: its own cc line builds dm_loop, which serves VM 1 of the node."""
    where, build = next((w, c) for w, c in documented_shell_lines() if c.startswith("cc ") and "/tmp/dm_loop" in c)
    run = next(c for _, c in documented_shell_lines() if c.startswith("/tmp/dm_loop "))
    exe = tmp_path / "dm_loop"
    subprocess.run(build.replace("/tmp/dm_loop", str(exe)), shell=True, cwd=REPO, check=True)
    argv = run.replace("/tmp/dm_loop", str(exe)).replace("/dev/acrn_hsm", str(hsm_daemon.node)).split()
    dm = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert dm.stdout is not None
        assert dm.stdout.readline().strip() == "vmid=1 vcpu_num=1", where
        out = hsm_daemon.cli("inject", "--vm", "1", "pio-read", "0x3f8", "1").stdout
        assert out.strip(), out
    finally:
        dm.terminate()
        dm.communicate(timeout=60)
