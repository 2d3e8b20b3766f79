//! Whole-checkpoint tests on hand-written tiny models (hidden 8, 2 query heads of 6, 1 KV head, FFN 10,
//! vocabulary 11, 2 layers): every dimension distinct so that a transposed shape cannot pass.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use tessera_kernels::quant::GgmlType;

use super::*;
use crate::safetensors::testutil::{bf16s, file, write};

const HIDDEN: u64 = 8;
const HEAD_DIM: u64 = 6;
const Q_ROWS: u64 = 12;
const KV_ROWS: u64 = 6;
const FF: u64 = 10;
const VOCAB: u64 = 11;

fn config_json(layers: u64, tied: bool) -> String {
    format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": {HIDDEN},
        "num_hidden_layers": {layers}, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": {HEAD_DIM},
        "intermediate_size": {FF}, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "vocab_size": {VOCAB},
        "rope_theta": 10000.0, "tie_word_embeddings": {tied}, "torch_dtype": "bfloat16"}}"#
    )
}

/// (HF name, row-major shape) of a complete untied 2-layer model, written out by hand.
fn hf_tensors(layers: u64) -> Vec<(String, Vec<u64>)> {
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN])];
    for n in 0..layers {
        let l = |s: &str| format!("model.layers.{n}.{s}");
        v.extend([
            (l("input_layernorm.weight"), vec![HIDDEN]),
            (l("self_attn.q_proj.weight"), vec![Q_ROWS, HIDDEN]),
            (l("self_attn.k_proj.weight"), vec![KV_ROWS, HIDDEN]),
            (l("self_attn.v_proj.weight"), vec![KV_ROWS, HIDDEN]),
            (l("self_attn.o_proj.weight"), vec![HIDDEN, Q_ROWS]),
            (l("post_attention_layernorm.weight"), vec![HIDDEN]),
            (l("mlp.gate_proj.weight"), vec![FF, HIDDEN]),
            (l("mlp.up_proj.weight"), vec![FF, HIDDEN]),
            (l("mlp.down_proj.weight"), vec![HIDDEN, FF]),
        ]);
    }
    v.push(("model.norm.weight".into(), vec![HIDDEN]));
    v.push(("lm_head.weight".into(), vec![VOCAB, HIDDEN]));
    v
}

/// Writes config.json and the tensors (BF16, distinct contents per tensor) as `n_files` shards with an
/// index (or one model.safetensors when `n_files` is 1).
fn write_model(dir: &Path, config: &str, tensors: &[(String, Vec<u64>)], n_files: usize) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    let with_data: Vec<(String, Vec<u64>, Vec<u8>)> = tensors
        .iter()
        .enumerate()
        .map(|(i, (n, s))| {
            (
                n.clone(),
                s.clone(),
                bf16s(s.iter().product(), (i * 1000) as u16),
            )
        })
        .collect();
    let per = with_data.len().div_ceil(n_files);
    let mut weight_map = serde_json::Map::new();
    for (k, chunk) in with_data.chunks(per).enumerate() {
        let name = if n_files == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n_files:05}.safetensors", k + 1)
        };
        let refs: Vec<(&str, &str, &[u64], Vec<u8>)> = chunk
            .iter()
            .map(|(n, s, d)| (n.as_str(), "BF16", s.as_slice(), d.clone()))
            .collect();
        write(dir, &name, &file(&refs));
        for (n, _, _) in chunk {
            weight_map.insert(n.clone(), name.clone().into());
        }
    }
    if n_files > 1 {
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        write(
            dir,
            "model.safetensors.index.json",
            index.to_string().as_bytes(),
        );
    }
}

fn hf_row(ck: &HfCheckpoint, hf_name: &str, row: u64) -> Vec<u8> {
    let t = ck.st.get(hf_name).unwrap();
    let all = ck.st.bytes(t).unwrap();
    let rb = (t.shape_rowmajor[1] * 2) as usize;
    all[row as usize * rb..(row as usize + 1) * rb].to_vec()
}

