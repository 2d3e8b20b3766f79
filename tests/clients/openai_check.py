#!/usr/bin/env python3
"""Drives a Tessera server's OpenAI-compatible API with the official `openai` Python package.

Runs, greedy (temperature 0) with a fixed seed: GET /v1/models, a chat completion, a streaming chat completion
(with stream_options.include_usage), a completion and a streaming completion, then a batch of two prompts with
n=2 (whole and streamed) and the second prompt alone. Prints one JSON object:

    {"models": [...],
     "chat": {"text", "finish_reason", "usage"},
     "chat_stream": {"text", "finish_reason", "role", "usage", "chunks"},
     "completion": {"text", "finish_reason", "usage"},
     "completion_stream": {"text", "finish_reason", "usage", "chunks"},
     "completion2": {"text", "finish_reason", "usage"},
     "batch": {"texts", "usage"}, "batch_stream": {"texts", "usage"},
     "echo": {"text", "tokens", "token_logprobs", "top_logprobs", "usage"},
     "stream_matches": {"chat": bool, "completion": bool},
     "batch_matches": bool, "echo_ok": bool}

batch_matches: the batch's four choices (prompt-major) are the two prompts' lone completions, each twice,
streamed and whole, and its usage counts each prompt once.
echo_ok: scoring the prompt as lm-evaluation-harness does (echo, logprobs=1, max_tokens=0) returns the prompt,
one log-probability per prompt token (null for the first, the rest <= 0, each at most its best alternative's),
and no completion tokens.

Exits 1 on any client error (connection, HTTP error status, a malformed response the client cannot parse),
2 with --strict when a streamed text differs from the non-streamed one, a stream lacks its finish reason, or
the batch does not match.

    pip install openai
    python3 tests/clients/openai_check.py --base-url http://127.0.0.1:8080 --model SmolLM2-135M-Instruct
"""

import argparse
import json
import sys

import openai
from openai import OpenAI


def usage_dict(usage):
    return usage.model_dump() if usage is not None else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="server root or its /v1 URL")
    ap.add_argument("--model", required=True, help="the served model id")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--prompt2", default="The largest planet in the solar system is")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--strict", action="store_true", help="exit 2 when streamed and whole texts differ")
    args = ap.parse_args()

    base = args.base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    client = OpenAI(base_url=base, api_key="tessera", timeout=args.timeout, max_retries=0)
    common = dict(model=args.model, max_tokens=args.max_tokens, temperature=0, seed=args.seed)
    messages = [{"role": "user", "content": args.prompt}]
    out = {}
    try:
        out["models"] = [m.id for m in client.models.list().data]

        r = client.chat.completions.create(messages=messages, **common)
        out["chat"] = {
            "text": r.choices[0].message.content,
            "finish_reason": r.choices[0].finish_reason,
            "usage": usage_dict(r.usage),
        }

        text, finish, role, usage, chunks = [], None, None, None, 0
        stream = client.chat.completions.create(
            messages=messages, stream=True, stream_options={"include_usage": True}, **common
        )
        for chunk in stream:
            chunks += 1
            if chunk.usage is not None:
                usage = usage_dict(chunk.usage)
            for c in chunk.choices:
                if c.delta.role:
                    role = c.delta.role
                if c.delta.content:
                    text.append(c.delta.content)
                if c.finish_reason:
                    finish = c.finish_reason
        out["chat_stream"] = {
            "text": "".join(text),
            "finish_reason": finish,
            "role": role,
            "usage": usage,
            "chunks": chunks,
        }

        r = client.completions.create(prompt=args.prompt, **common)
        out["completion"] = {
            "text": r.choices[0].text,
            "finish_reason": r.choices[0].finish_reason,
            "usage": usage_dict(r.usage),
        }

        text, finish, usage, chunks = [], None, None, 0
        stream = client.completions.create(
            prompt=args.prompt, stream=True, stream_options={"include_usage": True}, **common
        )
        for chunk in stream:
            chunks += 1
            if chunk.usage is not None:
                usage = usage_dict(chunk.usage)
            for c in chunk.choices:
                text.append(c.text)
                if c.finish_reason:
                    finish = c.finish_reason
        out["completion_stream"] = {
            "text": "".join(text),
            "finish_reason": finish,
            "usage": usage,
            "chunks": chunks,
        }

        r = client.completions.create(prompt=args.prompt2, **common)
        out["completion2"] = {
            "text": r.choices[0].text,
            "finish_reason": r.choices[0].finish_reason,
            "usage": usage_dict(r.usage),
        }

        r = client.completions.create(prompt=[args.prompt, args.prompt2], n=2, **common)
        out["batch"] = {
            "texts": [c.text for c in sorted(r.choices, key=lambda c: c.index)],
            "indexes": [c.index for c in r.choices],
            "usage": usage_dict(r.usage),
        }

        texts, usage = {}, None
        stream = client.completions.create(
            prompt=[args.prompt, args.prompt2],
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            **common,
        )
        for chunk in stream:
            if chunk.usage is not None:
                usage = usage_dict(chunk.usage)
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
        out["batch_stream"] = {"texts": [texts[i] for i in sorted(texts)], "usage": usage}

        r = client.completions.create(
            prompt=args.prompt, echo=True, logprobs=1, max_tokens=0, model=args.model, seed=args.seed
        )
        lp = r.choices[0].logprobs
        out["echo"] = {
            "text": r.choices[0].text,
            "tokens": lp.tokens,
            "token_logprobs": lp.token_logprobs,
            "top_logprobs": lp.top_logprobs,
            "usage": usage_dict(r.usage),
        }
    except openai.OpenAIError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}", "partial": out}), file=sys.stderr)
        return 1

    out["stream_matches"] = {
        "chat": out["chat"]["text"] == out["chat_stream"]["text"]
        and out["chat"]["finish_reason"] == out["chat_stream"]["finish_reason"],
        "completion": out["completion"]["text"] == out["completion_stream"]["text"]
        and out["completion"]["finish_reason"] == out["completion_stream"]["finish_reason"],
    }
    alone = [out["completion"]["text"]] * 2 + [out["completion2"]["text"]] * 2
    prompt_tokens = out["completion"]["usage"]["prompt_tokens"] + out["completion2"]["usage"]["prompt_tokens"]
    out["batch_matches"] = (
        out["batch"]["texts"] == alone
        and out["batch_stream"]["texts"] == alone
        and out["batch"]["usage"]["prompt_tokens"] == prompt_tokens
        and out["batch_stream"]["usage"] == out["batch"]["usage"]
    )
    e = out["echo"]
    lps = e["token_logprobs"]
    out["echo_ok"] = (
        e["text"] == args.prompt
        and len(lps) == e["usage"]["prompt_tokens"] == len(e["tokens"])
        and e["usage"]["completion_tokens"] == 0
        and lps[0] is None
        and all(x is not None and x <= 0 for x in lps[1:])
        and all(max(top.values()) >= x - 1e-6 for top, x in zip(e["top_logprobs"][1:], lps[1:]))
    )
    print(json.dumps(out))
    if args.strict and not all(out["stream_matches"].values()):
        print("streamed and whole responses differ", file=sys.stderr)
        return 2
    if args.strict and not out["echo_ok"]:
        print("the echoed prompt's log-probabilities are malformed", file=sys.stderr)
        return 2
    if args.strict and not out["batch_matches"]:
        print("the batch's choices differ from the prompts' lone completions", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
