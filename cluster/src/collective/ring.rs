//! The TCP ring: reduce-scatter then all-gather over persistent connections.
//!
//! Each rank keeps two connections: one to the next rank and one from the previous rank. In a
//! ring step a rank sends one segment while it receives and reduces another. For large
//! segments a scoped thread writes the outgoing segment straight from the caller's buffer
//! (no copy) while the calling thread receives chunk by chunk (`chunk_bytes`) and reduces
//! each chunk as it lands: sending, receiving and reducing overlap. Small segments are
//! written then read on one thread, which is cheaper than a thread and cannot deadlock
//! because they fit in the socket buffers. Values travel in the hosts' byte order
//! (little-endian on every platform ferry supports). Every operation starts with a small
//! header (operation, sequence number, length) that each rank checks, so ranks that call
//! different collectives fail with a clear error instead of corrupting data. Reads and writes
//! time out; a closed connection fails at once, so a dead rank stops every other rank fast.
//!
//! When two neighbours share a host, large segments travel through a shared-memory region
//! instead ([`super::shm`]); the TCP connection then carries only chunk announcements and
//! credits. The set-up handshake decides it per link: the connecting rank offers a region,
//! and the accepting rank uses it if it can map it (it cannot from another host).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::shm::{ShmIn, ShmOut, SLOTS};
use super::{Collective, CollectiveError};

const MAGIC: &[u8; 4] = b"FRY2";
/// The handshake: magic, rank, world, tag (8 bytes), slot bytes, offer length.
const HELLO: usize = 28;
const OP_ALL_REDUCE: u32 = 1;
const OP_BROADCAST: u32 = 2;

/// Ring settings.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// How long a read, a write or the connection set-up may wait for a peer.
    pub timeout: Duration,
    /// Bytes per pipelined chunk.
    pub chunk_bytes: usize,
    /// Use shared memory with a neighbour on the same host.
    pub shared_memory: bool,
    /// What ring this is (the daemon's hash of job and generation): a peer with another tag
    /// is refused in the handshake, so a rank of an old generation never joins a new one.
    pub tag: u64,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            timeout: Duration::from_secs(60),
            chunk_bytes: 1 << 20,
            shared_memory: true,
            tag: 0,
        }
    }
}

impl RingConfig {
    /// Floats per chunk (and per shared-memory slot).
    fn chunk_floats(&self) -> usize {
        (self.chunk_bytes / 4).max(1)
    }
}

struct Peer {
    rank: usize,
    addr: String,
}

/// One rank's end of the ring.
pub struct Ring {
    rank: usize,
    world: usize,
    cfg: RingConfig,
    seq: u32,
    prev: Option<(TcpStream, Peer)>,
    next: Option<(TcpStream, Peer)>,
    /// Received values waiting to be added (f32, so reads land aligned and the sum vectorises).
    recv_buf: Vec<f32>,
    /// Shared memory towards the next rank (we write) and from the previous one (we read).
    shm_out: Option<ShmOut>,
    shm_in: Option<ShmIn>,
}

/// Breaks a ring's connections (see [`Ring::abort_handle`]).
pub struct RingAbort(Vec<TcpStream>);

