"""The configuration file and its flags: precedence, checks, messages, check-config."""

from __future__ import annotations

import grp
import os
import pathlib
import pwd
import subprocess
import tempfile

import pytest

from acrn_hsm_emu import cli, config
from acrn_hsm_emu.config import KEYS, ConfigError
from tests.conftest import VENV_BIN, mounted_under, node_path

EXE = str(VENV_BIN / "acrn-hsm-emu")


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, check=False)


def write(tmp_path: pathlib.Path, text: str, name: str = "config.toml") -> pathlib.Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# -- bad files: one readable line naming file, key and reason; exit 2; check-config agrees --

BAD = [
    ('node_mode = "0999"\n', "node_mode", "must be an octal mode like \"0660\", not '0999'"),
    ("node_mode = 660\n", "node_mode",
     "660 is not a permission mode within 0777 (a TOML integer is decimal: write 0o660 or \"0660\")"),
    ('transport = "usb"\n', "transport", "must be one of auto, fuse, cuse, not 'usb'"),
    ("node = 5\n", "node", "must be a string, not 5"),
    ('node = "dev/acrn_hsm"\n', "node", "must be an absolute path, not 'dev/acrn_hsm'"),
    ('node_owner = "no-such-user-here"\n', "node_owner", "no such user 'no-such-user-here'"),
    ('node_group = "no-such-group-here"\n', "node_group", "no such group 'no-such-group-here'"),
    ('log_level = "loud"\n', "log_level", "must be one of debug, info, warning, error, critical, not 'loud'"),
    ("[log]\nformat = \"json\"\n", "log", "unknown key (known keys: " + ", ".join(KEYS) + ")"),
    ('express = "yes"\n', "express", "must be one of on, off, not 'yes'"),
    ("express_poll_us = 5000\n", "express_poll_us", "must be from 0 to 1000, not 5000"),
    ('express_poll_us = "fast"\n', "express_poll_us", "must be a whole number from 0 to 1000, not 'fast'"),
    ("express_poll_us = 2.5\n", "express_poll_us", "must be a whole number from 0 to 1000, not 2.5"),
    ('vcpu_cpus = "one"\n', "vcpu_cpus", 'must be a CPU list like "1" or "0,2-3", not \'one\''),
    ('vcpu_cpus = "1,"\n', "vcpu_cpus", 'must be a CPU list like "1" or "0,2-3", not \'1,\''),
    ("service_cpus = 1.5\n", "service_cpus", 'must be a CPU list like "1" or "0,2-3", not 1.5'),
    ('service_cpus = "3-1"\n', "service_cpus", "'3-1' is a range that ends before it starts"),
    ('vcpu_cpus = "4095"\n', "vcpu_cpus",
     f"this process may not run on CPU 4095 (it may run on {config.format_cpus(os.sched_getaffinity(0))})"),
]


