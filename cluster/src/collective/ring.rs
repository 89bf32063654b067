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
//! if the next rank listens on its own address, and the accepting rank uses it if it can map
//! it (it cannot from another host).
//!
//! When both of a rank's links are TCP (neighbours on other hosts), a step runs on the
//! calling thread: non-blocking sends and receives driven by poll(2), so that sending,
//! receiving and summing interleave without a thread per step, and the received values are
//! summed from a cache-sized staging buffer. Values can travel as bf16 or fp16 ([`Wire`])
//! to halve the bytes between hosts; sums are still taken in f32.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::shm::{ShmIn, ShmOut, SLOTS};
use super::{Collective, CollectiveError, Wire};

const MAGIC: &[u8; 4] = b"FRY2";
/// The handshake: magic, rank, world, tag (8 bytes), slot bytes, offer length.
const HELLO: usize = 28;
const OP_ALL_REDUCE: u32 = 1;
const OP_BROADCAST: u32 = 2;
const OP_REDUCE_SCATTER: u32 = 3;
const OP_ALL_GATHER: u32 = 4;
const OP_PROBE: u32 = 5;

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
    /// Send and receive buffer of each connection, in bytes (0: the kernel's autotuning).
    pub socket_buffer: usize,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            timeout: Duration::from_secs(60),
            chunk_bytes: 1 << 20,
            shared_memory: true,
            tag: 0,
            socket_buffer: 0,
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
    /// Outgoing values encoded for a 16-bit wire.
    send_buf: Vec<u16>,
    /// Shared memory towards the next rank (we write) and from the previous one (we read).
    shm_out: Option<ShmOut>,
    shm_in: Option<ShmIn>,
}

/// Breaks a ring's connections (see [`Ring::abort_handle`]).
pub struct RingAbort(Vec<TcpStream>);

impl RingAbort {
    /// One handle for both rings' connections.
    pub fn join(mut self, other: RingAbort) -> RingAbort {
        self.0.extend(other.0);
        self
    }

