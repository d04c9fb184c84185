"""The ioctls ACRN's own Service VM kernel adds (the ``acrn-kernel`` ABI profile).

``projectacrn/acrn-kernel`` (what ACRN ships as its Service VM kernel) has, on
top of upstream's ``drivers/virt/acrn/``, and acrn-dm v3.3 uses when present:

- SETUP_ASYNCIO (0x90): the device model's asyncio ring page, by value
  (``ioreq.c:acrn_asyncio_setup``); IOEVENTFD with flag ASYNCIO (0x08) then
  registers a descriptor with the hypervisor instead of a kernel ioeventfd
  (``ioeventfd.c:acrn_ioeventfd_asyncio_config``); at every upcall the
  dispatcher drains the ring, signalling each eventfd pushed into it
  (``ioreq.c:acrn_asyncio_dispatch``), before it scans the VM's slots.
- SETUP_VM_EVENT_RING / SETUP_VM_EVENT_FD (0xa0 / 0xa1): the ring the
  hypervisor posts VM events into, and the eventfd that tells the device
  model. No stored version of the kernel's source has them: they are built
  like SETUP_ASYNCIO and from what hypervisor v3.3 and acrn-dm v3.3 expect
  (docs/acrn-dm.md lists which facts were read and which were inferred).
- ASSIGN/DEASSIGN_PIO_REGION (0x5b / 0x5c): copy the 12-byte region and
  return the hypercall's result, as the driver's other device ioctls do.

Every errno follows the code named; the rest of the table is upstream's.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass, field

import structlog

from acrn_hsm_emu import acrn_kernel_abi as ak
from acrn_hsm_emu.hsm import eventfd
from acrn_hsm_emu.hsm.acrn_drv import Memory, Vm
from acrn_hsm_emu.hypervisor.api import Hypercalls
from acrn_hsm_emu.memory import PAGE_SIZE, MemoryFault, SharedPage
from acrn_hsm_emu.observe.trace import refuse
from acrn_hsm_emu.sbuf import SharedRing, header

log = structlog.get_logger("acrn_hsm_emu.hsm")

PROFILES = ("upstream", "acrn-kernel")
# What the kernel pushes through the asyncio ring is a struct eventfd_ctx pointer;
# here a token that stands for the eventfd, shaped like a kernel address.
_CTX_BASE = 0xFFFF_8880_0000_0000
_CTX_STRIDE = 0x40
_PIO_REGION_SIZE = ctypes.sizeof(ak.AcrnPioRegion)


@dataclass
class AsyncioFd:
    """An eventfd the kernel took a reference on for asyncio (never dropped before
    the VM goes: ``acrn_ioeventfd_asyncio_config`` keeps its ``eventfd_ctx``)."""

    token: int
    fd: int  # the daemon's duplicate
    signals: int = 0


@dataclass
class AcrnKernelVm:
    """What ACRN's kernel adds to ``struct acrn_vm``."""

    asyncio: SharedRing | None = None
    asyncio_page_pinned: bool = False  # acrn_asyncio_free leaves asyncio_page set (quirk)
    asyncio_fds: list[AsyncioFd] = field(default_factory=list)
    vm_event: SharedRing | None = None
    vm_event_fd: int | None = None
    vm_event_signals: int = 0
    stray_tokens: int = 0  # ring elements naming no eventfd we gave out

    def snapshot(self) -> dict[str, object]:
        return {
            "asyncio": None if self.asyncio is None else {
                **self.asyncio.snapshot(),
                "eventfds": [{"token": a.token, "signals": a.signals} for a in self.asyncio_fds],
            },
            "vm_event": None if self.vm_event is None else {
                **self.vm_event.snapshot(), "eventfd": self.vm_event_fd is not None,
                "signals": self.vm_event_signals,
            },
            "stray_tokens": self.stray_tokens,
        }  # fmt: skip


