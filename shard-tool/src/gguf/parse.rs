//! The GGUF header parser: a forward-only cursor over a [`ByteSource`] that reads the structure laid out in
//! the [module doc](super), checking every claimed size against the bytes that remain before allocating.
//!
//! The cursor borrows 1 MiB windows of the map, so parsing a 128k-token vocabulary touches each byte once and
//! copies only the strings it keeps.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use tessera_kernels::quant::{GgmlType, QuantError};

use super::value::{Array, Value, ValueType};
use super::{DEFAULT_ALIGNMENT, GgufFile, GgufTensor, KEY_ALIGNMENT, MAGIC, MAX_DIMS};
use crate::error::{Error, Result};
use crate::source::ByteSource;
use crate::tensor::TensorDesc;

/// Bytes borrowed from the source at a time.
const CHUNK: u64 = 1 << 20;
/// The header (magic through tensor infos) may not exceed this: real ones are under 20 MiB (a 256k-token
/// vocabulary), and the cap bounds the memory a hostile file can make us allocate (at most ~3× this).
pub(crate) const MAX_HEADER_BYTES: u64 = 1 << 30;
/// Arrays nested deeper than this are refused (recursion bound).
const MAX_ARRAY_DEPTH: u32 = 16;
/// Elements reserved up front at most; vectors grow past it as elements are actually read.
const PREALLOC: u64 = 1 << 16;
/// Fewest bytes of one key-value pair (empty key, type, one-byte value) and one tensor info (empty name,
/// n_dims, type, offset).
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// Describes the field being read, for error messages; only called when reading it fails.
type What<'w> = &'w dyn Fn() -> String;

pub(super) fn parse(src: &ByteSource) -> Result<GgufFile> {
    let mut p = Parser {
        src,
        path: src.path(),
        pos: 0,
        buf: Cow::Borrowed(&[]),
        buf_start: 0,
    };
    p.magic()?;
    let version = p.version()?;
    let n_tensors = p.u64(&|| "header: tensor count".into())?;
    let n_kv = p.u64(&|| "header: metadata key-value count".into())?;
    p.check_claim(n_kv, MIN_KV_BYTES, &|| {
        format!("header: metadata key-value count {n_kv}")
    })?;
    p.check_claim(n_tensors, MIN_TENSOR_INFO_BYTES, &|| {
        format!("header: tensor count {n_tensors}")
    })?;

    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv.min(PREALLOC) as usize);
    let mut keys: HashMap<String, u64> = HashMap::new();
    for i in 0..n_kv {
        let key = p.string(&|| format!("metadata entry #{i}: key"))?;
        if let Some(first) = keys.insert(key.clone(), i) {
            return Err(p.err(format!(
                "metadata key `{key}` appears twice (entries #{first} and #{i})"
            )));
        }
        let what = || format!("metadata key `{key}`");
        let ty_id = p.u32(&|| format!("{}: value type", what()))?;
        let ty = ValueType::from_id(ty_id).ok_or_else(|| {
            p.err(format!(
                "{}: unknown value type id {ty_id} (valid: 0..=12)",
                what()
            ))
        })?;
        let value = p.value(ty, 0, &what)?;
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == KEY_ALIGNMENT) {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => {
                return Err(p.err(format!(
                    "metadata key `{KEY_ALIGNMENT}` is {v} ({}); it must be a power of two",
                    v.value_type()
                )));
            }
        },
    };

    let mut infos = Vec::with_capacity(n_tensors.min(PREALLOC) as usize);
    let mut names: HashMap<String, u64> = HashMap::new();
    for i in 0..n_tensors {
        let (desc, rel, size) = p.tensor_info(i)?;
        if let Some(first) = names.insert(desc.name.clone(), i) {
            return Err(p.err(format!(
                "tensor `{}` appears twice (tensor infos #{first} and #{i})",
                desc.name
            )));
        }
        if rel % alignment != 0 {
            return Err(p.err(format!(
                "tensor `{}`: data offset {rel} is not a multiple of the alignment {alignment}",
                desc.name
            )));
        }
        infos.push((desc, rel, size));
    }

    let data_offset = p.pos.checked_next_multiple_of(alignment).ok_or_else(|| {
        p.err(format!(
            "data section: aligning offset {} to {alignment} overflows",
            p.pos
        ))
    })?;
    let len = src.len();
    let mut tensors = Vec::with_capacity(infos.len());
    for (desc, rel, size) in infos {
        let range = data_offset
            .checked_add(rel)
            .and_then(|start| Some((start, start.checked_add(size)?)));
        match range {
            Some((offset, end)) if end <= len => tensors.push(GgufTensor { desc, offset, size }),
            _ => {
                return Err(p.err(format!(
                    "tensor `{}`: {size} bytes at data offset {rel} (data section starts at {data_offset}) run \
                     past the end of the file ({len} bytes): truncated?",
                    desc.name
                )));
            }
        }
    }
    check_overlaps(&tensors, p.path)?;
    Ok(GgufFile {
        version,
        alignment,
        metadata,
        tensors,
        data_offset,
    })
}

