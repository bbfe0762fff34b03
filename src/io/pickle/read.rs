//! The unpickler: protocols 0–5, executing nothing.
//!
//! Values are built in an arena so that the memo shares containers the way Python does (a list
//! memoised while empty and filled by later APPENDS is seen full through every reference). At
//! STOP the arena is expanded into an owned [`Value`] tree, with depth and size limits: a cyclic
//! or exponentially shared structure fails with a typed error instead of looping or exploding.

use super::{Construct, Dict, Limits, Object, Value};
use crate::error::{Error, Result};
use crate::tensor::{DType, TensorRef};

/// Resolves persistent ids (BINPERSID): torch uses them for every storage.
pub trait PersistentLoad {
    /// Resolve the persistent id `pid` (met at byte `pos`).
    fn load(&mut self, pid: Value, pos: usize) -> Result<Value>;
}

impl<F: FnMut(Value, usize) -> Result<Value>> PersistentLoad for F {
    fn load(&mut self, pid: Value, pos: usize) -> Result<Value> {
        self(pid, pos)
    }
}

/// The result of one pickle: its value and where it ended.
#[derive(Debug)]
pub struct Unpickled {
    /// The unpickled value.
    pub value: Value,
    /// Offset just past the STOP opcode (the next pickle starts here in the legacy format).
    pub end: usize,
    /// Protocol announced by PROTO (0 when absent).
    pub protocol: u8,
    /// Approximate heap bytes of the expanded value tree (counted against
    /// [`Limits::max_expanded_bytes`]).
    pub expanded_bytes: u64,
    /// The globals the pickle names (`module.name`; nothing was imported or called).
    pub globals: Vec<String>,
}

type Id = usize;

#[derive(Clone)]
enum Node {
    Leaf(Value),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Set(Vec<Id>),
    FrozenSet(Vec<Id>),
    Dict {
        ordered: bool,
        items: Vec<(Id, Id)>,
        attrs: Option<Id>,
    },
    Object(Box<ObjNode>),
}

/// An opaque object under construction (boxed in [`Node`] to keep nodes small).
#[derive(Clone)]
struct ObjNode {
    module: String,
    name: String,
    construct: Construct,
    args: Vec<Id>,
    kwargs: Vec<(Id, Id)>,
    state: Option<Id>,
    list_items: Vec<Id>,
    dict_items: Vec<(Id, Id)>,
}

struct Vm<'a, 'l> {
    data: &'a [u8],
    pos: usize,
    op_pos: usize,
    op: &'static str,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: Vec<Option<Id>>,
    memo_count: usize,
    total_bytes: usize,
    limits: Limits,
    loader: &'l mut dyn PersistentLoad,
    protocol: u8,
    /// References to each node from the result tree (filled at STOP): a node referenced once
    /// is moved out of the arena when expanded instead of cloned.
    refs: Vec<u32>,
    /// What expansions (the result, and every persistent id) may still create: values, and
    /// bytes of the owned tree — one budget for the whole pickle.
    left_values: usize,
    left_bytes: usize,
    /// Persistent ids already resolved, by node: a storage referenced many times is resolved
    /// once.
    pids: std::collections::HashMap<Id, Value>,
    /// Every global the pickle names (`module.name`), in first-seen order, at most
    /// [`MAX_GLOBALS_KEPT`].
    globals: Vec<String>,
}

/// How many distinct global names a pickle's report keeps.
const MAX_GLOBALS_KEPT: usize = 64;

/// Unpickle one pickle starting at the beginning of `data`.
pub fn unpickle(
    data: &[u8],
    loader: &mut dyn PersistentLoad,
    limits: &Limits,
) -> Result<Unpickled> {
    let mut vm = Vm {
        data,
        pos: 0,
        op_pos: 0,
        op: "",
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Vec::new(),
        memo_count: 0,
        total_bytes: 0,
        limits: *limits,
        loader,
        protocol: 0,
        refs: Vec::new(),
        left_values: limits.max_values,
        left_bytes: limits.max_expanded_bytes,
        pids: std::collections::HashMap::new(),
        globals: Vec::new(),
    };
    let top = vm.run()?;
    vm.count_refs(top);
    let value = vm.expand(top, 0)?;
    Ok(Unpickled {
        value,
        end: vm.pos,
        protocol: vm.protocol,
        expanded_bytes: (limits.max_expanded_bytes - vm.left_bytes) as u64,
        globals: vm.globals,
    })
}

fn is_dtype_name(name: &str) -> Option<DType> {
    DType::from_torch_name(name)
}

impl<'a, 'l> Vm<'a, 'l> {
    // ---- byte reading -------------------------------------------------------------------

