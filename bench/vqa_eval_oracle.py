#!/usr/bin/env python3
"""Golden-case generator for src/metrics/vqa.rs (not run in CI).

Holds an independent Python port of the official VQA v2 evaluation
(GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py, the
Python 3 version whose VQA helper takes a questions file), reproducing the
script's steps and data tables as they are, quirks included, then scores a
few hundred random tricky cases with it and writes them, with the answers,
to tests/fixtures/vqa_eval_golden.json.

Usage:  python3 bench/vqa_eval_oracle.py [--seed N] [--cases N] [--out PATH]

Floats are written as Python repr() strings so that the Rust test can parse
them exactly (str::parse is correctly rounded; serde_json's default float
parser is not guaranteed to be).

The official script sums with the built-in sum(), which CPython changed:
plain left-to-right addition up to 3.11, Neumaier-compensated float items
from 3.12 (ints after the first float added plainly), ints compensated as
well from 3.14. "expected" follows Python <= 3.11; "expected_py312" and
"expected_py314" hold only the numbers those versions print differently.
Every sum is also checked against the running interpreter's own sum().
"""

import argparse
import json
import random
import re
import sys

# ---------------------------------------------------------------------------
# The official script's data tables (copied as data, order kept).
# ---------------------------------------------------------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've",
    "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}

MANUAL_MAP = {
    'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4',
    'five': '5', 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10',
}

ARTICLES = ['a', 'an', 'the']

# The lookbehind is misspelt in the original ("(?!<=" is a negative
# lookahead for the text "<=digit"), so it never rejects anything.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = [';', r"/", '[', ']', '"', '{', '}',
         '(', ')', '=', '+', '\\', '_', '-',
         '>', '<', '@', '`', ',', '?', '!']


# ---------------------------------------------------------------------------
# Sums as the interpreter's built-in sum() does them.
# ---------------------------------------------------------------------------

def sum_py311(values):
    """Built-in sum() up to Python 3.11: plain left-to-right addition
    (ints stay exact ints until the first float)."""
    total = 0
    for v in values:
        total = total + v
    return total


def sum_py312(values):
    """Built-in sum() from Python 3.12 (CPython bltinmodule.c): exact int
    accumulation until the first float, then Neumaier compensation over the
    floats; ints met in the float phase are added without compensation."""
    it = iter(values)
    i_result = 0
    for v in it:
        if isinstance(v, int):
            i_result += v
            continue
        f_result = i_result + v  # the first float: one plain addition
        c = 0.0
        for x in it:
            if isinstance(x, float):
                t = f_result + x
                if abs(f_result) >= abs(x):
                    c += (f_result - t) + x
                else:
                    c += (x - t) + f_result
                f_result = t
            else:
                f_result += float(x)
        if c and c == c and abs(c) != float('inf'):
            f_result += c
        return f_result
    return i_result


def sum_py314(values):
    """Built-in sum() from Python 3.14 (gh-122234): as in 3.12, but ints met
    in the float phase are compensated too."""
    it = iter(values)
    i_result = 0
    for v in it:
        if isinstance(v, int):
            i_result += v
            continue
        f_result = i_result + v
        c = 0.0
        for x in it:
            x = float(x)
            t = f_result + x
            if abs(f_result) >= abs(x):
                c += (f_result - t) + x
            else:
                c += (x - t) + f_result
            f_result = t
        if c and c == c and abs(c) != float('inf'):
            f_result += c
        return f_result
    return i_result


SUMS = {"py311": sum_py311, "py312": sum_py312, "py314": sum_py314}


def checked_sum(values, mode):
    values = list(values)
    native = sum(values)
    here = "py314" if sys.version_info >= (3, 14) else "py312" if sys.version_info >= (3, 12) else "py311"
    mine = SUMS[here](values)
    if not (native == mine and type(native) is type(mine)):
        raise AssertionError(f"sum emulation disagrees with this Python: {values!r}")
    return SUMS[mode](values)


# ---------------------------------------------------------------------------
# The evaluation, step by step as the official script takes it.
# ---------------------------------------------------------------------------

