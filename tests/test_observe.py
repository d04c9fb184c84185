"""Seeing inside (issue 20): trace, events, status and metrics (docs/observability.md).

In-process: the trace's cost when off (counters, never a clock), filters, the records.
Through a real node and the real daemon: vm_sample with a non-zero ``reserved`` and the
rule found in ``acrn-hsm-emu trace``; events; ``status --json``/``--watch`` with a pending
request's age; metrics scraped over HTTP, parsed by prometheus_client's parser, moving
with the traffic.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import re
import signal
import subprocess
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_hsm_flow import result_of, serve, started

from acrn_hsm_emu import abi
from acrn_hsm_emu.hypervisor.api import Access
from acrn_hsm_emu.observe import render
from acrn_hsm_emu.observe.events import EVENTS
from acrn_hsm_emu.observe.trace import STATS, TRACE, Filter
from tests.conftest import REPO, SLOW, VENV_BIN
from tests.support.answers import pio_answer
from tests.support.cbuild import build_c
from tests.support.poll import HANG_GUARD_S, wait_until

EXE = str(VENV_BIN / "acrn-hsm-emu")


# -- in process: the cost when off, the records ------------------------------------------------


def _drain(sub: Any) -> list[dict[str, Any]]:
    out = []
    while True:
        try:
            out.append(sub.receive.receive_nowait())
        except Exception:
            return out


async def test_the_trace_costs_nothing_observable_when_off(hv):
    """No listener: a refusal's reason is never formatted nor kept, no record is built."""
    STATS.reset()
    s = started(hv, vcpus=1)
    fut = hv.real.inject(s.vmid, 0, Access("pio", False, 0x60, 1))
    await serve(s, 0x5A)
    assert await result_of(fut) == 0x5A
    assert s.notify(0, reserved=0x2F2F) == -errno.EINVAL
    assert s.ioctl(0xA2FF) == -errno.ENOTTY
    assert (STATS.formatted, STATS.records) == (0, 0)
    assert TRACE.reason is None and not TRACE.active and not TRACE.inflight
    # a listener: the same refusal now carries its rule, formatted once
    sub = TRACE.subscribe(Filter())
    try:
        assert s.notify(0, reserved=0x2F2F) == -errno.EINVAL
        (rec,) = _drain(sub)
        assert STATS.formatted == 1
        assert (rec["ioctl"], rec["vm"], rec["vcpu"], rec["errno"], rec["reason"]) == (
            "NOTIFY_REQUEST_FINISH", s.vmid, 0, "EINVAL", "reserved=0x2f2f, must be 0")
        assert render.record(rec).endswith(
            f"NOTIFY_REQUEST_FINISH vm={s.vmid} vcpu=0 -> EINVAL: reserved=0x2f2f, must be 0"
            f"  [pid {rec['pid']}]")
        # a request: vCPU, access, client, answer, latency
        fut = hv.real.inject(s.vmid, 0, Access("pio", False, 0x61, 1))
        await serve(s, 0x77)
        assert await result_of(fut) == 0x77
        recs = _drain(sub)
        req = [r for r in recs if r["type"] == "request"]
        assert len(req) == 1, recs
        r = req[0]
        assert (r["vm"], r["vcpu"], r["kind"], r["write"], r["addr"], r["size"], r["client"], r["answer"],
                r["outcome"]) == (s.vmid, 0, "pio", False, 0x61, 1, "acrndm", 0x77, "completed")
        assert r["latency_us"] is not None and r["latency_us"] >= 0
        assert "pio read 0x61/1 -> acrndm answered 0x77 in" in render.record(r)
        assert [x["ioctl"] for x in recs if x["type"] == "ioctl"] == ["ATTACH_IOREQ_CLIENT", "NOTIFY_REQUEST_FINISH"]
    finally:
        TRACE.unsubscribe(sub)
    # gone again: nothing more is formatted or built
    formatted, records = STATS.formatted, STATS.records
    assert s.notify(0, reserved=1) == -errno.EINVAL
    assert (STATS.formatted, STATS.records) == (formatted, records)
    assert not TRACE.active


