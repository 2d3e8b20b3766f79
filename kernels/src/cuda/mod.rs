//! The CUDA backend: CUDA C kernels (`kernels.cu`) compiled at run time by NVRTC for the device's compute
//! capability, and a typed API over `cudarc` ([`Gpu`]) that runs a shard's operations on one GPU.
//!
//! Nothing CUDA is needed to build: `cudarc` loads `libcuda`, `libnvrtc`, `libcublas` and `libnccl` with
//! `dlopen` when first used. It panics when a library is missing, so every entry point here checks
//! [`library_status`] first and answers [`CudaError::NoLibrary`] instead; [`preload_libraries`] makes
//! libraries unpacked from pip wheels (e.g. `scripts/fetch-cuda-libs.sh`) visible without `LD_LIBRARY_PATH`.
//!
//! Numerics follow the CPU kernels (`crate::cpu`) in f32: the same layouts (activations `[n][cols]`, matmul
//! output `y[t * rows + r]`, KV cache `[pos][kv_head][head_dim]` f16), RMS norm as ggml, RoPE from a host
//! table of `(cos, sin)` pairs, attention with q rounded to f16. Summation orders differ, so results agree
//! with the CPU to float rounding, not bit for bit. Weights keep their GGUF block layout on the device.
//!
//! Files: `compile` (the source, its entry points, NVRTC), `gpu` (device, memory, operations), `mirror`
//! (tests only: the Q4_K/Q6_K thread-to-data mapping of the kernels in Rust, checked against `quant`).
//! Without a GPU, `tests/cuda_compile.rs` compiles the source with a real NVRTC and
//! `scripts/cuda-emu-test.sh` runs every kernel on the CPU under a small CUDA emulation (g++).

use std::ffi::CString;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::quant::GgmlType;

mod compile;
mod gpu;
#[cfg(test)]
mod mirror;

pub use compile::{KERNEL_NAMES, KERNELS_SRC, compile_cubin, compile_ptx};
pub use gpu::{AttnShape, GEMM_MIN_TOKENS, GEMM_MIN_TOKENS_QUANT, Gpu, GpuMatrix, RowStats};

/// Errors of the CUDA backend. Operations never panic on caller input; they answer `Shape`.
#[derive(Debug, Error)]
pub enum CudaError {
    /// A CUDA library could not be loaded (`lib` is its name without version, e.g. `libcuda`).
    #[error("{lib} not found ({hint}); without a GPU, run with --device cpu")]
    NoLibrary { lib: &'static str, hint: String },
    /// A library file of a [`preload_libraries`] directory failed to load.
    #[error("cannot load {path}: {reason}")]
    Preload { path: PathBuf, reason: String },
    /// The requested device ordinal does not exist.
    #[error(
        "no CUDA device {ordinal} ({count} device(s) found); without a GPU, run with --device cpu"
    )]
    NoDevice { ordinal: usize, count: usize },
    /// A CUDA driver call failed (context, memory, launch).
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// NVRTC rejected the kernel source; the compiler log.
    #[error("NVRTC compilation failed: {0}")]
    Compile(String),
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Blas(String),
    /// The operation has no CUDA kernel for this tensor type.
    #[error("{op}: no CUDA kernel for {ty:?}")]
    Unsupported { ty: GgmlType, op: &'static str },
    /// A length, shape or alignment that does not fit the operation (the message names the operation).
    #[error("{0}")]
    Shape(String),
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Driver(e.to_string())
    }
}

impl From<cudarc::cublas::result::CublasError> for CudaError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        Self::Blas(e.to_string())
    }
}

/// Which CUDA libraries `cudarc` can load in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibraryStatus {
    /// `libcuda` (the driver; comes with the NVIDIA kernel driver, not pip).
    pub driver: bool,
    pub nvrtc: bool,
    pub cublas: bool,
    pub nccl: bool,
}

/// Probes the four libraries by the names `cudarc` will use. Safe to call anywhere, GPU or not.
pub fn library_status() -> LibraryStatus {
    // SAFETY: the probes only dlopen and dlclose the candidate names (no symbol is used); loading a
    // library runs its initializers, which for the CUDA libraries are side-effect free until used.
    unsafe {
        LibraryStatus {
            driver: cudarc::driver::sys::is_culib_present(),
            nvrtc: cudarc::nvrtc::sys::is_culib_present(),
            cublas: cudarc::cublas::sys::is_culib_present(),
            nccl: cudarc::nccl::sys::is_culib_present(),
        }
    }
}

/// `NoLibrary` for `lib` with a hint on how to provide it.
pub(crate) fn no_library(lib: &'static str) -> CudaError {
    let hint = match lib {
        "libcuda" => "install the NVIDIA driver; libcuda.so.1 comes with it".to_string(),
        _ => format!(
            "put {lib}.so on LD_LIBRARY_PATH, or unpack the pip wheel (scripts/fetch-cuda-libs.sh for \
             NVRTC) and preload its directory"
        ),
    };
    CudaError::NoLibrary { lib, hint }
}

/// `dlopen`s (`RTLD_NOW | RTLD_GLOBAL`) every `lib*.so*` file in `dir` and keeps it loaded, returning how
/// many were loaded. Later `dlopen`s by soname (cudarc's, and NVRTC's own of `libnvrtc-builtins`) then find
/// these objects, because glibc matches a request against the `DT_SONAME` of objects already loaded: this
/// is how a pip wheel's library directory is used without `LD_LIBRARY_PATH`.
///
/// Libraries that fail because a dependency in the same directory is not loaded yet are retried after the
/// others, until a pass loads nothing new. `*.alt.so*` files (NVIDIA's alternative builds shipped next to
/// the regular ones, exporting the same symbols) are skipped: loaded globally they could interpose the
/// regular library's symbols.
pub fn preload_libraries(dir: &Path) -> Result<usize, CudaError> {
    let entries = std::fs::read_dir(dir).map_err(|e| CudaError::Preload {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut pending: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("lib")
                && name.contains(".so")
                && !name.contains(".alt.")
                && p.is_file()
        })
        .collect();
    pending.sort();
    let mut loaded = 0;
    loop {
        let tried = pending.len();
        let mut failed = Vec::new();
        for path in pending {
            match dlopen_global(&path) {
                Ok(()) => loaded += 1,
                Err(reason) => failed.push((path, reason)),
            }
        }
        if failed.is_empty() {
            return Ok(loaded);
        }
        if failed.len() == tried {
            // This pass loaded nothing: what is left cannot be resolved by order.
            let (path, reason) = failed.swap_remove(0);
            return Err(CudaError::Preload { path, reason });
        }
        pending = failed.into_iter().map(|(path, _)| path).collect();
    }
}

/// `dlopen(path, RTLD_NOW | RTLD_GLOBAL)`, leaking the handle on purpose (the library stays loaded for
/// the life of the process, as cudarc's own handles do).
fn dlopen_global(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call; dlopen has no other preconditions.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl* call on this
        // thread; it is copied out at once.
        let msg = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "dlopen failed".to_string()
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(msg);
    }
    Ok(())
}
