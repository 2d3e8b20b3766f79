//! `CudaBackend`: the forward pass's operations on one NVIDIA GPU (`tessera_kernels::cuda`: NVRTC-compiled
//! kernels and cuBLAS). The shard's matrices and norms are uploaded once at start (with a progress bar) and
//! every activation buffer lives in GPU memory; KV caches are GPU memory too ([`KvCache::on_gpu`]).
//!
//! Host round trips per batch: the token embedding is looked up on the host (it is a handful of rows; the
//! table stays memory-mapped, as llama.cpp keeps it on the CPU) and uploaded; the RoPE angles are computed
//! on the host with the CPU's code (so both devices rotate by identical angles) and uploaded once; the
//! output (hidden states or logits) is copied back. An all-reduce goes over NCCL when the whole group is on
//! GPUs, else through host memory and the group's collective (peer links), which lets GPU and CPU ranks share
//! a group.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use cudarc::nccl::ReduceOp;
use shard_tool::config::ModelConfig;
use shard_tool::plan::ShardSpec;
use shard_tool::split::progress_bar;
use tessera_kernels::cpu::{AttnShape, RopeCache};
use tessera_kernels::cuda::{CudaError, Gpu, GpuMatrix};
use tracing::info;

use super::cpu::{embed_rows, matrix_of, norm_of};
use super::nccl::NcclComm;
use super::{Backend, Buf, Device, SeqAttention, Tensor};
use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, LayerKv};
use crate::weights::{Matrix, Weights};

pub(crate) struct CudaBackend {
    gpu: Gpu,
    device: Device,
    /// One device buffer per [`Buf`], in `Buf::ALL` order.
    bufs: [CudaSlice<f32>; 10],
    /// Host staging: outputs, embeddings, hidden-state input, all-reduces through host memory.
    host: Vec<f32>,
    rope: Vec<RopeCache>,
    rope_host: Vec<f32>,
    /// [T, rope_dim] cos/sin of each token of the batch.
    rope_dev: CudaSlice<f32>,
    rope_dim: usize,
    /// The shard's weights in GPU memory.
    resident: Resident,
    /// Set when every rank of the group is a GPU (see `nccl`).
    nccl: Option<NcclComm>,
}

impl CudaBackend {
    /// Opens GPU `ordinal`, uploads the shard's weights and allocates buffers of `lens[b]` values for each
    /// [`Buf`] `b` (in `Buf::ALL` order) and RoPE angles for `max_tokens` tokens.
    pub(crate) fn new(
        ordinal: usize,
        weights: &Weights<'_>,
        config: &ModelConfig,
        lens: [usize; 10],
        max_tokens: usize,
    ) -> Result<Self> {
        let device = Device::Cuda(ordinal);
        let err = gpu_err(device);
        let gpu = Gpu::open(ordinal).map_err(&err)?;
        info!(
            %device,
            name = gpu.name(),
            memory_gib = gpu.total_memory() as f64 / (1u64 << 30) as f64,
            "GPU opened"
        );
        let total: usize = (0..weights.blocks.len())
            .flat_map(layer_tensors)
            .chain([Tensor::LmHead])
            .filter_map(|t| weights.matrix(t))
            .map(|m| m.data.len())
            .sum();
        let bar = progress_bar(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            total as u64,
            "uploading weights to the GPU",
        );
        let upload = |t: Tensor| -> Result<GpuMatrix> {
            let m = matrix_of(weights, t)?;
            let g = upload_matrix(&gpu, m)?;
            bar.inc(m.data.len() as u64);
            Ok(g)
        };
        let mut layers = Vec::with_capacity(weights.blocks.len());
        let mut norms = Vec::with_capacity(weights.blocks.len());
        for l in 0..weights.blocks.len() {
            let [q, k, v, o, g, u, d] = layer_tensors(l);
            layers.push([
                upload(q)?,
                upload(k)?,
                upload(v)?,
                upload(o)?,
                upload(g)?,
                upload(u)?,
                upload(d)?,
            ]);
            let norm = |t| gpu.htod(norm_of(weights, t)?).map_err(&err);
            norms.push([norm(Tensor::AttnNorm(l))?, norm(Tensor::FfnNorm(l))?]);
        }
        let lm_head = match weights.lm_head() {
            Some(_) => Some(upload(Tensor::LmHead)?),
            None => None,
        };
        let output_norm = match weights.output_norm.as_deref() {
            Some(n) => Some(gpu.htod(n).map_err(&err)?),
            None => None,
        };
        bar.finish_and_clear();
        let mut bufs = Vec::with_capacity(lens.len());
        for len in lens {
            bufs.push(gpu.alloc_f32(len.max(1)).map_err(&err)?);
        }
        let bufs: [CudaSlice<f32>; 10] = bufs
            .try_into()
            .unwrap_or_else(|_| unreachable!("one buffer per Buf"));
        let rope_dim = config.rope_dim;
        let rope_dev = gpu
            .alloc_f32((max_tokens * rope_dim).max(1))
            .map_err(&err)?;
        info!(%device, bytes = total, "weights uploaded");
        Ok(CudaBackend {
            device,
            bufs,
            host: vec![0.0; lens.into_iter().max().unwrap_or(0)],
            rope: vec![RopeCache::new(); max_tokens],
            rope_host: Vec::with_capacity(max_tokens * rope_dim),
            rope_dev,
            rope_dim,
            resident: Resident {
                layers,
                norms,
                output_norm,
                lm_head,
            },
            nccl: None,
            gpu,
        })
    }

