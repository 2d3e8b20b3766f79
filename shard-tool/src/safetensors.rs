//! Hugging Face safetensors files, single or sharded, read in place through the memory map.
//!
//! Format (<https://github.com/huggingface/safetensors#format>), step by step:
//! 1. 8 bytes: `N`, the header length, unsigned little-endian. We refuse `N` > 100 MB (the reference
//!    implementation's limit) and `N` past the end of the file.
//! 2. `N` bytes: a UTF-8 JSON object, possibly padded with trailing spaces. Each key is a tensor name with
//!    `{"dtype": "BF16", "shape": [rows, cols], "data_offsets": [begin, end]}`; the optional key
//!    `__metadata__` maps strings to strings.
//! 3. The rest of the file: the data buffer. `data_offsets` are relative to its first byte (the byte after the
//!    header); tensors are row-major (C order), little-endian.
//!
//! Every tensor is checked: `end - begin` equals `product(shape) * dtype size`, the range lies inside the
//! data buffer, no two non-empty tensors overlap, names are unique. Only F32, F16 and BF16 are read; other
//! dtypes (I8, F8_E4M3, ...) are refused naming the tensor. Gaps between tensors are accepted (the reference
//! reader rejects them, but they cannot make us read wrong bytes).
//!
//! Sharded checkpoints carry `model.safetensors.index.json` (`{"weight_map": {tensor: file}}`): every listed
//! file is opened once, and every tensor the index lists must be in the file it names. Tensors present in a
//! file but absent from the index are accepted (the index is a lookup aid; transformers loads by file), but a
//! tensor name found in two files is refused.
//!
//! Directories holding only pickled PyTorch weights (`*.bin`, `*.pth`, `*.pt`) are refused with the command
//! that converts them: Tessera never unpickles (loading a pickle runs arbitrary code).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;
use tessera_kernels::quant::GgmlType;

use crate::error::{Error, Result};
use crate::source::ByteSource;

/// Largest header we accept, as the reference implementation (`safetensors` crate `MAX_HEADER_SIZE`).
pub const MAX_HEADER_LEN: u64 = 100_000_000;
/// Largest `model.safetensors.index.json` we read.
pub const MAX_INDEX_LEN: u64 = 100_000_000;
/// Name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// dtypes of the format (spec and `safetensors::Dtype`) that Tessera does not read, so that a refusal can tell
/// "valid file, unsupported type" from "not a dtype at all".
const KNOWN_UNSUPPORTED: &[&str] = &[
    "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F64", "F8_E5M2", "F8_E4M3",
    "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64",
];

/// Maps a safetensors dtype string to the ggml type with the same bytes.
pub fn dtype_to_ggml(dtype: &str) -> Option<GgmlType> {
    match dtype {
        "F32" => Some(GgmlType::F32),
        "F16" => Some(GgmlType::F16),
        "BF16" => Some(GgmlType::BF16),
        _ => None,
    }
}

/// One tensor entry of one file's header, offsets relative to the data buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StEntry {
    pub name: String,
    pub ty: GgmlType,
    /// Row-major, as in the file (`[rows, cols]`).
    pub shape_rowmajor: Vec<u64>,
    /// `data_offsets` as written: relative to the first byte after the header.
    pub begin: u64,
    pub end: u64,
}

/// A parsed and validated header of one safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StHeader {
    /// `__metadata__` (empty when absent).
    pub metadata: BTreeMap<String, String>,
    /// In file order.
    pub entries: Vec<StEntry>,
    /// Absolute offset of the data buffer: 8 + header length.
    pub data_start: u64,
}

/// One tensor of a [`SafetensorsSet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StTensor {
    /// Name as in the file (`model.layers.0.self_attn.q_proj.weight`).
    pub hf_name: String,
    pub ty: GgmlType,
    /// Row-major (`[rows, cols]`); ggml order is the reverse, see [`StTensor::shape_ggml`].
    pub shape_rowmajor: Vec<u64>,
    /// Index into the set's files.
    pub file: usize,
    /// Absolute offset of the first byte in that file.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

impl StTensor {
    /// Shape in ggml order (`shape[0]` contiguous), as `TensorDesc` wants it.
    pub fn shape_ggml(&self) -> Vec<u64> {
        self.shape_rowmajor.iter().rev().copied().collect()
    }
}

