//! Hook points, hooks and the activation cache, with TransformerLens's names and lookups.
//!
//! A hook is `(name or filter, closure)`; the closure sees the activation at a hook point
//! (on the host, with TL's shape) and may return a replacement of the same shape — zero or mean
//! ablation, patching from another run's cache. Hooks are scoped to one call
//! ([`crate::model::HookedTransformer::run_with_hooks`]). The cache records activations in
//! firing order and answers TL's shorthand (`cache[("pattern", 0)]`, `"k6"`, `("post", 0,
//! "mlp")`, negative layers) through [`get_act_name`].
//!
//! The cache, by TL's names and shorthand:
//!
//! ```
//! use ndarray::array;
//! let run = tlens::RunFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo_small.pth"))?;
//! let model = tlens::HookedTransformer::new(run.config.clone().unwrap(), run.model()?)?;
//! let tokens = array![[3u32, 5, 23], [7, 7, 23]];            // [a, b, =], p = 23
//! let (logits, cache) = model.run_with_cache(&tokens, None)?;
//! assert_eq!(logits.shape(), &[2, 3, 23]);
//! assert_eq!(cache[("pattern", 0)].shape(), &[2, 4, 3, 3]);  // [batch, head, query, key]
//! assert_eq!(cache["post0"], cache["blocks.0.mlp.hook_post"]);
//! assert_eq!(tlens::model::get_act_name("k", Some(0), None), "blocks.0.attn.hook_k");
//! # Ok::<(), tlens::Error>(())
//! ```
//!
//! Ablation: zero one head's output for one call; a name that matches no hook point is an error:
//!
//! ```
//! use ndarray::{array, Axis};
//! use tlens::Hook;
//! let run = tlens::RunFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo_small.pth"))?;
//! let model = tlens::HookedTransformer::new(run.config.clone().unwrap(), run.model()?)?;
//! let tokens = array![[3u32, 5, 23]];
//! let mut hooks = [Hook::new(("z", 0), |z, _name| {
//!     let mut z = z.clone();
//!     z.index_axis_mut(Axis(2), 1).fill(0.0);                 // head 1
//!     Some(z)
//! })];
//! let ablated = model.run_with_hooks(&tokens, &mut hooks)?;
//! assert_ne!(ablated, model.forward(&tokens)?);
//! let mut typo = [Hook::new("blocks.0.attn.hook_zz", |_, _| None)];
//! assert!(matches!(
//!     model.run_with_hooks(&tokens, &mut typo),
//!     Err(tlens::Error::UnknownHook { .. })
//! ));
//! # Ok::<(), tlens::Error>(())
//! ```
//!
//! Activation patching: run a clean input, then a corrupted one with the clean run's residual
//! stream patched in at the last position:
//!
//! ```
//! use ndarray::{array, s};
//! use tlens::Hook;
//! let run = tlens::RunFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo_small.pth"))?;
//! let model = tlens::HookedTransformer::new(run.config.clone().unwrap(), run.model()?)?;
//! let (clean_logits, clean) = model.run_with_cache(&array![[3u32, 5, 23]], None)?;
//! let clean_resid = clean["blocks.0.hook_resid_post"].clone();
//! let mut patch = [Hook::new("blocks.0.hook_resid_post", move |x, _| {
//!     let mut x = x.clone();
//!     x.slice_mut(s![.., 2, ..]).assign(&clean_resid.slice(s![.., 2, ..]));
//!     Some(x)
//! })];
//! let patched = model.run_with_hooks(&array![[4u32, 9, 23]], &mut patch)?;
//! // The logits read only the last position's residual stream: fully restored.
//! assert_eq!(patched.slice(s![0, 2, ..]), clean_logits.slice(s![0, 2, ..]));
//! # Ok::<(), tlens::Error>(())
//! ```

use crate::error::{Error, Result};
use indexmap::IndexMap;
use ndarray::ArrayD;
use std::sync::Arc;