#[test]
fn opens_sharded_checkpoint_in_canonical_form() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &config_json(2, false), &hf_tensors(2), 3);
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    for ck in [
        HfCheckpoint::open(dir.path()).unwrap(),
        HfCheckpoint::open(&dir.path().join("model.safetensors.index.json")).unwrap(),
    ] {
        assert_eq!(ck.st.file_count(), 3);
        assert_eq!(ck.config.n_head_kv, 1);
        assert_eq!(
            ck.tokenizer.tokenizer_json,
            Some(dir.path().join("tokenizer.json"))
        );
        let names: Vec<&str> = ck.tensors.iter().map(|t| t.desc.name.as_str()).collect();
        assert_eq!(names.len(), 2 * 9 + 3);
        assert_eq!(
            &names[..3],
            [
                "token_embd.weight",
                "blk.0.attn_norm.weight",
                "blk.0.attn_q.weight"
            ]
        );
        assert_eq!(
            &names[names.len() - 3..],
            [
                "blk.1.ffn_down.weight",
                "output_norm.weight",
                "output.weight"
            ]
        );
        let q = ck.tensor("blk.1.attn_q.weight").unwrap();
        assert_eq!(
            (q.desc.ty, q.desc.shape.as_slice(), q.qk),
            (GgmlType::BF16, &[HIDDEN, Q_ROWS][..], Some(QkKind::Q))
        );
        assert_eq!(
            ck.tensor("blk.0.ffn_down.weight").unwrap().desc.shape,
            vec![FF, HIDDEN]
        );
        assert_eq!(
            ck.tensor("output_norm.weight").unwrap().desc.shape,
            vec![HIDDEN]
        );

        // Non-Q/K rows are borrowed from the map, unchanged.
        let up = ck.tensor("blk.0.ffn_up.weight").unwrap();
        let r = ck.rows(up, 2..5).unwrap();
        assert!(matches!(r, Cow::Borrowed(_)));
        let want: Vec<u8> = (2..5)
            .flat_map(|i| hf_row(&ck, "model.layers.0.mlp.up_proj.weight", i))
            .collect();
        assert_eq!(&*r, want.as_slice());

        // Q/K rows: within each head of 6, GGUF order takes HF rows 0, 3, 1, 4, 2, 5 (pairs interleaved).
        let head = [0, 3, 1, 4, 2, 5];
        let q_order: Vec<u64> = head
            .iter()
            .copied()
            .chain(head.iter().map(|r| r + 6))
            .collect();
        let gathered = |hf: &str, rows: &[u64]| -> Vec<u8> {
            rows.iter().flat_map(|&r| hf_row(&ck, hf, r)).collect()
        };
        let q_hf = "model.layers.1.self_attn.q_proj.weight";
        assert_eq!(&*ck.bytes(q).unwrap(), gathered(q_hf, &q_order).as_slice());
        assert_eq!(
            &*ck.rows(q, 4..8).unwrap(),
            gathered(q_hf, &q_order[4..8]).as_slice()
        );
        assert_eq!(ck.rows(q, 5..5).unwrap().len(), 0);
        let k = ck.tensor("blk.0.attn_k.weight").unwrap();
        assert_eq!(k.qk, Some(QkKind::K));
        assert_eq!(
            &*ck.bytes(k).unwrap(),
            gathered("model.layers.0.self_attn.k_proj.weight", &head).as_slice()
        );
        let e = ck.rows(k, 3..7).unwrap_err().to_string();
        assert!(
            e.contains("k_proj") && e.contains("rows 3..7 requested of 6"),
            "{e}"
        );
    }
}

#[test]
fn opens_single_file_and_ties_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = hf_tensors(1);
    tensors.pop(); // lm_head
    tensors.push((
        "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        vec![3],
    ));
    write_model(dir.path(), &config_json(1, true), &tensors, 1);
    let ck = HfCheckpoint::open(&dir.path().join("model.safetensors")).unwrap();
    assert!(ck.config.tied_embeddings);
    assert_eq!(
        ck.tensors.len(),
        9 + 2,
        "inv_freq skipped, no output.weight"
    );
    assert!(ck.tensor("output.weight").is_none());

    // Tied, yet an lm_head in the file: ignored, as transformers does.
    write_model(dir.path(), &config_json(1, true), &hf_tensors(1), 1);
    let ck = HfCheckpoint::open(dir.path()).unwrap();
    assert!(ck.tensor("output.weight").is_none());
}

fn open_err(config: &str, tensors: &[(String, Vec<u64>)]) -> Error {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), config, tensors, 2);
    HfCheckpoint::open(dir.path()).unwrap_err()
}

