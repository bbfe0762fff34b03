//! A state dict: TL parameter names → typed tensors, in file order.
//!
//! TransformerLens also stores two *buffers* per attention layer: `blocks.L.attn.mask` (a bool
//! (n_ctx, n_ctx) causal mask in TL ≤ 3.4, an empty (0, 0) tensor from 3.5, when the mask is built
//! at run time) and `blocks.L.attn.IGNORE` (a 0-d f32: −inf in TL ≥ 1.7, −1e5 before). They are
//! not parameters — the trainer must not update them — so they are recognised here.

use crate::error::{Error, Result};
use crate::tensor::{Element, Tensor};
use indexmap::IndexMap;
use ndarray::ArrayD;

/// Ordered name → tensor map.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateDict {
    tensors: IndexMap<String, Tensor>,
}

/// Whether a TL state-dict entry is a buffer rather than a parameter.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".attn.mask") || name.ends_with(".attn.IGNORE")
}

/// Sort key giving TransformerLens's `named_parameters()`/`state_dict()` order (docs/reference.md §1),
/// for files such as safetensors that do not keep insertion order.
pub fn tl_order_key(name: &str) -> (usize, usize, usize, String) {
    const ATTN: [&str; 10] = [
        "W_Q", "W_O", "b_Q", "b_O", "W_K", "W_V", "b_K", "b_V", "mask", "IGNORE",
    ];
    const MLP: [&str; 4] = ["W_in", "b_in", "W_out", "b_out"];
    let other = (usize::MAX, 0, 0, name.to_string());
    if let Some(rest) = name.strip_prefix("blocks.") {
        let Some((l, rest)) = rest.split_once('.') else {
            return other;
        };
        let Ok(l) = l.parse::<usize>() else {
            return other;
        };
        let (group, leaf) = rest.split_once('.').unwrap_or(("", rest));
        let (g, i) = match group {
            "ln1" => (0, ["w", "b"].iter().position(|x| *x == leaf).unwrap_or(9)),
            "attn" => (1, ATTN.iter().position(|x| *x == leaf).unwrap_or(99)),
            "ln2" => (2, ["w", "b"].iter().position(|x| *x == leaf).unwrap_or(9)),
            "mlp" => (3, MLP.iter().position(|x| *x == leaf).unwrap_or(99)),
            _ => (4, 0),
        };
        return (10 + l, g, i, name.to_string());
    }
    let top = |i: usize| (i, 0, 0, name.to_string());
    match name {
        "embed.W_E" => top(0),
        "pos_embed.W_pos" => top(1),
        "ln_final.w" => (usize::MAX - 3, 0, 0, name.into()),
        "ln_final.b" => (usize::MAX - 3, 1, 0, name.into()),
        "unembed.W_U" => (usize::MAX - 2, 0, 0, name.into()),
        "unembed.b_U" => (usize::MAX - 2, 1, 0, name.into()),
        _ => other,
    }
}

impl StateDict {
    /// An empty state dict.
    pub fn new() -> StateDict {
        StateDict::default()
    }

    /// Add or replace a tensor.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }

    /// The tensor under `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// A tensor that must exist, with a typed error naming it otherwise.
    pub fn require(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::missing("state dict", name))
    }

    /// A tensor of element type `T` and (optionally) a given shape.
    pub fn array<T: Element>(&self, name: &str, shape: Option<&[usize]>) -> Result<&ArrayD<T>> {
        let a = self.require(name)?.expect::<T>(name)?;
        if let Some(s) = shape {
            if a.shape() != s {
                return Err(Error::Shape {
                    name: name.into(),
                    expected: s.to_vec(),
                    found: a.shape().to_vec(),
                });
            }
        }
        Ok(a)
    }

    /// Remove and return the tensor under `name`.
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.shift_remove(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Names and tensors in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Parameters only (buffers skipped), in order.
    pub fn parameters(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.iter().filter(|(k, _)| !is_buffer(k))
    }

    /// Buffers only.
    pub fn buffers(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.iter().filter(|(k, _)| is_buffer(k))
    }

    /// Σ of squares of every floating-point parameter (the paper's "total sum of squared weights").
    pub fn sum_of_squares(&self) -> f64 {
        self.parameters()
            .filter(|(_, t)| t.dtype().is_float())
            .map(|(_, t)| t.to_f64_vec().iter().map(|x| x * x).sum::<f64>())
            .sum()
    }
}

impl FromIterator<(String, Tensor)> for StateDict {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        StateDict {
            tensors: iter.into_iter().collect(),
        }
    }
}
