//! The paper's two layouts build and produce the shapes of Tables 3 and 4.

use burn::tensor::{Device, Distribution, Tensor};
use moevqa::MoeError;
use moevqa::cnn::{CnnLayout, Execution, GateSettings, ModularResNeXtConfig};

#[test]
fn clevr_cnn_gives_8x8x24_at_128() {
    let device = Device::default();
    let gate = GateSettings::new();
    let net = ModularResNeXtConfig::new(CnnLayout::clevr(), 6)
        .with_gate(gate.clone())
        .init(&device)
        .unwrap();
    let img = Tensor::<4>::random([2, 3, 128, 128], Distribution::Normal(0.0, 1.0), &device);
    let q = Tensor::<2>::random(
        [2, gate.question_dim],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    for exec in [Execution::Dense, Execution::Sparse] {
        let out = net.forward(img.clone(), Some(q.clone()), exec).unwrap();
        assert_eq!(out.features.dims(), [2, 24, 8, 8]);
        assert_eq!(out.gates.len(), 3);
        assert!(
            out.gates
                .iter()
                .all(|g| g.values.dims() == [2, 12] && g.k() == 6)
        );
    }
    // The plain network (Table 2's k = P has gates; the ungated one has none).
    let plain = ModularResNeXtConfig::new(CnnLayout::clevr(), 12)
        .with_gated(false)
        .init(&device)
        .unwrap();
    let out = plain.forward(img, None, Execution::Dense).unwrap();
    assert_eq!(out.features.dims(), [2, 24, 8, 8]);
    assert!(out.gates.is_empty());
}

#[test]
fn resnext101_gives_7x7x2048_at_224() {
    let device = Device::default();
    let gate = GateSettings::new().with_hidden(16);
    let net = ModularResNeXtConfig::new(CnnLayout::resnext101_32x4d(), 8)
        .with_gate(gate.clone())
        .init(&device)
        .unwrap();
    assert_eq!(net.blocks.len(), 33);
    assert_eq!(net.gates.len(), 33);
    let img = Tensor::<4>::random([1, 3, 224, 224], Distribution::Normal(0.0, 1.0), &device);
    let q = Tensor::<2>::random(
        [1, gate.question_dim],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let out = net.forward(img, Some(q), Execution::Sparse).unwrap();
    assert_eq!(out.features.dims(), [1, 2048, 7, 7]);
    assert!(out.features.abs().sum().into_scalar::<f32>().is_finite());
}

#[test]
fn network_bad_input_is_an_error() {
    let device = Device::default();
    let net = ModularResNeXtConfig::new(CnnLayout::clevr(), 6)
        .init(&device)
        .unwrap();
    let q = Tensor::<2>::zeros([1, 128], &device);
    let gray = Tensor::<4>::zeros([1, 1, 128, 128], &device);
    assert!(matches!(
        net.forward(gray, Some(q.clone()), Execution::Dense),
        Err(MoeError::Shape { .. })
    ));
    let img = Tensor::<4>::zeros([1, 3, 64, 64], &device);
    assert!(matches!(
        net.forward(img.clone(), None, Execution::Sparse),
        Err(MoeError::Config { .. })
    ));
    assert!(matches!(
        net.forward(
            img.clone(),
            Some(Tensor::zeros([1, 7], &device)),
            Execution::Dense
        ),
        Err(MoeError::Shape { .. })
    ));
    assert!(matches!(
        net.forward_k(img.clone(), Some(q.clone()), 0, Execution::Sparse),
        Err(MoeError::InvalidK { k: 0, paths: 12 })
    ));
    assert!(matches!(
        net.forward_k(img, Some(q), 13, Execution::Dense),
        Err(MoeError::InvalidK { k: 13, paths: 12 })
    ));
    // Wrong rank, checked on the dims a caller holds before building a Tensor<4>.
    assert!(matches!(
        net.check_images(&[3, 128, 128]),
        Err(MoeError::Shape { .. })
    ));
    assert!(matches!(
        ModularResNeXtConfig::new(CnnLayout::clevr(), 0).init(&device),
        Err(MoeError::InvalidK { k: 0, .. })
    ));
    let mut bad = CnnLayout::clevr();
    bad.stages[0].inner = 50;
    assert!(matches!(
        ModularResNeXtConfig::new(bad, 6).init(&device),
        Err(MoeError::NotDivisible { .. })
    ));
}
