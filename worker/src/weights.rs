//! The weights of one shard — one (pipeline stage, tensor-parallel rank) of a shard plan — as views into the
//! memory-mapped checkpoint or shard file.
//!
//! Two sources give the same [`Weights`]:
//! - an original checkpoint ([`shard_tool::checkpoint::Checkpoint`]) plus the [`ShardSpec`] that
//!   [`shard_tool::plan::plan`] made for it (`Topology::new(1, 1)` for single-process runs). GGUF tensors and
//!   row slices are borrowed from the map; Hugging Face Q/K rows are gathered into GGUF order (owned), and a
//!   column slice (`attn_output`, `ffn_down` under tensor parallelism) is copied row by row;
//! - a shard directory written by `shard-tool split` ([`ShardDir`]): `manifest.json` plus
//!   `stageXX-rankYY.gguf`, whose tensors already are the slices (all borrowed).
//!
//! Conventions are the checkpoint library's: GGUF tensor names (field names follow them), ggml shapes
//! (`shape[0]` is the input dimension), Q/K rows in GGUF's rotary order. Every tensor's type, shape and byte
//! length is checked against the model config and the spec; errors name the tensor.

use std::borrow::Cow;
use std::ops::Range;
use std::path::{Path, PathBuf};

use shard_tool::checkpoint::Checkpoint;
use shard_tool::config::ModelConfig;
use shard_tool::gguf::GgufSet;
use shard_tool::manifest::{Manifest, shard_file_name};
use shard_tool::model_keys::llama3_rope_factors;
use shard_tool::plan::{ShardSpec, Slice, TensorSlice};
use tessera_kernels::cpu::{PackedMatrix, QMatrix};
use tessera_kernels::quant::{GgmlType, dequantize_row};

use crate::backend::Device;
use crate::engine::EngineOptions;
use crate::error::{Error, Result};

/// A weight matrix (or this shard's slice of one) in ggml layout: `rows` rows of `cols` elements, each row a
/// whole number of `ty` blocks. `matmul` computes `y[r] = row_r · x` for an input `x` of `cols` elements.
#[derive(Debug, Clone)]
pub struct Matrix<'m> {
    /// Tensor name, for messages.
    pub name: String,
    pub ty: GgmlType,
    /// Input dimension (`shape[0]`).
    pub cols: usize,
    /// Output dimension (`shape[1]`).
    pub rows: usize,
    /// `rows · bytes_for(cols)` bytes, borrowed from the map where possible.
    pub data: Cow<'m, [u8]>,
    /// The same weights re-laid out for this CPU's packed matmul kernels (16 rows interleaved), when it has
    /// one for `ty`; `None` otherwise (the matmul then reads `data`). An owned copy: packing trades memory
    /// for 3–5× faster matrix-vector products (kernels/src/cpu/packed.rs).
    pub packed: Option<PackedMatrix>,
}

impl Matrix<'_> {
    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    /// Whether the bytes are a view into the memory map (not a copy).
    pub fn is_borrowed(&self) -> bool {
        matches!(self.data, Cow::Borrowed(_))
    }
}

/// One transformer block's tensors (this rank's slices; norms are replicated, as f32).
#[derive(Debug, Clone)]
pub struct LayerWeights<'m> {
    /// [n_embd]
    pub attn_norm: Vec<f32>,
    /// [n_embd → q_heads·head_dim]
    pub attn_q: Matrix<'m>,
    /// [n_embd → kv_heads·head_dim]
    pub attn_k: Matrix<'m>,
    /// [n_embd → kv_heads·head_dim]
    pub attn_v: Matrix<'m>,
    /// [q_heads·head_dim → n_embd] (this rank's input columns)
    pub attn_output: Matrix<'m>,
    /// [n_embd]
    pub ffn_norm: Vec<f32>,
    /// [n_embd → ffn_rows]
    pub ffn_gate: Matrix<'m>,
    /// [n_embd → ffn_rows]
    pub ffn_up: Matrix<'m>,
    /// [ffn_rows → n_embd] (this rank's input columns)
    pub ffn_down: Matrix<'m>,
}

