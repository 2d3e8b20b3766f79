//! Tensor-parallel peer links between worker processes: a [`Collective`] over plain TCP, framed as the end of
//! `proto/tessera/worker/v1/worker.proto` specifies.
//!
//! Forming a group ([`PeerGroup::connect`]): rank i connects to every rank j > i and sends a `PeerHello`
//! (u32 LE length, then the prost encoding); j checks epoch, world size and that it expects rank i, and
//! answers with its own hello. Rank i accepts the links of every j < i on its [`PeerListener`], which lives
//! as long as the worker, so connections from an earlier epoch may still wait in its backlog: they are
//! rejected and closed like any other mismatch.
//!
//! All-reduce: every rank sends its frame `u64 seq | u32 n | n × f32` (all LE) to every peer, reads one frame
//! from every peer, and sums the contributions in rank order 0..world on every rank, so all ranks get the
//! same bits. Sends and receives of all links progress together in one loop over non-blocking sockets,
//! retried for a few tens of microseconds and then waiting in `poll(2)` until one can move: two ranks sending
//! each other multi-megabyte frames never block on a full socket buffer, and a small all-reduce costs one
//! write and a few reads per peer on the calling thread, with no thread hand-off and no allocation once the
//! buffers have grown to the largest frame.
//!
//! Any failure (a closed link, a frame of another sequence number or length, no frame within the link
//! timeout) poisons the group: every later call fails with the same error, and the links are shut down so
//! that the peers fail promptly too rather than waiting for their own timeouts.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prost::Message;
use tessera_proto::worker::v1::PeerHello;
use tracing::{debug, warn};

use crate::collective::{Collective, CollectiveError};

/// How long an all-reduce waits for its peers by default.
pub const DEFAULT_LINK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an all-reduce keeps retrying its non-blocking reads and writes before it sleeps in `poll(2)`, by
/// default. Waking from `poll` costs a scheduler round trip: on loopback an all-reduce of 576 floats takes
/// about 7-13 µs polling this way against 18-40 µs sleeping (`examples/peer_latency.rs`). Between retries
/// the thread yields rather than spins, so that a peer (or anything else) sharing its core still runs.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);
/// Bytes of a data frame's header: u64 sequence number, u32 float count.
const HEADER: usize = 12;
/// A hello is three varints; anything longer is not a Tessera peer.
const MAX_HELLO: u32 = 64;
/// Between connection attempts to a peer that is not up yet.
const RETRY_DELAY: Duration = Duration::from_millis(20);
/// Between checks of the listener's backlog.
const ACCEPT_DELAY: Duration = Duration::from_millis(2);
/// Longest wait for the hello of an accepted connection (a real peer sends it right after connecting).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The socket peers of later ranks connect to. Bound once for the worker's life; each [`PeerGroup::connect`]
/// accepts this epoch's links on it.
#[derive(Debug)]
pub struct PeerListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl PeerListener {
    /// Binds `addr` (port 0 picks a free port; see [`PeerListener::local_addr`]).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        // Accepting polls the backlog against a deadline instead of blocking forever.
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        Ok(PeerListener { listener, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// All-reduce counters, shareable with a monitor (and across the groups of successive epochs).
#[derive(Debug, Default)]
pub struct AllReduceStats {
    calls: AtomicU64,
    micros: AtomicU64,
}

impl AllReduceStats {
    /// (all-reduce calls, total microseconds spent in them).
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.micros.load(Ordering::Relaxed),
        )
    }

    fn record(&self, elapsed: Duration) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }
}

/// This rank's links to the other ranks of its tensor-parallel group for one epoch.
pub struct PeerGroup {
    rank: usize,
    world_size: usize,
    epoch: u64,
    stats: Arc<AllReduceStats>,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Every other rank, in rank order.
    links: Vec<Link>,
    link_timeout: Duration,
    spin: Duration,
    /// Sequence number of the next all-reduce.
    seq: u64,
    /// This rank's frame, sent to every peer.
    send: Vec<u8>,
    /// Rank 0's contribution and the running sum, when this is not rank 0.
    acc: Vec<f32>,
    pollfds: Vec<libc::pollfd>,
    poisoned: Option<CollectiveError>,
}

struct Link {
    rank: usize,
    stream: TcpStream,
    /// Bytes of this round's frame written to the peer.
    sent: usize,
    /// The peer's frame of this round.
    recv: Vec<u8>,
    received: usize,
    header_checked: bool,
}

