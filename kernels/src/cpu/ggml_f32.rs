//! f32 reductions in the exact order of llama.cpp's portable AVX2 build, for attention over an f32 KV
//! cache: `ggml_vec_dot_f32` (four 8-lane FMA accumulators over 32-element steps, `GGML_F32x8_REDUCE`) and
//! llamafile's f32 tinyBLAS (one 8-lane FMA accumulator per output, `hsum`). The lanes are plain arrays:
//! compiled with FMA (chosen at run time) the compiler vectorizes them, and an FMA rounds the same either
//! way, so both builds give the same bits.

/// Which of llama.cpp's f32 matmul paths a sum over positions follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Order {
    /// `ggml_vec_dot_f32`: element `i` in lane `i % 8` of accumulator `(i / 8) % 4`.
    VecDot,
    /// tinyBLAS `<8, __m256>`: element `i` in lane `i % 8` of the one accumulator.
    TinyBlas,
}

/// Accumulators a weighted sum keeps per output element.
const LANES: usize = 32;

/// `a·b` as ggml's AVX2 `ggml_vec_dot_f32`; leftovers past the last 32-element step are FMA'd one by one
/// (GCC contracts ggml's `sumf += x[i]*y[i]`).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA (checked just above).
        return unsafe { dot_f32_fma(a, b) };
    }
    dot_f32_body(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn dot_f32_fma(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_body(a, b)
}

#[inline(always)]
fn dot_f32_body(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let np = n & !31;
    let mut sum = [[0.0f32; 8]; 4];
    for (x, y) in a[..np].chunks_exact(32).zip(b[..np].chunks_exact(32)) {
        for (j, s) in sum.iter_mut().enumerate() {
            for m in 0..8 {
                s[m] = x[8 * j + m].mul_add(y[8 * j + m], s[m]);
            }
        }
    }
    let mut r = reduce_vec_dot(|r, m| sum[r][m]);
    for (x, y) in a[np..n].iter().zip(&b[np..n]) {
        r = x.mul_add(*y, r);
    }
    r
}

/// `GGML_F32x8_REDUCE` of four 8-lane accumulators (`lane(r, m)`): 0+2 and 1+3, then 0+1, then the 128-bit
/// halves and two `hadd`s.
#[inline(always)]
fn reduce_vec_dot(lane: impl Fn(usize, usize) -> f32) -> f32 {
    let s: [f32; 8] =
        std::array::from_fn(|m| (lane(0, m) + lane(2, m)) + (lane(1, m) + lane(3, m)));
    let t: [f32; 4] = std::array::from_fn(|m| s[m] + s[m + 4]);
    (t[0] + t[1]) + (t[2] + t[3])
}

/// ggml's `hsum_float_8` / tinyBLAS `hsum` of one 8-lane accumulator: the 128-bit halves, then lanes two
/// apart, then the last two.
#[inline(always)]
fn hsum8(lane: impl Fn(usize) -> f32) -> f32 {
    let v: [f32; 4] = std::array::from_fn(|m| lane(m + 4) + lane(m));
    (v[0] + v[2]) + (v[1] + v[3])
}

/// `out[i] = Σ_j p[j] · v[j·stride + i]` for `j < p.len()`, each output's products summed in `order`, as
/// llama.cpp multiplies a transposed V by softmax weights (its row is zero-padded past `p.len()`, which
/// adds exact zeros). `acc` is scratch, grown to `32 · out.len()`.
pub fn weighted_rows_f32(
    out: &mut [f32],
    p: &[f32],
    v: &[f32],
    stride: usize,
    order: F32Order,
    acc: &mut Vec<f32>,
) {
    let d = out.len();
    assert!(
        p.is_empty() || (p.len() - 1) * stride + d <= v.len(),
        "weighted_rows_f32: {} rows of stride {stride} need {} values of v, got {}",
        p.len(),
        (p.len() - 1) * stride + d,
        v.len()
    );
    acc.clear();
    acc.resize(LANES * d, 0.0);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA (checked just above).
        unsafe { weighted_rows_fma(out, p, v, stride, order, acc) };
        return;
    }
    weighted_rows_body(out, p, v, stride, order, acc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn weighted_rows_fma(
    out: &mut [f32],
    p: &[f32],
    v: &[f32],
    stride: usize,
    order: F32Order,
    acc: &mut [f32],
) {
    weighted_rows_body(out, p, v, stride, order, acc);
}

/// `acc` holds 32 rows of `d` sums, row `8r + m` for lane `m` of accumulator `r`.
#[inline(always)]
fn weighted_rows_body(
    out: &mut [f32],
    p: &[f32],
    v: &[f32],
    stride: usize,
    order: F32Order,
    acc: &mut [f32],
) {
    let d = out.len();
    for (j, &pj) in p.iter().enumerate() {
        let r = match order {
            F32Order::VecDot => (j / 8) % 4,
            F32Order::TinyBlas => 0,
        };
        let row = &mut acc[(8 * r + j % 8) * d..][..d];
        for (a, &x) in row.iter_mut().zip(&v[j * stride..][..d]) {
            *a = x.mul_add(pj, *a);
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        let lane = |r: usize, m: usize| acc[(8 * r + m) * d + i];
        *o = match order {
            F32Order::VecDot => reduce_vec_dot(lane),
            F32Order::TinyBlas => hsum8(|m| lane(0, m)),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sums written out the long way, for lengths around the 8- and 32-element steps.
    #[test]
    fn orders_match_their_definitions() {
        let vals = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 / u32::MAX as f32 - 0.5
                })
                .collect()
        };
        for n in [1, 7, 8, 31, 32, 33, 64, 100] {
            let (a, b) = (vals(n, 1), vals(n, 7));
            let mut lanes = [[0.0f32; 8]; 4];
            let np = n & !31;
            for i in 0..np {
                let (r, m) = ((i / 8) % 4, i % 8);
                lanes[r][m] = a[i].mul_add(b[i], lanes[r][m]);
            }
            let s: Vec<f32> = (0..8)
                .map(|m| (lanes[0][m] + lanes[2][m]) + (lanes[1][m] + lanes[3][m]))
                .collect();
            let mut want = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
            for i in np..n {
                want = a[i].mul_add(b[i], want);
            }
            assert_eq!(dot_f32(&a, &b).to_bits(), want.to_bits(), "dot n={n}");

            // weighted rows: 3 outputs, rows of stride 5.
            let (d, stride) = (3, 5);
            let v = vals(n * stride, 3);
            let mut acc = Vec::new();
            for order in [F32Order::VecDot, F32Order::TinyBlas] {
                let mut out = vec![0.0; d];
                weighted_rows_f32(&mut out, &a, &v, stride, order, &mut acc);
                for (i, &o) in out.iter().enumerate() {
                    let mut l = [[0.0f32; 8]; 4];
                    for j in 0..n {
                        let r = if order == F32Order::VecDot {
                            (j / 8) % 4
                        } else {
                            0
                        };
                        l[r][j % 8] = v[j * stride + i].mul_add(a[j], l[r][j % 8]);
                    }
                    let want = if order == F32Order::VecDot {
                        let s: Vec<f32> = (0..8)
                            .map(|m| (l[0][m] + l[2][m]) + (l[1][m] + l[3][m]))
                            .collect();
                        ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))
                    } else {
                        let h: Vec<f32> = (0..4).map(|m| l[0][m + 4] + l[0][m]).collect();
                        (h[0] + h[2]) + (h[1] + h[3])
                    };
                    assert_eq!(o.to_bits(), want.to_bits(), "{order:?} n={n} i={i}");
                }
            }
        }
    }
}
