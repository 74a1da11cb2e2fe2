//! Probe: the Relation Network's training steps with weights anyone can
//! load elsewhere. Builds the RN (vocab 20, 10 answers, k = P, g and f 128,
//! dropout off so both sides are deterministic), a fixed batch (64 images
//! of 75x75 in [0, 1], questions of 4 to 10 words), and writes to FILE.json:
//! every parameter by module path before training, the loss of each of
//! STEPS Adam steps (lr 1e-3) on that batch, the gradients of the first
//! step, and the parameters after the last. `python bench/torch_rn_train.py
//! --parity FILE.json` loads the same weights into the PyTorch model, takes
//! the same steps and prints where the two differ.
//!
//! With VOCAB and ANSWERS the model has those sizes instead, so that
//! `python bench/torch_rn_train.py --init-from FILE.json --data DIR ...`
//! can train PyTorch's RN from moevqa's initial weights (STEPS 0 writes
//! only them).
//!
//! `cargo run --release --example rn_parity -- FILE.json [STEPS [VOCAB ANSWERS [SEED]]]`
use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Gradients;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use moevqa::cnn::Execution;
use moevqa::models::{GatedVqaModel, RelationNetwork, RelationNetworkConfig};
use moevqa::moe::BalanceLossConfig;
use moevqa::train::clevr::rn_loss;
use serde_json::{Value, json};

/// Every float parameter by dotted module path: (shape, values, gradient).
struct Collect<'a> {
    path: Vec<String>,
    grads: Option<&'a Gradients>,
    out: BTreeMap<String, Value>,
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32")
}

impl ModuleVisitor for Collect<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let name = self.path.join(".");
        let v = match self.grads {
            None => json!({"shape": t.dims().to_vec(), "values": values(t)}),
            Some(g) => match t.grad(g) {
                Some(g) => json!(values(g)),
                None => Value::Null,
            },
        };
        self.out.insert(name, v);
    }
}

fn collect(m: &RelationNetwork, grads: Option<&Gradients>) -> BTreeMap<String, Value> {
    let mut c = Collect {
        path: vec![],
        grads,
        out: BTreeMap::new(),
    };
    m.visit(&mut c);
    c.out
}

fn main() {
    let mut args = std::env::args().skip(1);
    let file = args.next().expect("usage: rn_parity FILE.json [STEPS]");
    let steps: usize = args.next().map_or(5, |s| s.parse().expect("STEPS"));
    let vocab: usize = args.next().map_or(20, |s| s.parse().expect("VOCAB"));
    let answers: usize = args.next().map_or(10, |s| s.parse().expect("ANSWERS"));
    let seed: u64 = args.next().map_or(3, |s| s.parse().expect("SEED"));
    let dev = Device::default().autodiff();
    dev.seed(seed);
    let (n, t) = (64, 10);
    let mut model = RelationNetworkConfig::new(vocab, answers, 12)
        .with_g_dim(128)
        .with_f_dim(128)
        .with_dropout(0.0)
        .init(&dev)
        .expect("model");
    let images = Tensor::<4>::random([n, 3, 75, 75], Distribution::Uniform(0.0, 1.0), &dev);
    let lengths: Vec<usize> = (0..n).map(|i| 4 + i % 7).collect();
    let mut tok = vec![0i64; n * t];
    for (r, &len) in lengths.iter().enumerate() {
        for c in 0..len {
            tok[r * t + c] = 2 + ((r * 7 + c * 3) % 18) as i64;
        }
    }
    let targets: Vec<i64> = (0..n as i64).map(|i| (i * 3) % answers as i64).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(tok.clone(), [n, t]), &dev);
    let target = Tensor::<1, Int>::from_data(TensorData::new(targets.clone(), [n]), &dev);
    let mut report = json!({
        "images": values(images.clone()),
        "tokens": tok,
        "lengths": lengths,
        "targets": targets,
        "params": collect(&model, None),
    });
    let mut optim = moevqa::train::clevr::adam();
    let mut losses = vec![];
    for step in 0..steps {
        let out = model
            .forward(
                images.clone(),
                tokens.clone(),
                &lengths,
                12,
                Execution::Dense,
            )
            .expect("forward");
        let loss = rn_loss(&out, target.clone(), &BalanceLossConfig::new());
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = loss.backward();
        if step == 0 {
            report["grads"] = json!(collect(&model, Some(&grads)));
        }
        let grads = GradientsParams::from_grads(grads, &model);
        model = optim.step(1e-3, model, grads);
    }
    println!("losses {losses:?}");
    report["losses"] = json!(losses);
    report["after"] = json!(collect(&model, None));
    std::fs::write(&file, report.to_string()).expect("write");
}
