//! A GGUF model as users have it on disk, opened as one [`GgufSet`]: a plain `.gguf`, a gguf-split set
//! (`name-00001-of-00003.gguf`, each piece a full GGUF with `split.no` / `split.count` /
//! `split.tensors.count`), byte-split pieces meant to be concatenated (`name.gguf.cat0`, `.cat1`, … or
//! `name.cat0.llamafile`, …), or a llamafile (the GGUF stored in a ZIP appended to an executable).
//!
//! Naming follows llama.cpp's `llama_split_path` (`"%s-%05d-of-%05d.gguf"`, 1-based); the `split.no` key is
//! 0-based. The metadata of a set is the first piece's; tensors are the union, each knowing its piece.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::value::Value;
use super::{GgufFile, GgufTensor, MAGIC};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::source::ByteSource;
use crate::tensor::TensorDesc;

pub const KEY_SPLIT_NO: &str = "split.no";
pub const KEY_SPLIT_COUNT: &str = "split.count";
pub const KEY_SPLIT_TENSORS_COUNT: &str = "split.tensors.count";

/// One file of a set: its bytes and its parsed header.
pub struct GgufPiece {
    pub source: ByteSource,
    pub file: GgufFile,
}

impl std::fmt::Debug for GgufPiece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let paths: Vec<&Path> = self.source.paths().collect();
        f.debug_struct("GgufPiece")
            .field("paths", &paths)
            .field("len", &self.source.len())
            .field("file", &self.file)
            .finish()
    }
}

/// A tensor of a set: its description, the piece holding it, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct SetTensor {
    pub desc: TensorDesc,
    /// Index into [`GgufSet::pieces`].
    pub piece: usize,
    /// Absolute offset in that piece's source.
    pub offset: u64,
    pub size: u64,
}

/// A whole GGUF model: one or more pieces presented as one tensor list.
#[derive(Debug)]
pub struct GgufSet {
    pub pieces: Vec<GgufPiece>,
    /// All tensors, piece by piece in file order.
    pub tensors: Vec<SetTensor>,
}

impl GgufSet {
    /// Drops the pages of `bytes` (tensor data borrowed from this set) from the resident set; they fault
    /// back in from the file if read again.
    pub fn release_bytes(&self, bytes: &[u8]) {
        for piece in &self.pieces {
            piece.source.release_bytes(bytes);
        }
    }

    /// Opens whatever GGUF-family input `path` is: a plain file, any piece of a gguf-split set (siblings are
    /// found by name), the first (or any) byte-split `.catN` piece, or a llamafile. PyTorch pickles and other
    /// formats Tessera does not read are refused with what to convert them with.
    pub fn open(path: &Path) -> Result<GgufSet> {
        if let Some(pieces) = byte_split_pieces(path)? {
            let src = ByteSource::open(&pieces)?;
            return GgufSet::from_sources(vec![unwrap_container(src)?]);
        }
        if let Some(paths) = split_paths(path)? {
            return GgufSet::open_paths(&paths);
        }
        GgufSet::from_sources(vec![unwrap_container(ByteSource::open(&[
            path.to_owned()
        ])?)?])
    }

    /// Opens every piece of a gguf-split set given explicitly (in any order; sorted by `split.no`).
    pub fn open_paths(paths: &[PathBuf]) -> Result<GgufSet> {
        let sources = paths
            .iter()
            .map(|p| ByteSource::open(std::slice::from_ref(p)))
            .collect::<Result<_>>()?;
        GgufSet::from_sources(sources)
    }

    /// Opens byte-split pieces given in order (`x.gguf.cat0 x.gguf.cat1 …`, possibly of a llamafile) as one file.
    pub fn open_pieces(paths: &[PathBuf]) -> Result<GgufSet> {
        GgufSet::from_sources(vec![unwrap_container(ByteSource::open(paths)?)?])
    }

