"""structlog, configured once: console lines on a terminal, JSON lines otherwise.

stdlib logging (libraries) goes through the same processors.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")

# Whether debug lines are kept (configure sets it): a debug line on a path taken per
# request or per interrupt tests this first, since even a filtered call through a
# module's logger proxy costs ~0.7 us here.
DEBUG = False


def configure(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    global DEBUG
    lvl = getattr(logging, level.upper())
    DEBUG = lvl <= logging.DEBUG
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # one write() a record, newline included (PrintLogger's print() makes two): the
        # daemon, its command's launcher and the command share one output (a file, the
        # journal's socket), and a record cut in two would let another's land in between
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=shared)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)


class LibraryLogger:
    """A library's structlog logger that is quiet unless the program asked for logs.

    Unconfigured structlog prints every level on stdout; a program using the client
    library would find debug lines in its own output. Until the program configures
    structlog (``structlog.configure`` or :func:`configure`), this drops debug and info
    and writes warnings and above to stderr; afterwards it is ``structlog.get_logger(name)``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._quiet = structlog.wrap_logger(
            structlog.WriteLogger(sys.stderr),
            processors=[
                structlog.processors.add_log_level,
                structlog.dev.ConsoleRenderer(colors=False),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        )

    def __getattr__(self, method: str) -> Any:
        if structlog.is_configured():
            return getattr(structlog.get_logger(self.name), method)
        return getattr(self._quiet, method)