#[test]
fn refuses_incomplete_or_mismatched_tensors() {
    let mut t = hf_tensors(2);
    t.pop();
    let e = open_err(&config_json(2, false), &t);
    assert!(matches!(e, Error::Missing { .. }), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("model.safetensors.index.json") && e.contains("lm_head.weight"),
        "{e}"
    );
    assert!(e.contains("tie_word_embeddings false"), "{e}");

    let t: Vec<_> = hf_tensors(2)
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.down_proj.weight")
        .collect();
    let e = open_err(&config_json(2, false), &t).to_string();
    assert!(
        e.contains("missing tensor `model.layers.1.mlp.down_proj.weight` (blk.1.ffn_down.weight)"),
        "{e}"
    );

    let mut t = hf_tensors(2);
    t[2].1 = vec![HIDDEN, HIDDEN]; // layer 0 q_proj
    let e = open_err(&config_json(2, false), &t).to_string();
    assert!(
        e.contains(
            "`model.layers.0.self_attn.q_proj.weight` (blk.0.attn_q.weight) has shape [8, 8]"
        ),
        "{e}"
    );
    assert!(e.contains("implies [12, 8]"), "{e}");

    let mut t = hf_tensors(2);
    t.push(("model.layers.0.self_attn.q_proj.bias".into(), vec![Q_ROWS]));
    let e = open_err(&config_json(2, false), &t);
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("`model.layers.0.self_attn.q_proj.bias` is not part of a Llama model"),
        "{e}"
    );

    let e = open_err(&config_json(1, false), &hf_tensors(2)).to_string();
    assert!(
        e.contains("is for layer 1, but config.json has num_hidden_layers = 1"),
        "{e}"
    );

    // A config claiming absurdly many layers fails at the first missing tensor, without allocating for them.
    let e = open_err(&config_json(1 << 40, false), &hf_tensors(2)).to_string();
    assert!(
        e.contains("missing tensor `model.layers.2.input_layernorm.weight`"),
        "{e}"
    );
}

