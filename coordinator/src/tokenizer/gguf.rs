//! Tokenizers from GGUF metadata, as llama.cpp's `llama_vocab::impl::load` reads it.
//!
//! Keys: `tokenizer.ggml.model` (`"gpt2"`: byte-level BPE; `"llama"`: SentencePiece), `.pre` (which
//! pre-tokenizer regexes), `.tokens`, `.token_type`, `.scores` (SentencePiece merge priority), `.merges`
//! (BPE, `"left right"`), `.bos_token_id`, `.eos_token_id`, `.eot_token_id`, `.eom_token_id`,
//! `.unknown_token_id`, `.add_bos_token`, `.add_eos_token`, `.add_space_prefix`.

use std::collections::HashMap;

use shard_tool::gguf::{Array, Value};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};

use super::{Parts, PieceStyle, Result, TokenKind, TokenizerError};

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3` (its adaptation of the tokenizer.json regex: the `(?i:...)`
/// contractions spelled out case by case).
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-2's regex as llama.cpp writes it (`LLAMA_VOCAB_PRE_TYPE_GPT2`).
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Pre-tokenizer regexes by `tokenizer.ggml.pre`, applied in order (each splits the pieces of the previous),
/// copied from `llm_tokenizer_bpe::llm_tokenizer_bpe` in llama.cpp's `llama-vocab.cpp`. The second value says
/// whether llama.cpp sets `ignore_merges` (a pre-token that is itself in the vocabulary is emitted whole).
fn pre_tokenizer(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" => (vec![RE_LLAMA3], true),
        // LLAMA_VOCAB_PRE_TYPE_SMOLLM and the types sharing its regexes: digits split one by one, then GPT-2.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" => {
            (vec![r"\p{N}", RE_GPT2], false)
        }
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" => (vec![RE_GPT2], false),
        // LLAMA_VOCAB_PRE_TYPE_DEFAULT (also used when the key is missing).
        "default" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                RE_GPT2,
                r"\p{N}+",
                "[0-9][0-9][0-9]",
            ],
            false,
        ),
        _ => return None,
    })
}

const SUPPORTED_PRE: &str = "llama3, llama-v3, llama-bpe, smollm, starcoder, refact, command-r, codeshell, exaone, \
                             gpt-2, phi-2, mpt, olmo, default";

struct Md<'a>(HashMap<&'a str, &'a Value>);

impl<'a> Md<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).copied()
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| wrong_type(key, "a string")))
            .transpose()
    }

    fn array(&self, key: &str) -> Result<Option<&'a Array>> {
        self.get(key)
            .map(|v| v.as_array().ok_or_else(|| wrong_type(key, "an array")))
            .transpose()
    }

    fn strings(&self, key: &str) -> Result<Option<&'a [String]>> {
        self.array(key)?
            .map(|a| {
                a.as_strings()
                    .ok_or_else(|| wrong_type(key, "an array of strings"))
            })
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| wrong_type(key, "a bool")))
            .transpose()
    }

    /// A token id that must lie inside the vocabulary.
    fn id(&self, key: &str, n_tokens: usize) -> Result<Option<u32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let id = v
            .as_u64()
            .ok_or_else(|| wrong_type(key, "a non-negative integer"))?;
        if id >= n_tokens as u64 {
            return Err(TokenizerError::Invalid {
                key: key.into(),
                msg: format!("token id {id} is outside the vocabulary of {n_tokens} tokens"),
            });
        }
        Ok(Some(id as u32))
    }
}

fn wrong_type(key: &str, expected: &'static str) -> TokenizerError {
    TokenizerError::WrongType {
        key: key.into(),
        expected,
    }
}

fn invalid(key: &str, msg: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid {
        key: key.into(),
        msg: msg.into(),
    }
}

pub(super) fn parts(metadata: &[(String, Value)]) -> Result<Parts> {
    let md = Md(metadata.iter().map(|(k, v)| (k.as_str(), v)).collect());
    let model = md
        .str(KEY_MODEL)?
        .ok_or_else(|| TokenizerError::MissingKey {
            key: KEY_MODEL.into(),
        })?;
    let mut tokens: Vec<String> = md
        .strings(KEY_TOKENS)?
        .ok_or_else(|| TokenizerError::MissingKey {
            key: KEY_TOKENS.into(),
        })?
        .to_vec();
    let n = tokens.len();
    if n == 0 || n > u32::MAX as usize {
        return Err(invalid(KEY_TOKENS, format!("{n} tokens")));
    }
    // llama.cpp renames empty tokens so that every text maps to one id.
    for (i, t) in tokens.iter_mut().enumerate() {
        if t.is_empty() {
            *t = format!("[EMPTY_{i}]");
        }
    }
    let kinds: Vec<TokenKind> = match md.array(KEY_TYPES)? {
        None => vec![TokenKind::Normal; n],
        Some(a) => {
            let types = a
                .as_i32s()
                .ok_or_else(|| wrong_type(KEY_TYPES, "an array of int32"))?;
            if types.len() < n {
                return Err(invalid(
                    KEY_TYPES,
                    format!("{} entries for {n} tokens", types.len()),
                ));
            }
            types[..n]
                .iter()
                .map(|&t| TokenKind::from_gguf(t))
                .collect()
        }
    };

    let bos = md.id("tokenizer.ggml.bos_token_id", n)?;
    let eos = md.id("tokenizer.ggml.eos_token_id", n)?;
    let eot = md.id("tokenizer.ggml.eot_token_id", n)?;
    let eom = md.id("tokenizer.ggml.eom_token_id", n)?;
    // Optional ids that llama.cpp ignores when out of range.
    let unk = md.id("tokenizer.ggml.unknown_token_id", n).ok().flatten();

    let (inner, style, space_prefix, default_add_bos, description) = match model {
        "gpt2" => {
            let pre = md.str(KEY_PRE)?.unwrap_or("default");
            let (regexes, ignore_merges) =
                pre_tokenizer(pre).ok_or_else(|| TokenizerError::Unsupported {
                    key: KEY_PRE.into(),
                    value: pre.into(),
                    supported: SUPPORTED_PRE.into(),
                })?;
            let merges = md
                .strings(KEY_MERGES)?
                .ok_or_else(|| TokenizerError::MissingKey {
                    key: KEY_MERGES.into(),
                })?;
            let inner = byte_level_bpe(&tokens, merges, &regexes, ignore_merges)?;
            // llama.cpp: llama3-style pre-tokenizers add BOS by default, other BPE vocabularies do not.
            let add_bos = ignore_merges;
            (
                inner,
                PieceStyle::ByteLevel,
                false,
                add_bos,
                format!("GGUF gpt2 (pre {pre})"),
            )
        }
        "llama" => {
            let scores = scores(&md, n)?;
            let inner = sentencepiece_bpe(&tokens, &kinds, &scores, unk)?;
            let space_prefix = md.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            (
                inner,
                PieceStyle::Spm,
                space_prefix,
                true,
                "GGUF llama (SentencePiece)".to_string(),
            )
        }
        other => {
            return Err(TokenizerError::Unsupported {
                key: KEY_MODEL.into(),
                value: other.into(),
                supported: "gpt2 (byte-level BPE), llama (SentencePiece)".into(),
            });
        }
    };

    let add_bos = md
        .bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(default_add_bos);
    let add_eos = md.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let prefix = match (add_bos, bos) {
        (true, Some(b)) => vec![b],
        (true, None) => {
            return Err(invalid(
                "tokenizer.ggml.bos_token_id",
                "missing, but add_bos_token is true",
            ));
        }
        (false, _) => vec![],
    };
    let suffix = match (add_eos, eos) {
        (true, Some(e)) => vec![e],
        (true, None) => {
            return Err(invalid(
                "tokenizer.ggml.eos_token_id",
                "missing, but add_eos_token is true",
            ));
        }
        (false, _) => vec![],
    };

    Ok(Parts {
        inner,
        description,
        tokens,
        kinds,
        style,
        space_prefix,
        strip_leading_space: space_prefix,
        prefix,
        suffix,
        bos,
        eos,
        eog: eot.into_iter().chain(eom).collect(),
    })
}

fn scores(md: &Md<'_>, n: usize) -> Result<Vec<f32>> {
    let Some(a) = md.array(KEY_SCORES)? else {
        return Ok(vec![0.0; n]);
    };
    let scores: Vec<f32> = match a {
        Array::F32(v) => v.clone(),
        Array::I32(v) => v.iter().map(|&s| s as f32).collect(),
        _ => return Err(wrong_type(KEY_SCORES, "an array of float32 or int32")),
    };
    if scores.len() < n {
        return Err(invalid(
            KEY_SCORES,
            format!("{} entries for {n} tokens", scores.len()),
        ));
    }
    Ok(scores)
}

/// Token text → id; a repeated text keeps its last id, as llama.cpp's `token_to_id` does.
fn vocab_map(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

fn build_error(e: tokenizers::Error) -> TokenizerError {
    invalid(KEY_TOKENS, format!("cannot build the tokenizer: {e}"))
}

/// Byte-level BPE: regex pre-tokenization on the raw text, bytes mapped to GPT-2's alphabet, ranked merges.
fn byte_level_bpe(
    tokens: &[String],
    merges: &[String],
    regexes: &[&str],
    ignore_merges: bool,
) -> Result<tokenizers::Tokenizer> {
    let vocab = vocab_map(tokens);
    let mut pairs = Vec::with_capacity(merges.len());
    let mut dropped = 0usize;
    for (i, m) in merges.iter().enumerate() {
        // llama.cpp: `word.find(' ', 1)` (a merge's left part may itself start with a space byte).
        let Some(pos) = m
            .as_bytes()
            .iter()
            .skip(1)
            .position(|&b| b == b' ')
            .map(|p| p + 1)
        else {
            return Err(invalid(
                KEY_MERGES,
                format!("entry {i} ({m:?}) is not two tokens separated by a space"),
            ));
        };
        let (left, right) = (&m[..pos], &m[pos + 1..]);
        // A merge whose parts or result are not tokens can never apply usefully; tokenizers refuses them.
        if vocab.contains_key(left)
            && vocab.contains_key(right)
            && vocab.contains_key(&format!("{left}{right}"))
        {
            pairs.push((left.to_owned(), right.to_owned()));
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::warn!(
            "{KEY_MERGES}: ignored {dropped} merges whose parts are not in the vocabulary"
        );
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(build_error)?;
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(regexes.len() + 1);
    for re in regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| invalid(KEY_PRE, format!("regex {re:?}: {e}")))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(Sequence::new(steps)));
    Ok(tok)
}

/// SentencePiece-style BPE as llama.cpp's `llm_tokenizer_spm_session` runs it: start from characters,
/// repeatedly merge the adjacent pair whose concatenation is the highest-scoring token, bytes for characters
/// outside the vocabulary. Expressed for `tokenizers` as BPE merges ranked by the merged token's score
/// (Hugging Face's `SentencePieceExtractor` does the same), with byte fallback; spaces become `▁`.
fn sentencepiece_bpe(
    tokens: &[String],
    kinds: &[TokenKind],
    scores: &[f32],
    unk: Option<u32>,
) -> Result<tokenizers::Tokenizer> {
    let vocab = vocab_map(tokens);
    // (score, merged id, left id, right id, left, right)
    let mut ranked: Vec<(f32, u32, u32, u32, &str, &str)> = Vec::new();
    for (id, text) in tokens.iter().enumerate() {
        if kinds[id] == TokenKind::Byte || vocab.get(text) != Some(&(id as u32)) {
            continue;
        }
        for (pos, _) in text.char_indices().skip(1) {
            let (l, r) = text.split_at(pos);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                ranked.push((scores[id], id as u32, li, ri, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    let merges = ranked
        .into_iter()
        .map(|m| (m.4.to_owned(), m.5.to_owned()))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(tokens[unk as usize].clone());
    }
    let bpe = builder.build().map_err(build_error)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let replace = Replace::new(" ", "▁").map_err(build_error)?;
    tok.with_normalizer(Some(replace)).map_err(build_error)?;
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;

    fn md(entries: Vec<(&str, Value)>) -> Vec<(String, Value)> {
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    fn strings(v: &[&str]) -> Value {
        Value::Array(Array::String(v.iter().map(|s| s.to_string()).collect()))
    }

    /// A toy byte-level vocabulary: the letters of "hello world", merges building "hello" and "Ġworld".
    fn toy_bpe(pre: &str) -> Vec<(String, Value)> {
        let tokens = [
            "<s>", "</s>", "h", "e", "l", "o", "Ġ", "w", "r", "d", "he", "ll", "hell", "hello",
            "Ġw", "Ġwor", "or", "Ġworld", "ld", "1", "2", "3",
        ];
        let merges = [
            "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
        ];
        let mut types = vec![1i32; tokens.len()];
        types[0] = 3;
        types[1] = 3;
        md(vec![
            (KEY_MODEL, Value::from("gpt2")),
            (KEY_PRE, Value::from(pre)),
            (KEY_TOKENS, strings(&tokens)),
            (KEY_MERGES, strings(&merges)),
            (KEY_TYPES, Value::Array(Array::I32(types))),
            ("tokenizer.ggml.bos_token_id", Value::U32(0)),
            ("tokenizer.ggml.eos_token_id", Value::U32(1)),
        ])
    }

    #[test]
    fn toy_byte_level_bpe() {
        let t = Tokenizer::from_gguf_metadata(&toy_bpe("gpt2")).unwrap();
        assert_eq!(t.encode("hello world", false, false).unwrap(), vec![13, 17]);
        // gpt2 pre: no BOS by default; digits stay together under the GPT-2 regex.
        assert_eq!(t.encode("hello</s>", true, true).unwrap(), vec![13, 1]);
        assert_eq!(t.decode(&[13, 17, 1], true), "hello world");
        assert_eq!(t.decode(&[13, 17, 1], false), "hello world</s>");
        assert!(t.is_eog(1));
        assert_eq!(t.eos_ids(), &[1]);
        let smol = Tokenizer::from_gguf_metadata(&toy_bpe("smollm")).unwrap();
        assert_eq!(smol.encode("123", false, false).unwrap(), vec![19, 20, 21]);
        let llama3 = Tokenizer::from_gguf_metadata(&toy_bpe("llama-bpe")).unwrap();
        assert_eq!(
            llama3.encode("hello", true, false).unwrap(),
            vec![0, 13],
            "llama3 pre adds BOS"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let mut bad = toy_bpe("gpt2");
        bad.retain(|(k, _)| k != KEY_TOKENS);
        let e = Tokenizer::from_gguf_metadata(&bad).unwrap_err().to_string();
        assert!(e.contains(KEY_TOKENS), "{e}");

        let e = Tokenizer::from_gguf_metadata(&toy_bpe("klingon"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(KEY_PRE) && e.contains("klingon"), "{e}");

        let mut bad = toy_bpe("gpt2");
        bad.push(("tokenizer.ggml.eot_token_id".into(), Value::U32(999)));
        let e = Tokenizer::from_gguf_metadata(&bad).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.ggml.eot_token_id") && e.contains("999"),
            "{e}"
        );

        let mut bad = toy_bpe("gpt2");
        bad.retain(|(k, _)| k != KEY_MERGES);
        bad.push((KEY_MERGES.into(), strings(&["hello"])));
        let e = Tokenizer::from_gguf_metadata(&bad).unwrap_err().to_string();
        assert!(e.contains(KEY_MERGES), "{e}");

        let mut bad = toy_bpe("gpt2");
        bad.retain(|(k, _)| k != KEY_MODEL);
        bad.push((KEY_MODEL.into(), Value::from("bert")));
        let e = Tokenizer::from_gguf_metadata(&bad).unwrap_err().to_string();
        assert!(e.contains(KEY_MODEL) && e.contains("bert"), "{e}");

        let mut bad = toy_bpe("gpt2");
        bad.retain(|(k, _)| k != KEY_TYPES);
        bad.push((KEY_TYPES.into(), Value::Array(Array::I32(vec![1]))));
        let e = Tokenizer::from_gguf_metadata(&bad).unwrap_err().to_string();
        assert!(e.contains(KEY_TYPES), "{e}");
    }

    #[test]
    fn toy_sentencepiece() {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        let words = ["▁", "h", "i", "▁h", "▁hi", "é"];
        for w in words {
            tokens.push(w.into());
            types.push(1);
        }
        let scores: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
        let md = md(vec![
            (KEY_MODEL, Value::from("llama")),
            (KEY_TOKENS, Value::Array(Array::String(tokens.clone()))),
            (KEY_TYPES, Value::Array(Array::I32(types))),
            (KEY_SCORES, Value::Array(Array::F32(scores))),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ]);
        let t = Tokenizer::from_gguf_metadata(&md).unwrap();
        let id = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
        // " hi" with the space prefix → "▁hi"; "ü" is not in the vocabulary → its two UTF-8 bytes.
        let ids = t.encode("hi ü", true, false).unwrap();
        assert_eq!(ids, vec![1, id("▁hi"), id("▁"), 3 + 0xC3, 3 + 0xBC]);
        assert_eq!(t.decode(&ids, true), "hi ü");
        // After a special token the space prefix is added again (llama.cpp's is_prev_special).
        let ids = t.encode("hi</s>hi", false, true).unwrap();
        assert_eq!(ids, vec![id("▁hi"), 2, id("▁hi")]);
        assert_eq!(t.decode(&ids, false), "hi</s> hi");
    }
}
