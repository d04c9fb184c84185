"""VMs and range clients: the two roles a process can play on the node.

:class:`Vm` is the VM's owner (what acrn-dm is): it creates the VM with a
request page in this process, maps guest memory, sets registers, starts it
and serves the default client. :class:`RangeClient` is a device model in a
process of its own (extension ABI): it binds to an existing VM by vmid and
serves only the ranges it registers. Both serve with
``await x.serve(handler)`` in a trio task; docs/client.md has the details.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

import trio

from acrn_hsm_emu import abi, logs
from acrn_hsm_emu.client import extension as ext
from acrn_hsm_emu.client.ioreq import Handler, RequestPage, Server
from acrn_hsm_emu.client.node import DEFAULT_NODE, NodeFile, Page

log = logs.LibraryLogger("acrn_hsm_emu.client")  # quiet unless the program configures logs


class GuestMemory:
    """Guest RAM: shared memory of this process mapped at ``gpa`` with SET_MEMSEG."""

    def __init__(self, page: Page, gpa: int) -> None:
        self.page = page
        self.gpa = gpa
        self.size = page.size

    @property
    def map(self) -> object:
        return self.page.map

    def _off(self, gpa: int, n: int) -> int:
        off = gpa - self.gpa
        if off < 0 or off + n > self.size:
            raise ValueError(f"{n} bytes at GPA {gpa:#x} are outside this mapping")
        return off

    def write(self, gpa: int, data: bytes) -> None:
        off = self._off(gpa, len(data))
        self.page.map[off : off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        off = self._off(gpa, n)
        return bytes(self.page.map[off : off + n])


def real_mode_regs(
    vcpu_id: int = 0, *, cs: int = 0, ip: int = 0, sp: int = 0, rflags: int = 0x2
) -> abi.AcrnVcpuRegs:
    """Registers of a vCPU that starts in 16-bit real mode at ``cs:ip``."""
    r = abi.AcrnVcpuRegs()
    r.vcpu_id = vcpu_id
    g = r.vcpu_regs
    g.cr0 = 0x10  # ET: protection and paging off
    g.rflags = rflags
    g.rip = ip
    g.cs_sel = cs
    g.cs_base = cs << 4
    g.cs_limit = 0xFFFF
    g.cs_ar = 0x9B  # present, code, readable, accessed
    g.gprs.rsp = sp
    g.gdt.limit = 0xFFFF
    g.idt.limit = 0x3FF  # the real-mode interrupt vector table
    return r


class Vm(Server):
    """A VM created by this process, which owns it (the ACRN userspace role).

    ``Vm.create()`` opens the node, allocates the request page and issues
    CREATE_VM. Closing (or leaving the ``with`` block) destroys the default
    client, pauses and destroys the VM, and closes the file.
    """

    def __init__(self, node: NodeFile, page: Page, creation: abi.AcrnVmCreation) -> None:
        super().__init__()
        self.node = node
        self.requests = RequestPage(page)
        self.vmid = creation.vmid
        self.vcpu_num = creation.vcpu_num
        self.memory: list[GuestMemory] = []
        self._client = False

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str] = DEFAULT_NODE,
        *,
        cpu_affinity: int = 0,
        name: bytes | str = b"",
        vm_flag: int = 0,
    ) -> Vm:
        node = NodeFile(path)
        page = Page()
        try:
            c = node.create_vm(page.addr, cpu_affinity=cpu_affinity, name=name, vm_flag=vm_flag)
        except BaseException:
            node.close()
            page.close()
            raise
        log.debug("client.vm_created", vmid=c.vmid, vcpu_num=c.vcpu_num)
        return cls(node, page, c)

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the VM ---------------------------------------------------------------

    def start(self) -> None:
        self.node.start_vm()

    def pause(self) -> None:
        self.node.pause_vm()

    def reset(self) -> None:
        self.node.reset_vm()

    def set_vcpu_regs(self, regs: abi.AcrnVcpuRegs) -> None:
        self.node.set_vcpu_regs(regs)

    def map_ram(self, gpa: int, size: int, attr: int = abi.ACRN_MEM_ACCESS_RWX) -> GuestMemory:
        """Allocate ``size`` bytes (whole pages) and map them as guest RAM at ``gpa``."""
        page = Page(size)
        m = abi.AcrnVmMemmap(type=abi.ACRN_MEMMAP_RAM, attr=attr, user_vm_pa=gpa, len=page.size)
        m.vma_base = page.addr
        try:
            self.node.set_memseg(m)
        except BaseException:
            page.close()
            raise
        mem = GuestMemory(page, gpa)
        self.memory.append(mem)
        return mem

    def inject_msi(self, addr: int, data: int) -> None:
        self.node.inject_msi(addr, data)

    # -- the default client ------------------------------------------------------

    def create_ioreq_client(self) -> None:
        self.node.create_ioreq_client()
        self._client = True

    def destroy_ioreq_client(self) -> None:
        self.node.destroy_ioreq_client()
        self._client = False

    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The default client's loop (creates the client first if needed); see Server.serve."""
        if not self._client:
            self.create_ioreq_client()
        await super().serve(handler, task_status=task_status)

    # -- teardown -----------------------------------------------------------------

    def close(self) -> None:
        """Destroy the default client (waking a blocked ATTACH), pause and destroy the VM."""
        if self.node.fd < 0:
            return
        try:
            self.node.destroy_ioreq_client()
        except OSError:
            pass
        self._reap_attach()
        for op in (self.node.pause_vm, self.node.destroy_vm):
            try:
                op()
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: no VM any more
                    log.warning("client.vm_teardown_failed", vmid=self.vmid, error=str(e))
        self.node.close()
        self.requests.page.close()
        for m in self.memory:
            m.page.close()
        self.memory = []


