"""Human renderings of trace records and of ``status`` (the CLI's side; docs/observability.md)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

# argument fields shown in hex (addresses, masks, raw values)
_HEX = {
    "addr", "ioreq_buf", "user_vm_pa", "vma_base", "msi_addr", "msi_data", "page", "cpu_affinity",
    "reserved", "arg", "len", "data", "vm_flag", "attr", "flags", "result",
}  # fmt: skip


def _clock(t: float | None) -> str:
    if t is None:
        return " " * 15
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1e6):06d}"


def _arg(k: str, v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and k in _HEX:
        return f"{k}={v:#x}"
    return f"{k}={v}"


def access(kind: str | None, write: bool | None, addr: int | None, size: int | None) -> str:
    """``pio read 0x3f8/1``."""
    if kind is None:
        return "request (dispatched before the trace started)"
    rw = "write" if write else "read"
    return f"{kind} {rw} {addr:#x}/{size}" if addr is not None else f"{kind} {rw}"


def record(rec: dict[str, Any]) -> str:
    """One trace record as a line."""
    kind = rec.get("type")
    clock = _clock(rec.get("t"))
    if kind == "ioctl":
        head = [rec["ioctl"]]
        if rec.get("vm") is not None:
            head.append(f"vm={rec['vm']}")
        args = dict(rec.get("args") or {})
        args.pop("vmid", None)
        if "vcpu" in args:
            head.append(f"vcpu={args.pop('vcpu')}")
        if rec.get("reason"):
            args.pop("reserved", None)  # the reason names it
        head += [_arg(k, v) for k, v in args.items()]
        result = rec.get("result")
        if rec.get("error"):
            answer = f"{rec.get('errno')}: {rec['reason']}" if rec.get("reason") else f"{rec.get('errno')}"
        else:
            answer = str(result)
            out = rec.get("out") or {}
            if out:
                answer += " " + " ".join(_arg(k, v) for k, v in out.items())
        pid = f"  [pid {rec['pid']}]" if rec.get("pid") else ""
        path = " (express)" if rec.get("path") == "express" else ""
        return f"{clock}  ioctl  {' '.join(head)} -> {answer}{path}{pid}"
    if kind == "request":
        where = f"vm={rec.get('vm')} vcpu={rec.get('vcpu')}"
        what = access(rec.get("kind"), rec.get("write"), rec.get("addr"), rec.get("size"))
        if rec.get("write") and rec.get("value") is not None:
            what += f" = {rec['value']:#x}"
        client = rec.get("client") or "?"
        lat = rec.get("latency_us")
        took = f" in {lat:g} us" if lat is not None else ""
        outcome = rec.get("outcome")
        if outcome == "completed":
            if rec.get("write") is False and rec.get("answer") is not None:
                result = f"{client} answered {rec['answer']:#x}{took}"
            else:
                result = f"{client} done{took}"
        else:
            result = f"{outcome} ({client}){took}"
        path = " (express)" if rec.get("path") == "express" else ""
        return f"{clock}  req    {where} {what} -> {result}{path}"
    if kind == "lost":
        where = f" ({rec['where']})" if rec.get("where") else ""
        return f"{clock}  lost   {rec.get('count')} record(s){where}: the reader fell behind"
    return f"{clock}  {rec}"


# -- status ---------------------------------------------------------------------------------

# Each per-VM request counter and what it counts (docs/observability.md#status).
COUNTERS: dict[str, str] = {
    "pio": "port I/O requests seen (CF8/CFC included)",
    "mmio": "MMIO requests seen",
    "pci": "PCI configuration requests (CF8/CFC folded)",
    "other": "requests of another type",
    "default": "handed to the default client (the device model)",
    "range": "handed to a range client (in the daemon or another process)",
    "in_kernel": "answered by an in-daemon client (ioeventfd)",
    "remote": "handed to a range client in another process",
    "orphaned": "completed for a range client that went away (reads: all ones)",
    "cf8": "answered by the HSM itself (CF8, CFC with CF8 disabled)",
    "cleared": "completed by CLEAR_VM_IOREQ",
    "stalled": "passes that found a request and no client (it waits)",
    "notified": "NOTIFY_REQUEST_FINISH calls that completed a request",
    "notify_failed": "notify hypercalls that failed (the vCPU was not resumed)",
}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    out = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for r in cells:
        out.append(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return out


def _age(s: float) -> str:
    if s < 1:
        return "<1s"
    if s < 120:
        return f"{s:.0f}s"
    return f"{s / 60:.0f}m"


def _ranges(ranges: list[dict[str, Any]]) -> str:
    if not ranges:
        return "-"
    return ", ".join(f"{r['kind']} {r['start']:#x}-{r['end']:#x}" for r in ranges)


def _bits(mask: int) -> str:
    return ",".join(str(i) for i in range(64) if mask >> i & 1) or "-"


def status(st: dict[str, Any]) -> str:
    """``acrn-hsm-emu status``: tables, hex addresses, each VM's pending requests with their age."""
    hsm = st["hsm"]
    hv = st["hypervisor"]
    m = st.get("metrics")
    obs = st.get("observers") or {}
    lines = [
        f"daemon pid {st['pid']}  node {st['node']} ({st['transport']})  backend {st['backend']}  "
        f"abi {st.get('abi')}",
        f"control {st.get('control')}",
        "metrics " + (f"http://{m['address']}:{m['port']}/metrics" if m else "off")
        + f"  tracers {obs.get('tracers', 0)}  event listeners {obs.get('event_listeners', 0)}",
        f"open files {hsm['open_files']} ({hsm.get('files_with_vm', 0)} with a VM)  "
        f"upcalls {hsm['upcalls']}  dispatch passes {hsm['dispatch_passes']}",
        "",
    ]
    hv_vms = {v.get("vmid"): v for v in hv.get("vms", [])}
    vms = hsm["vms"]
    if not vms:
        lines.append("no VMs")
        return "\n".join(lines + _recordings(hv))
    rows = []
    for vm in vms:
        c = vm.get("counters") or {}
        page = vm.get("request_page")
        rows.append([
            vm.get("vmid") if vm.get("vmid") != 0xFFFF else f"(lost {vm.get('lost_vmid')})",
            vm.get("state") or "-", vm.get("vcpu_num"), vm.get("owner_pid") or "-",
            f"{page:#x}" if page is not None else "-",
            ",".join(cl["name"] for cl in vm.get("clients", [])) or "-",
            c.get("pio", 0) + c.get("mmio", 0) + c.get("pci", 0) + c.get("other", 0),
            "express" if vm.get("express") else "python",
            "yes" if vm.get("orphaned") else "no",
        ])  # fmt: skip
    lines += table(["VM", "STATE", "VCPUS", "OWNER PID", "REQUEST PAGE", "CLIENTS", "REQUESTS", "PATH",
                    "ORPHANED"], rows, indent="")  # fmt: skip
    for vm in vms:
        vmid = vm.get("vmid")
        lines += ["", f"VM {vmid}" + (f": failed: {vm['failed']}" if vm.get("failed") else "")]
        crows = [[cl["name"], "default" if cl.get("default") else "in-daemon" if cl.get("in_daemon")
                  else "range", _ranges(cl.get("ranges", [])), _bits(int(cl.get("pending", 0))),
                  cl.get("waiters", 0)] for cl in vm.get("clients", [])]  # fmt: skip
        if crows:
            lines += ["  clients"] + table(["NAME", "KIND", "RANGES", "HOLDS VCPUS", "WAITING"], crows, "    ")
        vcpus = (hv_vms.get(vmid) or {}).get("vcpus") or []
        if vcpus:
            vrows = []
            for v in vcpus:
                cyc = v.get("cycle") or {}
                vrows.append([v.get("id"), v.get("state"), v.get("requests"),
                              f"{cyc['p50_us']:.1f}" if "p50_us" in cyc else "-",
                              f"{cyc['p99_us']:.1f}" if "p99_us" in cyc else "-",
                              v.get("completions_polled", 0)])  # fmt: skip
            lines += ["  vCPUs"] + table(["VCPU", "STATE", "REQUESTS", "CYCLE P50 US", "P99 US", "POLLED"],
                                         vrows, "    ")  # fmt: skip
        pend = [p for p in st.get("pending") or [] if p.get("vmid") == vmid]
        if pend:
            prows = [[p["vcpu"], p["state"], access(p["kind"], p["write"], p["addr"], p["size"])
                      + (f" = {p['value']:#x}" if p.get("value") is not None else ""),
                      p.get("client") or ("(kernel handled)" if p.get("kernel_handled") else "-"),
                      _age(p["age_s"])] for p in pend]  # fmt: skip
            lines += ["  pending requests (age: since the daemon first saw it, to the second)"]
            lines += table(["VCPU", "STATE", "REQUEST", "CLIENT", "AGE"], prows, "    ")
        else:
            lines.append("  pending requests: none")
        c = vm.get("counters") or {}
        lines += ["  request counters"] + table(
            ["COUNTER", "VALUE", "COUNTS"], [[k, c.get(k, 0), v] for k, v in COUNTERS.items()], "    "
        )
    return "\n".join(lines + _recordings(hv))


def _recordings(hv: dict[str, Any]) -> list[str]:
    """``acrn-hsm-emu record``'s recordings and the scripted backend's replay (docs/record-replay.md)."""
    lines: list[str] = []
    for r in hv.get("recordings") or ():
        reason = f" ({r['reason']})" if r["reason"] else ""
        lines.append(f"record VM {r['vm']}: {r['state']}{reason}, {r['accesses']} accesses, {r['runs']} run(s)")
    if hv.get("replay"):
        from acrn_hsm_emu import recording

        lines += recording.replay_report(hv["replay"], "the workload")[0]
    return ([""] if lines else []) + lines
