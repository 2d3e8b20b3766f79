//! Built-in model shapes: the hyperparameters of the Llama-family models Tessera targets, and the tensor list a
//! llama.cpp-converted GGUF of each would contain, without any weights.
//!
//! The planner, the memory report and the CLI's `plan --preset` work from shapes alone, so a 405B topology can
//! be checked on a laptop. Hyperparameters are the published ones (Hugging Face `config.json` of each model;
//! Llama 3.1 facts in DESIGN.md §3). Tensor names and ggml-order shapes (`shape[0]` = input dimension) follow
//! llama.cpp's `convert_hf_to_gguf.py`, which emits the generated `rope_freqs.weight` first, then the
//! checkpoint's tensors.
//!
//! Type mix (`tensor_descs`), modelled on what llama.cpp's quantizer produces:
//! - 1-D tensors (norms, `rope_freqs`) stay F32;
//! - a matrix is stored in the requested type when its row length (`shape[0]`) is a whole number of that type's
//!   blocks; otherwise it falls back to Q8_0 when the row is a multiple of 32, else to F16. (llama.cpp picks a
//!   legacy type of similar size, e.g. Q5_0 for Q4_K; what matters to the planner is only the block size, and
//!   every legacy type has blocks of 32.) SmolLM2's 576-wide rows are such a case for every k-quant.

use std::fmt;
use std::str::FromStr;

use tessera_kernels::quant::GgmlType;

use crate::config::{Llama3RopeScaling, ModelConfig};
use crate::tensor::TensorDesc;

/// A named model shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    /// A toy decoder whose every dimension is a multiple of 256, so every quant type applies to every matrix.
    Tiny,
    /// SmolLM2-135M (the real test model of DESIGN.md §5): tied embeddings, 3 KV heads.
    SmolLm,
    /// Llama 3.2 1B: tied embeddings, llama3 RoPE scaling with factor 32.
    Llama3_1B,
    /// Llama 3.1 8B.
    Llama3_8B,
    /// Llama 3.1 70B.
    Llama3_70B,
    /// Llama 3.1 405B.
    Llama3_405B,
}

impl Preset {
    pub const ALL: [Preset; 6] = [
        Preset::Tiny,
        Preset::SmolLm,
        Preset::Llama3_1B,
        Preset::Llama3_8B,
        Preset::Llama3_70B,
        Preset::Llama3_405B,
    ];

    /// The name used on the command line and in golden files.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::SmolLm => "smollm",
            Preset::Llama3_1B => "llama3-1b",
            Preset::Llama3_8B => "llama3-8b",
            Preset::Llama3_70B => "llama3-70b",
            Preset::Llama3_405B => "llama3-405b",
        }
    }

    pub fn from_name(name: &str) -> Option<Preset> {
        Self::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name.trim()))
    }

    /// The model's hyperparameters.
    pub fn config(self) -> ModelConfig {
        match self {
            Preset::Tiny => ModelConfig {
                arch: "llama".into(),
                name: Some("tessera-tiny".into()),
                n_vocab: 512,
                n_embd: 256,
                n_layer: 2,
                n_head: 4,
                n_head_kv: 2,
                head_dim: 64,
                n_ff: 512,
                n_ctx_train: 2048,
                rope_theta: 10_000.0,
                rope_dim: 64,
                rope_scaling: None,
                rms_eps: 1e-5,
                tied_embeddings: false,
            },
            Preset::SmolLm => ModelConfig {
                arch: "llama".into(),
                name: Some("SmolLM2-135M".into()),
                n_vocab: 49_152,
                n_embd: 576,
                n_layer: 30,
                n_head: 9,
                n_head_kv: 3,
                head_dim: 64,
                n_ff: 1536,
                n_ctx_train: 8192,
                rope_theta: 100_000.0,
                rope_dim: 64,
                rope_scaling: None,
                rms_eps: 1e-5,
                tied_embeddings: true,
            },
            Preset::Llama3_1B => ModelConfig {
                arch: "llama".into(),
                name: Some("Llama-3.2-1B".into()),
                n_vocab: 128_256,
                n_embd: 2048,
                n_layer: 16,
                n_head: 32,
                n_head_kv: 8,
                head_dim: 64,
                n_ff: 8192,
                n_ctx_train: 131_072,
                rope_theta: 500_000.0,
                rope_dim: 64,
                rope_scaling: Some(llama3_scaling(32.0)),
                rms_eps: 1e-5,
                tied_embeddings: true,
            },
            Preset::Llama3_8B => llama31("Llama-3.1-8B", 4096, 32, 32, 14_336),
            Preset::Llama3_70B => llama31("Llama-3.1-70B", 8192, 80, 64, 28_672),
            Preset::Llama3_405B => llama31("Llama-3.1-405B", 16_384, 126, 128, 53_248),
        }
    }

    /// The model's hyperparameters with the layer count replaced (a shallow copy of a large model for tests).
    pub fn config_with_layers(self, n_layer: Option<usize>) -> ModelConfig {
        let mut config = self.config();
        if let Some(n) = n_layer {
            config.n_layer = n;
        }
        config
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::from_name(s).ok_or_else(|| {
            let known: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
            format!(
                "unknown model preset `{s}`; known presets: {}",
                known.join(", ")
            )
        })
    }
}