/// Refuses two tensors whose byte ranges intersect (empty tensors occupy nothing).
fn check_overlaps(tensors: &[GgufTensor], path: &Path) -> Result<()> {
    let mut order: Vec<&GgufTensor> = tensors.iter().filter(|t| t.size > 0).collect();
    order.sort_by_key(|t| t.offset);
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.offset + a.size > b.offset {
            return Err(Error::malformed(
                path,
                format!(
                    "tensors `{}` (bytes {}..{}) and `{}` (bytes {}..{}) overlap",
                    a.desc.name,
                    a.offset,
                    a.offset + a.size,
                    b.desc.name,
                    b.offset,
                    b.offset + b.size
                ),
            ));
        }
    }
    Ok(())
}

struct Parser<'a> {
    src: &'a ByteSource,
    path: &'a Path,
    /// Next byte to read.
    pos: u64,
    /// Bytes `[buf_start, buf_start + buf.len())` of the source.
    buf: Cow<'a, [u8]>,
    buf_start: u64,
}

impl<'a> Parser<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::malformed(self.path, msg)
    }

    /// Bytes the rest of the header may still occupy.
    fn room(&self) -> u64 {
        self.src
            .len()
            .min(MAX_HEADER_BYTES)
            .saturating_sub(self.pos)
    }

    /// Refuses `count` items of at least `min_bytes` each when they cannot fit in the rest of the header.
    fn check_claim(&self, count: u64, min_bytes: u64, what: What) -> Result<()> {
        let room = self.room();
        match count.checked_mul(min_bytes) {
            Some(need) if need <= room => Ok(()),
            _ => Err(self.err(format!(
                "{}: needs at least {min_bytes} bytes each, but only {room} bytes of header remain \
                 (corrupt or truncated file?)",
                what()
            ))),
        }
    }

    /// The next `n` bytes.
    fn take(&mut self, n: u64, what: What) -> Result<&[u8]> {
        let len = self.src.len();
        let end = match self.pos.checked_add(n) {
            Some(end) if end <= len.min(MAX_HEADER_BYTES) => end,
            _ => {
                let limit = if len > MAX_HEADER_BYTES {
                    " (GGUF headers are limited to 1 GiB)"
                } else {
                    ""
                };
                return Err(self.err(format!(
                    "{}: needs {n} bytes at offset {}, but the file ends at {len}{limit}: truncated?",
                    what(),
                    self.pos
                )));
            }
        };
        if end > self.buf_start + self.buf.len() as u64 {
            let want = n.max(CHUNK).min(len - self.pos);
            self.buf = self.src.read(self.pos, want)?;
            self.buf_start = self.pos;
        }
        let lo = (self.pos - self.buf_start) as usize;
        self.pos = end;
        Ok(&self.buf[lo..lo + n as usize])
    }

    fn arr<const N: usize>(&mut self, what: What) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: What) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: What) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn magic(&mut self) -> Result<()> {
        let head_len = self.src.len().min(64 * 1024);
        let head = self.src.read(0, head_len)?;
        if head.starts_with(&MAGIC) {
            self.pos = 4;
            return Ok(());
        }
        if let Some(refusal) = crate::pickle::detect_refused_format(self.path, &head) {
            return Err(refusal);
        }
        if head.len() < 4 {
            return Err(self.err(format!(
                "file is {} bytes, too short for a GGUF header",
                head.len()
            )));
        }
        Err(self.err(format!(
            "not a GGUF file: it starts with {:?}, expected \"GGUF\"",
            String::from_utf8_lossy(&head[..4])
        )))
    }

    fn version(&mut self) -> Result<u32> {
        let v = self.u32(&|| "header: version".into())?;
        let unsupported = |msg: String| Error::Unsupported {
            path: self.path.to_owned(),
            msg,
        };
        match v {
            2 | 3 => Ok(v),
            1 => Err(unsupported(
                "GGUF version 1 (2023, 32-bit counts) is not supported; re-convert the model with a current \
                 llama.cpp (convert_hf_to_gguf.py)"
                    .into(),
            )),
            0 => Err(self.err("header: version is 0")),
            _ if v & 0xffff == 0 => Err(unsupported(format!(
                "big-endian GGUF (version {}) is not supported; convert it with gguf-py: \
                 `gguf-convert-endian FILE little`",
                v.swap_bytes()
            ))),
            _ => Err(unsupported(format!("GGUF version {v} is newer than this reader (versions 2 and 3)"))),
        }
    }

    fn string(&mut self, what: What) -> Result<String> {
        let n = self.u64(&|| format!("{}: string length", what()))?;
        let room = self.room();
        if n > room {
            return Err(self.err(format!(
                "{}: string length {n} is more than the {room} bytes left in the header (corrupt file?)",
                what()
            )));
        }
        let decoded = std::str::from_utf8(self.take(n, what)?)
            .map(str::to_owned)
            .map_err(|e| e.valid_up_to());
        decoded.map_err(|at| {
            self.err(format!(
                "{}: string is not valid UTF-8 (at byte {at})",
                what()
            ))
        })
    }

    fn bool(&mut self, what: What) -> Result<bool> {
        match self.arr::<1>(what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(format!("{}: bool byte is {b}, expected 0 or 1", what()))),
        }
    }

    fn value(&mut self, ty: ValueType, depth: u32, what: What) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.arr(what)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.arr(what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.arr(what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            ValueType::Bool => Value::Bool(self.bool(what)?),
            ValueType::String => Value::String(self.string(what)?),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.arr(what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            ValueType::Array => Value::Array(self.array(depth, what)?),
        })
    }

    /// Element type, count and elements of an array.
    fn array(&mut self, depth: u32, what: What) -> Result<Array> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.err(format!(
                "{}: arrays nested more than {MAX_ARRAY_DEPTH} deep",
                what()
            )));
        }
        let ty_id = self.u32(&|| format!("{}: array element type", what()))?;
        let ty = ValueType::from_id(ty_id).ok_or_else(|| {
            self.err(format!(
                "{}: unknown array element type id {ty_id} (valid: 0..=12)",
                what()
            ))
        })?;
        let n = self.u64(&|| format!("{}: array length", what()))?;
        self.check_claim(n, ty.min_size(), &|| {
            format!("{}: array of {n} {ty} elements", what())
        })?;
        let elem = |i: u64| move || format!("{}: array element {i}", what());

        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                const SIZE: usize = std::mem::size_of::<$t>();
                let bytes = self.take(n * SIZE as u64, what)?;
                Array::$variant(
                    bytes
                        .chunks_exact(SIZE)
                        .map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or_default()))
                        .collect(),
                )
            }};
        }
        Ok(match ty {
            ValueType::U8 => Array::U8(self.take(n, what)?.to_vec()),
            ValueType::I8 => fixed!(I8, i8),
            ValueType::U16 => fixed!(U16, u16),
            ValueType::I16 => fixed!(I16, i16),
            ValueType::U32 => fixed!(U32, u32),
            ValueType::I32 => fixed!(I32, i32),
            ValueType::F32 => fixed!(F32, f32),
            ValueType::U64 => fixed!(U64, u64),
            ValueType::I64 => fixed!(I64, i64),
            ValueType::F64 => fixed!(F64, f64),
            ValueType::Bool => {
                let bytes = self.take(n, what)?;
                let bad = bytes.iter().position(|&b| b > 1);
                let v = bytes.iter().map(|&b| b == 1).collect();
                if let Some(i) = bad {
                    return Err(self.err(format!("{}: bool byte is not 0 or 1", elem(i as u64)())));
                }
                Array::Bool(v)
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n.min(PREALLOC) as usize);
                for i in 0..n {
                    v.push(self.string(&elem(i))?);
                }
                Array::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n.min(PREALLOC) as usize);
                for i in 0..n {
                    v.push(self.array(depth + 1, &elem(i))?);
                }
                Array::Array(v)
            }
        })
    }

    /// Tensor info #`i`: its description, relative data offset and byte size.
    fn tensor_info(&mut self, i: u64) -> Result<(TensorDesc, u64, u64)> {
        let name = self.string(&|| format!("tensor info #{i}: name"))?;
        let what = || format!("tensor `{name}`");
        let n_dims = self.u32(&|| format!("{}: number of dimensions", what()))?;
        if n_dims as usize > MAX_DIMS {
            return Err(self.err(format!(
                "{}: {n_dims} dimensions, at most {MAX_DIMS} allowed",
                what()
            )));
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let ne = self.u64(&|| format!("{}: dimension {d}", what()))?;
            if ne > i64::MAX as u64 {
                return Err(self.err(format!(
                    "{}: dimension {d} is {ne}, more than int64 max",
                    what()
                )));
            }
            shape.push(ne);
        }
        let ty_id = self.u32(&|| format!("{}: type", what()))?;
        let ty = GgmlType::from_id(ty_id).map_err(|source| Error::Tensor {
            path: self.path.to_owned(),
            tensor: name.clone(),
            source,
        })?;
        let rel = self.u64(&|| format!("{}: data offset", what()))?;

        let overflow = || {
            self.err(format!(
                "{}: shape {shape:?} of type {} is too large",
                what(),
                ty.name()
            ))
        };
        // The product of all dimensions, zeros counted as ones, fits in an int64: then no partial product
        // (elements, rows, `TensorDesc::n_rows`) can overflow, even for an empty tensor like [0, 2^40, 2^40].
        let bound = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d.max(1)))
            .ok_or_else(overflow)?;
        if bound > i64::MAX as u64 {
            return Err(overflow());
        }
        let ne0 = shape.first().copied().unwrap_or(1);
        let block = ty.block_size() as u64;
        if ne0 % block != 0 {
            let source = QuantError::NotBlockAligned {
                ty,
                block: block as usize,
                n: ne0 as usize,
            };
            return Err(Error::Tensor {
                path: self.path.to_owned(),
                tensor: name,
                source,
            });
        }
        let rows: u64 = shape.iter().skip(1).product();
        let size = (ne0 / block)
            .checked_mul(ty.type_size() as u64)
            .and_then(|r| r.checked_mul(rows))
            .ok_or_else(overflow)?;
        Ok((TensorDesc::new(name, ty, shape), rel, size))
    }
}
