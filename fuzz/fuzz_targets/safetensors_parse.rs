//! Fuzzes the safetensors header parser (<https://github.com/huggingface/safetensors#format>): any input
//! must give `Ok` or `Err`, never a panic, an overflow or an allocation sized by a length field.
//! `parse_bytes` runs the same checks as the mmap path (`read_header`) on an in-memory file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use shard_tool::safetensors::parse_bytes;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = parse_bytes(Path::new("fuzz.safetensors"), data) {
        // Whatever was accepted must lie inside the input.
        let data_len = data.len() as u64 - header.data_start;
        for e in &header.entries {
            assert!(e.begin <= e.end && e.end <= data_len, "{e:?}");
        }
    }
});
