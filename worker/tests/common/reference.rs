//! An independent, deliberately plain reference forward pass for the tests: weights dequantized to f32, all
//! arithmetic in f64, one token at a time, HF-free (GGUF row order, llama.cpp "normal" RoPE pairs). It shares
//! no code with the engine beyond the bit-exact reference dequantizer/quantizer of `tessera_kernels::quant`.
//!
//! Two switches reproduce the engine's (and llama.cpp's) deliberate precision choices, so that the tests can
//! tell "the engine computes the model correctly" apart from "the engine rounds like llama.cpp":
//! - `f16_qkv`: round Q, K and V to f16 before attention (the f16 KV cache, and Q converted to K's type);
//! - `quantize_activations`: round each matmul input through the weight type's activation format (Q8_0 for
//!   Q8_0 weights, F16/BF16 for F16/BF16 weights, Q8_K for k-quants, as ggml's `vec_dot_type`), using the reference quantizer.

use half::f16;
use shard_tool::checkpoint::Checkpoint;
use tessera_kernels::quant::{GgmlType, dequantize_row, quantize_row};

#[derive(Debug, Clone, Copy, Default)]
pub struct RefOptions {
    pub f16_qkv: bool,
    pub quantize_activations: bool,
}

struct Mat {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    w: Vec<f32>,
}

fn load(ckpt: &Checkpoint, name: &str) -> Mat {
    let i = ckpt.position(name).unwrap_or_else(|| panic!("no {name}"));
    let d = &ckpt.tensors[i];
    let (cols, rows) = (d.row_len() as usize, d.n_rows() as usize);
    let bytes = ckpt.rows(i, 0..rows as u64).unwrap();
    let mut w = vec![0.0; rows * cols];
    let rb = bytes.len() / rows;
    for (r, out) in w.chunks_exact_mut(cols).enumerate() {
        dequantize_row(d.ty, &bytes[r * rb..(r + 1) * rb], out).unwrap();
    }
    Mat {
        ty: d.ty,
        rows,
        cols,
        w,
    }
}

impl Mat {
    fn matvec(&self, x: &[f64], opts: RefOptions) -> Vec<f64> {
        let mut xs: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        if opts.quantize_activations && self.ty == GgmlType::Q8_0 {
            let mut q = Vec::new();
            quantize_row(GgmlType::Q8_0, &xs, &mut q).unwrap();
            dequantize_row(GgmlType::Q8_0, &q, &mut xs).unwrap();
        }
        if opts.quantize_activations && matches!(self.ty, GgmlType::BF16 | GgmlType::F16) {
            for v in &mut xs {
                *v = match self.ty {
                    GgmlType::BF16 => half::bf16::from_f32(*v).to_f32(),
                    _ => f16::from_f32(*v).to_f32(),
                };
            }
        }
        if opts.quantize_activations
            && matches!(
                self.ty,
                GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K
            )
        {
            q8_k_round_trip(&mut xs);
        }
        assert!(
            !opts.quantize_activations
                || !matches!(
                    self.ty,
                    GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1
                ),
            "reference: activation format of {:?} not modelled",
            self.ty
        );
        self.w
            .chunks_exact(self.cols)
            .map(|row| {
                row.iter()
                    .zip(&xs)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum()
            })
            .collect()
    }
}

/// ggml's `quantize_row_q8_K_ref` then dequantization: per 256 values, `iscale = -127 / x[argmax |x|]`,
/// `q = min(127, nearest_int(iscale · x))`, value `q / iscale`.
fn q8_k_round_trip(xs: &mut [f32]) {
    for block in xs.chunks_mut(256) {
        let max = block
            .iter()
            .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        if max == 0.0 {
            block.fill(0.0);
            continue;
        }
        let iscale = -127.0 / max;
        let d = 1.0 / iscale;
        for v in block.iter_mut() {
            let q = (iscale * *v).round_ties_even().min(127.0);
            *v = d * q;
        }
    }
}

fn rms_norm(x: &[f64], w: &[f32], eps: f32) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps as f64).sqrt();
    x.iter().zip(w).map(|(v, &g)| v * s * g as f64).collect()
}

fn round16(v: &mut [f64]) {
    for x in v {
        *x = f16::from_f32(*x as f32).to_f64();
    }
}

