#!/usr/bin/env python3
"""Generate Tessera's checkpoint-format test fixtures into tests/fixtures/.

Every fixture comes with a machine-readable expectation produced by the reference libraries
(gguf-py's GGUFReader / gguf.quants, safetensors, tokenizers, jinja2, Python's zipfile, and
llama.cpp's llama-quantize for k-quants) -- never by Tessera itself.

    python3 scripts/gen_fixtures.py                       # everything (k_quants if llama-quantize is found)
    python3 scripts/gen_fixtures.py --k-quants PATH/llama-quantize
    python3 scripts/gen_fixtures.py --no-k-quants

Seeded and rerunnable: the same package versions (scripts/requirements-fixtures.txt) give the
same bytes. See tests/fixtures/README.md for the list of files and the JSON field names.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np

import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFValueType as VT

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures"
CACHE = Path(os.environ.get("TESSERA_CACHE", Path.home() / ".cache" / "tessera"))

# Fixed ZIP timestamp so the archives are byte-for-byte reproducible.
ZIP_DATE_TIME = (2025, 1, 1, 0, 0, 0)


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------

def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def sha256_file(p: Path) -> str:
    return sha256_bytes(p.read_bytes())


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")


def f32_le_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def write_f32(path: Path, a: np.ndarray) -> None:
    path.write_bytes(f32_le_bytes(a))


def bf16_round(a: np.ndarray) -> np.ndarray:
    """Round f32 values to the nearest bfloat16 (round-to-nearest-even, as gguf/torch do) and
    return them as f32. Weights made this way are identical in F32 and BF16 files."""
    q = gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), QT.BF16)
    return gguf.quants.dequantize(q, QT.BF16).astype(np.float32)


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """f32 -> bf16 bit patterns (uint16), round-to-nearest-even via gguf.quants."""
    q = gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), QT.BF16)
    return q.view(np.uint16).reshape(a.shape)


def stats(a: np.ndarray) -> dict[str, Any]:
    a64 = np.asarray(a, dtype=np.float64).reshape(-1)
    return {
        "sum": float(a64.sum()),
        "abs_sum": float(np.abs(a64).sum()),
        "first8": [float(x) for x in np.asarray(a, dtype=np.float32).reshape(-1)[:8]],
    }


def ggml_shape(t: gguf.ReaderTensor) -> list[int]:
    return [int(x) for x in t.shape]


def tensor_record(t: gguf.ReaderTensor, data_section_offset: int) -> dict[str, Any]:
    block, tsize = GGML_QUANT_SIZES[t.tensor_type]
    return {
        "name": t.name,
        "type": t.tensor_type.name,
        "type_id": int(t.tensor_type),
        "shape": ggml_shape(t),
        "n_elements": int(t.n_elements),
        "n_bytes": int(t.n_bytes),
        "block_size": int(block),
        "type_size": int(tsize),
        "offset": int(t.data_offset - data_section_offset),
        "data_offset": int(t.data_offset),
    }


def dequant(t: gguf.ReaderTensor) -> np.ndarray:
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)


def reader_version(r: gguf.GGUFReader) -> int:
    return int(r.fields["GGUF.version"].parts[0][0])


# ----------------------------------------------------------------------------------------------
# GGUF metadata decoding (from GGUFReader's parsed parts, keeping nested arrays' structure)
# ----------------------------------------------------------------------------------------------

def _decode_parts(parts: list[np.ndarray], i: int, vtype: VT) -> tuple[Any, int, list[str]]:
    """Decode one value starting at parts[i]; return (value, next index, type chain)."""
    if vtype == VT.STRING:
        # parts: [len(u64), bytes(u8[])]
        return bytes(parts[i + 1]).decode("utf-8"), i + 2, ["STRING"]
    if vtype == VT.ARRAY:
        itype = VT(int(parts[i][0]))
        n = int(parts[i + 1][0])
        i += 2
        out = []
        chain: list[str] = ["ARRAY", itype.name]
        for k in range(n):
            v, i, sub = _decode_parts(parts, i, itype)
            if k == 0:
                chain = ["ARRAY"] + sub
            out.append(v)
        return out, i, chain
    v = parts[i][0]
    if vtype == VT.BOOL:
        v = bool(v)
    elif vtype in (VT.FLOAT32, VT.FLOAT64):
        v = float(v)
    else:
        v = int(v)
    return v, i + 1, [vtype.name]


def _flatten(v: Any) -> list[Any]:
    if isinstance(v, list):
        out = []
        for x in v:
            out.extend(_flatten(x))
        return out
    return [v]


def decode_field(field: gguf.ReaderField) -> dict[str, Any]:
    vtype = field.types[0]
    value, end, chain = _decode_parts(field.parts, 3, vtype)
    assert end == len(field.parts), (field.name, end, len(field.parts))
    assert chain == [t.name for t in field.types], (field.name, chain, field.types)
    # cross-check against GGUFReader's own accessor (which flattens nested arrays)
    contents = field.contents()
    if vtype == VT.ARRAY:
        flat = _flatten(value)
        if field.types[-1] == VT.BOOL:
            contents = [bool(x) for x in contents]
        assert flat == contents, (field.name, flat[:5], contents[:5])
    else:
        if vtype == VT.BOOL:
            contents = bool(contents)
        assert value == contents, (field.name, value, contents)
    rec: dict[str, Any] = {"key": field.name, "type": vtype.name, "type_id": int(vtype), "types": chain}
    if vtype == VT.ARRAY:
        rec["element_type"] = chain[1] if len(chain) > 1 else None
        rec["len"] = len(value)
    rec["value"] = value
    return rec


def kv_records(r: gguf.GGUFReader) -> list[dict[str, Any]]:
    return [decode_field(f) for name, f in r.fields.items() if not name.startswith("GGUF.")]


def header_record(r: gguf.GGUFReader) -> dict[str, Any]:
    return {
        "version": reader_version(r),
        "tensor_count": int(r.fields["GGUF.tensor_count"].parts[0][0]),
        "kv_count": int(r.fields["GGUF.kv_count"].parts[0][0]),
        "alignment": int(r.alignment),
        "data_offset": int(r.data_offset),
    }


# ----------------------------------------------------------------------------------------------
# GGUF writing
# ----------------------------------------------------------------------------------------------

KV = tuple  # (key, value, vtype, sub_type|None)


def write_gguf(path: Path, arch: str, kvs: list[KV], tensors: list[tuple[str, np.ndarray, QT | None]],
               alignment: int | None = None, split_max_tensors: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, val, vtype, sub in kvs:
        w.add_key_value(key, val, vtype, sub_type=sub)
    for name, arr, raw_dtype in tensors:
        if raw_dtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------------------------
# (a) metadata_all_types
# ----------------------------------------------------------------------------------------------

def gen_metadata_all_types(out: Path) -> None:
    d = out / "gguf"
    path = d / "metadata_all_types.gguf"
    kvs: list[KV] = [
        ("test.u8", 200, VT.UINT8, None),
        ("test.i8", -100, VT.INT8, None),
        ("test.u16", 60000, VT.UINT16, None),
        ("test.i16", -30000, VT.INT16, None),
        ("test.u32", 4_000_000_000, VT.UINT32, None),
        ("test.i32", -2_000_000_000, VT.INT32, None),
        ("test.f32", 3.14159, VT.FLOAT32, None),
        ("test.bool_true", True, VT.BOOL, None),
        ("test.bool_false", False, VT.BOOL, None),
        ("test.string", "hello, GGUF \u2713 \U0001f999", VT.STRING, None),
        ("test.string_empty", "", VT.STRING, None),
        ("test.u64", 2**64 - 1, VT.UINT64, None),
        ("test.i64", -(2**63), VT.INT64, None),
        ("test.f64", 2.718281828459045, VT.FLOAT64, None),
        ("test.array.u8", [0, 1, 127, 255], VT.ARRAY, VT.UINT8),
        ("test.array.i8", [-128, -1, 0, 127], VT.ARRAY, VT.INT8),
        ("test.array.u16", [0, 1, 65535], VT.ARRAY, VT.UINT16),
        ("test.array.i16", [-32768, 0, 32767], VT.ARRAY, VT.INT16),
        ("test.array.u32", [0, 1, 4294967295], VT.ARRAY, VT.UINT32),
        ("test.array.i32", [-2147483648, 0, 2147483647], VT.ARRAY, VT.INT32),
        ("test.array.f32", [0.5, -1.25, 1e-7, 65504.0], VT.ARRAY, VT.FLOAT32),
        ("test.array.bool", [True, False, True], VT.ARRAY, VT.BOOL),
        ("test.array.string", ["a", "bc", "", "\u00fc\u00df", "tab\tnewline\n"], VT.ARRAY, VT.STRING),
        ("test.array.u64", [0, 2**63, 2**64 - 1], VT.ARRAY, VT.UINT64),
        ("test.array.i64", [-(2**63), -1, 2**63 - 1], VT.ARRAY, VT.INT64),
        ("test.array.f64", [0.1, -2.5, 1e300], VT.ARRAY, VT.FLOAT64),
    ]
    # one tiny tensor so the file also has tensor info + a data section
    tensors = [("dummy", np.arange(4, dtype=np.float32), None)]
    write_gguf(path, "tessera-test", kvs, tensors)

    _write_metadata_json(path, d / "metadata_all_types.json")

    # Arrays of arrays are legal in the GGUF spec (ggml docs/gguf.md) and GGUFWriter/GGUFReader handle them,
    # but llama.cpp's own reader (ggml/src/gguf.cpp) rejects them ("invalid GGUF type"), so they live in a
    # file of their own.
    nested: list[KV] = [
        # arrays of arrays: GGUFWriter infers the inner arrays' element type from Python values
        # (int -> INT32, str -> STRING, float -> FLOAT32)
        ("test.array.nested_i32", [[1, 2, 3], [4], [5, 6]], VT.ARRAY, VT.ARRAY),
        ("test.array.nested_string", [["x", "yz"], ["w"]], VT.ARRAY, VT.ARRAY),
        ("test.array.nested_f32", [[0.25], [1.5, -2.0]], VT.ARRAY, VT.ARRAY),
        ("test.array.nested3_i32", [[[1, 2]], [[3], [4, 5]]], VT.ARRAY, VT.ARRAY),
    ]
    path = d / "metadata_nested_arrays.gguf"
    write_gguf(path, "tessera-test", nested, [])
    # independent check of the wire format against the spec: key, ARRAY, elem type, count, elements...
    raw = path.read_bytes()
    for key, val, _, _ in nested:
        assert _spec_encode_kv(key, val) in raw, key
    _write_metadata_json(path, d / "metadata_nested_arrays.json")


def _spec_encode_value(val: Any) -> tuple[int, bytes]:
    """GGUF value encoding straight from the spec (type id, payload) for int32/float32/string/arrays."""
    if isinstance(val, list):
        et, _ = _spec_encode_value(val[0])
        body = b"".join(_spec_encode_value(v)[1] for v in val)
        return 9, struct.pack("<IQ", et, len(val)) + body
    if isinstance(val, str):
        b = val.encode()
        return 8, struct.pack("<Q", len(b)) + b
    if isinstance(val, float):
        return 6, struct.pack("<f", val)
    return 5, struct.pack("<i", val)


def _spec_encode_kv(key: str, val: Any) -> bytes:
    t, payload = _spec_encode_value(val)
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", t) + payload


def _write_metadata_json(path: Path, json_path: Path) -> None:
    r = gguf.GGUFReader(path)
    write_json(json_path, {
        "file": path.name,
        "produced_by": f"gguf.GGUFWriter / read back with gguf.GGUFReader (gguf {gguf_version()})",
        **header_record(r),
        "kv": kv_records(r),
        "tensors": [dict(tensor_record(t, r.data_offset), values=[float(x) for x in dequant(t)]) for t in r.tensors],
    })


# ----------------------------------------------------------------------------------------------
# (b) types.gguf
# ----------------------------------------------------------------------------------------------

TYPES_LIST = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]


def gen_types(out: Path) -> None:
    d = out / "gguf"
    for old in d.glob("types.*.f32"):
        old.unlink()
    rng = np.random.default_rng(20240601)
    tensors = []
    for qt in TYPES_LIST:
        if qt in (QT.F32, QT.F16, QT.BF16):
            shapes = [(64, 3), (7, 5, 3)]   # ggml order (ne0, ne1, ...)
        else:
            shapes = [(64, 3), (96, 5, 2)]
        for sh in shapes:
            name = f"{qt.name.lower()}_{'x'.join(map(str, sh))}"
            np_shape = tuple(reversed(sh))
            x = (rng.standard_normal(np_shape) * 0.5 + rng.uniform(-0.1, 0.1)).astype(np.float32)
            # a few special values so conversions are exercised at the edges
            flat = x.reshape(-1)
            flat[0] = 0.0
            flat[1] = -0.0 if qt in (QT.F32, QT.F16, QT.BF16) else flat[1]
            flat[2] = 1.0
            if qt == QT.F32:
                tensors.append((name, x, None))
            elif qt == QT.F16:
                tensors.append((name, x.astype(np.float16), None))
            else:
                tensors.append((name, gguf.quants.quantize(x, qt), qt))
    path = d / "types.gguf"
    write_gguf(path, "tessera-test", [("general.name", "types", VT.STRING, None)], tensors, alignment=64)

    r = gguf.GGUFReader(path)
    recs = []
    for t in r.tensors:
        deq = dequant(t)
        fname = f"types.{t.name}.f32"
        write_f32(d / fname, deq)
        rec = tensor_record(t, r.data_offset)
        rec["dequant_file"] = fname
        rec["dequant_sha256"] = sha256_bytes(f32_le_bytes(deq))
        rec["raw_sha256"] = sha256_bytes(np.asarray(t.data).tobytes())
        recs.append(rec)
    write_json(d / "types.json", {
        "file": "types.gguf",
        "produced_by": f"gguf.quants.quantize + GGUFWriter; dequantized with gguf.quants.dequantize (gguf {gguf_version()})",
        **header_record(r),
        "tensors": recs,
    })


# ----------------------------------------------------------------------------------------------
# toy tokenizer (HF tokenizers) shared by the tiny models
# ----------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
TOKENIZER_CORPUS = [
    "The capital of France is Paris.",
    "Hello, world! Hello there, the world is large.",
    "the quick brown fox jumps over the lazy dog",
    "Tessera serves the tiny llama, then the large llama.",
    "in the beginning there was the token and the token was there",
] * 4
N_MERGES_TARGET = 27  # 256 byte tokens + 27 merges + 5 specials = 288
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
TOKENIZER_CASES = [
    "The capital of France is",
    "Hello, world!",
    " leading space and  double  spaces",
    "multi\nline\n\ttabbed",
    "caf\u00e9 \U0001f999 \u65e5\u672c",
    "numbers 12345 and 3.14",
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
]
CHAT_CASES = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "  Bye  "}], "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "No prompt"}], "add_generation_prompt": False},
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers, AddedToken

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + N_MERGES_TARGET,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
    assert tok.get_vocab_size() == 256 + N_MERGES_TARGET, tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    return tok


def tokenizer_info(tok) -> dict[str, Any]:
    """tokens / token types / merges in the form llama.cpp's convert_hf_to_gguf.py writes them."""
    tj = json.loads(tok.to_str())
    vocab = tj["model"]["vocab"]
    n = tok.get_vocab_size(with_added_tokens=True)
    rev = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in tj["added_tokens"]}
    tokens, types = [], []
    for i in range(n):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(int(gguf.TokenType.CONTROL))
        else:
            tokens.append(rev[i])
            types.append(int(gguf.TokenType.NORMAL))
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    return {
        "tokens": tokens, "token_types": types, "merges": merges,
        "bos_token_id": tok.token_to_id("<|begin_of_text|>"),
        "eos_token_id": tok.token_to_id("<|eot_id|>"),
        "end_of_text_id": tok.token_to_id("<|end_of_text|>"),
        "json": tok.to_str(pretty=True),
    }


