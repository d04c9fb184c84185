"""``acrn-hsm-emu run -- CMD``: CMD's value-argument ioctls reach the node under FUSE too.

Under FUSE restricted ioctls the kernel takes the argument of an ``_IOW``
command for an address and copies ``_IOC_SIZE`` bytes from it before the
daemon sees the call, so ``ACRN_IOCTL_SET_IRQLINE`` (whose argument is the
packed ``{gsi, op}`` itself) fails with EFAULT. The launcher runs CMD under a
seccomp filter that traps only ``ioctl`` calls with those request numbers
(``ext.VALUE_CALLS``) and hands them to a supervisor thread here through a
user-notification listener: the supervisor takes the caller's fd
(``pidfd_getfd``), and if it is the node, makes the same call by pointer on
that same open file (``ACRN_EMU_IOCTL_VALUE_CALL``, so it acts on the
caller's VM) and answers the trapped call with the HSM's result and errno;
any other fd goes on to the kernel untouched. Every other system call runs
as it would; CMD's children inherit the filter; nothing is preloaded, so
static programs work too. The native half is ``native/launcher.c``.

The supervisor is this separate process, not the daemon: it blocks (in the
kernel's notification queue and in the carried ioctl, a FUSE round trip to
the daemon) where the daemon's trio thread must not; a daemon issuing an
ioctl on its own node would be serving itself; it needs no privilege over
CMD beyond being its parent (``pidfd_getfd`` on a descendant); and it works
the same whether the daemon runs next to it, in a sandboxed service, or in
another container that published the node. ``serve -- CMD`` starts CMD
through it. Details and what still differs: docs/fidelity.md.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import structlog

from acrn_hsm_emu._launcher import ffi, lib
from acrn_hsm_emu.client import extension as ext

log = structlog.get_logger("acrn_hsm_emu.launcher")

# Exit statuses of the launcher's own failures, as env(1) and timeout(1) use them;
# otherwise the launcher exits with CMD's status (128 + N when a signal N ended it).
EXIT_LAUNCHER = 125
EXIT_CANNOT_EXEC = 126
EXIT_NOT_FOUND = 127

# Passed on to CMD. Job control signals are left alone (CMD is in our process group).
FORWARDED = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
    signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGALRM,
)  # fmt: skip
SI_KERNEL = 0x80  # si_code of a signal the terminal sent to its whole foreground group

STEPS = {
    lib.LAUNCH_STEP_ACTION_AVAIL: "seccomp(SECCOMP_GET_ACTION_AVAIL, SECCOMP_RET_USER_NOTIF)",
    lib.LAUNCH_STEP_NOTIF_SIZES: "seccomp(SECCOMP_GET_NOTIF_SIZES)",
    lib.LAUNCH_STEP_PIDFD_OPEN: "pidfd_open",
    lib.LAUNCH_STEP_PIDFD_GETFD: "pidfd_getfd",
    lib.LAUNCH_STEP_FORK: "fork",
    lib.LAUNCH_STEP_FILTER: "seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER)",
    lib.LAUNCH_STEP_NO_NEW_PRIVS: "prctl(PR_SET_NO_NEW_PRIVS)",
    lib.LAUNCH_STEP_SEND_LISTENER: "passing the listener to the launcher",
    lib.LAUNCH_STEP_EXEC: "execve",
    lib.LAUNCH_STEP_RECV_LISTENER: "receiving the listener",
    lib.LAUNCH_STEP_POLL: "poll",
    lib.LAUNCH_STEP_NOTIF_RECV: "SECCOMP_IOCTL_NOTIF_RECV",
    lib.LAUNCH_STEP_NOTIF_SEND: "SECCOMP_IOCTL_NOTIF_SEND",
    lib.LAUNCH_STEP_TGID: "/proc/TID/status",
    lib.LAUNCH_STEP_MEMORY: "allocating the supervisor",
}
EVENTS = {
    lib.LAUNCH_EV_CARRIED: "carried",
    lib.LAUNCH_EV_PASSED: "passed",
    lib.LAUNCH_EV_GONE: "gone",
    lib.LAUNCH_EV_REFUSED: "refused",
    lib.LAUNCH_EV_FAILED: "failed",
}


class LaunchError(Exception):
    """The command could not be started: one sentence, and the exit status to give."""

    def __init__(self, message: str, code: int = EXIT_LAUNCHER) -> None:
        super().__init__(message)
        self.code = code


def _errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def resolve(name: str) -> str:
    """The program ``name`` runs, as a shell's PATH search finds it."""
    if "/" in name:
        found: str | None = name if os.path.lexists(name) else None  # execve reports the rest
        reason = os.strerror(errno.ENOENT)
    else:
        found, reason = shutil.which(name), "command not found"
    if found is None:
        raise LaunchError(f"cannot run {name}: {reason}", EXIT_NOT_FOUND)
    return found


