//! `synth`: a random-weight GGUF with the exact shape of a real model (optionally fewer layers), for tests,
//! benchmarks and capacity dry-runs. Weights are N(0, 0.02²) like a freshly initialised Llama, norms are
//! near 1, and `rope_freqs.weight` holds the real Llama 3.1 factors; matrices are quantized with Tessera's
//! reference quantizers (llama.cpp-compatible block formats). A real tokenizer can be copied in from any GGUF
//! (e.g. llama.cpp's vocab-only `ggml-vocab-llama-bpe.gguf`).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use tessera_kernels::quant::{GgmlType, quantize_row};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::{GgufSet, GgufWriter, SHARD_ALIGNMENT, Value};
use crate::model_keys::{config_metadata, llama3_rope_factors};
use crate::shapes::{Preset, tensor_descs};
use crate::split::{HashingWriter, progress_bar};
use crate::tensor::TensorDesc;

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub preset: Preset,
    pub layers: Option<usize>,
    pub quant: GgmlType,
    /// A GGUF whose `tokenizer.*` metadata is copied (its vocabulary size replaces the preset's).
    pub tokenizer_from: Option<PathBuf>,
    pub seed: u64,
    pub out: PathBuf,
    pub progress: bool,
}

/// Rows generated and quantized per parallel work item.
const ROWS_PER_CHUNK: u64 = 256;

/// SplitMix64: tiny, fast, and good enough for weights nobody trains.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Approximately normal (Irwin–Hall of 4 uniforms, variance matched), cheaper than Box–Muller.
    fn normal(&mut self) -> f32 {
        let r = self.next_u64();
        let sum: u32 = (0..4).map(|i| ((r >> (16 * i)) & 0xFFFF) as u32).sum();
        // mean 2·65535, variance 4·65536²/12
        (sum as f32 / 65535.0 - 2.0) * (3.0f32).sqrt()
    }
}

fn seed_for(seed: u64, name: &str, chunk: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), seed)
        ^ chunk.wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// Values of rows [r0, r1) of tensor `desc`.
fn generate(
    desc: &TensorDesc,
    rows: std::ops::Range<u64>,
    seed: u64,
    rope: Option<&[f32]>,
) -> Vec<f32> {
    let n = (desc.row_len() * (rows.end - rows.start)) as usize;
    if let Some(factors) = rope.filter(|_| desc.name == "rope_freqs.weight") {
        return factors.to_vec();
    }
    let mut rng = Rng(seed_for(seed, &desc.name, rows.start));
    if desc.shape.len() == 1 {
        // norms: around 1, as trained RMSNorm weights are
        return (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect();
    }
    (0..n).map(|_| 0.02 * rng.normal()).collect()
}

/// Writes the synthetic model; returns its config.
pub fn synth(opts: &SynthOptions) -> Result<ModelConfig> {
    let mut config = opts.preset.config_with_layers(opts.layers);
    config.name = Some(format!("tessera-synth {}", opts.preset.name()));
    let mut metadata = Vec::new();
    if let Some(tok_path) = &opts.tokenizer_from {
        let tok = GgufSet::open(tok_path)?;
        let keys: Vec<_> = tok
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .cloned()
            .collect();
        let n_tokens = tok
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(|a| a.len())
            .ok_or_else(|| Error::Missing {
                path: tok_path.clone(),
                key: "metadata key `tokenizer.ggml.tokens`".into(),
            })?;
        config.n_vocab = n_tokens;
        metadata = keys;
    }
    let mut md = config_metadata(&config);
    md.append(&mut metadata);
    let descs = tensor_descs(&config, opts.quant);
    let rope = llama3_rope_factors(&config);

    let tmp = tmp_path(&opts.out);
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let out = HashingWriter::new(BufWriter::with_capacity(4 << 20, file));
    let mut writer = GgufWriter::new(out, &opts.out, md, descs.clone(), SHARD_ALIGNMENT)?;
    let total = descs.iter().filter_map(|d| d.n_bytes().ok()).sum();
    let bar = progress_bar(opts.progress, total, "synthesizing");
    for desc in &descs {
        writer.begin_tensor(&desc.name)?;
        let n_rows = desc.n_rows();
        let starts: Vec<u64> = (0..n_rows).step_by(ROWS_PER_CHUNK as usize).collect();
        // Parallel generation in bounded waves keeps memory at (threads × chunk) regardless of tensor size.
        for wave in starts.chunks(rayon::current_num_threads().max(1) * 4) {
            let parts: Vec<Result<Vec<u8>>> = wave
                .par_iter()
                .map(|&r0| {
                    let rows = r0..(r0 + ROWS_PER_CHUNK).min(n_rows);
                    let values = generate(desc, rows, opts.seed, rope.as_deref());
                    let mut bytes = Vec::new();
                    for row in values.chunks(desc.row_len() as usize) {
                        quantize_row(desc.ty, row, &mut bytes).map_err(|source| Error::Tensor {
                            path: opts.out.clone(),
                            tensor: desc.name.clone(),
                            source,
                        })?;
                    }
                    Ok(bytes)
                })
                .collect();
            for part in parts {
                let part = part?;
                bar.inc(part.len() as u64);
                writer.write_chunk(&part)?;
            }
        }
        writer.end_tensor()?;
    }
    bar.finish_and_clear();
    let (_, _, buffered) = writer.finish()?.into_parts();
    let file = buffered
        .into_inner()
        .map_err(|e| Error::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &opts.out).map_err(|e| Error::io(&opts.out, e))?;
    Ok(config)
}

fn tmp_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.tmp"))
}
