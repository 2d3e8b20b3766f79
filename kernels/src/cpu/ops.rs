//! Element-wise and row operations of the Llama block: RMS norm, RoPE, SwiGLU and softmax, each matching the
//! f32 path of ggml's CPU backend (`ggml-cpu/ops.cpp`, `vec.h`) to float rounding.

use super::{KernelError, Kernels, check_len};

/// `out = x / sqrt(mean(x²) + eps) * weight`, per row of `weight.len()` values (`x` may hold many rows).
///
/// Matches `ggml_compute_forward_rms_norm_f32` fused with the weight multiply: squares in f32 summed in f64,
/// `mean = (f32)(sum / n)`, `scale = 1 / sqrtf(mean + eps)`, `out = (x * scale) * w`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<(), KernelError> {
    let n = weight.len();
    if n == 0 {
        return Err(KernelError::Invalid("rms_norm: empty weight"));
    }
    check_len("rms_norm output length", x.len(), out.len())?;
    if !x.len().is_multiple_of(n) {
        return Err(KernelError::Shape {
            what: "rms_norm input length (a multiple of weight.len())",
            expected: x.len().next_multiple_of(n),
            got: x.len(),
        });
    }
    for (xr, yr) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum: f64 = xr.iter().map(|&v| f64::from(v * v)).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((y, &v), &g) in yr.iter_mut().zip(xr).zip(weight) {
            *y = v * scale * g;
        }
    }
    Ok(())
}

/// Precomputed RoPE angles for one position: `cos`/`sin` pairs of the first `rope_dim` dimensions, as
/// ggml's `ggml_rope_cache_init` builds them. Compute once per token and apply to every Q and K head.
#[derive(Debug, Clone, Default)]
pub struct RopeCache {
    /// `[cos θ_0, sin θ_0, cos θ_1, sin θ_1, ...]`, `rope_dim` values.
    cs: Vec<f32>,
}

impl RopeCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// `[cos θ_0, sin θ_0, cos θ_1, sin θ_1, ...]` (`rope_dim` values): what a device kernel needs to rotate
    /// exactly as [`RopeCache::apply`] does.
    pub fn cos_sin(&self) -> &[f32] {
        &self.cs
    }

    /// Fills the cache for position `pos`: `θ_i = pos · base^(-2i/rope_dim) / freq_factors[i]`.
    ///
    /// The power is formed as ggml does so that long positions agree: `theta_scale = powf(base,
    /// -2/rope_dim)`, `θ = pos` (as f32) multiplied by `theta_scale` once per pair in f32, divided by the
    /// frequency factor, then `cosf`/`sinf` (ext_factor 0, freq_scale 1, attn_factor 1).
    pub fn compute(
        &mut self,
        rope_dim: usize,
        pos: usize,
        base: f32,
        freq_factors: Option<&[f32]>,
    ) -> Result<(), KernelError> {
        if rope_dim == 0 || !rope_dim.is_multiple_of(2) {
            return Err(KernelError::Invalid(
                "rope: rope_dim must be even and non-zero",
            ));
        }
        if let Some(ff) = freq_factors
            && ff.len() < rope_dim / 2
        {
            return Err(KernelError::Shape {
                what: "rope freq_factors length (rope_dim / 2)",
                expected: rope_dim / 2,
                got: ff.len(),
            });
        }
        let theta_scale = base.powf(-2.0 / rope_dim as f32);
        self.cs.resize(rope_dim, 0.0);
        let mut theta = pos as f32;
        for (i, cs) in self.cs.chunks_exact_mut(2).enumerate() {
            let ff = freq_factors.map_or(1.0, |f| f[i]);
            let t = theta / ff;
            cs[0] = t.cos();
            cs[1] = t.sin();
            theta *= theta_scale;
        }
        Ok(())
    }

    /// The rotated dimensions this cache covers.
    pub fn rope_dim(&self) -> usize {
        self.cs.len()
    }

    /// Rotates adjacent pairs `(x[2i], x[2i+1])` of the first `rope_dim` dims of each of the `n_heads` heads
    /// of `head_dim` in `x` (one token), ggml's `rotate_pairs` in NORM mode; dims past `rope_dim` are kept.
    pub fn apply(&self, x: &mut [f32], n_heads: usize, head_dim: usize) -> Result<(), KernelError> {
        check_len(
            "rope input length (n_heads * head_dim)",
            n_heads * head_dim,
            x.len(),
        )?;
        if self.cs.len() > head_dim || self.cs.is_empty() {
            return Err(KernelError::Invalid(
                "rope: rope_dim must be in 2..=head_dim (compute first)",
            ));
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has FMA (checked just above).
            unsafe { rotate_heads_fma(x, head_dim, &self.cs) };
            return Ok(());
        }
        rotate_heads(x, head_dim, &self.cs);
        Ok(())
    }
}

