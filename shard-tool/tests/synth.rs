//! `shard-tool synth`: random-weight models of real shapes in every quant type, with a real tokenizer copied
//! in, that read back as the shape they claim and split/verify like any checkpoint.

use std::path::Path;

mod common;

use common::{assert_ok, fixtures, shard_tool, stdout};

#[test]
fn synth_every_type_reads_back_and_splits() {
    let dir = tempfile::tempdir().unwrap();
    for ty in [
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
        "Q5_K", "Q6_K",
    ] {
        let model = dir.path().join(format!("tiny-{ty}.gguf"));
        assert_ok(&shard_tool([
            Path::new("synth"),
            Path::new("--shape"),
            Path::new("tiny"),
            Path::new("--quant"),
            Path::new(ty),
            Path::new("-q"),
            Path::new("-o"),
            &model,
        ]));
        let o = shard_tool([Path::new("inspect"), &model]);
        assert_ok(&o);
        let text = stdout(&o);
        assert!(text.contains(&format!("{ty} ×")), "{ty}: {text}");
        assert!(text.contains("hidden size:     256"), "{text}");
        // tp=1: k-quant attn_output (256 columns) cannot be cut at head boundaries, but pp can split layers.
        let out = dir.path().join(format!("shards-{ty}"));
        assert_ok(&shard_tool([
            Path::new("split"),
            &model,
            Path::new("--pp"),
            Path::new("2"),
            Path::new("-q"),
            Path::new("-o"),
            &out,
        ]));
        assert_ok(&shard_tool([
            Path::new("verify"),
            &out,
            Path::new("-q"),
            Path::new("--source"),
            &model,
        ]));
    }
}

#[test]
fn synth_carries_a_real_tokenizer_and_llama31_rope_factors() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("l1b.gguf");
    let vocab = fixtures().join("gguf/tiny_llama.gguf");
    assert_ok(&shard_tool([
        Path::new("synth"),
        Path::new("--shape"),
        Path::new("llama3-1b"),
        Path::new("--layers"),
        Path::new("1"),
        Path::new("--quant"),
        Path::new("Q4_K"),
        Path::new("--tokenizer"),
        &vocab,
        Path::new("-q"),
        Path::new("-o"),
        &model,
    ]));
    let text = stdout(&shard_tool([Path::new("inspect"), &model]));
    assert!(text.contains("288 tokens"), "{text}");
    assert!(text.contains("vocabulary:      288"), "{text}");
    assert!(text.contains("rope_freqs.weight"), "{text}");
    assert!(text.contains("layers:          1"), "{text}");
}
