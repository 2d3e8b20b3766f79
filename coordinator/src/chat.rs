//! Chat templates: a list of messages rendered into the prompt text the model was trained on.
//!
//! Templates are Jinja, stored in the checkpoint (`tokenizer.chat_template` in GGUF, `chat_template` in
//! `tokenizer_config.json`). They are rendered with minijinja set up the way Hugging Face's
//! `apply_chat_template` sets up jinja2 (transformers `utils/chat_template_utils.py`): `trim_blocks` and
//! `lstrip_blocks`, loop controls, the globals `raise_exception` and `strftime_now`, a `tojson` filter that is
//! Python's `json.dumps` (`", "` / `": "` separators, no ASCII or HTML escaping), Python string and dict
//! methods (`.strip()`, `.items()` …, via minijinja-contrib's pycompat), and the variables `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, `tools = none`, `documents = none`.
//!
//! A model without a template gets the Llama 3 instruct format ([`LLAMA3_TEMPLATE`]).

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind, State};
use serde::{Deserialize, Serialize};

use crate::tokenizer::Tokenizer;

/// Template name inside the environment (appears in error messages).
const NAME: &str = "chat_template";
/// Context variable carrying the render time for `strftime_now`, so tests can fix it.
const NOW_VAR: &str = "__tessera_now_unix";

/// The Llama 3 instruct format, used when a model has no template: `<|begin_of_text|>` then for each message
/// `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>` (content trimmed, as Meta's template
/// does), and the assistant header when a reply is wanted.
pub const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}\
{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}\
{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Errors compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not parse (minijinja's message names the line).
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// The template called `raise_exception(message)` (e.g. "Conversation roles must alternate").
    #[error("chat template rejected the conversation: {0}")]
    Raised(String),
    /// Anything else going wrong while rendering: an undefined method, a type error …
    #[error("rendering the chat template failed: {0}")]
    Render(String),
    #[error("`messages` must not be empty")]
    NoMessages,
}

/// One chat message (`role`: "system", "user", "assistant", …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template plus the special-token strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    is_fallback: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("is_fallback", &self.is_fallback)
            .finish_non_exhaustive()
    }
}

/// Marker error source for `raise_exception`, so a deliberate rejection is told apart from a broken template.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

impl ChatTemplate {
    /// Compiles `source` with the given `bos_token` / `eos_token` strings.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Syntax(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            is_fallback: false,
        })
    }

    /// The Llama 3 format ([`LLAMA3_TEMPLATE`]).
    pub fn llama3(bos_token: &str, eos_token: &str) -> ChatTemplate {
        let mut t = Self::new(LLAMA3_TEMPLATE, bos_token, eos_token)
            .unwrap_or_else(|e| unreachable!("the built-in template compiles: {e}"));
        t.is_fallback = true;
        t
    }

    /// The model's template (`Checkpoint::chat_template` / `Manifest::chat_template`), or the Llama 3 format
    /// when it has none; `bos_token` / `eos_token` are the tokenizer's.
    pub fn for_model(
        template: Option<&str>,
        tokenizer: &Tokenizer,
    ) -> Result<ChatTemplate, ChatError> {
        let text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.token_text(i))
                .unwrap_or("")
                .to_owned()
        };
        let (bos, eos) = (text(tokenizer.bos()), text(tokenizer.eos()));
        match template {
            Some(src) if !src.trim().is_empty() => Self::new(src, &bos, &eos),
            _ => Ok(Self::llama3(&bos, &eos)),
        }
    }

    /// Whether this is the built-in Llama 3 format rather than the model's own template.
    pub fn is_fallback(&self) -> bool {
        self.is_fallback
    }

    /// Renders `messages`; `add_generation_prompt` appends the header that starts the assistant's reply.
    /// The result contains special tokens as text: encode it with `parse_special = true, add_special = false`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.render_at(messages, add_generation_prompt, now)
    }

    /// [`render`](Self::render) with `strftime_now` reporting `now_unix` (seconds since the epoch, UTC).
    pub fn render_at(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        now_unix: i64,
    ) -> Result<String, ChatError> {
        if messages.is_empty() {
            return Err(ChatError::NoMessages);
        }
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| ChatError::Render(describe(&e)))?;
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            tools => Value::from(()),
            documents => Value::from(()),
            __tessera_now_unix => now_unix,
        };
        template.render(ctx).map_err(|e| {
            let mut source: Option<&(dyn std::error::Error + 'static)> =
                std::error::Error::source(&e);
            while let Some(s) = source {
                if let Some(r) = s.downcast_ref::<Raised>() {
                    return ChatError::Raised(r.0.clone());
                }
                source = s.source();
            }
            ChatError::Render(describe(&e))
        })
    }
}

/// minijinja's message plus the line it points at.
fn describe(e: &minijinja::Error) -> String {
    match e.line() {
        Some(line) if !e.to_string().contains("line") => format!("{e} (line {line})"),
        _ => e.to_string(),
    }
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("raise_exception: {message}"),
    )
    .with_source(Raised(message)))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, as transformers installs it.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let mut out = Vec::new();
    let result = match indent {
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PyFormatter,
        )),
        Some(n) => {
            let pad = vec![b' '; n];
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&pad),
            ))
        }
    };
    result
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(text))
}

