//! Throwaway: attention cost per call (fastest of many) for SmolLM2's 9 heads / 3 KV heads / 64 dims.
use half::f16;
use std::time::Instant;
use tessera_kernels::cpu::{AttnShape, Isa, Kernels, Pool};

fn main() {
    let shape = AttnShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let pool = Pool::new(1);
    for isa in [Isa::Avx2, Isa::Avx512Vnni] {
        let Some(k) = Kernels::for_isa(isa) else {
            continue;
        };
        for (n_past, n_tokens) in [(128, 1), (1024, 1), (4096, 1), (0, 512)] {
            let total = n_past + n_tokens;
            let kv: Vec<f16> = (0..total * 192)
                .map(|i| f16::from_f32(((i * 7919) % 997) as f32 / 997.0 - 0.5))
                .collect();
            let q: Vec<f32> = (0..n_tokens * 576)
                .map(|i| ((i * 31) % 101) as f32 / 101.0 - 0.5)
                .collect();
            let mut out = vec![0.0; n_tokens * 576];
            let mut best = f64::INFINITY;
            let t0 = Instant::now();
            while t0.elapsed().as_millis() < 300 {
                let t = Instant::now();
                k.attention_batch(
                    &pool, shape, &q, n_tokens, n_past, &kv, &kv, 0.125, &mut out,
                )
                .unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{isa:?} n_past {n_past} n_tokens {n_tokens}: {:.1}us",
                best * 1e6
            );
        }
    }
}
