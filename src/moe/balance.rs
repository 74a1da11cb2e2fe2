//! Load balancing, paper appendix C (after Shazeer et al. 2017).
//!
//! Per block, the *importance* of expert e is the sum of its gate value g'
//! over the batch (g' normalised over all P paths, before top-k). The loss is
//! the squared coefficient of variation of the importances,
//! `cv^2 = var / (mean^2 + 1e-10)` with the population variance (divide by
//! P), summed over the blocks and multiplied by a weight (default 0.01).

use burn::config::Config;
use burn::tensor::Tensor;

use super::Gates;

/// Epsilon in the denominator of cv^2, as in Shazeer et al.
pub const CV_EPSILON: f64 = 1e-10;

/// Weight of the balance term in the total loss.
#[derive(Config, Debug)]
pub struct BalanceLossConfig {
    /// Multiplier of the summed cv^2 (the paper and Shazeer et al.: ~0.01).
    #[config(default = 0.01)]
    pub weight: f64,
}

/// Importance per expert: sum of gate values over the batch; [N, P] -> [P].
pub fn importance(gates: Tensor<2>) -> Tensor<1> {
    let [_, p] = gates.dims();
    gates.sum_dim(0).reshape([p])
}

/// Squared coefficient of variation of a vector, shape [1].
pub fn cv_squared(x: Tensor<1>) -> Tensor<1> {
    let mean = x.clone().mean();
    let var = (x - mean.clone()).powi_scalar(2).mean();
    var / (mean.powi_scalar(2).add_scalar(CV_EPSILON))
}

impl BalanceLossConfig {
    /// `weight * sum over blocks of cv^2(importance)`; `None` when there are no gated blocks.
    pub fn loss(&self, block_gates: &[Tensor<2>]) -> Option<Tensor<1>> {
        block_gates
            .iter()
            .map(|g| cv_squared(importance(g.clone())))
            .reduce(|a, b| a + b)
            .map(|s| s.mul_scalar(self.weight))
    }

    /// `task_loss` plus the balance loss of `gates` (every block's values),
    /// the training loss of both models (paper appendix C).
    pub fn add_to(&self, task_loss: Tensor<1>, gates: &[Gates]) -> Tensor<1> {
        let values: Vec<_> = gates.iter().map(|g| g.values.clone()).collect();
        match self.loss(&values) {
            Some(b) => task_loss + b,
            None => task_loss,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t2(v: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
        Tensor::from_data(TensorData::new(v, shape), &Device::default())
    }

    fn scalar(t: Tensor<1>) -> f64 {
        t.into_scalar::<f32>() as f64
    }

    #[test]
    fn hand_computed_cv_squared() {
        // Gates of 2 samples over 3 experts; importance = [0.7, 0.8, 0.5],
        // mean 2/3, population var = (0.0011.. + 0.01777.. + 0.02777..)/3 = 0.015555..
        // cv^2 = 0.015555.. / 0.444444.. = 0.035
        let g = t2(vec![0.5, 0.3, 0.2, 0.2, 0.5, 0.3], [2, 3]);
        let imp = importance(g.clone())
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert!(
            (imp[0] - 0.7).abs() < 1e-6
                && (imp[1] - 0.8).abs() < 1e-6
                && (imp[2] - 0.5).abs() < 1e-6
        );
        let loss = BalanceLossConfig::new().loss(&[g]).unwrap();
        assert!((scalar(loss) - 0.01 * 0.035).abs() < 1e-8);
    }

    #[test]
    fn balanced_gates_cost_nothing_and_blocks_add_up() {
        let even = t2(vec![0.25; 8], [2, 4]);
        assert!(scalar(cv_squared(importance(even.clone()))).abs() < 1e-12);
        // One expert takes everything: importance [2, 0, 0, 0], mean 0.5, var 0.75, cv^2 = 3.
        let skewed = t2(vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], [2, 4]);
        let cfg = BalanceLossConfig::new().with_weight(0.5);
        let loss = scalar(cfg.loss(&[even, skewed]).unwrap());
        assert!((loss - 0.5 * 3.0).abs() < 1e-5, "{loss}");
        assert!(cfg.loss(&[]).is_none());
    }

    #[test]
    fn zero_importance_is_finite() {
        let zero = t2(vec![0.0; 4], [1, 4]);
        assert_eq!(scalar(cv_squared(importance(zero))), 0.0);
    }
}