/// The safetensors files of one checkpoint, memory-mapped, with every tensor located.
pub struct SafetensorsSet {
    files: Vec<(PathBuf, ByteSource)>,
    /// In file order, each file's in header order.
    pub tensors: Vec<StTensor>,
    /// `__metadata__` of each file, in file order.
    pub metadata: Vec<BTreeMap<String, String>>,
    /// The index file, when the set came from one.
    pub index: Option<PathBuf>,
    by_name: HashMap<String, usize>,
}

impl fmt::Debug for SafetensorsSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsSet")
            .field(
                "files",
                &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .field("index", &self.index)
            .finish()
    }
}

impl SafetensorsSet {
    /// Opens the checkpoint in `dir`: `model.safetensors.index.json` when present, else `model.safetensors`,
    /// else every `*.safetensors` file in the directory (sorted by name). A directory with only pickled
    /// weights is refused with the conversion command.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(&index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        let listing = list_dir(dir)?;
        let st: Vec<PathBuf> = listing
            .iter()
            .filter(|p| has_ext(p, &["safetensors"]))
            .cloned()
            .collect();
        if !st.is_empty() {
            return Self::open_files(&st);
        }
        Err(no_safetensors_error(dir, &listing))
    }

    /// Opens the given files: one index (`*.index.json`), or one or more `.safetensors` files.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        match paths {
            [] => Err(Error::malformed("<no input>", "no safetensors file given")),
            [one] if one.to_string_lossy().ends_with(".index.json") => Self::open_index(one),
            _ => {
                let files = paths
                    .iter()
                    .map(|p| open_one(p))
                    .collect::<Result<Vec<_>>>()?;
                Self::assemble(files, None)
            }
        }
    }

    /// Opens a sharded checkpoint from its index: every file named in `weight_map` once, checking that each
    /// listed tensor is in the file the index names.
    pub fn open_index(index_path: &Path) -> Result<Self> {
        let bytes = read_small_file(index_path, MAX_INDEX_LEN)?;
        let weight_map = parse_index(index_path, &bytes)?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        // Each file once, sorted by name (shard order) so tensors come out in a stable order.
        let mut file_names: Vec<&str> = Vec::new();
        let mut seen = HashSet::new();
        for (tensor, file) in &weight_map {
            if seen.insert(file.as_str()) {
                check_relative(index_path, tensor, file)?;
                if !dir.join(file).is_file() {
                    return Err(Error::Missing {
                        path: index_path.to_path_buf(),
                        key: format!(
                            "weight file `{file}` (listed in weight_map for tensor `{tensor}`)"
                        ),
                    });
                }
                file_names.push(file);
            }
        }
        file_names.sort_unstable();
        let files = file_names
            .iter()
            .map(|f| open_one(&dir.join(f)))
            .collect::<Result<Vec<_>>>()?;
        let set = Self::assemble(files, Some(index_path.to_path_buf()))?;
        for (tensor, file) in &weight_map {
            let want = dir.join(file);
            if set.get(tensor).map(|t| &set.files[t.file].0) != Some(&want) {
                return Err(Error::Missing {
                    path: index_path.to_path_buf(),
                    key: format!(
                        "tensor `{tensor}`: weight_map puts it in `{file}`, which does not hold it"
                    ),
                });
            }
        }
        Ok(set)
    }

    fn assemble(
        files: Vec<(PathBuf, ByteSource, StHeader)>,
        index: Option<PathBuf>,
    ) -> Result<Self> {
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        let mut metadata = Vec::with_capacity(files.len());
        let mut out_files = Vec::with_capacity(files.len());
        for (file_idx, (path, src, header)) in files.into_iter().enumerate() {
            for e in header.entries {
                if let Some(&prev) = by_name.get(&e.name) {
                    let prev: &StTensor = &tensors[prev];
                    let prev_path: &PathBuf =
                        out_files.get(prev.file).map(|(p, _)| p).unwrap_or(&path);
                    return Err(Error::malformed(
                        &path,
                        format!(
                            "tensor `{}` is also in {}: which one to use is ambiguous",
                            e.name,
                            prev_path.display()
                        ),
                    ));
                }
                let offset = header.data_start.checked_add(e.begin).ok_or_else(|| {
                    Error::malformed(&path, format!("tensor `{}`: data_offsets overflow", e.name))
                })?;
                by_name.insert(e.name.clone(), tensors.len());
                tensors.push(StTensor {
                    hf_name: e.name,
                    ty: e.ty,
                    shape_rowmajor: e.shape_rowmajor,
                    file: file_idx,
                    offset,
                    len: e.end - e.begin,
                });
            }
            metadata.push(header.metadata);
            out_files.push((path, src));
        }
        Ok(SafetensorsSet {
            files: out_files,
            tensors,
            metadata,
            index,
            by_name,
        })
    }

    /// The tensor named `hf_name`.
    pub fn get(&self, hf_name: &str) -> Option<&StTensor> {
        self.by_name.get(hf_name).map(|&i| &self.tensors[i])
    }

    /// Index into `tensors` of `hf_name`.
    pub fn position(&self, hf_name: &str) -> Option<usize> {
        self.by_name.get(hf_name).copied()
    }

    /// The files, in the order `StTensor::file` indexes them.
    pub fn file_paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Path of file `file` (for messages).
    pub fn file_path(&self, file: usize) -> &Path {
        self.files
            .get(file)
            .map(|(p, _)| p.as_path())
            .unwrap_or(Path::new("<no such safetensors file>"))
    }

    /// All bytes of `t`, borrowed from the map.
    pub fn bytes(&self, t: &StTensor) -> Result<Cow<'_, [u8]>> {
        self.read(t.file, t.offset, t.len)
    }

    /// Bytes `[offset, offset + len)` of file `file` (absolute offsets, as in `StTensor::offset`).
    pub fn read(&self, file: usize, offset: u64, len: u64) -> Result<Cow<'_, [u8]>> {
        let (_, src) = self.source(file)?;
        src.read(offset, len)
    }

    /// Drops `[offset, offset + len)` of file `file` from this process's resident set (see `ByteSource::release`).
    pub fn release(&self, file: usize, offset: u64, len: u64) {
        if let Some((_, src)) = self.files.get(file) {
            src.release(offset, len);
        }
    }

    /// Drops the pages of `bytes` (borrowed from one of these files) from the resident set.
    pub fn release_bytes(&self, bytes: &[u8]) {
        for (_, src) in &self.files {
            src.release_bytes(bytes);
        }
    }

    fn source(&self, file: usize) -> Result<&(PathBuf, ByteSource)> {
        self.files.get(file).ok_or_else(|| {
            Error::malformed(
                self.files
                    .first()
                    .map(|(p, _)| p.as_path())
                    .unwrap_or(Path::new("<safetensors>")),
                format!(
                    "no file number {file} in this safetensors set of {} files",
                    self.files.len()
                ),
            )
        })
    }
}

