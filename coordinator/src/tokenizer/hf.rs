//! Tokenizers from Hugging Face files: `tokenizer.json` (the `tokenizers` library's own format),
//! `tokenizer_config.json` (`bos_token`, `eos_token`, `add_bos_token`, `add_eos_token`) and
//! `generation_config.json` (`eos_token_id`: one id or a list, e.g. Llama 3.1's `[128001, 128008, 128009]`).

use std::path::Path;

use serde_json::Value as Json;

use super::{Parts, PieceStyle, Result, TokenKind, TokenizerError, parse_byte_token};

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|e| TokenizerError::File {
        path: path.into(),
        msg: format!("invalid JSON: {e}"),
    })
}

/// `"<s>"` or `{"content": "<s>", ...}` (both forms occur in tokenizer_config.json).
fn token_name(v: Option<&Json>) -> Option<&str> {
    match v? {
        Json::String(s) => Some(s),
        Json::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

/// Whether any node of the decoder tree (a decoder or a `Sequence` of them) has type `ty`.
fn decoder_has(decoder: &Json, ty: &str) -> Option<Json> {
    if decoder.get("type").and_then(Json::as_str) == Some(ty) {
        return Some(decoder.clone());
    }
    decoder
        .get("decoders")?
        .as_array()?
        .iter()
        .find_map(|d| decoder_has(d, ty))
}

pub(super) fn parts(
    json_path: &Path,
    config: Option<&Path>,
    generation_config: Option<&Path>,
) -> Result<Parts> {
    let bytes = std::fs::read(json_path).map_err(|source| TokenizerError::Io {
        path: json_path.into(),
        source,
    })?;
    let mut inner =
        tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::File {
            path: json_path.into(),
            msg: format!("not a tokenizer.json: {e}"),
        })?;
    let json: Json = serde_json::from_slice(&bytes).map_err(|e| TokenizerError::File {
        path: json_path.into(),
        msg: format!("invalid JSON: {e}"),
    })?;
    // Special tokens are split out by `Tokenizer::encode` so that parsing them is a per-call choice.
    inner.set_encode_special_tokens(true);

    let vocab = inner.get_vocab(true);
    let n = vocab.values().max().map_or(0, |&m| m as usize + 1);
    if n == 0 {
        return Err(TokenizerError::File {
            path: json_path.into(),
            msg: "empty vocabulary".into(),
        });
    }
    let mut tokens = vec![String::new(); n];
    for (text, &id) in &vocab {
        tokens[id as usize] = text.clone();
    }

    let model = json.get("model").unwrap_or(&Json::Null);
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    let unk = model.get("unk_token").and_then(Json::as_str);
    let mut kinds: Vec<TokenKind> = tokens
        .iter()
        .map(|t| {
            if t.is_empty() {
                TokenKind::Unused
            } else if byte_fallback && parse_byte_token(t).is_some() {
                TokenKind::Byte
            } else if Some(t.as_str()) == unk {
                TokenKind::Unknown
            } else {
                TokenKind::Normal
            }
        })
        .collect();
    for (id, added) in inner.get_added_tokens_decoder() {
        if let Some(k) = kinds.get_mut(id as usize) {
            *k = if added.special {
                TokenKind::Control
            } else {
                TokenKind::UserDefined
            };
        }
    }

    let decoder = json.get("decoder").unwrap_or(&Json::Null);
    let (style, strip_leading_space) = if decoder_has(decoder, "ByteLevel").is_some() {
        (PieceStyle::ByteLevel, false)
    } else if let Some(meta) = decoder_has(decoder, "Metaspace") {
        let prepends = meta
            .get("prepend_scheme")
            .and_then(Json::as_str)
            .is_none_or(|s| s != "never")
            && meta
                .get("add_prefix_space")
                .and_then(Json::as_bool)
                .unwrap_or(true);
        (PieceStyle::Spm, prepends)
    } else if decoder_has(decoder, "ByteFallback").is_some() {
        let strips = decoder_has(decoder, "Strip").is_some_and(|s| {
            s.get("content").and_then(Json::as_str) == Some(" ")
                && s.get("start").and_then(Json::as_u64).unwrap_or(0) >= 1
        });
        (PieceStyle::Spm, strips)
    } else {
        (PieceStyle::Decoder, false)
    };

    // What the post-processor adds around a sequence: compare "a" with and without special tokens.
    let encode = |add: bool| -> Result<Vec<u32>> {
        Ok(inner
            .encode_fast("a", add)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?
            .get_ids()
            .to_vec())
    };
    let (plain, with_special) = (encode(false)?, encode(true)?);
    let (mut prefix, mut suffix) = match with_special
        .windows(plain.len().max(1))
        .position(|w| w == plain)
    {
        Some(k) if !plain.is_empty() => (
            with_special[..k].to_vec(),
            with_special[k + plain.len()..].to_vec(),
        ),
        _ => (vec![], vec![]),
    };

    let cfg = config.map(read_json).transpose()?.unwrap_or(Json::Null);
    let lookup = |field: &str| -> Result<Option<u32>> {
        match token_name(cfg.get(field)) {
            None => Ok(None),
            Some(name) => inner
                .token_to_id(name)
                .map(Some)
                .ok_or_else(|| TokenizerError::File {
                    path: config.unwrap_or(json_path).into(),
                    msg: format!("`{field}` {name:?} is not in the vocabulary"),
                }),
        }
    };
    let bos = lookup("bos_token")?;
    let eos = lookup("eos_token")?;
    // LlamaTokenizerFast honours these flags over the post-processor; apply them the same way.
    if let (Some(flag), Some(b)) = (cfg.get("add_bos_token").and_then(Json::as_bool), bos) {
        prefix.retain(|&t| t != b);
        if flag {
            prefix.insert(0, b);
        }
    }
    if let (Some(flag), Some(e)) = (cfg.get("add_eos_token").and_then(Json::as_bool), eos) {
        suffix.retain(|&t| t != e);
        if flag {
            suffix.push(e);
        }
    }

    let mut eog = Vec::new();
    if let Some(path) = generation_config {
        let gen_cfg = read_json(path)?;
        match gen_cfg.get("eos_token_id") {
            None | Some(Json::Null) => {}
            Some(Json::Number(x)) => eog.extend(x.as_u64().map(|v| v as u32)),
            Some(Json::Array(a)) => eog.extend(a.iter().filter_map(Json::as_u64).map(|v| v as u32)),
            Some(_) => {
                return Err(TokenizerError::File {
                    path: path.into(),
                    msg: "`eos_token_id` must be an integer or a list of integers".into(),
                });
            }
        }
    }
    for &id in &eog {
        if id as usize >= n {
            return Err(TokenizerError::File {
                path: generation_config.unwrap_or(json_path).into(),
                msg: format!("`eos_token_id` {id} is outside the vocabulary of {n} tokens"),
            });
        }
        // An end-of-generation id must never be shown as text.
        if kinds[id as usize] == TokenKind::Normal {
            kinds[id as usize] = TokenKind::Control;
        }
    }

    let model_type = model
        .get("type")
        .and_then(Json::as_str)
        .unwrap_or("unknown model");
    Ok(Parts {
        inner,
        description: format!("tokenizer.json ({model_type})"),
        tokens,
        kinds,
        style,
        space_prefix: false,
        strip_leading_space,
        prefix,
        suffix,
        bos,
        eos,
        eog,
    })
}
