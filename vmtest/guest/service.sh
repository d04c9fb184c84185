#!/bin/bash
# Run 2: the service under systemd as PID 1, run by vmtest-scenario.service. Every step
# runs whatever the ones before gave (a failed start still shows its status and journal),
# and leaves in the results share:
#   steps/NAME.log, steps/NAME.rc   its output and exit status
#   steps.txt                       "NAME RC SECONDS", one line per step, in order
#   done                            written last: the scenario ran to its end
# The host side (vmtest/test_vm.py) turns each step into a test.
set -euo pipefail
# shellcheck source=/dev/null
. /etc/vmtest.env
out=$VMTEST_OUT
mkdir -p "$out/steps"
unit=acrn-hsm-emu.service
node=/dev/acrn_hsm
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
# The guest has no network: pip (make install) takes the wheels the host prepared.
export PIP_NO_INDEX=1 PIP_FIND_LINKS=$VMTEST_WHEELS
cd "$VMTEST_REPO"

fail() { # ends the step (each runs in a subshell)
    echo "FAILED: $*"
    exit 1
}

step() { # step NAME: run step_NAME in a subshell, keep its output and status
    local name=$1 rc=0 t0=$SECONDS
    echo "vmtest: step $name" >/dev/console
    ("step_$name") >"$out/steps/$name.log" 2>&1 || rc=$?
    echo "$rc" >"$out/steps/$name.rc"
    echo "$name $rc $((SECONDS - t0))" >>"$out/steps.txt"
    echo "vmtest: step $name: exit $rc ($((SECONDS - t0)) s)" >/dev/console
}

journal_tail() {
    echo "--- journalctl -u $unit (last 40 lines)"
    journalctl -u "$unit" -o cat --no-pager | tail -40
}

step_boot() { # systemd is PID 1 and /dev/cuse exists from boot, as on a stock Debian system
    echo "PID 1: $(cat /proc/1/comm); kernel $(uname -r); $(systemctl is-system-running || true)"
    ls -l /dev/cuse /dev/fuse || true
    echo "cuse module loaded before the service started: $(grep -q '^cuse ' /proc/modules && echo yes || echo no)"
    [ "$(cat /proc/1/comm)" = systemd ] || fail "PID 1 is not systemd"
    [ -c /dev/cuse ] || fail "/dev/cuse is missing: transport = auto would choose FUSE"
}

step_install() {
    # -o: the checkout's .venv is taken as it is (never rebuilt in the guest, which has no network)
    make --no-print-directory -o .venv/.installed install || fail "make install exited $?"
    systemctl cat "$unit" | head -3 || fail "systemd does not know $unit after make install"
    echo "--- /etc/acrn-hsm-emu/config.toml (settings)"
    grep -E '^[a-z_]+ *=' /etc/acrn-hsm-emu/config.toml
}

step_start() {
    local rc=0
    timeout 300 systemctl enable --now "$unit" || rc=$?
    if [ "$rc" != 0 ]; then
        systemctl status "$unit" --no-pager -l || true
        journal_tail
        fail "systemctl enable --now $unit exited $rc"
    fi
    echo "systemctl enable --now $unit: ok"
    echo "cuse module loaded: $(grep -q '^cuse ' /proc/modules && echo yes || echo no)"
}

step_status() {
    local text
    text=$(systemctl status "$unit" --no-pager -l 2>&1) || true
    echo "$text"
    systemctl show -p MainPID --value "$unit" >/run/vmtest-mainpid
    grep -q 'Active: active (running)' <<<"$text" || fail "$unit is not active (running)"
    grep -qF 'Status: "serving /dev/acrn_hsm (cuse, scripted)' <<<"$text" \
        || fail "no Status: \"serving /dev/acrn_hsm (cuse, scripted)...\" line"
}

step_node() {
    stat -c '%n: %F, major 0x%t minor 0x%T, mode %a, %U:%G' "$node" || fail "$node does not exist"
    echo "/proc/devices names its major (for DeviceAllow=char-NAME): $(awk -v m="$((16#$(stat -c %t "$node")))" \
        '/^Character/ {c = 1} /^Block/ {c = 0} c && $1 == m {print $2}' /proc/devices)"
    [ -c "$node" ] || fail "$node is not a character device (not served over CUSE)"
}

step_vm_cycle() {
    local client
    client=$(.venv/bin/python -c 'from tests.support.cbuild import build_c; print(build_c("vm_cycle"))') \
        || fail "building tests/clients/vm_cycle.c failed"
    timeout 120 "$client" || fail "vm_cycle exited $?"
}

step_journal() {
    local pid
    pid=$(cat /run/vmtest-mainpid 2>/dev/null || echo 0)
    journal_tail
    [ "$pid" != 0 ] || fail "the unit had no main process to read the journal of"
    echo "--- the daemon's own lines (pid $pid), each must be a JSON object"
    journalctl "_PID=$pid" -o cat --no-pager | python3 -c '
import json, sys
lines = [line for line in sys.stdin.read().splitlines() if line.strip()]
bad = []
events = []
for line in lines:
    try:
        rec = json.loads(line)
        events.append(rec["event"])
        rec["level"], rec["timestamp"]
    except (ValueError, KeyError, TypeError):
        bad.append(line)
print(f"{len(lines)} lines, {len(lines) - len(bad)} JSON objects with event, level, timestamp")
print("events:", " ".join(events))
for line in bad:
    print("NOT JSON:", line)
sys.exit(1 if bad or "daemon.serving" not in events else 0)
' || fail "the journal does not hold the daemon's JSON lines (with a \"daemon.serving\" event)"
}

step_stop() {
    local state result
    timeout 120 systemctl stop "$unit" || fail "systemctl stop exited $?"
    state=$(systemctl is-active "$unit" || true)
    result=$(systemctl show -p Result --value "$unit")
    echo "after stop: $state, result $result"
    journal_tail
    [ ! -e "$node" ] || fail "$node is still there after systemctl stop"
    [ "$state" = inactive ] || fail "$unit is $state after stop, not inactive"
    [ "$result" = success ] || fail "$unit's result is $result"
}

for s in boot install start status node vm_cycle journal stop; do
    step "$s"
done
echo ok >"$out/done"
sync