/// The closure of a hook: `(activation, hook name) → replacement?` (as TL's `hook(act, hook)`).
pub type HookFn<'a> = Box<dyn FnMut(&ArrayD<f32>, &str) -> Option<ArrayD<f32>> + 'a>;

/// Which hook points a hook (or the cache) applies to.
pub enum NameFilter<'a> {
    /// One exact TL name (shorthand is resolved when the hook is made).
    Name(String),
    /// Any name for which the predicate is true.
    Pred(Box<dyn Fn(&str) -> bool + Sync + 'a>),
}

impl NameFilter<'_> {
    /// Whether the hook applies at `name`.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NameFilter::Name(n) => n == name,
            NameFilter::Pred(p) => p(name),
        }
    }
}

/// A forward hook.
pub struct Hook<'a> {
    /// Where the hook applies.
    pub filter: NameFilter<'a>,
    /// What it does.
    pub f: HookFn<'a>,
}

/// A hook point's name as TL accepts it: a full name (`"blocks.0.attn.hook_z"`), shorthand
/// (`"z0"`, `"pattern"` → resolved by [`get_act_name`]), or `(name, layer)` /
/// `(name, layer, layer_type)` as TL's `utils.get_act_name(name, layer, layer_type)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookName(pub String);

impl From<&str> for HookName {
    fn from(n: &str) -> HookName {
        HookName(get_act_name(n, None, None))
    }
}

impl From<String> for HookName {
    fn from(n: String) -> HookName {
        HookName::from(n.as_str())
    }
}

impl From<(&str, i64)> for HookName {
    fn from((n, l): (&str, i64)) -> HookName {
        HookName(get_act_name(n, Some(l), None))
    }
}

impl From<(&str, i64, &str)> for HookName {
    fn from((n, l, t): (&str, i64, &str)) -> HookName {
        HookName(get_act_name(n, Some(l), Some(t)))
    }
}

impl<'a> Hook<'a> {
    /// A hook on one hook point: a full TL name, shorthand, or `(name, layer)` ([`HookName`]).
    /// A name that matches no hook point of the model is an error when the hooks run
    /// ([`Error::UnknownHook`]), as in TL — never a hook that silently does nothing.
    pub fn new(
        name: impl Into<HookName>,
        f: impl FnMut(&ArrayD<f32>, &str) -> Option<ArrayD<f32>> + 'a,
    ) -> Hook<'a> {
        Hook {
            filter: NameFilter::Name(name.into().0),
            f: Box::new(f),
        }
    }

    /// A hook on every point whose name satisfies `pred` (one that matches no point of the
    /// model is an error when the hooks run).
    pub fn filtered(
        pred: impl Fn(&str) -> bool + Sync + 'a,
        f: impl FnMut(&ArrayD<f32>, &str) -> Option<ArrayD<f32>> + 'a,
    ) -> Hook<'a> {
        Hook {
            filter: NameFilter::Pred(Box::new(pred)),
            f: Box::new(f),
        }
    }
}

