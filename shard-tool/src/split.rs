//! `split`: stream a checkpoint once, in file order, into one GGUF per (stage, rank) plus `manifest.json`.
//!
//! Memory stays bounded whatever the model size: tensors are read in row chunks of at most [`CHUNK_BYTES`]
//! straight from the memory map, each chunk is routed to every shard that holds part of it, and finished
//! source pages are released from the resident set. Every output is written under a temporary name
//! (`.NAME.tmp`), synced, and renamed only when all shards are complete; the manifest comes last. A crash
//! therefore leaves no manifest, and nothing that `verify` or a worker would take for a valid shard set.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use xxhash_rust::xxh3::Xxh3;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gguf::{GgufWriter, SHARD_ALIGNMENT, Value};
use crate::manifest::{
    FileEntry, MANIFEST_NAME, MANIFEST_VERSION, Manifest, ShardFile, SourceInfo, shard_file_name,
};
use crate::plan::{ShardPlan, ShardSpec, Slice};
use crate::tensor::TensorDesc;

/// Upper bound on the source bytes held (borrowed or copied) at once.
pub const CHUNK_BYTES: u64 = 32 << 20;
/// Output buffer per shard file.
const WRITE_BUFFER: usize = 4 << 20;
pub const TOKENIZER_GGUF: &str = "tokenizer.gguf";

#[derive(Debug, Clone)]
pub struct SplitOptions {
    pub out_dir: PathBuf,
    /// Replace an existing shard set in `out_dir`.
    pub force: bool,
    pub progress: bool,
}

/// A writer that hashes everything passing through it (the checksum costs no second read).
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: Xxh3,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Xxh3::new(),
            written: 0,
        }
    }

    /// (bytes written, xxh3 hex, inner writer).
    pub fn into_parts(self) -> (u64, String, W) {
        (
            self.written,
            format!("{:016x}", self.hasher.digest()),
            self.inner,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

type ShardWriter = GgufWriter<HashingWriter<BufWriter<File>>>;

/// An output file under its temporary name until [`PendingFile::commit`].
struct PendingFile {
    tmp: PathBuf,
    dest: PathBuf,
}

impl PendingFile {
    fn new(dir: &Path, name: &str) -> Self {
        PendingFile {
            tmp: dir.join(format!(".{name}.tmp")),
            dest: dir.join(name),
        }
    }

    fn create(&self) -> Result<File> {
        File::create(&self.tmp).map_err(|e| Error::io(&self.tmp, e))
    }

    fn commit(&self) -> Result<()> {
        fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))
    }
}