impl PeerGroup {
    /// Forms the group of `peers.len()` ranks for `epoch`: this `rank` connects to every higher rank at
    /// `peers[j]` (retrying until `timeout` while peers come up) and accepts every lower rank on `listener`
    /// (connections with another epoch, world size or an unexpected rank are rejected and closed, and accepting
    /// goes on until `timeout`). Every rank of the group must call this concurrently.
    pub fn connect(
        listener: &PeerListener,
        epoch: u64,
        rank: usize,
        peers: &[String],
        timeout: Duration,
    ) -> Result<PeerGroup, CollectiveError> {
        let world_size = peers.len();
        if rank >= world_size {
            return Err(CollectiveError::Transport(format!(
                "peer links: rank {rank} is not among the {world_size} peers"
            )));
        }
        let deadline = Instant::now() + timeout;
        let mut streams: Vec<Option<TcpStream>> = (0..world_size).map(|_| None).collect();
        // Higher ranks first: the highest rank only accepts, so by induction from the top every rank reaches
        // its accepting phase and no connect waits forever on a peer that is itself still connecting.
        for (j, addr) in peers.iter().enumerate().skip(rank + 1) {
            let hello = Hello {
                epoch,
                rank,
                world_size,
            };
            streams[j] = Some(connect_to(addr, j, hello, deadline, timeout)?);
        }
        accept_lower(
            listener,
            epoch,
            rank,
            world_size,
            &mut streams,
            deadline,
            timeout,
        )?;

        let mut links = Vec::with_capacity(world_size.saturating_sub(1));
        for (j, stream) in streams.into_iter().enumerate() {
            let Some(stream) = stream else { continue };
            let setup = |s: &TcpStream| {
                s.set_read_timeout(None)?;
                s.set_nodelay(true)?;
                s.set_nonblocking(true)
            };
            setup(&stream).map_err(|e| {
                CollectiveError::Transport(format!(
                    "peer links: setting up the link to rank {j}: {e}"
                ))
            })?;
            links.push(Link {
                rank: j,
                stream,
                sent: 0,
                recv: Vec::new(),
                received: 0,
                header_checked: false,
            });
        }
        debug!(epoch, rank, world_size, "peer links up");
        Ok(PeerGroup {
            rank,
            world_size,
            epoch,
            stats: Arc::default(),
            inner: Mutex::new(Inner {
                pollfds: Vec::with_capacity(links.len()),
                links,
                link_timeout: DEFAULT_LINK_TIMEOUT,
                spin: DEFAULT_SPIN,
                seq: 0,
                send: Vec::new(),
                acc: Vec::new(),
                poisoned: None,
            }),
        })
    }

    /// How long an all-reduce may wait for its peers before it fails (default 10 s).
    pub fn set_link_timeout(&mut self, t: Duration) {
        self.inner_mut().link_timeout = t;
    }

    /// How long an all-reduce busy-polls its links (yielding between tries) before it blocks in `poll(2)`
    /// (default [`DEFAULT_SPIN`]; zero: block at once).
    pub fn set_spin(&mut self, t: Duration) {
        self.inner_mut().spin = t;
    }

    /// (all-reduce calls, total microseconds spent in them).
    pub fn stats(&self) -> (u64, u64) {
        self.stats.snapshot()
    }

    /// The counters behind [`PeerGroup::stats`], readable while the group is inside an engine.
    pub fn stats_handle(&self) -> Arc<AllReduceStats> {
        Arc::clone(&self.stats)
    }