/// Everything one (stage, rank) holds.
#[derive(Debug, Clone)]
pub struct Weights<'m> {
    /// Global indices of this stage's transformer layers; `blocks[i]` is layer `layers.start + i`.
    pub layers: Range<usize>,
    pub blocks: Vec<LayerWeights<'m>>,
    /// First stage: this rank's vocabulary rows of the embedding. With tied embeddings the last stage holds
    /// it too, as its LM head.
    pub token_embd: Option<Matrix<'m>>,
    /// Last stage: [n_embd].
    pub output_norm: Option<Vec<f32>>,
    /// Last stage, untied models: this rank's vocabulary rows of the LM head.
    pub output: Option<Matrix<'m>>,
    /// Per rotated pair, the divisor of its RoPE frequency (`rope_freqs.weight` of Llama 3.1 GGUFs, or the
    /// same factors computed from config.json's `rope_scaling`); `None` for unscaled RoPE.
    pub rope_freqs: Option<Vec<f32>>,
    /// This stage runs the embedding (stage 0).
    pub is_first: bool,
    /// This stage runs the final norm and LM head.
    pub is_last: bool,
}

impl<'m> Weights<'m> {
    /// The shard `spec` of a checkpoint (a plan made from `ckpt.config` and `ckpt.tensors`).
    pub fn from_checkpoint(ckpt: &'m Checkpoint, spec: &ShardSpec) -> Result<Self> {
        Self::from_checkpoint_for(ckpt, spec, Device::Cpu)
    }

    /// As [`Weights::from_checkpoint`], laid out for an engine on `device`: packed for the CPU kernels, or
    /// left as mapped views for a GPU (which uploads them; a packed host copy would only cost memory).
    pub fn from_checkpoint_for(
        ckpt: &'m Checkpoint,
        spec: &ShardSpec,
        device: Device,
    ) -> Result<Self> {
        let options = EngineOptions {
            device,
            ..EngineOptions::default()
        };
        Self::from_checkpoint_with(ckpt, spec, &options)
    }

    /// As [`Weights::from_checkpoint`], laid out for an engine with `options`: packed for the fast CPU
    /// kernels, else in GGUF row order (a GPU, or [`crate::Numerics::LlamaCppAvx2`]).
    pub fn from_checkpoint_with(
        ckpt: &'m Checkpoint,
        spec: &ShardSpec,
        options: &EngineOptions,
    ) -> Result<Self> {
        Self::load(
            &ckpt.config,
            spec,
            &CheckpointSource(ckpt),
            options.packs_weights(),
        )
    }

    /// As [`Weights::from_shard_dir`], laid out for an engine with `options` (see
    /// [`Weights::from_checkpoint_with`]).
    pub fn from_shard_dir_with(dir: &'m ShardDir, options: &EngineOptions) -> Result<Self> {
        Self::load(
            dir.config(),
            &dir.spec,
            &ShardFileSource(dir),
            options.packs_weights(),
        )
    }

    /// The shard a [`ShardDir`] holds.
    pub fn from_shard_dir(dir: &'m ShardDir) -> Result<Self> {
        Self::from_shard_dir_for(dir, Device::Cpu)
    }

    /// As [`Weights::from_shard_dir`], laid out for an engine on `device` (see
    /// [`Weights::from_checkpoint_for`]).
    pub fn from_shard_dir_for(dir: &'m ShardDir, device: Device) -> Result<Self> {
        let options = EngineOptions {
            device,
            ..EngineOptions::default()
        };
        Self::from_shard_dir_with(dir, &options)
    }

