//! AVX2 + FMA + F16C kernels (Haswell / Zen 1 and later): the same files as `scalar`, each function the SIMD
//! twin of the scalar one with the same name. Entries without an AVX2 version keep the scalar one.
//! `packed::matmul` multiplies 16-row interleaved weights (`cpu::packed`) with the tiles of `packed` (legacy
//! quants), `packed_k` (Q4_K / Q6_K) and `packed_f` (floats); the AVX-512 level without VNNI inherits it.

pub(crate) mod act;
pub(crate) mod attention;
pub(crate) mod dot;
pub(crate) mod ops;
pub(crate) mod packed;
pub(crate) mod packed_f;
pub(crate) mod packed_k;

use super::isa::{Isa, Kernels};

/// The AVX2 table. Only called after `Isa::Avx2.is_available()`.
pub(crate) fn kernels() -> Kernels {
    let base = super::scalar::kernels();
    Kernels {
        isa: Isa::Avx2,
        dot: [
            dot::vec_dot_f32,
            dot::vec_dot_f16,
            dot::vec_dot_bf16,
            dot::vec_dot_q4_0_q8_0,
            dot::vec_dot_q4_1_q8_1,
            dot::vec_dot_q5_0_q8_0,
            dot::vec_dot_q5_1_q8_1,
            dot::vec_dot_q8_0_q8_0,
            dot::vec_dot_q2_k_q8_k,
            dot::vec_dot_q3_k_q8_k,
            dot::vec_dot_q4_k_q8_k,
            dot::vec_dot_q5_k_q8_k,
            dot::vec_dot_q6_k_q8_k,
        ],
        tile4x1: base.tile4x1,
        tile4x4: base.tile4x4,
        quantize: [
            base.quantize[0],
            act::convert_f16,
            act::convert_bf16,
            act::quantize_q8_0,
            act::quantize_q8_1,
            base.quantize[5],
        ],
        axpy_f16: dot::axpy_f16,
        packed: Some(packed::matmul),
        packed_types: packed::TYPES,
        attn_rows: Some(attention::attn_rows),
        silu_mul: ops::silu_mul,
        exp_sum: ops::exp_sum,
    }
}