    /// Counts into `stats` from now on (a worker keeps one set of counters across epochs).
    pub fn share_stats(&mut self, stats: Arc<AllReduceStats>) {
        self.stats = stats;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn inner_mut(&mut self) -> &mut Inner {
        self.inner.get_mut().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic mid-exchange leaves the links in an unknown state; the next call's frame check (sequence
        // number, length) or timeout turns that into an error instead of wrong sums.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Collective for PeerGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let start = Instant::now();
        let mut inner = self.lock();
        if let Some(e) = &inner.poisoned {
            return Err(e.clone());
        }
        if self.world_size == 1 {
            return Ok(());
        }
        let result = inner.exchange(buf, self.rank, self.world_size, start);
        match result {
            Ok(()) => {
                inner.sum(buf, self.rank);
                inner.seq += 1;
            }
            Err(ref e) => {
                warn!(epoch = self.epoch, rank = self.rank, error = %e, "all-reduce failed; group poisoned");
                inner.poisoned = Some(e.clone());
                for link in &inner.links {
                    // Best effort: the peers then fail at once instead of after their own timeouts.
                    let _ = link.stream.shutdown(Shutdown::Both);
                }
            }
        }
        self.stats.record(start.elapsed());
        result
    }
}

impl Inner {
    /// Sends this rank's frame to every peer and receives every peer's frame.
    fn exchange(
        &mut self,
        buf: &[f32],
        rank: usize,
        world_size: usize,
        start: Instant,
    ) -> Result<(), CollectiveError> {
        let n = u32::try_from(buf.len()).map_err(|_| {
            CollectiveError::Transport(format!(
                "all-reduce of {} floats exceeds the frame limit of {}",
                buf.len(),
                u32::MAX
            ))
        })?;
        let frame = HEADER + 4 * buf.len();
        self.send.resize(frame, 0);
        self.send[..8].copy_from_slice(&self.seq.to_le_bytes());
        self.send[8..HEADER].copy_from_slice(&n.to_le_bytes());
        for (dst, v) in self.send[HEADER..].chunks_exact_mut(4).zip(buf) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        for link in &mut self.links {
            link.sent = 0;
            link.received = 0;
            link.header_checked = false;
            link.recv.resize(frame, 0);
        }

        let deadline = start + self.link_timeout;
        loop {
            let mut pending = false;
            for link in &mut self.links {
                link.progress(&self.send, self.seq, buf.len(), rank, world_size)?;
                pending |= link.sent < frame || link.received < frame;
            }
            if !pending {
                return Ok(());
            }
            let now = Instant::now();
            if now.duration_since(start) < self.spin {
                // Yield, not spin: on an oversubscribed core a spinning rank would keep its peer from running
                // (observed: 65 µs per all-reduce instead of 9 with two ranks on one busy core).
                std::thread::yield_now();
                continue;
            }
            if now >= deadline {
                let arrived = 1 + self.links.iter().filter(|l| l.received == frame).count();
                return Err(CollectiveError::Timeout {
                    arrived,
                    world_size,
                    timeout: self.link_timeout,
                });
            }
            self.wait(frame, deadline - now)?;
        }
    }

