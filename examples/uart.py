#!/usr/bin/env python3
"""A 16550 UART device model in its own process: prints what the guest writes.

    python examples/uart.py --vm VMID [--node /dev/acrn_hsm] [--base 0x3f8]

It binds to VM VMID (created by another process: examples/launch.py,
acrn-dm, ...) through the acrn-hsm-emu extension ABI, claims the eight
ports of COM1 (0x3F8-0x3FF) as a range client, and serves them: bytes the
guest writes to the transmit register go to this process's stdout, the line
status register always reports an empty transmitter, the other registers
keep what the guest writes (divisor latch included). Interrupts are not
raised (SET_IRQLINE needs a CUSE node), so the guest must poll, as most
early consoles do. Messages about the model itself go to stderr.

Walk-through: docs/client.md, "A UART in its own process".
"""

from __future__ import annotations

import argparse
import signal
import sys

import trio

from acrn_hsm_emu import logs
from acrn_hsm_emu.client import DEFAULT_NODE, IoRequest, RangeClient

# Register offsets from the base port; with DLAB (LCR bit 7) set, 0 and 1 are the divisor.
RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
LSR_THRE_TEMT = 0x60  # transmit holding register and transmitter empty
IIR_NO_INTERRUPT = 0x01


class Uart16550:
    """The register file of a 16550 whose transmitter is always ready."""

    def __init__(self, out: object = None) -> None:
        self.out = out if out is not None else sys.stdout.buffer
        self.ier = self.lcr = self.mcr = self.scr = 0
        self.dll, self.dlm = 0x01, 0x00  # 115200 baud
        self.fcr = 0
        self.written = 0

    def read(self, reg: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR:
            return self.dll if dlab else 0x00  # nothing received
        if reg == IER:
            return self.dlm if dlab else self.ier
        if reg == IIR_FCR:
            return IIR_NO_INTERRUPT | (0xC0 if self.fcr & 1 else 0)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            return LSR_THRE_TEMT
        if reg == MSR:
            return 0xB0  # CTS, DSR, DCD
        return self.scr

    def write(self, reg: int, value: int) -> None:
        value &= 0xFF
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR:
            if dlab:
                self.dll = value
            else:
                self.transmit(value)
        elif reg == IER:
            if dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F
        elif reg == IIR_FCR:
            self.fcr = value
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F
        elif reg == SCR:
            self.scr = value

    def transmit(self, byte: int) -> None:
        self.out.write(bytes((byte,)))  # type: ignore[attr-defined]
        self.out.flush()  # type: ignore[attr-defined]
        self.written += 1

    def access(self, req: IoRequest, base: int) -> int:
        """One port access of 1, 2 or 4 bytes: byte by byte, from the lowest port."""
        value = 0
        for k in range(req.size):
            reg = req.address + k - base
            if not 0 <= reg <= 7:
                continue  # cannot happen: the range is exactly the eight ports
            if req.write:
                self.write(reg, req.value >> (8 * k))
            else:
                value |= self.read(reg) << (8 * k)
        return value


async def run(vmid: int, node: str, base: int, name: str) -> int:
    uart = Uart16550()
    try:
        client = RangeClient.open(vmid, name, node, ranges=[("pio", base, base + 7)])
    except OSError as e:
        print(f"uart: cannot serve VM {vmid} on {node}: {e.strerror or e}", file=sys.stderr)
        return 1
    with client, trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        print(
            f"uart: serving ports {base:#x}-{base + 7:#x} of VM {vmid} as {name!r}",
            file=sys.stderr,
            flush=True,
        )
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            async def serve() -> None:
                await client.serve(lambda req: uart.access(req, base))
                print("uart: the VM went away", file=sys.stderr)
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(serve)
    print(f"uart: stopped after {uart.written} byte(s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vm", type=lambda t: int(t, 0), required=True, help="the VM's vmid")
    p.add_argument("--node", default=DEFAULT_NODE)
    p.add_argument("--base", type=lambda t: int(t, 0), default=0x3F8, help="first port (COM1)")
    p.add_argument("--name", default="uart", help="the range client's name")
    args = p.parse_args(argv)
    logs.configure(level="warning")  # library messages to stderr; stdout is the guest's
    return trio.run(run, args.vm, args.node, args.base, args.name)


if __name__ == "__main__":
    sys.exit(main())