class AcrnKernel:
    """The profile's ioctls and dispatch work, for one device."""

    def __init__(self, hv: Hypercalls, quirks: bool = True) -> None:
        self.hv = hv
        self.quirks = quirks
        self._next_token = 0

    def state(self, vm: Vm) -> AcrnKernelVm:
        if vm.acrn_kernel is None:
            vm.acrn_kernel = AcrnKernelVm()
        st: AcrnKernelVm = vm.acrn_kernel
        return st

    # -- ring pages ----------------------------------------------------------------

    def _pin_ring(self, mem: Memory, addr: int) -> SharedPage | int:
        """pin_user_pages_fast(addr, 1, FOLL_WRITE) + the driver's header check: the
        page holding ``addr`` (used from its start), or -EFAULT / -EINVAL."""
        base = addr & ~(PAGE_SIZE - 1) & 0xFFFFFFFFFFFFFFFF
        try:
            mem.check_writable(base, PAGE_SIZE)
            h = header(SharedPage(mem, base))
        except MemoryFault as e:
            return refuse(errno.EFAULT, "the ring page at {:#x} is not writable ({})", base, e)
        if h.magic != ak.SBUF_MAGIC or h.size + ak.SBUF_HEAD_SIZE > ak.SBUF_MAX_SIZE:
            return refuse(errno.EINVAL, "ring header magic={:#x} size={:#x}: not an sbuf of at most {:#x} bytes",
                          h.magic, h.size, ak.SBUF_MAX_SIZE)
        return SharedPage(mem, base)

    def _setup_ring(self, vm: Vm, mem: Memory, addr: int, sbuf_id: int, ring: str, ioctl: str) -> SharedRing | int:
        """Pin the caller's ring page and hand it to the hypervisor (HC_SETUP_SBUF), as
        SETUP_ASYNCIO and SETUP_VM_EVENT_RING both do: the ring, or -errno."""
        page = self._pin_ring(mem, addr)
        if isinstance(page, int):
            vm.hypercalls.record(ioctl, page, page_addr=addr)
            return page
        ret = self.hv.setup_sbuf(vm.vmid, sbuf_id, page, ak.ACRN_INVALID_CPUID)
        vm.hypercalls.record("setup_sbuf", ret, ring=ring, page_addr=page.base)
        if ret < 0:
            return ret
        return SharedRing(page)

    def setup_asyncio(self, vm: Vm, mem: Memory, addr: int) -> int:
        """SETUP_ASYNCIO (``acrn_asyncio_setup``)."""
        st = self.state(vm)
        if st.asyncio is not None or st.asyncio_page_pinned:
            return refuse(errno.EEXIST, "the VM has an asyncio ring already")
        ring = self._setup_ring(vm, mem, addr, ak.ACRN_ASYNCIO, "asyncio", "setup_asyncio")
        if isinstance(ring, int):
            return ring
        st.asyncio = ring
        st.asyncio_page_pinned = True
        log.info("hsm.asyncio_ring", vmid=vm.vmid, page=hex(ring.page.base))
        return 0

    def setup_vm_event_ring(self, vm: Vm, mem: Memory, addr: int) -> int:
        """SETUP_VM_EVENT_RING: as SETUP_ASYNCIO, for the VM event ring."""
        st = self.state(vm)
        if st.vm_event is not None:
            return refuse(errno.EEXIST, "the VM has a VM event ring already")
        ring = self._setup_ring(vm, mem, addr, ak.ACRN_VM_EVENT, "vm_event", "setup_vm_event_ring")
        if isinstance(ring, int):
            return ring
        st.vm_event = ring
        log.info("hsm.vm_event_ring", vmid=vm.vmid, page=hex(ring.page.base))
        return 0

    def setup_vm_event_fd(self, vm: Vm, pid: int, fd: int) -> int:
        """SETUP_VM_EVENT_FD: the caller's eventfd (EBADF: not open, EINVAL: not an
        eventfd, EEXIST: one is set already)."""
        st = self.state(vm)
        if st.vm_event_fd is not None:
            return refuse(errno.EEXIST, "the VM has a VM event eventfd already")
        try:
            dup = eventfd.fdget(pid, fd)
        except eventfd.EventfdError as e:
            return -e.errno
        st.vm_event_fd = dup
        log.info("hsm.vm_event_fd", vmid=vm.vmid, fd=fd)
        return 0

    # -- asyncio ioeventfds ------------------------------------------------------------

    def ioeventfd_asyncio(self, vm: Vm, pid: int, fd: int, flags: int, addr: int) -> int:
        """IOEVENTFD with ACRN_IOEVENTFD_FLAG_ASYNCIO (``acrn_ioeventfd_asyncio_config``):
        ENODEV without a ring; the descriptor carries no data match and no length."""
        st = self.state(vm)
        if st.asyncio is None:
            return refuse(errno.ENODEV, "an asyncio ioeventfd needs SETUP_ASYNCIO first")
        try:
            dup = eventfd.fdget(pid, fd)
        except eventfd.EventfdError as e:
            return -e.errno
        entry = next((a for a in st.asyncio_fds if eventfd.same(a.fd, dup)), None)
        if entry is None:
            entry = AsyncioFd(_CTX_BASE + self._next_token * _CTX_STRIDE, dup)
            self._next_token += 1
            st.asyncio_fds.append(entry)  # the context reference is kept (never put)
        else:
            os.close(dup)
        info = ak.AcrnAsyncioInfo(
            type=ak.ACRN_ASYNCIO_PIO if flags & 0x1 else ak.ACRN_ASYNCIO_MMIO,
            match_data=0, addr=addr, fd=entry.token, data=0,
        )  # fmt: skip
        if flags & 0x4:  # DEASSIGN
            ret = self.hv.asyncio_deassign(vm.vmid, bytes(info))
            name = "asyncio_deassign"
        else:
            ret = self.hv.asyncio_assign(vm.vmid, bytes(info))
            name = "asyncio_assign"
        vm.hypercalls.record(name, ret, addr=addr, pio=bool(flags & 0x1), token=entry.token)
        return ret

    # -- port regions ----------------------------------------------------------------------

    def pio_region(self, vm: Vm, data: bytes, assign: bool) -> int:
        """ASSIGN/DEASSIGN_PIO_REGION: memdup_user of the region, then the hypercall."""
        if len(data) < _PIO_REGION_SIZE:
            return refuse(errno.EFAULT, "the region argument is not readable")
        raw = bytes(data[:_PIO_REGION_SIZE])
        ret = (self.hv.assign_pio_region if assign else self.hv.deassign_pio_region)(vm.vmid, raw)
        r = ak.AcrnPioRegion.from_buffer_copy(raw)
        vm.hypercalls.record(
            "assign_pio_region" if assign else "deassign_pio_region", ret,
            name=r.name.decode(errors="replace"), port=r.res.port_address, size=r.res.size,
        )  # fmt: skip
        return ret