    /// Blocks until a pending link can move or `timeout` passes.
    fn wait(&mut self, frame: usize, timeout: Duration) -> Result<(), CollectiveError> {
        self.pollfds.clear();
        for link in &self.links {
            let mut events = 0;
            if link.sent < frame {
                events |= libc::POLLOUT;
            }
            if link.received < frame {
                events |= libc::POLLIN;
            }
            if events != 0 {
                self.pollfds.push(libc::pollfd {
                    fd: link.stream.as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
        }
        // Round up: a 0 ms poll for the last fraction of a millisecond would spin.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `pollfds` is an initialized, exclusively borrowed slice of `pollfd` whose length is passed as
        // `nfds`; the descriptors belong to streams `self.links` keeps open for the whole call.
        let rc = unsafe {
            libc::poll(
                self.pollfds.as_mut_ptr(),
                self.pollfds.len() as libc::nfds_t,
                ms,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(CollectiveError::Transport(format!(
                    "poll on peer links: {e}"
                )));
            }
        }
        // Readiness (or hang-up, or error) is acted on by the next read/write attempt.
        Ok(())
    }

    /// `buf` ← the rank-order sum of every rank's contribution (this rank's is `buf` itself).
    fn sum(&mut self, buf: &mut [f32], rank: usize) {
        if rank == 0 {
            for link in &self.links {
                add_le(buf, &link.recv[HEADER..]);
            }
            return;
        }
        // Rank 0's values come first in the sum; this rank's own values are added at its turn.
        let (first, rest) = self
            .links
            .split_first()
            .expect("rank > 0 has a link to rank 0");
        self.acc.clear();
        self.acc.extend(
            first.recv[HEADER..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        let mut own_added = false;
        for link in rest {
            if !own_added && link.rank > rank {
                add(&mut self.acc, buf);
                own_added = true;
            }
            add_le(&mut self.acc, &link.recv[HEADER..]);
        }
        if !own_added {
            add(&mut self.acc, buf);
        }
        buf.copy_from_slice(&self.acc);
    }
}

impl Link {
    /// Writes and reads what the socket takes without blocking; checks the peer's header once it is in.
    fn progress(
        &mut self,
        send: &[u8],
        seq: u64,
        n: usize,
        rank: usize,
        world_size: usize,
    ) -> Result<(), CollectiveError> {
        let frame = send.len();
        while self.sent < frame {
            match self.stream.write(&send[self.sent..]) {
                Ok(0) => return Err(self.gone(world_size)),
                Ok(k) => self.sent += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error("sending to", e, world_size)),
            }
        }
        while self.received < frame {
            match self.stream.read(&mut self.recv[self.received..frame]) {
                Ok(0) => return Err(self.gone(world_size)),
                Ok(k) => self.received += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error("receiving from", e, world_size)),
            }
            if !self.header_checked && self.received >= HEADER {
                self.check_header(seq, n, rank)?;
            }
        }
        Ok(())
    }

    fn check_header(&mut self, seq: u64, n: usize, rank: usize) -> Result<(), CollectiveError> {
        let h = &self.recv[..HEADER];
        let got_seq = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
        let got_n = u32::from_le_bytes(h[8..].try_into().expect("4 bytes")) as usize;
        if got_n != n {
            return Err(CollectiveError::LengthMismatch {
                rank,
                got: n,
                other: self.rank,
                expected: got_n,
            });
        }
        if got_seq != seq {
            return Err(CollectiveError::Transport(format!(
                "rank {} sent all-reduce #{got_seq}, rank {rank} is at #{seq}: the ranks are out of step",
                self.rank
            )));
        }
        self.header_checked = true;
        Ok(())
    }

    fn gone(&self, world_size: usize) -> CollectiveError {
        CollectiveError::PeerGone {
            rank: self.rank,
            world_size,
        }
    }

    fn io_error(&self, what: &str, e: io::Error, world_size: usize) -> CollectiveError {
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof => self.gone(world_size),
            _ => CollectiveError::Transport(format!("{what} rank {}: {e}", self.rank)),
        }
    }
}

fn add(acc: &mut [f32], v: &[f32]) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a += x;
    }
}

fn add_le(acc: &mut [f32], bytes: &[u8]) {
    for (a, c) in acc.iter_mut().zip(bytes.chunks_exact(4)) {
        *a += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hello {
    epoch: u64,
    rank: usize,
    world_size: usize,
}

impl Hello {
    fn write(&self, stream: &mut TcpStream) -> io::Result<()> {
        let msg = PeerHello {
            epoch: self.epoch,
            rank: self.rank as u32,
            world_size: self.world_size as u32,
        }
        .encode_to_vec();
        let mut out = Vec::with_capacity(4 + msg.len());
        out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        out.extend_from_slice(&msg);
        stream.write_all(&out)
    }

    fn read(stream: &mut TcpStream) -> io::Result<Hello> {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len);
        if len > MAX_HELLO {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("hello of {len} bytes (at most {MAX_HELLO}): not a Tessera peer"),
            ));
        }
        let mut msg = vec![0u8; len as usize];
        stream.read_exact(&mut msg)?;
        let h = PeerHello::decode(msg.as_slice())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("hello: {e}")))?;
        Ok(Hello {
            epoch: h.epoch,
            rank: h.rank as usize,
            world_size: h.world_size as usize,
        })
    }
}