    /// Shuts both connections down; the ring's blocked and later operations fail.
    pub fn abort(&self) {
        for s in &self.0 {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Segments up to this size go over TCP even between neighbours that share memory: the
/// announcement and credit would cost more than the copy saves.
const INLINE_BYTES: usize = 32 << 10;

/// Binds the listener this rank's previous rank will connect to (port chosen by the OS).
pub fn listen(ip: IpAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::new(ip, 0))
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
            send_buf: Vec::new(),
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
        // Offer the next rank a shared-memory region (it can map it only on this host). Ranks
        // of one host share its address: a rank at another address is taken to be on another
        // host even where it could map the region (hosts simulated on loopback addresses).
        let slot_bytes = ring.cfg.chunk_floats() * 4;
        let mut shm_out = if ring.cfg.shared_memory && next_addr.ip() == peers[rank].ip() {
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
            if ring.cfg.socket_buffer > 0 {
                set_buffers(s, ring.cfg.socket_buffer);
            }
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

    /// Reduce-scatter: every rank ends with the sum across ranks of one segment of `data`
    /// (the segments are `data` cut into `world` near-equal parts) and returns its range; the
    /// rest of `data` holds partial sums. With a 16-bit `wire` the owned sum is rounded to it.
    pub fn reduce_scatter(
        &mut self,
        data: &mut [f32],
        wire: Wire,
    ) -> Result<std::ops::Range<usize>, CollectiveError> {
        if self.world == 1 {
            return Ok(0..data.len());
        }
        let op = "reduce-scatter";
        self.header(OP_REDUCE_SCATTER | wire.code() << 8, data.len(), op)?;
        let owned = self.reduce_scatter_steps(data, wire, op)?;
        wire.round(&mut data[owned.clone()]);
        Ok(owned)
    }

    /// All-gather: every rank passes on the segment [`Ring::reduce_scatter`] left it, so that
    /// every rank ends with every segment.
    pub fn all_gather(&mut self, data: &mut [f32], wire: Wire) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let op = "all-gather";
        self.header(OP_ALL_GATHER | wire.code() << 8, data.len(), op)?;
        self.all_gather_steps(data, wire, op)
    }

    /// Measures the link from the previous rank: every rank sends `bytes` to the next over
    /// TCP while it receives as much from the previous one, as a ring step moves them.
    /// Returns the previous rank and the bytes per second received from it, when that link
    /// crosses hosts (not through shared memory); every rank must call it.
    pub fn probe(&mut self, bytes: usize) -> Result<Option<(usize, f64)>, CollectiveError> {
        if self.world == 1 {
            return Ok(None);
        }
        let op = "link probe";
        let n = bytes / 4;
        self.header(OP_PROBE, n, op)?;
        let (out, mut inp) = (vec![0f32; n], vec![0f32; n]);
        let (next, _) = self.next.as_ref().expect("world > 1 has a next rank");
        let (prev, _) = self.prev.as_ref().expect("world > 1 has a previous rank");
        let start = Instant::now();
        let sender = Sender::Tcp(Outgoing::new(&out, Wire::F32, &mut self.send_buf));
        let receiver = Receiver::Tcp(Landing {
            add: false,
            wire: Wire::F32,
        });
        let r = exchange(
            next,
            prev,
            sender,
            receiver,
            &mut inp,
            &mut self.recv_buf,
            self.cfg.timeout,
        );
        let seconds = start.elapsed().as_secs_f64().max(1e-9);
        r.map_err(|(link, e)| self.link_lost(link, op, &e))?;
        let prev_rank = self.prev.as_ref().expect("checked").1.rank;
        Ok(self
            .shm_in
            .is_none()
            .then_some((prev_rank, (n * 4) as f64 / seconds)))
    }

    /// The segment of a `len`-value buffer that [`Ring::reduce_scatter`] leaves this rank.
    pub fn owned_segment(&self, len: usize) -> std::ops::Range<usize> {
        self.segment(len, (self.rank + 1) % self.world)
    }

    fn reduce_scatter_steps(
        &mut self,
        data: &mut [f32],
        wire: Wire,
        op: &'static str,
    ) -> Result<std::ops::Range<usize>, CollectiveError> {
        let n = self.world;
        // After n-1 steps this rank holds the sum of segment rank+1.
        for s in 0..n - 1 {
            let (send, recv) = ((self.rank + n - s) % n, (self.rank + 2 * n - s - 1) % n);
            self.step(data, send, recv, true, wire, op)?;
        }
        Ok(self.owned_segment(data.len()))
    }

    fn all_gather_steps(
        &mut self,
        data: &mut [f32],
        wire: Wire,
        op: &'static str,
    ) -> Result<(), CollectiveError> {
        let n = self.world;
        for s in 0..n - 1 {
            let (send, recv) = ((self.rank + 1 + n - s) % n, (self.rank + n - s) % n);
            self.step(data, send, recv, false, wire, op)?;
        }
        Ok(())
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

    /// Receives `dst.len()` values from the previous rank into `dst`.
    fn recv_values(&mut self, dst: &mut [f32], op: &'static str) -> Result<(), CollectiveError> {
        self.recv_bytes(bytemuck::cast_slice_mut(dst), op)
    }

    /// The error for `link` failing during `op`.
    fn link_lost(&self, link: Link, op: &'static str, e: &std::io::Error) -> CollectiveError {
        let peer = match link {
            Link::Next => &self.next.as_ref().expect("world > 1 has a next rank").1,
            Link::Prev => &self.prev.as_ref().expect("world > 1 has a previous rank").1,
        };
        self.lost(peer, op, e)
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
        if c != code {
            let prev = self.prev.as_ref().map_or(0, |(_, p)| p.rank);
            return Err(CollectiveError::Failed {
                rank: self.rank,
                reason: format!(
                    "rank {prev} started another operation than this rank's {op} (code {c:#x}, this rank's {code:#x}): the ranks called different collectives, or compress gradients differently"
                ),
            });
        }
        if s != self.seq || l != len {
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
    /// from the previous one; received values are added (`add`) or copied (see [`exchange`]).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        data: &mut [f32],
        send: usize,
        recv: usize,
        add: bool,
        wire: Wire,
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
        let Ring {
            next,
            prev,
            recv_buf,
            send_buf,
            shm_out,
            shm_in,
            cfg,
            ..
        } = self;
        let (next_stream, _) = next.as_ref().expect("world > 1 has a next rank");
        let (prev_stream, _) = prev.as_ref().expect("world > 1 has a previous rank");
        // A segment goes through shared memory if its link has a region and it is not tiny
        // (both ends decide from the segment's own size, so they agree); otherwise over TCP,
        // on `wire` between hosts and as f32 on a link within one.
        let sender = match shm_out.as_mut() {
            Some(region) if out.len() * 4 > INLINE_BYTES => {
                Sender::Shm(ShmSender::new(region, out))
            }
            Some(_) => Sender::Tcp(Outgoing::new(out, Wire::F32, send_buf)),
            None => Sender::Tcp(Outgoing::new(out, wire, send_buf)),
        };
        let receiver = match shm_in.as_ref() {
            Some(region) if inp.len() * 4 > INLINE_BYTES => {
                Receiver::Shm(ShmReceiver::new(region, inp.len(), add))
            }
            Some(_) => Receiver::Tcp(Landing {
                add,
                wire: Wire::F32,
            }),
            None => Receiver::Tcp(Landing { add, wire }),
        };
        let r = exchange(
            next_stream,
            prev_stream,
            sender,
            receiver,
            inp,
            recv_buf,
            cfg.timeout,
        );
        r.map_err(|(link, e)| self.link_lost(link, op, &e))
    }
}

/// Which link of a step failed.
enum Link {
    Next,
    Prev,
}

/// Floats received into the staging buffer before they are added: small enough that the
/// staged values are still in cache when the sum reads them.
const STAGE_FLOATS: usize = 64 << 10;

/// What becomes of values received over TCP: added to the destination or copied into it,
/// and in which form they travel.
#[derive(Clone, Copy)]
struct Landing {
    add: bool,
    wire: Wire,
}

impl Landing {
    /// Whether values go straight from the socket into the destination.
    fn direct(self) -> bool {
        !self.add && self.wire == Wire::F32
    }

    /// Lands `bytes` (whole values on the wire) in `dst`.
    fn land(self, bytes: &[u8], dst: &mut [f32]) {
        match (self.wire, self.add) {
            (Wire::F32, true) => add_into(dst, bytemuck::cast_slice(bytes)),
            (Wire::F32, false) => dst.copy_from_slice(bytemuck::cast_slice(bytes)),
            (wire, add) => wire.decode(bytemuck::cast_slice(bytes), dst, add),
        }
    }
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, v)| *d += *v);
}

/// The values a step sends over TCP, as bytes on the wire: f32 as they are, or encoded for
/// a 16-bit wire a piece at a time just ahead of the send, so that encoding overlaps the
/// transfer and each piece is still in cache when the kernel copies it.
struct Outgoing<'a> {
    src: &'a [f32],
    wire: Wire,
    buf: &'a mut Vec<u16>,
    /// Values encoded so far.
    encoded: usize,
}

impl<'a> Outgoing<'a> {
    fn new(src: &'a [f32], wire: Wire, buf: &'a mut Vec<u16>) -> Outgoing<'a> {
        if wire != Wire::F32 {
            buf.resize(src.len(), 0);
        }
        Outgoing {
            src,
            wire,
            buf,
            encoded: 0,
        }
    }

