"""Every log line's event follows one scheme: ``component.what_happened`` in snake case
(``daemon.serving``, ``cdev.node_ready``, ``hsm.vm_created``, ``hypercall.create_vm.no_slot``).

Found by reading the code (every structlog call whose first argument is a literal), so a new
line that reads like a sentence fails here, not in a user's log filter.
"""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

METHODS = {"debug", "info", "warning", "error", "exception", "critical", "msg"}
SCHEME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")


def logged_events() -> list[tuple[str, str]]:
    out = []
    for path in sorted([*(REPO / "acrn_hsm_emu").rglob("*.py"), *(REPO / "cdev").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
                continue
            target = n.func.value
            name = target.id if isinstance(target, ast.Name) else target.attr if isinstance(
                target, ast.Attribute) else ""
            if name not in ("log", "_log", "logger") and not (
                    isinstance(target, ast.Call) and getattr(target.func, "attr", "") == "get_logger"):
                continue
            args = n.args[1:] if n.func.attr == "log" else n.args if n.func.attr in METHODS else None
            if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                out.append((f"{path.relative_to(REPO)}:{n.lineno}", args[0].value))
    return out


def test_the_code_logs_events():
    assert len(logged_events()) > 140  # the scan still finds them


def test_every_event_is_component_dot_snake_case():
    bad = [f"{where}: {event!r}" for where, event in logged_events() if not SCHEME.fullmatch(event)]
    assert not bad, "\n".join(bad)
