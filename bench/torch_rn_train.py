#!/usr/bin/env python3
"""PyTorch counterpart of `moevqa train` on a CLEVR-layout directory.

Trains the same Relation Network as `moevqa train --dataset clevr` (the
model of bench/torch_block.py's `train` mode: embedding 32 -> LSTM 128 whose
state at the last word feeds every gate controller, the gated CLEVR CNN of
Table 4 run dense with the unselected gates zeroed, objects = cells + (x, y),
g over all ordered pairs with the cheap first layer, f, cross-entropy +
0.01 * CV^2; Adam; pixels / 255) on the same generated data, and prints one
JSON line per epoch like a line of moevqa's RUN/metrics.jsonl:

  {"epoch", "train_loss", "train_accuracy", "questions_per_s",
   "val": {"accuracy", "by_family": {name: percent}}}

It answers one question: does a reference implementation learn faster than
moevqa on the same data, budget and hyper-parameters? Not run in CI; needs
torch and pillow. Usage:

  moevqa generate sort-of-clevr --out /tmp/soc1k --train-images 1000 --val-images 100
  python bench/torch_rn_train.py --data /tmp/soc1k --epochs 4 --image-size 75 \\
      --g-dim 128 --f-dim 128 --lr 1e-3 --k 12 --threads 2

Identical weights: `cargo run --release --example rn_parity -- p.json` then
`--parity p.json` repeats moevqa's steps on one batch and prints the
differences of loss, gradients and weights; `rn_parity -- init.json 0 VOCAB
ANSWERS SEED` then `--init-from init.json --data ...` trains from moevqa's
initial weights.
"""

import argparse
import json
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_block as tb  # noqa: E402


def tokenize(text):
    """src/text/mod.rs tokenize: lowercase, split on whitespace and ?!.,;:"""
    return [w for w in re.split(r"[\s?!.,;:]+", text.lower()) if w]


def load(data, split, size):
    path = os.path.join(data, "questions", f"CLEVR_{split}_questions.json")
    with open(path) as f:
        qs = json.load(f)["questions"]
    cache = {}
    for q in qs:
        name = q["image_filename"]
        if name not in cache:
            img = Image.open(os.path.join(data, "images", split, name)).convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            cache[name] = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return qs, cache


def batches(items, batch, images, words, answers, shuffle):
    order = list(range(len(items)))
    if shuffle:
        random.shuffle(order)
    for i in range(0, len(order), batch):
        chunk = [items[j] for j in order[i:i + batch]]
        toks = [[words.get(w, 1) for w in tokenize(q["question"])] or [1] for q in chunk]
        t = max(len(x) for x in toks)
        tokens = torch.tensor([x + [0] * (t - len(x)) for x in toks])
        lengths = torch.tensor([len(x) for x in toks])
        imgs = torch.stack([images[q["image_filename"]] for q in chunk])
        target = torch.tensor([answers[q["answer"]] for q in chunk])
        yield chunk, imgs, tokens, lengths, target


def grad_norms():
    n = 64
    model = tb.RelationNetwork(20, 10, 128, 128).reset_batch_norms().train()
    images = torch.rand(n, 3, 75, 75)
    tokens = torch.randint(2, 19, (n, 10))
    logits, gates = model(images, tokens, 12)
    loss = F.cross_entropy(logits, torch.randint(0, 10, (n,))) + tb.balance_loss(gates)
    print(f"loss {loss.item():.4f}")
    loss.backward()

    def norm(*mods):
        return sum(float(p.grad.pow(2).sum()) for m in mods for p in m.parameters() if p.grad is not None) ** 0.5

    print(f"embed {norm(model.embed):.3e}")
    print(f"lstm {norm(model.lstm):.3e}")
    print(f"stem conv {model.cnn.stem[0].weight.grad.norm():.3e}")
    for i, b in enumerate(model.cnn.blocks):
        print(f"block{i} reduce {b.reduce.weight.grad.norm():.3e} conv {b.conv.weight.grad.norm():.3e} "
              f"expand {b.expand.weight.grad.norm():.3e}")
    for i, g in enumerate(model.cnn.gates):
        print(f"gate{i} image_att {norm(g.image_att):.3e} question_att {norm(g.question_att):.3e} "
              f"gate {norm(g.gate):.3e}")
    print(f"head conv {model.cnn.head[0].weight.grad.norm():.3e}")
    print(f"g_first i {norm(model.g_i):.3e} j {norm(model.g_j):.3e} q {norm(model.g_q):.3e}")
    for i, l in enumerate(model.g_rest):
        print(f"g_rest{i} {norm(l):.3e}")
    print(f"f1 {norm(model.f1):.3e} f2 {norm(model.f2):.3e} out {norm(model.out):.3e}")


