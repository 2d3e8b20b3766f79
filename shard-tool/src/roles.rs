//! What each tensor of a Llama checkpoint is (its [`Role`]), named the one canonical way (GGUF / llama.cpp
//! names, `blk.3.attn_q.weight`), with the ggml shape the model config implies. The planner, the Hugging Face
//! name mapping and the engine's weight loader all classify tensors through this one table.

use crate::config::ModelConfig;

/// The tensors of one transformer block, in llama.cpp's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LayerTensor {
    AttnNorm,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnNorm,
    FfnGate,
    FfnUp,
    FfnDown,
}

impl LayerTensor {
    pub const ALL: [LayerTensor; 9] = [
        LayerTensor::AttnNorm,
        LayerTensor::AttnQ,
        LayerTensor::AttnK,
        LayerTensor::AttnV,
        LayerTensor::AttnOutput,
        LayerTensor::FfnNorm,
        LayerTensor::FfnGate,
        LayerTensor::FfnUp,
        LayerTensor::FfnDown,
    ];

    /// The GGUF part name (`attn_q` in `blk.N.attn_q.weight`).
    pub fn gguf_part(self) -> &'static str {
        match self {
            LayerTensor::AttnNorm => "attn_norm",
            LayerTensor::AttnQ => "attn_q",
            LayerTensor::AttnK => "attn_k",
            LayerTensor::AttnV => "attn_v",
            LayerTensor::AttnOutput => "attn_output",
            LayerTensor::FfnNorm => "ffn_norm",
            LayerTensor::FfnGate => "ffn_gate",
            LayerTensor::FfnUp => "ffn_up",
            LayerTensor::FfnDown => "ffn_down",
        }
    }

    fn from_gguf_part(part: &str) -> Option<LayerTensor> {
        Self::ALL.into_iter().find(|t| t.gguf_part() == part)
    }
}

/// What a tensor is in the model. Ordered as the canonical listing: embedding, blocks, norm, head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Llama 3.1 RoPE frequency factors (llama.cpp's converter writes them first).
    RopeFreqs,
    TokenEmbd,
    Layer(usize, LayerTensor),
    OutputNorm,
    Output,
}

impl Role {
    /// Canonical GGUF name (`blk.3.attn_q.weight`).
    pub fn name(self) -> String {
        match self {
            Role::RopeFreqs => "rope_freqs.weight".into(),
            Role::TokenEmbd => "token_embd.weight".into(),
            Role::Layer(n, t) => format!("blk.{n}.{}.weight", t.gguf_part()),
            Role::OutputNorm => "output_norm.weight".into(),
            Role::Output => "output.weight".into(),
        }
    }

    /// The role of a canonical GGUF name; `None` for names outside the Llama architecture. Layer numbers are
    /// plain decimals (no sign, no leading zero), so each tensor has one spelling.
    pub fn parse(name: &str) -> Option<Role> {
        Some(match name {
            "rope_freqs.weight" => Role::RopeFreqs,
            "token_embd.weight" => Role::TokenEmbd,
            "output_norm.weight" => Role::OutputNorm,
            "output.weight" => Role::Output,
            _ => {
                let (n, part) = name
                    .strip_prefix("blk.")?
                    .strip_suffix(".weight")?
                    .split_once('.')?;
                Role::Layer(parse_layer_number(n)?, LayerTensor::from_gguf_part(part)?)
            }
        })
    }

    /// The ggml-order shape (`[input dim, rows]`, 1-D for norms) `config` implies; `None` on overflow.
    pub fn expected_shape(self, config: &ModelConfig) -> Option<Vec<u64>> {
        let embd = config.n_embd as u64;
        let q_rows = (config.n_head as u64).checked_mul(config.head_dim as u64)?;
        let kv_rows = (config.n_head_kv as u64).checked_mul(config.head_dim as u64)?;
        let (ff, vocab) = (config.n_ff as u64, config.n_vocab as u64);
        Some(match self {
            Role::TokenEmbd | Role::Output => vec![embd, vocab],
            Role::OutputNorm => vec![embd],
            Role::RopeFreqs => vec![(config.rope_dim / 2) as u64],
            Role::Layer(_, t) => match t {
                LayerTensor::AttnNorm | LayerTensor::FfnNorm => vec![embd],
                LayerTensor::AttnQ => vec![embd, q_rows],
                LayerTensor::AttnK | LayerTensor::AttnV => vec![embd, kv_rows],
                LayerTensor::AttnOutput => vec![q_rows, embd],
                LayerTensor::FfnGate | LayerTensor::FfnUp => vec![embd, ff],
                LayerTensor::FfnDown => vec![ff, embd],
            },
        })
    }
}

/// A layer number as written in tensor names: decimal digits, no leading zero.
pub fn parse_layer_number(n: &str) -> Option<usize> {
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0'))
    {
        return None;
    }
    n.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let roles = [
            Role::RopeFreqs,
            Role::TokenEmbd,
            Role::OutputNorm,
            Role::Output,
        ]
        .into_iter()
        .chain(LayerTensor::ALL.into_iter().map(|t| Role::Layer(17, t)));
        for role in roles {
            assert_eq!(Role::parse(&role.name()), Some(role));
        }
        for bad in [
            "blk.01.attn_q.weight",
            "blk.-1.attn_q.weight",
            "blk.3.attn_qq.weight",
            "blk.3.attn_q.bias",
            "x",
        ] {
            assert_eq!(Role::parse(bad), None, "{bad}");
        }
    }
}
