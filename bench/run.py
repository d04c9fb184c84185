"""``make bench``: our figures next to the floors, measured in the same run.

Floors are built here from C: a minimal libfuse low-level server answering
ioctls (the best a FUSE-served node can do), a bare process_vm_writev of 256
bytes, and (when /dev/kvm works) a bare KVM PIO exit loop. Floor and ours
alternate where they are compared directly, so machine noise hits both
alike. Results: a table on stdout, bench/results/latest.json, and a plot
bench/results/latest.png (cycle time and throughput against vCPU count, the
floors as lines) when matplotlib is installed.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from acrn_hsm_emu.config import control_socket

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
BIN = HERE / "bin"
RESULTS = HERE / "results"
VENV_BIN = pathlib.Path(sys.executable).parent
SCENARIO = HERE / "scenario-8cpu.toml"

GATE_IOCTL = 0xA299  # _IO(0xA2, 0x99): EINVAL at the HSM's gate, before any VM exists


# -- building and running the C pieces --------------------------------------------


def build(src: pathlib.Path, name: str, *flags: str) -> pathlib.Path:
    BIN.mkdir(exist_ok=True)
    out = BIN / name
    newest = max(f.stat().st_mtime for f in (src, *src.parent.glob("*.h")))  # headers beside it too
    if not out.exists() or newest > out.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-Wall", "-pthread", "-o", str(out), str(src), *flags], check=True)
    return out


def bench_c(name: str, *flags: str) -> pathlib.Path:
    return build(HERE / "c" / f"{name}.c", name, *flags)


def test_client(name: str) -> pathlib.Path:
    """A C client of the test suite (tests/clients), e.g. the acrn-dm-style dm_loop;
    the extension ABI's header is on the include path for the ext_* ones."""
    from acrn_hsm_emu.client import include_dir

    return build(REPO / "tests" / "clients" / f"{name}.c", name, f"-I{include_dir()}")


