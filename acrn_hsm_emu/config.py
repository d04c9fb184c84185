"""The service configuration: one flat TOML file, every key also a command-line flag.

Precedence: built-in default < file < flag. The default file
(``/etc/acrn-hsm-emu/config.toml``) may be missing; a file named with
``--config`` must exist. Every problem is reported as ``SOURCE: KEY: REASON``
(the scenario and workload loaders use the same shape), where SOURCE is the
file or ``command line`` and KEY the file key or the flag.
"""

from __future__ import annotations

import argparse
import difflib
import grp
import hashlib
import os
import pwd
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acrn_hsm_emu import logs
from acrn_hsm_emu.hypervisor.backends import BACKENDS
from acrn_hsm_emu.hypervisor.scenario import Scenario, ScenarioError, load_scenario
from acrn_hsm_emu.hypervisor.workload import Workload, WorkloadError
from cdev import cuse

DEFAULT_CONFIG = "/etc/acrn-hsm-emu/config.toml"
DEFAULT_NODE = "/dev/acrn_hsm"
DEFAULT_RUN_DIR = "/run/acrn-hsm-emu"
COMMAND_LINE = "command line"
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the NUL


class ConfigError(Exception):
    """One line per problem, each ``SOURCE: KEY: REASON``; the CLI exits 2."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class Settings:
    """Everything the daemon needs, validated."""

    node: str = DEFAULT_NODE
    transport: str = "auto"
    backend: str = "auto"
    scenario: Scenario | None = None  # None: the built-in scenario
    workload: Workload | None = None
    scenario_file: str | None = None
    workload_file: str | None = None
    run_dir: str = DEFAULT_RUN_DIR
    control: str | None = None  # default: control_socket(run_dir, node)
    node_mode: int = 0o600
    node_uid: int = 0
    node_gid: int = 0
    log_format: str = "auto"
    log_level: str = "info"
    ioeventfd_mismatch: str = "drop"
    abi: str = "upstream"
    express: str = "on"
    express_poll_us: int = 200
    service_cpus: tuple[int, ...] = ()  # (): wherever the scheduler puts the daemon
    vcpu_cpus: tuple[int, ...] = ()  # (): vCPU threads run on any CPU
    vcpu_poll_us: int = 200
    metrics_listen: tuple[str, int] | None = None  # None: no metrics endpoint
    config_file: str | None = None  # the file that was read, if any

    @property
    def control_path(self) -> str:
        return self.control or control_socket(self.run_dir, self.node)


def escape_path(path: str) -> str:
    """``systemd-escape --path``: ``/dev/acrn_hsm`` -> ``dev-acrn_hsm``, ``/a-b`` -> ``a\\x2db``."""
    p = os.path.normpath(path).strip("/")
    if not p:
        return "-"
    out = []
    for i, ch in enumerate(p):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in "_:" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def control_socket(run_dir: str, node: str) -> str:
    """The default control socket of the daemon serving ``node``: one per node (docs/configuration.md).

    ``RUN_DIR/<node escaped as systemd-escape --path does>.sock``; where that is longer than a
    unix socket path may be, ``RUN_DIR/node-<16 hex digits of the path's SHA-256>.sock``."""
    path = os.path.join(run_dir, escape_path(node) + ".sock")
    if len(path.encode()) <= SUN_PATH_MAX:
        return path
    digest = hashlib.sha256(os.path.normpath(node).encode()).hexdigest()[:16]
    return os.path.join(run_dir, f"node-{digest}.sock")


# -- value checkers: (value, base directory for relative paths) -> value; ValueError(reason) --


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_describe(value)}")
    if "\0" in value or not value:
        raise ValueError("must be a non-empty string without NUL")
    return value


def _choice(*choices: str) -> Callable[[Any, Path], str]:
    def check(value: Any, _base: Path) -> str:
        v = _string(value)
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {v!r}")
        return v

    return check


def _absolute(value: Any, _base: Path) -> str:
    v = _string(value)
    if not v.startswith("/"):
        raise ValueError(f"must be an absolute path, not {v!r}")
    return os.path.normpath(v)


