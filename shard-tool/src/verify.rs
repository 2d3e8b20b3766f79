//! `verify`: checks a shard directory against its manifest (every file's size and xxh3) and, given the
//! source checkpoint, that every tensor slice equals the source bytes.
//!
//! The source comparison deliberately does not reuse the splitter's chunk routing: it walks each shard
//! tensor row by row and maps every row back to the source with the plan's slice description alone, so a
//! routing bug in `split` cannot hide behind the same bug here.

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use xxhash_rust::xxh3::Xxh3;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gguf::{GgufSet, Value};
use crate::manifest::{FileEntry, Manifest};
use crate::plan::{Slice, TensorSlice};
use crate::split::progress_bar;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub files: usize,
    pub bytes: u64,
    /// Tensor slices compared with the source (0 without `--source`).
    pub tensors_compared: usize,
}

/// Rows compared per source read.
const ROWS_PER_READ: u64 = 4096;

fn mismatch(path: &Path, msg: String) -> Error {
    Error::malformed(path, msg)
}

/// Size and checksum of one file listed in the manifest.
fn check_file(dir: &Path, entry: &FileEntry, bar: &indicatif::ProgressBar) -> Result<()> {
    let path = dir.join(&entry.file);
    let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
    let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
    if len != entry.bytes {
        return Err(mismatch(
            &path,
            format!(
                "size {len} bytes, manifest says {}: truncated or replaced",
                entry.bytes
            ),
        ));
    }
    let mut hasher = Xxh3::new();
    if len > 0 {
        // SAFETY: read-only map of a file we only read; shards are not modified while verified.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        for chunk in map.chunks(16 << 20) {
            hasher.update(chunk);
            bar.inc(chunk.len() as u64);
        }
    }
    let got = format!("{:016x}", hasher.digest());
    if got != entry.xxh3 {
        return Err(mismatch(
            &path,
            format!("xxh3 {got}, manifest says {}: file corrupted", entry.xxh3),
        ));
    }
    Ok(())
}

/// Checks the size and xxh3 of one shard file, (stage, rank) of `dir`, against the manifest: what a worker
/// does before it serves that shard (reading every byte, which also warms the page cache).
pub fn verify_shard_file(dir: &Path, stage: usize, rank: usize, progress: bool) -> Result<()> {
    let manifest = Manifest::load(dir)?;
    let Some(shard) = manifest.shard(stage, rank) else {
        return Err(mismatch(
            &dir.join(crate::manifest::MANIFEST_NAME),
            format!("no file listed for stage {stage} rank {rank}"),
        ));
    };
    let bar = progress_bar(progress, shard.entry.bytes, "checksum");
    let result = check_file(dir, &shard.entry, &bar);
    bar.finish_and_clear();
    result
}

/// Verifies `dir`; with `source`, also every slice against the source checkpoint.
pub fn verify(dir: &Path, source: Option<&Checkpoint>, progress: bool) -> Result<VerifyReport> {
    let manifest = Manifest::load(dir)?;
    let mut report = VerifyReport::default();
    let entries: Vec<&FileEntry> = manifest
        .shards
        .iter()
        .map(|s| &s.entry)
        .chain(manifest.tokenizer_files.iter())
        .collect();
    let total = entries.iter().map(|e| e.bytes).sum();
    let bar = progress_bar(progress, total, "checksums");
    for entry in &entries {
        check_file(dir, entry, &bar)?;
        report.files += 1;
        report.bytes += entry.bytes;
    }
    bar.finish_and_clear();
    if manifest.shards.len() != manifest.plan.shards.len() {
        return Err(mismatch(
            &dir.join(crate::manifest::MANIFEST_NAME),
            format!(
                "{} shard files listed for {} planned shards",
                manifest.shards.len(),
                manifest.plan.shards.len()
            ),
        ));
    }

    if let Some(ckpt) = source {
        if ckpt.config != manifest.config {
            return Err(mismatch(
                ckpt.path(),
                "model config differs from the one in the manifest: not the checkpoint these shards came from".into(),
            ));
        }
        let total = manifest.plan.shards.iter().map(|s| s.bytes()).sum();
        let bar = progress_bar(progress, total, "comparing with source");
        for spec in &manifest.plan.shards {
            let Some(file) = manifest.shard(spec.stage, spec.rank) else {
                return Err(mismatch(
                    dir,
                    format!("no file for stage {} rank {}", spec.stage, spec.rank),
                ));
            };
            let path = dir.join(&file.entry.file);
            let shard = GgufSet::open_paths(std::slice::from_ref(&path))?;
            check_shard_keys(&shard, &path, spec.stage, spec.rank)?;
            if shard.tensors.len() != spec.tensors.len() {
                return Err(mismatch(
                    &path,
                    format!(
                        "{} tensors, the plan has {}",
                        shard.tensors.len(),
                        spec.tensors.len()
                    ),
                ));
            }
            for (slice, t) in spec.tensors.iter().zip(&shard.tensors) {
                if t.desc.name != slice.name || t.desc.ty != slice.ty || t.desc.shape != slice.shape
                {
                    return Err(mismatch(
                        &path,
                        format!(
                            "tensor `{}` {:?} {:?}: the plan has `{}` {:?} {:?}",
                            t.desc.name, t.desc.ty, t.desc.shape, slice.name, slice.ty, slice.shape
                        ),
                    ));
                }
                let bytes = shard.tensor_data(t)?;
                compare_slice(ckpt, slice, &bytes, &path)?;
                bar.inc(bytes.len() as u64);
                report.tensors_compared += 1;
            }
        }
        bar.finish_and_clear();
    }
    Ok(report)
}

