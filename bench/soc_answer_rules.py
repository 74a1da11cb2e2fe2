#!/usr/bin/env python3
"""Which simple rule a Sort-of-CLEVR model's relational answers follow.

For each relational question type, the share of the model's answers that
agree with: the right answer, the asked object's own shape, the commoner
shape among the five other objects, the shape of the closest and of the
furthest other object; for count_same_shape, the count of the asked
object's shape and the count of the commoner shape. A model that has not
learned to relate the asked object to the others follows one of the
object-free rules more often than the right answer.

Standard library only. Usage:

    moevqa predict --run RUN --data DATA --split val --out pred.json
    python bench/soc_answer_rules.py --data DATA --predictions pred.json [--split val]
"""

import argparse
import collections
import json
import os
import sys


def load(path, key):
    with open(path) as f:
        return json.load(f)[key]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the generated Sort-of-CLEVR directory")
    ap.add_argument("--predictions", required=True, help="`moevqa predict` output on the split")
    ap.add_argument("--split", default="val")
    a = ap.parse_args()
    questions = load(os.path.join(a.data, "questions", f"CLEVR_{a.split}_questions.json"), "questions")
    scenes = load(os.path.join(a.data, "scenes", f"CLEVR_{a.split}_scenes.json"), "scenes")
    with open(a.predictions) as f:
        preds = json.load(f)
    if len(preds) != len(questions):
        sys.exit(f"error: {a.predictions}: {len(preds)} predictions for {len(questions)} questions")
    agree = collections.defaultdict(collections.Counter)
    total = collections.Counter()
    for q, p in zip(questions, preds):
        if p["image_filename"] != q["image_filename"]:
            sys.exit(f"error: {a.predictions}: predictions not in the order of the questions")
        family = q["program"][-1]["function"]
        if family not in ("closest_shape", "furthest_shape", "count_same_shape"):
            continue
        objects = scenes[q["image_index"]]["objects"]
        colour = q["program"][1]["value_inputs"][0]
        asked = next(o for o in objects if o["color"] == colour)
        others = [o for o in objects if o is not asked]
        by_distance = sorted(others, key=lambda o: (o["x"] - asked["x"]) ** 2 + (o["y"] - asked["y"]) ** 2)
        shapes = collections.Counter(o["shape"] for o in others)
        given = p["answer"]
        total[family] += 1
        rules = {"right answer": q["answer"]}
        if family == "count_same_shape":
            everyone = collections.Counter(o["shape"] for o in objects)
            rules["count of the commoner shape (all six)"] = str(max(everyone.values()))
        else:
            rules["asked object's own shape"] = asked["shape"]
            rules["commoner shape among the other five"] = shapes.most_common(1)[0][0]
            rules["shape of the closest other"] = by_distance[0]["shape"]
            rules["shape of the furthest other"] = by_distance[-1]["shape"]
        for name, answer in rules.items():
            agree[family][name] += given == answer
    for family in sorted(total):
        n = total[family]
        print(f"{family} ({n} questions): answers agreeing with each rule")
        for name, c in agree[family].items():
            print(f"  {name:<40} {100 * c / n:6.2f}%")


if __name__ == "__main__":
    main()
