//! Gradient filters applied between the backward pass and AdamW: Grokfast (Lee et al. 2024) and
//! ⊥Grad (Prieto et al. 2025). Each follows its authors' PyTorch code operation for operation
//! in float32 (docs/reference.md §12), so a run with a filter matches a PyTorch run with it.
//!
//! - Grokfast EMA (`gradfilter_ema`): the state starts as the first gradient; each step
//!   `ema ← ema·α + g·(1 − α)`, then `g ← g + ema·λ`.
//! - Grokfast MA (`gradfilter_ma`, mean filter, warm-up on): the last `window` gradients are kept;
//!   once the window is full, `g ← g + (Σ window)/window·λ` (the sum in arrival order).
//! - ⊥Grad (`OrthoGrad`): per parameter, remove g's component along the weight w and rescale
//!   to g's norm: `g⊥ = g − (w·g)/(w·w + 1e-30)·w`, `g ← g⊥·‖g‖/(‖g⊥‖ + 1e-30)`.
//!
//! Order when several are on: Grokfast, then ⊥Grad, then the optimizer.

use crate::error::{Error, Result};
use crate::model::StateDict;
use crate::tensor::Tensor;
use ndarray::{ArrayD, Zip};
use std::collections::{HashMap, VecDeque};

/// A Grokfast filter and its parameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grokfast {
    /// Exponential moving average: (α, λ) — the authors' defaults are (0.98, 2.0).
    Ema {
        /// The EMA's momentum α.
        alpha: f64,
        /// The amplification λ.
        lamb: f64,
    },
    /// Moving average over a window: (window, λ) — the authors' defaults are (100, 5.0).
    Ma {
        /// The window size.
        window: usize,
        /// The amplification λ.
        lamb: f64,
    },
}

impl Grokfast {
    /// Parse `ALPHA,LAMBDA` (EMA) or `WINDOW,LAMBDA` (MA) as the flags take them.
    pub fn parse(flag: &str, s: &str) -> Result<Grokfast> {
        let bad = |m: &str| Error::invalid(flag, format!("'{s}': {m}"));
        let (a, l) = s
            .split_once(',')
            .ok_or_else(|| bad("expected two numbers separated by a comma"))?;
        let lamb: f64 = l.trim().parse().map_err(|_| bad("λ is not a number"))?;
        if !lamb.is_finite() || lamb < 0.0 {
            return Err(bad("λ must be finite and ≥ 0"));
        }
        if flag.ends_with("ema") {
            let alpha: f64 = a.trim().parse().map_err(|_| bad("α is not a number"))?;
            if !(0.0..1.0).contains(&alpha) {
                return Err(bad("α must be in [0, 1)"));
            }
            Ok(Grokfast::Ema { alpha, lamb })
        } else {
            let window: usize = a
                .trim()
                .parse()
                .map_err(|_| bad("the window is not a count"))?;
            if window == 0 {
                return Err(bad("the window must be at least 1"));
            }
            Ok(Grokfast::Ma { window, lamb })
        }
    }
}

/// The filters of a run and their state.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    grokfast: Option<Grokfast>,
    orthograd: bool,
    ema: HashMap<String, ArrayD<f32>>,
    window: HashMap<String, VecDeque<ArrayD<f32>>>,
}

fn f32_of<'a>(sd: &'a StateDict, name: &str) -> Result<&'a ArrayD<f32>> {
    sd.get(name)
        .ok_or_else(|| Error::missing("parameters", name))?
        .expect::<f32>(name)
}

impl Filters {
    /// Filters with empty state.
    pub fn new(grokfast: Option<Grokfast>, orthograd: bool) -> Filters {
        Filters {
            grokfast,
            orthograd,
            ..Filters::default()
        }
    }

    /// The Grokfast EMA state by parameter name (empty before the first step or without EMA).
    pub fn ema_state(&self) -> StateDict {
        let mut sd = StateDict::new();
        let mut names: Vec<&String> = self.ema.keys().collect();
        names.sort_by_key(|n| crate::model::tl_order_key(n));
        for n in names {
            sd.insert(n.clone(), Tensor::F32(self.ema[n].clone()));
        }
        sd
    }