    /// Parses already opened sources (e.g. llamafile windows) as the pieces of one model and checks the
    /// `split.*` keys: numbers 0..count each present once, and the tensor total.
    pub fn from_sources(sources: Vec<ByteSource>) -> Result<GgufSet> {
        let mut pieces = Vec::with_capacity(sources.len());
        for source in sources {
            let file = GgufFile::parse(&source)?;
            pieces.push(GgufPiece { source, file });
        }
        let Some(first) = pieces.first() else {
            return Err(Error::malformed("<no input>", "no GGUF file given"));
        };
        let first_path = first.source.path().to_owned();
        let count = split_key(first, KEY_SPLIT_COUNT)?;
        match count {
            None if pieces.len() == 1 => {}
            None => {
                return Err(Error::malformed(
                    &first_path,
                    format!(
                        "{} files given, but this one has no `{KEY_SPLIT_COUNT}`: not a gguf-split set",
                        pieces.len()
                    ),
                ));
            }
            Some(count) => {
                let mut numbered = Vec::with_capacity(pieces.len());
                for piece in pieces {
                    let path = piece.source.path().to_owned();
                    let no = split_key(&piece, KEY_SPLIT_NO)?.unwrap_or(0);
                    let this_count = split_key(&piece, KEY_SPLIT_COUNT)?;
                    if this_count != Some(count) {
                        return Err(Error::malformed(
                            &path,
                            format!(
                                "`{KEY_SPLIT_COUNT}` is {this_count:?}, but {} says {count}",
                                first_path.display()
                            ),
                        ));
                    }
                    if no >= count {
                        return Err(Error::malformed(
                            &path,
                            format!("`{KEY_SPLIT_NO}` {no} ≥ `{KEY_SPLIT_COUNT}` {count}"),
                        ));
                    }
                    numbered.push((no, piece));
                }
                numbered.sort_by_key(|(no, _)| *no);
                for (i, (no, piece)) in numbered.iter().enumerate() {
                    if *no < i as u64 {
                        return Err(Error::malformed(
                            piece.source.path(),
                            format!(
                                "`{KEY_SPLIT_NO}` {no} is also the number of another piece given"
                            ),
                        ));
                    }
                    if *no > i as u64 {
                        return Err(Error::Missing {
                            path: first_path,
                            key: format!("split piece {} of {count} (`{KEY_SPLIT_NO}` {i})", i + 1),
                        });
                    }
                }
                if numbered.len() as u64 != count {
                    return Err(Error::Missing {
                        path: first_path,
                        key: format!(
                            "split pieces {}..={count} of the gguf-split set",
                            numbered.len() + 1
                        ),
                    });
                }
                pieces = numbered.into_iter().map(|(_, p)| p).collect();
            }
        }

        let mut tensors = Vec::new();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, piece) in pieces.iter().enumerate() {
            for GgufTensor { desc, offset, size } in &piece.file.tensors {
                if let Some(other) = seen.insert(&desc.name, i) {
                    return Err(Error::malformed(
                        piece.source.path(),
                        format!(
                            "tensor `{}` is also in {}",
                            desc.name,
                            pieces[other].source.path().display()
                        ),
                    ));
                }
                tensors.push(SetTensor {
                    desc: desc.clone(),
                    piece: i,
                    offset: *offset,
                    size: *size,
                });
            }
        }
        if let Some(expected) = split_key(&pieces[0], KEY_SPLIT_TENSORS_COUNT)?
            && expected != tensors.len() as u64
        {
            return Err(Error::malformed(
                pieces[0].source.path(),
                format!(
                    "`{KEY_SPLIT_TENSORS_COUNT}` is {expected}, but the pieces hold {} tensors",
                    tensors.len()
                ),
            ));
        }
        Ok(GgufSet { pieces, tensors })
    }

    /// The first piece's header (the set's metadata).
    pub fn first(&self) -> &GgufFile {
        &self.pieces[0].file
    }

    /// The first file, for messages.
    pub fn path(&self) -> &Path {
        self.pieces[0].source.path()
    }

    /// The set's metadata: the first piece's, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.first().metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.first().get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&SetTensor> {
        self.tensors.iter().find(|t| t.desc.name == name)
    }

    /// A tensor's bytes (borrowed from the map unless they straddle byte-split pieces).
    pub fn tensor_data(&self, t: &SetTensor) -> Result<Cow<'_, [u8]>> {
        self.pieces[t.piece].source.read(t.offset, t.size)
    }

    /// The model's hyperparameters (first piece's metadata; tensors of all pieces).
    pub fn model_config(&self) -> Result<ModelConfig> {
        super::model_config_from(
            self.metadata(),
            self.tensors.iter().map(|t| &t.desc),
            self.path(),
        )
    }
}

/// An unsigned `split.*` key of a piece (`None` when absent).
fn split_key(piece: &GgufPiece, key: &str) -> Result<Option<u64>> {
    match piece.file.get(key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            Error::malformed(
                piece.source.path(),
                format!(
                    "`{key}` is {v} ({}), expected an unsigned integer",
                    v.value_type()
                ),
            )
        }),
    }
}

