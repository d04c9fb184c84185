"""No client can wedge the daemon (issue 19's acceptance): processes that fuzz the node
(random lifecycle ioctls, repeated CREATE_VM on one fd, bad request pages) and exit
without clean-up leave nothing behind once they are gone, and a new device model is
served as ever, with the daemon's descriptors back where they started."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
from typing import Any

from tests.conftest import VENV_BIN
from tests.support.answers import pio_answer
from tests.support.cbuild import build_c

REPO = pathlib.Path(__file__).resolve().parent.parent

FUZZ_CLIENT = r"""
import ctypes, fcntl, mmap, os, random, sys
from acrn_hsm_emu import abi

rng = random.Random(int(sys.argv[2]))
node = sys.argv[1]
pages = [mmap.mmap(-1, 4096) for _ in range(4)]
addrs = [ctypes.addressof(ctypes.c_char.from_buffer(p)) for p in pages] + [0, 0x7FFF00000000, 0x1001]
simple = [abi.ACRN_IOCTL_START_VM, abi.ACRN_IOCTL_PAUSE_VM, abi.ACRN_IOCTL_RESET_VM,
          abi.ACRN_IOCTL_DESTROY_VM, abi.ACRN_IOCTL_CREATE_IOREQ_CLIENT, abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT]
fds = [os.open(node, os.O_RDWR) for _ in range(3)]
answers = {}
for _ in range(int(sys.argv[3])):
    i = rng.randrange(len(fds))
    try:
        if rng.random() < 0.4:
            c = abi.AcrnVmCreation(cpu_affinity=1)
            c.ioreq_buf = rng.choice(addrs)
            fcntl.ioctl(fds[i], abi.ACRN_IOCTL_CREATE_VM, bytearray(bytes(c)))
        elif rng.random() < 0.1:
            os.close(fds[i])
            fds[i] = os.open(node, os.O_RDWR)
            continue
        else:
            fcntl.ioctl(fds[i], rng.choice(simple), 0)
        answers[0] = answers.get(0, 0) + 1
    except OSError as e:
        answers[e.errno] = answers.get(e.errno, 0) + 1
print(sorted(answers.items()), flush=True)
os._exit(0)  # no clean-up: the files go with the process
"""


def fuzz(node: pathlib.Path, seed: int, calls: int = 300) -> subprocess.Popen[str]:
    return subprocess.Popen([str(VENV_BIN / "python"), "-c", FUZZ_CLIENT, str(node), str(seed), str(calls)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def vms(d: Any) -> list[dict[str, Any]]:
    return json.loads(d.cli("vm", "list", "--json").stdout)


def wait_no_vms(d: Any) -> None:
    """Until the reaper has reclaimed everything: no VM in the hypervisor, no HSM record."""
    for _ in range(100000):  # hang guard only
        if not vms(d) and not json.loads(d.cli("status", "--json").stdout)["hsm"]["vms"]:
            return
    raise AssertionError(f"VMs left: {vms(d)}\n{d.log()}")


def serve_one_vm(d: Any) -> None:
    """A device model creates, starts and serves a VM, then destroys it (SIGTERM)."""
    dm = subprocess.Popen([str(build_c("dm_loop")), str(d.node), "0x1"], stdout=subprocess.PIPE, text=True)
    try:
        assert dm.stdout is not None
        vmid = dm.stdout.readline().split()[0].split("=")[1]
        out = d.cli("inject", "--vm", vmid, "pio-read", "0x3f8", "1").stdout
        assert out.strip() == f"{pio_answer(0x3F8, 1):#x}"
    finally:
        dm.send_signal(signal.SIGTERM)
        out, _ = dm.communicate(timeout=60)
    assert dm.returncode == 0, out
    assert vms(d) == []


def fds_and_rss(pid: int) -> tuple[int, int]:
    rss = next(int(ln.split()[1]) for ln in open(f"/proc/{pid}/status") if ln.startswith("VmRSS:"))
    return len(os.listdir(f"/proc/{pid}/fd")), rss


def test_fuzzing_processes_that_exit_leave_nothing_behind(hsm_daemon):
    d = hsm_daemon
    pid = json.loads(d.cli("status", "--json").stdout)["pid"]
    slots = json.loads(d.cli("status", "--json").stdout)["hypervisor"]["platform"]["max_vm_num"]
    # warm-up: one of each, so that what Python loads lazily is loaded
    serve_one_vm(d)
    w = fuzz(d.node, 0)
    assert w.wait(timeout=300) == 0, w.stderr
    wait_no_vms(d)
    fds_before, rss_before = fds_and_rss(pid)
    # Several at once, more VMs among them than the hypervisor has slots.
    procs = [fuzz(d.node, seed) for seed in range(1, 5)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        assert "(5, " not in out, out  # never EIO: no handler crashed
    assert slots < 4 * 300 * 0.4  # they asked for more VMs than there are slots
    wait_no_vms(d)
    serve_one_vm(d)
    st = json.loads(d.cli("status", "--json").stdout)
    assert st["hsm"]["vms"] == [] and st["hsm"]["open_files"] == 0, json.dumps(st["hsm"]["vms"], indent=1)
    fds_after, rss_after = fds_and_rss(pid)
    assert fds_after == fds_before, (fds_before, fds_after)
    assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)  # kB: no per-VM leak
    assert '"hsm.orphan_reclaimed"' in d.log()
    assert "Traceback" not in d.log()


def test_a_device_model_that_dies_is_one_info_line(hsm_daemon):
    """Killed with its VM running: one info line says whose, which VM and what was done;
    nothing at warning level."""
    d = hsm_daemon
    before = len(d.log().splitlines())
    dm = subprocess.Popen([str(build_c("dm_loop")), str(d.node), "0x1"], stdout=subprocess.PIPE, text=True)
    assert dm.stdout is not None
    vmid = int(dm.stdout.readline().split()[0].split("=")[1])
    dm.kill()
    dm.wait()
    wait_no_vms(d)
    events = [json.loads(ln) for ln in d.log().splitlines()[before:] if ln.startswith("{")]
    released = [e for e in events if e["event"] == "hsm.release_paused_running_vm"]
    assert len(released) == 1, events
    assert (released[0]["level"], released[0]["pid"], released[0]["vmid"], released[0]["outcome"]) == (
        "info", dm.pid, vmid, "paused and destroyed")
    assert released[0]["summary"] == (
        f"device model pid {dm.pid} exited with VM {vmid} running: VM {vmid} paused and destroyed")
    assert not [e for e in events if e["event"] == "hsm.destroy_vm_refused"], "the release's own first try"
    assert [e for e in events if e["level"] not in ("info", "debug")] == []
    serving = next(json.loads(ln) for ln in d.log().splitlines() if '"daemon.serving"' in ln)
    assert serving["config"] == "none (built-in defaults)"  # never null