# -- the upcall's pass and teardown --------------------------------------------------------


def dispatch(vm: Vm) -> None:
    """``acrn_asyncio_dispatch`` (then the VM event eventfd, when its ring holds
    events). Raises MemoryFault when a ring page is gone."""
    st = vm.acrn_kernel
    if st is None:
        return
    if st.asyncio is not None:
        for raw in st.asyncio.drain():
            token = int.from_bytes(raw[:8], "little")
            entry = next((a for a in st.asyncio_fds if a.token == token), None)
            if entry is None:
                st.stray_tokens += 1
                log.warning("hsm.asyncio_stray", vmid=vm.vmid, token=hex(token))
                continue
            eventfd.signal(entry.fd)
            entry.signals += 1
    if st.vm_event is not None and st.vm_event_fd is not None and not st.vm_event.empty():
        eventfd.signal(st.vm_event_fd)
        st.vm_event_signals += 1


def deinit(vm: Vm, quirks: bool = True) -> None:
    """At destroy: ``acrn_asyncio_free`` (the ring goes, the quirky page mark stays)
    and the VM event ring and eventfd."""
    st = vm.acrn_kernel
    if st is None:
        return
    st.asyncio = None
    if not quirks:
        st.asyncio_page_pinned = False
    st.vm_event = None
    for a in st.asyncio_fds:
        _close(a.fd)
    st.asyncio_fds = []
    if st.vm_event_fd is not None:
        _close(st.vm_event_fd)
        st.vm_event_fd = None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
