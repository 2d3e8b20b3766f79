//! Runtime CPU-feature detection and the per-ISA kernel tables (ggml's `type_traits_cpu[]`): one table per
//! instruction-set level, each filled by its module (`scalar`, `avx2`, `avx512`) and built once. The best
//! table the CPU supports is picked on first use; the others stay reachable for the conformance tests.
//!
//! Function pointers in the tables are `unsafe fn` because the SIMD ones are `#[target_feature]` functions:
//! a table is only handed out by [`Kernels::for_isa`] after `is_x86_feature_detected!` confirmed its
//! features, which is what makes calling through it sound.

use std::sync::OnceLock;

use super::layout::{N_TYPES, VecDotType, type_slot};
use super::{KernelError, check_len};
use crate::quant::GgmlType;

/// `dot(n, w, a)`: one weight row (`n` values of the table slot's type) · one activation row (its
/// `VecDotType`). Contract: see `scalar::dot`.
pub(crate) type DotFn = unsafe fn(usize, &[u8], &[u8]) -> f32;
/// `tile(n, w, w_stride, a, a_stride, out, out_stride)`: `R` weight rows `w_stride` bytes apart against `T`
/// activation rows `a_stride` bytes apart, writing `out[t * out_stride + r]`; `R × T` is fixed per table
/// slot (4×1 or 4×4). Contract: every row and token holds the bytes of `n` values, `out` is writable there.
pub(crate) type TileFn = unsafe fn(usize, *const u8, usize, *const u8, usize, *mut f32, usize);
/// `quantize(x, dst)`: f32 values to a `VecDotType`; `dst` holds exactly the bytes of `x.len()` values.
pub(crate) type QuantFn = unsafe fn(&[f32], &mut [u8]);
/// `axpy_f16(acc, v, s)`: `acc[i] += s * v[i]` with `v` f16 bytes of `acc.len()` values.
pub(crate) type AxpyF16Fn = unsafe fn(&mut [f32], &[u8], f32);
/// `attn_rows(q, out, tok_stride, rows, group, k, v, kv_stride, n_kv0, d, scale)`: attention of up to 16
/// query rows sharing one f16 KV head (contract in `avx512::attention`).
pub(crate) type AttnRowsFn = unsafe fn(
    *const f32,
    *mut f32,
    usize,
    usize,
    usize,
    *const u8,
    *const u8,
    usize,
    usize,
    usize,
    f32,
);
/// `silu_mul(gate, up)`: `gate[i] = silu(gate[i]) * up[i]`, `up.len() >= gate.len()`.
pub(crate) type SiluMulFn = unsafe fn(&mut [f32], &[f32]);
/// `exp_sum(x, max)`: `x[i] = exp(x[i] - max)`, returns the f64 sum.
pub(crate) type ExpSumFn = unsafe fn(&mut [f32], f32) -> f64;

/// Instruction-set levels with their own kernel table, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust; the reference for everything.
    Scalar,
    /// AVX2 + FMA + F16C (Haswell / Zen 1 and later): ggml-style dot products for all 13 types, Q8_0 / Q8_1 /
    /// F16 / BF16 activation converters, SwiGLU and softmax `exp`, the packed (16-row interleaved) matmul
    /// with `maddubs` tiles, and blocked attention.
    Avx2,
    /// AVX-512 F/BW/VL/DQ (Skylake-X and later), no VNNI: adds 512-bit F32 / F16 / BF16 tiles, the Q8_K
    /// converter, `exp`, and blocked attention; quantized dots and the packed matmul stay AVX2.
    Avx512,
    /// AVX-512 with VNNI (`vpdpbusd`; Ice Lake, Zen 4, Sapphire Rapids): adds 4-row tiles for Q4_0 / Q4_1 /
    /// Q8_0 and the packed (16-row interleaved) matmul for Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K / F32 / F16 /
    /// BF16, with `vdpbf16ps` for BF16 where AVX512-BF16 is present.
    Avx512Vnni,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni];

    /// Whether this CPU can run the level's kernels.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => Isa::Avx512.is_available() && is_x86_feature_detected!("avx512vnni"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every level this CPU supports.
    pub fn available() -> Vec<Isa> {
        Self::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The name `TESSERA_ISA` takes for this level.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }

    /// The level cap set by `TESSERA_ISA` ([`ISA_ENV`]), `None` when unset or empty. A name that is not a
    /// level, or a level this CPU cannot run, is an error naming the levels it can.
    pub fn cap_from_env() -> Result<Option<Isa>, IsaEnvError> {
        match std::env::var(ISA_ENV) {
            Ok(v) if !v.trim().is_empty() => Isa::cap_from(v.trim()).map(Some),
            _ => Ok(None),
        }
    }

    fn cap_from(name: &str) -> Result<Isa, IsaEnvError> {
        let available = || {
            Isa::available()
                .into_iter()
                .map(Isa::name)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let isa = Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| IsaEnvError {
                value: name.to_string(),
                reason: "not a kernel level",
                available: available(),
            })?;
        if isa.is_available() {
            Ok(isa)
        } else {
            Err(IsaEnvError {
                value: name.to_string(),
                reason: "this CPU lacks its instructions",
                available: available(),
            })
        }
    }
}

/// Caps the kernel level below what the CPU offers, e.g. `TESSERA_ISA=avx2` to run (and benchmark) the
/// kernels an AVX2-only server would get on an AVX-512 machine. Read once, on the first kernel call.
pub const ISA_ENV: &str = "TESSERA_ISA";

