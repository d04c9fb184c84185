"""The container scenario, in a container made of Linux namespaces (no Docker engine here).

What `docker run --device /dev/fuse --cap-add SYS_ADMIN ... acrn-hsm-emu serve -- CMD`
does, built by hand: a private mount namespace (propagation private: nothing
reaches the host), a private PID namespace with its own /proc, a tmpfs /dev
holding only the device nodes a container gets (/dev/fuse from --device,
/dev/null...), tmpfs /run and /tmp. The daemon is the container's PID 1 and
bind-mounts its node onto *that* /dev/acrn_hsm; an unmodified C client
(tests/clients/vm_cycle.c, which opens "/dev/acrn_hsm" by its fixed path)
runs inside, then `acrn-hsm-emu status`, as `docker exec` would.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import REPO, VENV_BIN, Installed
from tests.support.cbuild import build_c

pytestmark = pytest.mark.needs_fuse

HOST_NODE = pathlib.Path("/dev/acrn_hsm")
HOST_RUN_DIR = pathlib.Path("/run/acrn-hsm-emu")

# A private /tmp, as a container has; a checkout that itself lives under /tmp (a
# CI clone, say) is carried across so its venv and clients stay at their paths.
PRIVATE_TMP = r"""
if [ -n "${KEEP:-}" ]; then mount --bind "$KEEP" /mnt; fi
mount -t tmpfs -o mode=1777 tmpfs /tmp
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && mount --move /mnt "$KEEP"; fi
"""


def keep() -> str:
    """The checkout, when the container's private /tmp would hide it."""
    return str(REPO) if str(REPO).startswith("/tmp/") else ""


# The container's init: set up what the container runtime would, then become the daemon.
CONTAINER = r"""
set -eu
mount -t tmpfs -o mode=0755,nosuid tmpfs /dev
mknod -m 0666 /dev/fuse c 10 229
mknod -m 0666 /dev/null c 1 3
mknod -m 0666 /dev/zero c 1 5
mknod -m 0666 /dev/urandom c 1 9
mount -t tmpfs -o mode=0755 tmpfs /run
""" + PRIVATE_TMP + r"""
exec "$ACRN_HSM_EMU" serve --node /dev/acrn_hsm --run-dir /run/acrn-hsm-emu --log-format json \
    -- sh -c "$CLIENT && echo PID1=\$(cat /proc/1/comm) && grep ' /dev/acrn_hsm ' /proc/self/mountinfo \
              && \"$ACRN_HSM_EMU\" status"
"""


def snapshot() -> tuple[object, ...]:
    """What the host must still look like afterwards."""
    watched = (HOST_NODE, HOST_RUN_DIR)
    states = []
    for p in watched:
        try:
            st = os.lstat(p)
            states.append((str(p), st.st_mode, st.st_ino, st.st_size))
        except FileNotFoundError:
            states.append((str(p), None))
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp in ("/dev", "/run", "/tmp") or any(mp == str(w) or mp.startswith(f"{w}/") for w in watched):
                mounts.append(line.split(" - ")[0].split()[4:6] + line.split(" - ")[1].split()[:2])
    return tuple(states), tuple(sorted(map(tuple, mounts)))


def test_client_in_a_namespace_container_uses_the_fixed_path(tmp_path):
    client = build_c("vm_cycle")
    before = snapshot()
    proc = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "--mount-proc",
         "sh", "-c", CONTAINER],
        env={**os.environ, "ACRN_HSM_EMU": str(VENV_BIN / "acrn-hsm-emu"), "CLIENT": str(client),
             "KEEP": keep()},
        capture_output=True, text=True, timeout=300, check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # The client went all the way through on the container's /dev/acrn_hsm ...
    assert "STEP open ret=3 errno=0" in proc.stdout
    assert "STEP destroy_vm ret=0 errno=0" in proc.stdout
    assert "OK vmid=" in proc.stdout
    # ... which the daemon, the container's PID 1, served as its bind-mounted FUSE file,
    assert "PID1=acrn-hsm-emu" in proc.stdout or "PID1=python" in proc.stdout
    assert " /dev/acrn_hsm " in proc.stdout and "fuse.cdev" in proc.stdout
    # ... and `status` inside saw the VM come and go.
    assert "daemon pid 1  node /dev/acrn_hsm (fuse)" in proc.stdout
    assert '"event": "daemon.serving"' in proc.stderr or '"event": "daemon.serving"' in proc.stdout
    assert "Traceback" not in out
    # The host: no /dev/acrn_hsm made or changed, nothing mounted, no run directory.
    assert snapshot() == before


