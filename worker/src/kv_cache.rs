//! Per-sequence key/value cache for one shard: this stage's layers × this rank's KV heads × `ctx` positions.
//! K and V are f16 by default (llama.cpp's default cache type); [`KvType::F32`] keeps them in f32, as the
//! llama.cpp reference logits in `tests/fixtures/engine` were made (it doubles the memory and runs a plain
//! attention, see `attention_f32.rs`).
//!
//! Size, stated before anything is allocated ([`KvCache::memory_bytes`]):
//! `layers · kv_heads · ctx · head_dim · 2 (K and V) · element bytes`. Llama 3.1 8B on one rank with f16 is
//! 32 · 8 · 128 · 4 = 128 KiB per position (DESIGN.md §3); a replicated KV head (tp > n_head_kv) is stored on
//! every rank that holds it. A context longer than the model's training context, or a cache larger than a
//! given budget, is refused with the numbers.
//!
//! Layout: for each layer, position-major `[pos][kv_head][head_dim]`, the layout
//! `tessera_kernels::cpu::attention_batch` reads: one token's K (or V) row of all local heads is contiguous,
//! so writing a token is one conversion of the row the K/V projection produced.

use std::ops::Range;
use std::sync::Arc;

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use shard_tool::config::ModelConfig;
use shard_tool::plan::ShardSpec;

use crate::error::{Error, Result};
use crate::weights::spec_layers;

/// Element type of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    /// IEEE half precision, rounded to nearest even (ggml's `GGML_FP32_TO_FP16`); llama.cpp's default.
    #[default]
    F16,
    /// f32: no rounding (twice the memory).
    F32,
}

impl std::str::FromStr for KvType {
    type Err = String;

    /// The names llama.cpp's `--cache-type-k` uses for these types.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f16" => Ok(KvType::F16),
            "f32" => Ok(KvType::F32),
            _ => Err(format!(
                "unknown KV cache type {s:?}: expected `f16` (the default) or `f32`"
            )),
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvType::F16 => "f16",
            KvType::F32 => "f32",
        })
    }
}

impl KvType {
    /// Bytes of one K or V element.
    pub const fn elem_bytes(self) -> u64 {
        match self {
            KvType::F16 => 2,
            KvType::F32 => 4,
        }
    }
}

/// K and V storage, `[layer][pos][kv_head][head_dim]` each. f16 is stored as `u16` bits so that a fresh cache
/// is zero pages from the allocator, touched only as positions are written.
#[derive(Debug, Clone)]
enum Data {
    F16 {
        k: Vec<u16>,
        v: Vec<u16>,
    },
    F32 {
        k: Vec<f32>,
        v: Vec<f32>,
    },
    /// f16 bits in GPU memory (a CUDA engine's caches), written and read by the GPU kernels only.
    Gpu {
        k: CudaSlice<u16>,
        v: CudaSlice<u16>,
    },
}

/// One layer's keys and values: `ctx` rows of `kv_heads · head_dim`.
pub(crate) enum LayerKv<'a> {
    F16(&'a [f16], &'a [f16]),
    F32(&'a [f32], &'a [f32]),
    /// In GPU memory: f16 bits.
    Gpu(CudaView<'a, u16>, CudaView<'a, u16>),
}

/// The K/V cache of one sequence on one shard.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Global indices of the layers cached (the shard's stage).
    layers: Range<usize>,
    /// KV heads of this rank (global indices).
    kv_heads: Range<usize>,
    head_dim: usize,
    ctx: usize,
    /// Positions `0..len` hold valid keys and values.
    len: usize,
    data: Data,
}

impl KvCache {
    /// Bytes of an f16 cache for `ctx` positions of the shard `spec`: layers · KV heads · ctx · head_dim · 2 · 2.
    pub fn memory_bytes(config: &ModelConfig, spec: &ShardSpec, ctx: usize) -> Result<u64> {
        Self::memory_bytes_of(config, spec, ctx, KvType::F16)
    }

