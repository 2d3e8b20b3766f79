//! Checks the scalar GGML (de)quantizers against reference vectors from the official `gguf` Python package
//! (`scripts/gen_quant_vectors.py` writes `tests/data/*.bin`; the format is documented there), plus
//! round-trip error budgets for the k-quant quantizers, which gguf-py cannot run, and the error paths.

use std::path::PathBuf;

use tessera_kernels::quant::{
    Block, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K,
    BlockQ6K, BlockQ8_0, GgmlType, QuantError, dequantize_row, ggml_type_name, quantize_row,
};

// ---------------------------------------------------------------------------------------------------------
// Reference vector files

#[derive(Debug)]
struct Case {
    name: String,
    n: usize,
    quantized: Vec<u8>,
    floats: Vec<f32>,
}

/// Sequential reader over a vector file; a short file is a broken fixture, so it panics with the file name.
struct Reader<'a> {
    file: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, len: usize) -> &[u8] {
        let at = self.at;
        self.at += len;
        self.bytes
            .get(at..at + len)
            .unwrap_or_else(|| panic!("{}: truncated at byte {at}", self.file))
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }

    fn floats(&mut self, n: usize) -> Vec<f32> {
        self.take(4 * n)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

/// Parses one `TQV1` file: `(ggml type id, kind, cases)`.
fn load(file: &str) -> (u32, u32, Vec<Case>) {
    // TESSERA_QUANT_VECTORS points at another directory of vector files (e.g. a larger ggml sweep).
    let dir = std::env::var_os("TESSERA_QUANT_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data"));
    let path = dir.join(file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (regenerate with scripts/gen_quant_vectors.py)",
            path.display()
        )
    });
    let mut r = Reader {
        file,
        bytes: &bytes,
        at: 0,
    };
    assert_eq!(r.take(4), b"TQV1", "{file}: bad magic");
    let (ty, kind, n_cases) = (r.u32(), r.u32(), r.u32());
    let mut cases = Vec::new();
    for _ in 0..n_cases {
        let name_len = r.u32() as usize;
        let name = String::from_utf8(r.take(name_len).to_vec()).unwrap();
        let (n, n_bytes) = (r.u32() as usize, r.u32() as usize);
        let (quantized, floats) = if kind == 0 {
            let q = r.take(n_bytes).to_vec();
            (q, r.floats(n))
        } else {
            let f = r.floats(n);
            (r.take(n_bytes).to_vec(), f)
        };
        cases.push(Case {
            name,
            n,
            quantized,
            floats,
        });
    }
    assert_eq!(r.at, bytes.len(), "{file}: trailing bytes");
    (ty, kind, cases)
}

/// Bit equality, except that any NaN equals any NaN (payloads are checked by the float unit tests).
fn same_f32(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn assert_same_floats(ty: GgmlType, case: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            same_f32(g, w),
            "{} {case}: element {i} (block {}): got {g:e} ({:#010x}), gguf-py {w:e} ({:#010x})",
            ty.name(),
            i / ty.block_size(),
            g.to_bits(),
            w.to_bits()
        );
    }
}

#[test]
fn dequantize_matches_gguf_py_bit_exactly_for_every_type() {
    for ty in GgmlType::ALL {
        let (id, kind, cases) = load(&format!("dequant_{}.bin", ty.name()));
        assert_eq!((id, kind), (ty.id(), 0), "{}: file header", ty.name());
        assert!(!cases.is_empty());
        for case in &cases {
            let mut out = vec![f32::NAN; case.n];
            dequantize_row(ty, &case.quantized, &mut out).unwrap();
            assert_same_floats(ty, &case.name, &out, &case.floats);

            // The first block alone: rows of one block take the same path as long rows.
            let block = ty.block_size();
            let mut one = vec![0.0f32; block];
            dequantize_row(ty, &case.quantized[..ty.type_size()], &mut one).unwrap();
            assert_same_floats(
                ty,
                &format!("{} (first block)", case.name),
                &one,
                &case.floats[..block],
            );
        }
    }
}

