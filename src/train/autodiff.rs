//! Reverse-mode differentiation of the hooked forward pass, on any backend.
//!
//! [`Autodiff<B>`] is a [`Backend`] that wraps another one (compare burn's `Autodiff<B>`): each
//! forward operation runs on the inner backend and records, on a tape, the operation's
//! backward closure — the matching [`Differentiable`] operation with the inputs or outputs it
//! needs. [`HookedTransformer`](crate::model::HookedTransformer) runs on it unchanged: the
//! same forward pass that serves `run_with_cache` is the one that is differentiated, so every
//! architecture the model supports (layers, LayerNorm/RMS variants, activations, attention
//! directions, vocabularies) trains without a hand-derived gradient. Parameters arrive through
//! [`Backend::parameter`] and become the tape's named leaves; frozen ones (the demo's `b_`)
//! are uploaded as constants, so nothing is computed for them.
//!
//! ```
//! use tlens::backend::{Cpu, LossKind};
//! use tlens::model::{HookedTransformer, HookedTransformerConfig};
//! use tlens::train::autodiff::Autodiff;
//! let mut cfg = HookedTransformerConfig::grokking_demo(7);
//! cfg.normalization_type = Some("LN".into());
//! let sd = tlens::train::init_weights(&cfg)?;
//! let model = HookedTransformer::with_backend(cfg, sd, Autodiff::new(Cpu, |n| !n.contains("b_")))?;
//! let (tokens, labels) = tlens::task::modular_addition(7);
//! let logits = model.forward_last(&tokens)?;
//! let (loss, grads) = model.backend().backward(&logits, &labels, LossKind::CrossEntropy)?;
//! assert!(loss > 0.0 && grads.get("blocks.0.ln1.w").is_some() && grads.get("unembed.b_U").is_none());
//! # Ok::<(), tlens::Error>(())
//! ```

use crate::backend::{Activation, Backend, Differentiable, LossKind};
use crate::error::{Error, Result};
use crate::model::StateDict;
use crate::tensor::Tensor;
use ndarray::{Array2, ArrayD, IxDyn};
use std::sync::{Arc, Mutex};

type Grads<T> = Vec<Option<T>>;
type BackwardFn<B> =
    Box<dyn FnOnce(&B, &<B as Backend>::Tensor) -> Result<Grads<<B as Backend>::Tensor>> + Send>;

/// One recorded operation: the tape positions of its inputs (None: a constant) and the
/// closure that maps its output's gradient to theirs. Leaves have no closure.
struct Node<B: Backend> {
    inputs: Vec<Option<usize>>,
    backward: Option<BackwardFn<B>>,
}

struct Tape<B: Backend> {
    nodes: Vec<Node<B>>,
    /// Parameter leaves: (TL name, tape position, shape).
    params: Vec<(String, usize, Vec<usize>)>,
}

/// A tensor of the inner backend and its place on the tape (None: a constant, no gradient).
#[derive(Clone)]
pub struct Var<T> {
    id: Option<usize>,
    /// The value.
    pub value: T,
}

/// The differentiating backend over `B` (see the module docs).
pub struct Autodiff<B: Differentiable> {
    inner: B,
    trainable: Box<dyn Fn(&str) -> bool + Send + Sync>,
    tape: Mutex<Tape<B>>,
}

