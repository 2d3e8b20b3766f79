//! Throwaway: a SmolLM2-135M-shaped decode step (30 layers, hidden 576, FFN 1536, 9/3 heads of 64, tied
//! 49152-row Q8_0 output) on random weights, to see kernel time per token without the engine.
//! `decode_sim [TYPE] [threads] [n_past] [packed:0|1] [n_tokens]` (n_tokens > 1: a prefill batch at n_past,
//! logits for the last token only, as llama-bench's pp test).
use half::f16;
use std::time::Instant;
use tessera_kernels::cpu::{
    AttnShape, PackedMatrix, Pool, QMatrix, RopeCache, Scratch, attention_batch, matmul,
    matmul_packed, rms_norm, silu_mul,
};
use tessera_kernels::quant::{GgmlType, quantize_row};

struct W {
    raw: Vec<u8>,
    packed: PackedMatrix,
    ty: GgmlType,
    rows: usize,
    cols: usize,
}

fn mk(ty: GgmlType, rows: usize, cols: usize, seed: &mut u64) -> W {
    let f: Vec<f32> = (0..rows * cols)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect();
    let mut raw = Vec::new();
    quantize_row(ty, &f, &mut raw).unwrap();
    let packed = PackedMatrix::new(&QMatrix::new(ty, rows, cols, &raw).unwrap()).unwrap();
    W {
        raw,
        packed,
        ty,
        rows,
        cols,
    }
}

fn mm(pool: &Pool, w: &W, x: &[f32], y: &mut [f32], s: &mut Scratch, packed: bool) {
    let n = x.len() / w.cols;
    if packed {
        matmul_packed(pool, &w.packed, x, n, y, s).unwrap();
    } else {
        matmul(
            pool,
            &QMatrix::new(w.ty, w.rows, w.cols, &w.raw).unwrap(),
            x,
            n,
            y,
            s,
        )
        .unwrap();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ty = args
        .get(1)
        .and_then(|s| GgmlType::from_name(s))
        .unwrap_or(GgmlType::Q4_0);
    let threads: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let n_past: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);
    let packed = args.get(4).is_none_or(|s| s != "0");
    let nt: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(1);
    let (e, f, layers, vocab) = (576, 1536, 30, 49152);
    let mut seed = 42u64;
    let lw: Vec<[W; 7]> = (0..layers)
        .map(|_| {
            [
                mk(ty, e, e, &mut seed),
                mk(ty, 192, e, &mut seed),
                mk(ty, 192, e, &mut seed),
                mk(ty, e, e, &mut seed),
                mk(ty, f, e, &mut seed),
                mk(ty, f, e, &mut seed),
                mk(ty, e, f, &mut seed),
            ]
        })
        .collect();
    let out = mk(GgmlType::Q8_0, vocab, e, &mut seed);
    let norm = vec![1.0f32; e];
    let pool = Pool::new(threads);
    let mut s = Scratch::new();
    let kv: Vec<f16> = vec![f16::from_f32(0.01); (n_past + nt) * 192];
    let (mut x, mut xb, mut q, mut k, mut v, mut att, mut o) = (
        vec![0.1f32; e * nt],
        vec![0.0; e * nt],
        vec![0.0; e * nt],
        vec![0.0; 192 * nt],
        vec![0.0; 192 * nt],
        vec![0.0; e * nt],
        vec![0.0; e * nt],
    );
    let (mut g, mut u, mut logits) = (vec![0.0; f * nt], vec![0.0; f * nt], vec![0.0; vocab]);
    let shape = AttnShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let mut rope = RopeCache::new();
    let mut best = f64::INFINITY;
    let mut parts = [0.0f64; 3];
    let iters = if nt > 1 { 4 } else { 40 };
    for _ in 0..iters {
        let t0 = Instant::now();
        let mut t_mm = 0.0;
        let mut t_att = 0.0;
        for l in &lw {
            rms_norm(&x, &norm, 1e-5, &mut xb).unwrap();
            let tm = Instant::now();
            mm(&pool, &l[0], &xb, &mut q, &mut s, packed);
            mm(&pool, &l[1], &xb, &mut k, &mut s, packed);
            mm(&pool, &l[2], &xb, &mut v, &mut s, packed);
            t_mm += tm.elapsed().as_secs_f64();
            rope.compute(64, n_past, 100000.0, None).unwrap();
            for t in 0..nt {
                rope.apply(&mut q[t * e..(t + 1) * e], 9, 64).unwrap();
                rope.apply(&mut k[t * 192..(t + 1) * 192], 3, 64).unwrap();
            }
            let ta = Instant::now();
            attention_batch(&pool, shape, &q, nt, n_past, &kv, &kv, 0.125, &mut att).unwrap();
            t_att += ta.elapsed().as_secs_f64();
            let tm = Instant::now();
            mm(&pool, &l[3], &att, &mut o, &mut s, packed);
            t_mm += tm.elapsed().as_secs_f64();
            for (a, b) in x.iter_mut().zip(&o) {
                *a += b;
            }
            rms_norm(&x, &norm, 1e-5, &mut xb).unwrap();
            let tm = Instant::now();
            mm(&pool, &l[4], &xb, &mut g, &mut s, packed);
            mm(&pool, &l[5], &xb, &mut u, &mut s, packed);
            silu_mul(&mut g, &u).unwrap();
            mm(&pool, &l[6], &g, &mut o, &mut s, packed);
            t_mm += tm.elapsed().as_secs_f64();
            for (a, b) in x.iter_mut().zip(&o) {
                *a += b * 0.01;
            }
        }
        rms_norm(&x, &norm, 1e-5, &mut xb).unwrap();
        let tl = Instant::now();
        mm(
            &pool,
            &out,
            &xb[(nt - 1) * e..],
            &mut logits,
            &mut s,
            packed,
        );
        let t_lm = tl.elapsed().as_secs_f64();
        let total = t0.elapsed().as_secs_f64();
        if total < best {
            best = total;
            parts = [t_mm, t_att, t_lm];
        }
    }
    println!(
        "{ty:?} threads {threads} n_past {n_past} n_tokens {nt} packed {packed}: best {:.2} ms/batch ({:.0} tok/s); layers matmul {:.2} ms, attention {:.2} ms, lm_head {:.2} ms",
        best * 1e3,
        nt as f64 / best,
        parts[0] * 1e3,
        parts[1] * 1e3,
        parts[2] * 1e3
    );
}
