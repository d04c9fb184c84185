"""The hypervisor's own RTC (CMOS ports 0x70/0x71) for RT VMs.

ACRN emulates the RTC in the hypervisor for RT and pre-launched VMs
(``dm/vrtc.c``; a standard post-launched VM's RTC is the device model's). The
time runs from the host's clock plus an offset the guest moves by writing a
time register; each such write of a post-launched VM posts a VM_EVENT_RTC_CHG
with the time before the write and the change (spec hv A.2.8). Register B
chooses BCD or binary and 12 or 24 hours; other CMOS bytes are plain storage.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable

CMOS_ADDR_PORT = 0x70
CMOS_DATA_PORT = 0x71
RTC_SEC, RTC_MIN, RTC_HRS, RTC_WDAY, RTC_DAY, RTC_MONTH, RTC_YEAR = 0, 2, 4, 6, 7, 8, 9
RTC_STATUSA, RTC_STATUSB, RTC_INTR, RTC_STATUSD = 0x0A, 0x0B, 0x0C, 0x0D
RTC_CENTURY = 0x32
TIME_REGISTERS = frozenset({RTC_SEC, RTC_MIN, RTC_HRS, RTC_DAY, RTC_MONTH, RTC_YEAR, RTC_CENTURY})
_CLOCK_REGISTERS = TIME_REGISTERS | {RTC_WDAY}
_REGB_24H = 0x02
_REGB_BINARY = 0x04


def _bcd(v: int) -> int:
    return (v // 10) << 4 | v % 10


def _unbcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


class VRtc:
    """One VM's CMOS/RTC. ``changed(last_time, delta)`` is called for a write
    that moved the clock."""

    def __init__(self, changed: Callable[[int, int], None], clock: Callable[[], float] = time.time) -> None:
        self._changed = changed
        self._clock = clock
        self.offset = 0  # seconds added to the host clock
        self.addr = 0
        self.cmos = bytearray(128)
        self.cmos[RTC_STATUSA] = 0x26
        self.cmos[RTC_STATUSB] = _REGB_24H
        self.cmos[RTC_STATUSD] = 0x80

    def reset(self) -> None:
        self.addr = 0

    def now(self) -> int:
        return int(self._clock()) + self.offset

    def _fields(self, secs: int) -> dict[int, int]:
        tm = time.gmtime(secs)
        return {
            RTC_SEC: tm.tm_sec, RTC_MIN: tm.tm_min, RTC_HRS: tm.tm_hour,
            RTC_WDAY: (tm.tm_wday + 1) % 7 + 1, RTC_DAY: tm.tm_mday, RTC_MONTH: tm.tm_mon,
            RTC_YEAR: tm.tm_year % 100, RTC_CENTURY: tm.tm_year // 100,
        }  # fmt: skip

    def _encode(self, reg: int, value: int) -> int:
        regb = self.cmos[RTC_STATUSB]
        pm = 0
        if reg == RTC_HRS and not regb & _REGB_24H:
            pm = 0x80 if value >= 12 else 0
            value = value % 12 or 12
        return (value if regb & _REGB_BINARY else _bcd(value)) | pm

    def _decode(self, reg: int, raw: int) -> int:
        regb = self.cmos[RTC_STATUSB]
        pm = bool(raw & 0x80) if reg == RTC_HRS and not regb & _REGB_24H else False
        if pm:
            raw &= 0x7F
        value = raw if regb & _REGB_BINARY else _unbcd(raw)
        if reg == RTC_HRS and not regb & _REGB_24H:
            value = value % 12 + (12 if pm else 0)
        return value

    def read(self, port: int) -> int:
        if port == CMOS_ADDR_PORT:
            return self.addr
        reg = self.addr
        if reg in _CLOCK_REGISTERS:
            return self._encode(reg, self._fields(self.now())[reg])
        return self.cmos[reg]

    def write(self, port: int, value: int) -> None:
        value &= 0xFF
        if port == CMOS_ADDR_PORT:
            self.addr = value & 0x7F
            return
        reg = self.addr
        if reg in (RTC_STATUSA, RTC_INTR, RTC_STATUSD):
            return  # ignored, as ACRN does
        if reg not in _CLOCK_REGISTERS:
            self.cmos[reg] = value
            return
        if reg == RTC_WDAY:
            return  # derived from the date here
        current = self.now()
        fields = self._fields(current)
        fields[reg] = self._decode(reg, value & (0x7F if reg == RTC_SEC else 0xFF))
        year = fields[RTC_CENTURY] * 100 + fields[RTC_YEAR]
        try:
            after = calendar.timegm(
                (year, fields[RTC_MONTH], fields[RTC_DAY], fields[RTC_HRS], fields[RTC_MIN],
                 fields[RTC_SEC], 0, 0, 0)
            )  # fmt: skip
        except (ValueError, OverflowError):
            return  # an impossible date: the clock stays where it was
        self.offset += after - current
        self._changed(current, after - current)