    /// Bytes of a cache of element type `ty` for `ctx` positions of the shard `spec`.
    pub fn memory_bytes_of(
        config: &ModelConfig,
        spec: &ShardSpec,
        ctx: usize,
        ty: KvType,
    ) -> Result<u64> {
        let layers = spec_layers(config, spec)?;
        Ok(Self::bytes_for(
            layers.len(),
            spec.kv_heads.len(),
            config.head_dim,
            ctx,
            ty,
        ))
    }

    fn bytes_for(layers: usize, kv_heads: usize, head_dim: usize, ctx: usize, ty: KvType) -> u64 {
        [layers, kv_heads, head_dim, ctx]
            .into_iter()
            .fold(2 * ty.elem_bytes(), |acc, v| acc.saturating_mul(v as u64))
    }

    /// An f16 cache for `ctx` positions of the shard `spec`. Refuses `ctx` of 0, above the model's training
    /// context, or needing more than `budget_bytes` (when given).
    pub fn new(
        config: &ModelConfig,
        spec: &ShardSpec,
        ctx: usize,
        budget_bytes: Option<u64>,
    ) -> Result<KvCache> {
        Self::with_type(config, spec, ctx, KvType::F16, budget_bytes)
    }

    /// As [`KvCache::new`], with elements of type `ty`.
    pub fn with_type(
        config: &ModelConfig,
        spec: &ShardSpec,
        ctx: usize,
        ty: KvType,
        budget_bytes: Option<u64>,
    ) -> Result<KvCache> {
        let (layers, elems, bytes) = Self::checked_size(config, spec, ctx, ty, budget_bytes)?;
        let alloc_err = |e: std::collections::TryReserveError| {
            Error::KvCache(format!(
                "cannot allocate {:.1} MiB for a context of {ctx} tokens: {e}",
                mib(bytes)
            ))
        };
        let data = match ty {
            KvType::F16 => Data::F16 {
                k: zeroed(elems).map_err(alloc_err)?,
                v: zeroed(elems).map_err(alloc_err)?,
            },
            KvType::F32 => Data::F32 {
                k: zeroed(elems).map_err(alloc_err)?,
                v: zeroed(elems).map_err(alloc_err)?,
            },
        };
        Ok(Self::empty(config, spec, layers, ctx, data))
    }

    fn empty(
        config: &ModelConfig,
        spec: &ShardSpec,
        layers: Range<usize>,
        ctx: usize,
        data: Data,
    ) -> KvCache {
        KvCache {
            layers,
            kv_heads: spec.kv_heads.clone(),
            head_dim: config.head_dim,
            ctx,
            len: 0,
            data,
        }
    }

    /// The cache's layers, elements of K (or V) and bytes, after refusing a context of 0, beyond the training
    /// context or over the budget.
    fn checked_size(
        config: &ModelConfig,
        spec: &ShardSpec,
        ctx: usize,
        ty: KvType,
        budget_bytes: Option<u64>,
    ) -> Result<(Range<usize>, usize, u64)> {
        let layers = spec_layers(config, spec)?;
        if ctx == 0 {
            return Err(Error::KvCache("context size must be at least 1".into()));
        }
        if ctx > config.n_ctx_train {
            return Err(Error::KvCache(format!(
                "context of {ctx} tokens exceeds the model's training context of {} tokens (n_ctx_train)",
                config.n_ctx_train
            )));
        }
        let (n_kv, hd) = (spec.kv_heads.len(), config.head_dim);
        let bytes = Self::bytes_for(layers.len(), n_kv, hd, ctx, ty);
        if let Some(budget) = budget_bytes
            && bytes > budget
        {
            let per_pos = Self::bytes_for(layers.len(), n_kv, hd, 1, ty);
            return Err(Error::KvCache(format!(
                "context of {ctx} tokens needs {bytes} bytes ({:.1} MiB) of KV cache ({} layers × {n_kv} KV heads × \
                 head_dim {hd} × 2 (K, V) × {} bytes = {per_pos} bytes per position), over the budget of {budget} \
                 bytes ({:.1} MiB); at most {} tokens fit",
                mib(bytes),
                layers.len(),
                ty.elem_bytes(),
                mib(budget),
                budget / per_pos.max(1)
            )));
        }
        let elems = usize::try_from(bytes / (2 * ty.elem_bytes())).map_err(|_| {
            Error::KvCache(format!("{bytes} bytes of KV cache do not fit in memory"))
        })?;
        Ok((layers, elems, bytes))
    }