def tokenizer_cases(tok) -> list[dict[str, Any]]:
    cases = []
    for text in TOKENIZER_CASES:
        with_special = tok.encode(text, add_special_tokens=True)
        without = tok.encode(text, add_special_tokens=False)
        cases.append({
            "text": text,
            "ids": without.ids,
            "tokens": without.tokens,
            "ids_add_special": with_special.ids,
            "decoded": tok.decode(without.ids, skip_special_tokens=False),
        })
    return cases


def chat_cases(bos: str) -> list[dict[str, Any]]:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # the environment transformers' apply_chat_template uses
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[])
    tmpl = env.from_string(CHAT_TEMPLATE)
    out = []
    for case in CHAT_CASES:
        rendered = tmpl.render(messages=case["messages"], add_generation_prompt=case["add_generation_prompt"],
                               bos_token=bos, eos_token="<|eot_id|>")
        out.append(dict(case, bos_token=bos, rendered=rendered))
    return out, jinja2.__version__


# ----------------------------------------------------------------------------------------------
# (c) the tiny llama model: HF layout weights -> GGUF layout
# ----------------------------------------------------------------------------------------------

TINY = dict(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, head_dim=16, n_ctx=256,
            rope_theta=10000.0, rms_eps=1e-5)


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Exactly llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py; in the llama.cpp vendored by
    llama-cpp-python 0.3.36 it lives in conversion/llama.py), in numpy instead of torch.
    Applied to q_proj with (n_head, n_head) and to k_proj with (n_head, n_head_kv)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def llama3_rope_factors(base: float, dim: int, factor: float, low_freq_factor: float, high_freq_factor: float,
                        old_context_len: int) -> list[float]:
    """llama.cpp's LlamaModel.generate_extra_tensors (rope_freqs.weight for rope_type llama3),
    reproduced with numpy float32 where torch used float32."""
    freqs = 1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in freqs.astype(np.float32):
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_freq_wavelen:
            out.append(1.0)
        elif wavelen > low_freq_wavelen:
            out.append(float(factor))
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return [float(np.float32(x)) for x in out]


