//! The [`Block`] trait every quantized block type implements, the row drivers built on it, and the
//! little-endian field reader/writer the block parsers use.
//!
//! Blocks sit unaligned and back to back in GGUF files (ggml's `ggml-common.h` structs are packed by
//! construction: every field is `uint8_t` or `ggml_half`), so a block is never read by casting a pointer:
//! it is parsed from a `&[u8; BYTES]` field by field and written back the same way. Row lengths are checked
//! once in `quant::dequantize_row` / `quant::quantize_row`; the drivers here only see whole blocks.

use half::f16;

/// One ggml block type: `BYTES` bytes on disk encoding `N` values.
///
/// `BYTES` and `N` equal `ty.type_size()` and `ty.block_size()` of its [`GgmlType`](super::GgmlType); each
/// implementation asserts that at compile time next to its struct.
pub trait Block<const BYTES: usize, const N: usize>: Sized {
    /// Parses a block from its little-endian on-disk bytes. Every bit pattern is a valid block.
    fn from_bytes(bytes: &[u8; BYTES]) -> Self;
    /// The block's on-disk bytes.
    fn to_bytes(&self) -> [u8; BYTES];
    /// Decodes the block's values, in ggml's element order.
    fn dequantize(&self, y: &mut [f32; N]);
    /// Encodes `N` values with ggml's reference quantizer for this type.
    fn quantize(x: &[f32; N]) -> Self;
}

/// Decodes whole blocks from `src` into `dst`; the caller has checked that the lengths match.
pub(crate) fn dequantize_blocks<B: Block<BYTES, N>, const BYTES: usize, const N: usize>(
    src: &[u8],
    dst: &mut [f32],
) {
    let (blocks, rest) = src.as_chunks::<BYTES>();
    let (rows, rest_out) = dst.as_chunks_mut::<N>();
    debug_assert!(rest.is_empty() && rest_out.is_empty() && blocks.len() == rows.len());
    for (bytes, y) in blocks.iter().zip(rows) {
        B::from_bytes(bytes).dequantize(y);
    }
}

/// Quantizes whole blocks of `src`, appending them to `dst`; the caller has checked that `src` is aligned.
pub(crate) fn quantize_blocks<B: Block<BYTES, N>, const BYTES: usize, const N: usize>(
    src: &[f32],
    dst: &mut Vec<u8>,
) {
    let (rows, rest) = src.as_chunks::<N>();
    debug_assert!(rest.is_empty());
    for x in rows {
        dst.extend_from_slice(&B::quantize(x).to_bytes());
    }
}

/// Reads consecutive little-endian fields from one block's bytes.
///
/// Field offsets are constants of the layout and the sizes are checked at compile time against the block
/// length, so a read past the end is a layout bug; it yields zeros (caught by the round-trip tests) instead
/// of panicking.
pub(crate) struct FieldReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> FieldReader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    pub(crate) fn array<const K: usize>(&mut self) -> [u8; K] {
        let mut out = [0u8; K];
        if let Some(src) = self.bytes.get(self.at..self.at + K) {
            out.copy_from_slice(src);
        }
        self.at += K;
        out
    }

    pub(crate) fn f16(&mut self) -> f16 {
        f16::from_le_bytes(self.array())
    }

    /// Whether every byte was consumed; the block parsers assert it in debug builds.
    pub(crate) fn is_done(&self) -> bool {
        self.at == self.bytes.len()
    }
}

/// Writes consecutive little-endian fields into one block's bytes (see [`FieldReader`] for why out-of-range
/// writes are dropped rather than panicking).
pub(crate) struct FieldWriter<const BYTES: usize> {
    bytes: [u8; BYTES],
    at: usize,
}

impl<const BYTES: usize> FieldWriter<BYTES> {
    pub(crate) fn new() -> Self {
        Self {
            bytes: [0u8; BYTES],
            at: 0,
        }
    }

    pub(crate) fn put(mut self, field: &[u8]) -> Self {
        if let Some(dst) = self.bytes.get_mut(self.at..self.at + field.len()) {
            dst.copy_from_slice(field);
        }
        self.at += field.len();
        self
    }

    pub(crate) fn f16(self, v: f16) -> Self {
        self.put(&v.to_le_bytes())
    }

    pub(crate) fn finish(self) -> [u8; BYTES] {
        debug_assert_eq!(
            self.at, BYTES,
            "block layout writes {} of {BYTES} bytes",
            self.at
        );
        self.bytes
    }
}
