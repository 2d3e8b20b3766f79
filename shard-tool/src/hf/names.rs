//! Hugging Face Llama tensor names → canonical GGUF names, expected shapes, and the Q/K row permutation.
//!
//! Names follow llama.cpp's `convert_hf_to_gguf.py` / `gguf-py/gguf/tensor_mapping.py`
//! (<https://github.com/ggml-org/llama.cpp/blob/master/gguf-py/gguf/tensor_mapping.py>).
//!
//! Q/K row order: Tessera's canonical order is GGUF's. HF checkpoints store each head's rotary pairs as
//! (first half, second half) of the head; llama.cpp's converter (`LlamaModel.permute`) interleaves them:
//! `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`, with `n_head_kv`
//! heads for K. Canonical row `h*head_dim + 2*i + s` (head `h`, pair `i`, half `s`) therefore comes from HF row
//! `h*head_dim + s*head_dim/2 + i`. The permutation stays inside each head, so it depends on `head_dim` only,
//! and whole-head row ranges (what tensor parallelism cuts) map to the same whole-head HF ranges.

use std::ops::Range;

use crate::config::ModelConfig;
use crate::roles::parse_layer_number;
pub use crate::roles::{LayerTensor, Role};

/// Which rotary projection a tensor is (they differ in head count: `n_head` vs `n_head_kv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QkKind {
    Q,
    K,
}

impl QkKind {
    /// Heads of this projection in `cfg`.
    pub fn n_heads(self, cfg: &ModelConfig) -> usize {
        match self {
            QkKind::Q => cfg.n_head,
            QkKind::K => cfg.n_head_kv,
        }
    }
}

/// Hugging Face suffix after `model.layers.N.` of a block tensor.
fn hf_suffix(t: LayerTensor) -> &'static str {
    match t {
        LayerTensor::AttnNorm => "input_layernorm.weight",
        LayerTensor::AttnQ => "self_attn.q_proj.weight",
        LayerTensor::AttnK => "self_attn.k_proj.weight",
        LayerTensor::AttnV => "self_attn.v_proj.weight",
        LayerTensor::AttnOutput => "self_attn.o_proj.weight",
        LayerTensor::FfnNorm => "post_attention_layernorm.weight",
        LayerTensor::FfnGate => "mlp.gate_proj.weight",
        LayerTensor::FfnUp => "mlp.up_proj.weight",
        LayerTensor::FfnDown => "mlp.down_proj.weight",
    }
}

/// Hugging Face name of a role (`model.layers.3.self_attn.q_proj.weight`); `None` for `rope_freqs`, which
/// HF checkpoints do not store (the factors come from config.json).
pub fn hf_name(role: Role) -> Option<String> {
    Some(match role {
        Role::TokenEmbd => "model.embed_tokens.weight".into(),
        Role::Layer(n, t) => format!("model.layers.{n}.{}", hf_suffix(t)),
        Role::OutputNorm => "model.norm.weight".into(),
        Role::Output => "lm_head.weight".into(),
        Role::RopeFreqs => return None,
    })
}

/// Q or K projection of a role (their rows are permuted between HF and GGUF order).
pub fn qk_kind(role: Role) -> Option<QkKind> {
    match role {
        Role::Layer(_, LayerTensor::AttnQ) => Some(QkKind::Q),
        Role::Layer(_, LayerTensor::AttnK) => Some(QkKind::K),
        _ => None,
    }
}

/// Row-major shape (`[rows, cols]`, norms `[hidden]`) the config implies: the ggml shape reversed.
pub fn expected_shape_rowmajor(role: Role, cfg: &ModelConfig) -> Option<Vec<u64>> {
    role.expected_shape(cfg).map(|mut s| {
        s.reverse();
        s
    })
}

/// Result of looking up a Hugging Face tensor name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfName {
    /// A weight of the model.
    Tensor(Role),
    /// A buffer some exporters save that carries nothing we need (`rotary_emb.inv_freq`: RoPE is recomputed
    /// from the config).
    Skip,
}

