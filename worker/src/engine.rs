//! `Engine`: one shard's weights, the model config and shard spec, the tensor-parallel communicator and the
//! device backend holding every activation buffer, preallocated for the largest batch (llama2.c's
//! `RunState`). The forward pass itself is in `forward.rs`.
//!
//! Nothing is allocated per token: buffers are sized here for `max_batch_tokens` tokens and `max_logits`
//! logit rows; the kernels' scratch space grows on the first call and is reused.

use std::ops::Range;
use std::sync::Arc;

use shard_tool::config::ModelConfig;
use shard_tool::plan::ShardSpec;
use tessera_kernels::cpu::{AttnShape, Isa, Kernels, Pool};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, Buf, Device};
use crate::batch::Batch;
use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, KvType};
use crate::weights::{Weights, spec_layers};

/// Sizes the engine's buffers are allocated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Most tokens in one batch, all sequences together (prefill chunks and decode tokens).
    pub max_batch_tokens: usize,
    /// Most tokens that ask for logits in one batch (the logits buffer is `max_logits × vocab slice`).
    pub max_logits: usize,
    /// Where the forward pass runs (the CPU, or a GPU that then holds the weights and KV caches).
    pub device: Device,
    /// Element type of the KV caches [`Engine::new_cache`] makes: f16 (llama.cpp's default), or f32 on the
    /// CPU (no rounding of K and V, twice the memory: what exact comparisons with an f32 reference need).
    pub kv_type: KvType,
    /// Whose float summation order the CPU kernels follow (see [`Numerics`]).
    pub numerics: Numerics,
}

/// Whose float summation order a CPU engine follows. Both compute the same model; they differ only in how
/// sums are rounded, which decides a greedy token only where two logits are within rounding of each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Numerics {
    /// This CPU's fastest kernels: 16-row interleaved weights, AVX-512 where the CPU has it.
    #[default]
    Fast,
    /// The kernels of llama.cpp's portable AVX2 build (`GGML_NATIVE=OFF`, the build
    /// `scripts/gen_engine_refs.py` makes its references with): ggml's row-by-row AVX2 dot products and activation quantizers, its AVX2 `exp`/SiLU, and
    /// with an f32 KV cache its attention order. Needs weights loaded unpacked
    /// ([`Weights::from_checkpoint_with`]) and a CPU with AVX2 and FMA. With an f32 cache Q8_0 and Q4_1
    /// models' logits are bit-identical to that build's; other types may still round differently (ggml
    /// repacks Q4_0 and K-quants, and multiplies F32/F16/BF16 weights with tinyBLAS in prefill).
    LlamaCppAvx2,
}

impl std::str::FromStr for Numerics {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fast" => Ok(Numerics::Fast),
            "llama-cpp-avx2" => Ok(Numerics::LlamaCppAvx2),
            other => Err(format!(
                "unknown numerics '{other}' (expected fast or llama-cpp-avx2)"
            )),
        }
    }
}

impl std::fmt::Display for Numerics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Numerics::Fast => "fast",
            Numerics::LlamaCppAvx2 => "llama-cpp-avx2",
        })
    }
}

impl EngineOptions {
    /// Whether weights for this engine are re-laid out for the packed CPU kernels (see
    /// [`Weights::from_checkpoint_with`]).
    pub fn packs_weights(&self) -> bool {
        self.device == Device::Cpu && self.numerics == Numerics::Fast
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch_tokens: 512,
            max_logits: 64,
            device: Device::Cpu,
            kv_type: KvType::F16,
            numerics: Numerics::Fast,
        }
    }
}

/// One shard of a Llama-family model, ready to run batches. See the crate doc.
pub struct Engine<'m> {
    pub weights: Weights<'m>,
    pub config: ModelConfig,
    pub spec: ShardSpec,
    pub(crate) collective: Box<dyn Collective>,
    /// The device's kernels and activation buffers (see `backend`).
    pub(crate) backend: Backends,
    pub(crate) options: EngineOptions,
    /// Heads of one attention call on this rank (local query and KV heads).
    pub(crate) attn: AttnShape,
    /// Batch rows of the tokens that want logits (reused by every forward call).
    pub(crate) logit_rows: Vec<usize>,
}