def make_tiny_hf_weights(vocab: int, seed: int = 1234) -> dict[str, np.ndarray]:
    """HF-layout ([out, in]) float32 weights whose values are exactly representable in bf16."""
    rng = np.random.default_rng(seed)
    E, F, H, KV, D = TINY["n_embd"], TINY["n_ff"], TINY["n_head"], TINY["n_head_kv"], TINY["head_dim"]

    def mat(rows, cols, std):
        return bf16_round(rng.standard_normal((rows, cols)).astype(np.float32) * std)

    def norm(n):
        return bf16_round(1.0 + 0.1 * rng.standard_normal(n).astype(np.float32))

    w: dict[str, np.ndarray] = {}
    w["model.embed_tokens.weight"] = mat(vocab, E, 0.5)
    for i in range(TINY["n_layer"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(E)
        w[p + "self_attn.q_proj.weight"] = mat(H * D, E, 0.15)
        w[p + "self_attn.k_proj.weight"] = mat(KV * D, E, 0.15)
        w[p + "self_attn.v_proj.weight"] = mat(KV * D, E, 0.15)
        w[p + "self_attn.o_proj.weight"] = mat(E, H * D, 0.1)
        w[p + "post_attention_layernorm.weight"] = norm(E)
        w[p + "mlp.gate_proj.weight"] = mat(F, E, 0.15)
        w[p + "mlp.up_proj.weight"] = mat(F, E, 0.15)
        w[p + "mlp.down_proj.weight"] = mat(E, F, 0.1)
    w["model.norm.weight"] = norm(E)
    w["lm_head.weight"] = mat(vocab, E, 0.2)
    return w


HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def hf_to_gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    assert parts[0] == "model" and parts[1] == "layers", name
    return f"blk.{parts[2]}." + HF_TO_GGUF_LAYER[".".join(parts[3:])]


GGUF_ORDER = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]


def gguf_tensor_order(n_layer: int, tied: bool = False) -> list[str]:
    names = ["token_embd.weight"]
    for i in range(n_layer):
        names += [f"blk.{i}.{t}.weight" for t in GGUF_ORDER]
    names.append("output_norm.weight")
    if not tied:
        names.append("output.weight")
    return names


def hf_to_gguf_tensors(hf: dict[str, np.ndarray], n_head: int, n_head_kv: int) -> dict[str, np.ndarray]:
    out = {}
    for name, t in hf.items():
        if name.endswith("q_proj.weight"):
            t = permute(t, n_head, n_head)
        elif name.endswith("k_proj.weight"):
            t = permute(t, n_head, n_head_kv)
        out[hf_to_gguf_name(name)] = np.ascontiguousarray(t)
    return out


def llama_kvs(hp: dict[str, Any], tk: dict[str, Any], name: str, file_type: int,
              extra: list[KV] | None = None) -> list[KV]:
    """Model metadata in the order and with the types llama.cpp's converter writes them."""
    kvs: list[KV] = [
        ("general.type", "model", VT.STRING, None),
        ("general.name", name, VT.STRING, None),
        ("llama.block_count", hp["n_layer"], VT.UINT32, None),
        ("llama.context_length", hp["n_ctx"], VT.UINT32, None),
        ("llama.embedding_length", hp["n_embd"], VT.UINT32, None),
        ("llama.feed_forward_length", hp["n_ff"], VT.UINT32, None),
        ("llama.attention.head_count", hp["n_head"], VT.UINT32, None),
        ("llama.attention.head_count_kv", hp["n_head_kv"], VT.UINT32, None),
        ("llama.rope.freq_base", hp["rope_theta"], VT.FLOAT32, None),
        ("llama.attention.layer_norm_rms_epsilon", hp["rms_eps"], VT.FLOAT32, None),
        ("general.file_type", file_type, VT.UINT32, None),
        ("llama.vocab_size", len(tk["tokens"]), VT.UINT32, None),
        ("llama.rope.dimension_count", hp["head_dim"], VT.UINT32, None),
        ("tokenizer.ggml.model", "gpt2", VT.STRING, None),
        ("tokenizer.ggml.pre", "gpt-2", VT.STRING, None),
        ("tokenizer.ggml.tokens", tk["tokens"], VT.ARRAY, VT.STRING),
        ("tokenizer.ggml.token_type", tk["token_types"], VT.ARRAY, VT.INT32),
        ("tokenizer.ggml.merges", tk["merges"], VT.ARRAY, VT.STRING),
        ("tokenizer.ggml.bos_token_id", tk["bos_token_id"], VT.UINT32, None),
        ("tokenizer.ggml.eos_token_id", tk["eos_token_id"], VT.UINT32, None),
        ("tokenizer.ggml.add_bos_token", True, VT.BOOL, None),
        ("tokenizer.chat_template", CHAT_TEMPLATE, VT.STRING, None),
    ]
    kvs += extra or []
    kvs.append(("general.quantization_version", gguf.GGML_QUANT_VERSION, VT.UINT32, None))
    return kvs


def gguf_tensor_list(g: dict[str, np.ndarray], order: list[str], quant: QT | None) -> list:
    out = []
    for name in order:
        t = g[name]
        if quant is not None and t.ndim == 2:
            out.append((name, gguf.quants.quantize(t, quant), quant))
        else:
            out.append((name, t.astype(np.float32), None))
    return out


def gguf_file_record(path: Path, rel: str, with_values: bool) -> dict[str, Any]:
    r = gguf.GGUFReader(path)
    recs = []
    for t in r.tensors:
        rec = tensor_record(t, r.data_offset)
        deq = dequant(t)
        rec.update(stats(deq))
        rec["dequant_sha256"] = sha256_bytes(f32_le_bytes(deq))
        recs.append(rec)
    return {"file": rel, "size": path.stat().st_size, "sha256": sha256_file(path), **header_record(r),
            "kv_keys": [f.name for n, f in r.fields.items() if not n.startswith("GGUF.")],
            "tensors": recs}


def crosscheck_llama_tokenize(binp: Path | None, model: Path, cases: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Tokenize every case with llama.cpp's llama-tokenize (BOS added, special tokens parsed) and compare."""
    if binp is None or not binp.exists():
        return None
    mismatches = []
    for c in cases:
        p = subprocess.run([str(binp), "-m", str(model), "-p", c["text"], "--ids", "--log-disable"],
                           capture_output=True, text=True, check=True)
        ids = json.loads(p.stdout.strip().splitlines()[-1])
        if ids != c["ids_add_special"]:
            mismatches.append({"text": c["text"], "llama_cpp_ids": ids})
    if mismatches:
        print(f"  warning: llama-tokenize disagrees with tokenizers on {len(mismatches)} case(s)", file=sys.stderr)
    return {"tool": "llama-tokenize (llama.cpp vendored in llama-cpp-python 0.3.36) on gguf/tiny_llama.gguf",
            "compared": "ids_add_special", "all_match": not mismatches, "mismatches": mismatches}


def gen_tiny(out: Path, tok, tokenize_bin: Path | None = None) -> dict[str, Any]:
    tk = tokenizer_info(tok)
    vocab = len(tk["tokens"])
    hp = dict(TINY)
    hf = make_tiny_hf_weights(vocab)
    g = hf_to_gguf_tensors(hf, hp["n_head"], hp["n_head_kv"])
    order = gguf_tensor_order(hp["n_layer"])
    d = out / "gguf"

    # F32 model (llama.cpp's ALL_F32 = file_type 0)
    p_f32 = d / "tiny_llama.gguf"
    write_gguf(p_f32, "llama", llama_kvs(hp, tk, "tiny-llama", 0), gguf_tensor_list(g, order, None))
    # Q8_0 model: 2-D matrices Q8_0, 1-D norms F32 (MOSTLY_Q8_0 = file_type 7)
    p_q8 = d / "tiny_llama_q8_0.gguf"
    write_gguf(p_q8, "llama", llama_kvs(hp, tk, "tiny-llama", 7), gguf_tensor_list(g, order, QT.Q8_0))
    # GGUF v2: same bytes, version field = 2 (v2 and v3 share the little-endian layout)
    b = bytearray(p_f32.read_bytes())
    assert struct.unpack_from("<I", b, 4)[0] == 3
    struct.pack_into("<I", b, 4, 2)
    p_v2 = d / "tiny_llama_v2.gguf"
    p_v2.write_bytes(bytes(b))

    # check: GGUFReader gives back exactly the HF weights after the permutation, and v2 == v3
    r = gguf.GGUFReader(p_f32)
    rv2 = gguf.GGUFReader(p_v2)
    assert reader_version(rv2) == 2 and reader_version(r) == 3
    by_name = {t.name: t for t in r.tensors}
    for name, arr in g.items():
        got = np.asarray(by_name[name].data)
        assert got.shape == arr.shape and np.array_equal(got, arr), name
    for t2 in rv2.tensors:
        assert np.array_equal(np.asarray(t2.data), np.asarray(by_name[t2.name].data))

    # row permutations as index lists: gguf_row[i] = hf_row[perm[i]]
    E = hp["n_embd"]
    perm_q = permute(np.arange(hp["n_head"] * hp["head_dim"]), hp["n_head"], hp["n_head"]).tolist()
    perm_k = permute(np.arange(hp["n_head_kv"] * hp["head_dim"]), hp["n_head"], hp["n_head_kv"]).tolist()

    chat, jinja_version = chat_cases("<|begin_of_text|>")
    expect = {
        "produced_by": (f"numpy weights (seeded, bf16-exact) written with gguf.GGUFWriter and read back with "
                        f"gguf.GGUFReader (gguf {gguf_version()}); tokenizer from tokenizers "
                        f"{tokenizers_version()}; chat template rendered with jinja2 {jinja_version}"),
        "hparams": {
            "architecture": "llama",
            "block_count": hp["n_layer"], "context_length": hp["n_ctx"], "embedding_length": E,
            "feed_forward_length": hp["n_ff"], "head_count": hp["n_head"], "head_count_kv": hp["n_head_kv"],
            "head_dim": hp["head_dim"], "rope_dimension_count": hp["head_dim"], "rope_freq_base": hp["rope_theta"],
            "layer_norm_rms_epsilon": float(np.float32(hp["rms_eps"])), "vocab_size": vocab,
            "tied_embeddings": False,
        },
        "files": {
            "f32": gguf_file_record(p_f32, "gguf/tiny_llama.gguf", True),
            "q8_0": gguf_file_record(p_q8, "gguf/tiny_llama_q8_0.gguf", True),
            "v2": {"file": "gguf/tiny_llama_v2.gguf", "size": p_v2.stat().st_size, "sha256": sha256_file(p_v2),
                   "version": 2, "same_as": "gguf/tiny_llama.gguf",
                   "differs_only_in": "bytes 4..8 (version u32 = 2)"},
        },
        "hf_to_gguf_names": {n: hf_to_gguf_name(n) for n in hf},
        "permutation": {
            "description": ("GGUF attn_q/attn_k rows = llama.cpp LlamaModel.permute(HF q_proj/k_proj): "
                            "w.reshape(n, 2, rows//n//2, cols).swapaxes(1, 2).reshape(rows, cols) with n = "
                            "head_count for q and head_count_kv for k. gguf_row[i] = hf_row[perm[i]]"),
            "attn_q": perm_q,
            "attn_k": perm_k,
        },
        "tokenizer": {
            "model": "gpt2", "pre": "gpt-2",
            "bos_token_id": tk["bos_token_id"], "eos_token_id": tk["eos_token_id"],
            "end_of_text_id": tk["end_of_text_id"], "add_bos_token": True,
            "special_tokens": {s: tok.token_to_id(s) for s in SPECIAL_TOKENS},
            "n_tokens": vocab, "n_merges": len(tk["merges"]),
            "cases": tokenizer_cases(tok),
        },
        "chat_template": CHAT_TEMPLATE,
        "chat_template_cases": chat,
    }
    expect["tokenizer"]["llama_cpp_crosscheck"] = crosscheck_llama_tokenize(tokenize_bin, p_f32,
                                                                            expect["tokenizer"]["cases"])
    write_json(d / "tiny_llama.json", expect)
    return {"hf": hf, "gguf": g, "tk": tk, "hp": hp, "order": order, "expect": expect}


# ----------------------------------------------------------------------------------------------
# (c) HF checkpoints
# ----------------------------------------------------------------------------------------------

def hf_config(hp: dict[str, Any], vocab: int, tk: dict[str, Any], *, tied: bool = False, dtype: str = "float32",
              llama31: bool = False, v5: bool = False) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tk["bos_token_id"],
        "eos_token_id": [tk["end_of_text_id"], tk["eos_token_id"]] if (llama31 or v5) else tk["eos_token_id"],
        "head_dim": hp["head_dim"],
        "hidden_act": "silu",
        "hidden_size": hp["n_embd"],
        "initializer_range": 0.02,
        "intermediate_size": hp["n_ff"],
        "max_position_embeddings": 131072 if (llama31 or v5) else hp["n_ctx"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": hp["n_head"],
        "num_hidden_layers": hp["n_layer"],
        "num_key_value_heads": hp["n_head_kv"],
        "pretraining_tp": 1,
        "rms_norm_eps": hp["rms_eps"],
        "tie_word_embeddings": tied,
        "use_cache": True,
        "vocab_size": vocab,
    }
    llama3_params = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}
    if v5:
        # transformers v5: rope_parameters replaces rope_theta/rope_scaling, "dtype" replaces "torch_dtype"
        cfg["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "llama3", **llama3_params}
        cfg["dtype"] = dtype
        cfg["transformers_version"] = "5.0.0"
    else:
        if llama31:
            cfg["rope_scaling"] = {"rope_type": "llama3", **llama3_params}
            cfg["rope_theta"] = 500000.0
        else:
            cfg["rope_scaling"] = None
            cfg["rope_theta"] = hp["rope_theta"]
        cfg["torch_dtype"] = dtype
        cfg["transformers_version"] = "4.46.0"
    return dict(sorted(cfg.items()))


def tokenizer_config(tk: dict[str, Any]) -> dict[str, Any]:
    added = {}
    for s in SPECIAL_TOKENS:
        i = tk["tokens"].index(s)
        added[str(i)] = {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
    return {
        "added_tokens_decoder": added,
        "bos_token": "<|begin_of_text|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def save_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """Write with the safetensors package. dtype 'F32' uses safetensors.numpy; 'BF16' passes bf16 bit
    patterns (round-to-nearest-even) through safetensors.serialize_file, since numpy has no bf16."""
    import safetensors
    import safetensors.numpy

    meta = {"format": "pt"}
    if dtype == "F32":
        safetensors.numpy.save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                                    str(path), metadata=meta)
    elif dtype == "BF16":
        keep = {k: np.ascontiguousarray(bf16_bits(v)) for k, v in tensors.items()}
        specs = {k: safetensors.TensorSpec(dtype="bfloat16", shape=list(a.shape), data_ptr=a.ctypes.data,
                                           data_len=a.nbytes) for k, a in keep.items()}
        safetensors.serialize_file(specs, str(path), metadata=meta)
        del keep
    else:
        raise ValueError(dtype)


def read_safetensors(path: Path) -> dict[str, dict[str, Any]]:
    """Read back with safetensors.safe_open (framework numpy for F32; raw header for BF16)."""
    import safetensors

    out = {}
    with safetensors.safe_open(str(path), framework="numpy") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            out[k] = {"dtype": sl.get_dtype(), "shape": list(sl.get_shape())}
    # raw bytes via the header (works for BF16 too), for value checks
    raw = path.read_bytes()
    n = struct.unpack_from("<Q", raw, 0)[0]
    header = json.loads(raw[8:8 + n])
    for k, v in header.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        out[k]["data_offsets"] = [s, e]
        out[k]["_bytes"] = raw[8 + n + s: 8 + n + e]
    return out


def st_values(rec: dict[str, Any]) -> np.ndarray:
    b = rec["_bytes"]
    if rec["dtype"] == "F32":
        return np.frombuffer(b, dtype="<f4").reshape(rec["shape"])
    if rec["dtype"] == "BF16":
        u = np.frombuffer(b, dtype="<u2").astype(np.uint32) << 16
        return u.view(np.float32).reshape(rec["shape"])
    raise ValueError(rec["dtype"])


def write_tokenizer_files(d: Path, tk: dict[str, Any]) -> None:
    (d / "tokenizer.json").write_text(tk["json"] + "\n", encoding="utf-8")
    write_json(d / "tokenizer_config.json", tokenizer_config(tk))
    write_json(d / "special_tokens_map.json", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})


def link_or_copy(src: Path, dst: Path) -> str:
    """Symlink dst -> src (relative) so variants that differ only in config.json share weights."""
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    rel = os.path.relpath(src, dst.parent)
    try:
        dst.symlink_to(rel)
        return "symlink"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"


def gen_hf(out: Path, tiny: dict[str, Any], tok) -> None:
    hf, tk, hp = tiny["hf"], tiny["tk"], tiny["hp"]
    vocab = len(tk["tokens"])
    dirs = {}

    def fresh(name: str) -> Path:
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    # hf_tiny: single file, F32, untied
    d = fresh("hf_tiny")
    write_json(d / "config.json", hf_config(hp, vocab, tk))
    write_json(d / "generation_config.json", {"bos_token_id": tk["bos_token_id"],
                                              "eos_token_id": [tk["end_of_text_id"], tk["eos_token_id"]],
                                              "do_sample": False})
    save_safetensors(d / "model.safetensors", hf, "F32")
    write_tokenizer_files(d, tk)
    dirs["hf_tiny"] = {"dtype": "F32", "tied": False, "files": ["model.safetensors"]}

    # hf_tiny_sharded: two shards + index, BF16
    d = fresh("hf_tiny_sharded")
    write_json(d / "config.json", hf_config(hp, vocab, tk, dtype="bfloat16"))
    names = list(hf.keys())
    # shard 1: embeddings + layer 0; shard 2: the rest (like transformers' size-based sharding)
    first = [n for n in names if n == "model.embed_tokens.weight" or n.startswith("model.layers.0.")]
    second = [n for n in names if n not in first]
    shard_files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    total = 0
    for fname, group in zip(shard_files, [first, second]):
        save_safetensors(d / fname, {n: hf[n] for n in group}, "BF16")
        for n in group:
            weight_map[n] = fname
            total += hf[n].size * 2
    write_json(d / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                    "weight_map": dict(sorted(weight_map.items()))})
    write_tokenizer_files(d, tk)
    dirs["hf_tiny_sharded"] = {"dtype": "BF16", "tied": False, "files": shard_files,
                               "index": "model.safetensors.index.json"}

    # hf_tiny_tied: single file, BF16, tie_word_embeddings, no lm_head.weight
    d = fresh("hf_tiny_tied")
    write_json(d / "config.json", hf_config(hp, vocab, tk, tied=True, dtype="bfloat16"))
    save_safetensors(d / "model.safetensors", {n: a for n, a in hf.items() if n != "lm_head.weight"}, "BF16")
    write_tokenizer_files(d, tk)
    dirs["hf_tiny_tied"] = {"dtype": "BF16", "tied": True, "files": ["model.safetensors"]}

    # config-only variants: weights and tokenizer are symlinks into hf_tiny/
    for name, kw in [("hf_tiny_llama31", dict(llama31=True)), ("hf_tiny_v5", dict(v5=True))]:
        d = fresh(name)
        write_json(d / "config.json", hf_config(hp, vocab, tk, **kw))
        how = {}
        for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "generation_config.json"]:
            how[f] = link_or_copy(out / "hf_tiny" / f, d / f)
        dirs[name] = {"dtype": "F32", "tied": False, "files": ["model.safetensors"],
                      "shared_with_hf_tiny": how}

    # read everything back with safetensors and check it against the GGUF tensors
    g = tiny["gguf"]
    hf_rec: dict[str, Any] = {}
    for name, info in dirs.items():
        d = out / name
        tensors: dict[str, Any] = {}
        for fname in info["files"]:
            for k, rec in read_safetensors(d / fname).items():
                vals = st_values(rec)
                want = hf[k]
                assert np.array_equal(vals, want), (name, k)  # weights are bf16-exact: F32 == BF16 values
                gname = hf_to_gguf_name(k)
                if k.endswith("q_proj.weight"):
                    assert np.array_equal(permute(vals, hp["n_head"], hp["n_head"]), g[gname])
                elif k.endswith("k_proj.weight"):
                    assert np.array_equal(permute(vals, hp["n_head"], hp["n_head_kv"]), g[gname])
                else:
                    assert np.array_equal(vals, g[gname])
                tensors[k] = {"file": fname, "dtype": rec["dtype"], "shape": rec["shape"],
                              "data_offsets": rec["data_offsets"], "gguf_name": gname,
                              "permute": ("q" if k.endswith("q_proj.weight") else
                                          "k" if k.endswith("k_proj.weight") else None)}
        cfg = json.loads((d / "config.json").read_text())
        info = dict(info)
        info["tensors"] = dict(sorted(tensors.items()))
        info["config"] = expected_config(cfg)
        hf_rec[name] = info

    hp_l3 = hf_config(hp, vocab, tk, llama31=True)["rope_scaling"]
    rope_freqs = llama3_rope_factors(500000.0, hp["head_dim"], hp_l3["factor"], hp_l3["low_freq_factor"],
                                     hp_l3["high_freq_factor"], hp_l3["original_max_position_embeddings"])
    write_json(out / "hf_tiny.json", {
        "produced_by": (f"safetensors {safetensors_version()} (numpy save_file for F32, serialize_file for BF16), "
                        f"read back with safetensors.safe_open; tokenizer.json from tokenizers {tokenizers_version()}"),
        "same_weights_as": "gguf/tiny_llama.gguf (after LlamaModel.permute of q_proj/k_proj; see gguf/tiny_llama.json)",
        "values_note": "all weights are exactly representable in bf16, so F32 and BF16 checkpoints hold identical values",
        "dirs": hf_rec,
        "llama3_rope_freqs": {
            "description": ("rope_freqs.weight llama.cpp's converter would emit for hf_tiny_llama31 / hf_tiny_v5 "
                            "(LlamaModel.generate_extra_tensors): one factor per rotary pair, divide the "
                            "frequency by it"),
            "rope_theta": 500000.0, "head_dim": hp["head_dim"], "factors": rope_freqs,
        },
    })


def expected_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a loader should derive from config.json, whichever transformers version wrote it."""
    rp = cfg.get("rope_parameters")
    if rp is not None:
        theta = rp["rope_theta"]
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if scaling.get("rope_type") == "default":
            scaling = None
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling")
    return {
        "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_hidden_layers"], "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_key_value_heads"], "head_dim": cfg["head_dim"],
        "vocab_size": cfg["vocab_size"], "rms_norm_eps": cfg["rms_norm_eps"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "rope_theta": theta, "rope_scaling": scaling, "tie_word_embeddings": cfg["tie_word_embeddings"],
        "dtype": cfg.get("dtype", cfg.get("torch_dtype")),
    }


# ----------------------------------------------------------------------------------------------
# (d) gguf-split set
# ----------------------------------------------------------------------------------------------

def gen_split(out: Path, tiny: dict[str, Any], gguf_split_bin: Path | None) -> None:
    d = out / "split"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    hp, tk, g, order = tiny["hp"], tiny["tk"], tiny["gguf"], tiny["order"]
    # Written shard by shard with GGUFWriter, mirroring llama.cpp's gguf-split (tools/gguf-split/gguf-split.cpp):
    # the first file carries all model metadata, every file then gets split.no (u16), split.tensors.count (i32)
    # and split.count (u16) -- in that order, since gguf-split sets split.count last. Non-first files have no
    # other keys (not even general.architecture). GGUFWriter(split_max_tensors=...) writes the same keys but
    # orders split.count before split.tensors.count.
    max_t = math.ceil(len(order) / 3)
    chunks = [order[i:i + max_t] for i in range(0, len(order), max_t)]
    n_split = len(chunks)
    tl = {name: (arr, q) for name, arr, q in gguf_tensor_list(g, order, None)}
    for i, names in enumerate(chunks):
        kvs = llama_kvs(hp, tk, "tiny-llama", 0) if i == 0 else []
        kvs = kvs + [("split.no", i, VT.UINT16, None), ("split.tensors.count", len(order), VT.INT32, None),
                     ("split.count", n_split, VT.UINT16, None)]
        path = d / f"tiny_llama-{i + 1:05d}-of-{n_split:05d}.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        w = gguf.GGUFWriter(path, "llama")
        if i != 0:
            del w.kv_data[0]["general.architecture"]
        for key, val, vtype, sub in kvs:
            w.add_key_value(key, val, vtype, sub_type=sub)
        for name in names:
            arr, q = tl[name]
            w.add_tensor(name, arr) if q is None else w.add_tensor(name, arr, raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    files = sorted(d.glob("tiny_llama-*-of-*.gguf"))
    assert [f.name for f in files] == [f"tiny_llama-{i:05d}-of-00003.gguf" for i in (1, 2, 3)], files

    src = gguf.GGUFReader(out / "gguf" / "tiny_llama.gguf")
    src_t = {t.name: t for t in src.tensors}
    recs = []
    seen = []
    for i, f in enumerate(files):
        r = gguf.GGUFReader(f)
        kvs = kv_records(r)
        kvd = {k["key"]: k for k in kvs}
        assert kvd["split.no"]["value"] == i and kvd["split.no"]["type"] == "UINT16"
        assert kvd["split.count"]["value"] == 3 and kvd["split.count"]["type"] == "UINT16"
        assert kvd["split.tensors.count"]["value"] == len(order) and kvd["split.tensors.count"]["type"] == "INT32"
        for t in r.tensors:
            assert np.array_equal(np.asarray(t.data), np.asarray(src_t[t.name].data))
            seen.append(t.name)
        recs.append({
            "file": f.name, "split_no": i, "size": f.stat().st_size, "sha256": sha256_file(f),
            **header_record(r),
            "kv": [k for k in kvs if k["key"].startswith("split.")],
            "kv_keys": [k["key"] for k in kvs],
            "tensors": [tensor_record(t, r.data_offset) for t in r.tensors],
        })
    assert seen == [t.name for t in src.tensors]

    cross = None
    if gguf_split_bin is not None and gguf_split_bin.exists():
        cross = crosscheck_gguf_split(gguf_split_bin, out / "gguf" / "tiny_llama.gguf", max_t, recs)

    write_json(d / "split.json", {
        "produced_by": (f"gguf.GGUFWriter per shard, keys as llama.cpp's gguf-split writes them, {max_t} tensors per "
                        f"file (gguf {gguf_version()}); read back with GGUFReader"),
        "source": "gguf/tiny_llama.gguf",
        "split_count": 3,
        "tensors_count": len(order),
        "note": "only the first file carries the model metadata; every file carries split.no/split.count/split.tensors.count",
        "files": recs,
        "llama_gguf_split_crosscheck": cross,
    })


def crosscheck_gguf_split(binp: Path, src: Path, max_t: int, recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Split the same file with llama.cpp's llama-gguf-split and compare keys and tensor placement."""
    with tempfile.TemporaryDirectory() as td:
        prefix = Path(td) / "tiny_llama"
        subprocess.run([str(binp), "--split", "--split-max-tensors", str(max_t), str(src), str(prefix)],
                       check=True, capture_output=True)
        files = sorted(Path(td).glob("tiny_llama-*-of-*.gguf"))
        assert len(files) == len(recs), files
        same_bytes = []
        for f, rec in zip(files, recs):
            r = gguf.GGUFReader(f)
            kvs = kv_records(r)
            assert [k["key"] for k in kvs] == rec["kv_keys"], ([k["key"] for k in kvs], rec["kv_keys"])
            assert [k for k in kvs if k["key"].startswith("split.")] == rec["kv"]
            assert [t.name for t in r.tensors] == [t["name"] for t in rec["tensors"]]
            same_bytes.append(sha256_file(f) == rec["sha256"])
        return {"tool": "llama-gguf-split (llama.cpp vendored in llama-cpp-python 0.3.36)",
                "same_keys_and_tensor_placement": True, "byte_identical": same_bytes}


# ----------------------------------------------------------------------------------------------
# (e) byte-split pieces
# ----------------------------------------------------------------------------------------------

def gen_cat(out: Path) -> None:
    d = out / "cat"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    src = out / "gguf" / "tiny_llama.gguf"
    data = src.read_bytes()
    r = gguf.GGUFReader(src)
    cut1 = 1001                      # inside the metadata (the tokenizer arrays)
    cut2 = r.data_offset + 12345 + 2  # inside the tensor data, not aligned
    assert 24 < cut1 < r.data_offset < cut2 < len(data)
    cuts = [0, cut1, cut2, len(data)]
    pieces = []
    for i in range(3):
        name = f"tiny_llama.gguf.cat{i}"
        chunk = data[cuts[i]:cuts[i + 1]]
        (d / name).write_bytes(chunk)
        pieces.append({"file": name, "offset": cuts[i], "size": len(chunk), "sha256": sha256_bytes(chunk)})
    joined = b"".join((d / p["file"]).read_bytes() for p in pieces)
    assert joined == data
    write_json(d / "cat.json", {
        "produced_by": "byte slices of gguf/tiny_llama.gguf (Python)",
        "source": "gguf/tiny_llama.gguf",
        "total_size": len(data), "sha256": sha256_bytes(data),
        "gguf_data_offset": int(r.data_offset),
        "cuts": cuts[1:-1],
        "cut_locations": ["metadata (KV section)", "tensor data"],
        "pieces": pieces,
    })


# ----------------------------------------------------------------------------------------------
# (f) llamafile-like archives
# ----------------------------------------------------------------------------------------------

APE_PREFIX = (
    b"MZqFpD='\n"
    b"# Tessera test fixture: an APE/llamafile-like shell prefix followed by a ZIP archive.\n"
    b"# It is not a program; the ZIP's stored entry tiny_llama.gguf is the model.\n"
    b"'\n"
    b"echo 'tessera fixture: not executable' >&2\n"
    b"exit 1\n"
)
def args_entry(gguf_name: str) -> bytes:  # like a llamafile's .args
    return b"-m\n" + gguf_name.encode() + b"\n-c\n256\n...\n"
PAD_EXTRA_ID = 0xD935  # the id Android's zipalign uses for its alignment padding field


def _pad_extra(header_offset: int, name_len: int, other_extra_len: int, align: int) -> bytes:
    """Extra field that makes (header_offset + 30 + name + extra) a multiple of align."""
    base = header_offset + 30 + name_len + other_extra_len + 4 + 2  # 4 = extra header, 2 = alignment value
    pad = (-base) % align
    return struct.pack("<HHH", PAD_EXTRA_ID, 2 + pad, align) + b"\0" * pad


def build_llamafile(path: Path, gguf_bytes: bytes, entry: str, align: int) -> None:
    with open(path, "wb") as f:
        f.write(APE_PREFIX)
        with zipfile.ZipFile(f, "w") as z:
            zi = zipfile.ZipInfo(".args", date_time=ZIP_DATE_TIME)
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = 0o644 << 16
            z.writestr(zi, args_entry(entry), compresslevel=9)
            zi = zipfile.ZipInfo(entry, date_time=ZIP_DATE_TIME)
            zi.compress_type = zipfile.ZIP_STORED
            zi.external_attr = 0o644 << 16
            zi.extra = _pad_extra(z.start_dir, len(zi.filename.encode()), 0, align)
            z.writestr(zi, gguf_bytes)


def build_zip64_llamafile(path: Path, gguf_bytes: bytes, entry: str, align: int) -> None:
    """ZIP64 structures written by hand: 0xFFFFFFFF sizes/offsets in local and central headers with the
    zip64 extended information extra field (0x0001), a Zip64 end of central directory record + locator,
    and a classic EOCD with 0xFFFF / 0xFFFFFFFF."""
    dos_time = (ZIP_DATE_TIME[3] << 11) | (ZIP_DATE_TIME[4] << 5) | (ZIP_DATE_TIME[5] // 2)
    dos_date = ((ZIP_DATE_TIME[0] - 1980) << 9) | (ZIP_DATE_TIME[1] << 5) | ZIP_DATE_TIME[2]
    out = bytearray(APE_PREFIX)
    central = bytearray()
    entries = [(".args", zipfile.ZIP_DEFLATED, args_entry(entry)), (entry, zipfile.ZIP_STORED, gguf_bytes)]
    for name, method, content in entries:
        nb = name.encode()
        crc = zlib.crc32(content) & 0xFFFFFFFF
        if method == zipfile.ZIP_DEFLATED:
            co = zlib.compressobj(9, zlib.DEFLATED, -15)
            payload = co.compress(content) + co.flush()
        else:
            payload = content
        header_offset = len(out)
        z64_local = struct.pack("<HHQQ", 0x0001, 16, len(content), len(payload))
        extra = z64_local
        if method == zipfile.ZIP_STORED:
            extra += _pad_extra(header_offset, len(nb), len(z64_local), align)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, method, dos_time, dos_date, crc,
                           0xFFFFFFFF, 0xFFFFFFFF, len(nb), len(extra))
        out += nb + extra
        out += payload
        z64_central = struct.pack("<HHQQQ", 0x0001, 24, len(content), len(payload), header_offset)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | 45, 45, 0, method, dos_time, dos_date,
                               crc, 0xFFFFFFFF, 0xFFFFFFFF, len(nb), len(z64_central), 0, 0, 0, 0o644 << 16,
                               0xFFFFFFFF)
        central += nb + z64_central
    cd_offset = len(out)
    out += central
    z64_eocd_offset = len(out)
    n = len(entries)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, (3 << 8) | 45, 45, 0, 0, n, n, len(central), cd_offset)
    out += struct.pack("<IIQI", 0x07064B50, 0, z64_eocd_offset, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(bytes(out))


def archive_record(path: Path, gguf_source: str, gguf_bytes: bytes, entry: str, align: int,
                   zip64: bool) -> dict[str, Any]:
    raw = path.read_bytes()
    entries = []
    gguf_off = None
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        for zi in z.infolist():
            # local header: fixed 30 bytes, then name and extra of the *local* header
            lh = raw[zi.header_offset: zi.header_offset + zipfile.sizeFileHeader]
            fields = struct.unpack(zipfile.structFileHeader, lh)
            assert fields[0] == zipfile.stringFileHeader
            n_len = fields[zipfile._FH_FILENAME_LENGTH]
            e_len = fields[zipfile._FH_EXTRA_FIELD_LENGTH]
            data_off = zi.header_offset + zipfile.sizeFileHeader + n_len + e_len
            content = z.read(zi.filename)
            entries.append({
                "name": zi.filename,
                "compress_type": {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}[zi.compress_type],
                "header_offset": zi.header_offset,
                "local_header_len": zipfile.sizeFileHeader + n_len + e_len,
                "data_offset": data_off,
                "compress_size": zi.compress_size,
                "file_size": zi.file_size,
                "crc32": zi.CRC,
            })
            if zi.filename == entry:
                assert content == gguf_bytes
                assert raw[data_off: data_off + len(gguf_bytes)] == gguf_bytes
                gguf_off = data_off
    assert gguf_off is not None and gguf_off % align == 0
    return {
        "file": path.name, "size": len(raw), "zip64": zip64, "prefix_len": len(APE_PREFIX),
        "gguf_entry": entry, "gguf_source": gguf_source,
        "gguf_data_offset": gguf_off, "gguf_size": len(gguf_bytes), "gguf_sha256": sha256_bytes(gguf_bytes),
        "alignment": align, "entries": entries,
    }


def gen_llamafiles(out: Path) -> None:
    d = out / "llamafile"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    f32 = (out / "gguf" / "tiny_llama.gguf").read_bytes()
    q8 = (out / "gguf" / "tiny_llama_q8_0.gguf").read_bytes()
    build_llamafile(d / "tiny.llamafile", f32, "tiny_llama.gguf", 64)
    # the ZIP64 one carries the Q8_0 model (keeps the fixture small) and page-aligns it
    build_zip64_llamafile(d / "tiny_zip64.llamafile", q8, "tiny_llama_q8_0.gguf", 4096)
    recs = [archive_record(d / "tiny.llamafile", "gguf/tiny_llama.gguf", f32, "tiny_llama.gguf", 64, False),
            archive_record(d / "tiny_zip64.llamafile", "gguf/tiny_llama_q8_0.gguf", q8, "tiny_llama_q8_0.gguf",
                           4096, True)]
    # the ZIP64 archive really uses the ZIP64 structures
    raw = (d / "tiny_zip64.llamafile").read_bytes()
    assert raw.rfind(struct.pack("<I", 0x06064B50)) > 0 and raw.rfind(struct.pack("<I", 0x07064B50)) > 0
    write_json(d / "archives.json", {
        "produced_by": (f"Python {sys.version.split()[0]} zipfile (tiny.llamafile) and struct.pack "
                        f"(tiny_zip64.llamafile); offsets computed with zipfile: header_offset + local header length"),
        "archives": recs,
    })


# ----------------------------------------------------------------------------------------------
# reference logits from llama.cpp (optional: needs scripts/build-llama-cpp.sh's build tree)
# ----------------------------------------------------------------------------------------------

LOGITS_CPP = r"""
// tessera-ref-logits: print llama.cpp's logits for every position of a token sequence.
// usage: tessera-ref-logits MODEL.gguf N_THREADS OUT.f32 TOKEN_ID...
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <vector>
static void quiet(enum ggml_log_level, const char *, void *) {}
int main(int argc, char ** argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s MODEL N_THREADS OUT.f32 TOKEN...\n", argv[0]); return 2; }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "load failed\n"); return 1; }
    std::vector<llama_token> toks;
    for (int i = 4; i < argc; i++) toks.push_back((llama_token) atoi(argv[i]));
    const int n = (int) toks.size();
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256; cp.n_batch = 256; cp.n_ubatch = 256;
    cp.n_threads = cp.n_threads_batch = atoi(argv[2]);
    cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32;          // no F16 rounding in the KV cache
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "context failed\n"); return 1; }
    llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = toks[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    b.n_tokens = n;
    if (llama_decode(ctx, b) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * f = fopen(argv[3], "wb");
    for (int i = 0; i < n; i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, f);
    fclose(f);
    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    printf("%d %d\n", n, n_vocab);
    return 0;
}
"""


def build_ref_logits_tool() -> Path | None:
    """Compile LOGITS_CPP against the static libllama that scripts/build-llama-cpp.sh built."""
    src_root = CACHE / "src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    build = CACHE / "build" / "llama.cpp-0.3.36"
    libs = [build / "src" / "libllama.a", build / "ggml" / "src" / "libggml.a",
            build / "ggml" / "src" / "libggml-cpu.a", build / "ggml" / "src" / "libggml-base.a"]
    if not all(p.exists() for p in libs) or shutil.which("g++") is None:
        return None
    out = CACHE / "llama.cpp" / "bin" / "tessera-ref-logits"
    src = CACHE / "llama.cpp" / "tessera-ref-logits.cpp"
    src.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and src.exists() and src.read_text() == LOGITS_CPP and \
            out.stat().st_mtime >= max(p.stat().st_mtime for p in libs):
        return out
    src.write_text(LOGITS_CPP)
    cmd = ["g++", "-O2", "-std=c++17", str(src), "-o", str(out),
           f"-I{src_root / 'include'}", f"-I{src_root / 'ggml' / 'include'}",
           *map(str, libs), "-fopenmp", "-lpthread", "-ldl"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"  warning: could not build tessera-ref-logits:\n{p.stderr[-1500:]}", file=sys.stderr)
        return None
    return out


def numpy_hf_forward(w: dict[str, np.ndarray], hp: dict[str, Any], ids: list[int]) -> np.ndarray:
    """Plain float64 Hugging Face Llama forward pass (rotate_half RoPE on HF-layout q/k), used only to check
    that the GGUF (permuted) and HF files describe the same model as llama.cpp sees it."""
    E, H, KVH, D, eps, theta = (hp["n_embd"], hp["n_head"], hp["n_head_kv"], hp["head_dim"], hp["rms_eps"],
                                hp["rope_theta"])
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x):
        inv = 1.0 / (theta ** (np.arange(0, D, 2) / D))
        ang = pos[:, None] * inv[None, :]
        cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
        sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
        rot = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
        return x * cos + rot * sin

    x = w["model.embed_tokens.weight"][np.array(ids)].astype(np.float64)
    for layer in range(hp["n_layer"]):
        p = f"model.layers.{layer}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, H, D))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, KVH, D))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, KVH, D)
        k = np.repeat(k, H // KVH, axis=1)
        v = np.repeat(v, H // KVH, axis=1)
        sc = np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + np.triu(np.full((T, T), -np.inf), 1)[None]
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", sc, v).reshape(T, H * D) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gt = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((gt / (1 + np.exp(-gt))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    return x @ w["lm_head.weight"].T


def gguf_to_hf_weights(path: Path, hp: dict[str, Any]) -> dict[str, np.ndarray]:
    """Dequantize a tiny GGUF and undo LlamaModel.permute, giving HF-layout f32 weights."""
    r = gguf.GGUFReader(path)
    inv = {gname: hname for hname, gname in ((h, hf_to_gguf_name(h)) for h in make_tiny_hf_names(hp))}
    out = {}
    for t in r.tensors:
        a = dequant(t).astype(np.float64)
        hname = inv[t.name]
        if t.name.endswith("attn_q.weight"):
            perm = permute(np.arange(a.shape[0]), hp["n_head"], hp["n_head"])
            a2 = np.empty_like(a)
            a2[perm] = a
            a = a2
        elif t.name.endswith("attn_k.weight"):
            perm = permute(np.arange(a.shape[0]), hp["n_head"], hp["n_head_kv"])
            a2 = np.empty_like(a)
            a2[perm] = a
            a = a2
        out[hname] = a
    return out


def make_tiny_hf_names(hp: dict[str, Any]) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(hp["n_layer"]):
        names += [f"model.layers.{i}.{k}" for k in HF_TO_GGUF_LAYER]
    return names


def gen_ref_logits(out: Path, tool: Path, tiny: dict[str, Any]) -> None:
    d = out / "gguf"
    for old in d.glob("tiny_llama*.logits.f32"):
        old.unlink()
    cases = tiny["expect"]["tokenizer"]["cases"]
    prompts = [cases[0], cases[1]]
    recs = []
    for model in ["tiny_llama.gguf", "tiny_llama_q8_0.gguf"]:
        for k, c in enumerate(prompts):
            ids = c["ids_add_special"]
            fname = f"{model[:-5]}.prompt{k}.logits.f32"
            subprocess.run([str(tool), str(d / model), "1", str(d / fname), *map(str, ids)], check=True,
                           capture_output=True, text=True)
            logits = np.fromfile(d / fname, dtype="<f4").reshape(len(ids), -1)
            # independent check: HF-layout numpy forward pass over the (dequantized, un-permuted) weights
            np_logits = numpy_hf_forward(gguf_to_hf_weights(d / model, tiny["hp"]), tiny["hp"], ids)
            np_err = float(np.abs(np_logits - logits).max())
            if model == "tiny_llama.gguf":
                assert np_err < 1e-4 * float(np.abs(np_logits).max()), (model, np_err)
            recs.append({
                "model": f"gguf/{model}", "prompt_index": k, "text": c["text"], "token_ids": ids,
                "file": f"gguf/{fname}", "shape": [len(ids), int(logits.shape[1])],
                "argmax_last": int(np.argmax(logits[-1])),
                "argmax_per_position": [int(x) for x in np.argmax(logits, axis=1)],
                "last_row_first8": [float(x) for x in logits[-1, :8]],
                "max_abs_logit": float(np.abs(logits).max()),
                "numpy_f64_dequant_forward_max_abs_diff": np_err,
                "numpy_f64_dequant_forward_argmax_agree": float((np.argmax(np_logits, 1) ==
                                                                  np.argmax(logits, 1)).mean()),
            })
    write_json(d / "tiny_llama.logits.json", {
        "produced_by": ("llama.cpp (vendored in llama-cpp-python 0.3.36), CPU, 1 thread, F32 KV cache, flash "
                        "attention off, one llama_decode of the whole sequence with logits for every position "
                        "(tool source: LOGITS_CPP in scripts/gen_fixtures.py)"),
        "layout": "little-endian f32, row-major [n_tokens, n_vocab]: row i = logits after token i",
        "tolerance_note": ("llama.cpp sums in its own order and, for Q8_0 weights, quantizes activations to Q8_0 "
                           "(vec_dot_type) before the matmul. numpy_f64_dequant_forward_max_abs_diff is how far a "
                           "float64 HF-layout forward pass over the same (dequantized) weights lands from llama.cpp: "
                           "a tight bound for F32, and for Q8_0 the size of the activation-quantization effect"),
        "runs": recs,
    })


# ----------------------------------------------------------------------------------------------
# (h) k-quants via llama.cpp's llama-quantize
# ----------------------------------------------------------------------------------------------

KQ = dict(n_layer=1, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, head_dim=64, n_ctx=512,
          rope_theta=10000.0, rms_eps=1e-5)
# (llama-quantize type argument, expected ggml type of the matrices with --pure)
KQ_TYPES = [("Q2_K", "Q2_K"), ("Q3_K_M", "Q3_K"), ("Q4_K_M", "Q4_K"), ("Q5_K_M", "Q5_K"), ("Q6_K", "Q6_K")]
KQ_DUMP = [("blk.0.attn_k.weight", 8), ("blk.0.ffn_down.weight", 4)]  # (tensor, first N rows)


def gen_k_quants(out: Path, quantize_bin: Path, tok) -> None:
    d = out / "k_quants"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    tk = tokenizer_info(tok)
    vocab = len(tk["tokens"])
    hp = dict(KQ)
    rng = np.random.default_rng(4242)
    E, F, H, KVH, D = hp["n_embd"], hp["n_ff"], hp["n_head"], hp["n_head_kv"], hp["head_dim"]
    g: dict[str, np.ndarray] = {}

    def mat(rows, cols, std):  # numpy layout [rows=ne1, cols=ne0]
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    g["token_embd.weight"] = mat(vocab, E, 0.5)
    for i in range(hp["n_layer"]):
        p = f"blk.{i}."
        g[p + "attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(E)).astype(np.float32)
        g[p + "attn_q.weight"] = mat(H * D, E, 0.1)
        g[p + "attn_k.weight"] = mat(KVH * D, E, 0.1)
        g[p + "attn_v.weight"] = mat(KVH * D, E, 0.1)
        g[p + "attn_output.weight"] = mat(E, H * D, 0.1)
        g[p + "ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(E)).astype(np.float32)
        g[p + "ffn_gate.weight"] = mat(F, E, 0.1)
        g[p + "ffn_up.weight"] = mat(F, E, 0.1)
        g[p + "ffn_down.weight"] = mat(E, F, 0.1)
    g["output_norm.weight"] = (1 + 0.1 * rng.standard_normal(E)).astype(np.float32)
    g["output.weight"] = mat(vocab, E, 0.2)
    order = gguf_tensor_order(hp["n_layer"])

    results = []
    with tempfile.TemporaryDirectory() as td:
        src = Path(td) / "kq_f32.gguf"
        write_gguf(src, "llama", llama_kvs(hp, tk, "tiny-llama-kq", 0), gguf_tensor_list(g, order, None))
        for arg, want in KQ_TYPES:
            fname = f"tiny_llama_kq_{want.lower()}.gguf"
            dst = d / fname
            cmd = [str(quantize_bin), "--pure", str(src), str(dst), arg, "1"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                results.append({"quantize_type_arg": arg, "error": (p.stderr or p.stdout)[-2000:]})
                print(f"  llama-quantize {arg} failed:\n{p.stderr[-800:]}", file=sys.stderr)
                continue
            r = gguf.GGUFReader(dst)
            ftype = r.fields.get("general.file_type")
            recs = []
            for t in r.tensors:
                rec = tensor_record(t, r.data_offset)
                rec.update(stats(dequant(t)))
                recs.append(rec)
            by_name = {t.name: t for t in r.tensors}
            dumps = []
            for tname, rows in KQ_DUMP:
                t = by_name[tname]
                deq = gguf.quants.dequantize(np.asarray(t.data)[:rows], t.tensor_type).astype(np.float32)
                full = dequant(t)
                assert np.array_equal(deq, full[:rows])
                dump_name = f"tiny_llama_kq_{want.lower()}.{tname}.rows{rows}.f32"
                write_f32(d / dump_name, deq)
                dumps.append({"tensor": tname, "type": t.tensor_type.name, "rows": rows,
                              "row_len": int(t.shape[0]), "file": dump_name})
            matrix_types = sorted({t.tensor_type.name for t in r.tensors if len(t.shape) == 2})
            results.append({
                "file": fname, "quantize_type_arg": arg, "expected_matrix_type": want,
                "matrix_types": matrix_types,
                "file_type": int(ftype.parts[-1][0]) if ftype is not None else None,
                "size": dst.stat().st_size, "sha256": sha256_file(dst),
                **header_record(r),
                "tensors": recs, "dumps": dumps,
            })
    write_json(d / "k_quants.json", {
        "produced_by": (f"llama.cpp llama-quantize --pure (vendored in llama-cpp-python 0.3.36) from a seeded F32 "
                        f"GGUF; dequantized with gguf.quants.dequantize (gguf {gguf_version()})"),
        "quantize_command": "llama-quantize --pure SRC_F32.gguf OUT.gguf TYPE 1",
        "hparams": {"block_count": hp["n_layer"], "embedding_length": E, "feed_forward_length": F,
                    "head_count": H, "head_count_kv": KVH, "head_dim": D, "vocab_size": vocab},
        "note": ("attn_output's input dim (head_count*head_dim = 256) cannot be split for TP=2 on a 256-element "
                 "k-quant block boundary; ffn_down's (512) can"),
        "files": results,
    })


# ----------------------------------------------------------------------------------------------

def gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:
        return "?"


def tokenizers_version() -> str:
    import tokenizers
    return tokenizers.__version__


def safetensors_version() -> str:
    import safetensors
    return safetensors.__version__


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def verify(out: Path) -> int:
    """Read every committed fixture back with the reference libraries and check the recorded hashes."""
    import safetensors

    n = 0
    for f in sorted(out.rglob("*.gguf")):
        r = gguf.GGUFReader(f)
        for t in r.tensors:
            dequant(t)
        n += 1
    for f in sorted(out.rglob("*.safetensors")):
        with safetensors.safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                if st.get_slice(k).get_dtype() != "BF16":  # numpy has no bf16
                    st.get_tensor(k)
        for k, rec in read_safetensors(f).items():
            assert len(rec["_bytes"]) == int(np.prod(rec["shape"])) * {"F32": 4, "BF16": 2}[rec["dtype"]], k
        n += 1
    cat = json.loads((out / "cat" / "cat.json").read_text())
    joined = b"".join((out / "cat" / p["file"]).read_bytes() for p in cat["pieces"])
    assert sha256_bytes(joined) == cat["sha256"] == sha256_file(out / cat["source"])
    with tempfile.NamedTemporaryFile(suffix=".gguf") as tf:
        tf.write(joined)
        tf.flush()
        assert len(gguf.GGUFReader(tf.name).tensors) > 0
    arch = json.loads((out / "llamafile" / "archives.json").read_text())
    for a in arch["archives"]:
        raw = (out / "llamafile" / a["file"]).read_bytes()
        with zipfile.ZipFile(out / "llamafile" / a["file"]) as z:
            assert z.testzip() is None
        blob = raw[a["gguf_data_offset"]: a["gguf_data_offset"] + a["gguf_size"]]
        assert sha256_bytes(blob) == a["gguf_sha256"] == sha256_file(out / a["gguf_source"]), a["file"]
    split = json.loads((out / "split" / "split.json").read_text())
    for rec in split["files"]:
        assert sha256_file(out / "split" / rec["file"]) == rec["sha256"], rec["file"]
    tiny = json.loads((out / "gguf" / "tiny_llama.json").read_text())
    for k in ("f32", "q8_0", "v2"):
        assert sha256_file(out / tiny["files"][k]["file"]) == tiny["files"][k]["sha256"], k
    types = json.loads((out / "gguf" / "types.json").read_text())
    r = gguf.GGUFReader(out / "gguf" / "types.gguf")
    for t, rec in zip(r.tensors, types["tensors"]):
        assert sha256_bytes(f32_le_bytes(dequant(t))) == rec["dequant_sha256"] == \
            sha256_file(out / "gguf" / rec["dequant_file"]), t.name
    kq = out / "k_quants" / "k_quants.json"
    if kq.exists():
        for rec in json.loads(kq.read_text())["files"]:
            if "file" in rec:
                assert sha256_file(out / "k_quants" / rec["file"]) == rec["sha256"], rec["file"]
    print(f"verify: ok ({n} GGUF/safetensors files read back; hashes in split/cat/archives/tiny_llama/types/"
          f"k_quants JSON match)", file=sys.stderr)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default tests/fixtures)")
    ap.add_argument("--k-quants", type=Path, default=None, metavar="PATH_TO_llama-quantize",
                    help="llama-quantize binary (default: $TESSERA_CACHE/llama.cpp/bin/llama-quantize if present)")
    ap.add_argument("--no-k-quants", action="store_true", help="leave k_quants/ as it is")
    ap.add_argument("--no-ref-logits", action="store_true",
                    help="leave gguf/tiny_llama*.logits.* as they are (needs the llama.cpp build tree)")
    ap.add_argument("--gguf-split", type=Path, default=None, metavar="PATH_TO_llama-gguf-split",
                    help="cross-check the split set against llama-gguf-split (default: cache bin if present)")
    ap.add_argument("--verify", action="store_true",
                    help="generate nothing; read the fixtures back and check the hashes recorded in their JSON")
    args = ap.parse_args()

    out: Path = args.out
    if args.verify:
        return verify(out)
    out.mkdir(parents=True, exist_ok=True)
    bindir = CACHE / "llama.cpp" / "bin"

    print("metadata_all_types ...", file=sys.stderr)
    gen_metadata_all_types(out)
    print("types ...", file=sys.stderr)
    gen_types(out)
    tok = build_tokenizer()
    tok2 = build_tokenizer()
    assert tok.to_str() == tok2.to_str(), "tokenizer training is not deterministic"
    print("tiny llama ...", file=sys.stderr)
    tiny = gen_tiny(out, tok, bindir / "llama-tokenize")
    print("hf checkpoints ...", file=sys.stderr)
    gen_hf(out, tiny, tok)
    print("gguf-split set ...", file=sys.stderr)
    split_bin = args.gguf_split or (bindir / "llama-gguf-split")
    gen_split(out, tiny, split_bin if split_bin.exists() else None)
    print("cat pieces ...", file=sys.stderr)
    gen_cat(out)
    print("llamafiles ...", file=sys.stderr)
    gen_llamafiles(out)

    if not args.no_ref_logits:
        tool = build_ref_logits_tool()
        if tool is not None:
            print("reference logits (llama.cpp) ...", file=sys.stderr)
            gen_ref_logits(out, tool, tiny)
        else:
            print("reference logits skipped: llama.cpp build tree not found or tool failed to build "
                  "(run scripts/build-llama-cpp.sh); "
                  "gguf/tiny_llama*.logits.* left as is", file=sys.stderr)

    if not args.no_k_quants:
        qbin = args.k_quants or (bindir / "llama-quantize")
        if qbin.exists():
            print(f"k-quants with {qbin} ...", file=sys.stderr)
            gen_k_quants(out, qbin, tok)
        elif args.k_quants is not None:
            print(f"error: {qbin} not found", file=sys.stderr)
            return 1
        else:
            print(f"k-quants skipped: {qbin} not found (run scripts/build-llama-cpp.sh); k_quants/ left as is",
                  file=sys.stderr)

    total = dir_size(out)
    print(f"done: {out} ({total / 1e6:.2f} MB, symlinks not counted)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