    /// The embedding matrix, on the first stage.
    pub fn embedding(&self) -> Option<&Matrix<'m>> {
        self.token_embd.as_ref().filter(|_| self.is_first)
    }

    /// The LM head (`output`, or `token_embd` when tied), on the last stage.
    pub fn lm_head(&self) -> Option<&Matrix<'m>> {
        if !self.is_last {
            return None;
        }
        self.output.as_ref().or(self.token_embd.as_ref())
    }

    /// Every weight matrix held: each block's seven, then the embedding and the untied LM head.
    pub fn matrices(&self) -> impl Iterator<Item = &Matrix<'m>> {
        self.blocks
            .iter()
            .flat_map(|b| {
                [
                    &b.attn_q,
                    &b.attn_k,
                    &b.attn_v,
                    &b.attn_output,
                    &b.ffn_gate,
                    &b.ffn_up,
                    &b.ffn_down,
                ]
            })
            .chain(self.token_embd.as_ref())
            .chain(self.output.as_ref())
    }

    /// Bytes of all tensors held (views and copies alike).
    pub fn bytes(&self) -> usize {
        let v = |v: &[f32]| v.len() * 4;
        let norms: usize = self
            .blocks
            .iter()
            .map(|b| v(&b.attn_norm) + v(&b.ffn_norm))
            .sum();
        norms
            + self.matrices().map(|m| m.data.len()).sum::<usize>()
            + self.output_norm.as_deref().map_or(0, v)
    }

    fn load(
        config: &ModelConfig,
        spec: &ShardSpec,
        src: &dyn TensorSource<'m>,
        pack: bool,
    ) -> Result<Self> {
        let dims = ShardDims::new(config, spec, pack)?;
        let layers = dims.layers.clone();
        let mut blocks = Vec::with_capacity(layers.len());
        for l in layers.clone() {
            let name = |part: &str| format!("blk.{l}.{part}.weight");
            let matrix = |part: &str, cols: usize, rows: usize| {
                dims.matrix(spec, src, &name(part), cols, rows)
            };
            let (e, q, kv, ff) = (dims.n_embd, dims.q_rows, dims.kv_rows, dims.ffn);
            blocks.push(LayerWeights {
                attn_norm: dims.vector(spec, src, &name("attn_norm"), e)?,
                attn_q: matrix("attn_q", e, q)?,
                attn_k: matrix("attn_k", e, kv)?,
                attn_v: matrix("attn_v", e, kv)?,
                attn_output: matrix("attn_output", q, e)?,
                ffn_norm: dims.vector(spec, src, &name("ffn_norm"), e)?,
                ffn_gate: matrix("ffn_gate", e, ff)?,
                ffn_up: matrix("ffn_up", e, ff)?,
                ffn_down: matrix("ffn_down", ff, e)?,
            });
        }
        let has = |name: &str| spec.tensors.iter().any(|t| t.name == name);
        let is_first = spec.stage == 0;
        let is_last = has("output_norm.weight");
        let vocab = dims.vocab;
        let holds_embd = is_first || (is_last && config.tied_embeddings);
        let token_embd = holds_embd
            .then(|| dims.matrix(spec, src, "token_embd.weight", dims.n_embd, vocab))
            .transpose()?;
        let output_norm = is_last
            .then(|| dims.vector(spec, src, "output_norm.weight", dims.n_embd))
            .transpose()?;
        let output = (is_last && !config.tied_embeddings)
            .then(|| dims.matrix(spec, src, "output.weight", dims.n_embd, vocab))
            .transpose()?;
        if (is_first || is_last) && vocab == 0 {
            return Err(dims.spec_err("holds the embedding or LM head but no vocabulary rows"));
        }
        let rope_freqs = if has("rope_freqs.weight") {
            Some(dims.vector(spec, src, "rope_freqs.weight", config.rope_dim / 2)?)
        } else {
            llama3_rope_factors(config)
        };
        if let Some(f) = &rope_freqs
            && let Some(bad) = f.iter().find(|v| !(v.is_finite() && **v > 0.0))
        {
            return Err(Error::tensor(
                "rope_freqs.weight",
                format!("frequency factor {bad} is not a positive number"),
            ));
        }
        Ok(Weights {
            layers,
            blocks,
            token_embd,
            output_norm,
            output,
            rope_freqs,
            is_first,
            is_last,
        })
    }
}

/// The layer range a shard spec holds: the `blk.N.*` tensors it lists, which must be contiguous and
/// complete (all nine tensors of every layer).
pub fn spec_layers(config: &ModelConfig, spec: &ShardSpec) -> Result<Range<usize>> {
    const PARTS: usize = 9;
    let spec_err = |msg: String| Error::Spec {
        stage: spec.stage,
        rank: spec.rank,
        msg,
    };
    let mut lo = usize::MAX;
    let mut hi = 0usize;
    let mut count = 0usize;
    for t in &spec.tensors {
        let Some(layer) = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(n, _)| n.parse::<usize>().ok())
        else {
            continue;
        };
        if layer >= config.n_layer {
            return Err(spec_err(format!(
                "tensor `{}` is for layer {layer}, but the model has {} layers",
                t.name, config.n_layer
            )));
        }
        lo = lo.min(layer);
        hi = hi.max(layer + 1);
        count += 1;
    }
    if count == 0 {
        return Err(spec_err("holds no transformer layers".into()));
    }
    if count != (hi - lo) * PARTS {
        return Err(spec_err(format!(
            "layers {lo}..{hi} need {} tensors (9 per layer), the spec lists {count}",
            (hi - lo) * PARTS
        )));
    }
    Ok(lo..hi)
}

