#!/usr/bin/env python3
"""The performance issue's goal-1 table from saved benchmark runs.

Usage:
    moevqa bench all --json > m1.json; python bench/torch_block.py all > t1.jsonl
    (and again, in turn, for m2.json / t2.jsonl), then
    python bench/goal1_table.py --moevqa m1.json m2.json --torch t1.jsonl t2.jsonl

moevqa's files are `bench all --json` output (one JSON array); PyTorch's are
`torch_block.py all` output (a JSON object per line). Rows are matched on
(preset, batch, k). Prints a Markdown table (milliseconds from the first
run of each, efficiency from every run, printed to two decimals, so a "yes" column
says which rows reach the goal's 0.9 unrounded in every moevqa run) and
how many do. Needs only the standard library.
"""
import argparse
import json
import sys

GOAL = 0.9


KEYS = ("preset", "batch", "k", "dense_ms", "sparse_ms", "efficiency")


def read_rows(path):
    with open(path) as f:
        text = f.read().strip()
    if text.startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    for i, r in enumerate(rows):
        missing = [k for k in KEYS if k not in r]
        if missing:
            raise ValueError(f"{path}: row {i + 1} has no {', '.join(missing)}")
    return {(r["preset"], r["batch"], r["k"]): r for r in rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--moevqa", nargs="+", required=True, help="bench all --json files")
    ap.add_argument("--torch", nargs="*", default=[], help="torch_block.py all files")
    a = ap.parse_args()
    try:
        ours = [read_rows(p) for p in a.moevqa]
        theirs = [read_rows(p) for p in a.torch]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    effs = lambda runs, key: " / ".join(f"{r[key]['efficiency']:.2f}" for r in runs if key in r)
    print("| preset | batch | k | moevqa dense / sparse ms (run 1) | moevqa efficiency | "
          f">= {GOAL} in every run | "
          "PyTorch dense / sparse ms (run 1) | PyTorch efficiency | moevqa sparse / PyTorch dense | "
          "moevqa dense / PyTorch dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    met = 0
    for key, m in ours[0].items():
        meets = all(key in run and run[key]["efficiency"] >= GOAL for run in ours)
        met += meets
        t = theirs[0].get(key) if theirs else None
        torch_cols = (
            f"{t['dense_ms']:.2f} / {t['sparse_ms']:.2f} | {effs(theirs, key)} | "
            f"{m['sparse_ms'] / t['dense_ms']:.2f} | {m['dense_ms'] / t['dense_ms']:.2f}"
            if t else "not run | | |"
        )
        print(f"| {key[0]} | {key[1]} | {key[2]} | {m['dense_ms']:.2f} / {m['sparse_ms']:.2f} | "
              f"{effs(ours, key)} | {'yes' if meets else 'no'} | {torch_cols} |")
    print(f"\nRows with efficiency >= {GOAL} in all {len(ours)} moevqa runs: {met} of {len(ours[0])}")


if __name__ == "__main__":
    main()
