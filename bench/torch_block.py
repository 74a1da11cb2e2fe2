#!/usr/bin/env python3
"""PyTorch (CPU) counterpart of `moevqa bench block` and `moevqa bench cnn`.

Times the same modular ResNeXt blocks (the presets of `moevqa bench block
--preset list`) and the same whole CNNs (Table 3's ResNeXt-101 32x4d for
`vqa`, Table 4's CNN for `clevr`) in eval mode under torch.no_grad(), and
prints one JSON line per row with the keys of moevqa's bench JSON:

  {"preset", "batch", "k", "paths", "iters", "dense_ms", "sparse_ms",
   "speedup", "flops_ratio", "efficiency", "dense_macs", "sparse_macs",
   "max_rel_diff", "engine"}

with engine = "torch". Blocks: dense = all P paths with the masked gates
(as moevqa's dense reference), sparse = only each sample's k selected paths:
gathered reduce rows, one grouped 3x3 conv with the batch folded into the
groups (N*k groups), gathered expand columns, batched matmuls (as
`Bottleneck::forward_sparse`). CNNs: dense = the ungated baseline ResNeXt,
sparse = the gated network at k with sparse blocks; MACs are per image, CNN
plus gate controllers, counted as in src/flops.rs. max_rel_diff: sparse
against dense (blocks) or against the dense execution of the same gated
network (CNNs).

Not run in CI. Usage (torch installed; 2 threads like the issue's numbers):

  python bench/torch_block.py blocks --threads 2 --iters 10
  python bench/torch_block.py block --preset ref-256x28 --batch 32 --k 8
  python bench/torch_block.py cnn --model clevr --batch 32 --k 3 --input 128
  python bench/torch_block.py all --threads 2      # the goal-1 table
  python bench/torch_block.py train --batch 64 --k 12 --input 128

`train` times a training step of the Relation Network as `moevqa bench
train` does (random data; embedding 32 -> LSTM 128 whose last state feeds
every gate controller; the gated CLEVR CNN run dense with the unselected
gates zeroed, BN in training mode; objects = cells + (x, y); g 4 x 256 over
all ordered pairs with the cheap first layer; f 256 -> 256 -> dropout 0.5
-> answers; cross-entropy + 0.01 * CV^2 of the gate importances; Adam) and
prints {"model", "batch", "k", "image_size", "iters", "step_ms",
"questions_per_s", "engine"}.

Weights are random (BN with random running statistics for blocks): timings
and the agreement of dense and sparse do not depend on trained values.
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# name: (C_in, width P*d, C_out, P, stride, H, W); same as moevqa's block_presets().
PRESETS = {
    "resnext101-conv2": (256, 128, 256, 32, 1, 56, 56),
    "resnext101-conv3": (512, 256, 512, 32, 1, 28, 28),
    "resnext101-conv4": (1024, 512, 1024, 32, 1, 14, 14),
    "resnext101-conv5": (2048, 1024, 2048, 32, 1, 7, 7),
    "clevr-conv2": (64, 48, 48, 12, 1, 32, 32),
    "clevr-conv3": (48, 48, 48, 12, 2, 32, 32),
    "clevr-conv4": (48, 48, 48, 12, 2, 16, 16),
    "ref-256x28": (256, 128, 256, 32, 1, 28, 28),
}

# Layouts of src/cnn/layout.rs: stem (kernel, stride, padding, channels),
# pool (kernel, stride, padding) or None, stages (blocks, width, out, P,
# stride), head channels or None.
LAYOUTS = {
    "vqa": dict(
        stem=(7, 2, 3, 64),
        pool=(3, 2, 1),
        stages=[(3, 128, 256, 32, 1), (4, 256, 512, 32, 2), (23, 512, 1024, 32, 2), (3, 1024, 2048, 32, 2)],
        head=None,
        input=224,
    ),
    "clevr": dict(
        stem=(3, 2, 1, 64),
        pool=(3, 2, 1),
        stages=[(1, 48, 48, 12, 1), (1, 48, 48, 12, 2), (1, 48, 48, 12, 2)],
        head=24,
        input=128,
    ),
}
QUESTION_DIM = 128  # GateSettings defaults
GATE_HIDDEN = 64


def out_size(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def block_macs(cin, width, cout, paths, stride, h, w, k, gated):
    """src/flops.rs block_macs: k paths (all when k is None), per image."""
    d = width // paths
    active = (paths if k is None else k) * d
    h2, w2 = out_size(h, 3, stride, 1), out_size(w, 3, stride, 1)
    hin, hout = h * w, h2 * w2
    m = cin * active * hin + active * hin + 9 * d * active * hout + active * hout
    if gated:
        m += active * hout
    m += active * cout * hout + cout * hout
    if stride != 1 or cin != cout:
        m += cin * cout * hout + cout * hout
    return m


def gate_macs(a, h, w, paths):
    dd, b, c = h * w, QUESTION_DIM, GATE_HIDDEN
    return dd * a * c + b * c + dd * c + dd * a + a * b + b * paths


def cnn_macs(model, size, k):
    """src/flops.rs count_macs(..).total(): CNN plus gate controllers; k None = ungated."""
    lay = LAYOUTS[model]
    ks, ss, ps, ch = lay["stem"]
    h = w = out_size(size, ks, ss, ps)
    total = 3 * ch * ks * ks * h * w + ch * h * w
    if lay["pool"]:
        pk, pst, pp = lay["pool"]
        h, w = out_size(h, pk, pst, pp), out_size(w, pk, pst, pp)
    for blocks, width, out, paths, stride in lay["stages"]:
        for i in range(blocks):
            s = stride if i == 0 else 1
            if k is not None:
                total += gate_macs(ch, h, w, paths)
            total += block_macs(ch, width, out, paths, s, h, w, k, k is not None)
            h, w = out_size(h, 3, s, 1), out_size(w, 3, s, 1)
            ch = out
    if lay["head"]:
        total += ch * lay["head"] * h * w + lay["head"] * h * w
    return total


def random_bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.2)
        bn.running_mean.normal_(0.0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def affine(bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


class Block(nn.Module):
    """The modular bottleneck of src/moe/block.rs (eval mode)."""

    def __init__(self, cin, width, cout, paths, stride):
        super().__init__()
        self.paths, self.d, self.stride, self.cout = paths, width // paths, stride, cout
        self.reduce = nn.Conv2d(cin, width, 1, bias=False)
        self.bn_reduce = random_bn(width)
        self.conv = nn.Conv2d(width, width, 3, stride, 1, groups=paths, bias=False)
        self.bn_conv = random_bn(width)
        self.expand = nn.Conv2d(width, cout, 1, bias=False)
        self.bn_expand = random_bn(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), random_bn(cout))

    def short(self, x):
        return x if self.shortcut is None else self.shortcut(x)

    def dense(self, x, gates=None):
        """All paths; `gates` [N, P] scales each path (None: plain block)."""
        h = F.relu(self.bn_reduce(self.reduce(x)))
        h = F.relu(self.bn_conv(self.conv(h)))
        if gates is not None:
            h = h * gates.repeat_interleave(self.d, dim=1)[:, :, None, None]
        return F.relu(self.bn_expand(self.expand(h)) + self.short(x))

    def sparse(self, x, gates, sel):
        """Only the selected paths `sel` [N, k] of each sample."""
        n, c, h, w = x.shape
        p, d, k = self.paths, self.d, sel.shape[1]
        kd = k * d
        ch = (sel[:, :, None] * d + torch.arange(d)).reshape(n, kd)
        s1, t1 = affine(self.bn_reduce)
        hid = torch.bmm(self.reduce.weight.view(p * d, c)[ch], x.reshape(n, c, h * w))
        hid = F.relu(hid * s1[ch][..., None] + t1[ch][..., None])
        w2 = self.conv.weight[ch.reshape(-1)]
        hid = F.conv2d(hid.view(1, n * kd, h, w), w2, stride=self.stride, padding=1, groups=n * k)
        h2, w2_ = hid.shape[-2:]
        s2, t2 = affine(self.bn_conv)
        g = gates.gather(1, sel).repeat_interleave(d, dim=1)
        hid = F.relu(hid.view(n, kd, h2 * w2_) * s2[ch][..., None] + t2[ch][..., None]) * g[..., None]
        w3 = self.expand.weight.view(self.cout, p * d).t()[ch].transpose(1, 2)
        out = torch.bmm(w3, hid).view(n, self.cout, h2, w2_)
        return F.relu(self.bn_expand(out) + self.short(x))


class GateController(nn.Module):
    """src/moe/gate.rs: attention over regions, projection, ReLU + L1 norm."""

    def __init__(self, a, paths):
        super().__init__()
        self.image_att = nn.Linear(a, GATE_HIDDEN, bias=False)
        self.question_att = nn.Linear(QUESTION_DIM, GATE_HIDDEN)
        self.att_score = nn.Linear(GATE_HIDDEN, 1)
        self.image_proj = nn.Linear(a, QUESTION_DIM, bias=False)
        self.gate = nn.Linear(QUESTION_DIM, paths)
        with torch.no_grad():
            self.gate.weight.normal_(0.0, 0.01)
            self.gate.bias.fill_(1.0)

    def forward(self, image, q, k):
        n, a, h, w = image.shape
        regions = image.reshape(n, a, h * w).transpose(1, 2)
        hidden = torch.tanh(self.image_att(regions) + self.question_att(q)[:, None, :])
        p = torch.softmax(self.att_score(hidden), dim=1).transpose(1, 2)
        u = self.image_proj(torch.bmm(p, regions).reshape(n, a)) + q
        g = F.relu(self.gate(u))
        s = g.sum(1, keepdim=True)
        dead = (s <= 0).float()
        g = (g + dead / g.shape[1]) / (s + dead)
        # Top-k, ties to the lower index (stable sort on descending values).
        sel = torch.sort(-g, dim=1, stable=True).indices[:, :k]
        return g, sel


class Cnn(nn.Module):
    def __init__(self, model, gated):
        super().__init__()
        lay = LAYOUTS[model]
        ks, ss, ps, ch = lay["stem"]
        self.stem = nn.Sequential(nn.Conv2d(3, ch, ks, ss, ps, bias=False), nn.BatchNorm2d(ch), nn.ReLU())
        self.pool = nn.MaxPool2d(lay["pool"][0], lay["pool"][1], lay["pool"][2]) if lay["pool"] else None
        blocks, gates = [], []
        for n_blocks, width, out, paths, stride in lay["stages"]:
            for i in range(n_blocks):
                blocks.append(Block(ch, width, out, paths, stride if i == 0 else 1))
                if gated:
                    gates.append(GateController(ch, paths))
                ch = out
        self.blocks, self.gates = nn.ModuleList(blocks), nn.ModuleList(gates)
        self.head = None
        if lay["head"]:
            self.head = nn.Sequential(nn.Conv2d(ch, lay["head"], 1, bias=False), nn.BatchNorm2d(lay["head"]), nn.ReLU())

    def forward(self, x, q=None, k=None, sparse=True):
        x = self.stem(x)
        if self.pool is not None:
            x = self.pool(x)
        for i, block in enumerate(self.blocks):
            if len(self.gates) == 0:
                x = block.dense(x)
                continue
            g, sel = self.gates[i](x, q, k)
            if sparse:
                x = block.sparse(x, g, torch.sort(sel, dim=1).values)
            else:
                x = block.dense(x, torch.zeros_like(g).scatter(1, sel, g.gather(1, sel)))
        return self.head(x) if self.head is not None else x


def median_ms(f, iters, warmup):
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(max(iters, 1)):
        t0 = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-38))


def row(preset, batch, k, paths, iters, dense_ms, sparse_ms, dense_macs, sparse_macs, diff):
    speedup = dense_ms / sparse_ms
    ratio = dense_macs / sparse_macs
    return {
        "preset": preset,
        "batch": batch,
        "k": k,
        "paths": paths,
        "iters": iters,
        "dense_ms": dense_ms,
        "sparse_ms": sparse_ms,
        "speedup": speedup,
        "flops_ratio": ratio,
        "efficiency": speedup / ratio,
        "dense_macs": dense_macs,
        "sparse_macs": sparse_macs,
        "max_rel_diff": diff,
        "engine": "torch",
    }


def bench_block(preset, batch, k, iters, warmup, channels_last):
    cin, width, cout, paths, stride, h, w = PRESETS[preset]
    if not 1 <= k <= paths:
        sys.exit(f"error: --k {k} is invalid: expected 1 <= k <= {paths}")
    torch.manual_seed(7)
    block = Block(cin, width, cout, paths, stride).eval()
    x = torch.randn(batch, cin, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        block = block.to(memory_format=torch.channels_last)
    g = torch.rand(batch, paths) * 0.9 + 0.1
    g = g / g.sum(1, keepdim=True)
    gen = torch.Generator().manual_seed(11)
    sel = torch.stack([torch.randperm(paths, generator=gen)[:k] for _ in range(batch)])
    sel = torch.sort(sel, dim=1).values
    masked = torch.zeros_like(g).scatter(1, sel, g.gather(1, sel))
    with torch.no_grad():
        diff = rel_diff(block.sparse(x, g, sel), block.dense(x, masked))
        dense_ms = median_ms(lambda: block.dense(x, masked), iters, warmup)
        sparse_ms = median_ms(lambda: block.sparse(x, g, sel), iters, warmup)
    dense_macs = block_macs(cin, width, cout, paths, stride, h, w, paths, True)
    sparse_macs = block_macs(cin, width, cout, paths, stride, h, w, k, True)
    return row(preset, batch, k, paths, iters, dense_ms, sparse_ms, dense_macs, sparse_macs, diff)


def bench_cnn(model, batch, k, size, iters, warmup):
    lay = LAYOUTS[model]
    paths = lay["stages"][0][3]
    if not 1 <= k <= paths:
        sys.exit(f"error: --k {k} is invalid: expected 1 <= k <= {paths}")
    torch.manual_seed(7)
    plain, gated = Cnn(model, False).eval(), Cnn(model, True).eval()
    x = torch.randn(batch, 3, size, size)
    q = torch.randn(batch, QUESTION_DIM)
    with torch.no_grad():
        diff = rel_diff(gated(x, q, k, sparse=True), gated(x, q, k, sparse=False))
        dense_ms = median_ms(lambda: plain(x), iters, warmup)
        sparse_ms = median_ms(lambda: gated(x, q, k, sparse=True), iters, warmup)
    return row(
        f"{model}-cnn-{size}", batch, k, paths, iters, dense_ms, sparse_ms,
        cnn_macs(model, size, None), cnn_macs(model, size, k), diff,
    )


class RelationNetwork(nn.Module):
    """src/models/relation_network.rs at its defaults."""

    def __init__(self, vocab=80, answers=10, g_dim=256, f_dim=256):
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.lstm = nn.LSTM(32, QUESTION_DIM, batch_first=True)
        self.cnn = Cnn("clevr", True)
        obj = LAYOUTS["clevr"]["head"] + 2
        self.g_i = nn.Linear(obj, g_dim, bias=False)
        self.g_j = nn.Linear(obj, g_dim, bias=False)
        self.g_q = nn.Linear(QUESTION_DIM, g_dim)
        self.g_rest = nn.ModuleList(nn.Linear(g_dim, g_dim) for _ in range(3))
        self.f1, self.f2 = nn.Linear(g_dim, f_dim), nn.Linear(f_dim, f_dim)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(f_dim, answers)

    def reset_batch_norms(self):
        """Fresh BN (weight 1, bias 0, zero statistics) for training; the
        blocks are built with random_bn's statistics for the eval benches."""
        for b in self.cnn.blocks:
            for m in b.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.reset_parameters()
                    m.reset_running_stats()
        return self

    def forward(self, images, tokens, k, lengths=None):
        """`lengths[n]`: question n's words (None: every question fills `tokens`)."""
        out = self.lstm(self.embed(tokens))[0]
        q = out[:, -1] if lengths is None else out[torch.arange(len(lengths)), lengths - 1]
        x = self.cnn.stem(images)
        x = self.cnn.pool(x)
        gate_values = []
        for block, ctrl in zip(self.cnn.blocks, self.cnn.gates):
            g, sel = ctrl(x, q, k)
            gate_values.append(g)
            x = block.dense(x, torch.zeros_like(g).scatter(1, sel, g.gather(1, sel)))
        x = self.cnn.head(x)
        n, c, h, w = x.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        coords = torch.stack([xs, ys], -1).reshape(1, h * w, 2).expand(n, -1, -1)
        objects = torch.cat([x.reshape(n, c, h * w).transpose(1, 2), coords], 2)
        a, b = self.g_i(objects), self.g_j(objects)
        hid = F.relu(a[:, :, None] + b[:, None] + self.g_q(q)[:, None, None])
        hid = hid.reshape(n, -1, hid.shape[-1])
        for layer in self.g_rest:
            hid = F.relu(layer(hid))
        r = hid.sum(1)
        return self.out(self.drop(F.relu(self.f2(F.relu(self.f1(r)))))), gate_values


