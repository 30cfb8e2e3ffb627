#!/usr/bin/env python3
"""Markdown tables for docs/performance.md from the JSON files of bench/run_benchmarks.py.

Several runs of the same program may be given: for every benchmark the run with the lowest
time is kept (contention only ever adds time), and its foreign_cpu is shown where other
processes used more than 0.1 core during it (marked with *).

  bench/report.py bench/results/*.json > tables.md
"""
import json
import sys
from collections import defaultdict

UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
POLICIES = ["sequential", "chunked64", "chunked256", "associative", "auto"]


def parse(name):
    """'scan/f32/auto/batch:1/L:64/.../real_time' -> (('scan','f32','auto'), {'batch':1,...})"""
    head, args = [], {}
    for part in name.split("/"):
        if ":" in part:
            k, v = part.split(":", 1)
            if k != "min_time":
                args[k] = float(v) if "." in v else int(v)
        elif part != "real_time":
            head.append(part)
    return tuple(head), args


def load(files):
    best, contexts = {}, []
    for fn in files:
        with open(fn) as f:
            d = json.load(f)
        contexts.append((fn, d["context"]))
        for b in d["benchmarks"]:
            if b.get("run_type", "iteration") != "iteration":
                continue
            b["seconds"] = b["real_time"] * UNIT[b["time_unit"]]
            key = b["run_name"]
            if key not in best or b["seconds"] < best[key]["seconds"]:
                best[key] = b
    return best, contexts


def ms(s):
    v = s * 1e3
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def mark(b):
    fc = b.get("foreign_cpu", 0.0)
    return f" *{fc:.2f}" if fc > 0.1 else ""


def scan_tables(best):
    rows = defaultdict(dict)
    for b in best.values():
        head, args = parse(b["run_name"])
        if head[0] != "scan":
            continue
        rows[(head[1], args["batch"], args["L"], args["d_inner"], args["d_state"], args["threads"])][head[2]] = b
    out = ["| dtype | batch | L | d_inner | " + " | ".join(POLICIES) +
           " | fastest | sequential ÷ fastest | Auto's pick | floor bound | scan GB/s (fastest) |",
           "|---|---|---|---|" + "---|" * (len(POLICIES) + 5)]
    for key in sorted(rows, key=lambda k: (k[0], k[1], k[2], k[3])):
        r = rows[key]
        cells = []
        for p in POLICIES:
            b = r.get(p)
            cells.append(f"{ms(b['seconds'])} ({b['floor_frac']:.2f}){mark(b)}" if b else "–")
        present = [p for p in POLICIES[:-1] if p in r]
        bestp = min(present, key=lambda p: r[p]["seconds"])
        pick = r["auto"]["label"].split("auto:")[-1] if "auto" in r else "–"
        bound = r[bestp]["label"].split()[0].replace("floor:", "")
        gbs = r[bestp].get("bytes_per_second", 0) / 1e9
        ratio = r["sequential"]["seconds"] / r[bestp]["seconds"] if "sequential" in r else float("nan")
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells) +
                   f" | {bestp} | {ratio:.2f} | {pick} | {bound} | {gbs:.2f} |")
    return "\n".join(out)


def autorule_table(best):
    rows = defaultdict(dict)
    for b in best.values():
        head, args = parse(b["run_name"])
        if head[0] != "autorule":
            continue
        rows[(args["threads"], args["d_inner"], args["L"])][head[2]] = b
    out = ["| threads | d_inner (tiles) | L | " + " | ".join(POLICIES) +
           " | fastest | sequential ÷ fastest | Auto's pick | Auto ÷ fastest |",
           "|---|---|---|" + "---|" * (len(POLICIES) + 4)]
    for key in sorted(rows):
        r = rows[key]
        cells = [f"{ms(r[p]['seconds'])}{mark(r[p])}" if p in r else "–" for p in POLICIES]
        present = [p for p in POLICIES[:-1] if p in r]
        bestp = min(present, key=lambda p: r[p]["seconds"])
        pick = r["auto"]["label"].split("auto:")[-1] if "auto" in r else "–"
        ratio = r["auto"]["seconds"] / r[bestp]["seconds"] if "auto" in r else float("nan")
        sr = r["sequential"]["seconds"] / r[bestp]["seconds"] if "sequential" in r else float("nan")
        out.append(f"| {key[0]} | {key[1]} ({(key[1] + 15) // 16}) | {key[2]} | " + " | ".join(cells) +
                   f" | {bestp} | {sr:.2f} | {pick} | {ratio:.2f} |")
    return "\n".join(out)