/// Quantizes every case of a kind-1 file and compares the bytes; returns the number of blocks checked.
fn check_quantize_file(ty: GgmlType, file: &str, reference: &str) -> usize {
    let (id, kind, cases) = load(file);
    assert_eq!((id, kind), (ty.id(), 1), "{file}: file header");
    let bs = ty.type_size();
    let mut blocks = 0;
    for case in &cases {
        // quantize_row appends: keep a prefix to check that it is left alone.
        let mut out = vec![0xAB; 3];
        quantize_row(ty, &case.floats, &mut out).unwrap();
        assert_eq!(&out[..3], &[0xAB; 3]);
        let got = &out[3..];
        assert_eq!(
            got.len(),
            case.quantized.len(),
            "{} {}",
            ty.name(),
            case.name
        );
        if let Some(i) = got.iter().zip(&case.quantized).position(|(a, b)| a != b) {
            let b = i / bs;
            panic!(
                "{} {}: byte {} of block {b} differs\n  ours: {:02x?}\n  {reference}: {:02x?}",
                ty.name(),
                case.name,
                i % bs,
                &got[b * bs..(b + 1) * bs],
                &case.quantized[b * bs..(b + 1) * bs]
            );
        }
        blocks += case.quantized.len() / bs;
    }
    blocks
}

#[test]
fn quantize_matches_gguf_py_byte_for_byte() {
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ];
    for ty in types {
        check_quantize_file(ty, &format!("quant_{}.bin", ty.name()), "gguf-py");
    }
}

/// gguf-py has no k-quant quantizers; these vectors come from ggml's own `quantize_row_q*_K_ref` built with
/// `-ffp-contract=off` (tests/ggml_ref/gen_kquant_vectors.c).
#[test]
fn k_quant_quantize_matches_ggml_reference_byte_for_byte() {
    for ty in [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        let blocks = check_quantize_file(ty, &format!("ggml_quant_{}.bin", ty.name()), "ggml");
        eprintln!("{}: {blocks} blocks identical to ggml", ty.name());
    }
}

// ---------------------------------------------------------------------------------------------------------
// k-quant quantizers: round-trip error and stability

/// SplitMix64 + Box-Muller: standard normal samples without a rand dependency.
struct Normal(u64);

impl Normal {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.sample() * scale).collect()
    }
}

fn round_trip(ty: GgmlType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::new();
    quantize_row(ty, x, &mut q).unwrap();
    assert_eq!(q.len(), ty.bytes_for(x.len()).unwrap());
    let mut y = vec![0.0; x.len()];
    dequantize_row(ty, &q, &mut y).unwrap();
    (q, y)
}

/// RMS of `x - y` relative to the RMS of `x`.
fn relative_rmse(x: &[f32], y: &[f32]) -> f64 {
    let err: f64 = x
        .iter()
        .zip(y)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    let sig: f64 = x.iter().map(|&a| f64::from(a).powi(2)).sum();
    (err / sig).sqrt()
}

/// Relative RMSE budgets on N(0, sigma) rows.
///
/// Each budget is the error of a plain uniform grid over the group, step / sqrt(12), plus 10% for the
/// 6/8-bit sub-block scales and the f16 super-block scale. Steps use the expected extent of a group of N(0,1)
/// samples (measured over 200k groups: range 3.53 and max|x| 2.08 for 16 samples, 4.14 and 2.35 for 32):
/// Q2_K 3.53/3 -> 0.340, Q3_K (levels -4..3 at max|x|/4) 2.08/4 -> 0.150, Q4_K 4.14/15 -> 0.080,
/// Q5_K 4.14/31 -> 0.0385, Q6_K (levels -32..31 at max|x|/32) 2.08/32 -> 0.0188. The scale searches in
/// `quantize_row_q*_K_ref` fit the grid to the data and should stay below the plain grid; the measured
/// values are printed with `--nocapture`.
const K_BUDGETS: [(GgmlType, f64); 5] = [
    (GgmlType::Q2_K, 0.375),
    (GgmlType::Q3_K, 0.165),
    (GgmlType::Q4_K, 0.088),
    (GgmlType::Q5_K, 0.043),
    (GgmlType::Q6_K, 0.021),
];

#[test]
fn k_quant_round_trip_error_within_budget() {
    let mut rng = Normal(0x7e55_e7a0);
    for (ty, budget) in K_BUDGETS {
        // Many blocks at unit scale, typical LLM weight scale, and large magnitudes. The error is relative, so
        // one budget holds while the f16 super-block scales stay normal; for rows of sigma <~ 1e-3 they go
        // subnormal and the error grows (ggml's format, reproduced bit for bit; see k_quants' module doc).
        for (sigma, blocks) in [(1.0f32, 64), (0.02, 8), (3000.0, 4), (1e4, 4)] {
            let x = rng.vec(blocks * 256, sigma);
            let (_, y) = round_trip(ty, &x);
            let err = relative_rmse(&x, &y);
            eprintln!(
                "{} sigma {sigma:e}: relative RMSE {err:.4} (budget {budget})",
                ty.name()
            );
            assert!(
                err < budget,
                "{}: sigma {sigma}: relative RMSE {err:.4} > budget {budget}",
                ty.name()
            );
        }
    }
}

