"""Life-cycle events (``acrn-hsm-emu events``), in the manner of QMP's: one JSON object per
event, ``{"event": NAME, "timestamp": {"seconds": S, "microseconds": US}, "data": {...}}``.

The names and their data are listed in docs/observability.md (``EVENTS`` below is the same
list, checked by tests/test_observe.py). Emitting with nobody listening costs a list test;
events are rare anyway (a VM's life, a client's, a fault, a limit). The daemon keeps the
last :data:`RECENT` events, which a new listener may ask for (``--recent``).
"""

from __future__ import annotations

import collections
import time
from typing import Any

import trio

__all__ = ["EVENTS", "BUS", "EventBus"]

# name -> its data fields (docs/observability.md documents each)
EVENTS: dict[str, tuple[str, ...]] = {
    "file.opened": ("pid", "uid"),
    "file.closed": ("pid", "vmid"),
    "vm.created": ("vmid", "vcpu_num", "pid"),
    "vm.started": ("vmid",),
    "vm.paused": ("vmid", "by"),
    "vm.reset": ("vmid",),
    "vm.destroyed": ("vmid", "by"),
    "vm.orphaned": ("vmid", "reason"),
    "vm.failed": ("vmid", "pid", "error"),
    "client.created": ("vmid", "client", "kind", "pid"),
    "client.destroyed": ("vmid", "client", "kind", "reason"),
    "client.fault": ("vmid", "client", "pid", "vcpu", "error"),
    "limit.reached": ("limit", "value", "vmid", "pid"),
    "attach.refused": ("vmid", "refused", "limit"),
    "notify.failed": ("vmid", "vcpu", "ret"),
    "lost": ("count",),
}

RECENT = 256


class EventBus:
    """Who listens, and the recent past. Emitted from the trio thread only."""

    def __init__(self) -> None:
        self.listeners: list[trio.MemorySendChannel[dict[str, Any]]] = []
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self.lost: dict[int, int] = {}  # id(listener) -> events it missed

    def emit(self, name: str, **data: Any) -> None:
        now = time.time()
        ev = {
            "event": name,
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
            "data": data,
        }
        self.recent.append(ev)
        for ch in list(self.listeners):
            missed = self.lost.get(id(ch), 0)
            try:
                if missed:
                    ch.send_nowait({"event": "lost", "timestamp": ev["timestamp"], "data": {"count": missed}})
                    self.lost[id(ch)] = 0
                ch.send_nowait(ev)
            except trio.WouldBlock:
                self.lost[id(ch)] = missed + 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.unlisten(ch)

    def listen(
        self, recent: bool = False, capacity: int = 1024
    ) -> tuple[trio.MemorySendChannel[dict[str, Any]], trio.MemoryReceiveChannel[dict[str, Any]]]:
        """A new listener's channel (its send side is what :meth:`unlisten` takes)."""
        send, receive = trio.open_memory_channel[dict[str, Any]](max(capacity, RECENT + 1))
        if recent:
            for ev in self.recent:
                send.send_nowait(ev)
        self.listeners.append(send)
        self.lost[id(send)] = 0
        return send, receive

    def unlisten(self, ch: trio.MemorySendChannel[dict[str, Any]]) -> None:
        if ch in self.listeners:
            self.listeners.remove(ch)
            ch.close()
        self.lost.pop(id(ch), None)


BUS = EventBus()
