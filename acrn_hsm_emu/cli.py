"""acrn-hsm-emu: serve the node, check its configuration, and talk to a running daemon."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.metadata
import json
import math
import os
import pathlib
import re
import socket
import stat
import sys
import time
from typing import Any, NoReturn

import structlog

from acrn_hsm_emu import config, logs, publish
from acrn_hsm_emu.config import ConfigError
from acrn_hsm_emu.hypervisor.backends import resolve_backend

EXIT_USAGE = 2


class CliError(Exception):
    """A readable message for the user; exit code 1 (2 for usage/config)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def c_int(text: str) -> int:
    """A number in C syntax: 0x1F, 017 (octal), 42, with an optional u/l suffix."""
    t = text.strip().lower().rstrip("ul")
    neg = t.startswith("-")
    if neg:
        t = t[1:]
    try:
        if t.startswith("0x"):
            v = int(t[2:], 16)
        elif t.startswith("0b"):
            v = int(t[2:], 2)
        elif len(t) > 1 and t.startswith("0"):
            v = int(t[1:], 8)
        else:
            v = int(t, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return -v if neg else v


def vmid(text: str) -> int:
    """A VM id as ACRN numbers them (relative to the Service VM, which is 0)."""
    v = c_int(text)
    if not 0 <= v < 0xFFFF:
        raise argparse.ArgumentTypeError(f"not a VM id (0 to 65534): {text!r}")
    return v


def vcpu_index(text: str) -> int:
    v = c_int(text)
    if not 0 <= v < 0xFFFF:
        raise argparse.ArgumentTypeError(f"not a vCPU index (0 to 65534): {text!r}")
    return v


def u32(text: str) -> int:
    v = c_int(text)
    if not 0 <= v <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"not a 32-bit value: {text!r}")
    return v


def positive(text: str) -> int:
    v = c_int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return v


def seconds(text: str) -> float:
    """A finite, positive number of seconds."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return v


_BDF = re.compile(r"^(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])$")


def parse_bdf(text: str) -> tuple[int, int, int]:
    m = _BDF.match(text)
    if not m:
        raise CliError(f"not a PCI address BUS:DEV.FN (hex): {text!r}", EXIT_USAGE)
    bus, dev, fn = int(m["bus"], 16), int(m["dev"], 16), int(m["fn"])
    if dev > 31:
        raise CliError(f"PCI device number {dev} is above 31", EXIT_USAGE)
    return bus, dev, fn


_ACCESS_ARGS = {
    "pio-read": ("pio", False, ["ADDR", "SIZE"]),
    "pio-write": ("pio", True, ["ADDR", "SIZE", "VALUE"]),
    "mmio-read": ("mmio", False, ["ADDR", "SIZE"]),
    "mmio-write": ("mmio", True, ["ADDR", "SIZE", "VALUE"]),
    "pci-read": ("pci", False, ["BUS:DEV.FN", "REG", "SIZE"]),
    "pci-write": ("pci", True, ["BUS:DEV.FN", "REG", "SIZE", "VALUE"]),
}


def parse_access(words: list[str]) -> dict[str, Any]:
    """``pio-read 0x3f8 1`` and friends -> the control protocol's access fields."""
    if not words or words[0] not in _ACCESS_ARGS:
        raise CliError(f"ACCESS must start with one of: {', '.join(_ACCESS_ARGS)}", EXIT_USAGE)
    kind, write, names = _ACCESS_ARGS[words[0]]
    if len(words) - 1 != len(names):
        raise CliError(f"usage: {words[0]} {' '.join(names)}", EXIT_USAGE)
    args = words[1:]
    try:
        if kind == "pci":
            bus, dev, fn = parse_bdf(args[0])
            reg = c_int(args[1])
            if not 0 <= reg < 4096:
                raise CliError(f"PCI register {reg:#x} is outside 0..0xfff", EXIT_USAGE)
            addr = bus << 16 | dev << 11 | fn << 8 | reg
            rest = args[2:]
        else:
            addr = c_int(args[0])
            rest = args[1:]
        size = c_int(rest[0])
        value = c_int(rest[1]) if write else 0
    except argparse.ArgumentTypeError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    sizes = (1, 2, 4, 8) if kind == "mmio" else (1, 2, 4)
    if size not in sizes:
        raise CliError(
            f"{kind} access size must be one of {', '.join(map(str, sizes))}, not {size}", EXIT_USAGE
        )
    if not 0 <= value < (1 << (8 * size)):
        raise CliError(f"value {value:#x} does not fit in {size} byte(s)", EXIT_USAGE)
    if kind == "pio" and not 0 <= addr <= 0xFFFF:
        raise CliError(f"port {addr:#x} is outside 0..0xffff", EXIT_USAGE)
    if kind == "mmio" and not 0 <= addr < (1 << 64):
        raise CliError(f"address {addr:#x} is outside 64 bits", EXIT_USAGE)
    return {"kind": kind, "write": write, "addr": addr, "size": size, "value": value}


