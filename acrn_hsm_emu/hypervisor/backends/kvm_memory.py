"""Guest RAM for the kvm backend: where a SET_MEMSEG range's bytes live in the daemon.

A RAM mapping arrives as (guest PA, the client's memory, a VA there, size).
KVM needs the bytes mapped in *this* process. Three ways, per range of the
client's address space (one ``/proc/PID/maps`` entry at a time):

- **direct**: the client is this process (in-process clients, tests): the VA
  is used as is.
- **shared**: the client maps a file shared (memfd, hugetlbfs, shmem, SysV,
  shared anonymous memory). Its backing file is opened through
  ``/proc/PID/map_files/START-END`` and mapped ``MAP_SHARED`` here at the same
  file offset: guest and client see each other's writes at once.
- **copy**: private memory (``malloc``, ``posix_memalign``: what vm-sample
  uses). There is no way to share it, so it is copied into a daemon-owned
  anonymous region when the VM starts (again at every START_VM). Later writes
  by either side are not seen by the other.

Pieces of the client range that are not mapped at all are left out (guest
accesses there become MMIO requests) and logged.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from acrn_hsm_emu._native import ffi as _ffi
from acrn_hsm_emu._native import lib as _lib

_log = structlog.get_logger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]  # fmt: skip
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_NORESERVE = 0x4000
_MADV_DONTNEED = 4
COPY_CHUNK = 1 << 20  # private memory is copied in 1 MiB chunks; all-zero chunks are skipped
_ZEROS = bytes(COPY_CHUNK)


def host_mmap(length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """``mmap(2)`` at an address of the kernel's choice; OSError on failure."""
    addr = _libc.mmap(None, length, prot, flags, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length:#x} bytes: {os.strerror(err)}")
    return int(addr)


def host_munmap(addr: int, length: int) -> None:
    _libc.munmap(addr, length)


@dataclass(frozen=True, slots=True)
class MapsEntry:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"


def read_maps(pid: int) -> list[MapsEntry]:
    out = []
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = parts[0].split("-")
            out.append(
                MapsEntry(
                    int(lo, 16),
                    int(hi, 16),
                    parts[1],
                    int(parts[2], 16),
                    int(parts[4]),
                    parts[5].rstrip("\n") if len(parts) > 5 else "",
                )
            )
    return out


@dataclass(eq=False)
class HostPiece:
    """A guest-physical range backed by one contiguous host range: one KVM memory slot."""

    gpa: int
    size: int
    addr: int  # where the bytes are in this process
    kind: str  # "direct", "shared" or "copy"
    pid: int  # the client
    client_va: int  # where the bytes are in the client
    readonly: bool
    unmap: tuple[int, int] | None = None  # (address, length) this piece owns
    copied: bool = False  # a copy piece has been filled at least once
    desc: str = ""  # what the client has there (maps path)

    def release(self) -> None:
        if self.unmap is not None:
            host_munmap(*self.unmap)
            self.unmap = None

    def fill(self, interrupted: Callable[[], bool]) -> bool:
        """Copy piece: (re)copy the client's bytes. False if interrupted (or faulted) midway."""
        if self.copied:  # drop what the guest wrote last time: zero pages again
            _libc.madvise(self.addr, self.size, _MADV_DONTNEED)
        self.copied = True
        scratch = bytearray(COPY_CHUNK)
        cbuf = _ffi.from_buffer(scratch)
        src = (ctypes.c_char * COPY_CHUNK).from_buffer(scratch)
        for off in range(0, self.size, COPY_CHUNK):
            if interrupted():
                return False
            n = min(COPY_CHUNK, self.size - off)
            got = _lib.hsm_remote_read(self.pid, self.client_va + off, cbuf, n)
            if got != n:
                _log.error(
                    "kvm.memory_copy_failed",
                    pid=self.pid,
                    client_va=hex(self.client_va + off),
                    gpa=hex(self.gpa + off),
                    error=os.strerror(_ffi.errno or errno.EFAULT),
                )
                return False
            if scratch[:n] != _ZEROS[:n]:
                ctypes.memmove(self.addr + off, src, n)
        return True


def resolve(
    gpa: int, size: int, pid: int, client_va: int, readonly: bool, vmid: int
) -> list[HostPiece]:
    """The host pieces for a RAM mapping of ``size`` bytes at ``client_va`` in ``pid``."""
    if pid == os.getpid():
        return [HostPiece(gpa, size, client_va, "direct", pid, client_va, readonly)]
    try:
        maps = read_maps(pid)
    except OSError as e:
        _log.error("kvm.memory_unreachable", vmid=vmid, pid=pid, error=str(e))
        return []
    pieces: list[HostPiece] = []
    end = client_va + size
    pos = client_va
    for entry in maps:
        if entry.end <= pos:
            continue
        if entry.start >= end:
            break
        if entry.start > pos:
            _log.warning(
                "kvm.memory_hole", vmid=vmid, pid=pid, gpa=hex(gpa + pos - client_va),
                size=hex(entry.start - pos),
            )  # fmt: skip
            pos = entry.start
        lo, hi = pos, min(entry.end, end)
        pgpa = gpa + lo - client_va
        piece = _shared_piece(entry, lo, hi, pgpa, pid, readonly, vmid) if entry.shared else None
        if piece is None:
            piece = _copy_piece(entry, lo, hi, pgpa, pid, readonly)
        pieces.append(piece)
        pos = hi
        if pos >= end:
            break
    if pos < end:
        _log.warning(
            "kvm.memory_hole", vmid=vmid, pid=pid, gpa=hex(gpa + pos - client_va),
            size=hex(end - pos),
        )  # fmt: skip
    return pieces


def _share_failed(e: MapsEntry, pid: int, vmid: int, err: OSError) -> None:
    """The entry's file could not be opened or mapped: the caller copies the bytes instead."""
    _log.warning(
        "kvm.memory_share_failed", vmid=vmid, pid=pid, file=e.path, error=str(err), fallback="copy"
    )


def _shared_piece(
    e: MapsEntry, lo: int, hi: int, gpa: int, pid: int, readonly: bool, vmid: int
) -> HostPiece | None:
    path = f"/proc/{pid}/map_files/{e.start:x}-{e.end:x}"
    writable = e.perms[1] == "w" and not readonly
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as err:
        _share_failed(e, pid, vmid, err)
        return None
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        offset = e.offset + (lo - e.start)
        try:
            addr = host_mmap(hi - lo, prot, mmap.MAP_SHARED, fd, offset)
            unmap = (addr, hi - lo)
        except OSError:  # e.g. hugetlbfs wants huge-page alignment: map the whole entry
            addr = host_mmap(e.end - e.start, prot, mmap.MAP_SHARED, fd, e.offset)
            unmap = (addr, e.end - e.start)
            addr += lo - e.start
    except OSError as err:
        _share_failed(e, pid, vmid, err)
        return None
    finally:
        os.close(fd)
    return HostPiece(
        gpa, hi - lo, addr, "shared", pid, lo, not writable, unmap=unmap, desc=e.path
    )


def _copy_piece(
    e: MapsEntry, lo: int, hi: int, gpa: int, pid: int, readonly: bool
) -> HostPiece:
    size = hi - lo
    addr = host_mmap(
        size,
        mmap.PROT_READ | mmap.PROT_WRITE,
        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
    )
    return HostPiece(
        gpa, size, addr, "copy", pid, lo, readonly, unmap=(addr, size),
        desc=e.path or "[anonymous]",
    )  # fmt: skip

