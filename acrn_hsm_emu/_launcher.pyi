"""Types of acrn_hsm_emu._launcher, the cffi module _cffi_src/build_launcher.py
builds (its declarations: _cffi_src/launcher_decl.h; tests/test_cffi_stubs.py
checks that this names all of it). C data (pointers, structs) is Any."""

from typing import Any

from cdev._ffi import FFI

class _Lib:
    LAUNCH_EV_CARRIED: int
    LAUNCH_EV_ERROR: int
    LAUNCH_EV_FAILED: int
    LAUNCH_EV_GONE: int
    LAUNCH_EV_HUP: int
    LAUNCH_EV_PASSED: int
    LAUNCH_EV_REFUSED: int
    LAUNCH_EV_STOP: int
    LAUNCH_MAX_CMDS: int
    LAUNCH_STEP_ACTION_AVAIL: int
    LAUNCH_STEP_EXEC: int
    LAUNCH_STEP_FILTER: int
    LAUNCH_STEP_FORK: int
    LAUNCH_STEP_MEMORY: int
    LAUNCH_STEP_NONE: int
    LAUNCH_STEP_NOTIF_RECV: int
    LAUNCH_STEP_NOTIF_SEND: int
    LAUNCH_STEP_NOTIF_SIZES: int
    LAUNCH_STEP_NO_NEW_PRIVS: int
    LAUNCH_STEP_PIDFD_GETFD: int
    LAUNCH_STEP_PIDFD_OPEN: int
    LAUNCH_STEP_POLL: int
    LAUNCH_STEP_RECV_LISTENER: int
    LAUNCH_STEP_SEND_LISTENER: int
    LAUNCH_STEP_TGID: int

    def launch_probe(self, step: Any, /) -> int: ...
    def launch_serve(self, s: Any, ev: Any, verbose: int, /) -> int: ...
    def launch_spawn(
        self, path: Any, argv: Any, envp: Any, cmds: Any, ncmds: int, out: Any, /
    ) -> int: ...
    def launch_stop(self, s: Any, /) -> None: ...
    def launch_sup_abandon(self, s: Any, /) -> None: ...
    def launch_sup_fd_arg(self, s: Any, cmd: int, /) -> int: ...
    def launch_sup_free(self, s: Any, /) -> None: ...
    def launch_sup_new(
        self, listener: int, node: Any, value_call: int, thread_pidfd: int, /
    ) -> Any: ...
    def launch_sup_stats(self, s: Any, out: Any, /) -> None: ...

ffi: FFI
lib: _Lib