# -- the control socket client ----------------------------------------------


def find_daemon(
    config_file: str | None, node: str | None = None, run_dir: str | None = None, control: str | None = None
) -> tuple[str, str | None]:
    """The control socket of the daemon serving ``node`` (default: the configuration's node),
    and the node it must serve (None: whichever it serves).

    Each node's daemon has its own socket, derived from ``run_dir`` and ``node``
    (config.control_socket). ``control`` names the socket directly; ``$ACRN_HSM_EMU_CONTROL``
    does too when neither a node nor a run_dir is named. The configuration's ``control`` key
    counts for the configuration's own node and run_dir only."""
    overrides = {k: v for k, v in (("node", node), ("run_dir", run_dir)) if v is not None}
    env = os.environ.get("ACRN_HSM_EMU_CONTROL")
    if control is None and env and not overrides:
        return env, None
    settings = config.load(config_file, overrides)
    if control is not None:
        return control, settings.node if node is not None else None
    if overrides:
        configured = config.load(config_file)
        if (settings.node, settings.run_dir) != (configured.node, configured.run_dir):
            return config.control_socket(settings.run_dir, settings.node), settings.node
    return settings.control_path, settings.node


def connect(path: str, timeout: float = 60.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except FileNotFoundError:
        s.close()
        raise CliError(f"no daemon control socket at {path} (is acrn-hsm-emu serve running?)") from None
    except PermissionError:
        s.close()
        raise CliError(f"permission denied on {path}: the control socket is for root") from None
    except OSError as e:
        s.close()
        raise CliError(f"cannot reach the daemon at {path}: {e.strerror}") from None
    return s


def _exchange(s: socket.socket, request: dict[str, Any]) -> tuple[Any, list[int]]:
    """Send one request; the result and any descriptors that came with the reply."""
    buf = b""
    fds: list[int] = []
    try:
        s.sendall(json.dumps(request).encode() + b"\n")
        while not buf.endswith(b"\n"):
            chunk, more, _flags, _addr = socket.recv_fds(s, 65536, 4)
            fds += more
            if not chunk:
                raise ConnectionResetError
            buf += chunk
    except TimeoutError:
        raise CliError(f"the daemon did not answer within {s.gettimeout():g} s") from None
    except ConnectionError:  # a refused peer gets a reset, or an EOF
        raise CliError("the daemon closed the control connection") from None
    reply = json.loads(buf)
    if not reply.get("ok"):
        for fd in fds:
            os.close(fd)
        raise CliError(f"daemon: {reply.get('error')}")
    return reply["result"], fds


def control_call(path: str, request: dict[str, Any], timeout: float = 60.0, node: str | None = None) -> Any:
    """One request; with ``node``, the daemon refuses it unless it serves that node."""
    if node is not None:
        request = {**request, "node": node}
    with connect(path, timeout) as s:
        result, _fds = _exchange(s, request)
    return result


# -- commands -----------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    settings = config.load(args.config, config.flags(args))
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return serve(settings, command)[0]


def serve(settings: config.Settings, command: list[str], tasks: tuple[Any, ...] = ()) -> tuple[int, Any]:
    """Run the daemon to its end: the exit status, and the daemon (None if it did not start)."""
    import trio

    from acrn_hsm_emu.daemon import Daemon, SessionEnded, StartError, first_exception

    logs.configure(settings.log_format, settings.log_level)
    settings.backend = resolve_backend(settings.backend)
    error: StartError | None = None
    lost: SessionEnded | None = None
    daemon = None
    try:
        daemon = Daemon(settings, command, tasks)
        if settings.service_cpus:
            # Before trio starts: every thread the daemon makes from here inherits it;
            # vCPU threads set their own (vm.Placement.host_cpus).
            os.sched_setaffinity(0, settings.service_cpus)
        trio.run(daemon.run)
    except* StartError as group:  # maybe raised inside the daemon's nurseries
        error = first_exception(group)
    except* SessionEnded as group:  # the kernel took the node away while we served it
        lost = first_exception(group)
    if error is not None:
        structlog.get_logger("acrn_hsm_emu").error("daemon.cannot_start", reason=str(error))
        print(f"acrn-hsm-emu: {error}", file=sys.stderr)
        return 1, None
    if lost is not None:
        structlog.get_logger("acrn_hsm_emu").error("daemon.node_lost", reason=str(lost))
        print(f"acrn-hsm-emu: {lost}", file=sys.stderr)
        return 1, daemon
    assert daemon is not None
    return daemon.exit_code, daemon


def cmd_record(args: argparse.Namespace) -> int:
    """Record a VM's requests into a workload file (docs/record-replay.md)."""
    import subprocess
    import time

    from acrn_hsm_emu import launcher, recording

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    out = pathlib.Path(args.output)
    problem = "it is a directory" if out.is_dir() else (
        None if os.access(out.parent, os.W_OK) else f"{out.parent} is not a writable directory")
    if problem:
        raise CliError(f"cannot write the recording to {out}: {problem}", EXIT_USAGE)

    def call(action: str, **fields: Any) -> Any:
        return control_call(args.control, {"cmd": "record", "action": action, "vm": args.vm, **fields},
                            node=args.node)  # fmt: skip

    started = call("start", count=args.count)
    what = f"VM {args.vm}" + ("" if started["state"] == "recording" else " (from its CREATE_VM)")
    print(f"recording {what}", file=sys.stderr)
    proc = None
    status = 0
    try:
        if command:
            node = args.node or started["node"]
            proc = subprocess.Popen(launcher.argv_for(node, command))
        deadline = None if args.duration is None else time.monotonic() + args.duration
        result = None
        while True:
            if proc is not None and proc.poll() is not None:
                break
            if result is None and (
                call("status")["state"] == "stopped"
                or (deadline is not None and time.monotonic() >= deadline)
            ):
                result = call("stop")
                if proc is None:
                    break
            time.sleep(0.1)
    except KeyboardInterrupt:  # Ctrl-C: the end of the recording (the command got it too)
        result = None
    if proc is not None:
        status = proc.wait()
        status = status if status >= 0 else 128 - status
    if result is None:
        result = call("stop")
    runs = result["workloads"]
    if not runs:
        raise CliError(f"nothing was recorded from VM {args.vm} ({result['reason']}): did it run any I/O?")
    header = (f"acrn-hsm-emu record --vm {args.vm}: {result['accesses']} accesses; "
              f"recording ended: {result['reason']}\nreplay: acrn-hsm-emu replay FILE -- DEVICE-MODEL...")
    for path, wl in zip(recording.run_paths(out, len(runs)), runs, strict=True):
        try:
            recording.write_workload(path, wl, header)
        except OSError as e:
            raise CliError(f"cannot write the recording to {path}: {e.strerror}") from None
        vcpus = ", ".join(f"vCPU {v['id']}: {sum(s.get('repeat', 1) for s in v['steps'])} accesses"
                          for v in wl["vcpu"])  # fmt: skip
        print(f"{path}: {wl['name']}; {vcpus}")
    print(f"recording ended: {result['reason']}")
    return status


def cmd_replay(args: argparse.Namespace) -> int:
    """Serve with the scripted backend replaying RECORDING, run COMMAND, report the differences."""
    from acrn_hsm_emu import recording

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CliError("usage: acrn-hsm-emu replay [options] RECORDING -- COMMAND [ARGS...]", EXIT_USAGE)
    overrides = {**config.flags(args), "backend": "scripted", "workload": args.recording}
    settings = config.load(args.config, overrides)
    watch = recording.ReplayWatch(args.grace)
    code, daemon = serve(settings, command, (watch,))
    if daemon is None:
        return code
    lines, agreed = recording.replay_report(daemon.hypervisor.replay_summary(), args.recording)
    if watch.stopped_command:
        lines.insert(-1, f"  (the device model still ran {args.grace:g} s after the end: stopped)")
    print("\n".join(lines))
    if code != 0 and not watch.stopped_command:
        return code  # the device model failed: its status, as serve -- COMMAND
    return 0 if agreed else 1


def cmd_run(args: argparse.Namespace) -> int:
    """CMD with its value-argument ioctls (SET_IRQLINE) carried to the node (launcher.py)."""
    from acrn_hsm_emu.launcher import LaunchError, run

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CliError("usage: acrn-hsm-emu run [options] -- COMMAND [ARGS...]", EXIT_USAGE)
    node = args.node or config.load(args.config).node
    logs.configure(args.log_format, args.log_level)
    try:
        return run(command, node, verbose=args.log_level == "debug")
    except LaunchError as e:
        raise CliError(str(e), e.code) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = config.load(args.config, config.flags(args))
    source = settings.config_file or f"no file at {config.DEFAULT_CONFIG}, built-in defaults"
    print(f"# {source}: ok")
    print(config.render(settings))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Attach a sandboxed daemon's FUSE node in this mount namespace (ExecStartPost=+)."""
    from cdev.server import FS_TYPE, detach, is_stale, mounts

    settings = config.load(args.config, config.flags(args))
    path = settings.control_path
    with connect(path) as s:
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = int.from_bytes(creds[:4], "little")
        with contextlib.suppress(OSError):  # cannot tell (another PID namespace): ask anyway
            if publish.mount_namespace(pid) == publish.mount_namespace():
                print(f"{settings.node} is served in this mount namespace already: nothing to publish")
                return 0
        result, fds = _exchange(s, {"cmd": "node-tree"})
    node = result["node"]
    if result.get("transport", "fuse") != "fuse":
        print(f"{node} is a {result['transport']} device node, visible everywhere: nothing to publish")
        return 0
    if not fds:
        raise CliError("the daemon sent no mount to publish")
    try:
        if not os.path.isfile(node):
            raise CliError(
                f"cannot publish {node}: the daemon's node file is not visible here "
                "(its directory must be shared with the daemon: no PrivateDevices=/PrivateTmp= there)"
            )
        for m in mounts():
            if m.mount_point != node:
                continue
            if m.fs_type != FS_TYPE:
                raise CliError(f"cannot publish {node}: {m.fs_type} is mounted on it")
            if not is_stale(node):
                print(f"{node} is published already")
                return 0
            detach(node)  # what an earlier, crashed run left
        publish.attach_tree(fds[0], node)
    except OSError as e:
        raise CliError(f"cannot publish {node}: {e.strerror}") from None
    finally:
        for fd in fds:
            os.close(fd)
    print(f"published {node} (daemon pid {pid})")
    return 0


def cmd_unpublish(args: argparse.Namespace) -> int:
    """After the daemon stopped: remove what a crashed run left at the node path here."""
    from cdev.server import FS_TYPE, detach, mounts

    settings = config.load(args.config, config.flags(args))
    node = settings.node
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as probe:
        if probe.connect_ex(settings.control_path) in (0, errno.EAGAIN):
            raise CliError(
                f"the daemon still answers on {settings.control_path}: stop it before unpublishing"
            )
    ours = [m for m in mounts() if m.mount_point == node and m.fs_type == FS_TYPE]
    try:
        for _ in ours:
            detach(node)
        st = os.lstat(node) if ours and os.path.lexists(node) else None
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == 0:
            os.unlink(node)  # the crashed daemon's placeholder
    except OSError as e:
        raise CliError(f"cannot unpublish {node}: {e.strerror}") from None
    print(f"unpublished {node}" if ours else f"nothing published at {node}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from acrn_hsm_emu.observe import render

    if args.watch is None:
        st = control_call(args.control, {"cmd": "status"}, node=args.node)
        print(json.dumps(st, indent=2, sort_keys=True) if args.json else render.status(st))
        return 0
    tty = sys.stdout.isatty()
    while True:  # until Ctrl-C (exit 130) or the daemon goes (exit 1)
        st = control_call(args.control, {"cmd": "status"}, node=args.node)
        if args.json:
            print(json.dumps(st, sort_keys=True), flush=True)  # one line per refresh
        else:
            text = render.status(st)
            stamp = time.strftime("%H:%M:%S")
            # a terminal: redraw in place; a pipe: one block per refresh
            print(("\x1b[H\x1b[2J" if tty else "") + f"every {args.watch:g} s, {stamp}\n" + text + "\n",
                  flush=True)  # fmt: skip
        time.sleep(args.watch)


def _stream(args: argparse.Namespace, request: dict[str, Any]) -> socket.socket:
    """Connect and ask for a stream; the socket, after the daemon's first (ok) line."""
    if args.node is not None:
        request = {**request, "node": args.node}
    s = connect(args.control)
    try:
        s.sendall(json.dumps(request).encode() + b"\n")
        f = s.makefile("rb")
        line = f.readline()
    except TimeoutError:
        s.close()
        raise CliError(f"the daemon did not answer within {s.gettimeout():g} s") from None
    except ConnectionError:
        s.close()
        raise CliError("the daemon closed the control connection") from None
    if not line:
        s.close()
        raise CliError("the daemon closed the control connection")
    reply = json.loads(line)
    if not reply.get("ok"):
        s.close()
        raise CliError(f"daemon: {reply.get('error')}")
    s.settimeout(None)  # records come when they come
    args._reader = f
    return s


def _follow(args: argparse.Namespace, s: socket.socket, show: Any) -> int:
    """Print each record until Ctrl-C, the daemon's end, or --count records."""
    n = 0
    with s:
        for line in args._reader:
            rec = json.loads(line)
            print(json.dumps(rec, sort_keys=True) if args.json_out else show(rec), flush=True)
            n += 1
            if args.count and n >= args.count:
                return 0
    raise CliError("the daemon closed the control connection")


def cmd_trace(args: argparse.Namespace) -> int:
    from acrn_hsm_emu.observe import render

    if args.ioctls and args.requests:
        raise CliError("--ioctls and --requests exclude each other (neither: both)", EXIT_USAGE)
    what = "ioctls" if args.ioctls else "requests" if args.requests else "all"
    args.json_out = args.json or (args.format == "auto" and not sys.stdout.isatty()) or args.format == "json"
    s = _stream(args, {"cmd": "trace", "what": what, "vm": args.vm, "vcpu": args.vcpu, "errors": args.errors})
    return _follow(args, s, render.record)


def cmd_events(args: argparse.Namespace) -> int:
    args.json_out = True  # events are JSON lines, as QMP's
    s = _stream(args, {"cmd": "events", "recent": args.recent})
    return _follow(args, s, str)


def cmd_metrics(args: argparse.Namespace) -> int:
    text = control_call(args.control, {"cmd": "metrics"}, node=args.node)
    sys.stdout.write(text)
    return 0


def cmd_inject(args: argparse.Namespace) -> int:
    access = parse_access(args.access)
    value = control_call(
        args.control,
        {"cmd": "inject", "vm": args.vm, "vcpu": args.vcpu, "access": access, "timeout": args.timeout},
        timeout=args.timeout + 5,
        node=args.node,
    )
    if not access["write"]:
        print(f"{value:#x}")
    return 0


def cmd_cpuid(args: argparse.Namespace) -> int:
    regs = control_call(
        args.control, {"cmd": "cpuid", "leaf": args.leaf, "subleaf": args.subleaf, "vm": args.vm}, node=args.node
    )
    eax, ebx, ecx, edx = regs
    print(f"eax={eax:#010x} ebx={ebx:#010x} ecx={ecx:#010x} edx={edx:#010x}")
    sig = b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx))
    if sig.isascii() and sig.decode().isprintable() and sig.strip(b"\0"):
        print(f"signature={sig.decode()!r}")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, naming the (sub)command's own usage; exit 2."""

    def error(self, message: str) -> NoReturn:
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (usage: {usage})\n")