#[test]
fn refuses_missing_config_and_pickles() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), "{}", &hf_tensors(1), 1);
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = HfCheckpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, Error::Missing { .. }) && e.to_string().contains("missing config.json"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config_json(1, false)).unwrap();
    let bin = dir.path().join("pytorch_model.bin");
    std::fs::write(&bin, b"PK\x03\x04 pickled").unwrap();
    for e in [
        HfCheckpoint::open(dir.path()).unwrap_err(),
        HfCheckpoint::open(&bin).unwrap_err(),
    ] {
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        let e = e.to_string();
        assert!(
            e.contains("pytorch_model.bin")
                && e.contains("never unpickles")
                && e.contains("convert"),
            "{e}"
        );
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn load_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The Python-made fixtures (scripts/gen_fixtures.py; expectations from the `safetensors` and `gguf`
/// packages, never from Tessera): config, every tensor's location, and the canonical bytes, which must equal
/// `gguf/tiny_llama.gguf`'s (same weights, Q/K permuted by llama.cpp's converter; BF16 widened to F32).
#[test]
fn python_fixtures_match_the_reference_gguf() {
    let root = fixtures();
    if !root.join("hf_tiny.json").is_file() {
        eprintln!("tests/fixtures/hf_tiny.json absent (scripts/gen_fixtures.py): skipped");
        return;
    }
    let expect = load_json(&root.join("hf_tiny.json"));
    let gguf_json = load_json(&root.join("gguf/tiny_llama.json"));
    let f32_file = &gguf_json["files"]["f32"];
    let gguf = std::fs::read(root.join(f32_file["file"].as_str().unwrap())).unwrap();
    let gguf_tensor = |name: &str| -> &[u8] {
        let t = f32_file["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap();
        let (off, n) = (
            t["data_offset"].as_u64().unwrap() as usize,
            t["n_bytes"].as_u64().unwrap() as usize,
        );
        &gguf[off..off + n]
    };
    let dirs = expect["dirs"].as_object().unwrap();
    assert!(dirs.len() >= 5);
    for (dir_name, want) in dirs {
        let ck =
            HfCheckpoint::open(&root.join(dir_name)).unwrap_or_else(|e| panic!("{dir_name}: {e}"));
        let c = &want["config"];
        let n = |k: &str| c[k].as_u64().unwrap() as usize;
        let cfg = &ck.config;
        assert_eq!(
            (
                cfg.n_embd,
                cfg.n_ff,
                cfg.n_layer,
                cfg.n_head,
                cfg.n_head_kv,
                cfg.head_dim,
                cfg.n_vocab
            ),
            (
                n("hidden_size"),
                n("intermediate_size"),
                n("num_hidden_layers"),
                n("num_attention_heads"),
                n("num_key_value_heads"),
                n("head_dim"),
                n("vocab_size")
            ),
            "{dir_name}"
        );
        assert_eq!(cfg.n_ctx_train, n("max_position_embeddings"), "{dir_name}");
        assert_eq!(
            cfg.rope_theta,
            c["rope_theta"].as_f64().unwrap() as f32,
            "{dir_name}"
        );
        assert_eq!(
            cfg.rms_eps,
            c["rms_norm_eps"].as_f64().unwrap() as f32,
            "{dir_name}"
        );
        assert_eq!(
            cfg.tied_embeddings,
            c["tie_word_embeddings"].as_bool().unwrap(),
            "{dir_name}"
        );
        let scaling = cfg.rope_scaling.map(|s| {
            serde_json::json!({"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings})
        });
        assert_eq!(
            scaling.unwrap_or(serde_json::Value::Null),
            c["rope_scaling"],
            "{dir_name}"
        );
        assert_eq!(
            ck.tokenizer.chat_template.as_deref(),
            gguf_json["chat_template"].as_str(),
            "{dir_name}"
        );
        assert!(
            ck.tokenizer.tokenizer_json.is_some() && ck.tokenizer.tokenizer_config_json.is_some()
        );

        let tensors = want["tensors"].as_object().unwrap();
        assert_eq!(ck.st.tensors.len(), tensors.len(), "{dir_name}");
        assert_eq!(
            ck.tensors.len(),
            tensors.len(),
            "{dir_name}: one canonical tensor per HF tensor"
        );
        for (hf_name, w) in tensors {
            let st = ck
                .st
                .get(hf_name)
                .unwrap_or_else(|| panic!("{dir_name}: {hf_name}"));
            assert_eq!(st.ty.name(), w["dtype"].as_str().unwrap(), "{hf_name}");
            assert_eq!(
                serde_json::json!(st.shape_rowmajor),
                w["shape"],
                "{hf_name}"
            );
            assert_eq!(
                ck.st.file_path(st.file).file_name().unwrap().to_str(),
                w["file"].as_str(),
                "{hf_name}"
            );
            let (b, e) = (
                w["data_offsets"][0].as_u64().unwrap(),
                w["data_offsets"][1].as_u64().unwrap(),
            );
            assert_eq!(st.len, e - b, "{hf_name}");
            let gguf_name = w["gguf_name"].as_str().unwrap();
            let t = ck
                .tensor(gguf_name)
                .unwrap_or_else(|| panic!("{dir_name}: no {gguf_name}"));
            assert_eq!(ck.st.tensors[t.st_index].hf_name, *hf_name);
            let permute = w["permute"].as_str();
            assert_eq!(
                t.qk.map(|k| if k == QkKind::Q { "q" } else { "k" }),
                permute,
                "{hf_name}"
            );
            let bytes = ck.bytes(t).unwrap();
            let as_f32: Cow<[u8]> = match t.desc.ty {
                GgmlType::F32 => bytes,
                GgmlType::BF16 => bytes
                    .chunks_exact(2)
                    .flat_map(|h| [0, 0, h[0], h[1]])
                    .collect(),
                other => panic!("{hf_name}: {other:?}"),
            };
            assert!(
                as_f32 == gguf_tensor(gguf_name),
                "{dir_name}: {hf_name} differs from the GGUF's {gguf_name}"
            );
            // A row range cutting heads in the middle equals the same rows of the whole tensor.
            let rb = (t.desc.row_len() * t.desc.ty.type_size() as u64) as usize;
            let rows = t.desc.n_rows();
            if rows > 10 {
                let part = ck.rows(t, 3..rows - 5).unwrap();
                let whole = ck.bytes(t).unwrap();
                assert!(
                    *part == whole[3 * rb..(rows as usize - 5) * rb],
                    "{dir_name}: {hf_name} rows"
                );
            }
        }
    }
}
