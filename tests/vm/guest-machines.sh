#!/bin/sh
# Runs inside a VM of tests/tests/vm_machines.rs (busybox sh, as root, PID
# 1's child): one machine of a computation whose coordinator and S3 store
# (moto) run on the host, reached over qemu user networking at 10.0.2.2.
#
# Kernel command line (set by the host test through run-machines.sh boot):
#   ckpt_role=launch|restart  ckpt_host=NAME  ckpt_coord=tcp:10.0.2.2:PORT
#   ckpt_store=s3://BUCKET/PREFIX  ckpt_s3=http://10.0.2.2:PORT
#   ckpt_key=ID  ckpt_secret=SECRET  ckpt_limit=SECONDS (then power off)
#   ckpt_coordkey=SECRET (the coordinator's)  ckpt_storeid=ID ckpt_storekey=HEX (the store's key)
#   ckpt_map=OLD=NEW (restart)  ckpt_gen=N (restart: the generation to wait for)
#   ckpt_min_uptime=S (restart: wait until this machine has been up S seconds)
#
# Both roles: network up, host name NAME, the disk (/dev/vda, minix, the
# programs' working directory /work: it outlives the machine, made by
# run-machines.sh prepare), `ckpt host`
# in the background.
#   launch:  `ckpt launch ... -- counter_heap` in /work;
#            its output is relayed to the console; the host checkpoints it
#            and kills this VM.
#   restart: `ckpt restart --host-map OLD=NEW`; its output (the restored
#            program's) is relayed; once `ckpt log` shows generation N in
#            the store, asks the program to stop 3 ticks on and checks it
#            prints DONE and exits 0.
# Console lines: the program's own (PID, READY, TICK n, DONE, FAIL ...) and
# "CKPT-VM: ..." notes; the last is "CKPT-VM-VERDICT: PASS|FAIL <why>".

arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^ckpt_$1=//p" | tail -n 1; }
ROLE=$(arg role) NAME=$(arg host) COORD=$(arg coord) STORE=$(arg store)
MAP=$(arg map) GEN=$(arg gen) LIMIT=$(arg limit)
PROG=/opt/ckpt/counter_heap

stty -onlcr 2>/dev/null # lines end in \n alone on the serial console
say() { echo "CKPT-VM: $*"; }
verdict() {
    echo "CKPT-VM-VERDICT: $*" > /tmp/verdict
    cat /tmp/verdict
}
fail() {
    say "FAILED: $*"
    for f in /tmp/prog.err /tmp/host.log /tmp/log.err; do
        [ -s "$f" ] || continue
        echo "---- $f (last 25 lines)"
        tail -n 25 "$f"
    done
    echo "----"
    verdict "FAIL $*"
    exit 1
}
[ -n "$ROLE" ] && [ -n "$NAME" ] && [ -n "$COORD" ] && [ -n "$STORE" ] || fail "missing ckpt_* parameters on the kernel command line: $(cat /proc/cmdline)"

# Every wait is bounded: the whole guest too.
( sleep "${LIMIT:-150}"; say "FAILED: still running after ${LIMIT:-150} s"; verdict "FAIL the guest ran out of its ${LIMIT:-150} s"; poweroff -f ) &

