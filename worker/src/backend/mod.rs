//! Where a shard runs: the [`Device`] a worker is given (`--device cpu` or `--device cuda:N`) and the
//! [`Backend`] interface the forward pass (`forward.rs`) is written against, so that one piece of code runs
//! the llama graph on every device.
//!
//! The interface is a small register machine: the engine's activations are named buffers ([`Buf`]) that a
//! backend keeps wherever its kernels read them (host memory for the CPU, device memory for CUDA), and
//! weights are named tensors ([`Tensor`]) that a backend resolves against its own copy (the CPU reads the
//! memory-mapped or packed [`Weights`]; CUDA uploads them once). Naming buffers instead of passing slices
//! lets a backend hand out an input and an output of the same pool at once without aliasing.
//!
//! - [`cpu`]: `CpuBackend`, the `tessera_kernels::cpu` kernels on a thread pool.
//! - `cuda`: `CudaBackend`, the `tessera_kernels::cuda` kernels on one NVIDIA GPU.
//! - [`nccl`]: the NCCL unique id and communicator of a tensor-parallel group of GPU ranks.

pub(crate) mod cpu;
pub(crate) mod cuda;
pub mod nccl;

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use tessera_kernels::cpu::{AttnShape, RopeCache};

use crate::collective::Collective;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::weights::{Matrix, Weights};

/// The device a worker runs its shard on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// This machine's CPU cores, with the SIMD kernels the CPU supports (chosen at run time).
    #[default]
    Cpu,
    /// An NVIDIA GPU by CUDA ordinal (`cuda:0` is the first visible GPU).
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!(
                "unknown device {s:?}: expected `cpu`, `cuda` or `cuda:N` (N = GPU ordinal, e.g. cuda:0)"
            )
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => {
                let n = other
                    .strip_prefix("cuda:")
                    .ok_or_else(bad)?
                    .parse()
                    .map_err(|_| bad())?;
                Ok(Device::Cuda(n))
            }
        }
    }
}

pub use nccl::unique_id as nccl_unique_id;

/// The engine's activation buffers (see `engine::Buffers` for their shapes). Rows are tokens, row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Buf {
    /// [T, E] residual stream.
    X,
    /// [T, E] normed input of a sub-block, then a partial output projection before the all-reduce.
    Xb,
    /// [T, Q] queries.
    Q,
    /// [T, K] keys.
    K,
    /// [T, K] values.
    V,
    /// [T, Q] attention output.
    Att,
    /// [T, F] gate projection, then silu(gate) · up.
    Gate,
    /// [T, F] up projection.
    Up,
    /// [L, E] final-normed hidden states of the tokens that want logits.
    Xl,
    /// [L, V] logits of this rank's vocabulary slice.
    Logits,
}

impl Buf {
    pub(crate) const ALL: [Buf; 10] = [
        Buf::X,
        Buf::Xb,
        Buf::Q,
        Buf::K,
        Buf::V,
        Buf::Att,
        Buf::Gate,
        Buf::Up,
        Buf::Xl,
        Buf::Logits,
    ];
}

/// A weight tensor of the shard, by role (layer indices are local: 0 is the stage's first layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tensor {
    AttnNorm(usize),
    AttnQ(usize),
    AttnK(usize),
    AttnV(usize),
    AttnOutput(usize),
    FfnNorm(usize),
    FfnGate(usize),
    FfnUp(usize),
    FfnDown(usize),
    OutputNorm,
    LmHead,
}

impl Weights<'_> {
    /// The matrix a [`Tensor`] names; `None` for norms and tensors this shard does not hold.
    pub(crate) fn matrix(&self, t: Tensor) -> Option<&Matrix<'_>> {
        let block = |l: usize| self.blocks.get(l);
        match t {
            Tensor::AttnQ(l) => block(l).map(|b| &b.attn_q),
            Tensor::AttnK(l) => block(l).map(|b| &b.attn_k),
            Tensor::AttnV(l) => block(l).map(|b| &b.attn_v),
            Tensor::AttnOutput(l) => block(l).map(|b| &b.attn_output),
            Tensor::FfnGate(l) => block(l).map(|b| &b.ffn_gate),
            Tensor::FfnUp(l) => block(l).map(|b| &b.ffn_up),
            Tensor::FfnDown(l) => block(l).map(|b| &b.ffn_down),
            Tensor::LmHead => self.lm_head(),
            Tensor::AttnNorm(_) | Tensor::FfnNorm(_) | Tensor::OutputNorm => None,
        }
    }

    /// The norm weights a [`Tensor`] names; `None` for matrices and norms this shard does not hold.
    pub(crate) fn norm(&self, t: Tensor) -> Option<&[f32]> {
        match t {
            Tensor::AttnNorm(l) => self.blocks.get(l).map(|b| &b.attn_norm[..]),
            Tensor::FfnNorm(l) => self.blocks.get(l).map(|b| &b.ffn_norm[..]),
            Tensor::OutputNorm => self.output_norm.as_deref(),
            _ => None,
        }
    }
}