/// TL's `utils.get_act_name(name, layer, layer_type)` (docs/reference.md §3).
pub fn get_act_name(name: &str, layer: Option<i64>, layer_type: Option<&str>) -> String {
    if (name.contains('.') || name.starts_with("hook_")) && layer.is_none() && layer_type.is_none()
    {
        return name.to_string();
    }
    let (mut name, mut layer, mut layer_type) = (
        name.to_string(),
        layer.map(|l| l.to_string()),
        layer_type.map(str::to_string),
    );
    // re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    let letters = name.bytes().take_while(u8::is_ascii_lowercase).count();
    let digits = name[letters..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    if letters > 0 && digits > 0 {
        let rest = name[letters + digits..].to_string();
        layer = Some(name[letters..letters + digits].to_string());
        layer_type = Some(rest);
        name.truncate(letters);
    }
    let name = match name.as_str() {
        "attn" => "pattern",
        "attn_logits" => "attn_scores",
        "key" => "k",
        "query" => "q",
        "value" => "v",
        "mlp_pre" => "pre",
        "mlp_mid" => "mid",
        "mlp_post" => "post",
        n => n,
    }
    .to_string();
    let mut full = String::new();
    if let Some(l) = &layer {
        full += &format!("blocks.{l}.");
    }
    let lt: Option<String> = if [
        "k",
        "v",
        "q",
        "z",
        "rot_k",
        "rot_q",
        "result",
        "pattern",
        "attn_scores",
    ]
    .contains(&name.as_str())
    {
        Some("attn".into())
    } else if ["pre", "post", "mid", "pre_linear"].contains(&name.as_str()) {
        Some("mlp".into())
    } else {
        layer_type.map(|t| match t.as_str() {
            "a" | "attention" => "attn".to_string(),
            "m" => "mlp".to_string(),
            "b" | "block" | "blocks" => String::new(),
            other => other.to_string(),
        })
    };
    if let Some(t) = lt.filter(|t| !t.is_empty()) {
        full += &format!("{t}.");
    }
    full += &format!("hook_{name}");
    if (name == "scale" || name == "normalized") && layer.is_none() {
        full = format!("ln_final.{full}");
    }
    full
}

/// Activations recorded by `run_with_cache`, in firing order.
#[derive(Clone, Debug, Default)]
pub struct ActivationCache {
    /// Shared with the forward pass that made them (no copy on the CPU).
    acts: IndexMap<String, Arc<ArrayD<f32>>>,
    n_layers: usize,
}

/// A cache key: a name (exact or shorthand), or (name, layer[, layer type]) as in TL.
pub trait CacheKey {
    /// The full hook name, for a model of `n_layers` layers.
    fn resolve(&self, n_layers: usize) -> String;
}

impl CacheKey for &str {
    fn resolve(&self, _: usize) -> String {
        get_act_name(self, None, None)
    }
}

impl CacheKey for String {
    fn resolve(&self, n: usize) -> String {
        self.as_str().resolve(n)
    }
}

fn layer_index(layer: i64, n_layers: usize) -> i64 {
    if layer < 0 {
        n_layers as i64 + layer
    } else {
        layer
    }
}

impl CacheKey for (&str, i64) {
    fn resolve(&self, n: usize) -> String {
        get_act_name(self.0, Some(layer_index(self.1, n)), None)
    }
}

impl CacheKey for (&str, i64, &str) {
    fn resolve(&self, n: usize) -> String {
        get_act_name(self.0, Some(layer_index(self.1, n)), Some(self.2))
    }
}

impl ActivationCache {
    pub(crate) fn new(n_layers: usize) -> ActivationCache {
        ActivationCache {
            acts: IndexMap::new(),
            n_layers,
        }
    }

    pub(crate) fn insert(&mut self, name: &str, a: Arc<ArrayD<f32>>) {
        // Like a dict: a name that fires twice keeps its first position and its last value.
        self.acts.insert(name.to_string(), a);
    }

    /// The activation under an exact name or TL shorthand, or a typed error.
    pub fn get(&self, key: impl CacheKey) -> Result<&ArrayD<f32>> {
        let name = key.resolve(self.n_layers);
        self.acts
            .get(&name)
            .map(|a| &**a)
            .ok_or_else(|| Error::missing("activation cache", name))
    }

    /// Hook names in firing order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.acts.keys().map(String::as_str)
    }

    /// Every activation, in firing order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ArrayD<f32>)> {
        self.acts.iter().map(|(k, v)| (k.as_str(), &**v))
    }

    /// Number of cached activations.
    pub fn len(&self) -> usize {
        self.acts.len()
    }

    /// Whether nothing was cached.
    pub fn is_empty(&self) -> bool {
        self.acts.is_empty()
    }

    /// The activations by name.
    pub fn into_map(self) -> IndexMap<String, ArrayD<f32>> {
        self.acts
            .into_iter()
            .map(|(k, v)| (k, Arc::try_unwrap(v).unwrap_or_else(|v| (*v).clone())))
            .collect()
    }
}

impl<K: CacheKey> std::ops::Index<K> for ActivationCache {
    type Output = ArrayD<f32>;
    /// Panics on a missing key, as indexing a Python dict raises; use [`ActivationCache::get`]
    /// for a `Result`.
    fn index(&self, key: K) -> &ArrayD<f32> {
        match self.get(key) {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        }
    }
}