    /// The GPU's stream (KV caches are allocated on it).
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        self.gpu.stream()
    }

    /// A GPU KV cache for one sequence (see [`KvCache::on_gpu`]).
    pub(crate) fn new_cache(
        &self,
        config: &ModelConfig,
        spec: &ShardSpec,
        ctx: usize,
        budget_bytes: Option<u64>,
    ) -> Result<KvCache> {
        KvCache::on_gpu(config, spec, ctx, budget_bytes, self.stream())
    }

    /// Sums over NCCL from now on (`Some`), or through the collective (`None`).
    pub(crate) fn set_nccl(&mut self, id: Option<&[u8]>, rank: usize, world: usize) -> Result<()> {
        self.nccl = match id {
            Some(id) => Some(super::nccl::join(
                self.device,
                Arc::clone(self.stream()),
                rank,
                world,
                id,
            )?),
            None => None,
        };
        Ok(())
    }

    /// Values `r` of buffer `a` to read and values `w` of buffer `b` to write, at once (`a != b`).
    fn pair(
        bufs: &mut [CudaSlice<f32>; 10],
        a: Buf,
        r: Range<usize>,
        b: Buf,
        w: Range<usize>,
    ) -> (CudaView<'_, f32>, CudaViewMut<'_, f32>) {
        let (ia, ib) = (a as usize, b as usize);
        assert_ne!(ia, ib, "a backend operation reads and writes {a:?}");
        if ia < ib {
            let (lo, hi) = bufs.split_at_mut(ib);
            (lo[ia].slice(r), hi[0].slice_mut(w))
        } else {
            let (lo, hi) = bufs.split_at_mut(ia);
            (hi[0].slice(r), lo[ib].slice_mut(w))
        }
    }

    fn upload_host(&mut self, buf: Buf, len: usize) -> Result<()> {
        let err = gpu_err(self.device);
        let mut dst = self.bufs[buf as usize].slice_mut(0..len);
        self.gpu.htod_into(&self.host[..len], &mut dst).map_err(err)
    }

    fn download_host(&mut self, buf: Buf, len: usize) -> Result<()> {
        let err = gpu_err(self.device);
        let src = self.bufs[buf as usize].slice(0..len);
        let stream = self.gpu.stream();
        stream
            .memcpy_dtoh(&src, &mut self.host[..len])
            .map_err(|e| err(CudaError::Driver(e.to_string())))?;
        self.gpu.synchronize().map_err(err)
    }
}

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        self.device
    }

    fn embed(&mut self, weights: &Weights<'_>, first: usize, tokens: &[u32]) -> Result<()> {
        let embd = weights
            .embedding()
            .ok_or_else(|| Error::Batch("this stage holds no token embedding".into()))?;
        let len = tokens.len() * embd.cols;
        embed_rows(embd, first, tokens, &mut self.host[..len])?;
        self.upload_host(Buf::X, len)
    }

    fn load_hidden(&mut self, hidden: &[f32]) -> Result<()> {
        self.host[..hidden.len()].copy_from_slice(hidden);
        self.upload_host(Buf::X, hidden.len())
    }

    fn rope_angles(&mut self, n: usize) -> &mut [RopeCache] {
        &mut self.rope[..n]
    }

    fn upload_rope(&mut self, n: usize) -> Result<()> {
        self.rope_host.clear();
        for r in &self.rope[..n] {
            self.rope_host.extend_from_slice(r.cos_sin());
        }
        let len = self.rope_host.len();
        let mut dst = self.rope_dev.slice_mut(0..len);
        self.gpu
            .htod_into(&self.rope_host, &mut dst)
            .map_err(gpu_err(self.device))
    }

    fn rms_norm(
        &mut self,
        _weights: &Weights<'_>,
        norm: Tensor,
        x: Buf,
        out: Buf,
        n: usize,
        eps: f32,
    ) -> Result<()> {
        let err = gpu_err(self.device);
        let w = self.resident.norm(norm)?;
        let cols = w.len();
        let w = w.slice(..);
        let (xv, mut ov) = Self::pair(&mut self.bufs, x, 0..n * cols, out, 0..n * cols);
        self.gpu.rms_norm(&xv, &w, eps, &mut ov).map_err(err)
    }

    fn matmul(
        &mut self,
        _weights: &Weights<'_>,
        w: Tensor,
        x: Buf,
        y: Buf,
        n: usize,
    ) -> Result<()> {
        let err = gpu_err(self.device);
        let m = self.resident.matrix(w)?;
        let (cols, rows) = (m.cols(), m.rows());
        let (xv, mut yv) = Self::pair(&mut self.bufs, x, 0..n * cols, y, 0..n * rows);
        self.gpu.matmul(m, &xv, n, &mut yv).map_err(err)
    }

    fn rope(
        &mut self,
        buf: Buf,
        tokens: Range<usize>,
        n_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let row = n_heads * head_dim;
        let n = tokens.len();
        let mut x = self.bufs[buf as usize].slice_mut(tokens.start * row..tokens.end * row);
        let cs = self
            .rope_dev
            .slice(tokens.start * self.rope_dim..tokens.end * self.rope_dim);
        self.gpu
            .rope(&mut x, &cs, n, n_heads, head_dim, self.rope_dim)
            .map_err(gpu_err(self.device))
    }

    fn attention(
        &mut self,
        layer: usize,
        shape: AttnShape,
        seq: &SeqAttention,
        cache: &mut KvCache,
        scale: f32,
    ) -> Result<()> {
        let err = gpu_err(self.device);
        let (qd, kd) = (
            shape.n_heads * shape.head_dim,
            shape.n_kv_heads * shape.head_dim,
        );
        let t = seq.tokens.clone();
        let n = t.len();
        let [_, _, q, k, v, att, ..] = &mut self.bufs;
        {
            let Some((mut kc, mut vc)) = cache.gpu_layer_mut(layer) else {
                return Err(Error::KvCache(format!(
                    "sequence {}: its KV cache is in host memory, this engine runs on {}",
                    seq.index, self.device
                )));
            };
            let (ks, vs) = (
                k.slice(t.start * kd..t.end * kd),
                v.slice(t.start * kd..t.end * kd),
            );
            self.gpu
                .kv_write(&ks, n, seq.start_pos, &mut kc)
                .map_err(&err)?;
            self.gpu
                .kv_write(&vs, n, seq.start_pos, &mut vc)
                .map_err(&err)?;
        }
        let LayerKv::Gpu(kc, vc) = cache.layer(layer) else {
            unreachable!("a GPU cache gives GPU layers")
        };
        let qv = q.slice(t.start * qd..t.end * qd);
        let mut out = att.slice_mut(t.start * qd..t.end * qd);
        self.gpu
            .attention(shape, &qv, n, seq.start_pos, &kc, &vc, scale, &mut out)
            .map_err(err)
    }

    fn silu_mul(&mut self, len: usize) -> Result<()> {
        let (up, mut gate) = Self::pair(&mut self.bufs, Buf::Up, 0..len, Buf::Gate, 0..len);
        self.gpu
            .silu_mul(&mut gate, &up)
            .map_err(gpu_err(self.device))
    }

    fn add(&mut self, x: Buf, d: Buf, len: usize) -> Result<()> {
        let (dv, mut xv) = Self::pair(&mut self.bufs, d, 0..len, x, 0..len);
        self.gpu.add(&mut xv, &dv).map_err(gpu_err(self.device))
    }

    fn all_reduce(&mut self, collective: &mut dyn Collective, buf: Buf, len: usize) -> Result<()> {
        if collective.world_size() == 1 {
            return Ok(());
        }
        if let Some(comm) = &self.nccl {
            let mut v = self.bufs[buf as usize].slice_mut(0..len);
            return comm
                .0
                .all_reduce_in_place(&mut v, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| Error::Device {
                    device: self.device.to_string(),
                    msg: format!("ncclAllReduce: {e:?}"),
                });
        }
        self.download_host(buf, len)?;
        collective.all_reduce_sum(&mut self.host[..len])?;
        self.upload_host(buf, len)
    }

    fn gather_rows(&mut self, src: Buf, rows: &[usize], dst: Buf, cols: usize) -> Result<()> {
        let err = gpu_err(self.device);
        for (i, &r) in rows.iter().enumerate() {
            let (s, mut d) = Self::pair(
                &mut self.bufs,
                src,
                r * cols..(r + 1) * cols,
                dst,
                i * cols..(i + 1) * cols,
            );
            self.gpu
                .stream()
                .memcpy_dtod(&s, &mut d)
                .map_err(|e| err(CudaError::Driver(e.to_string())))?;
        }
        Ok(())
    }

    fn host(&mut self, buf: Buf, len: usize) -> Result<&[f32]> {
        self.download_host(buf, len)?;
        Ok(&self.host[..len])
    }
}

