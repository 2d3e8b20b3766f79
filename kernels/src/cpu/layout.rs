//! The activation formats matmul quantizes `x` into (ggml's `vec_dot_type` of each weight type) and their
//! byte layouts, which are ggml's: `block_q8_0` (f16 `d`, 32 × i8), `block_q8_1` (f16 `d`, f16 `s = d·Σq`,
//! 32 × i8) and `block_q8_K` (f32 `d`, 256 × i8, 16 × i16 sums of 16 quants), all little-endian, back to back.

use crate::quant::GgmlType;

pub(crate) const Q8_0_BYTES: usize = 34;
pub(crate) const Q8_1_BYTES: usize = 36;
pub(crate) const Q8_K_BYTES: usize = 4 + 256 + 32;

/// The type activations are converted to before a dot product with weights of a given type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum VecDotType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q8_1,
    Q8_K,
}

impl VecDotType {
    pub const ALL: [VecDotType; 6] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q8_0,
        Self::Q8_1,
        Self::Q8_K,
    ];

    /// ggml's `type_traits_cpu[ty].vec_dot_type`.
    pub const fn of(ty: GgmlType) -> Self {
        match ty {
            GgmlType::F32 => Self::F32,
            GgmlType::F16 => Self::F16,
            GgmlType::BF16 => Self::BF16,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Self::Q8_0,
            GgmlType::Q4_1 | GgmlType::Q5_1 => Self::Q8_1,
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
                Self::Q8_K
            }
        }
    }

    pub const fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q8_K => 256,
        }
    }

    pub const fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q8_0 => Q8_0_BYTES,
            Self::Q8_1 => Q8_1_BYTES,
            Self::Q8_K => Q8_K_BYTES,
        }
    }

    /// Bytes of `n` values (`n` a multiple of the block size; the caller checks).
    pub const fn bytes_for(self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }

    pub(crate) const fn slot(self) -> usize {
        self as usize
    }
}

/// Index of a weight type in the per-ISA dispatch tables.
pub(crate) const fn type_slot(ty: GgmlType) -> usize {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::BF16 => 2,
        GgmlType::Q4_0 => 3,
        GgmlType::Q4_1 => 4,
        GgmlType::Q5_0 => 5,
        GgmlType::Q5_1 => 6,
        GgmlType::Q8_0 => 7,
        GgmlType::Q2_K => 8,
        GgmlType::Q3_K => 9,
        GgmlType::Q4_K => 10,
        GgmlType::Q5_K => 11,
        GgmlType::Q6_K => 12,
    }
}

pub(crate) const N_TYPES: usize = 13;