/// Llama 3 RoPE scaling as in Meta's configs: only the factor differs (8 for 3.1, 32 for 3.2 1B/3B).
fn llama3_scaling(factor: f32) -> Llama3RopeScaling {
    Llama3RopeScaling {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    }
}

/// Llama 3.1 (DESIGN.md §3): vocab 128256, head_dim 128, 8 KV heads, theta 500000, llama3 scaling factor 8.
fn llama31(name: &str, n_embd: usize, n_layer: usize, n_head: usize, n_ff: usize) -> ModelConfig {
    ModelConfig {
        arch: "llama".into(),
        name: Some(name.into()),
        n_vocab: 128_256,
        n_embd,
        n_layer,
        n_head,
        n_head_kv: 8,
        head_dim: 128,
        n_ff,
        n_ctx_train: 131_072,
        rope_theta: 500_000.0,
        rope_dim: 128,
        rope_scaling: Some(llama3_scaling(8.0)),
        rms_eps: 1e-5,
        tied_embeddings: false,
    }
}

/// The type a matrix with rows of `row_len` elements gets when `quant` is requested (rule in the module doc).
pub fn matrix_type(row_len: u64, quant: GgmlType) -> GgmlType {
    let fits = |ty: GgmlType| row_len.is_multiple_of(ty.block_size() as u64);
    if fits(quant) {
        quant
    } else if fits(GgmlType::Q8_0) {
        GgmlType::Q8_0
    } else {
        GgmlType::F16
    }
}

/// Every tensor of a llama.cpp GGUF of this model, in converter order, with ggml-order shapes and the type mix
/// described in the module doc. `rope_freqs.weight` ([rope_dim / 2], F32) is listed when the config has llama3
/// RoPE scaling; `output.weight` unless the embeddings are tied.
pub fn tensor_descs(config: &ModelConfig, quant: GgmlType) -> Vec<TensorDesc> {
    let embd = config.n_embd as u64;
    let q_rows = (config.n_head as u64).saturating_mul(config.head_dim as u64);
    let kv_rows = (config.n_head_kv as u64).saturating_mul(config.head_dim as u64);
    let ff = config.n_ff as u64;
    let vocab = config.n_vocab as u64;
    let matrix = |name: String, cols: u64, rows: u64| {
        TensorDesc::new(name, matrix_type(cols, quant), vec![cols, rows])
    };
    let vector = |name: String, len: u64| TensorDesc::new(name, GgmlType::F32, vec![len]);

    let mut out = Vec::with_capacity(config.n_layer.saturating_mul(9).saturating_add(4));
    if config.rope_scaling.is_some() {
        out.push(vector(
            "rope_freqs.weight".into(),
            (config.rope_dim / 2) as u64,
        ));
    }
    out.push(matrix("token_embd.weight".into(), embd, vocab));
    for layer in 0..config.n_layer {
        let name = |kind: &str| format!("blk.{layer}.{kind}.weight");
        out.push(vector(name("attn_norm"), embd));
        out.push(matrix(name("attn_q"), embd, q_rows));
        out.push(matrix(name("attn_k"), embd, kv_rows));
        out.push(matrix(name("attn_v"), embd, kv_rows));
        out.push(matrix(name("attn_output"), q_rows, embd));
        out.push(vector(name("ffn_norm"), embd));
        out.push(matrix(name("ffn_gate"), embd, ff));
        out.push(matrix(name("ffn_up"), embd, ff));
        out.push(matrix(name("ffn_down"), ff, embd));
    }
    out.push(vector("output_norm.weight".into(), embd));
    if !config.tied_embeddings {
        out.push(matrix("output.weight".into(), embd, vocab));
    }
    out
}

