//! Causal attention over an **f32** KV cache ([`crate::kv_cache::KvType::F32`]), the cache exact
//! comparisons with llama.cpp use: its non-flash path (`kq = K·q`, `soft_max_ext` with the scale over its
//! padded, masked row, `V·p`) with every sum in the order of llama.cpp's AVX2 build
//! (`tessera_kernels::cpu::ggml_f32`), so that with [`crate::Numerics::LlamaCppAvx2`] the outputs are its
//! bits. Not tuned for speed: production caches are f16 (`tessera_kernels::cpu::attention_batch`).

use tessera_kernels::cpu::ggml_f32::{F32Order, dot_f32, weighted_rows_f32};
use tessera_kernels::cpu::{AttnShape, Kernels, Pool};

/// As `tessera_kernels::cpu::attention_batch`, over f32 `k_cache`/`v_cache` (`[pos][n_kv_heads][head_dim]`,
/// at least `n_past + n_tokens` positions). `scores` must hold `n_threads · (n_past + n_tokens)` values
/// (one row per pool thread). Work is split over the pool by (token, head).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_batch_f32(
    pool: &Pool,
    kernels: &Kernels,
    shape: AttnShape,
    q: &[f32],
    n_tokens: usize,
    n_past: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    scale: f32,
    out: &mut [f32],
    scores: &mut [f32],
) -> Result<(), String> {
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim: d,
    } = shape;
    if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(format!(
            "{n_heads} query heads cannot share {n_kv_heads} KV heads"
        ));
    }
    let (q_row, kv_row) = (n_heads * d, n_kv_heads * d);
    let n_kv_max = n_past + n_tokens;
    let row = n_kv_max.next_multiple_of(8);
    // llama.cpp multiplies by V with llamafile's tinyBLAS when the batch has two or more tokens, with
    // `ggml_vec_dot_f32` for one (tinyBLAS declines n < 2); K·q is always `ggml_vec_dot_f32` (its query
    // view is not contiguous, or the batch is one token). Decided per sequence: llama.cpp's choice for a
    // batch of this one sequence.
    let one_token = n_tokens == 1;
    let n_threads = pool.n_threads();
    if q.len() != n_tokens * q_row
        || out.len() != q.len()
        || k_cache.len() < n_kv_max * kv_row
        || v_cache.len() < n_kv_max * kv_row
        || scores.len() < n_threads * row
    {
        return Err(format!(
            "attention (f32 cache): buffer lengths q {}, out {}, k {}, v {}, scores {} do not fit {n_tokens} tokens \
             after {n_past} of {n_heads}/{n_kv_heads} heads × {d} on {n_threads} threads",
            q.len(),
            out.len(),
            k_cache.len(),
            v_cache.len(),
            scores.len()
        ));
    }
    let group = n_heads / n_kv_heads;
    // Thread `i` takes a contiguous run of (token, head) items, with its own slice of `out` and row of
    // `scores`. (One small Vec per call: acceptable for this stand-in, not for the kernels' version.)
    let per = (n_tokens * n_heads).div_ceil(n_threads).max(1);
    let work: Vec<std::sync::Mutex<(&mut [f32], &mut [f32])>> = out
        .chunks_mut(per * d)
        .zip(scores.chunks_mut(row))
        .map(std::sync::Mutex::new)
        .collect();
    pool.run(|ti, _| {
        let Some(w) = work.get(ti) else { return };
        let mut guard = w.lock().unwrap_or_else(|e| e.into_inner());
        let (out, s_row) = &mut *guard;
        let mut acc = Vec::new();
        for (local, oh) in out.chunks_mut(d).enumerate() {
            let item = ti * per + local;
            let (t, h) = (item / n_heads, item % n_heads);
            let n_kv = n_past + t + 1;
            let qh = &q[t * q_row + h * d..][..d];
            let kv_off = (h / group) * d;
            let padded = n_kv.next_multiple_of(8);
            let s = &mut s_row[..padded];
            let k_rows = (0..n_kv).map(|j| &k_cache[j * kv_row + kv_off..][..d]);
            for (sj, kj) in s.iter_mut().zip(k_rows) {
                *sj = dot_f32(qh, kj) * scale;
            }
            // llama.cpp's row is its padded KV length, masked with -inf: exp gives exact zeros.
            s[n_kv..].fill(f32::NEG_INFINITY);
            kernels.softmax(s);
            let order = if one_token {
                F32Order::VecDot
            } else {
                F32Order::TinyBlas
            };
            weighted_rows_f32(oh, &s[..n_kv], &v_cache[kv_off..], kv_row, order, &mut acc);
        }
    });
    Ok(())
}
