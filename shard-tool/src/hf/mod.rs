//! Hugging Face Llama checkpoints: `config.json` + safetensors (+ tokenizer files), presented as canonical
//! GGUF-named tensors in GGUF row order.
//!
//! Layout of a checkpoint directory (<https://huggingface.co/docs/transformers/main_classes/model>):
//! `config.json`, `model.safetensors` or `model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`,
//! `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`, maybe `chat_template.jinja`.
//!
//! - [`config`]: `config.json` → `ModelConfig`.
//! - [`names`]: HF → GGUF names, the shapes the config implies, the Q/K row permutation.
//! - [`tokenizer`]: locating tokenizer files and the chat template.
//!
//! [`HfCheckpoint::open`] checks that the tensors are exactly one Llama model's: every HF name known (the
//! `rotary_emb.inv_freq` buffers some exports carry are skipped), every block complete, every shape the one
//! the config implies. With `tie_word_embeddings` an `lm_head.weight` in the file is ignored, as transformers
//! ties it to the embedding on load.

pub mod config;
pub mod names;
pub mod tokenizer;

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::safetensors::{self, SafetensorsSet};
use crate::tensor::TensorDesc;

pub use config::{parse_config, read_config};
pub use names::{
    HfName, LayerTensor, QkKind, Role, canonical_row_source, gather_canonical_rows, hf_rows_for,
};
pub use tokenizer::HfTokenizerFiles;

/// One model tensor of a checkpoint, in canonical naming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfTensor {
    /// Canonical GGUF name, ggml-order shape, element type.
    pub desc: TensorDesc,
    /// Index into `HfCheckpoint::st.tensors`.
    pub st_index: usize,
    /// Q or K projection: its rows are permuted into GGUF order on read.
    pub qk: Option<QkKind>,
    pub role: Role,
}

/// An opened Hugging Face Llama checkpoint.
#[derive(Debug)]
pub struct HfCheckpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub st: SafetensorsSet,
    pub tokenizer: HfTokenizerFiles,
    /// Canonical order: `token_embd`, blocks 0.. (attn_norm, q, k, v, output, ffn_norm, gate, up, down),
    /// `output_norm`, `output`.
    pub tensors: Vec<HfTensor>,
    by_name: HashMap<String, usize>,
}

impl HfCheckpoint {
    /// Opens a checkpoint directory, its `model.safetensors.index.json`, or one `.safetensors` file;
    /// `config.json` and the tokenizer files are taken from the same directory.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let st = SafetensorsSet::open_dir(path)?;
            return Self::from_parts(path, st);
        }
        Self::open_files(&[path.to_path_buf()])
    }

    /// Opens the given `.safetensors` files (or one index); `config.json` is read from the first one's directory.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let Some(first) = paths.first() else {
            return Err(Error::malformed("<no input>", "no checkpoint file given"));
        };
        let names: Vec<String> = paths
            .iter()
            .filter(|p| safetensors::has_ext(p, safetensors::PICKLE_EXTS))
            .map(|p| p.display().to_string())
            .collect();
        if !names.is_empty() {
            return Err(safetensors::pickled_weights_error(first, &names));
        }
        let dir = first
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let st = SafetensorsSet::open_files(paths)?;
        Self::from_parts(&dir, st)
    }

    /// Reads config.json and the tokenizer files from `dir` and checks `st` against the config.
    pub fn from_parts(dir: &Path, st: SafetensorsSet) -> Result<Self> {
        let config = read_config(&dir.join("config.json"))?;
        let tokenizer = HfTokenizerFiles::find(dir)?;
        let tensors = canonical_tensors(&config, &st, dir)?;
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.desc.name.clone(), i))
            .collect();
        Ok(HfCheckpoint {
            dir: dir.to_path_buf(),
            config,
            st,
            tokenizer,
            tensors,
            by_name,
        })
    }

    /// The tensor with canonical name `name` (`blk.0.attn_q.weight`).
    pub fn tensor(&self, name: &str) -> Option<&HfTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Rows `rows` (ggml rows: `desc.shape[1..]` counts them) of `t`, in canonical order. Borrowed from the
    /// map except for Q/K, whose rows are gathered from the HF heads they come from.
    pub fn rows(&self, t: &HfTensor, rows: Range<u64>) -> Result<Cow<'_, [u8]>> {
        let st = self.st.tensors.get(t.st_index).ok_or_else(|| {
            Error::malformed(
                &self.dir,
                format!(
                    "tensor `{}`: no safetensors entry {}",
                    t.desc.name, t.st_index
                ),
            )
        })?;
        let path = self.st.file_path(st.file);
        let n_rows = t.desc.n_rows();
        if rows.start > rows.end || rows.end > n_rows {
            return Err(Error::malformed(
                path,
                format!(
                    "tensor `{}`: rows {}..{} requested of {n_rows}",
                    st.hf_name, rows.start, rows.end
                ),
            ));
        }
        // Shapes were checked against the byte length at open: these products cannot overflow.
        let row_bytes = t.desc.row_len() * t.desc.ty.type_size() as u64;
        let Some(qk) = t.qk else {
            return self.st.read(
                st.file,
                st.offset + rows.start * row_bytes,
                (rows.end - rows.start) * row_bytes,
            );
        };
        let head_dim = self.config.head_dim as u64;
        let hf = hf_rows_for(head_dim, rows.clone());
        let src = self.st.read(
            st.file,
            st.offset + hf.start * row_bytes,
            (hf.end - hf.start) * row_bytes,
        )?;
        let out = usize::try_from(row_bytes)
            .ok()
            .and_then(|rb| gather_canonical_rows(&src, hf.start, head_dim, rb, rows.clone()))
            .ok_or_else(|| {
                Error::malformed(
                    path,
                    format!(
                        "tensor `{}` ({qk:?}): cannot gather rows {rows:?} (head_dim {head_dim})",
                        st.hf_name
                    ),
                )
            })?;
        Ok(Cow::Owned(out))
    }

    /// All of `t` in canonical order.
    pub fn bytes(&self, t: &HfTensor) -> Result<Cow<'_, [u8]>> {
        self.rows(t, 0..t.desc.n_rows())
    }
}

