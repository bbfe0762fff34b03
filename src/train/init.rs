//! TransformerLens's weight initialisation, reproduced bit for bit (docs/reference.md §5).
//!
//! TL (init_mode "gpt2") seeds torch's CPU generator with `cfg.seed` and calls
//! `normal_(std=initializer_range)` on every `W_` parameter in `named_parameters()` order; biases
//! stay zero. torch's float `normal_` on a contiguous tensor of ≥ 16 elements fills the tensor
//! with 24-bit uniforms, then transforms each block of 16 by Box–Muller using the single-precision
//! Cephes polynomials of `avx_mathfun.h` — with the multiply–add pairs that GCC contracts into
//! fused multiply-adds, mirrored here with `f32::mul_add`. If the size is not a multiple of 16, the
//! last 16 slots are refilled with fresh uniforms and transformed again.

#![allow(clippy::excessive_precision, clippy::approx_constant)]

use crate::error::{Error, Result};
use crate::model::{HookedTransformerConfig, StateDict};
use crate::task::Mt19937;
use crate::tensor::Tensor;
use ndarray::{ArrayD, IxDyn};

// avx_mathfun's constants, written digit for digit as in its source (hence the lint allowances): C rounds each decimal literal to double,
// then to float, which `f64 as f32` reproduces.
const SQRTHF: f32 = 0.707106781186547524_f64 as f32;
const LOG_P: [f32; 9] = [
    7.0376836292E-2_f64 as f32,
    -1.1514610310E-1_f64 as f32,
    1.1676998740E-1_f64 as f32,
    -1.2420140846E-1_f64 as f32,
    1.4249322787E-1_f64 as f32,
    -1.6668057665E-1_f64 as f32,
    2.0000714765E-1_f64 as f32,
    -2.4999993993E-1_f64 as f32,
    3.3333331174E-1_f64 as f32,
];
const LOG_Q1: f32 = -2.12194440e-4_f64 as f32;
const LOG_Q2: f32 = 0.693359375_f64 as f32;
const FOPI: f32 = 1.27323954473516_f64 as f32;
const DP1: f32 = 0.78515625_f64 as f32;
const DP2: f32 = 2.4187564849853515625e-4_f64 as f32;
const DP3: f32 = 3.77489497744594108e-8_f64 as f32;
const SIN_P: [f32; 3] = [
    -1.9515295891E-4_f64 as f32,
    8.3321608736E-3_f64 as f32,
    -1.6666654611E-1_f64 as f32,
];
const COS_P: [f32; 3] = [
    2.443315711809948E-005_f64 as f32,
    -1.388731625493765E-003_f64 as f32,
    4.166664568298827E-002_f64 as f32,
];

/// `log256_ps` for one lane (x > 0).
fn log_ps(x: f32) -> f32 {
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    // if m < SQRTHF { e -= 1; x = m + m − 1 } else { x = m − 1 }
    let below = m < SQRTHF;
    let mut x = m - 1.0;
    if below {
        e -= 1.0;
        x += m;
    }
    let z = x * x;
    let mut y = LOG_P[0];
    for &p in &LOG_P[1..] {
        y = y.mul_add(x, p);
    }
    let y = y * x;
    let y = y.mul_add(z, e * LOG_Q1);
    let y = (-z).mul_add(0.5, y);
    e.mul_add(LOG_Q2, x + y)
}

/// `sincos256_ps` for one lane: (sin θ, cos θ).
fn sincos_ps(theta: f32) -> (f32, f32) {
    let sign_sin = theta.is_sign_negative();
    let mut x = theta.abs();
    let j = ((x * FOPI) as i32 + 1) & !1;
    let y = j as f32;
    let swap_sin = j & 4 != 0;
    let poly_sin = j & 2 == 0;
    x = y.mul_add(-DP1, x);
    x = y.mul_add(-DP2, x);
    x = y.mul_add(-DP3, x);
    let sign_cos = (!(j - 2)) & 4 != 0;
    let sign_sin = sign_sin ^ swap_sin;
    let z = x * x;
    let c = COS_P[0].mul_add(z, COS_P[1]).mul_add(z, COS_P[2]) * z;
    let c = c.mul_add(z, -(z * 0.5)) + 1.0;
    let s = SIN_P[0].mul_add(z, SIN_P[1]).mul_add(z, SIN_P[2]) * z;
    let s = s.mul_add(x, x);
    let (ysin1, ysin2) = if poly_sin { (0.0, s) } else { (c, 0.0) };
    let sin = ysin1 + ysin2;
    let cos = (c - ysin1) + (s - ysin2);
    let flip = |v: f32, neg: bool| if neg { -v } else { v };
    (flip(sin, sign_sin), flip(cos, sign_cos))
}

/// torch's `uniform_real_distribution<float>(0, 1)`: 24 random bits scaled by 2⁻²⁴.
fn uniform(g: &mut Mt19937) -> f32 {
    (g.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
}

/// `normal_fill_16`: Box–Muller on 8 pairs (u1 = 1 − d[j], u2 = d[j + 8]).
fn normal_fill_16(d: &mut [f32], mean: f32, std: f32) {
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * log_ps(u1)).sqrt();
        let (s, c) = sincos_ps(two_pi * u2);
        d[j] = (radius * c).mul_add(std, mean);
        d[j + 8] = (radius * s).mul_add(std, mean);
    }
}

