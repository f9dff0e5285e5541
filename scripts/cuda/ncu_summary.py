"""Summarises an Nsight Compute CSV (one gpu__time_duration.sum row per kernel) of a window of
a repeating workload: the period (kernels per decoded token or per optimizer step, found as
the shortest shift under which the kernel names repeat), the GPU time per period, and the
kernels that take most of it. Usage: ncu_summary.py KERNELS.csv [BENCH-LINE.txt]"""
import csv
import re
import sys
from collections import defaultdict

UNITS = {"nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3, "ms": 1e-3, "second": 1.0, "s": 1.0}


def kernels(path):
    rows = list(csv.reader(line for line in open(path) if line.startswith('"')))
    head = rows[0]
    name, metric, unit, value = (head.index(c) for c in ("Kernel Name", "Metric Name", "Metric Unit", "Metric Value"))
    return [(r[name], float(r[value].replace(",", "")) * UNITS[r[unit]])
            for r in rows[1:] if len(r) > value and r[metric] == "gpu__time_duration.sum"]


def period(names, start):
    """The shortest shift p (at least two periods in the window) under which 99% of the
    names from `start` on repeat; a run of identical kernels cannot pass for a period."""
    n = len(names) - start
    for p in range(1, n // 2 + 1):
        window, misses = n - p, 0
        for i in range(window):
            if names[start + i] != names[start + i + p]:
                misses += 1
                if misses > 0.01 * window:
                    break
        else:
            return p
    return None


def main():
    ks = kernels(sys.argv[1])
    if not ks:
        sys.exit(f"{sys.argv[1]}: no kernel rows")
    names = [re.sub(r"\(.*", "", k) for k, _ in ks]
    start = len(ks) // 4  # past the window's edge, which may cut a period
    p = period(names, start)
    total = sum(t for _, t in ks)
    print(f"{len(ks)} kernels timed, {total * 1e3:.2f} ms of GPU time, {total / len(ks) * 1e6:.1f} us each")
    if p is None:
        print("no period found in the window")
        return
    one = ks[start:start + p]
    gpu = sum(t for _, t in one)
    print(f"period: {p} kernels, {gpu * 1e3:.3f} ms of GPU time")
    if len(sys.argv) > 2:
        print("bench:", open(sys.argv[2]).read().strip())
    by = defaultdict(lambda: [0, 0.0])
    for n, (_, t) in zip(names[start:start + p], one):
        by[n][0] += 1
        by[n][1] += t
    for n, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"  {t / gpu * 100:5.1f}%  {c:5d}x  {t / c * 1e6:8.2f} us  {n[:90]}")


main()