#[test]
fn k_quant_round_trip_is_stable() {
    let mut rng = Normal(0x5eed);
    for (ty, budget) in K_BUDGETS {
        let x = rng.vec(16 * 256, 1.0);
        let (q1, y1) = round_trip(ty, &x);
        assert_eq!(
            round_trip(ty, &x).0,
            q1,
            "{}: quantizing twice differs",
            ty.name()
        );
        // Requantizing dequantized values must (nearly) reproduce them: the scale searches may settle on a
        // slightly different grid (Q3_K moves ~8% of values, Q5_K ~7%, Q6_K one value; Q2_K and Q4_K are exact
        // fixed points on this data), but never drift far or lose accuracy against the original.
        let (_, y2) = round_trip(ty, &y1);
        let drift = relative_rmse(&y1, &y2);
        let unchanged = y1
            .iter()
            .zip(&y2)
            .filter(|(a, b)| a.to_bits() == b.to_bits())
            .count();
        let (err1, err2) = (relative_rmse(&x, &y1), relative_rmse(&x, &y2));
        eprintln!(
            "{}: requantization drift {drift:.5}, {unchanged}/{} values unchanged, error vs input {err1:.5} -> {err2:.5}",
            ty.name(),
            y1.len()
        );
        assert!(
            drift < budget / 4.0,
            "{}: requantization drift {drift:.5}",
            ty.name()
        );
        assert!(
            unchanged * 10 >= y1.len() * 9,
            "{}: only {unchanged} values unchanged",
            ty.name()
        );
        assert!(
            err2 < err1 * 1.05,
            "{}: requantizing degrades {err1:.5} -> {err2:.5}",
            ty.name()
        );
    }
}

#[test]
fn k_quant_zero_and_constant_rows() {
    for (ty, budget) in K_BUDGETS {
        let (q, y) = round_trip(ty, &[0.0; 512]);
        assert!(y.iter().all(|&v| v == 0.0), "{}: zero row", ty.name());
        // ggml writes all-zero blocks for all-zero input (d = 0 and every level 0).
        assert!(
            q.iter().all(|&b| b == 0),
            "{}: zero row gives non-zero bytes",
            ty.name()
        );
        for c in [1.0f32, -2.5, 0.02] {
            let x = vec![c; 256];
            let (_, y) = round_trip(ty, &x);
            let err = relative_rmse(&x, &y);
            assert!(
                err < budget,
                "{}: constant {c}: relative RMSE {err:.4}",
                ty.name()
            );
        }
    }
}

#[test]
fn quantizers_survive_non_finite_input() {
    let mut x = vec![0.5f32; 256];
    x[3] = f32::NAN;
    x[70] = f32::INFINITY;
    x[200] = f32::NEG_INFINITY;
    x[201] = f32::MAX;
    for ty in GgmlType::ALL {
        let mut q = Vec::new();
        quantize_row(ty, &x, &mut q).unwrap();
        let mut y = vec![0.0; x.len()];
        dequantize_row(ty, &q, &mut y).unwrap();
    }
}

#[test]
fn legacy_round_trip_error_within_budget() {
    // Same derivation as K_BUDGETS, 32-element groups: Q4_0 (levels -8..7 at max|x|/8) 2.35/8 -> 0.0848,
    // Q4_1 4.14/15 -> 0.080, Q5_0 2.35/16 -> 0.0424, Q5_1 4.14/31 -> 0.0385, Q8_0 2.35/127 -> 0.0053, plus
    // 10%. These quantizers do no search, so they sit right at the estimate. F16/BF16: round-to-nearest with
    // 11/8 significant bits has relative RMS error 2^-11/sqrt(3) = 2.8e-4 and 2^-8/sqrt(3) = 2.3e-3.
    let budgets = [
        (GgmlType::Q4_0, 0.093),
        (GgmlType::Q4_1, 0.088),
        (GgmlType::Q5_0, 0.047),
        (GgmlType::Q5_1, 0.043),
        (GgmlType::Q8_0, 0.0059),
        (GgmlType::F16, 3.1e-4),
        (GgmlType::BF16, 2.5e-3),
    ];
    let mut rng = Normal(42);
    let x = rng.vec(64 * 256, 1.0);
    for (ty, budget) in budgets {
        let (_, y) = round_trip(ty, &x);
        let err = relative_rmse(&x, &y);
        eprintln!("{}: relative RMSE {err:.5} (budget {budget})", ty.name());
        assert!(
            err < budget,
            "{}: relative RMSE {err:.5} > {budget}",
            ty.name()
        );
    }
}

