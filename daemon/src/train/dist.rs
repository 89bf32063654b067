//! Data parallelism for one rank: forming the ring through the daemon, making every rank
//! start from rank 0's weights, and averaging gradients in buckets (overlapped with backward
//! where it pays: see [`super::overlap`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use ferry_cluster::collective::background::Background;
use ferry_cluster::collective::hier::{Hierarchical, Topology};
use ferry_cluster::collective::nccl::{Nccl, SideStream, UniqueId};
use ferry_cluster::collective::ring::{self, Ring, RingConfig};
use ferry_cluster::collective::{Collective, Wire};
use tch::{Device, Kind, Tensor};

use ferry_cluster::spec::OverlapGradSync;

use super::control::ControlChannel;
use super::overlap::{self, BucketComm, Overlap, OverlapReport};
use crate::protocol::{WorkerMessage, WorkerPlan};

/// Bytes each rank sends its ring neighbour on another host when the ring forms, to
/// measure that link (`ferry_ring_link_bytes_per_second`).
const PROBE_BYTES: usize = 4 << 20;

/// Each rank's two rendezvous addresses ("ring,cross").
fn parse_peers(peers: &[String]) -> Result<(Vec<SocketAddr>, Vec<SocketAddr>)> {
    let mut ring = Vec::with_capacity(peers.len());
    let mut cross = Vec::with_capacity(peers.len());
    for p in peers {
        let (a, b) = p
            .split_once(',')
            .ok_or_else(|| anyhow!("{p:?} is not two addresses"))?;
        ring.push(a.parse().with_context(|| format!("{a:?}"))?);
        cross.push(b.parse().with_context(|| format!("{b:?}"))?);
    }
    Ok((ring, cross))
}

/// How this rank's values reach the others.
enum Transport {
    /// CPU ranks: the TCP ring over host buffers, on its own thread.
    Ring(Arc<Mutex<Background>>),
    /// CUDA ranks: NCCL over device buffers.
    Nccl(Arc<Mutex<Nccl>>),
}

/// This rank's place in the job, and its connection to the others.
pub struct Dist {
    pub rank: usize,
    pub world: usize,
    /// None in a job of one rank.
    transport: Option<Transport>,
    device: Device,
    /// Indices into the trainable parameters, one list per bucket, in all-reduce order.
    buckets: Vec<Vec<usize>>,
    /// The buckets' buffers, and their hooks when gradients are all-reduced during backward
    /// (`train.overlap_grad_sync`).
    overlap: Option<Overlap>,
    /// Whether every rank of the ring runs on this host.
    all_local: bool,
    /// With overlap: what the last step's overlap did.
    pub overlap_report: Option<OverlapReport>,
}

impl Dist {
    /// A job of one rank: every collective is a no-op.
    pub fn single() -> Dist {
        Dist::joined(0, 1, Device::Cpu, None)
    }

    fn joined(rank: usize, world: usize, device: Device, transport: Option<Transport>) -> Dist {
        Dist {
            rank,
            world,
            transport,
            device,
            buckets: Vec::new(),
            overlap: None,
            all_local: true,
            overlap_report: None,
        }
    }

    /// Reports this rank's rendezvous address to the daemon and waits for every rank's.
    fn rendezvous(
        rank: usize,
        world: usize,
        addr: String,
        control: &ControlChannel,
        emit: impl Fn(&WorkerMessage),
    ) -> Result<Vec<String>> {
        emit(&WorkerMessage::Rendezvous {
            rank: rank as u32,
            addr,
        });
        let peers = control.peers(rank)?.peers;
        if peers.len() != world {
            return Err(anyhow!(
                "rank {rank}: {} peers for a world of {world}",
                peers.len()
            ));
        }
        Ok(peers)
    }