    /// Bytes in all.
    fn len(&self) -> usize {
        self.src.len() * self.wire.bytes()
    }

    /// The bytes from `sent` on that are ready to go (at least one piece, unless all sent).
    fn ready(&mut self, sent: usize) -> &[u8] {
        if self.wire == Wire::F32 {
            return &bytemuck::cast_slice(self.src)[sent..];
        }
        let want = (sent / 2 + STAGE_FLOATS).min(self.src.len());
        if self.encoded < want {
            let range = self.encoded..want;
            self.wire
                .encode(&self.src[range.clone()], &mut self.buf[range]);
            self.encoded = want;
        }
        &bytemuck::cast_slice(&self.buf[..self.encoded])[sent..]
    }
}

/// Sending a segment through the next rank's shared region: a slot per chunk, each
/// announced on the connection (its length, 4 bytes); the next rank returns a credit byte
/// per chunk once it has read it, and a slot is refilled only after its credit. The step
/// collects every credit before it ends, so the connection holds nothing for the next one.
struct ShmSender<'a> {
    region: &'a mut ShmOut,
    src: &'a [u8],
    chunks: usize,
    /// Chunks put in a slot, and credits received.
    put: usize,
    credits: usize,
    /// Announcements not yet written, and how much of the first is.
    announce: std::collections::VecDeque<[u8; 4]>,
    announced: usize,
}

