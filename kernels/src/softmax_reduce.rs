//! Vectorizable exponentials and reductions over a vocabulary of logits (128,256 for Llama 3), used by the
//! coordinator's sampler: it runs once per generated token, and libm's scalar `exp` over the whole vocabulary costs about a
//! millisecond (about 50 µs here with AVX-512).
//!
//! Pure arithmetic in a summation order fixed by the source (16 lanes, then the lanes in order), never
//! contracted into FMA, so every instruction set gives bit-identical results: a seed means the same tokens
//! on every machine. The AVX2 / AVX-512 builds of the same code are chosen at run time (no
//! `target-cpu=native`: cluster nodes are mixed).

/// Lanes of the chunked reductions.
const LANES: usize = 16;
/// Elements per f32 partial sum before it is added into the f64 total (bounds the f32 rounding error).
const BLOCK: usize = 4096;

/// e^x with Cephes' `expf` polynomial (relative error below 1e-7 on [-87, 88]). Inputs are clamped to
/// that range, so -inf gives about 1.6e-38, which is harmless in a sum of probabilities. Not for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5 * 2^23 rounds to the nearest integer with plain adds (a rounding instruction needs SSE4.1),
    // and leaves that integer in the low mantissa bits: bits(t) = 0x4B40_0000 + n.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // ln 2 split in two (Cephes C1, C2) so that x - n ln 2 loses no bits.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n for n in [-126, 127], built in the exponent field.
    y * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23)
}

/// Largest value (NaN-free input); -inf for an empty slice.
pub fn max(values: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    rest.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Σ e^((v - shift) · scale): f32 lanes within blocks of 4096, f64 across blocks.
#[inline(always)]
fn sum_exp_generic(values: &[f32], shift: f32, scale: f32) -> f64 {
    let mut total = 0f64;
    for block in values.chunks(BLOCK) {
        let mut acc = [0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        for &v in chunks.remainder() {
            total += f64::from(exp((v - shift) * scale));
        }
        for c in chunks {
            for j in 0..LANES {
                acc[j] += exp((c[j] - shift) * scale);
            }
        }
        total += acc.iter().map(|&a| f64::from(a)).sum::<f64>();
    }
    total
}

/// Replaces each v by e^((v - shift) · scale).
#[inline(always)]
fn exp_in_place_generic(values: &mut [f32], shift: f32, scale: f32) {
    for v in values {
        *v = exp((*v - shift) * scale);
    }
}

/// Defines `$name` calling `$generic` compiled for AVX-512F or AVX2 when the CPU has them.
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $generic:ident) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F, checked on the line above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked on the line above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

dispatch!(
    /// Σ e^((v - shift) · scale), in f64.
    sum_exp(values: &[f32], shift: f32, scale: f32) -> f64 = sum_exp_generic
);
dispatch!(
    /// Replaces each v by e^((v - shift) · scale): unnormalised softmax weights.
    exp_in_place(values: &mut [f32], shift: f32, scale: f32) -> () = exp_in_place_generic
);

/// ln Σ e^v over `values` (NaN-free), or `None` when no value is finite.
pub fn log_sum_exp(values: &[f32]) -> Option<f64> {
    let m = max(values);
    m.is_finite()
        .then(|| f64::from(m) + sum_exp(values, m, 1.0).ln())
}

/// A logit as sampling reads it: NaN is impossible (-inf), +inf merely the largest (`f32::MAX`, which keeps
/// the arithmetic finite). The coordinator's sampler and a last stage's best-logits rows both use it.
#[inline]
pub fn sampling_logit(l: f32) -> f32 {
    match l {
        l if l.is_nan() => f32::NEG_INFINITY,
        f32::INFINITY => f32::MAX,
        l => l,
    }
}

/// Descending by logit, ties by ascending id: a total order, so truncation is deterministic.
pub fn by_logit_desc(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The `m` best finite logits as (logit, id), sorted by `by_logit_desc`, in one pass: a heap of the best
/// so far whose worst entry is the bar to beat. Scanning in id order, an equal logit never beats the bar
/// (its id is higher), so most of the vocabulary is rejected by one comparison. Ids count from `first_id`
/// (a vocabulary slice's first row).
pub fn top_m(work: &[f32], m: usize, first_id: u32) -> Vec<(f32, u32)> {
    /// Ordered so that the heap's maximum is the worst kept candidate.
    #[derive(PartialEq)]
    struct Worst((f32, u32));
    impl Eq for Worst {}
    impl PartialOrd for Worst {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Worst {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            by_logit_desc(&self.0, &other.0)
        }
    }
    if m == 0 {
        return Vec::new();
    }
    let mut heap = std::collections::BinaryHeap::with_capacity(m + 1);
    let mut bar = f32::NEG_INFINITY;
    for (i, &l) in work.iter().enumerate() {
        if !l.is_finite() || (heap.len() == m && l <= bar) {
            continue;
        }
        heap.push(Worst((l, first_id + i as u32)));
        if heap.len() > m {
            heap.pop();
        }
        if heap.len() == m {
            bar = heap.peek().map_or(f32::NEG_INFINITY, |w| w.0.0);
        }
    }
    let mut out: Vec<(f32, u32)> = heap.into_iter().map(|w| w.0).collect();
    out.sort_unstable_by(by_logit_desc);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.013;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
        assert!(exp(-1000.0) < 1e-37);
    }

    #[test]
    fn reductions() {
        let v: Vec<f32> = (0..10_003)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        assert_eq!(max(&v), v.iter().copied().fold(f32::MIN, f32::max));
        let want: f64 = v.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln();
        assert!((log_sum_exp(&v).unwrap() - want).abs() < 1e-6);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), None);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let mut w = v.clone();
        exp_in_place(&mut w, 1.0, 0.5);
        assert_eq!(w[7], exp((v[7] - 1.0) * 0.5));
    }

    #[test]
    fn dispatch_gives_the_generic_bits() {
        // The dispatched build (AVX-512 or AVX2 on most x86 machines) against the baseline build of the same
        // code: the summation order is fixed by the source, so the bits agree.
        let v: Vec<f32> = (0..9_999)
            .map(|i| ((i * 7919 % 1000) as f32 / 100.0).sin() * 9.0)
            .collect();
        assert_eq!(
            sum_exp_generic(&v, 2.0, 1.3).to_bits(),
            sum_exp(&v, 2.0, 1.3).to_bits()
        );
        let (mut a, mut b) = (v.clone(), v.clone());
        exp_in_place_generic(&mut a, 2.0, 1.3);
        exp_in_place(&mut b, 2.0, 1.3);
        assert_eq!(a, b);
    }
}
