"""One open file of ``/dev/acrn_hsm``: every ACRN and extension ioctl, synchronously.

This is the thin layer of the client library: each method is one real
``ioctl(2)`` on the node (``fcntl.ioctl``), with the argument laid out as
``<linux/acrn.h>`` / ``acrn_hsm_emu.h`` say, and an :class:`OSError`
carrying the errno on failure. Nothing here blocks for long except
:meth:`NodeFile.attach_ioreq_client`, which the async layer runs in a worker
thread. Memory the HSM must reach (request pages, guest RAM, the interrupt
monitor page) is anonymous shared memory of this process: :class:`Page`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from typing import Any

from acrn_hsm_emu import abi
from acrn_hsm_emu.client import extension as ext

DEFAULT_NODE = "/dev/acrn_hsm"
PAGE_SIZE = 4096

_U64 = struct.Struct("<Q")
_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc_ioctl.restype = ctypes.c_int


class Page:
    """Page-aligned anonymous shared memory of this process, with its address.

    The HSM reaches it with process_vm_readv/writev, so its address is what
    goes into ioctl arguments (``ioreq_buf``, ``vma_base``, the monitor page).
    """

    def __init__(self, size: int = PAGE_SIZE) -> None:
        size = (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        self.size = size
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._view: Any = (ctypes.c_char * size).from_buffer(self.map)
        self.addr = ctypes.addressof(self._view)

    def close(self) -> None:
        if self._view is not None:
            self._view = None  # releases the buffer export, so the mapping can go
            self.map.close()

    def __len__(self) -> int:
        return self.size


class NodeFile:
    """An open file of the node. Methods raise OSError(errno) as the ioctl failed."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_NODE) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self._value_call: bool | None = None  # the node has VALUE_CALL (asked once)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> NodeFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.fd

    # -- raw ioctl -----------------------------------------------------------

    def ioctl(self, cmd: int, arg: bytes | bytearray | ctypes.Structure | int = 0) -> Any:
        """One ioctl: an int argument is passed as is, any 64-bit value (returns the
        result); a buffer is passed by address and its content after the call is returned."""
        if isinstance(arg, int):
            ret = _libc_ioctl(self.fd, cmd, arg & 0xFFFFFFFFFFFFFFFF)
            if ret < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            return ret
        buf = bytearray(bytes(arg))
        fcntl.ioctl(self.fd, cmd, buf, True)
        return bytes(buf)

    # -- VM life (ACRN) ----------------------------------------------------------

    def create_vm(
        self, ioreq_buf: int, *, cpu_affinity: int = 0, name: bytes | str = b"", vm_flag: int = 0
    ) -> abi.AcrnVmCreation:
        """CREATE_VM; ``name`` goes in the 16-byte uuid field (the hypervisor's VM name)."""
        c = abi.AcrnVmCreation()
        c.ioreq_buf = ioreq_buf
        c.cpu_affinity = cpu_affinity
        c.vm_flag = vm_flag
        raw = name.encode() if isinstance(name, str) else bytes(name)
        if len(raw) > 16:
            raise ValueError("a VM name has at most 16 bytes")
        ctypes.memmove(ctypes.addressof(c) + abi.AcrnVmCreation.uuid.offset, raw, len(raw))
        return abi.AcrnVmCreation.from_buffer_copy(self.ioctl(abi.ACRN_IOCTL_CREATE_VM, c))

    def destroy_vm(self) -> None:
        self.ioctl(abi.ACRN_IOCTL_DESTROY_VM)

    def start_vm(self) -> None:
        self.ioctl(abi.ACRN_IOCTL_START_VM)

    def pause_vm(self) -> None:
        self.ioctl(abi.ACRN_IOCTL_PAUSE_VM)

    def reset_vm(self) -> None:
        self.ioctl(abi.ACRN_IOCTL_RESET_VM)

    def set_vcpu_regs(self, regs: abi.AcrnVcpuRegs) -> None:
        self.ioctl(abi.ACRN_IOCTL_SET_VCPU_REGS, regs)

    def set_memseg(self, memmap: abi.AcrnVmMemmap) -> None:
        self.ioctl(abi.ACRN_IOCTL_SET_MEMSEG, memmap)

    def unset_memseg(self, memmap: abi.AcrnVmMemmap) -> None:
        self.ioctl(abi.ACRN_IOCTL_UNSET_MEMSEG, memmap)

    # -- interrupts, PM, devices (ACRN) -------------------------------------------

    def inject_msi(self, addr: int, data: int) -> None:
        self.ioctl(abi.ACRN_IOCTL_INJECT_MSI, abi.AcrnMsiEntry(addr, data))

    def set_irqline(self, gsi: int, op: int) -> None:
        """SET_IRQLINE passes the value itself, which a FUSE node cannot take (the kernel
        takes it for a pointer: EFAULT): where the node has the extension's VALUE_CALL,
        the call goes by pointer through it; elsewhere (CUSE, the real driver) as it is."""
        value = (op & 0xFFFFFFFF) << 32 | (gsi & 0xFFFFFFFF)
        if self._has_value_call():
            self.value_call(abi.ACRN_IOCTL_SET_IRQLINE, value)
        else:
            self.ioctl(abi.ACRN_IOCTL_SET_IRQLINE, value)

    def vm_intr_monitor(self, page: Page) -> None:
        """VM_INTR_MONITOR: the argument is the page's address; the hypervisor
        reads the command from it and writes its answer into it."""
        self.ioctl(abi.ACRN_IOCTL_VM_INTR_MONITOR, page.addr)

    def pm_get_cpu_state(self, cmd: int) -> bytes:
        """PM_GET_CPU_STATE: 8 bytes for the *_CNT commands, 48 for PX_DATA, 32 for CX_DATA."""
        buf = bytearray(48)
        _U64.pack_into(buf, 0, cmd)
        fcntl.ioctl(self.fd, abi.ACRN_IOCTL_PM_GET_CPU_STATE, buf, True)
        n = {abi.ACRN_PMCMD_GET_PX_DATA: 48, abi.ACRN_PMCMD_GET_CX_DATA: 32}.get(
            cmd & abi.PMCMD_TYPE_MASK, 8
        )
        return bytes(buf[:n])

    def set_ptdev_intr(self, irq: abi.AcrnPtdevIrq) -> None:
        self.ioctl(abi.ACRN_IOCTL_SET_PTDEV_INTR, irq)

    def reset_ptdev_intr(self, irq: abi.AcrnPtdevIrq) -> None:
        self.ioctl(abi.ACRN_IOCTL_RESET_PTDEV_INTR, irq)

    def assign_pcidev(self, dev: abi.AcrnPcidev) -> None:
        self.ioctl(abi.ACRN_IOCTL_ASSIGN_PCIDEV, dev)

    def deassign_pcidev(self, dev: abi.AcrnPcidev) -> None:
        self.ioctl(abi.ACRN_IOCTL_DEASSIGN_PCIDEV, dev)

    def assign_mmiodev(self, dev: abi.AcrnMmiodev) -> None:
        self.ioctl(abi.ACRN_IOCTL_ASSIGN_MMIODEV, dev)

    def deassign_mmiodev(self, dev: abi.AcrnMmiodev) -> None:
        self.ioctl(abi.ACRN_IOCTL_DEASSIGN_MMIODEV, dev)

    def create_vdev(self, dev: abi.AcrnVdev) -> None:
        self.ioctl(abi.ACRN_IOCTL_CREATE_VDEV, dev)

    def destroy_vdev(self, dev: abi.AcrnVdev) -> None:
        self.ioctl(abi.ACRN_IOCTL_DESTROY_VDEV, dev)

    def ioeventfd(
        self, fd: int, addr: int, length: int, *, pio: bool = False,
        datamatch: int | None = None, deassign: bool = False,
    ) -> None:  # fmt: skip
        flags = (abi.ACRN_IOEVENTFD_FLAG_PIO if pio else 0) | (
            abi.ACRN_IOEVENTFD_FLAG_DEASSIGN if deassign else 0
        )
        if datamatch is not None:
            flags |= abi.ACRN_IOEVENTFD_FLAG_DATAMATCH
        arg = abi.AcrnIoeventfd(fd=fd, flags=flags, addr=addr, len=length, data=datamatch or 0)
        self.ioctl(abi.ACRN_IOCTL_IOEVENTFD, arg)

    def irqfd(self, fd: int, msi_addr: int = 0, msi_data: int = 0, *, deassign: bool = False) -> None:
        arg = abi.AcrnIrqfd(fd=fd, flags=abi.ACRN_IRQFD_FLAG_DEASSIGN if deassign else 0)
        arg.msi.msi_addr = msi_addr
        arg.msi.msi_data = msi_data
        self.ioctl(abi.ACRN_IOCTL_IRQFD, arg)

    # -- I/O request clients (ACRN) ------------------------------------------------

    def create_ioreq_client(self) -> None:
        self.ioctl(abi.ACRN_IOCTL_CREATE_IOREQ_CLIENT)

    def attach_ioreq_client(self) -> None:
        """Blocks until a request waits for this file's client; ENODEV once it is gone."""
        self.ioctl(abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT)

    def notify_request_finish(self, vcpu: int, vmid: int = 0) -> None:
        self.ioctl(abi.ACRN_IOCTL_NOTIFY_REQUEST_FINISH, abi.AcrnIoreqNotify(vmid=vmid, vcpu=vcpu))

    def destroy_ioreq_client(self) -> None:
        self.ioctl(abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT)

    def clear_vm_ioreq(self) -> None:
        self.ioctl(abi.ACRN_IOCTL_CLEAR_VM_IOREQ)

    # -- extension ------------------------------------------------------------------

    def ext_version(self) -> ext.AcrnEmuVersion | None:
        """The extension's version, or None on a node without it (a real kernel)."""
        try:
            out = self.ioctl(ext.ACRN_EMU_IOCTL_VERSION, ext.AcrnEmuVersion())
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL):
                return None
            raise
        return ext.AcrnEmuVersion.from_buffer_copy(out)

    def value_call(self, cmd: int, arg: int) -> int:
        """ACRN_EMU_IOCTL_VALUE_CALL: the value-argument ioctl ``cmd`` (ext.VALUE_CALLS)
        made by pointer on this file; its result, or OSError with its errno."""
        vc = ext.AcrnEmuValueCall(cmd=cmd, arg=arg & 0xFFFFFFFFFFFFFFFF)
        result = ext.AcrnEmuValueCall.from_buffer_copy(self.ioctl(ext.ACRN_EMU_IOCTL_VALUE_CALL, vc)).result
        if result < 0:
            raise OSError(-result, os.strerror(-result))
        return int(result)

    def _has_value_call(self) -> bool:
        if self._value_call is None:
            v = self.ext_version()
            self._value_call = v is not None and bool(v.features & ext.ACRN_EMU_FEATURE_VALUE_CALL)
        return self._value_call

    def bind_vm(self, vmid: int) -> ext.AcrnEmuBind:
        out = self.ioctl(ext.ACRN_EMU_IOCTL_BIND_VM, ext.AcrnEmuBind(vmid=vmid))
        return ext.AcrnEmuBind.from_buffer_copy(out)

    def create_range_client(self, name: str, ioreq_buf: int) -> None:
        raw = name.encode()
        if not 1 <= len(raw) < ext.ACRN_EMU_NAME_LEN:
            raise ValueError(f"a range client name has 1..{ext.ACRN_EMU_NAME_LEN - 1} bytes")
        self.ioctl(
            ext.ACRN_EMU_IOCTL_CREATE_RANGE_CLIENT,
            ext.AcrnEmuRangeClient(name=raw, ioreq_buf=ioreq_buf),
        )

    def destroy_range_client(self) -> None:
        self.ioctl(ext.ACRN_EMU_IOCTL_DESTROY_RANGE_CLIENT)

    def add_range(self, type: int, start: int, end: int) -> None:
        self.ioctl(ext.ACRN_EMU_IOCTL_ADD_RANGE, ext.AcrnEmuRange(type=type, start=start, end=end))

    def del_range(self, type: int, start: int, end: int) -> None:
        self.ioctl(ext.ACRN_EMU_IOCTL_DEL_RANGE, ext.AcrnEmuRange(type=type, start=start, end=end))
