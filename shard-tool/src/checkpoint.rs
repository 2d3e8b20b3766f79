//! `Checkpoint`: whatever the user points at, opened as one model in Tessera's canonical convention
//! (GGUF tensor names, ggml-order shapes, GGUF Q/K row order), with row-range access to tensor bytes.
//!
//! Inputs accepted (see the README): a GGUF file, a gguf-split set, byte-split `.catN` pieces, a llamafile,
//! a Hugging Face safetensors directory / files / index. PyTorch pickles are refused with how to convert.

use std::borrow::Cow;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::{self, GgufSet, Value};
use crate::hf::HfCheckpoint;
use crate::manifest::MANIFEST_NAME;
use crate::source::ByteSource;
use crate::tensor::TensorDesc;

/// Metadata key prefixes that describe the tokenizer (carried once per shard set, not per shard).
const TOKENIZER_PREFIX: &str = "tokenizer.";

enum Inner {
    Gguf(GgufSet),
    Hf(Box<HfCheckpoint>),
}

/// An opened model checkpoint.
pub struct Checkpoint {
    /// The paths the user gave (after sibling discovery for split sets and `.catN` pieces).
    pub paths: Vec<PathBuf>,
    /// Human-readable format ("GGUF v3", "gguf-split, 3 files", "llamafile (GGUF v3)", ...).
    pub format: String,
    pub config: ModelConfig,
    /// Every tensor, in the order its bytes lie in the source files.
    pub tensors: Vec<TensorDesc>,
    pub chat_template: Option<String>,
    inner: Inner,
}

/// What `inspect` reports about the tokenizer.
#[derive(Debug, Clone, Default)]
pub struct TokenizerSummary {
    /// "gguf: gpt2 (pre smollm)", "tokenizer.json (BPE)" or "none".
    pub kind: String,
    pub n_tokens: Option<usize>,
    pub bos: Option<u64>,
    pub eos: Option<u64>,
}

