#!/usr/bin/env python3
"""Writes the GGML quantization reference vectors in kernels/tests/data/ from the official `gguf` package.

Usage:  python3 scripts/gen_quant_vectors.py [--out kernels/tests/data]
Needs only `gguf` and `numpy` (`pip install gguf numpy`). Seeded: rerunning with the same gguf/numpy gives
identical files. kernels/tests/quant_reference.rs checks Tessera's scalar reference against them. (The k-quant quantizer
vectors, ggml_quant_Q*_K.bin, come from ggml's C code instead: see kernels/tests/ggml_ref/gen_kquant_vectors.c.)

For every type Tessera reads (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K) it writes
`dequant_<TYPE>.bin`: block bytes plus `gguf.quants.dequantize` of them. Block bytes are random except the f16
scale fields (d, m, dmin), which are set to finite values so that the expected output has no NaN/Inf; one case
puts the extreme finite f16 values (subnormals, +-65504, +-0) in those fields.
For every type gguf-py can quantize (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) it writes
`quant_<TYPE>.bin`: f32 rows plus `gguf.quants.quantize` of them (random normal rows, one block, all zeros,
constants, large and tiny magnitudes, exact rounding ties).

File format (all integers little-endian u32):
    file    := b"TQV1" ggml_type_id kind n_cases case*
    kind    := 0 (dequantize) | 1 (quantize)
    case    := name_len name(utf-8) n_elements n_bytes payload
    payload := kind 0: n_bytes quantized bytes, then n_elements f32 (expected dequantized values)
               kind 1: n_elements f32 (input), then n_bytes quantized bytes (expected output)
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants

SEED = 20240611

# Byte offsets of the f16 scale fields inside one block (ggml-common.h layouts).
F16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}

QUANTIZABLE = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)

# Finite f16 bit patterns at the edges: smallest subnormal, largest subnormal, smallest normal, largest
# finite, their negatives, and both zeros.
EDGE_F16 = np.array([0x0001, 0x03FF, 0x0400, 0x7BFF, 0x8001, 0x83FF, 0xFBFF, 0x0000, 0x8000], dtype=np.uint16)


def write_file(path: Path, qtype: T, kind: int, cases: list[tuple[str, int, bytes, bytes]]) -> None:
    """cases: (name, n_elements, quantized bytes, f32 bytes)."""
    out = bytearray(b"TQV1" + struct.pack("<III", int(qtype), kind, len(cases)))
    for name, n, qbytes, fbytes in cases:
        assert len(fbytes) == 4 * n, name
        enc = name.encode()
        out += struct.pack("<I", len(enc)) + enc + struct.pack("<II", n, len(qbytes))
        out += (qbytes + fbytes) if kind == 0 else (fbytes + qbytes)
    path.write_bytes(bytes(out))


def sane_f16(rng: np.random.Generator, count: int) -> np.ndarray:
    """Finite f16 scales over several orders of magnitude, both signs, some exactly zero."""
    mag = 10.0 ** rng.uniform(-6, 2, size=count)
    sign = np.where(rng.random(count) < 0.25, -1.0, 1.0)
    vals = (mag * sign).astype(np.float16)
    vals[rng.random(count) < 0.05] = 0
    return vals.view(np.uint16)


def random_blocks(rng: np.random.Generator, qtype: T, n_blocks: int, edge: bool) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        if edge:
            vals = EDGE_F16[(np.arange(n_blocks) + off) % len(EDGE_F16)]
        else:
            vals = sane_f16(rng, n_blocks)
        blocks[:, off : off + 2] = vals.astype("<u2").view(np.uint8).reshape(n_blocks, 2)
    return blocks


def dequant_case(qtype: T, name: str, raw: np.ndarray) -> tuple[str, int, bytes, bytes]:
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    values = quants.dequantize(raw, qtype)
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    return name, values.size, raw.tobytes(), values.astype("<f4").tobytes()


def float_dequant_cases(rng: np.random.Generator, qtype: T) -> list[tuple[str, int, bytes, bytes]]:
    if qtype == T.F32:
        special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x00000001,
                            0x7F7FFFFF, 0x3F800000], dtype=np.uint32)
        rand = rng.integers(0, 2**32, size=55, dtype=np.uint32)
    else:
        base = [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFC01, 0x0001, 0x03FF, 0x3C00, 0x7BFF]
        if qtype == T.BF16:
            base = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFF81, 0x0001, 0x007F, 0x3F80, 0x7F7F]
        special = np.array(base, dtype=np.uint16)
        rand = rng.integers(0, 2**16, size=53, dtype=np.uint16)
    raw = np.concatenate([special, rand]).astype(special.dtype.newbyteorder("<")).view(np.uint8)
    return [dequant_case(qtype, "special_and_random_bits", raw)]


def quant_case(qtype: T, name: str, x: np.ndarray) -> tuple[str, int, bytes, bytes]:
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    # The "large" rows overflow f16 scales to Inf on purpose (ggml and gguf-py store Inf there too).
    with np.errstate(over="ignore"):
        q = np.asarray(quants.quantize(x, qtype))
    return name, x.size, q.reshape(-1).view(np.uint8).tobytes(), x.astype("<f4").tobytes()


def quant_inputs(rng: np.random.Generator, qtype: T) -> list[tuple[str, np.ndarray]]:
    block, _ = GGML_QUANT_SIZES[qtype]
    # Float types get 64 values per case; block types 16 blocks for random rows, 1-2 for the special rows.
    many = 64 if block == 1 else 16 * block
    one = 32 if block == 1 else block
    cases = [
        ("normal", rng.standard_normal(many).astype(np.float32)),
        ("one_block", (rng.standard_normal(one) * 0.02).astype(np.float32)),
        ("zeros", np.zeros(one, dtype=np.float32)),
        ("constant", np.concatenate([np.full(one, 0.75), np.full(one, -3.0)]).astype(np.float32)),
        ("large", (rng.standard_normal(2 * one) * np.repeat([3e3, 1e6], one)).astype(np.float32)),
        ("tiny", (rng.standard_normal(2 * one) * np.repeat([1e-5, 1e-9], one)).astype(np.float32)),
        # Few distinct levels: many elements land exactly on rounding ties of the legacy quantizers
        # (e.g. q*0.5 with amax 127 for Q8_0, x*id + 8.5 on integers for Q4_0).
        ("ties", (rng.integers(-16, 17, size=2 * one) * 0.5).astype(np.float32)),
    ]
    if block == 1:
        # Conversion edge cases: largest finite, values that round to Inf, ties to even, subnormals, NaN.
        bits = np.array([0x477FE000, 0x477FF000, 0x477FEFFF, 0x3F801000, 0x3F803000, 0x33800000, 0x33000000,
                         0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFA00000, 0x3F808000, 0x3F818000,
                         0x7F7FFFFF, 0x80000000], dtype=np.uint32)
        cases.append(("conversion_edges", bits.view(np.float32)))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "kernels/tests/data")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    total = 0

    for qtype in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
                  T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        if qtype in F16_FIELDS:
            block, _ = GGML_QUANT_SIZES[qtype]
            n_random = 16 if block == 32 else 3
            n_edge = len(EDGE_F16) if block == 32 else 3
            cases = [
                dequant_case(qtype, "random", random_blocks(rng, qtype, n_random, edge=False)),
                dequant_case(qtype, "edge_scales", random_blocks(rng, qtype, n_edge, edge=True)),
            ]
            if block == 32:
                # (The Rust test also dequantizes the first block of every case on its own.)
                cases.append(dequant_case(qtype, "one_block", random_blocks(rng, qtype, 1, edge=False)))
        else:
            cases = float_dequant_cases(rng, qtype)
        path = args.out / f"dequant_{qtype.name}.bin"
        write_file(path, qtype, 0, cases)
        total += path.stat().st_size

    for qtype in QUANTIZABLE:
        cases = [quant_case(qtype, name, x) for name, x in quant_inputs(rng, qtype)]
        path = args.out / f"quant_{qtype.name}.bin"
        write_file(path, qtype, 1, cases)
        total += path.stat().st_size

    print(f"wrote {args.out} ({total} bytes)")


if __name__ == "__main__":
    main()
