//! Wire protocols of Tessera, generated from the `.proto` files beside this crate (the only place gRPC code is
//! generated):
//! - [`v1`]: the client API `tessera.v1` the coordinator serves (plus `grpc.health.v1` and reflection).
//! - [`worker::v1`]: the worker API `tessera.worker.v1` the coordinator calls, and the peer-link handshake.
//!
//! `bytes` fields of the worker API (hidden states, logits) are `bytes::Bytes`: no copy when tonic decodes them.

pub mod v1 {
    tonic::include_proto!("tessera.v1");

    /// Encoded `FileDescriptorSet` of `tessera.v1`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tessera_v1_descriptor");
}

pub mod worker {
    pub mod v1 {
        tonic::include_proto!("tessera.worker.v1");

        /// Encoded `FileDescriptorSet` of `tessera.worker.v1`, for server reflection.
        pub const FILE_DESCRIPTOR_SET: &[u8] =
            tonic::include_file_descriptor_set!("tessera_worker_v1_descriptor");
    }
}

/// f32 values as the little-endian bytes of the worker API's `bytes` fields.
pub fn f32s_to_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The f32 values of a little-endian `bytes` field; `None` when its length is not a multiple of 4.
pub fn bytes_to_f32s(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_bytes_round_trip() {
        let v = [0.0, -1.5, f32::MIN_POSITIVE, 3.25e7, f32::INFINITY];
        assert_eq!(bytes_to_f32s(&f32s_to_bytes(&v)).unwrap(), v);
        assert!(bytes_to_f32s(&[0, 1, 2]).is_none());
    }
}