def filter_needed(node: str) -> bool:
    """False where the node is a character device (CUSE, or the real driver), which passes
    value arguments itself; True for a FUSE node, and while there is no node yet."""
    try:
        return not stat.S_ISCHR(os.stat(node).st_mode)
    except OSError:
        return True


def check_kernel() -> None:
    """Seccomp user notification (5.0), its CONTINUE flag (5.5) and pidfd_getfd (5.6)."""
    step = ffi.new("int *")
    rc = lib.launch_probe(step)
    if rc < 0:
        raise LaunchError(
            f"this kernel cannot hand system calls to a supervisor ({STEPS[step[0]]}: "
            f"{os.strerror(-rc)}): acrn-hsm-emu run needs seccomp user notification and "
            "pidfd_getfd (Linux 5.6 or later); run the command without it (value-argument "
            "ioctls then fail with EFAULT under FUSE), or serve the node with CUSE"
        )


def argv_for(node: str, command: Sequence[str], log_format: str = "auto", log_level: str = "warning") -> list[str]:
    """How a daemon (``serve -- CMD``) runs CMD through the launcher: this interpreter and
    this package, wherever it is installed (``make install`` keeps it off sys.path)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    boot = f"import sys; sys.path.insert(0, {root!r}); from acrn_hsm_emu.cli import main; sys.exit(main())"
    return [sys.executable, "-I", "-c", boot, "run", "--node", node, "--log-format", log_format,
            "--log-level", log_level, "--", *command]  # fmt: skip


class Launcher:
    """One command under the filter; :meth:`run` returns its exit status."""

    def __init__(
        self, command: Sequence[str], node: str, *, verbose: bool = False, thread_pidfd: bool = True
    ) -> None:
        """``thread_pidfd``: False finds a calling thread's process through /proc even where
        pidfd_open takes PIDFD_THREAD (Linux 6.9+), as on older kernels (for tests)."""
        assert command, "no command"  # the CLI says how to give one
        self.command = list(command)
        self.node = node
        self.verbose = verbose
        self.thread_pidfd = thread_pidfd
        self.pid = 0
        self.stats: dict[str, Any] = {}
        self._sup: Any = None
        self._thread: threading.Thread | None = None
        self._logged: set[tuple[int, int, int]] = set()

    def run(self) -> int:
        path = resolve(self.command[0])
        cmds = sorted(ext.VALUE_CALLS) if filter_needed(self.node) else []
        if cmds:
            check_kernel()
        waited = {*FORWARDED, signal.SIGCHLD}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)  # before CMD can exit or be signalled
        try:
            self._spawn(path, cmds)
            status = self._wait(waited)
        finally:
            self._finish()
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        log.info("launcher.command_exited", argv=self.command, status=status, **self.stats)
        return status

    def _spawn(self, path: str, cmds: list[int]) -> None:
        keep = [ffi.new("char[]", os.fsencode(a)) for a in self.command]
        env = [ffi.new("char[]", os.fsencode(k) + b"=" + os.fsencode(v)) for k, v in os.environ.items()]
        argv = ffi.new("char *[]", [*keep, ffi.NULL])
        envp = ffi.new("char *[]", [*env, ffi.NULL])
        out = ffi.new("struct launch_spawn_result *")
        if lib.launch_spawn(os.fsencode(path), argv, envp, cmds, len(cmds), out) < 0:
            raise self._spawn_error(path, out.step, out.err)
        self.pid = out.pid
        log.info(
            "launcher.command_started", argv=self.command, pid=self.pid, node=self.node,
            filter=bool(cmds), trapped=[ext.VALUE_CALLS[c] for c in cmds],
            no_new_privs=bool(out.no_new_privs), killable_wait=bool(out.killable),
        )  # fmt: skip
        if not cmds:
            return
        sup = lib.launch_sup_new(out.listener, os.fsencode(self.node), ext.ACRN_EMU_IOCTL_VALUE_CALL,
                                 int(self.thread_pidfd))  # fmt: skip
        if sup == ffi.NULL:
            os.close(out.listener)  # CMD's trapped calls fail with ENOSYS from now on
            log.error("launcher.supervisor_stopped", step=STEPS[lib.LAUNCH_STEP_MEMORY],
                      error=os.strerror(ffi.errno))  # fmt: skip
            return
        for cmd in ext.FD_VALUE_CALLS:
            lib.launch_sup_fd_arg(sup, cmd)
        self._sup = sup
        self._thread = threading.Thread(target=self._supervise, name="launcher-sup", daemon=True)
        self._thread.start()

    def _spawn_error(self, path: str, step: int, err: int) -> LaunchError:
        name = self.command[0]
        if step == lib.LAUNCH_STEP_EXEC:
            code = EXIT_NOT_FOUND if err == errno.ENOENT else EXIT_CANNOT_EXEC  # as a shell says
            return LaunchError(f"cannot run {name}: {os.strerror(err)}", code)
        return LaunchError(f"cannot start {name} under the seccomp filter: {STEPS.get(step, step)}: "
                           f"{os.strerror(err)}")  # fmt: skip

    def _supervise(self) -> None:
        ev = ffi.new("struct launch_event *")
        try:
            while True:
                kind = lib.launch_serve(self._sup, ev, int(self.verbose))
                if kind in (lib.LAUNCH_EV_STOP, lib.LAUNCH_EV_HUP):
                    return
                if kind == lib.LAUNCH_EV_ERROR:
                    log.error("launcher.supervisor_stopped", step=STEPS.get(ev.step, ev.step),
                              error=os.strerror(ev.err),
                              note="the command's trapped ioctls fail with ENOSYS from now on")  # fmt: skip
                    return
                self._event(kind, ev)
        finally:
            lib.launch_sup_abandon(self._sup)  # nobody answers any more: ENOSYS, not a hang

    def _event(self, kind: int, ev: Any) -> None:
        fields = {"tid": ev.tid, "fd": ev.fd, "cmd": ext.VALUE_CALLS.get(ev.cmd, hex(ev.cmd)), "arg": hex(ev.arg)}
        first = (kind, ev.step, ev.err) not in self._logged
        self._logged.add((kind, ev.step, ev.err))
        if kind == lib.LAUNCH_EV_REFUSED and first:
            log.warning("launcher.value_ioctl_refused", error=_errno_name(ev.err),
                        node=self.node, note="the kernel answers these calls itself (EFAULT under FUSE)",
                        **fields)  # fmt: skip
        elif kind == lib.LAUNCH_EV_FAILED and first:
            log.warning("launcher.caller_fd_not_taken", step=STEPS.get(ev.step, ev.step),
                        error=_errno_name(ev.err), note="the kernel answers these calls itself", **fields)
        else:
            log.debug("launcher.call", outcome=EVENTS.get(kind, kind), result=ev.result, **fields)

    def _wait(self, waited: Iterable[int]) -> int:
        """Pass signals on to CMD until it exits; its exit status (128 + N for signal N)."""
        while True:
            info = signal.sigwaitinfo(waited)
            if info.si_signo == signal.SIGCHLD:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == self.pid:
                    code = os.waitstatus_to_exitcode(status)
                    self.pid = 0
                    return code if code >= 0 else 128 - code
                continue
            if info.si_code == SI_KERNEL and self._in_our_group():
                continue  # the terminal sent it to CMD as well
            try:
                os.kill(self.pid, info.si_signo)
            except ProcessLookupError:
                pass

    def _in_our_group(self) -> bool:
        try:
            return os.getpgid(self.pid) == os.getpgrp()
        except ProcessLookupError:
            return False

    def _finish(self) -> None:
        if self._sup is None:
            return
        lib.launch_stop(self._sup)
        if self._thread is not None:
            self._thread.join()
        st = ffi.new("struct launch_stats *")
        lib.launch_sup_stats(self._sup, st)
        lib.launch_sup_free(self._sup)  # closes the listener: what is left of CMD gets ENOSYS
        self._sup = None
        n = st.carried
        self.stats = {
            "carried": n, "passed": st.passed, "gone": st.gone, "refused": st.refused, "failed": st.failed,
            "supervisor_us_mean": round(st.supervisor_ns / n / 1000, 1) if n else None,
            "value_call_us_mean": round(st.value_call_ns / n / 1000, 1) if n else None,
        }  # fmt: skip


def run(command: Sequence[str], node: str, *, verbose: bool = False) -> int:
    """``acrn-hsm-emu run``: CMD's exit status, or a :class:`LaunchError`."""
    return Launcher(command, node, verbose=verbose).run()
