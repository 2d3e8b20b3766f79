//! Portable scalar kernels: the reference every SIMD sibling (`avx2`, `avx512`) is tested against, and the
//! fallback on CPUs without them.

pub(crate) mod act;
pub(crate) mod dot;
pub(crate) mod ops;

use super::isa::{Isa, Kernels};

/// The scalar table: every entry filled.
pub(crate) fn kernels() -> Kernels {
    Kernels {
        isa: Isa::Scalar,
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
        tile4x1: [None; super::layout::N_TYPES],
        tile4x4: [None; super::layout::N_TYPES],
        quantize: [
            act::convert_f32,
            act::convert_f16,
            act::convert_bf16,
            act::quantize_q8_0,
            act::quantize_q8_1,
            act::quantize_q8_k,
        ],
        axpy_f16: dot::axpy_f16,
        packed: None,
        packed_types: &[],
        attn_rows: None,
        silu_mul: ops::silu_mul,
        exp_sum: ops::exp_sum,
    }
}
