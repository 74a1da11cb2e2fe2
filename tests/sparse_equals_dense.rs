//! Sparse execution equals the dense reference (eval mode), over a grid of
//! shapes, and gradients reach the gate controller through the dense path.

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use moevqa::MoeError;
use moevqa::bench::{max_rel_diff, random_gates, random_selection};
use moevqa::cnn::{CnnLayout, Execution, GateSettings, ModularResNeXtConfig};
use moevqa::moe::gate::selection_mask;
use moevqa::moe::{BalanceLossConfig, BottleneckConfig, GateControllerConfig};

/// Stated tolerance: max |sparse - dense| / max |dense|.
const TOL: f64 = 1e-4;

#[test]
fn sparse_block_matches_dense_over_a_grid() {
    let device = Device::default();
    device.seed(3);
    let mut cases = 0;
    // (P, d): includes d = 1 and the two layouts' P.
    for (p, d) in [(4, 1), (4, 4), (8, 2), (12, 4), (32, 1)] {
        let mut ks = vec![1, p / 4, p / 2, p];
        ks.retain(|&k| k > 0);
        ks.dedup();
        for &k in &ks {
            for stride in [1, 2] {
                for (cin, cout) in [(6, 6), (5, 7)] {
                    for batch in [1, 3] {
                        let block = BottleneckConfig::new(cin, p * d, cout, p)
                            .with_stride(stride)
                            .init(&device)
                            .unwrap()
                            .with_random_batch_norms(&device);
                        let (h, w) = (5 + stride, 6);
                        let x = Tensor::<4>::random(
                            [batch, cin, h, w],
                            Distribution::Normal(0.0, 1.0),
                            &device,
                        );
                        let gates = random_gates(batch, p, &device);
                        let sel = random_selection(batch, p, k, (cases + 1) as u64);
                        let masked = gates.clone() * selection_mask(&sel, p, &device);
                        let dense = block.forward_dense(x.clone(), Some(masked)).unwrap();
                        let sparse = block.forward_sparse(x, gates, &sel).unwrap();
                        assert_eq!(dense.dims(), sparse.dims());
                        let diff = max_rel_diff(sparse, dense);
                        assert!(
                            diff <= TOL,
                            "P {p} d {d} k {k} stride {stride} C {cin}->{cout} batch {batch}: rel diff {diff}"
                        );
                        cases += 1;
                    }
                }
            }
        }
    }
    assert!(cases >= 100, "grid too small: {cases}");
}

#[test]
fn sparse_output_changes_with_the_selection() {
    // Guards against a sparse path that ignores the indices.
    let device = Device::default();
    device.seed(5);
    let block = BottleneckConfig::new(8, 16, 8, 4)
        .init(&device)
        .unwrap()
        .with_random_batch_norms(&device);
    let x = Tensor::<4>::random([1, 8, 5, 5], Distribution::Normal(0.0, 1.0), &device);
    let gates = random_gates(1, 4, &device);
    let a = block
        .forward_sparse(x.clone(), gates.clone(), &[vec![0, 1]])
        .unwrap();
    let b = block.forward_sparse(x, gates, &[vec![2, 3]]).unwrap();
    assert!(max_rel_diff(a, b) > 1e-3);
}

#[test]
fn sparse_rejects_bad_selections_and_shapes() {
    let device = Device::default();
    let block = BottleneckConfig::new(8, 16, 8, 4).init(&device).unwrap();
    let x = Tensor::<4>::zeros([2, 8, 4, 4], &device);
    let g = random_gates(2, 4, &device);
    let err = |sel: &[Vec<usize>]| block.forward_sparse(x.clone(), g.clone(), sel).unwrap_err();
    assert!(matches!(
        err(&[vec![], vec![]]),
        MoeError::InvalidK { k: 0, paths: 4 }
    ));
    assert!(matches!(
        err(&[vec![0, 1, 2, 3, 0], vec![0, 1, 2, 3, 1]]),
        MoeError::InvalidK { k: 5, paths: 4 }
    ));
    assert!(matches!(
        err(&[vec![0, 0], vec![1, 2]]),
        MoeError::Shape { .. }
    ));
    assert!(matches!(
        err(&[vec![0, 4], vec![1, 2]]),
        MoeError::Shape { .. }
    ));
    assert!(matches!(
        err(&[vec![0, 1], vec![1]]),
        MoeError::Shape { .. }
    ));
    assert!(matches!(err(&[vec![0, 1]]), MoeError::Shape { .. }));
    let wrong_c = Tensor::<4>::zeros([2, 7, 4, 4], &device);
    assert!(matches!(
        block.forward_dense(wrong_c, None),
        Err(MoeError::Shape { .. })
    ));
    assert!(matches!(
        BottleneckConfig::new(8, 18, 8, 4).init(&device),
        Err(MoeError::NotDivisible {
            channels: 18,
            paths: 4,
            ..
        })
    ));
    assert!(
        block
            .forward_dense(x.clone(), Some(random_gates(2, 3, &device)))
            .is_err()
    );
}

/// A small layout of the same type as Tables 3 and 4 (two stages, projection
/// shortcuts, a head), cheap enough for gradient and end-to-end checks.
fn small_layout() -> CnnLayout {
    let mut l = CnnLayout::clevr();
    l.name = "small".into();
    l.stem.channels = 8;
    for s in &mut l.stages {
        s.inner = 8;
        s.out = 8;
        s.paths = 4;
    }
    l.stages[0].out = 12;
    l.head = Some(6);
    l
}

