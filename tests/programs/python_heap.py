#!/usr/bin/env python3
"""python_heap: an unmodified python3 holding >=100 MB of pure-Python objects.

    python3 python_heap.py [-n N] [-t MS] [-s STOPFILE] [-m MB] [-w THREADS]

Builds a list of [key, value, text] records (text derived from value) and a
dict indexing them, about MB megabytes in all (default 120, measured with
tracemalloc-free accounting: sys.getsizeof of every object).  Each tick it
changes 2000 random records, keeps a running checksum updated incrementally,
and verifies it: a slice of the records every tick, all of them every 8
ticks and after a pause (a restart).  Same output protocol as the C
programs: PID, READY, TICK n ..., DONE, or FAIL <reason> and exit 1.

-w THREADS: as many worker threads besides, each changing records of its
own (a dict under its own lock, with a running checksum) all the time; every
tick the main thread checks each worker's checksum against its records and
that the worker made progress since the last tick, and each worker checks
its own thread id stays the same.
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


class Worker:
    """A thread changing records of its own, under its lock."""

    def __init__(self, w):
        self.w = w
        self.lock = threading.Lock()
        self.recs = {i: i * 7 + w for i in range(20000)}
        self.sum = sum(contrib(i, v) for i, v in self.recs.items()) & MASK
        self.changes = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        rng = random.Random(self.w)
        tid = threading.get_native_id()
        while True:
            with self.lock:
                for _ in range(500):
                    i = rng.randrange(20000)
                    v = rng.getrandbits(40)
                    self.sum = (self.sum - contrib(i, self.recs[i]) + contrib(i, v)) & MASK
                    self.recs[i] = v
                    self.changes += 1
            if threading.get_native_id() != tid:
                fail("worker %d tid changed from %d to %d" % (self.w, tid, threading.get_native_id()))
            time.sleep(0.005)

    def check(self):
        with self.lock:
            got = sum(contrib(i, v) for i, v in self.recs.items()) & MASK
            if got != self.sum:
                fail("worker %d checksum recomputed %d != running %d" % (self.w, got, self.sum))
            return self.changes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=1000000)
    ap.add_argument("-t", type=int, default=200)
    ap.add_argument("-s", default=None)
    ap.add_argument("-m", type=int, default=120)
    ap.add_argument("-w", type=int, default=0)
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

    workers = [Worker(w) for w in range(a.w)]
    for wk in workers:
        wk.thread.start()
    seen = [-1] * len(workers)

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
        for w, wk in enumerate(workers):
            done = wk.check()
            if done <= seen[w] and tick > 2:
                fail("worker %d made no progress (%d changes)" % (w, done))
            seen[w] = done
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