impl RingAbort {
    /// Shuts both connections down; the ring's blocked and later operations fail.
    pub fn abort(&self) {
        for s in &self.0 {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Segments up to this size are written and then read on the calling thread.
const INLINE_BYTES: usize = 64 << 10;

/// Binds the listener this rank's previous rank will connect to (port chosen by the OS).
pub fn listen(ip: IpAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::new(ip, 0))
}

/// Reads exactly `dst.len()` values from `stream` into `dst`, as raw bytes.
fn read_values(stream: &mut TcpStream, dst: &mut [f32]) -> std::io::Result<()> {
    stream.read_exact(bytemuck::cast_slice_mut(dst))
}

impl Ring {
    /// Forms the ring: connects to rank `rank + 1` and accepts rank `rank - 1` on `listener`.
    /// `peers[i]` is the listening address of rank `i`.
    pub fn connect(
        listener: TcpListener,
        rank: usize,
        peers: &[SocketAddr],
        cfg: RingConfig,
    ) -> Result<Ring, CollectiveError> {
        let world = peers.len();
        let setup = |reason: String| CollectiveError::Setup { rank, reason };
        if rank >= world {
            return Err(setup(format!("rank {rank} is outside a world of {world}")));
        }
        let mut ring = Ring {
            rank,
            world,
            cfg,
            seq: 0,
            prev: None,
            next: None,
            recv_buf: Vec::new(),
            shm_out: None,
            shm_in: None,
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + ring.cfg.timeout;
        let next_rank = (rank + 1) % world;
        let next_addr = peers[next_rank];
        let mut next = loop {
            match TcpStream::connect_timeout(&next_addr, Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "rank {next_rank} not reachable yet");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(setup(format!(
                        "cannot connect to rank {next_rank} at {next_addr}: {e}"
                    )))
                }
            }
        };
        // Offer the next rank a shared-memory region (it can map it only on this host).
        let slot_bytes = ring.cfg.chunk_floats() * 4;
        let mut shm_out = if ring.cfg.shared_memory {
            ShmOut::create(slot_bytes, &format!("r{rank}")).ok()
        } else {
            None
        };
        let offer = shm_out
            .as_ref()
            .map(|s| s.path().to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut hello = Vec::with_capacity(HELLO + offer.len());
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world as u32).to_le_bytes());
        hello.extend_from_slice(&ring.cfg.tag.to_le_bytes());
        hello.extend_from_slice(&(slot_bytes as u32).to_le_bytes());
        hello.extend_from_slice(&(offer.len() as u32).to_le_bytes());
        hello.extend_from_slice(offer.as_bytes());
        next.write_all(&hello).map_err(|e| {
            setup(format!(
                "handshake with rank {next_rank} at {next_addr}: {e}"
            ))
        })?;

        let prev_rank = (rank + world - 1) % world;
        listener
            .set_nonblocking(true)
            .map_err(|e| setup(e.to_string()))?;
        let (mut prev, prev_addr) = loop {
            match listener.accept() {
                Ok(pair) => break pair,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => {
                    return Err(setup(format!(
                        "rank {prev_rank} did not connect within {:?}: {e}",
                        ring.cfg.timeout
                    )))
                }
            }
        };
        prev.set_nonblocking(false)
            .map_err(|e| setup(e.to_string()))?;
        prev.set_read_timeout(Some(ring.cfg.timeout))
            .map_err(|e| setup(e.to_string()))?;
        let mut hello = [0u8; HELLO];
        prev.read_exact(&mut hello)
            .map_err(|e| setup(format!("handshake from {prev_addr}: {e}")))?;
        let word =
            |i: usize| u32::from_le_bytes([hello[i], hello[i + 1], hello[i + 2], hello[i + 3]]);
        let (from, their_world) = (word(4), word(8));
        let their_tag = u64::from_le_bytes(hello[12..20].try_into().expect("8 bytes"));
        if &hello[..4] != MAGIC || from as usize != prev_rank || their_world as usize != world {
            return Err(setup(format!(
                "{prev_addr} is not rank {prev_rank} of this job (it says rank {from} of {their_world})"
            )));
        }
        if their_tag != ring.cfg.tag {
            return Err(setup(format!(
                "{prev_addr} (rank {from}) belongs to another job or generation (ring tag {their_tag:#x}, this ring's is {:#x})",
                ring.cfg.tag
            )));
        }
        let their_slot = word(20) as usize;
        let offer_len = word(24) as usize;
        if offer_len > 4096 {
            return Err(setup(format!("{prev_addr} sent a malformed handshake")));
        }
        let mut their_offer = vec![0u8; offer_len];
        prev.read_exact(&mut their_offer)
            .map_err(|e| setup(format!("handshake from {prev_addr}: {e}")))?;
        // Take the previous rank's region if it is on this host and cut like ours.
        let their_offer = String::from_utf8_lossy(&their_offer).into_owned();
        ring.shm_in = (offer_len > 0 && their_slot == slot_bytes)
            .then(|| ShmIn::open(std::path::Path::new(&their_offer), slot_bytes).ok())
            .flatten();
        prev.write_all(&[u8::from(ring.shm_in.is_some())])
            .map_err(|e| setup(format!("handshake with {prev_addr}: {e}")))?;
        // And learn whether the next rank took ours.
        next.set_read_timeout(Some(ring.cfg.timeout))
            .map_err(|e| setup(e.to_string()))?;
        let mut taken = [0u8; 1];
        next.read_exact(&mut taken).map_err(|e| {
            setup(format!(
                "handshake with rank {next_rank} at {next_addr}: {e}"
            ))
        })?;
        if let Some(s) = shm_out.as_mut() {
            // Both ends have it mapped (or it is not used): the name is no longer needed.
            s.unlink();
        }
        ring.shm_out = if taken[0] == 1 { shm_out } else { None };
        for s in [&prev, &next] {
            let _ = s.set_nodelay(true);
        }
        next.set_write_timeout(Some(ring.cfg.timeout))
            .map_err(|e| setup(e.to_string()))?;
        ring.prev = Some((
            prev,
            Peer {
                rank: prev_rank,
                addr: prev_addr.to_string(),
            },
        ));
        ring.next = Some((
            next,
            Peer {
                rank: next_rank,
                addr: next_addr.to_string(),
            },
        ));
        Ok(ring)
    }

