//! Throwaway micro-benchmark of the CPU matmul kernels: ns per matvec and weight GB/s per ISA level, type and
//! shape. `cargo run --release -p tessera-kernels --example cpu_bench [filter]`. No assertions; numbers
//! for comparing kernels on one machine, not against peers (the bench crate does that).

use std::time::Instant;

use tessera_kernels::cpu::{Isa, Kernels, Pool, QMatrix, Scratch};
use tessera_kernels::quant::{GgmlType, quantize_row};

fn main() {
    let filter = std::env::args().nth(1).unwrap_or_default();
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F32,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q5_K,
        GgmlType::Q3_K,
        GgmlType::Q2_K,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ];
    // Optional third argument: a comma-separated list of ROWSxCOLS shapes.
    let shapes: Vec<(usize, usize)> = match std::env::args().nth(3) {
        Some(list) => list
            .split(',')
            .filter_map(|s| s.split_once('x'))
            .filter_map(|(r, c)| Some((r.parse().ok()?, c.parse().ok()?)))
            .collect(),
        None => vec![(1536, 576), (576, 1536), (2048, 8192)],
    };
    let mut seed = 0x1234_5678u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let isas: Vec<Isa> = Isa::available()
        .into_iter()
        .filter(|i| {
            *i != Isa::Scalar
                && std::env::args()
                    .nth(2)
                    .is_none_or(|f| format!("{i:?}") == f)
        })
        .collect();
    for &(rows, cols) in &shapes {
        let wf: Vec<f32> = (0..rows * cols).map(|_| rnd() * 0.05).collect();
        let x: Vec<f32> = (0..cols * 64).map(|_| rnd()).collect();
        for ty in types {
            let tag = format!("{ty:?} {rows}x{cols}");
            if !tag.contains(&filter) {
                continue;
            }
            let mut wq = Vec::new();
            quantize_row(ty, &wf, &mut wq).expect("quantize");
            let m = QMatrix::new(ty, rows, cols, &wq).expect("matrix");
            let mut line = format!("{tag:<18}");
            for &isa in &isas {
                let k = Kernels::for_isa(isa).expect("available");
                let packed = k.pack(&m).expect("pack");
                for (threads, n_tokens, use_packed) in [
                    (1, 1, false),
                    (2, 1, false),
                    (1, 8, false),
                    (1, 1, true),
                    (2, 1, true),
                    (1, 8, true),
                    (2, 64, true),
                ] {
                    if use_packed && !packed.is_interleaved() {
                        continue;
                    }
                    let pool = Pool::new(threads);
                    let mut s = Scratch::new();
                    let mut y = vec![0.0; rows * n_tokens];
                    let xs = &x[..cols * n_tokens];
                    // The machine is shared: report the fastest of many short runs (preemption only adds).
                    let budget = std::time::Duration::from_millis(100);
                    let t0 = Instant::now();
                    let mut per = f64::INFINITY;
                    let mut iters = 0;
                    while t0.elapsed() < budget || iters < 5 {
                        let t = Instant::now();
                        if use_packed {
                            k.matmul_packed(&pool, &packed, xs, n_tokens, &mut y, &mut s)
                                .expect("matmul");
                        } else {
                            k.matmul(&pool, &m, xs, n_tokens, &mut y, &mut s)
                                .expect("matmul");
                        }
                        per = per.min(t.elapsed().as_secs_f64());
                        iters += 1;
                    }
                    let gbs = wq.len() as f64 / per / 1e9;
                    let p = if use_packed { "P" } else { "" };
                    if n_tokens == 1 {
                        line += &format!(
                            " | {p}{isa:?} t{threads}: {:7.1}us {:5.1}GB/s",
                            per * 1e6,
                            gbs
                        );
                    } else {
                        line += &format!(
                            " | {p}t{threads} n{n_tokens}: {:6.1}tok/ms",
                            n_tokens as f64 / per / 1e3
                        );
                    }
                }
            }
            println!("{line}");
        }
    }
}
