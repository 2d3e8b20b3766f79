//! The GGUF metadata keys (`general.*`, `llama.*`) that describe a [`ModelConfig`], as llama.cpp's converter
//! writes them. Used for shards of Hugging Face checkpoints and for synthetic models, so that both read back
//! (with `gguf::model_config`) to the same config.

use crate::config::ModelConfig;
use crate::gguf::Value;

pub fn config_metadata(config: &ModelConfig) -> Vec<(String, Value)> {
    let a = &config.arch;
    let u = |v: usize| Value::U32(v as u32);
    let mut md = vec![("general.architecture".to_owned(), Value::String(a.clone()))];
    if let Some(name) = &config.name {
        md.push(("general.name".to_owned(), Value::String(name.clone())));
    }
    md.extend([
        (format!("{a}.vocab_size"), u(config.n_vocab)),
        (format!("{a}.context_length"), u(config.n_ctx_train)),
        (format!("{a}.embedding_length"), u(config.n_embd)),
        (format!("{a}.block_count"), u(config.n_layer)),
        (format!("{a}.feed_forward_length"), u(config.n_ff)),
        (format!("{a}.attention.head_count"), u(config.n_head)),
        (format!("{a}.attention.head_count_kv"), u(config.n_head_kv)),
        (format!("{a}.attention.key_length"), u(config.head_dim)),
        (format!("{a}.attention.value_length"), u(config.head_dim)),
        (format!("{a}.rope.freq_base"), Value::F32(config.rope_theta)),
        (format!("{a}.rope.dimension_count"), u(config.rope_dim)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_eps),
        ),
    ]);
    md
}

/// Llama 3.1 "llama3" RoPE frequency factors, as llama.cpp's converter stores them in `rope_freqs.weight`
/// (one per rotated pair; the engine divides each frequency by its factor).
pub fn llama3_rope_factors(config: &ModelConfig) -> Option<Vec<f32>> {
    let s = config.rope_scaling?;
    let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor as f64;
    let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor as f64;
    let dim = config.rope_dim;
    Some(
        (0..dim / 2)
            .map(|i| {
                let freq = 1.0 / (config.rope_theta as f64).powf(2.0 * i as f64 / dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let factor = if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    s.factor as f64
                } else {
                    let smooth = (s.original_max_position_embeddings as f64 / wavelen
                        - s.low_freq_factor as f64)
                        / (s.high_freq_factor as f64 - s.low_freq_factor as f64);
                    1.0 / ((1.0 - smooth) / s.factor as f64 + smooth)
                };
                factor as f32
            })
            .collect(),
    )
}
