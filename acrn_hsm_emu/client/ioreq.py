"""I/O requests as a device model sees them, and the serving loop.

A client's request page is 16 slots of 256 bytes (``acrn_io_request``),
one per vCPU, in this process's memory. After ATTACH returns, the slots to
handle are those whose state is PROCESSING with ``kernel_handled == 0`` (as
acrn-dm's ``vm_loop`` scans them); the client writes a read's value into
the slot and calls NOTIFY_REQUEST_FINISH for that vCPU.
"""

from __future__ import annotations

import errno
import inspect
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from acrn_hsm_emu import abi, logs

if TYPE_CHECKING:
    from acrn_hsm_emu.client.node import NodeFile, Page

log = logs.LibraryLogger("acrn_hsm_emu.client")  # quiet unless the program configures logs

PIO = abi.ACRN_IOREQ_TYPE_PORTIO
MMIO = abi.ACRN_IOREQ_TYPE_MMIO
PCI = abi.ACRN_IOREQ_TYPE_PCICFG
KINDS = {PIO: "pio", MMIO: "mmio", PCI: "pci"}

_SLOT = abi.IOREQ_SLOT_SIZE
_STATE = abi.SLOT_PROCESSED
_KH = abi.SLOT_KERNEL_HANDLED
_HEAD = struct.Struct("<I60xI4xQQQ")  # type, direction, address, size, value (u64)
assert _HEAD.size == abi.SLOT_VALUE + 8
_PCI = struct.Struct("<IIII")  # bus, dev, func, reg (PCICFG: value is the u32 before them)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class IoRequest:
    """One request, decoded from its slot.

    ``value`` is what a write stores (PIO and PCI: 32 bits, MMIO: 64 bits);
    for reads the handler returns the value instead. ``bus``/``dev``/
    ``func``/``reg`` are set for PCI configuration requests (``kind ==
    "pci"``), which the HSM folds from the guest's 0xCF8/0xCFC accesses.
    """

    vcpu: int
    type: int
    write: bool
    address: int
    size: int
    value: int
    bus: int = 0
    dev: int = 0
    func: int = 0
    reg: int = 0

    @property
    def kind(self) -> str:
        return KINDS.get(self.type, str(self.type))

    @property
    def read(self) -> bool:
        return not self.write

    def __str__(self) -> str:
        what = (
            f"{self.bus:02x}:{self.dev:02x}.{self.func} reg {self.reg:#x}"
            if self.type == PCI
            else f"{self.address:#x}"
        )
        op = f"write {self.value:#x}" if self.write else "read"
        return f"vcpu {self.vcpu} {self.kind} {what} size {self.size} {op}"


Handler = Callable[[IoRequest], "int | None | Awaitable[int | None]"]


class RequestPage:
    """A request page in this process's memory."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.buf = page.map

    @property
    def addr(self) -> int:
        return self.page.addr

    def pending(self, nslots: int) -> list[IoRequest]:
        """Slots in PROCESSING with kernel_handled == 0, lowest vCPU first."""
        out = []
        buf = self.buf
        for i in range(min(nslots, abi.ACRN_IO_REQUEST_MAX)):
            off = i * _SLOT
            if _U32.unpack_from(buf, off + _STATE)[0] != abi.ACRN_IOREQ_STATE_PROCESSING:
                continue
            if _U32.unpack_from(buf, off + _KH)[0] != 0:
                continue  # an in-kernel (or range) client holds it
            typ, direction, address, size, value = _HEAD.unpack_from(buf, off)
            write = direction == abi.ACRN_IOREQ_DIR_WRITE
            if typ == MMIO:
                out.append(IoRequest(i, typ, write, address, size, value))
            elif typ == PCI:
                bus, dev, func, reg = _PCI.unpack_from(buf, off + abi.SLOT_PCI_BUS)
                out.append(IoRequest(i, typ, write, 0, size, value & 0xFFFFFFFF, bus, dev, func, reg))
            else:
                out.append(IoRequest(i, typ, write, address, size, value & 0xFFFFFFFF))
        return out

    def answer(self, req: IoRequest, value: int) -> None:
        """Store a read's value in the slot (PIO/PCI: u32, MMIO: u64), cut to the access."""
        off = req.vcpu * _SLOT + abi.SLOT_VALUE
        mask = (1 << (8 * min(req.size, 8))) - 1 if req.size else 0
        if req.type == MMIO:
            _U64.pack_into(self.buf, off, value & mask & 0xFFFFFFFFFFFFFFFF)
        else:
            _U32.pack_into(self.buf, off, value & mask & 0xFFFFFFFF)


class Server:
    """What a default client and a range client share: ATTACH, scan, answer, NOTIFY."""

    node: NodeFile
    requests: RequestPage
    vcpu_num: int

    def __init__(self) -> None:
        self._attach_done: threading.Event | None = None
        self.handled = 0

    async def _attach(self) -> None:
        done = threading.Event()
        began = threading.Event()
        self._attach_done = done
        node = self.node

        def blocking() -> None:
            began.set()
            try:
                node.attach_ioreq_client()
            finally:
                done.set()

        # A cancelled wait leaves the thread in ATTACH: it ends when a request
        # comes or the client is destroyed (close() does that).
        try:
            await trio.to_thread.run_sync(blocking, abandon_on_cancel=True)
        except trio.Cancelled:
            if not began.is_set():  # cancelled before the thread ran (a handler cancelled serve)
                self._attach_done = None  # nothing to reap; a late start meets a destroyed client
            raise
        self._attach_done = None

    def _reap_attach(self, timeout: float = 5.0) -> None:
        """After the client was destroyed: wait for an abandoned ATTACH thread to return."""
        done = self._attach_done
        if done is not None and not done.wait(timeout):
            log.warning("client.attach_thread_lingers")
        self._attach_done = None

    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve requests until the client is destroyed (returns) or the task is cancelled.

        ``handler(req)`` (plain or async) returns a read's value (None: 0);
        its result for a write is ignored. Requests are handled one at a
        time, lowest vCPU first. If the handler raises, the request is still
        completed (a read gets all ones) before the exception propagates, so
        the vCPU is never left waiting.
        """
        task_status.started()
        while True:
            try:
                await self._attach()
            except OSError as e:
                if e.errno == errno.ENODEV:
                    return  # the client is gone: DESTROY_IOREQ_CLIENT, VM destroyed
                raise
            for req in self.requests.pending(self.vcpu_num):
                await self._handle(handler, req)

    async def _handle(self, handler: Handler, req: IoRequest) -> None:
        try:
            result = handler(req)
            if inspect.isawaitable(result):
                result = await result
        except BaseException:
            if req.read:
                self.requests.answer(req, (1 << 64) - 1)
            self.node.notify_request_finish(req.vcpu)
            raise
        if req.read:
            self.requests.answer(req, int(result or 0))
        self.node.notify_request_finish(req.vcpu)
        self.handled += 1