impl<'m> Engine<'m> {
    /// An engine for the shard `spec` of the model `config`, whose tensors are `weights`. `collective` is this
    /// rank's view of its tensor-parallel group (its rank must be `spec.rank`); `pool` runs the kernels and
    /// may be shared with other engines of the process.
    pub fn new(
        weights: Weights<'m>,
        config: ModelConfig,
        spec: ShardSpec,
        collective: Box<dyn Collective>,
        pool: Arc<Pool>,
        options: EngineOptions,
    ) -> Result<Self> {
        let spec_err = |msg: String| Error::Spec {
            stage: spec.stage,
            rank: spec.rank,
            msg,
        };
        let layers = spec_layers(&config, &spec)?;
        if weights.layers != layers {
            return Err(spec_err(format!(
                "weights hold layers {:?}, the spec {layers:?}",
                weights.layers
            )));
        }
        if collective.rank() != spec.rank || collective.rank() >= collective.world_size() {
            return Err(spec_err(format!(
                "the collective is rank {} of {}, the shard is rank {}",
                collective.rank(),
                collective.world_size(),
                spec.rank
            )));
        }
        if options.max_batch_tokens == 0 {
            return Err(spec_err("max_batch_tokens must be at least 1".into()));
        }
        let attn = attn_shape(&config, &spec).map_err(spec_err)?;
        let hd = config.head_dim;
        let (t, e) = (options.max_batch_tokens, config.n_embd);
        let (q, k, f) = (
            spec.q_heads.len() * hd,
            spec.kv_heads.len() * hd,
            spec.ffn_rows.len(),
        );
        let l = if weights.is_last {
            options.max_logits
        } else {
            0
        };
        let vocab = spec.vocab_rows.len();
        // [T, E] x and xb; [T, Q] q; [T, K] k and v; [T, Q] att; [T, F] gate and up; [L, E] xl; [L, V] logits.
        let mut lens = [0; 10];
        for (b, len) in Buf::ALL.into_iter().zip(&mut lens) {
            *len = match b {
                Buf::X | Buf::Xb => t * e,
                Buf::Q | Buf::Att => t * q,
                Buf::K | Buf::V => t * k,
                Buf::Gate | Buf::Up => t * f,
                Buf::Xl => l * e,
                Buf::Logits => l * vocab,
            };
        }
        let device = options.device;
        if device != Device::Cpu && options.kv_type != KvType::F16 {
            return Err(gpu_cache_type(device, options.kv_type));
        }
        let kernels = match options.numerics {
            Numerics::Fast => Kernels::best(),
            Numerics::LlamaCppAvx2 => {
                if device != Device::Cpu {
                    return Err(spec_err(format!(
                        "llama.cpp AVX2 numerics are a CPU setting, this engine runs on {device}"
                    )));
                }
                if let Some(m) = weights.matrices().find(|m| m.packed.is_some()) {
                    return Err(spec_err(format!(
                        "llama.cpp AVX2 numerics read weights in GGUF row order, but {} is packed \
                         (load them with Weights::from_checkpoint_with these options)",
                        m.name
                    )));
                }
                Kernels::for_isa(Isa::Avx2).ok_or_else(|| {
                    spec_err("llama.cpp AVX2 numerics need a CPU with AVX2, FMA and F16C".into())
                })?
            }
        };
        let backend = match device {
            Device::Cpu => Backends::Cpu(CpuBackend::new(pool, kernels, lens, t)),
            Device::Cuda(ordinal) => Backends::Cuda(Box::new(CudaBackend::new(
                ordinal, &weights, &config, lens, t,
            )?)),
        };
        Ok(Engine {
            weights,
            config,
            spec,
            collective,
            backend,
            options,
            attn,
            logit_rows: Vec::with_capacity(options.max_batch_tokens),
        })
    }

    /// The device this engine runs on.
    pub fn device(&self) -> Device {
        self.backend.as_dyn().device()
    }

    pub fn options(&self) -> EngineOptions {
        self.options
    }

    /// Global indices of the layers this shard runs.
    pub fn layers(&self) -> Range<usize> {
        self.weights.layers.clone()
    }