/// The GGUF inside `src`: `src` itself when it starts with the GGUF magic, the stored `.gguf` when it is a
/// ZIP (llamafile). Refused formats (pickles) get their message; anything else fails in the GGUF parser.
fn unwrap_container(src: ByteSource) -> Result<ByteSource> {
    let head = src.read(0, src.len().min(64 * 1024))?;
    if head.starts_with(&MAGIC) {
        drop(head);
        return Ok(src);
    }
    if let Some(refusal) = crate::pickle::detect_refused_format(src.path(), &head) {
        return Err(refusal);
    }
    drop(head);
    if crate::llamafile::is_zip(&src) {
        return crate::llamafile::open_gguf(src, None);
    }
    Ok(src)
}

/// `(prefix, no, count, digits)` of `prefix-NNNNN-of-MMMMM.gguf` (no and count 1-based).
fn parse_split_name(name: &str) -> Option<(&str, u64, u64)> {
    let stem = name.strip_suffix(".gguf")?;
    let (head, count) = stem.rsplit_once("-of-")?;
    let (prefix, no) = head.rsplit_once('-')?;
    let digits = |s: &str| s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(no) || !digits(count) {
        return None;
    }
    let (no, count) = (no.parse().ok()?, count.parse().ok()?);
    (1..=count).contains(&no).then_some((prefix, no, count))
}

/// All pieces of the gguf-split set that `path` belongs to, in order, when its name follows the
/// `-00001-of-00003.gguf` pattern; `None` otherwise. A missing piece is an error naming it.
pub fn split_paths(path: &Path) -> Result<Option<Vec<PathBuf>>> {
    let Some((prefix, _, count)) = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_split_name)
    else {
        return Ok(None);
    };
    if count > 99_999 {
        return Err(Error::malformed(
            path,
            format!("gguf-split name claims {count} pieces"),
        ));
    }
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut paths = Vec::with_capacity(count as usize);
    for no in 1..=count {
        let p = dir.join(format!("{prefix}-{no:05}-of-{count:05}.gguf"));
        if !p.is_file() {
            return Err(Error::Missing {
                path: path.to_owned(),
                key: format!("split piece {}", p.display()),
            });
        }
        paths.push(p);
    }
    Ok(Some(paths))
}

/// All byte-split pieces (`….cat0`, `….cat1`, … with or without an extension after the number, e.g.
/// `model.gguf.cat0` or `model.cat0.llamafile`) of the set `path` belongs to, in order from `cat0`, when its
/// name has that form; `None` otherwise. Pieces are read in order as one file.
pub fn byte_split_pieces(path: &Path) -> Result<Option<Vec<PathBuf>>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(None);
    };
    let Some((before, after)) = cat_parts(name) else {
        return Ok(None);
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    let piece = |i: usize| dir.join(format!("{before}.cat{i}{after}"));
    if !piece(0).is_file() {
        return Err(Error::Missing {
            path: path.to_owned(),
            key: format!("first byte-split piece {}", piece(0).display()),
        });
    }
    let pieces: Vec<PathBuf> = (0..).map(piece).take_while(|p| p.is_file()).collect();
    if !pieces.iter().any(|p| p == path) && path.is_file() {
        return Err(Error::malformed(
            path,
            "byte-split pieces must be numbered .cat0, .cat1, … without gaps",
        ));
    }
    Ok(Some(pieces))
}

/// Splits `x.gguf.cat3` into `("x.gguf", "")` and `x.cat3.llamafile` into `("x", ".llamafile")`.
fn cat_parts(name: &str) -> Option<(&str, &str)> {
    let at = name.rfind(".cat")?;
    let rest = &name[at + 4..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let after = &rest[digits..];
    (digits > 0 && (after.is_empty() || after.starts_with('.')) && at > 0)
        .then(|| (&name[..at], after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names() {
        assert_eq!(parse_split_name("m-00002-of-00003.gguf"), Some(("m", 2, 3)));
        assert_eq!(
            parse_split_name("a-b-00001-of-00001.gguf"),
            Some(("a-b", 1, 1))
        );
        assert_eq!(parse_split_name("m-00004-of-00003.gguf"), None);
        assert_eq!(parse_split_name("m-0001-of-0003.gguf"), None);
        assert_eq!(parse_split_name("m.gguf"), None);
        assert_eq!(cat_parts("x.gguf.cat0"), Some(("x.gguf", "")));
        assert_eq!(
            cat_parts("x.Q2_K.cat12.llamafile"),
            Some(("x.Q2_K", ".llamafile"))
        );
        assert_eq!(cat_parts("x.category"), None);
        assert_eq!(cat_parts("x.gguf"), None);
    }
}
