//! Request → prompt token ids, the same way for every front end (OpenAI HTTP, `tessera.v1` gRPC, `tessera run`).
//!
//! - Completion text: `encode(text, add_special = true, parse_special = false)`: the model's BOS convention, and
//!   user text cannot inject control tokens such as `<|eot_id|>`.
//! - Chat: the model's chat template renders the messages with the assistant header appended
//!   (`add_generation_prompt`); the rendered text already holds BOS and the control tokens as text, so it is
//!   encoded with `add_special = false, parse_special = true`.
//! - Token ids are taken as given (checked against the vocabulary).
//!
//! Errors are [`ServeError::InvalidArgument`]s naming the request field ("prompt" or "messages"), except a
//! broken template or tokenizer, which is [`ServeError::Internal`].

use crate::chat::{ChatError, ChatMessage, ChatTemplate};
use crate::serve::{ServeError, ServedModel};
use crate::tokenizer::Tokenizer;

/// The roles a chat message may have. `developer` (OpenAI's newer name for `system`) is accepted and rendered
/// as `system`.
pub const CHAT_ROLES: [&str; 3] = ["system", "user", "assistant"];

/// What a request asks to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptInput {
    /// Completion: raw text.
    Text(String),
    /// Completion: pre-tokenized prompt.
    Tokens(Vec<u32>),
    /// Chat: messages rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

impl PromptInput {
    /// The OpenAI request field that holds this input: "messages" for chat, "prompt" otherwise.
    pub fn field(&self) -> &'static str {
        match self {
            PromptInput::Chat(_) => "messages",
            PromptInput::Text(_) | PromptInput::Tokens(_) => "prompt",
        }
    }
}

/// Completion text to prompt ids: `encode(text, true, false)` (BOS as the model adds it, no control tokens
/// from user text).
pub fn encode_completion(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, ServeError> {
    tokenizer
        .encode(text, true, false)
        .map_err(|e| ServeError::Internal(format!("tokenizing the prompt: {e}")))
}

/// Chat messages to prompt ids: `template.render(messages, true)` then `encode(rendered, false, true)`.
/// A template that rejects the conversation (`raise_exception`, e.g. roles that do not alternate) or fails
/// on it is the request's fault: `InvalidArgument` on "messages".
pub fn encode_chat(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[ChatMessage],
) -> Result<Vec<u32>, ServeError> {
    let text = render_chat(template, messages)?;
    tokenizer
        .encode(&text, false, true)
        .map_err(|e| ServeError::Internal(format!("tokenizing the rendered chat: {e}")))
}

/// Renders `messages` with the assistant header appended (the text [`encode_chat`] tokenizes).
pub fn render_chat(
    template: &ChatTemplate,
    messages: &[ChatMessage],
) -> Result<String, ServeError> {
    template.render(messages, true).map_err(|e| match e {
        ChatError::NoMessages => ServeError::invalid("messages", "`messages` must not be empty"),
        ChatError::Raised(m) => ServeError::invalid(
            "messages",
            format!("the model's chat template rejected the conversation: {m}"),
        ),
        ChatError::Render(m) => ServeError::invalid(
            "messages",
            format!("the model's chat template failed on these messages: {m}"),
        ),
        ChatError::Syntax(m) => {
            ServeError::Internal(format!("the model's chat template does not compile: {m}"))
        }
    })
}

/// Checks a message role (`field` names it in the error, e.g. "messages[2].role") and returns the role to
/// render: one of [`CHAT_ROLES`], with `developer` mapped to `system`.
pub fn normalize_role(role: &str, field: &str) -> Result<&'static str, ServeError> {
    match role {
        "system" | "developer" => Ok("system"),
        "user" => Ok("user"),
        "assistant" => Ok("assistant"),
        other => Err(ServeError::invalid(
            field,
            format!(
                "`{field}` must be one of \"system\", \"user\" or \"assistant\", got {other:?}"
            ),
        )),
    }
}

/// The prompt ids of `input` for `model`, checked: not empty, every id inside the vocabulary, and shorter
/// than the model's context (at least one token must fit after it). Errors name [`PromptInput::field`].
pub fn build_prompt(model: &ServedModel, input: &PromptInput) -> Result<Vec<u32>, ServeError> {
    let field = input.field();
    let ids = match input {
        PromptInput::Text(text) => encode_completion(&model.tokenizer, text)?,
        PromptInput::Tokens(ids) => {
            let n_vocab = model.config.n_vocab;
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= n_vocab) {
                return Err(ServeError::invalid(
                    field,
                    format!(
                        "`{field}` holds token id {bad}, outside the vocabulary of {n_vocab} tokens"
                    ),
                ));
            }
            ids.clone()
        }
        PromptInput::Chat(messages) => {
            let normalized = messages
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let role = normalize_role(&m.role, &format!("messages[{i}].role"))?;
                    Ok(ChatMessage::new(role, m.content.clone()))
                })
                .collect::<Result<Vec<_>, ServeError>>()?;
            encode_chat(&model.tokenizer, &model.template, &normalized)?
        }
    };
    check_length(model, field, ids.len())?;
    Ok(ids)
}

/// Rejects an empty prompt and one that leaves no room in the context for a generated token.
pub fn check_length(model: &ServedModel, field: &str, n_tokens: usize) -> Result<(), ServeError> {
    if n_tokens == 0 {
        return Err(ServeError::invalid(
            field,
            format!("`{field}` is empty: it must hold at least one token"),
        ));
    }
    if n_tokens >= model.max_context {
        return Err(ServeError::invalid(
            field,
            format!(
                "`{field}` has {n_tokens} tokens but this model's context holds {} tokens (prompt and completion): \
                 shorten the prompt",
                model.max_context
            ),
        ));
    }
    Ok(())
}

/// Renames the field of an `InvalidArgument` error (the scheduler names the prompt "prompt"; chat requests
/// call it "messages", gRPC "chat" or "prompt_ids"). Other errors pass through.
pub fn rename_field(err: ServeError, from: &str, to: &str) -> ServeError {
    match err {
        ServeError::InvalidArgument { field, message } if field == from && from != to => {
            ServeError::InvalidArgument {
                field: to.to_owned(),
                message: message.replace(&format!("`{from}`"), &format!("`{to}`")),
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_checked_and_normalized() {
        assert_eq!(normalize_role("developer", "r").unwrap(), "system");
        assert_eq!(normalize_role("assistant", "r").unwrap(), "assistant");
        let e = normalize_role("tool", "messages[3].role").unwrap_err();
        assert_eq!(
            e,
            ServeError::invalid(
                "messages[3].role",
                "`messages[3].role` must be one of \"system\", \"user\" or \"assistant\", got \"tool\""
            )
        );
    }

    #[test]
    fn fields_are_renamed_in_invalid_arguments_only() {
        let e = ServeError::invalid("prompt", "`prompt` is too long");
        assert_eq!(
            rename_field(e, "prompt", "messages"),
            ServeError::invalid("messages", "`messages` is too long")
        );
        let e = ServeError::invalid("temperature", "bad");
        assert_eq!(rename_field(e.clone(), "prompt", "messages"), e);
        let e = ServeError::Unavailable("prompt".into());
        assert_eq!(rename_field(e.clone(), "prompt", "messages"), e);
        assert_eq!(PromptInput::Chat(vec![]).field(), "messages");
        assert_eq!(PromptInput::Tokens(vec![1]).field(), "prompt");
    }
}