    /// Restore the Grokfast EMA state saved by [`Filters::ema_state`]. A moving-average
    /// filter's window is not saved: resuming one is an error.
    pub fn restore(&mut self, ema: &StateDict, steps: u64) -> Result<()> {
        if let (Some(Grokfast::Ma { .. }), true) = (self.grokfast, steps > 0) {
            return Err(Error::Unsupported(
                "resuming a Grokfast-MA run (its window of gradients is not saved)".into(),
            ));
        }
        if let (Some(Grokfast::Ema { .. }), true, true) = (self.grokfast, steps > 0, ema.is_empty())
        {
            return Err(Error::missing(
                "run['optimizer']",
                "grokfast_ema (the EMA filter's state)",
            ));
        }
        for (n, t) in ema.iter() {
            self.ema.insert(n.to_string(), t.expect::<f32>(n)?.clone());
        }
        Ok(())
    }

    /// Whether any filter is on.
    pub fn active(&self) -> bool {
        self.grokfast.is_some() || self.orthograd
    }

    /// Filter one step's gradients in place (`params`: the weights they belong to).
    pub fn apply(&mut self, grads: &mut StateDict, params: &StateDict) -> Result<()> {
        let names: Vec<String> = grads.names().map(str::to_string).collect();
        for name in &names {
            let Some(Tensor::F32(g)) = grads.get(name) else {
                return Err(Error::type_err(name, "f32 gradient", "other dtype"));
            };
            let mut g = g.clone();
            match self.grokfast {
                Some(Grokfast::Ema { alpha, lamb }) => {
                    let (a, one_minus_a, l) = (alpha as f32, (1.0 - alpha) as f32, lamb as f32);
                    let ema = self.ema.entry(name.clone()).or_insert_with(|| g.clone());
                    Zip::from(&mut *ema)
                        .and(&g)
                        .for_each(|e, &g| *e = *e * a + g * one_minus_a);
                    Zip::from(&mut g).and(&*ema).for_each(|g, &e| *g += e * l);
                }
                Some(Grokfast::Ma { window, lamb }) => {
                    let q = self.window.entry(name.clone()).or_default();
                    q.push_back(g.clone());
                    if q.len() > window {
                        q.pop_front();
                    }
                    if q.len() == window {
                        // Python's sum(): 0 + g₁ + g₂ + …, then / len, then · λ.
                        let mut sum = ArrayD::<f32>::zeros(g.raw_dim());
                        for x in q.iter() {
                            sum += x;
                        }
                        let (n, l) = (window as f32, lamb as f32);
                        Zip::from(&mut g)
                            .and(&sum)
                            .for_each(|g, &s| *g += (s / n) * l);
                    }
                }
                None => {}
            }
            if self.orthograd {
                let w = f32_of(params, name)?;
                if w.shape() != g.shape() {
                    return Err(Error::Shape {
                        name: format!("gradient of {name}"),
                        expected: w.shape().to_vec(),
                        found: g.shape().to_vec(),
                    });
                }
                let (mut wg, mut ww) = (0f64, 0f64);
                Zip::from(w).and(&g).for_each(|&w, &g| {
                    wg += w as f64 * g as f64;
                    ww += w as f64 * w as f64;
                });
                let proj = (wg / (ww + 1e-30)) as f32;
                let (mut gn, mut on) = (0f64, 0f64);
                Zip::from(&mut g).and(w).for_each(|g, &w| {
                    gn += *g as f64 * *g as f64;
                    *g -= proj * w;
                    on += *g as f64 * *g as f64;
                });
                let scale = (gn.sqrt() / (on.sqrt() + 1e-30)) as f32;
                g.mapv_inplace(|x| x * scale);
            }
            grads.insert(name.clone(), Tensor::F32(g));
        }
        Ok(())
    }
}