/// The shard's matrices and norms in GPU memory.
struct Resident {
    /// Per local layer: q, k, v, output, gate, up, down.
    layers: Vec<[GpuMatrix; 7]>,
    /// Per local layer: attention norm, FFN norm.
    norms: Vec<[CudaSlice<f32>; 2]>,
    output_norm: Option<CudaSlice<f32>>,
    lm_head: Option<GpuMatrix>,
}

impl Resident {
    fn matrix(&self, t: Tensor) -> Result<&GpuMatrix> {
        let layer = |l: usize, i: usize| self.layers.get(l).map(|m| &m[i]);
        match t {
            Tensor::AttnQ(l) => layer(l, 0),
            Tensor::AttnK(l) => layer(l, 1),
            Tensor::AttnV(l) => layer(l, 2),
            Tensor::AttnOutput(l) => layer(l, 3),
            Tensor::FfnGate(l) => layer(l, 4),
            Tensor::FfnUp(l) => layer(l, 5),
            Tensor::FfnDown(l) => layer(l, 6),
            Tensor::LmHead => self.lm_head.as_ref(),
            Tensor::AttnNorm(_) | Tensor::FfnNorm(_) | Tensor::OutputNorm => None,
        }
        .ok_or_else(|| Error::Batch(format!("this shard holds no {t:?} matrix")))
    }

