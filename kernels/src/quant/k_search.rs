//! Scale searches shared by the k-quant reference quantizers: ports of `nearest_int`, `make_qx_quants`,
//! `make_q3_quants` and `make_qkx2_quants` from ggml's `ggml-quants.c`, without importance weights (the
//! `quant_weights == NULL` paths that `quantize_row_q*_K_ref` take).
//!
//! Each search picks, for one sub-block, a scale (and for the "x = d*q - m" types a min) plus the integer
//! levels `L` that minimize a weighted squared (or absolute) error. The float operations are written in
//! ggml's order, one rounding per C operator and no fused multiply-add, so the results are bit-identical to a
//! C build with `-ffp-contract=off`. (A C build that contracts `a*b + c` into FMA can differ in the last
//! bit of a sum and therefore, rarely, in a chosen level.)

/// Below this magnitude a group counts as all zero (ggml's `GROUP_MAX_EPS`).
pub(crate) const GROUP_MAX_EPS: f32 = 1e-15;

/// Round to nearest, ties to even, for `|x| <= 4194303` (ggml's `nearest_int`): adding 1.5 * 2^23 moves the
/// integer part into the low mantissa bits. Outside that range ggml asserts; here the result is merely
/// meaningless (callers clamp it), never a panic. NaN gives 0.
#[inline]
pub(crate) fn nearest_int(x: f32) -> i32 {
    let bits = (x + 12_582_912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// The element of largest magnitude, with its sign (first one on ties, as ggml's strict `>`).
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    (amax, max)
}

/// Symmetric levels in `-nmax..nmax` weighted by `x^2` (`make_qx_quants` with `rmse_type == 1` and no
/// `qw`), as Q6_K uses. Writes `l + nmax` to `levels`; returns the scale.
pub(crate) fn make_qx_quants(nmax: i32, x: &[f32], levels: &mut [i8]) -> f32 {
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // Sums of w*x*l and w*l*l with w = x^2, in ggml's operator order.
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let set_levels = |iscale: f32, levels: &mut [i8]| {
        for (out, &v) in levels.iter_mut().zip(x) {
            *out = (nmax + level(iscale, v)) as i8;
        }
    };

    let iscale = -(nmax as f32) / max;
    set_levels(iscale, levels);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            set_levels(iscale, levels);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Symmetric levels for Q3_K (`make_q3_quants` with `do_rmse`): start from the max-based scale, then up to
/// five passes of coordinate descent moving one level at a time while the weighted fit improves. Writes
/// `l + nmax` to `levels`; returns the scale.
pub(crate) fn make_q3_quants(nmax: i32, x: &[f32], levels: &mut [i8]) -> f32 {
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (out, &v) in levels.iter_mut().zip(x) {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *out = l as i8;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for (cur, &v) in levels.iter_mut().zip(x) {
            let w = v * v;
            let old = f32::from(*cur);
            let mut slx = sumlx - w * v * old;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * old * old;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != i32::from(*cur) {
                    let nl = new_l as f32;
                    slx += w * v * nl;
                    sl2 += w * nl * nl;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *cur = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for l in levels.iter_mut() {
        *l += nmax as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// Parameters of the asymmetric search: candidate inverse scales are `(rmin + rdelta*is + nmax) / (max - min)`
/// for `is` in `0..=nstep`; `use_mad` minimizes absolute instead of squared error.
pub(crate) struct Qkx2Search {
    pub nmax: i32,
    pub rmin: f32,
    pub rdelta: f32,
    pub nstep: i32,
    pub use_mad: bool,
}

/// Asymmetric levels `0..=nmax` for `x ~ scale * l - min` (`make_qkx2_quants`), as Q2_K, Q4_K and Q5_K use.
/// Each candidate scale is refined by a weighted least-squares fit of scale and min (min clamped to <= 0,
/// i.e. an offset that never pushes values up). Writes the levels; returns `(scale, -min)`.
pub(crate) fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    levels: &mut [u8],
    search: &Qkx2Search,
) -> (f32, f32) {
    let Qkx2Search {
        nmax,
        rmin,
        rdelta,
        nstep,
        use_mad,
    } = *search;
    let (Some(&x0), Some(&w0)) = (x.first(), weights.first()) else {
        return (0.0, 0.0);
    };
    let (mut min, mut max) = (x0, x0);
    let mut sum_w = w0;
    let mut sum_x = sum_w * x0;
    for (&v, &w) in x.iter().zip(weights).skip(1) {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let error = |scale: f32, min: f32, levels: &[u8]| {
        let mut err = 0.0f32;
        for ((&l, &v), &w) in levels.iter().zip(x).zip(weights) {
            let diff = scale * f32::from(l) + min - v;
            err += w * if use_mad { diff.abs() } else { diff * diff };
        }
        err
    };
    let quantize_with = |iscale: f32, min: f32, out: &mut [u8]| {
        for (l, &v) in out.iter_mut().zip(x) {
            *l = nearest_int(iscale * (v - min)).clamp(0, nmax) as u8;
        }
    };

    let iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    quantize_with(iscale, min, levels);
    let mut best_error = error(scale, min, levels);
    if nstep < 1 {
        return (scale, -min);
    }
    let mut aux = [0u8; 32];
    let Some(aux) = aux.get_mut(..x.len()) else {
        return (scale, -min);
    };
    for is in 0..=nstep {
        let iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        quantize_with(iscale, min, aux);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for ((&l, &v), &w) in aux.iter().zip(x).zip(weights) {
            let l = f32::from(l);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let cur_error = error(this_scale, this_min, aux);
            if cur_error < best_error {
                levels.copy_from_slice(aux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-2.6), -3);
        assert_eq!(nearest_int(4_194_303.0), 4_194_303);
        assert_eq!(nearest_int(f32::NAN), 0);
    }

    #[test]
    fn qkx2_fits_an_exact_grid() {
        // Values already on a 4-bit grid with offset: the search must reproduce them exactly.
        let x: Vec<f32> = (0..32).map(|i| (i % 16) as f32 * 0.25 - 1.0).collect();
        let w = vec![1.0f32; 32];
        let mut l = [0u8; 32];
        let search = Qkx2Search {
            nmax: 15,
            rmin: -1.0,
            rdelta: 0.1,
            nstep: 20,
            use_mad: false,
        };
        let (scale, neg_min) = make_qkx2_quants(&x, &w, &mut l, &search);
        for (&q, &v) in l.iter().zip(&x) {
            assert!((scale * f32::from(q) - neg_min - v).abs() < 1e-6);
        }
    }

    #[test]
    fn all_zero_groups_give_zero_levels() {
        let x = [0.0f32; 16];
        let mut l = [7i8; 16];
        assert_eq!(make_qx_quants(32, &x, &mut l), 0.0);
        assert_eq!(l, [0; 16]);
        let mut l = [7i8; 16];
        assert_eq!(make_q3_quants(4, &x, &mut l), 0.0);
        assert_eq!(l, [0; 16]);
    }
}
