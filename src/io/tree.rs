//! Any torch or safetensors file, described as a tree — what `torch.load` would return, without
//! executing anything.
//!
//! Why: most checkpoints in the wild are not training runs in a layout tlens knows (optimizer-
//! only dicts, lists of tensors, a bare tensor, a model under another key, a sweep saved as a
//! list of runs, losses only, numpy arrays, TorchScript modules). A user exploring such a file
//! wants what `torch.load` shows: dicts, lists, tuples, numbers, strings, tensors (dtype, shape,
//! a few values and min/mean/max on request), numpy arrays, and unknown classes as inert objects
//! (class path and fields). [`describe`] builds that tree as JSON (`inspect --json`), [`render`]
//! prints it, and [`tensors`] lists every tensor under its dotted path (dict keys and list
//! indices joined by `.`, as a flattened state dict names them), which `convert` writes.
//!
//! ```
//! use tlens::io::tree::{self, AnyFile};
//! // A sweep saved by the 2022 code as a list of three runs: not one run, but readable.
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/saved_runs/sweep_frac_train.pth");
//! let file = AnyFile::open(path.as_ref())?;
//! let d = tree::describe(&file, tree::Options::default())?;
//! assert_eq!(d["tree"]["type"], "list");
//! assert_eq!(d["tree"]["len"], 3);
//! let tensors = tree::read_tensors(&file)?;
//! assert_eq!(tensors[0].0, "0.model.embed.W_E");
//! # Ok::<(), tlens::Error>(())
//! ```

use super::pickle::{Dict, Object, Value};
use super::safetensors::SafetensorsFile;
use super::torch::TorchFile;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorRef};
use serde_json::{json, Map, Value as Json};

/// A parsed container of either kind.
pub enum AnyFile {
    /// A torch file (zip, legacy or TorchScript).
    Torch(TorchFile),
    /// A safetensors file.
    Safetensors(SafetensorsFile),
}

impl AnyFile {
    /// Parse a file's container (and pickle), reading no tensor data.
    pub fn open(path: &std::path::Path) -> Result<AnyFile> {
        use crate::error::WithPath;
        let source = super::Source::map(path).with_path(path)?;
        Self::from_source(source).with_path(path)
    }

    /// Parse a file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<AnyFile> {
        Self::from_source(super::Source::Bytes(bytes))
    }

    pub(crate) fn from_source(source: super::Source) -> Result<AnyFile> {
        Ok(match super::Format::detect(&source)? {
            super::Format::Safetensors => {
                AnyFile::Safetensors(SafetensorsFile::from_source(source)?)
            }
            _ => AnyFile::Torch(TorchFile::parse(source, &Default::default())?),
        })
    }

    /// The format name `inspect` prints.
    pub fn format_name(&self) -> &'static str {
        match self {
            AnyFile::Torch(f) => f.format().name(),
            AnyFile::Safetensors(_) => super::Format::Safetensors.name(),
        }
    }
}

/// What to include for each tensor.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Read each tensor: its first values and min/mean/max.
    pub values: bool,
}

/// Most nodes a described tree may have (a file that repeats a shared structure can expand
/// to more; the description is then refused, not allowed to fill memory).
const MAX_NODES: usize = 2_000_000;

