#!/bin/sh
# Runs inside the VM (busybox sh, as root, on a kernel with
# CONFIG_MEM_SOFT_DIRTY): the soft-dirty backend through a whole
# launch / checkpoint / restart cycle of counter_heap.
#
#   launch --dirty-tracking soft-dirty; checkpoints g1 g2 g3 (the program
#   changes memory between them); `ckpt log --json`: every generation says
#   soft-dirty, g2 and g3 read < 1/3 of g1's bytes; kill -9;
#   restart latest (g3), checkpoint the restored program twice (g4: every
#   page was written by the restore, g5: small again); kill; restart latest
#   (g5); kill; restart g2 (an older, incremental generation) by number and
#   run it to DONE (exit 0).
# Every restart must come back as the same pid and continue at the tick the
# generation was taken at; the program verifies its memory every tick and
# prints FAIL on any difference; tick numbers must not skip.
#
# Prints "CKPT-VM-VERDICT: PASS" or "CKPT-VM-VERDICT: FAIL <why>".

PROG=/opt/ckpt/counter_heap
ARGS="-m ${CKPT_VM_HEAP_MIB:-32} -t ${CKPT_VM_TICK_MS:-1000} -s /tmp/stop"
COORD=unix:/tmp/c.sock
STORE=/tmp/store
W=/tmp/w
BETWEEN=2 # ticks between checkpoints
mkdir -p $W
cd /tmp || exit 1

