//! Unit tests of the GGUF reader, writer, split sets and model config. Hostile inputs are built byte by byte
//! with [`Raw`], which encodes whatever it is given without validation.

use std::fs;
use std::path::{Path, PathBuf};

use tessera_kernels::quant::GgmlType;

use super::*;
use crate::error::Error;

fn src(bytes: Vec<u8>) -> ByteSource {
    ByteSource::from_vec(bytes).unwrap()
}

fn parse(bytes: &[u8]) -> Result<GgufFile> {
    GgufFile::parse(&src(bytes.to_vec()))
}

fn parse_err(bytes: &[u8]) -> String {
    parse(bytes).expect_err("must be refused").to_string()
}

/// A GGUF encoder that writes anything, valid or not.
struct Raw {
    version: u32,
    kvs: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, u64)>,
    data_len: usize,
    alignment: usize,
}

impl Raw {
    fn new() -> Self {
        Raw {
            version: 3,
            kvs: vec![],
            tensors: vec![],
            data_len: 0,
            alignment: 32,
        }
    }
    fn kv(mut self, key: &str, v: Value) -> Self {
        let mut b = Vec::new();
        v.encode(&mut b);
        self.kvs.push((key.into(), v.value_type().id(), b));
        self
    }
    fn kv_raw(mut self, key: &str, ty: u32, bytes: &[u8]) -> Self {
        self.kvs.push((key.into(), ty, bytes.to_vec()));
        self
    }
    fn tensor(mut self, name: &str, shape: &[u64], ty: u32, offset: u64) -> Self {
        self.tensors.push((name.into(), shape.to_vec(), ty, offset));
        self
    }
    fn data(mut self, n: usize) -> Self {
        self.data_len = n;
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kvs {
            value::encode_str(&mut b, k);
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(v);
        }
        for (name, shape, ty, off) in &self.tensors {
            value::encode_str(&mut b, name);
            b.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            shape
                .iter()
                .for_each(|d| b.extend_from_slice(&d.to_le_bytes()));
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&off.to_le_bytes());
        }
        b.resize(
            b.len().next_multiple_of(self.alignment) + self.data_len,
            0xAB,
        );
        b
    }
}

fn every_value_type() -> Vec<(String, Value)> {
    let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        ("general.architecture".into(), "llama".into()),
        ("t.u8".into(), Value::U8(200)),
        ("t.i8".into(), Value::I8(-100)),
        ("t.u16".into(), Value::U16(60000)),
        ("t.i16".into(), Value::I16(-30000)),
        ("t.u32".into(), Value::U32(4_000_000_000)),
        ("t.i32".into(), Value::I32(-2_000_000_000)),
        ("t.f32".into(), Value::F32(1e-5)),
        ("t.bool".into(), Value::Bool(true)),
        ("t.string".into(), "héllo ✓ {{ chat }}".into()),
        ("t.empty_string".into(), "".into()),
        ("t.u64".into(), Value::U64(u64::MAX)),
        ("t.i64".into(), Value::I64(i64::MIN)),
        ("t.f64".into(), Value::F64(-0.125)),
        ("a.u8".into(), Array::U8(vec![1, 2, 255]).into()),
        ("a.i8".into(), Array::I8(vec![-1, 2]).into()),
        ("a.u16".into(), Array::U16(vec![65535]).into()),
        ("a.i16".into(), Array::I16(vec![-2, 3]).into()),
        ("a.u32".into(), Array::U32(vec![7, 8, 9]).into()),
        ("a.i32".into(), Array::I32(vec![1, 2, 3, -6]).into()),
        (
            "a.f32".into(),
            Array::F32(vec![0.5, -1.0, f32::INFINITY]).into(),
        ),
        ("a.bool".into(), Array::Bool(vec![true, false, true]).into()),
        (
            "a.string".into(),
            Array::String(strs(&["Ġthe", "", "<|eot_id|>"])).into(),
        ),
        ("a.u64".into(), Array::U64(vec![u64::MAX, 0]).into()),
        ("a.i64".into(), Array::I64(vec![i64::MIN]).into()),
        (
            "a.f64".into(),
            Array::F64(vec![std::f64::consts::PI]).into(),
        ),
        ("a.empty".into(), Array::F32(vec![]).into()),
        (
            "a.nested".into(),
            Array::Array(vec![
                Array::U32(vec![1, 2]),
                Array::String(strs(&["x"])),
                Array::Array(vec![Array::Bool(vec![]), Array::I64(vec![-1])]),
            ])
            .into(),
        ),
    ]
}

