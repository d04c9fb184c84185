"""Client memory: the one way the HSM and the hypervisor reach a caller's pages.

In the kernel the HSM pins a user page and both the driver and the hypervisor
then touch it directly. In userspace the page stays in the client's address
space: :class:`RemoteMemory` reaches it with process_vm_readv/writev on the
client's process, :class:`LocalMemory` reaches memory of this very process
(Python clients and unit tests). Both raise :class:`MemoryFault` when the
range is not mapped (or not writable, for a write), which the callers turn
into EFAULT. spec: hsm section 13, "Memory".
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from typing import Protocol

from acrn_hsm_emu._native import ffi as _ffi
from acrn_hsm_emu._native import lib as _lib

_U32 = struct.Struct("<I")
PAGE_SIZE = 4096

Data = bytes | bytearray  # what a write takes (a vCPU writes from its own bytearray)


class MemoryFault(OSError):
    """A client address that cannot be read or written."""


class ClientMemory(Protocol):
    """Byte access to one process's address space."""

    pid: int

    def read(self, addr: int, n: int) -> bytes: ...

    def write(self, addr: int, data: Data) -> None: ...

    def write_then(self, addr: int, data: Data, addr2: int, data2: Data) -> None:
        """Write ``data`` then ``data2``, in that order (fields, then a state word)."""
        ...

    def load_u32(self, addr: int) -> int: ...

    def store_u32(self, addr: int, value: int) -> None: ...


class RemoteMemory:
    """Memory of another process, through process_vm_readv/writev.

    Needs ptrace-level access to ``pid`` (same uid and Yama scope 0, or
    CAP_SYS_PTRACE); the daemon runs as root.
    """

    # No scratch buffer is kept: vCPU threads and the trio thread read the same
    # client at once, with the GIL released during the copy.
    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def _fault(self, what: str, addr: int, n: int) -> MemoryFault:
        err = _ffi.errno
        if err == 0:
            err = errno.EFAULT  # short transfer: part of the range is unmapped
        return MemoryFault(err, f"{what} {n} bytes at {addr:#x} in pid {self.pid}: {os.strerror(err)}")

    def read(self, addr: int, n: int) -> bytes:
        buf = _ffi.new("char[]", n)
        if _lib.hsm_remote_read(self.pid, addr, buf, n) != n:
            raise self._fault("read", addr, n)
        data: bytes = _ffi.unpack(buf, n)
        return data

    def write(self, addr: int, data: Data) -> None:
        n = len(data)
        if _lib.hsm_remote_write(self.pid, addr, _ffi.from_buffer(data), n) != n:
            raise self._fault("write", addr, n)

    def write_then(self, addr: int, data: Data, addr2: int, data2: Data) -> None:
        n = len(data) + len(data2)
        d1, d2 = _ffi.from_buffer(data), _ffi.from_buffer(data2)
        if _lib.hsm_remote_write2(self.pid, addr, d1, len(data), addr2, d2, len(data2)) != n:
            raise self._fault("write", addr, n)

    def load_u32(self, addr: int) -> int:
        buf = _ffi.new("uint32_t *")
        if _lib.hsm_remote_read(self.pid, addr, buf, 4) != 4:
            raise self._fault("read", addr, 4)
        return int(buf[0])

    def store_u32(self, addr: int, value: int) -> None:
        self.write(addr, _U32.pack(value))

    def check_writable(self, addr: int, n: int) -> None:
        """Fail as a writable pin of [addr, addr+n) would, without changing it."""
        data = self.read(addr, n)
        self.write(addr, data)


class LocalMemory:
    """Memory of this process: the in-process side for Python clients and tests.

    Addresses are real virtual addresses of this process, so the same numbers
    work for :class:`RemoteMemory` pointed at ``os.getpid()``. Only ranges
    inside buffers registered with :meth:`add` are reachable, which is what
    makes unmapped addresses fault as they would in a real process.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._regions: list[tuple[int, int, memoryview]] = []

    def add(self, buf: mmap.mmap | bytearray) -> int:
        """Make ``buf`` reachable; return its address."""
        view = memoryview(buf)
        c = (ctypes.c_char * len(view)).from_buffer(buf)
        addr = ctypes.addressof(c)
        self._regions.append((addr, len(view), view))
        return addr

    def remove(self, addr: int) -> None:
        self._regions = [r for r in self._regions if r[0] != addr]

    def alloc_page(self, n: int = PAGE_SIZE) -> tuple[mmap.mmap, int]:
        """A fresh zeroed, page-aligned anonymous mapping and its address."""
        m = mmap.mmap(-1, n)
        return m, self.add(m)

    def _view(self, addr: int, n: int) -> memoryview:
        for base, size, view in self._regions:
            if base <= addr and addr + n <= base + size:
                return view[addr - base : addr - base + n]
        raise MemoryFault(errno.EFAULT, f"{n} bytes at {addr:#x} are not mapped")

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self._view(addr, n))

    def write(self, addr: int, data: Data) -> None:
        self._view(addr, len(data))[:] = data

    def write_then(self, addr: int, data: Data, addr2: int, data2: Data) -> None:
        self.write(addr, data)
        self.write(addr2, data2)

    def load_u32(self, addr: int) -> int:
        value: int = _U32.unpack(self._view(addr, 4))[0]
        return value

    def store_u32(self, addr: int, value: int) -> None:
        self._view(addr, 4)[:] = _U32.pack(value)

    def check_writable(self, addr: int, n: int) -> None:
        self._view(addr, n)


class SharedPage:
    """A 4 KiB page in a client's memory that the HSM and the hypervisor share.

    This is what a pinned page's physical address becomes here: the HSM hands
    the hypervisor a SharedPage where the kernel hands it a physical address.
    """

    __slots__ = ("memory", "base")

    def __init__(self, memory: ClientMemory, base: int) -> None:
        self.memory = memory
        self.base = base & ~(PAGE_SIZE - 1)  # the page containing the address

    def read(self, off: int, n: int) -> bytes:
        return self.memory.read(self.base + off, n)

    def write(self, off: int, data: Data) -> None:
        self.memory.write(self.base + off, data)

    def write_then(self, off: int, data: Data, off2: int, data2: Data) -> None:
        self.memory.write_then(self.base + off, data, self.base + off2, data2)

    def load_u32(self, off: int) -> int:
        return self.memory.load_u32(self.base + off)

    def store_u32(self, off: int, value: int) -> None:
        self.memory.store_u32(self.base + off, value)