    fn eof(&self, what: &'static str) -> Error {
        Error::PickleEof {
            pos: self.pos,
            what,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if n > self.data.len() - self.pos {
            return Err(self.eof(what));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1, "argument")?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2, "argument")?.try_into().unwrap(),
        ))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, "argument")?.try_into().unwrap(),
        ))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, "argument")?.try_into().unwrap(),
        ))
    }

    fn line(&mut self) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.eof("newline-terminated argument"))?;
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    fn line_str(&mut self) -> Result<String> {
        let l = self.line()?;
        std::str::from_utf8(l)
            .map(str::to_owned)
            .map_err(|_| self.bad("argument line is not UTF-8"))
    }

    /// Read a length-prefixed payload, checking the limit before trusting the length.
    fn payload(&mut self, len: u64) -> Result<&'a [u8]> {
        if len > self.limits.max_bytes_len as u64 {
            return Err(Error::limit(
                "string/bytes length",
                self.limits.max_bytes_len as u64,
                len,
            ));
        }
        self.total_bytes += len as usize;
        if self.total_bytes > self.limits.max_total_bytes {
            return Err(Error::limit(
                "total string/bytes size",
                self.limits.max_total_bytes as u64,
                self.total_bytes as u64,
            ));
        }
        self.take(len as usize, "string/bytes payload")
    }

    fn utf8(&self, b: &[u8]) -> Result<String> {
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("string is not valid UTF-8"))
    }

    fn note_global(&mut self, module: &str, name: &str) {
        if self.globals.len() < MAX_GLOBALS_KEPT {
            let g = crate::error::clip(format!("{module}.{name}"));
            if !self.globals.contains(&g) {
                self.globals.push(g);
            }
        }
    }

    // ---- errors -----------------------------------------------------------------------

    fn bad(&self, msg: impl Into<String>) -> Error {
        Error::PickleStack {
            pos: self.op_pos,
            opcode: self.op,
            msg: msg.into(),
        }
    }

    // ---- arena and stack ----------------------------------------------------------------

    fn alloc(&mut self, n: Node) -> Result<Id> {
        if self.nodes.len() >= self.limits.max_values {
            return Err(Error::limit(
                "number of pickle values",
                self.limits.max_values as u64,
                self.nodes.len() as u64 + 1,
            ));
        }
        self.nodes.push(n);
        Ok(self.nodes.len() - 1)
    }

    fn push(&mut self, n: Node) -> Result<()> {
        let id = self.alloc(n)?;
        self.push_id(id)
    }

    fn push_id(&mut self, id: Id) -> Result<()> {
        if self.stack.len() >= self.limits.max_stack {
            return Err(Error::limit(
                "pickle stack depth",
                self.limits.max_stack as u64,
                self.stack.len() as u64 + 1,
            ));
        }
        self.stack.push(id);
        Ok(())
    }

    fn leaf(&mut self, v: Value) -> Result<()> {
        self.push(Node::Leaf(v))
    }

    fn pop(&mut self) -> Result<Id> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.bad("stack underflow"));
        }
        Ok(self.stack.pop().expect("checked non-empty"))
    }

    fn top(&self) -> Result<Id> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.bad("stack underflow"));
        }
        Ok(*self.stack.last().expect("checked non-empty"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.bad("no MARK on the stack"))?;
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, index: u64) -> Result<()> {
        let id = self.top()?;
        if index >= self.limits.max_memo as u64 {
            return Err(Error::limit(
                "pickle memo index",
                self.limits.max_memo as u64,
                index,
            ));
        }
        let i = index as usize;
        if i >= self.memo.len() {
            self.memo.resize(i + 1, None);
        }
        if self.memo[i].is_none() {
            self.memo_count += 1;
        }
        self.memo[i] = Some(id);
        Ok(())
    }

    fn memo_get(&mut self, index: u64) -> Result<()> {
        let id = self
            .memo
            .get(index as usize)
            .copied()
            .flatten()
            .ok_or(Error::PickleMemo {
                pos: self.op_pos,
                index,
            })?;
        self.push_id(id)
    }

    fn leaf_of(&self, id: Id) -> Option<&Value> {
        match &self.nodes[id] {
            Node::Leaf(v) => Some(v),
            _ => None,
        }
    }

    fn describe(&self, id: Id) -> String {
        match &self.nodes[id] {
            Node::Leaf(v) => v.type_name(),
            Node::List(_) => "list".into(),
            Node::Tuple(_) => "tuple".into(),
            Node::Set(_) => "set".into(),
            Node::FrozenSet(_) => "frozenset".into(),
            Node::Dict { .. } => "dict".into(),
            Node::Object(o) => format!("{}.{} object", o.module, o.name),
        }
    }

    fn tuple_items(&self, id: Id, what: &str) -> Result<Vec<Id>> {
        match &self.nodes[id] {
            Node::Tuple(v) => Ok(v.clone()),
            _ => Err(self.bad(format!(
                "{what}: expected a tuple, found {}",
                self.describe(id)
            ))),
        }
    }

    // ---- main loop ----------------------------------------------------------------------

    fn run(&mut self) -> Result<Id> {
        loop {
            self.op_pos = self.pos;
            let code = self
                .take(1, "opcode")
                .map_err(|_| self.eof("STOP opcode"))?[0];
            match code {
                0x80 => {
                    self.op = "PROTO";
                    self.protocol = self.u8()?;
                    if self.protocol > 5 {
                        return Err(self.bad(format!("unsupported protocol {}", self.protocol)));
                    }
                }
                0x95 => {
                    self.op = "FRAME";
                    let n = self.u64()?;
                    if n > (self.data.len() - self.pos) as u64 {
                        return Err(self.eof("frame"));
                    }
                }
                b'.' => {
                    self.op = "STOP";
                    let top = self.pop()?;
                    return Ok(top);
                }
                b'(' => {
                    self.op = "MARK";
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.op = "POP";
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.marks.pop(); // POP of a MARK, as CPython allows
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    self.op = "POP_MARK";
                    self.pop_mark()?;
                }
                b'2' => {
                    self.op = "DUP";
                    let t = self.top()?;
                    self.push_id(t)?;
                }
                b'N' => {
                    self.op = "NONE";
                    self.leaf(Value::None)?;
                }
                0x88 => {
                    self.op = "NEWTRUE";
                    self.leaf(Value::Bool(true))?;
                }
                0x89 => {
                    self.op = "NEWFALSE";
                    self.leaf(Value::Bool(false))?;
                }
                b'J' => {
                    self.op = "BININT";
                    let v = self.u32()? as i32 as i64;
                    self.leaf(Value::Int(v))?;
                }
                b'K' => {
                    self.op = "BININT1";
                    let v = self.u8()? as i64;
                    self.leaf(Value::Int(v))?;
                }
                b'M' => {
                    self.op = "BININT2";
                    let v = self.u16()? as i64;
                    self.leaf(Value::Int(v))?;
                }
                0x8a => {
                    self.op = "LONG1";
                    let n = self.u8()? as u64;
                    let b = self.payload(n)?;
                    self.leaf(decode_long(b))?;
                }
                0x8b => {
                    self.op = "LONG4";
                    let n = self.u32()? as i32;
                    if n < 0 {
                        return Err(self.bad("negative LONG4 length"));
                    }
                    let b = self.payload(n as u64)?;
                    self.leaf(decode_long(b))?;
                }
                b'I' => {
                    self.op = "INT";
                    let s = self.line_str()?;
                    let v = match s.as_str() {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => Value::Int(s.trim().parse().map_err(|_| self.bad("bad INT literal"))?),
                    };
                    self.leaf(v)?;
                }
                b'L' => {
                    self.op = "LONG";
                    let s = self.line_str()?;
                    let s = s.trim_end_matches('L');
                    // Protocols 0 and 1 write every long this way (torch's legacy magic
                    // number included); the digits are bounded by the line length limit.
                    let b = long_from_decimal(s)
                        .ok_or_else(|| self.bad("LONG literal is not a decimal integer"))?;
                    self.leaf(decode_long(&b))?;
                }
                b'G' => {
                    self.op = "BINFLOAT";
                    let v = f64::from_be_bytes(self.take(8, "argument")?.try_into().unwrap());
                    self.leaf(Value::Float(v))?;
                }
                b'F' => {
                    self.op = "FLOAT";
                    let s = self.line_str()?;
                    let v = s
                        .trim()
                        .parse()
                        .map_err(|_| self.bad("bad FLOAT literal"))?;
                    self.leaf(Value::Float(v))?;
                }
                b'X' => {
                    self.op = "BINUNICODE";
                    let n = self.u32()? as u64;
                    let b = self.payload(n)?;
                    let s = self.utf8(b)?;
                    self.leaf(Value::Str(s))?;
                }
                0x8c => {
                    self.op = "SHORT_BINUNICODE";
                    let n = self.u8()? as u64;
                    let b = self.payload(n)?;
                    let s = self.utf8(b)?;
                    self.leaf(Value::Str(s))?;
                }
                0x8d => {
                    self.op = "BINUNICODE8";
                    let n = self.u64()?;
                    let b = self.payload(n)?;
                    let s = self.utf8(b)?;
                    self.leaf(Value::Str(s))?;
                }
                b'V' => {
                    self.op = "UNICODE";
                    let l = self.line()?;
                    let s =
                        raw_unicode_escape(l).ok_or_else(|| self.bad("bad raw-unicode-escape"))?;
                    self.total_bytes += s.len();
                    self.leaf(Value::Str(s))?;
                }
                b'T' => {
                    self.op = "BINSTRING";
                    let n = self.u32()? as i32;
                    if n < 0 {
                        return Err(self.bad("negative BINSTRING length"));
                    }
                    let b = self.payload(n as u64)?;
                    self.leaf(Value::Str(b.iter().map(|&c| c as char).collect()))?;
                }
                b'U' => {
                    self.op = "SHORT_BINSTRING";
                    let n = self.u8()? as u64;
                    let b = self.payload(n)?;
                    self.leaf(Value::Str(b.iter().map(|&c| c as char).collect()))?;
                }
                b'B' => {
                    self.op = "BINBYTES";
                    let n = self.u32()? as u64;
                    let b = self.payload(n)?.to_vec();
                    self.leaf(Value::Bytes(b))?;
                }
                b'C' => {
                    self.op = "SHORT_BINBYTES";
                    let n = self.u8()? as u64;
                    let b = self.payload(n)?.to_vec();
                    self.leaf(Value::Bytes(b))?;
                }
                0x8e => {
                    self.op = "BINBYTES8";
                    let n = self.u64()?;
                    let b = self.payload(n)?.to_vec();
                    self.leaf(Value::Bytes(b))?;
                }
                0x96 => {
                    self.op = "BYTEARRAY8";
                    let n = self.u64()?;
                    let b = self.payload(n)?.to_vec();
                    self.leaf(Value::Bytes(b))?;
                }
                b']' => {
                    self.op = "EMPTY_LIST";
                    self.push(Node::List(Vec::new()))?;
                }
                b'l' => {
                    self.op = "LIST";
                    let items = self.pop_mark()?;
                    self.push(Node::List(items))?;
                }
                b'a' => {
                    self.op = "APPEND";
                    let v = self.pop()?;
                    let l = self.top()?;
                    self.extend_list(l, vec![v])?;
                }
                b'e' => {
                    self.op = "APPENDS";
                    let items = self.pop_mark()?;
                    let l = self.top()?;
                    self.extend_list(l, items)?;
                }
                b')' => {
                    self.op = "EMPTY_TUPLE";
                    self.push(Node::Tuple(Vec::new()))?;
                }
                b't' => {
                    self.op = "TUPLE";
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items))?;
                }
                0x85..=0x87 => {
                    self.op = ["TUPLE1", "TUPLE2", "TUPLE3"][(code - 0x85) as usize];
                    let n = (code - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items))?;
                }
                b'}' => {
                    self.op = "EMPTY_DICT";
                    self.push(Node::Dict {
                        ordered: false,
                        items: Vec::new(),
                        attrs: None,
                    })?;
                }
                b'd' => {
                    self.op = "DICT";
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push(Node::Dict {
                        ordered: false,
                        items: pairs,
                        attrs: None,
                    })?;
                }
                b's' => {
                    self.op = "SETITEM";
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.set_items(d, vec![(k, v)])?;
                }
                b'u' => {
                    self.op = "SETITEMS";
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    let d = self.top()?;
                    self.set_items(d, pairs)?;
                }
                0x8f => {
                    self.op = "EMPTY_SET";
                    self.push(Node::Set(Vec::new()))?;
                }
                0x90 => {
                    self.op = "ADDITEMS";
                    let items = self.pop_mark()?;
                    let s = self.top()?;
                    match &mut self.nodes[s] {
                        Node::Set(v) => v.extend(items),
                        _ => return Err(self.bad(format!("ADDITEMS on {}", self.describe(s)))),
                    }
                }
                0x91 => {
                    self.op = "FROZENSET";
                    let items = self.pop_mark()?;
                    self.push(Node::FrozenSet(items))?;
                }
                b'c' => {
                    self.op = "GLOBAL";
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    self.note_global(&module, &name);
                    self.leaf(global(module, name))?;
                }
                0x93 => {
                    self.op = "STACK_GLOBAL";
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(Value::Str(m)), Some(Value::Str(n))) =
                        (self.leaf_of(module), self.leaf_of(name))
                    else {
                        return Err(self.bad("STACK_GLOBAL needs two strings"));
                    };
                    let (m, n) = (m.clone(), n.clone());
                    self.note_global(&m, &n);
                    self.leaf(global(m, n))?;
                }
                b'R' => {
                    self.op = "REDUCE";
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let args = self.tuple_items(args, "REDUCE arguments")?;
                    let node = self.reduce(callable, args)?;
                    self.push(node)?;
                }
                0x81 => {
                    self.op = "NEWOBJ";
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let args = self.tuple_items(args, "NEWOBJ arguments")?;
                    let node = self.new_object(cls, Construct::NewObj, args, Vec::new());
                    self.push(node)?;
                }
                0x92 => {
                    self.op = "NEWOBJ_EX";
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let args = self.tuple_items(args, "NEWOBJ_EX arguments")?;
                    let kwargs = match &self.nodes[kwargs] {
                        Node::Dict { items, .. } => items.clone(),
                        _ => return Err(self.bad("NEWOBJ_EX keyword arguments must be a dict")),
                    };
                    let node = self.new_object(cls, Construct::NewObj, args, kwargs);
                    self.push(node)?;
                }
                b'i' => {
                    self.op = "INST";
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    let args = self.pop_mark()?;
                    self.push(Node::Object(Box::new(ObjNode {
                        module,
                        name,
                        construct: Construct::Inst,
                        args,
                        kwargs: Vec::new(),
                        state: None,
                        list_items: Vec::new(),
                        dict_items: Vec::new(),
                    })))?;
                }
                b'o' => {
                    self.op = "OBJ";
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err(self.bad("OBJ needs a class"));
                    }
                    let cls = items.remove(0);
                    let node = self.new_object(cls, Construct::Inst, items, Vec::new());
                    self.push(node)?;
                }
                b'b' => {
                    self.op = "BUILD";
                    let state = self.pop()?;
                    let target = self.top()?;
                    self.build(target, state)?;
                }
                b'p' => {
                    self.op = "PUT";
                    let s = self.line_str()?;
                    let i = s.trim().parse().map_err(|_| self.bad("bad PUT index"))?;
                    self.memo_put(i)?;
                }
                b'q' => {
                    self.op = "BINPUT";
                    let i = self.u8()? as u64;
                    self.memo_put(i)?;
                }
                b'r' => {
                    self.op = "LONG_BINPUT";
                    let i = self.u32()? as u64;
                    self.memo_put(i)?;
                }
                0x94 => {
                    self.op = "MEMOIZE";
                    let i = self.memo_count as u64;
                    self.memo_put(i)?;
                }
                b'g' => {
                    self.op = "GET";
                    let s = self.line_str()?;
                    let i = s.trim().parse().map_err(|_| self.bad("bad GET index"))?;
                    self.memo_get(i)?;
                }
                b'h' => {
                    self.op = "BINGET";
                    let i = self.u8()? as u64;
                    self.memo_get(i)?;
                }
                b'j' => {
                    self.op = "LONG_BINGET";
                    let i = self.u32()? as u64;
                    self.memo_get(i)?;
                }
                b'P' => {
                    self.op = "PERSID";
                    let s = self.line_str()?;
                    let v = self.loader.load(Value::Str(s), self.op_pos)?;
                    self.leaf_value(v)?;
                }
                b'Q' => {
                    self.op = "BINPERSID";
                    let id = self.pop()?;
                    let v = match self.pids.get(&id) {
                        Some(v) => v.clone(),
                        None => {
                            // Expanded from the pickle-wide budget (a file cannot reset it by
                            // repeating persistent ids). Before STOP every node counts as
                            // shared, so it is copied, never moved out of the arena.
                            let pid = self.expand(id, 0)?;
                            let v = self.loader.load(pid, self.op_pos)?;
                            self.pids.insert(id, v.clone());
                            v
                        }
                    };
                    self.leaf_value(v)?;
                }
                0x82 => return Err(self.unsupported("EXT1")),
                0x83 => return Err(self.unsupported("EXT2")),
                0x84 => return Err(self.unsupported("EXT4")),
                0x97 => return Err(self.unsupported("NEXT_BUFFER")),
                0x98 => return Err(self.unsupported("READONLY_BUFFER")),
                b'S' => return Err(self.unsupported("STRING (protocol 0 quoted string)")),
                other => {
                    return Err(Error::PickleOpcode {
                        pos: self.op_pos,
                        opcode: other,
                    })
                }
            }
        }
    }

    fn unsupported(&self, name: &'static str) -> Error {
        Error::PickleUnsupported {
            pos: self.op_pos,
            name,
        }
    }

    /// Push a value returned by the persistent loader (always a leaf: storages, strings).
    fn leaf_value(&mut self, v: Value) -> Result<()> {
        self.leaf(v)
    }

    fn pairs(&self, items: Vec<Id>) -> Result<Vec<(Id, Id)>> {
        if !items.len().is_multiple_of(2) {
            return Err(self.bad("odd number of items for a dict"));
        }
        Ok(items.chunks_exact(2).map(|c| (c[0], c[1])).collect())
    }

    fn extend_list(&mut self, target: Id, items: Vec<Id>) -> Result<()> {
        let desc = self.describe(target);
        match &mut self.nodes[target] {
            Node::List(v) => v.extend(items),
            Node::Object(o) => o.list_items.extend(items),
            _ => return Err(self.bad(format!("append to {desc}"))),
        }
        Ok(())
    }

    fn set_items(&mut self, target: Id, pairs: Vec<(Id, Id)>) -> Result<()> {
        let desc = self.describe(target);
        match &mut self.nodes[target] {
            Node::Dict { items, .. } => items.extend(pairs),
            Node::Object(o) => o.dict_items.extend(pairs),
            _ => return Err(self.bad(format!("set item on {desc}"))),
        }
        Ok(())
    }

    /// (module, name) of a class or callable; non-global callables get an empty module.
    fn callable_name(&self, id: Id) -> (String, String) {
        match self.leaf_of(id) {
            Some(Value::Global { module, name }) => (module.clone(), name.clone()),
            Some(Value::Dtype(d)) => ("torch".into(), d.torch_name().into()),
            Some(Value::StorageType(d)) => ("torch".into(), d.storage_class().into()),
            _ => (String::new(), format!("<{}>", self.describe(id))),
        }
    }

    fn new_object(
        &self,
        cls: Id,
        construct: Construct,
        args: Vec<Id>,
        kwargs: Vec<(Id, Id)>,
    ) -> Node {
        let (module, name) = self.callable_name(cls);
        Node::Object(Box::new(ObjNode {
            module,
            name,
            construct,
            args,
            kwargs,
            state: None,
            list_items: Vec::new(),
            dict_items: Vec::new(),
        }))
    }

    fn build(&mut self, target: Id, state: Id) -> Result<()> {
        // numpy dtype: BUILD (version, byteorder, …) sets the byte order.
        if let Node::Leaf(Value::NumpyDtype { .. }) = &self.nodes[target] {
            let order = match &self.nodes[state] {
                Node::Tuple(items) if items.len() >= 2 => match self.leaf_of(items[1]) {
                    Some(Value::Str(s)) => s.clone(),
                    _ => return Err(self.bad("numpy dtype state: byte order is not a string")),
                },
                _ => return Err(self.bad("numpy dtype state must be a tuple")),
            };
            if let Node::Leaf(Value::NumpyDtype { byteorder, .. }) = &mut self.nodes[target] {
                *byteorder = order;
            }
            return Ok(());
        }
        let desc = self.describe(target);
        match &mut self.nodes[target] {
            Node::Dict { attrs, .. } => *attrs = Some(state),
            Node::Object(o) => o.state = Some(state),
            // A tensor's BUILD carries Python attributes (subclass state): nothing to keep.
            Node::Leaf(Value::Tensor(_)) => {}
            _ => return Err(self.bad(format!("BUILD on {desc}"))),
        }
        Ok(())
    }

    // ---- interpreted globals ------------------------------------------------------------

    fn reduce(&self, callable: Id, args: Vec<Id>) -> Result<Node> {
        match self.leaf_of(callable) {
            Some(Value::Global { module, name }) => self.apply(module, name, callable, args),
            _ => Ok(self.new_object(callable, Construct::Reduce, args, Vec::new())),
        }
    }

    fn apply(&self, module: &str, name: &str, callable: Id, args: Vec<Id>) -> Result<Node> {
        match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                let t = self.rebuild_tensor(&args, name)?;
                Ok(Node::Leaf(Value::Tensor(Box::new(t))))
            }
            ("torch._utils", "_rebuild_tensor_v3") => {
                // (storage, offset, size, stride, requires_grad, backward_hooks, dtype): the
                // storage is untyped bytes reinterpreted as `dtype`.
                let mut t = self.rebuild_tensor(&args, name)?;
                let dtype = match args.get(6).and_then(|&a| self.leaf_of(a)) {
                    Some(Value::Dtype(d)) => *d,
                    Some(Value::Global { module, name: n }) => {
                        return Err(Error::Unsupported(format!("tensor dtype {module}.{n}")))
                    }
                    _ => return Err(self.bad("_rebuild_tensor_v3: argument 6 must be a dtype")),
                };
                if t.storage.dtype != dtype {
                    let size = dtype.size() as u64;
                    let s = &t.storage;
                    if s.dtype != DType::U8 || s.numel % size != 0 || s.view_offset % size != 0 {
                        return Err(self.bad(format!(
                            "_rebuild_tensor_v3: a {} storage of {} elements cannot hold {dtype}",
                            s.dtype, s.numel
                        )));
                    }
                    let mut typed = (**s).clone();
                    typed.dtype = dtype;
                    typed.numel = s.numel / size;
                    typed.view_offset = s.view_offset / size;
                    t.storage = std::sync::Arc::new(typed);
                }
                Ok(Node::Leaf(Value::Tensor(Box::new(t))))
            }
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state") => {
                let mut t = match args.first().and_then(|&a| self.leaf_of(a)) {
                    Some(Value::Tensor(t)) => (**t).clone(),
                    _ => return Err(self.bad(format!("{name}: first argument must be a tensor"))),
                };
                t.requires_grad = args
                    .get(1)
                    .and_then(|&a| self.leaf_of(a))
                    .and_then(Value::as_bool)
                    .ok_or_else(|| self.bad(format!("{name}: requires_grad must be a bool")))?;
                t.is_parameter = true;
                Ok(Node::Leaf(Value::Tensor(Box::new(t))))
            }
            ("torch._tensor", "_rebuild_from_type_v2")
            | ("torch._tensor", "_rebuild_from_type") => {
                // (func, new_type, args, state): apply func to args; the Python subclass is dropped.
                if args.len() < 3 {
                    return Err(self.bad(format!("{name}: expected at least 3 arguments")));
                }
                let func = args[0];
                let inner = self.tuple_items(args[2], name)?;
                let Some(Value::Global {
                    module,
                    name: fname,
                }) = self.leaf_of(func)
                else {
                    return Err(self.bad(format!("{name}: function must be a global")));
                };
                self.apply(module, fname, func, inner)
            }
            ("collections", "OrderedDict") => {
                let mut items = Vec::new();
                if let Some(&a) = args.first() {
                    // OrderedDict(iterable of pairs)
                    let seq = match &self.nodes[a] {
                        Node::List(v) | Node::Tuple(v) => v.clone(),
                        _ => return Err(self.bad("OrderedDict argument must be a sequence")),
                    };
                    for p in seq {
                        let kv = self.tuple_items(p, "OrderedDict item")?;
                        if kv.len() != 2 {
                            return Err(self.bad("OrderedDict item must be a pair"));
                        }
                        items.push((kv[0], kv[1]));
                    }
                }
                Ok(Node::Dict {
                    ordered: true,
                    items,
                    attrs: None,
                })
            }
            ("numpy", "dtype") => {
                let code = match args.first().and_then(|&a| self.leaf_of(a)) {
                    Some(Value::Str(s)) => s.clone(),
                    _ => return Err(self.bad("numpy.dtype: first argument must be a string")),
                };
                Ok(Node::Leaf(Value::NumpyDtype {
                    code,
                    byteorder: "|".into(),
                }))
            }
            ("numpy.core.multiarray", "scalar") | ("numpy._core.multiarray", "scalar") => {
                let (dtype, data) = match (args.first(), args.get(1)) {
                    (Some(&d), Some(&b)) => (self.leaf_of(d).cloned(), self.leaf_of(b).cloned()),
                    _ => return Err(self.bad("numpy scalar: expected (dtype, bytes)")),
                };
                match (dtype, data) {
                    (Some(Value::NumpyDtype { code, byteorder }), Some(Value::Bytes(b))) => {
                        match decode_numpy_scalar(&code, &byteorder, &b) {
                            Some(v) => Ok(Node::Leaf(Value::NumpyScalar {
                                dtype: code,
                                value: Box::new(v),
                            })),
                            None => {
                                Ok(self.new_object(callable, Construct::Reduce, args, Vec::new()))
                            }
                        }
                    }
                    _ => Ok(self.new_object(callable, Construct::Reduce, args, Vec::new())),
                }
            }
            ("_codecs", "encode") => {
                let (s, enc) = match (
                    args.first().and_then(|&a| self.leaf_of(a)),
                    args.get(1).and_then(|&a| self.leaf_of(a)),
                ) {
                    (Some(Value::Str(s)), Some(Value::Str(e))) => (s.clone(), e.clone()),
                    _ => return Err(self.bad("_codecs.encode: expected (str, encoding)")),
                };
                let bytes = match enc.as_str() {
                    "latin1" | "latin-1" | "iso-8859-1" => s
                        .chars()
                        .map(|c| {
                            u8::try_from(c as u32).map_err(|_| self.bad("non-latin-1 character"))
                        })
                        .collect::<Result<Vec<u8>>>()?,
                    "utf-8" | "utf8" => s.into_bytes(),
                    other => {
                        return Err(
                            self.bad(format!("_codecs.encode: unsupported encoding {other}"))
                        )
                    }
                };
                Ok(Node::Leaf(Value::Bytes(bytes)))
            }
            ("builtins", "set") | ("__builtin__", "set") | ("builtins", "frozenset") => {
                let items = match args.first().map(|&a| &self.nodes[a]) {
                    Some(Node::List(v)) | Some(Node::Tuple(v)) => v.clone(),
                    None => Vec::new(),
                    _ => return Err(self.bad("set argument must be a list")),
                };
                Ok(if name == "set" {
                    Node::Set(items)
                } else {
                    Node::FrozenSet(items)
                })
            }
            _ => Ok(self.new_object(callable, Construct::Reduce, args, Vec::new())),
        }
    }

    fn int_arg(&self, args: &[Id], i: usize, what: &str) -> Result<i64> {
        args.get(i)
            .and_then(|&a| self.leaf_of(a))
            .and_then(|v| match v {
                Value::Int(i) => Some(*i),
                _ => None,
            })
            .ok_or_else(|| self.bad(format!("{what} must be an int")))
    }

    fn dims_arg(&self, args: &[Id], i: usize, what: &str) -> Result<Vec<usize>> {
        let id = *args
            .get(i)
            .ok_or_else(|| self.bad(format!("missing {what}")))?;
        let items = match &self.nodes[id] {
            Node::Tuple(v) | Node::List(v) => v,
            _ => {
                return Err(self.bad(format!(
                    "{what} must be a tuple, found {}",
                    self.describe(id)
                )))
            }
        };
        items
            .iter()
            .map(|&d| match self.leaf_of(d) {
                Some(Value::Int(n)) if *n >= 0 => Ok(*n as usize),
                _ => Err(self.bad(format!("{what} entries must be non-negative ints"))),
            })
            .collect()
    }

    fn rebuild_tensor(&self, args: &[Id], fname: &str) -> Result<TensorRef> {
        let storage = match args.first().and_then(|&a| self.leaf_of(a)) {
            Some(Value::Storage(s)) => s.clone(),
            _ => {
                let found = args
                    .first()
                    .map(|&a| self.describe(a))
                    .unwrap_or("nothing".into());
                return Err(self.bad(format!(
                    "{fname}: argument 0 must be a storage, found {found}"
                )));
            }
        };
        let offset = self.int_arg(args, 1, "storage_offset")?;
        if offset < 0 {
            return Err(self.bad("negative storage offset"));
        }
        let shape = self.dims_arg(args, 2, "size")?;
        let stride = self.dims_arg(args, 3, "stride")?;
        if shape.len() != stride.len() {
            return Err(self.bad(format!(
                "{fname}: size has {} dims but stride has {}",
                shape.len(),
                stride.len()
            )));
        }
        let requires_grad = match args.get(4).and_then(|&a| self.leaf_of(a)) {
            Some(Value::Bool(b)) => *b,
            None if fname == "_rebuild_tensor" => false,
            _ => return Err(self.bad(format!("{fname}: requires_grad must be a bool"))),
        };
        Ok(TensorRef {
            storage,
            offset: offset as u64,
            shape,
            stride,
            requires_grad,
            is_parameter: false,
        })
    }

    // ---- expansion to owned values ------------------------------------------------------

    fn children(node: &Node, mut f: impl FnMut(Id)) {
        match node {
            Node::Leaf(_) => {}
            Node::List(v) | Node::Tuple(v) | Node::Set(v) | Node::FrozenSet(v) => {
                v.iter().for_each(|&c| f(c))
            }
            Node::Dict { items, attrs, .. } => {
                items.iter().for_each(|&(k, v)| {
                    f(k);
                    f(v)
                });
                attrs.iter().for_each(|&a| f(a));
            }
            Node::Object(o) => {
                o.args
                    .iter()
                    .chain(&o.list_items)
                    .chain(o.state.iter())
                    .for_each(|&c| f(c));
                o.kwargs.iter().chain(&o.dict_items).for_each(|&(k, v)| {
                    f(k);
                    f(v)
                });
            }
        }
    }

    /// Count references from the tree reachable from `top` (each reachable node visited once).
    fn count_refs(&mut self, top: Id) {
        let mut refs = vec![0u32; self.nodes.len()];
        refs[top] = 1;
        let mut todo = vec![top];
        while let Some(id) = todo.pop() {
            Self::children(&self.nodes[id], |c| {
                refs[c] = refs[c].saturating_add(1);
                if refs[c] == 1 {
                    todo.push(c);
                }
            });
        }
        self.refs = refs;
    }

    fn expand_all(&mut self, ids: &[Id], d: usize, sh: bool) -> Result<Vec<Value>> {
        ids.iter()
            .enumerate()
            .map(|(i, &c)| self.expand_node(c, d, sh).map_err(|e| e.at(&i.to_string())))
            .collect()
    }

    fn expand_pairs(
        &mut self,
        ids: &[(Id, Id)],
        d: usize,
        sh: bool,
    ) -> Result<Vec<(Value, Value)>> {
        ids.iter()
            .map(|&(k, v)| {
                let key = self.expand_node(k, d, sh)?;
                let val = self
                    .expand_node(v, d, sh)
                    .map_err(|e| e.at(&key_label(&key)))?;
                Ok((key, val))
            })
            .collect()
    }

    fn expand_opt(&mut self, id: Option<Id>, d: usize, sh: bool) -> Result<Option<Value>> {
        id.map(|i| self.expand_node(i, d, sh)).transpose()
    }

    fn expand(&mut self, id: Id, depth: usize) -> Result<Value> {
        self.expand_node(id, depth, false)
    }

    /// Charge one value of `payload` heap bytes to the pickle-wide expansion budget.
    fn charge(&mut self, payload: usize) -> Result<()> {
        if self.left_values == 0 {
            return Err(Error::limit(
                "number of values after expanding shared references",
                self.limits.max_values as u64,
                self.limits.max_values as u64 + 1,
            ));
        }
        self.left_values -= 1;
        let cost = std::mem::size_of::<Value>() + payload;
        if cost > self.left_bytes {
            return Err(Error::limit(
                "memory of the values after expanding shared references (bytes)",
                self.limits.max_expanded_bytes as u64,
                (self.limits.max_expanded_bytes - self.left_bytes + cost) as u64,
            ));
        }
        self.left_bytes -= cost;
        Ok(())
    }

    /// Turn node `id` into an owned value. A node referenced once from an unshared parent is
    /// moved out of the arena; a shared node — and everything under it, since it is expanded
    /// once per reference — is copied. Every value, copied or moved, is charged to the
    /// pickle-wide budget of values and bytes ([`Limits::max_values`],
    /// [`Limits::max_expanded_bytes`]), so exponential sharing and a large string referenced
    /// many times fail before memory is exhausted; the error names the key path. Depth is
    /// limited (so cycles fail).
    fn expand_node(&mut self, id: Id, depth: usize, shared: bool) -> Result<Value> {
        if depth > self.limits.max_depth {
            return Err(Error::limit(
                "nesting depth (or a recursive structure)",
                self.limits.max_depth as u64,
                depth as u64,
            ));
        }
        let payload = match &self.nodes[id] {
            Node::Leaf(v) => leaf_payload(v),
            Node::Object(o) => std::mem::size_of::<Object>() + o.module.len() + o.name.len(),
            _ => 0,
        };
        self.charge(payload)?;
        let sh = shared || self.refs.get(id).copied().unwrap_or(2) > 1;
        let node = if sh {
            self.nodes[id].clone()
        } else {
            std::mem::replace(&mut self.nodes[id], Node::Leaf(Value::None))
        };
        let d = depth + 1;
        Ok(match node {
            Node::Leaf(v) => v,
            Node::List(v) => Value::List(self.expand_all(&v, d, sh)?),
            Node::Tuple(v) => Value::Tuple(self.expand_all(&v, d, sh)?),
            Node::Set(v) => Value::Set(self.expand_all(&v, d, sh)?),
            Node::FrozenSet(v) => Value::FrozenSet(self.expand_all(&v, d, sh)?),
            Node::Dict {
                ordered,
                items,
                attrs,
            } => Value::Dict(Dict {
                ordered,
                items: self.expand_pairs(&items, d, sh)?,
                attrs: self.expand_opt(attrs, d, sh)?.map(Box::new),
            }),
            Node::Object(o) => {
                let o = *o;
                Value::Object(Box::new(Object {
                    args: self.expand_all(&o.args, d, sh)?,
                    kwargs: self.expand_pairs(&o.kwargs, d, sh)?,
                    state: self
                        .expand_opt(o.state, d, sh)
                        .map_err(|e| e.at("__state__"))?,
                    list_items: self.expand_all(&o.list_items, d, sh)?,
                    dict_items: self.expand_pairs(&o.dict_items, d, sh)?,
                    module: o.module,
                    name: o.name,
                    construct: o.construct,
                }))
            }
        })
    }
}

