//! AVX2 packed matmul over 16-row interleaved weights (layouts in `cpu::packed`): picks the level's
//! `QuantTiles` for the type and runs the ISA-neutral driver `packed::matmul_quant`.

use crate::cpu::isa::Kernels;
use crate::cpu::packed::{QuantTiles, matmul_quant};
use crate::cpu::{KernelError, Pool, Scratch};
use crate::quant::GgmlType;

use super::packed_k;

/// The AVX2 packed matmul (a `PackedMatmulFn`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    k: &Kernels,
    pool: &Pool,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: &[u8],
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut Scratch,
) -> Result<(), KernelError> {
    let tiles = match ty {
        GgmlType::Q4_K => QuantTiles {
            t1: packed_k::q4_k_t1,
            t4: packed_k::q4_k_t4,
            aux_words: packed_k::Q4K_AUX,
            fill_aux: packed_k::fill_aux,
        },
        GgmlType::Q6_K => QuantTiles {
            t1: packed_k::q6_k_t1,
            t4: packed_k::q6_k_t4,
            aux_words: packed_k::Q6K_AUX,
            fill_aux: packed_k::fill_aux,
        },
        _ => {
            return Err(KernelError::Invalid(
                "matmul_packed: type has no packed layout",
            ));
        }
    };
    matmul_quant(
        k, pool, ty, rows, cols, data, x, n_tokens, y, scratch, tiles,
    )
}