impl<B: Differentiable + 'static> Autodiff<B> {
    /// A fresh tape over `inner`; parameters for which `trainable(name)` is false are constants.
    pub fn new(inner: B, trainable: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Autodiff {
            inner,
            trainable: Box::new(trainable),
            tape: Mutex::new(Tape {
                nodes: Vec::new(),
                params: Vec::new(),
            }),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn push(&self, node: Node<B>) -> usize {
        let mut tape = self.tape.lock().expect("tape lock");
        tape.nodes.push(node);
        tape.nodes.len() - 1
    }

    /// Record `value` as the output of an operation on `inputs`; a constant when no input
    /// needs a gradient.
    fn record(
        &self,
        value: B::Tensor,
        inputs: &[Option<usize>],
        backward: impl FnOnce(&B, &B::Tensor) -> Result<Grads<B::Tensor>> + Send + 'static,
    ) -> Var<B::Tensor> {
        if inputs.iter().all(Option::is_none) {
            return Var { id: None, value };
        }
        let id = self.push(Node {
            inputs: inputs.to_vec(),
            backward: Some(Box::new(backward)),
        });
        Var {
            id: Some(id),
            value,
        }
    }

    fn constant(value: B::Tensor) -> Var<B::Tensor> {
        Var { id: None, value }
    }

    /// The loss of a kind at the last position of `logits` (a forward pass's output on this
    /// backend) and the gradient of every trainable parameter, by TL name, in the order the
    /// model uploaded them. Consumes the tape: a second call is an error.
    pub fn backward(
        &self,
        logits: &Var<B::Tensor>,
        labels: &[u32],
        kind: LossKind,
    ) -> Result<(f64, StateDict)> {
        let be = &self.inner;
        let (loss, seed) = be.last_position_loss(&logits.value, labels, kind)?;
        let tape = std::mem::replace(
            &mut *self.tape.lock().expect("tape lock"),
            Tape {
                nodes: Vec::new(),
                params: Vec::new(),
            },
        );
        let root = logits
            .id
            .ok_or_else(|| Error::invalid("backward", "the logits depend on no parameter"))?;
        if root >= tape.nodes.len() {
            return Err(Error::invalid("backward", "the tape was already used"));
        }
        let mut grads: Vec<Option<B::Tensor>> = (0..tape.nodes.len()).map(|_| None).collect();
        grads[root] = Some(seed);
        let mut nodes = tape.nodes;
        for i in (0..=root).rev() {
            let Some(g) = grads[i].take() else { continue };
            let node = &mut nodes[i];
            let Some(f) = node.backward.take() else {
                grads[i] = Some(g); // a leaf keeps its gradient
                continue;
            };
            let ins = f(be, &g)?;
            for (slot, gi) in node.inputs.iter().zip(ins) {
                if let (Some(j), Some(gi)) = (slot, gi) {
                    grads[*j] = Some(match grads[*j].take() {
                        Some(acc) => be.add(acc, &gi)?,
                        None => gi,
                    });
                }
            }
        }
        let mut out = StateDict::new();
        let mut shapes: Vec<(&str, &[usize])> = Vec::new();
        for (name, id, shape) in &tape.params {
            // A second upload of the same parameter (W_O flattened) takes the first's shape.
            let shape = match shapes.iter().find(|(n, _)| n == name) {
                Some((_, s)) => *s,
                None => {
                    shapes.push((name, shape));
                    shape
                }
            };
            let Some(g) = grads[*id].take() else { continue };
            let g = be
                .download(g)?
                .into_shape_with_order(IxDyn(shape))
                .map_err(|e| Error::invalid(name, e.to_string()))?;
            let g = match out.get(name) {
                Some(Tensor::F32(prev)) => prev + &g,
                _ => g,
            };
            out.insert(name.clone(), Tensor::F32(g));
        }
        Ok((loss, out))
    }
}

fn ids<T>(vs: &[Option<&Var<T>>]) -> Vec<Option<usize>> {
    vs.iter().map(|v| v.and_then(|v| v.id)).collect()
}

impl<B: Differentiable + 'static> Backend for Autodiff<B>
where
    B::Tensor: 'static,
{
    type Tensor = Var<B::Tensor>;

    fn upload(&self, a: &ArrayD<f32>) -> Result<Self::Tensor> {
        Ok(Self::constant(self.inner.upload(a)?))
    }

    fn parameter(&self, name: &str, a: &ArrayD<f32>) -> Result<Self::Tensor> {
        let value = self.inner.parameter(name, a)?;
        if !(self.trainable)(name) {
            return Ok(Self::constant(value));
        }
        let mut tape = self.tape.lock().expect("tape lock");
        tape.nodes.push(Node {
            inputs: Vec::new(),
            backward: None,
        });
        let id = tape.nodes.len() - 1;
        tape.params.push((name.to_string(), id, a.shape().to_vec()));
        Ok(Var {
            id: Some(id),
            value,
        })
    }

    fn upload_shared(&self, a: Arc<ArrayD<f32>>) -> Result<Self::Tensor> {
        // A hook's replacement: a constant (gradients do not flow through hooks).
        Ok(Self::constant(self.inner.upload_shared(a)?))
    }

    fn download_shared(&self, t: &Self::Tensor) -> Result<Arc<ArrayD<f32>>> {
        self.inner.download_shared(&t.value)
    }

    fn download(&self, t: Self::Tensor) -> Result<ArrayD<f32>> {
        self.inner.download(t.value)
    }

    fn shape(&self, t: &Self::Tensor) -> Vec<usize> {
        self.inner.shape(&t.value)
    }

    fn embed(&self, w_e: &Self::Tensor, tokens: &Array2<u32>) -> Result<Self::Tensor> {
        let out = self.inner.embed(&w_e.value, tokens)?;
        let v = self.inner.shape(&w_e.value)[0];
        let tokens = tokens.clone();
        Ok(self.record(out, &ids(&[Some(w_e)]), move |be, g| {
            Ok(vec![Some(be.embed_backward(g, &tokens, v)?)])
        }))
    }

    fn pos_embed(&self, w_pos: &Self::Tensor, batch: usize, pos: usize) -> Result<Self::Tensor> {
        let out = self.inner.pos_embed(&w_pos.value, batch, pos)?;
        let n_ctx = self.inner.shape(&w_pos.value)[0];
        Ok(self.record(out, &ids(&[Some(w_pos)]), move |be, g| {
            Ok(vec![Some(be.pos_embed_backward(g, n_ctx)?)])
        }))
    }

    fn take_rows(&self, table: &Self::Tensor, index: &Array2<u32>) -> Result<Self::Tensor> {
        let out = self.inner.take_rows(&table.value, index)?;
        let rows = self.inner.shape(&table.value)[0];
        let index = index.clone();
        Ok(self.record(out, &ids(&[Some(table)]), move |be, g| {
            Ok(vec![Some(be.take_rows_backward(g, &index, rows)?)])
        }))
    }

    fn add(&self, a: Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        let inputs = ids(&[Some(&a), Some(b)]);
        let out = self.inner.add(a.value, &b.value)?;
        Ok(self.record(out, &inputs, |_, g| {
            Ok(vec![Some(g.clone()), Some(g.clone())])
        }))
    }

    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor> {
        let out = self.inner.linear(&x.value, &w.value, b.map(|b| &b.value))?;
        let inputs = ids(&[Some(x), Some(w), b]);
        let (xv, wv) = (x.value.clone(), w.value.clone());
        let need_b = inputs[2].is_some();
        Ok(self.record(out, &inputs, move |be, g| {
            let (dx, dw) = be.linear_backward(&xv, &wv, g)?;
            let db = need_b.then(|| be.sum_leading(g, 1)).transpose()?;
            Ok(vec![Some(dx), Some(dw), db])
        }))
    }

    fn head_linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let out = self.inner.head_linear(&x.value, &w.value, &b.value)?;
        let inputs = ids(&[Some(x), Some(w), Some(b)]);
        let (xv, wv) = (x.value.clone(), w.value.clone());
        let need_b = inputs[2].is_some();
        Ok(self.record(out, &inputs, move |be, g| {
            let (dx, dw) = be.head_linear_backward(&xv, &wv, g)?;
            let db = need_b.then(|| be.sum_leading(g, 2)).transpose()?;
            Ok(vec![Some(dx), Some(dw), db])
        }))
    }

    fn attn_scores(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        scale: f32,
        causal_ignore: Option<f32>,
    ) -> Result<Self::Tensor> {
        let out = self
            .inner
            .attn_scores(&q.value, &k.value, scale, causal_ignore)?;
        let (qv, kv) = (q.value.clone(), k.value.clone());
        let causal = causal_ignore.is_some();
        Ok(self.record(out, &ids(&[Some(q), Some(k)]), move |be, g| {
            let (dq, dk) = be.attn_scores_backward(&qv, &kv, g, scale, causal)?;
            Ok(vec![Some(dq), Some(dk)])
        }))
    }

    fn last_position(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let out = self.inner.last_position(&x.value)?;
        let pos = self.inner.shape(&x.value)[1];
        Ok(self.record(out, &ids(&[Some(x)]), move |be, g| {
            Ok(vec![Some(be.last_position_backward(g, pos)?)])
        }))
    }

    fn softmax(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let out = self.inner.softmax(&x.value)?;
        let y = out.clone();
        Ok(self.record(out, &ids(&[Some(x)]), move |be, g| {
            Ok(vec![Some(be.softmax_backward(&y, g)?)])
        }))
    }

    fn attn_z(&self, pattern: &Self::Tensor, v: &Self::Tensor) -> Result<Self::Tensor> {
        let out = self.inner.attn_z(&pattern.value, &v.value)?;
        let (pv, vv) = (pattern.value.clone(), v.value.clone());
        Ok(
            self.record(out, &ids(&[Some(pattern), Some(v)]), move |be, g| {
                let (dp, dv) = be.attn_z_backward(&pv, &vv, g)?;
                Ok(vec![Some(dp), Some(dv)])
            }),
        )
    }

    fn attn_result(&self, z: &Self::Tensor, w_o: &Self::Tensor) -> Result<Self::Tensor> {
        let out = self.inner.attn_result(&z.value, &w_o.value)?;
        let (zv, wv) = (z.value.clone(), w_o.value.clone());
        Ok(self.record(out, &ids(&[Some(z), Some(w_o)]), move |be, g| {
            let (dz, dw) = be.attn_result_backward(&zv, &wv, g)?;
            Ok(vec![Some(dz), Some(dw)])
        }))
    }

    fn attn_out(
        &self,
        z: &Self::Tensor,
        w_o_flat: &Self::Tensor,
        b_o: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let out = self.inner.attn_out(&z.value, &w_o_flat.value, &b_o.value)?;
        let inputs = ids(&[Some(z), Some(w_o_flat), Some(b_o)]);
        let (zv, wv) = (z.value.clone(), w_o_flat.value.clone());
        let need_b = inputs[2].is_some();
        Ok(self.record(out, &inputs, move |be, g| {
            let (dz, dw) = be.attn_out_backward(&zv, &wv, g)?;
            let db = need_b.then(|| be.sum_leading(g, 1)).transpose()?;
            Ok(vec![Some(dz), Some(dw), db])
        }))
    }

    fn sum_heads(&self, x: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        let out = self.inner.sum_heads(&x.value, &b.value)?;
        let inputs = ids(&[Some(x), Some(b)]);
        let h = self.inner.shape(&x.value)[2];
        let need_b = inputs[1].is_some();
        Ok(self.record(out, &inputs, move |be, g| {
            let dx = be.repeat_heads(g, h)?;
            let db = need_b.then(|| be.sum_leading(g, 1)).transpose()?;
            Ok(vec![Some(dx), db])
        }))
    }

    fn repeat_heads(&self, x: &Self::Tensor, n_heads: usize) -> Result<Self::Tensor> {
        let out = self.inner.repeat_heads(&x.value, n_heads)?;
        Ok(self.record(out, &ids(&[Some(x)]), |be, g| {
            Ok(vec![Some(be.repeat_heads_backward(g)?)])
        }))
    }

    fn activation(&self, x: Self::Tensor, act: Activation) -> Result<Self::Tensor> {
        let inputs = ids(&[Some(&x)]);
        let xv = x.value.clone();
        let out = self.inner.activation(x.value, act)?;
        Ok(self.record(out, &inputs, move |be, g| {
            Ok(vec![Some(be.activation_backward(&xv, act, g)?)])
        }))
    }

    fn normalize(
        &self,
        x: &Self::Tensor,
        center: bool,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let (y, scale) = self.inner.normalize(&x.value, center, eps)?;
        let (yv, sv) = (y.clone(), scale.clone());
        let y = self.record(y, &ids(&[Some(x)]), move |be, g| {
            Ok(vec![Some(be.normalize_backward(&yv, &sv, g, center)?)])
        });
        // The scale is an output for hooks; the normalised values carry its gradient.
        Ok((y, Self::constant(scale)))
    }

    fn normalize_with(
        &self,
        x: &Self::Tensor,
        center: bool,
        scale: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let out = self.inner.normalize_with(&x.value, center, &scale.value)?;
        let sv = scale.value.clone();
        Ok(self.record(out, &ids(&[Some(x)]), move |be, g| {
            Ok(vec![Some(be.normalize_with_backward(&sv, g, center)?)])
        }))
    }

    fn affine(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor> {
        let out = self.inner.affine(&x.value, &w.value, b.map(|b| &b.value))?;
        let inputs = ids(&[Some(x), Some(w), b]);
        let (xv, wv) = (x.value.clone(), w.value.clone());
        let need_b = inputs[2].is_some();
        Ok(self.record(out, &inputs, move |be, g| {
            let (dx, dw) = be.affine_backward(&xv, &wv, g)?;
            let db = need_b.then(|| be.sum_leading(g, 1)).transpose()?;
            Ok(vec![Some(dx), Some(dw), db])
        }))
    }
}