/// Finishes a GGUF writer: flushes, syncs, and returns the file's entry (size and checksum).
fn finish_file(writer: ShardWriter, pending: &PendingFile) -> Result<FileEntry> {
    let hashing = writer.finish()?;
    let (bytes, xxh3, buffered) = hashing.into_parts();
    let file = buffered
        .into_inner()
        .map_err(|e| Error::io(&pending.tmp, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(&pending.tmp, e))?;
    let name = pending
        .dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(FileEntry {
        file: name,
        bytes,
        xxh3,
    })
}

fn open_gguf_writer(
    pending: &PendingFile,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorDesc>,
) -> Result<ShardWriter> {
    let file = pending.create()?;
    let out = HashingWriter::new(BufWriter::with_capacity(WRITE_BUFFER, file));
    GgufWriter::new(out, &pending.dest, metadata, tensors, SHARD_ALIGNMENT)
}

/// Metadata of one shard: the model's keys plus where this shard sits in the topology.
fn shard_metadata(ckpt: &Checkpoint, plan: &ShardPlan, spec: &ShardSpec) -> Vec<(String, Value)> {
    let stage = &plan.stages[spec.stage];
    let u = |v: usize| Value::U32(v as u32);
    let mut md = ckpt.model_metadata();
    md.extend([
        ("tessera.shard.stage".into(), u(spec.stage)),
        ("tessera.shard.rank".into(), u(spec.rank)),
        ("tessera.shard.pp".into(), u(plan.topology.pp)),
        ("tessera.shard.tp".into(), u(plan.topology.tp)),
        ("tessera.shard.layer_start".into(), u(stage.layers.start)),
        ("tessera.shard.layer_end".into(), u(stage.layers.end)),
        ("tessera.shard.q_head_start".into(), u(spec.q_heads.start)),
        ("tessera.shard.q_head_end".into(), u(spec.q_heads.end)),
        ("tessera.shard.kv_head_start".into(), u(spec.kv_heads.start)),
        ("tessera.shard.kv_head_end".into(), u(spec.kv_heads.end)),
        ("tessera.shard.ffn_start".into(), u(spec.ffn_rows.start)),
        ("tessera.shard.ffn_end".into(), u(spec.ffn_rows.end)),
        ("tessera.shard.vocab_start".into(), u(spec.vocab_rows.start)),
        ("tessera.shard.vocab_end".into(), u(spec.vocab_rows.end)),
    ]);
    md
}

/// Prepares `dir`: refuses to overwrite a shard set unless `force`, removes what an earlier (possibly
/// interrupted) run left. The old manifest goes first, so the directory never looks valid half-way.
fn prepare_dir(dir: &Path, force: bool) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let manifest = dir.join(MANIFEST_NAME);
    if manifest.exists() {
        if !force {
            return Err(Error::Unsupported {
                path: dir.to_owned(),
                msg: "already holds a shard set (manifest.json); pass --force to replace it".into(),
            });
        }
        let old = Manifest::load(dir).ok();
        fs::remove_file(&manifest).map_err(|e| Error::io(&manifest, e))?;
        if let Some(old) = old {
            let names = old
                .shards
                .iter()
                .map(|s| &s.entry.file)
                .chain(old.tokenizer_files.iter().map(|f| &f.file));
            for name in names {
                let _ = fs::remove_file(dir.join(name));
            }
        }
    }
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Bytes of row-chunk `chunk` (rows `first..first + n`) that belong to `slice`, appended to `out` or borrowed.
fn route_chunk<'a>(
    desc: &TensorDesc,
    slice: &Slice,
    rows: std::ops::Range<u64>,
    chunk: &'a [u8],
    row_bytes: u64,
    scratch: &'a mut Vec<u8>,
) -> &'a [u8] {
    match *slice {
        Slice::Whole => chunk,
        Slice::Rows { start, end } => {
            let lo = start.max(rows.start);
            let hi = end.min(rows.end);
            if lo >= hi {
                return &[];
            }
            &chunk
                [((lo - rows.start) * row_bytes) as usize..((hi - rows.start) * row_bytes) as usize]
        }
        Slice::Cols { start, end } => {
            let block = desc.ty.block_size() as u64;
            let (c0, c1) = (
                (start / block) * desc.ty.type_size() as u64,
                (end / block) * desc.ty.type_size() as u64,
            );
            scratch.clear();
            for row in chunk.chunks_exact(row_bytes as usize) {
                scratch.extend_from_slice(&row[c0 as usize..c1 as usize]);
            }
            scratch
        }
    }
}

