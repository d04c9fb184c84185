"""CPUID as a VM on the emulated platform sees it, and the HSM's load check.

Only what ACRN userspace and the HSM look at is modelled (spec: hv A.3,
hsm sections 1 and 10):

- basic leaf 0 (highest basic leaf, "GenuineIntel"), leaf 1 ECX bit 31 (the
  "running under a hypervisor" bit, set when the scenario has ACRN), and the
  highest basic leaf 0x16 (base / max / bus MHz derived from the TSC);
- 0x40000000: EAX = 0x40000010, EBX/ECX/EDX = "ACRN";
- 0x40000001: EAX bit 0 (privileged VM) for the Service VM, and only when the
  scenario says it is privileged; 0 for every other VM;
- 0x40000010: EAX = TSC frequency in kHz.

Every leaf without an entry (other leaves of the hypervisor range, leaves past
the basic or extended maximum) answers with the highest basic leaf's data, as
ACRN's ``find_vcpuid_entry`` and Intel's SDM do. Without ACRN the whole
hypervisor range is such a leaf, so the signature is absent.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from acrn_hsm_emu import abi
from acrn_hsm_emu.hypervisor.scenario import Scenario

Regs = tuple[int, int, int, int]

BASIC_MAX_LEAF = 0x16
EXTENDED_MAX_LEAF = 0x80000000  # no extended leaves modelled
HYPERVISOR_MAX_LEAF = abi.ACRN_CPUID_TIMING_LEAF
CPUID1_ECX_HYPERVISOR = 1 << 31
_GENUINE_INTEL = (0x756E6547, 0x6C65746E, 0x49656E69)  # EBX, EDX, ECX: "Genu" "ineI" "ntel"


def cpuid(scenario: Scenario, leaf: int, subleaf: int = 0, *, service_vm: bool = True) -> Regs:
    """CPUID(leaf, subleaf) in the Service VM (``service_vm``) or in another VM."""
    leaf &= 0xFFFFFFFF
    if scenario.acrn and abi.ACRN_CPUID_SIGNATURE_LEAF <= leaf <= HYPERVISOR_MAX_LEAF:
        if leaf == abi.ACRN_CPUID_SIGNATURE_LEAF:
            sig = abi.ACRN_SIGNATURE_REG
            return (HYPERVISOR_MAX_LEAF, sig, sig, sig)
        if leaf == abi.ACRN_CPUID_FEATURES_LEAF:
            privileged = service_vm and scenario.privileged
            return (abi.ACRN_FEATURE_PRIVILEGED_VM if privileged else 0, 0, 0, 0)
        if leaf == abi.ACRN_CPUID_TIMING_LEAF:
            return (scenario.tsc_khz, 0, 0, 0)
        return _basic(scenario, BASIC_MAX_LEAF)  # no entry in the range
    if leaf == EXTENDED_MAX_LEAF:
        return (EXTENDED_MAX_LEAF, 0, 0, 0)
    if leaf > BASIC_MAX_LEAF:  # past the basic or extended maximum
        return _basic(scenario, BASIC_MAX_LEAF)
    return _basic(scenario, leaf)


def _basic(scenario: Scenario, leaf: int) -> Regs:
    if leaf == 0:
        ebx, edx, ecx = _GENUINE_INTEL
        return (BASIC_MAX_LEAF, ebx, ecx, edx)
    if leaf == 1:
        return (0, 0, CPUID1_ECX_HYPERVISOR if scenario.acrn else 0, 0)
    if leaf == BASIC_MAX_LEAF:
        mhz = scenario.tsc_khz // 1000
        return (mhz, mhz, 100, 0)  # base MHz, max MHz, bus MHz
    return (0, 0, 0, 0)


def hsm_init_check(cpuid_fn: Callable[[int, int], Regs]) -> int:
    """What ``hsm_init`` decides: 0, -ENODEV (not ACRN) or -EPERM (not privileged).

    Detection as Linux does it: only when CPUID.1:ECX[31] is set, scan
    0x40000000, 0x40000100, ... for the "ACRNACRNACRN" signature; then the
    privileged bit is read from leaf 0x40000001 at its absolute number.
    ``cpuid_fn(leaf, subleaf)`` is the Service VM's CPUID (e.g. ``Hypervisor.cpuid``).
    """
    if not cpuid_fn(1, 0)[2] & CPUID1_ECX_HYPERVISOR:
        return -errno.ENODEV
    sig = abi.ACRN_SIGNATURE_REG
    for base in range(0x40000000, 0x40010000, 0x100):
        _, ebx, ecx, edx = cpuid_fn(base, 0)
        if (ebx, ecx, edx) == (sig, sig, sig):
            break
    else:
        return -errno.ENODEV
    if not cpuid_fn(abi.ACRN_CPUID_FEATURES_LEAF, 0)[0] & abi.ACRN_FEATURE_PRIVILEGED_VM:
        return -errno.EPERM
    return 0