#[test]
fn whole_network_sparse_matches_dense_and_k_p_equals_full() {
    let device = Device::default();
    device.seed(9);
    let gate = GateSettings::new().with_question_dim(10).with_hidden(8);
    let net = ModularResNeXtConfig::new(small_layout(), 2)
        .with_gate(gate)
        .init(&device)
        .unwrap();
    for batch in [1, 4] {
        let img = Tensor::<4>::random([batch, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
        let q = Tensor::<2>::random([batch, 10], Distribution::Normal(0.0, 1.0), &device);
        for k in [1, 2, 4] {
            let dense = net
                .forward_k(img.clone(), Some(q.clone()), k, Execution::Dense)
                .unwrap();
            let sparse = net
                .forward_k(img.clone(), Some(q.clone()), k, Execution::Sparse)
                .unwrap();
            assert_eq!(dense.gates.len(), 3);
            for (a, b) in dense.gates.iter().zip(&sparse.gates) {
                assert_eq!(a.indices, b.indices, "selection differs at k {k}");
                assert!(a.indices.iter().all(|s| s.len() == k));
            }
            let diff = max_rel_diff(sparse.features, dense.features.clone());
            assert!(diff <= TOL, "batch {batch} k {k}: {diff}");
            assert_eq!(dense.features.dims(), [batch, 6, 2, 2]);
        }
    }
}

#[test]
fn gradients_reach_the_gate_controller() {
    let device = Device::default().autodiff();
    device.seed(4);
    let gate = GateSettings::new().with_question_dim(10).with_hidden(8);
    let net = ModularResNeXtConfig::new(small_layout(), 2)
        .with_gate(gate)
        .init(&device)
        .unwrap();
    let img = Tensor::<4>::random([3, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    let q = Tensor::<2>::random([3, 10], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let out = net.forward(img, Some(q.clone()), Execution::Dense).unwrap();
    let target = Tensor::<4>::random(out.features.dims(), Distribution::Normal(0.0, 1.0), &device);
    let values: Vec<_> = out.gates.iter().map(|g| g.values.clone()).collect();
    let loss = (out.features * target).sum() + BalanceLossConfig::new().loss(&values).unwrap();
    let grads = loss.backward();
    for (i, ctrl) in net.gates.iter().enumerate() {
        for (name, g) in [
            ("W_g", ctrl.gate.weight.grad(&grads)),
            // b_g once lost its requires-grad flag at init and never trained.
            (
                "b_g",
                ctrl.gate
                    .bias
                    .as_ref()
                    .and_then(|b| b.grad(&grads))
                    .map(|g| g.unsqueeze_dim::<2>(0)),
            ),
            ("W_IA", ctrl.image_att.weight.grad(&grads)),
        ] {
            let g = g.unwrap_or_else(|| panic!("block {i}: no gradient for {name}"));
            let norm = g.abs().sum().into_scalar::<f32>();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "block {i} {name}: |grad| = {norm}"
            );
        }
    }
    let gq = q.grad(&grads).expect("question gradient");
    assert!(gq.abs().sum().into_scalar::<f32>() > 0.0);
}

#[test]
fn gate_gradient_matches_finite_differences() {
    // d(loss)/d(gate logits) through normalisation, masking and the dense block,
    // against central differences (f32, so a loose relative tolerance).
    let base = Device::default();
    base.seed(6);
    // valid(): BN flags off, so the block runs eval-mode BN on the autodiff
    // device too and both sides differentiate the same function.
    let block = BottleneckConfig::new(4, 8, 4, 4)
        .init(&base)
        .unwrap()
        .with_random_batch_norms(&base)
        .valid();
    let x = Tensor::<4>::random([2, 4, 4, 4], Distribution::Normal(0.0, 1.0), &base);
    let w = Tensor::<4>::random([2, 4, 4, 4], Distribution::Normal(0.0, 1.0), &base);
    let logits: Vec<f32> = vec![0.3, 0.9, 0.5, 0.2, 0.7, 0.1, 0.4, 0.8];
    let sel = vec![vec![1, 2], vec![0, 3]];
    let loss = |dev: &Device, l: Tensor<2>| {
        let g = moevqa::moe::normalize_gates(l) * selection_mask(&sel, 4, dev);
        let y = block
            .clone()
            .to_device(dev)
            .forward_dense(x.clone().to_device(dev), Some(g))
            .unwrap();
        (y * w.clone().to_device(dev)).sum()
    };
    let ad = base.clone().autodiff();
    let l = Tensor::<2>::from_data(TensorData::new(logits.clone(), [2, 4]), &ad).require_grad();
    let grads = loss(&ad, l.clone()).backward();
    let analytic = l
        .grad(&grads)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    let eps = 1e-2f32;
    for i in 0..8 {
        let at = |delta: f32| {
            let mut v = logits.clone();
            v[i] += delta;
            let t = Tensor::<2>::from_data(TensorData::new(v, [2, 4]), &base);
            loss(&base, t).into_scalar::<f32>()
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        let err = (numeric - analytic[i]).abs();
        assert!(
            err <= 2e-2 * numeric.abs().max(analytic[i].abs()).max(1.0),
            "logit {i}: numeric {numeric} analytic {}",
            analytic[i]
        );
    }
}

#[test]
fn controller_works_at_batch_one() {
    let device = Device::default();
    let ctrl = GateControllerConfig::new(4, 6, 5).init(&device).unwrap();
    let gates = ctrl
        .forward(
            Tensor::zeros([1, 4, 3, 3], &device),
            Tensor::zeros([1, 6], &device),
            2,
        )
        .unwrap();
    assert_eq!(gates.indices.len(), 1);
    assert_eq!(gates.k(), 2);
}
