//! Hugging Face `config.json` of a Llama model → [`ModelConfig`].
//!
//! Fields follow transformers' `LlamaConfig`
//! (<https://huggingface.co/docs/transformers/model_doc/llama#transformers.LlamaConfig>). RoPE comes in three
//! spellings, all read here:
//! - top-level `rope_theta` plus `rope_scaling: null` (Llama 2/3, SmolLM2);
//! - Llama 3.1's `rope_scaling: {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
//!   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}` (older files say `"type"`);
//! - transformers v5's `rope_parameters: {"rope_theta": ..., "rope_type": "default" | "llama3", ...}`, which
//!   replaces both (it wins when present).
//!
//! Other RoPE variants (linear, dynamic, yarn, longrope) are refused for now. A missing `rope_theta` takes
//! transformers' `LlamaConfig` default of 10000 (old Llama 1/2-era exports omit it), with a warning; every
//! other dimension is required and a missing one is an `Error::Missing` naming it.

use std::path::Path;

use serde_json::{Map, Value};

use crate::config::{Llama3RopeScaling, ModelConfig};
use crate::error::{Error, Result};

/// Largest config.json we read.
const MAX_CONFIG_LEN: u64 = 16 << 20;
/// transformers' `LlamaConfig.rope_theta` default.
const DEFAULT_ROPE_THETA: f32 = 10_000.0;

/// Reads `config.json` at `path`.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    if !path.is_file() {
        let dir = path.parent().unwrap_or(Path::new("."));
        return Err(Error::Missing {
            path: dir.to_path_buf(),
            key: "config.json (the model's hyperparameters)".into(),
        });
    }
    let bytes = crate::safetensors::read_small_file(path, MAX_CONFIG_LEN)?;
    parse_config(path, &bytes)
}

/// Parses config.json bytes; `path` is for messages.
pub fn parse_config(path: &Path, bytes: &[u8]) -> Result<ModelConfig> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::malformed(path, format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(Error::malformed(path, "config.json must be a JSON object"));
    };
    let f = Fields {
        path,
        obj: &obj,
        prefix: "",
    };
    check_architecture(&f)?;
    if let Some(act) = f.opt_str("hidden_act")?
        && act != "silu"
    {
        return Err(f.unsupported(format!("hidden_act `{act}` (Llama uses silu)")));
    }
    for key in ["attention_bias", "mlp_bias"] {
        if f.opt_bool(key)? == Some(true) {
            return Err(f.unsupported(format!(
                "{key} = true (biased projections are not implemented)"
            )));
        }
    }
    let n_embd = f.req_usize("hidden_size")?;
    let n_head = f.req_usize("num_attention_heads")?;
    let n_head_kv = f.opt_usize("num_key_value_heads")?.unwrap_or(n_head);
    let head_dim = match f.opt_usize("head_dim")? {
        Some(d) => d,
        None if n_head > 0 => n_embd / n_head,
        None => 0, // validate() reports the zero head count
    };
    let (rope_theta, rope_scaling) = read_rope(&f)?;
    let cfg = ModelConfig {
        arch: "llama".into(),
        name: f
            .opt_str("_name_or_path")?
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        n_vocab: f.req_usize("vocab_size")?,
        n_embd,
        n_layer: f.req_usize("num_hidden_layers")?,
        n_head,
        n_head_kv,
        head_dim,
        n_ff: f.req_usize("intermediate_size")?,
        n_ctx_train: f.req_usize("max_position_embeddings")?,
        rope_theta,
        rope_dim: head_dim,
        rope_scaling,
        rms_eps: f.req_f32("rms_norm_eps")?,
        tied_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
    };
    cfg.validate().map_err(|msg| Error::malformed(path, msg))?;
    Ok(cfg)
}

