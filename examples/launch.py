#!/usr/bin/env python3
"""A minimal VM launcher (the VM owner's role, as acrn-dm plays it), for the examples.

    python examples/launch.py [IMAGE] [--node /dev/acrn_hsm] [--start] [--ram-mib 1]

Creates a VM with one vCPU, maps RAM at guest physical address 0, loads
IMAGE (a flat binary, or a ``.S`` file assembled with binutils as a 16-bit
boot sector) at 0x7C00, points the vCPU at it in real mode, prints
``vmid=<n>`` and waits for Enter on stdin (or starts at once with
``--start``) so that device models can attach first. It then serves the
default client: every access no other client claims is logged on stderr,
reads answer all ones (nothing there). Ctrl-C (or SIGTERM) pauses and
destroys the VM.

With the scripted backend (no KVM) the guest code does not run; accesses
come from ``acrn-hsm-emu inject`` instead. Walk-through: docs/client.md.
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import subprocess
import sys
import tempfile

import trio

from acrn_hsm_emu import logs
from acrn_hsm_emu.client import DEFAULT_NODE, IoRequest, Vm, real_mode_regs

LOAD_ADDR = 0x7C00


def assemble(src: pathlib.Path) -> bytes:
    """A 16-bit flat binary linked at LOAD_ADDR (binutils: as, ld)."""
    with tempfile.TemporaryDirectory() as tmp:
        obj, out = pathlib.Path(tmp) / "image.o", pathlib.Path(tmp) / "image.bin"
        subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
        subprocess.run(
            ["ld", "-m", "elf_i386", "-Ttext", hex(LOAD_ADDR), "--oformat", "binary",
             "-o", str(out), str(obj)],
            check=True,
        )  # fmt: skip
        return out.read_bytes()


def unclaimed(req: IoRequest) -> int:
    print(f"launch: unclaimed {req}", file=sys.stderr, flush=True)
    return (1 << 64) - 1  # reads of nothing: all ones


async def wait_for_enter() -> None:
    print("launch: press Enter to start the VM", file=sys.stderr, flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)


async def run(args: argparse.Namespace) -> int:
    image = b""
    if args.image:
        path = pathlib.Path(args.image)
        image = assemble(path) if path.suffix == ".S" else path.read_bytes()
    try:
        vm = Vm.create(args.node, cpu_affinity=0x1)
    except OSError as e:
        print(f"launch: cannot create a VM on {args.node}: {e.strerror or e}", file=sys.stderr)
        return 1
    with vm, trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        ram = vm.map_ram(0, args.ram_mib << 20)
        if image:
            ram.write(LOAD_ADDR, image)
        vm.set_vcpu_regs(real_mode_regs(0, ip=LOAD_ADDR, sp=LOAD_ADDR))
        vm.create_ioreq_client()
        print(f"vmid={vm.vmid}", flush=True)
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            if not args.start:
                await wait_for_enter()
            vm.start()
            print(f"launch: VM {vm.vmid} started", file=sys.stderr, flush=True)
            await vm.serve(unclaimed)
    print("launch: VM destroyed", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image", nargs="?", help="flat binary or .S source loaded at 0x7C00")
    p.add_argument("--node", default=DEFAULT_NODE)
    p.add_argument("--start", action="store_true", help="start at once, without waiting for Enter")
    p.add_argument("--ram-mib", type=int, default=1, help="guest RAM at GPA 0 (MiB)")
    args = p.parse_args(argv)
    logs.configure(level="warning")  # library messages to stderr; stdout is for vmid=
    return trio.run(run, args)


if __name__ == "__main__":
    sys.exit(main())