def fuse_flags() -> list[str]:
    return subprocess.run(
        ["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True, check=True
    ).stdout.split()


def ns_line(out: str) -> dict[str, float]:
    """``ns p50=.. p99=.. mean=..`` -> microseconds."""
    line = next(x for x in out.splitlines() if x.startswith("ns "))
    return {k: float(v) / 1000.0 for k, v in (kv.split("=") for kv in line.split()[1:])}


def pinned(cpus: str | None) -> list[str]:
    """The argv prefix that runs a program (all its threads) on ``cpus``, or none."""
    return ["taskset", "-c", cpus] if cpus is not None else []


def placements(same: str = "same_cpu") -> list[tuple[str, str | None, str | None]]:
    """Where a figure and its floor are measured alike: (name, the servers' CPUs, the callers'
    CPUs). ``free``: nothing pinned (the scheduler's choice, which differs run to run);
    ``same`` (its name): servers and callers on the first CPU; ``cross_cpu``: servers on the
    first, callers on the second (where there is one)."""
    cpu_list = sorted(os.sched_getaffinity(0))
    c0 = str(cpu_list[0])
    out: list[tuple[str, str | None, str | None]] = [("free", None, None), (same, c0, c0)]
    if len(cpu_list) >= 2:
        out.append(("cross_cpu", c0, str(cpu_list[1])))
    return out


def timed(argv: list[str], cpus: str | None = None) -> dict[str, float]:
    """A C floor's one ``ns`` line (ns_stats.h), the program run on ``cpus``: microseconds."""
    return ns_line(subprocess.run([*pinned(cpus), *argv], capture_output=True, text=True, check=True,
                                  timeout=600).stdout)


C_SERVER_PID: dict[pathlib.Path, int] = {}  # node -> the C null server serving it


@contextmanager
def c_null_server(tmp: pathlib.Path, cpus: str | None = None) -> Iterator[pathlib.Path]:
    mnt = pathlib.Path(tempfile.mkdtemp(prefix="cnull-", dir=tmp))
    proc = subprocess.Popen([*pinned(cpus), str(bench_c("null_server", *fuse_flags())), str(mnt)],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"READY":
        raise RuntimeError("the C null server did not start")
    C_SERVER_PID[mnt / "node"] = proc.pid
    try:
        yield mnt / "node"
    finally:
        C_SERVER_PID.pop(mnt / "node", None)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


@contextmanager
def cdev_empty_server(tmp: pathlib.Path, cpus: str | None = None) -> Iterator[tuple[pathlib.Path, int]]:
    """cdev serving a device that answers every ioctl at once (``BaseDevice``: ENOTTY), as
    a FUSE file: libfuse, cdev's C glue, the way into Python and cdev's own Python, with no
    device behind them. Beside the C server and the daemon, it says where a null ioctl's
    time goes. Yields (node, pid)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="cdev-", dir=tmp))
    proc = subprocess.Popen(
        [*pinned(cpus), str(VENV_BIN / "python"), "-m", "cdev", "--device", "cdev.device:BaseDevice",
         "--node", str(d / "node"), "--transport", "fuse", "--run-dir", str(d / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"READY":
        proc.kill()
        raise RuntimeError("cdev's empty device did not start")
    try:
        yield d / "node", proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@contextmanager
def daemon(tmp: pathlib.Path, *extra: str, cpus: str | None = None) -> Iterator[dict[str, Any]]:
    """``acrn-hsm-emu serve`` on a private node (on ``cpus``, if given); ready
    when it says READY=1."""
    d = pathlib.Path(tempfile.mkdtemp(dir=tmp))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(d / "notify"))
    notify.settimeout(1)
    log = open(d / "daemon.log", "wb")
    proc = subprocess.Popen(
        [
            *pinned(cpus), str(VENV_BIN / "acrn-hsm-emu"), "serve", "--node", str(d / "acrn_hsm"),
            "--run-dir", str(d / "run"), "--log-format", "json", "--log-level", "warning", *extra,
        ],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NOTIFY_SOCKET": str(d / "notify")},
    )
    try:
        while True:
            try:
                if b"READY=1" in notify.recv(4096):
                    break
            except TimeoutError:
                pass
            if proc.poll() is not None:  # it refused to start: say why
                raise RuntimeError(f"daemon exited {proc.returncode}: {(d / 'daemon.log').read_text()[-2000:]}")
        yield {"node": d / "acrn_hsm", "control": pathlib.Path(control_socket(str(d / "run"), str(d / "acrn_hsm"))),
               "pid": proc.pid}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        notify.close()
        log.close()


def ioctl_loop(node: pathlib.Path, n: int, cmd: int = GATE_IOCTL, cpus: str | None = None) -> dict[str, float]:
    out = subprocess.run(
        [*pinned(cpus), str(bench_c("ioctl_loop")), str(node), str(n), hex(cmd), "0"],
        capture_output=True, text=True, check=True,
    ).stdout
    return ns_line(out)


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


def vcpus_of(ctl: pathlib.Path) -> list[dict[str, Any]]:
    st = control(ctl, {"cmd": "status"})
    return [{**v, "vmid": vm["vmid"]} for vm in st["hypervisor"]["vms"] for v in vm["vcpus"]]


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` (schedstat: nanoseconds, not clock ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot (/proc/stat); idle and
    iowait are not busy, steal is (the host took the CPU from this guest)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is in user)
    return total - fields[3] - fields[4], total


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def med(rounds: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


# -- the benchmarks --------------------------------------------------------------


def floors(tmp: pathlib.Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with c_null_server(tmp) as node:
        out["c_libfuse_null_ioctl_us"] = summarize([ioctl_loop(node, args.calls) for _ in range(args.rounds)])
    # The same round trip with server and client on one CPU, and on two: what a
    # cross-CPU wake-up costs here (docs/performance.md, "Placement"). And waking
    # a waiting thread, as the vCPU's wait was woken (an eventfd: poll, then
    # read) and is now (a futex): a round trip of two wake-ups.
    if len(os.sched_getaffinity(0)) >= 2:
        wake = str(bench_c("wake_loop"))
        for name, srv, cli in placements()[1:]:
            assert srv is not None and cli is not None
            with c_null_server(tmp, srv) as node:
                out[f"c_libfuse_null_ioctl_{name}_us"] = summarize(
                    [ioctl_loop(node, args.calls // 4, cpus=cli) for _ in range(args.rounds)])
            for how in ("eventfd", "futex"):
                out[f"wake_{how}_round_trip_{name}_us"] = summarize(
                    [timed([wake, str(args.calls // 4), how, srv, cli]) for _ in range(args.rounds)])
    pvw = str(bench_c("pvw_loop"))
    out["process_vm_writev_256B_us"] = summarize([timed([pvw, str(args.calls)]) for _ in range(args.rounds)])
    kvm_src = HERE / "c" / "kvm_pio_loop.c"
    if kvm_src.exists() and kvm_usable():
        kvm = str(build(kvm_src, "kvm_pio_loop"))
        out["kvm_pio_exit_us"] = summarize([timed([kvm, str(args.calls)]) for _ in range(args.rounds)])
    return out


def summarize(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: med(rounds, k) for k in ("p50", "p99", "mean")}


def null_ioctl(tmp: pathlib.Path, args: argparse.Namespace) -> dict[str, Any]:
    """Our null ioctl and the C server's, like for like: in each placement both servers are
    pinned alike and so is the client, and their rounds alternate.

    Placements: :func:`placements`. ``{placement}_ratio_p50`` is the median over rounds of
    ours / C, each round's figures taken back to back. A third server in each round, cdev
    serving an empty device (:func:`cdev_empty_server`), gives
    ``{placement}_cdev_empty_ratio_p50``: what entering Python through cdev costs with no
    device behind it, the part of ours / C that is not the HSM's.
    """
    out: dict[str, Any] = {}
    for name, server_cpus, client_cpus in placements():
        rounds: dict[str, list[dict[str, float]]] = {"c": [], "cdev": [], "ours": []}
        calls = args.calls if name == "free" else args.calls // 2
        cpu: dict[str, list[float]] = {key: [] for key in rounds}  # the server's CPU time per call, us
        with (c_null_server(tmp, server_cpus) as c_node, cdev_empty_server(tmp, server_cpus) as (e_node, e_pid),
              daemon(tmp, cpus=server_cpus) as d):
            servers = (("c", c_node, C_SERVER_PID[c_node]), ("cdev", e_node, e_pid), ("ours", d["node"], d["pid"]))
            for _ in range(args.rounds):
                for key, node, pid in servers:
                    before = cpu_ns(pid)
                    rounds[key].append(ioctl_loop(node, calls, cpus=client_cpus))
                    cpu[key].append((cpu_ns(pid) - before) / 1000 / calls)
        # each round's figure over the C server's of the same round
        ratios_, cdev_ratios = ([r["p50"] / c["p50"] for r, c in zip(rounds[key], rounds["c"], strict=True)]
                                for key in ("ours", "cdev"))
        c, empty, ours = summarize(rounds["c"]), summarize(rounds["cdev"]), summarize(rounds["ours"])
        out[f"{name}_c_libfuse_us"] = c
        out[f"{name}_cdev_empty_us"] = empty
        out[f"{name}_daemon_us"] = ours
        out[f"{name}_ratio_p50"] = statistics.median(ratios_)
        out[f"{name}_ratio_p50_rounds"] = ratios_
        out[f"{name}_cdev_empty_ratio_p50"] = statistics.median(cdev_ratios)
        out[f"{name}_cdev_empty_ratio_p50_rounds"] = cdev_ratios
        # where the difference is: the servers' own CPU time per call (the rest is the client's
        # and the kernel's, the same for all)
        out[f"{name}_c_server_cpu_us_per_call"] = statistics.median(cpu["c"])
        out[f"{name}_cdev_empty_cpu_us_per_call"] = statistics.median(cpu["cdev"])
        out[f"{name}_daemon_cpu_us_per_call"] = statistics.median(cpu["ours"])
        print(f"  null ioctl {name}: C {fmt(c)}; cdev, empty device {fmt(empty)}; ours {fmt(ours)}; ratio p50 "
              f"{statistics.median(ratios_):.2f} (rounds {', '.join(f'{r:.2f}' for r in ratios_)}), "
              f"cdev's empty device {statistics.median(cdev_ratios):.2f}; server CPU per call: "
              f"C {statistics.median(cpu['c']):.2f} us, cdev {statistics.median(cpu['cdev']):.2f} us, "
              f"ours {statistics.median(cpu['ours']):.2f} us", flush=True)
    return out


def write_workload(path: pathlib.Path, kind: str, vcpus: int) -> None:
    """Each vCPU writes forever: the request path and nothing else."""
    if kind == "pio":
        steps = [{"op": "pio", "port": 0x500 + 4 * i, "size": 4, "write": True, "value": i} for i in range(4)]
    else:
        steps = [{"op": "mmio", "addr": 0xE000_0000 + 8 * i, "size": 8, "write": True, "value": i} for i in range(4)]
    path.write_text(json.dumps({"vcpu": [{"id": v, "repeat": 0, "steps": steps} for v in range(vcpus)]}))


def run_cycles(tmp: pathlib.Path, serve_args: list[str], clients: list[list[str]], seconds: float,
               cpus: str | None = None, client_cpus: str | None = None) -> dict[str, Any]:
    """Clients serve the daemon's VMs for ``seconds``: throughput, cycle times,
    daemon CPU. ``cpus``: the daemon and the clients run on these CPUs only;
    ``client_cpus``: the clients only (the daemon places itself)."""
    with daemon(tmp, *serve_args, cpus=cpus) as d:
        procs = []
        try:
            for argv in clients:
                p = subprocess.Popen([*pinned(client_cpus or cpus), argv[0], str(d["node"]), *argv[1:]],
                                     stdout=subprocess.PIPE, text=True)
                assert p.stdout is not None
                p.stdout.readline()  # vmid=.. vcpu_num=..: the VM runs
                procs.append(p)
            time.sleep(0.5)  # warm-up
            before, cpu0, t0 = vcpus_of(d["control"]), cpu_seconds(d["pid"]), time.monotonic()
            host0 = host_cpu_ticks()
            time.sleep(seconds)
            host1 = host_cpu_ticks()
            after, cpu1, t1 = vcpus_of(d["control"]), cpu_seconds(d["pid"]), time.monotonic()
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.communicate(timeout=60)
    reqs = sum(a["requests"] for a in after) - sum(b["requests"] for b in before)
    done = {(b["vmid"], b["id"]): b["requests"] for b in before}
    idle = [f"vm{a['vmid']}/vcpu{a['id']}" for a in after if a["requests"] == done.get((a["vmid"], a["id"]), 0)]
    if idle:  # a figure over vCPUs that did not run would mislead
        return {"skipped": f"no requests from {', '.join(idle)} in the window"}
    cyc = [a["cycle"] for a in after if a["cycle"].get("count")]
    return {
        "requests_per_s": reqs / (t1 - t0),
        "cycle_p50_us": statistics.median(c["p50_us"] for c in cyc),
        "cycle_p99_us": max(c["p99_us"] for c in cyc),
        "daemon_cpu_s_per_1000": 1000 * (cpu1 - cpu0) / max(reqs, 1),
        # how many of the host's CPUs were busy (anything: daemon, clients, others)
        "host_cpus_busy": (os.cpu_count() or 1) * (host1[0] - host0[0]) / max(host1[1] - host0[1], 1),
    }


# A row's set-up: the daemon's arguments and one client's argv (one client per VM).
Setup = tuple[list[str], list[str]]


def scripted_setup(tmp: pathlib.Path, kind: str, vcpus: int) -> Setup:
    """dm_loop serving a scripted workload that loops on one access per vCPU."""
    wl = tmp / f"{kind}-{vcpus}.json"
    write_workload(wl, kind, vcpus)
    return (["--backend", "scripted", "--scenario", str(SCENARIO), "--workload", str(wl)],
            [str(test_client("dm_loop")), hex((1 << vcpus) - 1)])


def kvm_setup(tmp: pathlib.Path, kind: str, vcpus: int) -> Setup:
    """vm_sample running a guest whose every vCPU loops on one access (the BSP
    starts the APs with INIT and start-up IPIs)."""
    from tests.guests.build import assemble

    image = assemble(f"smp{kind}32", BIN, load=0x1000).path
    return (["--backend", "kvm", "--scenario", str(SCENARIO)],
            [str(test_client("vm_sample")), "-q", "-C", hex((1 << vcpus) - 1), "-r", "pm32",
             "-e", "0x1000", "-g", f"{image}@0x1000"])


def matrix(tmp: pathlib.Path, args: argparse.Namespace, name: str,
           setup: Callable[[pathlib.Path, str, int], Setup]) -> dict[str, Any]:
    """PIO and MMIO, 1 and 4 VMs, 1/2/4/8 vCPUs: one ``run_cycles`` row each."""
    out: dict[str, Any] = {}
    for kind in ("pio", "mmio"):
        for vms in (1, 4):
            for vcpus in (1, 2, 4, 8):
                serve, client = setup(tmp, kind, vcpus)
                res = run_cycles(tmp, serve, [client for _ in range(vms)], args.seconds)
                out[f"{kind}_{vms}vm_{vcpus}vcpu"] = res
                print(f"  {name} {kind} {vms} VM x {vcpus} vCPU: {fmt(res)}", flush=True)
    return out


def cycle_scripted(tmp: pathlib.Path, args: argparse.Namespace) -> dict[str, Any]:
    return matrix(tmp, args, "scripted", scripted_setup)


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def cycle_kvm(tmp: pathlib.Path, args: argparse.Namespace) -> dict[str, Any]:
    """Real guest code, served by tests/clients/vm_sample.c (one process per VM).

    ``pio``/``mmio``: a 16-bit loop doing OUT (or an MMIO store) forever on one
    vCPU; the cycle is the client's request-to-request time (guest access to the
    next one: exit, request, answer, guest resumed), the figure the KVM target
    compares with the floors. ``{kind}_{vms}vm_{vcpus}vcpu``: the same loop on
    every vCPU (the BSP starts the APs with INIT and start-up IPIs), cycle times
    as the vCPUs see them (PENDING written to slot FREE), as the scripted rows.
    """
    if not kvm_usable():
        return {"skipped": "no usable /dev/kvm"}
    from tests.guests.build import assemble

    sample = str(test_client("vm_sample"))
    out = matrix(tmp, args, "kvm", kvm_setup)
    # The figure the target compares with the floors. Each round also measures
    # the floors right before the cycle. On a PVM guest they come out ~7x lower
    # there than in the floors section run on a quiet machine: waking an idle
    # CPU costs ~30 us, and right after a busy period the host keeps the CPUs
    # awake. Both ratios are reported (docs/performance.md).
    kvm_loop = build(HERE / "c" / "kvm_pio_loop.c", "kvm_pio_loop")
    with c_null_server(tmp) as c_node:
        for kind, guest in (("pio", "pioloop16"), ("mmio", "mmioloop16")):
            image = assemble(guest, BIN).path
            rows = []
            for _ in range(args.rounds):
                rt = ioctl_loop(c_node, args.calls // 4)["p50"]
                exit_us = timed([str(kvm_loop), str(args.calls)])["p50"]
                with daemon(tmp, "--backend", "kvm") as d:
                    cpu0 = cpu_seconds(d["pid"])
                    res = subprocess.run(
                        [sample, "-q", "-n", str(args.calls // 2), "-g", f"{image}@0", str(d["node"])],
                        capture_output=True, text=True, check=True, timeout=600,
                    )
                    cpu1 = cpu_seconds(d["pid"])
                line = next(x for x in res.stdout.splitlines() if x.startswith("cycle ns"))
                f = {k: float(v) for k, v in (kv.split("=") for kv in line.split()[2:])}
                rows.append({
                    "cycle_p50_us": f["p50"] / 1000, "cycle_p99_us": f["p99"] / 1000,
                    "requests_per_s": f["per_s"],
                    "daemon_cpu_s_per_1000": 2000 * (cpu1 - cpu0) / args.calls,
                    "floor_us": exit_us + 2 * rt,
                    "ratio_to_floor": f["p50"] / 1000 / (exit_us + 2 * rt),
                })
            out[kind] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(f"  kvm {kind} (client-timed): {fmt(out[kind])}", flush=True)
    return out


def scaling(tmp: pathlib.Path, args: argparse.Namespace) -> dict[str, Any]:
    """Throughput with 2 vCPUs over 1 (one VM, PIO), both backends: 1 and 2 vCPUs
    alternate round by round, the ratio is the median of the rounds' ratios.

    Then the same in other placements, side by side: ACRN's partition
    (``_partitioned``: the daemon's threads and the device model on the first
    CPU, the Service VM's side, the vCPU threads on the last, with
    ``--service-cpus`` and ``--vcpu-cpus``; the vCPUs poll for their
    completions unless ``_no_vcpu_polling``), everything on one CPU
    (``one_cpu``), and with the express reader's polling off (``no_polling``):
    how much of the figure is the cost of waking threads on other CPUs. With
    everything on one CPU, each round's 1-vCPU cycle is also compared with its
    floor measured right after it on that CPU (:func:`one_cpu_floor`):
    ``cycle_to_floor``, the median of the rounds' ratios.
    """
    out: dict[str, Any] = {}
    cpu_list = sorted(os.sched_getaffinity(0))
    service, guest = str(cpu_list[0]), str(cpu_list[-1])
    partition = ["--service-cpus", service, "--vcpu-cpus", guest]
    kinds: list[tuple[str, Callable[[pathlib.Path, str, int], Setup], list[str], str | None, str | None]] = [
        ("scripted", scripted_setup, [], None, None)]
    if len(cpu_list) > 1:
        kinds.append(("scripted_partitioned", scripted_setup, partition, None, service))
    if kvm_usable():
        kinds.append(("kvm", kvm_setup, [], None, None))
        if len(cpu_list) > 1:
            kinds.append(("kvm_partitioned", kvm_setup, partition, None, service))
            kinds.append(("kvm_partitioned_no_vcpu_polling", kvm_setup, [*partition, "--vcpu-poll-us", "0"],
                          None, service))
        kinds.append(("kvm_no_polling", kvm_setup, ["--express-poll-us", "0"], None, None))
        kinds.append(("kvm_one_cpu", kvm_setup, [], service, None))
    for name, setup, extra, cpus, client_cpus in kinds:
        ratios_: list[float] = []
        per_s: dict[int, list[float]] = {1: [], 2: []}
        busy: dict[int, list[float]] = {1: [], 2: []}
        to_floor: list[float] = []  # kvm_one_cpu: the 1-vCPU cycle over its floor, round by round
        for _ in range(args.rounds):
            rows = []
            for vcpus in (1, 2):
                serve, client = setup(tmp, "pio", vcpus)
                rows.append(run_cycles(tmp, serve + extra, [client], args.seconds, cpus=cpus,
                                       client_cpus=client_cpus))
                if "requests_per_s" in rows[-1]:
                    per_s[vcpus].append(rows[-1]["requests_per_s"])
                    busy[vcpus].append(rows[-1]["host_cpus_busy"])
            one, two = rows
            if "requests_per_s" in one and "requests_per_s" in two:
                ratios_.append(two["requests_per_s"] / one["requests_per_s"])
            if name == "kvm_one_cpu" and "requests_per_s" in one:
                to_floor.append((1e6 / one["requests_per_s"]) / one_cpu_floor(tmp, args, service))
        if ratios_:
            out[name] = {"median": statistics.median(ratios_), "min": min(ratios_), "max": max(ratios_),
                         "per_s_1vcpu": statistics.median(per_s[1]), "per_s_2vcpu": statistics.median(per_s[2]),
                         "cpus_busy_1vcpu": statistics.median(busy[1]), "cpus_busy_2vcpu": statistics.median(busy[2])}
            if to_floor:
                out[name]["cycle_to_floor"] = statistics.median(to_floor)
                out[name]["cycle_to_floor_min"] = min(to_floor)
                out[name]["cycle_to_floor_max"] = max(to_floor)
            print(f"  {name} 1 -> 2 vCPUs: {fmt(out[name])}", flush=True)
    return out


def one_cpu_floor(tmp: pathlib.Path, args: argparse.Namespace, cpu: str) -> float:
    """The floor of the one-CPU KVM request cycle, in us, measured on ``cpu`` right
    after the round it is compared with: a bare KVM PIO exit and two C libfuse null
    ioctl round trips (the vCPU's upcall and the device model's NOTIFY), server and
    client on that CPU."""
    kvm = build(HERE / "c" / "kvm_pio_loop.c", "kvm_pio_loop")
    exit_us = timed([str(kvm), str(args.calls)], cpu)["p50"]
    with c_null_server(tmp, cpu) as node:
        rt_us = ioctl_loop(node, args.calls // 4, cpus=cpu)["p50"]
    return exit_us + 2 * rt_us


class Ctl:
    """tests/clients/ext_ctl.c: one open file of the node driven line by line."""

    def __init__(self, node: pathlib.Path) -> None:
        self.proc = subprocess.Popen([str(test_client("ext_ctl")), str(node)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def ok(self, line: str) -> dict[str, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        if not answer or answer[0] != "ok":
            raise RuntimeError(f"ext_ctl {line!r}: {answer}")
        return dict(kv.split("=", 1) for kv in answer[1:] if "=" in kv)

    def close(self) -> None:
        try:
            self.ok("quit")
        finally:
            self.proc.communicate(timeout=60)


def cycles_with(tmp: pathlib.Path, workload: pathlib.Path, setup: Callable[[pathlib.Path, Ctl, int], list[Any]],
                seconds: float) -> dict[str, float]:
    """A VM owned by ext_ctl (default client), ``setup`` adds who else serves it, then START_VM."""
    with daemon(tmp, "--backend", "scripted", "--workload", str(workload)) as d:
        owner = Ctl(d["node"])
        extra: list[Any] = []
        try:
            vmid = int(owner.ok("create 0x1")["vmid"])
            owner.ok("client")
            extra = setup(d["node"], owner, vmid)
            owner.ok("start")
            time.sleep(0.5)
            before, cpu0, t0 = vcpus_of(d["control"]), cpu_seconds(d["pid"]), time.monotonic()
            time.sleep(seconds)
            after, cpu1, t1 = vcpus_of(d["control"]), cpu_seconds(d["pid"]), time.monotonic()
            owner.ok("pause")
        finally:
            for p in extra:
                p.send_signal(signal.SIGTERM)
                p.communicate(timeout=60)
            owner.close()
    reqs = sum(a["requests"] for a in after) - sum(b["requests"] for b in before)
    return {
        "requests_per_s": reqs / (t1 - t0),
        "cycle_p50_us": after[0]["cycle"]["p50_us"],
        "cycle_p99_us": after[0]["cycle"]["p99_us"],
        "daemon_cpu_s_per_1000": 1000 * (cpu1 - cpu0) / max(reqs, 1),
    }


def range_client(tmp: pathlib.Path, args: argparse.Namespace) -> dict[str, Any]:
    """The cycle when a range client in another process serves the accesses, next to the
    default client (dm_loop) serving the same workload, rounds alternating, nothing pinned
    for either: ``ratio_p50`` is the median over rounds of range / default cycle p50."""
    wl = tmp / "range.json"
    write_workload(wl, "pio", 1)

    def setup(node: pathlib.Path, owner: Ctl, vmid: int) -> list[Any]:
        p = subprocess.Popen([str(test_client("ext_range")), str(node), str(vmid), "bench", "pio:0x500-0x50f"],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().startswith("ready")
        return [p]

    ranged: list[dict[str, float]] = []
    default: list[dict[str, float]] = []
    ratios_: list[float] = []
    for _ in range(args.rounds):
        ranged.append(cycles_with(tmp, wl, setup, args.seconds))
        _serve, client = scripted_setup(tmp, "pio", 1)
        default.append(run_cycles(tmp, ["--backend", "scripted", "--workload", str(wl)], [client], args.seconds))
        ratios_.append(ranged[-1]["cycle_p50_us"] / default[-1]["cycle_p50_us"])
    res = {k: statistics.median(r[k] for r in ranged) for k in ranged[0]}
    res["default_client_cycle_p50_us"] = statistics.median(r["cycle_p50_us"] for r in default)
    res["default_client_requests_per_s"] = statistics.median(r["requests_per_s"] for r in default)
    res["ratio_p50"] = statistics.median(ratios_)
    print(f"  range client: {fmt(res)} (rounds {', '.join(f'{r:.2f}' for r in ratios_)})", flush=True)
    return res


def ioeventfd_path(tmp: pathlib.Path, args: argparse.Namespace) -> dict[str, Any]:
    """The cycle when a datamatch ioeventfd takes the write: signalled, no client round trip."""
    wl = tmp / "ioeventfd.json"
    steps = [{"op": "pio", "port": 0x500, "size": 4, "write": True, "value": 7}]
    wl.write_text(json.dumps({"vcpu": [{"id": 0, "repeat": 0, "steps": steps}]}))

    def setup(node: pathlib.Path, owner: Ctl, vmid: int) -> list[Any]:
        fd = owner.ok("eventfd")["fd"]
        owner.ok(f"ioeventfd {fd} 3 0x500 4 7")  # PIO | DATAMATCH
        return []

    res = cycles_with(tmp, wl, setup, args.seconds)
    print(f"  ioeventfd: {fmt(res)}", flush=True)
    return res


def interrupts(tmp: pathlib.Path, args: argparse.Namespace) -> dict[str, Any]:
    """One interrupt raised by a device model, timed call by call in C (bench/c/irq_inject.c):
    SET_IRQLINE through the launcher (``acrn-hsm-emu run``: FUSE cannot pass its value
    argument) and INJECT_MSI, next to floors measured in the same run and placement:
    KVM_IRQ_LINE (a pulse) and KVM_SIGNAL_MSI on a bare KVM VM in C (kvm_irq_loop.c), and
    the C libfuse null ioctl. Interrupts/s = 1 / mean call time (one caller, back to back).
    Keys are ``{placement}_{row}``.

    Where the time goes (``breakdown_p50_us``): ``fuse`` the C libfuse round trip, ``daemon``
    what the daemon adds to it for the call (the VALUE_CALL the launcher makes, minus
    ``fuse``: Python handler, hypercall, the KVM ioctl; below 0 across CPUs, where our
    polling reader answers sooner than the C server wakes), ``launcher`` what the trap and the
    supervisor add (SET_IRQLINE through the launcher minus the VALUE_CALL alone), of which
    ``trap`` is the seccomp notification round trip with the supervisor's look at the fd
    (a trapped call on /dev/null, answered by the kernel). Placements: :func:`placements`,
    the pinned one named ``one_cpu``; the callers include the launcher and the bare KVM loops.
    ``free`` is not like for like here: the C server's one thread and ours are placed
    differently.
    """
    if not kvm_usable():
        return {"skipped": "no usable /dev/kvm"}
    from acrn_hsm_emu.client import include_dir

    floor = bench_c("kvm_irq_loop")
    inject = bench_c("irq_inject", f"-I{include_dir()}")
    n = max(args.calls // 4, 100)
    out: dict[str, Any] = {}
    for placement, server_cpus, cpus in placements("one_cpu"):  # cpus: the callers'
        rows: dict[str, list[dict[str, float]]] = {}
        with c_null_server(tmp, server_cpus) as c_node, daemon(tmp, "--backend", "kvm", cpus=server_cpus) as d:
            node = str(d["node"])
            run_ = [str(VENV_BIN / "acrn-hsm-emu"), "run", "--node", node, "--"]
            for _ in range(args.rounds):  # alternated, so that noise hits all alike
                for name, argv in (
                    ("floor_kvm_irq_line", [str(floor), str(n), "irq"]),
                    ("floor_kvm_signal_msi", [str(floor), str(n), "msi"]),
                    ("set_irqline_via_launcher", [*run_, str(inject), node, str(n), "irq"]),
                    ("inject_msi", [str(inject), node, str(n), "msi"]),
                    ("value_call_alone", [str(inject), node, str(n), "value"]),
                    ("trapped_call_on_dev_null", [*run_, str(inject), node, str(n), "null"]),
                ):
                    rows.setdefault(name, []).append(timed(argv, cpus))
                rows.setdefault("floor_c_libfuse_null_ioctl", []).append(ioctl_loop(c_node, n, cpus=cpus))
        res: dict[str, Any] = {k: {**summarize(v), "per_s": 1e6 / summarize(v)["mean"]} for k, v in rows.items()}
        p50 = {k: v["p50"] for k, v in res.items()}
        res["ratio_set_irqline_to_kvm_irq_line"] = p50["set_irqline_via_launcher"] / p50["floor_kvm_irq_line"]
        res["ratio_inject_msi_to_kvm_signal_msi"] = p50["inject_msi"] / p50["floor_kvm_signal_msi"]
        # A device model's interrupt crosses the node, which a bare KVM call does not: the
        # floor of the same path in C is a FUSE round trip plus the KVM call (and, for the
        # launcher, the seccomp trap), each measured here, in this placement.
        res["ratio_inject_msi_to_fuse_plus_kvm_signal_msi"] = p50["inject_msi"] / (
            p50["floor_c_libfuse_null_ioctl"] + p50["floor_kvm_signal_msi"])
        res["ratio_set_irqline_to_trap_plus_fuse_plus_kvm_irq_line"] = p50["set_irqline_via_launcher"] / (
            p50["trapped_call_on_dev_null"] + p50["floor_c_libfuse_null_ioctl"] + p50["floor_kvm_irq_line"])
        res["breakdown_p50_us"] = {
            "fuse": p50["floor_c_libfuse_null_ioctl"],
            "daemon": p50["value_call_alone"] - p50["floor_c_libfuse_null_ioctl"],
            "launcher": p50["set_irqline_via_launcher"] - p50["value_call_alone"],
            "trap": p50["trapped_call_on_dev_null"],
            "kvm": p50["floor_kvm_irq_line"],
        }
        for k, v in res.items():
            out[f"{placement}_{k}"] = v
            print(f"  interrupts {placement} {k}: {fmt(v) if isinstance(v, dict) else f'{v:.2f}'}", flush=True)
    return out


def memory_cost(tmp: pathlib.Path, args: argparse.Namespace) -> dict[str, Any]:
    """Daemon RSS idle, and with 16 idle VMs each held by a client."""
    dm = str(test_client("dm_loop"))
    with daemon(tmp, "--backend", "scripted") as d:
        time.sleep(0.5)
        idle = rss_mib(d["pid"])
        procs = []
        try:
            for _ in range(16):
                p = subprocess.Popen([dm, str(d["node"]), "0x1"], stdout=subprocess.PIPE, text=True)
                assert p.stdout is not None
                p.stdout.readline()
                procs.append(p)
            time.sleep(0.5)
            busy = rss_mib(d["pid"])
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.communicate(timeout=60)
    return {"rss_idle_mib": idle, "rss_16_vms_mib": busy, "rss_per_vm_mib": (busy - idle) / 16}


@contextmanager
def tracing(ctl: pathlib.Path) -> Iterator[None]:
    """A trace client attached for the duration (everything: ioctls and requests), reading
    every record and throwing it away, as fast as a reader can."""
    import threading

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(ctl))
    s.sendall(b'{"cmd": "trace"}\n')
    first = b""
    while not first.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            raise RuntimeError("the daemon refused the trace")
        first += chunk
    assert json.loads(first)["ok"], first

    def drain() -> None:
        try:
            while s.recv(1 << 16):
                pass
        except OSError:
            pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield
    finally:
        s.shutdown(socket.SHUT_RDWR)
        s.close()
        reader.join(10)


def trace_cost(tmp: pathlib.Path, args: argparse.Namespace) -> dict[str, Any]:
    """The trace off and on (a reader attached that takes everything), alternated round by
    round: a null ioctl (refused at the gate: its reason is formatted when on), and the
    default client's request cycle (dm_loop, a scripted PIO write loop, the express path)."""
    from contextlib import nullcontext

    serve_args, client = scripted_setup(tmp, "pio", 1)
    null: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    cyc: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with daemon(tmp, *serve_args) as d:
        for _ in range(args.rounds):
            for on in (False, True):
                with tracing(d["control"]) if on else nullcontext():
                    null[on].append(ioctl_loop(d["node"], args.calls))
        dm = subprocess.Popen([client[0], str(d["node"]), *client[1:]], stdout=subprocess.PIPE, text=True)
        try:
            assert dm.stdout is not None
            dm.stdout.readline()  # vmid=.. : the VM runs
            time.sleep(0.5)  # warm-up
            for _ in range(args.rounds):
                for on in (False, True):
                    with tracing(d["control"]) if on else nullcontext():
                        before, t0 = vcpus_of(d["control"]), time.monotonic()
                        time.sleep(args.seconds)
                        after, t1 = vcpus_of(d["control"]), time.monotonic()
                    reqs = sum(a["requests"] for a in after) - sum(b["requests"] for b in before)
                    cyc[on].append({"requests_per_s": reqs / (t1 - t0), "us_per_request": 1e6 * (t1 - t0) / max(reqs, 1)})
        finally:
            dm.send_signal(signal.SIGTERM)
            dm.communicate(timeout=60)
    n_off, n_on = summarize(null[False]), summarize(null[True])
    c_off = {k: med(cyc[False], k) for k in ("requests_per_s", "us_per_request")}
    c_on = {k: med(cyc[True], k) for k in ("requests_per_s", "us_per_request")}
    return {
        "null_ioctl_off_us": n_off, "null_ioctl_on_us": n_on, "null_ioctl_on_off_p50": n_on["p50"] / n_off["p50"],
        "cycle_off": c_off, "cycle_on": c_on,
        "cycle_on_off_us_per_request": c_on["us_per_request"] / c_off["us_per_request"],
    }  # fmt: skip


def fmt(res: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.2f}" for k, v in res.items())


BENCHES: dict[str, Callable[[pathlib.Path, argparse.Namespace], dict[str, Any]]] = {
    "floors": floors,
    "null_ioctl": null_ioctl,
    "cycle_scripted": cycle_scripted,
    "cycle_kvm": cycle_kvm,
    "scaling": scaling,
    "range_client": range_client,
    "ioeventfd": ioeventfd_path,
    "interrupts": interrupts,
    "memory": memory_cost,
    "trace": trace_cost,
}


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """The issue's targets, from figures of this run."""
    out: dict[str, float] = {}
    fl = results.get("floors", {})
    rt = fl.get("c_libfuse_null_ioctl_us", {}).get("p50")
    ni = results.get("null_ioctl", {})
    for placement in ("same_cpu", "cross_cpu", "free"):
        if f"{placement}_ratio_p50" in ni:
            out[f"null_ioctl_vs_c_libfuse_{placement}"] = ni[f"{placement}_ratio_p50"]
        if f"{placement}_cdev_empty_ratio_p50" in ni:  # not a target: the part that is not the HSM's
            out[f"null_ioctl_cdev_empty_device_vs_c_libfuse_{placement}"] = ni[f"{placement}_cdev_empty_ratio_p50"]
    if "ratio_p50" in results.get("range_client", {}):
        out["range_client_cycle_vs_default_client_free"] = results["range_client"]["ratio_p50"]
    cs = results.get("cycle_scripted", {})
    if rt and cs:
        for key in ("pio_1vm_1vcpu", "pio_1vm_2vcpu"):
            out[f"scripted_{key}_cycle_vs_2x_c_rt"] = cs[key]["cycle_p50_us"] / (2 * rt)
    ck = results.get("cycle_kvm", {})
    kvm = fl.get("kvm_pio_exit_us", {}).get("p50")
    if rt and kvm and "cycle_p50_us" in ck.get("pio", {}):  # floors of a quiet machine (first)
        out["kvm_pio_cycle_vs_kvm_exit_plus_2x_c_rt"] = ck["pio"]["cycle_p50_us"] / (kvm + 2 * rt)
    if "ratio_to_floor" in ck.get("pio", {}):  # floors measured right before each round
        out["kvm_pio_cycle_vs_floor_measured_beside"] = ck["pio"]["ratio_to_floor"]
    one_cpu = results.get("scaling", {}).get("kvm_one_cpu", {})
    if "cycle_to_floor" in one_cpu:  # like for like: ours and the floor, each on one CPU, round by round
        out["kvm_pio_one_cpu_cycle_vs_one_cpu_floor"] = one_cpu["cycle_to_floor"]
    for name, row in results.get("scaling", {}).items():
        out[f"{name}_scaling_1_to_2_vcpus"] = row["median"]
    for key, value in results.get("interrupts", {}).items():
        if "_ratio_" in key:  # {placement}_ratio_...: ours over the bare KVM floor, p50s
            out[f"interrupts_{key}"] = value
    return out


def plot(results: dict[str, Any], path: pathlib.Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install '.[bench]'); no PNG")
        return False
    cs = results.get("cycle_scripted", {})
    fl = results.get("floors", {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5.2))
    for kind in ("pio", "mmio"):
        for vms in (1, 4):
            xs = [v for v in (1, 2, 4, 8) if f"{kind}_{vms}vm_{v}vcpu" in cs]
            if not xs:
                continue
            rows = [cs[f"{kind}_{vms}vm_{v}vcpu"] for v in xs]
            label = f"scripted {kind}, {vms} VM"
            ax1.plot(xs, [r["cycle_p50_us"] for r in rows], marker="o", label=label)
            ax2.plot(xs, [r["requests_per_s"] for r in rows], marker="o", label=label)
    rt = fl.get("c_libfuse_null_ioctl_us", {}).get("p50")
    if rt:
        ax1.axhline(2 * rt, linestyle="--", color="grey", label="floor: 2 x C libfuse round trip")
    kvm = fl.get("kvm_pio_exit_us", {}).get("p50")
    ck = results.get("cycle_kvm", {})
    for kind in ("pio", "mmio"):
        for vms in (1, 4):
            xs = [v for v in (1, 2, 4, 8) if "requests_per_s" in ck.get(f"{kind}_{vms}vm_{v}vcpu", {})]
            if not xs:
                continue
            rows = [ck[f"{kind}_{vms}vm_{v}vcpu"] for v in xs]
            label = f"kvm {kind}, {vms} VM"
            ax1.plot(xs, [r["cycle_p50_us"] for r in rows], marker="s", linestyle="-.", label=label)
            ax2.plot(xs, [r["requests_per_s"] for r in rows], marker="s", linestyle="-.", label=label)
    for kind, marker in (("pio", "*"), ("mmio", "^")):
        row = ck.get(kind)
        if isinstance(row, dict) and "cycle_p50_us" in row:
            ax1.plot([1], [row["cycle_p50_us"]], marker=marker, markersize=10, linestyle="",
                     label=f"kvm {kind}, guest to guest (client-timed)")
    if kvm and rt:
        ax1.axhline(kvm + 2 * rt, linestyle=":", color="black", label="floor: KVM exit + 2 x C round trip")
    same = fl.get("c_libfuse_null_ioctl_same_cpu_us", {}).get("p50")
    if kvm and same:
        ax1.axhline(kvm + 2 * same, linestyle=":", color="green", label="same, server and client on one CPU")
    ax1.set(xlabel="vCPUs per VM", ylabel="request cycle p50 (us)", title="Cycle time",
            xscale="log", yscale="log")
    ax2.set(xlabel="vCPUs per VM", ylabel="requests / s (all VMs)", title="Throughput", xscale="log")
    for ax in (ax1, ax2):
        ax.minorticks_off()
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=4, loc="lower center")
    host = results["host"]
    on = f"{host['cpus']} CPUs" + (f" ({host['cpu_model']})" if "cpu_model" in host else "")
    fig.suptitle(f"acrn-hsm-emu, {results['when']}, {on}")
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(path, dpi=110)
    return True