/// The dimensions every tensor of a shard is checked against.
struct ShardDims {
    stage: usize,
    rank: usize,
    layers: Range<usize>,
    n_embd: usize,
    q_rows: usize,
    kv_rows: usize,
    ffn: usize,
    vocab: usize,
    /// Re-lay matrices out for the CPU's packed kernels.
    pack: bool,
}

impl ShardDims {
    fn new(config: &ModelConfig, spec: &ShardSpec, pack: bool) -> Result<Self> {
        config.validate().map_err(|msg| Error::Spec {
            stage: spec.stage,
            rank: spec.rank,
            msg: format!("model config: {msg}"),
        })?;
        let within = |what: &str, r: &Range<usize>, n: usize| {
            if r.start > r.end || r.end > n {
                Err(Error::Spec {
                    stage: spec.stage,
                    rank: spec.rank,
                    msg: format!("{what} {r:?} outside the model's {n}"),
                })
            } else {
                Ok(())
            }
        };
        within("query heads", &spec.q_heads, config.n_head)?;
        within("KV heads", &spec.kv_heads, config.n_head_kv)?;
        within("FFN rows", &spec.ffn_rows, config.n_ff)?;
        within("vocabulary rows", &spec.vocab_rows, config.n_vocab)?;
        let q_per_kv = config.q_per_kv();
        if spec.q_heads.is_empty() {
            return Err(Error::Spec {
                stage: spec.stage,
                rank: spec.rank,
                msg: "holds no query heads".into(),
            });
        }
        for h in spec.q_heads.clone() {
            if !spec.kv_heads.contains(&(h / q_per_kv)) {
                return Err(Error::Spec {
                    stage: spec.stage,
                    rank: spec.rank,
                    msg: format!(
                        "query head {h} reads KV head {}, which is not among this rank's KV heads {:?}",
                        h / q_per_kv,
                        spec.kv_heads
                    ),
                });
            }
        }
        Ok(ShardDims {
            stage: spec.stage,
            rank: spec.rank,
            layers: spec_layers(config, spec)?,
            n_embd: config.n_embd,
            q_rows: spec.q_heads.len() * config.head_dim,
            kv_rows: spec.kv_heads.len() * config.head_dim,
            ffn: spec.ffn_rows.len(),
            vocab: spec.vocab_rows.len(),
            pack,
        })
    }

    fn spec_err(&self, msg: impl Into<String>) -> Error {
        Error::Spec {
            stage: self.stage,
            rank: self.rank,
            msg: msg.into(),
        }
    }

