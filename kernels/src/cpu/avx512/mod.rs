//! AVX-512 kernels: float tiles (F/BW/VL/DQ level) and, at the VNNI level, `vpdpbusd` tiles for the legacy
//! quantized types and `vdpbf16ps` for BF16 where AVX512-BF16 is present. Files mirror `scalar`; entries
//! without an AVX-512 version keep the AVX2 one (the k-quants, for now). `packed` multiplies 16-row
//! interleaved Q4_0 / Q4_1 / Q8_0 weights, `packed_k` Q4_K / Q6_K (`cpu::packed`).

pub(crate) mod act;
pub(crate) mod attention;
pub(crate) mod dot;
pub(crate) mod ops;
pub(crate) mod packed;
pub(crate) mod packed_f;
pub(crate) mod packed_k;

use super::isa::{Isa, Kernels, TileFn};
use super::layout::type_slot;
use crate::quant::GgmlType;

/// The AVX-512 table, with VNNI kernels when `vnni`. Only called after the level was detected.
pub(crate) fn kernels(vnni: bool) -> Kernels {
    let mut k = super::avx2::kernels();
    k.isa = if vnni { Isa::Avx512Vnni } else { Isa::Avx512 };
    k.silu_mul = ops::silu_mul;
    k.exp_sum = ops::exp_sum;
    k.attn_rows = Some(attention::attn_rows);
    k.quantize[super::layout::VecDotType::Q8_K.slot()] = act::quantize_q8_k;
    let mut set = |ty: GgmlType, dot: super::isa::DotFn, t41: TileFn, t44: TileFn| {
        let s = type_slot(ty);
        k.dot[s] = dot;
        k.tile4x1[s] = Some(t41);
        k.tile4x4[s] = Some(t44);
    };
    set(GgmlType::F32, dot::vec_dot_f32, dot::f32_4x1, dot::f32_4x4);
    set(GgmlType::F16, dot::vec_dot_f16, dot::f16_4x1, dot::f16_4x4);
    if vnni && is_x86_feature_detected!("avx512bf16") {
        set(
            GgmlType::BF16,
            dot::vec_dot_bf16_dp,
            dot::bf16_dp_4x1,
            dot::bf16_dp_4x4,
        );
    } else {
        set(
            GgmlType::BF16,
            dot::vec_dot_bf16,
            dot::bf16_4x1,
            dot::bf16_4x4,
        );
    }
    if vnni {
        set(
            GgmlType::Q4_0,
            dot::vec_dot_q4_0_q8_0,
            dot::q4_0_q8_0_4x1,
            dot::q4_0_q8_0_4x4,
        );
        set(
            GgmlType::Q4_1,
            dot::vec_dot_q4_1_q8_1,
            dot::q4_1_q8_1_4x1,
            dot::q4_1_q8_1_4x4,
        );
        set(
            GgmlType::Q8_0,
            dot::vec_dot_q8_0_q8_0,
            dot::q8_0_q8_0_4x1,
            dot::q8_0_q8_0_4x4,
        );
    }
    if vnni {
        k.packed = Some(packed::matmul);
        k.packed_types = &[
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
        ];
    }
    k
}