/// Trained parameters of the model (everything in `tensor_descs` except the derived `rope_freqs`).
/// Saturates instead of overflowing on absurd configs.
pub fn parameter_count(config: &ModelConfig) -> u64 {
    let [embd, layers, heads, kv, hd, ff, vocab] = [
        config.n_embd,
        config.n_layer,
        config.n_head,
        config.n_head_kv,
        config.head_dim,
        config.n_ff,
        config.n_vocab,
    ]
    .map(|v| v as u64);
    let mul = |a: u64, b: u64| a.saturating_mul(b);
    let attn = mul(embd, mul(heads, hd))
        .saturating_mul(2)
        .saturating_add(mul(embd, mul(kv, hd)).saturating_mul(2));
    let ffn = mul(3, mul(embd, ff));
    let norms = mul(2, embd);
    let per_layer = attn.saturating_add(ffn).saturating_add(norms);
    let embeddings = mul(vocab, embd).saturating_mul(if config.tied_embeddings { 1 } else { 2 });
    mul(per_layer, layers)
        .saturating_add(embeddings)
        .saturating_add(embd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_published_sizes() {
        // Published totals: SmolLM2-135M 134.5M, Llama 3.2 1B 1.24B, Llama 3.1 8.03B / 70.6B / 405.9B.
        let expect = [
            (Preset::SmolLm, 134_515_008u64),
            (Preset::Llama3_1B, 1_235_814_400),
            (Preset::Llama3_8B, 8_030_261_248),
            (Preset::Llama3_70B, 70_553_706_496),
            (Preset::Llama3_405B, 405_853_388_800),
        ];
        for (preset, n) in expect {
            assert_eq!(parameter_count(&preset.config()), n, "{preset}");
        }
    }

    #[test]
    fn parameter_count_equals_sum_of_tensor_elements() {
        for preset in Preset::ALL {
            let config = preset.config();
            let sum: u64 = tensor_descs(&config, GgmlType::F16)
                .iter()
                .filter(|t| t.name != "rope_freqs.weight")
                .map(|t| t.n_elements())
                .sum();
            assert_eq!(sum, parameter_count(&config), "{preset}");
        }
    }

    #[test]
    fn presets_validate_and_parse_by_name() {
        for preset in Preset::ALL {
            preset.config().validate().unwrap();
            assert_eq!(preset.name().parse::<Preset>().unwrap(), preset);
        }
        let err = "llama2-7b".parse::<Preset>().unwrap_err();
        assert!(
            err.contains("llama2-7b") && err.contains("llama3-405b"),
            "{err}"
        );
        assert_eq!(Preset::Llama3_8B.config_with_layers(Some(3)).n_layer, 3);
    }

    #[test]
    fn kv_cache_per_token_matches_design_table() {
        // DESIGN.md §3: 128 / 320 / 504 KiB per token in bf16.
        for (preset, kib) in [
            (Preset::Llama3_8B, 128),
            (Preset::Llama3_70B, 320),
            (Preset::Llama3_405B, 504),
        ] {
            let c = preset.config();
            let bytes = c.n_layer as u64 * c.n_head_kv as u64 * c.kv_bytes_per_token_per_head(2);
            assert_eq!(bytes, kib * 1024, "{preset}");
        }
    }

    #[test]
    fn tensor_list_follows_llama_cpp_naming_and_order() {
        let config = Preset::SmolLm.config();
        let t = tensor_descs(&config, GgmlType::Q8_0);
        assert_eq!(
            t.len(),
            1 + 30 * 9 + 1,
            "tied: no output.weight, no rope_freqs"
        );
        assert_eq!(t[0].name, "token_embd.weight");
        assert_eq!(t[0].shape, vec![576, 49_152]);
        let blk0: Vec<&str> = t[1..10].iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            blk0,
            [
                "blk.0.attn_norm.weight",
                "blk.0.attn_q.weight",
                "blk.0.attn_k.weight",
                "blk.0.attn_v.weight",
                "blk.0.attn_output.weight",
                "blk.0.ffn_norm.weight",
                "blk.0.ffn_gate.weight",
                "blk.0.ffn_up.weight",
                "blk.0.ffn_down.weight",
            ]
        );
        assert_eq!(t[3].shape, vec![576, 192], "attn_k: 3 KV heads of 64");
        assert_eq!(t[9].shape, vec![1536, 576], "ffn_down: [n_ff, n_embd]");
        assert_eq!(t.last().unwrap().name, "output_norm.weight");

        let t = tensor_descs(&Preset::Llama3_8B.config(), GgmlType::Q4_K);
        assert_eq!(t[0].name, "rope_freqs.weight");
        assert_eq!((t[0].ty, t[0].shape.clone()), (GgmlType::F32, vec![64]));
        assert_eq!(t.last().unwrap().name, "output.weight");
        assert_eq!(t.len(), 1 + 1 + 32 * 9 + 2);
    }

    #[test]
    fn type_mix_falls_back_where_blocks_do_not_fit() {
        assert_eq!(matrix_type(576, GgmlType::Q4_K), GgmlType::Q8_0);
        assert_eq!(matrix_type(1536, GgmlType::Q4_K), GgmlType::Q4_K);
        assert_eq!(matrix_type(576, GgmlType::Q4_0), GgmlType::Q4_0);
        assert_eq!(matrix_type(100, GgmlType::Q4_0), GgmlType::F16);
        assert_eq!(matrix_type(100, GgmlType::BF16), GgmlType::BF16);
        let t = tensor_descs(&Preset::SmolLm.config(), GgmlType::Q6_K);
        let ty = |name: &str| t.iter().find(|t| t.name == name).unwrap().ty;
        assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q8_0);
        assert_eq!(ty("blk.0.ffn_down.weight"), GgmlType::Q6_K);
        assert_eq!(ty("blk.0.attn_norm.weight"), GgmlType::F32);
        // Every tensor of the tiny model takes every type, and every row is whole blocks.
        for quant in GgmlType::ALL {
            for d in tensor_descs(&Preset::Tiny.config(), quant) {
                d.n_bytes().unwrap();
                if d.shape.len() == 2 {
                    assert_eq!(d.ty, quant, "{}", d.name);
                }
            }
        }
    }
}
