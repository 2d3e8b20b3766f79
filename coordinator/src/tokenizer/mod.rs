//! The model's tokenizer: text ↔ token ids, special tokens, end-of-generation ids, streaming detokenization.
//!
//! A [`Tokenizer`] is built from either
//! - GGUF metadata (`tokenizer.ggml.*`, keys listed in `tokenizer/gguf.rs`), reproducing llama.cpp's
//!   `llama-vocab.cpp`: byte-level BPE (`tokenizer.ggml.model = "gpt2"`: Llama 3, SmolLM2) with the
//!   pre-tokenizer regexes `tokenizer.ggml.pre` names, or SentencePiece-style BPE (`"llama"`: Llama 2) with
//!   scores, byte fallback and a space prefix; or
//! - a Hugging Face `tokenizer.json` (plus `tokenizer_config.json` / `generation_config.json` for the
//!   special tokens), reproducing the `tokenizers` library.
//!
//! Either way the Hugging Face `tokenizers` crate runs the BPE merges on plain text. Special tokens are split
//! out here, not by `tokenizers`, so that `parse_special` can be chosen per call (user text must not be able to
//! inject `<|eot_id|>`), with llama.cpp's semantics: control and unknown tokens are recognised only when
//! `parse_special` is set, user-defined tokens always; matching is leftmost-longest like `tokenizers`.
//!
//! Decoding is per token into bytes (llama.cpp's `token_to_piece`), so a streamed reply can be cut only at
//! whole UTF-8 characters ([`StreamDecoder`]) and a whole decode equals the streamed text.
//!
//! References: llama.cpp `src/llama-vocab.cpp` (tokenize, token_to_piece, special-token partition),
//! Hugging Face tokenizers `tokenizer/added_vocabulary.rs`, OpenAI GPT-2 `encoder.py` (byte-level table).

mod bytes;
mod gguf;
mod hf;
mod stream;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use shard_tool::checkpoint::Checkpoint;
use shard_tool::gguf::{GgufFile, Value};
use shard_tool::manifest::Manifest;
use shard_tool::source::ByteSource;

pub use stream::StreamDecoder;

