"""Prometheus metrics, read at scrape time from the counters the daemon keeps anyway.

Nothing is counted for the metrics on the request path: the request counts are the
HSM's per-VM counters (and the express path's, in C), the latency histograms are
built at scrape time from each vCPU's ring of request cycle times (the ring the
vCPU fills anyway), errors are the ioctl refusals the HSM counts by command and
errno. A custom collector (``prometheus_client``'s ``Collector`` protocol) turns
them into metric families; the text is ``prometheus_client.generate_latest``'s.

The endpoint is off by default (``metrics_listen``, docs/configuration.md). The
HTTP side is a few lines of trio in the daemon's own thread (GET /metrics), so
a scrape reads the HSM's state where it is changed, without locks.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from acrn_hsm_emu import abi
from acrn_hsm_emu._native import ffi
from acrn_hsm_emu.observe.trace import ioctl_name

if TYPE_CHECKING:
    from acrn_hsm_emu.hsm.hsm import HsmDevice
    from acrn_hsm_emu.hypervisor.hypervisor import Hypervisor

log = structlog.get_logger("acrn_hsm_emu.metrics")

# Request cycle buckets, in seconds: 10 us (an ioeventfd) to 1 s (a stuck device model).
BUCKETS = (10e-6, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 0.1, 1.0)
_BUCKETS_NS = [int(b * 1e9) for b in BUCKETS]

# RequestCounters field -> the `client` label of acrn_hsm_requests_routed_total
_ROUTES = (
    ("default", "default"), ("in_kernel", "in_daemon"), ("remote", "remote"), ("cf8", "cf8_cfc"),
    ("cleared", "cleared"), ("orphaned", "orphaned"), ("stalled", "stalled"),
)  # fmt: skip


class _Hist:
    """A vCPU's cumulative histogram, fed from its cycle ring at each scrape."""

    __slots__ = ("seen", "counts", "sum_ns", "missed")

    def __init__(self) -> None:
        self.seen = 0  # ring.n at the last scrape
        self.counts = [0] * (len(_BUCKETS_NS) + 1)
        self.sum_ns = 0
        self.missed = 0  # cycles the ring overwrote before a scrape read them

    def feed(self, ring: Any) -> None:
        r = ring.ring
        n = int(r.n)
        size = int(r.size)
        if n < self.seen:  # the ring was cleared (a reset): start over
            self.seen = 0
        new = n - self.seen
        if new > size:
            self.missed += new - size
            new = size
        if new <= 0:
            self.seen = n
            return
        buf = r.buf
        start = (n - new) % size
        first = min(new, size - start)
        values = ffi.unpack(buf + start, first)
        if new > first:
            values += ffi.unpack(buf, new - first)
        for v in values:
            self.counts[bisect.bisect_left(_BUCKETS_NS, v)] += 1
            self.sum_ns += v
        self.seen = n


