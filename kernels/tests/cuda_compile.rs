//! The CUDA backend without a GPU: `Gpu::open` fails cleanly when the driver is missing, and the kernel
//! source compiles with a real NVRTC (from the PyPI wheel `scripts/fetch-cuda-libs.sh` unpacks) for the
//! architectures Tessera targets, with every entry point of `KERNEL_NAMES` present under its plain name.

use std::path::PathBuf;

use tessera_kernels::cuda::{
    CudaError, Gpu, KERNEL_NAMES, compile_cubin, compile_ptx, library_status, preload_libraries,
};

#[test]
fn open_without_driver_is_an_error_not_a_panic() {
    if library_status().driver {
        // A machine with the NVIDIA driver: opening must work or say precisely why not.
        match Gpu::open(0) {
            Ok(gpu) => {
                assert!(!gpu.name().is_empty());
                assert!(gpu.total_memory() > 0);
            }
            Err(e @ (CudaError::NoDevice { .. } | CudaError::NoLibrary { .. })) => {
                eprintln!("note: driver present but {e}");
            }
            Err(e) => panic!("Gpu::open(0) failed: {e}"),
        }
        return;
    }
    match Gpu::open(0) {
        Err(CudaError::NoLibrary { lib, hint }) => {
            assert_eq!(lib, "libcuda");
            let msg = CudaError::NoLibrary { lib, hint }.to_string();
            assert!(
                msg.contains("libcuda") && msg.contains("--device cpu"),
                "{msg}"
            );
        }
        Err(CudaError::NoDevice { .. }) => {}
        Err(e) => panic!("expected NoLibrary(libcuda) or NoDevice, got {e}"),
        Ok(_) => panic!("Gpu::open(0) succeeded without a driver"),
    }
}

/// The NVRTC library directory: `TESSERA_CUDA_LIB_DIR`, else `$TESSERA_CACHE/cuda/lib` (default cache
/// `~/.cache/tessera`).
fn nvrtc_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TESSERA_CUDA_LIB_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("TESSERA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tessera")
        });
    cache.join("cuda/lib")
}

#[test]
fn kernels_compile_with_nvrtc() {
    let dir = nvrtc_dir();
    if !dir.is_dir() {
        let msg = format!(
            "NVRTC library directory {} is missing: run scripts/fetch-test-data.sh (or \
             scripts/fetch-cuda-libs.sh)",
            dir.display()
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("note: skipping the NVRTC compile test: {msg}");
        return;
    }
    let loaded = preload_libraries(&dir).unwrap();
    assert!(loaded > 0, "no library loaded from {}", dir.display());
    assert!(
        library_status().nvrtc,
        "libnvrtc still not loadable after preloading {}",
        dir.display()
    );

    for arch in ["compute_90", "compute_80"] {
        let ptx = compile_ptx(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let entries: Vec<&str> = ptx
            .lines()
            .filter_map(|l| l.split(".entry ").nth(1))
            .map(|rest| rest.split(['(', ' ']).next().unwrap_or(""))
            .collect();
        for name in KERNEL_NAMES {
            assert!(
                entries.contains(name),
                "{arch}: no `.entry {name}` in the PTX"
            );
        }
        assert_eq!(
            entries.len(),
            KERNEL_NAMES.len(),
            "{arch}: entries {entries:?}"
        );
    }
    // Machine code too (what Gpu::open loads first): ptxas must accept every kernel.
    for arch in ["sm_90", "sm_80"] {
        let cubin = compile_cubin(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert!(
            cubin.starts_with(b"\x7fELF"),
            "{arch}: CUBIN is not an ELF image"
        );
    }
    // Errors are values: a bad architecture is reported, not a panic.
    assert!(matches!(compile_ptx("sm_90"), Err(CudaError::Compile(_))));
    assert!(matches!(
        compile_ptx("compute_1"),
        Err(CudaError::Compile(_))
    ));
}
