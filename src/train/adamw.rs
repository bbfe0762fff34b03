//! `torch.optim.AdamW` (single-tensor CPU path, amsgrad off), step for step.
//!
//! Per parameter with a gradient, in float32 with torch's scalar casts:
//! `p *= 1 − lr·wd` (decoupled decay); `m = lerp(m, g, 1 − β1)`; `v = v·β2 + (1 − β2)·g·g`;
//! `p += −(lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps)`; bias corrections in float64 as Python
//! computes them. Parameters without a gradient (the demo's frozen biases) are not touched.

use crate::error::{Error, Result};
use crate::model::StateDict;
use crate::tensor::Tensor;
use ndarray::{ArrayD, Zip};

/// AdamW hyper-parameters (defaults: the demo's lr 1e-3, wd 1.0, betas (0.9, 0.98), eps 1e-8).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε in the denominator.
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            weight_decay: 1.0,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
        }
    }
}

/// Optimizer state: step count and the two moment estimates per parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    /// The hyper-parameters.
    pub config: AdamWConfig,
    /// Steps taken.
    pub step: u64,
    /// First moments by parameter name.
    pub exp_avg: StateDict,
    /// Second moments by parameter name.
    pub exp_avg_sq: StateDict,
}

impl AdamW {
    /// An optimizer with no state yet.
    pub fn new(config: AdamWConfig) -> AdamW {
        AdamW {
            config,
            step: 0,
            exp_avg: StateDict::new(),
            exp_avg_sq: StateDict::new(),
        }
    }

    /// One step with learning rate `lr` (the configured one, or a scheduled value).
    pub fn step(&mut self, params: &mut StateDict, grads: &StateDict, lr: f64) -> Result<()> {
        let c = self.config;
        self.step += 1;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - c.beta1.powi(t);
        let bias_correction2 = 1.0 - c.beta2.powi(t);
        let step_size = (lr / bias_correction1) as f32;
        let bc2_sqrt = bias_correction2.sqrt() as f32;
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let w1 = (1.0 - c.beta1) as f32;
        let b2 = c.beta2 as f32;
        let w2 = (1.0 - c.beta2) as f32;
        let eps = c.eps as f32;
        for (name, g) in grads.iter() {
            let g = g.expect::<f32>(name)?;
            let p = params
                .get(name)
                .ok_or_else(|| Error::missing("parameters", name))?
                .expect::<f32>(name)?;
            if p.shape() != g.shape() {
                return Err(Error::Shape {
                    name: format!("gradient of {name}"),
                    expected: p.shape().to_vec(),
                    found: g.shape().to_vec(),
                });
            }
            let zeros = || Tensor::F32(ArrayD::zeros(g.raw_dim()));
            let mut m = self.exp_avg.remove(name).unwrap_or_else(zeros);
            let mut v = self.exp_avg_sq.remove(name).unwrap_or_else(zeros);
            let mut p = p.clone();
            {
                let (Tensor::F32(m), Tensor::F32(v)) = (&mut m, &mut v) else {
                    return Err(Error::type_err(name, "f32 optimizer state", "other dtype"));
                };
                Zip::from(&mut p)
                    .and(m)
                    .and(v)
                    .and(g)
                    .for_each(|p, m, v, &g| {
                        *p *= decay;
                        *m += w1 * (g - *m);
                        *v = *v * b2 + w2 * g * g;
                        let denom = v.sqrt() / bc2_sqrt + eps;
                        *p += -step_size * (*m / denom);
                    });
            }
            params.insert(name, Tensor::F32(p));
            self.exp_avg.insert(name, m);
            self.exp_avg_sq.insert(name, v);
        }
        Ok(())
    }
}