@pytest.mark.parametrize(("text", "key", "reason"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_value_is_one_line_exit_2_and_check_config_agrees(tmp_path, text, key, reason):
    cfg = write(tmp_path, text)
    expected = f"acrn-hsm-emu: {cfg}: {key}: {reason}\n"
    served = run("serve", "--config", str(cfg), "--node", str(tmp_path / "node"),
                 "--run-dir", str(tmp_path / "run"))
    checked = run("check-config", "--config", str(cfg))
    for p in (served, checked):
        assert p.returncode == 2, p
        assert p.stderr == expected
        assert "Traceback" not in p.stderr + p.stdout
    assert served.stdout == checked.stdout == ""
    assert not (tmp_path / "node").exists() and not (tmp_path / "run").exists()


def test_unknown_key_suggests_the_near_one(tmp_path):
    cfg = write(tmp_path, 'node_mdoe = "0600"\n')
    p = run("check-config", "--config", str(cfg))
    assert p.returncode == 2
    assert p.stderr.startswith(f"acrn-hsm-emu: {cfg}: node_mdoe: unknown key (did you mean 'node_mode'? ")


def test_every_problem_is_listed_one_per_line(tmp_path):
    cfg = write(tmp_path, 'transport = "usb"\nbogus = 1\n')
    p = run("check-config", "--config", str(cfg), "--node-mode", "rw")
    assert p.returncode == 2
    assert p.stderr.splitlines() == [
        f"acrn-hsm-emu: {cfg}: transport: must be one of auto, fuse, cuse, not 'usb'",
        f"acrn-hsm-emu: {cfg}: bogus: unknown key (known keys: {', '.join(KEYS)})",
        "acrn-hsm-emu: command line: --node-mode: must be an octal mode like \"0660\", not 'rw'",
    ]


def test_syntax_error_and_missing_file(tmp_path):
    cfg = write(tmp_path, "node = \n")
    p = run("check-config", "--config", str(cfg))
    assert p.returncode == 2
    assert p.stderr.startswith(f"acrn-hsm-emu: {cfg}: (syntax): ") and len(p.stderr.splitlines()) == 1
    missing = tmp_path / "nope.toml"
    for sub in ("check-config", "serve"):
        p = run(sub, "--config", str(missing))
        assert (p.returncode, p.stderr) == (2, f"acrn-hsm-emu: {missing}: (file): No such file or directory\n")


def test_referenced_scenario_is_checked_with_its_own_message(tmp_path):
    (tmp_path / "scen.toml").write_text("[platform]\npcpus = 0\n")
    cfg = write(tmp_path, 'scenario = "scen.toml"\n')  # relative to the config file
    p = run("check-config", "--config", str(cfg))
    assert p.returncode == 2
    assert p.stderr.startswith(f"acrn-hsm-emu: {tmp_path / 'scen.toml'}: platform.pcpus: "), p.stderr
    p = run("serve", "--config", str(cfg), "--node", str(tmp_path / "n"), "--run-dir", str(tmp_path / "r"))
    assert p.returncode == 2 and p.stderr.startswith(f"acrn-hsm-emu: {tmp_path / 'scen.toml'}: platform.pcpus: ")


def test_missing_default_file_means_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    s = config.load()
    assert (s.node, s.transport, s.node_mode, s.config_file) == ("/dev/acrn_hsm", "auto", 0o600, None)
    assert (s.node_uid, s.node_gid) == (os.geteuid(), os.getegid())
    assert cli.main(["check-config"]) == 0
    assert f"no file at {tmp_path / 'absent.toml'}, built-in defaults: ok" in capsys.readouterr().out


def test_default_file_is_read_when_present(tmp_path, monkeypatch):
    cfg = write(tmp_path, 'transport = "fuse"\n')
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(cfg))
    assert config.load().transport == "fuse"
    assert config.load().config_file == str(cfg)


def test_flags_win_over_the_file(tmp_path):
    cfg = write(tmp_path, 'transport = "cuse"\nnode_mode = "0600"\nlog_level = "debug"\n')
    s = config.load(str(cfg), {"transport": "fuse", "node_mode": "0o640"})
    assert (s.transport, s.node_mode, s.log_level) == ("fuse", 0o640, "debug")


def test_every_key_is_a_flag_and_back():
    _parser, subs = cli.build_parser()
    for sub in ("serve", "check-config"):
        sp = subs[sub]
        flags = {o for a in sp._actions for o in a.option_strings} - {"-h", "--help", "--config"}
        assert flags == {k.flag for k in KEYS.values()}


def test_owner_group_mode_forms(tmp_path):
    nobody = pwd.getpwnam("nobody")
    cfg = write(tmp_path, f'node_owner = "nobody"\nnode_group = {nobody.pw_gid}\nnode_mode = 0o640\n')
    s = config.load(str(cfg))
    assert (s.node_uid, s.node_gid, s.node_mode) == (nobody.pw_uid, nobody.pw_gid, 0o640)
    s = config.load(str(cfg), {"node_owner": "0", "node_group": grp.getgrgid(0).gr_name, "node_mode": "660"})
    assert (s.node_uid, s.node_gid, s.node_mode) == (0, 0, 0o660)


def test_check_config_output_is_a_config_that_round_trips(tmp_path):
    cfg = write(tmp_path, 'node = "/dev/other_hsm"\nnode_owner = "nobody"\nnode_mode = "0660"\n'
                'backend = "scripted"\nlog_format = "json"\n')
    first = run("check-config", "--config", str(cfg))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"# {cfg}: ok\n")
    again = write(tmp_path, first.stdout, "effective.toml")
    second = run("check-config", "--config", str(again))
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[1:] == first.stdout.splitlines()[1:]
    assert config.load(str(again)).node_uid == pwd.getpwnam("nobody").pw_uid


