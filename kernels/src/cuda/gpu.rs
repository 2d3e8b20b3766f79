//! One GPU: context, stream, the compiled kernels, a cuBLAS handle, and the shard's operations on device
//! memory.
//!
//! Everything runs in order on one stream ([`Gpu::stream`]); operations only enqueue work, except the ones
//! that return host data ([`Gpu::dtoh`], [`Gpu::row_stats`]), which wait for it. Arguments are checked
//! before anything is enqueued: lengths, shapes, the 32-bit limits of the kernels' index arithmetic and the
//! 16-byte alignment of buffers read with vector loads (views that start at a whole row of a fresh
//! allocation always are); a mismatch is a [`CudaError::Shape`] naming the operation.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys::{cublasComputeType_t, cublasOperation_t, cudaDataType_t};
use cudarc::driver::sys::{CUdevice_attribute, CUresult};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

pub use crate::cpu::AttnShape;
use crate::quant::GgmlType;

use super::compile::{KERNEL_NAMES, compile_cubin, compile_ptx};
use super::{CudaError, library_status, no_library};

/// From this many tokens, F16/BF16 matmuls go to cuBLAS (activations converted to the weight type).
pub const GEMM_MIN_TOKENS: usize = 16;
/// From this many tokens, quantized matmuls dequantize slices of rows to f16 and go to cuBLAS.
pub const GEMM_MIN_TOKENS_QUANT: usize = 32;
/// f16 elements of the dequantized weight slice of the cuBLAS path (64 MiB).
const DEQUANT_SLICE: usize = 1 << 25;
/// Threads per block of the matvec kernels (4 warps, one row each) and rows per block.
const MATVEC_THREADS: u32 = 128;
const MATVEC_ROWS: usize = 4;
/// Attention kernel constants (kernels.cu: ATT_THREADS, ATT_TILE, ATT_ROWS, ATT_MAX_HD).
const ATT_THREADS: u32 = 128;
const ATT_TILE: usize = 128;
const ATT_ROWS: usize = 8;
const ATT_MAX_HD: usize = 256;
/// Threads per block of the element-wise kernels.
const EW_THREADS: u32 = 256;

/// Per-row logits statistics for sampling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowStats {
    /// Largest logit.
    pub max: f32,
    /// Index of the largest logit (the first one on ties).
    pub argmax: u32,
    /// `log Σ exp(x)`, computed as `max + log Σ exp(x - max)`.
    pub lse: f32,
}

/// A weight matrix on the device in its GGUF block layout: `rows` rows of `cols` elements.
pub struct GpuMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: CudaSlice<u8>,
}

impl GpuMatrix {
    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.rows * self.row_bytes
    }
}

impl std::fmt::Debug for GpuMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuMatrix")
            .field("ty", &self.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// One CUDA device with the kernels loaded. See the module documentation.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    name: String,
    total_memory: usize,
    compute_capability: (i32, i32),
    sm_count: usize,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .finish()
    }
}

/// `CudaError::Shape` for `op`.
fn bad(op: &str, msg: impl std::fmt::Display) -> CudaError {
    CudaError::Shape(format!("{op}: {msg}"))
}

fn check_len(op: &str, what: &str, expected: usize, got: usize) -> Result<(), CudaError> {
    if expected == got {
        Ok(())
    } else {
        Err(bad(op, format!("{what}: expected {expected}, got {got}")))
    }
}

/// `a * b`, or a `Shape` error when it overflows.
fn mul(op: &str, a: usize, b: usize) -> Result<usize, CudaError> {
    a.checked_mul(b)
        .ok_or_else(|| bad(op, format!("{a} x {b} overflows")))
}

/// A kernel's `int` argument; values past `i32::MAX` are refused.
fn int(op: &str, what: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| {
        bad(
            op,
            format!("{what} = {v} exceeds the kernels' 32-bit range"),
        )
    })
}

/// A kernel's `long long` argument.
fn long(op: &str, what: &str, v: usize) -> Result<i64, CudaError> {
    i64::try_from(v).map_err(|_| bad(op, format!("{what} = {v} is too large")))
}

/// Device address of a buffer (for alignment checks and cuBLAS).
fn addr<T, S: DevicePtr<T>>(s: &S, stream: &CudaStream) -> u64 {
    let (p, _record) = s.device_ptr(stream);
    p
}

