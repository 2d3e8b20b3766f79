//! Conformance of the CPU kernels: every instruction-set table this CPU supports (scalar, AVX2, AVX-512,
//! AVX-512 VNNI) runs the same checks. SIMD dot products against their scalar twins and against an f32
//! product of dequantized values with a per-type error budget (as llama.cpp's `test-quantize-fns.cpp`);
//! activation quantizers byte-for-byte against the scalar reference; matmul against a naive reference for
//! several shapes and thread counts; the element-wise ops and attention against f64 references.

use half::f16;
use tessera_kernels::cpu::{
    AttnShape, Isa, Kernels, PackedMatrix, Pool, QMatrix, RopeCache, Scratch, VecDotType,
    attention, attention_batch, get_row, matmul, matmul_packed, rms_norm, rope, silu_mul, softmax,
};
use tessera_kernels::quant::{GgmlType, dequantize_row, quantize_row};

/// xorshift64* with a Box-Muller normal: deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

fn tables() -> Vec<&'static Kernels> {
    let t: Vec<_> = Isa::available()
        .into_iter()
        .filter_map(Kernels::for_isa)
        .collect();
    assert!(t.iter().any(|k| k.isa() == Isa::Scalar));
    eprintln!(
        "testing ISA levels: {:?}",
        t.iter().map(|k| k.isa()).collect::<Vec<_>>()
    );
    t
}

fn scalar() -> &'static Kernels {
    Kernels::for_isa(Isa::Scalar).expect("scalar is always available")
}

fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    quantize_row(ty, x, &mut out).expect("quantize");
    out
}

fn dequantize(ty: GgmlType, b: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n];
    dequantize_row(ty, b, &mut out).expect("dequantize");
    out
}

fn act_bytes(k: &Kernels, vt: VecDotType, x: &[f32]) -> Vec<u8> {
    let mut dst = vec![0u8; vt.bytes_for(x.len())];
    k.quantize_activations(vt, x, &mut dst)
        .expect("quantize activations");
    dst
}

/// Decodes converted activations back to f32 (ggml's block_q8_0 / q8_1 / q8_K layouts, f16, bf16).
fn dequant_act(vt: VecDotType, b: &[u8], n: usize) -> Vec<f32> {
    let h = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match vt {
        VecDotType::F32 => (0..n)
            .map(|i| f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()))
            .collect(),
        VecDotType::F16 => (0..n).map(|i| h(2 * i)).collect(),
        VecDotType::BF16 => (0..n)
            .map(|i| f32::from_bits(u32::from(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])) << 16))
            .collect(),
        VecDotType::Q8_0 => (0..n)
            .map(|i| h(i / 32 * 34) * f32::from(b[i / 32 * 34 + 2 + i % 32] as i8))
            .collect(),
        VecDotType::Q8_1 => (0..n)
            .map(|i| h(i / 32 * 36) * f32::from(b[i / 32 * 36 + 4 + i % 32] as i8))
            .collect(),
        VecDotType::Q8_K => (0..n)
            .map(|i| {
                let o = i / 256 * 292;
                f32::from_le_bytes(b[o..o + 4].try_into().unwrap())
                    * f32::from(b[o + 4 + i % 256] as i8)
            })
            .collect(),
    }
}

/// Error budget of a dot product vs the f32 product of dequantized weights and unquantized activations,
/// relative to `Σ|w_i x_i|`: dominated by the activation format's rounding.
fn budget(ty: GgmlType) -> f64 {
    match VecDotType::of(ty) {
        VecDotType::F32 => 1e-5,
        VecDotType::F16 => 2e-3,
        VecDotType::BF16 => 1e-2,
        VecDotType::Q8_0 | VecDotType::Q8_1 | VecDotType::Q8_K => 2.5e-2,
    }
}

/// Rows with some structure: a random scale per row, a few outliers, and occasionally an all-zero block.
fn weights(rng: &mut Rng, n: usize) -> Vec<f32> {
    let scale = 0.02 * (0.5 + rng.uniform());
    let mut w = rng.vec(n, scale);
    for v in w.iter_mut() {
        if rng.uniform() < 0.01 {
            *v *= 8.0;
        }
    }
    if n >= 64 && rng.uniform() < 0.5 {
        w[32..64].fill(0.0);
    }
    w
}

