//! NCCL for a tensor-parallel group whose ranks are all GPUs: rank 0 makes a unique id, the coordinator hands
//! it to every rank in JoinGroup, and each rank joins the communicator on its GPU's stream. Groups that mix
//! GPU and CPU ranks, or span machines without NCCL, keep summing over the peer links (`peer`).

use std::sync::Arc;

use cudarc::driver::CudaStream;
use cudarc::nccl::{Comm, Id};

use super::Device;
use crate::error::{Error, Result};

/// Bytes of an `ncclUniqueId`.
pub const ID_BYTES: usize = 128;

/// A new NCCL unique id for a group whose rank 0 runs on `device`.
pub fn unique_id(device: Device) -> Result<Vec<u8>> {
    if device == Device::Cpu {
        return Err(Error::Device {
            device: device.to_string(),
            msg: "NCCL needs GPU ranks; this worker runs on the CPU (its group sums over the peer links)".into(),
        });
    }
    check_library(device)?;
    let id = Id::new().map_err(|e| Error::Device {
        device: device.to_string(),
        msg: format!("ncclGetUniqueId: {e:?}"),
    })?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// An NCCL communicator that can move to the engine thread.
pub(crate) struct NcclComm(pub(crate) Comm);

// SAFETY: `ncclComm_t` is an opaque handle that NCCL allows any thread to use, just not two at once; the
// engine owns it and uses it only from the one thread that runs its forward passes.
unsafe impl Send for NcclComm {}

/// Joins the communicator of `id` as `rank` of `world` on `stream`; returns once every rank has joined.
pub(crate) fn join(
    device: Device,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    id: &[u8],
) -> Result<NcclComm> {
    let bad = |msg: String| Error::Device {
        device: device.to_string(),
        msg,
    };
    let bytes: [u8; ID_BYTES] = id
        .try_into()
        .map_err(|_| bad(format!("an NCCL id is {ID_BYTES} bytes, got {}", id.len())))?;
    if rank >= world || i32::try_from(world).is_err() {
        return Err(bad(format!("rank {rank} of a group of {world}")));
    }
    check_library(device)?;
    let id = Id::uninit(bytes.map(|b| b as core::ffi::c_char));
    Comm::from_rank(stream, rank, world, id)
        .map(NcclComm)
        .map_err(|e| bad(format!("ncclCommInitRank: {e:?}")))
}

fn check_library(device: Device) -> Result<()> {
    // SAFETY: only tries to dlopen the candidate library names; calls nothing in them.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Device {
            device: device.to_string(),
            msg: "the NCCL library (libnccl.so.2) cannot be loaded: install NCCL or put its directory on \
                  LD_LIBRARY_PATH; without it GPU ranks sum over the peer links"
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ranks_get_no_nccl_id() {
        let err = unique_id(Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("NCCL needs GPU ranks"), "{err}");
    }
}
