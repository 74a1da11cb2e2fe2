//! Criterion micro-benchmarks of the kernels the results tables rest on
//! (`cargo bench`; `cargo bench -- block/` for one group). Not run in CI.
//!
//! - `block/{preset}/batch{B}`: one modular block on the fast CPU path in
//!   eval mode, dense (all P paths) against sparse (the k selected). The
//!   throughput column counts multiply-adds as elements, so `Gelem/s` reads
//!   as G multiply-adds per second and the MACs sit beside the time. The
//!   sparse rate over the dense rate is the performance issue's efficiency,
//!   (dense ms / sparse ms) / (dense MACs / sparse MACs), though from
//!   separate timings rather than `bench block`'s interleaved ones.
//! - `train/...`: a training op forward and backward on the autodiff
//!   device, moevqa's fused op against Burn 0.22.1's own ops for the same
//!   layer: the grouped 3x3 convolution of the CLEVR CNN's first block and
//!   the stem at 75x75 (batch 64), and one hidden layer of g on the pairs
//!   of a Sort-of-CLEVR batch ([64 * 625, 256] x [256, 256] + ReLU).
//!
//! `moevqa bench block|cnn|train|all` remain the commands whose JSON the
//! README's tables come from (dense and sparse timed in turn, one process);
//! these are for tracking one kernel while changing it.

use std::hint::black_box;

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use moevqa::bench::FastBlock;
use moevqa::fused::conv::conv2d;
use moevqa::fused::relate::linear_relu;

fn blocks(c: &mut Criterion) {
    let device = Device::default();
    for (preset, batch) in [
        ("ref-256x28", 1),
        ("ref-256x28", 32),
        ("resnext101-conv3", 1),
        ("clevr-conv2", 32),
    ] {
        let mut group = c.benchmark_group(format!("block/{preset}/batch{batch}"));
        group.sample_size(20);
        let p = moevqa::bench::find_preset(preset).expect("preset").paths;
        let dense = FastBlock::new(preset, batch, p, &device).expect("block");
        let mut out = dense.output();
        group.throughput(Throughput::Elements(dense.case.macs(p) * batch as u64));
        group.bench_function(BenchmarkId::new("dense", p), |b| {
            b.iter(|| dense.dense(black_box(&mut out)).expect("dense"))
        });
        for k in [p / 2, p / 4] {
            let block = FastBlock::new(preset, batch, k, &device).expect("block");
            group.throughput(Throughput::Elements(block.case.macs(k) * batch as u64));
            group.bench_function(BenchmarkId::new("sparse", k), |b| {
                b.iter(|| block.sparse(black_box(&mut out)).expect("sparse"))
            });
        }
        group.finish();
    }
}

/// (name, batch, C_in, size, C_out, kernel, stride, padding, groups, input tracked).
type ConvCase = (
    &'static str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    bool,
);

fn train_convs(c: &mut Criterion) {
    let device = Device::default().autodiff();
    let cases: [ConvCase; 2] = [
        ("stem-75", 64, 3, 75, 64, 3, 2, 1, 1, false),
        ("grouped3x3-19", 64, 48, 19, 48, 3, 1, 1, 12, true),
    ];
    for (name, n, cin, size, cout, k, s, pad, g, tracked) in cases {
        let mut group = c.benchmark_group(format!("train/conv/{name}"));
        group.sample_size(10);
        let conv: Conv2d = Conv2dConfig::new([cin, cout], [k, k])
            .with_stride([s, s])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .with_groups(g)
            .init(&device);
        let x = Tensor::<4>::random(
            [n, cin, size, size],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let x = if tracked { x.require_grad() } else { x };
        group.bench_function("fused", |b| {
            b.iter(|| black_box(conv2d(x.clone(), &conv).sum().backward()))
        });
        group.bench_function("burn", |b| {
            b.iter(|| black_box(conv.forward(x.clone()).sum().backward()))
        });
        group.finish();
    }
}

fn train_g_hidden(c: &mut Criterion) {
    let device = Device::default().autodiff();
    let mut group = c.benchmark_group("train/g-hidden/40000x256");
    group.sample_size(10);
    let layer = LinearConfig::new(256, 256).init(&device);
    let x = Tensor::<2>::random([64 * 625, 256], Distribution::Normal(0.0, 1.0), &device)
        .require_grad();
    group.throughput(Throughput::Elements(64 * 625 * 256 * 256 * 3));
    group.bench_function("fused", |b| {
        b.iter(|| black_box(linear_relu(x.clone(), &layer).sum().backward()))
    });
    group.bench_function("burn", |b| {
        b.iter(|| black_box(relu(layer.forward(x.clone())).sum().backward()))
    });
    group.finish();
}

criterion_group!(benches, blocks, train_convs, train_g_hidden);
criterion_main!(benches);