    fn slice<'s>(&self, spec: &'s ShardSpec, name: &str) -> Result<&'s TensorSlice> {
        spec.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::MissingTensor(name.to_owned()))
    }

    /// A matrix of `rows` rows of `cols` elements.
    fn matrix<'m>(
        &self,
        spec: &ShardSpec,
        src: &dyn TensorSource<'m>,
        name: &str,
        cols: usize,
        rows: usize,
    ) -> Result<Matrix<'m>> {
        let slice = self.slice(spec, name)?;
        let (ty, data) = src.read(slice, &[cols as u64, rows as u64])?;
        let expected = ty
            .bytes_for(cols)
            .ok()
            .and_then(|b| b.checked_mul(rows))
            .ok_or_else(|| {
                Error::tensor(
                    name,
                    format!(
                        "{} rows of {cols} elements are not whole {} blocks",
                        rows,
                        ty.name()
                    ),
                )
            })?;
        if data.len() != expected {
            return Err(Error::tensor(
                name,
                format!(
                    "{} bytes, but [{cols}, {rows}] of {} needs {expected}",
                    data.len(),
                    ty.name()
                ),
            ));
        }
        if !self.pack {
            return Ok(Matrix {
                name: name.to_owned(),
                ty,
                cols,
                rows,
                packed: None,
                data,
            });
        }
        // Pack a few MB at a time and drop the mapped pages of each packed chunk at once, so loading never
        // holds a matrix twice (Llama 3's 128256-row embedding is hundreds of MB).
        let row_bytes = data.len() / rows.max(1);
        let mapped: Option<&[u8]> = match &data {
            Cow::Borrowed(b) => Some(b),
            Cow::Owned(_) => None,
        };
        let chunk_rows = ((8 << 20) / row_bytes.max(1)).max(16);
        let packed = QMatrix::new(ty, rows, cols, &data)
            .and_then(|q| {
                PackedMatrix::new_chunked(&q, chunk_rows, |done| {
                    if let Some(m) = mapped {
                        src.release(&m[done.start * row_bytes..done.end * row_bytes]);
                    }
                })
            })
            .map_err(|e| Error::tensor(name, format!("packing for the matmul kernels: {e}")))?;
        if packed.is_interleaved()
            && let Cow::Borrowed(mapped) = &data
        {
            // The kernels read the packed copy from now on; keeping the mapped pages resident too would
            // double the weights' memory. (Embedding lookups fault back only the rows they read.)
            src.release(mapped);
        }
        Ok(Matrix {
            name: name.to_owned(),
            ty,
            cols,
            rows,
            packed: packed.is_interleaved().then_some(packed),
            data,
        })
    }

    /// A 1-D tensor of `n` elements, converted to f32.
    fn vector<'m>(
        &self,
        spec: &ShardSpec,
        src: &dyn TensorSource<'m>,
        name: &str,
        n: usize,
    ) -> Result<Vec<f32>> {
        let slice = self.slice(spec, name)?;
        let (ty, data) = src.read(slice, &[n as u64])?;
        let mut out = vec![0.0f32; n];
        dequantize_row(ty, &data, &mut out).map_err(|e| Error::tensor(name, e.to_string()))?;
        Ok(out)
    }
}

/// Where tensor bytes come from.
trait TensorSource<'m> {
    /// The element type and bytes of `slice`, after checking that the stored shape is `shape`.
    fn read(&self, slice: &TensorSlice, shape: &[u64]) -> Result<(GgmlType, Cow<'m, [u8]>)>;
    /// Drops `bytes` (returned by `read`) from the resident set; they fault back in if read again.
    fn release(&self, bytes: &[u8]);
}

fn check_shape(name: &str, what: &str, got: &[u64], expected: &[u64]) -> Result<()> {
    if got != expected {
        return Err(Error::tensor(
            name,
            format!(
                "{what} shape {got:?}, but the config and shard spec imply {expected:?} (ggml order: [input, rows])"
            ),
        ));
    }
    Ok(())
}

struct CheckpointSource<'m>(&'m Checkpoint);

impl<'m> TensorSource<'m> for CheckpointSource<'m> {
    fn release(&self, bytes: &[u8]) {
        self.0.release_bytes(bytes);
    }

    fn read(&self, slice: &TensorSlice, shape: &[u64]) -> Result<(GgmlType, Cow<'m, [u8]>)> {
        let ckpt = self.0;
        let name = &slice.name;
        let index = ckpt
            .position(name)
            .ok_or_else(|| Error::MissingTensor(name.clone()))?;
        let desc = &ckpt.tensors[index];
        if desc.ty != slice.ty || desc.shape != slice.full_shape {
            return Err(Error::tensor(
                name,
                format!(
                    "the checkpoint has {} {:?}, the shard spec was planned for {} {:?}",
                    desc.ty.name(),
                    desc.shape,
                    slice.ty.name(),
                    slice.full_shape
                ),
            ));
        }
        check_shape(name, "slice", &slice.shape, shape)?;
        let data = match slice.slice {
            Slice::Whole => {
                check_shape(name, "tensor", &desc.shape, shape)?;
                ckpt.rows(index, 0..desc.n_rows())?
            }
            Slice::Rows { start, end } => ckpt.rows(index, start..end)?,
            Slice::Cols { start, end } => {
                let (block, size) = (desc.ty.block_size() as u64, desc.ty.type_size() as u64);
                if !start.is_multiple_of(block)
                    || !end.is_multiple_of(block)
                    || start > end
                    || end > desc.row_len()
                {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "columns {start}..{end} are not a block-aligned ({block}) range of its {} columns",
                            desc.row_len()
                        ),
                    ));
                }
                let all = ckpt.rows(index, 0..desc.n_rows())?;
                let row_bytes = all.len() / desc.n_rows().max(1) as usize;
                let (c0, c1) = (
                    (start / block * size) as usize,
                    (end / block * size) as usize,
                );
                let mut out = Vec::with_capacity((c1 - c0) * desc.n_rows() as usize);
                for row in all.chunks_exact(row_bytes.max(1)) {
                    out.extend_from_slice(&row[c0..c1]);
                }
                Cow::Owned(out)
            }
        };
        Ok((desc.ty, data))
    }
}

