//! Arbitrary bytes as a GGUF file: parsing must return `Ok` or `Err`, never panic, overflow or allocate
//! without bound. Accepted files are also checked for the invariants the parser promises (tensor data inside
//! the file, aligned, non-overlapping) and the model config is derived, which must not panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shard_tool::gguf::{GgufFile, model_config};
use shard_tool::source::ByteSource;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = ByteSource::from_vec(data.to_vec()) else {
        return;
    };
    let Ok(file) = GgufFile::parse(&src) else {
        return;
    };
    assert!(file.alignment.is_power_of_two());
    assert_eq!(file.data_offset % file.alignment, 0);
    let mut ranges = Vec::new();
    for t in &file.tensors {
        assert!(t.offset + t.size <= src.len());
        assert_eq!((t.offset - file.data_offset) % file.alignment, 0);
        assert_eq!(t.desc.n_bytes().ok(), Some(t.size));
        assert_eq!(
            t.desc.row_bytes().ok().map(|r| r * t.desc.n_rows()),
            Some(t.size)
        );
        assert!(t.desc.n_elements() <= i64::MAX as u64);
        assert_eq!(t.data(&src).map(|d| d.len() as u64).ok(), Some(t.size));
        if t.size > 0 {
            ranges.push((t.offset, t.offset + t.size));
        }
    }
    ranges.sort();
    assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0));
    let _ = model_config(&file, src.path());
    for (_, v) in &file.metadata {
        let _ = v.to_string();
    }
});