fn open_one(path: &Path) -> Result<(PathBuf, ByteSource, StHeader)> {
    let src = ByteSource::open(&[path.to_path_buf()])?;
    let header = read_header(path, &src).map_err(|e| {
        // A pickle, archive or compressed file passed as weights is told what to do instead of "bad header".
        // Asked only after the parse failed: a valid header length can start with a pickle's 0x80 0x02..0x05.
        let head = src.read(0, src.len().min(crate::pickle::HEAD_LEN as u64));
        head.ok()
            .and_then(|h| crate::pickle::detect_refused_format(path, &h))
            .unwrap_or(e)
    })?;
    Ok((path.to_path_buf(), src, header))
}

/// Reads and validates the header of the safetensors file mapped by `src`.
pub fn read_header(path: &Path, src: &ByteSource) -> Result<StHeader> {
    let file_len = src.len();
    if file_len < 8 {
        return Err(Error::malformed(
            path,
            format!(
                "file is {file_len} bytes, too short for the 8-byte header length: truncated or not safetensors"
            ),
        ));
    }
    let prefix = src.read(0, 8)?;
    let n = header_len(path, &prefix, file_len)?;
    let json = src.read(8, n)?;
    parse_header_json(path, &json, file_len - 8 - n)
}

/// Parses a whole safetensors file held in memory (the fuzz target's entry point; real reads go through
/// [`read_header`] on the map).
pub fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<StHeader> {
    let file_len = bytes.len() as u64;
    let Some(prefix) = bytes.get(..8) else {
        return Err(Error::malformed(
            path,
            format!(
                "file is {file_len} bytes, too short for the 8-byte header length: truncated or not safetensors"
            ),
        ));
    };
    let n = header_len(path, prefix, file_len)?;
    // header_len checked 8 + n <= file_len, so these conversions and the slice are in range.
    let json = &bytes[8..8 + n as usize];
    parse_header_json(path, json, file_len - 8 - n)
}

