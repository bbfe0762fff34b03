//! Typed tensors and the references to them that a checkpoint holds.
//!
//! A torch checkpoint describes a tensor as a *view* (offset, shape, strides) into a *storage*
//! (a flat byte blob with a dtype). [`TensorRef`] keeps that description without touching the
//! data, so a file can be opened lazily; [`view_storage`] turns a reference plus the storage bytes
//! into an ndarray, borrowing the bytes when their alignment and byte order allow and copying
//! otherwise. Every view is bounds-checked against its storage: nothing is ever zero-filled.

use crate::error::{Error, Result};
use half::{bf16, f16};
use ndarray::{ArrayD, ArrayViewD, CowArray, IxDyn, ShapeBuilder};
use serde::{Deserialize, Serialize};

/// Element type of a storage or tensor (the dtypes torch checkpoints of these models use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit integer.
    I64,
    /// 32-bit integer.
    I32,
    /// 16-bit integer.
    I16,
    /// 8-bit integer.
    I8,
    /// 8-bit unsigned integer.
    U8,
    /// 16-bit unsigned integer.
    U16,
    /// 32-bit unsigned integer.
    U32,
    /// 64-bit unsigned integer.
    U64,
    /// Boolean (one byte).
    Bool,
}

impl DType {
    /// Every dtype.
    pub const ALL: [DType; 13] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::Bool,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// torch's name (`torch.float32` without the prefix).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::Bool => "bool",
        }
    }

    /// The legacy typed-storage class torch names in its persistent ids.
    pub fn storage_class(self) -> &'static str {
        match self {
            DType::F32 => "FloatStorage",
            DType::F64 => "DoubleStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::I64 => "LongStorage",
            DType::I32 => "IntStorage",
            DType::I16 => "ShortStorage",
            DType::I8 => "CharStorage",
            DType::U8 => "ByteStorage",
            // torch has no typed storage classes for these: it saves them as UntypedStorage
            // with the dtype in `_rebuild_tensor_v3`; the names are tlens's own.
            DType::U16 => "UInt16Storage",
            DType::U32 => "UInt32Storage",
            DType::U64 => "UInt64Storage",
            DType::Bool => "BoolStorage",
        }
    }

    /// Parse a torch dtype attribute name (`torch.<name>`), including its aliases.
    pub fn from_torch_name(name: &str) -> Option<DType> {
        let name = name.strip_prefix("torch.").unwrap_or(name);
        Some(match name {
            "float32" | "float" => DType::F32,
            "float64" | "double" => DType::F64,
            "float16" | "half" => DType::F16,
            "bfloat16" => DType::BF16,
            "int64" | "long" => DType::I64,
            "int32" | "int" => DType::I32,
            "int16" | "short" => DType::I16,
            "int8" => DType::I8,
            "uint8" => DType::U8,
            "uint16" => DType::U16,
            "uint32" => DType::U32,
            "uint64" => DType::U64,
            "bool" => DType::Bool,
            _ => return None,
        })
    }

    /// Parse a storage class name (`FloatStorage`, …; `UntypedStorage` is bytes).
    pub fn from_storage_class(name: &str) -> Option<DType> {
        if name == "UntypedStorage" || name == "ByteStorage" {
            return Some(DType::U8);
        }
        DType::ALL.into_iter().find(|d| d.storage_class() == name)
    }

    /// safetensors' dtype tag.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::U16 => "U16",
            DType::U32 => "U32",
            DType::U64 => "U64",
            DType::Bool => "BOOL",
        }
    }

    /// Whether it is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// A plain element type that can be decoded from storage bytes.
pub trait Element: Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// The dtype of this element type.
    const DTYPE: DType;
    /// Whether every bit pattern is a valid value, so storage bytes may be borrowed in place.
    const BORROWABLE: bool = true;
    /// Decode one little-endian element.
    fn from_le_slice(b: &[u8]) -> Self;
    /// Decode one big-endian element.
    fn from_be_slice(b: &[u8]) -> Self;
    /// Append the little-endian bytes.
    fn write_le(self, out: &mut Vec<u8>);
    /// The value as f64.
    fn to_f64(self) -> f64;
    /// Wrap an array in a `Tensor`.
    fn wrap(a: ArrayD<Self>) -> Tensor;
    /// The array, if the tensor has this element type.
    fn unwrap_ref(t: &Tensor) -> Option<&ArrayD<Self>>;
}

