#!/usr/bin/env python3
"""Per-kernel time breakdown from an Nsight Compute CSV of gpu__time_duration.sum, e.g.
   ncu --clock-control none --metrics gpu__time_duration.sum --csv --launch-count 3000 \
       build-devslim/bench_cuda_model --benchmark_filter='TrainStep/bf16/1/' > ncu_train.csv
   python3 bench/cuda/ncu_kernel_times.py ncu_train.csv
Sums the durations by kernel name (template arguments kept, parameters dropped) and prints the
largest first with their share and launch count. ncu serialises the kernels: the sum is the
device time of the profiled launches, not a wall-clock step time."""
import collections
import csv
import re
import sys

SCALE_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def main(path, top=45):
    rows = list(csv.reader(open(path)))
    head = [i for i, r in enumerate(rows) if r and r[0] == "ID"]
    if not head:
        sys.exit(f"{path}: no ncu CSV header (ID, ...) found")
    h = rows[head[0]]
    col = {k: i for i, k in enumerate(h)}
    total = collections.defaultdict(float)
    count = collections.Counter()
    for r in rows[head[0] + 1:]:
        if len(r) < len(h) or r[col["Metric Name"]] != "gpu__time_duration.sum":
            continue
        name = re.sub(r"\(.*", "", r[col["Kernel Name"]])[:90]
        us = float(r[col["Metric Value"]].replace(",", "")) * SCALE_US[r[col["Metric Unit"]]]
        total[name] += us
        count[name] += 1
    t = sum(total.values())
    print(f"launches {sum(count.values())}, device time {t / 1e3:.2f} ms")
    for name, us in sorted(total.items(), key=lambda x: -x[1])[:top]:
        print(f"{us / 1e3:9.3f} ms {100 * us / t:5.1f}% n={count[name]:5d} {us / count[name]:9.1f} us/launch  {name}")


if __name__ == "__main__":
    main(sys.argv[1])
