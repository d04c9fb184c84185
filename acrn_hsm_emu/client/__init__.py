"""acrn_hsm_emu.client: talk to /dev/acrn_hsm from Python, trio-friendly.

Three layers, each usable on its own (docs/client.md):

- :class:`NodeFile`: one open file of the node, one method per ioctl of
  ``<linux/acrn.h>`` and of the extension ABI (``acrn_hsm_emu.h``), raising
  OSError with the ioctl's errno;
- :class:`Vm`: create and own a VM (request page, guest RAM, registers,
  start/pause/destroy) and serve its default client;
- :class:`RangeClient`: bind to a VM another process owns and serve only
  the PIO/MMIO/PCI ranges registered (extension ABI).

Serving is ``await vm.serve(handler)`` with ``handler(req: IoRequest)``
returning a read's value; ATTACH blocks in a worker thread, everything else
runs in the trio thread. The extension's C header is at
:func:`include_dir` (``python -m acrn_hsm_emu.client --include-dir``).
"""

from acrn_hsm_emu.client import extension
from acrn_hsm_emu.client.extension import include_dir, pci_bdf
from acrn_hsm_emu.client.ioreq import MMIO, PCI, PIO, Handler, IoRequest, RequestPage
from acrn_hsm_emu.client.node import DEFAULT_NODE, NodeFile, Page
from acrn_hsm_emu.client.vm import GuestMemory, RangeClient, Vm, real_mode_regs

__all__ = [
    "DEFAULT_NODE",
    "MMIO",
    "PCI",
    "PIO",
    "GuestMemory",
    "Handler",
    "IoRequest",
    "NodeFile",
    "Page",
    "RangeClient",
    "RequestPage",
    "Vm",
    "extension",
    "include_dir",
    "pci_bdf",
    "real_mode_regs",
]