fn check_shard_keys(shard: &GgufSet, path: &Path, stage: usize, rank: usize) -> Result<()> {
    for (key, want) in [("tessera.shard.stage", stage), ("tessera.shard.rank", rank)] {
        let got = shard.get(key).and_then(Value::as_u64);
        if got != Some(want as u64) {
            return Err(mismatch(
                path,
                format!("`{key}` is {got:?}, expected {want}"),
            ));
        }
    }
    Ok(())
}

/// Compares a shard tensor's bytes with the source, row by row.
fn compare_slice(ckpt: &Checkpoint, slice: &TensorSlice, shard: &[u8], path: &Path) -> Result<()> {
    let Some(index) = ckpt.position(&slice.name) else {
        return Err(mismatch(
            ckpt.path(),
            format!("source has no tensor `{}`", slice.name),
        ));
    };
    let src_desc = &ckpt.tensors[index];
    if src_desc.shape != slice.full_shape || src_desc.ty != slice.ty {
        return Err(mismatch(
            ckpt.path(),
            format!(
                "source tensor `{}` is {:?} {:?}, the plan expects {:?} {:?}",
                slice.name, src_desc.ty, src_desc.shape, slice.ty, slice.full_shape
            ),
        ));
    }
    let src_row = src_desc.row_bytes().map_err(|source| Error::Tensor {
        path: ckpt.path().to_owned(),
        tensor: slice.name.clone(),
        source,
    })? as usize;
    let elems_to_bytes = |e: u64| e as usize / slice.ty.block_size() * slice.ty.type_size();
    // Each shard row r is source row `row0 + r`, bytes [col0, col1) of it.
    let (row0, rows, col0, col1) = match slice.slice {
        Slice::Whole => (0, src_desc.n_rows(), 0, src_row),
        Slice::Rows { start, end } => (start, end - start, 0, src_row),
        Slice::Cols { start, end } => (
            0,
            src_desc.n_rows(),
            elems_to_bytes(start),
            elems_to_bytes(end),
        ),
    };
    let shard_row = col1 - col0;
    if shard.len() != shard_row * rows as usize {
        return Err(mismatch(
            path,
            format!(
                "tensor `{}` holds {} bytes, expected {}",
                slice.name,
                shard.len(),
                shard_row * rows as usize
            ),
        ));
    }
    let mut r = 0;
    while r < rows {
        let n = ROWS_PER_READ.min(rows - r);
        let src = ckpt.rows(index, row0 + r..row0 + r + n)?;
        for i in 0..n as usize {
            let want = &src[i * src_row + col0..i * src_row + col1];
            let at = (r as usize + i) * shard_row;
            if &shard[at..at + shard_row] != want {
                return Err(mismatch(
                    path,
                    format!(
                        "tensor `{}` row {} differs from source row {}",
                        slice.name,
                        r as usize + i,
                        row0 + r + i as u64
                    ),
                ));
            }
        }
        r += n;
    }
    Ok(())
}
