//! Hand-written good and bad safetensors files: single, sharded, and every refusal.

use super::testutil::*;
use super::*;

fn open_bytes(bytes: &[u8]) -> Result<SafetensorsSet> {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "model.safetensors", bytes);
    SafetensorsSet::open_files(&[p])
}

fn err_of(bytes: &[u8]) -> String {
    let e = open_bytes(bytes).unwrap_err().to_string();
    // The in-memory parser must agree with the mapped one.
    let e2 = parse_bytes(Path::new("model.safetensors"), bytes)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e.rsplit_once(": ").map(|x| x.1),
        e2.rsplit_once(": ").map(|x| x.1)
    );
    e
}

#[test]
fn reads_single_file() {
    let w = bf16s(6, 100);
    let n = 7f32.to_le_bytes().repeat(3);
    let bytes = file(&[
        ("a.weight", "BF16", &[2, 3], w.clone()),
        ("norm", "F32", &[3], n.clone()),
    ]);
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), SINGLE_FILE, &bytes);
    let set = SafetensorsSet::open_dir(dir.path()).unwrap();
    assert_eq!(set.tensors.len(), 2);
    assert_eq!(
        set.metadata[0].get("format").map(String::as_str),
        Some("pt")
    );
    let a = set.get("a.weight").unwrap();
    assert_eq!(
        (a.ty, a.shape_rowmajor.as_slice(), a.shape_ggml()),
        (GgmlType::BF16, &[2, 3][..], vec![3, 2])
    );
    assert!(matches!(set.bytes(a).unwrap(), Cow::Borrowed(b) if b == w.as_slice()));
    assert_eq!(&*set.bytes(set.get("norm").unwrap()).unwrap(), n.as_slice());
    assert_eq!(
        parse_bytes(Path::new("x"), &bytes).unwrap().entries.len(),
        2
    );
}

#[test]
fn reads_sharded_set_via_index() {
    let dir = tempfile::tempdir().unwrap();
    let f1 = file(&[
        ("a", "F16", &[4], bf16s(4, 1)),
        ("b", "BF16", &[2, 2], bf16s(4, 9)),
    ]);
    let f2 = file(&[
        ("c", "F32", &[1], vec![0, 0, 128, 63]),
        ("extra", "F32", &[0], vec![]),
    ]);
    write(dir.path(), "model-00001-of-00002.safetensors", &f1);
    write(dir.path(), "model-00002-of-00002.safetensors", &f2);
    let index = r#"{"metadata": {"total_size": 20}, "weight_map": {
        "c": "model-00002-of-00002.safetensors",
        "a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}}"#;
    let idx = write(dir.path(), INDEX_FILE, index.as_bytes());
    for set in [
        SafetensorsSet::open_dir(dir.path()).unwrap(),
        SafetensorsSet::open_files(&[idx]).unwrap(),
    ] {
        assert_eq!(set.file_count(), 2);
        assert_eq!(
            set.tensors.len(),
            4,
            "tensors missing from the index are kept"
        );
        let c = set.get("c").unwrap();
        assert_eq!(c.file, 1);
        assert_eq!(&*set.bytes(c).unwrap(), &[0, 0, 128, 63]);
        assert_eq!(
            &*set.bytes(set.get("b").unwrap()).unwrap(),
            bf16s(4, 9).as_slice()
        );
        assert!(set.index.is_some());
    }
}