/// Decodes and bounds-checks the 8-byte header length.
fn header_len(path: &Path, prefix: &[u8], file_len: u64) -> Result<u64> {
    if prefix.starts_with(b"version ") {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            msg: "this looks like a Git LFS pointer, not the weights: run `git lfs pull` in the model repository"
                .into(),
        });
    }
    let mut le = [0u8; 8];
    le.copy_from_slice(prefix.get(..8).unwrap_or(&[0; 8]));
    let n = u64::from_le_bytes(le);
    if n > MAX_HEADER_LEN {
        return Err(Error::malformed(
            path,
            format!(
                "header length {n} exceeds the {MAX_HEADER_LEN}-byte limit: not a safetensors file?"
            ),
        ));
    }
    if n > file_len - 8 {
        return Err(Error::malformed(
            path,
            format!(
                "header length {n} runs past the end of the file ({} bytes after the length): truncated?",
                file_len - 8
            ),
        ));
    }
    Ok(n)
}

/// The top-level JSON object as (key, value) pairs in file order, so that duplicate keys can be refused
/// (serde_json's `Map` would silently keep the last one).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(kv) = m.next_entry::<String, Value>()? {
                    v.push(kv);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses and validates a header's JSON; `data_len` is the size of the data buffer after it.
pub fn parse_header_json(path: &Path, json: &[u8], data_len: u64) -> Result<StHeader> {
    if json.first() != Some(&b'{') {
        return Err(Error::malformed(
            path,
            "header does not start with `{`: not a safetensors file?",
        ));
    }
    let Entries(entries) = serde_json::from_slice(json)
        .map_err(|e| Error::malformed(path, format!("header is not valid JSON: {e}")))?;
    let mut names = HashSet::new();
    let mut metadata = BTreeMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if !names.insert(name.clone()) {
            return Err(Error::malformed(
                path,
                format!("header lists `{name}` twice"),
            ));
        }
        if name == "__metadata__" {
            metadata = parse_metadata(path, value)?;
            continue;
        }
        out.push(parse_entry(path, name, &value, data_len)?);
    }
    check_overlaps(path, &out)?;
    Ok(StHeader {
        metadata,
        entries: out,
        data_start: 8 + json.len() as u64,
    })
}

fn parse_metadata(path: &Path, value: Value) -> Result<BTreeMap<String, String>> {
    let Value::Object(map) = value else {
        return Err(Error::malformed(
            path,
            "`__metadata__` must be an object of strings",
        ));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            other => Err(Error::malformed(
                path,
                format!(
                    "`__metadata__.{k}` must be a string, got {}",
                    json_kind(&other)
                ),
            )),
        })
        .collect()
}

fn parse_entry(path: &Path, name: String, value: &Value, data_len: u64) -> Result<StEntry> {
    let bad = |msg: String| Error::malformed(path, format!("tensor `{name}`: {msg}"));
    let Value::Object(obj) = value else {
        return Err(bad(format!(
            "entry must be an object, got {}",
            json_kind(value)
        )));
    };
    let dtype = match obj.get("dtype") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(bad(format!(
                "`dtype` must be a string, got {}",
                json_kind(other)
            )));
        }
        None => return Err(bad("no `dtype`".into())),
    };
    let Some(ty) = dtype_to_ggml(dtype) else {
        if KNOWN_UNSUPPORTED.contains(&dtype) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                msg: format!(
                    "tensor `{name}`: dtype {dtype} is not supported (Tessera reads F32, F16 and BF16 \
                     safetensors); use an unquantized checkpoint, or a GGUF quantized with llama.cpp"
                ),
            });
        }
        return Err(bad(format!("unknown dtype `{dtype}`")));
    };
    let shape = match obj.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(|d| {
                d.as_u64()
                    .ok_or_else(|| bad(format!("`shape` entry {d} is not a non-negative integer")))
            })
            .collect::<Result<Vec<u64>>>()?,
        Some(other) => {
            return Err(bad(format!(
                "`shape` must be an array, got {}",
                json_kind(other)
            )));
        }
        None => return Err(bad("no `shape`".into())),
    };
    let (begin, end) = match obj.get("data_offsets") {
        Some(Value::Array(o)) if o.len() == 2 => match (o[0].as_u64(), o[1].as_u64()) {
            (Some(b), Some(e)) => (b, e),
            _ => {
                return Err(bad(
                    "`data_offsets` must be two non-negative integers".into()
                ));
            }
        },
        Some(_) => return Err(bad("`data_offsets` must be an array [begin, end]".into())),
        None => return Err(bad("no `data_offsets`".into())),
    };
    if begin > end {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}]: begin is after end"
        )));
    }
    if end > data_len {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] run past the end of the data ({data_len} bytes): truncated?"
        )));
    }
    let n_bytes = shape
        .iter()
        .try_fold(ty.type_size() as u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if end - begin != n_bytes {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] hold {} bytes, but shape {shape:?} of {dtype} needs {n_bytes}",
            end - begin
        )));
    }
    Ok(StEntry {
        name,
        ty,
        shape_rowmajor: shape,
        begin,
        end,
    })
}