/// A shard directory opened for one (stage, rank): its manifest and its GGUF file.
#[derive(Debug)]
pub struct ShardDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// This shard's spec, from the manifest's plan.
    pub spec: ShardSpec,
    pub file: GgufSet,
}

impl ShardDir {
    /// Opens `manifest.json` and `stageXX-rankYY.gguf` in `dir`, checking the file's size against the
    /// manifest (`shard-tool verify DIR` checks checksums; that reads every byte, so it is not done here).
    pub fn open(dir: &Path, stage: usize, rank: usize) -> Result<ShardDir> {
        let manifest = Manifest::load(dir)?;
        let spec_err = |msg: String| Error::Spec { stage, rank, msg };
        let spec = manifest.plan.shard(stage, rank).cloned().ok_or_else(|| {
            spec_err(format!(
                "{} has no such shard (plan is tp={}, pp={})",
                dir.display(),
                manifest.plan.topology.tp,
                manifest.plan.topology.pp
            ))
        })?;
        let entry = manifest
            .shard(stage, rank)
            .ok_or_else(|| spec_err(format!("{} lists no file for this shard", dir.display())))?;
        let expected_name = shard_file_name(stage, rank);
        if entry.entry.file != expected_name {
            return Err(spec_err(format!(
                "manifest names the file `{}`, expected `{expected_name}`",
                entry.entry.file
            )));
        }
        let path = dir.join(&entry.entry.file);
        let size = std::fs::metadata(&path)
            .map_err(|e| shard_tool::Error::io(&path, e))?
            .len();
        if size != entry.entry.bytes {
            return Err(spec_err(format!(
                "{} is {size} bytes, the manifest says {}: incomplete copy? run `shard-tool verify {}`",
                path.display(),
                entry.entry.bytes,
                dir.display()
            )));
        }
        let file = GgufSet::open(&path)?;
        for (key, want) in [("tessera.shard.stage", stage), ("tessera.shard.rank", rank)] {
            let got = file.get(key).and_then(|v| v.as_u64());
            if got != Some(want as u64) {
                return Err(spec_err(format!(
                    "{} has `{key}` = {got:?}, expected {want}: a shard file from another position?",
                    path.display()
                )));
            }
        }
        Ok(ShardDir {
            dir: dir.to_owned(),
            manifest,
            spec,
            file,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.manifest.config
    }
}

struct ShardFileSource<'m>(&'m ShardDir);

impl<'m> TensorSource<'m> for ShardFileSource<'m> {
    fn release(&self, bytes: &[u8]) {
        self.0.file.release_bytes(bytes);
    }

    fn read(&self, slice: &TensorSlice, shape: &[u64]) -> Result<(GgmlType, Cow<'m, [u8]>)> {
        let set = &self.0.file;
        let name = &slice.name;
        let t = set
            .tensor(name)
            .ok_or_else(|| Error::MissingTensor(format!("{name} (in {})", set.path().display())))?;
        if t.desc.ty != slice.ty {
            return Err(Error::tensor(
                name,
                format!(
                    "{} in {}, but the manifest says {}",
                    t.desc.ty.name(),
                    set.path().display(),
                    slice.ty.name()
                ),
            ));
        }
        check_shape(name, "stored", &t.desc.shape, shape)?;
        Ok((t.desc.ty, set.tensor_data(t)?))
    }
}