class RangeClient(Server):
    """A device model for ranges of a VM another process owns (extension ABI).

    ``RangeClient.open(vmid, name)`` opens the node, binds to the VM (same
    uid as its owner, or root) and creates the named client with a request
    page in this process. Register what it serves with :meth:`add_pio`,
    :meth:`add_mmio`, :meth:`add_pci`, then ``await serve(handler)``.
    Closing destroys the client: requests it still holds are completed
    (reads get all ones) and its ranges go back to the VM's owner.
    """

    def __init__(self, node: NodeFile, page: Page, name: str, bind: ext.AcrnEmuBind) -> None:
        super().__init__()
        self.node = node
        self.requests = RequestPage(page)
        self.name = name
        self.vmid = bind.vmid
        self.vcpu_num = bind.vcpu_num
        self.owner_uid = bind.owner_uid
        self.ranges: list[tuple[int, int, int]] = []

    @classmethod
    def open(
        cls,
        vmid: int,
        name: str,
        path: str | os.PathLike[str] = DEFAULT_NODE,
        ranges: Iterable[tuple[str | int, int, int]] = (),
    ) -> RangeClient:
        node = NodeFile(path)
        page = Page()
        try:
            if node.ext_version() is None:
                raise OSError(errno.ENOTTY, f"{node.path} has no acrn-hsm-emu extension ABI")
            bind = node.bind_vm(vmid)
            node.create_range_client(name, page.addr)
        except BaseException:
            node.close()
            page.close()
            raise
        client = cls(node, page, name, bind)
        try:
            for kind, start, end in ranges:
                client.add_range(kind, start, end)
        except BaseException:
            client.close()
            raise
        log.debug("client.range_client_created", vmid=vmid, name=name, vcpu_num=bind.vcpu_num)
        return client

    def __enter__(self) -> RangeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_range(self, kind: str | int, start: int, end: int) -> None:
        """Add an inclusive range: kind "pio", "mmio" or "pci" (ends from :func:`pci_bdf`)."""
        typ = ext.RANGE_TYPES[kind] if isinstance(kind, str) else kind
        self.node.add_range(typ, start, end)
        self.ranges.append((typ, start, end))

    def del_range(self, kind: str | int, start: int, end: int) -> None:
        typ = ext.RANGE_TYPES[kind] if isinstance(kind, str) else kind
        self.node.del_range(typ, start, end)
        self.ranges.remove((typ, start, end))

    def add_pio(self, start: int, end: int) -> None:
        self.add_range(ext.ACRN_EMU_RANGE_PIO, start, end)

    def add_mmio(self, start: int, end: int) -> None:
        self.add_range(ext.ACRN_EMU_RANGE_MMIO, start, end)

    def add_pci(self, first: tuple[int, int, int], last: tuple[int, int, int] | None = None) -> None:
        """Claim PCI functions ``first``..``last`` (each (bus, dev, func)); config accesses come here."""
        self.add_range(ext.ACRN_EMU_RANGE_PCI, ext.pci_bdf(*first), ext.pci_bdf(*(last or first)))

    def inject_msi(self, addr: int, data: int) -> None:
        self.node.inject_msi(addr, data)

    def close(self) -> None:
        if self.node.fd < 0:
            return
        try:
            self.node.destroy_range_client()
        except OSError:
            pass
        self._reap_attach()
        self.node.close()
        self.requests.page.close()