/// Heap bytes a leaf value holds beyond its own size.
fn leaf_payload(v: &Value) -> usize {
    match v {
        Value::Str(s) => s.len(),
        Value::Bytes(b) | Value::BigInt(b) => b.len(),
        Value::Global { module, name } => module.len() + name.len(),
        Value::Tensor(t) => {
            std::mem::size_of::<TensorRef>() + 16 * t.shape.len() + t.storage.key.len()
        }
        Value::Storage(s) => s.key.len(),
        Value::NumpyScalar { .. } => std::mem::size_of::<Value>(),
        Value::NumpyDtype { code, byteorder } => code.len() + byteorder.len(),
        _ => 0,
    }
}

/// A dict key as a path component of a limit error.
fn key_label(k: &Value) -> String {
    match k {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => format!("<{}>", other.type_name()),
    }
}

/// Interpret a GLOBAL by name only (nothing is imported).
fn global(module: String, name: String) -> Value {
    if module == "torch.storage" && name == "UntypedStorage" {
        // Bytes; `_rebuild_tensor_v3` says what they hold (torch ≥ 2.x for dtypes without a
        // typed storage class: uint16/32/64, float8, …).
        return Value::StorageType(DType::U8);
    }
    if module == "torch" {
        if let Some(d) = is_dtype_name(&name) {
            return Value::Dtype(d);
        }
        if let Some(d) = DType::from_storage_class(&name) {
            return Value::StorageType(d);
        }
    }
    Value::Global { module, name }
}