fn check_overlaps(path: &Path, entries: &[StEntry]) -> Result<()> {
    let mut order: Vec<&StEntry> = entries.iter().filter(|e| e.end > e.begin).collect();
    order.sort_by_key(|e| (e.begin, e.end));
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b.begin < a.end {
            return Err(Error::malformed(
                path,
                format!(
                    "tensors `{}` (data_offsets [{}, {}]) and `{}` ([{}, {}]) overlap",
                    a.name, a.begin, a.end, b.name, b.begin, b.end
                ),
            ));
        }
    }
    Ok(())
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `weight_map` of an index, in file order; duplicate keys refused.
fn parse_index(path: &Path, bytes: &[u8]) -> Result<Vec<(String, String)>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: Option<Entries>,
    }
    let index: Index = serde_json::from_slice(bytes)
        .map_err(|e| Error::malformed(path, format!("not valid JSON: {e}")))?;
    let Some(Entries(wm)) = index.weight_map else {
        return Err(Error::Missing {
            path: path.to_path_buf(),
            key: "weight_map".into(),
        });
    };
    let mut seen = HashSet::new();
    wm.into_iter()
        .map(|(tensor, file)| {
            if !seen.insert(tensor.clone()) {
                return Err(Error::malformed(
                    path,
                    format!("weight_map lists tensor `{tensor}` twice"),
                ));
            }
            match file {
                Value::String(f) => Ok((tensor, f)),
                other => Err(Error::malformed(
                    path,
                    format!(
                        "weight_map[`{tensor}`] must be a file name, got {}",
                        json_kind(&other)
                    ),
                )),
            }
        })
        .collect()
}

/// Index entries must stay inside the checkpoint directory.
fn check_relative(index: &Path, tensor: &str, file: &str) -> Result<()> {
    let p = Path::new(file);
    if file.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Error::malformed(
            index,
            format!(
                "weight_map[`{tensor}`] = `{file}`: must be a file name inside the checkpoint directory"
            ),
        ));
    }
    Ok(())
}

/// Reads a small JSON file whole, refusing one larger than `limit`.
pub(crate) fn read_small_file(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > limit {
        return Err(Error::malformed(
            path,
            format!(
                "file is {} bytes, more than the {limit}-byte limit",
                meta.len()
            ),
        ));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let p = entry.path();
        if p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) fn has_ext(p: &Path, exts: &[&str]) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Extensions of pickled PyTorch checkpoints.
pub(crate) const PICKLE_EXTS: &[&str] = &["bin", "pth", "pt", "ckpt"];

/// Refusal of pickled PyTorch weights (`names`, found at `at`), with the commands that convert them.
pub(crate) fn pickled_weights_error(at: &Path, names: &[String]) -> Error {
    Error::Unsupported {
        path: at.to_path_buf(),
        msg: format!(
            "pickled PyTorch weights ({}) and no .safetensors: Tessera never unpickles (loading a pickle runs \
             arbitrary code). Convert with transformers: `python -c \"from transformers import \
             AutoModelForCausalLM as M; M.from_pretrained('MODEL_DIR').save_pretrained('OUT_DIR', \
             safe_serialization=True)\"` (copy the tokenizer files along), or to GGUF with llama.cpp's \
             convert_hf_to_gguf.py",
            names.join(", "),
        ),
    }
}

/// The error for a directory without safetensors: says how to convert pickles, or where GGUF files are.
fn no_safetensors_error(dir: &Path, listing: &[PathBuf]) -> Error {
    let names = |exts: &[&str]| -> Vec<String> {
        listing
            .iter()
            .filter(|p| has_ext(p, exts))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    };
    let pickles = names(PICKLE_EXTS);
    if !pickles.is_empty() {
        return pickled_weights_error(dir, &pickles);
    }
    let ggufs = names(&["gguf", "llamafile"]);
    if !ggufs.is_empty() {
        return Error::Unsupported {
            path: dir.to_path_buf(),
            msg: format!(
                "holds no .safetensors but GGUF files ({}): pass the .gguf file itself",
                ggufs.join(", ")
            ),
        };
    }
    Error::Missing {
        path: dir.to_path_buf(),
        key: format!("{SINGLE_FILE}, {INDEX_FILE} or any *.safetensors file"),
    }
}

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(test)]
mod tests;