fn check_architecture(f: &Fields<'_>) -> Result<()> {
    let archs: Vec<&str> = match f.obj.get("architectures") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        Some(other) => {
            return Err(f.bad(
                "architectures",
                format!("must be a list of strings, got {other}"),
            ));
        }
    };
    let model_type = f.opt_str("model_type")?;
    if archs.contains(&"LlamaForCausalLM") || (archs.is_empty() && model_type == Some("llama")) {
        return Ok(());
    }
    if archs.is_empty() && model_type.is_none() {
        return Err(Error::Missing {
            path: f.path.to_path_buf(),
            key: "architectures (or model_type)".into(),
        });
    }
    Err(f.unsupported(format!(
        "architectures {archs:?}, model_type {}: Tessera serves LlamaForCausalLM models",
        model_type.map_or("(none)".to_owned(), |m| format!("`{m}`"))
    )))
}

/// (rope_theta, llama3 scaling) from whichever spelling the file uses.
fn read_rope(f: &Fields<'_>) -> Result<(f32, Option<Llama3RopeScaling>)> {
    let top_theta = f.opt_f32("rope_theta")?;
    if let Some(params) = f.opt_object("rope_parameters")? {
        let p = Fields {
            path: f.path,
            obj: params,
            prefix: "rope_parameters.",
        };
        let theta = match (p.opt_f32("rope_theta")?, top_theta) {
            (Some(a), Some(b)) if a != b => {
                return Err(p.bad(
                    "rope_theta",
                    format!("is {a} but top-level rope_theta is {b}"),
                ));
            }
            (Some(t), _) | (None, Some(t)) => t,
            (None, None) => {
                return Err(Error::Missing {
                    path: f.path.to_path_buf(),
                    key: "rope_parameters.rope_theta".into(),
                });
            }
        };
        return Ok((theta, read_scaling(&p)?));
    }
    let theta = top_theta.unwrap_or_else(|| {
        tracing::warn!(path = %f.path.display(), "no rope_theta: using transformers' LlamaConfig default 10000");
        DEFAULT_ROPE_THETA
    });
    let scaling = match f.opt_object("rope_scaling")? {
        Some(s) => read_scaling(&Fields {
            path: f.path,
            obj: s,
            prefix: "rope_scaling.",
        })?,
        None => None,
    };
    Ok((theta, scaling))
}

/// Reads the rope type (`rope_type`, or the older `type`) and, for llama3, its parameters.
fn read_scaling(s: &Fields<'_>) -> Result<Option<Llama3RopeScaling>> {
    let ty = match s.opt_str("rope_type")? {
        Some(t) => Some(t),
        None => s.opt_str("type")?,
    };
    match ty {
        None | Some("default") => Ok(None),
        Some("llama3") => {
            let sc = Llama3RopeScaling {
                factor: s.req_f32("factor")?,
                low_freq_factor: s.req_f32("low_freq_factor")?,
                high_freq_factor: s.req_f32("high_freq_factor")?,
                original_max_position_embeddings: s.req_usize("original_max_position_embeddings")?,
            };
            let ok = sc.factor.is_finite()
                && sc.factor > 0.0
                && sc.low_freq_factor > 0.0
                && sc.high_freq_factor.is_finite()
                && sc.high_freq_factor > sc.low_freq_factor
                && sc.original_max_position_embeddings > 0;
            if !ok {
                return Err(s.bad(
                    "factor",
                    format!(
                        "llama3 scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and \
                         original_max_position_embeddings > 0; got {sc:?}"
                    ),
                ));
            }
            Ok(Some(sc))
        }
        Some(other) => Err(s.unsupported(format!(
            "{}rope_type `{other}` is not supported yet (Tessera implements default and llama3 RoPE)",
            s.prefix
        ))),
    }
}

/// Typed access to one JSON object's fields with errors naming `prefix` + key and the file.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
    prefix: &'static str,
}

