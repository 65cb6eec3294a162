#!/usr/bin/env python3
"""python_heap: an unmodified python3 holding >=100 MB of pure-Python objects.

    python3 python_heap.py [-n N] [-t MS] [-s STOPFILE] [-m MB]

Builds a list of [key, value, text] records (text derived from value) and a
dict indexing them, about MB megabytes in all (default 120, measured with
tracemalloc-free accounting: sys.getsizeof of every object).  Each tick it
changes 2000 random records, keeps a running checksum updated incrementally,
and verifies it: a slice of the records every tick, all of them every 8
ticks and after a pause (a restart).  Same output protocol as the C
programs: PID, READY, TICK n ..., DONE, or FAIL <reason> and exit 1.
"""
import argparse
import os
import random
import sys
import threading
import time

MASK = (1 << 61) - 1


def fail(msg):
    sys.stdout.write("FAIL %s\n" % msg)
    sys.stdout.flush()
    os._exit(1)


def text_of(v):
    return ("%x" % v) * 3


def contrib(k, v):
    return (k * 1000003 + v * 2654435761) & MASK


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=1000000)
    ap.add_argument("-t", type=int, default=200)
    ap.add_argument("-s", default=None)
    ap.add_argument("-m", type=int, default=120)
    a = ap.parse_args()

    sys.stdout.reconfigure(line_buffering=True)
    pid = os.getpid()
    tid = threading.get_native_id()
    print("PID %d" % pid)

    rng = random.Random(pid)
    records = []
    index = {}
    checksum = 0
    size = sys.getsizeof(records) + sys.getsizeof(index)
    k = 0
    target = a.m * 1000 * 1000
    while size < target:
        v = rng.getrandbits(48)
        r = [k, v, text_of(v)]
        records.append(r)
        index["k%d" % k] = r
        checksum = (checksum + contrib(k, v)) & MASK
        # the record list, its two ints, its string, the key string, dict slot
        size += sys.getsizeof(r) + sys.getsizeof(k) + sys.getsizeof(v) + sys.getsizeof(r[2]) \
            + sys.getsizeof("k%d" % k) + 16
        k += 1
    n = len(records)
    print("READY records=%d approx_bytes=%d" % (n, size))

    def verify_range(lo, hi):
        s = 0
        for i in range(lo, hi):
            r = records[i]
            if r[0] != i:
                fail("record %d has key %d" % (i, r[0]))
            if r[2] != text_of(r[1]):
                fail("record %d text %r does not match value %d" % (i, r[2][:24], r[1]))
            if index["k%d" % i] is not r:
                fail("index entry k%d is not record %d" % (i, i))
            s = (s + contrib(i, r[1])) & MASK
        return s

    full = verify_range(0, n)
    if full != checksum:
        fail("initial checksum mismatch")
    mutations = 0
    prev = time.monotonic()
    tick = 0
    while True:
        tick += 1
        if os.getpid() != pid:
            fail("pid changed from %d to %d" % (pid, os.getpid()))
        if threading.get_native_id() != tid:
            fail("tid changed from %d to %d" % (tid, threading.get_native_id()))
        for _ in range(2000):
            i = rng.randrange(n)
            r = records[i]
            v = rng.getrandbits(48)
            checksum = (checksum - contrib(i, r[1]) + contrib(i, v)) & MASK
            r[1] = v
            r[2] = text_of(v)
            mutations += 1
        now = time.monotonic()
        resumed = now - prev > 3 * a.t / 1000.0 + 0.5
        if tick % 8 == 0 or resumed:
            got = verify_range(0, n)
            if got != checksum:
                fail("checksum recomputed %d != running %d" % (got, checksum))
        else:
            w = n // 8
            lo = (tick % 8) * w
            verify_range(lo, lo + w)
        print("TICK %d mutations=%d checksum=%d%s" % (tick, mutations, checksum,
                                                        " resumed" if resumed else ""))
        stop = tick >= a.n
        if a.s and os.path.exists(a.s):
            try:
                with open(a.s) as f:
                    txt = f.read().strip()
                stop = stop or not txt or tick >= int(txt)
            except (OSError, ValueError):
                pass
        if stop:
            print("DONE")
            sys.stdout.flush()
            sys.exit(0)
        prev = time.monotonic()
        time.sleep(a.t / 1000.0)


if __name__ == "__main__":
    main()