def balance_loss(gates, weight=0.01):
    """src/moe/balance.rs: weight * sum over blocks of CV^2 of the importances."""
    total = 0.0
    for g in gates:
        imp = g.sum(0)
        total = total + weight * imp.var(unbiased=False) / (imp.mean() ** 2 + 1e-10)
    return total


def bench_train(batch, k, size, iters, warmup):
    torch.manual_seed(1)
    model = RelationNetwork().reset_batch_norms().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size)
    tokens = torch.randint(2, 79, (batch, 10))
    targets = torch.randint(0, 10, (batch,))

    def step():
        logits, gates = model(images, tokens, k)
        loss = F.cross_entropy(logits, targets) + balance_loss(gates)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step_ms = median_ms(step, iters, warmup)
    return {
        "model": "clevr", "batch": batch, "k": k, "image_size": size, "iters": iters,
        "step_ms": step_ms, "questions_per_s": batch / (step_ms / 1e3), "engine": "torch",
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["block", "blocks", "cnn", "all", "train"])
    ap.add_argument("--preset", default="ref-256x28", choices=sorted(PRESETS))
    ap.add_argument("--model", default="clevr", choices=sorted(LAYOUTS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--input", type=int, default=None, help="CNN input size (default: the layout's)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true", help="blocks in channels_last memory format")
    a = ap.parse_args()
    if a.batch < 1:
        sys.exit("error: --batch must be at least 1")
    torch.set_num_threads(a.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, mkldnn {torch.backends.mkldnn.is_available()}",
          file=sys.stderr)
    def emit(r):
        print(json.dumps(r), flush=True)

    if a.what == "train":
        emit(bench_train(a.batch, a.k, a.input or 128, a.iters, a.warmup))
    if a.what == "block":
        emit(bench_block(a.preset, a.batch, a.k, a.iters, a.warmup, a.channels_last))
    if a.what == "cnn":
        size = a.input or LAYOUTS[a.model]["input"]
        emit(bench_cnn(a.model, a.batch, a.k, size, a.iters, a.warmup))
    if a.what in ("blocks", "all"):
        for preset, spec in PRESETS.items():
            p = spec[3]
            for batch in (1, 32):
                for k in (p // 2, p // 4):
                    emit(bench_block(preset, batch, k, a.iters, a.warmup, a.channels_last))
    if a.what == "all":
        # The whole CNNs as in moevqa's examples/bench_fast.rs: CLEVR at
        # batch 32 and 1, ResNeXt-101 at batch 2 (fewer iterations).
        for model, batch, ks in (("clevr", 32, (6, 3)), ("clevr", 1, (6, 3)), ("vqa", 2, (16, 8))):
            iters = min(a.iters, 3) if model == "vqa" else a.iters
            for k in ks:
                emit(bench_cnn(model, batch, k, LAYOUTS[model]["input"], iters, 1))


if __name__ == "__main__":
    main()