class OfficialEvalPort:
    def __init__(self, annotations, results, sum_mode="py311", n=2):
        # VQA.createIndex: question id -> annotation (the last one wins).
        self.qa = {}
        for ann in annotations:
            self.qa[ann['question_id']] = ann
        self.ques_ids = [ann['question_id'] for ann in annotations]
        # VQA.loadRes: the result ids must be the annotation ids as sets.
        res_ids = [r['question_id'] for r in results]
        assert set(res_ids) == set(self.ques_ids), "results do not match"
        self.res_qa = {}
        for r in results:
            self.res_qa[r['question_id']] = r
        self.manual_map = dict(MANUAL_MAP)  # setdefault() grows it
        self.sum_mode = sum_mode
        self.n = n
        self.accuracy = {}
        self.eval_qa = {}

    def _sum(self, values):
        return checked_sum(values, self.sum_mode)

    def process_punctuation(self, in_text):
        out_text = in_text
        for p in PUNCT:
            # The tests look at the input; the replacement edits the output.
            if (p + ' ' in in_text or ' ' + p in in_text) or (re.search(COMMA_STRIP, in_text) != None):
                out_text = out_text.replace(p, '')
            else:
                out_text = out_text.replace(p, ' ')
        # The third positional argument of Pattern.sub is the count: the
        # flag re.UNICODE (32) lands there.
        out_text = PERIOD_STRIP.sub("", out_text, re.UNICODE)
        return out_text

    def process_digit_article(self, in_text):
        words = []
        for word in in_text.lower().split():
            word = self.manual_map.setdefault(word, word)
            if word not in ARTICLES:
                words.append(word)
        for i, word in enumerate(words):
            if word in CONTRACTIONS:
                words[i] = CONTRACTIONS[word]
        return ' '.join(words)

    def normalize_prediction(self, text):
        text = text.replace('\n', ' ')
        text = text.replace('\t', ' ')
        text = text.strip()
        text = self.process_punctuation(text)
        text = self.process_digit_article(text)
        return text

    def evaluate(self):
        acc_qa = []
        acc_ques_type = {}
        acc_ans_type = {}
        per_question = []
        for qid in self.ques_ids:
            gts = self.qa[qid]
            res_ans = self.normalize_prediction(self.res_qa[qid]['answer'])
            gt_acc = []
            gt_answers = [a['answer'] for a in gts['answers']]
            if len(set(gt_answers)) > 1:
                for a in gts['answers']:
                    a['answer'] = self.process_punctuation(a['answer'])
            for datum in gts['answers']:
                # Whole answer records are compared, so answer_id keeps a
                # human from being dropped together with its duplicates.
                others = [item for item in gts['answers'] if item != datum]
                matching = [item for item in others if item['answer'] == res_ans]
                acc = min(1, float(len(matching)) / 3)
                gt_acc.append(acc)
            avg = float(self._sum(gt_acc)) / len(gt_acc)
            acc_qa.append(avg)
            acc_ques_type.setdefault(gts['question_type'], []).append(avg)
            acc_ans_type.setdefault(gts['answer_type'], []).append(avg)
            per_question.append((qid, avg, res_ans))
        n = self.n
        self.accuracy['overall'] = round(100 * float(self._sum(acc_qa)) / len(acc_qa), n)
        self.accuracy['perQuestionType'] = {
            k: round(100 * float(self._sum(v)) / len(v), n) for k, v in acc_ques_type.items()}
        self.accuracy['perAnswerType'] = {
            k: round(100 * float(self._sum(v)) / len(v), n) for k, v in acc_ans_type.items()}
        return per_question


# ---------------------------------------------------------------------------
# Random tricky cases.
# ---------------------------------------------------------------------------

WORDS = ["yes", "no", "Yes", "NO", "red", "Red", "dog", "Dog", "man", "tennis", "2", "10", "0",
         "1,000", "3.5", "2.", "12:30", "o'clock", "left", "ΟΔΟΣ", "ΣΑΣ", "İstanbul", "straße", "café",
         "٣", "５", "x"]
NUMBER_WORDS = ["none", "zero", "one", "Two", "THREE", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]
ARTICLE_WORDS = ["a", "an", "the", "The", "A", "AN"]
CONTRACTION_WORDS = ["dont", "Dont", "im", "Im", "ive", "Ive", "yall'll", "yall", "somebody'd", "let's",
                     "wheres", "'ows'at", "twas", "I'dve", "i'dve", "cant", "wont", "don't", "yalll"]
PUNCT_EXTRA = PUNCT + [".", ":", "'", "...", ".5", "1.", "..", "&", "#"]
SPACES = [" ", " ", " ", "  ", "\t", "\n", "\x1c", "\x1f", "\x85", "\xa0", "\u2028", "\u3000", "\u200b", ""]


def random_text(rng, max_tokens=4):
    parts = []
    for _ in range(rng.randint(0, max_tokens)):
        kind = rng.random()
        if kind < 0.30:
            tok = rng.choice(WORDS)
        elif kind < 0.45:
            tok = rng.choice(NUMBER_WORDS)
        elif kind < 0.58:
            tok = rng.choice(ARTICLE_WORDS)
        elif kind < 0.72:
            tok = rng.choice(CONTRACTION_WORDS)
        else:
            tok = rng.choice(PUNCT_EXTRA)
        parts.append(tok)
        parts.append(rng.choice(SPACES))
    text = "".join(parts)
    if rng.random() < 0.3:
        text = rng.choice(SPACES) + text
    if rng.random() < 0.03:
        # Past the 32-period cap.
        text = text + "." * rng.randint(30, 40) + rng.choice(["", "x", "5", "."])
    return text


