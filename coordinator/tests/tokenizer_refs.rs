//! The tokenizer against reference data (tests/fixtures/tokenizer/, made by scripts/gen_tokenizer_refs.py from
//! llama.cpp, Hugging Face tokenizers and llama-tokenize; see each JSON's `reference` field).
//!
//! Vocabularies too large to commit are read from the cache that scripts/fetch-tokenizer-refs.sh fills
//! (`$TESSERA_CACHE`, default `~/.cache/tessera`). A test whose input is missing is skipped with a message on a
//! developer machine and fails under CI (`CI=true`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;
use shard_tool::checkpoint::Checkpoint;
use tessera::chat::ChatTemplate;
use tessera::tokenizer::{TokenKind, Tokenizer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn cache() -> PathBuf {
    match std::env::var_os("TESSERA_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tessera"),
    }
}

/// A file from the cache; `None` (skip) when missing, except under CI where it is a failure.
fn cached(rel: &str) -> Option<PathBuf> {
    let path = cache().join(rel);
    if path.exists() {
        return Some(path);
    }
    let msg = format!(
        "{} is missing: run scripts/fetch-tokenizer-refs.sh",
        path.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

fn json(rel: &str) -> Value {
    let path = fixtures().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// llama.cpp's test-tokenizer-0 format: cases separated by "\n__ggml_vocab_test__\n", one line of ids each.
fn llama_cpp_cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(fixtures().join(format!("tokenizer/{name}.inp"))).unwrap();
    let out = std::fs::read_to_string(fixtures().join(format!("tokenizer/{name}.out"))).unwrap();
    let mut texts: Vec<String> = Vec::new();
    let mut rest = inp.as_str();
    while !rest.is_empty() {
        match rest.find("\n__ggml_vocab_test__\n") {
            Some(i) => {
                texts.push(rest[..i].to_owned());
                rest = &rest[i + "\n__ggml_vocab_test__\n".len()..];
            }
            None => {
                texts.push(rest.to_owned());
                break;
            }
        }
    }
    let expected: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        texts.len(),
        expected.len(),
        "{name}: .inp and .out disagree on the number of cases"
    );
    assert!(texts.len() >= 40, "{name}: only {} cases", texts.len());
    texts.into_iter().zip(expected).collect()
}

fn llama3_gguf() -> Option<&'static Tokenizer> {
    static T: OnceLock<Option<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| {
        cached("tokenizer-refs/ggml-vocab-llama-bpe.gguf")
            .map(|p| Tokenizer::from_gguf_file(&p).unwrap())
    })
    .as_ref()
}

fn llama3_json() -> Option<&'static Tokenizer> {
    static T: OnceLock<Option<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| {
        let json = cached("tokenizer-refs/llama3/tokenizer.json")?;
        let config = json.with_file_name("tokenizer_config.json");
        Some(Tokenizer::from_tokenizer_json(&json, Some(&config), None).unwrap())
    })
    .as_ref()
}

fn smollm2() -> Option<&'static (Tokenizer, Option<String>)> {
    static T: OnceLock<Option<(Tokenizer, Option<String>)>> = OnceLock::new();
    T.get_or_init(|| {
        let path = cached("models/SmolLM2-135M-Instruct.Q4_1.gguf")?;
        let ckpt = Checkpoint::open(&[path]).unwrap();
        Some((
            Tokenizer::from_checkpoint(&ckpt).unwrap(),
            ckpt.chat_template.clone(),
        ))
    })
    .as_ref()
}