impl<'a> ShmSender<'a> {
    fn new(region: &'a mut ShmOut, src: &'a [f32]) -> ShmSender<'a> {
        let src: &[u8] = bytemuck::cast_slice(src);
        ShmSender {
            chunks: src.len().div_ceil(region.slot_bytes()),
            region,
            src,
            put: 0,
            credits: 0,
            announce: std::collections::VecDeque::new(),
            announced: 0,
        }
    }

    fn done(&self) -> bool {
        self.credits == self.chunks
    }

    /// Fills every free slot, writes what announcements the connection takes and reads the
    /// credits that have come back; returns whether anything moved.
    fn pump(&mut self, fd: std::os::fd::RawFd) -> std::io::Result<bool> {
        let mut moved = false;
        let slot = self.region.slot_bytes();
        while self.put < self.chunks && self.put - self.credits < SLOTS {
            let chunk = &self.src[self.put * slot..((self.put + 1) * slot).min(self.src.len())];
            self.region.put(self.put % SLOTS, chunk);
            self.announce.push_back((chunk.len() as u32).to_le_bytes());
            self.put += 1;
            moved = true;
        }
        while let Some(a) = self.announce.front() {
            match send_now(fd, &a[self.announced..]) {
                Ok(n) => {
                    moved = true;
                    self.announced += n;
                    if self.announced == 4 {
                        self.announce.pop_front();
                        self.announced = 0;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let owed = self.put - self.credits;
        if owed > 0 {
            let mut credit = [0u8; SLOTS];
            match recv_now(fd, &mut credit[..owed]) {
                Ok(0) => return Err(closed()),
                Ok(n) => (self.credits, moved) = (self.credits + n, true),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }

    /// Whether it waits to write (an announcement) and to read (a credit).
    fn wants(&self) -> (bool, bool) {
        (!self.announce.is_empty(), self.put > self.credits)
    }
}

/// Receiving a segment from the previous rank's shared region: reads each chunk's
/// announcement, lands the chunk straight from its slot, and returns a credit.
struct ShmReceiver<'a> {
    region: &'a ShmIn,
    add: bool,
    chunks: usize,
    /// Chunks landed, bytes of the current announcement read, credits not yet written.
    landed: usize,
    header: [u8; 4],
    filled: usize,
    owed: usize,
}

impl<'a> ShmReceiver<'a> {
    fn new(region: &'a ShmIn, len: usize, add: bool) -> ShmReceiver<'a> {
        ShmReceiver {
            chunks: (len * 4).div_ceil(region.slot_bytes()),
            region,
            add,
            landed: 0,
            header: [0; 4],
            filled: 0,
            owed: 0,
        }
    }

    fn done(&self) -> bool {
        self.landed == self.chunks && self.owed == 0
    }

    /// Lands every announced chunk and writes the credits; returns whether anything moved.
    fn pump(&mut self, fd: std::os::fd::RawFd, dst: &mut [f32]) -> std::io::Result<bool> {
        let mut moved = false;
        let slot_floats = self.region.slot_bytes() / 4;
        while self.landed < self.chunks {
            match recv_now(fd, &mut self.header[self.filled..]) {
                Ok(0) => return Err(closed()),
                Ok(n) => {
                    moved = true;
                    self.filled += n;
                    if self.filled < 4 {
                        continue;
                    }
                    self.filled = 0;
                    let end = ((self.landed + 1) * slot_floats).min(dst.len());
                    let part = &mut dst[self.landed * slot_floats..end];
                    if u32::from_le_bytes(self.header) as usize != part.len() * 4 {
                        return Err(std::io::Error::new(
                            ErrorKind::InvalidData,
                            "shared-memory chunk of the wrong size",
                        ));
                    }
                    let src = self.region.values(self.landed % SLOTS, part.len());
                    if self.add {
                        add_into(part, src);
                    } else {
                        part.copy_from_slice(src);
                    }
                    self.landed += 1;
                    self.owed += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.owed > 0 {
            match send_now(fd, &[1u8; SLOTS][..self.owed.min(SLOTS)]) {
                Ok(n) => (self.owed, moved) = (self.owed - n, true),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }

    /// Whether it waits to read (an announcement) and to write (credits).
    fn wants(&self) -> (bool, bool) {
        (self.landed < self.chunks, self.owed > 0)
    }
}

/// How a step's outgoing segment travels.
enum Sender<'a> {
    Tcp(Outgoing<'a>),
    Shm(ShmSender<'a>),
}

/// How a step's incoming segment arrives.
enum Receiver<'a> {
    Tcp(Landing),
    Shm(ShmReceiver<'a>),
}

fn closed() -> std::io::Error {
    std::io::Error::new(ErrorKind::UnexpectedEof, "the connection closed")
}

/// Sends a segment to `next` and receives one from `prev` at the same time, on this thread:
/// non-blocking calls driven by poll(2), so whichever direction can move, moves, neither
/// waits for the other, and no thread is started or switched to. Over TCP, uncompressed
/// copies land straight in `inp`; otherwise values arrive in a cache-sized staging buffer
/// (`stage`) whose contents land in `inp` as each piece completes. Through shared memory,
/// chunks are summed or copied straight from their slots. Fails with the link that broke or
/// that made no progress for `timeout`.
fn exchange(
    next: &TcpStream,
    prev: &TcpStream,
    mut sender: Sender,
    mut receiver: Receiver,
    inp: &mut [f32],
    stage: &mut Vec<f32>,
    timeout: Duration,
) -> Result<(), (Link, std::io::Error)> {
    use std::os::fd::AsRawFd;
    let (nfd, pfd) = (next.as_raw_fd(), prev.as_raw_fd());
    if let Receiver::Tcp(landing) = receiver {
        if !landing.direct() {
            stage.resize(STAGE_FLOATS.min(inp.len()), 0.0);
        }
    }
    let total = match &sender {
        Sender::Tcp(out) => out.len(),
        Sender::Shm(_) => 0,
    };
    // TCP: bytes sent; values landed, and bytes received of the piece (or value) under way.
    let (mut sent, mut done, mut partial) = (0usize, 0usize, 0usize);
    let mut idle_since = Instant::now();
    loop {
        let sending = match &sender {
            Sender::Tcp(_) => sent < total,
            Sender::Shm(s) => !s.done(),
        };
        let receiving = match &receiver {
            Receiver::Tcp(_) => done < inp.len(),
            Receiver::Shm(r) => !r.done(),
        };
        if !sending && !receiving {
            return Ok(());
        }
        let mut moved = false;
        if sending {
            match &mut sender {
                Sender::Tcp(out) => match send_now(nfd, out.ready(sent)) {
                    Ok(n) => (sent, moved) = (sent + n, true),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err((Link::Next, e)),
                },
                Sender::Shm(s) => moved |= s.pump(nfd).map_err(|e| (Link::Next, e))?,
            }
        }
        if receiving {
            match &mut receiver {
                Receiver::Shm(r) => moved |= r.pump(pfd, inp).map_err(|e| (Link::Prev, e))?,
                Receiver::Tcp(landing) => {
                    let elem = landing.wire.bytes();
                    let piece_len = STAGE_FLOATS.min(inp.len() - done);
                    let piece: &mut [u8] = if landing.direct() {
                        &mut bytemuck::cast_slice_mut(inp)[done * 4 + partial..]
                    } else {
                        &mut bytemuck::cast_slice_mut(&mut stage[..])[partial..piece_len * elem]
                    };
                    match recv_now(pfd, piece) {
                        Ok(0) => return Err((Link::Prev, closed())),
                        Ok(n) => {
                            partial += n;
                            moved = true;
                            if landing.direct() {
                                (done, partial) = (done + partial / 4, partial % 4);
                            } else if partial == piece_len * elem {
                                let bytes = &bytemuck::cast_slice(&stage[..])[..partial];
                                landing.land(bytes, &mut inp[done..done + piece_len]);
                                (done, partial) = (done + piece_len, 0);
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => return Err((Link::Prev, e)),
                    }
                }
            }
        }
        if moved {
            idle_since = Instant::now();
            continue;
        }
        // Nothing can move: wait until something can.
        let left = timeout.saturating_sub(idle_since.elapsed());
        let waiting_on = if receiving { Link::Prev } else { Link::Next };
        if left.is_zero() {
            return Err((waiting_on, ErrorKind::TimedOut.into()));
        }
        let (next_out, next_in) = match &sender {
            Sender::Tcp(_) => (sending, false),
            Sender::Shm(s) => s.wants(),
        };
        let (prev_in, prev_out) = match &receiver {
            Receiver::Tcp(_) => (receiving, false),
            Receiver::Shm(r) => r.wants(),
        };
        let events = |read: bool, write: bool| {
            (if read { libc::POLLIN } else { 0 }) | (if write { libc::POLLOUT } else { 0 })
        };
        let mut fds = [
            libc::pollfd {
                fd: nfd,
                events: events(next_in, next_out),
                revents: 0,
            },
            libc::pollfd {
                fd: pfd,
                events: events(prev_in, prev_out),
                revents: 0,
            },
        ];
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        #[allow(unsafe_code)]
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err((waiting_on, e));
            }
        }
    }
}

/// Asks for `bytes` of send and receive buffer on `stream` (the kernel caps it at
/// `net.core.wmem_max` / `rmem_max`); a refusal leaves the kernel's own sizing.
fn set_buffers(stream: &TcpStream, bytes: usize) {
    use std::os::fd::AsRawFd;
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        #[allow(unsafe_code)]
        // SAFETY: `v` is a c_int that outlives the call, and its size is passed with it.
        let _ = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// One non-blocking send on a blocking socket: the bytes taken, or `WouldBlock`. Never
/// raises SIGPIPE; a closed peer is an error.
fn send_now(fd: std::os::fd::RawFd, buf: &[u8]) -> std::io::Result<usize> {
    #[allow(unsafe_code)]
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// One non-blocking receive on a blocking socket: the bytes received (0: the peer closed),
/// or `WouldBlock`.
fn recv_now(fd: std::os::fd::RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    #[allow(unsafe_code)]
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum_as(&mut self, data: &mut [f32], wire: Wire) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let op = "all-reduce";
        self.header(OP_ALL_REDUCE | wire.code() << 8, data.len(), op)?;
        let owned = self.reduce_scatter_steps(data, wire, op)?;
        // The owner rounds its sum as the wire will, so every rank ends with the same values.
        wire.round(&mut data[owned]);
        self.all_gather_steps(data, wire, op)
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
                self.recv_values(&mut data[range.clone()], op)?;
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
    fn compressed_all_reduce_is_the_same_on_every_rank_and_close_to_exact() {
        for wire in [Wire::Bf16, Wire::F16] {
            for world in [2, 3] {
                let cfg = RingConfig {
                    shared_memory: false,
                    ..Default::default()
                };
                let len = 200_003;
                let results = on_ring(world, cfg, move |mut ring| {
                    let r = ring.rank() as f32;
                    let mut v: Vec<f32> = (0..len).map(|i| (i as f32 * 0.01 + r).cos()).collect();
                    ring.all_reduce_sum_as(&mut v, wire).unwrap();
                    // Reduce-scatter then all-gather by hand gives the same.
                    let mut w: Vec<f32> = (0..len).map(|i| (i as f32 * 0.01 + r).cos()).collect();
                    let owned = ring.reduce_scatter(&mut w, wire).unwrap();
                    assert_eq!(owned, ring.owned_segment(len));
                    ring.all_gather(&mut w, wire).unwrap();
                    assert_eq!(v, w);
                    v
                });
                let tolerance = if wire == Wire::Bf16 { 0.04 } else { 0.005 };
                for (i, got) in results[0].iter().enumerate() {
                    let exact: f32 = (0..world).map(|r| (i as f32 * 0.01 + r as f32).cos()).sum();
                    assert!(
                        (got - exact).abs() < tolerance,
                        "{wire:?} {i}: {got} vs {exact}"
                    );
                }
                for got in &results {
                    assert_eq!(got, &results[0], "{wire:?}, world {world}");
                }
            }
        }
    }

    #[test]
    fn probing_measures_links_between_hosts_only() {
        for shared_memory in [true, false] {
            let cfg = RingConfig {
                shared_memory,
                ..Default::default()
            };
            let results = on_ring(3, cfg, |mut ring| {
                let p = ring.probe(1 << 20).unwrap();
                // The ring still works after a probe.
                let mut v = vec![1.0f32; 100_000];
                ring.all_reduce_sum(&mut v).unwrap();
                (ring.rank(), p, v[99_999])
            });
            for (rank, p, v) in results {
                assert_eq!(v, 3.0);
                match p {
                    None => assert!(shared_memory),
                    Some((peer, bps)) => {
                        assert!(!shared_memory);
                        assert_eq!(peer, (rank + 2) % 3);
                        assert!(bps > 1e6, "{bps}");
                    }
                }
            }
        }
    }

    #[test]
    fn ranks_that_compress_differently_fail_clearly() {
        let cfg = RingConfig {
            timeout: Duration::from_secs(5),
            shared_memory: false,
            ..Default::default()
        };
        let results = on_ring(2, cfg, |mut ring| {
            let wire = if ring.rank() == 0 {
                Wire::F32
            } else {
                Wire::Bf16
            };
            ring.all_reduce_sum_as(&mut [1.0; 100], wire)
                .map_err(|e| e.to_string())
        });
        for r in results {
            let e = r.expect_err("refused");
            assert!(e.contains("compress gradients differently"), "{e}");
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
        // Through shared memory (one host) and over TCP only (between hosts).
        for shared_memory in [true, false] {
            let start = Instant::now();
            let results = on_ring(
                3,
                RingConfig {
                    timeout: Duration::from_secs(30),
                    shared_memory,
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
        // Through shared memory (one host) and over TCP only (between hosts).
        for shared_memory in [true, false] {
            let results = on_ring(
                2,
                RingConfig {
                    timeout: Duration::from_secs(30),
                    shared_memory,
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
    }

    #[test]
    fn a_stalled_peer_times_out() {
        // Through shared memory (one host) and over TCP only (between hosts).
        for shared_memory in [true, false] {
            let results = on_ring(
                2,
                RingConfig {
                    timeout: Duration::from_millis(500),
                    shared_memory,
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
}
