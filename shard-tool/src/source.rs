//! A checkpoint's bytes as one logical, memory-mapped byte string.
//!
//! Users keep huge models as a single file, as byte-split pieces meant to be concatenated (llamafile releases
//! ship `….cat0`, `….cat1`, …), or inside a ZIP (llamafile). `ByteSource` maps each piece read-only and
//! presents them in order as one string, optionally restricted to a window (the stored `.gguf` inside a ZIP),
//! so readers never concatenate or extract anything on disk. A read that lies inside one piece is a borrowed
//! slice of the map (zero copy); only a read straddling two pieces is copied.

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};

struct Piece {
    path: PathBuf,
    map: Mmap,
    /// Offset of this piece's first byte in the concatenation of all pieces.
    start: u64,
    /// A mapping of a file (not anonymous memory): only then may its pages be dropped and re-read.
    file_backed: bool,
}

/// Read-only view of one or more files concatenated, possibly windowed.
pub struct ByteSource {
    pieces: Vec<Piece>,
    /// Window start in the concatenation.
    base: u64,
    len: u64,
}

impl ByteSource {
    /// Maps `paths` in the order given, as one logical file.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::malformed("<no input>", "no input file given"));
        }
        let mut pieces = Vec::with_capacity(paths.len());
        let mut start = 0u64;
        for path in paths {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            let meta = file.metadata().map_err(|e| Error::io(path, e))?;
            if meta.is_dir() {
                return Err(Error::malformed(path, "is a directory, expected a file"));
            }
            // SAFETY: the map is read-only; checkpoints are not modified while Tessera reads them (the same
            // contract llama.cpp's mmap loading relies on). A concurrent truncation would fault, not corrupt.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let len = map.len() as u64;
            pieces.push(Piece {
                path: path.clone(),
                map,
                start,
                file_backed: true,
            });
            start += len;
        }
        Ok(ByteSource {
            pieces,
            base: 0,
            len: start,
        })
    }

    /// A source over bytes held in memory (an anonymous read-only map), named `<memory>` in messages.
    /// For fuzzing and tests of the readers; real checkpoints go through [`ByteSource::open`].
    #[doc(hidden)]
    pub fn from_vec(bytes: Vec<u8>) -> Result<Self> {
        let path = PathBuf::from("<memory>");
        let mut map = memmap2::MmapMut::map_anon(bytes.len()).map_err(|e| Error::io(&path, e))?;
        map.copy_from_slice(&bytes);
        let map = map.make_read_only().map_err(|e| Error::io(&path, e))?;
        let len = map.len() as u64;
        Ok(ByteSource {
            pieces: vec![Piece {
                path,
                map,
                start: 0,
                file_backed: false,
            }],
            base: 0,
            len,
        })
    }

    /// Length of the (windowed) logical file.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first file, for messages.
    pub fn path(&self) -> &Path {
        &self.pieces[0].path
    }

    /// All files in order.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.pieces.iter().map(|p| p.path.as_path())
    }

    /// Number of files this source spans.
    pub fn piece_count(&self) -> usize {
        self.pieces.len()
    }

    /// Where the view starts in the concatenated files (non-zero for a GGUF stored inside a ZIP).
    pub fn window_start(&self) -> u64 {
        self.base
    }

    /// Restricts the view to `[offset, offset + len)` of the current view.
    pub fn window(mut self, offset: u64, len: u64) -> Result<Self> {
        self.check_range(offset, len, "window")?;
        self.base += offset;
        self.len = len;
        Ok(self)
    }

    fn check_range(&self, offset: u64, len: u64, what: &str) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::malformed(
                self.path(),
                format!(
                    "{what} at offset {offset} of length {len} runs past the end of the data ({} bytes): file truncated?",
                    self.len
                ),
            )),
        }
    }

    /// Bytes `[offset, offset + len)` of the view: borrowed when inside one piece, copied when straddling.
    pub fn read(&self, offset: u64, len: u64) -> Result<Cow<'_, [u8]>> {
        self.check_range(offset, len, "read")?;
        let abs = self.base + offset;
        let end = abs + len;
        let first = self.piece_index(abs);
        let p = &self.pieces[first];
        let piece_end = p.start + p.map.len() as u64;
        if end <= piece_end {
            let lo = (abs - p.start) as usize;
            return Ok(Cow::Borrowed(&p.map[lo..lo + len as usize]));
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = abs;
        for p in &self.pieces[first..] {
            if pos >= end {
                break;
            }
            let p_end = p.start + p.map.len() as u64;
            if p_end <= pos {
                continue;
            }
            let lo = (pos - p.start) as usize;
            let hi = (end.min(p_end) - p.start) as usize;
            out.extend_from_slice(&p.map[lo..hi]);
            pos = p.start + hi as u64;
        }
        Ok(Cow::Owned(out))
    }

    /// Index of the piece holding absolute byte `abs` (which must be < total length).
    fn piece_index(&self, abs: u64) -> usize {
        self.pieces
            .partition_point(|p| p.start + p.map.len() as u64 <= abs)
            .min(self.pieces.len() - 1)
    }

    /// Tells the kernel we are done with `[offset, offset + len)`: its pages leave this process's resident set
    /// (they stay in the page cache). Streaming `split` calls this so a checkpoint larger than RAM never
    /// accumulates in RSS.
    /// [`ByteSource::release`] for `bytes`, a slice this source handed out (borrowed from one of its maps);
    /// anything else is ignored.
    pub fn release_bytes(&self, bytes: &[u8]) {
        let addr = bytes.as_ptr() as usize;
        for p in self.pieces.iter().filter(|p| p.file_backed) {
            let base = p.map.as_ptr() as usize;
            if addr >= base && addr + bytes.len() <= base + p.map.len() {
                let abs = p.start + (addr - base) as u64;
                if let Some(offset) = abs.checked_sub(self.base) {
                    self.release(offset, bytes.len() as u64);
                }
                return;
            }
        }
    }

    pub fn release(&self, offset: u64, len: u64) {
        let abs = self.base + offset;
        let end = abs.saturating_add(len).min(self.base + self.len);
        for p in self.pieces.iter().filter(|p| p.file_backed) {
            let p_end = p.start + p.map.len() as u64;
            let lo = abs.max(p.start);
            let hi = end.min(p_end);
            if lo >= hi {
                continue;
            }
            // madvise needs a page-aligned start; round inwards so we never drop pages still in use.
            let page = 4096u64;
            let lo_rel = (lo - p.start).div_ceil(page) * page;
            let hi_rel = if hi == p_end {
                hi - p.start
            } else {
                (hi - p.start) / page * page
            };
            if lo_rel >= hi_rel {
                continue;
            }
            // SAFETY: DONTNEED on a read-only shared file mapping only drops this process's page-table
            // entries; later reads fault the pages back in from the file, so no borrowed slice can observe
            // changed bytes.
            let _ = unsafe {
                p.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    lo_rel as usize,
                    (hi_rel - lo_rel) as usize,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn reads_across_pieces_and_windows() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a", b"hello ");
        let b = write(dir.path(), "b", b"wor");
        let c = write(dir.path(), "c", b"ld!");
        let src = ByteSource::open(&[a, b, c]).unwrap();
        assert_eq!(src.len(), 12);
        assert!(matches!(src.read(0, 5).unwrap(), Cow::Borrowed(b"hello")));
        assert_eq!(&*src.read(4, 7).unwrap(), b"o world");
        assert_eq!(&*src.read(0, 12).unwrap(), b"hello world!");
        assert!(src.read(10, 3).is_err());
        let w = src.window(6, 5).unwrap();
        assert_eq!(&*w.read(0, 5).unwrap(), b"world");
        let err = w.read(1, 5).unwrap_err().to_string();
        assert!(err.contains("runs past the end"), "{err}");
        w.release(0, 5);
        assert_eq!(&*w.read(0, 5).unwrap(), b"world");
    }
}