    fn norm(&self, t: Tensor) -> Result<&CudaSlice<f32>> {
        match t {
            Tensor::AttnNorm(l) => self.norms.get(l).map(|n| &n[0]),
            Tensor::FfnNorm(l) => self.norms.get(l).map(|n| &n[1]),
            Tensor::OutputNorm => self.output_norm.as_ref(),
            _ => None,
        }
        .ok_or_else(|| Error::Batch(format!("this shard holds no {t:?} norm")))
    }
}

/// The seven matrices of local layer `l`, in the order `CudaBackend::layers` holds them.
fn layer_tensors(l: usize) -> [Tensor; 7] {
    [
        Tensor::AttnQ(l),
        Tensor::AttnK(l),
        Tensor::AttnV(l),
        Tensor::AttnOutput(l),
        Tensor::FfnGate(l),
        Tensor::FfnUp(l),
        Tensor::FfnDown(l),
    ]
}

fn upload_matrix(gpu: &Gpu, m: &Matrix<'_>) -> Result<GpuMatrix> {
    gpu.upload(m.ty, m.rows, m.cols, &m.data)
        .map_err(|e| Error::tensor(&m.name, format!("uploading to the GPU: {e}")))
}

fn gpu_err(device: Device) -> impl Fn(CudaError) -> Error {
    move |e| Error::Device {
        device: device.to_string(),
        msg: e.to_string(),
    }
}
