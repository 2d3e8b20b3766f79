//! The GGUF inside a llamafile: an executable (APE/ELF/PE/shell-script prefix) that is also a ZIP archive, with
//! the weights stored uncompressed as a `.gguf` entry, so they can be memory-mapped in place.
//!
//! Format reference: PKWARE APPNOTE.TXT (6.3.10), sections 4.3.6 (overall layout), 4.3.7 (local file
//! header), 4.3.12 (central directory header), 4.3.14–4.3.16 (ZIP64 end of central directory record, locator,
//! end of central directory record) and 4.5.3 (ZIP64 extended information extra field).
//!
//! Steps, all bounded:
//! 1. Find the end of central directory record (EOCD, `PK\5\6`) by scanning backwards over at most the last
//!    64 KiB + 22 bytes (the record plus the longest possible comment).
//! 2. When a field is saturated (`0xFFFF`/`0xFFFF_FFFF`) or a ZIP64 locator (`PK\6\7`) sits just before the
//!    EOCD, read the ZIP64 EOCD record (`PK\6\6`) for 64-bit entry count, directory size and offset.
//! 3. The central directory ends where the (ZIP64) EOCD record starts. The difference between where it
//!    actually starts and the offset the record claims is the length of a prefix that was prepended without
//!    rewriting offsets (`cat exe archive.zip`); it is added to every offset read from the archive. Tools that
//!    rewrite offsets (`zip -A`, llamafile's `zipalign`) give a difference of 0.
//! 4. Walk the central directory headers (`PK\1\2`), reading 64-bit sizes and offsets from the ZIP64 extra
//!    field when the 32-bit ones are saturated, and pick the `.gguf` entry.
//! 5. Read that entry's local header (`PK\3\4`, whose name and extra lengths may differ from the central
//!    directory's) to find where its data starts, and return a window of the source over it.

use crate::error::{Error, Result};
use crate::source::ByteSource;

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD_LEN: u64 = 22;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_LOCATOR_LEN: u64 = 20;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_EOCD_LEN: u64 = 56;
const CDH_SIG: u32 = 0x0201_4b50;
const CDH_LEN: usize = 46;
const LFH_SIG: u32 = 0x0403_4b50;
const LFH_LEN: u64 = 30;
const MAX_COMMENT: u64 = 0xffff;
/// Central directories larger than this are refused (a llamafile has a few hundred entries, ~30 KiB).
const MAX_CENTRAL_DIRECTORY: u64 = 64 << 20;

/// One file in the archive, with offsets already corrected for any prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipEntry {
    pub name: String,
    /// 0 = stored, 8 = deflate, ...
    pub method: u16,
    pub flags: u16,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// Absolute offset of the local file header in the source.
    pub local_header_offset: u64,
}

/// An archive's central directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipDirectory {
    pub entries: Vec<ZipEntry>,
    /// Bytes before the archive that its offsets do not count (0 when offsets are absolute).
    pub prefix_len: u64,
}

/// Whether `src` ends with a ZIP end of central directory record (cheap: reads at most 64 KiB + 22 bytes).
pub fn is_zip(src: &ByteSource) -> bool {
    matches!(find_eocd(src), Ok(Some(_)))
}

/// The GGUF stored in the llamafile (or plain ZIP) `src`, as a window of it. `entry` picks an entry by exact
/// name; by default the only `.gguf` entry (or, when there are several, the largest that is not an `mmproj`
/// vision projector).
pub fn open_gguf(src: ByteSource, entry: Option<&str>) -> Result<ByteSource> {
    let (offset, len) = locate_gguf(&src, entry)?;
    src.window(offset, len)
}

