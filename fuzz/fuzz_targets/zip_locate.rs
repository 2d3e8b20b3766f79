//! Arbitrary bytes as a llamafile/ZIP: finding the stored `.gguf` must return `Ok` or `Err`, never panic, and
//! an `Ok` range must lie inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shard_tool::llamafile::{is_zip, locate_gguf, read_central_directory};
use shard_tool::source::ByteSource;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = ByteSource::from_vec(data.to_vec()) else {
        return;
    };
    let _ = is_zip(&src);
    if let Ok(dir) = read_central_directory(&src) {
        for e in &dir.entries {
            assert!(e.local_header_offset < src.len());
        }
    }
    if let Ok((offset, len)) = locate_gguf(&src, None) {
        assert!(offset + len <= src.len());
    }
    let _ = shard_tool::pickle::detect_refused_format(src.path(), data);
});
