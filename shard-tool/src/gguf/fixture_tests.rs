//! Checks the readers against the files gguf-py and Python's zipfile made (`scripts/gen_fixtures.py`, in
//! `tests/fixtures/`), with the expectations those libraries recorded in JSON. Skipped when the fixtures are
//! absent.

use std::path::{Path, PathBuf};

use serde_json::{Value as Json, json};

use super::*;

fn fixtures() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let present = dir.join("gguf/tiny_llama.json").is_file();
    if !present {
        eprintln!(
            "{} absent: skipping (make them with scripts/gen_fixtures.py)",
            dir.display()
        );
    }
    present.then_some(dir)
}

fn load_json(path: &Path) -> Json {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn open_file(path: &Path) -> (ByteSource, GgufFile) {
    let src = ByteSource::open(&[path.to_owned()]).unwrap();
    let f = GgufFile::parse(&src).unwrap_or_else(|e| panic!("{e}"));
    (src, f)
}

fn to_json(v: &Value) -> Json {
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::F32(x) => json!(f64::from(*x)),
        Value::Bool(x) => json!(x),
        Value::String(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F64(x) => json!(x),
        Value::Array(a) => Json::Array((0..a.len()).map(|i| to_json(&a.get(i).unwrap())).collect()),
    }
}

/// The chain of type names gguf-py records (`["ARRAY", "ARRAY", "INT32"]`).
fn type_chain(v: &Value) -> Vec<String> {
    let name = |t: ValueType| match t {
        ValueType::F32 => "FLOAT32".to_owned(),
        ValueType::F64 => "FLOAT64".to_owned(),
        t => t.name().to_uppercase(),
    };
    let mut chain = vec![name(v.value_type())];
    let mut cur = v.as_array();
    while let Some(a) = cur {
        chain.push(name(a.elem_type()));
        cur = a.as_arrays().and_then(|inner| inner.first());
    }
    chain
}

fn check_header(f: &GgufFile, expected: &Json, what: &str) {
    assert_eq!(json!(f.version), expected["version"], "{what}");
    assert_eq!(json!(f.tensors.len()), expected["tensor_count"], "{what}");
    assert_eq!(json!(f.alignment), expected["alignment"], "{what}");
    assert_eq!(json!(f.data_offset), expected["data_offset"], "{what}");
    if let Some(kvs) = expected["kv"].as_array() {
        for kv in kvs {
            let key = kv["key"].as_str().unwrap();
            let v = f.get(key).unwrap_or_else(|| panic!("{what}: no key {key}"));
            assert_eq!(to_json(v), kv["value"], "{what}: {key}");
            assert_eq!(json!(type_chain(v)), kv["types"], "{what}: {key}");
        }
    }
    if let Some(keys) = expected["kv_keys"].as_array() {
        let ours: Vec<Json> = f.metadata.iter().map(|(k, _)| json!(k)).collect();
        assert_eq!(&ours, keys, "{what}");
    }
    if let Some(tensors) = expected["tensors"].as_array() {
        for (t, e) in f.tensors.iter().zip(tensors) {
            assert_eq!(json!(t.desc.name), e["name"], "{what}");
            assert_eq!(
                json!(t.desc.ty.id()),
                e["type_id"],
                "{what}: {}",
                t.desc.name
            );
            assert_eq!(json!(t.desc.shape), e["shape"], "{what}: {}", t.desc.name);
            assert_eq!(json!(t.size), e["n_bytes"], "{what}: {}", t.desc.name);
            assert_eq!(
                json!(t.offset - f.data_offset),
                e["offset"],
                "{what}: {}",
                t.desc.name
            );
        }
    }
}

#[test]
fn python_written_files_read_as_gguf_py_reads_them() {
    let Some(dir) = fixtures() else { return };
    for name in ["metadata_all_types", "metadata_nested_arrays"] {
        let (_, f) = open_file(&dir.join(format!("gguf/{name}.gguf")));
        check_header(&f, &load_json(&dir.join(format!("gguf/{name}.json"))), name);
    }
    let tiny = load_json(&dir.join("gguf/tiny_llama.json"));
    let (src, f) = open_file(&dir.join("gguf/tiny_llama.gguf"));
    check_header(&f, &tiny["files"]["f32"], "tiny_llama");
    let (_, q8) = open_file(&dir.join("gguf/tiny_llama_q8_0.gguf"));
    check_header(&q8, &tiny["files"]["q8_0"], "tiny_llama_q8_0");
    let (_, v2) = open_file(&dir.join("gguf/tiny_llama_v2.gguf"));
    assert_eq!(
        (v2.version, &v2.metadata, &v2.tensors),
        (2, &f.metadata, &f.tensors)
    );

    let hp = &tiny["hparams"];
    let c = model_config(&f, src.path()).unwrap();
    assert_eq!(json!(c.n_layer), hp["block_count"]);
    assert_eq!(json!(c.n_embd), hp["embedding_length"]);
    assert_eq!(json!(c.n_ff), hp["feed_forward_length"]);
    assert_eq!(json!(c.n_head), hp["head_count"]);
    assert_eq!(json!(c.n_head_kv), hp["head_count_kv"]);
    assert_eq!(json!(c.head_dim), hp["head_dim"]);
    assert_eq!(json!(c.rope_dim), hp["rope_dimension_count"]);
    assert_eq!(json!(c.n_ctx_train), hp["context_length"]);
    assert_eq!(json!(c.n_vocab), hp["vocab_size"]);
    assert_eq!(json!(f64::from(c.rope_theta)), hp["rope_freq_base"]);
    assert_eq!(json!(f64::from(c.rms_eps)), hp["layer_norm_rms_epsilon"]);
    assert_eq!(json!(c.tied_embeddings), hp["tied_embeddings"]);
}

#[test]
fn python_made_splits_pieces_and_llamafiles_match_the_plain_file() {
    let Some(dir) = fixtures() else { return };
    let whole = GgufSet::open(&dir.join("gguf/tiny_llama.gguf")).unwrap();
    let same_tensors = |set: &GgufSet, what: &str| {
        assert_eq!(set.tensors.len(), whole.tensors.len(), "{what}");
        for (a, b) in set.tensors.iter().zip(&whole.tensors) {
            assert_eq!(a.desc, b.desc, "{what}");
            assert_eq!(
                set.tensor_data(a).unwrap(),
                whole.tensor_data(b).unwrap(),
                "{what}: {}",
                a.desc.name
            );
        }
    };

    let cat = GgufSet::open(&dir.join("cat/tiny_llama.gguf.cat0")).unwrap();
    assert_eq!(cat.metadata(), whole.metadata());
    same_tensors(&cat, "cat pieces");

    let split = load_json(&dir.join("split/split.json"));
    let set = GgufSet::open(&dir.join("split/tiny_llama-00003-of-00003.gguf")).unwrap();
    for (piece, e) in set.pieces.iter().zip(split["files"].as_array().unwrap()) {
        check_header(&piece.file, e, e["file"].as_str().unwrap());
    }
    same_tensors(&set, "gguf-split");
    assert_eq!(
        set.model_config().unwrap(),
        model_config(&whole.pieces[0].file, whole.path()).unwrap()
    );

    let archives = load_json(&dir.join("llamafile/archives.json"));
    for a in archives["archives"].as_array().unwrap() {
        let path = dir.join("llamafile").join(a["file"].as_str().unwrap());
        let src = ByteSource::open(std::slice::from_ref(&path)).unwrap();
        let (offset, len) = crate::llamafile::locate_gguf(&src, None).unwrap();
        assert_eq!(
            (json!(offset), json!(len)),
            (a["gguf_data_offset"].clone(), a["gguf_size"].clone()),
            "{path:?}"
        );
        let set = GgufSet::open(&path).unwrap();
        let plain = GgufSet::open(&dir.join(a["gguf_source"].as_str().unwrap())).unwrap();
        assert_eq!(set.metadata(), plain.metadata());
        for (x, y) in set.tensors.iter().zip(&plain.tensors) {
            assert_eq!(
                set.tensor_data(x).unwrap(),
                plain.tensor_data(y).unwrap(),
                "{path:?}: {}",
                x.desc.name
            );
        }
    }
}

/// SmolLM2-135M (scripts/fetch-smollm2.sh puts it in `$TESSERA_CACHE/models`): parses, has the documented
/// hyperparameters, and survives a rewrite with `GgufWriter` (alignment 64) unchanged. Set
/// `TESSERA_GGUF_COPY=PATH` to keep the rewritten file (e.g. to load it with llama.cpp). Skipped when absent.
#[test]
fn real_smollm2_round_trips_through_the_writer() {
    let cache = std::env::var_os("TESSERA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/tessera")));
    let Some(model) = cache
        .map(|c| c.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .filter(|p| p.is_file())
    else {
        eprintln!("SmolLM2 GGUF not cached: skipping");
        return;
    };
    let t0 = std::time::Instant::now();
    let set = GgufSet::open(&model).unwrap();
    eprintln!("parsed {} in {:?}", model.display(), t0.elapsed());
    let c = set.model_config().unwrap();
    assert_eq!(
        (
            c.n_layer,
            c.n_embd,
            c.n_ff,
            c.n_head,
            c.n_head_kv,
            c.head_dim
        ),
        (30, 576, 1536, 9, 3, 64)
    );
    assert_eq!(
        (c.n_vocab, c.rope_theta, c.tied_embeddings),
        (49152, 100000.0, true)
    );

    let out_path = std::env::var_os("TESSERA_GGUF_COPY").map(PathBuf::from);
    let dir = tempfile::tempdir().unwrap();
    let out_path = out_path.unwrap_or_else(|| dir.path().join("copy.gguf"));
    let descs = set.tensors.iter().map(|t| t.desc.clone()).collect();
    let out = std::io::BufWriter::new(std::fs::File::create(&out_path).unwrap());
    let mut w = GgufWriter::new(
        out,
        &out_path,
        set.metadata().to_vec(),
        descs,
        SHARD_ALIGNMENT,
    )
    .unwrap();
    for t in &set.tensors {
        w.write_tensor(&t.desc.name, &set.tensor_data(t).unwrap())
            .unwrap();
    }
    w.finish().unwrap();
    let copy = GgufSet::open(&out_path).unwrap();
    assert_eq!(copy.first().alignment, SHARD_ALIGNMENT);
    let mut expected = set.metadata().to_vec();
    if expected.iter().all(|(k, _)| k != KEY_ALIGNMENT) {
        expected.push((KEY_ALIGNMENT.into(), Value::U32(SHARD_ALIGNMENT as u32)));
    }
    assert_eq!(copy.metadata(), &expected[..]);
    for (a, b) in copy.tensors.iter().zip(&set.tensors) {
        assert_eq!(a.desc, b.desc);
        assert_eq!(copy.tensor_data(a).unwrap(), set.tensor_data(b).unwrap());
    }
}