/// Connects to rank `peer` at `addr`, retrying until `deadline` while it is not up or not yet in this epoch.
fn connect_to(
    addr: &str,
    peer: usize,
    hello: Hello,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, CollectiveError> {
    loop {
        let last_error = match try_connect(addr, peer, hello, deadline) {
            Ok(stream) => return Ok(stream),
            Err(Attempt::Fatal(msg)) => {
                return Err(CollectiveError::Transport(format!(
                    "peer links (epoch {}, rank {}): rank {peer} at {addr}: {msg}",
                    hello.epoch, hello.rank
                )));
            }
            Err(Attempt::Retry(msg)) => msg,
        };
        if Instant::now() + RETRY_DELAY >= deadline {
            return Err(CollectiveError::Transport(format!(
                "peer links (epoch {}, rank {}): no link to rank {peer} at {addr} within {timeout:?} (last \
                 attempt: {last_error})",
                hello.epoch, hello.rank
            )));
        }
        std::thread::sleep(RETRY_DELAY);
    }
}

enum Attempt {
    /// The peer may not be up, or not yet in this epoch.
    Retry(String),
    /// The peer answered as someone else: the peer list is wrong.
    Fatal(String),
}

fn try_connect(
    addr: &str,
    peer: usize,
    hello: Hello,
    deadline: Instant,
) -> Result<TcpStream, Attempt> {
    let retry = |what: &str, e: io::Error| Attempt::Retry(format!("{what}: {e}"));
    let sock: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| retry("resolving", e))?
        .next()
        .ok_or_else(|| Attempt::Retry("resolves to no address".into()))?;
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let mut stream =
        TcpStream::connect_timeout(&sock, remaining).map_err(|e| retry("connecting", e))?;
    stream
        .set_read_timeout(Some(remaining))
        .map_err(|e| retry("setting a read timeout", e))?;
    stream
        .set_nodelay(true)
        .map_err(|e| retry("TCP_NODELAY", e))?;
    hello
        .write(&mut stream)
        .map_err(|e| retry("sending hello", e))?;
    // A peer that rejects the hello (it is still in another epoch, say) closes the connection.
    let reply = Hello::read(&mut stream).map_err(|e| retry("awaiting its hello (rejected?)", e))?;
    let want = Hello {
        epoch: hello.epoch,
        rank: peer,
        world_size: hello.world_size,
    };
    if reply != want {
        return Err(Attempt::Fatal(format!(
            "answered as rank {} of {} in epoch {}, expected rank {peer} of {} in epoch {}",
            reply.rank, reply.world_size, reply.epoch, want.world_size, want.epoch
        )));
    }
    Ok(stream)
}

/// Accepts the links of ranks `0..rank` on `listener`, rejecting every other connection.
fn accept_lower(
    listener: &PeerListener,
    epoch: u64,
    rank: usize,
    world_size: usize,
    streams: &mut [Option<TcpStream>],
    deadline: Instant,
    timeout: Duration,
) -> Result<(), CollectiveError> {
    let me = Hello {
        epoch,
        rank,
        world_size,
    };
    while streams[..rank].iter().any(Option::is_none) {
        match listener.listener.accept() {
            Ok((stream, from)) => {
                if let Some((j, stream)) = handshake(stream, from, me, deadline) {
                    streams[j] = Some(stream);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..rank).filter(|&j| streams[j].is_none()).collect();
                    return Err(CollectiveError::Transport(format!(
                        "peer links (epoch {epoch}, rank {rank}): ranks {missing:?} did not connect to {} within \
                         {timeout:?}",
                        listener.addr
                    )));
                }
                std::thread::sleep(ACCEPT_DELAY);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(CollectiveError::Transport(format!(
                    "peer links: accepting on {}: {e}",
                    listener.addr
                )));
            }
        }
    }
    Ok(())
}

/// Reads an accepted connection's hello; answers and returns it when it is a lower rank of this epoch and
/// group, otherwise logs why and drops (closes) it.
fn handshake(
    mut stream: TcpStream,
    from: SocketAddr,
    me: Hello,
    deadline: Instant,
) -> Option<(usize, TcpStream)> {
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(1), HELLO_TIMEOUT);
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(wait)));
    let hello = match setup.and_then(|()| Hello::read(&mut stream)) {
        Ok(h) => h,
        Err(e) => {
            warn!(%from, error = %e, "rejecting a peer link: no valid hello");
            return None;
        }
    };
    let reason = if hello.epoch != me.epoch {
        Some(format!(
            "epoch {}, this group's is {}",
            hello.epoch, me.epoch
        ))
    } else if hello.world_size != me.world_size {
        Some(format!(
            "world size {}, this group's is {}",
            hello.world_size, me.world_size
        ))
    } else if hello.rank >= me.rank {
        Some(format!(
            "rank {} connected to rank {}, but only lower ranks connect",
            hello.rank, me.rank
        ))
    } else {
        None
    };
    if let Some(reason) = reason {
        warn!(%from, %reason, "rejecting a peer link");
        return None;
    }
    if let Err(e) = stream
        .set_nodelay(true)
        .and_then(|()| me.write(&mut stream))
    {
        warn!(%from, error = %e, "peer link failed during the handshake");
        return None;
    }
    Some((hello.rank, stream))
}

impl std::fmt::Debug for PeerGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerGroup")
            .field("epoch", &self.epoch)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}