macro_rules! numeric_element {
    ($t:ty, $dt:ident, $to:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$dt;
            fn from_le_slice(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().expect("slice length is the element size"))
            }
            fn from_be_slice(b: &[u8]) -> Self {
                <$t>::from_be_bytes(b.try_into().expect("slice length is the element size"))
            }
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn to_f64(self) -> f64 {
                let f: fn($t) -> f64 = $to;
                f(self)
            }
            fn wrap(a: ArrayD<Self>) -> Tensor {
                Tensor::$dt(a)
            }
            fn unwrap_ref(t: &Tensor) -> Option<&ArrayD<Self>> {
                match t {
                    Tensor::$dt(a) => Some(a),
                    _ => None,
                }
            }
        }
    };
}

numeric_element!(f32, F32, |x| x as f64);
numeric_element!(f64, F64, |x| x);
numeric_element!(f16, F16, |x| x.to_f64());
numeric_element!(bf16, BF16, |x| x.to_f64());
numeric_element!(i64, I64, |x| x as f64);
numeric_element!(i32, I32, |x| x as f64);
numeric_element!(i16, I16, |x| x as f64);
numeric_element!(i8, I8, |x| x as f64);
numeric_element!(u8, U8, |x| x as f64);
numeric_element!(u16, U16, |x| x as f64);
numeric_element!(u32, U32, |x| x as f64);
numeric_element!(u64, U64, |x| x as f64);

impl Element for bool {
    const DTYPE: DType = DType::Bool;
    const BORROWABLE: bool = false;
    fn from_le_slice(b: &[u8]) -> Self {
        b[0] != 0
    }
    fn from_be_slice(b: &[u8]) -> Self {
        b[0] != 0
    }
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(self as u8);
    }
    fn to_f64(self) -> f64 {
        self as u8 as f64
    }
    fn wrap(a: ArrayD<Self>) -> Tensor {
        Tensor::Bool(a)
    }
    fn unwrap_ref(t: &Tensor) -> Option<&ArrayD<Self>> {
        match t {
            Tensor::Bool(a) => Some(a),
            _ => None,
        }
    }
}

/// An owned tensor of any supported dtype (always in standard, C-contiguous layout).
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    /// f32 data.
    F32(ArrayD<f32>),
    /// f64 data.
    F64(ArrayD<f64>),
    /// f16 data.
    F16(ArrayD<f16>),
    /// bf16 data.
    BF16(ArrayD<bf16>),
    /// i64 data.
    I64(ArrayD<i64>),
    /// i32 data.
    I32(ArrayD<i32>),
    /// i16 data.
    I16(ArrayD<i16>),
    /// i8 data.
    I8(ArrayD<i8>),
    /// u8 data.
    U8(ArrayD<u8>),
    /// u16 data.
    U16(ArrayD<u16>),
    /// u32 data.
    U32(ArrayD<u32>),
    /// u64 data.
    U64(ArrayD<u64>),
    /// bool data.
    Bool(ArrayD<bool>),
}

/// Run `$body` with `$a` bound to the inner array, whatever the dtype.
macro_rules! with_array {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            Tensor::F32($a) => $body,
            Tensor::F64($a) => $body,
            Tensor::F16($a) => $body,
            Tensor::BF16($a) => $body,
            Tensor::I64($a) => $body,
            Tensor::I32($a) => $body,
            Tensor::I16($a) => $body,
            Tensor::I8($a) => $body,
            Tensor::U8($a) => $body,
            Tensor::U16($a) => $body,
            Tensor::U32($a) => $body,
            Tensor::U64($a) => $body,
            Tensor::Bool($a) => $body,
        }
    };
}

/// Run `$body` with type alias `$T` bound to the Rust element type of `$dtype`.
macro_rules! with_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            DType::I32 => {
                type $T = i32;
                $body
            }
            DType::I16 => {
                type $T = i16;
                $body
            }
            DType::I8 => {
                type $T = i8;
                $body
            }
            DType::U8 => {
                type $T = u8;
                $body
            }
            DType::U16 => {
                type $T = u16;
                $body
            }
            DType::U32 => {
                type $T = u32;
                $body
            }
            DType::U64 => {
                type $T = u64;
                $body
            }
            DType::Bool => {
                type $T = bool;
                $body
            }
        }
    };
}
pub(crate) use with_dtype;