def _socket_path(value: Any, base: Path) -> str:
    v = _absolute(value, base)
    if len(v.encode()) > SUN_PATH_MAX:
        raise ValueError(
            f"is {len(v.encode())} bytes long; a unix socket path has at most {SUN_PATH_MAX}"
        )
    return v


def _file(value: Any, base: Path) -> str:
    """A file the daemon reads; relative to the config file's directory (or the cwd)."""
    return str(base / _string(value))


def _mode(value: Any, _base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be an octal mode like \"0660\", not {_describe(value)}")
    if isinstance(value, str):
        text = value.removeprefix("0o")
        if not text or any(c not in "01234567" for c in text):
            raise ValueError(f"must be an octal mode like \"0660\", not {value!r}")
        mode = int(text, 8)
    else:
        mode = value
    if not 0 <= mode <= 0o777:
        hint = " (a TOML integer is decimal: write 0o660 or \"0660\")" if isinstance(value, int) else ""
        raise ValueError(f"{value!r} is not a permission mode within 0777{hint}")
    return mode


def _int_range(lo: int, hi: int) -> Callable[[Any, Path], int]:
    def check(value: Any, _base: Path) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"must be a whole number from {lo} to {hi}, not {_describe(value)}")
        try:
            v = int(value)
        except ValueError:
            raise ValueError(f"must be a whole number from {lo} to {hi}, not {value!r}") from None
        if not lo <= v <= hi:
            raise ValueError(f"must be from {lo} to {hi}, not {v}")
        return v

    return check


def format_cpus(cpus: Iterable[int]) -> str:
    """The cpuset list form of ``cpus``: ``0-2,5``."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _cpu_list(value: Any, _base: Path) -> tuple[int, ...]:
    """Host CPUs in the list form of taskset and cpusets (``1``, ``0,2-3``), each
    one this process may run on (its affinity at start, which systemd's
    ``CPUAffinity=`` or a container's cpuset narrows)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f'must be a CPU list like "1" or "0,2-3", not {_describe(value)}')
    allowed = os.sched_getaffinity(0)
    cpus: set[int] = set()
    for part in value.replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f'must be a CPU list like "1" or "0,2-3", not {value!r}')
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"{part!r} is a range that ends before it starts")
        # a part beyond the last allowed CPU is named whole (and never expanded)
        wanted = set(range(first, last + 1)) if last <= max(allowed) else set()
        missing = format_cpus(wanted - allowed) if wanted else part
        if missing:
            raise ValueError(
                f"this process may not run on CPU {missing} (it may run on {format_cpus(allowed)})"
            )
        cpus |= wanted
    return tuple(sorted(cpus))


def _id(kind: str, lookup: Callable[[str], Any]) -> Callable[[Any, Path], int]:
    """A user or group: a name, or a number (TOML integer or digits)."""

    def check(value: Any, _base: Path) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"must be a {kind} name or number, not {_describe(value)}")
        if isinstance(value, int) or value.isdigit():
            n = int(value)
            if not 0 <= n < 2**32 - 1:
                raise ValueError(f"{kind} id {n} is out of range")
            return n
        try:
            return int(lookup(value)[2])
        except KeyError:
            raise ValueError(f"no such {kind} {value!r}") from None

    return check