def test_filters():
    ioctl = {"type": "ioctl", "vm": 1, "vcpu": 0, "error": True}
    ok_ioctl = {"type": "ioctl", "vm": 1, "error": False}
    req = {"type": "request", "vm": 2, "vcpu": 1, "error": False}
    lost = {"type": "lost", "count": 3}
    f = Filter.from_request({"what": "requests"})
    assert [f.wants(r) for r in (ioctl, ok_ioctl, req, lost)] == [False, False, True, True]
    f = Filter.from_request({"what": "ioctls", "errors": True})
    assert [f.wants(r) for r in (ioctl, ok_ioctl, req, lost)] == [True, False, False, True]
    f = Filter.from_request({"vm": 2, "vcpu": 1})
    assert [f.wants(r) for r in (ioctl, ok_ioctl, req, lost)] == [False, False, True, True]
    for bad in ({"what": "everything"}, {"vm": -1}, {"vcpu": "0"}, {"vm": True}):
        with pytest.raises(ValueError, match="^trace: "):
            Filter.from_request(bad)


def test_a_slow_reader_loses_records_and_is_told_how_many():
    sub = TRACE.subscribe(Filter(), capacity=2)
    try:
        for k in range(5):
            TRACE.emit({"type": "request", "vm": 1, "vcpu": 0, "error": False, "n": k})
        got = _drain(sub)
        assert [r.get("n") for r in got] == [0, 1]
        TRACE.emit({"type": "request", "vm": 1, "vcpu": 0, "error": False, "n": 5})
        assert _drain(sub) == [{"type": "lost", "t": None, "count": 3},
                               {"type": "request", "vm": 1, "vcpu": 0, "error": False, "n": 5}]
    finally:
        TRACE.unsubscribe(sub)


def test_every_event_is_documented_with_its_fields():
    page = (REPO / "docs" / "observability.md").read_text()
    page = page[page.index("## `events`"):page.index("## `status`")]
    documented = dict(re.findall(r"^\| `([a-z_.]+)` \| ([^|]*) \|", page, re.M))
    assert set(documented) == set(EVENTS), set(documented) ^ set(EVENTS)
    for name, fields in EVENTS.items():
        listed = re.findall(r"`(\w+)`", documented[name])
        assert listed == list(fields), (name, listed, fields)


# -- through the real daemon -------------------------------------------------------------------


def cli(d: Any, *args: str, check: bool = True, timeout: float = 60 * SLOW) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([EXE, args[0], "--control", str(d.control), *args[1:]], capture_output=True, text=True,
                       timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}): {p.stderr}")
    return p


def status(d: Any) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(cli(d, "status", "--json").stdout)
    return result


def wait_for(what: str, cond: Any) -> Any:
    """tests/support/poll.py's hang guard, polling the daemon's status at a gentler pace."""
    return wait_until(cond, what, HANG_GUARD_S * SLOW, step=0.05)


