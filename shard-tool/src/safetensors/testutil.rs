//! Builders for hand-written safetensors files, shared by this module's and `hf`'s tests.

use std::path::{Path, PathBuf};

/// A file from a raw header string and data buffer.
pub fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A well-formed file: tensors `(name, dtype, row-major shape, bytes)` laid out back to back.
pub fn file(tensors: &[(&str, &str, &[u64], Vec<u8>)]) -> Vec<u8> {
    let mut header = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let (b, e) = (data.len(), data.len() + bytes.len());
        header.push_str(&format!(
            r#","{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{b},{e}]}}"#
        ));
        data.extend_from_slice(bytes);
    }
    header.push('}');
    // Pad like the reference writer does, to an 8-byte boundary with spaces.
    while (header.len() + 8) % 8 != 0 {
        header.push(' ');
    }
    raw(&header, &data)
}

/// `n` BF16 elements with distinct bit patterns starting at `seed`.
pub fn bf16s(n: u64, seed: u16) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (seed.wrapping_add(i as u16)).to_le_bytes())
        .collect()
}

pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}
