"""The read values tests/clients/dm_loop.c answers with, for workload generators.

dm_loop plays acrn-dm: for every read request it handles it writes a value
that depends only on the request, so a test that injects a read knows what
the guest must get back. The same three formulas are in dm_loop.c; keep
them in step (tests compare them end to end).

- PIO and PCICFG values are 32 bits: the products wrap modulo 2**32.
- MMIO values are 64 bits: the product wraps modulo 2**64.
- The result is then cut to the access width (size 1, 2, 4 or 8 bytes).
"""

from __future__ import annotations

GOLDEN32 = 0x9E3779B1  # 2**32 / golden ratio, odd: spreads neighbouring addresses apart
GOLDEN64 = 0x9E3779B97F4A7C15
_M32 = (1 << 32) - 1
_M64 = (1 << 64) - 1


def width_mask(size: int) -> int:
    """All ones over ``size`` bytes (size >= 8: 64 bits; size 0: nothing)."""
    if size >= 8:
        return _M64
    return (1 << (8 * size)) - 1


def pio_answer(addr: int, size: int) -> int:
    """Value dm_loop returns for a PIO read of ``size`` bytes at port ``addr``."""
    return ((addr * GOLDEN32 + size) & _M32) & width_mask(size)


def mmio_answer(addr: int, size: int) -> int:
    """Value dm_loop returns for an MMIO read of ``size`` bytes at guest address ``addr``."""
    return ((addr * GOLDEN64 + size) & _M64) & width_mask(size)


def pci_key(bus: int, dev: int, func: int, reg: int) -> int:
    """The packed config address both sides hash (same as ``Access.addr`` for kind "pci")."""
    return bus << 16 | dev << 11 | func << 8 | reg


def pci_answer(bus: int, dev: int, func: int, reg: int, size: int) -> int:
    """Value dm_loop returns for a PCI config read (after the HSM's CF8/CFC folding)."""
    return ((pci_key(bus, dev, func, reg) * GOLDEN32 + size) & _M32) & width_mask(size)
