//! Tessera's numeric core: GGML quantization formats (block layouts, scalar reference dequantization and
//! quantizers), the CPU compute kernels (`cpu`: matmul, norms, RoPE, attention, a thread pool), and
//! vocabulary-wide softmax reductions for sampling (`softmax_reduce`).
pub mod cpu;
pub mod quant;
pub mod softmax_reduce;