impl Tensor {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::F64(_) => DType::F64,
            Tensor::F16(_) => DType::F16,
            Tensor::BF16(_) => DType::BF16,
            Tensor::I64(_) => DType::I64,
            Tensor::I32(_) => DType::I32,
            Tensor::I16(_) => DType::I16,
            Tensor::I8(_) => DType::I8,
            Tensor::U8(_) => DType::U8,
            Tensor::U16(_) => DType::U16,
            Tensor::U32(_) => DType::U32,
            Tensor::U64(_) => DType::U64,
            Tensor::Bool(_) => DType::Bool,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        with_array!(self, a => a.shape())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        with_array!(self, a => a.len())
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Borrow the array if the dtype is `T`.
    pub fn array<T: Element>(&self) -> Option<&ArrayD<T>> {
        T::unwrap_ref(self)
    }

    /// The array as `T`, or a typed error naming `context`.
    pub fn expect<T: Element>(&self, context: &str) -> Result<&ArrayD<T>> {
        T::unwrap_ref(self).ok_or_else(|| {
            Error::type_err(
                context,
                format!("dtype {}", T::DTYPE),
                format!("dtype {}", self.dtype()),
            )
        })
    }

    /// Element values as f64, in row-major order.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        with_array!(self, a => a.iter().map(|x| x.to_f64()).collect())
    }

    /// Element values as i64, in row-major order, for integer and bool tensors.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        Some(match self {
            Tensor::I64(a) => a.iter().copied().collect(),
            Tensor::I32(a) => a.iter().map(|&x| x as i64).collect(),
            Tensor::I16(a) => a.iter().map(|&x| x as i64).collect(),
            Tensor::I8(a) => a.iter().map(|&x| x as i64).collect(),
            Tensor::U8(a) => a.iter().map(|&x| x as i64).collect(),
            Tensor::U16(a) => a.iter().map(|&x| x as i64).collect(),
            Tensor::U32(a) => a.iter().map(|&x| x as i64).collect(),
            // Values ≥ 2⁶³ do not fit: not an index tensor.
            Tensor::U64(a) => a
                .iter()
                .map(|&x| i64::try_from(x).ok())
                .collect::<Option<Vec<i64>>>()?,
            Tensor::Bool(a) => a.iter().map(|&x| x as i64).collect(),
            _ => return None,
        })
    }

    /// Sum of all elements in f64 (for manifests and quick checks).
    pub fn sum_f64(&self) -> f64 {
        with_array!(self, a => a.iter().map(|x| x.to_f64()).sum())
    }

    /// Little-endian bytes of the elements in row-major order (what torch and safetensors store).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len() * self.dtype().size());
        with_array!(self, a => for x in a.iter() { x.write_le(&mut out) });
        out
    }

    /// Decode a contiguous little-endian buffer.
    pub fn from_le_bytes(
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
        name: &str,
    ) -> Result<Tensor> {
        let numel = checked_numel(shape, name)?;
        let needed = numel as u64 * dtype.size() as u64;
        if bytes.len() as u64 != needed {
            return Err(Error::Truncated {
                what: format!("data of tensor '{name}'"),
                needed,
                available: bytes.len() as u64,
            });
        }
        with_dtype!(dtype, T => {
            let v: Vec<T> = bytes.chunks_exact(dtype.size()).map(T::from_le_slice).collect();
            let a = ArrayD::from_shape_vec(IxDyn(shape), v)
                .map_err(|e| Error::invalid(name, e.to_string()))?;
            Ok(T::wrap(a))
        })
    }

    /// Convert to another dtype (numerically; integers to floats and back by `as` casts).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if self.dtype() == dtype {
            return self.clone();
        }
        let vals = self.to_f64_vec();
        let shape = IxDyn(self.shape());
        macro_rules! build {
            ($f:expr) => {
                ArrayD::from_shape_vec(shape, vals.into_iter().map($f).collect())
                    .expect("same number of elements")
            };
        }
        match dtype {
            DType::F32 => Tensor::F32(build!(|x| x as f32)),
            DType::F64 => Tensor::F64(build!(|x| x)),
            DType::F16 => Tensor::F16(build!(f16::from_f64)),
            DType::BF16 => Tensor::BF16(build!(bf16::from_f64)),
            DType::I64 => Tensor::I64(build!(|x| x as i64)),
            DType::I32 => Tensor::I32(build!(|x| x as i32)),
            DType::I16 => Tensor::I16(build!(|x| x as i16)),
            DType::I8 => Tensor::I8(build!(|x| x as i8)),
            DType::U8 => Tensor::U8(build!(|x| x as u8)),
            DType::U16 => Tensor::U16(build!(|x| x as u16)),
            DType::U32 => Tensor::U32(build!(|x| x as u32)),
            DType::U64 => Tensor::U64(build!(|x| x as u64)),
            DType::Bool => Tensor::Bool(build!(|x| x != 0.0)),
        }
    }
}

