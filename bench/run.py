"""``make bench``: our figures next to the floors, measured in the same run.

Floors are built here from C: a minimal libfuse low-level server answering
ioctls (the best a FUSE-served node can do). Rounds alternate between the
floor and ours so machine noise hits both alike; each figure is the median
over rounds of the per-round median. Results are printed as a table and
written to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
BIN = HERE / "bin"
RESULTS = HERE / "results"
VENV_BIN = pathlib.Path(sys.executable).parent

GATE_IOCTL = 0xA299  # _IO(0xA2, 0x99): EINVAL at the HSM's gate, before any VM exists


def build(name: str, *flags: str) -> pathlib.Path:
    BIN.mkdir(exist_ok=True)
    src = HERE / "c" / f"{name}.c"
    out = BIN / name
    if not out.exists() or src.stat().st_mtime > out.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(out), str(src), *flags], check=True)
    return out


def fuse_flags() -> list[str]:
    return subprocess.run(
        ["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True, check=True
    ).stdout.split()


@contextmanager
def c_null_server(tmp: pathlib.Path) -> Iterator[pathlib.Path]:
    mnt = pathlib.Path(tempfile.mkdtemp(prefix="cnull-", dir=tmp))
    proc = subprocess.Popen([str(build("null_server", *fuse_flags())), str(mnt)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"READY":
        raise RuntimeError("the C null server did not start")
    try:
        yield mnt / "node"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


@contextmanager
def daemon(tmp: pathlib.Path, *extra: str) -> Iterator[dict[str, Any]]:
    """``acrn-hsm-emu serve`` on a private node; ready when it says READY=1."""
    d = pathlib.Path(tempfile.mkdtemp(dir=tmp))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(d / "notify"))
    notify.settimeout(60)
    log = open(d / "daemon.log", "wb")
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "acrn-hsm-emu"), "serve", "--node", str(d / "acrn_hsm"),
            "--run-dir", str(d / "run"), "--log-format", "json", "--log-level", "warning", *extra,
        ],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NOTIFY_SOCKET": str(d / "notify")},
    )
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        yield {"node": d / "acrn_hsm", "control": d / "run" / "control.sock", "pid": proc.pid, "dir": d}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        notify.close()
        log.close()


def ioctl_loop(node: pathlib.Path, n: int, cmd: int, arg: int = 0) -> dict[str, float]:
    out = subprocess.run(
        [str(build("ioctl_loop")), str(node), str(n), hex(cmd), hex(arg)],
        capture_output=True, text=True, check=True,
    ).stdout
    fields = dict(kv.split("=") for kv in out.split()[1:])
    return {k: float(v) / 1000.0 for k, v in fields.items()}  # microseconds


def med(rounds: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def bench_null_ioctl(tmp: pathlib.Path, rounds: int, calls: int) -> dict[str, Any]:
    c_rounds: list[dict[str, float]] = []
    our_rounds: list[dict[str, float]] = []
    with c_null_server(tmp) as c_node, daemon(tmp) as d:
        for _ in range(rounds):
            c_rounds.append(ioctl_loop(c_node, calls, GATE_IOCTL))
            our_rounds.append(ioctl_loop(d["node"], calls, GATE_IOCTL))
    c50, o50 = med(c_rounds, "p50"), med(our_rounds, "p50")
    return {
        "c_libfuse_null_ioctl_us": {"p50": c50, "p99": med(c_rounds, "p99"), "mean": med(c_rounds, "mean")},
        "daemon_null_ioctl_us": {"p50": o50, "p99": med(our_rounds, "p99"), "mean": med(our_rounds, "mean")},
        "ratio_p50": o50 / c50,
        "ratio_mean": med(our_rounds, "mean") / med(c_rounds, "mean"),
    }


def control(ctl: pathlib.Path, request: dict[str, Any]) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(ctl))
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            buf += s.recv(1 << 20)
    reply = json.loads(buf)
    assert reply["ok"], reply
    return reply["result"]


def vm_vcpus(ctl: pathlib.Path) -> list[dict[str, Any]]:
    st = control(ctl, {"cmd": "status"})
    return [v for vm in st["hypervisor"]["vms"] for v in vm["vcpus"]]


def pio_forever_workload(path: pathlib.Path, vcpus: int) -> None:
    """Each vCPU writes a port forever: the cycle with nothing but the request path."""
    steps = [{"op": "pio", "port": 0x500 + 4 * i, "size": 4, "write": True, "value": i} for i in range(4)]
    data = {"vcpu": [{"id": v, "repeat": 0, "steps": steps} for v in range(vcpus)]}
    path.write_text(json.dumps(data))


def measure_cycles(tmp: pathlib.Path, backend_args: list[str], client: list[str], vcpus: int,
                   seconds: float) -> dict[str, float]:
    """Run a client against the daemon for ``seconds``; requests/s and cycle percentiles."""
    with daemon(tmp, *backend_args) as d:
        proc = subprocess.Popen([*client[:1], str(d["node"]), *client[1:]], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            proc.stdout.readline()  # vmid=.. vcpu_num=..: the VM runs
            time.sleep(0.5)  # warm-up
            before = vm_vcpus(d["control"])
            t0 = time.monotonic()
            time.sleep(seconds)
            after = vm_vcpus(d["control"])
            elapsed = time.monotonic() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    reqs = sum(a["requests"] for a in after) - sum(b["requests"] for b in before)
    cyc = [a["cycle"] for a in after if a["cycle"].get("count")]
    return {
        "requests_per_s": reqs / elapsed,
        "cycle_p50_us": statistics.median(c["p50_us"] for c in cyc),
        "cycle_p99_us": max(c["p99_us"] for c in cyc),
        "cycle_mean_us": statistics.mean(c["mean_us"] for c in cyc),
    }


def bench_cycle_scripted(tmp: pathlib.Path, rounds: int, calls: int) -> dict[str, Any]:
    dm = build_dm_loop()
    out: dict[str, Any] = {}
    c_rt = []
    with c_null_server(tmp) as c_node:
        c_rt.append(ioctl_loop(c_node, calls, GATE_IOCTL))
    for vcpus in (1, 2):
        wl = tmp / f"pio-{vcpus}.json"
        pio_forever_workload(wl, vcpus)
        res = measure_cycles(tmp, ["--backend", "scripted", "--workload", str(wl)],
                             [str(dm), hex((1 << vcpus) - 1)], vcpus, 3.0)
        out[f"scripted_{vcpus}vcpu"] = res
    with c_null_server(tmp) as c_node:
        c_rt.append(ioctl_loop(c_node, calls, GATE_IOCTL))
    rt = med(c_rt, "p50")
    out["c_libfuse_null_ioctl_us"] = {"p50": rt}
    for vcpus in (1, 2):
        r = out[f"scripted_{vcpus}vcpu"]
        r["ratio_cycle_to_2x_c_rt"] = r["cycle_p50_us"] / (2 * rt)
    out["scaling_1_to_2_vcpus"] = (
        out["scripted_2vcpu"]["requests_per_s"] / out["scripted_1vcpu"]["requests_per_s"]
    )
    return out


def build_dm_loop() -> pathlib.Path:
    """tests/clients/dm_loop.c: the acrn-dm-style default client the tests use."""
    BIN.mkdir(exist_ok=True)
    src = REPO / "tests" / "clients" / "dm_loop.c"
    out = BIN / "dm_loop"
    if not out.exists() or src.stat().st_mtime > out.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-Wall", "-pthread", "-o", str(out), str(src)], check=True)
    return out


BENCHES = {"null_ioctl": bench_null_ioctl, "cycle_scripted": bench_cycle_scripted}


def main() -> int:
    p = argparse.ArgumentParser(prog="make bench")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--only", choices=sorted(BENCHES), action="append")
    args = p.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("bench: needs root and /dev/fuse", file=sys.stderr)
        return 1
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "kernel": os.uname().release},
    }
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="acrn-bench-"))
    try:
        for name in args.only or list(BENCHES):
            results[name] = BENCHES[name](tmp, args.rounds, args.calls)
            report(name, results[name])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {RESULTS / 'latest.json'}")
    return 0


def report(name: str, r: dict[str, Any]) -> None:
    print(f"\n== {name}")
    for key, value in r.items():
        if isinstance(value, dict):
            cells = "  ".join(f"{k}={v:9.2f}" for k, v in value.items() if isinstance(v, (int, float)))
            print(f"  {key:34s} {cells}")
        elif isinstance(value, float):
            print(f"  {key:34s} {value:9.3f}")
        else:
            print(f"  {key:34s} {value}")


if __name__ == "__main__":
    sys.exit(main())
