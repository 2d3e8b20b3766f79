//! Chat templates rendered by minijinja against jinja2 set up as transformers' `apply_chat_template` sets it up
//! (tests/fixtures/tokenizer/chat.json, made by scripts/gen_tokenizer_refs.py): SmolLM2's template from its
//! GGUF, Llama 3's from its tokenizer_config.json, Llama 3.1 / 3.2 (strftime_now, namespace-free system
//! extraction, `| trim`), and a template that calls `raise_exception`. Needs no cache: the templates are in the
//! fixture.

use std::path::Path;

use serde_json::Value;
use tessera::chat::{ChatError, ChatMessage, ChatTemplate};

fn chat_json() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer/chat.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn templates_render_like_jinja2() {
    let refs = chat_json();
    let now = refs["now_unix"].as_i64().unwrap();
    let chats = refs["chats"].as_array().unwrap();
    let templates = refs["templates"].as_object().unwrap();
    assert!(templates.contains_key("smollm2") && templates.contains_key("llama3"));
    let mut checked = 0;
    for (name, t) in templates {
        let tpl = ChatTemplate::new(
            t["template"].as_str().unwrap(),
            t["bos_token"].as_str().unwrap(),
            t["eos_token"].as_str().unwrap(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (chat, expected) in chats.iter().zip(t["renders"].as_array().unwrap()) {
            assert_eq!(chat["name"], expected["chat"]);
            let messages: Vec<ChatMessage> =
                serde_json::from_value(chat["messages"].clone()).unwrap();
            let got = tpl.render_at(
                &messages,
                chat["add_generation_prompt"].as_bool().unwrap(),
                now,
            );
            match (
                expected["rendered"].as_str(),
                expected["error"].as_str(),
                got,
            ) {
                (Some(want), _, Ok(got)) => assert_eq!(got, want, "{name} / {}", chat["name"]),
                (None, Some(msg), Err(ChatError::Raised(got))) => {
                    assert_eq!(got, msg, "{name} / {}", chat["name"])
                }
                (_, _, other) => panic!(
                    "{name} / {}: expected {expected}, got {other:?}",
                    chat["name"]
                ),
            }
            checked += 1;
        }
    }
    assert!(checked >= 16, "{checked}");
}

#[test]
fn fallback_is_llama3_format_and_matches_meta_template() {
    // With no template of its own a model gets the Llama 3 format; on conversations Meta's template accepts
    // (it always appends the assistant header) it renders the same text.
    let refs = chat_json();
    let llama3 = &refs["templates"]["llama3"];
    let fallback = ChatTemplate::llama3("<|begin_of_text|>", "<|end_of_text|>");
    assert!(fallback.is_fallback());
    for (chat, expected) in refs["chats"]
        .as_array()
        .unwrap()
        .iter()
        .zip(llama3["renders"].as_array().unwrap())
    {
        let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone()).unwrap();
        let got = fallback.render(&messages, true).unwrap();
        assert_eq!(got, expected["rendered"].as_str().unwrap());
    }
}
