"""Boot Debian's stock kernel under qemu (TCG) on this machine's own root, read-only.

The guest sees the host's / over virtio-9p under a tmpfs overlay, so the checkout, its
.venv and the system's Python, gcc and systemd are the host's, unchanged. What it writes
stays in guest memory; results come back through a second, writable 9p share (OUT).

Everything is made in a cache folder (VMTEST_CACHE, default .vmtest/ in the checkout,
gitignored): the kernel package unpacked there (never installed: the host's /boot and
/lib/modules stay untouched), an initramfs of static busybox and the few modules that
mount the root, and the wheels `make install` needs inside a guest without network.
Facts behind the choices: shared/notes/cuse-vm.md.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import pathlib
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tarfile
import time
import tomllib

REPO = pathlib.Path(__file__).resolve().parent.parent
GUEST = REPO / "vmtest" / "guest"
CACHE = pathlib.Path(os.environ.get("VMTEST_CACHE") or REPO / ".vmtest").resolve()

# The metapackage that names the current 6.1 image (Debian 12's kernel).
KERNEL_META = "linux-image-amd64"
# Mount the root and the results folder: virtio PCI, 9p over virtio, overlayfs.
INITRAMFS_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]
BUSYBOX = pathlib.Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
MEMORY = "4G"
SLOW = 4  # a Python start under TCG takes 4-7 s, 20 times the host's
CPUS = 2


class VmError(RuntimeError):
    """The VM could not be prepared or run (one line, says why)."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    version: str  # uname -r, e.g. 6.1.0-50-amd64
    root: pathlib.Path  # the unpacked package

    @property
    def vmlinuz(self) -> pathlib.Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> pathlib.Path:
        return self.root / "lib" / "modules" / self.version


def _run(cmd: list[str], what: str, cwd: pathlib.Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise VmError(f"{what}: {' '.join(cmd)} exited {proc.returncode}: {detail[-1] if detail else ''}")
    return proc.stdout


def kernel_package() -> str:
    """The linux-image-6.1.0-NN-amd64 package that linux-image-amd64 depends on today."""
    for attempt in range(2):
        proc = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True,
                              text=True, check=False)
        found = re.findall(r"Depends: (linux-image-[0-9][^\s]*)", proc.stdout)
        if found:
            return str(found[0])
        if attempt == 0 and os.geteuid() == 0:  # a fresh machine: no package lists yet
            _run(["apt-get", "update", "-qq"], "updating the package lists")
    raise VmError(f"apt-cache depends {KERNEL_META} names no kernel image (apt-get update as root)")


def ensure_kernel() -> Kernel:
    """Debian's kernel image, downloaded and unpacked into the cache once per version."""
    pkg = kernel_package()
    version = pkg.removeprefix("linux-image-")
    root = CACHE / "kernel" / version
    kernel = Kernel(version, root)
    if (root / ".complete").exists():
        return kernel
    shutil.rmtree(root, ignore_errors=True)
    download = CACHE / "download"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir(parents=True)
    print(f"vmtest: downloading {pkg}", flush=True)
    _run(["apt-get", "download", pkg], "downloading the kernel", cwd=download)
    debs = list(download.glob(f"{pkg}_*.deb"))
    if len(debs) != 1:
        raise VmError(f"apt-get download {pkg} left {len(debs)} packages in {download}")
    root.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(debs[0]), str(root)], "unpacking the kernel")
    # The package's postinst would run depmod: modprobe needs modules.dep and modules.devname.
    _run(["depmod", "-b", str(root), version], "indexing the kernel's modules")
    shutil.rmtree(download)
    if not kernel.vmlinuz.exists():
        raise VmError(f"{debs[0].name} has no {kernel.vmlinuz.name}")
    (root / ".complete").touch()
    return kernel