def _listen(value: Any, _base: Path) -> tuple[str, int] | None:
    """``off``, a port (on the loopback address) or ``HOST:PORT`` (``[::1]:PORT`` for IPv6)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    v = _string(value)
    if v == "off":
        return None
    host, sep, port = v.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", v
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'must be "off", a port, or HOST:PORT (like "127.0.0.1:9464"), not {v!r}')
    return host, int(port)


def format_listen(listen: tuple[str, int] | None) -> str:
    if listen is None:
        return "off"
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    check: Callable[[Any, Path], Any]
    help: str
    metavar: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


KEYS: dict[str, Key] = {
    k.name: k
    for k in (
        Key("node", _absolute, f"node path (default {DEFAULT_NODE})", "PATH"),
        Key("node_owner", _id("user", pwd.getpwnam), "owner of the node (default: the daemon's user)", "USER"),
        Key("node_group", _id("group", grp.getgrnam), "group of the node (default: the daemon's group)", "GROUP"),
        Key("node_mode", _mode, "permissions of the node, octal (default 0600)", "MODE"),
        Key("transport", _choice("auto", "fuse", "cuse"), "auto (default: cuse where /dev/cuse exists and the node is under /dev, else fuse), fuse or cuse", "NAME"),
        Key(
            "backend",
            _choice("auto", *BACKENDS),
            f"vCPU backend: auto (default: kvm where /dev/kvm works, else scripted) or one of {', '.join(BACKENDS)}",
            "NAME",
        ),
        Key("scenario", _file, "scenario TOML file (default: the built-in one)", "FILE"),
        Key("workload", _file, "workload file for the scripted backend (default: none)", "FILE"),
        Key("run_dir", _absolute, f"run-time directory (default {DEFAULT_RUN_DIR})", "DIR"),
        Key("control", _socket_path, "control socket path (default: one per node, RUN_DIR/<node escaped>.sock, e.g. "
            "/run/acrn-hsm-emu/dev-acrn_hsm.sock)", "PATH"),
        Key("log_format", _choice("auto", "console", "json"), "auto (default: console on a terminal, else json), console or json", "NAME"),
        Key("log_level", _choice(*logs.LEVELS), "debug, info (default), warning, error or critical", "NAME"),
        Key(
            "ioeventfd_mismatch",
            _choice("drop", "forward"),
            "an access inside an ioeventfd's range that does not match it: drop (the "
            "kernel's behaviour, default) or forward to the next client (KVM's)",
            "NAME",
        ),
        Key(
            "abi",
            _choice("upstream", "acrn-kernel"),
            "the ioctl ABI served: upstream (Linux's driver, default) or acrn-kernel "
            "(ACRN's own Service VM kernel: asyncio, VM events, PIO regions)",
            "NAME",
        ),
        Key(
            "express",
            _choice("on", "off"),
            "on (default): the default client's request cycle runs in C where no other "
            "client is involved; off: every request takes the Python path (same answers)",
            "NAME",
        ),
        Key(
            "express_poll_us",
            _int_range(0, 1000),
            "the most microseconds the express reader polls after an answer before it "
            "sleeps (adaptive, as KVM's halt polling): 0 never polls; default 200",
            "N",
        ),
        Key(
            "service_cpus",
            _cpu_list,
            "host CPUs for the daemon's own threads, the Service VM's side (default: "
            "any); run the device model there too, e.g. with taskset",
            "CPUS",
        ),
        Key(
            "vcpu_cpus",
            _cpu_list,
            "host CPUs that stand for the scenario's pCPUs: each vCPU thread is pinned "
            "to the CPU of its pCPU (pCPU n on the n-th listed, wrapping), as ACRN runs a "
            "vCPU on its pCPU (default: vCPU threads run on any CPU)",
            "CPUS",
        ),
        Key(
            "vcpu_poll_us",
            _int_range(0, 1000),
            "with vcpu_cpus, the most microseconds a vCPU waiting for its request's "
            "completion polls before it sleeps (as KVM's halt_poll_ns): 0 never; default 200",
            "N",
        ),
        Key(
            "metrics_listen",
            _listen,
            "serve Prometheus metrics over HTTP: off (default), a port (on 127.0.0.1) or "
            "HOST:PORT; unauthenticated, keep it on a trusted address (docs/configuration.md)",
            "ADDR",
        ),
    )
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per key; values stay strings until :func:`load` checks them."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"configuration file (default {DEFAULT_CONFIG}, which may be missing)",
    )
    for key in KEYS.values():
        parser.add_argument(key.flag, dest=key.name, metavar=key.metavar, default=None, help=key.help)


def flags(args: argparse.Namespace) -> dict[str, str]:
    """The key flags given on the command line."""
    return {name: v for name in KEYS if (v := getattr(args, name, None)) is not None}


def _read(path: str, explicit: bool) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        if explicit:
            raise ConfigError([f"{path}: (file): {e.strerror}"]) from None
        return None
    except OSError as e:
        raise ConfigError([f"{path}: (file): {e.strerror}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: (syntax): {e}"]) from None


def _unknown(name: str) -> str:
    near = difflib.get_close_matches(name, KEYS, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return f"unknown key ({hint}known keys: {', '.join(KEYS)})"


def _node_for_transport(values: Mapping[str, Any], where: Mapping[str, str]) -> list[str]:
    """A node path the transport cannot serve (CUSE: only below /dev), as a problem of ``node``."""
    # auto serves a path outside /dev over FUSE: only an explicit cuse can be wrong
    if values.get("transport") != "cuse" or "node" not in values:
        return []
    try:
        cuse.device_name(values["node"])
    except cuse.CuseNameError as e:
        return [f"{where['node']}: {e}"]
    return []


def load(path: str | None = None, overrides: Mapping[str, str] | None = None) -> Settings:
    """Read the file, apply the flags, check everything; :class:`ConfigError` lists every problem."""
    explicit = path is not None
    file = path if path is not None else DEFAULT_CONFIG
    values: dict[str, Any] = {}
    where: dict[str, str] = {}  # key -> "SOURCE: KEY" of the value that counts
    problems: list[str] = []
    data = _read(file, explicit)
    base = Path(file).resolve().parent
    for name, raw in (data or {}).items():
        if name not in KEYS:
            problems.append(f"{file}: {name}: {_unknown(name)}")
            continue
        try:
            values[name] = KEYS[name].check(raw, base)
            where[name] = f"{file}: {name}"
        except ValueError as e:
            problems.append(f"{file}: {name}: {e}")
    for name, raw in (overrides or {}).items():
        key = KEYS[name]
        try:
            values[name] = key.check(raw, Path.cwd())
            where[name] = f"{COMMAND_LINE}: {key.flag}"
        except ValueError as e:
            problems.append(f"{COMMAND_LINE}: {key.flag}: {e}")
    problems += _node_for_transport(values, where)
    if problems:
        raise ConfigError(problems)

    settings = Settings(
        node_uid=os.geteuid(),
        node_gid=os.getegid(),
        config_file=file if data is not None else None,
    )
    for name in (
        "node", "transport", "backend", "run_dir", "control", "node_mode", "log_format", "log_level",
        "ioeventfd_mismatch", "abi", "express", "express_poll_us", "service_cpus", "vcpu_cpus",
        "vcpu_poll_us", "metrics_listen",
    ):  # fmt: skip
        if name in values:
            setattr(settings, name, values[name])
    settings.node_uid = values.get("node_owner", settings.node_uid)
    settings.node_gid = values.get("node_group", settings.node_gid)
    # The files the config names are part of it: check them now, with their own messages.
    try:
        if "scenario" in values:
            settings.scenario_file = values["scenario"]
            settings.scenario = load_scenario(values["scenario"])
        if "workload" in values:
            settings.workload_file = values["workload"]
            settings.workload = Workload.load(values["workload"])
    except (ScenarioError, WorkloadError) as e:
        raise ConfigError([str(e)]) from None
    return settings


def render(settings: Settings) -> str:
    """The effective configuration as a config file (``check-config`` prints it)."""

    def q(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        f"node = {q(settings.node)}",
        f"node_owner = {settings.node_uid}",
        f"node_group = {settings.node_gid}",
        f'node_mode = "{settings.node_mode:04o}"',
        f"transport = {q(settings.transport)}",
        f"backend = {q(settings.backend)}",
    ]
    lines.append(f"scenario = {q(settings.scenario_file)}" if settings.scenario_file else "# scenario: built-in")
    lines.append(f"workload = {q(settings.workload_file)}" if settings.workload_file else "# workload: none")
    lines += [
        f"run_dir = {q(settings.run_dir)}",
        f"control = {q(settings.control_path)}",
        f"log_format = {q(settings.log_format)}",
        f"log_level = {q(settings.log_level)}",
        f"ioeventfd_mismatch = {q(settings.ioeventfd_mismatch)}",
        f"abi = {q(settings.abi)}",
        f"express = {q(settings.express)}",
        f"express_poll_us = {settings.express_poll_us}",
    ]
    for name in ("service_cpus", "vcpu_cpus"):
        cpus: tuple[int, ...] = getattr(settings, name)
        lines.append(f"{name} = {q(format_cpus(cpus))}" if cpus else f"# {name}: any")
    lines.append(f"vcpu_poll_us = {settings.vcpu_poll_us}")
    lines.append(f"metrics_listen = {q(format_listen(settings.metrics_listen))}")
    return "\n".join(lines)
