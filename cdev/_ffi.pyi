"""The type of a cffi module's ``ffi`` (stub only: cffi ships no types), for the
stubs of cdev._fuse and acrn_hsm_emu._native."""

from collections.abc import Callable
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

class FFI:
    """C data stays Any; def_extern keeps the callback's type."""

    NULL: Any
    errno: int

    def def_extern(
        self, name: str = ..., error: Any = ..., onerror: Any = ...
    ) -> Callable[[_F], _F]: ...
    def __getattr__(self, name: str) -> Any: ...