/// Offset and length of the stored GGUF in `src` (see [`open_gguf`]).
pub fn locate_gguf(src: &ByteSource, entry: Option<&str>) -> Result<(u64, u64)> {
    let path = src.path();
    let dir = read_central_directory(src)?;
    let is_gguf = |e: &&ZipEntry| e.name.to_ascii_lowercase().ends_with(".gguf");
    let chosen = match entry {
        Some(name) => {
            dir.entries
                .iter()
                .find(|e| e.name == name)
                .ok_or_else(|| Error::Missing {
                    path: path.to_owned(),
                    key: format!("archive entry `{name}`"),
                })?
        }
        None => {
            let ggufs: Vec<&ZipEntry> = dir.entries.iter().filter(is_gguf).collect();
            let main: Vec<&ZipEntry> = ggufs
                .iter()
                .copied()
                .filter(|e| !e.name.contains("mmproj"))
                .collect();
            let pool = if main.is_empty() { &ggufs } else { &main };
            pool.iter()
                .copied()
                .max_by_key(|e| e.uncompressed_size)
                .ok_or_else(|| Error::Missing {
                    path: path.to_owned(),
                    key: format!(
                        "`.gguf` entry in the ZIP archive ({} entries)",
                        dir.entries.len()
                    ),
                })?
        }
    };
    entry_data(src, chosen)
}

/// Offset and length of a stored (uncompressed, unencrypted) entry's data.
pub fn entry_data(src: &ByteSource, e: &ZipEntry) -> Result<(u64, u64)> {
    let path = src.path();
    if e.flags & 1 != 0 {
        return Err(Error::Unsupported {
            path: path.to_owned(),
            msg: format!("archive entry `{}` is encrypted", e.name),
        });
    }
    if e.method != 0 {
        return Err(Error::Unsupported {
            path: path.to_owned(),
            msg: format!(
                "archive entry `{}` is compressed (method {}); llamafiles store weights uncompressed so they can \
                 be memory-mapped. Extract it with `unzip {} '{}'` and pass the .gguf file",
                e.name,
                e.method,
                path.display(),
                e.name
            ),
        });
    }
    if e.compressed_size != e.uncompressed_size {
        return Err(Error::malformed(
            path,
            format!(
                "stored archive entry `{}`: sizes differ ({} vs {})",
                e.name, e.compressed_size, e.uncompressed_size
            ),
        ));
    }
    let what = format!("local header of archive entry `{}`", e.name);
    let lfh = src
        .read(e.local_header_offset, LFH_LEN)
        .map_err(|_| Error::malformed(path, format!("{what}: past the end of the file")))?;
    if le32(&lfh, 0) != LFH_SIG {
        return Err(Error::malformed(
            path,
            format!("{what}: no signature at offset {}", e.local_header_offset),
        ));
    }
    let (name_len, extra_len) = (u64::from(le16(&lfh, 26)), u64::from(le16(&lfh, 28)));
    let start = e.local_header_offset + LFH_LEN + name_len + extra_len;
    match start.checked_add(e.compressed_size) {
        Some(end) if end <= src.len() => Ok((start, e.compressed_size)),
        _ => Err(Error::malformed(
            path,
            format!(
                "archive entry `{}`: {} bytes at offset {start} run past the end of the file ({} bytes)",
                e.name,
                e.compressed_size,
                src.len()
            ),
        )),
    }
}

/// End of central directory as found: where the records are and what they say.
struct Eocd {
    /// Where the central directory ends (start of the ZIP64 EOCD record, or of the EOCD).
    cd_end: u64,
    entries: u64,
    cd_size: u64,
    cd_offset: u64,
}

