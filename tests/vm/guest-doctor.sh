#!/bin/sh
# Runs inside the VM (busybox sh, as root, on Debian's 6.1 kernel, which has
# Yama): `ckpt doctor` under kernel.yama.ptrace_scope 1, 2 and 3, as root
# and as an ordinary user (uid 1000, through busybox su):
#   1: both ok "ptrace stopper (Yama ptrace_scope 1, … PR_SET_PTRACER)";
#   2: root ok (it holds CAP_SYS_PTRACE); the user gets the signal
#      fallback, the fix naming kernel.yama.ptrace_scope=1;
#   3 (last: it cannot be lowered): both get the signal fallback, capture
#      missing naming ptrace_scope 3, exit 1.
# 0 first, as a reference: ok, exit 0 for root. Then the backend doctor
# names (soft-dirty here: 6.1 has no UFFD_FEATURE_WP_ASYNC) must be the one
# a real `ckpt launch` of counter_heap shows in `ckpt status --json`.
#
# Prints "CKPT-VM-VERDICT: PASS" or "CKPT-VM-VERDICT: FAIL <why>".

W=/tmp/w
mkdir -p $W /etc /tmp/u
cd /tmp || exit 1
say() { echo "CKPT-VM: $*"; }
verdict() {
    echo "CKPT-VM-VERDICT: $*" > /tmp/verdict
    cat /tmp/verdict
}
fail() {
    say "FAILED: $*"
    for f in $W/*.out; do echo "---- $f"; cat "$f"; done
    echo "----"
    verdict "FAIL $*"
    exit 1
}

[ -f /proc/sys/kernel/yama/ptrace_scope ] || fail "this kernel has no Yama (/proc/sys/kernel/yama/ptrace_scope)"
echo 'u:x:1000:1000::/tmp/u:/bin/sh' >> /etc/passwd
echo 'u:x:1000:' >> /etc/group
chown 1000:1000 /tmp/u

# doctor WHO SCOPE: runs `ckpt doctor` as root or as the user into
# $W/WHO-SCOPE.out; sets RC.
doctor() {
    out=$W/$1-$2.out
    if [ "$1" = root ]; then
        timeout 60 ckpt doctor > "$out" 2>&1
    else
        timeout 60 su -s /bin/sh u -c "HOME=/tmp/u PATH=$PATH ckpt doctor" > "$out" 2>&1
    fi
    RC=$?
    say "$1, ptrace_scope $2: exit $RC; $(grep -E ' (stop|capture):' "$out" | tr '\n' '|')"
}
has() { grep -qF -- "$2" "$1" || fail "$1 lacks '$2'"; }

for scope in 0 1 2 3; do
    echo $scope > /proc/sys/kernel/yama/ptrace_scope || fail "cannot set ptrace_scope $scope"
    doctor root $scope
    R=$W/root-$scope.out
    doctor user $scope
    U=$W/user-$scope.out
    case $scope in
    0)
        has $R "ok       stop: ptrace stopper (Yama ptrace_scope 0)"
        has $U "ok       stop: ptrace stopper (Yama ptrace_scope 0)"
        has $R "ok       capture:"
        has $U "ok       capture:"
        ;;
    1)
        has $R "ok       stop: ptrace stopper (Yama ptrace_scope 1, the agent naming its tracer with PR_SET_PTRACER)"
        has $U "ok       stop: ptrace stopper (Yama ptrace_scope 1, the agent naming its tracer with PR_SET_PTRACER)"
        has $R "ok       capture:"
        has $U "ok       capture:"
        ;;
    2)
        has $R "ok       stop: ptrace stopper (Yama ptrace_scope 2)"
        has $U "note     stop: signal fallback (Yama ptrace_scope 2;"
        has $U "sysctl -w kernel.yama.ptrace_scope=1"
        has $R "ok       capture:"
        has $U "ok       capture:"
        ;;
    3)
        has $R "note     stop: signal fallback (Yama ptrace_scope 3;"
        has $U "note     stop: signal fallback (Yama ptrace_scope 3;"
        has $R "missing  capture: Yama ptrace_scope 3 refuses"
        has $U "missing  capture: Yama ptrace_scope 3 refuses"
        [ $RC -eq 1 ] || fail "the user's doctor exits $RC under ptrace_scope 3, not 1"
        ;;
    esac
done
# Root's doctor exits 0 where nothing is missing (scope 0).
grep -q '^missing' $W/root-0.out && fail "root misses something under ptrace_scope 0"

# The backend: doctor's word against a real launch's (as root and as the user).
for who in root user; do
    said=$(sed -n 's/^.*dirty-tracking: auto uses \([a-z-]*\):.*$/\1/p' $W/$who-0.out)
    [ -n "$said" ] || fail "$who's doctor names no backend"
    # A file of each launch's own: the shell truncates a redirect in the
    # background child, so a shared file could still hold root's ticks
    # when the loop below first looks at it (CI: the user's status was
    # asked before its coordinator was up).
    out=$W/launch-$who.out
    if [ $who = root ]; then
        ckpt launch --store /tmp/store --coord unix:/tmp/c.sock -- /opt/ckpt/counter_heap -m 4 -t 200 > $out 2>&1 &
    else
        su -s /bin/sh u -c "HOME=/tmp/u PATH=$PATH ckpt launch --store /tmp/u/store --coord unix:/tmp/u/c.sock -- /opt/ckpt/counter_heap -m 4 -t 200" > $out 2>&1 &
    fi
    L=$!
    i=0
    until grep -q '^TICK ' $out 2>/dev/null; do
        i=$((i + 1)); [ $i -gt 600 ] && fail "$who's launch printed no tick in 60 s: $(tail -n 5 $out | tr '\n' '|')"
        sleep 0.1
    done
    if [ $who = root ]; then
        st=$(timeout 60 ckpt status --json --coord unix:/tmp/c.sock)
    else
        st=$(timeout 60 su -s /bin/sh u -c "HOME=/tmp/u PATH=$PATH ckpt status --json --coord unix:/tmp/u/c.sock")
    fi
    used=$(echo "$st" | sed -n 's/^.*"dirty_tracking": "\([a-z-]*\)".*$/\1/p' | head -n 1)
    say "$who: doctor says $said, the launch uses $used"
    [ "$said" = "$used" ] || fail "$who: doctor says $said, the launch uses '$used': $st"
    kill -9 $L
    wait $L 2>/dev/null
done
verdict PASS
