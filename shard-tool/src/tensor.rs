//! `TensorDesc`: what the planner and the shard files need to know about a tensor, independent of where its
//! bytes live. Names are canonical GGUF/llama.cpp names (`blk.3.attn_q.weight`); shapes are in ggml order
//! (`shape[0]` is the contiguous, input dimension; `shape[1]` counts rows), as in GGUF tensor infos.

use serde::{Deserialize, Serialize};
use tessera_kernels::quant::{GgmlType, QuantError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorDesc {
    pub name: String,
    #[serde(with = "ggml_type_serde")]
    pub ty: GgmlType,
    /// ggml order: `shape[0]` contiguous.
    pub shape: Vec<u64>,
}

impl TensorDesc {
    pub fn new(name: impl Into<String>, ty: GgmlType, shape: Vec<u64>) -> Self {
        TensorDesc {
            name: name.into(),
            ty,
            shape,
        }
    }

    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Elements per row (`shape[0]`).
    pub fn row_len(&self) -> u64 {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Number of rows (product of `shape[1..]`).
    pub fn n_rows(&self) -> u64 {
        self.shape.iter().skip(1).product()
    }

    /// Bytes of one row; errors when the row is not a whole number of quant blocks.
    pub fn row_bytes(&self) -> Result<u64, QuantError> {
        Ok(self.ty.bytes_for(self.row_len() as usize)? as u64)
    }

    /// Bytes of the whole tensor.
    pub fn n_bytes(&self) -> Result<u64, QuantError> {
        let overflow = || QuantError::SizeOverflow {
            ty: self.ty,
            n: usize::MAX,
        };
        let rows = self
            .shape
            .iter()
            .skip(1)
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(overflow)?;
        self.row_bytes()?.checked_mul(rows).ok_or_else(overflow)
    }
}

/// Serializes a `GgmlType` as its llama.cpp name ("Q4_K").
pub mod ggml_type_serde {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use tessera_kernels::quant::GgmlType;

    pub fn serialize<S: Serializer>(ty: &GgmlType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(ty.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<GgmlType, D::Error> {
        let name = String::deserialize(d)?;
        GgmlType::from_name(&name)
            .ok_or_else(|| D::Error::custom(format!("unknown tensor type `{name}`")))
    }
}