thread_local! {
    static NODES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn count_node() -> Result<()> {
    NODES.with(|n| {
        let v = n.get() + 1;
        n.set(v);
        if v > MAX_NODES {
            Err(Error::limit(
                "nodes in the described tree",
                MAX_NODES as u64,
                v as u64,
            ))
        } else {
            Ok(())
        }
    })
}

/// How many leading values `--values` shows, and how long a list of numbers is shown whole.
const HEAD: usize = 6;
const SHORT_LIST: usize = 8;

/// One tensor found in a file, under its dotted path.
pub enum Found<'a> {
    /// A torch tensor (read with [`TorchFile::tensor`]).
    Torch(&'a TensorRef),
    /// A numpy array decoded from its pickled bytes.
    Numpy(Tensor),
}

/// The tree of a file as JSON: `{"format", "tree"}` plus `"tensors"` (path → dtype, shape).
pub fn describe(file: &AnyFile, opts: Options) -> Result<Json> {
    NODES.with(|n| n.set(0));
    let tree = match file {
        AnyFile::Torch(f) => value(f, &f.root, opts)?,
        AnyFile::Safetensors(f) => safetensors_tree(f, opts)?,
    };
    let mut index = Map::new();
    match file {
        AnyFile::Torch(f) => {
            for (path, t) in tensors(&f.root) {
                let (dtype, shape) = match &t {
                    Found::Torch(r) => (r.dtype().torch_name().to_string(), r.shape.clone()),
                    Found::Numpy(a) => (format!("numpy {}", a.dtype()), a.shape().to_vec()),
                };
                index.insert(path, json!({"dtype": dtype, "shape": shape}));
            }
        }
        AnyFile::Safetensors(f) => {
            for name in f.names() {
                let (dtype, shape) = f.raw_info(&name)?;
                index.insert(name, json!({"dtype": dtype, "shape": shape}));
            }
        }
    }
    Ok(json!({"format": file.format_name(), "tree": tree, "tensors": index}))
}

fn safetensors_tree(f: &SafetensorsFile, opts: Options) -> Result<Json> {
    let mut items = Map::new();
    for name in f.names() {
        let (raw, shape) = f.raw_info(&name)?;
        let node = match f.info(&name) {
            Ok((dtype, _)) => {
                let mut n = json!({"type": "tensor", "dtype": dtype.torch_name(), "shape": shape});
                if opts.values {
                    add_values(&mut n, &f.tensor(&name)?);
                }
                n
            }
            Err(e) => json!({"type": "tensor", "dtype": raw, "shape": shape,
                             "unsupported": e.to_string()}),
        };
        items.insert(name, node);
    }
    let meta: Map<String, Json> = f
        .metadata()
        .into_iter()
        .map(|(k, v)| (k, Json::String(v)))
        .collect();
    Ok(json!({"type": "safetensors", "len": items.len(), "items": items, "metadata": meta}))
}

/// Key of a dict entry as a path component (ints as digits, strings as they are).
fn key_str(k: &Value) -> String {
    match k {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        Value::Float(f) => f.to_string(),
        Value::None => "None".into(),
        other => format!("<{}>", other.type_name()),
    }
}

fn join(prefix: &str, part: &str) -> String {
    if prefix.is_empty() {
        part.to_string()
    } else {
        format!("{prefix}.{part}")
    }
}

/// Every tensor (and numpy array) in a pickled tree, under its dotted path, in tree order.
/// Objects contribute the tensors of their state (a TorchScript module's attributes give its
/// state-dict names: `embed.W_E`, `blocks.0.attn.W_Q`, …), of their dict and list items, and
/// of their arguments.
pub fn tensors(root: &Value) -> Vec<(String, Found<'_>)> {
    let mut out = Vec::new();
    walk(root, String::new(), &mut out);
    out
}

fn walk<'a>(v: &'a Value, path: String, out: &mut Vec<(String, Found<'a>)>) {
    match v {
        Value::Tensor(t) => out.push((path, Found::Torch(t))),
        Value::Dict(d) => walk_dict(d, &path, out),
        Value::List(items) | Value::Tuple(items) => {
            for (i, x) in items.iter().enumerate() {
                walk(x, join(&path, &i.to_string()), out);
            }
        }
        Value::Object(o) => {
            if let Some(Ok(a)) = numpy_array(o) {
                out.push((path, Found::Numpy(a)));
                return;
            }
            if let Some(state) = &o.state {
                match state {
                    Value::Dict(d) => walk_dict(d, &path, out),
                    other => walk(other, join(&path, "__state__"), out),
                }
            }
            for (k, x) in &o.dict_items {
                walk(x, join(&path, &key_str(k)), out);
            }
            for (i, x) in o.list_items.iter().enumerate() {
                walk(x, join(&path, &i.to_string()), out);
            }
            for (i, x) in o.args.iter().enumerate() {
                walk(x, join(&path, &format!("__args__.{i}")), out);
            }
        }
        _ => {}
    }
}

fn walk_dict<'a>(d: &'a Dict, path: &str, out: &mut Vec<(String, Found<'a>)>) {
    for (k, x) in &d.items {
        // A whole pickled `nn.Module` (`torch.save(model)`) keeps its tensors in `_parameters`,
        // `_buffers` and `_modules`: dropped from the path, they give the state-dict names.
        let transparent = matches!(k.as_str(), Some("_parameters" | "_buffers" | "_modules"));
        if transparent {
            walk(x, path.to_string(), out);
        } else {
            walk(x, join(path, &key_str(k)), out);
        }
    }
}

/// A numpy array pickled as `numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')` + BUILD
/// `(version, shape, dtype, is_fortran, raw bytes)`. `None` when `o` is not one; an error when
/// it is one tlens cannot decode (object arrays, unknown dtypes).
pub fn numpy_array(o: &Object) -> Option<Result<Tensor>> {
    let is_reconstruct = matches!(
        (o.module.as_str(), o.name.as_str()),
        ("numpy.core.multiarray", "_reconstruct") | ("numpy._core.multiarray", "_reconstruct")
    );
    if !is_reconstruct {
        return None;
    }
    Some(decode_numpy(o))
}

fn decode_numpy(o: &Object) -> Result<Tensor> {
    let bad = |msg: &str| Error::invalid("numpy array", msg.to_string());
    let state = o
        .state
        .as_ref()
        .and_then(Value::as_seq)
        .ok_or_else(|| bad("no (version, shape, dtype, fortran, data) state"))?;
    let [_, shape, dtype, fortran, data] = state else {
        return Err(bad("state is not a 5-tuple"));
    };
    let shape: Vec<usize> = shape
        .as_seq()
        .ok_or_else(|| bad("shape is not a tuple"))?
        .iter()
        .map(|d| d.as_i64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("shape entries must be non-negative ints"))?;
    let Value::NumpyDtype { code, byteorder } = dtype else {
        return Err(bad("dtype is not a numpy dtype"));
    };
    let dt = match code.as_str() {
        "f8" => DType::F64,
        "f4" => DType::F32,
        "f2" => DType::F16,
        "i8" => DType::I64,
        "i4" => DType::I32,
        "i2" => DType::I16,
        "i1" => DType::I8,
        "u1" => DType::U8,
        "u2" => DType::U16,
        "u4" => DType::U32,
        "u8" => DType::U64,
        "b1" => DType::Bool,
        other => {
            return Err(Error::Unsupported(format!(
                "numpy arrays of dtype '{other}'"
            )))
        }
    };
    let Value::Bytes(raw) = data else {
        return Err(Error::Unsupported(
            "numpy arrays of Python objects (their elements are pickled one by one)".into(),
        ));
    };
    let fortran = fortran.as_bool().unwrap_or(false);
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows"))?;
    if numel.checked_mul(dt.size()) != Some(raw.len()) {
        return Err(Error::Truncated {
            what: format!("numpy array data ({numel} × {dt})"),
            needed: (numel as u64).saturating_mul(dt.size() as u64),
            available: raw.len() as u64,
        });
    }
    let mut bytes = raw.clone();
    if byteorder == ">" && dt.size() > 1 {
        for c in bytes.chunks_exact_mut(dt.size()) {
            c.reverse();
        }
    }
    if !fortran {
        return Tensor::from_le_bytes(dt, &shape, &bytes, "numpy array");
    }
    // Column-major: read with the shape reversed, then transpose into row-major order.
    let rev: Vec<usize> = shape.iter().rev().copied().collect();
    let t = Tensor::from_le_bytes(dt, &rev, &bytes, "numpy array")?;
    Ok(crate::tensor::transpose_all(&t))
}

fn add_values(node: &mut Json, t: &Tensor) {
    let v = t.to_f64_vec();
    node["values"] = json!(v.iter().take(HEAD).map(|&x| num(x)).collect::<Vec<_>>());
    if !v.is_empty() {
        let (mut lo, mut hi, mut sum) = (f64::INFINITY, f64::NEG_INFINITY, 0.0);
        for &x in &v {
            lo = lo.min(x);
            hi = hi.max(x);
            sum += x;
        }
        node["min"] = num(lo);
        node["mean"] = num(sum / v.len() as f64);
        node["max"] = num(hi);
    }
}

/// A float as JSON (non-finite values as strings, as Python's json would not write them).
fn num(x: f64) -> Json {
    if x.is_finite() {
        json!(x)
    } else {
        json!(x.to_string())
    }
}

fn tensor_node(f: &TorchFile, r: &TensorRef, opts: Options) -> Result<Json> {
    let mut n = json!({"type": "tensor", "dtype": r.dtype().torch_name(), "shape": r.shape});
    if r.is_parameter {
        n["parameter"] = json!(true);
    }
    let contiguous = TensorRef::contiguous(String::new(), r.dtype(), &r.shape).stride == r.stride;
    if !contiguous {
        n["stride"] = json!(r.stride);
    }
    if opts.values {
        // Unnamed here: the key path is added by the containers as the error unwinds.
        add_values(&mut n, &f.tensor(r, "")?);
    }
    Ok(n)
}

/// One pickled value as a JSON node.
fn value(f: &TorchFile, v: &Value, opts: Options) -> Result<Json> {
    count_node()?;
    Ok(match v {
        Value::None => Json::Null,
        Value::Bool(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::BigInt(b) => json!({"type": "int", "bytes_le": b.len(), "hex": hex_le(b)}),
        Value::Float(x) if x.is_finite() => json!(x),
        Value::Float(x) => json!({"type": "float", "value": x.to_string()}),
        Value::Str(s) => json!(s),
        Value::Bytes(b) => json!({"type": "bytes", "len": b.len()}),
        Value::List(items) | Value::Tuple(items) | Value::Set(items) | Value::FrozenSet(items) => {
            let kind = match v {
                Value::List(_) => "list",
                Value::Tuple(_) => "tuple",
                Value::Set(_) => "set",
                _ => "frozenset",
            };
            seq(f, kind, items, opts)?
        }
        Value::Dict(d) => dict(f, d, opts)?,
        Value::Global { module, name } => {
            json!({"type": "global", "name": format!("{module}.{name}")})
        }
        Value::Dtype(d) => json!({"type": "dtype", "name": format!("torch.{}", d.torch_name())}),
        Value::StorageType(d) => {
            json!({"type": "global", "name": format!("torch.{}", d.storage_class())})
        }
        Value::Storage(s) => json!({"type": "storage", "dtype": s.dtype.torch_name(),
                                    "numel": s.numel, "key": s.key}),
        Value::Tensor(t) => tensor_node(f, t, opts)?,
        Value::NumpyScalar { dtype, value: x } => {
            json!({"type": "numpy scalar", "dtype": dtype, "value": value(f, x, opts)?})
        }
        Value::NumpyDtype { code, byteorder } => {
            json!({"type": "numpy dtype", "code": code, "byteorder": byteorder})
        }
        Value::Object(o) => object(f, o, opts)?,
    })
}

fn hex_le(b: &[u8]) -> String {
    b.iter().rev().map(|x| format!("{x:02x}")).collect()
}

fn seq(f: &TorchFile, kind: &str, items: &[Value], opts: Options) -> Result<Json> {
    let numbers = !items.is_empty()
        && items
            .iter()
            .all(|x| matches!(x, Value::Int(_) | Value::Float(_) | Value::Bool(_)));
    if numbers && items.len() > SHORT_LIST {
        // A list of losses or epochs: its length, ends and range, not 25,000 lines.
        let xs: Vec<f64> = items.iter().filter_map(Value::as_f64).collect();
        let ints = items.iter().all(|x| matches!(x, Value::Int(_)));
        let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        return Ok(json!({
            "type": kind, "len": items.len(), "of": if ints { "int" } else { "float" },
            "head": xs.iter().take(HEAD).map(|&x| num(x)).collect::<Vec<_>>(),
            "last": num(*xs.last().expect("non-empty")), "min": num(lo), "max": num(hi),
        }));
    }
    let nodes = items
        .iter()
        .enumerate()
        .map(|(i, x)| value(f, x, opts).map_err(|e| e.at(&i.to_string())))
        .collect::<Result<Vec<_>>>()?;
    Ok(json!({"type": kind, "len": items.len(), "items": nodes}))
}

fn dict(f: &TorchFile, d: &Dict, opts: Options) -> Result<Json> {
    let mut items = Map::new();
    for (k, x) in &d.items {
        let key = key_str(k);
        let v = value(f, x, opts).map_err(|e| e.at(&key))?;
        items.insert(key, v);
    }
    let kind = if d.ordered { "OrderedDict" } else { "dict" };
    Ok(json!({"type": kind, "len": d.items.len(), "items": items}))
}

fn object(f: &TorchFile, o: &Object, opts: Options) -> Result<Json> {
    if let Some(a) = numpy_array(o) {
        return Ok(match a {
            Ok(t) => {
                let mut n = json!({"type": "numpy.ndarray", "dtype": t.dtype().torch_name(),
                                   "shape": t.shape()});
                if opts.values {
                    add_values(&mut n, &t);
                }
                n
            }
            Err(e) => json!({"type": "numpy.ndarray", "unsupported": e.to_string()}),
        });
    }
    let mut n = json!({"type": "object", "class": o.class()});
    if !o.args.is_empty() {
        n["args"] = Json::Array(
            o.args
                .iter()
                .map(|x| value(f, x, opts))
                .collect::<Result<_>>()?,
        );
    }
    if let Some(s) = &o.state {
        n["state"] = value(f, s, opts)?;
    }
    if !o.dict_items.is_empty() {
        let mut m = Map::new();
        for (k, x) in &o.dict_items {
            m.insert(key_str(k), value(f, x, opts)?);
        }
        n["items"] = Json::Object(m);
    }
    if !o.list_items.is_empty() {
        n["list"] = Json::Array(
            o.list_items
                .iter()
                .map(|x| value(f, x, opts))
                .collect::<Result<_>>()?,
        );
    }
    Ok(n)
}

/// The tree as indented text, one line per node: containers with their length, tensors with
/// dtype and shape (and values when described with them), lists of numbers summarised.
pub fn render(tree: &Json) -> String {
    let mut out = String::new();
    line(&mut out, 0, None, tree);
    out
}

fn line(out: &mut String, depth: usize, key: Option<&str>, n: &Json) {
    use std::fmt::Write;
    let pad = "  ".repeat(depth);
    let label = key.map(|k| format!("{}: ", escape(k))).unwrap_or_default();
    let kind = n.get("type").and_then(Json::as_str);
    let summary = match (kind, n) {
        (Some("tensor" | "numpy.ndarray"), _) => {
            let mut s = format!(
                "{} {} {}",
                if kind == Some("tensor") {
                    "tensor"
                } else {
                    "numpy array"
                },
                n["dtype"].as_str().unwrap_or("?"),
                n["shape"]
            );
            if n.get("parameter").is_some() {
                s.push_str(" (parameter)");
            }
            if let Some(st) = n.get("stride") {
                write!(s, " stride {st}").unwrap();
            }
            if let Some(v) = n.get("values") {
                write!(
                    s,
                    "  {v}  min {} mean {} max {}",
                    n["min"], n["mean"], n["max"]
                )
                .unwrap();
            }
            if let Some(u) = n.get("unsupported").and_then(Json::as_str) {
                write!(s, "  (not readable: {u})").unwrap();
            }
            s
        }
        (Some(k @ ("dict" | "OrderedDict" | "safetensors")), _) => {
            format!("{k} ({} entries)", n["len"])
        }
        (Some(k @ ("list" | "tuple" | "set" | "frozenset")), _) if n.get("of").is_some() => {
            format!(
                "{k} of {} {}  first {}  last {}  min {}  max {}",
                n["len"],
                n["of"].as_str().unwrap_or(""),
                n["head"],
                n["last"],
                n["min"],
                n["max"]
            )
        }
        (Some(k @ ("list" | "tuple" | "set" | "frozenset")), _) => {
            format!("{k} ({} items)", n["len"])
        }
        (Some("object"), _) => format!("object {}", escape(n["class"].as_str().unwrap_or("?"))),
        (Some(_), _) => escape(&n.to_string()),
        (None, Json::String(s)) => format!("'{}'", escape(s)),
        (None, other) => other.to_string(),
    };
    writeln!(out, "{pad}{label}{summary}").unwrap();
    let children = |m: &Json| -> Vec<(String, Json)> {
        match m {
            Json::Object(o) => o.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Json::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v.clone()))
                .collect(),
            _ => Vec::new(),
        }
    };
    for field in ["items", "list", "args", "state", "metadata"] {
        if let Some(c) = n.get(field) {
            if kind.is_some_and(|k| k != "object") && field != "items" && field != "metadata" {
                continue;
            }
            let named = if kind == Some("object") && field != "items" {
                vec![(field.to_string(), c.clone())]
            } else {
                children(c)
            };
            for (k, v) in named {
                line(out, depth + 1, Some(&k), &v);
            }
        }
    }
}

/// Names and strings from a file, printable: control characters (terminal escape sequences
/// included) are shown escaped, never sent to the terminal raw.
pub fn escape(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Every tensor of a file with its dotted path, read (for `convert`): torch tensors, numpy
/// arrays, or a safetensors file's tensors (one unsupported dtype is an error naming it).
pub fn read_tensors(file: &AnyFile) -> Result<Vec<(String, Tensor)>> {
    match file {
        AnyFile::Torch(f) => tensors(&f.root)
            .into_iter()
            .map(|(path, t)| {
                let t = match t {
                    Found::Torch(r) => f.tensor(r, &path)?,
                    Found::Numpy(a) => a,
                };
                Ok((path, t))
            })
            .collect(),
        AnyFile::Safetensors(f) => f
            .names()
            .into_iter()
            .map(|n| Ok((n.clone(), f.tensor(&n)?)))
            .collect(),
    }
}
