"""The _IOC decoding and the CUSE retry decision (CUSE itself cannot run here)."""

from __future__ import annotations

from cdev.device import ArgSpec
from cdev.ioctl import Transfer, ioc_dir, ioc_size, needs_retry, transfer_for


def ioc(d: int, t: int, nr: int, size: int) -> int:
    return (d << 30) | (size << 16) | (t << 8) | nr


def test_decode():
    cmd = ioc(3, 0xA2, 0x10, 48)
    assert ioc_dir(cmd) == 3 and ioc_size(cmd) == 48


def test_transfer_by_direction():
    assert transfer_for(ioc(0, 0xA2, 0x11, 0)) == Transfer(0, 0)
    assert transfer_for(ioc(1, 0xA2, 0x41, 32)) == Transfer(32, 0)
    assert transfer_for(ioc(2, 0xA2, 0x99, 8)) == Transfer(0, 8)
    assert transfer_for(ioc(3, 0xA2, 0x10, 48)) == Transfer(48, 48)


def test_arg_spec_overrides():
    irqline = ioc(1, 0xA2, 0x25, 8)
    assert transfer_for(irqline, ArgSpec(by_value=True)) == Transfer(0, 0)
    pm = ioc(3, 0xA2, 0x60, 8)
    assert transfer_for(pm, ArgSpec(in_size=8, out_size=48)) == Transfer(8, 48)


def test_retry_only_when_data_missing():
    t = Transfer(48, 48)
    assert needs_retry(t, 0, 0)
    assert not needs_retry(t, 48, 48)
    assert not needs_retry(Transfer(0, 0), 0, 0)
    assert needs_retry(Transfer(8, 48), 8, 8)