    /// Listens, reports the address to the daemon, waits for every rank's address on stdin,
    /// and forms the ring.
    pub fn form(
        plan: &WorkerPlan,
        rank: usize,
        world: usize,
        device: Device,
        control: &ControlChannel,
        emit: impl Fn(&WorkerMessage),
    ) -> Result<Dist> {
        if world == 1 {
            return Ok(Dist::single());
        }
        if device.is_cuda() {
            return Self::form_nccl(rank, world, device, control, emit);
        }
        let ip: IpAddr = plan
            .bind_ip
            .parse()
            .with_context(|| format!("bad bind address {}", plan.bind_ip))?;
        // Two listeners: the ring (or, across hosts, the ring within this host) and the
        // ring between hosts of a hierarchical all-reduce.
        let listen =
            || ring::listen(ip).with_context(|| format!("rank {rank}: cannot listen on {ip}"));
        let (listener, cross_listener) = (listen()?, listen()?);
        let addr = format!(
            "{},{}",
            listener.local_addr()?,
            cross_listener.local_addr()?
        );
        let (peers, cross_peers) =
            parse_peers(&Self::rendezvous(rank, world, addr, control, &emit)?)
                .with_context(|| format!("rank {rank}: corrupt peer address"))?;
        let cfg = RingConfig {
            timeout: Duration::from_millis(plan.collective_timeout_ms),
            tag: plan.ring_tag(),
            ..Default::default()
        };
        let all_local = peers.iter().all(|p| p.ip() == ip);
        // Ranks of one host share its address (the node's bind address).
        let topo = Topology::group(&peers.iter().map(|p| p.ip()).collect::<Vec<_>>());
        let (coll, abort, link, shape): (Box<dyn Collective>, _, _, _) = if topo.hierarchical() {
            let shape = format!(
                "hierarchical all-reduce: {} hosts x {} ranks (shared memory within a host, TCP between)",
                topo.hosts(),
                topo.ranks_per_host().unwrap_or(0)
            );
            let mut h = Hierarchical::connect(
                listener,
                cross_listener,
                rank,
                &peers,
                &cross_peers,
                topo,
                cfg,
            )?;
            let link = h.probe(PROBE_BYTES)?;
            let abort = h.abort_handle();
            (Box::new(h) as Box<dyn Collective>, abort, link, shape)
        } else {
            drop(cross_listener);
            let mut r = Ring::connect(listener, rank, &peers, cfg)?;
            let link = if all_local {
                None
            } else {
                r.probe(PROBE_BYTES)?
            };
            let abort = r.abort_handle();
            let shape = format!("ring all-reduce over {} hosts", topo.hosts());
            (Box::new(r) as Box<dyn Collective>, abort, link, shape)
        };
        // The daemon's stop breaks the ring: a collective blocked on a stopped or
        // partitioned peer fails at once instead of at the timeout.
        let abort =
            abort.with_context(|| format!("rank {rank}: cannot keep a handle on the ring"))?;
        control.stop.on_stop(Box::new(move || abort.abort()));
        if let Some((peer, bytes_per_second)) = link {
            emit(&WorkerMessage::Link {
                rank: rank as u32,
                peer: peer as u32,
                bytes_per_second,
            });
        }
        if rank == 0 && !all_local {
            emit(&WorkerMessage::Log { message: shape });
        }
        let comm = Background::spawn(coll)
            .with_context(|| format!("rank {rank}: cannot start the communication thread"))?;
        let mut dist = Dist::joined(
            rank,
            world,
            device,
            Some(Transport::Ring(Arc::new(Mutex::new(comm)))),
        );
        dist.all_local = all_local;
        Ok(dist)
    }

    /// A one-rank NCCL communicator on `device`, for `ferryd doctor`: it runs the CUDA ranks'
    /// gradient path on a machine with one GPU.
    pub fn nccl_alone(device: Device) -> Result<Dist> {
        let nccl = Nccl::init(&UniqueId::new()?, 0, 1)?;
        Ok(Dist::joined(
            0,
            1,
            device,
            Some(Transport::Nccl(Arc::new(Mutex::new(nccl)))),
        ))
    }

    /// CUDA ranks: rank 0 makes the NCCL id and reports it as its rendezvous address; the
    /// daemon's peer list carries it to the others; every rank joins the communicator on
    /// the one GPU it sees.
    fn form_nccl(
        rank: usize,
        world: usize,
        device: Device,
        control: &ControlChannel,
        emit: impl Fn(&WorkerMessage),
    ) -> Result<Dist> {
        let addr = if rank == 0 {
            format!("nccl:{}", UniqueId::new()?.to_hex())
        } else {
            "nccl".to_string()
        };
        let peers = Self::rendezvous(rank, world, addr, control, emit)?;
        let id = peers
            .first()
            .and_then(|p| p.strip_prefix("nccl:"))
            .and_then(UniqueId::from_hex)
            .ok_or_else(|| anyhow!("rank {rank}: rank 0 sent no NCCL id in the rendezvous"))?;
        let nccl = Nccl::init(&id, rank, world)?;
        Ok(Dist::joined(
            rank,
            world,
            device,
            Some(Transport::Nccl(Arc::new(Mutex::new(nccl)))),
        ))
    }

