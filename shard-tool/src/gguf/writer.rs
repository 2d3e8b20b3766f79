//! `GgufWriter`: streams a GGUF v3 file (shards, test fixtures) to any `std::io::Write`.
//!
//! The header (metadata and tensor infos with precomputed aligned offsets) is written at construction; tensor
//! bytes are then passed in tensor-info order, each padded to the alignment exactly as gguf-py's `GGUFWriter`
//! and llama.cpp's `gguf_write_to_file` do, so the output reads back in both. Nothing but the header is
//! buffered: a 100 GB shard streams through. Wrap files in a `BufWriter`.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

use super::value::{Value, encode_str};
use super::{KEY_ALIGNMENT, MAGIC, MAX_DIMS};
use crate::error::{Error, Result};
use crate::tensor::TensorDesc;

/// Zeros for padding (alignment is at most this large in practice; larger pads loop).
const ZEROS: [u8; 4096] = [0; 4096];

/// Streaming GGUF writer. See the module doc.
pub struct GgufWriter<W: Write> {
    out: W,
    path: PathBuf,
    alignment: u64,
    data_offset: u64,
    /// Each tensor with its offset relative to the data section and its byte size.
    tensors: Vec<(TensorDesc, u64, u64)>,
    /// Index of the next tensor `write_tensor` expects.
    next: usize,
    /// Bytes written so far.
    pos: u64,
    /// The tensor being streamed (index, bytes written so far).
    current: Option<(usize, u64)>,
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header of a file holding `metadata` (in order; `general.alignment` is set to `alignment`,
    /// replacing any value given) and `tensors` (in order). `path` names the output in error messages.
    pub fn new(
        out: W,
        path: impl Into<PathBuf>,
        mut metadata: Vec<(String, Value)>,
        tensors: Vec<TensorDesc>,
        alignment: u64,
    ) -> Result<Self> {
        let path = path.into();
        let err = |msg: String| Error::malformed(&path, msg);
        if !alignment.is_power_of_two() || alignment > u32::MAX as u64 {
            return Err(err(format!(
                "alignment {alignment} must be a power of two that fits in a u32"
            )));
        }
        let align_value = Value::U32(alignment as u32);
        match metadata.iter_mut().find(|(k, _)| k == KEY_ALIGNMENT) {
            Some((_, v)) => *v = align_value,
            None => metadata.push((KEY_ALIGNMENT.to_owned(), align_value)),
        }
        let mut seen = HashSet::new();
        if let Some((k, _)) = metadata.iter().find(|(k, _)| !seen.insert(k.as_str())) {
            return Err(err(format!("metadata key `{k}` given twice")));
        }

        let mut layout = Vec::with_capacity(tensors.len());
        let mut names = HashSet::new();
        let mut rel = 0u64;
        for desc in tensors {
            if !names.insert(desc.name.clone()) {
                return Err(err(format!("tensor `{}` given twice", desc.name)));
            }
            if desc.shape.len() > MAX_DIMS {
                return Err(err(format!(
                    "tensor `{}`: {} dimensions, at most {MAX_DIMS}",
                    desc.name,
                    desc.shape.len()
                )));
            }
            let size = desc.n_bytes().map_err(|source| Error::Tensor {
                path: path.clone(),
                tensor: desc.name.clone(),
                source,
            })?;
            let next = rel
                .checked_add(size)
                .and_then(|end| end.checked_next_multiple_of(alignment));
            let Some(next) = next else {
                return Err(err(format!(
                    "tensor `{}`: data section size overflows",
                    desc.name
                )));
            };
            layout.push((desc, rel, size));
            rel = next;
        }

        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(layout.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in &metadata {
            encode_str(&mut header, key);
            header.extend_from_slice(&value.value_type().id().to_le_bytes());
            value.encode(&mut header);
        }
        for (desc, rel, _) in &layout {
            encode_str(&mut header, &desc.name);
            header.extend_from_slice(&(desc.shape.len() as u32).to_le_bytes());
            for &d in &desc.shape {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&desc.ty.id().to_le_bytes());
            header.extend_from_slice(&rel.to_le_bytes());
        }
        let data_offset = (header.len() as u64).next_multiple_of(alignment);
        header.resize(data_offset as usize, 0);

        let mut w = GgufWriter {
            out,
            path,
            alignment,
            data_offset,
            tensors: layout,
            next: 0,
            pos: 0,
            current: None,
        };
        w.put(&header)?;
        Ok(w)
    }

    /// Offset of the data section in the output.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Each tensor with its absolute offset in the output and its byte size, in write order.
    pub fn layout(&self) -> impl Iterator<Item = (&TensorDesc, u64, u64)> {
        self.tensors
            .iter()
            .map(|(d, rel, size)| (d, self.data_offset + rel, *size))
    }

    /// Size the finished file will have.
    pub fn total_size(&self) -> u64 {
        match self.tensors.last() {
            Some((_, rel, size)) => {
                self.data_offset + (rel + size).next_multiple_of(self.alignment)
            }
            None => self.data_offset,
        }
    }

    /// Writes the bytes of tensor `name`, which must be the next one in order and exactly its size.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_tensor_parts(name, [bytes])
    }

    /// Writes tensor `name` from several pieces (the column slices of a row-parallel split, one per row),
    /// concatenated; their total must be the tensor's size.
    pub fn write_tensor_parts<'b>(
        &mut self,
        name: &str,
        parts: impl IntoIterator<Item = &'b [u8]>,
    ) -> Result<()> {
        self.begin_tensor(name)?;
        for part in parts {
            self.write_chunk(part)?;
        }
        self.end_tensor()
    }

