"""cffi (API mode) build of cdev._fuse: the parts of libfuse3 that cdev calls.

The declarations live in fuse_decl.h beside this file so the bound surface is
easy to review; the C half is native/fuse_glue.c. API mode, because libfuse
wraps some entry points in macros and inline functions that only a C compiler
resolves. Every C warning fails the build. setup.py runs this.
"""

import pathlib
import shutil
import subprocess
import sys

from cffi import FFI

HERE = pathlib.Path(__file__).parent
NATIVE = HERE.parent / "native"


def _pkg_config(*args: str) -> list[str]:
    if shutil.which("pkg-config") is None:
        sys.exit("cdev: pkg-config is missing: install the Debian package 'pkg-config'")
    proc = subprocess.run(
        ["pkg-config", *args, "fuse3"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit("cdev: libfuse3 headers not found: install the Debian package 'libfuse3-dev'")
    return proc.stdout.split()


ffibuilder = FFI()
ffibuilder.cdef((HERE / "fuse_decl.h").read_text())

_cflags = _pkg_config("--cflags")
_libs = _pkg_config("--libs")

ffibuilder.set_source(
    "cdev._fuse",
    (NATIVE / "fuse_glue.h").read_text(),
    # relative to the project, as setuptools wants them (objects go under build/)
    sources=["native/fuse_glue.c"],
    depends=["native/fuse_glue.h"],
    include_dirs=[str(NATIVE), *(f[2:] for f in _cflags if f.startswith("-I"))],
    define_macros=[("FUSE_USE_VERSION", "35"), ("_GNU_SOURCE", None)],
    extra_compile_args=["-Wall", "-Wextra", "-Wconversion", "-Werror", "-fvisibility=hidden"],
    libraries=[f[2:] for f in _libs if f.startswith("-l")],
    library_dirs=[f[2:] for f in _libs if f.startswith("-L")],
)
