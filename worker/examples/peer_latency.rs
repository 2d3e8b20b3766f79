//! All-reduce round trip over TCP peer links on loopback: two ranks on two threads of this process, each
//! calling `PeerGroup::all_reduce_sum` in a loop. Prints the mean (and median, p99) time per all-reduce for
//! one SmolLM2 hidden vector (576 floats) and one Llama 3 8B vector (4096 floats), with the default busy-poll
//! before blocking and without it (`set_spin(0)`: every wait sleeps in `poll`).
//!
//! `cargo run --release -p tessera-worker --example peer_latency [ITERATIONS]`

use std::time::{Duration, Instant};

use tessera_worker::peer::DEFAULT_SPIN;
use tessera_worker::{Collective, PeerGroup, PeerListener};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iters: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|e| format!("ITERATIONS `{a}`: {e}"))?,
        None => 20_000,
    };
    let listeners = [
        PeerListener::bind("127.0.0.1:0".parse()?)?,
        PeerListener::bind("127.0.0.1:0".parse()?)?,
    ];
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().to_string())
        .collect();
    let mut groups = std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let addrs = &addrs;
                s.spawn(move || PeerGroup::connect(l, 1, rank, addrs, Duration::from_secs(10)))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("connect thread"))
            .collect::<Result<Vec<_>, _>>()
    })?;

    for (spin, label) in [(DEFAULT_SPIN, "spin 50 µs"), (Duration::ZERO, "no spin")] {
        for g in &mut groups {
            g.set_spin(spin);
        }
        for n in [576usize, 4096] {
            measure(&groups, n, iters, label)?;
        }
    }
    Ok(())
}

fn measure(
    groups: &[PeerGroup],
    n: usize,
    iters: usize,
    label: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    {
        let times = std::thread::scope(|s| {
            let hs: Vec<_> = groups
                .iter()
                .map(|g| {
                    s.spawn(move || {
                        let mut buf = vec![g.rank() as f32; n];
                        let mut times = Vec::with_capacity(iters);
                        for i in 0..iters + 1000 {
                            let t = Instant::now();
                            g.all_reduce_sum(&mut buf)?;
                            if i >= 1000 {
                                times.push(t.elapsed());
                            }
                            buf.fill(g.rank() as f32);
                        }
                        Ok::<_, tessera_worker::CollectiveError>(times)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("all-reduce thread"))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let mut t = times[0].clone();
        t.sort();
        let mean = t.iter().sum::<Duration>().as_secs_f64() * 1e6 / t.len() as f64;
        let pct = |p: f64| t[((t.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
        println!(
            "2 ranks, {n:>5} floats, {label:<10}: mean {mean:6.1} µs per all-reduce (median {:.1}, p99 {:.1}; \
             {iters} iterations)",
            pct(0.5),
            pct(0.99)
        );
    }
    Ok(())
}
