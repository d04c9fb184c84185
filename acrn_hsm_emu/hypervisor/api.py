"""The hypercall seam between the HSM and the mock hypervisor.

The HSM reaches the hypervisor only through these methods, each named after
ACRN's hypercall and returning what RAX would hold: 0, or a negative errno
(ACRN's generic failure is -1, which the ioctl hands back as EPERM). The
hypervisor reaches the HSM only by calling the upcall it was given.

Where the kernel passes the physical address of a kernel buffer, the HSM
passes the buffer itself (``bytes``/``bytearray`` of the uapi layout); where it
passes the physical address of a pinned user page, it passes a
:class:`~acrn_hsm_emu.memory.SharedPage`. spec: hsm section 9, hv A.1.1.
"""

from __future__ import annotations

import concurrent.futures
import os
import select
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from acrn_hsm_emu.memory import ClientMemory, SharedPage

# vm_memory_region_op.type
MR_ADD = 0
MR_DEL = 2


@dataclass(frozen=True, slots=True)
class MemoryRegionOp:
    """One 32-byte ``vm_memory_region_op`` of a SET_MEMORY_REGIONS batch.

    ``service_vm_pa`` is the synthesised host address the HSM reports (there
    are no physical addresses here). For RAM, ``backing`` and ``host_va`` say
    where the bytes really are: ``host_va`` in ``backing``'s process.
    """

    type: int
    attr: int
    user_vm_pa: int
    service_vm_pa: int
    size: int
    backing: ClientMemory | None = None
    host_va: int | None = None


@dataclass(frozen=True, slots=True)
class Access:
    """A guest access a vCPU performs (inject command, scripted workload).

    kind: "pio", "mmio" or "pci" (pci = through 0xCF8/0xCFC, as a guest does:
    a 4-byte write of the address to 0xCF8, then the data port access).
    For pci, ``addr`` is ``bus << 16 | dev << 11 | func << 8 | reg``.
    """

    kind: str
    write: bool
    addr: int
    size: int
    value: int = 0


class EventFd:
    """An eventfd this object owns: :meth:`set` adds one, :meth:`take` reads the
    count back (0 if none), :meth:`wait` polls for it.

    Native code may use :attr:`fd` while it holds a reference to the object.
    :meth:`close`, or the collector, closes the fd once; a :meth:`set` from
    another thread after that is a no-op, never a write to a reused fd number.
    """

    __slots__ = ("_box", "_lock", "_poll", "__weakref__")

    def __init__(self) -> None:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._box = [fd]  # shared with the finalizer
        self._lock = threading.Lock()
        weakref.finalize(self, _close_once, self._box, self._lock)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    @property
    def fd(self) -> int:
        return self._box[0]

    def set(self) -> None:
        with self._lock:
            fd = self._box[0]
            if fd >= 0:
                os.eventfd_write(fd, 1)

    def take(self) -> int:
        try:
            return os.eventfd_read(self._box[0])
        except BlockingIOError:
            return 0

    def wait(self, timeout: float | None = None) -> bool:
        """True once set (it stays set until :meth:`take`)."""
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        return bool(self._poll.poll(ms))

    def close(self) -> None:
        _close_once(self._box, self._lock)


def _close_once(box: list[int], lock: threading.Lock) -> None:
    with lock:
        fd, box[0] = box[0], -1
    if fd >= 0:
        os.close(fd)


class FdUpcall(EventFd):
    """An upcall that is a write to an eventfd.

    Any callable can be the upcall; this one a vCPU can also raise from native
    code without the GIL, which the request cycle's fast path does (vcpu.py).
    The owner waits for the fd to become readable and takes the count.
    """

    __slots__ = ()

    def __call__(self) -> None:
        self.set()


class NativeUpcall(Protocol):
    """A VM's upcall handler in C: ``ptr`` is a ``struct hsm_native_upcall *``
    (``native/vcpu_cycle.h``), valid while this object lives. A vCPU's
    native request cycle calls its ``post`` under the VM's gate with the request
    it is about to post: the handler dispatches it itself, or leaves it to be
    posted PENDING with the upcall raised, as without a handler."""

    ptr: Any


