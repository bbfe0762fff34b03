//! A restricted pickle virtual machine, and a writer for the subset torch uses.
//!
//! Why not serde-pickle: torch stores every tensor through BINPERSID (a persistent id), which
//! serde-pickle rejects. Why not a general pickle VM: unpickling normally *imports and calls*
//! arbitrary Python callables, which is exactly what makes `torch.load(weights_only=False)`
//! unsafe. This VM never imports or calls anything. It recognises a short list of globals by
//! name (tensor rebuilds, OrderedDict, storage classes, torch dtypes, numpy scalars) and
//! interprets them as data; every other GLOBAL/REDUCE/NEWOBJ/BUILD becomes an opaque
//! [`Object`] that records its class path, arguments and state.
//!
//! Limits ([`Limits`]) bound memo size, nesting depth, string lengths and the total number of
//! values built, so hostile files fail with [`crate::Error::Limit`] instead of exhausting memory.
//!
//! A pickle that would run `os.system("…")` under `pickle.load` is read as inert data:
//!
//! ```
//! use tlens::io::pickle::{unpickle, Limits, Value};
//! let armed = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsq\x00\x85R.";
//! let mut no_storages = |_: Value, _: usize| -> tlens::Result<Value> { unreachable!() };
//! let u = unpickle(armed, &mut no_storages, &Limits::default())?;
//! let Value::Object(o) = u.value else { panic!() };
//! assert_eq!(o.class(), "os.system");          // recorded, never imported or called
//! assert_eq!(o.args, [Value::Str("ls".into())]);
//! assert_eq!(tlens::io::pickle::foreign_globals(&u.globals), ["os.system"]);
//! # Ok::<(), tlens::Error>(())
//! ```

mod read;
mod write;

pub use read::{unpickle, PersistentLoad, Unpickled};
pub use write::Pickler;

use crate::tensor::{DType, StorageRef, TensorRef};

/// A decoded pickle value. Containers keep insertion order.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Python's `None`.
    None,
    /// A bool.
    Bool(bool),
    /// An int that fits in i64.
    Int(i64),
    /// An integer that does not fit in i64: little-endian two's-complement bytes (LONG1/LONG4).
    BigInt(Vec<u8>),
    /// A float.
    Float(f64),
    /// A str.
    Str(String),
    /// A bytes object.
    Bytes(Vec<u8>),
    /// A list.
    List(Vec<Value>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A set.
    Set(Vec<Value>),
    /// A frozenset.
    FrozenSet(Vec<Value>),
    /// A dict or OrderedDict.
    Dict(Dict),
    /// A global that was referenced but not called (`GLOBAL module name`).
    Global {
        /// The global's module.
        module: String,
        /// The global's name.
        name: String,
    },
    /// A torch dtype global such as `torch.float32`.
    Dtype(DType),
    /// A storage class global such as `torch.FloatStorage`.
    StorageType(DType),
    /// A storage resolved from a persistent id (boxed: keeps `Value` small).
    Storage(std::sync::Arc<StorageRef>),
    /// A tensor rebuilt by `_rebuild_tensor_v2` / `_rebuild_parameter` (not yet read).
    Tensor(Box<TensorRef>),
    /// A numpy scalar (`numpy.core.multiarray.scalar(dtype, bytes)`), decoded.
    NumpyScalar {
        /// numpy's dtype code (`f8`, `i8`, …).
        dtype: String,
        /// The scalar's value.
        value: Box<Value>,
    },
    /// A numpy dtype object (`numpy.dtype('f8')` + its BUILD state).
    NumpyDtype {
        /// The type code (`f8`, `u1`, …).
        code: String,
        /// `<`, `>` or `|`.
        byteorder: String,
    },
    /// Anything else: a class instance that was *not* constructed.
    Object(Box<Object>),
}

/// A dict (plain or `collections.OrderedDict`), with the attributes a BUILD gave it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Dict {
    /// Whether it was a `collections.OrderedDict`.
    pub ordered: bool,
    /// Key/value pairs in insertion order.
    pub items: Vec<(Value, Value)>,
    /// Instance attributes (torch state dicts carry `_metadata` here).
    pub attrs: Option<Box<Value>>,
}

/// How an opaque object was created.
#[derive(Clone, Debug, PartialEq)]
pub enum Construct {
    /// `REDUCE`: `callable(*args)`.
    Reduce,
    /// `NEWOBJ` / `NEWOBJ_EX`: `cls.__new__(cls, *args, **kwargs)`.
    NewObj,
    /// Protocol-0/1 `INST` / `OBJ`.
    Inst,
}

/// An instance of a class tlens does not interpret, kept as data.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// Module of the class or callable (empty when the callable was not a global).
    pub module: String,
    /// Qualified name of the class or callable.
    pub name: String,
    /// How the object was created.
    pub construct: Construct,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments (NEWOBJ_EX).
    pub kwargs: Vec<(Value, Value)>,
    /// The BUILD state (for dataclasses such as `HookedTransformerConfig`, a dict of fields).
    pub state: Option<Value>,
    /// Items added by APPEND(S) (list subclasses).
    pub list_items: Vec<Value>,
    /// Items added by SETITEM(S) (dict subclasses).
    pub dict_items: Vec<(Value, Value)>,
}