#[test]
fn index_errors_name_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "one.safetensors",
        &file(&[("a", "F32", &[1], vec![0; 4])]),
    );
    let idx = |body: &str| {
        write(dir.path(), INDEX_FILE, body.as_bytes());
        SafetensorsSet::open_dir(dir.path())
            .unwrap_err()
            .to_string()
    };
    let e = idx(r#"{"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}"#);
    assert!(
        e.contains(INDEX_FILE)
            && e.contains("missing weight file `two.safetensors`")
            && e.contains("`b`"),
        "{e}"
    );
    let e = idx(r#"{"weight_map": {"a": "one.safetensors", "q": "one.safetensors"}}"#);
    assert!(
        e.contains("tensor `q`") && e.contains("`one.safetensors`, which does not hold it"),
        "{e}"
    );
    let e = idx(r#"{"weight_map": {"a": "../one.safetensors"}}"#);
    assert!(e.contains("inside the checkpoint directory"), "{e}");
    let e = idx(r#"{"metadata": {}}"#);
    assert!(e.contains("missing weight_map"), "{e}");
    let e = idx(r#"{"weight_map": {"a": "one.safetensors", "a": "one.safetensors"}}"#);
    assert!(e.contains("lists tensor `a` twice"), "{e}");
    let e = idx("{ not json");
    assert!(e.contains("not valid JSON"), "{e}");
}

#[test]
fn same_tensor_in_two_files_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(
        dir.path(),
        "a.safetensors",
        &file(&[("x", "F32", &[1], vec![0; 4])]),
    );
    let b = write(
        dir.path(),
        "b.safetensors",
        &file(&[("x", "F32", &[1], vec![0; 4])]),
    );
    let e = SafetensorsSet::open_files(&[a, b]).unwrap_err().to_string();
    assert!(
        e.contains("b.safetensors") && e.contains("`x` is also in") && e.contains("a.safetensors"),
        "{e}"
    );
}

#[test]
fn refuses_truncated_and_bad_lengths() {
    let good = file(&[("a", "F32", &[2], vec![0; 8])]);
    let e = err_of(b"");
    assert!(e.contains("file is 0 bytes"), "{e}");
    let e = err_of(&good[..5]);
    assert!(e.contains("too short for the 8-byte header length"), "{e}");
    let e = err_of(&good[..good.len() - 1]);
    assert!(
        e.contains("tensor `a`") && e.contains("run past the end of the data"),
        "{e}"
    );
    let mut past = good.clone();
    past[..8].copy_from_slice(&10_000u64.to_le_bytes());
    let e = err_of(&past);
    assert!(e.contains("header length 10000 runs past the end"), "{e}");
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let e = err_of(&huge);
    assert!(e.contains("exceeds the 100000000-byte limit"), "{e}");
    let e = err_of(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n");
    assert!(e.contains("Git LFS pointer"), "{e}");
}

#[test]
fn refuses_bad_json_and_entries() {
    let cases: &[(&str, &[u8], &str)] = &[
        ("{\"a\": ", b"", "not valid JSON"),
        ("[1, 2]", b"", "does not start with `{`"),
        (
            "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, \"a\": 1}",
            &[0; 4],
            "`a` twice",
        ),
        (
            r#"{"a": {"shape": [1], "data_offsets": [0, 4]}}"#,
            &[0; 4],
            "tensor `a`: no `dtype`",
        ),
        (
            r#"{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#,
            &[0; 4],
            "not a non-negative",
        ),
        (
            r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}"#,
            &[0; 4],
            "begin is after end",
        ),
        (
            r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}"#,
            &[0; 4],
            "run past the end",
        ),
        (
            r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}"#,
            &[0; 4],
            "array [begin, end]",
        ),
        (
            r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}"#,
            &[0; 4],
            "needs 8",
        ),
        (
            r#"{"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}}"#,
            &[0; 4],
            "overflows",
        ),
        (
            r#"{"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}"#,
            &[0],
            "unknown dtype `Q4`",
        ),
        (
            r#"{"__metadata__": {"x": 1}}"#,
            b"",
            "`__metadata__.x` must be a string",
        ),
        (
            r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#,
            &[0; 8],
            "`a` (data_offsets [0, 8]) and `b` ([4, 8]) overlap",
        ),
    ];
    for (header, data, want) in cases {
        let e = err_of(&raw(header, data));
        assert!(
            e.contains(want) && e.contains("model.safetensors"),
            "{header}: {e}"
        );
    }
}

#[test]
fn refuses_unsupported_dtype_naming_tensor() {
    for dtype in ["I8", "F8_E4M3", "F64"] {
        let header =
            format!(r#"{{"w": {{"dtype": "{dtype}", "shape": [0], "data_offsets": [0, 0]}}}}"#);
        let e = open_bytes(&raw(&header, b"")).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        let e = e.to_string();
        assert!(
            e.contains("tensor `w`") && e.contains(dtype) && e.contains("BF16"),
            "{e}"
        );
    }
}

#[test]
fn empty_tensors_and_gaps_are_accepted() {
    let header = r#"{"e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},
                     "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                     "b": {"dtype": "F16", "shape": [1], "data_offsets": [6, 8]}}"#;
    let set = open_bytes(&raw(header, &[1, 2, 3, 4, 5, 6, 7, 8])).unwrap();
    assert_eq!(&*set.bytes(set.get("b").unwrap()).unwrap(), &[7, 8]);
    assert_eq!(set.bytes(set.get("e").unwrap()).unwrap().len(), 0);
}

#[test]
fn directory_without_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let e = SafetensorsSet::open_dir(dir.path()).unwrap_err();
    assert!(matches!(e, Error::Missing { .. }), "{e}");
    write(dir.path(), "model.gguf", b"GGUF");
    let e = SafetensorsSet::open_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("pass the .gguf file"), "{e}");
    write(dir.path(), "pytorch_model.bin", b"\x80\x02");
    let e = SafetensorsSet::open_dir(dir.path()).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("pytorch_model.bin")
            && e.contains("never unpickles")
            && e.contains("safe_serialization")
    );
    // Any other *.safetensors is picked up when model.safetensors is absent.
    write(
        dir.path(),
        "consolidated.safetensors",
        &file(&[("x", "BF16", &[1], vec![1, 2])]),
    );
    assert!(
        SafetensorsSet::open_dir(dir.path())
            .unwrap()
            .get("x")
            .is_some()
    );
}

/// A poor man's fuzz run (the real one is fuzz/fuzz_targets/safetensors_parse.rs): random byte edits and
/// truncations of a good file never panic, and whatever is accepted lies inside the file.
#[test]
fn mutated_headers_never_panic() {
    let good = file(&[
        ("a", "BF16", &[3, 2], bf16s(6, 1)),
        ("b", "F32", &[2], vec![0; 8]),
    ]);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let mut bytes = good.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % bytes.len() as u64) as usize;
            bytes[i] = match next() % 4 {
                0 => b"0123456789"[(next() % 10) as usize],
                1 => b"{}[],:\" -"[(next() % 9) as usize],
                _ => next() as u8,
            };
        }
        if next() % 4 == 0 {
            bytes.truncate((next() % bytes.len() as u64) as usize);
        }
        if let Ok(h) = parse_bytes(Path::new("m.safetensors"), &bytes) {
            let data_len = bytes.len() as u64 - h.data_start;
            assert!(
                h.entries
                    .iter()
                    .all(|e| e.begin <= e.end && e.end <= data_len)
            );
        }
    }
}
