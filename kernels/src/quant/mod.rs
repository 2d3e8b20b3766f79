//! GGML tensor element types as stored in GGUF files: block layouts, sizes, and the scalar reference
//! (de)quantizers. Layouts follow ggml's `ggml-common.h`; every block struct has a compile-time size check.
//!
//! A quantized row of `n` elements is `n / block_size` consecutive blocks; rows are stored back to back.
//! Dequantization here is the *reference*: it must equal the official `gguf` Python package's `dequantize`
//! bit for bit, and the quantizers follow ggml's `quantize_row_*_ref` in `ggml-quants.c` (no importance
//! matrix), which is what `gguf.quants.quantize` mirrors for the types it can write.
//!
//! Files: `block` (the block trait and row drivers), `float` (F32/F16/BF16), `legacy` (Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0), `k_quants` (Q2_K..Q6_K layouts, dequantization, packing) and `k_search` (the scale searches the
//! k-quant quantizers share). SIMD kernels will be siblings of these files and are tested against them.

use thiserror::Error;

mod block;
mod float;
mod k_quants;
mod k_search;
mod legacy;

pub use block::Block;
// Shared with the CPU kernels (activation quantizers), which must round exactly as ggml does.
pub(crate) use float::{bf16_bits_to_f32, f16_to_f32, f32_to_bf16_bits};
pub use k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, K_SCALE_SIZE, QK_K, get_scale_min_k4,
};
pub(crate) use k_search::nearest_int;
pub use legacy::{
    BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, QK4_0, QK4_1, QK5_0, QK5_1, QK8_0,
};

/// Element type of a tensor, with the numeric ids GGUF uses on disk (`ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    BF16,
}

/// Errors from type lookup and (de)quantization.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum QuantError {
    /// A GGUF type id that Tessera does not support (known ggml name given when there is one).
    #[error("unsupported tensor type {name} (ggml type id {id}); supported: {supported}")]
    UnsupportedType {
        id: u32,
        name: &'static str,
        supported: &'static str,
    },
    /// Element count is not a multiple of the block size.
    #[error("{ty:?} needs a multiple of {block} elements, got {n}")]
    NotBlockAligned {
        ty: GgmlType,
        block: usize,
        n: usize,
    },
    /// Byte buffer length does not match the element count.
    #[error("{ty:?}: {n} elements need {expected} bytes, got {got}")]
    WrongByteLength {
        ty: GgmlType,
        n: usize,
        expected: usize,
        got: usize,
    },
    /// The type has no quantizer in Tessera.
    #[error("no quantizer for {0:?}")]
    NoQuantizer(GgmlType),
    /// The byte count of `n` elements does not fit in `usize` (a corrupt or hostile shape).
    #[error("{ty:?}: {n} elements need more bytes than fit in memory")]
    SizeOverflow { ty: GgmlType, n: usize },
}

pub const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

impl GgmlType {
    pub const ALL: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// Maps a GGUF on-disk type id; unknown or unsupported ids are refused with the ggml name when known.
    pub fn from_id(id: u32) -> Result<Self, QuantError> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            30 => Self::BF16,
            _ => {
                return Err(QuantError::UnsupportedType {
                    id,
                    name: ggml_type_name(id),
                    supported: SUPPORTED_TYPES,
                });
            }
        })
    }

    /// The GGUF on-disk type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::BF16 => 30,
        }
    }

    /// Parses a name as printed by llama.cpp (`Q4_K`, `q8_0`, `bf16`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    pub fn name(self) -> &'static str {
        ggml_type_name(self.id())
    }

    /// Elements per block (1 for plain float types).
    pub const fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub const fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
        }
    }

    /// Bytes needed for `n` elements, or an error when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Result<usize, QuantError> {
        let block = self.block_size();
        if !n.is_multiple_of(block) {
            return Err(QuantError::NotBlockAligned { ty: self, block, n });
        }
        (n / block)
            .checked_mul(self.type_size())
            .ok_or(QuantError::SizeOverflow { ty: self, n })
    }

    pub const fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Whether [`quantize_row`] can write this type.
    pub const fn has_quantizer(self) -> bool {
        // Every supported type has a reference quantizer today; kept so that a type added for reading only
        // (an IQ type, say) answers `NoQuantizer` instead of failing somewhere deeper.
        true
    }
}

