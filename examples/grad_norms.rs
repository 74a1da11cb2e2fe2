//! Probe: L2 norms of the gradients of the Relation Network at
//! initialisation, by layer, on one random batch (batch 64, 75x75 images in
//! [0, 1], 10-word questions, 10 answers; k = P, g and f 128). `python
//! bench/torch_rn_train.py --grad-norms` prints the same for the PyTorch
//! model, to spot a layer whose gradient differs by an order of magnitude.
//!
//! `cargo run --release --example grad_norms`
use burn::tensor::{Device, Distribution, Int, Tensor};
use moevqa::cnn::Execution;
use moevqa::models::{GatedVqaModel, RelationNetworkConfig};
use moevqa::moe::BalanceLossConfig;
use moevqa::train::clevr::rn_loss;

fn main() {
    let dev = Device::default().autodiff();
    dev.seed(1);
    let n = 64;
    let m = RelationNetworkConfig::new(20, 10, 12)
        .with_g_dim(128)
        .with_f_dim(128)
        .init(&dev)
        .expect("model");
    let images = Tensor::<4>::random([n, 3, 75, 75], Distribution::Uniform(0.0, 1.0), &dev);
    let tokens = Tensor::<2, Int>::random([n, 10], Distribution::Uniform(2.0, 19.0), &dev);
    let targets = Tensor::<1, Int>::random([n], Distribution::Uniform(0.0, 9.99), &dev);
    let out = m
        .forward(images, tokens, &[10; 64], 12, Execution::Dense)
        .expect("forward");
    let loss = rn_loss(&out, targets, &BalanceLossConfig::new());
    println!("loss {:.4}", loss.clone().into_scalar::<f32>());
    let grads = loss.backward();
    let sq = |g: Option<Tensor<1>>| g.map_or(0.0, |g| g.powi_scalar(2).sum().into_scalar::<f32>());
    macro_rules! norm {
        ($($p:expr),+) => {{
            let mut s = 0.0f32;
            $( s += sq($p.grad(&grads).map(|g| { let r = g.dims().len() - 1; g.flatten::<1>(0, r) })); )+
            s.sqrt()
        }};
    }
    let lin = |l: &burn::nn::Linear| -> f32 {
        let mut s = sq(l.weight.grad(&grads).map(|g| g.flatten::<1>(0, 1)));
        if let Some(b) = &l.bias {
            s += sq(b.grad(&grads));
        }
        s.sqrt()
    };
    println!("embed {:.3e}", norm!(m.embed.weight));
    let l = &m.lstm;
    let lstm = [
        Some(&l.input_gate),
        l.forget_gate.as_ref(),
        Some(&l.output_gate),
        Some(&l.cell_gate),
    ]
    .into_iter()
    .flatten()
    .map(|g| lin(&g.input_transform).powi(2) + lin(&g.hidden_transform).powi(2))
    .sum::<f32>()
    .sqrt();
    println!("lstm {lstm:.3e}");
    println!("stem conv {:.3e}", norm!(m.cnn.stem.conv.weight));
    for (i, b) in m.cnn.blocks.iter().enumerate() {
        println!(
            "block{i} reduce {:.3e} conv {:.3e} expand {:.3e}",
            norm!(b.reduce.weight),
            norm!(b.conv.weight),
            norm!(b.expand.weight)
        );
    }
    for (i, g) in m.cnn.gates.iter().enumerate() {
        println!(
            "gate{i} image_att {:.3e} question_att {:.3e} gate {:.3e}",
            lin(&g.image_att),
            lin(&g.question_att),
            lin(&g.gate)
        );
    }
    println!(
        "head conv {:.3e}",
        norm!(m.cnn.head.as_ref().expect("head").conv.weight)
    );
    println!(
        "g_first i {:.3e} j {:.3e} q {:.3e}",
        lin(&m.g_first_i),
        lin(&m.g_first_j),
        lin(&m.g_first_q)
    );
    for (i, l) in m.g_rest.iter().enumerate() {
        println!("g_rest{i} {:.3e}", lin(l));
    }
    println!(
        "f1 {:.3e} f2 {:.3e} out {:.3e}",
        lin(&m.f1),
        lin(&m.f2),
        lin(&m.out)
    );
}