/// Logits (`[n_tokens, n_vocab]`) for every position of `tokens`, as one sequence from position 0.
pub fn reference_logits(ckpt: &Checkpoint, tokens: &[u32], opts: RefOptions) -> Vec<f32> {
    let c = &ckpt.config;
    let (e, hd, nh, nkv) = (c.n_embd, c.head_dim, c.n_head, c.n_head_kv);
    let vec = |name: &str| load(ckpt, name).w;
    let embd = load(ckpt, "token_embd.weight");
    let out = if ckpt.position("output.weight").is_some() {
        load(ckpt, "output.weight")
    } else {
        load(ckpt, "token_embd.weight")
    };
    let out_norm = vec("output_norm.weight");
    let freqs: Option<Vec<f32>> = ckpt
        .position("rope_freqs.weight")
        .map(|_| vec("rope_freqs.weight"))
        .or_else(|| shard_tool::model_keys::llama3_rope_factors(c));
    struct L {
        an: Vec<f32>,
        q: Mat,
        k: Mat,
        v: Mat,
        o: Mat,
        fnorm: Vec<f32>,
        g: Mat,
        u: Mat,
        d: Mat,
    }
    let layers: Vec<L> = (0..c.n_layer)
        .map(|l| {
            let n = |p: &str| format!("blk.{l}.{p}.weight");
            L {
                an: vec(&n("attn_norm")),
                q: load(ckpt, &n("attn_q")),
                k: load(ckpt, &n("attn_k")),
                v: load(ckpt, &n("attn_v")),
                o: load(ckpt, &n("attn_output")),
                fnorm: vec(&n("ffn_norm")),
                g: load(ckpt, &n("ffn_gate")),
                u: load(ckpt, &n("ffn_up")),
                d: load(ckpt, &n("ffn_down")),
            }
        })
        .collect();
    let rope = |x: &mut [f64], pos: usize| {
        for head in x.chunks_exact_mut(hd) {
            for i in 0..c.rope_dim / 2 {
                let ff = freqs.as_ref().map_or(1.0, |f| f[i] as f64);
                let theta = pos as f64
                    * (c.rope_theta as f64).powf(-2.0 * i as f64 / c.rope_dim as f64)
                    / ff;
                let (s, co) = theta.sin_cos();
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * co - b * s;
                head[2 * i + 1] = a * s + b * co;
            }
        }
    };
    let mut kcache: Vec<Vec<Vec<f64>>> = vec![Vec::new(); c.n_layer];
    let mut vcache: Vec<Vec<Vec<f64>>> = vec![Vec::new(); c.n_layer];
    let mut logits = Vec::new();
    for (pos, &tok) in tokens.iter().enumerate() {
        let mut x: Vec<f64> = embd.w[tok as usize * e..(tok as usize + 1) * e]
            .iter()
            .map(|&v| v as f64)
            .collect();
        for (l, ly) in layers.iter().enumerate() {
            let h = rms_norm(&x, &ly.an, c.rms_eps);
            let (mut q, mut k, mut v) = (
                ly.q.matvec(&h, opts),
                ly.k.matvec(&h, opts),
                ly.v.matvec(&h, opts),
            );
            rope(&mut q, pos);
            rope(&mut k, pos);
            if opts.f16_qkv {
                round16(&mut q);
                round16(&mut k);
                round16(&mut v);
            }
            kcache[l].push(k);
            vcache[l].push(v);
            let mut att = vec![0.0; nh * hd];
            for hq in 0..nh {
                let kvh = hq / (nh / nkv);
                let qh = &q[hq * hd..(hq + 1) * hd];
                let scores: Vec<f64> = kcache[l]
                    .iter()
                    .map(|k| {
                        qh.iter()
                            .zip(&k[kvh * hd..(kvh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let sum: f64 = ex.iter().sum();
                for (p, v) in ex.iter().zip(&vcache[l]) {
                    for d in 0..hd {
                        att[hq * hd + d] += p / sum * v[kvh * hd + d];
                    }
                }
            }
            let o = ly.o.matvec(&att, opts);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = rms_norm(&x, &ly.fnorm, c.rms_eps);
            let (g, u) = (ly.g.matvec(&h, opts), ly.u.matvec(&h, opts));
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = ly.d.matvec(&act, opts);
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
        let h = rms_norm(&x, &out_norm, c.rms_eps);
        logits.extend(out.matvec(&h, opts).into_iter().map(|v| v as f32));
    }
    assert_eq!(out.rows, c.n_vocab);
    logits
}