def module_load_order(kernel: Kernel, names: list[str]) -> list[str]:
    """Paths (relative to the modules folder) of ``names`` and their dependencies, in load order."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[pathlib.Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def add(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps[path]):  # modules.dep lists the deepest dependency last
            add(dep)
        order.append(path)

    for name in names:
        if name not in by_name:
            raise VmError(f"kernel {kernel.version} has no module {name}")
        add(by_name[name])
    return order


class Cpio:
    """An initramfs archive (newc format), written directly: device nodes need no root."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ino = 1

    def _entry(self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(body), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        self.data += b"070701" + b"".join(b"%08x" % f for f in fields) + name.encode() + b"\0"
        self.data += b"\0" * (-len(self.data) % 4) + body
        self.data += b"\0" * (-len(self.data) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, body)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.data)


def build_initramfs(kernel: Kernel) -> pathlib.Path:
    """Static busybox, vmtest/guest/init and the modules that mount the root, in load order."""
    if not BUSYBOX.exists():
        raise VmError(f"{BUSYBOX} is missing (Debian package busybox-static)")
    modules = module_load_order(kernel, INITRAMFS_MODULES)
    cpio = Cpio()
    for d in ["bin", "dev", "proc", "sys", "lower", "rw", "newroot", "modules"]:
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", (GUEST / "init").read_bytes(), 0o755)
    names = []
    for rel in modules:
        name = pathlib.Path(rel).name
        cpio.file(f"modules/{name}", (kernel.modules / rel).read_bytes())
        names.append(name)
    cpio.file("modules/load-order", "".join(f"{n}\n" for n in names).encode())
    out = CACHE / f"initramfs-{kernel.version}.cpio"
    out.write_bytes(cpio.finish())
    return out


def ensure_wheels() -> pathlib.Path:
    """The build and run requirements of the package as wheels: the guest has no network,
    and `make install` (pip install --target .) builds the package from source."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = sorted(set(meta["build-system"]["requires"] + meta["project"]["dependencies"]))
    wheels = CACHE / "wheels"
    stamp = wheels / ".requirements"
    if stamp.exists() and stamp.read_text() == "\n".join(reqs):
        return wheels
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"vmtest: fetching wheels for the guest: {' '.join(reqs)}", flush=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "-d", str(wheels), *reqs],
         "fetching wheels for the guest")
    stamp.write_text("\n".join(reqs))
    return wheels


# Parts of the standard libraries the runs never import (the venv has its own site-packages):
# left on the 9p root.
PRELOAD_SKIP = {"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo",
                "lib2to3", "ensurepip", "__phello__"}

PRELOAD_MAX_FILE = 4 << 20


def preload_trees() -> list[pathlib.Path]:
    """What every Python start reads: the checkout (with its .venv), the venv's standard
    library, and the system Python's (the installed service runs on /usr/bin/python3)."""
    trees = [REPO, pathlib.Path(sysconfig.get_path("stdlib")),
             pathlib.Path(f"/usr/lib/python{sys.version_info[0]}.{sys.version_info[1]}")]
    return list(dict.fromkeys(t.resolve() for t in trees if t.is_dir()))


def build_preload() -> pathlib.Path:
    """The hot trees as one tar, unpacked into the guest's overlay before it starts.

    Over 9p every open costs round trips through qemu's main loop, which under TCG
    competes with the vCPUs: a Python start that imports the daemon took 18 s from 9p
    and 6 s from guest memory. The files are the same, at the same paths.
    """
    out = CACHE / "preload.tar"
    trees = preload_trees()
    skip = {REPO / ".git", CACHE} | {t / name for t in trees[1:] for name in PRELOAD_SKIP}

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if pathlib.Path("/" + info.name) in skip:
            return None
        if not (info.isfile() or info.isdir() or info.issym()):
            return None  # sockets, fifos, devices: nothing a run reads
        if info.size > PRELOAD_MAX_FILE:
            return None  # one open, then large reads: cheap enough over 9p
        return info

    with tarfile.open(out, "w") as tar:
        for tree in trees:
            tar.add(tree, arcname=str(tree).lstrip("/"), filter=keep)
    return out