/// Errors building or running a tokenizer. Messages name the file or metadata key at fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("reading GGUF tokenizer metadata: {0}")]
    Gguf(#[from] shard_tool::Error),
    #[error("tokenizer metadata `{key}` is missing")]
    MissingKey { key: String },
    #[error("tokenizer metadata `{key}` must be {expected}")]
    WrongType { key: String, expected: &'static str },
    #[error("tokenizer metadata `{key}`: {msg}")]
    Invalid { key: String, msg: String },
    #[error("tokenizer metadata `{key}` = {value:?} is not supported (supported: {supported})")]
    Unsupported {
        key: String,
        value: String,
        supported: String,
    },
    #[error("no tokenizer: {0}")]
    NotFound(String),
    #[error("tokenizing failed: {0}")]
    Encode(String),
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// What a token is, after llama.cpp's `llama_token_attr` (GGUF `tokenizer.ggml.token_type`: 1 normal,
/// 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Ordinary text.
    Normal,
    /// `<|begin_of_text|>`, `<|eot_id|>`, `<|im_start|>` …: recognised in text only with `parse_special`,
    /// dropped by `decode(.., skip_special = true)`.
    Control,
    /// Added vocabulary that is text (always recognised, always decoded).
    UserDefined,
    /// `<0x0A>`: one raw byte (SentencePiece byte fallback).
    Byte,
    /// `<unk>`: treated like a control token.
    Unknown,
    /// Reserved slots; decode to nothing.
    Unused,
}

impl TokenKind {
    fn from_gguf(t: i32) -> TokenKind {
        match t {
            1 => TokenKind::Normal,
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            6 => TokenKind::Byte,
            // 5 unused, 0 undefined and anything else: llama.cpp decodes them to nothing.
            _ => TokenKind::Unused,
        }
    }

    /// Dropped by `skip_special` and matched only with `parse_special` (llama.cpp's `attr_special`).
    pub fn is_special(self) -> bool {
        matches!(self, TokenKind::Control | TokenKind::Unknown)
    }
}

/// How a token's text turns into the bytes it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceStyle {
    /// GPT-2 byte-level alphabet (`Ġ` is a space).
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xNN>` byte tokens.
    Spm,
    /// The `tokenizers` decoder applied to the single token.
    Decoder,
}

/// Token texts that end generation, beyond the declared eos/eot/eom ids (llama.cpp's list in
/// `llama_vocab::impl::load`, restricted to the ones Llama-family checkpoints use).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
];

/// Everything a tokenizer source provides; [`Tokenizer::assemble`] derives the rest.
struct Parts {
    inner: tokenizers::Tokenizer,
    description: String,
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    style: PieceStyle,
    space_prefix: bool,
    strip_leading_space: bool,
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Extra end-of-generation ids (eot, eom, generation_config's list); text-based ones are added later.
    eog: Vec<u32>,
}

/// A model tokenizer. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Tokenizer {
    /// Tokenizes text fragments that contain no special tokens (its own special-token splitting is off).
    inner: tokenizers::Tokenizer,
    description: String,
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    /// Decoded bytes of every token, concatenated; token `i` is `piece_data[piece_ends[i-1]..piece_ends[i]]`.
    piece_data: Vec<u8>,
    piece_ends: Vec<usize>,
    splitter: SpecialSplitter,
    /// SentencePiece GGUF: prefix a space to text at the start and after each special token (llama.cpp).
    space_prefix: bool,
    /// `decode` drops one leading space (the one `space_prefix` added; HF's `Strip` decoder).
    strip_leading_space: bool,
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    eog: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("description", &self.description)
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// From GGUF `tokenizer.*` metadata (as [`Checkpoint::tokenizer_metadata`] returns it).
    pub fn from_gguf_metadata(metadata: &[(String, Value)]) -> Result<Tokenizer> {
        Self::assemble(gguf::parts(metadata)?)
    }

    /// From a GGUF file's metadata: a model, a vocab-only GGUF, or a shard directory's `tokenizer.gguf`.
    /// Only the header is read.
    pub fn from_gguf_file(path: &Path) -> Result<Tokenizer> {
        let src = ByteSource::open(&[path.to_path_buf()])?;
        let file = GgufFile::parse(&src)?;
        Self::from_gguf_metadata(&file.metadata)
    }

    /// From a Hugging Face `tokenizer.json`, with `tokenizer_config.json` (bos/eos token names,
    /// `add_bos_token`) and `generation_config.json` (`eos_token_id`, possibly a list) when present.
    pub fn from_tokenizer_json(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        generation_config: Option<&Path>,
    ) -> Result<Tokenizer> {
        Self::assemble(hf::parts(
            tokenizer_json,
            tokenizer_config,
            generation_config,
        )?)
    }

    /// The tokenizer of an opened checkpoint: its GGUF metadata, or the tokenizer files beside a Hugging Face
    /// checkpoint.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Tokenizer> {
        if let Some(md) = ckpt.tokenizer_metadata() {
            return Self::from_gguf_metadata(&md);
        }
        Self::from_files(&ckpt.tokenizer_files()).map_err(|e| match e {
            TokenizerError::NotFound(_) => TokenizerError::NotFound(format!(
                "{} has no tokenizer.ggml.* metadata and no tokenizer.json beside it",
                ckpt.path().display()
            )),
            e => e,
        })
    }

    /// The tokenizer of a shard directory written by `shard-tool split` (its `tokenizer.gguf` or
    /// `tokenizer.json`, as listed in the manifest).
    pub fn from_shard_dir(dir: &Path, manifest: &Manifest) -> Result<Tokenizer> {
        let files: Vec<PathBuf> = manifest
            .tokenizer_files
            .iter()
            .map(|f| dir.join(&f.file))
            .collect();
        if let Some(gguf) = files
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        {
            return Self::from_gguf_file(gguf);
        }
        Self::from_files(&files).map_err(|e| match e {
            TokenizerError::NotFound(_) => TokenizerError::NotFound(format!(
                "the manifest in {} lists no tokenizer.gguf or tokenizer.json",
                dir.display()
            )),
            e => e,
        })
    }

    fn from_files(files: &[PathBuf]) -> Result<Tokenizer> {
        let named = |name: &str| {
            files
                .iter()
                .find(|p| p.file_name().is_some_and(|n| n == name))
        };
        let Some(json) = named("tokenizer.json") else {
            return Err(TokenizerError::NotFound("no tokenizer.json".into()));
        };
        Self::from_tokenizer_json(
            json,
            named("tokenizer_config.json").map(PathBuf::as_path),
            named("generation_config.json").map(PathBuf::as_path),
        )
    }

    fn assemble(p: Parts) -> Result<Tokenizer> {
        let n = p.tokens.len();
        debug_assert_eq!(p.kinds.len(), n);
        let mut piece_data = Vec::with_capacity(n * 6);
        let mut piece_ends = Vec::with_capacity(n);
        for (id, (text, &kind)) in p.tokens.iter().zip(&p.kinds).enumerate() {
            match kind {
                TokenKind::Unused => {}
                TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined => {
                    piece_data.extend_from_slice(text.as_bytes())
                }
                TokenKind::Byte => match parse_byte_token(text) {
                    Some(b) => piece_data.push(b),
                    None => piece_data.extend_from_slice(text.as_bytes()),
                },
                TokenKind::Normal => match p.style {
                    PieceStyle::ByteLevel => piece_data.extend(bytes::decode_token(text)),
                    PieceStyle::Spm => {
                        piece_data.extend_from_slice(text.replace('▁', " ").as_bytes())
                    }
                    PieceStyle::Decoder => {
                        let s = p
                            .inner
                            .decode(&[id as u32], false)
                            .unwrap_or_else(|_| text.clone());
                        piece_data.extend_from_slice(s.as_bytes())
                    }
                },
            }
            piece_ends.push(piece_data.len());
        }

        // End of generation: eos, the source's extra ids, and llama.cpp's well-known texts.
        let mut eog: Vec<u32> = p.eos.into_iter().chain(p.eog.iter().copied()).collect();
        let mut kinds = p.kinds;
        for (id, text) in p.tokens.iter().enumerate() {
            if EOG_TEXTS.contains(&text.as_str()) {
                eog.push(id as u32);
            }
        }
        eog.retain(|&id| (id as usize) < n);
        eog.sort_unstable();
        eog.dedup();
        // llama.cpp overrides end-of-generation tokens to control type so they are never shown as text.
        for &id in &eog {
            if kinds[id as usize] == TokenKind::Normal {
                kinds[id as usize] = TokenKind::Control;
            }
        }

        let splitter = SpecialSplitter::new(&p.tokens, &kinds);
        Ok(Tokenizer {
            inner: p.inner,
            description: p.description,
            tokens: p.tokens,
            kinds,
            piece_data,
            piece_ends,
            splitter,
            space_prefix: p.space_prefix,
            strip_leading_space: p.strip_leading_space,
            prefix: p.prefix,
            suffix: p.suffix,
            bos: p.bos,
            eos: p.eos,
            eog,
        })
    }

    /// Text to token ids.
    ///
    /// - `add_special`: add what the model adds around a sequence (BOS for Llama 2/3 when
    ///   `tokenizer.ggml.add_bos_token` or the post-processor says so; EOS rarely). Chat prompts rendered from
    ///   a template already contain BOS: encode them with `add_special = false`.
    /// - `parse_special`: recognise control tokens written as text (`<|eot_id|>`). Off for user-supplied
    ///   text, on for rendered chat templates.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special {
            out.extend_from_slice(&self.prefix);
        }
        let mut prev_special = true;
        for fragment in self.splitter.split(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(s) => {
                    if self.space_prefix && prev_special {
                        self.encode_plain(&format!(" {s}"), &mut out)?;
                    } else {
                        self.encode_plain(s, &mut out)?;
                    }
                    prev_special = false;
                }
            }
        }
        if add_special {
            out.extend_from_slice(&self.suffix);
        }
        Ok(out)
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }

    /// Token ids to text. `skip_special` drops control tokens (`<|eot_id|>`, BOS). Invalid UTF-8 (a reply cut
    /// inside a character) becomes U+FFFD; ids outside the vocabulary decode to nothing. For SentencePiece
    /// vocabularies the space the encoder prefixed is removed, as Hugging Face's decoder does.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.piece(id, skip_special));
        }
        let start = usize::from(self.strip_leading_space && bytes.first() == Some(&b' '));
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// The bytes token `id` contributes to decoded text (empty for skipped special tokens and unknown ids).
    pub fn piece(&self, id: u32, skip_special: bool) -> &[u8] {
        let i = id as usize;
        let Some(&end) = self.piece_ends.get(i) else {
            return &[];
        };
        if skip_special && self.kinds[i].is_special() {
            return &[];
        }
        let start = if i == 0 { 0 } else { self.piece_ends[i - 1] };
        &self.piece_data[start..end]
    }

    /// The token's entry in the vocabulary, as stored (`"ĠParis"`, `"▁Paris"`, `"<|eot_id|>"`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of the vocabulary entry `text` (exact stored form).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.splitter
            .exact(text)
            .or_else(|| self.inner.token_to_id(text))
    }

    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// Number of token ids (the largest id + 1).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Beginning-of-sequence token, if the model has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The declared end-of-sequence token (`tokenizer.ggml.eos_token_id` / `eos_token`).
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Every token that ends generation, sorted: eos, eot (`<|eot_id|>`, which Llama 3 instruct models end
    /// turns with), eom, `generation_config.json`'s `eos_token_id` list, and llama.cpp's well-known texts.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eog
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn adds_bos(&self) -> bool {
        self.bos.is_some_and(|b| self.prefix.first() == Some(&b))
    }

    /// "GGUF gpt2 (pre smollm)", "tokenizer.json (BPE)" …
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Starts a streaming decode of generated tokens; see [`StreamDecoder`].
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder {
        StreamDecoder::new(skip_special)
    }
}

/// `<0x0A>` → 0x0A.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// A piece of input text: plain text for the BPE model, or a special token found in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// Finds special and user-defined token texts in input, leftmost-longest (Hugging Face's added-vocabulary
/// matching). Candidates are indexed by first byte; a match can only start at a character boundary because
/// every candidate starts with a UTF-8 lead byte.
#[derive(Debug, Default)]
struct SpecialSplitter {
    /// First byte → candidates, longest first.
    by_first: HashMap<u8, Vec<Special>>,
}

#[derive(Debug)]
struct Special {
    text: String,
    id: u32,
    /// User-defined: matched even without `parse_special`.
    always: bool,
}

impl SpecialSplitter {
    fn new(tokens: &[String], kinds: &[TokenKind]) -> SpecialSplitter {
        let mut by_first: HashMap<u8, Vec<Special>> = HashMap::new();
        for (id, (text, kind)) in tokens.iter().zip(kinds).enumerate() {
            let always = match kind {
                TokenKind::Control | TokenKind::Unknown => false,
                TokenKind::UserDefined => true,
                _ => continue,
            };
            let Some(&first) = text.as_bytes().first() else {
                continue;
            };
            by_first.entry(first).or_default().push(Special {
                text: text.clone(),
                id: id as u32,
                always,
            });
        }
        for list in by_first.values_mut() {
            // Longest first; equal lengths by id so the choice is deterministic.
            list.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));
        }
        SpecialSplitter { by_first }
    }

    fn exact(&self, text: &str) -> Option<u32> {
        let first = text.as_bytes().first()?;
        self.by_first
            .get(first)?
            .iter()
            .find(|s| s.text == text)
            .map(|s| s.id)
    }

    fn split<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let (mut start, mut i) = (0, 0);
        'scan: while i < bytes.len() {
            if let Some(cands) = self.by_first.get(&bytes[i]) {
                for c in cands {
                    if (c.always || parse_special) && bytes[i..].starts_with(c.text.as_bytes()) {
                        if start < i {
                            out.push(Fragment::Text(&text[start..i]));
                        }
                        out.push(Fragment::Token(c.id));
                        i += c.text.len();
                        start = i;
                        continue 'scan;
                    }
                }
            }
            i += 1;
        }
        if start < bytes.len() {
            out.push(Fragment::Text(&text[start..]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn splitter() -> SpecialSplitter {
        let tokens: Vec<String> = ["a", "<|eot_id|>", "<|eot|>", "<tool>", "é"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let kinds = [
            TokenKind::Normal,
            TokenKind::Control,
            TokenKind::Control,
            TokenKind::UserDefined,
            TokenKind::Control,
        ];
        SpecialSplitter::new(&tokens, &kinds)
    }

    #[test]
    fn splits_leftmost_longest_and_respects_parse_special() {
        let s = splitter();
        let text = "x<|eot_id|>y<tool><|eot|>é";
        assert_eq!(
            s.split(text, true),
            vec![
                Fragment::Text("x"),
                Fragment::Token(1),
                Fragment::Text("y"),
                Fragment::Token(3),
                Fragment::Token(2),
                Fragment::Token(4),
            ]
        );
        // Without parse_special only the user-defined token is recognised.
        assert_eq!(
            s.split(text, false),
            vec![
                Fragment::Text("x<|eot_id|>y"),
                Fragment::Token(3),
                Fragment::Text("<|eot|>é")
            ]
        );
        assert_eq!(s.split("", true), vec![]);
        assert_eq!(s.exact("<tool>"), Some(3));
    }

    #[test]
    fn byte_tokens() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xff>"), Some(255));
        assert_eq!(parse_byte_token("<0x100>"), None);
        assert_eq!(parse_byte_token("0x0A"), None);
    }
}