/// Reads the central directory of the ZIP archive in `src`.
pub fn read_central_directory(src: &ByteSource) -> Result<ZipDirectory> {
    let path = src.path();
    let bad = |msg: String| Error::malformed(path, format!("ZIP archive: {msg}"));
    let eocd = find_eocd(src)?
        .ok_or_else(|| bad("no end of central directory record in the last 64 KiB".into()))?;
    if eocd.cd_size > MAX_CENTRAL_DIRECTORY {
        return Err(bad(format!(
            "central directory of {} bytes is larger than the 64 MiB accepted",
            eocd.cd_size
        )));
    }
    let cd_start = eocd.cd_end.checked_sub(eocd.cd_size).ok_or_else(|| {
        bad(format!(
            "central directory size {} is larger than the archive",
            eocd.cd_size
        ))
    })?;
    let prefix_len = cd_start.checked_sub(eocd.cd_offset).ok_or_else(|| {
        bad(format!(
            "central directory claims offset {} but ends at {} after {} bytes",
            eocd.cd_offset, eocd.cd_end, eocd.cd_size
        ))
    })?;
    let cd = src.read(cd_start, eocd.cd_size)?;
    let cap = eocd.entries.min(cd.len() as u64 / CDH_LEN as u64) as usize;
    let mut entries = Vec::with_capacity(cap);
    let mut pos = 0usize;
    for i in 0..eocd.entries {
        let rest = &cd[pos.min(cd.len())..];
        if rest.len() < CDH_LEN || le32(rest, 0) != CDH_SIG {
            return Err(bad(format!(
                "central directory entry #{i} of {} is missing or has no signature",
                eocd.entries
            )));
        }
        let (name_len, extra_len, comment_len) = (
            le16(rest, 28) as usize,
            le16(rest, 30) as usize,
            le16(rest, 32) as usize,
        );
        let total = CDH_LEN + name_len + extra_len + comment_len;
        if rest.len() < total {
            return Err(bad(format!(
                "central directory entry #{i} runs past the directory's end"
            )));
        }
        let name = String::from_utf8_lossy(&rest[CDH_LEN..CDH_LEN + name_len]).into_owned();
        let extra = &rest[CDH_LEN + name_len..CDH_LEN + name_len + extra_len];
        let mut compressed_size = u64::from(le32(rest, 20));
        let mut uncompressed_size = u64::from(le32(rest, 24));
        let mut local = u64::from(le32(rest, 42));
        apply_zip64_extra(
            extra,
            &mut [&mut uncompressed_size, &mut compressed_size, &mut local],
        )
        .map_err(|m| bad(format!("entry `{name}`: {m}")))?;
        let local_header_offset = local
            .checked_add(prefix_len)
            .filter(|&o| o < src.len())
            .ok_or_else(|| {
                bad(format!(
                    "entry `{name}`: local header offset {local} is past the end of the file"
                ))
            })?;
        entries.push(ZipEntry {
            name,
            method: le16(rest, 10),
            flags: le16(rest, 8),
            compressed_size,
            uncompressed_size,
            local_header_offset,
        });
        pos += total;
    }
    Ok(ZipDirectory {
        entries,
        prefix_len,
    })
}

/// Replaces each saturated (`0xFFFF_FFFF`) field, in APPNOTE order (uncompressed size, compressed size, local
/// header offset), with the next 8 bytes of the ZIP64 extended information extra field (id 0x0001).
fn apply_zip64_extra(
    mut extra: &[u8],
    fields: &mut [&mut u64; 3],
) -> std::result::Result<(), String> {
    if fields.iter().all(|f| **f != 0xffff_ffff) {
        return Ok(());
    }
    while extra.len() >= 4 {
        let (id, len) = (le16(extra, 0), le16(extra, 2) as usize);
        let body = extra
            .get(4..4 + len)
            .ok_or("extra field runs past its end")?;
        if id == 1 {
            let mut at = 0;
            for f in fields.iter_mut().filter(|f| ***f == 0xffff_ffff) {
                let bytes = body.get(at..at + 8).ok_or("ZIP64 extra field too short")?;
                **f = le64(bytes, 0);
                at += 8;
            }
            return Ok(());
        }
        extra = &extra[4 + len..];
    }
    Err("32-bit size or offset is 0xFFFFFFFF but there is no ZIP64 extra field".into())
}

