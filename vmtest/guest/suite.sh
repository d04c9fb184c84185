#!/bin/bash
# Run 1, PID 1 of the guest after switch_root (no systemd): load CUSE, serve a real CUSE
# node once by hand (smoke), then the CUSE half of the suite (vmtest/cuse-suite.txt).
# Results go to the results share; then the guest powers off.
#   env.txt            what the guest is (kernel, /dev/cuse)
#   smoke.log/.rc      the daemon on /dev/acrn_hsm over CUSE: char device, vm_cycle, stop
#   pytest.log/.rc     the suite's output and exit status; junit.xml its test cases
#   done               written last: the script ran to its end
set -euo pipefail
# shellcheck source=/dev/null
. /etc/vmtest.env
out=$VMTEST_OUT

power_off() {
    sync
    echo o >/proc/sysrq-trigger
    sleep 60
}
trap 'echo "suite.sh: stopped early (exit $?) at: $BASH_COMMAND" | tee -a "$out/error"; power_off' EXIT

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
# The guest has no network: pip (make install in the service tests) takes the prepared wheels.
export PIP_NO_INDEX=1 PIP_FIND_LINKS=$VMTEST_WHEELS
export ACRN_HSM_TEST_TRANSPORTS=cuse
# Hang guards (tests/conftest.py) scaled: a Python start takes seconds under TCG.
export ACRN_HSM_TEST_SLOW=$VMTEST_SLOW

mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t devpts devpts /dev/pts
# What udev or systemd would add to devtmpfs (bash's <(...) needs /dev/fd).
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
hostname vmtest

cd "$VMTEST_REPO"
modprobe cuse
{
    echo "kernel: $(uname -r)"
    echo "cpus: $(nproc)"
    echo "cuse: $(stat -c '%F %t:%T' /dev/cuse)"
    echo "kvm: $([ -e /dev/kvm ] && echo present || echo absent)"
} >"$out/env.txt"

smoke() {
    local node=/dev/acrn_hsm log=/run/smoke-daemon.log pid i client
    echo "build vm_cycle"
    client=$(.venv/bin/python -c 'from tests.support.cbuild import build_c; print(build_c("vm_cycle"))')
    echo "serve $node over CUSE"
    .venv/bin/acrn-hsm-emu serve --node "$node" --transport cuse --run-dir /run/smoke \
        --log-format json >"$log" 2>&1 &
    pid=$!
    for i in $(seq 120); do
        grep -q '"daemon.serving"' "$log" && break
        kill -0 "$pid" || { cat "$log"; echo "the daemon exited"; return 1; }
        sleep 0.5
    done
    grep -q '"daemon.serving"' "$log" || { cat "$log"; echo "the daemon did not log serving in 60 s"; return 1; }
    echo "node: $(stat -c '%F, major %t minor %T, mode %a, %U:%G' "$node")"
    [ -c "$node" ] || { echo "$node is not a character device"; return 1; }
    "$client" || { cat "$log"; return 1; }
    kill -TERM "$pid"
    wait "$pid" || { cat "$log"; echo "the daemon exited $? on SIGTERM"; return 1; }
    [ ! -e "$node" ] || { echo "$node is still there after the daemon stopped"; return 1; }
    echo "stopped; $node is gone"
    grep -c . "$log" | sed 's/^/daemon log lines: /'
}
rc=0
smoke >"$out/smoke.log" 2>&1 || rc=$?
echo "$rc" >"$out/smoke.rc"

# VMTEST_FILES (comma-separated, from the host's environment) narrows the run by hand.
if [ -n "${VMTEST_FILES:-}" ]; then
    IFS=, read -r -a files <<<"$VMTEST_FILES"
else
    mapfile -t files < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' vmtest/cuse-suite.txt)
fi
rc=0
# --basetemp: a fresh folder, not the host's /tmp/pytest-of-root (cleaning that over 9p is slow).
# -k cuse: the [cuse] cases and the CUSE messages of the troubleshooting page; what does not
# depend on the transport already ran in `make test`, and TCG makes every case slow.
.venv/bin/pytest -p no:cacheprovider -ra --durations=20 --basetemp=/tmp/vmtest-pytest \
    --junitxml="$out/junit.xml" -k cuse \
    "${files[@]}" >"$out/pytest.log" 2>&1 || rc=$?
echo "$rc" >"$out/pytest.rc"

echo ok >"$out/done"
trap - EXIT
power_off
