//! What each tensor of a checkpoint is to the planner (its role), checked against the model config: known
//! name, expected ggml shape, whole quant blocks per row, present exactly once. Also the byte sizes the stage
//! balancer needs. Everything the rest of the planner does assumes an `Inventory` was built first.

use std::collections::HashMap;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::roles::{LayerTensor, Role};
use crate::tensor::TensorDesc;

/// The checked tensor list: one role per tensor (same order), and byte sizes for stage balancing.
pub(crate) struct Inventory {
    pub roles: Vec<Role>,
    /// Bytes of each transformer layer's tensors.
    pub layer_bytes: Vec<u64>,
    /// Bytes that only the first stage holds (`token_embd`).
    pub embedding_bytes: u64,
    /// Bytes that only the last stage holds (`output_norm` and `output`, or `token_embd` when tied).
    pub head_bytes: u64,
    /// The LM head is `token_embd` (the checkpoint has no `output.weight`).
    pub tied_head: bool,
}

impl Inventory {
    pub(crate) fn new(config: &ModelConfig, tensors: &[TensorDesc]) -> Result<Self> {
        let mut roles = Vec::with_capacity(tensors.len());
        let mut bytes = Vec::with_capacity(tensors.len());
        let mut seen: HashMap<Role, usize> = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            let role = classify(&t.name, config.n_layer)?;
            if let Some(first) = seen.insert(role, i) {
                return Err(Error::Plan(format!(
                    "tensor `{}` appears twice in the tensor list (entries {first} and {i})",
                    t.name
                )));
            }
            check_shape(t, role, config)?;
            roles.push(role);
            bytes.push(tensor_bytes(t)?);
        }

        // Stops at the first gap, so an absurd layer count costs nothing before it is refused.
        let required = [Role::TokenEmbd, Role::OutputNorm].into_iter().chain(
            (0..config.n_layer)
                .flat_map(|layer| LayerTensor::ALL.map(|part| Role::Layer(layer, part))),
        );
        for role in required {
            if !seen.contains_key(&role) {
                return Err(Error::Plan(format!("missing tensor `{}`", role.name())));
            }
        }
        // Without `output.weight` the LM head is `token_embd` (as in llama.cpp); with it, `output.weight` is the
        // head even if the config calls the embeddings tied.
        let tied_head = !seen.contains_key(&Role::Output);
        if tied_head && !config.tied_embeddings {
            return Err(Error::Plan(
                "missing tensor `output.weight` (the config says the embeddings are not tied)"
                    .into(),
            ));
        }

        let mut layer_bytes = vec![0u64; config.n_layer];
        let (mut embedding_bytes, mut head_bytes) = (0u64, 0u64);
        for (&role, &b) in roles.iter().zip(&bytes) {
            match role {
                Role::Layer(n, _) => layer_bytes[n] = layer_bytes[n].saturating_add(b),
                Role::TokenEmbd => {
                    embedding_bytes = b;
                    if tied_head {
                        head_bytes = head_bytes.saturating_add(b);
                    }
                }
                Role::Output | Role::OutputNorm => head_bytes = head_bytes.saturating_add(b),
                // Every stage holds it: it does not move the balance.
                Role::RopeFreqs => {}
            }
        }
        Ok(Inventory {
            roles,
            layer_bytes,
            embedding_bytes,
            head_bytes,
            tied_head,
        })
    }
}

/// The role of a canonical GGUF name; anything the planner has no rule for is an error.
fn classify(name: &str, n_layer: usize) -> Result<Role> {
    match Role::parse(name) {
        Some(Role::Layer(layer, _)) if layer >= n_layer => Err(Error::Plan(format!(
            "tensor `{name}` belongs to layer {layer}, but the model has {n_layer} layers"
        ))),
        Some(role) => Ok(role),
        None => Err(Error::Plan(format!(
            "no sharding rule for tensor `{name}` (the planner knows token_embd, output, output_norm, \
             rope_freqs and blk.N.{{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,ffn_down}}\
             .weight of Llama-architecture models)"
        ))),
    }
}

fn check_shape(t: &TensorDesc, role: Role, config: &ModelConfig) -> Result<()> {
    let Some(expected) = role.expected_shape(config) else {
        return Err(Error::Plan(format!(
            "tensor `{}`: the config's dimensions overflow 64 bits",
            t.name
        )));
    };
    if t.shape != expected {
        return Err(Error::Plan(format!(
            "tensor `{}` has shape {:?}, but the config implies {:?} (ggml order: [input dim, rows])",
            t.name, t.shape, expected
        )));
    }
    Ok(())
}

/// Bytes of a tensor whose shape passed `check_shape`: rows of whole blocks, no overflow.
fn tensor_bytes(t: &TensorDesc) -> Result<u64> {
    let (block, type_size) = (t.ty.block_size() as u64, t.ty.type_size() as u64);
    let row_len = t.row_len();
    if !row_len.is_multiple_of(block) {
        return Err(Error::Plan(format!(
            "tensor `{}` is {} (block size {block}), but its rows have {row_len} elements, not a whole number \
             of blocks",
            t.name,
            t.ty.name()
        )));
    }
    let rows = t
        .shape
        .iter()
        .skip(1)
        .try_fold(1u64, |acc, &d| acc.checked_mul(d));
    rows.and_then(|rows| (row_len / block).checked_mul(type_size)?.checked_mul(rows))
        .ok_or_else(|| Error::Plan(format!("tensor `{}`: byte size overflows 64 bits", t.name)))
}