#[test]
fn activation_quantizers_match_scalar_bytes() {
    let mut rng = Rng::new(1);
    for k in tables() {
        for vt in VecDotType::ALL {
            for blocks in [1, 3, 17] {
                let n = blocks * vt.block_size().max(32);
                let mut x = rng.vec(n, 3.0);
                // Ties for the rounding mode, a zero block and a lone maximum.
                x[0] = 2.5;
                x[1] = -0.5;
                if n >= 64 {
                    x[32..64].fill(0.0);
                }
                // Equal magnitudes of both signs: Q8_K takes the first one's sign; and a zero super-block.
                if n >= 256 {
                    x[7] = -50.0;
                    x[200] = 50.0;
                }
                if n >= 512 {
                    x[256..512].fill(0.0);
                }
                let want = act_bytes(scalar(), vt, &x);
                let got = act_bytes(k, vt, &x);
                assert_eq!(got, want, "{:?} {vt:?} n={n}", k.isa());
            }
        }
    }
}

#[test]
fn vec_dot_matches_scalar_and_f32_reference() {
    let mut rng = Rng::new(2);
    for k in tables() {
        for ty in GgmlType::ALL {
            let vt = VecDotType::of(ty);
            let bs = ty.block_size().max(vt.block_size()).max(32);
            for blocks in [1, 3, 17] {
                let n = blocks * bs;
                let wf = weights(&mut rng, n);
                let wq = quantize(ty, &wf);
                let wd = dequantize(ty, &wq, n);
                let x = rng.vec(n, 1.0);
                let a = act_bytes(k, vt, &x);
                let got = f64::from(k.vec_dot(ty, n, &wq, &a).expect("vec_dot"));
                let twin = f64::from(scalar().vec_dot(ty, n, &wq, &a).expect("scalar vec_dot"));
                let mag: f64 = wd.iter().zip(&x).map(|(w, x)| f64::from(w * x).abs()).sum();
                let exact: f64 = wd
                    .iter()
                    .zip(&x)
                    .map(|(w, x)| f64::from(*w) * f64::from(*x))
                    .sum();
                let tag = format!("{:?} {ty:?} n={n}", k.isa());
                assert!(
                    (got - twin).abs() <= 1e-5 * mag + 1e-30,
                    "{tag}: {got} vs scalar {twin} (mag {mag})"
                );
                assert!(
                    (got - exact).abs() <= budget(ty) * mag + 1e-30,
                    "{tag}: {got} vs f32 reference {exact} (mag {mag})"
                );
                // Against the dequantized activations the only error left is float rounding (and Q8_1's
                // f16-rounded block sum `s`), which pins the weight decode down.
                let ad = dequant_act(vt, &a, n);
                let mag_q: f64 = wd
                    .iter()
                    .zip(&ad)
                    .map(|(w, x)| f64::from(w * x).abs())
                    .sum();
                let exact_q: f64 = wd
                    .iter()
                    .zip(&ad)
                    .map(|(w, x)| f64::from(*w) * f64::from(*x))
                    .sum();
                let tol = if vt == VecDotType::Q8_1 { 1e-3 } else { 1e-5 };
                assert!(
                    (got - exact_q).abs() <= tol * mag_q + 1e-30,
                    "{tag}: {got} vs dequantized product {exact_q} (mag {mag_q})"
                );
            }
        }
    }
}

#[test]
fn vec_dot_rejects_bad_lengths() {
    let k = Kernels::best();
    assert!(k.vec_dot(GgmlType::Q4_0, 32, &[0; 17], &[0; 34]).is_err());
    assert!(k.vec_dot(GgmlType::Q4_0, 32, &[0; 18], &[0; 33]).is_err());
    assert!(k.vec_dot(GgmlType::Q4_0, 31, &[0; 18], &[0; 34]).is_err());
    let mut small = [0u8; 10];
    assert!(
        k.quantize_activations(VecDotType::Q8_0, &[0.0; 32], &mut small)
            .is_err()
    );
}

