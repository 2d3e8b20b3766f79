//! Tessera's numeric core: GGML quantization formats (block layouts, scalar reference dequantization and
//! quantizers), the CPU compute kernels (`cpu`: matmul, norms, RoPE, attention, a thread pool),
//! vocabulary-wide softmax reductions for sampling (`softmax_reduce`), and the CUDA backend (`cuda`: kernels
//! compiled at run time with NVRTC and a typed API over cudarc; builds and fails cleanly without CUDA).
pub mod cpu;
pub mod cuda;
pub mod quant;
pub mod softmax_reduce;
