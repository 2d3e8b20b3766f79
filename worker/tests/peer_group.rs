//! TCP peer links (`PeerGroup`) between ranks on threads over 127.0.0.1: rank-order sums bit for bit on every
//! rank, large frames in both directions at once, departed and silent peers, and hellos of another epoch.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use prost::Message;
use tessera_proto::worker::v1::PeerHello;
use tessera_worker::{Collective, CollectiveError, PeerGroup, PeerListener};

const JOIN: Duration = Duration::from_secs(20);

fn listeners(world: usize) -> (Vec<PeerListener>, Vec<String>) {
    let ls: Vec<PeerListener> = (0..world)
        .map(|_| PeerListener::bind("127.0.0.1:0".parse().unwrap()).unwrap())
        .collect();
    let addrs = ls.iter().map(|l| l.local_addr().to_string()).collect();
    (ls, addrs)
}

/// Every rank's group, formed concurrently on threads, in rank order.
fn groups(world: usize, epoch: u64) -> Vec<PeerGroup> {
    let (ls, addrs) = listeners(world);
    std::thread::scope(|s| {
        let hs: Vec<_> = ls
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let addrs = &addrs;
                s.spawn(move || PeerGroup::connect(l, epoch, rank, addrs, JOIN).unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Values whose sum depends on the order of addition (mixed magnitudes and signs).
fn contribution(rank: usize, round: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = ((i * 7919 + rank * 104_729 + round * 31) % 1000) as f32 / 997.0;
            let scale = [1e-3f32, 1.0, 3.7e3, 1e7][(i + rank) % 4];
            if (i + rank).is_multiple_of(3) {
                -x * scale
            } else {
                x * scale
            }
        })
        .collect()
}

fn rank_order_sum(world: usize, round: usize, n: usize) -> Vec<f32> {
    let mut acc = contribution(0, round, n);
    for r in 1..world {
        for (a, v) in acc.iter_mut().zip(contribution(r, round, n)) {
            *a += v;
        }
    }
    acc
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn sums_are_rank_ordered_and_bit_identical() {
    for world in [2, 3, 4] {
        let gs = groups(world, 1);
        let sizes = [576, 1, 0, 4096, 16384, 100_000, 3];
        std::thread::scope(|s| {
            for g in &gs {
                s.spawn(move || {
                    for (round, &n) in sizes.iter().enumerate() {
                        let mut buf = contribution(g.rank(), round, n);
                        g.all_reduce_sum(&mut buf).unwrap();
                        assert_eq!(
                            bits(&buf),
                            bits(&rank_order_sum(world, round, n)),
                            "world {world}, rank {}, round {round} ({n} floats)",
                            g.rank()
                        );
                    }
                });
            }
        });
        for g in &gs {
            assert_eq!(g.stats().0, sizes.len() as u64);
        }
    }
}

#[test]
fn large_frames_in_all_directions_do_not_deadlock() {
    let world = 4;
    let n = 2 << 20; // 8 MiB of f32 per rank
    let gs = groups(world, 1);
    let start = Instant::now();
    std::thread::scope(|s| {
        for g in &gs {
            s.spawn(move || {
                for round in 0..2 {
                    let mut buf = vec![(g.rank() + round) as f32; n];
                    g.all_reduce_sum(&mut buf).unwrap();
                    let want = (0..world).map(|r| (r + round) as f32).sum::<f32>();
                    assert!(buf.iter().all(|&x| x == want), "rank {}", g.rank());
                }
            });
        }
    });
    eprintln!("4 ranks × 8 MiB × 2 rounds: {:?}", start.elapsed());
}

#[test]
fn departed_rank_fails_the_others_promptly() {
    let mut gs = groups(3, 1);
    for g in &mut gs {
        g.set_link_timeout(Duration::from_millis(500));
    }
    let gone = gs.pop().unwrap();
    drop(gone);
    let start = Instant::now();
    std::thread::scope(|s| {
        for g in &gs {
            s.spawn(move || {
                let err = g.all_reduce_sum(&mut [1.0; 64]).unwrap_err();
                // Rank 2 left; the survivor that notices first shuts its links, so the other may see it go.
                assert!(
                    matches!(err, CollectiveError::PeerGone { world_size: 3, .. }),
                    "rank {}: {err}",
                    g.rank()
                );
                // Poisoned: later calls fail with the same error.
                assert_eq!(g.all_reduce_sum(&mut [1.0; 64]).unwrap_err(), err);
            });
        }
    });
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn silent_rank_times_out_and_poisons_the_group() {
    let mut gs = groups(2, 1);
    for g in &mut gs {
        g.set_link_timeout(Duration::from_millis(200));
    }
    let start = Instant::now();
    let err = gs[0].all_reduce_sum(&mut [1.0; 8]).unwrap_err();
    let waited = start.elapsed();
    assert!(
        matches!(
            err,
            CollectiveError::Timeout {
                arrived: 1,
                world_size: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert!(gs[0].all_reduce_sum(&mut [1.0; 8]).is_err());
    // Rank 0 shut its links down, so rank 1 fails at once instead of waiting for its own timeout (its first
    // call may still complete: rank 0's frame had arrived before rank 0 gave up).
    let start = Instant::now();
    let first = gs[1].all_reduce_sum(&mut [1.0; 8]);
    let err = first
        .and_then(|()| gs[1].all_reduce_sum(&mut [1.0; 8]))
        .unwrap_err();
    assert!(
        matches!(err, CollectiveError::PeerGone { rank: 0, .. }),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_millis(200), "{err}");
}

#[test]
fn mismatched_lengths_fail_on_every_rank() {
    let gs = groups(2, 1);
    std::thread::scope(|s| {
        for g in &gs {
            s.spawn(move || {
                let mut buf = vec![0.0; 3 + g.rank()];
                let err = g.all_reduce_sum(&mut buf).unwrap_err();
                assert!(
                    matches!(err, CollectiveError::LengthMismatch { .. }),
                    "{err}"
                );
            });
        }
    });
}

fn hello_frame(epoch: u64, rank: u32, world_size: u32) -> Vec<u8> {
    let msg = PeerHello {
        epoch,
        rank,
        world_size,
    }
    .encode_to_vec();
    let mut out = (msg.len() as u32).to_le_bytes().to_vec();
    out.extend(msg);
    out
}

#[test]
fn hello_of_another_epoch_is_rejected() {
    let (ls, addrs) = listeners(2);
    std::thread::scope(|s| {
        let rank1 = s.spawn(|| PeerGroup::connect(&ls[1], 5, 1, &addrs, JOIN));
        // A stale connection (epoch 4), then a wrong world size: both closed without an answer.
        for frame in [hello_frame(4, 0, 2), hello_frame(5, 0, 3)] {
            let mut stale = TcpStream::connect(&addrs[1]).unwrap();
            stale
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stale.write_all(&frame).unwrap();
            let mut answer = Vec::new();
            let n = stale.read_to_end(&mut answer).unwrap_or(0);
            assert_eq!(n, 0, "a rejected hello gets no answer");
        }
        // Rank 0 of epoch 4 keeps being rejected and gives up after its timeout.
        let err = PeerGroup::connect(&ls[0], 4, 0, &addrs, Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("no link to rank 1"), "{err}");
        // The right epoch still forms the group.
        let g0 = PeerGroup::connect(&ls[0], 5, 0, &addrs, JOIN).unwrap();
        let g1 = rank1.join().unwrap().unwrap();
        s.spawn(move || g1.all_reduce_sum(&mut [2.0]).unwrap());
        let mut v = [1.0];
        g0.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, [3.0]);
    });
}

#[test]
fn missing_peer_fails_the_join_after_its_timeout() {
    let (ls, addrs) = listeners(2);
    let start = Instant::now();
    let err = PeerGroup::connect(&ls[1], 1, 1, &addrs, Duration::from_millis(200)).unwrap_err();
    assert!(
        err.to_string().contains("ranks [0] did not connect"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    let err = PeerGroup::connect(&ls[0], 1, 2, &addrs, JOIN).unwrap_err();
    assert!(
        err.to_string().contains("rank 2 is not among the 2 peers"),
        "{err}"
    );
}