/// Maps a Hugging Face Llama tensor name; `None` for names that are not part of a Llama model.
pub fn map_hf_name(hf: &str) -> Option<HfName> {
    let role = match hf {
        "model.embed_tokens.weight" => Role::TokenEmbd,
        "model.norm.weight" => Role::OutputNorm,
        "lm_head.weight" => Role::Output,
        _ => {
            let rest = hf.strip_prefix("model.layers.")?;
            let (n, suffix) = rest.split_once('.')?;
            let layer = parse_layer_number(n)?;
            if suffix == "self_attn.rotary_emb.inv_freq" {
                return Some(HfName::Skip);
            }
            let t = LayerTensor::ALL
                .into_iter()
                .find(|&t| hf_suffix(t) == suffix)?;
            Role::Layer(layer, t)
        }
    };
    Some(HfName::Tensor(role))
}

/// The HF row that feeds canonical (GGUF-order) row `canonical_row` of a Q or K weight whose heads have
/// `head_dim` rows. The head count does not enter: the permutation stays inside each head.
/// (A `head_dim` below 2 has no pairs: identity.)
pub fn canonical_row_source(head_dim: u64, canonical_row: u64) -> u64 {
    if head_dim < 2 {
        return canonical_row;
    }
    let half = head_dim / 2;
    let (head, within) = (canonical_row / head_dim, canonical_row % head_dim);
    head * head_dim + (within % 2) * half + within / 2
}

/// HF rows that canonical rows `rows` draw from: the whole heads they touch.
pub fn hf_rows_for(head_dim: u64, rows: Range<u64>) -> Range<u64> {
    if rows.is_empty() || head_dim == 0 {
        return rows.start..rows.end.max(rows.start);
    }
    let first = rows.start / head_dim * head_dim;
    let last = (rows.end - 1) / head_dim * head_dim + head_dim;
    first..last
}