/// Decodes one row of `dst.len()` elements of type `ty` from `src`.
///
/// `dst.len()` must be a whole number of blocks and `src` exactly the bytes those blocks take. Equals
/// `gguf.quants.dequantize` (and ggml's `dequantize_row_*`) bit for bit: same float operations in the same order.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_lengths(ty, dst.len(), src.len())?;
    match ty {
        GgmlType::F32 => float::dequantize_f32(src, dst),
        GgmlType::F16 => float::dequantize_f16(src, dst),
        GgmlType::BF16 => float::dequantize_bf16(src, dst),
        GgmlType::Q4_0 => block::dequantize_blocks::<BlockQ4_0, _, _>(src, dst),
        GgmlType::Q4_1 => block::dequantize_blocks::<BlockQ4_1, _, _>(src, dst),
        GgmlType::Q5_0 => block::dequantize_blocks::<BlockQ5_0, _, _>(src, dst),
        GgmlType::Q5_1 => block::dequantize_blocks::<BlockQ5_1, _, _>(src, dst),
        GgmlType::Q8_0 => block::dequantize_blocks::<BlockQ8_0, _, _>(src, dst),
        GgmlType::Q2_K => block::dequantize_blocks::<BlockQ2K, _, _>(src, dst),
        GgmlType::Q3_K => block::dequantize_blocks::<BlockQ3K, _, _>(src, dst),
        GgmlType::Q4_K => block::dequantize_blocks::<BlockQ4K, _, _>(src, dst),
        GgmlType::Q5_K => block::dequantize_blocks::<BlockQ5K, _, _>(src, dst),
        GgmlType::Q6_K => block::dequantize_blocks::<BlockQ6K, _, _>(src, dst),
    }
    Ok(())
}

/// Quantizes `src` (a whole number of blocks) to type `ty`, appending the blocks to `dst`.
///
/// Follows ggml's `quantize_row_*_ref` without an importance matrix. F32/F16/BF16 and the legacy types are
/// byte-identical to `gguf.quants.quantize`; the k-quants to ggml's C reference built without FMA contraction
/// (as x86-64 builds of ggml-base are; gguf-py has no k-quant quantizer). On error nothing is appended.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut Vec<u8>) -> Result<(), QuantError> {
    if !ty.has_quantizer() {
        return Err(QuantError::NoQuantizer(ty));
    }
    let bytes = ty.bytes_for(src.len())?;
    dst.reserve(bytes);
    match ty {
        GgmlType::F32 => float::quantize_f32(src, dst),
        GgmlType::F16 => float::quantize_f16(src, dst),
        GgmlType::BF16 => float::quantize_bf16(src, dst),
        GgmlType::Q4_0 => block::quantize_blocks::<BlockQ4_0, _, _>(src, dst),
        GgmlType::Q4_1 => block::quantize_blocks::<BlockQ4_1, _, _>(src, dst),
        GgmlType::Q5_0 => block::quantize_blocks::<BlockQ5_0, _, _>(src, dst),
        GgmlType::Q5_1 => block::quantize_blocks::<BlockQ5_1, _, _>(src, dst),
        GgmlType::Q8_0 => block::quantize_blocks::<BlockQ8_0, _, _>(src, dst),
        GgmlType::Q2_K => block::quantize_blocks::<BlockQ2K, _, _>(src, dst),
        GgmlType::Q3_K => block::quantize_blocks::<BlockQ3K, _, _>(src, dst),
        GgmlType::Q4_K => block::quantize_blocks::<BlockQ4K, _, _>(src, dst),
        GgmlType::Q5_K => block::quantize_blocks::<BlockQ5K, _, _>(src, dst),
        GgmlType::Q6_K => block::quantize_blocks::<BlockQ6K, _, _>(src, dst),
    }
    Ok(())
}

fn check_lengths(ty: GgmlType, n: usize, got: usize) -> Result<(), QuantError> {
    let expected = ty.bytes_for(n)?;
    if got != expected {
        return Err(QuantError::WrongByteLength {
            ty,
            n,
            expected,
            got,
        });
    }
    Ok(())
}

/// ggml's name for a type id, also for the ids Tessera refuses, so that error messages say what the file has.
pub fn ggml_type_name(id: u32) -> &'static str {
    #[rustfmt::skip]
    const NAMES: [&str; 40] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K",
        "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
        "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "TQ1_0",
        "TQ2_0", "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}
