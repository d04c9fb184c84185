"""Builds the cffi modules (cdev._fuse, acrn_hsm_emu._native and _launcher), in
place, with AddressSanitizer and UndefinedBehaviorSanitizer: ``make sanitize``
runs this in its copy of the tree (build/sanitize/tree), never in a checkout,
whose own build would be shadowed. The interpreter is not instrumented, so the
tests run with libasan preloaded (see the Makefile).
"""

import os
import pathlib
import runpy
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLAGS = "-fsanitize=address,undefined -fno-omit-frame-pointer -g"

if (ROOT / ".git").exists():
    sys.exit(f"build_sanitized: {ROOT} is a checkout; make sanitize builds in a copy")
os.chdir(ROOT)  # the build scripts name their sources relative to the project
os.environ["CFLAGS"] = f"{os.environ.get('CFLAGS', '')} {FLAGS}"
os.environ["LDFLAGS"] = f"{os.environ.get('LDFLAGS', '')} {FLAGS}"
# cffi's compile() reads pyproject.toml with the venv's own setuptools, which may be
# older than the one pip builds with: the copy's build needs nothing from it.
project = ROOT / "pyproject.toml"
project.rename(ROOT / "pyproject.toml.aside")
try:
    for script in ("build_fuse.py", "build_native.py", "build_launcher.py"):
        ffibuilder = runpy.run_path(f"_cffi_src/{script}")["ffibuilder"]
        ffibuilder.compile(tmpdir=".")
finally:
    (ROOT / "pyproject.toml.aside").rename(project)