#[test]
fn matmul_matches_reference() {
    let mut rng = Rng::new(3);
    let pools = [Pool::new(1), Pool::new(2)];
    let mut scratch = Scratch::new();
    let shapes = [
        (1, 256, 1),
        (7, 256, 3),
        (33, 512, 5),
        (64, 768, 9),
        (5, 256, 4),
        // 70 tokens of 4096 columns are more than one 256 KiB token block of the packed kernels (56 Q8_K
        // rows), so a batch spans two blocks and a partial 4-token tile.
        (17, 4096, 70),
    ];
    for k in tables() {
        for ty in GgmlType::ALL {
            for &(rows, cols, n_tokens) in &shapes {
                let wf: Vec<f32> = (0..rows).flat_map(|_| weights(&mut rng, cols)).collect();
                let wq: Vec<u8> = wf.chunks(cols).flat_map(|r| quantize(ty, r)).collect();
                let wd: Vec<f32> = dequantize(ty, &wq, rows * cols);
                let m = QMatrix::new(ty, rows, cols, &wq).expect("matrix");
                let x = rng.vec(n_tokens * cols, 1.0);
                let vt = VecDotType::of(ty);
                let packed = k.pack(&m).expect("pack");
                for (pool, use_packed) in pools.iter().flat_map(|p| [(p, false), (p, true)]) {
                    let mut y = vec![f32::NAN; n_tokens * rows];
                    if use_packed {
                        k.matmul_packed(pool, &packed, &x, n_tokens, &mut y, &mut scratch)
                            .expect("matmul_packed");
                    } else {
                        k.matmul(pool, &m, &x, n_tokens, &mut y, &mut scratch)
                            .expect("matmul");
                    }
                    for t in 0..n_tokens {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let a = act_bytes(scalar(), vt, xt);
                        for r in 0..rows {
                            let wr = &wd[r * cols..(r + 1) * cols];
                            let mag: f64 =
                                wr.iter().zip(xt).map(|(w, x)| f64::from(w * x).abs()).sum();
                            let exact: f64 = wr
                                .iter()
                                .zip(xt)
                                .map(|(w, x)| f64::from(*w) * f64::from(*x))
                                .sum();
                            let twin = scalar()
                                .vec_dot(ty, cols, m.row(r).expect("row"), &a)
                                .expect("dot");
                            let got = y[t * rows + r];
                            let tag = format!(
                                "{:?} {ty:?} {rows}x{cols} t={t}/{n_tokens} r={r} threads={} packed={}",
                                k.isa(),
                                pool.n_threads(),
                                use_packed && packed.is_interleaved()
                            );
                            assert!(
                                (f64::from(got) - f64::from(twin)).abs() <= 1e-5 * mag + 1e-30,
                                "{tag}: {got} vs scalar {twin}"
                            );
                            assert!(
                                (f64::from(got) - exact).abs() <= budget(ty) * mag + 1e-30,
                                "{tag}: {got} vs f32 {exact}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Every level's packed matmul gives a token the same bits alone (the 1-token tile) as inside a batch
/// (4-token tiles and a 1-, 2- or 3-token tail), on 1 and 2 threads: the server batches unrelated requests,
/// and a sequence's output must not depend on them.
#[test]
fn packed_matmul_is_batch_invariant() {
    let mut rng = Rng::new(11);
    let pools = [Pool::new(1), Pool::new(2)];
    let mut scratch = Scratch::new();
    let (rows, cols) = (37, 512);
    for k in tables() {
        for (ty, n_tokens) in GgmlType::ALL
            .into_iter()
            .flat_map(|ty| [(ty, 5), (ty, 6), (ty, 7)])
        {
            let wf: Vec<f32> = (0..rows).flat_map(|_| weights(&mut rng, cols)).collect();
            let wq: Vec<u8> = wf.chunks(cols).flat_map(|r| quantize(ty, r)).collect();
            let m = QMatrix::new(ty, rows, cols, &wq).expect("matrix");
            let packed = k.pack(&m).expect("pack");
            if !packed.is_interleaved() {
                continue;
            }
            let x = rng.vec(n_tokens * cols, 1.0);
            for pool in &pools {
                let mut batch = vec![f32::NAN; n_tokens * rows];
                k.matmul_packed(pool, &packed, &x, n_tokens, &mut batch, &mut scratch)
                    .expect("matmul_packed");
                for t in 0..n_tokens {
                    let mut alone = vec![f32::NAN; rows];
                    let xt = &x[t * cols..(t + 1) * cols];
                    k.matmul_packed(pool, &packed, xt, 1, &mut alone, &mut scratch)
                        .expect("matmul_packed");
                    let in_batch = &batch[t * rows..(t + 1) * rows];
                    let same = alone
                        .iter()
                        .zip(in_batch)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{:?} {ty:?} token {t} of {n_tokens}, threads {}: alone {alone:?}\nin batch {in_batch:?}",
                        k.isa(),
                        pool.n_threads()
                    );
                }
            }
        }
    }
}

#[test]
fn packed_matrices_are_tied_to_their_isa() {
    let data = vec![0u8; 16 * 18];
    let m = QMatrix::new(GgmlType::Q4_0, 16, 32, &data).expect("matrix");
    let pool = Pool::new(1);
    let mut s = Scratch::new();
    let mut y = vec![0.0; 16];
    let p = PackedMatrix::new(&m).expect("pack");
    assert_eq!((p.rows(), p.cols(), p.ty()), (16, 32, GgmlType::Q4_0));
    assert!(matmul_packed(&pool, &p, &[0.0; 32], 1, &mut y, &mut s).is_ok());
    assert!(matmul_packed(&pool, &p, &[0.0; 31], 1, &mut y, &mut s).is_err());
    for k in tables() {
        if k.isa() != Kernels::best().isa() {
            assert!(
                k.matmul_packed(&pool, &p, &[0.0; 32], 1, &mut y, &mut s)
                    .is_err()
            );
        }
    }
}

#[test]
fn matmul_and_get_row_reject_bad_shapes() {
    let pool = Pool::new(1);
    let mut s = Scratch::new();
    let data = vec![0u8; 2 * 18];
    assert!(QMatrix::new(GgmlType::Q4_0, 2, 32, &data[..35]).is_err());
    assert!(QMatrix::new(GgmlType::Q4_0, 2, 31, &data).is_err());
    assert!(QMatrix::new(GgmlType::Q4_0, usize::MAX, 32, &data).is_err());
    let m = QMatrix::new(GgmlType::Q4_0, 2, 32, &data).expect("matrix");
    let mut y = vec![0.0; 2];
    assert!(matmul(&pool, &m, &[0.0; 31], 1, &mut y, &mut s).is_err());
    assert!(matmul(&pool, &m, &[0.0; 32], 1, &mut y[..1], &mut s).is_err());
    assert!(matmul(&pool, &m, &[0.0; 32], 1, &mut y, &mut s).is_ok());
    let mut row = vec![0.0; 32];
    assert!(get_row(&m, 2, &mut row).is_err());
    assert!(get_row(&m, 1, &mut row[..31]).is_err());
    assert!(m.row(2).is_none());
}

#[test]
fn empty_shapes_are_fine() {
    let pool = Pool::new(2);
    let mut s = Scratch::new();
    for k in tables() {
        for ty in GgmlType::ALL {
            // No columns: every output is an empty sum.
            let m = QMatrix::new(ty, 3, 0, &[]).expect("matrix");
            let p = k.pack(&m).expect("pack");
            let mut y = vec![f32::NAN; 6];
            k.matmul(&pool, &m, &[], 2, &mut y, &mut s).expect("matmul");
            assert!(y.iter().all(|&v| v == 0.0), "{:?} {ty:?}", k.isa());
            let mut y = vec![f32::NAN; 6];
            k.matmul_packed(&pool, &p, &[], 2, &mut y, &mut s)
                .expect("matmul_packed");
            assert!(y.iter().all(|&v| v == 0.0), "{:?} {ty:?} packed", k.isa());
            // No rows or no tokens: nothing to do.
            let m = QMatrix::new(ty, 0, 256, &[]).expect("matrix");
            let p = k.pack(&m).expect("pack");
            k.matmul_packed(&pool, &p, &[0.0; 256], 1, &mut [], &mut s)
                .expect("no rows");
            k.matmul(&pool, &m, &[], 0, &mut [], &mut s)
                .expect("no tokens");
        }
    }
}

#[test]
fn get_row_equals_dequantize() {
    let mut rng = Rng::new(4);
    for ty in GgmlType::ALL {
        let (rows, cols) = (3, 512);
        let wf = rng.vec(rows * cols, 0.1);
        let wq = quantize(ty, &wf);
        let m = QMatrix::new(ty, rows, cols, &wq).expect("matrix");
        let all = dequantize(ty, &wq, rows * cols);
        let mut row = vec![0.0; cols];
        for r in 0..rows {
            get_row(&m, r, &mut row).expect("get_row");
            assert_eq!(row, all[r * cols..(r + 1) * cols], "{ty:?} row {r}");
        }
    }
}

#[test]
fn rms_norm_matches_f64() {
    let mut rng = Rng::new(5);
    let n = 576;
    let x = rng.vec(3 * n, 2.0);
    let w = rng.vec(n, 1.0);
    let mut out = vec![0.0; 3 * n];
    rms_norm(&x, &w, 1e-5, &mut out).expect("rms_norm");
    for (xr, yr) in x.chunks(n).zip(out.chunks(n)) {
        let ms: f64 = xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / n as f64;
        let s = 1.0 / (ms + 1e-5).sqrt();
        for i in 0..n {
            let want = f64::from(xr[i]) * s * f64::from(w[i]);
            assert!(
                (f64::from(yr[i]) - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{i}"
            );
        }
    }
    assert!(rms_norm(&x[..10], &w, 1e-5, &mut out[..10]).is_err());
    assert!(rms_norm(&x, &w, 1e-5, &mut out[..5]).is_err());
    assert!(rms_norm(&x, &[], 1e-5, &mut out).is_err());
}

/// ggml's angle for pair `i` at `pos`: `theta = pos`, multiplied by `powf(base, -2/rope_dim)` once per pair in
/// f32 (`ggml_rope_cache_init`), then divided by the frequency factor.
fn ggml_theta(pos: usize, i: usize, rope_dim: usize, base: f32, ff: Option<&[f32]>) -> f32 {
    let scale = base.powf(-2.0 / rope_dim as f32);
    let mut theta = pos as f32;
    for _ in 0..i {
        theta *= scale;
    }
    theta / ff.map_or(1.0, |f| f[i])
}

#[test]
fn rope_matches_reference_up_to_long_positions() {
    let mut rng = Rng::new(6);
    let (n_heads, head_dim) = (3, 64);
    // Llama 3.1-style factors: high frequencies 1, low ones 8, a smooth band between.
    let ff: Vec<f32> = (0..32)
        .map(|i| {
            if i < 12 {
                1.0
            } else if i < 20 {
                1.0 + (i - 12) as f32
            } else {
                8.0
            }
        })
        .collect();
    for rope_dim in [64, 32] {
        for &pos in &[
            0usize, 1, 17, 4095, 8191, 8192, 8193, 32768, 100_000, 131_071, 131_072,
        ] {
            for factors in [None, Some(&ff[..])] {
                let x = rng.vec(n_heads * head_dim, 1.0);
                let mut y = x.clone();
                rope(&mut y, n_heads, head_dim, rope_dim, pos, 500_000.0, factors).expect("rope");
                for h in 0..n_heads {
                    for i in 0..head_dim / 2 {
                        let (a, b) = (h * head_dim + 2 * i, h * head_dim + 2 * i + 1);
                        let (want0, want1) = if 2 * i < rope_dim {
                            let t = f64::from(ggml_theta(pos, i, rope_dim, 500_000.0, factors));
                            let (x0, x1) = (f64::from(x[a]), f64::from(x[b]));
                            (x0 * t.cos() - x1 * t.sin(), x0 * t.sin() + x1 * t.cos())
                        } else {
                            (f64::from(x[a]), f64::from(x[b]))
                        };
                        let tag = format!(
                            "pos {pos} dim {rope_dim} ff {} head {h} pair {i}",
                            factors.is_some()
                        );
                        assert!(
                            (f64::from(y[a]) - want0).abs() < 2e-6 * (1.0 + want0.abs()),
                            "{tag}"
                        );
                        assert!(
                            (f64::from(y[b]) - want1).abs() < 2e-6 * (1.0 + want1.abs()),
                            "{tag}"
                        );
                    }
                }
            }
        }
    }
    // The iterated f32 angle is what ggml uses; at long positions it differs measurably from the exact one,
    // so a kernel computing `pos * base^(-2i/d)` directly would fail the checks above.
    let exact = 131_072.0 * 500_000f64.powf(-2.0 * 5.0 / 64.0);
    assert!((f64::from(ggml_theta(131_072, 5, 64, 500_000.0, None)) - exact).abs() > 1e-4);

    let mut x = vec![0.0; 64];
    assert!(rope(&mut x, 2, 64, 64, 0, 1e4, None).is_err());
    assert!(rope(&mut x, 1, 64, 63, 0, 1e4, None).is_err());
    assert!(rope(&mut x, 1, 64, 128, 0, 1e4, None).is_err());
    assert!(rope(&mut x, 1, 64, 64, 0, 1e4, Some(&[1.0; 31])).is_err());
    let mut c = RopeCache::new();
    c.compute(64, 5, 1e4, None).expect("cache");
    assert_eq!(c.rope_dim(), 64);
}

#[test]
fn silu_mul_and_softmax_match_f64() {
    let mut rng = Rng::new(7);
    for k in tables() {
        let mut g = rng.vec(1541, 4.0);
        // The SIMD exp's overflow / underflow branches (|n| > 126 and > 192).
        g[..6].copy_from_slice(&[-100.0, 100.0, -200.0, 95.0, -90.0, 0.0]);
        let u = rng.vec(1541, 1.0);
        let g0 = g.clone();
        k.silu_mul(&mut g, &u).expect("silu_mul");
        for i in 0..g.len() {
            let x = f64::from(g0[i]);
            let want = x / (1.0 + (-x).exp()) * f64::from(u[i]);
            let tag = format!("{:?} i={i} x={x}", k.isa());
            assert!(
                (f64::from(g[i]) - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{tag}: {} vs {want}",
                g[i]
            );
        }
        assert!(k.silu_mul(&mut g, &u[..3]).is_err());

        for n in [1, 7, 100, 4097] {
            let mut x = rng.vec(n, 5.0);
            if n > 10 {
                x[3] = -150.0;
            }
            let x0 = x.clone();
            k.softmax(&mut x);
            let max = x0
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let sum: f64 = x0.iter().map(|&v| (f64::from(v) - max).exp()).sum();
            for i in 0..n {
                let want = (f64::from(x0[i]) - max).exp() / sum;
                assert!(
                    (f64::from(x[i]) - want).abs() <= 1e-6 * want + 1e-9,
                    "{:?} n={n} i={i}",
                    k.isa()
                );
            }
        }
        k.softmax(&mut []);
    }
    let mut g = vec![1.0; 3];
    silu_mul(&mut g, &[1.0; 3]).expect("silu_mul");
    let mut x = vec![0.0; 4];
    softmax(&mut x);
    assert_eq!(x, vec![0.25; 4]);
}

/// f64 attention with Q rounded to f16 (as llama.cpp does before `K·Q`).
fn attention_ref(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    stride: usize,
    n_kv: usize,
    scale: f32,
) -> Vec<f64> {
    let d = q.len();
    let q16: Vec<f64> = q
        .iter()
        .map(|&x| f64::from(f16::from_f32(x).to_f32()))
        .collect();
    let s: Vec<f64> = (0..n_kv)
        .map(|j| {
            (0..d)
                .map(|i| q16[i] * f64::from(k[j * stride + i].to_f32()))
                .sum::<f64>()
                * f64::from(scale)
        })
        .collect();
    let m = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    (0..d)
        .map(|i| {
            (0..n_kv)
                .map(|j| e[j] * f64::from(v[j * stride + i].to_f32()))
                .sum::<f64>()
                / z
        })
        .collect()
}

fn f16_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<f16> {
    rng.vec(n, scale).into_iter().map(f16::from_f32).collect()
}

#[test]
fn attention_matches_f64() {
    let mut rng = Rng::new(8);
    for &(d, n_kv, stride) in &[(64, 1, 64), (64, 37, 192), (128, 300, 128), (80, 5, 96)] {
        let q = rng.vec(d, 1.0);
        let k = f16_vec(&mut rng, n_kv * stride, 1.0);
        let v = f16_vec(&mut rng, n_kv * stride, 1.0);
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0.0; d];
        attention(&q, &k, &v, stride, n_kv, scale, &mut out).expect("attention");
        let want = attention_ref(&q, &k, &v, stride, n_kv, scale);
        for i in 0..d {
            assert!(
                (f64::from(out[i]) - want[i]).abs() < 1e-5,
                "d={d} n_kv={n_kv} i={i}"
            );
        }
    }
    let mut out = vec![1.0; 64];
    attention(&[0.0; 64], &[], &[], 64, 0, 1.0, &mut out).expect("empty");
    assert!(out.iter().all(|&v| v == 0.0));
    assert!(
        attention(
            &[0.0; 64],
            &[f16::ZERO; 63],
            &[f16::ZERO; 64],
            64,
            1,
            1.0,
            &mut out
        )
        .is_err()
    );
    assert!(
        attention(
            &[0.0; 64],
            &[f16::ZERO; 64],
            &[f16::ZERO; 64],
            64,
            1,
            1.0,
            &mut out[..3]
        )
        .is_err()
    );
}

#[test]
fn attention_batch_is_causal_gqa_over_heads() {
    let mut rng = Rng::new(9);
    // (heads, kv heads, head_dim, n_past, n_tokens): SmolLM2's 9/3/64, MHA, a 16-head group (more than one
    // kernel call), a head_dim the blocked kernel does not take, and positions crossing 16-blocks.
    let cases = [
        (9, 3, 64, 11, 4),
        (4, 4, 128, 40, 3),
        (16, 1, 64, 0, 2),
        (6, 2, 80, 17, 2),
    ];
    for &(n_heads, n_kv_heads, head_dim, n_past, n_tokens) in &cases {
        let shape = AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
        };
        let group = n_heads / n_kv_heads;
        let kv_row = n_kv_heads * head_dim;
        let q_row = n_heads * head_dim;
        let k = f16_vec(&mut rng, (n_past + n_tokens) * kv_row, 1.0);
        let v = f16_vec(&mut rng, (n_past + n_tokens) * kv_row, 1.0);
        let q = rng.vec(n_tokens * q_row, 1.0);
        let scale = 1.0 / (head_dim as f32).sqrt();
        for (kt, threads) in tables().into_iter().flat_map(|k| [(k, 1), (k, 2)]) {
            let pool = Pool::new(threads);
            let mut out = vec![f32::NAN; n_tokens * q_row];
            kt.attention_batch(&pool, shape, &q, n_tokens, n_past, &k, &v, scale, &mut out)
                .expect("batch");
            for t in 0..n_tokens {
                for h in 0..n_heads {
                    let kvh = h / group;
                    let qh = &q[t * q_row + h * head_dim..][..head_dim];
                    let (ko, vo) = (&k[kvh * head_dim..], &v[kvh * head_dim..]);
                    let want = attention_ref(qh, ko, vo, kv_row, n_past + t + 1, scale);
                    let got = &out[t * q_row + h * head_dim..][..head_dim];
                    for i in 0..head_dim {
                        assert!(
                            (f64::from(got[i]) - want[i]).abs() < 1e-5,
                            "{:?} threads={threads} case {n_heads}/{n_kv_heads}/{head_dim} t={t} h={h} i={i}",
                            kt.isa()
                        );
                    }
                }
            }
        }
    }
    let shape = AttnShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let (n_past, n_tokens, q_row, kv_row) = (11, 4, 9 * 64, 3 * 64);
    let k = f16_vec(&mut rng, (n_past + n_tokens) * kv_row, 1.0);
    let v = k.clone();
    let q = rng.vec(n_tokens * q_row, 1.0);
    let scale = 0.125;
    let pool = Pool::new(1);
    let mut out = vec![0.0; n_tokens * q_row];
    let bad = AttnShape {
        n_kv_heads: 2,
        ..shape
    };
    assert!(attention_batch(&pool, bad, &q, n_tokens, n_past, &k, &v, scale, &mut out).is_err());
    assert!(
        attention_batch(
            &pool,
            shape,
            &q,
            n_tokens,
            n_past + 1,
            &k,
            &v,
            scale,
            &mut out
        )
        .is_err()
    );
    assert!(
        attention_batch(
            &pool,
            shape,
            &q[1..],
            n_tokens,
            n_past,
            &k,
            &v,
            scale,
            &mut out
        )
        .is_err()
    );
}