/// Bounds that protect the VM against hostile input.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest number of memo entries.
    pub max_memo: usize,
    /// Deepest nesting of containers in the result.
    pub max_depth: usize,
    /// Longest string or bytes object.
    pub max_bytes_len: usize,
    /// Most values created (in the VM and when expanding shared references).
    pub max_values: usize,
    /// Most bytes held by strings and bytes objects together.
    pub max_total_bytes: usize,
    /// Deepest stack.
    pub max_stack: usize,
    /// Most heap bytes of the owned value tree after expanding shared references, and (for a
    /// torch file) of tensors expanded beyond the bytes the file stores (broadcast views):
    /// the memory budget ([`crate::io::memory_budget`], `--memory-budget`).
    pub max_expanded_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memo: 4_000_000,
            max_depth: 200,
            max_bytes_len: 256 << 20,
            max_values: 20_000_000,
            max_total_bytes: 1 << 30,
            max_stack: 1_000_000,
            max_expanded_bytes: crate::io::memory_budget() as usize,
        }
    }
}

/// Globals that a checkpoint names as data: torch's tensor and storage machinery, modules,
/// OrderedDict, numpy scalars and arrays, TorchScript modules.
const DATA_GLOBALS: [&str; 13] = [
    "torch._utils.",
    "torch._tensor.",
    "torch.storage.",
    "torch.nn.",
    "collections.OrderedDict",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.dtype",
    "numpy.ndarray",
    "_codecs.encode",
    "__torch__.",
];

/// Whether `module.name` is plain checkpoint data (see [`DATA_GLOBALS`]): also torch dtypes and
/// storage classes, `torch.Size`, `torch.device`, TL config classes and sets.
fn is_data_global(g: &str) -> bool {
    if DATA_GLOBALS.iter().any(|d| g.starts_with(d) || g == *d) {
        return true;
    }
    if let Some(name) = g.strip_prefix("torch.") {
        return !name.contains('.')
            && (DType::from_torch_name(name).is_some()
                || DType::from_storage_class(name).is_some()
                || matches!(name, "Size" | "device"));
    }
    if g.starts_with("transformer_lens.") {
        return g.ends_with("HookedTransformerConfig");
    }
    matches!(g, "builtins.set" | "builtins.frozenset" | "__builtin__.set")
}

/// The globals among `names` that are not plain checkpoint data: callables that
/// `torch.load(weights_only=False)` would import and may call (`os.system`, `builtins.eval`,
/// a user's class). tlens imported and ran none of them; the CLI warns about them.
pub fn foreign_globals(names: &[String]) -> Vec<String> {
    names
        .iter()
        .filter(|g| !is_data_global(g))
        .cloned()
        .collect()
}

impl Value {
    /// Python-ish type name, for error messages.
    pub fn type_name(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::List(_) => "list".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::Set(_) => "set".into(),
            Value::FrozenSet(_) => "frozenset".into(),
            Value::Dict(d) if d.ordered => "OrderedDict".into(),
            Value::Dict(_) => "dict".into(),
            Value::Global { module, name } => format!("global {module}.{name}"),
            Value::Dtype(d) => format!("torch.{}", d.torch_name()),
            Value::StorageType(d) => format!("torch.{}", d.storage_class()),
            Value::Storage(_) => "storage".into(),
            Value::Tensor(t) => format!("tensor {:?} {}", t.shape, t.dtype()),
            Value::NumpyScalar { dtype, .. } => format!("numpy {dtype} scalar"),
            Value::NumpyDtype { code, .. } => format!("numpy dtype {code}"),
            Value::Object(o) => format!("{} object", o.class()),
        }
    }

    /// The string, if this is a str.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Integer value (also of numpy integer scalars and bools).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            Value::NumpyScalar { value, .. } => value.as_i64(),
            _ => None,
        }
    }

    /// Float value (ints convert; numpy scalars unwrap).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            Value::NumpyScalar { value, .. } => value.as_f64(),
            _ => None,
        }
    }

    /// The bool (also of a numpy bool scalar).
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            Value::NumpyScalar { value, .. } => value.as_bool(),
            _ => None,
        }
    }

    /// Elements of a list or tuple.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// The dict, if this is one.
    pub fn as_dict(&self) -> Option<&Dict> {
        match self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }

    /// The tensor reference, if this is a tensor.
    pub fn as_tensor(&self) -> Option<&TensorRef> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// Look up a string key in a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_dict().and_then(|d| d.get(key))
    }
}

impl Object {
    /// `module.name` of the class.
    pub fn class(&self) -> String {
        if self.module.is_empty() {
            self.name.clone()
        } else {
            format!("{}.{}", self.module, self.name)
        }
    }
}

impl Dict {
    /// The value under a string key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.items
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// String keys in order (non-string keys are skipped).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.items.iter().filter_map(|(k, _)| k.as_str())
    }
}