/// Parsing then writing any bytes gives the same bytes, so the field-by-field parsers cover the whole block
/// in the right order (the dequantization vectors then check what each field means).
fn bytes_round_trip<B: Block<BYTES, N>, const BYTES: usize, const N: usize>(rng: &mut Normal) {
    for _ in 0..200 {
        let bytes: [u8; BYTES] = std::array::from_fn(|_| rng.next_u64() as u8);
        assert_eq!(
            B::from_bytes(&bytes).to_bytes(),
            bytes,
            "{}",
            std::any::type_name::<B>()
        );
    }
}

#[test]
fn block_parsers_round_trip_every_byte() {
    let mut rng = Normal(9);
    bytes_round_trip::<BlockQ4_0, _, _>(&mut rng);
    bytes_round_trip::<BlockQ4_1, _, _>(&mut rng);
    bytes_round_trip::<BlockQ5_0, _, _>(&mut rng);
    bytes_round_trip::<BlockQ5_1, _, _>(&mut rng);
    bytes_round_trip::<BlockQ8_0, _, _>(&mut rng);
    bytes_round_trip::<BlockQ2K, _, _>(&mut rng);
    bytes_round_trip::<BlockQ3K, _, _>(&mut rng);
    bytes_round_trip::<BlockQ4K, _, _>(&mut rng);
    bytes_round_trip::<BlockQ5K, _, _>(&mut rng);
    bytes_round_trip::<BlockQ6K, _, _>(&mut rng);
}

// ---------------------------------------------------------------------------------------------------------
// Error paths

#[test]
fn dequantize_rejects_wrong_lengths() {
    let mut out = vec![0.0f32; 64];
    assert_eq!(
        dequantize_row(GgmlType::Q4_0, &[0u8; 35], &mut out),
        Err(QuantError::WrongByteLength {
            ty: GgmlType::Q4_0,
            n: 64,
            expected: 36,
            got: 35
        })
    );
    assert_eq!(
        dequantize_row(GgmlType::F16, &[0u8; 130], &mut out),
        Err(QuantError::WrongByteLength {
            ty: GgmlType::F16,
            n: 64,
            expected: 128,
            got: 130
        })
    );
    let mut out = vec![0.0f32; 100];
    assert_eq!(
        dequantize_row(GgmlType::Q6_K, &[0u8; 210], &mut out),
        Err(QuantError::NotBlockAligned {
            ty: GgmlType::Q6_K,
            block: 256,
            n: 100
        })
    );
    // Empty rows are fine.
    dequantize_row(GgmlType::Q4_K, &[], &mut []).unwrap();
}

#[test]
fn quantize_rejects_unaligned_rows_and_appends_nothing() {
    let mut out = vec![1u8, 2, 3];
    let err = quantize_row(GgmlType::Q8_0, &[0.0; 33], &mut out).unwrap_err();
    assert_eq!(
        err,
        QuantError::NotBlockAligned {
            ty: GgmlType::Q8_0,
            block: 32,
            n: 33
        }
    );
    assert_eq!(
        err.to_string(),
        "Q8_0 needs a multiple of 32 elements, got 33"
    );
    assert_eq!(out, [1, 2, 3]);
    let err = quantize_row(GgmlType::Q4_K, &[0.0; 255], &mut out).unwrap_err();
    assert!(matches!(
        err,
        QuantError::NotBlockAligned { block: 256, .. }
    ));
    assert_eq!(out, [1, 2, 3]);
}

#[test]
fn unsupported_type_ids_are_named() {
    let err = GgmlType::from_id(16).unwrap_err();
    assert!(matches!(
        err,
        QuantError::UnsupportedType {
            id: 16,
            name: "IQ2_XXS",
            ..
        }
    ));
    assert!(err.to_string().contains("IQ2_XXS"), "{err}");
    assert!(
        err.to_string().contains("Q4_K"),
        "message lists what is supported: {err}"
    );
    assert_eq!(ggml_type_name(39), "MXFP4");
    assert!(
        GgmlType::from_id(1000)
            .unwrap_err()
            .to_string()
            .contains("unknown")
    );
    for ty in GgmlType::ALL {
        assert_eq!(GgmlType::from_id(ty.id()), Ok(ty));
        assert_eq!(GgmlType::from_name(&ty.name().to_lowercase()), Some(ty));
    }
}

#[test]
fn byte_counts_never_overflow() {
    assert_eq!(
        GgmlType::F32.bytes_for(usize::MAX - 3),
        Err(QuantError::SizeOverflow {
            ty: GgmlType::F32,
            n: usize::MAX - 3
        })
    );
    assert_eq!(GgmlType::Q4_K.bytes_for(512), Ok(288));
}
