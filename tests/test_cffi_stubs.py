"""The type stubs of the cffi modules (cdev/_fuse.pyi, acrn_hsm_emu/_native.pyi,
acrn_hsm_emu/_launcher.pyi), which mypy checks the code against, against what
the modules bind: every function (with its number of arguments) and constant,
and nothing else."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def stub_surface(path: pathlib.Path) -> dict[str, int | None]:
    """The stub's ``_Lib``: name -> number of arguments (None for a constant)."""
    tree = ast.parse(path.read_text())
    (lib,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_Lib"]
    out: dict[str, int | None] = {}
    for node in lib.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = None
        elif isinstance(node, ast.FunctionDef):
            a = node.args
            out[node.name] = len(a.posonlyargs) + len(a.args) - 1  # less self
    return out


@pytest.mark.parametrize(
    ("module", "stub"),
    [
        ("cdev._fuse", "cdev/_fuse.pyi"),
        ("acrn_hsm_emu._native", "acrn_hsm_emu/_native.pyi"),
        ("acrn_hsm_emu._launcher", "acrn_hsm_emu/_launcher.pyi"),
    ],
)
def test_the_stubs_name_what_the_module_binds(module, stub):
    mod = importlib.import_module(module)
    bound: dict[str, int | None] = {}
    for name in dir(mod.lib):
        value = getattr(mod.lib, name)
        bound[name] = None if isinstance(value, int) else len(mod.ffi.typeof(value).args)
    assert stub_surface(REPO / stub) == bound