for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m" || fail "insmod $m"
done
i=0
until [ -e /sys/class/net/eth0 ] && [ -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && fail "no eth0 or /dev/vda 10 s after loading the drivers: $(ls /sys/class/net /dev | tr '\n' ' ')"
    sleep 0.1
done
ip link set lo up && ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 ||
    fail "cannot configure eth0"
hostname "$NAME"
mkdir -p /work
mount -t minix /dev/vda /work || fail "cannot mount /dev/vda on /work"
cd /work || fail "cd /work"
say "machine $(hostname) up: kernel $(uname -r), boot id $(cat /proc/sys/kernel/random/boot_id)"

export AWS_ENDPOINT_URL="$(arg s3)" AWS_ACCESS_KEY_ID="$(arg key)" AWS_SECRET_ACCESS_KEY="$(arg secret)"
# moto speaks plain HTTP; 10.0.2.2 is no loopback address to ckpt.
export AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true CKPT_S3_CACHE=/tmp/s3-cache
# The coordinator's secret, as an administrator copies it to each machine
# (mode 0600): the helper, launch and restart prove it over TCP.
( umask 077; arg coordkey > /tmp/coord.key ) && [ -s /tmp/coord.key ] || fail "no ckpt_coordkey on the kernel command line"
export CKPT_SECRET_FILE=/tmp/coord.key
# The store's key, as its owner exports it and imports it on each machine.
( umask 077; printf 'ckpt store key v1\nstore %s\nkey %s\n' "$(arg storeid)" "$(arg storekey)" > /tmp/store.key ) &&
    ckpt key import /tmp/store.key > /tmp/key.log 2>&1 || fail "ckpt key import: $(cat /tmp/key.log)"
ckpt host --coord "$COORD" > /tmp/host.log 2>&1 &
say "capture helper started"

# relay: the program's lines to the console, one whole line per write;
# the last tick in /tmp/last.
relay() {
    while IFS= read -r l; do
        echo "$l"
        case "$l" in
            'TICK '*) t=${l#TICK }; echo "${t%% *}" > /tmp/last ;;
            DONE) : > /tmp/done ;;
        esac
    done
}

case "$ROLE" in
launch)
    # The program's PID comes back with it: above any PID the next fresh
    # machine uses before its restart (a fresh boot's are low and alike).
    echo 4999 > /proc/sys/kernel/ns_last_pid || fail "cannot write /proc/sys/kernel/ns_last_pid"
    { ckpt launch --coord "$COORD" --store "$STORE" -- $PROG -m 16 -t 1000 -s /work/stop < /dev/null 2> /tmp/prog.err; echo $? > /tmp/rc; } | relay &
    # What the program wrote before its first tick is on the disk for the
    # next machine (it changes no file afterwards).
    i=0
    until [ -s /tmp/last ]; do
        i=$((i + 1))
        [ $i -gt 600 ] && fail "the program printed no tick within 60 s"
        [ -e /tmp/rc ] && fail "ckpt launch exited ($(cat /tmp/rc)) before the first tick"
        sleep 0.1
    done
    sync
    say "disk synced"
    wait
    fail "ckpt launch exited ($(cat /tmp/rc)) while the machine was up"
    ;;
restart)
    # Once the host's last checkpoint is in the store, stop 3 ticks on.
    (
        i=0
        until ckpt log --json --store "$STORE" 2> /tmp/log.err | grep -qE "\"id\": *$GEN([^0-9]|\$)"; do
            i=$((i + 1))
            [ $i -gt 300 ] && { say "no generation $GEN in $STORE within 300 s"; exit 1; }
            sleep 0.5
        done
        say "generation $GEN is in the store: stopping at tick $(( $(cat /tmp/last) + 3 ))"
        echo $(( $(cat /tmp/last) + 3 )) > /work/stop.new && mv /work/stop.new /work/stop
    ) &
    # The program's CLOCK_MONOTONIC must not go backwards: this machine's
    # clock must be past the one the checkpoints were taken on.
    min="$(arg min_uptime)"
    until [ "$(cut -d. -f1 /proc/uptime)" -ge "${min:-0}" ]; do sleep 0.2; done
    { ckpt restart --coord "$COORD" --store "$STORE" --host-map "$MAP" < /dev/null 2> /tmp/prog.err; echo $? > /tmp/rc; } | relay
    rc=$(cat /tmp/rc)
    [ "$rc" = 0 ] || fail "ckpt restart exited $rc"
    [ -s /work/stop ] || fail "ckpt restart exited 0 before the program was asked to stop"
    [ -e /tmp/done ] || fail "ckpt restart exited 0 but the program printed no DONE"
    say "the restored program ran to DONE and exited 0"
    verdict PASS
    ;;
*) fail "unknown role $ROLE" ;;
esac
