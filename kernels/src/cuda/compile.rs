//! The CUDA C source, its entry points and its compilation to PTX with NVRTC.

use std::ffi::CString;

use cudarc::nvrtc::{result, sys};

use super::{CudaError, no_library};

/// The kernels' CUDA C source (self-contained: no headers beyond what NVRTC has built in).
pub const KERNELS_SRC: &str = include_str!("kernels.cu");

/// Every `extern "C"` entry point of [`KERNELS_SRC`]; [`Gpu::open`](super::Gpu::open) loads them all, and
/// the compile test checks each appears as `.entry NAME` in the PTX.
pub const KERNEL_NAMES: &[&str] = &[
    "matvec_f32_t1",
    "matvec_f32_t2",
    "matvec_f32_t4",
    "matvec_f32_t8",
    "matvec_f16_t1",
    "matvec_f16_t2",
    "matvec_f16_t4",
    "matvec_f16_t8",
    "matvec_bf16_t1",
    "matvec_bf16_t2",
    "matvec_bf16_t4",
    "matvec_bf16_t8",
    "matvec_q8_0_t1",
    "matvec_q8_0_t2",
    "matvec_q8_0_t4",
    "matvec_q8_0_t8",
    "matvec_q4_k_t1",
    "matvec_q4_k_t2",
    "matvec_q4_k_t4",
    "matvec_q4_k_t8",
    "matvec_q6_k_t1",
    "matvec_q6_k_t2",
    "matvec_q6_k_t4",
    "matvec_q6_k_t8",
    "dequant_f16_q8_0",
    "dequant_f16_q4_k",
    "dequant_f16_q6_k",
    "rms_norm_f32",
    "silu_mul_f32",
    "add_f32",
    "rope_f32",
    "kv_write_f16",
    "convert_f32_f16",
    "convert_f32_bf16",
    "row_stats_f32",
    "attention_f16",
    "attention_combine",
];

/// Compiles [`KERNELS_SRC`] to PTX text for `arch`, a virtual architecture such as `compute_90`.
///
/// IEEE arithmetic (no `--use_fast_math`: exact division and square root, denormals kept), NVRTC's default
/// optimization (the equivalent of `nvcc -O3`). Needs only `libnvrtc` (no GPU, no driver); answers
/// `NoLibrary` when it cannot be loaded and `Compile` with the NVRTC log when the source is rejected.
pub fn compile_ptx(arch: &str) -> Result<String, CudaError> {
    check_arch(arch, "compute_")?;
    let mut ptx = compile(arch, Output::Ptx)?;
    // NVRTC's PTX is NUL-terminated.
    if let Some(end) = ptx.iter().position(|&b| b == 0) {
        ptx.truncate(end);
    }
    String::from_utf8(ptx).map_err(|e| CudaError::Compile(format!("PTX is not UTF-8: {e}")))
}

/// Compiles [`KERNELS_SRC`] to a CUBIN (machine code) for `arch`, a real architecture such as `sm_90`,
/// with the options of [`compile_ptx`].
///
/// This is what [`Gpu::open`](super::Gpu::open) loads first: machine code from a newer NVRTC loads on any
/// driver of the same CUDA major version, whereas PTX must be JIT-compiled by a driver at least as new as
/// the NVRTC that wrote it.
pub fn compile_cubin(arch: &str) -> Result<Vec<u8>, CudaError> {
    check_arch(arch, "sm_")?;
    compile(arch, Output::Cubin)
}

fn check_arch(arch: &str, prefix: &str) -> Result<(), CudaError> {
    let valid = arch
        .strip_prefix(prefix)
        .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric()));
    if valid {
        Ok(())
    } else {
        Err(CudaError::Compile(format!(
            "architecture {arch:?} is not of the form {prefix}XY"
        )))
    }
}

#[derive(Clone, Copy)]
enum Output {
    Ptx,
    Cubin,
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by `create_program` and is destroyed only here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn compile(arch: &str, out: Output) -> Result<Vec<u8>, CudaError> {
    // SAFETY: only probes whether the library can be dlopen'ed (see `library_status`).
    if !unsafe { sys::is_culib_present() } {
        return Err(no_library("libnvrtc"));
    }
    let nvrtc = |what: &str, e: result::NvrtcError| CudaError::Compile(format!("{what}: {e}"));
    let src = CString::new(KERNELS_SRC)
        .map_err(|_| CudaError::Compile("kernel source contains a NUL byte".into()))?;
    let name = c"kernels.cu";
    let prog = Program(
        result::create_program(&src, Some(name)).map_err(|e| nvrtc("nvrtcCreateProgram", e))?,
    );
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        // The defaults, spelled out: IEEE division and square root, denormals kept, no fast math.
        "--prec-div=true".to_string(),
        "--prec-sqrt=true".to_string(),
        "--ftz=false".to_string(),
    ];
    // SAFETY: `prog` is a live program; `src` and `name` outlive it (dropped after `prog`).
    if let Err(e) = unsafe { result::compile_program(prog.0, &options) } {
        // SAFETY: as above.
        let log = unsafe { result::get_program_log(prog.0) }
            .map(|raw| c_chars_to_string(&raw))
            .unwrap_or_default();
        return Err(CudaError::Compile(format!("{e} ({arch}):\n{log}")));
    }
    match out {
        // SAFETY: `prog` compiled successfully.
        Output::Ptx => unsafe { result::get_ptx(prog.0) }
            .map(|raw| raw.iter().map(|&c| c as u8).collect())
            .map_err(|e| nvrtc("nvrtcGetPTX", e)),
        Output::Cubin => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully; `size` is a valid out-pointer.
            unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
                .result()
                .map_err(|e| nvrtc("nvrtcGetCUBINSize", e))?;
            let mut cubin = vec![0u8; size];
            // SAFETY: `cubin` has the `size` bytes NVRTC asked for.
            unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast()) }
                .result()
                .map_err(|e| nvrtc("nvrtcGetCUBIN", e))?;
            if cubin.is_empty() {
                return Err(CudaError::Compile(format!(
                    "NVRTC produced no CUBIN for {arch}"
                )));
            }
            Ok(cubin)
        }
    }
}

fn c_chars_to_string(raw: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