/// A decimal integer literal as minimal little-endian two's-complement bytes (LONG1's encoding).
fn long_from_decimal(s: &str) -> Option<Vec<u8>> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    // Magnitude in base 2^32, least significant limb first.
    let mut limbs: Vec<u32> = vec![0];
    for c in digits.bytes() {
        let mut carry = (c - b'0') as u64;
        for l in limbs.iter_mut() {
            let v = *l as u64 * 10 + carry;
            *l = v as u32;
            carry = v >> 32;
        }
        if carry != 0 {
            limbs.push(carry as u32);
        }
    }
    let mut bytes: Vec<u8> = limbs.iter().flat_map(|l| l.to_le_bytes()).collect();
    if neg {
        // Two's complement: invert and add one.
        let mut carry = 1u16;
        for b in bytes.iter_mut() {
            let v = (!*b) as u16 + carry;
            *b = v as u8;
            carry = v >> 8;
        }
        bytes.push(0xff);
    } else {
        bytes.push(0);
    }
    // Drop redundant sign bytes.
    while bytes.len() > 1 {
        let (last, prev) = (bytes[bytes.len() - 1], bytes[bytes.len() - 2]);
        if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
            bytes.pop();
        } else {
            break;
        }
    }
    Some(bytes)
}

fn decode_long(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    if b.len() <= 8 {
        let neg = b[b.len() - 1] & 0x80 != 0;
        let mut buf = if neg { [0xffu8; 8] } else { [0u8; 8] };
        buf[..b.len()].copy_from_slice(b);
        return Value::Int(i64::from_le_bytes(buf));
    }
    Value::BigInt(b.to_vec())
}