    /// An f16 cache as [`KvCache::new`] makes, in the memory of the GPU that `stream` belongs to.
    pub fn on_gpu(
        config: &ModelConfig,
        spec: &ShardSpec,
        ctx: usize,
        budget_bytes: Option<u64>,
        stream: &Arc<CudaStream>,
    ) -> Result<KvCache> {
        let (layers, elems, bytes) =
            Self::checked_size(config, spec, ctx, KvType::F16, budget_bytes)?;
        let alloc = || {
            stream.alloc_zeros::<u16>(elems).map_err(|e| {
                Error::KvCache(format!(
                    "cannot allocate {:.1} MiB of GPU memory for a context of {ctx} tokens: {e}",
                    mib(bytes)
                ))
            })
        };
        let (k, v) = (alloc()?, alloc()?);
        Ok(Self::empty(config, spec, layers, ctx, Data::Gpu { k, v }))
    }

    /// Whether the cache is in GPU memory.
    pub fn is_on_gpu(&self) -> bool {
        matches!(self.data, Data::Gpu { .. })
    }

    pub fn kv_type(&self) -> KvType {
        match self.data {
            Data::F16 { .. } | Data::Gpu { .. } => KvType::F16,
            Data::F32 { .. } => KvType::F32,
        }
    }

    /// Positions that can be cached.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Positions `0..len()` are filled.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position (the sequence starts over; nothing is freed).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Forgets positions `len..` (e.g. rejected speculative tokens).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        let elems = self.layers.len() * self.ctx * self.kv_heads.len() * self.head_dim;
        2 * elems as u64 * self.kv_type().elem_bytes()
    }

    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    pub fn kv_heads(&self) -> Range<usize> {
        self.kv_heads.clone()
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    /// Elements of one layer: `ctx` rows of `kv_heads · head_dim`.
    fn layer_elems(&self) -> usize {
        self.ctx * self.kv_heads.len() * self.head_dim
    }

    /// Keys and values of local layer `l`.
    pub(crate) fn layer(&self, l: usize) -> LayerKv<'_> {
        let n = self.layer_elems();
        let r = l * n..(l + 1) * n;
        match &self.data {
            Data::F16 { k, v } => {
                LayerKv::F16(k[r.clone()].reinterpret_cast(), v[r].reinterpret_cast())
            }
            Data::F32 { k, v } => LayerKv::F32(&k[r.clone()], &v[r]),
            Data::Gpu { k, v } => LayerKv::Gpu(k.slice(r.clone()), v.slice(r)),
        }
    }

    /// Keys and values of local layer `l` in GPU memory, to write; `None` for a host cache.
    pub(crate) fn gpu_layer_mut(
        &mut self,
        l: usize,
    ) -> Option<(CudaViewMut<'_, u16>, CudaViewMut<'_, u16>)> {
        let n = self.layer_elems();
        let r = l * n..(l + 1) * n;
        match &mut self.data {
            Data::Gpu { k, v } => Some((k.slice_mut(r.clone()), v.slice_mut(r))),
            Data::F16 { .. } | Data::F32 { .. } => None,
        }
    }

    /// Stores the K and V rows (`kv_heads · head_dim` f32 values each, consecutive positions from `pos`) of
    /// local layer `l`; f16 rounds to nearest even, as ggml's `GGML_FP32_TO_FP16`. A GPU cache is written by
    /// the GPU kernels instead: an error here.
    pub(crate) fn write(
        &mut self,
        l: usize,
        pos: usize,
        k_rows: &[f32],
        v_rows: &[f32],
    ) -> Result<()> {
        let start = l * self.layer_elems() + pos * self.kv_heads.len() * self.head_dim;
        let r = start..start + k_rows.len();
        match &mut self.data {
            Data::F16 { k, v } => {
                let k: &mut [f16] = k[r.clone()].reinterpret_cast_mut();
                k.convert_from_f32_slice(k_rows);
                let v: &mut [f16] = v[r].reinterpret_cast_mut();
                v.convert_from_f32_slice(v_rows);
            }
            Data::F32 { k, v } => {
                k[r.clone()].copy_from_slice(k_rows);
                v[r].copy_from_slice(v_rows);
            }
            Data::Gpu { .. } => {
                return Err(Error::KvCache(
                    "this KV cache is in GPU memory: a CPU engine cannot use it".into(),
                ));
            }
        }
        Ok(())
    }

    /// Fills positions `0..len` of this empty cache with `src`'s (the same shard and element type, any
    /// context): a new sequence that starts with another's first `len` tokens reuses their keys and values
    /// instead of recomputing them. The copy is exact, so the sequence continues as if it had run them.
    pub fn copy_prefix(&mut self, src: &KvCache, len: usize) -> Result<()> {
        let refuse = |msg: String| Err(Error::KvCache(msg));
        if !self.is_empty() {
            return refuse(format!(
                "a prefix is copied into an empty cache, this one holds {} positions",
                self.len
            ));
        }
        if !src.fits(&self.layers, &self.kv_heads, self.head_dim) || src.kv_type() != self.kv_type()
        {
            return refuse("the prefix's cache is of another shard or element type".into());
        }
        if len > src.len || len > self.ctx {
            return refuse(format!(
                "a prefix of {len} positions: the source holds {}, this cache takes {}",
                src.len, self.ctx
            ));
        }
        let row = self.kv_heads.len() * self.head_dim;
        let (n_dst, n_src, n) = (self.layer_elems(), src.layer_elems(), len * row);
        let ranges =
            (0..self.layers.len()).map(|l| (l * n_dst..l * n_dst + n, l * n_src..l * n_src + n));
        match (&mut self.data, &src.data) {
            (Data::F16 { k, v }, Data::F16 { k: sk, v: sv }) => {
                for (d, s) in ranges {
                    k[d.clone()].copy_from_slice(&sk[s.clone()]);
                    v[d].copy_from_slice(&sv[s]);
                }
            }
            (Data::F32 { k, v }, Data::F32 { k: sk, v: sv }) => {
                for (d, s) in ranges {
                    k[d.clone()].copy_from_slice(&sk[s.clone()]);
                    v[d].copy_from_slice(&sv[s]);
                }
            }
            (Data::Gpu { k, v }, Data::Gpu { k: sk, v: sv }) => {
                let stream = k.stream().clone();
                for (d, s) in ranges {
                    let copy = |dst: &mut CudaSlice<u16>, src: &CudaSlice<u16>| {
                        stream
                            .memcpy_dtod(&src.slice(s.clone()), &mut dst.slice_mut(d.clone()))
                            .map_err(|e| {
                                Error::KvCache(format!("copying a KV prefix on the GPU: {e}"))
                            })
                    };
                    copy(k, sk)?;
                    copy(v, sv)?;
                }
            }
            _ => return refuse("the prefix's cache is in another memory".into()),
        }
        self.len = len;
        Ok(())
    }

    /// Whether this cache was made for a shard with these layers and KV heads.
    pub(crate) fn fits(
        &self,
        layers: &Range<usize>,
        kv_heads: &Range<usize>,
        head_dim: usize,
    ) -> bool {
        &self.layers == layers && &self.kv_heads == kv_heads && self.head_dim == head_dim
    }
}