def host_facts() -> dict[str, Any]:
    """What the figures were measured on. The same code's ratios differ by host (the null
    ioctl on one CPU read 1.73 on one 2-CPU guest and 1.13-1.40 on another), so a run names
    its CPU, its caches, its kernel and the interpreter that served."""
    facts: dict[str, Any] = {"cpus": os.cpu_count(), "kernel": os.uname().release,
                             "load_before": os.getloadavg()[0]}
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    caches = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(caches.glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = (index / "level").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        name = f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")
        facts[f"cache_{name}"] = size
    facts["python"] = f"{sys.version.split()[0]} ({os.path.realpath(sys.executable)})"
    return facts


def main() -> int:
    p = argparse.ArgumentParser(prog="make bench")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--seconds", type=float, default=2.0, help="measurement window per cycle figure")
    p.add_argument("--only", choices=sorted(BENCHES), action="append")
    p.add_argument("--replot", action="store_true", help="only redraw the plot from latest.json")
    p.add_argument("--publish", action="store_true", help="also copy the plot and JSON to docs/ (README)")
    args = p.parse_args()
    if args.replot:
        results: dict[str, Any] = json.loads((RESULTS / "latest.json").read_text())
        if plot(results, RESULTS / "latest.png"):
            print(f"plot: {RESULTS / 'latest.png'}")
        if args.publish:
            publish()
        return 0
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("bench: needs root and /dev/fuse", file=sys.stderr)
        return 1
    results = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": host_facts(),
    }
    print("host: " + ", ".join(f"{k} {v}" for k, v in results["host"].items()), flush=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="acrn-bench-"))
    try:
        for name in args.only or list(BENCHES):
            print(f"== {name}", flush=True)
            results[name] = BENCHES[name](tmp, args)
            report(results[name])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["ratios"] = ratios(results)
    print("== ratios (same run)")
    report(results["ratios"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {RESULTS / 'latest.json'}")
    if plot(results, RESULTS / "latest.png"):
        print(f"plot: {RESULTS / 'latest.png'}")
    if args.publish:
        publish()
    return 0


def publish() -> None:
    """The README shows docs/bench.png; docs/bench.json keeps the figures it was drawn from."""
    docs = REPO / "docs"
    shutil.copyfile(RESULTS / "latest.json", docs / "bench.json")
    if (RESULTS / "latest.png").exists():
        shutil.copyfile(RESULTS / "latest.png", docs / "bench.png")
    print(f"published to {docs / 'bench.png'} and {docs / 'bench.json'}")


def report(r: dict[str, Any]) -> None:
    for key, value in r.items():
        if isinstance(value, dict):
            print(f"  {key:34s} {fmt(value)}")
        elif isinstance(value, float):
            print(f"  {key:34s} {value:9.3f}")


if __name__ == "__main__":
    sys.exit(main())