/// torch's `normal_(mean, std)` on a contiguous float32 tensor of `n ≥ 16` elements.
pub fn torch_normal(g: &mut Mt19937, n: usize, mean: f32, std: f32) -> Result<Vec<f32>> {
    if n < 16 {
        return Err(Error::Unsupported(format!(
            "normal_ on {n} < 16 elements (torch uses a different, scalar algorithm there)"
        )));
    }
    let mut d: Vec<f32> = (0..n).map(|_| uniform(g)).collect();
    for i in (0..n - 15).step_by(16) {
        normal_fill_16(&mut d[i..i + 16], mean, std);
    }
    if !n.is_multiple_of(16) {
        let tail = &mut d[n - 16..];
        for v in tail.iter_mut() {
            *v = uniform(g);
        }
        normal_fill_16(tail, mean, std);
    }
    Ok(d)
}

/// The parameter names and shapes of a TL model, in `named_parameters()` order (TL ≥ 1.13:
/// per block ln1, ln2, attn, mlp — the modules in the order `TransformerBlock` creates them —,
/// then ln_final and unembed; LayerNorm has `w` and `b`, RMSNorm `w`, the *Pre variants none).
pub fn parameter_shapes(cfg: &HookedTransformerConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let norm = cfg.normalization_type.as_deref();
    let norm_params = |prefix: &str, width: usize| -> Result<Vec<(String, Vec<usize>)>> {
        Ok(match norm {
            None | Some("LNPre") | Some("RMSPre") => vec![],
            Some("LN") => vec![
                (format!("{prefix}.w"), vec![width]),
                (format!("{prefix}.b"), vec![width]),
            ],
            Some("RMS") => vec![(format!("{prefix}.w"), vec![width])],
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "initialising normalization_type {other}"
                )))
            }
        })
    };
    if cfg.act_fn.as_deref() == Some("solu_ln") {
        return Err(Error::Unsupported("initialising act_fn solu_ln".into()));
    }
    let (d, h, e) = (cfg.d_model(), cfg.n_heads(), cfg.d_head());
    let mut out = vec![
        ("embed.W_E".to_string(), vec![cfg.d_vocab(), d]),
        ("pos_embed.W_pos".to_string(), vec![cfg.n_ctx(), d]),
    ];
    for l in 0..cfg.n_layers() {
        out.extend(norm_params(&format!("blocks.{l}.ln1"), d)?);
        if !cfg.attn_only {
            out.extend(norm_params(&format!("blocks.{l}.ln2"), d)?);
        }
        let a = format!("blocks.{l}.attn");
        out.extend([
            (format!("{a}.W_Q"), vec![h, d, e]),
            (format!("{a}.W_O"), vec![h, e, d]),
            (format!("{a}.b_Q"), vec![h, e]),
            (format!("{a}.b_O"), vec![d]),
            (format!("{a}.W_K"), vec![h, d, e]),
            (format!("{a}.W_V"), vec![h, d, e]),
            (format!("{a}.b_K"), vec![h, e]),
            (format!("{a}.b_V"), vec![h, e]),
        ]);
        if !cfg.attn_only {
            let m = format!("blocks.{l}.mlp");
            out.extend([
                (format!("{m}.W_in"), vec![d, cfg.d_mlp()]),
                (format!("{m}.b_in"), vec![cfg.d_mlp()]),
                (format!("{m}.W_out"), vec![cfg.d_mlp(), d]),
                (format!("{m}.b_out"), vec![d]),
            ]);
        }
    }
    out.extend(norm_params("ln_final", d)?);
    out.push(("unembed.W_U".to_string(), vec![d, cfg.d_vocab_out()]));
    out.push(("unembed.b_U".to_string(), vec![cfg.d_vocab_out()]));
    Ok(out)
}

/// TL's "gpt2" initialisation for `cfg` (seed `cfg.seed`): a TL-layout state dict with TL 2.x's
/// buffers (`mask` lower-triangular bool, `IGNORE` = −inf) after each attention's parameters.
pub fn init_weights(cfg: &HookedTransformerConfig) -> Result<StateDict> {
    if cfg.init_mode != "gpt2" {
        return Err(Error::Unsupported(format!("init_mode {}", cfg.init_mode)));
    }
    let seed = cfg
        .seed
        .ok_or_else(|| Error::invalid("config", "seed is needed for a reproducible init"))?;
    let mut g = Mt19937::new(seed as u64);
    let std = cfg.initializer_range as f32;
    let mut sd = StateDict::new();
    for (name, shape) in parameter_shapes(cfg)? {
        let n: usize = shape.iter().product();
        let leaf = name.rsplit('.').next().unwrap_or("");
        // "W_" in name: normal_; LayerNorm/RMSNorm weights ones; biases zeros.
        let data = if name.contains("W_") {
            torch_normal(&mut g, n, 0.0, std)?
        } else if leaf == "w" {
            vec![1.0; n]
        } else {
            vec![0.0; n]
        };
        let is_b_v = name.ends_with(".attn.b_V");
        sd.insert(
            name.clone(),
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&shape), data).expect("sizes")),
        );
        if is_b_v {
            let prefix = name.trim_end_matches("b_V");
            let n_ctx = cfg.n_ctx();
            let mask = ArrayD::from_shape_fn(IxDyn(&[n_ctx, n_ctx]), |i| i[1] <= i[0]);
            sd.insert(format!("{prefix}mask"), Tensor::Bool(mask));
            sd.insert(
                format!("{prefix}IGNORE"),
                Tensor::F32(ArrayD::from_elem(IxDyn(&[]), f32::NEG_INFINITY)),
            );
        }
    }
    Ok(sd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polynomials_are_close_to_libm() {
        for i in 1..1000 {
            let x = i as f32 / 1000.0;
            assert!(
                (log_ps(x) - x.ln()).abs() <= 2e-7 * x.ln().abs().max(1.0),
                "log({x})"
            );
            let t = x * 6.283_185_5;
            let (s, c) = sincos_ps(t);
            assert!(
                (s - t.sin()).abs() < 3e-7 && (c - t.cos()).abs() < 3e-7,
                "sincos({t})"
            );
        }
    }
}