    /// Sums (or, with `root`, broadcasts from it) a flat f32 tensor across ranks; returns
    /// the result, on the CPU for the ring and on the device for NCCL.
    fn reduce_flat(&mut self, flat: Tensor, root: Option<usize>) -> Result<Tensor> {
        let coll = match self.transport.as_mut() {
            None => return Ok(flat),
            Some(Transport::Ring(coll)) => coll,
            Some(Transport::Nccl(n)) => {
                let flat = flat.to_device(self.device).contiguous();
                let count = flat.numel();
                let mut n = overlap::lock(n);
                #[allow(unsafe_code)]
                // SAFETY: `flat` is a contiguous f32 device tensor of `count` values that lives
                // until the end of this call; the operation is enqueued on the legacy default
                // stream, which libtorch's later kernels on it follow in order.
                unsafe {
                    match root {
                        Some(r) => n.broadcast(flat.data_ptr(), count, r, std::ptr::null_mut())?,
                        None => n.all_reduce_sum(flat.data_ptr(), count, std::ptr::null_mut())?,
                    }
                }
                return Ok(flat);
            }
        };
        let v = Vec::<f32>::try_from(&flat.to_device(Device::Cpu))?;
        let mut coll = overlap::lock(coll);
        let out = match root {
            Some(r) => coll.broadcast(v, r)?,
            None => coll.all_reduce_sum(v)?,
        };
        Ok(Tensor::from_slice(&out))
    }

    /// How many gradient buckets there are.
    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Whether this rank reports progress and writes files.
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// Copies rank 0's tensors (parameters and buffers) into every rank's, so all start equal.
    pub fn broadcast_state<'a>(
        &mut self,
        tensors: impl Iterator<Item = &'a (String, Tensor)>,
    ) -> Result<()> {
        if self.transport.is_none() {
            return Ok(());
        }
        let tensors: Vec<&Tensor> = tensors.map(|(_, t)| t).collect();
        let flat = Tensor::cat(
            &tensors
                .iter()
                .map(|t| t.to_kind(Kind::Float).flatten(0, -1))
                .collect::<Vec<_>>(),
            0,
        );
        let all = self.reduce_flat(flat, Some(0))?;
        let mut off = 0i64;
        tch::no_grad(|| -> Result<()> {
            for t in tensors {
                let n = t.numel() as i64;
                let src = all
                    .narrow(0, off, n)
                    .view(t.size().as_slice())
                    .to_kind(t.kind())
                    .to_device(t.device());
                t.shallow_clone().f_copy_(&src)?;
                off += n;
            }
            Ok(())
        })
    }

    /// Whether gradients of a `wire` other than f32 would really be compressed: not on a
    /// ring whose ranks all share this host.
    pub fn compresses(&self, wire: Wire) -> bool {
        wire != Wire::F32 && !(matches!(self.transport, Some(Transport::Ring(_))) && self.all_local)
    }

    /// Groups the trainable parameters into buckets of about `bucket_bytes`, last layer
    /// first (the order in which backward produces gradients), the same on every rank. With
    /// `overlap` (see [`Dist::overlaps`]), every parameter is hooked so that each bucket is
    /// all-reduced as soon as backward has produced it: on the ring's communication thread,
    /// or on NCCL's side stream.
    pub fn plan_buckets(
        &mut self,
        params: &[(String, Tensor)],
        bucket_bytes: usize,
        overlap: bool,
        wire: Wire,
    ) -> Result<()> {
        self.buckets.clear();
        let mut current = Vec::new();
        let mut bytes = 0;
        for i in (0..params.len()).rev() {
            let b = params[i].1.numel() * 4;
            if !current.is_empty() && bytes + b > bucket_bytes {
                self.buckets.push(std::mem::take(&mut current));
                bytes = 0;
            }
            current.push(i);
            bytes += b;
        }
        if !current.is_empty() {
            self.buckets.push(current);
        }
        // Within one host the ring's bulk data goes through shared memory as f32: rounding
        // gradients to 16 bits there would cost precision and save nothing.
        let wire = if self.compresses(wire) {
            wire
        } else {
            Wire::F32
        };
        let comm = match &self.transport {
            None => return Ok(()),
            Some(Transport::Ring(comm)) => BucketComm::Ring(comm.clone()),
            Some(Transport::Nccl(nccl)) => BucketComm::Nccl {
                nccl: nccl.clone(),
                device: self.device,
                side: match (overlap, self.device) {
                    (true, Device::Cuda(i)) => Some(SideStream::new(i, self.rank)?),
                    _ => None,
                },
            },
        };
        self.overlap = Some(Overlap::new(
            params,
            self.buckets.clone(),
            comm,
            overlap,
            wire,
        )?);
        Ok(())
    }

    /// Whether this rank (with `threads` intra-op threads on a CPU) all-reduces during backward.
    /// (Ranks may decide differently: it changes when the ring runs, not what it runs.)
    pub fn overlaps(&self, mode: OverlapGradSync, threads: usize) -> bool {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        decide_overlap(
            mode,
            self.device.is_cuda(),
            self.all_local,
            self.world,
            threads,
            cores,
        )
    }

    /// Before backward: this rank's gradient will weigh `weight` (its share of the global
    /// batch) in the global mean.
    pub fn begin_step(&mut self, weight: f64) {
        if let Some(o) = &self.overlap {
            o.arm(weight);
        }
    }

    /// After backward: replaces each gradient by the global mean gradient: every rank's
    /// gradient, weighed by its share, summed across ranks bucket by bucket.
    pub fn sync_grads(&mut self, params: &[(String, Tensor)]) -> Result<()> {
        if self.transport.is_none() {
            return Ok(());
        }
        let o = self
            .overlap
            .as_ref()
            .ok_or_else(|| anyhow!("gradient buckets were never planned"))?;
        let report = o.finish(params)?;
        self.overlap_report = o.hooked().then_some(report);
        Ok(())
    }

    /// Sums `v` across ranks (in place).
    pub fn sum(&mut self, v: &mut [f32]) -> Result<()> {
        if self.transport.is_none() {
            return Ok(());
        }
        let summed = self.reduce_flat(Tensor::from_slice(v), None)?;
        let out = Vec::<f32>::try_from(&summed.to_device(Device::Cpu))?;
        v.copy_from_slice(&out);
        Ok(())
    }
}