def burn_to_torch(model):
    """moevqa parameter path -> (torch tensor, transform of the Burn values)."""
    out = {}
    lin = lambda v, shape: v.reshape(shape).t()  # Burn Linear weights are [in, out]
    same = lambda v, shape: v.reshape(shape)
    cnn = model.cnn
    for name, t in (("cnn.stem.conv.weight", cnn.stem[0].weight), ("cnn.head.conv.weight", cnn.head[0].weight)):
        out[name] = (t, same)
    for part, bn in (("stem", cnn.stem[1]), ("head", cnn.head[1])):
        out[f"cnn.{part}.bn.gamma"], out[f"cnn.{part}.bn.beta"] = (bn.weight, same), (bn.bias, same)
        out[f"cnn.{part}.bn.running_mean"], out[f"cnn.{part}.bn.running_var"] = (bn.running_mean, same), (bn.running_var, same)
    for i, b in enumerate(cnn.blocks):
        convs = [("reduce", b.reduce, b.bn_reduce), ("conv", b.conv, b.bn_conv), ("expand", b.expand, b.bn_expand)]
        if b.shortcut is not None:
            convs.append(("shortcut", b.shortcut[0], b.shortcut[1]))
        for n, conv, bn in convs:
            pre = f"cnn.blocks.{i}.{n}"
            if n == "shortcut":
                out[pre + ".conv.weight"], bnp = (conv.weight, same), pre + ".bn"
            else:
                out[pre + ".weight"], bnp = (conv.weight, same), f"cnn.blocks.{i}.bn_{n}"
            out[bnp + ".gamma"], out[bnp + ".beta"] = (bn.weight, same), (bn.bias, same)
            out[bnp + ".running_mean"], out[bnp + ".running_var"] = (bn.running_mean, same), (bn.running_var, same)
    for i, g in enumerate(cnn.gates):
        for n in ("image_att", "question_att", "att_score", "image_proj", "gate"):
            l = getattr(g, n)
            out[f"cnn.gates.{i}.{n}.weight"] = (l.weight, lin)
            if l.bias is not None:
                out[f"cnn.gates.{i}.{n}.bias"] = (l.bias, same)
    for n, l in [("g_first_i", model.g_i), ("g_first_j", model.g_j), ("g_first_q", model.g_q), ("f1", model.f1),
                 ("f2", model.f2), ("out", model.out)] + [(f"g_rest.{i}", l) for i, l in enumerate(model.g_rest)]:
        out[n + ".weight"] = (l.weight, lin)
        if l.bias is not None:
            out[n + ".bias"] = (l.bias, same)
    out["embed.weight"] = (model.embed.weight, same)
    h = model.lstm.hidden_size
    # torch packs the LSTM gates as i, f, g, o along the rows.
    for j, gate in enumerate(("input_gate", "forget_gate", "cell_gate", "output_gate")):
        for burn_t, torch_t in (("input_transform", "ih"), ("hidden_transform", "hh")):
            w, bias = getattr(model.lstm, f"weight_{torch_t}_l0"), getattr(model.lstm, f"bias_{torch_t}_l0")
            out[f"lstm.{gate}.{burn_t}.weight"] = ((w, j * h, (j + 1) * h), lin)
            out[f"lstm.{gate}.{burn_t}.bias"] = ((bias, j * h, (j + 1) * h), same)
    return out


def rows(t):
    """A table entry's tensor: a whole parameter, or (packed, start, end) rows of one."""
    return t[0][t[1]:t[2]] if isinstance(t, tuple) else t


def grad_rows(t):
    return (t[0].grad[t[1]:t[2]] if t[0].grad is not None else None) if isinstance(t, tuple) else t.grad


def load_burn_weights(model, params, dtype=torch.float32):
    """Copies moevqa's parameters (rn_parity's "params") into the PyTorch RN."""
    table = burn_to_torch(model)
    missing = set(params) ^ set(table)
    if missing:
        sys.exit(f"error: unmapped parameters {sorted(missing)}")
    with torch.no_grad():
        for name, (t, f) in table.items():
            dst = rows(t)
            src = f(torch.tensor(params[name]["values"], dtype=dtype), params[name]["shape"])
            if dst.shape != src.shape:
                sys.exit(f"error: {name}: moevqa has {list(src.shape)}, this model {list(dst.shape)}")
            dst.copy_(src)
    return table