    /// A handle that breaks this ring's connections from another thread: every operation
    /// blocked on a peer, and every later one, fails at once. The daemon uses it to stop a
    /// generation whose peer is gone without waiting for the collective timeout.
    pub fn abort_handle(&self) -> std::io::Result<RingAbort> {
        let mut streams = Vec::new();
        for (s, _) in [&self.prev, &self.next].into_iter().flatten() {
            streams.push(s.try_clone()?);
        }
        Ok(RingAbort(streams))
    }

    /// Whether bulk data to the next rank and from the previous one goes through shared
    /// memory (neighbours on the same host).
    pub fn shared_memory_links(&self) -> (bool, bool) {
        (self.shm_out.is_some(), self.shm_in.is_some())
    }

    fn lost(&self, peer: &Peer, op: &'static str, e: &std::io::Error) -> CollectiveError {
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            CollectiveError::Timeout {
                rank: self.rank,
                peer: peer.rank,
                addr: peer.addr.clone(),
                op,
                timeout: self.cfg.timeout,
            }
        } else {
            CollectiveError::PeerLost {
                rank: self.rank,
                peer: peer.rank,
                addr: peer.addr.clone(),
                op,
                reason: e.to_string(),
            }
        }
    }

    fn send(&mut self, bytes: &[u8], op: &'static str) -> Result<(), CollectiveError> {
        let (stream, _) = self.next.as_mut().expect("world > 1 has a next rank");
        if let Err(e) = stream.write_all(bytes) {
            let peer = &self.next.as_ref().expect("checked").1;
            return Err(self.lost(peer, op, &e));
        }
        Ok(())
    }

    /// Reads raw bytes from the previous rank.
    fn recv_bytes(&mut self, dst: &mut [u8], op: &'static str) -> Result<(), CollectiveError> {
        let (stream, _) = self.prev.as_mut().expect("world > 1 has a previous rank");
        if let Err(e) = stream.read_exact(dst) {
            let peer = &self.prev.as_ref().expect("checked").1;
            return Err(self.lost(peer, op, &e));
        }
        Ok(())
    }

    /// Receives `dst.len()` values from the previous rank, adding them to `dst` or copying
    /// them into it.
    fn recv_into(
        &mut self,
        dst: &mut [f32],
        add: bool,
        op: &'static str,
    ) -> Result<(), CollectiveError> {
        let (stream, _) = self.prev.as_mut().expect("world > 1 has a previous rank");
        let r = if add {
            self.recv_buf.resize(dst.len(), 0.0);
            read_values(stream, &mut self.recv_buf).map(|()| {
                for (d, v) in dst.iter_mut().zip(&self.recv_buf) {
                    *d += *v;
                }
            })
        } else {
            read_values(stream, dst)
        };
        r.map_err(|e| self.lost(&self.prev.as_ref().expect("checked").1, op, &e))
    }

    /// Sends a header to the next rank and checks the previous rank's.
    fn header(&mut self, code: u32, len: usize, op: &'static str) -> Result<(), CollectiveError> {
        self.seq = self.seq.wrapping_add(1);
        let mut h = Vec::with_capacity(16);
        h.extend_from_slice(&code.to_le_bytes());
        h.extend_from_slice(&self.seq.to_le_bytes());
        h.extend_from_slice(&(len as u64).to_le_bytes());
        self.send(&h, op)?;
        let mut b = [0u8; 16];
        self.recv_bytes(&mut b, op)?;
        let (c, s) = (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        );
        let l = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]) as usize;
        if c != code || s != self.seq || l != len {
            return Err(CollectiveError::Mismatch {
                rank: self.rank,
                op,
                got: len,
                want: l,
            });
        }
        Ok(())
    }

    fn segment(&self, len: usize, i: usize) -> std::ops::Range<usize> {
        (i * len / self.world)..((i + 1) * len / self.world)
    }

    /// One ring step: send segment `send` to the next rank while receiving segment `recv`
    /// from the previous one; received values are added (`add`) or copied.
    fn step(
        &mut self,
        data: &mut [f32],
        send: usize,
        recv: usize,
        add: bool,
        op: &'static str,
    ) -> Result<(), CollectiveError> {
        let (s, r) = (
            self.segment(data.len(), send),
            self.segment(data.len(), recv),
        );
        // Disjoint borrows of the two segments.
        let (out, inp): (&[f32], &mut [f32]) = if s.end <= r.start {
            let (a, b) = data.split_at_mut(r.start);
            (&a[s], &mut b[..r.len()])
        } else {
            let (a, b) = data.split_at_mut(s.start);
            (&b[..s.len()], &mut a[r])
        };
        let out: &[u8] = bytemuck::cast_slice(out);
        if out.len() + inp.len() * 4 <= INLINE_BYTES {
            self.send(out, op)?;
            return self.recv_into(inp, add, op);
        }
        let chunk = self.cfg.chunk_floats();
        let Ring {
            next,
            prev,
            recv_buf,
            shm_out,
            shm_in,
            ..
        } = self;
        let (next_stream, next_peer) = next.as_mut().expect("world > 1 has a next rank");
        let (prev_stream, prev_peer) = prev.as_mut().expect("world > 1 has a previous rank");
        let shm_in = &*shm_in;
        let (sent, received) = std::thread::scope(|scope| {
            let writer = scope.spawn(move || match shm_out.as_mut() {
                Some(region) => write_shared(next_stream, region, out),
                None => next_stream.write_all(out),
            });
            let mut received = Ok(());
            for (i, part) in inp.chunks_mut(chunk).enumerate() {
                let r = match shm_in {
                    Some(region) => read_shared(prev_stream, region, i, part, add),
                    None if add => {
                        recv_buf.resize(part.len(), 0.0);
                        read_values(prev_stream, recv_buf).map(|()| {
                            for (d, v) in part.iter_mut().zip(recv_buf.iter()) {
                                *d += *v;
                            }
                        })
                    }
                    None => read_values(prev_stream, part),
                };
                if let Err(e) = r {
                    received = Err(e);
                    // Unblock the writer: the step has failed anyway.
                    let _ = prev_stream.shutdown(std::net::Shutdown::Both);
                    break;
                }
            }
            (
                writer
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("the ring's writer panicked"))),
                received,
            )
        });
        let (next_peer, prev_peer) = (
            Peer {
                rank: next_peer.rank,
                addr: next_peer.addr.clone(),
            },
            Peer {
                rank: prev_peer.rank,
                addr: prev_peer.addr.clone(),
            },
        );
        received.map_err(|e| self.lost(&prev_peer, op, &e))?;
        sent.map_err(|e| self.lost(&next_peer, op, &e))
    }
}