class Hypercalls(Protocol):
    """What the HSM may call. Every method is synchronous and thread-safe."""

    def set_upcall(self, upcall: Callable[[], None] | None) -> None:
        """Install the HSM's upcall handler (called from vCPU threads)."""

    def create_vm(self, param: bytearray) -> int:
        """HC_CREATE_VM: ``param`` is the 48-byte acrn_vm_creation; writes vmid, vcpu_num."""

    def destroy_vm(self, vmid: int) -> int: ...

    def start_vm(self, vmid: int) -> int: ...

    def pause_vm(self, vmid: int) -> int: ...

    def reset_vm(self, vmid: int) -> int: ...

    def set_vcpu_regs(self, vmid: int, regs: bytes) -> int:
        """``regs`` is the 296-byte acrn_vcpu_regs."""

    def set_ioreq_buffer(self, vmid: int, page: SharedPage) -> int:
        """Adopt the request page; the hypervisor sets all 16 slots FREE."""

    def notify_request_finish(self, vmid: int, vcpu: int) -> int: ...

    def set_native_upcall(self, vmid: int, handler: NativeUpcall | None) -> int:
        """Install a per-VM upcall handler that vCPUs call in C (or None: the upcall)."""
        ...

    def notify_fds(self, vmid: int) -> list[int] | None:
        """Duplicates of the eventfds HC_NOTIFY_REQUEST_FINISH writes, one per vCPU."""
        ...

    def notify_waits(self, vmid: int) -> list[Any] | None:
        """HC_NOTIFY_REQUEST_FINISH's native form (``hsm_vcpu_finish``): each
        vCPU's ``struct hsm_vcpu_wait *`` (the list keeps them alive), or None
        where :meth:`notify_fds` gives none."""
        ...

    def irq_gate(self, vmid: int) -> Any:
        """HC_INJECT_MSI's and HC_SET_IRQLINE's native forms (``hsm_irq_msi``,
        ``hsm_irq_line``): the VM's ``struct hsm_irq_gate *``, or None where interrupts
        to it go through :meth:`inject_msi` and :meth:`set_irqline` only."""
        ...

    def fold_native_irqs(self, vmid: int) -> None:
        """Take in what the VM's native interrupt hypercalls did (its gate's ring)."""
        ...

    def set_memory_regions(self, vmid: int, regions: list[MemoryRegionOp]) -> int: ...

    def inject_msi(self, vmid: int, msi: bytes) -> int:
        """``msi`` is the 16-byte acrn_msi_entry."""

    def set_irqline(self, vmid: int, value: int) -> int:
        """``value``: low 32 bits GSI, high 32 bits op."""

    def vm_intr_monitor(self, vmid: int, page: SharedPage) -> int: ...

    def set_ptdev_intr(self, vmid: int, irq: bytes) -> int: ...

    def reset_ptdev_intr(self, vmid: int, irq: bytes) -> int: ...

    def assign_pcidev(self, vmid: int, dev: bytes) -> int: ...

    def deassign_pcidev(self, vmid: int, dev: bytes) -> int: ...

    def assign_mmiodev(self, vmid: int, dev: bytes) -> int: ...

    def deassign_mmiodev(self, vmid: int, dev: bytes) -> int: ...

    def create_vdev(self, vmid: int, dev: bytes) -> int: ...

    def destroy_vdev(self, vmid: int, dev: bytes) -> int: ...

    def get_cpu_state(self, cmd: int, out: bytearray) -> int:
        """HC_PM_GET_CPU_STATE: fills ``out`` (48 bytes) as ACRN would."""

    def service_vm_offline_cpu(self, lapic_id: int) -> int: ...

    # ACRN's own kernel (the acrn-kernel ABI profile); spec hv A.1.1, A.2.8.
    def setup_sbuf(self, vmid: int, sbuf_id: int, page: SharedPage | None, cpu_id: int = 0xFFFF) -> int:
        """HC_SETUP_SBUF: ``page`` becomes the VM's asyncio or VM event ring."""
        ...

    def asyncio_assign(self, vmid: int, info: bytes) -> int:
        """HC_ASYNCIO_ASSIGN: ``info`` is the 32-byte acrn_asyncio_info."""
        ...

    def asyncio_deassign(self, vmid: int, info: bytes) -> int: ...

    def assign_pio_region(self, vmid: int, region: bytes) -> int:
        """HC_ASSIGN_PIO_REGION: ``region`` is the 12-byte acrn_pio_region."""
        ...

    def deassign_pio_region(self, vmid: int, region: bytes) -> int: ...

    # Not hypercalls: the emulator's own controls, for the daemon and tests.
    def inject(self, vmid: int, vcpu: int, access: Access) -> concurrent.futures.Future[int]:
        """Have a vCPU perform ``access``; the future yields the value a read got."""

    def cpuid(
        self, leaf: int, subleaf: int = 0, vmid: int | None = None
    ) -> tuple[int, int, int, int]:
        """CPUID as a VM sees it (None: the Service VM)."""

    def snapshot(self) -> dict[str, object]:
        """State for ``acrn-hsm-emu status``."""

    def vm_ids(self) -> list[int]:
        """The post-launched VMs that exist (not POWERED_OFF): the HSM's reaper asks."""

    def shutdown(self) -> None:
        """Stop every vCPU thread (daemon exit)."""
