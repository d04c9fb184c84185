"""``acrn-hsm-emu``: serve the node, and talk to a running daemon."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from typing import Any, TypeVar

import structlog

from acrn_hsm_emu import logs
from acrn_hsm_emu.hypervisor.backends import BACKENDS, resolve_backend

EXIT_USAGE = 2
StartErrorT = TypeVar("StartErrorT", bound=BaseException)


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
        raise CliError(f"{kind} access size must be one of {sizes}, not {size}", EXIT_USAGE)
    if not 0 <= value < (1 << (8 * size)):
        raise CliError(f"value {value:#x} does not fit in {size} byte(s)", EXIT_USAGE)
    if kind == "pio" and not 0 <= addr <= 0xFFFF:
        raise CliError(f"port {addr:#x} is outside 0..0xffff", EXIT_USAGE)
    if kind == "mmio" and not 0 <= addr < (1 << 64):
        raise CliError(f"address {addr:#x} is outside 64 bits", EXIT_USAGE)
    return {"kind": kind, "write": write, "addr": addr, "size": size, "value": value}


# -- the control socket client ----------------------------------------------


def default_control() -> str:
    from acrn_hsm_emu.daemon import DEFAULT_RUN_DIR

    return os.environ.get("ACRN_HSM_EMU_CONTROL", os.path.join(DEFAULT_RUN_DIR, "control.sock"))


def control_call(path: str, request: dict[str, Any], timeout: float = 60.0) -> Any:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except FileNotFoundError:
        raise CliError(f"no daemon control socket at {path} (is acrn-hsm-emu serve running?)") from None
    except PermissionError:
        raise CliError(f"permission denied on {path}: the control socket is for root") from None
    except OSError as e:
        raise CliError(f"cannot reach the daemon at {path}: {e.strerror}") from None
    with s:
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise CliError("the daemon closed the control connection")
            buf += chunk
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise CliError(f"daemon: {reply.get('error')}")
    return reply["result"]


# -- commands -----------------------------------------------------------------


def _first(group: BaseExceptionGroup[StartErrorT]) -> StartErrorT:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc  # type: ignore[return-value]


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from acrn_hsm_emu.daemon import Daemon, Settings, StartError

    logs.configure(args.log_format, args.log_level)
    settings = Settings(
        node=args.node,
        transport=args.transport,
        backend=resolve_backend(args.backend),
        scenario=args.scenario,
        workload=args.workload,
        run_dir=args.run_dir,
        control=args.control,
        node_mode=args.node_mode,
    )
    error: StartError | None = None
    try:
        daemon = Daemon(settings)
        trio.run(daemon.run)
    except* StartError as group:  # maybe raised inside the daemon's nurseries
        error = _first(group)
    if error is not None:
        structlog.get_logger("acrn_hsm_emu").error("cannot start", reason=str(error))
        print(f"acrn-hsm-emu: {error}", file=sys.stderr)
        return 1
    return 0


def _fmt_status(st: dict[str, Any]) -> str:
    hsm = st["hsm"]
    hv = st["hypervisor"]
    lines = [
        f"daemon pid {st['pid']}  node {st['node']} ({st['transport']})  backend {st['backend']}",
        f"open files {hsm['open_files']}  upcalls {hsm['upcalls']}  dispatch passes {hsm['dispatch_passes']}",
    ]
    hv_vms = {v.get("vmid"): v for v in hv.get("vms", [])}
    if not hsm["vms"]:
        lines.append("no VMs")
    for vm in hsm["vms"]:
        hvv = hv_vms.get(vm.get("vmid"), {})
        lines.append(
            f"VM {vm.get('vmid')}: state {vm.get('state')}  vcpus {vm.get('vcpu_num')}  "
            f"owner pid {vm.get('owner_pid')}"
        )
        for key in ("clients", "counters"):
            if key in vm:
                lines.append(f"  {key}: {json.dumps(vm[key], sort_keys=True)}")
        for v in hvv.get("vcpus", []):
            lines.append(f"  vcpu: {json.dumps(v, sort_keys=True)}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    st = control_call(args.control, {"cmd": "status"})
    print(json.dumps(st, indent=2, sort_keys=True) if args.json else _fmt_status(st))
    return 0


def cmd_inject(args: argparse.Namespace) -> int:
    access = parse_access(args.access)
    value = control_call(
        args.control,
        {"cmd": "inject", "vm": args.vm, "vcpu": args.vcpu, "access": access, "timeout": args.timeout},
        timeout=args.timeout + 5,
    )
    if not access["write"]:
        print(f"{value:#x}")
    return 0


def cmd_cpuid(args: argparse.Namespace) -> int:
    regs = control_call(
        args.control, {"cmd": "cpuid", "leaf": args.leaf, "subleaf": args.subleaf, "vm": args.vm}
    )
    eax, ebx, ecx, edx = regs
    print(f"eax={eax:#010x} ebx={ebx:#010x} ecx={ecx:#010x} edx={edx:#010x}")
    sig = b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx))
    if sig.isascii() and sig.decode().isprintable() and sig.strip(b"\0"):
        print(f"signature={sig.decode()!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="acrn-hsm-emu", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve /dev/acrn_hsm in the foreground")
    s.add_argument("--node", default="/dev/acrn_hsm", help="node path (default /dev/acrn_hsm)")
    s.add_argument("--transport", default="auto", choices=["auto", "fuse", "cuse"])
    s.add_argument(
        "--backend",
        default="auto",
        choices=["auto", *BACKENDS],
        help="vCPU backend (auto: kvm where /dev/kvm works, else scripted)",
    )
    s.add_argument("--scenario", help="scenario TOML file (default: built-in)")
    s.add_argument("--workload", help="workload file for the scripted backend")
    s.add_argument("--run-dir", default="/run/acrn-hsm-emu")
    s.add_argument("--control", help="control socket path (default RUN_DIR/control.sock)")
    s.add_argument("--node-mode", type=lambda t: int(t, 8), default=0o600, help="octal, default 600")
    s.add_argument("--log-format", default="auto", choices=["auto", "console", "json"])
    s.add_argument("--log-level", default="info", choices=list(logs.LEVELS))
    s.set_defaults(func=cmd_serve)

    def control_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--control", default=None, help="daemon control socket")

    st = sub.add_parser("status", help="VMs, vCPUs, clients and counters of a running daemon")
    control_opt(st)
    st.add_argument("--json", action="store_true", help="the raw status as JSON")
    st.set_defaults(func=cmd_status)

    inj = sub.add_parser(
        "inject",
        help="have a vCPU perform a guest access",
        description="ACCESS: pio-read ADDR SIZE | pio-write ADDR SIZE VALUE | mmio-read ADDR SIZE | "
        "mmio-write ADDR SIZE VALUE | pci-read BUS:DEV.FN REG SIZE | "
        "pci-write BUS:DEV.FN REG SIZE VALUE (numbers in C syntax)",
    )
    control_opt(inj)
    inj.add_argument("--vm", type=c_int, required=True)
    inj.add_argument("--vcpu", type=c_int, default=0)
    inj.add_argument("--timeout", type=float, default=30.0)
    inj.add_argument("access", nargs=argparse.REMAINDER)
    inj.set_defaults(func=cmd_inject)

    cp = sub.add_parser("cpuid", help="CPUID as the guest sees it")
    control_opt(cp)
    cp.add_argument("leaf", type=c_int)
    cp.add_argument("subleaf", type=c_int, nargs="?", default=0)
    cp.add_argument("--vm", type=c_int, default=None, help="a User VM's view (default: Service VM)")
    cp.set_defaults(func=cmd_cpuid)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "control", "x") is None and args.command != "serve":
        args.control = default_control()
    try:
        return int(args.func(args))
    except CliError as e:
        print(f"acrn-hsm-emu: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