/// The pair rotation as llama.cpp's x86 builds compile `rotate_pairs` (GCC contracts it into FMAs:
/// `x0·cos − (x1·sin)` and `x0·sin + (x1·cos)` with the bracketed products rounded), so that rotated
/// queries and keys are bit-identical to theirs.
#[inline(always)]
fn rotate_heads(x: &mut [f32], head_dim: usize, cs: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (p, cs) in head.chunks_exact_mut(2).zip(cs.chunks_exact(2)) {
            let (x0, x1) = (p[0], p[1]);
            p[0] = x0.mul_add(cs[0], -(x1 * cs[1]));
            p[1] = x0.mul_add(cs[1], x1 * cs[0]);
        }
    }
}

/// [`rotate_heads`] compiled with FMA, so `mul_add` is one instruction rather than a libm call (the
/// results are the same: a fused multiply-add is exact either way).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn rotate_heads_fma(x: &mut [f32], head_dim: usize, cs: &[f32]) {
    rotate_heads(x, head_dim, cs);
}

/// RoPE in llama.cpp's "normal" mode (`GGML_ROPE_TYPE_NORM`: adjacent pairs, which the GGUF Q/K row order
/// makes equal to HF's `rotate_half`) over `n_heads` heads of `head_dim` in `x` (one token), rotating the
/// first `rope_dim` dims by `θ_i = pos · base^(-2i/rope_dim) / freq_factors[i]` (Llama 3.1 `rope_freqs`;
/// `None` = 1). See [`RopeCache`] to compute the angles once for Q and K.
pub fn rope(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    rope_dim: usize,
    pos: usize,
    base: f32,
    freq_factors: Option<&[f32]>,
) -> Result<(), KernelError> {
    let mut cache = RopeCache::new();
    cache.compute(rope_dim, pos, base, freq_factors)?;
    cache.apply(x, n_heads, head_dim)
}

/// `gate[i] = silu(gate[i]) * up[i]` with `silu(x) = x / (1 + exp(-x))` (ggml's `ggml_vec_swiglu_f32`,
/// whose SIMD `exp` is ported per ISA so results match the same llama.cpp build).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) -> Result<(), KernelError> {
    Kernels::best().silu_mul(gate, up)
}

/// In-place softmax as `ggml_vec_soft_max_f32`: `exp(x - max)` (ggml's SIMD `exp` per ISA), summed in f64,
/// scaled by `1 / sum`. An empty slice is left alone; a row of `-inf` gives NaN like ggml.
pub fn softmax(x: &mut [f32]) {
    Kernels::best().softmax(x);
}

impl Kernels {
    /// [`silu_mul`] with this table's kernel.
    pub fn silu_mul(&self, gate: &mut [f32], up: &[f32]) -> Result<(), KernelError> {
        check_len("silu_mul up length", gate.len(), up.len())?;
        // SAFETY: lengths equal; the table's features were detected.
        unsafe { (self.silu_mul)(gate, up) };
        Ok(())
    }

    /// [`softmax`] with this table's kernel.
    pub fn softmax(&self, x: &mut [f32]) {
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        // SAFETY: the table's features were detected.
        let sum = unsafe { (self.exp_sum)(x, max) };
        softmax_scale(x, sum);
    }
}

fn softmax_scale(x: &mut [f32], sum: f64) {
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}
