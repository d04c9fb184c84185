"""ACRN's shared ring (``struct shared_buf``) in a page of a client's memory.

The asynchronous I/O ring and the VM event ring are pages of the device
model's own memory, written by the hypervisor (``sbuf_put``: element at the
tail, then the tail) and read by the HSM (asyncio: ``acrn_sbuf_get_data_ptr``
and ``acrn_sbuf_move_next``) or by the device model itself (VM events). The
header is 64 bytes, the elements follow; one slot always stays empty
(``tail + ele_size == head`` is full). Offsets wrap at ``size``.
spec: hv A.2.8; layouts in :mod:`acrn_hsm_emu.acrn_kernel_abi`.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from acrn_hsm_emu import acrn_kernel_abi as ak
from acrn_hsm_emu.memory import SharedPage

_U32 = struct.Struct("<I")
_OFF_HEAD = ak.SharedBufHeader.head.offset
_OFF_TAIL = ak.SharedBufHeader.tail.offset
_OFF_OVERRUN = ak.SharedBufHeader.overrun_cnt.offset
_HEADER_SIZE = ctypes.sizeof(ak.SharedBufHeader)


@dataclass(frozen=True, slots=True)
class Geometry:
    """What a ring's header says about its shape."""

    magic: int
    ele_size: int
    size: int
    flags: int

    @property
    def valid(self) -> bool:
        return self.magic == ak.SBUF_MAGIC


def header(page: SharedPage) -> ak.SharedBufHeader:
    """The ring's header as it is now (raises MemoryFault)."""
    return ak.SharedBufHeader.from_buffer_copy(page.read(0, _HEADER_SIZE))


def _next(pos: int, span: int, scope: int) -> int:
    pos += span
    return pos - scope if pos >= scope else pos


class SharedRing:
    """One ring page; the geometry is read once, when the ring is adopted (as the
    hypervisor and the driver keep using the page they were given); head and tail
    are re-read at every operation, since the other side moves them."""

    __slots__ = ("page", "geometry", "puts", "gets", "full")

    def __init__(self, page: SharedPage) -> None:
        h = header(page)
        self.page = page
        self.geometry = Geometry(h.magic, h.ele_size, h.size, h.flags)
        self.puts = 0  # elements written by us
        self.gets = 0  # elements consumed by us
        self.full = 0  # puts refused because the ring was full

    def put(self, element: bytes) -> int:
        """``sbuf_put``: the bytes written (``ele_size``), 0 when full without
        OVERWRITE_EN, -1 when the element does not fit an element slot."""
        g = self.geometry
        if g.size == 0 or g.ele_size == 0:
            return -1
        page = self.page
        tail = page.load_u32(_OFF_TAIL)
        head = page.load_u32(_OFF_HEAD)
        nxt = _next(tail, g.ele_size, g.size)
        overwrite = False
        if nxt == head:
            if not g.flags & ak.OVERWRITE_EN:
                self.full += 1
                return 0
            overwrite = True
        if g.ele_size > len(element):
            element = element.ljust(g.ele_size, b"\0")
        elif len(element) > g.ele_size:
            return -1
        if overwrite:
            overrun = page.load_u32(_OFF_OVERRUN) + (g.flags & ak.OVERRUN_CNT_EN)
            page.store_u32(_OFF_OVERRUN, overrun & 0xFFFFFFFF)
            page.store_u32(_OFF_HEAD, _next(head, g.ele_size, g.size))
        # the element lands before the tail that publishes it
        page.write_then(ak.SBUF_HEAD_SIZE + tail, element, _OFF_TAIL, _U32.pack(nxt))
        self.puts += 1
        return g.ele_size

    def drain(self) -> list[bytes]:
        """Every element between head and tail, in order; the head follows them
        (``acrn_sbuf_get_data_ptr`` / ``acrn_sbuf_move_next`` until empty)."""
        g = self.geometry
        page = self.page
        head = page.load_u32(_OFF_HEAD)
        tail = page.load_u32(_OFF_TAIL)
        out: list[bytes] = []
        if g.ele_size == 0 or g.size == 0:
            return out
        while head != tail and len(out) < g.size // g.ele_size:
            out.append(page.read(ak.SBUF_HEAD_SIZE + head, g.ele_size))
            head = _next(head, g.ele_size, g.size)
        if out:
            page.store_u32(_OFF_HEAD, head)
            self.gets += len(out)
        return out

    def empty(self) -> bool:
        return self.page.load_u32(_OFF_HEAD) == self.page.load_u32(_OFF_TAIL)

    def snapshot(self) -> dict[str, int]:
        return {
            "page": self.page.base,
            "ele_size": self.geometry.ele_size,
            "size": self.geometry.size,
            "puts": self.puts,
            "gets": self.gets,
            "full": self.full,
        }


def init_page(page: SharedPage, ele_size: int, flags: int = 0) -> None:
    """Write an empty ring header into a 4 KiB page, as acrn-dm does before it hands
    the page over (``vm_init_asyncio``, ``sbuf_init``): for tests and Python clients."""
    ele_num = (4096 - ak.SBUF_HEAD_SIZE) // ele_size
    h = ak.SharedBufHeader(
        magic=ak.SBUF_MAGIC, ele_num=ele_num, ele_size=ele_size, head=0, tail=0,
        flags=flags, size=ele_num * ele_size,
    )  # fmt: skip
    page.write(0, bytes(h))