/// Builds canonical rows `rows` of a Q/K weight from `hf`, which holds HF rows starting at `hf_first_row`
/// (each `row_bytes` long; at least [`hf_rows_for`]`(head_dim, rows)`). `None` when `hf` does not cover them.
pub fn gather_canonical_rows(
    hf: &[u8],
    hf_first_row: u64,
    head_dim: u64,
    row_bytes: usize,
    rows: Range<u64>,
) -> Option<Vec<u8>> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return None;
    }
    let n = usize::try_from(rows.end.checked_sub(rows.start)?).ok()?;
    let mut out = Vec::with_capacity(n.checked_mul(row_bytes)?.min(hf.len()));
    for r in rows {
        let src = canonical_row_source(head_dim, r).checked_sub(hf_first_row)?;
        let lo = usize::try_from(src).ok()?.checked_mul(row_bytes)?;
        out.extend_from_slice(hf.get(lo..lo.checked_add(row_bytes)?)?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// numpy's `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)` written
    /// as index arithmetic on a row-major buffer, independently of the production mapping: output element
    /// (r, c) is element (h, i, s, c) of the swapped 4-D view, i.e. element (h, s, i, c) of the reshaped input.
    fn numpy_permute(w: &[u32], rows: usize, cols: usize, n_head: usize) -> Vec<u32> {
        let d2 = rows / n_head / 2;
        // Strides of the C-contiguous (n_head, 2, d2, cols) view of `w`.
        let (st_h, st_s, st_i) = (2 * d2 * cols, d2 * cols, cols);
        let mut out = Vec::with_capacity(rows * cols);
        // Iterate the swapped shape (n_head, d2, 2, cols) in C order, as the final reshape reads it.
        for h in 0..n_head {
            for i in 0..d2 {
                for s in 0..2 {
                    for c in 0..cols {
                        out.push(w[h * st_h + s * st_s + i * st_i + c]);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn permutation_matches_numpy_reference() {
        for (n_head, head_dim, cols) in [(1, 2, 1), (2, 4, 3), (3, 8, 2), (4, 6, 5), (9, 64, 1)] {
            let rows = n_head * head_dim;
            let w: Vec<u32> = (0..(rows * cols) as u32).collect();
            let want = numpy_permute(&w, rows, cols, n_head);
            let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            let row_bytes = cols * 4;
            // Every row range of the small cases, including ones that start and end mid-head; for the
            // SmolLM2-sized one (576 rows) a prime stride keeps the debug-build test fast.
            let step = if rows > 100 { 37 } else { 1 };
            for a in (0..=rows as u64).step_by(step) {
                for b in (a..=rows as u64).step_by(step) {
                    let hf = hf_rows_for(head_dim as u64, a..b);
                    assert!(hf.start <= a && b <= hf.end.max(a) && hf.end <= rows as u64);
                    let src = &bytes[hf.start as usize * row_bytes..hf.end as usize * row_bytes];
                    let got =
                        gather_canonical_rows(src, hf.start, head_dim as u64, row_bytes, a..b)
                            .unwrap();
                    let want_bytes: Vec<u8> = want[a as usize * cols..b as usize * cols]
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect();
                    assert_eq!(
                        got, want_bytes,
                        "n_head {n_head} head_dim {head_dim} rows {a}..{b}"
                    );
                }
            }
        }
    }

    #[test]
    fn gather_refuses_short_input() {
        let bytes = vec![0u8; 4 * 4];
        assert!(gather_canonical_rows(&bytes, 0, 4, 4, 0..4).is_some());
        assert!(gather_canonical_rows(&bytes[..12], 0, 4, 4, 0..4).is_none());
        assert!(gather_canonical_rows(&bytes, 4, 4, 4, 0..1).is_none());
        assert!(gather_canonical_rows(&bytes, 0, 3, 4, 0..1).is_none());
    }

    #[test]
    fn maps_names_both_ways() {
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
            (
                "model.layers.0.input_layernorm.weight",
                "blk.0.attn_norm.weight",
            ),
            (
                "model.layers.7.self_attn.q_proj.weight",
                "blk.7.attn_q.weight",
            ),
            (
                "model.layers.7.self_attn.k_proj.weight",
                "blk.7.attn_k.weight",
            ),
            (
                "model.layers.7.self_attn.v_proj.weight",
                "blk.7.attn_v.weight",
            ),
            (
                "model.layers.12.self_attn.o_proj.weight",
                "blk.12.attn_output.weight",
            ),
            (
                "model.layers.3.post_attention_layernorm.weight",
                "blk.3.ffn_norm.weight",
            ),
            (
                "model.layers.3.mlp.gate_proj.weight",
                "blk.3.ffn_gate.weight",
            ),
            ("model.layers.3.mlp.up_proj.weight", "blk.3.ffn_up.weight"),
            (
                "model.layers.125.mlp.down_proj.weight",
                "blk.125.ffn_down.weight",
            ),
        ];
        for (hf, gguf) in cases {
            let Some(HfName::Tensor(role)) = map_hf_name(hf) else {
                panic!("{hf} not mapped")
            };
            assert_eq!(role.name(), gguf);
            assert_eq!(hf_name(role).unwrap_or_default(), hf);
        }
        assert_eq!(
            map_hf_name("model.layers.0.self_attn.rotary_emb.inv_freq"),
            Some(HfName::Skip)
        );
        for unknown in [
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.01.mlp.up_proj.weight",
            "model.layers.+1.mlp.up_proj.weight",
            "model.layers..mlp.up_proj.weight",
            "model.layers.99999999999999999999999.mlp.up_proj.weight",
            "transformer.wte.weight",
            "model.embed_tokens.weight.extra",
        ] {
            assert_eq!(map_hf_name(unknown), None, "{unknown}");
        }
        let q = map_hf_name("model.layers.1.self_attn.q_proj.weight");
        assert_eq!(
            q.and_then(|n| if let HfName::Tensor(r) = n {
                qk_kind(r)
            } else {
                None
            }),
            Some(QkKind::Q)
        );
    }
}
