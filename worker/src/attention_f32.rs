//! Causal attention over an **f32** KV cache ([`crate::kv_cache::KvType::F32`]).
//!
//! TODO(kernels): `tessera_kernels::cpu` has attention over an f16 cache only (`attention_batch`). This is a
//! plain stand-in with the same shapes and semantics, following llama.cpp's non-flash f32
//! path (`kq = K·q` in f32, `soft_max_ext` with the scale, `V·p`): it exists so that the engine can be
//! compared with reference logits made with an F32 cache without the f16 rounding in between. Move it into
//! the kernels (threaded, SIMD dots) or drop it once they offer an f32 cache.

use tessera_kernels::cpu::{AttnShape, Pool, softmax};

/// As `tessera_kernels::cpu::attention_batch`, over f32 `k_cache`/`v_cache` (`[pos][n_kv_heads][head_dim]`,
/// at least `n_past + n_tokens` positions). `scores` must hold `n_threads · (n_past + n_tokens)` values
/// (one row per pool thread). Work is split over the pool by (token, head).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_batch_f32(
    pool: &Pool,
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
    let n_threads = pool.n_threads();
    if q.len() != n_tokens * q_row
        || out.len() != q.len()
        || k_cache.len() < n_kv_max * kv_row
        || v_cache.len() < n_kv_max * kv_row
        || scores.len() < n_threads * n_kv_max
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
        .zip(scores.chunks_mut(n_kv_max))
        .map(std::sync::Mutex::new)
        .collect();
    pool.run(|ti, _| {
        let Some(w) = work.get(ti) else { return };
        let mut guard = w.lock().unwrap_or_else(|e| e.into_inner());
        let (out, s_row) = &mut *guard;
        for (local, oh) in out.chunks_mut(d).enumerate() {
            let item = ti * per + local;
            let (t, h) = (item / n_heads, item % n_heads);
            let n_kv = n_past + t + 1;
            let qh = &q[t * q_row + h * d..][..d];
            let kv_off = (h / group) * d;
            let s = &mut s_row[..n_kv];
            for (j, sj) in s.iter_mut().enumerate() {
                *sj = dot(qh, &k_cache[j * kv_row + kv_off..][..d]) * scale;
            }
            softmax(s);
            oh.fill(0.0);
            for (j, &p) in s.iter().enumerate() {
                for (o, &x) in oh.iter_mut().zip(&v_cache[j * kv_row + kv_off..][..d]) {
                    *o += p * x;
                }
            }
        }
    });
    Ok(())
}

/// f32 dot product with 8 partial sums (so that it vectorizes, as ggml's `ggml_vec_dot_f32` does).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