impl Checkpoint {
    /// Opens `paths` as one model, detecting the format.
    pub fn open(paths: &[PathBuf]) -> Result<Checkpoint> {
        let Some(first) = paths.first() else {
            return Err(Error::malformed("<no input>", "no model path given"));
        };
        if paths.len() == 1 && first.is_dir() {
            if first.join(MANIFEST_NAME).is_file() {
                return Err(Error::Unsupported {
                    path: first.clone(),
                    msg: "is a shard directory written by `shard-tool split`, not a checkpoint; check it with \
                          `shard-tool verify DIR`"
                        .into(),
                });
            }
            return Self::from_hf(HfCheckpoint::open(first)?, paths.to_vec());
        }
        let is_hf = |p: &PathBuf| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("safetensors" | "json")
            )
        };
        if paths.iter().any(is_hf) {
            return Self::from_hf(HfCheckpoint::open_files(paths)?, paths.to_vec());
        }
        let set = if paths.len() == 1 {
            GgufSet::open(first)?
        } else if paths
            .iter()
            .all(|p| gguf::split_paths(p).ok().flatten().is_some())
        {
            GgufSet::open_paths(paths)?
        } else {
            GgufSet::open_pieces(paths)?
        };
        Self::from_gguf(set)
    }

    fn from_gguf(set: GgufSet) -> Result<Checkpoint> {
        let config = set.model_config()?;
        let version = set.first().version;
        let all_paths: Vec<PathBuf> = set
            .pieces
            .iter()
            .flat_map(|p| p.source.paths().map(Path::to_path_buf))
            .collect();
        let in_container = set.pieces.iter().any(|p| p.source.window_start() > 0);
        let format = if set.pieces.len() > 1 {
            format!("gguf-split, {} files (GGUF v{version})", set.pieces.len())
        } else if in_container {
            format!("llamafile (GGUF v{version} stored in its ZIP)")
        } else if all_paths.len() > 1 {
            format!("GGUF v{version} in {} byte-split pieces", all_paths.len())
        } else {
            format!("GGUF v{version}")
        };
        let chat_template = set
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let tensors = set.tensors.iter().map(|t| t.desc.clone()).collect();
        Ok(Checkpoint {
            paths: all_paths,
            format,
            config,
            tensors,
            chat_template,
            inner: Inner::Gguf(set),
        })
    }

    fn from_hf(hf: HfCheckpoint, paths: Vec<PathBuf>) -> Result<Checkpoint> {
        let n = hf.st.file_count();
        let format = format!("safetensors ({n} file{})", if n == 1 { "" } else { "s" });
        // Emit tensors in the order their bytes lie on disk, so splitting reads each file front to back.
        let mut order: Vec<usize> = (0..hf.tensors.len()).collect();
        order.sort_by_key(|&i| {
            let st = &hf.st.tensors[hf.tensors[i].st_index];
            (st.file, st.offset)
        });
        let hf_sorted: Vec<_> = order.iter().map(|&i| hf.tensors[i].clone()).collect();
        let mut hf = hf;
        hf.tensors = hf_sorted;
        let tensors = hf.tensors.iter().map(|t| t.desc.clone()).collect();
        Ok(Checkpoint {
            paths,
            format,
            config: hf.config.clone(),
            tensors,
            chat_template: hf.tokenizer.chat_template.clone(),
            inner: Inner::Hf(Box::new(hf)),
        })
    }

    /// Path for messages.
    pub fn path(&self) -> &Path {
        &self.paths[0]
    }

    /// Total bytes of the source files.
    pub fn source_bytes(&self) -> u64 {
        match &self.inner {
            Inner::Gguf(set) => set.pieces.iter().map(|p| p.source.len()).sum(),
            Inner::Hf(hf) => hf
                .st
                .file_paths()
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum(),
        }
    }

    /// Index of the tensor called `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.tensors.iter().position(|t| t.name == name)
    }

    /// Bytes of rows `rows` of tensor `index` in canonical order (borrowed from the map where possible).
    pub fn rows(&self, index: usize, rows: Range<u64>) -> Result<Cow<'_, [u8]>> {
        let desc = self.desc(index)?;
        if rows.start > rows.end || rows.end > desc.n_rows() {
            return Err(Error::malformed(
                self.path(),
                format!(
                    "tensor `{}`: rows {rows:?} outside its {} rows",
                    desc.name,
                    desc.n_rows()
                ),
            ));
        }
        match &self.inner {
            Inner::Gguf(set) => {
                let t = &set.tensors[index];
                let row_bytes = self.row_bytes(desc)?;
                let src = &set.pieces[t.piece].source;
                src.read(
                    t.offset + rows.start * row_bytes,
                    (rows.end - rows.start) * row_bytes,
                )
            }
            Inner::Hf(hf) => hf.rows(&hf.tensors[index], rows),
        }
    }

    /// Drops the pages of `bytes` — tensor data this checkpoint lent out — from this process's resident set
    /// (the engine calls it once it has re-laid a matrix out for its kernels and no longer reads the mapping).
    pub fn release_bytes(&self, bytes: &[u8]) {
        match &self.inner {
            Inner::Gguf(set) => set.release_bytes(bytes),
            Inner::Hf(hf) => hf.st.release_bytes(bytes),
        }
    }

    /// Drops the pages of rows `rows` of tensor `index` from this process's resident set (they stay in the
    /// page cache and fault back in if read again). Streaming `split` calls it after each chunk so that even
    /// one tensor larger than the memory limit (Llama 3's 128256-row embedding) never accumulates in RSS.
    pub fn release_rows(&self, index: usize, rows: Range<u64>) {
        let Some(desc) = self.tensors.get(index) else {
            return;
        };
        let Ok(row_bytes) = desc.row_bytes() else {
            return;
        };
        let (start, len) = (rows.start * row_bytes, (rows.end - rows.start) * row_bytes);
        match &self.inner {
            Inner::Gguf(set) => {
                let t = &set.tensors[index];
                set.pieces[t.piece].source.release(t.offset + start, len);
            }
            Inner::Hf(hf) => {
                // Q/K rows are gathered from within the same heads; chunks that cut a head may drop pages
                // still needed, which only costs a re-read.
                let st = &hf.st.tensors[hf.tensors[index].st_index];
                hf.st.release(st.file, st.offset + start, len);
            }
        }
    }

    fn desc(&self, index: usize) -> Result<&TensorDesc> {
        self.tensors
            .get(index)
            .ok_or_else(|| Error::malformed(self.path(), format!("no tensor number {index}")))
    }

    fn row_bytes(&self, desc: &TensorDesc) -> Result<u64> {
        desc.row_bytes().map_err(|source| Error::Tensor {
            path: self.path().to_owned(),
            tensor: desc.name.clone(),
            source,
        })
    }

    /// Metadata every shard carries: the source's model keys (GGUF, minus tokenizer, split and alignment keys),
    /// or `llama.*` keys built from config.json for Hugging Face sources.
    pub fn model_metadata(&self) -> Vec<(String, Value)> {
        match &self.inner {
            Inner::Gguf(set) => set
                .metadata()
                .iter()
                .filter(|(k, _)| {
                    !k.starts_with(TOKENIZER_PREFIX)
                        && !k.starts_with("split.")
                        && k != gguf::KEY_ALIGNMENT
                })
                .cloned()
                .collect(),
            Inner::Hf(_) => crate::model_keys::config_metadata(&self.config),
        }
    }

    /// GGUF tokenizer metadata (`tokenizer.*` keys), for GGUF sources.
    pub fn tokenizer_metadata(&self) -> Option<Vec<(String, Value)>> {
        match &self.inner {
            Inner::Gguf(set) => {
                let keys: Vec<_> = set
                    .metadata()
                    .iter()
                    .filter(|(k, _)| k.starts_with(TOKENIZER_PREFIX))
                    .cloned()
                    .collect();
                (!keys.is_empty()).then_some(keys)
            }
            Inner::Hf(_) => None,
        }
    }

    /// Tokenizer files next to a Hugging Face checkpoint (tokenizer.json, tokenizer_config.json, ...).
    pub fn tokenizer_files(&self) -> Vec<PathBuf> {
        match &self.inner {
            Inner::Gguf(_) => Vec::new(),
            Inner::Hf(hf) => {
                let t = &hf.tokenizer;
                [
                    &t.tokenizer_json,
                    &t.tokenizer_config_json,
                    &t.generation_config_json,
                ]
                .into_iter()
                .flatten()
                .cloned()
                .collect()
            }
        }
    }

    pub fn tokenizer_summary(&self) -> TokenizerSummary {
        match &self.inner {
            Inner::Gguf(set) => {
                let get = |k: &str| set.get(k);
                let Some(model) = get("tokenizer.ggml.model").and_then(Value::as_str) else {
                    return TokenizerSummary {
                        kind: "none".into(),
                        ..Default::default()
                    };
                };
                let pre = get("tokenizer.ggml.pre")
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                TokenizerSummary {
                    kind: format!("GGUF {model} (pre-tokenizer {pre})"),
                    n_tokens: get("tokenizer.ggml.tokens")
                        .and_then(Value::as_array)
                        .map(|a| a.len()),
                    bos: get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64),
                    eos: get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64),
                }
            }
            Inner::Hf(hf) => TokenizerSummary {
                kind: match &hf.tokenizer.tokenizer_json {
                    Some(_) => "tokenizer.json".into(),
                    None => "none".into(),
                },
                ..Default::default()
            },
        }
    }

    /// The byte sources behind a GGUF checkpoint (for tests and tools that need raw access).
    pub fn gguf_sources(&self) -> Vec<&ByteSource> {
        match &self.inner {
            Inner::Gguf(set) => set.pieces.iter().map(|p| &p.source).collect(),
            Inner::Hf(_) => Vec::new(),
        }
    }
}