/// Sends `out` through the shared region, a slot per chunk: waits for a credit when every
/// slot is taken, announces each chunk, and collects the outstanding credits at the end so
/// the connection holds nothing for the next step.
fn write_shared(stream: &mut TcpStream, region: &mut ShmOut, out: &[u8]) -> std::io::Result<()> {
    let mut credit = [0u8; 1];
    let chunks = out.chunks(region.slot_bytes());
    let n = chunks.len();
    for (i, c) in chunks.enumerate() {
        if i >= SLOTS {
            stream.read_exact(&mut credit)?;
        }
        region.put(i % SLOTS, c);
        stream.write_all(&(c.len() as u32).to_le_bytes())?;
    }
    for _ in 0..n.min(SLOTS) {
        stream.read_exact(&mut credit)?;
    }
    Ok(())
}

/// Receives chunk `i` from the shared region: waits for its announcement, adds or copies
/// it straight from the slot, and returns the slot's credit.
fn read_shared(
    stream: &mut TcpStream,
    region: &ShmIn,
    i: usize,
    part: &mut [f32],
    add: bool,
) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    if u32::from_le_bytes(len) as usize != part.len() * 4 {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            "shared-memory chunk of the wrong size",
        ));
    }
    let src = region.values(i % SLOTS, part.len());
    if add {
        for (d, v) in part.iter_mut().zip(src) {
            *d += *v;
        }
    } else {
        part.copy_from_slice(src);
    }
    stream.write_all(&[1])
}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let op = "all-reduce";
        self.header(OP_ALL_REDUCE, data.len(), op)?;
        let n = self.world;
        // Reduce-scatter: after n-1 steps this rank holds the sum of segment rank+1.
        for s in 0..n - 1 {
            self.step(
                data,
                (self.rank + n - s) % n,
                (self.rank + 2 * n - s - 1) % n,
                true,
                op,
            )?;
        }
        // All-gather: pass the reduced segments around the ring.
        for s in 0..n - 1 {
            self.step(
                data,
                (self.rank + 1 + n - s) % n,
                (self.rank + n - s) % n,
                false,
                op,
            )?;
        }
        Ok(())
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let op = "broadcast";
        self.header(OP_BROADCAST, data.len(), op)?;
        let chunk = self.cfg.chunk_floats();
        let last = (root + self.world - 1) % self.world;
        // A chain from the root to the rank before it: store and forward, chunk by chunk.
        for start in (0..data.len()).step_by(chunk) {
            let range = start..(start + chunk).min(data.len());
            if self.rank != root {
                self.recv_into(&mut data[range.clone()], false, op)?;
            }
            if self.rank != last {
                self.send(bytemuck::cast_slice(&data[range]), op)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    /// Runs `f` on `world` ranks (threads) joined in a ring; returns each rank's result.
    pub(crate) fn on_ring<T: Send + 'static>(
        world: usize,
        cfg: RingConfig,
        f: impl Fn(Ring) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let listeners: Vec<TcpListener> = (0..world)
            .map(|_| listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap())
            .collect();
        let peers: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let f = Arc::new(f);
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (peers, cfg, f) = (peers.clone(), cfg.clone(), f.clone());
                std::thread::spawn(move || f(Ring::connect(l, rank, &peers, cfg).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_for_any_world_size_and_length() {
        for (world, shared_memory) in [1, 2, 3, 4, 5]
            .into_iter()
            .flat_map(|w| [(w, true), (w, false)])
        {
            for len in [0, 1, 3, 7, 1000, 100_003] {
                // Tiny chunks exercise the pipelining (and, in shared memory, slot reuse).
                let cfg = RingConfig {
                    chunk_bytes: 4096,
                    shared_memory,
                    ..Default::default()
                };
                let results = on_ring(world, cfg, move |mut ring| {
                    let links = ring.shared_memory_links();
                    assert_eq!(
                        links,
                        (shared_memory && world > 1, shared_memory && world > 1)
                    );
                    let r = ring.rank() as f32;
                    let mut v: Vec<f32> = (0..len).map(|i| r * 1000.0 + i as f32).collect();
                    ring.all_reduce_sum(&mut v).unwrap();
                    ring.barrier().unwrap();
                    v
                });
                let ranks_sum: f32 = (0..world).map(|r| r as f32 * 1000.0).sum();
                let want: Vec<f32> = (0..len)
                    .map(|i| ranks_sum + world as f32 * i as f32)
                    .collect();
                for got in results {
                    assert_eq!(got, want, "world {world}, len {len}");
                }
            }
        }
    }

    #[test]
    fn average_and_broadcast() {
        let results = on_ring(3, RingConfig::default(), |mut ring| {
            let mut avg = vec![ring.rank() as f32 * 3.0; 10];
            ring.all_reduce_avg(&mut avg).unwrap();
            let mut b: Vec<f32> = if ring.rank() == 1 {
                (0..5000).map(|i| i as f32).collect()
            } else {
                vec![0.0; 5000]
            };
            ring.broadcast(&mut b, 1).unwrap();
            (avg, b)
        });
        for (avg, b) in results {
            assert_eq!(avg, vec![3.0; 10]);
            assert_eq!(b, (0..5000).map(|i| i as f32).collect::<Vec<_>>());
        }
    }

    #[test]
    fn mismatched_calls_are_detected() {
        let results = on_ring(
            2,
            RingConfig {
                timeout: Duration::from_secs(5),
                ..Default::default()
            },
            |mut ring| {
                let mut v = vec![1.0; if ring.rank() == 0 { 10 } else { 11 }];
                ring.all_reduce_sum(&mut v).map_err(|e| e.to_string())
            },
        );
        assert!(
            results
                .iter()
                .all(|r| r.as_ref().is_err_and(|e| e.contains("values"))),
            "{results:?}"
        );
    }

    #[test]
    fn a_dead_peer_fails_the_others_fast() {
        let start = Instant::now();
        let results = on_ring(
            3,
            RingConfig {
                timeout: Duration::from_secs(30),
                ..Default::default()
            },
            |mut ring| {
                if ring.rank() == 1 {
                    drop(ring); // dies: its connections close
                    return Ok(());
                }
                let mut v = vec![1.0f32; 1 << 20];
                ring.all_reduce_sum(&mut v).map_err(|e| e.to_string())
            },
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "took {:?}",
            start.elapsed()
        );
        for (rank, r) in results.iter().enumerate().filter(|(r, _)| *r != 1) {
            let e = r.as_ref().expect_err("the others fail");
            assert!(e.contains(&format!("rank {rank}")), "{e}");
        }
    }

    /// Bounded fuzzing of the handshake: a peer that sends a damaged hello (any field, any
    /// length, a shared-memory offer naming any path) is refused with an error, never a
    /// panic, and never has a file of its choosing mapped.
    #[test]
    fn damaged_handshakes_are_refused_never_a_panic() {
        use crate::fuzz::{mutate, Rng};
        let mut good = Vec::new();
        good.extend_from_slice(MAGIC);
        good.extend_from_slice(&0u32.to_le_bytes());
        good.extend_from_slice(&2u32.to_le_bytes());
        good.extend_from_slice(&7u64.to_le_bytes());
        let cfg = RingConfig::default();
        good.extend_from_slice(&((cfg.chunk_floats() * 4) as u32).to_le_bytes());
        let offer = b"/etc/passwd";
        good.extend_from_slice(&(offer.len() as u32).to_le_bytes());
        good.extend_from_slice(offer);
        let mut rng = Rng(0x5eed_0004);
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut n = 0;
        while Instant::now() < deadline {
            let fake = listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
            let l1 = listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
            let peers = [fake.local_addr().unwrap(), l1.local_addr().unwrap()];
            let rank1 = std::thread::spawn(move || {
                let cfg = RingConfig {
                    timeout: Duration::from_millis(500),
                    tag: 7,
                    ..Default::default()
                };
                Ring::connect(l1, 1, &peers, cfg).map(|r| r.shared_memory_links())
            });
            // Rank 1's connection to "rank 0", then "rank 0"'s damaged hello to rank 1.
            let (_incoming, _) = fake.accept().unwrap();
            let hello = if rng.below(4) == 0 {
                (0..rng.below(64)).map(|_| rng.next_u64() as u8).collect()
            } else {
                mutate(&mut rng, &good)
            };
            if let Ok(mut s) = TcpStream::connect(peers[1]) {
                let _ = s.write_all(&hello);
                drop(s);
            }
            match rank1.join() {
                Ok(Ok((_, took_region))) => assert!(!took_region, "input {n} mapped {hello:?}"),
                Ok(Err(_)) => {}
                Err(_) => panic!("input {n}: the handshake panicked on {hello:?}"),
            }
            n += 1;
        }
        assert!(n > 10, "{n}");
    }

    #[test]
    fn a_peer_with_another_tag_is_refused() {
        let listeners: Vec<TcpListener> = (0..2)
            .map(|_| listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap())
            .collect();
        let peers: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let peers = peers.clone();
                std::thread::spawn(move || {
                    let cfg = RingConfig {
                        timeout: Duration::from_secs(5),
                        tag: 7 + rank as u64, // two generations
                        ..Default::default()
                    };
                    Ring::connect(l, rank, &peers, cfg)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        for h in handles {
            let e = h.join().unwrap().expect_err("refused");
            assert!(e.contains("another job or generation"), "{e}");
        }
    }

    #[test]
    fn abort_fails_a_blocked_operation_and_every_later_one() {
        let results = on_ring(
            2,
            RingConfig {
                timeout: Duration::from_secs(30),
                ..Default::default()
            },
            |mut ring| {
                if ring.rank() == 1 {
                    // Alive but silent (a stopped peer) for longer than the test waits.
                    std::thread::sleep(Duration::from_secs(6));
                    return None;
                }
                let abort = ring.abort_handle().unwrap();
                let t = std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(200));
                    abort.abort();
                });
                let start = Instant::now();
                let first = ring.all_reduce_sum(&mut [1.0; 1000]).is_err();
                let waited = start.elapsed();
                let later = ring.all_reduce_sum(&mut [1.0]).is_err();
                t.join().unwrap();
                Some((first, later, waited))
            },
        );
        let (first, later, waited) = results[0].unwrap();
        assert!(first && later);
        // Ended by the abort, not by the peer's exit (6 s) or the timeout (30 s).
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }

    #[test]
    fn a_stalled_peer_times_out() {
        let results = on_ring(
            2,
            RingConfig {
                timeout: Duration::from_millis(500),
                ..Default::default()
            },
            |mut ring| {
                if ring.rank() == 1 {
                    std::thread::sleep(Duration::from_secs(2));
                    return Ok(());
                }
                ring.all_reduce_sum(&mut [1.0]).map_err(|e| e.to_string())
            },
        );
        let e = results[0].as_ref().expect_err("rank 0 times out");
        assert!(e.contains("stalled") && e.contains("rank 1"), "{e}");
    }
}
