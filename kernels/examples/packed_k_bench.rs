//! Packed Q4_K / Q6_K matvec throughput against bytes moved, to tune the decode tiles in isolation.
//! Several copies of each matrix are cycled so that every call streams from DRAM (more than L3).
//! `packed_k_bench [threads] [n_tokens] [reps]`; `COPIES=1` keeps one copy (cache-resident: compute speed).
//! Samples during which other processes used the CPU are dropped; best and median of the rest.
//! Also prints the machine's `vpdpbusd` issue rate (the multiply-add ceiling of every VNNI tile) and each
//! shape's multiply-adds per second as a share of it, for telling a kernel's slack from the machine's limit.
use std::time::Instant;
use tessera_kernels::cpu::{PackedMatrix, Pool, QMatrix, Scratch, matmul_packed};
use tessera_kernels::quant::{GgmlType, quantize_row};

fn matrices(ty: GgmlType, rows: usize, cols: usize, copies: usize) -> Vec<PackedMatrix> {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let f: Vec<f32> = (0..rows * cols)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect();
    let mut raw = Vec::new();
    quantize_row(ty, &f, &mut raw).unwrap();
    let p = PackedMatrix::new(&QMatrix::new(ty, rows, cols, &raw).unwrap()).unwrap();
    (0..copies).map(|_| p.clone()).collect()
}

/// Best-of-`reps` read bandwidth in GB/s of `threads` threads summing disjoint parts of 256 MiB.
fn read_bandwidth(threads: usize, reps: usize) -> f64 {
    let words = (256usize << 20) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let part = words.div_ceil(threads.max(1));
    let mut best = 0f64;
    for _ in 0..reps {
        let t = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(part)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Multiply-adds per second (in billions) that `threads` threads reach issuing nothing but independent
/// 512-bit `vpdpbusd` (64 u8×i8 products each), or `None` without AVX-512 VNNI.
fn vnni_peak_gmacs(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        const ITERS: u64 = 50_000_000;
        #[target_feature(enable = "avx512f,avx512vnni")]
        fn spin(iters: u64) -> i32 {
            let (x, y) = (
                _mm512_set1_epi8(std::hint::black_box(3)),
                _mm512_set1_epi8(std::hint::black_box(5)),
            );
            // Ten independent accumulators cover vpdpbusd's latency.
            let mut acc = [_mm512_setzero_si512(); 10];
            for _ in 0..iters {
                for a in &mut acc {
                    *a = _mm512_dpbusd_epi32(*a, x, y);
                }
            }
            acc.iter()
                .fold(0, |s, &a| s.wrapping_add(_mm512_reduce_add_epi32(a)))
        }
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")) {
            return None;
        }
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                // SAFETY: AVX-512 F and VNNI were detected above.
                s.spawn(|| std::hint::black_box(unsafe { spin(ITERS) }));
            }
        });
        let macs = (threads.max(1) as u64 * ITERS * 10 * 64) as f64;
        Some(macs / t.elapsed().as_secs_f64() / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

/// (busy jiffies of the whole machine, jiffies of this process), to drop samples during which other
/// processes ran (this VM is shared with builds).
fn jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let busy =
        f.iter().sum::<u64>() - f.get(3).copied().unwrap_or(0) - f.get(4).copied().unwrap_or(0);
    let me = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let me: Vec<&str> = me
        .rsplit(") ")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let own = me.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + me.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (busy, own)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let nt: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let reps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let pool = Pool::new(threads);
    let mut s = Scratch::new();
    println!("read bandwidth {:.1} GB/s", read_bandwidth(threads, 5));
    let peak = (0..3)
        .filter_map(|_| vnni_peak_gmacs(threads))
        .reduce(f64::max);
    match peak {
        Some(p) => println!("vpdpbusd peak {p:.1} GMAC/s ({threads} threads)"),
        None => println!("vpdpbusd peak: no AVX-512 VNNI on this CPU"),
    }
    let copies = std::env::var("COPIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let shapes = [
        (GgmlType::Q4_K, 8192, 2048),
        (GgmlType::Q4_K, 2048, 8192),
        (GgmlType::Q6_K, 2048, 8192),
    ];
    let ms: Vec<Vec<PackedMatrix>> = shapes
        .iter()
        .map(|&(ty, r, c)| matrices(ty, r, c, copies))
        .collect();
    let mut samples = vec![Vec::new(); shapes.len()];
    let mut rounds = 0;
    while samples.iter().any(|v| v.len() < reps) && rounds < 50 * reps {
        rounds += 1;
        for (i, &(_, rows, cols)) in shapes.iter().enumerate() {
            let x = vec![0.1f32; nt * cols];
            let mut y = vec![0.0f32; nt * rows];
            let j0 = jiffies();
            let t = Instant::now();
            for _ in 0..24 {
                for m in &ms[i] {
                    matmul_packed(&pool, m, &x, nt, &mut y, &mut s).unwrap();
                }
            }
            let e = t.elapsed().as_secs_f64() / (24 * ms[i].len()) as f64;
            let j1 = jiffies();
            if (j1.0 - j0.0).saturating_sub(j1.1 - j0.1) <= 2 {
                samples[i].push(e);
            }
        }
    }
    for (i, &(ty, rows, cols)) in shapes.iter().enumerate() {
        let bytes = rows * cols / 256 * ty.type_size();
        let mut x = samples[i].clone();
        x.sort_by(f64::total_cmp);
        let (best, med) = (
            x.first().copied().unwrap_or(f64::NAN),
            x.get(x.len() / 2).copied().unwrap_or(f64::NAN),
        );
        let gmacs = (rows * cols * nt) as f64 / best / 1e9;
        let share = peak.map_or(String::new(), |p| {
            format!(" ({:.0}% of peak)", 100.0 * gmacs / p)
        });
        println!(
            "{ty:?} {rows}x{cols} nt={nt}: n={} best {:.1} us {:.1} GB/s {gmacs:.1} GMAC/s{share}, median {:.1} GB/s",
            x.len(),
            best * 1e6,
            bytes as f64 / best / 1e9,
            bytes as f64 / med / 1e9
        );
    }
}