fn sample_tensors() -> Vec<(TensorDesc, Vec<u8>)> {
    let t = |name: &str, ty, shape: Vec<u64>| {
        let d = TensorDesc::new(name, ty, shape);
        let n = d.n_bytes().unwrap() as usize;
        let bytes = (0..n).map(|i| (i * 7 + name.len()) as u8).collect();
        (d, bytes)
    };
    vec![
        t("token_embd.weight", GgmlType::Q8_0, vec![64, 10]),
        t("blk.0.attn_norm.weight", GgmlType::F32, vec![64]),
        t("blk.0.attn_q.weight", GgmlType::Q4_0, vec![64, 3, 1, 2]),
        t("blk.0.ffn_down.weight", GgmlType::Q6_K, vec![256, 2]),
        t("blk.0.ffn_up.weight", GgmlType::BF16, vec![3, 5]),
        t("empty", GgmlType::F16, vec![0, 4]),
    ]
}

fn write_gguf(
    metadata: Vec<(String, Value)>,
    tensors: &[(TensorDesc, Vec<u8>)],
    alignment: u64,
) -> Vec<u8> {
    let descs = tensors.iter().map(|(d, _)| d.clone()).collect();
    let mut w = GgufWriter::new(Vec::new(), "<test>", metadata, descs, alignment).unwrap();
    for (d, bytes) in tensors {
        w.write_tensor(&d.name, bytes).unwrap();
    }
    let expected = w.total_size();
    let out = w.finish().unwrap();
    assert_eq!(out.len() as u64, expected);
    out
}

#[test]
fn roundtrip_every_value_type_and_tensor() {
    let tensors = sample_tensors();
    let bytes = write_gguf(every_value_type(), &tensors, SHARD_ALIGNMENT);
    if let Some(p) = std::env::var_os("TESSERA_GGUF_SAMPLE") {
        fs::write(p, &bytes).unwrap(); // for checking with gguf-py by hand
    }
    let s = src(bytes);
    let f = GgufFile::parse(&s).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 64);
    let mut expected = every_value_type();
    expected.push((KEY_ALIGNMENT.into(), Value::U32(64)));
    assert_eq!(f.metadata, expected);
    assert_eq!(f.data_offset % 64, 0);
    assert_eq!(f.tensors.len(), tensors.len());
    for (t, (d, data)) in f.tensors.iter().zip(&tensors) {
        assert_eq!(&t.desc, d);
        assert_eq!(t.size, data.len() as u64);
        assert_eq!(t.offset % 64, 0);
        assert_eq!(&*t.data(&s).unwrap(), &data[..]);
    }
    assert_eq!(f.get("t.u16"), Some(&Value::U16(60000)));
    assert_eq!(f.get("t.u16").unwrap().as_u64(), Some(60000));
    assert_eq!(f.get("t.i8").unwrap().as_u64(), None);
    assert_eq!(f.get("t.i8").unwrap().as_i64(), Some(-100));
    assert_eq!(f.get("t.f64").unwrap().as_f32(), Some(-0.125));
    assert_eq!(
        f.get("t.string").unwrap().as_str(),
        Some("héllo ✓ {{ chat }}")
    );
    let tokens = f.get("a.string").unwrap().as_array().unwrap();
    assert_eq!(tokens.as_strings().unwrap()[2], "<|eot_id|>");
    assert_eq!(tokens.len(), 3);
    assert_eq!(
        f.get("a.u32").unwrap().as_array().unwrap().to_u64s(),
        Some(vec![7, 8, 9])
    );
    assert!(f.tensor("blk.0.attn_q.weight").is_some() && f.tensor("nope").is_none());
}

