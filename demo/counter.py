"""A long computation for the ckpt demo: holds ~50 MB of Python objects,
counts, and prints a running checksum that it re-derives from its data."""
import sys
import time

N = 400_000
data = [i * 7 for i in range(N)]
names = {i: "item-%d" % i for i in range(0, N, 4)}
step = 0
total = 0
while step < 10_000:
    step += 1
    for j in range(step % 97, N, 97):
        data[j] += 1
        total += 1
    if sum(data) != sum(i * 7 for i in range(N)) + total:
        print("FAIL checksum", flush=True)
        sys.exit(1)
    print(f"step {step}: {total} increments, checksum ok", flush=True)
    time.sleep(0.5)