/// `json.dumps` default separators: `", "` between items, `": "` after keys.
struct PyFormatter;

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `strftime_now(format)`: the render time (UTC) formatted like Python's `datetime.strftime`.
fn strftime_now(state: &State, format: String) -> Result<String, minijinja::Error> {
    let now = state
        .lookup(NOW_VAR)
        .and_then(|v| i64::try_from(v).ok())
        .unwrap_or(0);
    strftime(now, &format).map_err(|spec| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported {spec}"),
        )
    })
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Formats a UTC time with the C/Python directives chat templates use (`%d %b %Y` …); an unknown directive
/// is returned as the error.
fn strftime(unix: i64, format: &str) -> Result<String, String> {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3 from Monday)
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            return Err("trailing %".into());
        };
        match spec {
            'Y' => out.push_str(&y.to_string()),
            'y' => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            'm' => out.push_str(&format!("{m:02}")),
            'd' => out.push_str(&format!("{d:02}")),
            'e' => out.push_str(&format!("{d:>2}")),
            'j' => out.push_str(&format!("{yday:03}")),
            'B' => out.push_str(month),
            'b' | 'h' => out.push_str(&month[..3]),
            'A' => out.push_str(WEEKDAYS[weekday]),
            'a' => out.push_str(&WEEKDAYS[weekday][..3]),
            'H' => out.push_str(&format!("{hh:02}")),
            'I' => out.push_str(&format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 })),
            'p' => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            'M' => out.push_str(&format!("{mm:02}")),
            'S' => out.push_str(&format!("{ss:02}")),
            'F' => out.push_str(&format!("{y}-{m:02}-{d:02}")),
            'T' => out.push_str(&format!("{hh:02}:{mm:02}:{ss:02}")),
            '%' => out.push('%'),
            other => return Err(format!("directive %{other}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs
            .iter()
            .map(|(r, c)| ChatMessage::new(*r, *c))
            .collect()
    }

    #[test]
    fn llama3_fallback_format() {
        let t = ChatTemplate::llama3("<|begin_of_text|>", "<|eot_id|>");
        let out = t
            .render(&msgs(&[("system", "Be brief. "), ("user", "Hi")]), true)
            .unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let out = t.render(&msgs(&[("user", "Hi")]), false).unwrap();
        assert!(out.ends_with("Hi<|eot_id|>"), "{out}");
    }

    #[test]
    fn raise_exception_and_errors_are_reported() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok",
            "",
            "",
        )
        .unwrap();
        let e = t.render(&msgs(&[("assistant", "x")]), false).unwrap_err();
        assert!(
            matches!(&e, ChatError::Raised(m) if m == "Conversation must start with user"),
            "{e:?}"
        );
        assert_eq!(t.render(&msgs(&[("user", "x")]), false).unwrap(), "ok");
        assert!(matches!(t.render(&[], false), Err(ChatError::NoMessages)));

        let e = ChatTemplate::new("{% for m in messages %}{{ m.content }", "", "").unwrap_err();
        assert!(matches!(e, ChatError::Syntax(_)), "{e:?}");
        assert!(e.to_string().contains("line"), "{e}");

        let t = ChatTemplate::new("{{ messages[0].content.no_such_method() }}", "", "").unwrap();
        let e = t.render(&msgs(&[("user", "x")]), false).unwrap_err();
        assert!(matches!(e, ChatError::Render(_)), "{e:?}");
    }

    #[test]
    fn python_compat() {
        let t = ChatTemplate::new(
            "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}[{{ m['content'].strip() }}]\
             {% if loop.last %}{% break %}{% endif %}{% endfor %}{{ ns.n }} {{ {'a': [1, 'é'], 'b': none} | tojson }} \
             {{ [1] | tojson(indent=2) }}",
            "",
            "",
        )
        .unwrap();
        let out = t
            .render(&msgs(&[("user", "  x "), ("user", "y")]), false)
            .unwrap();
        assert_eq!(out, "[x][y]2 {\"a\": [1, \"é\"], \"b\": null} [\n  1\n]");
    }

    #[test]
    fn strftime_matches_python() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year.
        let t = 1_721_999_109;
        assert_eq!(strftime(t, "%d %b %Y").unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime(t, "%A %a %B %m %y %j").unwrap(),
            "Friday Fri July 07 24 208"
        );
        assert_eq!(
            strftime(t, "%H:%M:%S %I%p %F %%").unwrap(),
            "13:05:09 01PM 2024-07-26 %"
        );
        assert_eq!(
            strftime(0, "%Y-%m-%d %A %j").unwrap(),
            "1970-01-01 Thursday 001"
        );
        assert_eq!(
            strftime(951_782_400, "%Y-%m-%d %j").unwrap(),
            "2000-02-29 060"
        );
        assert!(strftime(0, "%Q").is_err());
        let tpl = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", "", "").unwrap();
        assert_eq!(
            tpl.render_at(&msgs(&[("user", "x")]), false, t).unwrap(),
            "26 Jul 2024"
        );
    }
}
