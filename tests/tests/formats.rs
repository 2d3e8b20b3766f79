//! Every input form users have, read through `Checkpoint::open`, checked against what the reference
//! libraries (gguf-py, safetensors, Python zipfile, llama.cpp's llama-quantize) recorded in
//! `tests/fixtures/*.json` — never against Tessera's own output.

use std::path::PathBuf;

use serde_json::Value as Json;
use shard_tool::checkpoint::Checkpoint;
use shard_tool::model_keys::llama3_rope_factors;
use tessera_kernels::quant::{GgmlType, dequantize_row};
use tessera_tests::{fixtures, read_f32};

fn json(rel: &str) -> Json {
    let path = fixtures().join(rel);
    serde_json::from_slice(
        &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

fn open(paths: &[PathBuf]) -> Checkpoint {
    Checkpoint::open(paths).unwrap_or_else(|e| panic!("{}: {e}", paths[0].display()))
}

fn f(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

/// All values of tensor `name`, dequantized.
fn values(ckpt: &Checkpoint, name: &str) -> Vec<f32> {
    let i = ckpt
        .position(name)
        .unwrap_or_else(|| panic!("{}: no tensor {name}", ckpt.path().display()));
    let desc = &ckpt.tensors[i];
    let bytes = ckpt.rows(i, 0..desc.n_rows()).unwrap();
    let mut out = vec![0f32; desc.n_elements() as usize];
    dequantize_row(desc.ty, &bytes, &mut out).unwrap();
    out
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

#[test]
fn tiny_llama_config_matches_gguf_py_hparams() {
    let h = json("gguf/tiny_llama.json")["hparams"].clone();
    let c = open(&[f("gguf/tiny_llama.gguf")]).config;
    assert_eq!(c.arch, h["architecture"].as_str().unwrap());
    assert_eq!(c.n_layer as u64, h["block_count"].as_u64().unwrap());
    assert_eq!(c.n_embd as u64, h["embedding_length"].as_u64().unwrap());
    assert_eq!(c.n_ff as u64, h["feed_forward_length"].as_u64().unwrap());
    assert_eq!(c.n_head as u64, h["head_count"].as_u64().unwrap());
    assert_eq!(c.n_head_kv as u64, h["head_count_kv"].as_u64().unwrap());
    assert_eq!(c.head_dim as u64, h["head_dim"].as_u64().unwrap());
    assert_eq!(
        c.rope_dim as u64,
        h["rope_dimension_count"].as_u64().unwrap()
    );
    assert_eq!(c.n_vocab as u64, h["vocab_size"].as_u64().unwrap());
    assert_eq!(c.n_ctx_train as u64, h["context_length"].as_u64().unwrap());
    assert_eq!(c.rope_theta, h["rope_freq_base"].as_f64().unwrap() as f32);
    assert_eq!(
        c.rms_eps,
        h["layer_norm_rms_epsilon"].as_f64().unwrap() as f32
    );
    assert_eq!(c.tied_embeddings, h["tied_embeddings"].as_bool().unwrap());
}

/// Each form of the same model yields the reference file's config and canonical tensors, byte for byte
/// (or value for value, for the BF16 Hugging Face copies of weights that are exact in bf16).
#[test]
fn every_input_form_reads_as_the_same_model() {
    let reference = open(&[f("gguf/tiny_llama.gguf")]);
    let q8_reference = open(&[f("gguf/tiny_llama_q8_0.gguf")]);
    let cat = |n: usize| f(&format!("cat/tiny_llama.gguf.cat{n}"));
    let split = |n: usize| f(&format!("split/tiny_llama-0000{n}-of-00003.gguf"));
    let forms: Vec<(&str, Vec<PathBuf>, &Checkpoint)> = vec![
        ("GGUF v2", vec![f("gguf/tiny_llama_v2.gguf")], &reference),
        (
            "byte pieces, all given",
            vec![cat(0), cat(1), cat(2)],
            &reference,
        ),
        ("byte pieces, first given", vec![cat(0)], &reference),
        ("gguf-split, first given", vec![split(1)], &reference),
        (
            "gguf-split, all given",
            vec![split(3), split(1), split(2)],
            &reference,
        ),
        ("llamafile", vec![f("llamafile/tiny.llamafile")], &reference),
        (
            "llamafile ZIP64",
            vec![f("llamafile/tiny_zip64.llamafile")],
            &q8_reference,
        ),
        ("HF single f32", vec![f("hf_tiny")], &reference),
        ("HF sharded bf16", vec![f("hf_tiny_sharded")], &reference),
        (
            "HF index file",
            vec![f("hf_tiny_sharded/model.safetensors.index.json")],
            &reference,
        ),
        (
            "HF safetensors file",
            vec![f("hf_tiny/model.safetensors")],
            &reference,
        ),
    ];
    for (what, paths, want) in forms {
        let got = open(&paths);
        assert_eq!(got.config.n_layer, want.config.n_layer, "{what}");
        let mut names: Vec<_> = got.tensors.iter().map(|t| t.name.clone()).collect();
        let mut want_names: Vec<_> = want.tensors.iter().map(|t| t.name.clone()).collect();
        names.sort();
        want_names.sort();
        assert_eq!(names, want_names, "{what}: tensor names");
        for t in &want.tensors {
            let g = &got.tensors[got.position(&t.name).unwrap()];
            assert_eq!(g.shape, t.shape, "{what}: {} shape", t.name);
            if g.ty == t.ty {
                let (gi, wi) = (
                    got.position(&t.name).unwrap(),
                    want.position(&t.name).unwrap(),
                );
                let a = got.rows(gi, 0..g.n_rows()).unwrap();
                let b = want.rows(wi, 0..t.n_rows()).unwrap();
                assert!(a == b, "{what}: {} bytes differ", t.name);
            } else {
                assert!(
                    bits_equal(&values(&got, &t.name), &values(want, &t.name)),
                    "{what}: {} values differ",
                    t.name
                );
            }
        }
    }
}

#[test]
fn tiny_llama_tensors_match_gguf_py_summaries() {
    let spec = json("gguf/tiny_llama.json");
    for (key, file) in [
        ("f32", "gguf/tiny_llama.gguf"),
        ("q8_0", "gguf/tiny_llama_q8_0.gguf"),
    ] {
        let ckpt = open(&[f(file)]);
        for t in spec["files"][key]["tensors"].as_array().unwrap() {
            let name = t["name"].as_str().unwrap();
            let v = values(&ckpt, name);
            let first8: Vec<f32> = t["first8"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            assert!(
                bits_equal(&v[..first8.len()], &first8),
                "{file} {name}: first values"
            );
            let sum: f64 = v.iter().map(|&x| x as f64).sum();
            let want = t["sum"].as_f64().unwrap();
            assert!(
                (sum - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{file} {name}: sum {sum} vs {want}"
            );
        }
    }
}

#[test]
fn dequantized_values_equal_gguf_py_for_every_type_it_writes() {
    let spec = json("gguf/types.json");
    let ckpt = shard_tool::gguf::GgufSet::open(&f("gguf/types.gguf")).unwrap();
    let tensors = spec["tensors"].as_array().unwrap();
    assert!(tensors.len() >= 8);
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let st = ckpt
            .tensor(name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        assert_eq!(st.desc.ty.name(), t["type"].as_str().unwrap(), "{name}");
        assert_eq!(
            st.offset,
            t["data_offset"].as_u64().unwrap(),
            "{name}: data offset"
        );
        let bytes = ckpt.tensor_data(st).unwrap();
        let mut got = vec![0f32; st.desc.n_elements() as usize];
        dequantize_row(st.desc.ty, &bytes, &mut got).unwrap();
        let want = read_f32(&f(&format!("gguf/{}", t["dequant_file"].as_str().unwrap())));
        assert!(
            bits_equal(&got, &want),
            "{name}: dequantized values differ from gguf.quants.dequantize"
        );
    }
}

#[test]
fn k_quants_from_llama_quantize_dequantize_like_gguf_py() {
    let spec = json("k_quants/k_quants.json");
    let files = spec["files"].as_array().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for file in files {
        let path = f(&format!("k_quants/{}", file["file"].as_str().unwrap()));
        let ckpt = open(std::slice::from_ref(&path));
        for d in file["dumps"].as_array().unwrap() {
            let name = d["tensor"].as_str().unwrap();
            let i = ckpt.position(name).unwrap();
            let desc = &ckpt.tensors[i];
            let ty = GgmlType::from_name(d["type"].as_str().unwrap()).unwrap();
            assert_eq!(desc.ty, ty, "{}: {name}", path.display());
            seen.insert(ty.name());
            let rows = d["rows"].as_u64().unwrap();
            let bytes = ckpt.rows(i, 0..rows).unwrap();
            let mut got = vec![0f32; (rows * d["row_len"].as_u64().unwrap()) as usize];
            dequantize_row(ty, &bytes, &mut got).unwrap();
            let want = read_f32(&path.with_file_name(d["file"].as_str().unwrap()));
            assert!(
                bits_equal(&got, &want),
                "{}: {name} differs from gguf.quants.dequantize",
                path.display()
            );
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    );
}

#[test]
fn hf_configs_llama31_v5_and_tied() {
    let spec = json("hf_tiny.json");
    for dir in [
        "hf_tiny",
        "hf_tiny_sharded",
        "hf_tiny_tied",
        "hf_tiny_llama31",
        "hf_tiny_v5",
    ] {
        let want = &spec["dirs"][dir]["config"];
        let c = open(&[f(dir)]).config;
        assert_eq!(
            c.rope_theta,
            want["rope_theta"].as_f64().unwrap() as f32,
            "{dir}"
        );
        assert_eq!(
            c.n_ctx_train as u64,
            want["max_position_embeddings"].as_u64().unwrap(),
            "{dir}"
        );
        assert_eq!(
            c.tied_embeddings,
            want["tie_word_embeddings"].as_bool().unwrap(),
            "{dir}"
        );
        match want["rope_scaling"].as_object() {
            None => assert!(c.rope_scaling.is_none(), "{dir}"),
            Some(s) => {
                let got = c
                    .rope_scaling
                    .unwrap_or_else(|| panic!("{dir}: no rope scaling"));
                assert_eq!(got.factor, s["factor"].as_f64().unwrap() as f32);
                assert_eq!(
                    got.low_freq_factor,
                    s["low_freq_factor"].as_f64().unwrap() as f32
                );
                assert_eq!(
                    got.high_freq_factor,
                    s["high_freq_factor"].as_f64().unwrap() as f32
                );
                assert_eq!(
                    got.original_max_position_embeddings as u64,
                    s["original_max_position_embeddings"].as_u64().unwrap()
                );
                // The factors llama.cpp's converter would store in rope_freqs.weight.
                let factors = llama3_rope_factors(&c).unwrap();
                let want: Vec<f64> = spec["llama3_rope_freqs"]["factors"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                assert_eq!(factors.len(), want.len(), "{dir}");
                for (g, w) in factors.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5,
                        "{dir}: rope factors {factors:?} vs {want:?}"
                    );
                }
            }
        }
    }
    let tied = open(&[f("hf_tiny_tied")]);
    assert!(tied.position("output.weight").is_none());
}
