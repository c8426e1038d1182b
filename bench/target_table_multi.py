#!/usr/bin/env python3
"""Prints the many-GPU target table from the logs of bench/run_multi_gpu.sh,
every figure from that run's logs:

  bench-1gpu.log       reformer bench on one GPU at the dp and sp lengths
  bench-dp.log         dp N at the dp length per GPU
  bench-dpb*.log       the same with other gradient bucket sizes (optional)
  bench-sp.log         sp N at the sp length
  bench-long*.log      sp N at the longest lengths tried (optional)

The sp target is 3.4x one GPU on 4 GPUs; with other counts the table
holds sp N to the same 0.85 per GPU.

Usage: bench/target_table_multi.py OUT_DIR GPUS
"""
import glob
import os
import re
import sys


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def one_gpu(path):
    """{length: tokens/s} from the single-GPU bench table."""
    rows = {}
    if os.path.exists(path):
        for line in open(path):
            c = cells(line)
            if len(c) >= 4 and c[0] == "cuda" and c[1].isdigit():
                rows[int(c[1])] = float(c[3])
    return rows


def layout_row(path):
    """The last `| dp A x sp B (...) | ...` row of a multi-rank bench log, by column name."""
    if not os.path.exists(path):
        return None
    header, row = None, None
    for line in open(path):
        c = cells(line)
        if c and c[0] == "layout":
            header = c
        elif header and c and re.match(r"dp \d+ x sp \d+", c[0]):
            row = dict(zip(header, c))
    return row


def num(s):
    return float(str(s).rstrip("%").replace(",", ""))


def main():
    out, n = sys.argv[1], int(sys.argv[2])
    one = one_gpu(os.path.join(out, "bench-1gpu.log"))
    dp = layout_row(os.path.join(out, "bench-dp.log"))
    sp = layout_row(os.path.join(out, "bench-sp.log"))
    rows = []
    if dp and num(dp["length"]) in one:
        base = one[int(num(dp["length"]))]
        eff = num(dp["tokens/s"]) / (n * base)
        rows.append((f"dp weak scaling, {int(num(dp['length']))} tokens per GPU",
                     f"{100 * eff:.1f}% ({num(dp['tokens/s']):,.0f} against {n} x {base:,.0f})",
                     ">= 95%", eff >= 0.95))
    for path in [os.path.join(out, "bench-dp.log")] + sorted(glob.glob(os.path.join(out, "bench-dpb*.log"))):
        r = layout_row(path)
        if not r:
            continue
        tag = os.path.basename(path)[len("bench-"):-len(".log")]
        ratio = num(r["reduce GB/s (bus)"]) / num(r["one-call GB/s (bus)"])
        rows.append((f"gradient all-reduce against one NCCL call ({tag})",
                     f"{100 * ratio:.0f}% ({r['reduce GB/s (bus)']} / {r['one-call GB/s (bus)']} GB/s)",
                     ">= 90%", ratio >= 0.9))
        hidden = num(r["reduce hidden"]) / 100
        rows.append((f"all-reduce hidden behind the backward, step difference ({tag})",
                     r["reduce hidden"], ">= 80%", hidden >= 0.8))
        if "reduce hidden (wait)" in r:
            wait = num(r["reduce hidden (wait)"]) / 100
            rows.append((f"all-reduce hidden behind the backward, exposed wait ({tag})",
                         f"{r['reduce hidden (wait)']} ({r['ms exposed wait']} ms of {r['ms reduce alone']})",
                         ">= 80%", wait >= 0.8))
    if sp and num(sp["length"]) in one:
        base = one[int(num(sp["length"]))]
        x = num(sp["tokens/s"]) / base
        want = 3.4 if n == 4 else 0.85 * n
        exch = ""
        if sp.get("ms sp exchanges", "-") != "-":
            exch = f"; exchanges {sp['ms sp exchanges']} of {sp['ms/step']} ms a step"
        rows.append((f"sp {n} strong scaling at {int(num(sp['length']))} tokens",
                     f"{x:.2f}x ({num(sp['tokens/s']):,.0f} against {base:,.0f}{exch})",
                     f">= {want:.1f}x", x >= want))
    longest = 0
    for path in glob.glob(os.path.join(out, "bench-long*.log")):
        r = layout_row(path)
        if r:
            longest = max(longest, int(num(r["length"])))
    if longest:
        rows.append((f"longest sequence trained on {n} GPUs", f"{longest:,} tokens",
                     ">= 16M on 4", longest >= 16 * 1024 * 1024))
    print(f"| figure ({n} GPUs) | measured | target | met |")
    print("| --- | --- | --- | --- |")
    for name, got, want, met in rows:
        print(f"| {name} | {got} | {want} | {'yes' if met else 'no'} |")


if __name__ == "__main__":
    main()