/// A names filter for the cache: which hook points to record.
pub type NamesFilter<'h> = &'h (dyn Fn(&str) -> bool + Sync);

/// What a forward pass does at its hook points.
pub(crate) struct HookCtx<'h, 'a> {
    pub hooks: &'h mut [Hook<'a>],
    pub cache: Option<(Option<NamesFilter<'h>>, ActivationCache)>,
    /// When set, every hook point's name is recorded in firing order.
    pub names: Option<Vec<String>>,
}

impl<'h, 'a> HookCtx<'h, 'a> {
    pub fn none() -> HookCtx<'static, 'static> {
        HookCtx {
            hooks: &mut [],
            cache: None,
            names: None,
        }
    }

    /// Whether anything happens at `name` (if not, the activation never leaves the backend).
    pub fn wants(&mut self, name: &str) -> bool {
        if let Some(n) = &mut self.names {
            n.push(name.to_string());
        }
        self.hooks.iter().any(|h| h.filter.matches(name))
            || matches!(&self.cache, Some((f, _)) if f.is_none_or(|f| f(name)))
    }

    /// Run the hooks on a host activation and record it; returns the replacement, if a hook
    /// made one. The cache keeps the (shared) activation itself, without a copy.
    pub fn apply(&mut self, name: &str, act: Arc<ArrayD<f32>>) -> Result<Option<Arc<ArrayD<f32>>>> {
        let mut act = act;
        let mut replaced = false;
        for h in self.hooks.iter_mut().filter(|h| h.filter.matches(name)) {
            if let Some(new) = (h.f)(&act, name) {
                if new.shape() != act.shape() {
                    return Err(Error::Shape {
                        name: format!("hook replacement at {name}"),
                        expected: act.shape().to_vec(),
                        found: new.shape().to_vec(),
                    });
                }
                act = Arc::new(new);
                replaced = true;
            }
        }
        if let Some((f, cache)) = &mut self.cache {
            if f.is_none_or(|f| f(name)) {
                cache.insert(name, act.clone());
            }
        }
        Ok(replaced.then_some(act))
    }
}

#[cfg(test)]
mod tests {
    use super::get_act_name;

    #[test]
    fn act_names_follow_transformer_lens() {
        let cases: [(&str, Option<i64>, Option<&str>, &str); 14] = [
            ("embed", None, None, "hook_embed"),
            ("pos_embed", None, None, "hook_pos_embed"),
            ("blocks.0.attn.hook_q", None, None, "blocks.0.attn.hook_q"),
            ("hook_embed", None, None, "hook_embed"),
            ("pattern", Some(0), None, "blocks.0.attn.hook_pattern"),
            ("attn", Some(1), None, "blocks.1.attn.hook_pattern"),
            ("post", Some(0), Some("mlp"), "blocks.0.mlp.hook_post"),
            ("resid_mid", Some(2), None, "blocks.2.hook_resid_mid"),
            ("k6", None, None, "blocks.6.attn.hook_k"),
            ("pre5", None, None, "blocks.5.mlp.hook_pre"),
            ("scale4ln1", None, None, "blocks.4.ln1.hook_scale"),
            ("scale", None, None, "ln_final.hook_scale"),
            (
                "normalized",
                Some(1),
                Some("ln2"),
                "blocks.1.ln2.hook_normalized",
            ),
            ("attn_out", Some(0), Some("b"), "blocks.0.hook_attn_out"),
        ];
        for (name, layer, lt, want) in cases {
            assert_eq!(
                get_act_name(name, layer, lt),
                want,
                "{name} {layer:?} {lt:?}"
            );
        }
        assert_eq!(
            get_act_name("result", Some(3), Some("a")),
            "blocks.3.attn.hook_result"
        );
        assert_eq!(
            get_act_name("mlp_out", Some(0), None),
            "blocks.0.hook_mlp_out"
        );
    }
}