def _version() -> str:
    try:
        return importlib.metadata.version("acrn-hsm-emu")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown (not installed)"


def cmd_vm(args: argparse.Namespace) -> int:
    if args.action == "list":
        rows = control_call(args.control, {"cmd": "vm-list"}, node=args.node)
        if args.json:
            print(json.dumps(rows, indent=2, sort_keys=True))
        elif not rows:
            print("no VMs")
        for r in rows if not args.json else ():
            pid = f"  pid {r['owner_pid']}" if r["owner_pid"] else ""
            print(f"VM {r['vmid']}: {r['state']}  vcpus {r['vcpus']}  {r['owner']}{pid}  name {r['name']!r}")
        return 0
    control_call(args.control, {"cmd": f"vm-{args.action}", "vm": args.vmid}, node=args.node)
    print(f"VM {args.vmid} {'paused' if args.action == 'pause' else 'destroyed'}")
    return 0


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The parser and each subcommand's own parser, by name."""
    p = Parser(prog="acrn-hsm-emu", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    subs: dict[str, Parser] = {}

    def add(name: str, **kw: Any) -> Parser:
        sp: Parser = sub.add_parser(name, **kw)
        subs[name] = sp
        return sp

    s = add(
        "serve",
        help="serve /dev/acrn_hsm in the foreground",
        description="Serve the node. Settings come from the configuration file, then the flags. "
        "With a COMMAND, run it once the node is ready and exit with its status.",
    )
    config.add_flags(s)
    s.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
        help="run it once the node is ready, then stop (default: serve until SIGINT/SIGTERM)",
    )
    s.set_defaults(func=cmd_serve)

    r = add(
        "run",
        help="run a device model whose value-argument ioctls (SET_IRQLINE) must reach a FUSE node",
        description="Run COMMAND under a seccomp filter that hands its SET_IRQLINE (and ACRN's "
        "SETUP_VM_EVENT_FD) ioctls on the node to this launcher, which carries them to the daemon "
        "by pointer: under FUSE the kernel would refuse them with EFAULT. Everything else runs "
        "untouched. Exit status: COMMAND's (128+N for a signal N), 127 not found, 126 not "
        "executable, 125 the launcher failed.",
    )
    r.add_argument(
        "--config", metavar="FILE", default=None,
        help=f"take the node path from this configuration (default {config.DEFAULT_CONFIG}, which may be missing)",
    )
    r.add_argument("--node", metavar="PATH", default=None, help="the node (default: the configuration's, /dev/acrn_hsm)")
    r.add_argument(
        "--log-format", choices=("auto", "console", "json"), default="auto",
        help="the launcher's own log lines: auto (default: console on a terminal, else json), console or json",
    )
    r.add_argument(
        "--log-level", choices=logs.LEVELS, default="warning",
        help="the launcher's log level (default warning)",
    )
    r.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
        help="the program and its arguments (required)",
    )
    r.set_defaults(func=cmd_run)

    cc = add(
        "check-config",
        help="validate the configuration (file and flags) without starting; print the result",
        description="Validate the configuration (file and flags) without starting; print the result.",
    )
    config.add_flags(cc)
    cc.set_defaults(func=cmd_check_config)

    for name, func, text in (
        ("publish", cmd_publish, "attach a sandboxed daemon's FUSE node in this mount namespace"),
        ("unpublish", cmd_unpublish, "after the daemon stopped, remove what it left at the node path"),
    ):
        pp = add(name, help=text, description=text + " (systemd: ExecStartPost=+/ExecStopPost=+)")
        config.add_flags(pp)
        pp.set_defaults(func=func)

    def control_opt(sp: Parser) -> None:
        sp.add_argument(
            "--node", metavar="PATH", default=None,
            help="reach the daemon serving this node (default: the configuration's node, /dev/acrn_hsm)",
        )
        sp.add_argument(
            "--run-dir", metavar="DIR", default=None,
            help=f"the daemon's run_dir, where its control socket is (default: the configuration's, "
            f"{config.DEFAULT_RUN_DIR})",
        )
        sp.add_argument(
            "--control", metavar="PATH", default=None,
            help="the daemon's control socket (default: the node's, RUN_DIR/<node escaped>.sock, "
            "or $ACRN_HSM_EMU_CONTROL)",
        )
        sp.add_argument(
            "--config", default=None, metavar="FILE",
            help=f"find the node and run_dir in this configuration (default {config.DEFAULT_CONFIG}, "
            "which may be missing)",
        )

    st = add(
        "status", help="VMs, vCPUs, clients, pending requests and counters of a running daemon",
        description="VMs, vCPUs, clients, each VM's pending requests with their age, and the "
        "request counters explained, of the daemon serving the node (docs/observability.md).",
    )
    control_opt(st)
    st.add_argument("--json", action="store_true",
                    help="the status as JSON, fields in docs/observability.md (default: tables)")
    st.add_argument(
        "--watch", type=seconds, nargs="?", const=1.0, default=None, metavar="SECONDS",
        help="refresh every SECONDS (1 when given alone) until Ctrl-C; with --json one line per "
        "refresh (default: once)",
    )
    st.set_defaults(func=cmd_status)

    tr = add(
        "trace",
        help="a live decoded stream of ioctls (with the rule behind each refusal) and I/O requests",
        description="Every ioctl on the node, decoded, with its answer and, for a refusal, the rule "
        "that produced it; every I/O request with its vCPU, access, the client that got it, its "
        "answer and its latency (the express path included). Until Ctrl-C. Human-readable on a "
        "terminal, JSON lines otherwise (docs/observability.md).",
    )
    control_opt(tr)
    tr.add_argument("--vm", type=vmid, default=None, metavar="VMID", help="only this VM (default: all)")
    tr.add_argument("--vcpu", type=vcpu_index, default=None, metavar="N",
                    help="only this vCPU's requests and NOTIFY calls (default: all)")
    tr.add_argument("--ioctls", action="store_true", help="only ioctls (default: ioctls and requests)")
    tr.add_argument("--requests", action="store_true", help="only I/O requests (default: ioctls and requests)")
    tr.add_argument("--errors", action="store_true",
                    help="only refused ioctls and requests that did not complete normally (default: all)")
    tr.add_argument("--json", action="store_true", help="JSON lines even on a terminal (default: --format)")
    tr.add_argument("--format", choices=("auto", "text", "json"), default="auto",
                    help="auto (default: text on a terminal, else JSON lines), text or json")
    tr.add_argument("--count", type=int, default=0, metavar="N",
                    help="stop after N records (default 0: until Ctrl-C)")
    tr.set_defaults(func=cmd_trace)

    ev = add(
        "events",
        help="VM life cycle, clients, faults and limits as JSON lines (like QMP events)",
        description="Stream the daemon's events, one JSON object per line: {event, timestamp, "
        "data}. Each event and its fields: docs/observability.md. Until Ctrl-C.",
    )
    control_opt(ev)
    ev.add_argument("--recent", action="store_true",
                    help="first the last 256 events the daemon kept (default: only new ones)")
    ev.add_argument("--count", type=int, default=0, metavar="N",
                    help="stop after N events (default 0: until Ctrl-C)")
    ev.set_defaults(func=cmd_events)

    mt = add(
        "metrics",
        help="the Prometheus metrics, as a scrape of the metrics endpoint would get them",
        description="Print the metrics in the Prometheus text format, through the control socket "
        "(works with the HTTP endpoint off; docs/observability.md).",
    )
    control_opt(mt)
    mt.set_defaults(func=cmd_metrics)

    inj = add(
        "inject",
        help="have a vCPU perform a guest access",
        description="Have a vCPU perform a guest access; print what a read returned. "
        "ACCESS: pio-read ADDR SIZE | pio-write ADDR SIZE VALUE | mmio-read ADDR SIZE | "
        "mmio-write ADDR SIZE VALUE | pci-read BUS:DEV.FN REG SIZE | "
        "pci-write BUS:DEV.FN REG SIZE VALUE (numbers in C syntax). Options may come anywhere.",
    )
    control_opt(inj)
    inj.add_argument("--vm", type=vmid, required=True, metavar="VMID", help="the User VM (required; vmid 1 or above)")
    inj.add_argument("--vcpu", type=vcpu_index, default=0, metavar="N", help="the vCPU that performs it (default 0)")
    inj.add_argument(
        "--timeout", type=seconds, default=30.0, metavar="SECONDS",
        help="give up when no device model has answered by then (default 30)",
    )
    inj.add_argument("access", nargs="+", metavar="ACCESS", help="the access and its operands (required)")
    inj.set_defaults(func=cmd_inject)

    vm = add(
        "vm",
        help="list, pause or destroy the daemon's User VMs (root or the daemon's user)",
        description="vm list: every User VM the hypervisor holds, its state and owner (owned: "
        "a device model's open file; orphaned: its file is closed or lost it; unclaimed: a "
        "failed CREATE_VM's leftover). vm pause VMID, vm destroy VMID: as the device model "
        "would, for any of them; destroy pauses first. Orphaned VMs are also destroyed by "
        "themselves once their owner process is gone.",
    )
    control_opt(vm)
    vm.add_argument("action", choices=("list", "pause", "destroy"), metavar="ACTION",
                    help="list, pause or destroy (required)")
    vm.add_argument("vmid", type=vmid, nargs="?", default=None, metavar="VMID",
                    help="the User VM to pause or destroy (required for those; default: none)")
    vm.add_argument("--json", action="store_true", help="vm list as JSON (default: a summary)")
    vm.set_defaults(func=cmd_vm)

    rec = add(
        "record",
        help="record a VM's I/O requests and the device model's answers into a workload file",
        description="Record VM VMID's I/O requests as they reach the HSM, with the device model's "
        "answers, into a workload file (docs/record-replay.md) that `acrn-hsm-emu replay` replays. "
        "The VM may not exist yet: recording then starts at its CREATE_VM. Recording ends with "
        "COMMAND (run through the launcher, as `run` does), --duration, --count, the VM's "
        "destruction or Ctrl-C. Each RESET_VM starts a new run, written to FILE.runN beside FILE.",
    )
    control_opt(rec)
    rec.add_argument("--vm", type=vmid, required=True, metavar="VMID", help="the User VM (required)")
    rec.add_argument("-o", "--output", required=True, metavar="FILE",
                     help="the workload file: FILE.json is JSON, anything else TOML (required)")
    rec.add_argument("--count", type=positive, default=None, metavar="N",
                     help="stop after N accesses (default: no limit but 1,000,000)")
    rec.add_argument("--duration", type=seconds, default=None, metavar="SECONDS",
                     help="stop after this long (default: until COMMAND exits, the VM is destroyed or Ctrl-C)")
    rec.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                     help="run this device model, and record until it exits (default: none)")
    rec.set_defaults(func=cmd_record)

    rp = add(
        "replay",
        help="replay a recording against a device model and report every answer that differs",
        description="Serve the node (as `serve`) with the scripted backend replaying RECORDING, "
        "run COMMAND (the device model) and print every read whose answer differs from the "
        "recorded one (vCPU, step, access, expected, got) and how far each vCPU got. Exit "
        "status: COMMAND's if it failed, else 1 if an answer differed or the replay did not "
        "complete, else 0. No KVM and no guest needed.",
    )
    for key in config.KEYS.values():  # serve's flags, but the backend and the workload are ours
        if key.name not in ("backend", "workload"):
            rp.add_argument(key.flag, dest=key.name, metavar=key.metavar, default=None, help=key.help)
    rp.add_argument("--config", metavar="FILE", default=None,
                    help=f"configuration file (default {config.DEFAULT_CONFIG}, which may be missing)")
    rp.add_argument("--grace", type=seconds, default=2.0, metavar="SECONDS",
                    help="once the recording is replayed to its end, stop COMMAND if it still runs "
                    "after this long (default 2)")  # fmt: skip
    rp.add_argument("recording", metavar="RECORDING", help="the workload file `record` wrote (required)")
    rp.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                    help="the device model and its arguments (required)")
    rp.set_defaults(func=cmd_replay)

    cp = add("cpuid", help="CPUID as the guest sees it", description="CPUID as a guest sees it.")
    control_opt(cp)
    cp.add_argument("leaf", type=u32, metavar="LEAF", help="EAX (required)")
    cp.add_argument("subleaf", type=u32, nargs="?", default=0, metavar="SUBLEAF", help="ECX (default 0)")
    cp.add_argument("--vm", type=vmid, default=None, metavar="VMID", help="a User VM's view (default: the Service VM's)")
    cp.set_defaults(func=cmd_cpuid)
    return p, subs


# Commands whose options may come anywhere among their operands (parse_intermixed_args).
_INTERMIXED = ("status", "inject", "cpuid", "vm", "trace", "events", "metrics")
_CONTROL_CLIENTS = ("status", "inject", "cpuid", "vm", "record", "trace", "events", "metrics")


def parse(argv: list[str]) -> argparse.Namespace:
    parser, subs = build_parser()
    if argv and argv[0] in _INTERMIXED:
        args = subs[argv[0]].parse_intermixed_args(argv[1:])
        args.subcommand = argv[0]
        if argv[0] == "vm" and (args.action == "list") != (args.vmid is None):
            subs["vm"].error("vm list takes no VMID" if args.vmid is not None else f"vm {args.action} needs a VMID")
        return args
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's own usage, not the top level's
        subs[args.subcommand].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.subcommand in _CONTROL_CLIENTS:
            args.control, args.node = find_daemon(args.config, args.node, args.run_dir, args.control)
        return int(args.func(args))
    except CliError as e:
        print(f"acrn-hsm-emu: {e}", file=sys.stderr)
        return e.code
    except ConfigError as e:
        for problem in e.problems:
            print(f"acrn-hsm-emu: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