fn decode_numpy_scalar(code: &str, byteorder: &str, b: &[u8]) -> Option<Value> {
    let big = byteorder == ">";
    macro_rules! num {
        ($t:ty, $wrap:expr) => {{
            let arr: [u8; std::mem::size_of::<$t>()] = b.try_into().ok()?;
            let v = if big {
                <$t>::from_be_bytes(arr)
            } else {
                <$t>::from_le_bytes(arr)
            };
            Some($wrap(v))
        }};
    }
    match code {
        "f8" => num!(f64, Value::Float),
        "f4" => num!(f32, |v: f32| Value::Float(v as f64)),
        "i8" => num!(i64, Value::Int),
        "i4" => num!(i32, |v: i32| Value::Int(v as i64)),
        "i2" => num!(i16, |v: i16| Value::Int(v as i64)),
        "i1" => num!(i8, |v: i8| Value::Int(v as i64)),
        "u1" => num!(u8, |v: u8| Value::Int(v as i64)),
        "u2" => num!(u16, |v: u16| Value::Int(v as i64)),
        "u4" => num!(u32, |v: u32| Value::Int(v as i64)),
        "b1" => b.first().map(|&x| Value::Bool(x != 0)),
        _ => None,
    }
}

/// Decode Python's raw-unicode-escape (latin-1 bytes plus `\uXXXX` / `\UXXXXXXXX`).
fn raw_unicode_escape(b: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() && (b[i + 1] == b'u' || b[i + 1] == b'U') {
            let n = if b[i + 1] == b'u' { 4 } else { 8 };
            let hex = std::str::from_utf8(b.get(i + 2..i + 2 + n)?).ok()?;
            out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
            i += 2 + n;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Value> {
        let mut no = |_: Value, pos: usize| -> Result<Value> {
            Err(Error::PickleUnsupported {
                pos,
                name: "persistent id",
            })
        };
        unpickle(bytes, &mut no, &Limits::default()).map(|u| u.value)
    }

    #[test]
    fn memoised_list_is_shared_after_appends() {
        // ( ]q\x00 h\x00 K\x01 a ... ) : a list memoised empty, fetched again after APPEND.
        // pickle.dumps([l := [], l]) then l.append(1) — hand-assembled:
        // PROTO 2, EMPTY_LIST, BINPUT 0, EMPTY_LIST, BINPUT 1, APPEND, BINGET 1, ... simpler:
        // [[1], same] : ] q0 ( ] q1 K1 a h1 e .
        let p = b"\x80\x02]q\x00(]q\x01K\x01ah\x01e.";
        let v = run(p).unwrap();
        assert_eq!(
            v,
            Value::List(vec![
                Value::List(vec![Value::Int(1)]),
                Value::List(vec![Value::Int(1)])
            ])
        );
    }

    #[test]
    fn children_of_shared_nodes_are_copied_not_moved() {
        // a = [[1]]; [a, a]: the inner [1] has one reference but is expanded twice.
        let p = b"\x80\x02]q\x00(]q\x01]q\x02K\x01aah\x01e.";
        let a = Value::List(vec![Value::List(vec![Value::Int(1)])]);
        assert_eq!(run(p).unwrap(), Value::List(vec![a.clone(), a]));
    }

    #[test]
    fn recursive_list_is_a_limit_error() {
        // l = []; l.append(l)
        let p = b"\x80\x02]q\x00h\x00a.";
        match run(p) {
            Err(Error::Limit { what, .. }) => assert!(what.contains("nesting")),
            other => panic!("expected limit error, got {other:?}"),
        }
    }

    #[test]
    fn long1_negative_and_big() {
        assert_eq!(run(b"\x80\x02\x8a\x01\xff.").unwrap(), Value::Int(-1));
        assert_eq!(run(b"\x80\x02\x8a\x00.").unwrap(), Value::Int(0));
        assert_eq!(
            run(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.").unwrap(),
            Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 1])
        );
    }

    #[test]
    fn raw_unicode_escape_decodes() {
        assert_eq!(raw_unicode_escape(b"a\\u00e9b").unwrap(), "a\u{e9}b");
    }
}