T0=$(cut -d' ' -f1 /proc/uptime)
say() { echo "CKPT-VM: [$(awk -v t0="$T0" '{printf "%.1f", $1 - t0}' /proc/uptime)s] $*"; }
verdict() {
    echo "CKPT-VM-VERDICT: $*" > /tmp/verdict
    cat /tmp/verdict
}
fail() {
    say "FAILED: $*"
    for f in $W/*.out $W/*.err /tmp/c.sock.log /tmp/coord.log; do
        [ -s "$f" ] || continue
        echo "---- $f (last 25 lines)"
        tail -n 25 "$f"
    done
    [ -d /tmp/ckpt-0 ] && for f in /tmp/ckpt-0/*.log; do echo "---- $f"; tail -n 25 "$f"; done
    echo "----"
    verdict "FAIL $*"
    exit 1
}

ckpt_() { timeout 120 ckpt "$@"; }

last_tick() { grep '^TICK ' "$1" | tail -n 1 | cut -d' ' -f2; }
first_tick() { grep -m 1 '^TICK ' "$1" | cut -d' ' -f2; }

# check OUT: no FAIL line, tick numbers consecutive.
check_out() {
    if grep -q '^FAIL' "$1"; then
        fail "$(grep -m 1 '^FAIL' "$1") (in $1)"
    fi
    gap=$(awk '/^TICK /{ if (p != "" && $2 != p + 1) { print p " -> " $2; exit } p = $2 }' "$1")
    [ -z "$gap" ] || fail "tick numbers skip in $1: $gap"
}

# wait_ticks OUT N PID: until N more ticks than now are printed (60 s).
wait_ticks() {
    base=$(last_tick "$1")
    want=$(( ${base:-0} + $2 ))
    i=0
    while :; do
        check_out "$1"
        t=$(last_tick "$1")
        [ -n "$t" ] && [ "$t" -ge "$want" ] && return 0
        kill -0 "$3" 2>/dev/null || fail "process $3 ($1) exited before tick $want: $(tail -n 3 "$1" | tr '\n' '|') $(tail -n 3 "${1%.out}.err" | tr '\n' '|')"
        i=$((i + 1))
        [ $i -gt 600 ] && fail "no tick $want in $1 within 60 s (last: ${t:-none})"
        sleep 0.1
    done
}

wait_line() { # OUT PREFIX PID
    i=0
    until grep -q "^$2" "$1"; do
        check_out "$1"
        kill -0 "$3" 2>/dev/null || fail "process $3 exited before '$2' in $1: $(tail -n 3 "$1" | tr '\n' '|') $(tail -n 5 "${1%.out}.err" | tr '\n' '|')"
        i=$((i + 1))
        [ $i -gt 900 ] && fail "no '$2' in $1 within 90 s"
        sleep 0.1
    done
}

# checkpoint OUT PID NAME: takes a checkpoint; sets G_<NAME> to the
# generation and LO_/HI_<NAME> to the ticks a restart of it may continue at.
checkpoint() {
    lo=$(( $(last_tick "$1") + 1 ))
    s=$(cut -d' ' -f1 /proc/uptime)
    g=$(ckpt_ checkpoint --coord $COORD 2>$W/ckpt-$3.err | tail -n 1)
    case "$g" in
        '' | *[!0-9]*) fail "ckpt checkpoint ($3) failed: $(tr '\n' ' ' < $W/ckpt-$3.err)" ;;
    esac
    e=$(cut -d' ' -f1 /proc/uptime)
    # The program writes its lines straight to the file: the last tick there
    # now was printed before the checkpoint ended.
    hi=$(( $(last_tick "$1") + 1 ))
    eval "G_$3=$g LO_$3=$lo HI_$3=$hi"
    say "checkpoint $3 = generation $g in $(awk -v s="$s" -v e="$e" 'BEGIN{printf "%.2f", e - s}') s; restart continues at tick $lo..$hi"
}

# kill9 PID: kills the program and waits until it is gone.
kill9() {
    kill -9 "$1"
    wait "$1" 2>/dev/null
    i=0
    while [ -d "/proc/$1" ]; do
        i=$((i + 1))
        [ $i -gt 300 ] && fail "pid $1 still exists 30 s after SIGKILL"
        sleep 0.1
    done
}

# restart NAME OUTNAME [GEN]: `ckpt restart [GEN]` in the background; checks
# the first tick against generation NAME's bounds and the pid. Sets RPID
# (the ckpt restart command, which becomes the program's parent).
restart() {
    eval "lo=\$LO_$1 hi=\$HI_$1 g=\$G_$1"
    out=$W/$2.out
    say "restart $1 (generation $g)${3:+ by number}"
    ckpt_ restart $3 --coord $COORD --store $STORE > "$out" 2> "$W/$2.err" &
    RPID=$!
    i=0
    until grep -q '^TICK ' "$out"; do
        check_out "$out"
        kill -0 $RPID 2>/dev/null || fail "ckpt restart $3 ($1) exited before the first tick: $(tail -n 5 $W/$2.err | tr '\n' '|') $(tail -n 3 "$out" | tr '\n' '|')"
        i=$((i + 1))
        [ $i -gt 900 ] && fail "restart of $1 printed no tick within 90 s"
        sleep 0.1
    done
    ft=$(first_tick "$out")
    [ "$ft" -ge "$lo" ] && [ "$ft" -le "$hi" ] || fail "restart of $1 (generation $g) continued at tick $ft, expected $lo..$hi"
    [ -d "/proc/$PID" ] || fail "restored program is not pid $PID"
    exe=$(readlink /proc/$PID/exe)
    [ "$exe" = "$PROG" ] || fail "pid $PID runs $exe, not $PROG"
    say "restart of $1 continues at tick $ft as pid $PID ($(grep -m 1 '^TICK ' "$out"))"
}

# ---------------------------------------------------------------- launch
rm -f /tmp/stop
say "launch $PROG $ARGS (soft-dirty)"
ckpt launch --dirty-tracking soft-dirty --store $STORE --coord $COORD -- $PROG $ARGS > $W/run1.out 2> $W/run1.err &
PID=$!
wait_line $W/run1.out READY $PID
say "$(grep -m 1 '^READY' $W/run1.out)"
wait_ticks $W/run1.out $BETWEEN $PID
st=$(ckpt_ status --coord $COORD 2>&1 | tr '\n' ' ')
say "status: $st"

checkpoint $W/run1.out $PID g1
wait_ticks $W/run1.out $BETWEEN $PID
checkpoint $W/run1.out $PID g2
wait_ticks $W/run1.out $BETWEEN $PID
checkpoint $W/run1.out $PID g3

# ---------------------------------------------------------------- log
ckpt_ log --json --store $STORE > $W/log1.json 2> $W/log1.err || fail "ckpt log --json failed: $(cat $W/log1.err)"
# Per generation: its tracking (and every process's) and read bytes.
summary() {
    awk '
        /"id":/ { gsub(/[^0-9]/, "", $2); g = $2; ids[++n] = g; track[g] = ""; read[g] = 0; logical[g] = 0 }
        /"dirty_tracking":/ { v = $2; gsub(/[",]/, "", v); track[g] = track[g] (track[g] == "" ? "" : ",") v }
        /"read_bytes":/ { v = $2; gsub(/[^0-9]/, "", v); read[g] += v }
        /"duration_ms":/ { v = $2; gsub(/[^0-9.]/, "", v); dur[g] = v }
        /"downtime_ms":/ { v = $2; gsub(/[^0-9.]/, "", v); down[g] = v }
        /^    "logical_bytes":/ { v = $2; gsub(/[^0-9]/, "", v); logical[g] = v }
        END { for (i = 1; i <= n; i++) { g = ids[i]; print g, read[g], logical[g], track[g], dur[g], down[g] } }
    ' "$1"
}
summary $W/log1.json > $W/sum1
show() { while read -r g r l t d dt; do say "generation $g: read_bytes $r logical_bytes $l tracking $t duration ${d}ms downtime ${dt}ms"; done < "$1"; }
show $W/sum1
gen_field() { awk -v g="$2" -v f="$3" '$1 == g { print $f }' "$1"; }
for n in g1 g2 g3; do
    eval "g=\$G_$n"
    t=$(gen_field $W/sum1 "$g" 4)
    [ -n "$t" ] || fail "ckpt log --json has no generation $g ($n)"
    [ "$t" = "soft-dirty,soft-dirty" ] || fail "generation $g ($n) tracking is '$t', not soft-dirty"
done
r1=$(gen_field $W/sum1 "$G_g1" 2)
r2=$(gen_field $W/sum1 "$G_g2" 2)
r3=$(gen_field $W/sum1 "$G_g3" 2)
[ "$r1" -ge $((16 << 20)) ] || fail "first generation read only $r1 bytes"
# A full read (scan, or soft-dirty bits that say every page changed) is
# ~100% of g1; g2 also holds what the program wrote during g1's (slow, under
# TCG) forked checkpoint: ~20% with the defaults, g3 ~10%.
[ $((r2 * 3)) -lt "$r1" ] || fail "incremental generation $G_g2 read $r2 bytes, not < 1/3 of the first's $r1"
[ $((r3 * 3)) -lt "$r1" ] || fail "incremental generation $G_g3 read $r3 bytes, not < 1/3 of the first's $r1"
say "read bytes: g1 $r1, g2 $r2 ($((r2 * 100 / r1))%), g3 $r3 ($((r3 * 100 / r1))%)"

wait_ticks $W/run1.out 1 $PID
kill9 $PID
check_out $W/run1.out
say "killed pid $PID after tick $(last_tick $W/run1.out)"

# ---------------------------------------------------------------- restart latest (g3), checkpoint it twice
restart g3 run2
R=$RPID
wait_ticks $W/run2.out $BETWEEN $R
checkpoint $W/run2.out $R g4
wait_ticks $W/run2.out $BETWEEN $R
checkpoint $W/run2.out $R g5
wait_ticks $W/run2.out 1 $R
ckpt_ log --json --store $STORE > $W/log2.json 2> $W/log2.err || fail "ckpt log --json failed: $(cat $W/log2.err)"
summary $W/log2.json > $W/sum2
grep -v -e "^$G_g1 " -e "^$G_g2 " -e "^$G_g3 " $W/sum2 > $W/sum2.new; show $W/sum2.new
for n in g4 g5; do
    eval "g=\$G_$n"
    t=$(gen_field $W/sum2 "$g" 4)
    [ "$t" = "soft-dirty,soft-dirty" ] || fail "generation $g ($n, of the restored program) tracking is '$t', not soft-dirty"
done
r4=$(gen_field $W/sum2 "$G_g4" 2)
r5=$(gen_field $W/sum2 "$G_g5" 2)
say "read bytes after restart: g4 $r4 ($((r4 * 100 / r1))% of g1), g5 $r5 ($((r5 * 100 / r1))%)"
[ $((r5 * 3)) -lt "$r1" ] || fail "generation $G_g5 of the restored program read $r5 bytes, not < 1/3 of the first's $r1"
kill9 $PID
wait $R 2>/dev/null
check_out $W/run2.out

# ---------------------------------------------------------------- restart latest (g5)
restart g5 run3
R=$RPID
wait_ticks $W/run3.out $BETWEEN $R
kill9 $PID
wait $R 2>/dev/null
check_out $W/run3.out

# ---------------------------------------------------------------- restart g2 by number, run to DONE
echo $((HI_g2 + BETWEEN + 2)) > /tmp/stop.new && mv /tmp/stop.new /tmp/stop
restart g2 run4 "$G_g2"
R=$RPID
i=0
while kill -0 $R 2>/dev/null; do
    check_out $W/run4.out
    i=$((i + 1))
    [ $i -gt 900 ] && fail "restart of g2 did not reach DONE within 90 s (last tick $(last_tick $W/run4.out))"
    sleep 0.1
done
wait $R
rc=$?
check_out $W/run4.out
grep -q '^DONE' $W/run4.out || fail "restart of g2 exited ($rc) without DONE: $(tail -n 3 $W/run4.out | tr '\n' '|') $(tail -n 5 $W/run4.err | tr '\n' '|')"
[ $rc -eq 0 ] || fail "restart of g2 printed DONE but exited $rc"
say "restart of g2 ran to DONE at tick $(last_tick $W/run4.out), exit 0"
ckpt_ quit --coord $COORD > /dev/null 2>&1
verdict PASS
