//! Scalar element-wise kernels with a SIMD twin per ISA: SwiGLU and the exponentials of softmax. The scalar
//! versions use libm `expf`, as ggml's scalar tails do.

/// `gate[i] = gate[i] / (1 + exp(-gate[i])) * up[i]` (ggml's `ggml_silu_f32` times `up`).
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `x[i] = exp(x[i] - max)`, returning `Σ x[i]` in f64 (`ggml_vec_soft_max_f32`).
pub(crate) fn exp_sum(x: &mut [f32], max: f32) -> f64 {
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    sum
}