#[test]
fn version_2_reads_like_3_and_others_are_refused() {
    let mut bytes = write_gguf(every_value_type(), &sample_tensors(), 32);
    bytes[4] = 2;
    let v2 = parse(&bytes).unwrap();
    bytes[4] = 3;
    let v3 = parse(&bytes).unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!((v2.metadata, v2.tensors), (v3.metadata, v3.tensors));
    for (version, needle) in [
        (1u32, "version 1"),
        (0x0300_0000, "big-endian"),
        (4, "version 4"),
        (0, "version is 0"),
    ] {
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        let err = parse_err(&bytes);
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = write_gguf(every_value_type(), &sample_tensors(), 32);
    let f = parse(&bytes).unwrap();
    let data_end = f.tensors.iter().map(|t| t.offset + t.size).max().unwrap() as usize;
    for n in 0..data_end {
        assert!(parse(&bytes[..n]).is_err(), "truncated to {n} bytes parsed");
    }
    assert!(parse(&bytes[..data_end]).is_ok());
    assert!(parse_err(&bytes[..100]).contains("truncated"));
}

#[test]
fn wrong_magic_and_refused_formats() {
    assert!(parse_err(b"").contains("too short"));
    assert!(parse_err(b"GGML\x03\0\0\0").contains("not a GGUF file"));
    let err = parse(b"\x80\x02}q\0").unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { .. }) && err.to_string().contains("pickle"),
        "{err}"
    );
}

#[test]
fn absurd_counts_and_lengths_are_refused_without_allocating() {
    let mut b = Raw::new().bytes();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(parse_err(&b).contains("tensor count"));
    let mut b = Raw::new().bytes();
    b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(parse_err(&b).contains("key-value count"));

    let long_string = (1u64 << 40).to_le_bytes();
    let err = parse_err(&Raw::new().kv_raw("general.name", 8, &long_string).bytes());
    assert!(
        err.contains("general.name") && err.contains("string length 1099511627776"),
        "{err}"
    );
    let mut huge_array = 8u32.to_le_bytes().to_vec();
    huge_array.extend_from_slice(&u64::MAX.to_le_bytes());
    let err = parse_err(
        &Raw::new()
            .kv_raw("tokenizer.ggml.tokens", 9, &huge_array)
            .bytes(),
    );
    assert!(
        err.contains("tokenizer.ggml.tokens") && err.contains("array of"),
        "{err}"
    );
    let mut key_len = Raw::new().bytes();
    key_len.truncate(24);
    key_len[16] = 1;
    key_len.extend_from_slice(&u64::MAX.to_le_bytes());
    key_len.extend_from_slice(&[0; 64]);
    assert!(parse_err(&key_len).contains("metadata entry #0: key"));
    let big_dims = Raw::new()
        .tensor("w", &[1 << 40, 1 << 40], 0, 0)
        .data(64)
        .bytes();
    assert!(parse_err(&big_dims).contains("too large"));
    // Empty, but the other dimensions multiply past 2^64 (found by fuzzing).
    let empty_big = Raw::new().tensor("w", &[0, 1 << 40, 1 << 40], 0, 0).bytes();
    assert!(parse_err(&empty_big).contains("too large"));
    let neg_dim = Raw::new().tensor("w", &[u64::MAX], 0, 0).bytes();
    assert!(parse_err(&neg_dim).contains("int64"));
}

#[test]
fn malformed_values() {
    let err = parse_err(&Raw::new().kv_raw("k", 13, &[0]).bytes());
    assert!(
        err.contains("`k`") && err.contains("unknown value type id 13"),
        "{err}"
    );
    assert!(parse_err(&Raw::new().kv_raw("k", 7, &[2]).bytes()).contains("bool byte"));
    let mut bad_utf8 = 2u64.to_le_bytes().to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    assert!(parse_err(&Raw::new().kv_raw("k", 8, &bad_utf8).bytes()).contains("UTF-8"));
    let mut deep = Vec::new();
    for _ in 0..40 {
        deep.extend_from_slice(&9u32.to_le_bytes());
        deep.extend_from_slice(&1u64.to_le_bytes());
    }
    assert!(parse_err(&Raw::new().kv_raw("deep", 9, &deep).bytes()).contains("nested"));
    let dup = Raw::new()
        .kv("a", Value::U8(1))
        .kv("a", Value::U8(2))
        .bytes();
    assert!(parse_err(&dup).contains("`a` appears twice"));
}