class HsmCollector:
    """What ``/metrics`` shows; ``collect`` runs in the trio thread at each scrape."""

    def __init__(self, device: HsmDevice, hypervisor: Hypervisor) -> None:
        self.device = device
        self.hv = hypervisor
        self._hists: dict[tuple[int, int, int], _Hist] = {}
        self.scrapes = 0

    def describe(self) -> list[Metric]:
        return []  # collected anew at each scrape (no registration-time call)

    def collect(self) -> Iterator[Metric]:
        self.scrapes += 1
        dev = self.device
        d = dev.dispatcher
        yield GaugeMetricFamily("acrn_hsm_open_files", "Open files of the node", value=len(dev.files))
        yield CounterMetricFamily("acrn_hsm_upcalls", "Upcalls the dispatcher served", value=d.upcalls)
        yield CounterMetricFamily("acrn_hsm_dispatch_passes", "Dispatcher passes", value=d.passes)

        by_type = CounterMetricFamily(
            "acrn_hsm_requests", "I/O requests dispatched, by VM and type (pio, mmio, pci, other)",
            labels=["vmid", "type"],
        )  # fmt: skip
        routed = CounterMetricFamily(
            "acrn_hsm_requests_routed",
            "I/O requests by where they went: default (the device model), in_daemon (ioeventfd), "
            "remote (a range client in another process), cf8_cfc (answered by the HSM), cleared, "
            "orphaned (completed for a vanished client), stalled (a pass found no client)",
            labels=["vmid", "client"],
        )
        notified = CounterMetricFamily(
            "acrn_hsm_notify_request_finish", "NOTIFY_REQUEST_FINISH calls that completed a request",
            labels=["vmid"],
        )  # fmt: skip
        notify_failed = CounterMetricFamily(
            "acrn_hsm_notify_hypercall_failures", "Failed notify hypercalls (the vCPU was not resumed)",
            labels=["vmid"],
        )  # fmt: skip
        served = CounterMetricFamily(
            "acrn_hsm_range_client_requests", "Requests a range client in another process completed",
            labels=["vmid", "client"],
        )  # fmt: skip
        interrupts = CounterMetricFamily(
            "acrn_hsm_interrupts_injected",
            "Interrupts the HSM had the hypervisor inject: msi (INJECT_MSI and irqfd signals), "
            "irqline (SET_IRQLINE operations)",
            labels=["vmid", "kind"],
        )
        irqfd = CounterMetricFamily(
            "acrn_hsm_irqfd_signals", "MSIs injected for irqfd signals (also counted in msi)", labels=["vmid"]
        )
        errors = CounterMetricFamily(
            "acrn_hsm_ioctl_errors", "ioctls answered with an error, by command and errno",
            labels=["ioctl", "errno"],
        )  # fmt: skip
        refused: dict[tuple[int, int], int] = dict(dev.ioctl_errors)
        for vm in d.vms:
            if not vm.live:
                continue
            v = str(vm.vmid)
            c = vm.counters.as_dict()
            for t in ("pio", "mmio", "pci", "other"):
                by_type.add_metric([v, t], c[t])
            for field, label in _ROUTES:
                routed.add_metric([v, label], c[field])
            notified.add_metric([v], c["notified"])
            notify_failed.add_metric([v], c["notify_failed"])
            for client in vm.range_clients:
                if client.remote is not None:
                    served.add_metric([v, client.name], client.served)
            vm.hypercalls.fold()  # what the express path injected
            counts = vm.hypercalls.counts
            for name, kind in (("inject_msi", "msi"), ("set_irqline", "irqline")):
                k = counts.get(name)
                interrupts.add_metric([v, kind], (k["calls"] - k["failed"]) if k else 0)
            irqfd.add_metric([v], sum(i.injected - i.failures for i in vm.irqfds))
            x = vm.express
            if x is not None and x.refused:
                key = (abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT, errno.EAGAIN)
                refused[key] = refused.get(key, 0) + int(x.refused)
        for (cmd, err), n in sorted(refused.items()):
            errors.add_metric([ioctl_name(cmd), errno.errorcode.get(err, str(err))], n)
        yield from (by_type, routed, notified, notify_failed, served, interrupts, irqfd, errors)
        yield from self._vms_and_cycles()

    def _vms_and_cycles(self) -> Iterator[Metric]:
        vms = GaugeMetricFamily("acrn_hsm_vms", "User VMs in the hypervisor, by state", labels=["state"])
        hist = HistogramMetricFamily(
            "acrn_hsm_request_cycle_seconds",
            "A vCPU's request cycle, from the request posted to the slot freed (what the guest "
            "waits); fed from each vCPU's ring at scrape time",
            labels=["vmid", "vcpu"],
        )
        missed = CounterMetricFamily(
            "acrn_hsm_request_cycle_unsampled",
            "Request cycles overwritten in a vCPU's ring (8,192 entries) before a scrape read them: "
            "counted in no histogram bucket",
            labels=["vmid", "vcpu"],
        )
        states: dict[str, int] = {}
        live: set[tuple[int, int, int]] = set()
        for vmid, state, vcpus in self.hv.vcpu_cycles():
            states[state] = states.get(state, 0) + 1
            for vcpu_id, ring in vcpus:
                key = (vmid, vcpu_id, id(ring))
                live.add(key)
                h = self._hists.get(key)
                if h is None:
                    h = self._hists[key] = _Hist()
                h.feed(ring)
                cumulative, buckets = 0, []
                for bound, n in zip((*(f"{b:g}" for b in BUCKETS), "+Inf"), h.counts, strict=True):
                    cumulative += n
                    buckets.append((bound, cumulative))
                hist.add_metric([str(vmid), str(vcpu_id)], buckets, h.sum_ns / 1e9)
                missed.add_metric([str(vmid), str(vcpu_id)], h.missed)
        for key in set(self._hists) - live:
            del self._hists[key]  # its VM is gone
        for state, n in sorted(states.items()):
            vms.add_metric([state], n)
        yield from (vms, hist, missed)


def registry(collector: HsmCollector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def exposition(reg: CollectorRegistry) -> bytes:
    """The Prometheus text format (0.0.4) of everything registered."""
    return generate_latest(reg)


# -- the endpoint ---------------------------------------------------------------------------

MAX_REQUEST = 8192
REQUEST_TIMEOUT_S = 10.0


class Endpoint:
    """``GET /metrics`` over HTTP/1.0 on a TCP socket, served by trio in the daemon's thread."""

    def __init__(self, reg: CollectorRegistry) -> None:
        self.reg = reg
        self.address: tuple[str, int] | None = None  # where it listens (port resolved)

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        sock = listeners[0].socket
        name = sock.getsockname()
        self.address = (str(name[0]), int(name[1]))
        task_status.started()
        await trio.serve_listeners(self._client, listeners)

    async def _client(self, stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            try:
                with trio.move_on_after(REQUEST_TIMEOUT_S):
                    while b"\r\n\r\n" not in buf and b"\n\n" not in buf and len(buf) < MAX_REQUEST:
                        data = await stream.receive_some(4096)
                        if not data:
                            break
                        buf += data
                line = buf.split(b"\n", 1)[0].decode("latin-1").strip().split()
                if len(line) >= 2 and line[0] in ("GET", "HEAD") and line[1].split("?")[0] in ("/metrics", "/"):
                    body = exposition(self.reg)
                    head = (f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
                    await stream.send_all(head.encode() + (body if line[0] == "GET" else b""))
                else:
                    body = b"only GET /metrics here\n"
                    status = "404 Not Found" if len(line) >= 2 else "400 Bad Request"
                    head = (f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\n"
                            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
                    await stream.send_all(head.encode() + body)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            except Exception:  # a scrape that breaks ends that scrape, never the daemon
                log.exception("metrics.scrape_failed")