fn check_aligned<T, S: DevicePtr<T>>(
    op: &str,
    what: &str,
    s: &S,
    stream: &CudaStream,
) -> Result<(), CudaError> {
    let a = addr(s, stream);
    if a.is_multiple_of(16) {
        Ok(())
    } else {
        Err(bad(
            op,
            format!("{what} must start on a 16-byte boundary (address {a:#x})"),
        ))
    }
}

/// A 1-D launch of `blocks` blocks of `threads`.
fn cfg(op: &str, blocks: usize, threads: u32) -> Result<LaunchConfig, CudaError> {
    let blocks = u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| bad(op, format!("{blocks} blocks exceed the grid limit")))?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The matvec entry point for `ty` and `tile` tokens per block.
fn matvec_kernel(ty: GgmlType, tile: usize) -> Option<&'static str> {
    let names: [&'static str; 4] = match ty {
        GgmlType::F32 => [
            "matvec_f32_t1",
            "matvec_f32_t2",
            "matvec_f32_t4",
            "matvec_f32_t8",
        ],
        GgmlType::F16 => [
            "matvec_f16_t1",
            "matvec_f16_t2",
            "matvec_f16_t4",
            "matvec_f16_t8",
        ],
        GgmlType::BF16 => [
            "matvec_bf16_t1",
            "matvec_bf16_t2",
            "matvec_bf16_t4",
            "matvec_bf16_t8",
        ],
        GgmlType::Q8_0 => [
            "matvec_q8_0_t1",
            "matvec_q8_0_t2",
            "matvec_q8_0_t4",
            "matvec_q8_0_t8",
        ],
        GgmlType::Q4_K => [
            "matvec_q4_k_t1",
            "matvec_q4_k_t2",
            "matvec_q4_k_t4",
            "matvec_q4_k_t8",
        ],
        GgmlType::Q6_K => [
            "matvec_q6_k_t1",
            "matvec_q6_k_t2",
            "matvec_q6_k_t4",
            "matvec_q6_k_t8",
        ],
        _ => return None,
    };
    names.get(tile.trailing_zeros() as usize).copied()
}

/// Column multiple each supported type needs: a whole number of blocks, and for the float types whole
/// 16-byte loads.
fn col_granule(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::F32 => Some(4),
        GgmlType::F16 | GgmlType::BF16 => Some(8),
        GgmlType::Q8_0 => Some(32),
        GgmlType::Q4_K | GgmlType::Q6_K => Some(256),
        _ => None,
    }
}