#[test]
fn alignment_must_be_a_power_of_two() {
    for bad in [
        Value::U32(0),
        Value::U32(48),
        Value::from("32"),
        Value::I32(-32),
    ] {
        let err = parse_err(&Raw::new().kv(KEY_ALIGNMENT, bad).bytes());
        assert!(err.contains("general.alignment"), "{err}");
    }
    let mut raw = Raw::new()
        .kv(KEY_ALIGNMENT, Value::U32(64))
        .tensor("w", &[16], 0, 0)
        .data(64);
    raw.alignment = 64;
    let f = parse(&raw.bytes()).unwrap();
    assert_eq!((f.alignment, f.data_offset % 64), (64, 0));
    let err = parse_err(&Raw::new().tensor("w", &[8], 0, 16).data(64).bytes());
    assert!(
        err.contains("`w`") && err.contains("not a multiple of the alignment 32"),
        "{err}"
    );
}

#[test]
fn tensor_infos_are_validated() {
    // Unsupported type: IQ2_XXS (id 16), named with the tensor.
    let err = parse(
        &Raw::new()
            .tensor("blk.0.ffn_up.weight", &[256], 16, 0)
            .data(256)
            .bytes(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Tensor { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("blk.0.ffn_up.weight") && msg.contains("IQ2_XXS"),
        "{msg}"
    );
    // Rows not a whole number of blocks.
    let err = parse(&Raw::new().tensor("q", &[30, 2], 2, 0).data(64).bytes()).unwrap_err();
    assert!(
        matches!(err, Error::Tensor { .. }) && err.to_string().contains("`q`"),
        "{err}"
    );
    // Past the end of the file.
    let err = parse_err(&Raw::new().tensor("w", &[16], 0, 0).data(63).bytes());
    assert!(err.contains("`w`") && err.contains("past the end"), "{err}");
    let err = parse_err(
        &Raw::new()
            .tensor("w", &[16], 0, u64::MAX - 31)
            .data(64)
            .bytes(),
    );
    assert!(err.contains("`w`"), "{err}");
    // Overlapping tensors (empty ones may sit anywhere).
    let overlap = Raw::new()
        .tensor("a", &[16], 0, 0)
        .tensor("b", &[8], 0, 32)
        .tensor("z", &[0], 0, 32)
        .data(96);
    let err = parse_err(&overlap.bytes());
    assert!(
        err.contains("`a`") && err.contains("`b`") && err.contains("overlap"),
        "{err}"
    );
    let ok = Raw::new()
        .tensor("a", &[8], 0, 0)
        .tensor("b", &[8], 0, 32)
        .tensor("z", &[0], 0, 32)
        .data(96);
    assert_eq!(parse(&ok.bytes()).unwrap().tensors.len(), 3);
    // Duplicates and dimensions.
    let err = parse_err(
        &Raw::new()
            .tensor("a", &[8], 0, 0)
            .tensor("a", &[8], 0, 32)
            .data(64)
            .bytes(),
    );
    assert!(err.contains("`a` appears twice"), "{err}");
    let err = parse_err(
        &Raw::new()
            .tensor("a", &[1, 1, 1, 1, 1], 0, 0)
            .data(32)
            .bytes(),
    );
    assert!(err.contains("5 dimensions"), "{err}");
}

#[test]
fn writer_checks_order_sizes_and_completeness() {
    let tensors = sample_tensors();
    let descs: Vec<TensorDesc> = tensors.iter().map(|(d, _)| d.clone()).collect();
    let mut w = GgufWriter::new(Vec::new(), "out.gguf", vec![], descs.clone(), 64).unwrap();
    assert!(
        w.write_tensor("blk.0.attn_norm.weight", &tensors[1].1)
            .unwrap_err()
            .to_string()
            .contains("expected tensor `token_embd.weight`")
    );
    assert!(
        w.write_tensor("token_embd.weight", &[0; 3])
            .unwrap_err()
            .to_string()
            .contains("3 bytes given")
    );
    let mut w = GgufWriter::new(Vec::new(), "out.gguf", vec![], descs.clone(), 64).unwrap();
    let (first, rest) = tensors[0].1.split_at(100);
    w.write_tensor_parts("token_embd.weight", [first, rest])
        .unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(
        err.contains("out.gguf") && err.contains("`blk.0.attn_norm.weight` and 4 more not written"),
        "{err}"
    );
    assert!(GgufWriter::new(Vec::new(), "o", vec![], descs, 48).is_err());
    let bad = vec![TensorDesc::new("q", GgmlType::Q4_K, vec![100])];
    assert!(matches!(
        GgufWriter::new(Vec::new(), "o", vec![], bad, 32),
        Err(Error::Tensor { .. })
    ));
}

fn tmp_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn byte_split_pieces_read_like_the_whole_file() {
    let tensors = sample_tensors();
    let bytes = write_gguf(every_value_type(), &tensors, 32);
    let dir = tempfile::tempdir().unwrap();
    let whole = GgufSet::open(&tmp_file(dir.path(), "m.gguf", &bytes)).unwrap();
    // Cuts inside the header, inside a string, and inside tensor data.
    let cuts = [0, 7, 301, bytes.len() - 200, bytes.len()];
    for (i, w) in cuts.windows(2).enumerate() {
        tmp_file(dir.path(), &format!("m.gguf.cat{i}"), &bytes[w[0]..w[1]]);
    }
    let pieces = byte_split_pieces(&dir.path().join("m.gguf.cat2"))
        .unwrap()
        .unwrap();
    assert_eq!(pieces.len(), 4);
    let split = GgufSet::open(&pieces[0]).unwrap();
    assert_eq!(split.pieces[0].source.piece_count(), 4);
    assert_eq!(split.metadata(), whole.metadata());
    assert_eq!(split.tensors, whole.tensors);
    for (a, b) in split.tensors.iter().zip(&whole.tensors) {
        assert_eq!(split.tensor_data(a).unwrap(), whole.tensor_data(b).unwrap());
    }
    assert!(
        byte_split_pieces(&dir.path().join("m.gguf"))
            .unwrap()
            .is_none()
    );
    let err = byte_split_pieces(&dir.path().join("x.gguf.cat1"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("x.gguf.cat0"), "{err}");
}

#[test]
fn gguf_split_sets_merge_and_name_missing_pieces() {
    let tensors = sample_tensors();
    let dir = tempfile::tempdir().unwrap();
    let groups = [&tensors[0..2], &tensors[2..3], &tensors[3..]];
    let write_set = |total: usize| {
        for (i, group) in groups.iter().enumerate() {
            let mut md = if i == 0 { every_value_type() } else { vec![] };
            md.push(("split.no".into(), Value::U16(i as u16)));
            md.push(("split.count".into(), Value::U16(3)));
            md.push(("split.tensors.count".into(), Value::I32(total as i32)));
            tmp_file(
                dir.path(),
                &format!("m-{:05}-of-00003.gguf", i + 1),
                &write_gguf(md, group, 32),
            );
        }
    };
    write_set(tensors.len());
    let set = GgufSet::open(&dir.path().join("m-00002-of-00003.gguf")).unwrap();
    assert_eq!(set.pieces.len(), 3);
    assert_eq!(set.get("t.u8"), Some(&Value::U8(200)));
    let names: Vec<&str> = set.tensors.iter().map(|t| t.desc.name.as_str()).collect();
    let expected: Vec<&str> = tensors.iter().map(|(d, _)| d.name.as_str()).collect();
    assert_eq!(names, expected);
    let down = set.tensor("blk.0.ffn_down.weight").unwrap();
    assert_eq!(down.piece, 2);
    assert_eq!(&*set.tensor_data(down).unwrap(), &tensors[3].1[..]);
    // Given out of order: sorted by split.no.
    let paths: Vec<PathBuf> = [3, 1, 2]
        .iter()
        .map(|i| dir.path().join(format!("m-{i:05}-of-00003.gguf")))
        .collect();
    assert_eq!(GgufSet::open_paths(&paths).unwrap().tensors, set.tensors);
    let err = GgufSet::open_paths(&paths[1..]).unwrap_err().to_string();
    assert!(err.contains("split piece"), "{err}");

    write_set(99);
    assert!(
        GgufSet::open(&paths[1])
            .unwrap_err()
            .to_string()
            .contains("split.tensors.count")
    );
    fs::remove_file(&paths[0]).unwrap();
    let err = GgufSet::open(&paths[1]).unwrap_err();
    assert!(
        matches!(err, Error::Missing { .. }) && err.to_string().contains("m-00003-of-00003.gguf"),
        "{err}"
    );
}

fn llama_metadata() -> Vec<(String, Value)> {
    let tokens: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
    vec![
        ("general.architecture".into(), "llama".into()),
        ("general.name".into(), "SmolLM2 135M".into()),
        ("llama.block_count".into(), Value::U32(30)),
        ("llama.context_length".into(), Value::U32(8192)),
        ("llama.embedding_length".into(), Value::U32(576)),
        ("llama.feed_forward_length".into(), Value::U32(1536)),
        ("llama.attention.head_count".into(), Value::U32(9)),
        ("llama.attention.head_count_kv".into(), Value::U32(3)),
        ("llama.rope.freq_base".into(), Value::F32(100000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.tokens".into(), Array::String(tokens).into()),
    ]
}

#[test]
fn model_config_reads_llama_keys_with_defaults() {
    let path = Path::new("m.gguf");
    let embd = TensorDesc::new("token_embd.weight", GgmlType::Q8_0, vec![576, 100]);
    let c = model_config_from(&llama_metadata(), [&embd], path).unwrap();
    assert_eq!(
        (c.n_vocab, c.n_embd, c.n_layer, c.n_head, c.n_head_kv),
        (100, 576, 30, 9, 3)
    );
    assert_eq!(
        (c.head_dim, c.rope_dim, c.n_ff, c.n_ctx_train),
        (64, 64, 1536, 8192)
    );
    assert_eq!(
        (c.rope_theta, c.rms_eps, c.tied_embeddings),
        (100000.0, 1e-5, true)
    );
    assert_eq!(c.name.as_deref(), Some("SmolLM2 135M"));
    let output = TensorDesc::new("output.weight", GgmlType::Q8_0, vec![576, 100]);
    assert!(
        !model_config_from(&llama_metadata(), [&embd, &output], path)
            .unwrap()
            .tied_embeddings
    );

    let without = |key: &str| {
        llama_metadata()
            .into_iter()
            .filter(|(k, _)| k != key)
            .collect::<Vec<_>>()
    };
    let c = model_config_from(&without("llama.attention.head_count_kv"), [], path).unwrap();
    assert_eq!(c.n_head_kv, 9);
    assert_eq!(
        model_config_from(&without("llama.rope.freq_base"), [], path)
            .unwrap()
            .rope_theta,
        10000.0
    );
    assert_eq!(
        model_config_from(&without("tokenizer.ggml.tokens"), [&embd], path)
            .unwrap()
            .n_vocab,
        100
    );
    let err = model_config_from(&without("llama.block_count"), [], path).unwrap_err();
    assert!(
        matches!(err, Error::Missing { .. }) && err.to_string().contains("llama.block_count"),
        "{err}"
    );
    let err = model_config_from(&without("tokenizer.ggml.tokens"), [], path).unwrap_err();
    assert!(err.to_string().contains("vocabulary size"), "{err}");

    let mut md = llama_metadata();
    md[0].1 = "qwen2".into();
    let err = model_config_from(&md, [], path).unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { .. }) && err.to_string().contains("qwen2"),
        "{err}"
    );
    let mut md = llama_metadata();
    md[7].1 = Value::U32(2); // 9 heads, 2 KV heads
    assert!(
        model_config_from(&md, [], path)
            .unwrap_err()
            .to_string()
            .contains("not a multiple")
    );
    let mut md = llama_metadata();
    md[6].1 = Value::U32(0);
    assert!(
        model_config_from(&md, [], path)
            .unwrap_err()
            .to_string()
            .contains("head_count is 0")
    );
    let mut md = llama_metadata();
    md[6].1 = Array::I32(vec![9, 9, 9]).into();
    assert_eq!(model_config_from(&md, [], path).unwrap().n_head, 9);
    md[6].1 = Array::I32(vec![9, 8]).into();
    assert!(
        model_config_from(&md, [], path)
            .unwrap_err()
            .to_string()
            .contains("differs between layers")
    );
    let mut md = llama_metadata();
    md.push(("llama.rope.scaling.type".into(), "yarn".into()));
    assert!(
        model_config_from(&md, [], path)
            .unwrap_err()
            .to_string()
            .contains("rope.scaling.type")
    );

    // Through a written file.
    let bytes = write_gguf(
        llama_metadata(),
        &[(embd.clone(), vec![0; 576 / 32 * 34 * 100])],
        32,
    );
    let f = parse(&bytes).unwrap();
    assert_eq!(model_config(&f, path).unwrap().n_vocab, 100);
}