def parity(path, lr=1e-3, dtype=torch.float32):
    """Loads `cargo run --example rn_parity` output, repeats its steps, compares.

    With dtype float64 PyTorch is the exact reference that both f32 runs
    (moevqa's and PyTorch's own) can be held against."""
    d = json.load(open(path))
    model = tb.RelationNetwork(20, 10, 128, 128).reset_batch_norms().train().to(dtype)
    model.drop.p = 0.0
    params = d["params"]
    table = load_burn_weights(model, params, dtype)
    n, t = len(d["targets"]), len(d["tokens"]) // len(d["targets"])
    images = torch.tensor(d["images"], dtype=dtype).reshape(n, 3, 75, 75)
    tokens = torch.tensor(d["tokens"]).reshape(n, t)
    lengths = torch.tensor(d["lengths"])
    target = torch.tensor(d["targets"])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(len(d["losses"])):
        logits, gates = model(images, tokens, 12, lengths)
        loss = F.cross_entropy(logits, target) + tb.balance_loss(gates)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            print("# gradients of step 1: name, |burn - torch| / |torch|, |torch|")
            for name, (tt, f) in table.items():
                g = d["grads"][name]
                tg = grad_rows(tt)
                if g is None or tg is None:
                    if (g is None) != (tg is None):
                        print(f"{name}: gradient only in {'torch' if g is None else 'burn'}")
                    continue
                bg = f(torch.tensor(g, dtype=dtype), params[name]["shape"])
                rel = float((bg - tg).norm() / tg.norm().clamp_min(1e-30))
                print(f"{name} {rel:.2e} {float(tg.norm()):.3e}")
        opt.step()
    print("losses burn ", [round(x, 5) for x in d["losses"]])
    print("losses torch", [round(x, 5) for x in losses])
    print("# after the steps: name, |burn - torch| / |torch - before|")
    with torch.no_grad():
        for name, (tt, f) in table.items():
            shape = params[name]["shape"]
            before = f(torch.tensor(params[name]["values"], dtype=dtype), shape)
            after = f(torch.tensor(d["after"][name]["values"], dtype=dtype), shape)
            now = rows(tt)
            moved = (now - before).norm().clamp_min(1e-30)
            print(f"{name} {float((after - now).norm() / moved):.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="CLEVR-layout directory (not needed with --grad-norms)")
    ap.add_argument("--grad-norms", action="store_true",
                    help="print the gradient norms by layer at initialisation on one random batch "
                         "(as `cargo run --release --example grad_norms`) and exit")
    ap.add_argument("--parity", metavar="FILE",
                    help="repeat the steps of `cargo run --release --example rn_parity -- FILE` "
                         "with its weights and print where PyTorch and moevqa differ, then exit")
    ap.add_argument("--double", action="store_true",
                    help="with --parity: run PyTorch in float64, the exact reference")
    ap.add_argument("--init-from", metavar="FILE",
                    help="start from moevqa's initial weights, written by `cargo run --release "
                         "--example rn_parity -- FILE 0 VOCAB ANSWERS` (VOCAB = words + 2)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2.5e-4)
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--g-dim", type=int, default=256)
    ap.add_argument("--f-dim", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--burn-lstm-init", action="store_true",
                    help="initialise the LSTM as Burn 0.22.1 does (Xavier normal weights and biases)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    if a.grad_norms:
        grad_norms()
        return
    if a.parity:
        parity(a.parity, dtype=torch.float64 if a.double else torch.float32)
        return
    if not a.data:
        sys.exit("error: --data: expected a CLEVR-layout directory")
    train, train_img = load(a.data, "train", a.image_size)
    val, val_img = load(a.data, "val", a.image_size)
    vocab = sorted({w for q in train for w in tokenize(q["question"])})
    words = {w: i + 2 for i, w in enumerate(vocab)}  # 0 <pad>, 1 <unk>
    answers = {x: i for i, x in enumerate(sorted({q["answer"] for q in train}))}
    model = tb.RelationNetwork(len(words) + 2, len(answers), a.g_dim, a.f_dim).reset_batch_norms()
    if a.init_from:
        load_burn_weights(model, json.load(open(a.init_from))["params"])
    if a.burn_lstm_init:
        h, e = model.lstm.hidden_size, model.lstm.input_size
        with torch.no_grad():
            for name, fan_in in (("ih", e), ("hh", h)):
                std = (2.0 / (fan_in + h)) ** 0.5
                getattr(model.lstm, f"weight_{name}_l0").normal_(0.0, std)
                getattr(model.lstm, f"bias_{name}_l0").normal_(0.0, std)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    for epoch in range(1, a.epochs + 1):
        model.train()
        t0, seen, right, loss_sum = time.perf_counter(), 0, 0, 0.0
        for _, imgs, tokens, lengths, target in batches(train, a.batch, train_img, words, answers, True):
            logits, gates = model(imgs, tokens, a.k, lengths)
            loss = F.cross_entropy(logits, target) + tb.balance_loss(gates)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(target)
            right += (logits.argmax(1) == target).sum().item()
            loss_sum += loss.item() * len(target)
        secs = time.perf_counter() - t0
        model.eval()
        fam = {}
        with torch.no_grad():
            for chunk, imgs, tokens, lengths, target in batches(val, 256, val_img, words, answers, False):
                pred = model(imgs, tokens, a.k, lengths)[0].argmax(1)
                for q, ok in zip(chunk, (pred == target).tolist()):
                    f = fam.setdefault(q["program"][-1]["function"], [0, 0])
                    f[0] += ok
                    f[1] += 1
        total = sum(f[1] for f in fam.values())
        print(json.dumps({
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_accuracy": 100.0 * right / seen,
            "questions_per_s": seen / secs,
            "val": {
                "accuracy": 100.0 * sum(f[0] for f in fam.values()) / total,
                "by_family": {k: 100.0 * f[0] / f[1] for k, f in sorted(fam.items())},
            },
        }), flush=True)


if __name__ == "__main__":
    main()
