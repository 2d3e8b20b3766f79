//! Causal attention over an **f32** KV cache ([`crate::kv_cache::KvType::F32`]).
//!
//! TODO(kernels): `tessera_kernels::cpu` has attention over an f16 cache only (`attention_batch`). This is a
//! plain stand-in with the same shapes and semantics, following llama.cpp's non-flash f32
//! path (`kq = K·q` in f32, `soft_max_ext` with the scale, `V·p`): it exists so that the engine can be
//! compared with reference logits made with an F32 cache without the f16 rounding in between. Move it into
//! the kernels (threaded, SIMD dots) or drop it once they offer an f32 cache.

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
    // view is not contiguous, or the batch is one token).
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
        let mut acc = vec![[[0.0f32; 8]; 4]; d];
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
                *sj = dot_ggml_f32(qh, kj) * scale;
            }
            // llama.cpp's row is its padded KV length, masked with -inf: exp gives exact zeros.
            s[n_kv..].fill(f32::NEG_INFINITY);
            kernels.softmax(s);
            // `V·p`, position j in lane j % 8 of accumulator (j / 8) % 4 (ggml_vec_dot_f32 over llama.cpp's
            // zero-padded row) or of the single tinyBLAS accumulator; the padding adds exact zeros.
            acc.iter_mut().for_each(|a| *a = [[0.0; 8]; 4]);
            for (j, &p) in s[..n_kv].iter().enumerate() {
                let (r, m) = (if one_token { (j / 8) % 4 } else { 0 }, j % 8);
                let v = &v_cache[j * kv_row + kv_off..][..d];
                for (a, &x) in acc.iter_mut().zip(v) {
                    a[r][m] = x.mul_add(p, a[r][m]);
                }
            }
            for (o, a) in oh.iter_mut().zip(acc.iter()) {
                *o = if one_token { reduce_ggml_f32(a) } else { hsum8(&a[0]) };
            }
        }
    });
    Ok(())
}

/// Horizontal sum of 8 lanes in the order of ggml's `hsum_float_8` / tinyBLAS `hsum` (128-bit halves, then
/// pairs two apart, then the last two).
fn hsum8(a: &[f32; 8]) -> f32 {
    let v: [f32; 4] = std::array::from_fn(|m| a[m + 4] + a[m]);
    (v[0] + v[2]) + (v[1] + v[3])
}

/// `a·b` as ggml's AVX2 `ggml_vec_dot_f32`: four 8-lane FMA accumulators over 32-element steps, reduced
/// pairwise (`GGML_F32x8_REDUCE`: 0+2, 1+3, then 0+1, then the halves and two `hadd`s), leftovers FMA'd
/// one by one.
fn dot_ggml_f32(a: &[f32], b: &[f32]) -> f32 {
    let np = a.len() & !31;
    let mut sum = [[0.0f32; 8]; 4];
    for (x, y) in a[..np].chunks_exact(32).zip(b[..np].chunks_exact(32)) {
        for (j, s) in sum.iter_mut().enumerate() {
            for m in 0..8 {
                s[m] = x[8 * j + m].mul_add(y[8 * j + m], s[m]);
            }
        }
    }
    let mut r = reduce_ggml_f32(&sum);
    for (x, y) in a[np..].iter().zip(&b[np..]) {
        r = x.mul_add(*y, r);
    }
    r
}

/// `GGML_F32x8_REDUCE`: accumulators 0+2 and 1+3, then 0+1, then the 128-bit halves and two `hadd`s.
fn reduce_ggml_f32(sum: &[[f32; 8]; 4]) -> f32 {
    let s0: [f32; 8] = std::array::from_fn(|m| sum[0][m] + sum[2][m]);
    let s1: [f32; 8] = std::array::from_fn(|m| sum[1][m] + sum[3][m]);
    let s: [f32; 8] = std::array::from_fn(|m| s0[m] + s1[m]);
    let t: [f32; 4] = std::array::from_fn(|m| s[m] + s[m + 4]);
    (t[0] + t[1]) + (t[2] + t[3])
}