impl<'a> Fields<'a> {
    /// The field's value; JSON `null` counts as absent (transformers writes `"head_dim": null` at times).
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, msg: String) -> Error {
        Error::malformed(self.path, format!("`{}{key}` {msg}", self.prefix))
    }

    fn unsupported(&self, msg: String) -> Error {
        Error::Unsupported {
            path: self.path.to_path_buf(),
            msg,
        }
    }

    fn missing(&self, key: &str) -> Error {
        Error::Missing {
            path: self.path.to_path_buf(),
            key: format!("{}{key}", self.prefix),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        // Accept 4096 and 4096.0 (some exporters write integral floats), nothing else.
        let n = v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|x| x.fract() == 0.0 && *x >= 0.0 && *x < 2e18)
                .map(|x| x as u64)
        });
        let n =
            n.ok_or_else(|| self.bad(key, format!("must be a non-negative integer, got {v}")))?;
        usize::try_from(n)
            .map(Some)
            .map_err(|_| self.bad(key, format!("{n} is too large")))
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let x = v
            .as_f64()
            .ok_or_else(|| self.bad(key, format!("must be a number, got {v}")))?;
        Ok(Some(x as f32))
    }

    fn req_f32(&self, key: &str) -> Result<f32> {
        self.opt_f32(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_bool()
            .map(Some)
            .ok_or_else(|| self.bad(key, format!("must be true or false, got {v}")))
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_str()
            .map(Some)
            .ok_or_else(|| self.bad(key, format!("must be a string, got {v}")))
    }

    fn opt_object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_object()
            .map(Some)
            .ok_or_else(|| self.bad(key, format!("must be an object, got {v}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1 8B's config.json as published (trimmed of keys we ignore).
    const LLAMA31_8B: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 128000,
      "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
      "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
      "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
      "rms_norm_eps": 1e-05,
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256}"#;

    fn parse(s: &str) -> Result<ModelConfig> {
        parse_config(Path::new("/m/config.json"), s.as_bytes())
    }

    /// `LLAMA31_8B` with `edit` applied to its object.
    fn edited(edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut v: Value = serde_json::from_str(LLAMA31_8B).unwrap();
        edit(v.as_object_mut().unwrap());
        v.to_string()
    }

    fn llama3_scaling() -> Llama3RopeScaling {
        Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }
    }

    #[test]
    fn reads_llama31() {
        let c = parse(LLAMA31_8B).unwrap();
        assert_eq!(
            (
                c.n_vocab,
                c.n_embd,
                c.n_layer,
                c.n_head,
                c.n_head_kv,
                c.head_dim,
                c.n_ff,
                c.n_ctx_train
            ),
            (128256, 4096, 32, 32, 8, 128, 14336, 131072)
        );
        assert_eq!(
            (c.rope_theta, c.rope_dim, c.rms_eps, c.tied_embeddings),
            (500000.0, 128, 1e-5, false)
        );
        assert_eq!(c.rope_scaling, Some(llama3_scaling()));
    }

    #[test]
    fn reads_transformers_v5_rope_parameters() {
        let s = edited(|o| {
            o.remove("rope_theta");
            o.remove("rope_scaling");
            o.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
            );
        });
        let c = parse(&s).unwrap();
        assert_eq!(
            (c.rope_theta, c.rope_scaling),
            (500000.0, Some(llama3_scaling()))
        );
        let s = edited(|o| {
            o.remove("rope_scaling");
            o.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_theta": 1e5, "rope_type": "default"}),
            );
            o.insert("rope_theta".into(), serde_json::json!(100000));
        });
        assert_eq!(parse(&s).unwrap().rope_scaling, None);
        let s = edited(|o| {
            o.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_theta": 2e6, "rope_type": "default"}),
            );
        });
        assert!(
            parse(&s)
                .unwrap_err()
                .to_string()
                .contains("`rope_parameters.rope_theta` is 2000000")
        );
    }

    #[test]
    fn defaults_smollm2_style() {
        // No num_key_value_heads / head_dim / tie flag / architectures: defaults as transformers applies them.
        let s = r#"{"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
            "num_attention_heads": 9, "intermediate_size": 1536, "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5, "vocab_size": 49152, "rope_theta": 100000, "rope_scaling": null,
            "head_dim": null}"#;
        let c = parse(s).unwrap();
        assert_eq!(
            (c.n_head_kv, c.head_dim, c.tied_embeddings, c.rope_scaling),
            (9, 64, false, None)
        );
        let c = parse(&s.replace("\"rope_theta\": 100000,", "")).unwrap();
        assert_eq!(c.rope_theta, 10000.0);
    }

    #[test]
    fn missing_fields_are_named() {
        for key in [
            "hidden_size",
            "num_hidden_layers",
            "vocab_size",
            "rms_norm_eps",
            "intermediate_size",
        ] {
            let e = parse(&edited(|o| drop(o.remove(key)))).unwrap_err();
            assert!(
                matches!(&e, Error::Missing { key: k, .. } if k == key),
                "{e}"
            );
            assert!(e.to_string().contains("/m/config.json"), "{e}");
        }
        let e = parse(&edited(|o| {
            o.get_mut("rope_scaling")
                .unwrap()
                .as_object_mut()
                .unwrap()
                .remove("low_freq_factor");
        }))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("missing rope_scaling.low_freq_factor"),
            "{e}"
        );
        let e = parse(&edited(|o| {
            o.remove("architectures");
            o.remove("model_type");
        }))
        .unwrap_err();
        assert!(e.to_string().contains("missing architectures"), "{e}");
    }

    #[test]
    fn refuses_other_rope_types_and_architectures() {
        for (ty, key) in [
            ("linear", "type"),
            ("dynamic", "type"),
            ("yarn", "rope_type"),
        ] {
            let e = parse(&edited(|o| {
                o.insert(
                    "rope_scaling".into(),
                    serde_json::json!({key: ty, "factor": 2.0}),
                );
            }))
            .unwrap_err();
            assert!(matches!(e, Error::Unsupported { .. }), "{e}");
            assert!(
                e.to_string()
                    .contains(&format!("rope_scaling.rope_type `{ty}` is not supported")),
                "{e}"
            );
        }
        let e = parse(&edited(|o| {
            o.insert(
                "architectures".into(),
                serde_json::json!(["MistralForCausalLM"]),
            );
            o.insert("model_type".into(), serde_json::json!("mistral"));
        }))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("MistralForCausalLM")
                && e.contains("`mistral`")
                && e.contains("LlamaForCausalLM"),
            "{e}"
        );
        let e = parse(&edited(|o| {
            drop(o.insert("attention_bias".into(), Value::Bool(true)))
        }))
        .unwrap_err();
        assert!(e.to_string().contains("attention_bias"), "{e}");
    }

    #[test]
    fn refuses_bad_values() {
        let e = parse(&edited(|o| {
            drop(o.insert("hidden_size".into(), serde_json::json!("4096")))
        }))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("`hidden_size` must be a non-negative integer"),
            "{e}"
        );
        let e = parse(&edited(|o| {
            drop(o.insert("num_key_value_heads".into(), serde_json::json!(5)))
        }))
        .unwrap_err();
        assert!(e.to_string().contains("not a multiple of"), "{e}");
        let e = parse(&edited(|o| {
            o.get_mut("rope_scaling").unwrap()["high_freq_factor"] = serde_json::json!(1.0);
        }))
        .unwrap_err();
        assert!(
            e.to_string().contains("low_freq_factor < high_freq_factor"),
            "{e}"
        );
        assert!(
            parse("[1]")
                .unwrap_err()
                .to_string()
                .contains("must be a JSON object")
        );
        assert!(
            parse("{")
                .unwrap_err()
                .to_string()
                .contains("not valid JSON")
        );
    }
}