/// On CUDA, `auto` does not overlap yet: NCCL on a side stream is ordered against
/// libtorch's stream by events, which no machine here can test (one GPU, and a one-rank
/// NCCL all-reduce does not touch its stream); `always` turns it on. On CPUs, `auto`
/// overlaps unless all `world` ranks share this host and their compute threads plus
/// one communication thread each would outnumber its `cores`: then the all-reduce (memory
/// copies and sums through shared memory, all CPU work) only competes with backward for the
/// same cores. Measured on 2 cores with 2 ranks of 1 thread: overlapping was 0.92-0.97x of not
/// (docs/benchmarks.md).
fn decide_overlap(
    mode: OverlapGradSync,
    cuda: bool,
    all_local: bool,
    world: usize,
    threads: usize,
    cores: usize,
) -> bool {
    match mode {
        OverlapGradSync::Always => true,
        OverlapGradSync::Never => false,
        OverlapGradSync::Auto => {
            let crowded = all_local && world * (threads + 1) > cores;
            !cuda && !crowded
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rank `rank` of a ring over `peers`, on its communication thread.
    fn ring_rank(l: std::net::TcpListener, rank: usize, peers: &[SocketAddr]) -> Dist {
        let ring = Ring::connect(l, rank, peers, RingConfig::default()).unwrap();
        let comm = Background::spawn(Box::new(ring)).unwrap();
        let comm = Transport::Ring(Arc::new(Mutex::new(comm)));
        Dist::joined(rank, peers.len(), Device::Cpu, Some(comm))
    }

    /// A one-rank ring (a rank connected to itself).
    fn ring_alone() -> Dist {
        let l = ring::listen(IpAddr::from([127, 0, 0, 1])).unwrap();
        let me = l.local_addr().unwrap();
        ring_rank(l, 0, &[me])
    }

    #[test]
    fn a_ring_within_one_host_never_compresses() {
        let mut alone = ring_alone();
        assert!(!alone.compresses(Wire::Bf16));
        alone.all_local = false; // as across hosts
        assert!(alone.compresses(Wire::Bf16) && !alone.compresses(Wire::F32));
    }

    #[test]
    fn peers_carry_two_addresses_each() {
        let (ring, cross) = parse_peers(&[
            "127.0.0.11:4000,127.0.0.11:4001".to_string(),
            "127.0.0.12:5000,127.0.0.12:5001".to_string(),
        ])
        .unwrap();
        assert_eq!(ring[1], "127.0.0.12:5000".parse::<SocketAddr>().unwrap());
        assert_eq!(cross[0], "127.0.0.11:4001".parse::<SocketAddr>().unwrap());
        for bad in ["127.0.0.1:4000", "127.0.0.1:4000,nonsense", "nccl:00ff"] {
            let e = parse_peers(&[bad.to_string()]).unwrap_err();
            assert!(
                format!("{e:#}").contains(bad.split(',').next_back().unwrap()),
                "{e:#}"
            );
        }
    }

    #[test]
    fn a_parameter_used_on_one_rank_only_gets_the_same_gradient_on_every_rank() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let listeners: Vec<_> = (0..2).map(|_| ring::listen(ip).unwrap()).collect();
        let peers: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let ranks: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let peers = peers.clone();
                std::thread::spawn(move || {
                    let mut dist = ring_rank(l, rank, &peers);
                    let w = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
                    let params = vec![("w".to_string(), w)];
                    dist.plan_buckets(&params, 1 << 20, rank == 0, Wire::F32)
                        .unwrap();
                    dist.begin_step(0.5);
                    // Rank 0's branch uses w (gradient 3 everywhere); rank 1's does not.
                    if rank == 0 {
                        (params[0].1.sum(Kind::Float) * 3.0).backward();
                    }
                    dist.sync_grads(&params).unwrap();
                    Vec::<f32>::try_from(params[0].1.grad()).unwrap()
                })
            })
            .collect();
        for (rank, r) in ranks.into_iter().enumerate() {
            // (0.5 * 3 + 0.5 * 0): the global mean, on both ranks.
            assert_eq!(r.join().unwrap(), vec![1.5; 4], "rank {rank}");
        }
    }

    #[test]
    fn buckets_average_gradients_with_and_without_hooks() {
        for hooks in [true, false] {
            let mut dist = ring_alone();
            // `c` gets no gradient: its bucket (the last) can only go after backward.
            // `f` was exported not requiring a gradient: it cannot be hooked.
            let params: Vec<(String, Tensor)> = [("c", 2i64), ("a", 3), ("b", 5), ("f", 2)]
                .into_iter()
                .map(|(n, k)| {
                    let t = Tensor::arange(k, (Kind::Float, Device::Cpu));
                    (n.to_string(), t.set_requires_grad(n != "f"))
                })
                .collect();
            // 12 bytes: one bucket per parameter, in the order f, b, a, c.
            dist.plan_buckets(&params, 12, hooks, Wire::F32).unwrap();
            assert_eq!(dist.buckets, vec![vec![3], vec![2], vec![1], vec![0]]);
            for step in 0..3 {
                for (_, p) in &params {
                    super::super::torchscript::clear_grad(&mut p.shallow_clone());
                }
                dist.begin_step(0.5);
                // d/dp of sum(p^2) = 2p, times the weight 0.5: p.
                (params[1].1.square().sum(Kind::Float) + params[2].1.square().sum(Kind::Float))
                    .backward();
                dist.sync_grads(&params).unwrap();
                for (name, p) in &params[1..3] {
                    let got = Vec::<f32>::try_from(p.grad()).unwrap();
                    let want = Vec::<f32>::try_from(p.detach()).unwrap();
                    assert_eq!(got, want, "step {step}, hooks {hooks}: gradient of {name}");
                }
                assert!(!params[0].1.grad().defined());
                assert!(!params[3].1.grad().defined());
                // f's, b's and a's buckets went during backward; c's waited for it to end.
                let report = dist.overlap_report.as_ref();
                assert_eq!(report.map(|r| r.during_backward), hooks.then_some(3));
                assert_eq!(report.map(|r| r.silent.clone()), hooks.then(|| vec![0]));
            }
        }
    }

    #[test]
    fn auto_overlaps_unless_local_ranks_would_crowd_the_cores() {
        use OverlapGradSync::*;
        // 2 ranks x 1 thread on 2 cores (this project's CI machine): no room for the comm threads.
        assert!(!decide_overlap(Auto, false, true, 2, 1, 2));
        // Room for them.
        assert!(decide_overlap(Auto, false, true, 2, 1, 4));
        assert!(decide_overlap(Auto, false, true, 4, 7, 32));
        // A rank on another host: the ring waits on the network, not on these cores.
        assert!(decide_overlap(Auto, false, false, 2, 1, 2));
        // GPUs: not until overlap on NCCL has run on several GPUs.
        assert!(!decide_overlap(Auto, true, false, 2, 1, 64));
        assert!(decide_overlap(Always, false, true, 2, 1, 2));
        assert!(!decide_overlap(Never, true, false, 8, 1, 64));
    }
}
