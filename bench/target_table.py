#!/usr/bin/env python3
"""Prints the one-GPU target table (speed and memory) from the logs of
bench/run_gpu.sh, every figure from this run's logs:

  bench.log       reformer bench --config configs/bench-peer.yaml --lengths 16384,65536,1048576
  breakdown.txt   reformer bench ... --lengths 65536 --breakdown (attention TFLOP/s)
  enwik8.log      reformer bench --config configs/enwik8.yaml --lengths 65536
  lean-1m.log     reformer bench ... --lengths 1048576 in the leanest layout (one
                  head and one hash round per call, no layer kept)
  lean-1m-12.log  the same with 12 layers
  plan.txt        reformer plan --config configs/bench-peer.yaml (longest that fits this GPU)
  peer-hf.log, peer-flash.log   the peers' JSON lines (shared/peers/peer_bench.py)

Usage: bench/target_table.py OUT_DIR
"""
import json
import os
import re
import sys


def cuda_rows(path):
    """{length: (tokens/s, peak GiB, planned GiB)} from the
    `| cuda | L | ms | tok/s | TFLOP/s | MFU | peak | planned | host |` rows."""
    rows = {}
    if not os.path.exists(path):
        return rows
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0] == "cuda" and cells[1].isdigit():
            rows[int(cells[1])] = (float(cells[3]), float(cells[6]), float(cells[7]))
    return rows


def attention_tflops(path):
    """Forward and backward attention together: GFLOP / ms of both ops."""
    gflop = ms = 0.0
    if not os.path.exists(path):
        return None
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0] in ("chunked_attention_forward", "chunked_attention_backward"):
            ms += float(cells[2])
            gflop += float(cells[4])
    return gflop / ms if ms > 0 else None


def peers(out, length):
    found = {}
    for p in ("hf", "flash"):
        path = os.path.join(out, f"peer-{p}.log")
        if not os.path.exists(path):
            continue
        for line in open(path):
            # The first line of each peer at this length: HF in fp32, flash
            # without activation checkpointing.
            if line.startswith("{"):
                j = json.loads(line)
                if j.get("L") == length and "ckpt" not in j["name"]:
                    found.setdefault(p, j)
    return found


def longest(path):
    if not os.path.exists(path):
        return None
    m = re.search(r"longest model.max_len that fits in ([\d.]+ \w+): (\d+)", open(path).read())
    return (m.group(1), int(m.group(2))) if m else None


def main():
    out = sys.argv[1]
    ours = cuda_rows(os.path.join(out, "bench.log"))
    enw = cuda_rows(os.path.join(out, "enwik8.log"))
    lean = cuda_rows(os.path.join(out, "lean-1m.log"))
    lean12 = cuda_rows(os.path.join(out, "lean-1m-12.log"))
    att = attention_tflops(os.path.join(out, "breakdown.txt"))
    pe = peers(out, 65536)
    lo = longest(os.path.join(out, "plan.txt"))

    def k(x):
        return f"{x / 1000:.1f}K"

    rows = []
    if 65536 in ours:
        tok = ours[65536][0]
        vs = []
        if "hf" in pe:
            vs.append(f"{tok / pe['hf']['tok_s']:.2f}x HF ({k(pe['hf']['tok_s'])})")
        if "flash" in pe:
            vs.append(f"{tok / pe['flash']['tok_s']:.2f}x flash ({k(pe['flash']['tok_s'])})")
        rows.append(("tokens/s at 64K", f"{k(tok)}" + (", " + ", ".join(vs) if vs else ""),
                     ">= 650K", tok >= 650e3))
    if 16384 in ours and 1048576 in ours:
        r = ours[1048576][0] / ours[16384][0]
        rows.append(("tokens/s at 1M over 16K", f"{r:.2f} ({k(ours[1048576][0])} / {k(ours[16384][0])})",
                     ">= 0.9", r >= 0.9))
    if 1048576 in lean:
        t, g, _ = lean[1048576]
        got = f"{g:.2f} GiB at {k(t)} tokens/s (6 layers, leanest layout)"
        met = g <= 24
        if 1048576 in lean12:
            t12, g12, _ = lean12[1048576]
            got += f"; 12 layers {g12:.2f} GiB at {k(t12)}"
            met = met and g12 <= 24
        rows.append(("peak memory at 1M", got, "<= 24 GiB, and say it for 12 layers", met))
    if lo:
        rows.append(("longest sequence on this GPU (plan)", f"{lo[1]:,} tokens in {lo[0]}",
                     ">= 4M", lo[1] >= 4 * 1024 * 1024))
    if 65536 in enw:
        rows.append(("12-layer enwik8 recipe at 64K", k(enw[65536][0]), ">= 330K", enw[65536][0] >= 330e3))
    worst = None
    for name, table, length in (("64K", ours, 65536), ("1M", ours, 1048576),
                                ("1M leanest", lean, 1048576), ("1M leanest, 12 layers", lean12, 1048576)):
        if length in table:
            _, peak, plan = table[length]
            err = abs(plan - peak) / peak
            worst = (err, name) if worst is None or err > worst[0] else worst
    if worst is not None:
        rows.append(("`reformer plan` against the measured peak", f"worst {100 * worst[0]:.1f}% ({worst[1]})",
                     "within 10% at 64K and 1M", worst[0] <= 0.10))
    if att is not None:
        rows.append(("attention kernels at 64K", f"{att:.1f} TFLOP/s", ">= 250 TFLOP/s", att >= 250))
    print("| figure | measured | target | met |")
    print("| --- | --- | --- | --- |")
    for name, got, want, met in rows:
        print(f"| {name} | {got} | {want} | {'yes' if met else 'no'} |")


if __name__ == "__main__":
    main()
