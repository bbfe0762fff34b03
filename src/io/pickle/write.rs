//! Writes [`Value`] trees as pickles that `torch.load` (and, for plain data, `weights_only=True`)
//! accepts: tensors as `_rebuild_tensor_v2` calls on persistent-id storages, state dicts as
//! `collections.OrderedDict`, configs as objects rebuilt by NEWOBJ + BUILD — the same shapes
//! torch.save emits, so files written here load in Python like files torch wrote.

use super::{Construct, Dict, Object, Value};
use crate::error::{Error, Result};
use crate::tensor::{DType, StorageRef, TensorRef};
use std::collections::HashMap;

/// A pickle writer (protocol 2 by default, as torch.save).
pub struct Pickler {
    out: Vec<u8>,
    protocol: u8,
    globals: HashMap<(String, String), u32>,
    next_memo: u32,
}

impl Pickler {
    /// A pickler for `protocol` (2–5).
    pub fn new(protocol: u8) -> Pickler {
        let protocol = protocol.clamp(2, 5);
        Pickler {
            out: vec![0x80, protocol],
            protocol,
            globals: HashMap::new(),
            next_memo: 0,
        }
    }

    /// Append STOP and return the bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(b'.');
        self.out
    }

    fn global(&mut self, module: &str, name: &str) {
        let key = (module.to_string(), name.to_string());
        if let Some(&i) = self.globals.get(&key) {
            self.get(i);
            return;
        }
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
        let i = self.next_memo;
        self.next_memo += 1;
        self.put(i);
        self.globals.insert(key, i);
    }

    fn put(&mut self, i: u32) {
        if i < 256 {
            self.out.extend_from_slice(&[b'q', i as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&i.to_le_bytes());
        }
    }

    fn get(&mut self, i: u32) {
        if i < 256 {
            self.out.extend_from_slice(&[b'h', i as u8]);
        } else {
            self.out.push(b'j');
            self.out.extend_from_slice(&i.to_le_bytes());
        }
    }

    fn int(&mut self, i: i64) {
        if (0..256).contains(&i) {
            self.out.extend_from_slice(&[b'K', i as u8]);
        } else if (0..65536).contains(&i) {
            self.out.push(b'M');
            self.out.extend_from_slice(&(i as u16).to_le_bytes());
        } else if i32::try_from(i).is_ok() {
            self.out.push(b'J');
            self.out.extend_from_slice(&(i as i32).to_le_bytes());
        } else {
            let b = i.to_le_bytes();
            // minimal two's-complement length
            let mut n = 8;
            while n > 1 {
                let top = b[n - 1];
                let next_sign = b[n - 2] & 0x80;
                if (top == 0 && next_sign == 0) || (top == 0xff && next_sign != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.long1(&b[..n]);
        }
    }

    fn long1(&mut self, b: &[u8]) {
        if b.len() < 256 {
            self.out.extend_from_slice(&[0x8a, b.len() as u8]);
        } else {
            self.out.push(0x8b);
            self.out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        }
        self.out.extend_from_slice(b);
    }

    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn bytes(&mut self, b: &[u8]) {
        if self.protocol >= 3 {
            self.out.push(b'B');
            self.out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            self.out.extend_from_slice(b);
        } else {
            // Protocol 2 has no bytes opcode: Python 3 writes _codecs.encode(latin-1 str, 'latin1').
            self.global("_codecs", "encode");
            let s: String = b.iter().map(|&c| c as char).collect();
            self.str(&s);
            self.str("latin1");
            self.out.push(0x86); // TUPLE2
            self.out.push(b'R');
        }
    }

    fn tuple(&mut self, items: &[Value]) -> Result<()> {
        match items.len() {
            0 => self.out.push(b')'),
            1..=3 => {
                for v in items {
                    self.value(v)?;
                }
                self.out.push(0x84 + items.len() as u8);
            }
            _ => {
                self.out.push(b'(');
                for v in items {
                    self.value(v)?;
                }
                self.out.push(b't');
            }
        }
        Ok(())
    }

    fn appends(&mut self, items: &[Value]) -> Result<()> {
        for chunk in items.chunks(1000) {
            self.out.push(b'(');
            for v in chunk {
                self.value(v)?;
            }
            self.out.push(b'e');
        }
        Ok(())
    }

    fn setitems(&mut self, items: &[(Value, Value)]) -> Result<()> {
        for chunk in items.chunks(1000) {
            self.out.push(b'(');
            for (k, v) in chunk {
                self.value(k)?;
                self.value(v)?;
            }
            self.out.push(b'u');
        }
        Ok(())
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.push(b')');
        self.out.push(b'R');
    }

    fn dict(&mut self, d: &Dict) -> Result<()> {
        if d.ordered {
            self.empty_ordered_dict();
        } else {
            self.out.push(b'}');
        }
        self.setitems(&d.items)?;
        if let Some(a) = &d.attrs {
            self.value(a)?;
            self.out.push(b'b');
        }
        Ok(())
    }

    /// The persistent id torch writes for a storage: ('storage', FloatStorage, key, location, numel).
    fn storage(&mut self, s: &StorageRef) -> Result<()> {
        if s.view_offset != 0 {
            return Err(Error::Unsupported(
                "writing legacy storage views; re-save the tensor contiguously".into(),
            ));
        }
        self.out.push(b'(');
        self.str("storage");
        if untyped(s.dtype) {
            // No typed storage class exists: bytes, typed by `_rebuild_tensor_v3` (as torch).
            self.global("torch.storage", "UntypedStorage");
            self.str(&s.key);
            self.str(&s.location);
            self.int((s.numel * s.dtype.size() as u64) as i64);
        } else {
            self.global("torch", s.dtype.storage_class());
            self.str(&s.key);
            self.str(&s.location);
            self.int(s.numel as i64);
        }
        self.out.push(b't');
        self.out.push(b'Q');
        Ok(())
    }

    fn tensor(&mut self, t: &TensorRef) -> Result<()> {
        if t.is_parameter {
            self.global("torch._utils", "_rebuild_parameter");
        }
        let v3 = untyped(t.storage.dtype);
        self.global(
            "torch._utils",
            if v3 {
                "_rebuild_tensor_v3"
            } else {
                "_rebuild_tensor_v2"
            },
        );
        self.out.push(b'(');
        self.storage(&t.storage)?;
        self.int(t.offset as i64);
        let shape: Vec<Value> = t.shape.iter().map(|&d| Value::Int(d as i64)).collect();
        let stride: Vec<Value> = t.stride.iter().map(|&d| Value::Int(d as i64)).collect();
        self.tuple(&shape)?;
        self.tuple(&stride)?;
        self.out.push(if t.requires_grad && !t.is_parameter {
            0x88
        } else {
            0x89
        });
        self.empty_ordered_dict();
        if v3 {
            self.global("torch", t.storage.dtype.torch_name());
        }
        self.out.push(b't');
        self.out.push(b'R');
        if t.is_parameter {
            // _rebuild_parameter(data, requires_grad, backward_hooks)
            self.out.push(if t.requires_grad { 0x88 } else { 0x89 });
            self.empty_ordered_dict();
            self.out.push(0x87); // TUPLE3
            self.out.push(b'R');
        }
        Ok(())
    }

    fn numpy_scalar(&mut self, dtype: &str, value: &Value) -> Result<()> {
        let data: Vec<u8> = match (dtype, value) {
            ("f8", v) => v.as_f64().map(|f| f.to_le_bytes().to_vec()),
            ("f4", v) => v.as_f64().map(|f| (f as f32).to_le_bytes().to_vec()),
            ("i8", v) => v.as_i64().map(|i| i.to_le_bytes().to_vec()),
            ("i4", v) => v.as_i64().map(|i| (i as i32).to_le_bytes().to_vec()),
            ("b1", Value::Bool(b)) => Some(vec![*b as u8]),
            _ => None,
        }
        .ok_or_else(|| Error::Unsupported(format!("writing numpy scalar of dtype {dtype}")))?;
        self.global("numpy.core.multiarray", "scalar");
        self.global("numpy", "dtype");
        self.str(dtype);
        self.out.push(0x89);
        self.out.push(0x88);
        self.out.push(0x87);
        self.out.push(b'R');
        let order = if dtype == "b1" { "|" } else { "<" };
        self.tuple(&[
            Value::Int(3),
            Value::Str(order.into()),
            Value::None,
            Value::None,
            Value::None,
            Value::Int(-1),
            Value::Int(-1),
            Value::Int(0),
        ])?;
        self.out.push(b'b');
        self.bytes(&data);
        self.out.push(0x86);
        self.out.push(b'R');
        Ok(())
    }

    fn object(&mut self, o: &Object) -> Result<()> {
        if o.module.is_empty() {
            return Err(Error::Unsupported(format!(
                "writing an object whose constructor is not a global ({})",
                o.name
            )));
        }
        match o.construct {
            Construct::Reduce => {
                self.global(&o.module, &o.name);
                self.tuple(&o.args)?;
                self.out.push(b'R');
            }
            Construct::NewObj => {
                self.global(&o.module, &o.name);
                self.tuple(&o.args)?;
                if o.kwargs.is_empty() {
                    self.out.push(0x81);
                } else if self.protocol >= 4 {
                    self.dict(&Dict {
                        ordered: false,
                        items: o.kwargs.clone(),
                        attrs: None,
                    })?;
                    self.out.push(0x92);
                } else {
                    return Err(Error::Unsupported(
                        "NEWOBJ_EX keyword arguments need pickle protocol 4".into(),
                    ));
                }
            }
            Construct::Inst => {
                self.out.push(b'(');
                self.global(&o.module, &o.name);
                for a in &o.args {
                    self.value(a)?;
                }
                self.out.push(b'o');
            }
        }
        if !o.list_items.is_empty() {
            self.appends(&o.list_items)?;
        }
        if !o.dict_items.is_empty() {
            self.setitems(&o.dict_items)?;
        }
        if let Some(s) = &o.state {
            self.value(s)?;
            self.out.push(b'b');
        }
        Ok(())
    }

    /// Write any value.
    pub fn value(&mut self, v: &Value) -> Result<()> {
        match v {
            Value::None => self.out.push(b'N'),
            Value::Bool(b) => self.out.push(if *b { 0x88 } else { 0x89 }),
            Value::Int(i) => self.int(*i),
            Value::BigInt(b) => self.long1(b),
            Value::Float(f) => {
                self.out.push(b'G');
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            Value::Str(s) => self.str(s),
            Value::Bytes(b) => self.bytes(b),
            Value::List(items) => {
                self.out.push(b']');
                self.appends(items)?;
            }
            Value::Tuple(items) => self.tuple(items)?,
            Value::Set(items) | Value::FrozenSet(items) => {
                let name = if matches!(v, Value::Set(_)) {
                    "set"
                } else {
                    "frozenset"
                };
                self.global("builtins", name);
                self.out.push(b']');
                self.appends(items)?;
                self.out.push(0x85);
                self.out.push(b'R');
            }
            Value::Dict(d) => self.dict(d)?,
            Value::Global { module, name } => self.global(module, name),
            Value::Dtype(d) => self.global("torch", d.torch_name()),
            Value::StorageType(d) => self.global("torch", d.storage_class()),
            Value::Storage(s) => self.storage(s)?,
            Value::Tensor(t) => self.tensor(t)?,
            Value::NumpyScalar { dtype, value } => self.numpy_scalar(dtype, value)?,
            Value::NumpyDtype { code, .. } => {
                return Err(Error::Unsupported(format!(
                    "writing a bare numpy dtype ({code})"
                )))
            }
            Value::Object(o) => self.object(o)?,
        }
        Ok(())
    }
}

/// Dtypes torch saves through an untyped byte storage and `_rebuild_tensor_v3`.
fn untyped(d: DType) -> bool {
    matches!(d, DType::U16 | DType::U32 | DType::U64)
}