/// Reverse all axes (numpy's `.T`), in standard layout: column-major data read as row-major.
pub fn transpose_all(t: &Tensor) -> Tensor {
    with_array!(t, a => Tensor::from(a.t().as_standard_layout().into_owned()))
}

impl<T: Element> From<ArrayD<T>> for Tensor {
    fn from(a: ArrayD<T>) -> Tensor {
        // Tensors are kept in standard layout so that byte serialisation is a plain walk.
        let a = if a.is_standard_layout() {
            a
        } else {
            a.as_standard_layout().into_owned()
        };
        T::wrap(a)
    }
}

/// A storage as named in a checkpoint: where its bytes live and how to read them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StorageRef {
    /// Record name (`data/<key>` in a zip file; the legacy format's root key).
    pub key: String,
    /// The element type.
    pub dtype: DType,
    /// Number of elements this (view of the) storage spans.
    pub numel: u64,
    /// Element offset of this view into the root storage (legacy storage views; else 0).
    pub view_offset: u64,
    /// Device the storage was saved from (`cpu`, `cuda:0`): informational only.
    pub location: String,
}

/// A tensor as described in a checkpoint: a strided view into a storage.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    /// Shared: several tensors may view one storage (the demo's train/test indices do).
    pub storage: std::sync::Arc<StorageRef>,
    /// Element offset into the storage.
    pub offset: u64,
    /// The tensor's shape.
    pub shape: Vec<usize>,
    /// Element strides into the storage.
    pub stride: Vec<usize>,
    /// torch's `requires_grad`.
    pub requires_grad: bool,
    /// Saved as an `nn.Parameter` (`_rebuild_parameter`).
    pub is_parameter: bool,
}

impl TensorRef {
    /// A contiguous view of a whole storage named `key` (torch's strides: products of
    /// max(dim, 1), so empty dims still get stride ≥ 1).
    pub fn contiguous(key: String, dtype: DType, shape: &[usize]) -> TensorRef {
        let mut stride = vec![0usize; shape.len()];
        let mut acc = 1usize;
        for i in (0..shape.len()).rev() {
            stride[i] = acc;
            acc *= shape[i].max(1);
        }
        TensorRef {
            storage: std::sync::Arc::new(StorageRef {
                key,
                dtype,
                numel: shape.iter().product::<usize>() as u64,
                view_offset: 0,
                location: "cpu".into(),
            }),
            offset: 0,
            shape: shape.to_vec(),
            stride,
            requires_grad: false,
            is_parameter: false,
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// Whether the view is a dense row-major block.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(d);
        }
        true
    }

    /// Number of storage elements the view needs (`offset + 1 + Σ (dim−1)·stride`), checked.
    pub fn required_storage(&self, name: &str) -> Result<u64> {
        if self.shape.len() != self.stride.len() {
            return Err(Error::invalid(
                name,
                format!(
                    "shape has {} dims but stride has {}",
                    self.shape.len(),
                    self.stride.len()
                ),
            ));
        }
        if self.shape.contains(&0) {
            return Ok(0);
        }
        let overflow = || Error::invalid(name, "tensor extent overflows");
        let mut last = self.offset;
        for (&d, &s) in self.shape.iter().zip(&self.stride) {
            let step = (d as u64 - 1).checked_mul(s as u64).ok_or_else(overflow)?;
            last = last.checked_add(step).ok_or_else(overflow)?;
        }
        last.checked_add(1).ok_or_else(overflow)
    }
}

