//! Where a trained Relation Network stops looking at the image: on 128 val
//! questions of a run's checkpoint, prints per stage (CNN blocks' gates,
//! CNN features, g's layers summed over pairs, f's layers) the share of
//! units that are zero for every question (dead ReLUs) and the mean spread
//! of each unit across questions.
//!
//! `cargo run --release --example dead_units -- RUN DATA` (it only reads
//! RUN). Behind the README's reading of the k = 6 Sort-of-CLEVR run.
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use moevqa::cnn::Execution;
use moevqa::data::clevr_reader::ClevrSplit;
use moevqa::fused::relate::pair_relu;
use moevqa::models::GatedVqaModel;
use moevqa::models::relation_network::cell_coordinates;
use moevqa::train::clevr::{encode_split, make_batch};
use moevqa::train::run::{LoadedRun, load_run};

/// Rows are questions, columns units: (share of dead units, mean std).
fn stats(x: &Tensor<2>) -> (f64, f64) {
    let [n, u] = x.dims();
    let v: Vec<f32> = x.to_data().try_into_vec::<f32>().unwrap();
    let (mut dead, mut spread) = (0usize, 0.0f64);
    for j in 0..u {
        let col: Vec<f64> = (0..n).map(|i| v[i * u + j] as f64).collect();
        if col.iter().all(|&c| c == 0.0) {
            dead += 1;
        }
        let m = col.iter().sum::<f64>() / n as f64;
        spread += (col.iter().map(|c| (c - m) * (c - m)).sum::<f64>() / n as f64).sqrt();
    }
    (dead as f64 / u as f64, spread / u as f64)
}

fn show(name: &str, x: &Tensor<2>) {
    let (dead, spread) = stats(x);
    println!(
        "{name:<28} units {:>6}  dead {:>5.1}%  mean std across questions {spread:.4}",
        x.dims()[1],
        100.0 * dead
    );
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let run = std::path::Path::new(&a[1]);
    let data = std::path::Path::new(&a[2]);
    let device = Device::default();
    let LoadedRun {
        config: cfg,
        vocab,
        model: m,
    } = load_run(run, &device).unwrap();
    let ds = ClevrSplit::open(data, "val").unwrap();
    let items = encode_split(&ds, &vocab.words, &vocab.answers).unwrap();
    let probe: Vec<_> = items.iter().step_by(31).take(128).collect();
    let b = make_batch(&probe, cfg.image_size, &device).unwrap();
    let q = m.encode_question(b.tokens, &b.lengths).unwrap();
    show("question vector", &q);
    let cnn = m
        .cnn
        .forward_k(b.images, Some(q.clone()), cfg.k, Execution::Sparse)
        .unwrap();
    for (i, g) in cnn.gates.iter().enumerate() {
        show(&format!("block {} gates g'", i + 1), &g.values);
    }
    let [n, c, h, w] = cnn.features.dims();
    show(
        "CNN features",
        &cnn.features.clone().reshape([n, c * h * w]),
    );
    let cells = cnn.features.reshape([n, c, h * w]).swap_dims(1, 2);
    let coords = cell_coordinates(h, w, &device)
        .unsqueeze_dim::<3>(0)
        .repeat_dim(0, n);
    let objects = Tensor::cat(vec![cells, coords], 2);
    let d = h * w;
    let ga = m.g_first_i.forward(objects.clone());
    let gb = m.g_first_j.forward(objects);
    let gc = m.g_first_q.forward(q);
    let gd = ga.dims()[2];
    // Each g layer's pair activations, summed over the pairs of a question:
    // a unit dead in every pair of every question sums to zero.
    let mut h = pair_relu(ga + gc.unsqueeze_dim::<3>(1), gb).reshape([n * d * d, gd]);
    let summed = |h: &Tensor<2>| {
        h.clone()
            .reshape([n, d * d, gd])
            .sum_dim(1)
            .reshape([n, gd])
    };
    show("g layer 1 (sum over pairs)", &summed(&h));
    for (i, l) in m.g_rest.iter().enumerate() {
        h = relu(l.forward(h));
        show(&format!("g layer {} (sum over pairs)", i + 2), &summed(&h));
    }
    let r = summed(&h);
    let x = relu(m.f1.forward(r));
    show("f layer 1", &x);
    let x = relu(m.f2.forward(x));
    show("f layer 2", &x);
    show("answer logits", &m.out.forward(x));
}