impl Gpu {
    /// Opens device `ordinal`: checks that libcuda, NVRTC and cuBLAS load and that the device exists,
    /// creates the context and stream, compiles the kernels for the device (machine code, or PTX when
    /// NVRTC cannot target it), loads every entry point and creates the cuBLAS handle.
    pub fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        let libs = library_status();
        for (present, lib) in [
            (libs.driver, "libcuda"),
            (libs.nvrtc, "libnvrtc"),
            (libs.cublas, "libcublas"),
        ] {
            if !present {
                return Err(no_library(lib));
            }
        }
        let count = match CudaContext::device_count() {
            Ok(c) => usize::try_from(c).unwrap_or(0),
            // cuInit reports a machine without a usable GPU this way.
            Err(e) if e.0 == CUresult::CUDA_ERROR_NO_DEVICE => 0,
            Err(e) => return Err(e.into()),
        };
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.default_stream();
        let compute_capability = ctx.compute_capability()?;
        let (major, minor) = compute_capability;
        let module = match compile_cubin(&format!("sm_{major}{minor}")) {
            Ok(cubin) => ctx.load_module(Ptx::from_binary(cubin))?,
            Err(first) => {
                let ptx = compile_ptx(&format!("compute_{major}{minor}")).map_err(|_| first)?;
                ctx.load_module(Ptx::from_src(ptx))?
            }
        };
        let mut funcs = HashMap::new();
        for &name in KERNEL_NAMES {
            let f = module
                .load_function(name)
                .map_err(|e| CudaError::Driver(format!("loading kernel {name}: {e}")))?;
            funcs.insert(name, f);
        }
        let blas = CudaBlas::new(stream.clone())?;
        let sm = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        Ok(Gpu {
            name: ctx.name()?,
            total_memory: ctx.total_mem()?,
            sm_count: usize::try_from(sm).unwrap_or(1).max(1),
            compute_capability,
            ctx,
            stream,
            blas,
            funcs,
        })
    }

    /// The device's name (e.g. "NVIDIA H100 80GB HBM3").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Device memory in bytes.
    pub fn total_memory(&self) -> usize {
        self.total_memory
    }

    /// `(major, minor)` compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// The stream every operation is enqueued on (the context's default stream).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits until all enqueued work is done.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }

    fn func(&self, name: &'static str) -> Result<&CudaFunction, CudaError> {
        self.funcs
            .get(name)
            .ok_or_else(|| CudaError::Driver(format!("kernel {name} is not loaded")))
    }

    /// Zeroed f32 device buffer.
    pub fn alloc_f32(&self, len: usize) -> Result<CudaSlice<f32>, CudaError> {
        Ok(self.stream.alloc_zeros(len)?)
    }

    /// Zeroed f16 device buffer (raw `u16` bits), e.g. a KV cache.
    pub fn alloc_f16(&self, len: usize) -> Result<CudaSlice<u16>, CudaError> {
        Ok(self.stream.alloc_zeros(len)?)
    }

    /// Copies host data into a new device buffer.
    pub fn htod<T: DeviceRepr>(&self, src: &[T]) -> Result<CudaSlice<T>, CudaError> {
        Ok(self.stream.clone_htod(src)?)
    }

    /// Copies host data into an existing device buffer of the same length.
    pub fn htod_into<T: DeviceRepr>(
        &self,
        src: &[T],
        dst: &mut CudaViewMut<T>,
    ) -> Result<(), CudaError> {
        check_len("htod_into", "destination length", src.len(), dst.len())?;
        Ok(self.stream.memcpy_htod(src, dst)?)
    }

    /// Copies a device buffer to the host, waiting for the stream.
    pub fn dtoh<T: DeviceRepr + ValidAsZeroBits + Clone + Default>(
        &self,
        src: &CudaView<T>,
    ) -> Result<Vec<T>, CudaError> {
        let mut out = vec![T::default(); src.len()];
        self.stream.memcpy_dtoh(src, &mut out)?;
        self.stream.synchronize()?;
        Ok(out)
    }

    /// Uploads a GGUF weight matrix (`rows` rows of `cols` elements of `ty`, `bytes` as stored in the file).
    /// Supported: F32, F16, BF16, Q8_0, Q4_K, Q6_K; `cols` must be a multiple of 4 (F32), 8 (F16, BF16) or
    /// the block size.
    pub fn upload(
        &self,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<GpuMatrix, CudaError> {
        const OP: &str = "upload";
        let granule = col_granule(ty).ok_or(CudaError::Unsupported { ty, op: OP })?;
        if rows == 0 || cols == 0 || !cols.is_multiple_of(granule) {
            return Err(bad(
                OP,
                format!(
                    "{rows} x {cols} {ty:?}: need rows > 0 and cols a non-zero multiple of {granule}"
                ),
            ));
        }
        int(OP, "rows", rows)?;
        int(OP, "cols", cols)?;
        let row_bytes = ty.bytes_for(cols).map_err(|e| bad(OP, e))?;
        check_len(OP, "byte length", mul(OP, rows, row_bytes)?, bytes.len())?;
        let data = self.stream.clone_htod(bytes)?;
        Ok(GpuMatrix {
            ty,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    /// `y[t * rows + r] = Σ_c W[r, c] · x[t * cols + c]` for `n` tokens. `x` must be 16-byte aligned.
    ///
    /// Few tokens use the matvec kernels (one warp per weight row, up to 8 tokens per weight load); from
    /// [`GEMM_MIN_TOKENS`] (F16/BF16) or [`GEMM_MIN_TOKENS_QUANT`] (quantized) tokens, cuBLAS `gemm_ex`
    /// with f32 output and compute, on activations converted to f16 (bf16 for BF16 weights) and quantized
    /// weights dequantized to f16 a slice of rows at a time. F32 weights always use the matvec kernels.
    pub fn matmul(
        &self,
        w: &GpuMatrix,
        x: &CudaView<f32>,
        n: usize,
        y: &mut CudaViewMut<f32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "matmul";
        check_len(OP, "x length (n * cols)", mul(OP, n, w.cols)?, x.len())?;
        check_len(OP, "y length (n * rows)", mul(OP, n, w.rows)?, y.len())?;
        if n == 0 {
            return Ok(());
        }
        int(OP, "n * cols", x.len())?;
        int(OP, "n * rows", y.len())?;
        let gemm = match w.ty {
            GgmlType::F32 => false,
            GgmlType::F16 | GgmlType::BF16 => n >= GEMM_MIN_TOKENS,
            _ => n >= GEMM_MIN_TOKENS_QUANT,
        };
        if gemm {
            self.matmul_gemm(w, x, n, y)
        } else {
            check_aligned(OP, "x", x, &self.stream)?;
            self.matvec(w, x, n, y)
        }
    }

    fn matvec(
        &self,
        w: &GpuMatrix,
        x: &CudaView<f32>,
        n: usize,
        y: &mut CudaViewMut<f32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "matmul";
        let tile = match n {
            1 => 1,
            2 => 2,
            3 | 4 => 4,
            _ => 8,
        };
        let name = matvec_kernel(w.ty, tile).ok_or(CudaError::Unsupported { ty: w.ty, op: OP })?;
        let blocks = mul(OP, w.rows.div_ceil(MATVEC_ROWS), n.div_ceil(tile))?;
        let cfg = cfg(OP, blocks, MATVEC_THREADS)?;
        let (rows, cols, n) = (
            int(OP, "rows", w.rows)?,
            int(OP, "cols", w.cols)?,
            int(OP, "n", n)?,
        );
        let f = self.func(name)?;
        // SAFETY: the kernel reads rows x row_bytes of `w.data` (its exact size), n x cols floats of `x`
        // and writes n x rows floats of `y` (lengths checked by `matmul`); x is 16-byte aligned (checked)
        // and the weights are a fresh allocation (256-byte aligned) with rows a multiple of 16 bytes for
        // F32/F16/BF16 and Q4_K (144-byte blocks) and 2-byte accesses for Q8_0/Q6_K.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&w.data)
                .arg(x)
                .arg(y)
                .arg(&rows)
                .arg(&cols)
                .arg(&n)
                .launch(cfg)
        }?;
        Ok(())
    }

    /// The large-batch path of [`Gpu::matmul`]: see there.
    fn matmul_gemm(
        &self,
        w: &GpuMatrix,
        x: &CudaView<f32>,
        n: usize,
        y: &mut CudaViewMut<f32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "matmul";
        let (dtype, convert) = match w.ty {
            GgmlType::BF16 => (cudaDataType_t::CUDA_R_16BF, "convert_f32_bf16"),
            _ => (cudaDataType_t::CUDA_R_16F, "convert_f32_f16"),
        };
        let len = x.len();
        // SAFETY: every element is written by the conversion below before cuBLAS reads it.
        let mut xh = unsafe { self.stream.alloc::<u16>(len) }?;
        let len_l = long(OP, "n * cols", len)?;
        let f = self.func(convert)?;
        // SAFETY: reads `len` floats of x, writes `len` values of xh (both that long).
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(x)
                .arg(&mut xh)
                .arg(&len_l)
                .launch(self.ew_cfg(OP, len)?)
        }?;
        match w.ty {
            GgmlType::F16 | GgmlType::BF16 => {
                let a = addr(&w.data, &self.stream);
                self.gemm_ex(dtype, a, w.rows, w.cols, &xh, n, y, 0, w.rows)
            }
            GgmlType::Q8_0 | GgmlType::Q4_K | GgmlType::Q6_K => {
                let dequant = match w.ty {
                    GgmlType::Q8_0 => "dequant_f16_q8_0",
                    GgmlType::Q4_K => "dequant_f16_q4_k",
                    _ => "dequant_f16_q6_k",
                };
                let slice_rows = (DEQUANT_SLICE / w.cols).clamp(1, w.rows);
                // SAFETY: each slice's rows are written by the dequantization kernel before cuBLAS reads
                // them; only those rows are read.
                let mut wh = unsafe { self.stream.alloc::<u16>(slice_rows * w.cols) }?;
                let cols = int(OP, "cols", w.cols)?;
                for r0 in (0..w.rows).step_by(slice_rows) {
                    let nr = slice_rows.min(w.rows - r0);
                    let src = w
                        .data
                        .try_slice(r0 * w.row_bytes..(r0 + nr) * w.row_bytes)
                        .ok_or_else(|| bad(OP, "weight slice out of range"))?;
                    let parts = nr * w.cols / 32; // 8 values per Q8_0 part, 32 per k-quant part
                    let per_thread = if w.ty == GgmlType::Q8_0 { 4 } else { 1 };
                    let blocks = (parts * per_thread)
                        .div_ceil(EW_THREADS as usize)
                        .clamp(1, self.sm_count * 16);
                    let nr_i = int(OP, "rows", nr)?;
                    let f = self.func(dequant)?;
                    // SAFETY: `src` is exactly `nr` rows of the matrix; `wh` holds slice_rows >= nr rows
                    // of `cols` f16; the kernel grid-strides over nr x cols / (values per part) parts.
                    unsafe {
                        self.stream
                            .launch_builder(f)
                            .arg(&src)
                            .arg(&mut wh)
                            .arg(&nr_i)
                            .arg(&cols)
                            .launch(cfg(OP, blocks, EW_THREADS)?)
                    }?;
                    let a = addr(&wh, &self.stream);
                    self.gemm_ex(dtype, a, nr, w.cols, &xh, n, y, r0, w.rows)?;
                }
                Ok(())
            }
            ty => Err(CudaError::Unsupported { ty, op: OP }),
        }
    }

    /// `y[t * ldc + r0 + r] = Σ_c A[r, c] · xh[t, c]` for `r < m` with cuBLAS (column-major view: `C = Aᵀ
    /// B`, A `k x m` with lda = k, B `k x n` with ldb = k, C at row offset `r0` with ldc = `ldc`).
    #[allow(clippy::too_many_arguments)]
    fn gemm_ex(
        &self,
        dtype: cudaDataType_t,
        a: u64,
        m: usize,
        k: usize,
        xh: &CudaSlice<u16>,
        n: usize,
        y: &mut CudaViewMut<f32>,
        r0: usize,
        ldc: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "matmul (cuBLAS)";
        let (mi, ni, ki, ldci) = (
            int(OP, "m", m)?,
            int(OP, "n", n)?,
            int(OP, "k", k)?,
            int(OP, "ldc", ldc)?,
        );
        if r0 + m > ldc || mul(OP, n, ldc)? != y.len() {
            return Err(bad(OP, "output slice out of range"));
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (b, _rb) = xh.device_ptr(&self.stream);
        let (c, _rc) = y.device_ptr_mut(&self.stream);
        let c = c + 4 * r0 as u64;
        // SAFETY: A is m x k 16-bit values at `a` (a live allocation of the caller), B is n x k at `b`, C
        // spans n columns of ldc floats from row r0 with r0 + m <= ldc inside `y` (checked above); the
        // handle runs on `self.stream`, the stream of every buffer here; alpha/beta outlive the call.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                mi,
                ni,
                ki,
                (&alpha as *const f32).cast::<c_void>(),
                a as *const c_void,
                dtype,
                ki,
                b as *const c_void,
                dtype,
                ki,
                (&beta as *const f32).cast::<c_void>(),
                c as *mut c_void,
                cudaDataType_t::CUDA_R_32F,
                ldci,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cudarc::cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }

    /// Launch shape of the grid-stride element-wise kernels over `len` elements: enough blocks to fill the
    /// device, each thread looping over the rest.
    fn ew_cfg(&self, op: &str, len: usize) -> Result<LaunchConfig, CudaError> {
        let blocks = len
            .div_ceil(EW_THREADS as usize)
            .clamp(1, self.sm_count * 32);
        cfg(op, blocks, EW_THREADS)
    }

    /// `out = x / sqrt(mean(x²) + eps) * weight` per row of `weight.len()` (x holds whole rows).
    pub fn rms_norm(
        &self,
        x: &CudaView<f32>,
        weight: &CudaView<f32>,
        eps: f32,
        out: &mut CudaViewMut<f32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "rms_norm";
        let cols = weight.len();
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(bad(
                OP,
                format!(
                    "x length {} is not a multiple of weight length {cols}",
                    x.len()
                ),
            ));
        }
        check_len(OP, "output length", x.len(), out.len())?;
        let rows = x.len() / cols;
        if rows == 0 {
            return Ok(());
        }
        let cols = int(OP, "cols", cols)?;
        let f = self.func("rms_norm_f32")?;
        // SAFETY: one block per row reads `cols` floats of x and weight and writes `cols` of out; all hold
        // rows x cols (weight: cols) floats.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(x)
                .arg(weight)
                .arg(out)
                .arg(&cols)
                .arg(&eps)
                .launch(cfg(OP, rows, EW_THREADS)?)
        }?;
        Ok(())
    }

    /// `gate[i] = silu(gate[i]) · up[i]`, `silu(g) = g / (1 + e^-g)`.
    pub fn silu_mul(
        &self,
        gate: &mut CudaViewMut<f32>,
        up: &CudaView<f32>,
    ) -> Result<(), CudaError> {
        self.in_place("silu_mul", "silu_mul_f32", "up length", gate, up)
    }

    /// `x[i] += d[i]` (the residual add).
    pub fn add(&self, x: &mut CudaViewMut<f32>, d: &CudaView<f32>) -> Result<(), CudaError> {
        self.in_place("add", "add_f32", "d length", x, d)
    }

    /// Runs the element-wise kernel `name(a, b, len)` that updates `a` from `b` in place.
    fn in_place(
        &self,
        op: &str,
        name: &'static str,
        b_what: &str,
        a: &mut CudaViewMut<f32>,
        b: &CudaView<f32>,
    ) -> Result<(), CudaError> {
        check_len(op, b_what, a.len(), b.len())?;
        let len = a.len();
        if len == 0 {
            return Ok(());
        }
        let n = long(op, "length", len)?;
        let f = self.func(name)?;
        // SAFETY: reads and writes `len` elements of two buffers of that length.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(a)
                .arg(b)
                .arg(&n)
                .launch(self.ew_cfg(op, len)?)
        }?;
        Ok(())
    }

    /// RoPE (ggml's NORM mode, adjacent pairs) on `x`, `n` tokens of `n_heads` heads of `head_dim`, with
    /// `cs` = `n` rows of `rope_dim` values `[cos θ0, sin θ0, cos θ1, sin θ1, …]` (the CPU's
    /// `RopeCache` per token, one row per token); dims past `rope_dim` are kept.
    pub fn rope(
        &self,
        x: &mut CudaViewMut<f32>,
        cs: &CudaView<f32>,
        n: usize,
        n_heads: usize,
        head_dim: usize,
        rope_dim: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "rope";
        if rope_dim == 0 || !rope_dim.is_multiple_of(2) || rope_dim > head_dim {
            return Err(bad(
                OP,
                format!("rope_dim {rope_dim} must be even and in 2..=head_dim ({head_dim})"),
            ));
        }
        let row = mul(OP, n_heads, head_dim)?;
        check_len(
            OP,
            "x length (n * n_heads * head_dim)",
            mul(OP, n, row)?,
            x.len(),
        )?;
        check_len(
            OP,
            "cs length (n * rope_dim)",
            mul(OP, n, rope_dim)?,
            cs.len(),
        )?;
        let pairs = mul(OP, x.len() / head_dim.max(1), rope_dim / 2)?;
        if pairs == 0 {
            return Ok(());
        }
        int(OP, "x length", x.len())?;
        let args = [
            int(OP, "n", n)?,
            int(OP, "n_heads", n_heads)?,
            int(OP, "head_dim", head_dim)?,
            int(OP, "rope_dim", rope_dim)?,
        ];
        let f = self.func("rope_f32")?;
        // SAFETY: thread (token, head, pair) reads 2 floats of its head in x (n x n_heads x head_dim, checked)
        // and 2 of its token's row of cs (n x rope_dim, checked), pairs < rope_dim / 2 <= head_dim / 2.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(x)
                .arg(cs)
                .arg(&args[0])
                .arg(&args[1])
                .arg(&args[2])
                .arg(&args[3])
                .launch(self.ew_cfg(OP, pairs)?)
        }?;
        Ok(())
    }

    /// Writes `n` rows of `src` (f32, `src.len() / n` values each, e.g. `n_kv_heads * head_dim`) into the
    /// f16 `cache` as positions `pos .. pos + n` (position-major rows of the same length).
    pub fn kv_write(
        &self,
        src: &CudaView<f32>,
        n: usize,
        pos: usize,
        cache: &mut CudaViewMut<u16>,
    ) -> Result<(), CudaError> {
        const OP: &str = "kv_write";
        if n == 0 {
            return check_len(OP, "src length", 0, src.len());
        }
        if !src.len().is_multiple_of(n) {
            return Err(bad(
                OP,
                format!("src length {} is not n = {n} rows", src.len()),
            ));
        }
        let row = src.len() / n;
        let need = mul(OP, pos.saturating_add(n), row)?;
        if cache.len() < need {
            return Err(bad(
                OP,
                format!(
                    "cache holds {} values, positions {pos}..{} of {row} need {need}",
                    cache.len(),
                    pos + n
                ),
            ));
        }
        int(OP, "cache end", need)?;
        let (row_i, pos_i, n_i) = (int(OP, "row", row)?, int(OP, "pos", pos)?, int(OP, "n", n)?);
        let f = self.func("kv_write_f16")?;
        // SAFETY: reads n x row floats of src (its length) and writes positions pos..pos + n of `row`
        // values into cache, which holds at least (pos + n) x row (checked).
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(src)
                .arg(cache)
                .arg(&row_i)
                .arg(&pos_i)
                .arg(&n_i)
                .launch(self.ew_cfg(OP, src.len())?)
        }?;
        Ok(())
    }

    /// Causal attention of `n_tokens` query tokens at positions `n_past .. n_past + n_tokens` over an f16
    /// KV cache that already holds positions `0 .. n_past + n_tokens`, as the CPU's `attention_batch`:
    /// token t attends to positions `0 ..= n_past + t`, query head h reads KV head `h / (n_heads /
    /// n_kv_heads)`, `softmax(scale · q·k) · v` in f32 with q rounded to f16.
    ///
    /// `q`, `out`: `n_tokens` rows of `n_heads * head_dim`. Caches: position-major `[pos][kv_head][head_dim]`
    /// f16 bits, at least `n_past + n_tokens` positions, 16-byte aligned. `head_dim` must be a multiple of
    /// 8 up to 256. When few blocks would cover the work (decode), positions are split over several blocks
    /// per head (flash-decoding) and the partial results merged by a second kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        shape: AttnShape,
        q: &CudaView<f32>,
        n_tokens: usize,
        n_past: usize,
        k_cache: &CudaView<u16>,
        v_cache: &CudaView<u16>,
        scale: f32,
        out: &mut CudaViewMut<f32>,
    ) -> Result<(), CudaError> {
        const OP: &str = "attention";
        let AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
        } = shape;
        if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(bad(
                OP,
                format!("n_heads {n_heads} must be a non-zero multiple of n_kv_heads {n_kv_heads}"),
            ));
        }
        if head_dim == 0 || head_dim > ATT_MAX_HD || !head_dim.is_multiple_of(8) {
            return Err(bad(
                OP,
                format!("head_dim {head_dim} must be a multiple of 8 in 8..={ATT_MAX_HD}"),
            ));
        }
        let q_len = mul(OP, mul(OP, n_tokens, n_heads)?, head_dim)?;
        check_len(
            OP,
            "q length (n_tokens * n_heads * head_dim)",
            q_len,
            q.len(),
        )?;
        check_len(OP, "out length", q_len, out.len())?;
        let positions = n_past
            .checked_add(n_tokens)
            .ok_or_else(|| bad(OP, "n_past + n_tokens overflows"))?;
        let kv_len = mul(OP, positions, mul(OP, n_kv_heads, head_dim)?)?;
        for (what, len) in [("k_cache", k_cache.len()), ("v_cache", v_cache.len())] {
            if len < kv_len {
                return Err(bad(
                    OP,
                    format!("{what} holds {len} values, {positions} positions need {kv_len}"),
                ));
            }
        }
        if n_tokens == 0 {
            return Ok(());
        }
        check_aligned(OP, "k_cache", k_cache, &self.stream)?;
        check_aligned(OP, "v_cache", v_cache, &self.stream)?;
        int(OP, "q length", q_len)?;
        int(OP, "cache length", kv_len)?;

        // Blocks: one per (KV head, tile of ATT_ROWS query rows of that head), times the splits of the
        // positions; split until about two blocks per SM, in whole tiles of positions.
        let group = n_heads / n_kv_heads;
        let row_tiles = mul(OP, n_tokens, group)?.div_ceil(ATT_ROWS);
        let base = mul(OP, n_kv_heads, row_tiles)?;
        let want = (2 * self.sm_count).div_ceil(base).max(1);
        let splits = want.min(positions.div_ceil(ATT_TILE));
        let chunk = positions.div_ceil(splits).div_ceil(ATT_TILE) * ATT_TILE;
        let splits = positions.div_ceil(chunk);
        let grid_x = u32::try_from(base)
            .ok()
            .filter(|&b| b <= i32::MAX as u32)
            .ok_or_else(|| bad(OP, "too many blocks"))?;
        let att_cfg = LaunchConfig {
            grid_dim: (grid_x, splits as u32, 1),
            block_dim: (ATT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints = [
            int(OP, "n_tokens", n_tokens)?,
            int(OP, "n_past", n_past)?,
            int(OP, "n_heads", n_heads)?,
            int(OP, "n_kv_heads", n_kv_heads)?,
            int(OP, "head_dim", head_dim)?,
        ];
        let chunk_i = int(OP, "chunk", chunk)?;
        let f = self.func("attention_f16")?;
        if splits == 1 {
            // The partial buffers are not touched with one split (the kernel writes `out` directly).
            let null = 0u64;
            // SAFETY: blocks read the q rows of their KV head, positions below n_past + t + 1 of the caches
            // (which hold n_past + n_tokens, checked) with 16-byte loads (aligned, head_dim % 8 == 0), and
            // write their own rows of out; head_dim <= ATT_MAX_HD fits the shared buffers.
            unsafe {
                self.stream
                    .launch_builder(f)
                    .arg(q)
                    .arg(k_cache)
                    .arg(v_cache)
                    .arg(out)
                    .arg(&null)
                    .arg(&null)
                    .arg(&ints[0])
                    .arg(&ints[1])
                    .arg(&ints[2])
                    .arg(&ints[3])
                    .arg(&ints[4])
                    .arg(&scale)
                    .arg(&chunk_i)
                    .launch(att_cfg)
            }?;
            return Ok(());
        }
        let n_rows = n_tokens * n_heads;
        // SAFETY (both): every (split, row) entry is written by exactly one block of the first kernel
        // before the combine kernel reads it.
        let mut part_acc = unsafe { self.stream.alloc::<f32>(mul(OP, splits, q_len)?) }?;
        let mut part_ml = unsafe { self.stream.alloc::<f32>(mul(OP, splits, 2 * n_rows)?) }?;
        int(OP, "partial length", part_acc.len())?;
        // SAFETY: as in the one-split case; in addition each block writes its rows of split blockIdx.y of
        // part_acc (splits x n_rows x head_dim) and part_ml (splits x n_rows x 2).
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(q)
                .arg(k_cache)
                .arg(v_cache)
                .arg(&mut *out)
                .arg(&mut part_acc)
                .arg(&mut part_ml)
                .arg(&ints[0])
                .arg(&ints[1])
                .arg(&ints[2])
                .arg(&ints[3])
                .arg(&ints[4])
                .arg(&scale)
                .arg(&chunk_i)
                .launch(att_cfg)
        }?;
        let (rows_i, splits_i) = (int(OP, "rows", n_rows)?, int(OP, "splits", splits)?);
        let f = self.func("attention_combine")?;
        // SAFETY: one block per output row reads that row's `splits` partials and writes head_dim floats.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&part_acc)
                .arg(&part_ml)
                .arg(out)
                .arg(&rows_i)
                .arg(&ints[4])
                .arg(&splits_i)
                .launch(cfg(OP, n_rows, ATT_THREADS)?)
        }?;
        Ok(())
    }

    /// Max, argmax and log-sum-exp of each of `rows` rows of `cols` logits, on the host (waits for the
    /// stream).
    pub fn row_stats(
        &self,
        logits: &CudaView<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<RowStats>, CudaError> {
        const OP: &str = "row_stats";
        check_len(
            OP,
            "logits length (rows * cols)",
            mul(OP, rows, cols)?,
            logits.len(),
        )?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        if cols == 0 {
            return Err(bad(OP, "rows of zero logits"));
        }
        let cols_i = int(OP, "cols", cols)?;
        // SAFETY (all three): one entry per row, each written by that row's block.
        let mut max = unsafe { self.stream.alloc::<f32>(rows) }?;
        let mut arg = unsafe { self.stream.alloc::<u32>(rows) }?;
        let mut lse = unsafe { self.stream.alloc::<f32>(rows) }?;
        let f = self.func("row_stats_f32")?;
        // SAFETY: block r reads row r of logits (rows x cols, checked) and writes entry r of each output.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(logits)
                .arg(&cols_i)
                .arg(&mut max)
                .arg(&mut arg)
                .arg(&mut lse)
                .launch(cfg(OP, rows, 1024)?)
        }?;
        let (max, arg, lse) = (
            self.dtoh(&max.as_view())?,
            self.dtoh(&arg.as_view())?,
            self.dtoh(&lse.as_view())?,
        );
        Ok(max
            .into_iter()
            .zip(arg)
            .zip(lse)
            .map(|((max, argmax), lse)| RowStats { max, argmax, lse })
            .collect())
    }
}