/// Maps, checks and orders the tensors of `st` against `cfg`.
fn canonical_tensors(cfg: &ModelConfig, st: &SafetensorsSet, dir: &Path) -> Result<Vec<HfTensor>> {
    let mut found: HashMap<Role, usize> = HashMap::new();
    for (i, t) in st.tensors.iter().enumerate() {
        let path = st.file_path(t.file);
        let role = match names::map_hf_name(&t.hf_name) {
            Some(HfName::Tensor(role)) => role,
            Some(HfName::Skip) => {
                tracing::debug!(tensor = %t.hf_name, "skipping: RoPE frequencies are recomputed from config.json");
                continue;
            }
            None => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    msg: format!(
                        "tensor `{}` is not part of a Llama model (LlamaForCausalLM)",
                        t.hf_name
                    ),
                });
            }
        };
        if let Role::Layer(n, _) = role
            && n >= cfg.n_layer
        {
            return Err(Error::malformed(
                path,
                format!(
                    "tensor `{}` is for layer {n}, but config.json has num_hidden_layers = {}",
                    t.hf_name, cfg.n_layer
                ),
            ));
        }
        if role == Role::Output && cfg.tied_embeddings {
            tracing::debug!(tensor = %t.hf_name, "ignored: tie_word_embeddings makes the LM head the embedding");
            continue;
        }
        let expected = names::expected_shape_rowmajor(role, cfg).ok_or_else(|| {
            Error::malformed(
                dir.join("config.json"),
                format!("dimensions for `{}` overflow", t.hf_name),
            )
        })?;
        if t.shape_rowmajor != expected {
            return Err(Error::malformed(
                path,
                format!(
                    "tensor `{}` ({}) has shape {:?}, but config.json implies {expected:?}",
                    t.hf_name,
                    role.name(),
                    t.shape_rowmajor
                ),
            ));
        }
        if let Some(prev) = found.insert(role, i) {
            return Err(Error::malformed(
                path,
                format!(
                    "tensors `{}` and `{}` both map to `{}`",
                    st.tensors[prev].hf_name,
                    t.hf_name,
                    role.name()
                ),
            ));
        }
    }
    let missing = |role: Role, why: &str| Error::Missing {
        path: st
            .index
            .clone()
            .unwrap_or_else(|| st.file_path(0).to_path_buf()),
        key: format!(
            "tensor `{}` ({}){why}",
            names::hf_name(role).unwrap_or_default(),
            role.name()
        ),
    };
    // Lazily, so that a config claiming 2^40 layers fails at the first missing tensor, not in an allocation.
    let layers =
        (0..cfg.n_layer).flat_map(|n| LayerTensor::ALL.into_iter().map(move |t| Role::Layer(n, t)));
    let output = (!cfg.tied_embeddings).then_some(Role::Output);
    let roles = std::iter::once(Role::TokenEmbd)
        .chain(layers)
        .chain([Role::OutputNorm])
        .chain(output);
    let mut out = Vec::with_capacity(found.len());
    for role in roles {
        let why = if role == Role::Output {
            "; config.json has tie_word_embeddings false"
        } else {
            ""
        };
        let &i = found.get(&role).ok_or_else(|| missing(role, why))?;
        let t = &st.tensors[i];
        out.push(HfTensor {
            desc: TensorDesc::new(role.name(), t.ty, t.shape_ggml()),
            st_index: i,
            qk: names::qk_kind(role),
            role,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