/// Finds and decodes the EOCD (and ZIP64 records); `None` when there is no EOCD signature in the tail.
fn find_eocd(src: &ByteSource) -> Result<Option<Eocd>> {
    let path = src.path();
    let len = src.len();
    if len < EOCD_LEN {
        return Ok(None);
    }
    let tail_start = len.saturating_sub(EOCD_LEN + MAX_COMMENT);
    let tail = src.read(tail_start, len - tail_start)?;
    // The last signature whose comment length fits exactly; else the last one at all (trailing junk).
    let candidates = (0..=tail.len() - EOCD_LEN as usize)
        .rev()
        .filter(|&i| le32(&tail, i) == EOCD_SIG);
    let mut found = None;
    for i in candidates {
        let comment = u64::from(le16(&tail, i + 20));
        if i as u64 + EOCD_LEN + comment == tail.len() as u64 {
            found = Some(i);
            break;
        }
        found.get_or_insert(i);
    }
    let Some(i) = found else { return Ok(None) };
    let r = &tail[i..];
    let eocd_pos = tail_start + i as u64;
    let bad = |msg: String| Error::malformed(path, format!("ZIP archive: {msg}"));
    let (disk, cd_disk) = (le16(r, 4), le16(r, 6));
    let mut e = Eocd {
        cd_end: eocd_pos,
        entries: u64::from(le16(r, 10)),
        cd_size: u64::from(le32(r, 12)),
        cd_offset: u64::from(le32(r, 16)),
    };
    let saturated = disk == 0xffff
        || cd_disk == 0xffff
        || e.entries == 0xffff
        || e.cd_size == 0xffff_ffff
        || e.cd_offset == 0xffff_ffff;
    let locator = eocd_pos
        .checked_sub(ZIP64_LOCATOR_LEN)
        .map(|at| (at, src.read(at, ZIP64_LOCATOR_LEN)))
        .and_then(|(at, r)| {
            r.ok()
                .filter(|l| le32(l, 0) == ZIP64_LOCATOR_SIG)
                .map(|l| (at, le32(&l, 4), le64(&l, 8), le32(&l, 16)))
        });
    match locator {
        None if saturated => {
            return Err(bad(
                "end of central directory has saturated fields but no ZIP64 locator".into(),
            ));
        }
        None => {
            if disk != 0 || cd_disk != 0 {
                return Err(Error::Unsupported {
                    path: path.to_owned(),
                    msg: "multi-volume ZIP archives are not supported".into(),
                });
            }
        }
        Some((loc_pos, z_disk, z_off, n_disks)) => {
            if z_disk != 0 || n_disks > 1 {
                return Err(Error::Unsupported {
                    path: path.to_owned(),
                    msg: "multi-volume ZIP archives are not supported".into(),
                });
            }
            // The record is where the locator says (offsets absolute) or, with a prefix the offsets do not
            // count, right before the locator (a record without extensible data).
            let candidates = [Some(z_off), loc_pos.checked_sub(ZIP64_EOCD_LEN)];
            let record = candidates.into_iter().flatten().find_map(|at| {
                let r = src.read(at, ZIP64_EOCD_LEN).ok()?;
                let ends_in_place = at.checked_add(12)?.checked_add(le64(&r, 4))? <= loc_pos;
                (le32(&r, 0) == ZIP64_EOCD_SIG && ends_in_place).then_some((at, r))
            });
            let (at, r) = record.ok_or_else(|| {
                bad(format!(
                    "no ZIP64 end of central directory record at offset {z_off}"
                ))
            })?;
            if le32(&r, 16) != 0 || le32(&r, 20) != 0 {
                return Err(Error::Unsupported {
                    path: path.to_owned(),
                    msg: "multi-volume ZIP archives are not supported".into(),
                });
            }
            e = Eocd {
                cd_end: at,
                entries: le64(&r, 32),
                cd_size: le64(&r, 40),
                cd_offset: le64(&r, 48),
            };
        }
    }
    Ok(Some(e))
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// Whether a file's first bytes look like an executable or script that may carry a ZIP (APE `MZqFpD`, PE
/// `MZ`, ELF, `#!` shell script).
pub fn has_executable_prefix(head: &[u8]) -> bool {
    head.starts_with(b"MZ") || head.starts_with(b"\x7fELF") || head.starts_with(b"#!")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Entry<'a> {
        name: &'a str,
        data: &'a [u8],
        method: u16,
    }

    fn put16(b: &mut Vec<u8>, v: u16) {
        b.extend_from_slice(&v.to_le_bytes());
    }
    fn put32(b: &mut Vec<u8>, v: u32) {
        b.extend_from_slice(&v.to_le_bytes());
    }
    fn put64(b: &mut Vec<u8>, v: u64) {
        b.extend_from_slice(&v.to_le_bytes());
    }

    /// A ZIP after `prefix`. `absolute`: offsets count the prefix (as `zip -A` / zipalign leave them), else
    /// they are relative to the archive start (as `cat prefix archive.zip`). `zip64`: every size and offset
    /// saturated and given in ZIP64 extra fields and records.
    fn build_zip(
        prefix: &[u8],
        entries: &[Entry],
        zip64: bool,
        absolute: bool,
        comment: &[u8],
    ) -> Vec<u8> {
        let mut b = prefix.to_vec();
        let base = if absolute { 0 } else { prefix.len() as u64 };
        let off = |b: &Vec<u8>| b.len() as u64 - base;
        let sat32 = |v: u64| if zip64 { 0xffff_ffff } else { v as u32 };
        let mut locals = vec![];
        for e in entries {
            locals.push(off(&b));
            put32(&mut b, LFH_SIG);
            put16(&mut b, 45);
            put16(&mut b, 0);
            put16(&mut b, e.method);
            put32(&mut b, 0); // time, date
            put32(&mut b, 0); // crc (not checked)
            put32(&mut b, sat32(e.data.len() as u64));
            put32(&mut b, sat32(e.data.len() as u64));
            put16(&mut b, e.name.len() as u16);
            put16(&mut b, if zip64 { 20 } else { 3 });
            b.extend_from_slice(e.name.as_bytes());
            if zip64 {
                put16(&mut b, 1);
                put16(&mut b, 16);
                put64(&mut b, e.data.len() as u64);
                put64(&mut b, e.data.len() as u64);
            } else {
                b.extend_from_slice(b"pad"); // local extra differs from the central one
            }
            b.extend_from_slice(e.data);
        }
        let cd_start = off(&b);
        for (e, local) in entries.iter().zip(&locals) {
            put32(&mut b, CDH_SIG);
            put16(&mut b, 45);
            put16(&mut b, 45);
            put16(&mut b, 0);
            put16(&mut b, e.method);
            put32(&mut b, 0);
            put32(&mut b, 0);
            put32(&mut b, sat32(e.data.len() as u64));
            put32(&mut b, sat32(e.data.len() as u64));
            put16(&mut b, e.name.len() as u16);
            put16(&mut b, if zip64 { 4 + 8 + 4 + 24 } else { 0 });
            put16(&mut b, 0);
            put16(&mut b, 0);
            put16(&mut b, 0);
            put32(&mut b, 0);
            put32(&mut b, sat32(*local));
            b.extend_from_slice(e.name.as_bytes());
            if zip64 {
                put16(&mut b, 0x5455); // an unrelated extra field first
                put16(&mut b, 8);
                put64(&mut b, 0);
                put16(&mut b, 1);
                put16(&mut b, 24);
                put64(&mut b, e.data.len() as u64);
                put64(&mut b, e.data.len() as u64);
                put64(&mut b, *local);
            }
        }
        let cd_size = off(&b) - cd_start;
        let n = entries.len() as u64;
        if zip64 {
            let record = off(&b);
            put32(&mut b, ZIP64_EOCD_SIG);
            put64(&mut b, 44);
            put16(&mut b, 45);
            put16(&mut b, 45);
            put32(&mut b, 0);
            put32(&mut b, 0);
            put64(&mut b, n);
            put64(&mut b, n);
            put64(&mut b, cd_size);
            put64(&mut b, cd_start);
            put32(&mut b, ZIP64_LOCATOR_SIG);
            put32(&mut b, 0);
            put64(&mut b, record);
            put32(&mut b, 1);
        }
        put32(&mut b, EOCD_SIG);
        put32(&mut b, 0);
        let n16 = if zip64 { 0xffff } else { n as u16 };
        put16(&mut b, n16);
        put16(&mut b, n16);
        put32(&mut b, sat32(cd_size));
        put32(&mut b, sat32(cd_start));
        put16(&mut b, comment.len() as u16);
        b.extend_from_slice(comment);
        b
    }

    const GGUF: &[u8] = b"GGUF\x03\0\0\0 stand-in for a model";
    const APE: &[u8] = b"MZqFpD='\n\nexec ./llamafile \"$@\"\n";

    fn entries() -> Vec<Entry<'static>> {
        vec![
            Entry {
                name: ".args",
                data: b"-m\nmodel.gguf\n",
                method: 0,
            },
            Entry {
                name: "llava/mmproj.gguf",
                data: b"GGUF\x03\0\0\0 a much longer projector file....",
                method: 0,
            },
            Entry {
                name: "model.gguf",
                data: GGUF,
                method: 0,
            },
            Entry {
                name: "ggml-cuda.so",
                data: b"\x78\x9c compressed",
                method: 8,
            },
        ]
    }

    fn open(bytes: Vec<u8>, entry: Option<&str>) -> Result<Vec<u8>> {
        let w = open_gguf(ByteSource::from_vec(bytes)?, entry)?;
        Ok(w.read(0, w.len())?.into_owned())
    }

    #[test]
    fn finds_the_gguf_with_and_without_prefix_and_zip64() {
        for zip64 in [false, true] {
            for absolute in [false, true] {
                for prefix in [&b""[..], APE, b"\x7fELF\x02\x01\x01"] {
                    for comment in [&b""[..], b"PK\x05\x06 comment with a fake signature"] {
                        let zip = build_zip(prefix, &entries(), zip64, absolute, comment);
                        let case = format!(
                            "zip64 {zip64} absolute {absolute} prefix {} comment {}",
                            prefix.len(),
                            comment.len()
                        );
                        assert_eq!(open(zip.clone(), None).expect(&case), GGUF, "{case}");
                        let dir =
                            read_central_directory(&ByteSource::from_vec(zip).unwrap()).unwrap();
                        let expected_prefix = if absolute { 0 } else { prefix.len() as u64 };
                        assert_eq!(dir.prefix_len, expected_prefix, "{case}");
                        assert_eq!(dir.entries.len(), 4);
                    }
                }
            }
        }
    }

    #[test]
    fn refuses_compressed_missing_and_broken_archives() {
        let zip = build_zip(APE, &entries(), false, false, b"");
        let err = open(zip.clone(), Some("ggml-cuda.so"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("compressed") && err.contains("unzip"), "{err}");
        assert!(
            open(zip.clone(), Some("llava/mmproj.gguf"))
                .unwrap()
                .starts_with(b"GGUF")
        );
        let err = open(zip.clone(), Some("nope.gguf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.gguf"), "{err}");
        let no_gguf = build_zip(APE, &entries()[..1], false, false, b"");
        let err = open(no_gguf, None).unwrap_err().to_string();
        assert!(err.contains(".gguf` entry"), "{err}");
        let compressed = [Entry {
            name: "m.gguf",
            data: GGUF,
            method: 8,
        }];
        let err = open(build_zip(b"", &compressed, true, true, b""), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`m.gguf` is compressed"), "{err}");
        assert!(!is_zip(
            &ByteSource::from_vec(b"GGUF\x03\0\0\0".to_vec()).unwrap()
        ));

        // Every truncation and every single-byte corruption is an error or a result, never a panic.
        for zip64 in [false, true] {
            let zip = build_zip(APE, &entries(), zip64, false, b"");
            for n in 0..zip.len() {
                assert!(
                    open(zip[..n].to_vec(), None).is_err(),
                    "zip64 {zip64} cut at {n}"
                );
            }
            for i in 0..zip.len() {
                for v in [0x00, 0xff, 0x7f] {
                    let mut z = zip.clone();
                    z[i] = v;
                    let _ = open(z, None);
                }
            }
        }
    }

    #[test]
    fn comment_length_and_locator_bounds() {
        // EOCD found only in the last 64 KiB + 22 bytes: a longer trailer hides it.
        let mut zip = build_zip(b"", &entries(), false, true, b"");
        assert!(is_zip(&ByteSource::from_vec(zip.clone()).unwrap()));
        zip.extend(std::iter::repeat_n(0u8, 70_000));
        assert!(!is_zip(&ByteSource::from_vec(zip).unwrap()));
        // Saturated fields without a ZIP64 locator.
        let mut zip = build_zip(b"", &entries(), false, true, b"");
        let eocd = zip.len() - 22;
        zip[eocd + 16..eocd + 20].copy_from_slice(&[0xff; 4]);
        let err = open(zip, None).unwrap_err().to_string();
        assert!(err.contains("ZIP64 locator"), "{err}");
    }
}