def layer_table(best):
    out = ["| operator | ms | floor ms | floor_frac | floor bound |", "|---|---|---|---|---|"]
    order = ["all", "add_norm", "in_proj", "conv1d", "x_proj", "dt_proj", "scan", "out_proj"]
    found = {parse(b["run_name"])[0][1]: b for b in best.values() if parse(b["run_name"])[0][0] == "layer"}
    for op in order:
        if op in found:
            b = found[op]
            out.append(f"| {op} | {ms(b['seconds'])}{mark(b)} | {b['floor_ms']:.3g} | {b['floor_frac']:.3f} | "
                       f"{b['label'].replace('floor:', '')} |")
    return "\n".join(out)


def model_tables(best):
    pre = ["| model | params | L | batch | ms per prefill | text bytes/s | floor_frac | MFU (vs probe GEMM) |",
           "|---|---|---|---|---|---|---|---|"]
    dec = ["| model | batch | ms per step | text bytes/s | floor ms | floor_frac | floor bound |",
           "|---|---|---|---|---|---|---|"]
    for b in sorted(best.values(), key=lambda b: b["run_name"]):
        head, args = parse(b["run_name"])
        if head[0] != "model":
            continue
        if head[2] == "prefill":
            pre.append(f"| {head[1]} | {b['params_M']:.1f}M | {args['L']} | {args['batch']} | {ms(b['seconds'])}{mark(b)} | "
                       f"{b['text_bytes/s']:.0f} | {b['floor_frac']:.3f} | {b['mfu']:.3f} |")
        else:
            dec.append(f"| {head[1]} | {args['batch']} | {b['ms_per_step']:.3g}{mark(b)} | {b['text_bytes/s']:.1f} | "
                       f"{b['floor_ms']:.3g} | {b['floor_frac']:.3f} | {b['label'].replace('floor:', '')} |")
    return "\n".join(pre) + "\n\n" + "\n".join(dec)


def probe_table(best, contexts):
    out = ["| source | copy GB/s | triad GB/s | fp32 GEMM GFLOP/s | exp f32 G/s | exp f64 G/s | foreign cores |",
           "|---|---|---|---|---|---|---|"]
    for fn, c in contexts:
        if "probe_bandwidth_GBps" in c:
            out.append(f"| startup probes of {fn.split('/')[-1]} | {float(c['probe_copy_GBps']):.1f} | "
                       f"{float(c['probe_triad_GBps']):.1f} | {float(c['probe_gemm_f32_GFLOPs']):.0f} | "
                       f"{float(c['probe_exp_f32_Gps']):.2f} | {float(c['probe_exp_f64_Gps']):.2f} | "
                       f"{float(c.get('probe_foreign_cpu', -1)):.2f} |")
    p = {parse(b["run_name"])[0][1]: b for b in best.values() if parse(b["run_name"])[0][0] == "probe"}
    if p:
        g = lambda k, f: f(p[k]) if k in p else "–"
        out.append("| probe/* benchmarks (best) | " +
                   g("memory_copy", lambda b: f"{b['bytes_per_second'] / 1e9:.1f}") + " | " +
                   g("memory_triad", lambda b: f"{b['bytes_per_second'] / 1e9:.1f}") + " | " +
                   g("gemm_f32", lambda b: f"{b['flops'] / 1e9:.0f}") + " | " +
                   g("exp_f32", lambda b: f"{b['exps'] / 1e9:.2f}") + " | " +
                   g("exp_f64", lambda b: f"{b['exps'] / 1e9:.2f}") + " | |")
    return "\n".join(out)


def main(files):
    best, contexts = load(files)
    print("## Probes\n\n" + probe_table(best, contexts))
    print("\n## Scan grid (ms per call (floor_frac))\n\n" + scan_tables(best))
    print("\n## Auto-rule sweep (batch 1, d_state 16; ms per call)\n\n" + autorule_table(best))
    print("\n## One layer\n\n" + layer_table(best))
    print("\n## Models\n\n" + model_tables(best))


if __name__ == "__main__":
    main(sys.argv[1:])