pub(crate) fn checked_numel(shape: &[usize], name: &str) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid(name, format!("shape {shape:?} overflows")))
}

/// Build an ndarray for `r` from the bytes of its (root) storage.
///
/// `storage` is the whole root storage as stored in the file; `big_endian` is the file's byte
/// order. The result borrows `storage` when the data is little-endian, the element type accepts
/// any bit pattern and the pointer is aligned for `T`; otherwise the elements are copied.
pub fn view_storage<'a, T: Element>(
    storage: &'a [u8],
    big_endian: bool,
    r: &TensorRef,
    name: &str,
) -> Result<CowArray<'a, T, IxDyn>> {
    if r.dtype() != T::DTYPE {
        return Err(Error::type_err(
            name,
            format!("dtype {}", T::DTYPE),
            format!("dtype {}", r.dtype()),
        ));
    }
    let esize = T::DTYPE.size() as u64;
    let root_numel = storage.len() as u64 / esize;
    // The view of the storage must lie inside the stored bytes…
    let view_end = r
        .storage
        .view_offset
        .checked_add(r.storage.numel)
        .ok_or_else(|| Error::invalid(name, "storage view overflows"))?;
    if view_end > root_numel {
        return Err(Error::StorageBounds {
            tensor: name.to_string(),
            storage: r.storage.key.clone(),
            needed: view_end,
            available: root_numel,
        });
    }
    // …and the tensor inside the view.
    let needed = r.required_storage(name)?;
    if needed > r.storage.numel {
        return Err(Error::StorageBounds {
            tensor: name.to_string(),
            storage: r.storage.key.clone(),
            needed,
            available: r.storage.numel,
        });
    }
    let numel = checked_numel(&r.shape, name)?;
    if numel == 0 {
        return Ok(CowArray::from(ArrayD::<T>::default(IxDyn(&r.shape))));
    }
    let base = (r.storage.view_offset + r.offset) as usize; // ≤ root_numel, fits in usize
    let extent = (needed - r.offset) as usize;
    let bytes = &storage[base * esize as usize..(base + extent) * esize as usize];

    if !big_endian && T::BORROWABLE && cfg!(target_endian = "little") {
        // SAFETY: T is a plain numeric type for which every bit pattern is valid (BORROWABLE),
        // and align_to only yields a middle slice that is correctly aligned for T.
        let (head, mid, tail) = unsafe { bytes.align_to::<T>() };
        if head.is_empty() && tail.is_empty() {
            let view = ArrayViewD::from_shape(IxDyn(&r.shape).strides(IxDyn(&r.stride)), mid)
                .map_err(|e| Error::invalid(name, format!("strided view: {e}")))?;
            return Ok(CowArray::from(view));
        }
    }
    // Copy path: decode each element at its strided position.
    let decode = if big_endian {
        T::from_be_slice
    } else {
        T::from_le_slice
    };
    let es = esize as usize;
    let mut out = Vec::with_capacity(numel);
    if r.is_contiguous() {
        out.extend(bytes[..numel * es].chunks_exact(es).map(decode));
    } else {
        let mut index = vec![0usize; r.shape.len()];
        for _ in 0..numel {
            let pos: usize = index.iter().zip(&r.stride).map(|(i, s)| i * s).sum();
            out.push(decode(&bytes[pos * es..(pos + 1) * es]));
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < r.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
    }
    let a = ArrayD::from_shape_vec(IxDyn(&r.shape), out)
        .map_err(|e| Error::invalid(name, e.to_string()))?;
    Ok(CowArray::from(a))
}

/// Materialise `r` as an owned [`Tensor`] of its own dtype.
pub fn tensor_from_storage(
    storage: &[u8],
    big_endian: bool,
    r: &TensorRef,
    name: &str,
) -> Result<Tensor> {
    with_dtype!(r.dtype(), T => {
        let a = view_storage::<T>(storage, big_endian, r, name)?.into_owned();
        let a = if a.is_standard_layout() { a } else { a.as_standard_layout().into_owned() };
        Ok(T::wrap(a))
    })
}
