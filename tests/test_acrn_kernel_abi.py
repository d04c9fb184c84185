"""The acrn-kernel profile's numbers and layouts (acrn_kernel_abi.py), against
acrn-dm v3.3's ``hsm_ioctl_defs.h`` / ``acrn_common.h`` as read (spec hv B.0)
and, when ``ACRN_DM_SRC`` names an acrn-hypervisor v3.3 tree, compiled against it."""

from __future__ import annotations

import ctypes
import os
import pathlib
import subprocess

import pytest

from acrn_hsm_emu import abi
from acrn_hsm_emu import acrn_kernel_abi as ak


def test_ioctl_numbers() -> None:
    assert ak.ACRN_IOCTL_SETUP_ASYNCIO == 0x4008A290
    assert ak.ACRN_IOCTL_SETUP_VM_EVENT_RING == 0x4008A2A0
    assert ak.ACRN_IOCTL_SETUP_VM_EVENT_FD == 0x4004A2A1
    assert ak.ACRN_IOCTL_ASSIGN_PIO_REGION == 0x400CA25B
    assert ak.ACRN_IOCTL_DEASSIGN_PIO_REGION == 0x400CA25C
    assert not set(ak.IOCTL_NAMES) & set(abi.IOCTL_NAMES)  # none of upstream's numbers


def test_layouts() -> None:
    assert ctypes.sizeof(ak.AcrnPioRegion) == 12
    assert ctypes.sizeof(ak.AcrnAsyncioInfo) == 32
    assert ctypes.sizeof(ak.AcrnSbufParam) == 16
    assert ctypes.sizeof(ak.SharedBufHeader) == ak.SBUF_HEAD_SIZE == 64
    assert ak.SharedBufHeader.head.offset == 16 and ak.SharedBufHeader.tail.offset == 20
    assert ak.SharedBufHeader.size.offset == 36
    assert ctypes.sizeof(ak.VmEvent) == 32
    assert ctypes.sizeof(ak.RtcChangeEventData) == 16
    assert ak.S5_WRITE == 0x3400


REPO = pathlib.Path(__file__).resolve().parent.parent
SRC = os.environ.get("ACRN_DM_SRC")


@pytest.mark.skipif(not SRC, reason="set ACRN_DM_SRC=<acrn-hypervisor v3.3 tree> to compile against its headers")
def test_against_acrn_dm_headers(tmp_path: pathlib.Path) -> None:
    inc = pathlib.Path(SRC or "") / "devicemodel" / "include"
    prog = REPO / "tests" / "clients" / "acrn_dm_sizes.c"
    exe = tmp_path / "sizes"
    subprocess.run(["cc", "-I", str(inc / "public"), "-I", str(inc), "-o", str(exe), str(prog)],
                   check=True, capture_output=True)  # fmt: skip
    got = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    assert got == [
        ak.ACRN_IOCTL_SETUP_ASYNCIO, ak.ACRN_IOCTL_SETUP_VM_EVENT_RING, ak.ACRN_IOCTL_SETUP_VM_EVENT_FD,
        ak.ACRN_IOCTL_ASSIGN_PIO_REGION, ctypes.sizeof(ak.AcrnAsyncioInfo),
        ctypes.sizeof(ak.SharedBufHeader), ctypes.sizeof(ak.VmEvent),
    ]  # fmt: skip
