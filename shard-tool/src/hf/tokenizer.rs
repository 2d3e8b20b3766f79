//! The tokenizer and chat-template files that travel with a Hugging Face checkpoint.
//!
//! Tessera does not interpret them here; it locates them so that `shard-tool` can carry them into the shard
//! manifest. The chat template is resolved as transformers does
//! (<https://huggingface.co/docs/transformers/chat_templating>): a standalone `chat_template.jinja` takes
//! priority over `tokenizer_config.json`'s `chat_template`, which is either a string or a list of
//! `{"name", "template"}` of which the one named "default" is used.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::safetensors::read_small_file;

/// Largest tokenizer_config.json / chat_template.jinja we read.
const MAX_TEXT_LEN: u64 = 64 << 20;

/// Paths of the tokenizer files present next to a checkpoint, and its chat template.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HfTokenizerFiles {
    pub tokenizer_json: Option<PathBuf>,
    pub tokenizer_config_json: Option<PathBuf>,
    pub generation_config_json: Option<PathBuf>,
    /// The Jinja chat template, when the model has one.
    pub chat_template: Option<String>,
}

impl HfTokenizerFiles {
    /// Finds the files in `dir`. Absent files are `None`; a present but malformed `tokenizer_config.json`
    /// is an error naming it.
    pub fn find(dir: &Path) -> Result<Self> {
        let present = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        let tokenizer_config_json = present("tokenizer_config.json");
        let jinja = present("chat_template.jinja");
        let chat_template = match (&jinja, &tokenizer_config_json) {
            (Some(j), _) => Some(read_text(j)?),
            (None, Some(tc)) => {
                template_from_tokenizer_config(tc, &read_small_file(tc, MAX_TEXT_LEN)?)?
            }
            (None, None) => None,
        };
        Ok(HfTokenizerFiles {
            tokenizer_json: present("tokenizer.json"),
            tokenizer_config_json,
            generation_config_json: present("generation_config.json"),
            chat_template,
        })
    }
}

fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_small_file(path, MAX_TEXT_LEN)?)
        .map_err(|e| Error::malformed(path, format!("not UTF-8: {e}")))
}

/// `chat_template` of a tokenizer_config.json: a string, or a list of `{name, template}` → "default".
pub fn template_from_tokenizer_config(path: &Path, bytes: &[u8]) -> Result<Option<String>> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::malformed(path, format!("not valid JSON: {e}")))?;
    let bad = |msg: &str| Error::malformed(path, format!("`chat_template` {msg}"));
    match v.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let mut names = Vec::new();
            for item in list {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                let (Some(name), Some(template)) = (name, template) else {
                    return Err(bad(
                        "list entries must be {\"name\": string, \"template\": string}",
                    ));
                };
                if name == "default" {
                    return Ok(Some(template.to_owned()));
                }
                names.push(name);
            }
            tracing::warn!(path = %path.display(), ?names, "chat_template list has no \"default\" entry: none used");
            Ok(None)
        }
        Some(_) => Err(bad("must be a string or a list of {name, template}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_files_and_template() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(
            HfTokenizerFiles::find(d).unwrap(),
            HfTokenizerFiles::default()
        );
        std::fs::write(d.join("tokenizer.json"), "{}").unwrap();
        std::fs::write(
            d.join("tokenizer_config.json"),
            r#"{"chat_template": "{{ messages }}"}"#,
        )
        .unwrap();
        let f = HfTokenizerFiles::find(d).unwrap();
        assert_eq!(f.tokenizer_json, Some(d.join("tokenizer.json")));
        assert_eq!(f.generation_config_json, None);
        assert_eq!(f.chat_template.as_deref(), Some("{{ messages }}"));
        std::fs::write(
            d.join("chat_template.jinja"),
            "{% for m in messages %}{% endfor %}",
        )
        .unwrap();
        std::fs::write(d.join("generation_config.json"), "{}").unwrap();
        let f = HfTokenizerFiles::find(d).unwrap();
        assert_eq!(
            f.chat_template.as_deref(),
            Some("{% for m in messages %}{% endfor %}")
        );
        assert!(f.generation_config_json.is_some());
    }

    #[test]
    fn template_list_and_errors() {
        let p = Path::new("tokenizer_config.json");
        let list = br#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#;
        assert_eq!(
            template_from_tokenizer_config(p, list).unwrap().as_deref(),
            Some("D")
        );
        let no_default = br#"{"chat_template": [{"name": "rag", "template": "R"}]}"#;
        assert_eq!(template_from_tokenizer_config(p, no_default).unwrap(), None);
        assert_eq!(template_from_tokenizer_config(p, b"{}").unwrap(), None);
        let e = template_from_tokenizer_config(p, br#"{"chat_template": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tokenizer_config.json") && e.contains("`chat_template`"),
            "{e}"
        );
        let e =
            template_from_tokenizer_config(p, br#"{"chat_template": [{"name": 1}]}"#).unwrap_err();
        assert!(e.to_string().contains("list entries"), "{e}");
    }
}
