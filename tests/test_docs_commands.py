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

import re
import shlex
from collections.abc import Iterator

import pytest

from acrn_hsm_emu import cli
from tests.conftest import REPO

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
        out.append((where, argv))
    return out


def test_the_documented_control_commands_run(hsm_daemon):
    """README's tour (and the docs' other status/inject/cpuid/vm lines) against a daemon whose
    VM 1 a device model serves: each exits 0."""
    import subprocess

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
