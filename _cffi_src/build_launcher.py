"""cffi (API mode) build of acrn_hsm_emu._launcher: the native half of ``acrn-hsm-emu run``.

native/launcher.c starts a command under a seccomp filter with a
user-notification listener and supervises the ioctls it traps
(acrn_hsm_emu/launcher.py); launcher_decl.h is what Python sees of it.
Every C warning fails the build. setup.py runs this.
"""

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).parent
NATIVE = HERE.parent / "native"

ffibuilder = FFI()
ffibuilder.cdef((HERE / "launcher_decl.h").read_text())
ffibuilder.set_source(
    "acrn_hsm_emu._launcher",
    (NATIVE / "launcher.h").read_text(),
    # relative to the project, as setuptools wants them (objects go under build/)
    sources=["native/launcher.c"],
    depends=["native/launcher.h"],
    include_dirs=[str(NATIVE)],
    define_macros=[("_GNU_SOURCE", None)],
    extra_compile_args=["-Wall", "-Wextra", "-Wconversion", "-Werror", "-fvisibility=hidden"],
)