/// `n` zeros, from zeroed pages (no writes until used).
fn zeroed<T: Clone + Default>(
    n: usize,
) -> std::result::Result<Vec<T>, std::collections::TryReserveError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)?;
    v.resize(n, T::default());
    Ok(v)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use shard_tool::plan::{Topology, plan};
    use shard_tool::shapes::{Preset, tensor_descs};
    use tessera_kernels::quant::GgmlType;

    use super::*;

    #[test]
    fn kv_type_names_are_llama_cpp_s() {
        for ty in [KvType::F16, KvType::F32] {
            assert_eq!(ty.to_string().parse::<KvType>(), Ok(ty));
        }
        assert_eq!(" F32 ".parse::<KvType>(), Ok(KvType::F32));
        let err = "q8_0".parse::<KvType>().unwrap_err();
        assert!(err.contains("\"q8_0\"") && err.contains("`f16`"), "{err}");
    }

    fn shard(
        preset: Preset,
        tp: usize,
        pp: usize,
        stage: usize,
        rank: usize,
    ) -> (ModelConfig, ShardSpec) {
        let config = preset.config();
        let tensors = tensor_descs(&config, GgmlType::Q8_0);
        let p = plan(&config, &tensors, &Topology::new(tp, pp)).unwrap();
        let spec = p.shard(stage, rank).unwrap().clone();
        (config, spec)
    }

    #[test]
    fn memory_is_stated_up_front() {
        // Llama 3.1 8B on one rank: 32 layers × 8 KV heads × 128 × 2 (K, V) × 2 bytes = 128 KiB per position.
        let (config, spec) = shard(Preset::Llama3_8B, 1, 1, 0, 0);
        assert_eq!(KvCache::memory_bytes(&config, &spec, 1).unwrap(), 128 << 10);
        assert_eq!(
            KvCache::memory_bytes(&config, &spec, 8192).unwrap(),
            1 << 30
        );
        // 405B at tp=16, pp=2: 63 layers and one (replicated) KV head per rank.
        let (config, spec) = shard(Preset::Llama3_405B, 16, 2, 1, 5);
        assert_eq!(spec.kv_heads.len(), 1);
        assert_eq!(
            KvCache::memory_bytes(&config, &spec, 1).unwrap(),
            63 * 128 * 2 * 2
        );
    }

    #[test]
    fn refuses_context_beyond_training_or_budget() {
        let (config, spec) = shard(Preset::SmolLm, 1, 1, 0, 0);
        let err = KvCache::new(&config, &spec, config.n_ctx_train + 1, None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "KV cache: context of {} tokens exceeds the model's training context of {} tokens (n_ctx_train)",
                config.n_ctx_train + 1,
                config.n_ctx_train
            )
        );
        // SmolLM2: 30 layers × 3 KV heads × 64 × 2 × 2 = 23040 bytes per position.
        let err = KvCache::new(&config, &spec, 1024, Some(10 << 20))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("context of 1024 tokens needs 23592960 bytes (22.5 MiB)")
                && err.contains("30 layers × 3 KV heads × head_dim 64")
                && err.contains("23040 bytes per position")
                && err.contains("budget of 10485760 bytes (10.0 MiB)")
                && err.contains("at most 455 tokens fit"),
            "{err}"
        );
        assert!(KvCache::new(&config, &spec, 0, None).is_err());
        let cache = KvCache::new(&config, &spec, 455, Some(10 << 20)).unwrap();
        assert_eq!(cache.bytes(), 455 * 23040);
        assert_eq!((cache.ctx(), cache.len(), cache.layers()), (455, 0, 0..30));
    }

    #[test]
    fn writes_position_major_rows() {
        let (config, spec) = shard(Preset::SmolLm, 1, 1, 0, 0);
        let mut cache = KvCache::new(&config, &spec, 4, None).unwrap();
        let row = 3 * 64;
        let k: Vec<f32> = (0..2 * row).map(|i| i as f32 + 0.1).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        cache.write(2, 1, &k, &v).unwrap();
        let LayerKv::F16(kc, vc) = cache.layer(2) else {
            panic!("f16 cache")
        };
        assert_eq!(kc[row + 5], f16::from_f32(5.1));
        assert_eq!(
            vc[2 * row + row - 1],
            f16::from_f32(-(2.0 * row as f32 - 0.9))
        );
        assert_eq!(kc[0], f16::ZERO);
        let LayerKv::F16(other, _) = cache.layer(1) else {
            panic!("f16 cache")
        };
        assert!(other.iter().all(|x| *x == f16::ZERO));

        let mut cache = KvCache::with_type(&config, &spec, 4, KvType::F32, None).unwrap();
        assert_eq!(cache.bytes(), 4 * 46080);
        cache.write(2, 1, &k, &v).unwrap();
        let LayerKv::F32(kc, vc) = cache.layer(2) else {
            panic!("f32 cache")
        };
        assert_eq!((kc[row + 5], vc[row + 5]), (5.1, -5.1));
    }
}