def qemu_missing() -> str | None:
    """Why qemu cannot run here, in one line, or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (Debian package qemu-system-x86)"
    proc = subprocess.run([QEMU, "-accel", "help"], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or "tcg" not in proc.stdout:
        return f"{QEMU} has no TCG accelerator: {(proc.stderr or proc.stdout).strip()[:200]}"
    return None


def _die_with_parent() -> None:
    """In qemu's child, before exec: a killed test run takes its VM with it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclasses.dataclass
class Boot:
    """One boot's outcome: the results folder and the serial console."""

    out: pathlib.Path
    console: pathlib.Path
    seconds: float
    timed_out: bool

    def console_tail(self, lines: int = 60) -> str:
        text = self.console.read_text(errors="replace") if self.console.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def boot(mode: str, timeout: float) -> Boot:
    """Boot the guest in ``mode`` (suite: run vmtest/guest/suite.sh as init; systemd:
    systemd as PID 1 running the scenario unit) and wait until it powers off."""
    why = qemu_missing()
    if why:
        raise VmError(f"cannot run the VM: {why}")
    if re.search(r"\s", str(REPO)) or re.search(r"\s", str(CACHE)):
        raise VmError(f"the checkout and cache paths must have no white space: {REPO}, {CACHE}")
    kernel = ensure_kernel()
    wheels = ensure_wheels()
    initrd = build_initramfs(kernel)
    preload = build_preload()
    out = CACHE / "out" / mode
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    console = CACHE / "out" / f"{mode}.console"
    cmdline = [
        "console=ttyS0", "panic=-1", "loglevel=4",
        f"vmtest.mode={mode}", f"vmtest.repo={REPO}", f"vmtest.kver={kernel.version}",
        f"vmtest.modules={kernel.modules}", f"vmtest.wheels={wheels}", f"vmtest.preload={preload}",
    ]
    # The suite's hang guards scale with ACRN_HSM_TEST_SLOW (tests/conftest.py).
    cmdline.append(f"vmtest.slow={os.environ.get('ACRN_HSM_TEST_SLOW') or SLOW}")
    if os.environ.get("VMTEST_FILES"):  # a narrower suite run, by hand
        cmdline.append("vmtest.files=" + ",".join(os.environ["VMTEST_FILES"].split()))
    if mode == "systemd":
        cmdline += ["systemd.show_status=1", "systemd.log_target=console",
                    "systemd.journald.forward_to_console=1"]
    cmd = [
        QEMU, "-accel", "tcg", "-cpu", "max", "-smp", str(CPUS), "-m", MEMORY,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{console}",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd), "-append", " ".join(cmdline),
        "-fsdev", "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=root,mount_tag=root",
        "-fsdev", f"local,id=out,path={out},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=out,mount_tag=out",
    ]
    print(f"vmtest: booting {kernel.version} ({mode}), console in {console}", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_die_with_parent)
    timed_out = False
    try:
        qemu_out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        qemu_out, _ = proc.communicate()
        timed_out = True
    seconds = time.monotonic() - start
    if proc.returncode < 0 and not timed_out:
        raise VmError(f"qemu was killed by {signal.Signals(-proc.returncode).name} from outside "
                      f"after {seconds:.0f} s (console: {console})")
    if proc.returncode > 0:
        raise VmError(f"qemu exited {proc.returncode}: {qemu_out.strip()[-300:]}")
    print(f"vmtest: {mode} VM ran {seconds:.0f} s{' (timed out, killed)' if timed_out else ''}",
          flush=True)
    return Boot(out, console, seconds, timed_out)


def main() -> int:
    """``python -m vmtest.vm MODE``: one boot, by hand; prints where its results are."""
    if len(sys.argv) != 2 or sys.argv[1] not in ("suite", "systemd"):
        print("usage: python -m vmtest.vm suite|systemd", file=sys.stderr)
        return 2
    try:
        b = boot(sys.argv[1], timeout=3600)
    except VmError as e:
        print(f"vmtest: {e}", file=sys.stderr)
        return 1
    print(f"results: {b.out}\nconsole: {b.console}")
    return 1 if b.timed_out else 0


if __name__ == "__main__":
    sys.exit(main())
