//! The dead-unit probe of `eval` on freshly built models: RUN's config and
//! vocabularies, initialised as `train --seed S` initialises them (seeds 1,
//! 2, 3), before any training step. Behind the first column of the README's
//! dead-unit table.
//!
//! `cargo run --release --example dead_at_init -- RUN DATA` (it only reads
//! RUN's config.json and vocab.json, and DATA's val split).
use burn::module::Module;
use burn::tensor::Device;
use moevqa::data::clevr_reader::ClevrSplit;
use moevqa::kernels::{Engine, EvalCnn};
use moevqa::train::clevr::{RunVocab, build_model, encode_split, probe_dead_units};
use moevqa::train::run::{RunPaths, load_config};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 3 {
        eprintln!("usage: cargo run --release --example dead_at_init -- RUN DATA");
        std::process::exit(2);
    }
    let paths = RunPaths::new(std::path::Path::new(&a[1]));
    let cfg = load_config(&paths.config).unwrap();
    let vocab = RunVocab::load(&paths.vocab).unwrap();
    let val = ClevrSplit::open(std::path::Path::new(&a[2]), "val").unwrap();
    let items = encode_split(&val, &vocab.words, &vocab.answers).unwrap();
    let device = Device::default();
    for seed in [1u64, 2, 3] {
        // As `train` does: seed the plain device, build on its autodiff form.
        device.seed(seed);
        let model = build_model(&vocab, cfg.model(), &device.clone().autodiff())
            .unwrap()
            .valid();
        let cnn = EvalCnn::new(&model.cnn, Engine::Fast).unwrap();
        let dead = probe_dead_units(&model, &cnn, &items, cfg.k, cfg.image_size, &device)
            .unwrap()
            .expect("a val split with questions");
        println!("seed {seed}: {dead}");
    }
}
