#!/usr/bin/env python3
"""Run the benchmark programs with JSON output, on a quiet machine (docs/performance.md).

The development machines are shared: a compile on the other core halves every parallel loop
and stalls OpenMP barriers. So the programs run with MAMBABYTE_BENCH_WAIT_QUIET=<--quiet>:
before its probes and before each benchmark's timed loop a program waits until other
processes use less than that many cores (bench_util.hpp: wait_for_quiet), and every benchmark
records the counter foreign_cpu (cores other processes used during its timed loop). After a
program's run, the benchmarks with foreign_cpu >= --quiet are run again (--retries times at
most), each retry into its own JSON file; report.py keeps the fastest run of every benchmark.

  bench/run_benchmarks.py --build-dir build-bench --out bench/results --tag run1 \
      [--programs bench_scan bench_model] [-- extra benchmark flags]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time


def busy_seconds():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / tick  # user nice system irq softirq steal


def wait_quiet(quiet, settle, timeout):
    """Wait until the machine's busy cores stay below `quiet` for `settle` seconds."""
    start = time.time()
    calm = 0.0
    prev = busy_seconds()
    while calm < settle:
        time.sleep(1.0)
        cur = busy_seconds()
        load = cur - prev
        prev = cur
        calm = calm + 1.0 if load < quiet else 0.0
        if time.time() - start > timeout:
            print(f"run_benchmarks: machine not quiet after {timeout:.0f} s (last {load:.2f} cores busy); running anyway",
                  file=sys.stderr)
            return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default="build-bench")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"))
    ap.add_argument("--programs", nargs="+", default=["bench_scan", "bench_model"])
    ap.add_argument("--quiet", type=float, default=0.15, help="cores other processes may use (default 0.15)")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds of quiet before starting (default 5)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="give up waiting after this many seconds")
    ap.add_argument("--retries", type=int, default=3, help="re-runs of contended benchmarks (default 3)")
    ap.add_argument("extra", nargs="*", help="extra flags for the programs (after --)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ, MAMBABYTE_BENCH_WAIT_QUIET=str(a.quiet))
    for prog in a.programs:
        exe = os.path.join(a.build_dir, "bench", prog)
        filt = None
        for attempt in range(a.retries + 1):
            suffix = "" if attempt == 0 else f"-retry{attempt}"
            out = os.path.join(a.out, f"{prog}-{a.tag}{suffix}.json")
            wait_quiet(a.quiet, a.settle, a.timeout)
            cmd = [exe, f"--benchmark_out={out}", "--benchmark_out_format=json", *a.extra]
            if filt:
                cmd.append(f"--benchmark_filter={filt}")
            print("run_benchmarks:", " ".join(cmd), flush=True)
            t = time.time()
            rc = subprocess.call(cmd, env=env)
            print(f"run_benchmarks: {prog} took {time.time() - t:.0f} s (rc {rc})", flush=True)
            if rc != 0:
                return rc
            with open(out) as f:
                runs = json.load(f)["benchmarks"]
            noisy = [b["name"] for b in runs if b.get("foreign_cpu", 0.0) >= a.quiet]
            if not noisy:
                break
            print(f"run_benchmarks: {len(noisy)} benchmarks were contended: {' '.join(noisy)}", flush=True)
            filt = "^(" + "|".join(re.escape(n) for n in noisy) + ")$"
    return 0


if __name__ == "__main__":
    sys.exit(main())
