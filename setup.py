from setuptools import setup

# Metadata lives in pyproject.toml; this file only names the cffi build scripts.
setup(
    cffi_modules=[
        "_cffi_src/build_fuse.py:ffibuilder",
        "_cffi_src/build_native.py:ffibuilder",
        "_cffi_src/build_launcher.py:ffibuilder",
    ],
)
