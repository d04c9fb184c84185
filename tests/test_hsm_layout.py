"""The HSM's modules import each other without a circle, and the VM's data
(hsm/acrn_drv.py, as the driver's acrn_drv.h) imports none of what acts on it."""

from __future__ import annotations

import ast
import pathlib

HSM = pathlib.Path(__file__).resolve().parent.parent / "acrn_hsm_emu" / "hsm"
PACKAGE = "acrn_hsm_emu.hsm"


def hsm_imports(path: pathlib.Path) -> set[str]:
    """The HSM modules ``path`` imports, type-checking imports included."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == PACKAGE:
                out.update(a.name for a in node.names)
            elif node.module.startswith(PACKAGE + "."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[2] for a in node.names if a.name.startswith(PACKAGE + "."))
    return out


def graph() -> dict[str, set[str]]:
    return {p.stem: hsm_imports(p) for p in HSM.glob("*.py") if p.stem != "__init__"}


def test_the_hsm_modules_import_each_other_without_a_circle():
    g = graph()
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        assert m not in path, " -> ".join([*path[path.index(m) :], m])
        if m in done:
            return
        for n in sorted(g.get(m, ())):
            visit(n, [*path, m])
        done.add(m)

    for m in sorted(g):
        visit(m, [])


def test_the_vms_data_imports_none_of_its_behaviours():
    assert hsm_imports(HSM / "acrn_drv.py") <= {"hypercall_log"}
