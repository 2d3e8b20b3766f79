//! The shard directory's `manifest.json`: what a coordinator and workers need to find, check and run the
//! shards without the source checkpoint — model config, tokenizer files, chat template, the shard plan, and
//! each file's size and checksum (xxh3-64, fast enough to verify a 200 GB set at disk speed).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::plan::ShardPlan;

pub const MANIFEST_NAME: &str = "manifest.json";
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Incremented when the layout changes incompatibly.
    pub format_version: u32,
    /// `shard-tool <version>`.
    pub created_by: String,
    pub source: SourceInfo,
    pub config: ModelConfig,
    /// Tokenizer material copied from the source: `tokenizer.gguf` (GGUF metadata only, no tensors) for GGUF
    /// sources, `tokenizer.json` / `tokenizer_config.json` for Hugging Face sources.
    pub tokenizer_files: Vec<FileEntry>,
    pub chat_template: Option<String>,
    pub plan: ShardPlan,
    pub shards: Vec<ShardFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Format as detected ("GGUF v3", "gguf-split (3 files)", "llamafile", "safetensors (2 files)" ...).
    pub format: String,
    pub paths: Vec<PathBuf>,
    pub bytes: u64,
}

/// A file in the shard directory, relative to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub bytes: u64,
    /// xxh3-64 of the whole file, lowercase hex.
    pub xxh3: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardFile {
    pub stage: usize,
    pub rank: usize,
    #[serde(flatten)]
    pub entry: FileEntry,
}

/// File name of the shard for (stage, rank).
pub fn shard_file_name(stage: usize, rank: usize) -> String {
    format!("stage{stage:02}-rank{rank:02}.gguf")
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_NAME);
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::malformed(&path, format!("invalid manifest: {e}")))?;
        if m.format_version != MANIFEST_VERSION {
            return Err(Error::Unsupported {
                path,
                msg: format!(
                    "manifest format_version {} (this shard-tool reads {MANIFEST_VERSION}); re-split with this version",
                    m.format_version
                ),
            });
        }
        Ok(m)
    }

    /// Writes `manifest.json` atomically (temporary name, then rename), so a directory either has a complete
    /// manifest or none.
    pub fn store(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_NAME);
        let tmp = dir.join(format!(".{MANIFEST_NAME}.tmp"));
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::malformed(&path, format!("cannot serialize manifest: {e}")))?;
        let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(())
    }

    pub fn shard(&self, stage: usize, rank: usize) -> Option<&ShardFile> {
        self.shards
            .iter()
            .find(|s| s.stage == stage && s.rank == rank)
    }
}