def follow(d: Any, command: str, *args: str) -> subprocess.Popen[str]:
    """``trace``/``events`` as a running client; returns once the daemon counts it."""
    key = "tracers" if command == "trace" else "event_listeners"
    before = status(d)["observers"][key]
    p = subprocess.Popen([EXE, command, "--control", str(d.control), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for(f"{command} attached", lambda: status(d)["observers"][key] > before)
    return p


def finish(p: subprocess.Popen[str]) -> tuple[str, str]:
    """The output of a follower that stops by itself (--count)."""
    out, err = p.communicate(timeout=60 * SLOW)
    assert p.returncode == 0, err
    assert "Traceback" not in err
    return out, err


def test_vm_sample_with_a_reserved_notify_shows_the_rule_in_trace(daemon_factory):
    """Issue 20's acceptance: vm-sample-like code with reserved != 0; the trace names the rule."""
    d = daemon_factory("--backend", "scripted")
    as_json = follow(d, "trace", "--ioctls", "--errors", "--count", "1", "--json")
    as_text = follow(d, "trace", "--vm", "1", "--errors", "--count", "1", "--format", "text")
    vm = subprocess.Popen([str(build_c("vm_sample")), "-R", "0x2f2f", str(d.node)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    assert vm.stdout is not None
    assert vm.stdout.readline().startswith("vmid=1 ")
    inject = cli(d, "inject", "--vm", "1", "--timeout", str(30 * SLOW), "pio-read", "0x3f8", "1", check=False)
    out, err = vm.communicate(timeout=60 * SLOW)
    assert vm.returncode == 1 and "NOTIFY: Invalid argument" in err, (out, err)
    assert inject.returncode == 1 and "the access was abandoned" in inject.stderr, inject.stderr
    rec = json.loads(finish(as_json)[0])
    assert (rec["ioctl"], rec["vm"], rec["vcpu"], rec["errno"], rec["reason"], rec["args"]["reserved"]) == (
        "NOTIFY_REQUEST_FINISH", 1, 0, "EINVAL", "reserved=0x2f2f, must be 0", 0x2F2F)
    line = finish(as_text)[0].strip()
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{6}  ioctl  NOTIFY_REQUEST_FINISH vm=1 vcpu=0 -> EINVAL: "
                        r"reserved=0x2f2f, must be 0  \[pid \d+\]", line), line
    wait_for("tracers gone", lambda: status(d)["observers"]["tracers"] == 0)


def dm_loop(d: Any) -> subprocess.Popen[str]:
    dm = subprocess.Popen([str(build_c("dm_loop")), str(d.node), "0x1"], stdout=subprocess.PIPE, text=True)
    assert dm.stdout is not None
    assert dm.stdout.readline().startswith("vmid=1 ")
    return dm


def stop(dm: subprocess.Popen[str]) -> None:
    dm.send_signal(signal.SIGTERM)
    dm.communicate(timeout=60 * SLOW)


def test_trace_requests_of_one_vm_through_the_express_path(daemon_factory):
    d = daemon_factory("--backend", "scripted")
    dm = dm_loop(d)
    try:
        reqs = follow(d, "trace", "--requests", "--vm", "1", "--vcpu", "0", "--count", "2", "--json")
        other_vm = follow(d, "trace", "--vm", "2", "--count", "1", "--json")
        for port in (0x3F8, 0x3F9):
            p = cli(d, "inject", "--vm", "1", "pio-read", hex(port), "1")
            assert p.stdout.strip() == f"{pio_answer(port, 1):#x}"
        recs = [json.loads(line) for line in finish(reqs)[0].splitlines()]
        assert [(r["type"], r["vm"], r["vcpu"], r["kind"], r["addr"], r["client"], r["answer"], r["path"])
                for r in recs] == [("request", 1, 0, "pio", port, "acrndm", pio_answer(port, 1), "express")
                                   for port in (0x3F8, 0x3F9)]
        assert all(r["latency_us"] >= 0 for r in recs)
        assert other_vm.poll() is None, "nothing of VM 2 was sent"
        other_vm.send_signal(signal.SIGINT)
        _out, err = other_vm.communicate(timeout=60 * SLOW)
        assert other_vm.returncode == 130 and err == "", err
    finally:
        stop(dm)


def test_a_trace_client_killed_mid_stream_ends_only_its_stream(daemon_factory, tmp_path):
    """A tracer killed (SIGKILL) while the daemon streams a VM's every request to it: its
    connection breaks under a send, and the daemon serves on (found by the trace bench)."""
    wl = tmp_path / "loop.json"
    steps = [{"op": "pio", "port": 0x500, "size": 4, "write": True, "value": 1}]
    wl.write_text(json.dumps({"vcpu": [{"id": 0, "repeat": 0, "steps": steps}]}))
    d = daemon_factory("--backend", "scripted", "--workload", str(wl))
    dm = dm_loop(d)
    try:
        for _ in range(3):
            tracer = follow(d, "trace", "--requests", "--json")
            assert tracer.stdout is not None and tracer.stdout.readline().startswith("{")
            tracer.kill()
            tracer.communicate(timeout=60 * SLOW)
            wait_for("the tracer gone", lambda: status(d)["observers"]["tracers"] == 0)
        assert d.proc is not None and d.proc.poll() is None, d.log()
        assert '"control.connection_failed"' not in d.log()
        assert status(d)["hsm"]["vms"][0]["counters"]["default"] > 0
    finally:
        stop(dm)


def test_events_follow_a_vms_life(daemon_factory):
    d = daemon_factory("--backend", "scripted")
    ev = follow(d, "events", "--count", "9")
    dm = dm_loop(d)
    stop(dm)
    events = [json.loads(line) for line in finish(ev)[0].splitlines()]
    names = [e["event"] for e in events]
    assert names == ["file.opened", "client.created", "vm.created", "client.created", "vm.started",
                     "client.destroyed", "vm.paused", "client.destroyed", "vm.destroyed"], names
    for e in events:
        assert set(e) == {"event", "timestamp", "data"}
        assert set(e["data"]) <= set(EVENTS[e["event"]]), e
        assert set(e["timestamp"]) == {"seconds", "microseconds"}
    assert events[2]["data"] == {"vmid": 1, "vcpu_num": 1, "pid": dm.pid}
    assert events[-1]["data"] == {"vmid": 1, "by": "ioctl"}
    # the recent past, for a listener that comes later
    recent = cli(d, "events", "--recent", "--count", "3").stdout
    assert [json.loads(line)["event"] for line in recent.splitlines()] == names[:3]


def test_status_shows_a_pending_request_and_its_age_and_watch_refreshes(daemon_factory):
    d = daemon_factory("--backend", "scripted")
    hold = subprocess.Popen([str(build_c("hsm_hold")), str(d.node), "hang"], stdout=subprocess.PIPE, text=True)
    inject = None
    try:
        assert hold.stdout is not None
        vmid = hold.stdout.readline().split()[0].split("=")[1]
        inject = subprocess.Popen([EXE, "inject", "--control", str(d.control), "--vm", vmid, "--timeout",
                                   str(60 * SLOW), "pio-write", "0x80", "1", "0x42"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert hold.stdout.readline().startswith("holding vcpu=0")
        first = wait_for("pending", lambda: status(d)["pending"])
        assert first == [{"vmid": int(vmid), "vcpu": 0, "state": "processing", "kind": "pio", "write": True,
                          "addr": 0x80, "size": 1, "value": 0x42, "client": "acrndm", "kernel_handled": False,
                          "age_s": first[0]["age_s"]}]
        # the same request ages (sampled: a lower bound)
        later = wait_for("older", lambda: [p for p in status(d)["pending"] if p["age_s"] > first[0]["age_s"]])
        assert later[0]["vcpu"] == 0
        text = cli(d, "status").stdout
        assert re.search(r"pending requests .*\n\s+VCPU\s+STATE\s+REQUEST\s+CLIENT\s+AGE\n"
                         r"\s+0\s+processing\s+pio write 0x80/1 = 0x42\s+acrndm\s+\S+s\n", text), text
        assert f"{int(status(d)['hsm']['vms'][0]['request_page']):#x}" in text
        assert "request counters" in text and "handed to the default client (the device model)" in text
        # --watch --json: one line per refresh, until Ctrl-C (exit 130, nothing on stderr)
        w = subprocess.Popen([EXE, "status", "--control", str(d.control), "--watch", "0.2", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert w.stdout is not None
        a, b = json.loads(w.stdout.readline()), json.loads(w.stdout.readline())
        assert a["pid"] == b["pid"] == d.proc.pid and b["pending"][0]["vcpu"] == 0
        w.send_signal(signal.SIGINT)
        _out, err = w.communicate(timeout=60 * SLOW)
        assert w.returncode == 130 and err == "", err
    finally:
        hold.kill()
        hold.wait()
        if inject is not None:
            inject.communicate(timeout=60 * SLOW)
    wait_for("no pending", lambda: status(d)["pending"] == [])


def scrape(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30 * SLOW) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    samples: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
    return samples


def test_metrics_parse_as_prometheus_text_and_move_with_the_traffic(daemon_factory):
    d = daemon_factory("--backend", "scripted", "--metrics-listen", "127.0.0.1:0")
    m = status(d)["metrics"]
    assert m["address"] == "127.0.0.1" and m["port"] > 0
    url = f"http://127.0.0.1:{m['port']}/metrics"
    before = scrape(url)
    assert before['acrn_hsm_open_files{}'] == 0
    dm = dm_loop(d)
    try:
        for port in range(0x3F8, 0x3F8 + 5):
            cli(d, "inject", "--vm", "1", "pio-read", hex(port), "1")
        cli(d, "inject", "--vm", "1", "mmio-write", "0xd0000000", "4", "0x1")
        after = scrape(url)
        assert after['acrn_hsm_requests_total{"type": "pio", "vmid": "1"}'] == 5
        assert after['acrn_hsm_requests_total{"type": "mmio", "vmid": "1"}'] == 1
        assert after['acrn_hsm_requests_routed_total{"client": "default", "vmid": "1"}'] == 6
        assert after['acrn_hsm_vms{"state": "RUNNING"}'] == 1
        assert after['acrn_hsm_request_cycle_seconds_count{"vcpu": "0", "vmid": "1"}'] == 6
        assert after['acrn_hsm_request_cycle_seconds_bucket{"le": "+Inf", "vcpu": "0", "vmid": "1"}'] == 6
        assert after['acrn_hsm_open_files{}'] == 1
        cli(d, "inject", "--vm", "1", "pio-read", "0x3f8", "1")
        again = scrape(url)
        assert again['acrn_hsm_request_cycle_seconds_count{"vcpu": "0", "vmid": "1"}'] == 7
        assert again['acrn_hsm_requests_total{"type": "pio", "vmid": "1"}'] == 6
    finally:
        stop(dm)
    # a refused ioctl moves the errors by errno; the control socket gives the same text
    fd = os.open(d.node, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, abi.ACRN_IOCTL_START_VM, 0)  # no VM on this file
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    text = cli(d, "metrics").stdout
    assert scrape(url)['acrn_hsm_ioctl_errors_total{"errno": "EINVAL", "ioctl": "START_VM"}'] == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"acrn_hsm_requests", "acrn_hsm_request_cycle_seconds", "acrn_hsm_ioctl_errors",
            "acrn_hsm_interrupts_injected", "acrn_hsm_vms"} <= set(families)
    notfound = urllib.request.Request(f"http://127.0.0.1:{m['port']}/other")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(notfound, timeout=30 * SLOW)
    assert e.value.code == 404


def test_trace_usage_errors_are_one_line_with_exit_2():
    for argv in (["trace", "--ioctls", "--requests", "--control", "/nonexistent.sock"],
                 ["trace", "--vm", "x"], ["trace", "--format", "xml"], ["status", "--watch", "0"],
                 ["events", "--bogus"]):
        p = subprocess.run([EXE, *argv], capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, (argv, p.stderr)


def test_observability_page_is_linked_from_the_readme():
    assert "docs/observability.md" in (REPO / "README.md").read_text()
    assert pathlib.Path(REPO / "docs" / "observability.md").exists()


def test_every_refusal_of_the_hsm_gives_its_rule():
    """No handler answers a bare ``-errno``: each refusal goes through ``refuse(errno, why, ...)``
    (or a limit's ``refuse_limit``), so the trace can say why. The one exception is EINTR,
    the answer to a signal, which no rule produces."""
    import re

    from tests.conftest import REPO

    bare = []
    for path in sorted((REPO / "acrn_hsm_emu" / "hsm").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"return -errno\.E(?!INTR\b)", line):
                bare.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not bare, "\n".join(bare)


async def test_a_scrape_that_breaks_ends_only_that_scrape():
    """A collector that raises: the scrape's connection closes, the endpoint serves the next."""
    import trio
    from prometheus_client import CollectorRegistry

    from acrn_hsm_emu.observe.metrics import Endpoint

    class Broken:
        calls = 0

        def collect(self) -> Any:
            Broken.calls += 1
            raise RuntimeError("boom")

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Broken())  # type: ignore[arg-type]
    endpoint = Endpoint(reg)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.serve, "127.0.0.1", 0)
        assert endpoint.address is not None
        for _ in range(2):
            stream = await trio.open_tcp_stream(*endpoint.address)
            await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert await stream.receive_some(4096) == b""  # closed, no answer
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert Broken.calls == 2


def test_a_refusal_before_the_argument_is_fetched_is_traced_and_counted(daemon_factory):
    """NOTIFY_REQUEST_FINISH on a file without a VM: under CUSE the gate answers before cdev
    asks the kernel for the argument (precheck), under FUSE after; the trace and the
    metrics show it either way."""
    d = daemon_factory("--backend", "scripted")
    tracer = follow(d, "trace", "--ioctls", "--errors", "--count", "1", "--json")
    fd = os.open(d.node, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, abi.ACRN_IOCTL_NOTIFY_REQUEST_FINISH, bytes(8))
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    rec = json.loads(finish(tracer)[0])
    assert (rec["ioctl"], rec["errno"], rec["reason"]) == (
        "NOTIFY_REQUEST_FINISH", "EINVAL", "no VM on this file: CREATE_VM first (or it was destroyed)")
    text = cli(d, "metrics").stdout
    assert 'acrn_hsm_ioctl_errors_total{errno="EINVAL",ioctl="NOTIFY_REQUEST_FINISH"} 1.0' in text, text