    /// The vocabulary rows of this rank's logits (last stage).
    pub fn vocab_rows(&self) -> Range<usize> {
        self.spec.vocab_rows.clone()
    }

    pub fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }

    /// Replaces the tensor-parallel communicator (a worker re-forms its group at every epoch). Its rank must
    /// be this shard's rank, as in [`Engine::new`].
    pub fn set_collective(&mut self, c: Box<dyn Collective>) -> Result<()> {
        if c.rank() != self.spec.rank || c.rank() >= c.world_size() {
            return Err(Error::Spec {
                stage: self.spec.stage,
                rank: self.spec.rank,
                msg: format!(
                    "the new collective is rank {} of {}, the shard is rank {}",
                    c.rank(),
                    c.world_size(),
                    self.spec.rank
                ),
            });
        }
        self.collective = c;
        Ok(())
    }

    /// Makes the tensor-parallel all-reduce go over the NCCL communicator of `id` (every rank of the stage
    /// on a GPU; blocks until all have joined), or back over the collective with `None`.
    pub fn set_nccl(&mut self, id: Option<&[u8]>) -> Result<()> {
        match (&mut self.backend, id) {
            (Backends::Cpu(_), None) => Ok(()),
            (Backends::Cpu(_), Some(_)) => Err(Error::Device {
                device: Device::Cpu.to_string(),
                msg: "an NCCL id was given to a CPU rank: NCCL groups are all GPUs".into(),
            }),
            (Backends::Cuda(b), id) => {
                b.set_nccl(id, self.collective.rank(), self.collective.world_size())
            }
        }
    }

    /// A KV cache of the engine's [`EngineOptions::kv_type`] for one sequence of up to `ctx` tokens on this
    /// shard (see [`KvCache::new`]). On a GPU engine the cache is in GPU memory.
    pub fn new_cache(&self, ctx: usize, budget_bytes: Option<u64>) -> Result<KvCache> {
        self.new_cache_of(ctx, self.options.kv_type, budget_bytes)
    }

    /// Bytes of a cache [`Engine::new_cache`] would make for `ctx` tokens, before allocating it.
    pub fn cache_bytes(&self, ctx: usize) -> Result<u64> {
        KvCache::memory_bytes_of(&self.config, &self.spec, ctx, self.options.kv_type)
    }

    /// As [`Engine::new_cache`], with elements of type `ty`.
    pub fn new_cache_of(
        &self,
        ctx: usize,
        ty: KvType,
        budget_bytes: Option<u64>,
    ) -> Result<KvCache> {
        match (&self.backend, ty) {
            (Backends::Cpu(_), _) => {
                KvCache::with_type(&self.config, &self.spec, ctx, ty, budget_bytes)
            }
            (Backends::Cuda(b), KvType::F16) => {
                b.new_cache(&self.config, &self.spec, ctx, budget_bytes)
            }
            (Backends::Cuda(b), ty) => Err(gpu_cache_type(b.device(), ty)),
        }
    }

    /// Checks `batch` and `caches` against this engine and returns the number of tokens.
    pub(crate) fn check_batch(&self, batch: &Batch, caches: &[&mut KvCache]) -> Result<usize> {
        let err = |msg: String| Err(Error::Batch(msg));
        if caches.len() != batch.seqs.len() {
            return err(format!(
                "{} sequences but {} KV caches",
                batch.seqs.len(),
                caches.len()
            ));
        }
        let n = batch.n_tokens();
        if n == 0 {
            return err("no tokens".into());
        }
        if n > self.options.max_batch_tokens {
            return err(format!(
                "{n} tokens, but the engine's buffers hold at most {} (max_batch_tokens)",
                self.options.max_batch_tokens
            ));
        }
        if batch.logits.len() != n {
            return err(format!("{} logit flags for {n} tokens", batch.logits.len()));
        }
        let n_logits = batch.n_logits();
        if self.weights.is_last && n_logits > self.options.max_logits {
            return err(format!(
                "{n_logits} tokens ask for logits, but the engine holds at most {} rows (max_logits)",
                self.options.max_logits
            ));
        }
        let e = self.config.n_embd;
        if self.weights.is_first {
            if batch.tokens.len() != n || !batch.hidden.is_empty() {
                return err(format!(
                    "the first stage takes {n} token ids, got {} ids and {} hidden values",
                    batch.tokens.len(),
                    batch.hidden.len()
                ));
            }
            if let Some((i, &id)) = batch
                .tokens
                .iter()
                .enumerate()
                .find(|(_, id)| **id as usize >= self.config.n_vocab)
            {
                return err(format!(
                    "token {i} is id {id}, outside the vocabulary of {}",
                    self.config.n_vocab
                ));
            }
        } else if batch.hidden.len() != n * e || !batch.tokens.is_empty() {
            return err(format!(
                "stage {} takes hidden states ({n} tokens × n_embd {e} = {} values), got {} values and {} \
                 token ids",
                self.spec.stage,
                n * e,
                batch.hidden.len(),
                batch.tokens.len()
            ));
        }
        for (i, (s, cache)) in batch.seqs.iter().zip(caches).enumerate() {
            if s.n_tokens == 0 {
                return err(format!("sequence {i} has no tokens"));
            }
            if !cache.fits(
                &self.weights.layers,
                &self.spec.kv_heads,
                self.config.head_dim,
            ) {
                return err(format!(
                    "sequence {i}: its KV cache is for layers {:?} and KV heads {:?}, this shard has {:?} and \
                     {:?}",
                    cache.layers(),
                    cache.kv_heads(),
                    self.weights.layers,
                    self.spec.kv_heads
                ));
            }
            if s.start_pos > cache.len() {
                return err(format!(
                    "sequence {i} starts at position {}, but its cache holds only positions 0..{}",
                    s.start_pos,
                    cache.len()
                ));
            }
            if s.start_pos + s.n_tokens > cache.ctx() {
                return err(format!(
                    "sequence {i}: positions {}..{} exceed its KV cache's context of {}",
                    s.start_pos,
                    s.start_pos + s.n_tokens,
                    cache.ctx()
                ));
            }
        }
        Ok(n)
    }
}

