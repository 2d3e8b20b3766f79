//! The real SmolLM2-135M-Instruct GGUF (DESIGN.md §5, fetched by `scripts/fetch-smollm2.sh`): inspect, split
//! with uneven head groups, and verify against the source — also when the file is given as byte pieces.

use std::io::Write;
use std::path::Path;

mod common;

use common::{assert_ok, shard_tool, smollm2, stdout};

fn split_and_verify(model: &[&Path], tp: usize, pp: usize, verify_against: &[&Path]) {
    let out = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = vec!["split".into()];
    args.extend(model.iter().map(|p| p.display().to_string()));
    args.extend([
        "--tp".into(),
        tp.to_string(),
        "--pp".into(),
        pp.to_string(),
        "-q".into(),
        "-o".into(),
    ]);
    args.push(out.path().display().to_string());
    assert_ok(&shard_tool(&args));

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["shards"].as_array().unwrap().len(), tp * pp);
    assert!(
        manifest["chat_template"]
            .as_str()
            .unwrap()
            .contains("im_start"),
        "chat template travels"
    );
    assert_eq!(manifest["tokenizer_files"][0]["file"], "tokenizer.gguf");

    let mut args = vec![
        "verify".to_string(),
        out.path().display().to_string(),
        "-q".into(),
        "--source".into(),
    ];
    args.extend(verify_against.iter().map(|p| p.display().to_string()));
    let o = shard_tool(&args);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("tensor slices equal the source bytes"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn inspect_shows_the_real_hyperparameters() {
    let Some(model) = smollm2() else { return };
    let o = shard_tool([Path::new("inspect"), &model]);
    assert_ok(&o);
    let text = stdout(&o);
    for want in [
        "layers:          30",
        "heads:           9 (KV heads 3, head dim 64)",
        "hidden size:     576",
        "FFN size:        1536",
        "vocabulary:      49152",
        "rope:            base 100000",
        "tied (LM head = token_embd)",
        "Q4_1 ×210",
        "Q8_0 ×1",
        "pre-tokenizer smollm",
        "chat template:   present",
    ] {
        assert!(
            text.contains(want),
            "inspect output lacks `{want}`:\n{text}"
        );
    }
}

#[test]
fn split_tp3_pp2_verifies() {
    let Some(model) = smollm2() else { return };
    split_and_verify(&[&model], 3, 2, &[&model]);
}

#[test]
fn split_tp2_pp3_uneven_heads_verifies() {
    let Some(model) = smollm2() else { return };
    split_and_verify(&[&model], 2, 3, &[&model]);
}

#[test]
fn split_from_three_byte_pieces_verifies() {
    let Some(model) = smollm2() else { return };
    let bytes = std::fs::read(&model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Cuts inside the metadata and inside tensor data, as llamafile's `.catN` releases do at arbitrary bytes.
    let cuts = [0, 1_000_003, 55_555_555, bytes.len()];
    let mut pieces = Vec::new();
    for (i, w) in cuts.windows(2).enumerate() {
        let p = dir.path().join(format!("SmolLM2.gguf.cat{i}"));
        std::fs::File::create(&p)
            .unwrap()
            .write_all(&bytes[w[0]..w[1]])
            .unwrap();
        pieces.push(p);
    }
    let refs: Vec<&Path> = pieces.iter().map(|p| p.as_path()).collect();
    split_and_verify(&refs, 3, 2, &[&model]);
    split_and_verify(&refs[..1], 2, 3, &refs);
}
