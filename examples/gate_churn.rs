//! How fast the gates' top-k selection moves during training: from a run's
//! checkpoint (model and Adam state), takes STEPS Adam steps at LR on
//! training batches and after each one prints, per block, the share of a
//! fixed probe batch (128 training questions) whose selected paths differ
//! from the step before and from the start.
//!
//! `cargo run --release --example gate_churn -- RUN DATA STEPS LR` (it
//! only reads RUN). Behind the README's reading of the k = 6 Sort-of-CLEVR
//! run.
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use moevqa::cnn::Execution;
use moevqa::data::clevr_reader::ClevrSplit;
use moevqa::models::GatedVqaModel;
use moevqa::moe::BalanceLossConfig;
use moevqa::train::checkpoint::load_checkpoint;
use moevqa::train::clevr::{RunVocab, adam, build_model, encode_split, make_batch, rn_loss};
use moevqa::train::run::{RunPaths, load_config};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let run = std::path::Path::new(&a[1]);
    let data = std::path::Path::new(&a[2]);
    let steps: usize = a[3].parse().unwrap();
    let lr: f64 = a[4].parse().unwrap();
    let paths = RunPaths::new(run);
    let cfg = load_config(&paths.config).unwrap();
    let vocab = RunVocab::load(&paths.vocab).unwrap();
    let device = Device::default();
    let ad = device.clone().autodiff();
    let model = build_model(&vocab, cfg.model(), &ad).unwrap();
    let (mut model, mut optim, _) = load_checkpoint(&paths.checkpoint, model, adam(), &ad).unwrap();
    let ds = ClevrSplit::open(data, "train").unwrap();
    let items = encode_split(&ds, &vocab.words, &vocab.answers).unwrap();
    let probe: Vec<_> = items.iter().step_by(997).take(128).collect();
    let pb = make_batch(&probe, cfg.image_size, &device).unwrap();
    let select = |m: &moevqa::models::relation_network::RelationNetwork| {
        let v = m.valid();
        let out = v
            .forward(
                pb.images.clone(),
                pb.tokens.clone(),
                &pb.lengths,
                cfg.k,
                Execution::Sparse,
            )
            .unwrap();
        out.gates
            .iter()
            .map(|g| {
                g.indices
                    .iter()
                    .map(|s| {
                        let mut s = s.clone();
                        s.sort();
                        s
                    })
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    let first = select(&model);
    let mut prev = first.clone();
    let balance = BalanceLossConfig::new().with_weight(cfg.balance_weight);
    for step in 0..steps {
        let chunk: Vec<_> = (0..64)
            .map(|i| &items[(step * 64 + i) * 31 % items.len()])
            .collect();
        let b = make_batch(&chunk, cfg.image_size, &ad).unwrap();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(b.answers.clone(), [64]), &ad);
        let out = model
            .forward(b.images, b.tokens, &b.lengths, cfg.k, Execution::Dense)
            .unwrap();
        let loss = rn_loss(&out, targets, &balance);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
        let now = select(&model);
        let changed = |x: &Vec<Vec<Vec<usize>>>| -> Vec<f64> {
            now.iter()
                .zip(x)
                .map(|(a, b)| {
                    a.iter().zip(b).filter(|(p, q)| p != q).count() as f64 / a.len() as f64
                })
                .collect()
        };
        println!(
            "step {step}: changed vs previous step per block {:?}, vs start {:?}",
            changed(&prev),
            changed(&first)
        );
        prev = now;
    }
}
