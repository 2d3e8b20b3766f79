//! Bad input through the `shard-tool` binary: a clear message naming the file and field, exit code 1, no
//! panic, and no partial output.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{assert_fails_with, assert_ok, fixtures, shard_tool};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

/// Splitting `input` must fail with `needles` and leave `out` without any shard-looking file.
fn split_fails(input: &Path, needles: &[&str]) {
    let out = tempfile::tempdir().unwrap();
    let o = shard_tool([
        Path::new("split"),
        input,
        Path::new("--tp"),
        Path::new("2"),
        Path::new("-o"),
        out.path(),
    ]);
    assert_fails_with(&o, needles);
    let left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "failed split left {left:?}");
}

#[test]
fn malformed_files_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixtures().join("gguf/tiny_llama.gguf")).unwrap();

    let p = write(dir.path(), "truncated.gguf", &good[..good.len() / 2]);
    split_fails(&p, &["truncated.gguf", "past the end"]);

    let p = write(dir.path(), "header_cut.gguf", &good[..20]);
    split_fails(&p, &["header_cut.gguf"]);

    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"GGML");
    let p = write(dir.path(), "magic.gguf", &bad);
    split_fails(&p, &["magic.gguf"]);

    let mut bad = good.clone();
    bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor_count
    let p = write(dir.path(), "count.gguf", &bad);
    split_fails(&p, &["count.gguf", "tensor"]);

    let p = write(dir.path(), "empty.gguf", b"");
    split_fails(&p, &["empty.gguf"]);

    let missing = dir.path().join("nope.gguf");
    split_fails(&missing, &["nope.gguf"]);
}

#[test]
fn unsupported_tensor_type_names_tensor_and_type() {
    let dir = tempfile::tempdir().unwrap();
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("gguf/tiny_llama.json")).unwrap())
            .unwrap();
    let mut bytes = std::fs::read(fixtures().join("gguf/tiny_llama.gguf")).unwrap();
    // Rewrite the type id of the first tensor info (name, n_dims, dims, then the u32 type) to 16 = IQ2_XXS.
    let name = spec["files"]["f32"]["tensors"][0]["name"].as_str().unwrap();
    let at = bytes
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .unwrap()
        + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty_at = at + 4 + 8 * n_dims;
    bytes[ty_at..ty_at + 4].copy_from_slice(&16u32.to_le_bytes());
    let p = write(dir.path(), "iq2.gguf", &bytes);
    split_fails(&p, &["iq2.gguf", name, "IQ2_XXS"]);
}

#[test]
fn pytorch_pickles_are_refused_with_how_to_convert() {
    let dir = tempfile::tempdir().unwrap();
    // A pickle protocol-2 stream header, as torch.save's legacy format starts.
    let p = write(
        dir.path(),
        "consolidated.00.pth",
        b"\x80\x02}q\x00(X\x03\x00\x00\x00abcq\x01.",
    );
    split_fails(&p, &["consolidated.00.pth", "convert"]);
    let hf = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("hf_tiny/config.json"),
        hf.path().join("config.json"),
    )
    .unwrap();
    write(hf.path(), "pytorch_model.bin", b"\x80\x02}q\x00.");
    split_fails(hf.path(), &["pytorch_model.bin", "convert"]);
}

#[test]
fn impossible_topologies_are_explained() {
    let model = fixtures().join("k_quants/tiny_llama_kq_q4_k.gguf");
    let o = shard_tool([Path::new("plan"), &model, Path::new("--tp"), Path::new("2")]);
    assert_fails_with(&o, &["attn_output", "256"]);
    let o = shard_tool([
        Path::new("plan"),
        &fixtures().join("gguf/tiny_llama.gguf"),
        Path::new("--pp"),
        Path::new("3"),
    ]);
    assert_fails_with(&o, &["layers"]);
}

#[test]
fn verify_detects_a_corrupted_shard() {
    let out = tempfile::tempdir().unwrap();
    let model = fixtures().join("gguf/tiny_llama.gguf");
    assert_ok(&shard_tool([
        Path::new("split"),
        &model,
        Path::new("--tp"),
        Path::new("2"),
        Path::new("-q"),
        Path::new("-o"),
        out.path(),
    ]));
    let shard = out.path().join("stage00-rank01.gguf");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    let o = shard_tool([Path::new("verify"), out.path(), Path::new("-q")]);
    assert_fails_with(&o, &["stage00-rank01.gguf", "xxh3"]);
}

/// A split killed half-way leaves no manifest and no file under a final shard name; the next run cleans
/// the temporaries up and produces a set that verifies.
#[test]
fn interrupted_split_leaves_nothing_valid() {
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model.gguf");
    assert_ok(&shard_tool([
        "synth",
        "--shape",
        "llama3-1b",
        "--layers",
        "2",
        "--quant",
        "Q8_0",
        "-q",
        "-o",
        model.to_str().unwrap(),
    ]));
    let out = work.path().join("shards");
    let mut child = Command::new(common::bin())
        .args([
            Path::new("split"),
            &model,
            Path::new("--tp"),
            Path::new("2"),
            Path::new("-q"),
            Path::new("-o"),
            &out,
        ])
        .spawn()
        .unwrap();
    // Kill as soon as the first temporary shard exists (or give up after the split ended by itself).
    let started = std::time::Instant::now();
    loop {
        let has_tmp = std::fs::read_dir(&out)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            })
            .unwrap_or(false);
        if has_tmp || started.elapsed().as_secs() > 30 || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "split finished before it could be interrupted; use a larger model"
    );
    {
        let names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n == "manifest.json"),
            "interrupted split left a manifest: {names:?}"
        );
        assert!(
            names
                .iter()
                .all(|n| n.starts_with('.') && n.ends_with(".tmp")),
            "non-temporary files: {names:?}"
        );
        let o = shard_tool([Path::new("verify"), &out]);
        assert_fails_with(&o, &["manifest.json"]);
    }
    assert_ok(&shard_tool([
        Path::new("split"),
        &model,
        Path::new("--tp"),
        Path::new("2"),
        Path::new("-q"),
        Path::new("-o"),
        &out,
    ]));
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.ends_with(".tmp")),
        "temporaries not cleaned: {names:?}"
    );
    assert_ok(&shard_tool([
        Path::new("verify"),
        &out,
        Path::new("-q"),
        Path::new("--source"),
        &model,
    ]));
}