/// Every case of llama.cpp's own test file gives llama.cpp's ids.
fn check_llama_cpp_cases(tok: &Tokenizer, name: &str) {
    let mut failures = Vec::new();
    for (text, expected) in llama_cpp_cases(name) {
        let got = tok.encode(&text, false, false).unwrap();
        if got != expected {
            failures.push(format!("{text:?}: got {got:?}, llama.cpp {expected:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{name} ({}): {} mismatches:\n{}",
        tok.description(),
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn llama_bpe_gguf_matches_llama_cpp_cases() {
    let Some(tok) = llama3_gguf() else { return };
    check_llama_cpp_cases(tok, "llama-bpe");
}

#[test]
fn llama3_tokenizer_json_matches_llama_cpp_cases() {
    let Some(tok) = llama3_json() else { return };
    check_llama_cpp_cases(tok, "llama-bpe");
}

#[test]
fn llama_spm_gguf_matches_llama_cpp_cases() {
    let Some(path) = cached("tokenizer-refs/ggml-vocab-llama-spm.gguf") else {
        return;
    };
    let tok = Tokenizer::from_gguf_file(&path).unwrap();
    check_llama_cpp_cases(&tok, "llama-spm");
    assert_eq!(tok.bos(), Some(1));
    assert!(tok.adds_bos());
    assert_eq!(tok.encode("Hello", true, false).unwrap()[0], 1);
    assert_eq!(tok.eos_ids(), &[2]);
    // Round trip, including the space prefix SentencePiece adds and the decoder removes.
    for (text, _) in llama_cpp_cases("llama-spm") {
        let ids = tok.encode(&text, false, false).unwrap();
        assert_eq!(tok.decode(&ids, false), text, "{ids:?}");
    }
}

/// Both Llama 3 builds (GGUF metadata and tokenizer.json) give Hugging Face's ids on multilingual text.
#[test]
fn llama3_gguf_and_tokenizer_json_match_hf() {
    let refs = json("tokenizer/llama3.json");
    let builds: Vec<&Tokenizer> = [llama3_gguf(), llama3_json()]
        .into_iter()
        .flatten()
        .collect();
    for tok in builds {
        for case in refs["cases"].as_array().unwrap() {
            let (name, text) = (
                case["name"].as_str().unwrap(),
                case["text"].as_str().unwrap(),
            );
            let got = tok.encode(text, false, false).unwrap();
            assert_eq!(got, ids(&case["ids"]), "{} on {name}", tok.description());
            assert_eq!(
                tok.decode(&got, false),
                case["decoded"].as_str().unwrap(),
                "{} decode {name}",
                tok.description()
            );
        }
    }
}

#[test]
fn llama3_special_tokens() {
    let refs = json("tokenizer/llama3.json");
    let special = &refs["special"];
    let text = special["text"].as_str().unwrap();
    for tok in [llama3_gguf(), llama3_json()].into_iter().flatten() {
        let what = tok.description().to_owned();
        assert_eq!(
            tok.encode(text, false, true).unwrap(),
            ids(&special["ids_parse_special"]),
            "{what}"
        );
        if !special["ids_plain_llama_cpp"].is_null() {
            assert_eq!(
                tok.encode(text, false, false).unwrap(),
                ids(&special["ids_plain_llama_cpp"]),
                "{what}"
            );
        }
        assert_eq!(tok.bos(), Some(128000), "{what}");
        assert_eq!(tok.token_text(128009), Some("<|eot_id|>"));
        assert_eq!(tok.token_kind(128009), Some(TokenKind::Control));
        assert!(
            tok.is_eog(128009) && tok.is_eog(128001),
            "{what}: eos and eot end generation: {:?}",
            tok.eos_ids()
        );
        assert!(!tok.is_eog(128000) && !tok.is_eog(882));
        assert_eq!(tok.vocab_size(), 128256);
        // Control tokens are dropped with skip_special, kept otherwise.
        let parsed = tok.encode(text, false, true).unwrap();
        assert_eq!(tok.decode(&parsed, false), text);
        assert_eq!(tok.decode(&parsed, true), "user\n\nHi thereassistant");
    }
    // llama.cpp adds BOS for the llama-bpe pre-tokenizer; the npm tokenizer.json's post-processor does not.
    if let Some(tok) = llama3_gguf() {
        assert!(tok.adds_bos());
        assert_eq!(tok.encode("Hi", true, false).unwrap(), vec![128000, 13347]);
    }
    if let Some(tok) = llama3_json() {
        assert!(!tok.adds_bos());
    }
}

#[test]
fn smollm2_gguf_matches_reference() {
    let Some((tok, template)) = smollm2() else {
        return;
    };
    let refs = json("tokenizer/smollm2.json");
    eprintln!("reference: {}", refs["reference"]);
    for case in refs["cases"].as_array().unwrap() {
        let (name, text) = (
            case["name"].as_str().unwrap(),
            case["text"].as_str().unwrap(),
        );
        let got = tok.encode(text, false, false).unwrap();
        assert_eq!(got, ids(&case["ids"]), "SmolLM2 on {name}");
        assert_eq!(tok.decode(&got, false), text, "SmolLM2 decode {name}");
    }
    let special = &refs["special"];
    let text = special["text"].as_str().unwrap();
    assert_eq!(
        tok.encode(text, false, true).unwrap(),
        ids(&special["ids_parse_special"])
    );
    if !special["ids_plain_llama_cpp"].is_null() {
        assert_eq!(
            tok.encode(text, false, false).unwrap(),
            ids(&special["ids_plain_llama_cpp"])
        );
    }
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!((tok.bos(), tok.eos()), (Some(1), Some(2)));
    assert!(!tok.adds_bos(), "tokenizer.ggml.add_bos_token is false");
    // <|im_end|> (eos) and <|endoftext|> end generation.
    assert_eq!(tok.eos_ids(), &[0, 2]);
    // llama-tokenize on the same GGUF (BOS per the model: none).
    assert_eq!(
        tok.encode("The capital of France is", true, true).unwrap(),
        vec![504, 3575, 282, 4649, 314]
    );

    // The model's own template, with the tokenizer's bos/eos strings.
    let chat = ChatTemplate::for_model(template.as_deref(), tok).unwrap();
    assert!(!chat.is_fallback());
    let prompt = chat
        .render(&[tessera::chat::ChatMessage::new("user", "Hi there")], true)
        .unwrap();
    assert!(
        prompt.ends_with("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"),
        "{prompt}"
    );
    let ids = tok.encode(&prompt, false, true).unwrap();
    assert_eq!(
        ids.iter().filter(|&&i| i == 1).count(),
        3,
        "three <|im_start|> parsed as special"
    );
}

/// decode(encode(x)) == x, and streaming decode emits the same text without ever splitting a character.
#[test]
fn round_trip_and_streaming_decode() {
    let refs = json("tokenizer/llama3.json");
    let texts: Vec<&str> = refs["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    let toks: Vec<&Tokenizer> = [llama3_gguf(), llama3_json(), smollm2().map(|s| &s.0)]
        .into_iter()
        .flatten()
        .collect();
    for tok in toks {
        let mut held_back = 0;
        for text in &texts {
            let ids = tok.encode(text, false, false).unwrap();
            assert_eq!(tok.decode(&ids, true), *text, "{}", tok.description());
            let mut stream = tok.stream_decoder(true);
            let mut streamed = String::new();
            for &id in &ids {
                let piece = stream.push(tok, id);
                if piece.is_empty() && stream.has_pending() {
                    held_back += 1;
                }
                streamed.push_str(&piece);
            }
            assert!(!stream.has_pending());
            streamed.push_str(&stream.finish());
            assert_eq!(streamed, *text, "{}", tok.description());
        }
        assert!(
            held_back > 0,
            "{}: emoji and Thai split characters across tokens",
            tok.description()
        );
    }
}

/// A cut inside a character is held back, then completed; bytes that can never complete become U+FFFD.
#[test]
fn streaming_never_emits_half_a_character() {
    let Some(tok) = llama3_gguf().or(smollm2().map(|s| &s.0)) else {
        return;
    };
    // Byte-level tokens for the four bytes of 🦀 (F0 9F A6 80), one byte each.
    let byte_token = |b: u8| -> u32 {
        (0..tok.vocab_size() as u32)
            .find(|&id| tok.piece(id, false) == [b])
            .unwrap()
    };
    let crab: Vec<u32> = [0xF0u8, 0x9F, 0xA6, 0x80]
        .iter()
        .map(|&b| byte_token(b))
        .collect();
    let mut s = tok.stream_decoder(false);
    assert_eq!(s.push(tok, crab[0]), "");
    assert_eq!(s.push(tok, crab[1]), "");
    assert_eq!(s.push(tok, crab[2]), "");
    assert_eq!(s.push(tok, crab[3]), "🦀");
    // A lone continuation byte can never become valid: replaced at once.
    assert_eq!(s.push(tok, crab[3]), "\u{FFFD}");
    // A truncated character at the end of the stream is flushed as U+FFFD.
    assert_eq!(s.push(tok, crab[0]), "");
    assert_eq!(s.finish(), "\u{FFFD}");
    assert_eq!(tok.decode(&[crab[0], crab[1]], false), "\u{FFFD}");
}

/// The tiny model fixtures (committed, no cache needed): the GGUF build and the tokenizer.json build both give
/// HF tokenizers' ids (tests/fixtures/gguf/tiny_llama.json, made by scripts/gen_fixtures.py).
#[test]
fn tiny_fixture_tokenizers_match_hf() {
    let refs = json("gguf/tiny_llama.json");
    let tk = &refs["tokenizer"];
    let from_gguf = Tokenizer::from_gguf_file(&fixtures().join("gguf/tiny_llama.gguf")).unwrap();
    let hf = fixtures().join("hf_tiny");
    let from_json = Tokenizer::from_tokenizer_json(
        &hf.join("tokenizer.json"),
        Some(&hf.join("tokenizer_config.json")),
        Some(&hf.join("generation_config.json")),
    )
    .unwrap();
    for tok in [&from_gguf, &from_json] {
        let what = tok.description().to_owned();
        for case in tk["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text, false, true).unwrap(),
                ids(&case["ids"]),
                "{what}: {text:?}"
            );
            assert_eq!(
                tok.encode(text, true, true).unwrap(),
                ids(&case["ids_add_special"]),
                "{what}: {text:?}"
            );
            assert_eq!(
                tok.decode(&ids(&case["ids"]), false),
                case["decoded"].as_str().unwrap(),
                "{what}"
            );
        }
        assert_eq!(
            tok.bos().map(u64::from),
            tk["bos_token_id"].as_u64(),
            "{what}"
        );
        assert!(
            tok.is_eog(tk["eos_token_id"].as_u64().unwrap() as u32),
            "{what}"
        );
        assert!(
            tok.is_eog(tk["end_of_text_id"].as_u64().unwrap() as u32),
            "{what}"
        );
        assert_eq!(tok.vocab_size() as u64, tk["n_tokens"].as_u64().unwrap());
    }
}

#[test]
fn bad_tokenizer_files_are_reported_not_panicked() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let e = Tokenizer::from_tokenizer_json(&missing, None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.json"), "{e}");
    let junk = dir.path().join("tokenizer.json");
    std::fs::write(&junk, "{\"model\": 3}").unwrap();
    let e = Tokenizer::from_tokenizer_json(&junk, None, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("not a tokenizer.json"),
        "{e}"
    );
    let e = Tokenizer::from_gguf_file(&junk).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    // A GGUF without tokenizer metadata names the key.
    let tiny = fixtures().join("gguf/types.gguf");
    let e = Tokenizer::from_gguf_file(&tiny).unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.model"), "{e}");
}

/// A shard directory (`shard-tool split` of the tiny fixtures, GGUF and Hugging Face) carries its tokenizer:
/// `tokenizer.gguf` or the copied tokenizer.json, plus the chat template, which render as jinja2 did.
#[test]
fn shard_dir_tokenizer_and_template() {
    use shard_tool::manifest::Manifest;
    use shard_tool::plan::{Topology, plan};
    use shard_tool::split::{SplitOptions, split};

    let refs = json("gguf/tiny_llama.json");
    let case = &refs["tokenizer"]["cases"][0];
    for source in [
        fixtures().join("gguf/tiny_llama.gguf"),
        fixtures().join("hf_tiny"),
    ] {
        let ckpt = Checkpoint::open(std::slice::from_ref(&source)).unwrap();
        let direct = Tokenizer::from_checkpoint(&ckpt).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let topo = Topology {
            tp: 1,
            pp: 1,
            layer_ranges: None,
        };
        let p = plan(&ckpt.config, &ckpt.tensors, &topo).unwrap();
        let opts = SplitOptions {
            out_dir: dir.path().to_owned(),
            force: false,
            progress: false,
        };
        split(&ckpt, &p, &opts).unwrap();
        let manifest = Manifest::load(dir.path()).unwrap();
        let tok = Tokenizer::from_shard_dir(dir.path(), &manifest).unwrap();
        let what = format!("{} from {}", tok.description(), source.display());
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true, true).unwrap(),
            ids(&case["ids_add_special"]),
            "{what}"
        );
        assert_eq!(
            direct.encode(text, true, true).unwrap(),
            ids(&case["ids_add_special"]),
            "{what}"
        );
        assert_eq!(tok.eos_ids(), direct.eos_ids(), "{what}");

        let chat = ChatTemplate::for_model(manifest.chat_template.as_deref(), &tok).unwrap();
        for c in refs["chat_template_cases"].as_array().unwrap() {
            let messages: Vec<tessera::chat::ChatMessage> =
                serde_json::from_value(c["messages"].clone()).unwrap();
            let got = chat
                .render(&messages, c["add_generation_prompt"].as_bool().unwrap())
                .unwrap();
            assert_eq!(got, c["rendered"].as_str().unwrap(), "{what}");
        }
    }
}
