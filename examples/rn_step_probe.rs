//! Probe: where a Relation Network training step's time goes on Burn Flex
//! (question LSTM, CNN with gates, g over pairs + f), forward + backward.
//!
//! `cargo run --release --example rn_step_probe -- [IMAGE] [G_DIM] [BATCH]`

use std::time::Instant;

use burn::tensor::{Device, Distribution, Int, Tensor};
use moevqa::cnn::Execution;
use moevqa::models::{GatedVqaModel, RelationNetworkConfig};

fn median(mut f: impl FnMut() -> f32) -> f64 {
    f();
    let mut v: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[2]
}

/// Backward of sum(y^2); reads the gradient reaching `wrt` so the work is done.
fn backward_to<const D: usize, const E: usize>(y: Tensor<D>, wrt: &Tensor<E>) -> f32 {
    let grads = y.powi_scalar(2).sum().backward();
    wrt.grad(&grads)
        .expect("gradient")
        .sum()
        .into_scalar::<f32>()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let size = args.first().copied().unwrap_or(75);
    let g = args.get(1).copied().unwrap_or(128);
    let n = args.get(2).copied().unwrap_or(64);
    let ad = Device::default().autodiff();
    let model = RelationNetworkConfig::new(80, 10, 12)
        .with_g_dim(g)
        .with_f_dim(g)
        .init(&ad)
        .unwrap();
    let images = Tensor::<4>::random([n, 3, size, size], Distribution::Uniform(0.0, 1.0), &ad);
    let tokens = Tensor::<2, Int>::random([n, 10], Distribution::Uniform(2.0, 79.0), &ad);
    let lengths = vec![10; n];
    let full = median(|| {
        let out = model
            .forward(
                images.clone(),
                tokens.clone(),
                &lengths,
                12,
                Execution::Dense,
            )
            .unwrap();
        backward_to(out.logits, &model.f1.weight.val())
    });
    let q_only = median(|| {
        let q = model.encode_question(tokens.clone(), &lengths).unwrap();
        backward_to(q, &model.embed.weight.val())
    });
    let q = model
        .encode_question(tokens.clone(), &lengths)
        .unwrap()
        .detach();
    let cnn = median(|| {
        let out = model
            .cnn
            .forward_k(images.clone(), Some(q.clone()), 12, Execution::Dense)
            .unwrap();
        backward_to(out.features, &model.cnn.stem.conv.weight.val())
    });
    // Parts of the CNN, each forward + backward on its own input.
    let stem_pool = |images: Tensor<4>| {
        let x = model.cnn.stem.forward(images);
        match &model.cnn.pool {
            Some(pool) => moevqa::fused::maxpool::max_pool(x, pool),
            None => x,
        }
    };
    let stem = median(|| backward_to(stem_pool(images.clone()), &model.cnn.stem.conv.weight.val()));
    let stem_conv = median(|| {
        let x = moevqa::fused::conv::conv2d(images.clone(), &model.cnn.stem.conv);
        backward_to(x, &model.cnn.stem.conv.weight.val())
    });
    let stem_conv_burn = median(|| {
        let x = model.cnn.stem.conv.forward(images.clone());
        backward_to(x, &model.cnn.stem.conv.weight.val())
    });
    let stem_bn = median(|| {
        let x = model.cnn.stem.forward(images.clone());
        backward_to(x, &model.cnn.stem.conv.weight.val())
    });
    let pool_in = model
        .cnn
        .stem
        .forward(images.clone())
        .detach()
        .require_grad();
    let pool = median(|| {
        let x = moevqa::fused::maxpool::max_pool(pool_in.clone(), model.cnn.pool.as_ref().unwrap());
        backward_to(x, &pool_in)
    });
    println!(
        "stem conv {stem_conv:.1} (Burn's conv {stem_conv_burn:.1}), conv+bn+relu {stem_bn:.1}, pool {pool:.1}"
    );
    let mut x = stem_pool(images.clone()).detach();
    let mut parts = String::new();
    for (block, ctrl) in model.cnn.blocks.iter().zip(&model.cnn.gates) {
        let gate = median(|| {
            let v = ctrl.gate_values(x.clone(), q.clone()).unwrap();
            backward_to(v, &ctrl.gate.weight.val())
        });
        let gv = ctrl.gate_values(x.clone(), q.clone()).unwrap().detach();
        let body = median(|| {
            let y = block.forward_dense(x.clone(), Some(gv.clone())).unwrap();
            backward_to(y, &block.reduce.weight.val())
        });
        let conv = median(|| {
            use moevqa::fused::conv::conv2d;
            let y = conv2d(conv2d(x.clone(), &block.reduce), &block.conv);
            backward_to(y, &block.conv.weight.val())
        });
        let conv_burn = median(|| {
            let y = block.conv.forward(block.reduce.forward(x.clone()));
            backward_to(y, &block.conv.weight.val())
        });
        parts += &format!(
            " [{:?}: gate {gate:.1}, block {body:.1} (reduce+3x3 {conv:.1}, on Burn's convs {conv_burn:.1})]",
            x.dims()
        );
        x = block.forward_dense(x.clone(), Some(gv)).unwrap().detach();
    }
    println!("stem+pool {stem:.1} ms;{parts}");
    let feats = model
        .cnn
        .forward_k(images.clone(), Some(q.clone()), 12, Execution::Dense)
        .unwrap()
        .features;
    let [_, c, h, w] = feats.dims();
    let objects = Tensor::<3>::random([n, h * w, c + 2], Distribution::Normal(0.0, 1.0), &ad);
    let rel = median(|| {
        let r = model.relate(objects.clone(), q.clone());
        backward_to(r, &model.g_first_i.weight.val())
    });
    // One hidden layer of g (Linear + ReLU) on [N*D*D, G], and a bare matmul.
    let rows = n * h * w * h * w;
    let hidden =
        Tensor::<2>::random([rows, g], Distribution::Uniform(0.0, 1.0), &ad).require_grad();
    let layer = &model.g_rest[0];
    let lin = median(|| {
        let y = burn::tensor::activation::relu(layer.forward(hidden.clone()));
        let grads = y.sum().backward();
        hidden.grad(&grads).unwrap().sum().into_scalar::<f32>()
    });
    let fused = median(|| {
        let y = moevqa::fused::relate::linear_relu(hidden.clone(), layer);
        let grads = y.sum().backward();
        hidden.grad(&grads).unwrap().sum().into_scalar::<f32>()
    });
    println!("fused linear_relu (moevqa::fused::relate) fwd+bwd {fused:.1} ms");
    let plain = Tensor::<2>::random(
        [rows, g],
        Distribution::Uniform(0.0, 1.0),
        &Device::default(),
    );
    let wmat = Tensor::<2>::random([g, g], Distribution::Uniform(0.0, 1.0), &Device::default());
    let mm = median(|| {
        plain
            .clone()
            .matmul(wmat.clone())
            .slice([0..1, 0..1])
            .into_scalar::<f32>()
    });
    let flop = 2.0 * rows as f64 * (g * g) as f64;
    println!(
        "g layer [{rows}, {g}]: Linear+ReLU fwd+bwd {lin:.1} ms ({:.0} GFLOP/s of its 3 matmuls); matmul alone {mm:.1} ms ({:.0} GFLOP/s)",
        3.0 * flop / lin / 1e6,
        flop / mm / 1e6
    );
    println!(
        "image {size}, g {g}, batch {n}, {} objects: full step fwd+bwd {full:.1} ms ({:.0} q/s); question {q_only:.1}; CNN {cnn:.1}; relate {rel:.1}",
        h * w,
        n as f64 / full * 1e3
    );
}
