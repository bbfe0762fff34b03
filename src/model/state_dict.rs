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

impl StateDict {
    pub fn new() -> StateDict {
        StateDict::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }

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

    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.shift_remove(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

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
