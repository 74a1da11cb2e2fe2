#!/usr/bin/env python3
"""Accuracy per question type of several evaluations, side by side.

Usage:
    moevqa eval --run RUN_A --data DIR --json > a.json   (and b.json, ...)
    python bench/family_table.py a.json b.json ...

Each file is the output of one `moevqa eval --json` on a CLEVR-format run
(one JSON object; with a sweep over k, one per line, each a column). Prints
a Markdown table: a row per question type, a column per evaluation (headed
by its k and its file's name), then the type's majority-answer baseline (`majority_by_family`
of the first file: the share of the type's commonest right answer in the
split), and an "all" row with the overall accuracy beside
`majority_accuracy`. Needs only the standard library.
"""
import json
import os
import sys


def read_reports(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(paths):
    if not paths:
        sys.exit(__doc__)
    named = [(os.path.splitext(os.path.basename(p))[0], r) for p in paths for r in read_reports(p)]
    reports = [r for _, r in named]
    if not reports:
        sys.exit("no eval reports in " + ", ".join(paths))
    families = sorted({f for r in reports for f in r["by_family"]})
    majority = reports[0].get("majority_by_family", {})
    print("| question type | " + " | ".join(f"k = {r['k']} ({name})" for name, r in named) + " | majority answer |")
    print("|---" * (len(reports) + 2) + "|")
    for f in families:
        cells = [f"{r['by_family'][f]:.2f}" if f in r["by_family"] else "-" for r in reports]
        m = majority.get(f)
        base = f"{m['accuracy']:.2f} ({m['answer']})" if m else "-"
        print(f"| {f} | " + " | ".join(cells) + f" | {base} |")
    cells = [f"**{r['accuracy']:.2f}**" for r in reports]
    prior = reports[0].get("majority_accuracy")
    base = f"{prior:.2f}" if prior is not None else "-"
    print("| **all** | " + " | ".join(cells) + f" | {base} |")


if __name__ == "__main__":
    main(sys.argv[1:])
