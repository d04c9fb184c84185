"""Record and replay, the parts outside the hypervisor (docs/record-replay.md).

- :func:`control`: the control socket's ``record`` command (start, status, stop);
- :func:`write_workload`, :func:`run_paths`: the recording's files (TOML or JSON,
  the workload format of docs/workload.md, one file per run);
- :class:`ReplayWatch`: ``acrn-hsm-emu replay``'s task in the daemon, which stops
  the device model once the recording has been replayed to its end;
- :func:`replay_report`: the differences and the progress, as the user reads them.
"""

from __future__ import annotations

import json
import pathlib
from typing import TYPE_CHECKING, Any

import structlog
import trio

from acrn_hsm_emu.hypervisor.workload import Workload

if TYPE_CHECKING:
    from acrn_hsm_emu.daemon import Daemon
    from acrn_hsm_emu.hypervisor.hypervisor import Hypervisor

_log = structlog.get_logger("acrn_hsm_emu.record")

_HEX_KEYS = {"port", "addr", "value", "expect", "reg"}
REPLAY_POLL_S = 0.1


def control(hv: Hypervisor, req: dict[str, Any]) -> dict[str, Any]:
    """``{"cmd": "record", "action": "start" | "status" | "stop", "vm": N, "count": N}``.

    start and status answer the recording's summary; stop also ``workloads``, one
    workload structure per run. ValueError for the user (``daemon: ...``)."""
    action = req.get("action")
    vmid = int(req["vm"])
    if action == "start":
        count = req.get("count")
        return hv.record_start(vmid, None if count is None else int(count)).summary()
    if action == "status":
        rec = hv.recording(vmid)
        if rec is None:
            raise ValueError(f"VM {vmid} is not being recorded")
        return rec.summary()
    if action == "stop":
        rec = hv.record_stop(vmid)
        return {**rec.summary(), "workloads": rec.workloads()}
    raise ValueError(f"unknown record action {action!r} (start, status or stop)")


# ----- files ---------------------------------------------------------------------------------


def run_paths(path: str | pathlib.Path, runs: int) -> list[pathlib.Path]:
    """Run 0 goes to ``path``, run N to ``STEM.runN.SUFFIX`` beside it."""
    p = pathlib.Path(path)
    return [p if i == 0 else p.with_name(f"{p.stem}.run{i}{p.suffix}") for i in range(runs)]


def _toml_value(key: str, v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:#x}" if key in _HEX_KEYS else str(v)
    return json.dumps(str(v))  # a TOML basic string: JSON's escapes are TOML's


def to_toml(workload: dict[str, Any], header: str = "") -> str:
    """A workload structure as TOML, one inline table per step."""
    lines = [f"# {line}" for line in header.splitlines()]
    if "name" in workload:
        lines.append(f"name = {_toml_value('name', workload['name'])}")
    for vcpu in workload.get("vcpu", []):
        lines += ["", "[[vcpu]]", f"id = {vcpu['id']}", f"repeat = {vcpu.get('repeat', 1)}", "steps = ["]
        for step in vcpu["steps"]:
            fields = ", ".join(f"{k} = {_toml_value(k, v)}" for k, v in step.items())
            lines.append(f"  {{ {fields} }},")
        lines.append("]")
    return "\n".join(lines) + "\n"


def write_workload(path: pathlib.Path, workload: dict[str, Any], header: str = "") -> None:
    """``.json`` as JSON, anything else as TOML (what :meth:`Workload.load` reads back)."""
    Workload.from_dict(workload, str(path))  # never write what would not load
    if path.suffix == ".json":
        text = json.dumps(workload, indent=1) + "\n"
    else:
        text = to_toml(workload, header)
    path.write_text(text)


# ----- replay ----------------------------------------------------------------------------------


class ReplayWatch:
    """The daemon task of ``acrn-hsm-emu replay``: once every vCPU with a program has
    replayed it to its end, the device model has ``grace`` seconds to end by itself;
    then the daemon stops (and with it the device model, SIGTERM)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.stopped_command = False

    async def __call__(self, daemon: Daemon, scope: trio.CancelScope) -> None:
        since: float | None = None
        while True:
            await trio.sleep(REPLAY_POLL_S)
            summary = daemon.hypervisor.replay_summary()
            if summary is None or not summary["complete"]:
                since = None
                continue
            now = trio.current_time()
            if since is None:
                since = now
            elif now - since >= self.grace:
                _log.info("replay.stopping_command", grace_s=self.grace,
                          differences=summary["differences"])  # fmt: skip
                self.stopped_command = True
                scope.cancel()
                return


def _fmt_value(v: Any) -> str:
    return f"{v:#x}" if isinstance(v, int) else str(v)


def describe_difference(d: dict[str, Any]) -> str:
    rep = f" rep {d['rep']}" if d.get("rep") else ""
    again = f" (pass {d['pass']})" if d.get("pass") else ""
    return (f"VM {d['vm']} vCPU {d['vcpu']} step {d['step']}{rep}{again}: {d['access']}: "
            f"expected {_fmt_value(d['expected'])}, got {_fmt_value(d['got'])}")  # fmt: skip


def describe_progress(p: dict[str, Any]) -> str:
    total = "?" if p["total"] is None else p["total"]
    state = "complete" if p["complete"] else f"INCOMPLETE, stopped at {p['position']}"
    return f"VM {p['vm']} vCPU {p['vcpu']}: {p['replayed']} of {total} accesses replayed, {state}"


def replay_report(summary: dict[str, Any] | None, source: str) -> tuple[list[str], bool]:
    """The report's lines and whether the replay agreed: every access replayed, no
    difference."""
    if summary is None or not summary["vcpus"]:
        return [f"replay of {source}: no VM ran it (did the device model create and start one?)"], False
    lines = [f"replay of {source}:"]
    lines += ["  " + describe_progress(p) for p in summary["vcpus"]]
    lines += ["  difference: " + describe_difference(d) for d in summary["listed"]]
    n = summary["differences"]
    if n > len(summary["listed"]):
        lines.append(f"  ... and {n - len(summary['listed'])} more")
    complete = summary["complete"]
    verdict = f"{n} difference{'s' if n != 1 else ''}" if n else "no differences"
    lines.append(f"replay: {verdict}" + ("" if complete else ", and the replay did not complete"))
    return lines, complete and n == 0