/// One sequence's attention call: its tokens' rows in the batch buffers and its cache positions.
#[derive(Debug, Clone)]
pub(crate) struct SeqAttention {
    /// Index of the sequence in the batch (for messages).
    pub index: usize,
    /// Rows of this sequence's tokens in [`Buf::Q`], [`Buf::K`], [`Buf::V`] and [`Buf::Att`].
    pub tokens: Range<usize>,
    /// Position of the first token (the cache holds `0..start_pos`).
    pub start_pos: usize,
}

/// The forward pass's operations on one device. Every operation works on the first rows of the named
/// buffers; `n` is the number of rows (tokens). Errors name the tensor or operation.
pub(crate) trait Backend {
    /// Device this backend runs on.
    fn device(&self) -> Device;

    /// [`Buf::X`] = the embedding rows of `tokens` this rank's vocabulary slice (from row `first`) holds,
    /// zeros for the others (the all-reduce that follows completes the lookup).
    fn embed(&mut self, weights: &Weights<'_>, first: usize, tokens: &[u32]) -> Result<()>;

    /// [`Buf::X`] = `hidden` (the previous stage's output, `[n, E]`).
    fn load_hidden(&mut self, hidden: &[f32]) -> Result<()>;

    /// Host storage for the RoPE angles of `n` tokens (one [`RopeCache`] per token, in batch order), which
    /// the forward pass fills.
    fn rope_angles(&mut self, n: usize) -> &mut [RopeCache];

    /// Makes the `n` angles just filled available to [`Backend::rope`] (a device copies them over).
    fn upload_rope(&mut self, n: usize) -> Result<()>;

    /// `out[t] = rms_norm(x[t]) · norm` for `n` rows (of the norm's length).
    fn rms_norm(
        &mut self,
        weights: &Weights<'_>,
        norm: Tensor,
        x: Buf,
        out: Buf,
        n: usize,
        eps: f32,
    ) -> Result<()>;

    /// `y[t] = W · x[t]` for `n` rows.
    fn matmul(&mut self, weights: &Weights<'_>, w: Tensor, x: Buf, y: Buf, n: usize) -> Result<()>;

    /// Rotates `n_heads` heads of `head_dim` in rows `tokens` of `buf` by those tokens' RoPE angles.
    fn rope(
        &mut self,
        buf: Buf,
        tokens: Range<usize>,
        n_heads: usize,
        head_dim: usize,
    ) -> Result<()>;

    /// Writes the sequence's keys and values ([`Buf::K`], [`Buf::V`] rows `seq.tokens`) into `cache` at its
    /// positions, then [`Buf::Att`] rows `seq.tokens` = causal attention of its queries over positions
    /// `0..=pos` of local layer `layer`.
    fn attention(
        &mut self,
        layer: usize,
        shape: AttnShape,
        seq: &SeqAttention,
        cache: &mut KvCache,
        scale: f32,
    ) -> Result<()>;

    /// `gate = silu(gate) · up` over `len` values.
    fn silu_mul(&mut self, len: usize) -> Result<()>;

    /// `x += d` over `len` values (the residual connection).
    fn add(&mut self, x: Buf, d: Buf, len: usize) -> Result<()>;

    /// Sums the first `len` values of `buf` over the tensor-parallel group.
    fn all_reduce(&mut self, collective: &mut dyn Collective, buf: Buf, len: usize) -> Result<()>;

    /// `dst` row `i` = `src` row `rows[i]`, rows of `cols`.
    fn gather_rows(&mut self, src: Buf, rows: &[usize], dst: Buf, cols: usize) -> Result<()>;

    /// The first `len` values of `buf` in host memory (copied from the device where it is one).
    fn host(&mut self, buf: Buf, len: usize) -> Result<&[f32]>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_parses_and_prints() {
        for (s, d) in [
            ("cpu", Device::Cpu),
            ("CPU", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("cuda:0", Device::Cuda(0)),
            ("cuda:3", Device::Cuda(3)),
        ] {
            assert_eq!(s.parse::<Device>(), Ok(d), "{s}");
        }
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
        assert_eq!(Device::Cpu.to_string(), "cpu");
        for bad in ["", "cuda:", "cuda:x", "cuda:-1", "tpu", "cuda0"] {
            let err = bad.parse::<Device>().unwrap_err();
            assert!(err.contains("cuda:N"), "{bad}: {err}");
        }
    }
}