/// The backend of the engine's device (an enum rather than a `Box<dyn Backend>` so the forward pass is
/// compiled for each backend, with no dynamic call per operation).
// One per engine, matched on every forward call: the CPU variant stays inline, the much larger and rarer GPU
// state is boxed.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Backends {
    Cpu(CpuBackend),
    Cuda(Box<CudaBackend>),
}

impl Backends {
    pub(crate) fn as_dyn(&self) -> &dyn Backend {
        match self {
            Backends::Cpu(b) => b,
            Backends::Cuda(b) => b.as_ref(),
        }
    }
}

/// The local attention shape, after checking that the kernel's GQA mapping (local query head `h` reads local
/// KV head `h / (n_q / n_kv)`) is the model's (global query head `g` reads KV head `g / q_per_kv`) for this
/// rank's heads. It is for every split the planner makes: whole KV groups, or one replicated KV head.
fn attn_shape(config: &ModelConfig, spec: &ShardSpec) -> std::result::Result<AttnShape, String> {
    let (nq, nkv) = (spec.q_heads.len(), spec.kv_heads.len());
    if nkv == 0 || !nq.is_multiple_of(nkv) {
        return Err(format!(
            "{nq} query heads cannot share {nkv} KV heads evenly"
        ));
    }
    let group = nq / nkv;
    let q_per_kv = config.q_per_kv();
    for (local, g) in spec.q_heads.clone().enumerate() {
        let want = g / q_per_kv;
        let got = spec.kv_heads.start + local / group;
        if want != got {
            return Err(format!(
                "query head {g} reads KV head {want}, but this rank's head layout would give it KV head {got}"
            ));
        }
    }
    Ok(AttnShape {
        n_heads: nq,
        n_kv_heads: nkv,
        head_dim: config.head_dim,
    })
}

/// The refusal of a KV cache type the GPU backend does not keep (at start, and for an explicit request).
fn gpu_cache_type(device: Device, ty: KvType) -> Error {
    Error::Device {
        device: device.to_string(),
        msg: format!("{ty} KV caches are CPU-only (reference comparisons); GPU caches are f16"),
    }
}