def test_outside_the_container_the_client_finds_no_node():
    """Control: the same binary on the host sees the host's /dev (no node here)."""
    if HOST_NODE.exists():
        pytest.skip("this host serves /dev/acrn_hsm itself")
    proc = subprocess.run([str(build_c("vm_cycle"))], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert proc.stdout == "STEP open ret=-1 errno=ENOENT\n"


# -- the image as the Containerfile builds it ---------------------------------------------

CONTAINERFILE = REPO / "Containerfile"


def containerfile() -> dict[str, list[str]]:
    """Instruction -> arguments of each occurrence (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """What the Containerfile's build stage puts in /staging: make install DESTDIR= PREFIX=/usr/local."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    staging = tmp_path_factory.mktemp("image") / "staging"
    install = containerfile()["RUN"][1]
    m = re.search(r"make install DESTDIR=(\S+) PREFIX=(\S+)", install)
    assert m, install
    Installed(staging).make("install", DESTDIR=str(staging), PREFIX=m[2], SYSCONFDIR="/etc")
    yield staging


def test_containerfile_is_debian_12_and_installs_with_the_makefile():
    cf = containerfile()
    assert [f.split()[0] for f in cf["FROM"]] == ["debian:12", "debian:12-slim"]
    assert "make install DESTDIR=/staging PREFIX=/usr/local" in cf["RUN"][1]
    assert cf["COPY"][-1] == "--from=build /staging/ /"
    runtime = cf["RUN"][2]
    for pkg in ("python3", "libfuse3-3"):
        assert pkg in runtime.split()
    assert json.loads(cf["ENTRYPOINT"][0]) == ["/usr/local/bin/acrn-hsm-emu"]
    # The run line in the README and in the Containerfile's header give the same flags.
    readme = (REPO / "README.md").read_text()
    for flag in ("--device /dev/fuse", "--cap-add SYS_ADMIN", "--cap-add SYS_PTRACE",
                 "--security-opt apparmor=unconfined", "--init"):
        assert flag in readme and flag in CONTAINERFILE.read_text(), flag


IMAGE = r"""
set -eu
mount --bind "$STAGING/usr/local" /usr/local
mount -t overlay overlay -o "lowerdir=$STAGING/etc:/etc" /etc
mount -t tmpfs -o mode=0755,nosuid tmpfs /dev
mknod -m 0666 /dev/fuse c 10 229
mknod -m 0666 /dev/null c 1 3
mknod -m 0666 /dev/zero c 1 5
mknod -m 0666 /dev/urandom c 1 9
mount -t tmpfs -o mode=0755 tmpfs /run
""" + PRIVATE_TMP + r"""
exec "$@"
"""


def test_the_image_serves_a_client_in_its_container(image_root):
    """ENTRYPOINT + CMD of the Containerfile, with `-- test`, on the staged image files."""
    cf = containerfile()
    argv = json.loads(cf["ENTRYPOINT"][0]) + json.loads(cf["CMD"][0])
    client = build_c("vm_cycle")
    test = f"{client} && {argv[0]} status"  # as `FROM acrn-hsm-emu` + CMD ["serve", "--", ...]
    before = snapshot()
    proc = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "--mount-proc",
         "sh", "-c", IMAGE, "sh", *argv, "--", "sh", "-c", test],
        env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "STAGING": str(image_root),
             "KEEP": keep()},
        capture_output=True, text=True, timeout=300, check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "OK vmid=" in proc.stdout
    # The default config of the image: the node at /dev/acrn_hsm, the scripted backend
    # (no /dev/kvm passed), JSON logs (no terminal), the default control socket.
    assert "daemon pid 1  node /dev/acrn_hsm (fuse)  backend scripted" in proc.stdout
    serving = next(json.loads(line) for line in out.splitlines() if '"event": "daemon.serving"' in line)
    assert serving["config"] == "/etc/acrn-hsm-emu/config.toml"
    assert serving["control"] == "/run/acrn-hsm-emu/dev-acrn_hsm.sock"  # one socket per node
    assert "Traceback" not in out
    assert snapshot() == before
