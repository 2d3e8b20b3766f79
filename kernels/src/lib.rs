//! Tessera's numeric core: GGML quantization formats (block layouts, scalar reference dequantization and
//! quantizers) now, compute kernels later.
pub mod quant;
pub mod softmax_reduce;