def test_cpu_list_forms_and_their_round_trip(tmp_path):
    """taskset's list form, in a file or a flag; check-config prints it back
    folded into ranges; unset means any CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    s = config.load(str(write(tmp_path, f"vcpu_cpus = {cpus[-1]}\n")), {"service_cpus": f" {cpus[0]} "})
    assert (s.vcpu_cpus, s.service_cpus) == ((cpus[-1],), (cpus[0],))
    every = ",".join(str(c) for c in reversed(cpus)) + f",{cpus[0]}"  # out of order, repeated
    s = config.load(None, {"vcpu_cpus": every})
    assert s.vcpu_cpus == tuple(cpus)
    assert config.format_cpus([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert config.load(None, {}).vcpu_cpus == config.load(None, {}).service_cpus == ()
    cfg = write(tmp_path, f'vcpu_cpus = "{every}"\n')
    out = run("check-config", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert f'vcpu_cpus = "{config.format_cpus(cpus)}"' in out.stdout.splitlines()
    assert "# service_cpus: any" in out.stdout.splitlines()


def test_socket_path_length_is_checked():
    with pytest.raises(ConfigError) as e:
        config.load(None, {"control": "/" + "x" * 200})
    assert e.value.problems == [
        "command line: --control: is 201 bytes long; a unix socket path has at most 107"
    ]


# -- the daemon applies what the file says --------------------------------------------


@pytest.mark.needs_fuse
def test_daemon_applies_owner_group_mode_from_the_file(daemon_factory, tmp_path, transport):
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    # A directory every user can traverse (pytest's tmp_path is root's alone).
    shared = pathlib.Path(tempfile.mkdtemp(prefix="acrn-hsm-cfg-"))
    shared.chmod(0o755)
    # CUSE makes its node under /dev (the fixture's path there is one per test)
    node = shared / "acrn_hsm" if transport == "fuse" else node_path(tmp_path, transport, "cfg")
    try:
        cfg = write(tmp_path, f'node = "{node}"\nnode_owner = "nobody"\nnode_group = "{group}"\n'
                    'node_mode = "0640"\n')
        # The fixture's own --node comes first on the command line; the file's is overridden by it,
        # so drop it: the config's node must be the one served.
        d = daemon_factory("--config", str(cfg), start=False)
        d.args.remove("--node")
        d.args.remove(str(d.node))
        d.node = node
        d.start()
        st = os.stat(node)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (nobody.pw_uid, nobody.pw_gid, 0o640)
        as_nobody = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
        probe = "import os, sys; os.close(os.open(sys.argv[1], getattr(os, sys.argv[2])))"
        # The kernel enforces what the FUSE file reports (default_permissions), or the CUSE
        # device's own owner and mode: the owner
        # may read and write; a user outside owner and group may not even read.
        ok = subprocess.run([*as_nobody, "/usr/bin/python3", "-c", probe, str(node), "O_RDWR"],
                            capture_output=True, text=True, check=False)
        assert ok.returncode == 0, ok.stderr
        other = ["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups"]
        denied = subprocess.run([*other, "/usr/bin/python3", "-c", probe, str(node), "O_RDONLY"],
                                capture_output=True, text=True, check=False)
        assert "PermissionError" in denied.stderr
        assert d.stop() == 0
        assert not mounted_under(shared)
        assert not node.exists()
    finally:
        for mp in reversed(mounted_under(shared)):
            subprocess.run(["umount", "-l", mp], check=False)
        shared.rmdir()
