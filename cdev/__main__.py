"""Serve any cdev device: ``python -m cdev --device pkg.module:Class --node PATH``.

A generic runner (tests use it for their own devices); products wire cdev
into their own daemon instead.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

import structlog
import trio

from cdev.device import Device
from cdev.server import ServeError, Server


def _load(spec: str) -> Device:
    module, _, attr = spec.partition(":")
    device: Device = getattr(importlib.import_module(module), attr)()
    return device


async def _main(args: argparse.Namespace) -> None:
    server = Server(
        _load(args.device),
        args.node,
        transport=args.transport,
        run_dir=args.run_dir,
        max_waiting_per_pid=args.max_waiting_per_pid,
    )
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await nursery.start(server.serve)
            print("READY", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m cdev", description=__doc__)
    p.add_argument("--device", required=True, help="module:Class of a cdev Device")
    p.add_argument("--node", required=True)
    p.add_argument("--transport", default="auto", choices=["auto", "fuse", "cuse"])
    p.add_argument("--run-dir", default="/run/cdev")
    p.add_argument("--max-waiting-per-pid", type=int, default=256)
    args = p.parse_args()
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(sys.stderr))  # a record a write()
    failed: list[BaseException] = []
    try:
        trio.run(_main, args)
    except* ServeError as group:  # raised inside the server's nurseries
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        failed.append(exc)
    if failed:
        print(f"cdev: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