/// Splits `ckpt` according to `plan` into `opts.out_dir`. Returns the manifest written.
pub fn split(ckpt: &Checkpoint, plan: &ShardPlan, opts: &SplitOptions) -> Result<Manifest> {
    let dir = &opts.out_dir;
    prepare_dir(dir, opts.force)?;

    // Where each source tensor goes: (shard index, slice).
    let mut routes: HashMap<&str, Vec<(usize, &Slice)>> = HashMap::new();
    for (i, spec) in plan.shards.iter().enumerate() {
        for t in &spec.tensors {
            routes
                .entry(t.name.as_str())
                .or_default()
                .push((i, &t.slice));
        }
    }

    let mut pending = Vec::with_capacity(plan.shards.len());
    let mut writers = Vec::with_capacity(plan.shards.len());
    for spec in &plan.shards {
        let file = PendingFile::new(dir, &shard_file_name(spec.stage, spec.rank));
        let tensors = spec
            .tensors
            .iter()
            .map(|t| TensorDesc::new(t.name.clone(), t.ty, t.shape.clone()))
            .collect();
        writers.push(open_gguf_writer(
            &file,
            shard_metadata(ckpt, plan, spec),
            tensors,
        )?);
        pending.push(file);
    }

    let total: u64 = ckpt.tensors.iter().filter_map(|t| t.n_bytes().ok()).sum();
    let bar = progress_bar(opts.progress, total, "splitting");
    let mut scratch = Vec::new();
    for (index, desc) in ckpt.tensors.iter().enumerate() {
        let Some(targets) = routes.get(desc.name.as_str()) else {
            tracing::debug!(tensor = %desc.name, "not used by the plan");
            continue;
        };
        let row_bytes = desc.row_bytes().map_err(|source| Error::Tensor {
            path: ckpt.path().to_owned(),
            tensor: desc.name.clone(),
            source,
        })?;
        for &(shard, _) in targets {
            writers[shard].begin_tensor(&desc.name)?;
        }
        let rows_per_chunk = (CHUNK_BYTES / row_bytes.max(1)).max(1);
        let n_rows = desc.n_rows();
        let mut first = 0;
        while first < n_rows {
            let rows = first..(first + rows_per_chunk).min(n_rows);
            let chunk = ckpt.rows(index, rows.clone())?;
            for &(shard, slice) in targets {
                let part = route_chunk(desc, slice, rows.clone(), &chunk, row_bytes, &mut scratch);
                writers[shard].write_chunk(part)?;
            }
            bar.inc(chunk.len() as u64);
            drop(chunk);
            ckpt.release_rows(index, rows.clone());
            first = rows.end;
        }
        for &(shard, _) in targets {
            writers[shard].end_tensor()?;
        }
    }
    bar.finish_and_clear();

    let mut shards = Vec::with_capacity(writers.len());
    for ((writer, file), spec) in writers.into_iter().zip(&pending).zip(&plan.shards) {
        shards.push(ShardFile {
            stage: spec.stage,
            rank: spec.rank,
            entry: finish_file(writer, file)?,
        });
    }
    let tokenizer_files = write_tokenizer(ckpt, dir)?;
    for file in &pending {
        file.commit()?;
    }

    let manifest = Manifest {
        format_version: MANIFEST_VERSION,
        created_by: format!("shard-tool {}", env!("CARGO_PKG_VERSION")),
        source: SourceInfo {
            format: ckpt.format.clone(),
            paths: ckpt.paths.clone(),
            bytes: ckpt.source_bytes(),
        },
        config: ckpt.config.clone(),
        tokenizer_files,
        chat_template: ckpt.chat_template.clone(),
        plan: plan.clone(),
        shards,
    };
    manifest.store(dir)?;
    Ok(manifest)
}

/// Tokenizer material: GGUF sources get `tokenizer.gguf` (all source metadata, no tensors: a vocab-only GGUF
/// like llama.cpp's `ggml-vocab-*.gguf`); Hugging Face sources get their tokenizer files copied.
fn write_tokenizer(ckpt: &Checkpoint, dir: &Path) -> Result<Vec<FileEntry>> {
    let mut entries = Vec::new();
    if let Some(tok) = ckpt.tokenizer_metadata() {
        let pending = PendingFile::new(dir, TOKENIZER_GGUF);
        let mut md = ckpt.model_metadata();
        md.extend(tok);
        let writer = open_gguf_writer(&pending, md, Vec::new())?;
        entries.push(finish_file(writer, &pending)?);
        pending.commit()?;
    }
    for src in ckpt.tokenizer_files() {
        let Some(name) = src.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        let pending = PendingFile::new(dir, &name);
        let bytes = fs::read(&src).map_err(|e| Error::io(&src, e))?;
        let mut f = pending.create()?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(&pending.tmp, e))?;
        entries.push(FileEntry {
            file: name,
            bytes: bytes.len() as u64,
            xxh3: xxh3_hex(&bytes),
        });
        pending.commit()?;
    }
    Ok(entries)
}

pub fn xxh3_hex(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

pub fn progress_bar(enabled: bool, total: u64, what: &'static str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what);
    bar
}
