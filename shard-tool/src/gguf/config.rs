//! [`ModelConfig`] from GGUF metadata: the `{arch}.*` hyperparameter keys llama.cpp's `llama-model.cpp` reads
//! for the llama architecture, with the same defaults (KV heads = heads, head dimension = embedding / heads,
//! rope dimension = head dimension, rope base 10000).

use std::path::Path;

use super::GgufFile;
use super::value::Value;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::tensor::TensorDesc;

/// The model described by one GGUF file (for a gguf-split set use [`GgufSet::model_config`](super::GgufSet),
/// whose tensors span all pieces). `path` names the file in errors.
pub fn model_config(file: &GgufFile, path: &Path) -> Result<ModelConfig> {
    model_config_from(&file.metadata, file.tensors.iter().map(|t| &t.desc), path)
}

/// The model described by `metadata` and the full tensor list.
pub fn model_config_from<'a>(
    metadata: &[(String, Value)],
    tensors: impl IntoIterator<Item = &'a TensorDesc>,
    path: &Path,
) -> Result<ModelConfig> {
    let md = Meta { metadata, path };
    let arch = md.require("general.architecture", Value::as_str, "a string")?;
    if arch != "llama" {
        return Err(Error::Unsupported {
            path: path.to_owned(),
            msg: format!(
                "`general.architecture` is \"{arch}\"; Tessera runs the \"llama\" architecture only"
            ),
        });
    }
    let key = |k: &str| format!("{arch}.{k}");

    if let Some(v) = md.get(&key("rope.scaling.type")) {
        let factor = md
            .get(&key("rope.scaling.factor"))
            .and_then(Value::as_f32)
            .unwrap_or(1.0);
        let kind = v.as_str().unwrap_or("?");
        if !(kind == "none" || (kind == "linear" && factor == 1.0)) {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                msg: format!(
                    "`{}` is {v} (factor {factor}): only unscaled RoPE and Llama 3.1 rope_freqs are supported",
                    key("rope.scaling.type")
                ),
            });
        }
    }

    let n_embd = md.usize(&key("embedding_length"))?;
    let n_head = md.usize(&key("attention.head_count"))?;
    let n_head_kv = md
        .opt_usize(&key("attention.head_count_kv"))?
        .unwrap_or(n_head);
    let head_dim = md
        .opt_usize(&key("attention.key_length"))?
        .unwrap_or(n_embd.checked_div(n_head).unwrap_or(0));
    if let Some(v_dim) = md.opt_usize(&key("attention.value_length"))?
        && v_dim != head_dim
    {
        return Err(Error::Unsupported {
            path: path.to_owned(),
            msg: format!(
                "`{}` {v_dim} differs from the key length {head_dim}",
                key("attention.value_length")
            ),
        });
    }

    let mut embd_rows = None;
    let mut has_output = false;
    for t in tensors {
        match t.name.as_str() {
            "token_embd.weight" => embd_rows = t.shape.get(1).copied(),
            "output.weight" => has_output = true,
            _ => {}
        }
    }
    let n_vocab = match md.opt_usize(&key("vocab_size"))? {
        Some(n) => n,
        None => match md.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
            Some(tokens) => tokens.len(),
            None => embd_rows.and_then(|r| usize::try_from(r).ok()).ok_or_else(|| Error::Missing {
                path: path.to_owned(),
                key: format!("vocabulary size (`{}`, `tokenizer.ggml.tokens` or tensor `token_embd.weight`)", key("vocab_size")),
            })?,
        },
    };

    let rope_theta = match md.get(&key("rope.freq_base")) {
        None => 10_000.0,
        Some(_) => md.require(&key("rope.freq_base"), Value::as_f32, "a float")?,
    };
    let config = ModelConfig {
        arch: arch.to_owned(),
        name: md
            .get("general.name")
            .and_then(Value::as_str)
            .map(str::to_owned),
        n_vocab,
        n_embd,
        n_layer: md.usize(&key("block_count"))?,
        n_head,
        n_head_kv,
        head_dim,
        n_ff: md.usize(&key("feed_forward_length"))?,
        n_ctx_train: md.usize(&key("context_length"))?,
        rope_theta,
        rope_dim: md
            .opt_usize(&key("rope.dimension_count"))?
            .unwrap_or(head_dim),
        rope_scaling: None,
        rms_eps: md.require(
            &key("attention.layer_norm_rms_epsilon"),
            Value::as_f32,
            "a float",
        )?,
        tied_embeddings: !has_output,
    };
    config
        .validate()
        .map_err(|msg| Error::malformed(path, format!("model hyperparameters: {msg}")))?;
    Ok(config)
}

struct Meta<'a> {
    metadata: &'a [(String, Value)],
    path: &'a Path,
}

impl<'a> Meta<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn wrong_type(&self, key: &str, v: &Value, expected: &str) -> Error {
        Error::malformed(
            self.path,
            format!(
                "metadata key `{key}` is {v} ({}), expected {expected}",
                v.value_type()
            ),
        )
    }

    /// A present key converted by `conv`; `Error::Missing` when absent, `Malformed` when of another type.
    fn require<T>(
        &self,
        key: &str,
        conv: impl Fn(&'a Value) -> Option<T>,
        expected: &str,
    ) -> Result<T> {
        let v = self.get(key).ok_or_else(|| Error::Missing {
            path: self.path.to_owned(),
            key: format!("metadata key `{key}`"),
        })?;
        conv(v).ok_or_else(|| self.wrong_type(key, v, expected))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| Error::Missing {
            path: self.path.to_owned(),
            key: format!("metadata key `{key}`"),
        })
    }

    /// An unsigned integer key. llama.cpp also accepts a per-layer array for head counts and FFN sizes; one
    /// whose values are all equal is that value, differing values are refused (no Llama model has them).
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::Array(a) => {
                let values = a
                    .to_u64s()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| self.wrong_type(key, v, "unsigned integers"))?;
                if values.iter().any(|&x| x != values[0]) {
                    return Err(Error::Unsupported {
                        path: self.path.to_owned(),
                        msg: format!(
                            "metadata key `{key}` differs between layers; Tessera needs uniform layers"
                        ),
                    });
                }
                values[0]
            }
            _ => v
                .as_u64()
                .ok_or_else(|| self.wrong_type(key, v, "an unsigned integer"))?,
        };
        usize::try_from(n)
            .map(Some)
            .map_err(|_| self.wrong_type(key, v, "a smaller integer"))
    }
}