    /// Starts tensor `name`, which must be the next one in order; its bytes follow in any number of
    /// [`write_chunk`](Self::write_chunk) calls, closed by [`end_tensor`](Self::end_tensor). Lets a caller
    /// stream a tensor larger than memory.
    pub fn begin_tensor(&mut self, name: &str) -> Result<()> {
        if let Some((i, _)) = self.current {
            let open = self.tensors[i].0.name.clone();
            return Err(self.misuse(format!("begin_tensor(`{name}`): tensor `{open}` not ended")));
        }
        let Some((desc, rel, _)) = self.tensors.get(self.next) else {
            return Err(self.misuse(format!(
                "write_tensor(`{name}`): all {} tensors already written",
                self.next
            )));
        };
        if desc.name != name {
            return Err(self.misuse(format!(
                "write_tensor(`{name}`): expected tensor `{}` next",
                desc.name
            )));
        }
        let start = self.data_offset + rel;
        self.pad_to(start)?;
        self.current = Some((self.next, 0));
        Ok(())
    }

    /// Appends bytes to the tensor begun last.
    pub fn write_chunk(&mut self, bytes: &[u8]) -> Result<()> {
        let Some((i, written)) = self.current else {
            return Err(self.misuse("write_chunk(): no tensor begun".into()));
        };
        let (desc, _, size) = &self.tensors[i];
        let total = written + bytes.len() as u64;
        if total > *size {
            let msg = format!(
                "write_tensor(`{}`): more than its {size} bytes given",
                desc.name
            );
            return Err(self.misuse(msg));
        }
        self.put(bytes)?;
        self.current = Some((i, total));
        Ok(())
    }

    /// Ends the current tensor; its bytes must be complete.
    pub fn end_tensor(&mut self) -> Result<()> {
        let Some((i, written)) = self.current.take() else {
            return Err(self.misuse("end_tensor(): no tensor begun".into()));
        };
        let (desc, _, size) = &self.tensors[i];
        if written != *size {
            let msg = format!(
                "write_tensor(`{}`): {written} bytes given, its size is {size}",
                desc.name
            );
            return Err(self.misuse(msg));
        }
        self.next += 1;
        Ok(())
    }

    /// Pads the last tensor, flushes, and returns the writer; fails if a tensor was not written.
    pub fn finish(mut self) -> Result<W> {
        if self.current.is_some() {
            return Err(self.misuse("finish(): a tensor was begun but not ended".into()));
        }
        if let Some((desc, _, _)) = self.tensors.get(self.next) {
            let msg = format!(
                "finish(): tensor `{}` and {} more not written",
                desc.name,
                self.tensors.len() - self.next - 1
            );
            return Err(self.misuse(msg));
        }
        self.pad_to(self.total_size())?;
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.out)
    }

    fn misuse(&self, msg: String) -> Error {
        Error::malformed(&self.path, format!("GGUF writer: {msg}"))
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, target: u64) -> Result<()> {
        while self.pos < target {
            let n = (target - self.pos).min(ZEROS.len() as u64) as usize;
            self.put(&ZEROS[..n])?;
        }
        Ok(())
    }
}
