"""cffi (API mode) build of acrn_hsm_emu._native: the Linux calls Python lacks,
the vCPU request cycle, the HSM's express path and the KVM loop.

The C lives in native/ (hsm_native.h names it all) and the declarations Python
sees in native_decl.h beside this file. Every C warning fails the build.
setup.py runs this (``pip install -e .``, ``setup.py build_ext --inplace``).
"""

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).parent
NATIVE = HERE.parent / "native"
SOURCES = [
    "remote_memory.c",
    "pidfd.c",
    "vcpu_cycle.c",
    "express.c",
    "express_out.c",
    "express_dispatch.c",
    "express_prefilter.c",
    "kvm_run.c",
    "irq_gate.c",
]

ffibuilder = FFI()
ffibuilder.cdef((HERE / "native_decl.h").read_text())

ffibuilder.set_source(
    "acrn_hsm_emu._native",
    (NATIVE / "hsm_native.h").read_text(),
    # relative to the project, as setuptools wants them (objects go under build/)
    sources=[f"native/{name}" for name in SOURCES],
    depends=[f"native/{p.name}" for p in sorted(NATIVE.glob("*.h"))] + ["include/acrn_hsm_emu.h"],
    include_dirs=[str(NATIVE), str(HERE.parent / "include")],  # include/: the extension ABI's header
    define_macros=[("_GNU_SOURCE", None)],
    extra_compile_args=["-Wall", "-Wextra", "-Wconversion", "-Werror", "-fvisibility=hidden"],
)
