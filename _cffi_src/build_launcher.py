"""cffi (API mode) build of acrn_hsm_emu._launcher: the native half of ``acrn-hsm-emu run``.

launcher.c starts a command under a seccomp filter with a user-notification
listener and supervises the ioctls it traps (acrn_hsm_emu/launcher.py);
launcher_decl.h is what Python sees of it.
"""

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "launcher_decl.h").read_text())
ffibuilder.set_source(
    "acrn_hsm_emu._launcher",
    (HERE / "launcher.c").read_text(),
    extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