/// A `TESSERA_ISA` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ISA_ENV}={value}: {reason} (this CPU runs: {available})")]
pub struct IsaEnvError {
    value: String,
    reason: &'static str,
    available: String,
}

/// One ISA level's kernels: a dot product per weight type, optional multi-row / multi-token tiles, and the
/// activation converters. Obtain with [`Kernels::best`] or [`Kernels::for_isa`].
#[derive(Clone, Copy)]
pub struct Kernels {
    pub(crate) isa: Isa,
    pub(crate) dot: [DotFn; N_TYPES],
    /// 4 rows × 1 token (decode).
    pub(crate) tile4x1: [Option<TileFn>; N_TYPES],
    /// 4 rows × 4 tokens (prefill).
    pub(crate) tile4x4: [Option<TileFn>; N_TYPES],
    pub(crate) quantize: [QuantFn; 6],
    pub(crate) axpy_f16: AxpyF16Fn,
    /// The matmul over interleaved weights (`cpu::packed`), where the level has one.
    pub(crate) packed: Option<super::packed::PackedMatmulFn>,
    /// The types `packed` multiplies (and `pack` interleaves).
    pub(crate) packed_types: &'static [GgmlType],
    /// Blocked multi-head attention, where the level has one (else a per-position loop over `dot` and
    /// `axpy_f16`).
    pub(crate) attn_rows: Option<AttnRowsFn>,
    pub(crate) silu_mul: SiluMulFn,
    pub(crate) exp_sum: ExpSumFn,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").field("isa", &self.isa).finish()
    }
}

static TABLES: [OnceLock<Option<Kernels>>; 4] = [
    OnceLock::new(),
    OnceLock::new(),
    OnceLock::new(),
    OnceLock::new(),
];
static BEST: OnceLock<&'static Kernels> = OnceLock::new();

impl Kernels {
    /// The table of the highest level this CPU supports, capped by `TESSERA_ISA` when it is set to a
    /// level the CPU can run (chosen once). Binaries check the variable with [`Isa::cap_from_env`] at
    /// start, so a bad value is reported there rather than ignored here.
    pub fn best() -> &'static Kernels {
        BEST.get_or_init(|| {
            let cap = Isa::cap_from_env()
                .ok()
                .flatten()
                .unwrap_or(Isa::Avx512Vnni);
            Isa::ALL
                .into_iter()
                .rev()
                .filter(|&i| i as usize <= cap as usize)
                .find_map(Kernels::for_isa)
                .unwrap_or_else(|| unreachable_scalar())
        })
    }

    /// The table of `isa`, or `None` when this CPU lacks its features.
    pub fn for_isa(isa: Isa) -> Option<&'static Kernels> {
        TABLES[isa as usize]
            .get_or_init(|| isa.is_available().then(|| build(isa)))
            .as_ref()
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// `Σ w[i]·a[i]` of one weight row of type `ty` and one activation row already converted to
    /// `VecDotType::of(ty)` (see [`Kernels::quantize_activations`]), over `n` values.
    pub fn vec_dot(&self, ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> Result<f32, KernelError> {
        check_len("weight row bytes", ty.bytes_for(n)?, w.len())?;
        let vt = VecDotType::of(ty);
        check_len("activation bytes", vt.bytes_for(n), a.len())?;
        // SAFETY: lengths checked above; the table exists only if its CPU features were detected.
        Ok(unsafe { (self.dot[type_slot(ty)])(n, w, a) })
    }

    /// Converts f32 activations to `ty` (a multiple of its block size) into `dst` (exactly its bytes).
    pub fn quantize_activations(
        &self,
        ty: VecDotType,
        x: &[f32],
        dst: &mut [u8],
    ) -> Result<(), KernelError> {
        if !x.len().is_multiple_of(ty.block_size()) {
            return Err(KernelError::Shape {
                what: "activation length (must be a multiple of the block size)",
                expected: x.len().next_multiple_of(ty.block_size()),
                got: x.len(),
            });
        }
        check_len("activation bytes", ty.bytes_for(x.len()), dst.len())?;
        // SAFETY: lengths checked; features detected.
        unsafe { (self.quantize[ty.slot()])(x, dst) };
        Ok(())
    }
}

fn unreachable_scalar() -> &'static Kernels {
    // `Isa::Scalar` is always available, so `for_isa` never returns `None` for it.
    static SCALAR: OnceLock<Kernels> = OnceLock::new();
    SCALAR.get_or_init(super::scalar::kernels)
}

fn build(isa: Isa) -> Kernels {
    match isa {
        Isa::Scalar => super::scalar::kernels(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => super::avx2::kernels(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => super::avx512::kernels(false),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => super::avx512::kernels(true),
        #[cfg(not(target_arch = "x86_64"))]
        _ => super::scalar::kernels(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isa_cap_names_every_level_and_refuses_others() {
        for isa in Isa::available() {
            assert_eq!(Isa::cap_from(isa.name()), Ok(isa));
            assert_eq!(Isa::cap_from(&isa.name().to_uppercase()), Ok(isa));
        }
        let err = Isa::cap_from("sse4").unwrap_err().to_string();
        assert!(
            err.starts_with("TESSERA_ISA=sse4: not a kernel level (this CPU runs: scalar"),
            "{err}"
        );
        if let Some(missing) = Isa::ALL.into_iter().find(|i| !i.is_available()) {
            let err = Isa::cap_from(missing.name()).unwrap_err().to_string();
            assert!(err.contains("this CPU lacks its instructions"), "{err}");
        }
    }
}
