"""make test-vm: the daemon on Debian's stock kernel (CUSE) under qemu, checked from the host.

Two boots of the same VM (vmtest/vm.py): the CUSE half of the suite with a shell script as
init (vmtest/guest/suite.sh), then the installed service with systemd as PID 1
(vmtest/guest/service.sh, one test per step). Results come back through the shared
folder; a failure shows the guest's own output. Outside tests/, so `make test` never
collects it.
"""

from __future__ import annotations

import pathlib
import re
import xml.etree.ElementTree as ET
from collections import Counter

import pytest

from vmtest import vm

# Wall-time bounds of each boot on a 2-CPU machine under TCG (measured: README, "VM tests").
SYSTEMD_TIMEOUT = 30 * 60
SUITE_TIMEOUT = 80 * 60

SERVICE_STEPS = re.findall(r"^step_(\w+)\(\)", (vm.GUEST / "service.sh").read_text(), re.M)


def _boot(mode: str, timeout: float) -> vm.Boot:
    try:
        return vm.boot(mode, timeout)
    except vm.VmError as e:
        pytest.fail(f"vmtest: {e}", pytrace=False)


def _read(path: pathlib.Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _guest_failed(boot: vm.Boot, what: str) -> None:
    """Fail with why the guest did not report ``what``: timeout, init error or console."""
    why = "timed out and was killed" if boot.timed_out else "powered off"
    init_error = _read(boot.out / "init-error") + _read(boot.out / "error")
    pytest.fail(
        f"the VM {why} after {boot.seconds:.0f} s without reporting {what}\n{init_error}"
        f"--- console (last lines)\n{boot.console_tail()}",
        pytrace=False,
    )


# -- run 2: the service under systemd as PID 1 -------------------------------------------


@pytest.fixture(scope="module")
def systemd_run() -> vm.Boot:
    return _boot("systemd", SYSTEMD_TIMEOUT)


@pytest.mark.parametrize("step", SERVICE_STEPS)
def test_service_step(systemd_run: vm.Boot, step: str) -> None:
    rc_file = systemd_run.out / "steps" / f"{step}.rc"
    if not rc_file.exists():
        _guest_failed(systemd_run, f"step {step}")
    log = _read(systemd_run.out / "steps" / f"{step}.log")
    print(f"\n--- guest step {step}:\n{log}")
    rc = int(rc_file.read_text())
    assert rc == 0, f"step {step} failed in the guest (exit {rc}):\n{log}"


def test_service_scenario_ran_to_its_end(systemd_run: vm.Boot) -> None:
    if not (systemd_run.out / "done").exists():
        _guest_failed(systemd_run, "the end of the scenario")
    print(f"\nsystemd run: {systemd_run.seconds:.0f} s wall\n{_read(systemd_run.out / 'steps.txt')}")


# -- run 1: the CUSE half of the suite ---------------------------------------------------


@pytest.fixture(scope="module")
def suite_run() -> vm.Boot:
    return _boot("suite", SUITE_TIMEOUT)


def test_guest_serves_a_cuse_node(suite_run: vm.Boot) -> None:
    """Before the suite: the daemon on /dev/acrn_hsm is a CUSE character device."""
    rc_file = suite_run.out / "smoke.rc"
    if not rc_file.exists():
        _guest_failed(suite_run, "the CUSE smoke test")
    log = _read(suite_run.out / "smoke.log")
    print(f"\n{_read(suite_run.out / 'env.txt')}--- smoke:\n{log}")
    assert int(rc_file.read_text()) == 0, f"serving /dev/acrn_hsm over CUSE failed:\n{log}"


def _cases(suite_run: vm.Boot) -> list[tuple[str, str]]:
    """(test id, outcome) for each test case of the guest's junit.xml."""
    cases = []
    for case in ET.parse(suite_run.out / "junit.xml").getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
        cases.append((f"{case.get('classname')}::{case.get('name')}", outcome))
    return cases


def test_cuse_suite(suite_run: vm.Boot) -> None:
    rc_file = suite_run.out / "pytest.rc"
    if not rc_file.exists():
        _guest_failed(suite_run, "the suite's result")
    log = _read(suite_run.out / "pytest.log")
    rc = int(rc_file.read_text())
    counts = Counter(o for _, o in _cases(suite_run)) if (suite_run.out / "junit.xml").exists() else {}
    print(f"\nsuite run: {suite_run.seconds:.0f} s wall; guest pytest: "
          + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())))
    summary = log[log.rfind("short test summary info"):] if "short test summary info" in log else log[-3000:]
    assert rc == 0, f"the CUSE half of the suite failed in the guest (pytest exit {rc}):\n{summary}"


def test_suite_ran_over_cuse(suite_run: vm.Boot) -> None:
    """The suite really exercised CUSE: its [cuse] cases ran, its [fuse] ones did not."""
    if not (suite_run.out / "junit.xml").exists():
        _guest_failed(suite_run, "the suite's junit.xml")
    cases = _cases(suite_run)
    cuse = [c for c in cases if re.search(r"\[(.*-)?cuse(-.*)?\]", c[0])]
    fuse = [c for c in cases if re.search(r"\[(.*-)?fuse(-.*)?\]", c[0])]
    print(f"\n[cuse] cases: {Counter(o for _, o in cuse)}; [fuse] cases: {len(fuse)}")
    assert cuse, ("no test case ran with a [cuse] transport parameter: the suite is not "
                  "parametrised by transport (ACRN_HSM_TEST_TRANSPORTS=cuse selected nothing)")
    assert not fuse, f"ACRN_HSM_TEST_TRANSPORTS=cuse still ran [fuse] cases: {fuse[:5]}"
    assert any(o == "passed" for _, o in cuse), f"no [cuse] case passed: {cuse[:10]}"