def random_humans(rng, port, prediction):
    """Ten answers with a chosen amount of agreement with the prediction."""
    norm = port.normalize_prediction(prediction)
    pool = [norm, prediction, norm.upper(), norm + " ", random_text(rng, 2),
            random_text(rng, 2), "yes", "no", "2"]
    style = rng.random()
    if style < 0.15:
        return [rng.choice(pool)] * 10
    k = rng.choice([0, 1, 2, 3, 4] if style < 0.6 else list(range(11)))
    humans = [norm] * k + [rng.choice(pool) for _ in range(10 - k)]
    rng.shuffle(humans)
    return humans


QUESTION_TYPES = ["what color is the", "how many", "is the", "what is", "none of the above", "Is this"]
ANSWER_TYPES = ["yes/no", "number", "other"]


def make_case(rng, port_for_norm, nq):
    qids = rng.sample(range(-5, 10**9), nq)
    questions = []
    for qid in qids:
        pred = random_text(rng)
        questions.append({
            "question_id": qid,
            "question_type": rng.choice(QUESTION_TYPES),
            "answer_type": rng.choice(ANSWER_TYPES),
            "humans": random_humans(rng, port_for_norm, pred),
            "prediction": pred,
        })
    return questions


def score_case(questions, sum_mode):
    annotations = []
    for q in questions:
        annotations.append({
            "question_id": q["question_id"], "image_id": 0,
            "question_type": q["question_type"], "answer_type": q["answer_type"],
            "multiple_choice_answer": q["humans"][0],
            "answers": [{"answer": h, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, h in enumerate(q["humans"])],
        })
    results = [{"question_id": q["question_id"], "answer": q["prediction"]} for q in questions]
    random.Random(len(results)).shuffle(results)
    port = OfficialEvalPort(annotations, results, sum_mode=sum_mode)
    per_q = port.evaluate()
    return {
        "overall": repr(port.accuracy["overall"]),
        "per_answer_type": {k: repr(v) for k, v in port.accuracy["perAnswerType"].items()},
        "per_question_type": {k: repr(v) for k, v in port.accuracy["perQuestionType"].items()},
        "questions": len(questions),
        "per_question": [repr(float(avg)) for _, avg, _ in per_q],
        "normalized": [norm for _, _, norm in per_q],
    }


def round_cases(rng):
    """round(x, n) on ties, near-ties and plain values, as [x, n, result]."""
    xs = [2.675, 0.125, 0.375, 1.005, 50.005, 66.665, 33.335, 0.045, -0.125, 2.5, 3.5, 0.5,
          1e-320, 123456789.125, 99.995, 99.99499999999999, 1e16 + 2, 0.0, -0.0]
    xs += [k / 8 for k in range(-20, 200)][::7]
    xs += [100 * k / 30 / n for n in (3, 7, 2000) for k in range(0, 60, 7)]
    xs += [rng.randint(0, 10**6) / 1000 + rng.choice([0, 5e-4, -5e-4]) for _ in range(60)]
    xs += [rng.uniform(-1e3, 1e3) for _ in range(30)]
    out = []
    for x in xs:
        for n in (0, 1, 2, 3) if rng.random() < 0.2 else (2,):
            out.append([repr(float(x)), n, repr(round(float(x), n))])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--cases", type=int, default=170)
    ap.add_argument("--big-cases", type=int, default=4)
    ap.add_argument("--out", default="tests/fixtures/vqa_eval_golden.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    norm_port = OfficialEvalPort([], [])
    cases = []
    sizes = [rng.randint(1, 5) for _ in range(args.cases)] + [30] * args.big_cases
    for nq in sizes:
        questions = make_case(rng, norm_port, nq)
        expected = score_case(questions, "py311")
        case = {"questions": questions, "expected": expected}
        # Only what Python 3.12/3.13 and 3.14+ would print differently is stored.
        for mode in ("py312", "py314"):
            other = score_case(questions, mode)
            diff = {k: v for k, v in other.items() if expected.get(k) != v}
            if diff:
                case["expected_" + mode] = diff
        cases.append(case)
    doc = {
        "round_cases": round_cases(rng),
        "about": "Generated by bench/vqa_eval_oracle.py (a Python port of the official "
                 "vqaEval.py) with seed %d on Python %s." % (args.seed, sys.version.split()[0]),
        "cases": cases,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=True, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
