"""systemd's notify protocol (sd_notify), trio-friendly and dependency-free.

Does nothing when NOTIFY_SOCKET is unset; handles the abstract '@' form.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        self._addr: str | bytes = ""
        self._failing = False  # warn once per run of failures, not at every ping
        self._watchdog = self._watchdog_from_env()
        if not address:
            return
        if address.startswith("@"):
            self._addr = b"\0" + address[1:].encode()  # abstract namespace
        elif address.startswith("/"):
            self._addr = address
        else:
            log.warning("sdnotify.bad_socket_address", value=address)
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> None:
        """Send ``READY=1``, ``STATUS=...`` etc.; a datagram never blocks."""
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._addr)
        except OSError as e:
            if not self._failing:
                log.warning("sdnotify.send_failed", error=e.strerror or str(e), socket=self.address)
            self._failing = True
        else:
            self._failing = False

    @property
    def address(self) -> str:
        a = self._addr
        return "@" + a[1:].decode(errors="replace") if isinstance(a, bytes) else a

    def watchdog_interval(self) -> float | None:
        """Half of WATCHDOG_USEC when it is meant for this process, else None."""
        return self._watchdog

    @staticmethod
    def _watchdog_from_env() -> float | None:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        if not usec.isdigit() or int(usec) == 0:
            log.warning("sdnotify.bad_watchdog_usec", value=usec)
            return None
        return int(usec) / 2e6

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
