"""vCPUs: one OS thread each, one I/O request outstanding at a time.

The request path (spec: hv A.2.3 - A.2.6): the vCPU fills its private
``acrn_io_request`` image (type + the 64-byte ``reqs`` union, which keeps
leftovers of earlier requests exactly as ACRN's per-vCPU buffer does), then
writes it into its slot and stores PENDING with a single ``write_then``
(fields land before the state word), raises the upcall, and waits: for the
latched notify event in notification mode, or polling the slot for COMPLETE
in polling mode. Then it post-processes (PIO/PCICFG: u32 under the width mask,
MMIO: the u64) and stores FREE. If the VM was paused meanwhile the result is
dropped and the slot just set FREE.

Accesses the hypervisor answers itself (CF8 reads, vPIC, vIOAPIC, ... see
``Vm.hv_pio``) never reach the slot. A MemoryFault on the page (the client
died) stops the VM's vCPUs (``Vm.report_fault``); a vCPU waiting for a notify
re-reads its state word now and then, only so that it notices such a fault.

In notification mode, with the page in another process and an eventfd upcall
(the daemon's case), the cycle from PENDING to FREE is one native call made
without the GIL (``hsm_slot_cycle``): the VM's gate stands in for its lock,
eventfds for the upcall and the notify. The Python path below does the same
steps for polling mode and in-process pages.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog

from acrn_hsm_emu import abi
from acrn_hsm_emu import acrn_kernel_abi as ak
from acrn_hsm_emu._native import ffi as _ffi
from acrn_hsm_emu._native import lib as _lib
from acrn_hsm_emu.hypervisor.api import Access, EventFd, FdUpcall, NativeUpcall
from acrn_hsm_emu.hypervisor.backends.base import Regs, VcpuBackend
from acrn_hsm_emu.hypervisor.record import Recorder
from acrn_hsm_emu.hypervisor.vm import (
    PCI_CONFIG_ADDR,
    PCI_CONFIG_DATA,
    VIOAPIC_BASE,
    VIOAPIC_END,
    AsyncioDesc,
    Vm,
    VmState,
)
from acrn_hsm_emu.hypervisor.workload import pci_reg
from acrn_hsm_emu.memory import MemoryFault, RemoteMemory, SharedPage

_log = structlog.get_logger(__name__)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_REQ_HEAD = struct.Struct("<I4xQQ")  # reqs: direction, reserved, address, size

_SLOT = abi.IOREQ_SLOT_SIZE
_HEAD_LEN = abi.SLOT_REQS + 64  # type .. end of the reqs union: what one request writes
_OFF_POLLING = abi.SLOT_COMPLETION_POLLING
_OFF_REQS = abi.SLOT_REQS
_OFF_VALUE = abi.SLOT_VALUE
_OFF_STATE = abi.SLOT_PROCESSED
_VALUE_TO_STATE = _OFF_STATE + 4 - _OFF_VALUE  # one read gets the value and the state

_PORTIO = abi.ACRN_IOREQ_TYPE_PORTIO
_MMIO = abi.ACRN_IOREQ_TYPE_MMIO
_COMPLETE = abi.ACRN_IOREQ_STATE_COMPLETE
_FREE = abi.ACRN_IOREQ_STATE_FREE
_PENDING_BYTES = _U32.pack(abi.ACRN_IOREQ_STATE_PENDING)

_RUNNING = VmState.RUNNING
_PAUSED = VmState.PAUSED

_PROBE_S = 0.5  # a long wait re-reads the page so a dead client is noticed (no completion)
_SPINS = 64  # polling mode: sched_yield-like turns before backing off
_POLL_MAX_S = 0.001


_SC_STEP = {
    _lib.HSM_SC_POST: "post",
    _lib.HSM_SC_PROBE: "probe",
    _lib.HSM_SC_READ: "read",
    _lib.HSM_SC_FREE: "free",
}



def _name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` (15 bytes at most) where ``top -H``,
    ``perf`` and ``taskset`` see it; Python's thread names stay in Python."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass  # no /proc: the name is cosmetic

class CycleRing:
    """The last ``size`` request cycle times in ns, for benchmarks and status.

    A fixed ring (``struct hsm_ring``): recording is one store, whatever the run
    length, from Python or from the native loop, the vCPU thread being the only
    writer.
    """

    __slots__ = ("ring", "_buf")

    def __init__(self, size: int = 1 << 13) -> None:
        # 8,192 cycles: seconds of traffic per vCPU, and a summary (a sort) of ~1 ms
        # for `status`, which runs on the trio thread
        self._buf = _ffi.new("uint64_t[]", size)
        self.ring = _ffi.new("struct hsm_ring *")
        self.ring.buf = self._buf
        self.ring.size = size

    @property
    def n(self) -> int:
        return int(self.ring.n)

    def add(self, ns: int) -> None:
        r = self.ring
        n = r.n
        self._buf[n % r.size] = ns
        r.n = n + 1

    def clear(self) -> None:
        self.ring.n = 0

    def summary(self) -> dict[str, float]:
        """count (all time), and p50/p99/mean in microseconds over the ring."""
        n = self.n
        k = min(n, self.ring.size)
        if k == 0:
            return {"count": 0}
        data = sorted(_ffi.unpack(self._buf, k))
        return {
            "count": n,
            "p50_us": data[k // 2] / 1000,
            "p99_us": data[min(k - 1, (k * 99) // 100)] / 1000,
            "mean_us": sum(data) / k / 1000,
        }


@dataclass(frozen=True, slots=True)
class NativeCycle:
    """What a backend's native loop needs to do the request cycle itself
    (``hsm_kvm_loop``): this vCPU's wait state, its VM's gate, the upcall (kept
    referenced for the fd's sake), and what the hypervisor answers itself: ports
    in the ``skip_ports`` bitmap and MMIO in ``[mmio_lo, mmio_hi)`` stay with Python.
    """

    wait: Any
    gate: Any
    upcall: FdUpcall
    native_upcall: NativeUpcall | None  # kept referenced while native code uses its ptr
    skip_ports: Any
    mmio_lo: int
    mmio_hi: int

    @property
    def upcall_ptr(self) -> Any:
        """The native upcall handler for C (``struct hsm_native_upcall *``), or NULL."""
        return _ffi.NULL if self.native_upcall is None else self.native_upcall.ptr


class AccessAborted(Exception):
    """An access that did not complete: the VM was paused, reset or destroyed, or faulted."""


class _Abort(Exception):
    """Internal: leave the current access (reason in args[0]); ``posted``: its request
    had reached the slot (or the HSM) already."""

    def __init__(self, reason: str, posted: bool = False) -> None:
        super().__init__(reason)
        self.posted = posted


class Vcpu:
    """One vCPU of a post-launched VM; also the backend's :class:`VcpuHost`."""

    def __init__(self, vm: Vm, vcpu_id: int, pcpu: int, backend: VcpuBackend) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.pcpu = pcpu
        self.backend = backend
        self.state = "init"
        # counters (written by this vCPU's thread only)
        # accesses: guest I/O accesses performed (a PCI access counts once); requests:
        # ioreqs posted to the Service VM (PCI: CF8 + CFC). Python's counts here,
        # native code's in _native; the properties add them up.
        self._accesses = 0
        self._requests = 0
        self.hv_handled = 0  # answered by the hypervisor itself
        self.cpuid_count = 0
        self.mismatches = 0
        self.cycles = CycleRing()  # request cycle times: PENDING written -> slot FREE
        self.injected = 0
        self.asyncio = 0  # accesses pushed into the asyncio ring instead of sent
        self.triple_faults = 0
        # record.Recorder while this VM is recorded (record.py): the only thing vCPU
        # threads look at for it, once per access and per native-loop entry
        self.recorder: Recorder | None = None
        self._wake = EventFd()  # notify, kicks and control changes all set it; closed at thread end
        self._native = _ffi.new("struct hsm_vcpu_wait *")  # hsm_slot_cycle's view
        self._native.probe_ms = int(_PROBE_S * 1000)
        self._value = _ffi.new("uint64_t *")
        self._stop = False
        self._reset_gen = 0  # bumped by RESET_VM; the thread rewinds its backend
        self._applied_gen = 0
        self._queue: collections.deque[tuple[Access, concurrent.futures.Future[int]]] = (
            collections.deque()
        )
        self._page: SharedPage | None = None
        self._off = vcpu_id * _SLOT
        self._head = bytearray(_HEAD_LEN)  # private acrn_io_request: type .. reqs
        self._head_c = _ffi.from_buffer(self._head)
        self._native.head = self._head_c
        self._native.ring = self.cycles.ring
        self._thread = threading.Thread(
            target=self._main, name=f"vm{vm.vmid}-vcpu{vcpu_id}", daemon=True
        )

    # ----- control, from any thread -------------------------------------------------

    @property
    def vmid(self) -> int:
        return self.vm.vmid

    @property
    def lapic_id(self) -> int:
        """ACRN gives a vCPU the LAPIC id of the pCPU it runs on."""
        ids = self.vm.lapic_ids
        return ids[self.vcpu_id] if self.vcpu_id < len(ids) else self.vcpu_id

    @property
    def accesses(self) -> int:
        return self._accesses + int(self._native.accesses)

    @property
    def requests(self) -> int:
        return self._requests + int(self._native.requests)

    def start_thread(self) -> None:
        self._thread.start()

    @property
    def native_wait(self) -> Any:
        """hsm_slot_cycle's ``struct hsm_vcpu_wait *`` (owning: alive while referenced),
        for HC_NOTIFY_REQUEST_FINISH's native form (``hsm_vcpu_finish``)."""
        return self._native

    @property
    def wake_fd(self) -> int:
        """The completion eventfd :meth:`notify` writes (-1 once the thread ended)."""
        return self._wake.fd

    def notify(self) -> None:
        """HC_NOTIFY_REQUEST_FINISH: latch the completion event."""
        self._rouse()

    def kick(self) -> None:
        """Make the thread look at the VM state again (pause, start, inject, fault)."""
        self._rouse()
        self.backend.kick()

    def _rouse(self) -> None:
        """Wake the thread's wait, wherever it waits: in Python (the eventfd) or in
        ``hsm_slot_cycle`` (its futex; no system call unless it sleeps there)."""
        self._wake.set()
        _lib.hsm_vcpu_wake(self._native)

    def reset(self) -> None:
        """RESET_VM (VM paused, ``vm.lock`` held): abandon any wait and rewind the
        backend before the next start. Then call :meth:`fail_queued` (without the lock:
        a future's callbacks run right there)."""
        self._reset_gen += 1
        _lib.hsm_vcpu_abandon(self._native, 0)
        self.kick()

    def stop(self) -> None:
        self._stop = True
        _lib.hsm_vcpu_abandon(self._native, 1)
        self.kick()

    def join(self, timeout: float) -> bool:
        """Wait at most ``timeout`` for a stopped thread; True if it ended."""
        if self._thread.ident is None:
            self._wake.close()  # never started: nothing will wait on it
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def inject(self, access: Access, future: concurrent.futures.Future[int]) -> None:
        self._queue.append((access, future))
        self.kick()

    # ----- VcpuHost, for the backend (vCPU thread) --------------------------------

    @property
    def interrupted(self) -> bool:
        return (
            self._stop
            or self.vm.state != _RUNNING
            or bool(self._queue)
            or self._reset_gen != self._applied_gen
            or self.vm.fault is not None
        )

    def cpuid(self, leaf: int, subleaf: int) -> Regs:
        self.cpuid_count += 1
        return self.vm.cpuid(leaf, subleaf)

    def native_cycle(self) -> NativeCycle | None:
        """The native request cycle, if it applies now: notification mode, the
        page in a client process, an eventfd upcall (the daemon's case). Not while
        the VM is recorded: a backend's native loop would complete requests unseen."""
        if self.recorder is not None:
            return None
        return self._native_cycle()

    def _native_cycle(self) -> NativeCycle | None:
        vm = self.vm
        page = vm.page
        if page is None or vm.polling or type(page.memory) is not RemoteMemory:
            return None
        if vm.has_asyncio_mmio():
            return None  # the native loops do not look for asyncio descriptors
        upcall = vm.get_upcall()
        if type(upcall) is not FdUpcall:
            return None
        if page is not self._page and not self._adopt_native(page):
            return None
        return NativeCycle(
            self._native, vm.gate, upcall, vm.native_upcall, vm.skip_ports, VIOAPIC_BASE, VIOAPIC_END
        )

    def sleep_until(self, deadline: float) -> bool:
        ev = self._wake
        while not self.interrupted:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            ev.wait(remaining)
            ev.take()  # every waker also changed a flag `interrupted` looks at
        return False

    def cpuid_model(self, leaf: int, subleaf: int) -> Regs:
        return self.vm.cpuid(leaf, subleaf)

    def guest_stop(self, event: str, **details: object) -> None:
        """Pause the VM because of its guest (shutdown, triple fault, unrunnable state)."""
        vm = self.vm
        with vm.lock:
            if vm.state != _RUNNING:
                return
            # logged before the state changes: whoever sees PAUSED finds the reason
            _log.warning(event, vmid=vm.vmid, **details)
            vm.state = _PAUSED
        for v in vm.vcpus:
            v.kick()

    def triple_fault(self, **details: object) -> Access | None:
        """``triple_fault_shutdown_vm`` for a post-launched VM: a VM_EVENT_TRIPLE_FAULT
        (when the device model gave a VM event ring), then a PORTIO write of S5 to
        PM1a_CNT, which the device model takes for a power-off (spec hv A.2.7)."""
        vm = self.vm
        self.triple_faults += 1
        if vm.slot.load_order != "post":  # only post-launched VMs have vCPU threads here
            self.guest_stop("vm.guest_shutdown", vcpu=self.vcpu_id, reason="triple fault", **details)
            return None
        _log.warning(
            "vm.triple_fault",
            vmid=vm.vmid,
            vcpu=self.vcpu_id,
            action=f"VM event, then S5 to PM1a_CNT ({ak.VIRTUAL_PM1A_CNT_ADDR:#x} <- {ak.S5_WRITE:#x})",
            **details,
        )
        vm.send_vm_event(ak.VM_EVENT_TRIPLE_FAULT)
        rec = self.recorder
        if rec is not None:
            rec.triple_fault(self.vcpu_id)
        return Access("pio", True, ak.VIRTUAL_PM1A_CNT_ADDR, 2, ak.S5_WRITE)

    def mismatch(self, what: str, expected: object, got: object) -> None:
        self.mismatches += 1
        _log.warning(
            "workload.mismatch",
            vmid=self.vm.vmid,
            vcpu=self.vcpu_id,
            what=what,
            expected=_hex(expected),
            got=_hex(got),
        )

    # ----- the thread ---------------------------------------------------------------

    def _main(self) -> None:
        _name_os_thread(self._thread.name)
        placement = self.vm.placement
        cpus = placement.host_cpus(self.pcpu)
        self._native.spin_ns = placement.completion_poll_ns
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as e:  # a CPU taken away since the config was checked
            _log.warning("vcpu.placement_failed", vmid=self.vm.vmid, vcpu=self.vcpu_id,
                         cpus=sorted(cpus), error=e.strerror)
        try:
            self._loop()
            self.state = "stopped"
        except Exception:
            self.state = "crashed"
            _log.exception("vcpu.crashed", vmid=self.vm.vmid, vcpu=self.vcpu_id)
        finally:
            self.fail_queued("vCPU stopped")
            try:
                self.backend.close()
            except Exception:
                _log.exception("vcpu.backend_close_failed", vmid=self.vm.vmid, vcpu=self.vcpu_id)
            self._reset_done(self._reset_gen)  # a thread gone holds nobody back
            self._wake.close()

    def _loop(self) -> None:
        ev = self._wake
        vm = self.vm
        while not self._stop:
            if self._applied_gen != self._reset_gen:
                gen = self._applied_gen = self._reset_gen
                self.backend.reset()
                self._reset_done(gen)
            if vm.fault is not None:
                self.state = "faulted"
                self.fail_queued(f"VM faulted: {vm.fault}")
            elif vm.state != _RUNNING:
                self.state = "zombie" if vm.state == _PAUSED else "init"
            elif vm.unreset:
                # RESET_VM is applied by each vCPU's own thread: until all have, none
                # runs guest code (a BSP's start-up IPI must not reach an AP that has
                # yet to rewind). The last one to finish wakes the others.
                self.state = "init"
            elif self._queue:
                try:
                    item = self._queue.popleft()
                except IndexError:  # RESET_VM emptied it meanwhile
                    continue
                self._run_injected(*item)
                continue
            elif self.backend.idle:
                self.state = "idle"
            else:
                self.state = "running"
                access = self.backend.run(self)
                if access is not None:
                    try:
                        if self.recorder is None:
                            value = self._perform(access)
                        else:
                            value = self._perform_recorded(access)
                    except _Abort as e:
                        if e.posted:  # paused/reset/stopped mid-access: no completion
                            self.backend.abandoned()
                        continue
                    except MemoryFault as e:
                        self._fault(e)
                        continue
                    self.backend.complete(value)
                continue
            ev.wait()
            ev.take()  # whoever set it also changed what the loop re-reads

    def _reset_done(self, gen: int) -> None:
        vm = self.vm
        with vm.lock:
            if self._reset_gen != gen:
                return  # reset again meanwhile: the loop applies that one first
            vm.unreset.discard(self.vcpu_id)
            last = not vm.unreset
        if last:
            for v in vm.vcpus:
                v._rouse()

    def _run_injected(self, access: Access, future: concurrent.futures.Future[int]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        self.injected += 1
        try:
            value = self._perform(access) if self.recorder is None else self._perform_recorded(access)
        except _Abort as e:
            future.set_exception(AccessAborted(e.args[0]))
        except MemoryFault as e:
            future.set_exception(e)
            self._fault(e)
        except Exception as e:  # a bug: fail the caller, then let _main log it
            future.set_exception(e)
            raise
        else:
            future.set_result(value)

    def fail_queued(self, reason: str) -> None:
        """Fail the injected accesses not started yet with :class:`AccessAborted`."""
        while self._queue:
            try:
                _, future = self._queue.popleft()
            except IndexError:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(AccessAborted(reason))

    def _fault(self, exc: MemoryFault) -> None:
        self.vm.report_fault(self.vcpu_id, exc)
        self.state = "faulted"

    # ----- one access ---------------------------------------------------------------

    def _perform_recorded(self, access: Access) -> int:
        """:meth:`_perform`, and the access handed to the VM's recorder if it reached the
        HSM: posted (a request counted) or put into the asyncio ring."""
        before = self.requests
        asyncio = self.asyncio
        try:
            value = self._perform(access)
        except _Abort:
            rec = self.recorder
            if rec is not None and self.requests != before:
                rec.access(self.vcpu_id, access, None)  # no answer came back
            raise
        rec = self.recorder
        if rec is not None and (self.requests != before or self.asyncio != asyncio):
            answered = self.asyncio == asyncio and not access.write
            rec.access(self.vcpu_id, access, value if answered else None)
        return value

    def _perform(self, access: Access) -> int:
        kind = access.kind
        if kind == "pio":
            value = self._pio(access.addr, access.size, access.write, access.value)
        elif kind == "mmio":
            value = self._mmio(access.addr, access.size, access.write, access.value)
        else:  # pci, as a guest does it: address to 0xCF8, then the data port
            a = access.addr
            reg = pci_reg(a)
            with self.vm.pci_lock:  # the guest's config lock: one CF8/CFC pair at a time
                self._pio(PCI_CONFIG_ADDR, 4, True, 0x80000000 | (a & 0x0FFFFF00) | (reg & 0xFC))
                value = self._pio(
                    PCI_CONFIG_DATA + (reg & 3), access.size, access.write, access.value
                )
        self._accesses += 1
        return value

    def _pio(self, port: int, size: int, write: bool, value: int) -> int:
        mask = (1 << (8 * size)) - 1
        head = self._head
        _U32.pack_into(head, 0, _PORTIO)
        _REQ_HEAD.pack_into(head, _OFF_REQS, write, port, size)
        if write:
            _U32.pack_into(head, _OFF_VALUE, value & mask)  # OUT: RAX under the width
        vm = self.vm
        if port in vm.hv_ports:
            answer = vm.hv_pio(port, size, write, value)
            if answer is not None:
                if not write:
                    _U32.pack_into(head, _OFF_VALUE, answer)
                self.hv_handled += 1
                return answer
        elif PCI_CONFIG_DATA <= port <= 0xCFF:
            vm.cf8_latch = 0  # the hypervisor drops its latch on every data-port access
        if vm.asyncio_ring is not None:
            stale = _U32.unpack_from(head, _OFF_VALUE)[0]  # the request's value, as ACRN matches it
            desc = vm.asyncio_match(ak.ACRN_ASYNCIO_PIO, port, stale)
            if desc is not None:
                return self._push_asyncio(desc, 0 if write else stale) & mask
        return self._post(write, False) & mask

    def _mmio(self, gpa: int, size: int, write: bool, value: int) -> int:
        mask = (1 << (8 * size)) - 1
        head = self._head
        _U32.pack_into(head, 0, _MMIO)
        _REQ_HEAD.pack_into(head, _OFF_REQS, write, gpa, size)
        if write:
            _U64.pack_into(head, _OFF_VALUE, value & mask)  # emulated before sending
        if VIOAPIC_BASE <= gpa < VIOAPIC_END:
            self.hv_handled += 1
            return self.vm.hv_mmio(gpa, size, write, value)
        vm = self.vm
        if vm.asyncio_ring is not None:
            stale = _U64.unpack_from(head, _OFF_VALUE)[0]
            desc = vm.asyncio_match(ak.ACRN_ASYNCIO_MMIO, gpa, stale)
            if desc is not None:
                return self._push_asyncio(desc, 0 if write else stale) & mask
        return self._post(write, True) & mask

    def _push_asyncio(self, desc: AsyncioDesc, value: int) -> int:
        """``acrn_insert_asyncio``: the access goes into the asyncio ring and the vCPU
        does not wait for it; a read gets the request's stale value (spec hv A.2.8)."""
        if not self.vm.push_asyncio(desc, lambda: self._stop or self.vm.state != _RUNNING):
            raise _Abort("VM not running")
        self.asyncio += 1
        return value

    def _post(self, write: bool, mmio: bool) -> int:
        """Send the private request through the slot and wait for it: the read value."""
        t0 = time.perf_counter_ns()
        value = self._post_wait(write, mmio)
        self.cycles.add(time.perf_counter_ns() - t0)
        return value

    def _post_wait(self, write: bool, mmio: bool) -> int:
        native = self._native_cycle()
        if native is not None:
            return self._post_wait_native(native, write, mmio)
        vm = self.vm
        ev = self._wake
        ev.take()  # before the checks: a stop/reset after them still wakes the wait below
        with vm.lock:  # PAUSE/RESET/DESTROY cannot slip between the check and PENDING
            if vm.state != _RUNNING or self._stop or vm.fault is not None:
                raise _Abort("VM not running")
            page = vm.page
            assert page is not None  # START_VM needs the request buffer
            if page is not self._page:
                self._adopt(page)
            gen = self._reset_gen
            page.write_then(self._off, self._head, self._off + _OFF_STATE, _PENDING_BYTES)
            self.state = "waiting"
        self._requests += 1
        try:
            vm.upcall()
        except Exception:
            _log.exception("vcpu.upcall_failed", vmid=vm.vmid, vcpu=self.vcpu_id)
        off = self._off
        if vm.polling:
            self._poll(page, gen)
            raw = b"" if write else page.read(off + _OFF_VALUE, 8)
        else:
            while True:
                if not ev.wait(_PROBE_S):
                    page.load_u32(off + _OFF_STATE)  # still mapped? faults if the client died
                    continue
                ev.take()
                if self._stop or self._reset_gen != gen:
                    raise _Abort("VM reset" if not self._stop else "vCPU stopped", True)
                raw = page.read(off + _OFF_VALUE, _VALUE_TO_STATE)
                if _U32.unpack_from(raw, _VALUE_TO_STATE - 4)[0] == _COMPLETE:
                    break
        value = 0
        if not write:  # copy back into the private request, as ACRN does
            if mmio:
                self._head[_OFF_VALUE : _OFF_VALUE + 8] = raw[:8]
                value = _U64.unpack_from(raw)[0]
            else:
                self._head[_OFF_VALUE : _OFF_VALUE + 4] = raw[:4]
                value = _U32.unpack_from(raw)[0]
        page.store_u32(off + _OFF_STATE, _FREE)
        self.state = "running"
        if vm.state != _RUNNING:  # zombie vCPU: the slot is only freed
            raise _Abort("VM paused", True)
        return value

    def _post_wait_native(self, native: NativeCycle, write: bool, mmio: bool) -> int:
        """:meth:`_post_wait` in one GIL-free call (notification mode, page in a client)."""
        vm = self.vm
        nat = native.wait
        self.state = "waiting"
        rc = _lib.hsm_slot_cycle(nat, native.gate, native.upcall.fd, native.upcall_ptr,
                                 0 if write else 8 if mmio else 4, self._value)
        if rc != _lib.HSM_SC_DONE:
            self.state = "running"
            if rc == _lib.HSM_SC_CLOSED:
                raise _Abort("VM not running")
            if rc == _lib.HSM_SC_ABANDONED:
                raise _Abort("VM reset" if not self._stop else "vCPU stopped", True)
            err = -rc
            raise MemoryFault(
                err,
                f"request slot {self.vcpu_id} ({_SC_STEP.get(nat.stage, '?')}) at "
                f"{nat.slot:#x} in pid {nat.pid}: {os.strerror(err)}",
            )
        self.state = "running"
        if vm.state != _RUNNING:  # zombie vCPU: the slot was only freed
            raise _Abort("VM paused", True)
        if write:
            return 0
        value: int = self._value[0]
        return value if mmio else value & 0xFFFFFFFF

    def _adopt_native(self, page: SharedPage) -> bool:
        """:meth:`_adopt` for the native cycle; False if the page changed meanwhile."""
        with self.vm.lock:
            if self.vm.page is not page:
                return False
            self._adopt(page)
        assert isinstance(page.memory, RemoteMemory)
        self._native.pid = page.memory.pid
        self._native.slot = page.base + self._off
        return True

    def _poll(self, page: SharedPage, gen: int) -> None:
        load = page.load_u32
        off = self._off + _OFF_STATE
        ev = self._wake
        spins = 0
        while load(off) != _COMPLETE:
            if self._stop or self._reset_gen != gen:
                raise _Abort("VM reset" if not self._stop else "vCPU stopped", True)
            spins += 1
            if spins < _SPINS:
                time.sleep(0)  # give the GIL away: the HSM runs in this process
            else:
                ev.wait(min(_POLL_MAX_S, 1e-5 * (spins - _SPINS + 1)))
                ev.take()

    def _adopt(self, page: SharedPage) -> None:
        """First request on a (new) page: take the slot's reserved words as they are."""
        self._page = page
        self._head[_OFF_POLLING:_OFF_REQS] = page.read(
            self._off + _OFF_POLLING, _OFF_REQS - _OFF_POLLING
        )
        if self.vm.polling:  # set for polling VMs, never cleared otherwise
            _U32.pack_into(self._head, _OFF_POLLING, 1)

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.vcpu_id,
            "pcpu": self.pcpu,
            "host_cpus": sorted(self.vm.placement.host_cpus(self.pcpu)),
            "completions_polled": int(self._native.spin_hits),
            # completions the notify hypercall's native form freed and handed over
            "completions_handed": int(self._native.handoffs),
            "state": "waiting" if self._native.waiting else self.state,
            "accesses": self.accesses,
            "requests": self.requests,
            "hv_handled": self.hv_handled,
            "cpuid": self.cpuid_count,
            "injected": self.injected,
            "asyncio": self.asyncio,
            "triple_faults": self.triple_faults,
            "lapic_id": self.lapic_id,
            "mismatches": self.mismatches,
            "workload_done": self.backend.done,
            "workload": self.backend.position,
            "queued": len(self._queue),
            "cycle": self.cycles.summary(),
        }


def _hex(v: object) -> object:
    return f"{v:#x}" if isinstance(v, int) else v
