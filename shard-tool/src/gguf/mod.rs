//! GGUF v2/v3 reading and writing, gguf-split sets, and the model config a GGUF file describes.
//!
//! Format reference: ggml's `ggml/include/gguf.h` and `ggml/src/gguf.cpp`, and the official Python package
//! `gguf` (`gguf_reader.py`, `gguf_writer.py`). All numbers are little-endian; a big-endian file (same magic,
//! version field reading as `0x0300_0000`) and version 1 (32-bit counts, dropped by llama.cpp in 2023) are
//! refused with a message saying how to convert them.
//!
//! On-disk structure, in file order:
//!
//! 1. Magic: the 4 bytes `"GGUF"`.
//! 2. Version (u32): 2 or 3. v2 widened v1's counts and string lengths to 64 bits; v3 only added big-endian
//!    files, so little-endian v2 and v3 files are laid out identically.
//! 3. Number of tensors (u64; gguf.h says int64).
//! 4. Number of metadata key-value pairs (u64).
//! 5. For each key-value pair:
//!    1. The key (string). Keys are unique; ours refuses duplicates.
//!    2. The value type (u32, [`ValueType`]: UINT8 0 … FLOAT64 12).
//!    3. If the type is ARRAY (9):
//!       1. the element type (u32; ARRAY again for nested arrays, which gguf-py reads and llama.cpp does not),
//!       2. the number of elements (u64),
//!       3. each element's encoding (a nested array repeats this step 3).
//!    4. Otherwise the value itself: fixed-size numbers little-endian, BOOL as one byte 0 or 1.
//! 6. For each tensor ("tensor info"):
//!    1. The name (string), unique in the file.
//!    2. The number of dimensions (u32, at most 4).
//!    3. Each dimension (u64; int64 in gguf.h, so < 2^63), ggml order: dimension 0 is contiguous.
//!    4. The element type (u32, `ggml_type`; see [`GgmlType::from_id`](tessera_kernels::quant::GgmlType)).
//!    5. The offset of its data, relative to the start of the data section (u64); a multiple of the alignment.
//! 7. Padding with zeros up to a multiple of the alignment: `general.alignment` (u32 metadata, a power of
//!    two) or 32 by default.
//! 8. The data section: each tensor's bytes at its offset (rows of whole quant blocks, `bytes_for(ne[0])` per
//!    row), tensors padded to the alignment. Writers place them in tensor-info order; readers must not rely
//!    on it.
//!
//! A string is a u64 byte length followed by that many UTF-8 bytes, with no terminator.
//!
//! Every count, length and offset is checked against the bytes left in the file before anything is allocated,
//! and all arithmetic on them is checked, so a corrupt or hostile file gets an error naming the field, never a
//! panic or an out-of-memory abort (`fuzz/` runs the parser on arbitrary bytes).

mod config;
mod parse;
mod split;
mod value;
mod writer;

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod tests;

use std::borrow::Cow;

pub use config::{model_config, model_config_from};
pub use split::{GgufPiece, GgufSet, SetTensor, byte_split_pieces, split_paths};
pub use value::{Array, Value, ValueType};
pub use writer::GgufWriter;

use crate::error::Result;
use crate::source::ByteSource;
use crate::tensor::TensorDesc;

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Alignment of the shards Tessera writes (cache lines and AVX-512 loads).
pub const SHARD_ALIGNMENT: u64 = 64;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// Metadata key holding the data alignment.
pub const KEY_ALIGNMENT: &str = "general.alignment";

/// A parsed GGUF header. Tensor data stays in the [`ByteSource`] it was parsed from.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    /// 2 or 3.
    pub version: u32,
    /// Data alignment in bytes (`general.alignment` or 32).
    pub alignment: u64,
    /// Key-value pairs in file order; keys are unique.
    pub metadata: Vec<(String, Value)>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensor>,
    /// Offset of the data section in the source (the end of the header, aligned).
    pub data_offset: u64,
}

/// One tensor's description and where its bytes are.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    pub desc: TensorDesc,
    /// Absolute offset of the first byte in the source (data section start + the stored relative offset).
    pub offset: u64,
    /// Bytes of data: `bytes_for(shape[0]) * rows`.
    pub size: u64,
}

impl GgufFile {
    /// Reads and validates the header of the GGUF file that `src` holds. See the module doc for the checks.
    pub fn parse(src: &ByteSource) -> Result<GgufFile> {
        parse::parse(src)
    }

    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.desc.name == name)
    }
}

impl GgufTensor {
    /// The tensor's bytes from the source its file was parsed from: borrowed from the map unless the tensor
    /// straddles two byte-split pieces.
    pub fn data<'a>(&self, src: &'a ByteSource) -> Result<Cow<'a, [u8]>> {
        src.read(self.offset, self.size)
    }
}
