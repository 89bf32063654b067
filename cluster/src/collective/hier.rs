//! Hierarchical all-reduce for ranks on several hosts with several ranks each.
//!
//! A flat ring over `H` hosts × `k` ranks crosses the network on every step: each of its
//! `2(Hk-1)` steps sends `1/(Hk)` of the buffer over every host boundary, so each boundary
//! carries about twice the buffer. Here the ranks of a host first reduce-scatter among
//! themselves through shared memory (local rank `j` ends with the host's sum of one `1/k`
//! slice), then local rank `j` of every host all-reduces its slice with local rank `j` of
//! the other hosts over TCP (`k` rings of `H` ranks side by side, each carrying `1/k` of the
//! buffer), and the ranks of each host all-gather the slices through shared memory. Each
//! host boundary carries about `2(H-1)/H` of the buffer divided among `k` streams, the
//! intra-host part runs at memory speed, and a 16-bit wire ([`Wire`]) applies where bytes
//! are dear: between hosts only.
//!
//! [`Topology`] says which ranks share a host; [`Topology::hierarchical`] says when this
//! pays (at least two hosts, every host with the same number of ranks, at least two).

use std::net::{SocketAddr, TcpListener};

use super::ring::{Ring, RingAbort, RingConfig};
use super::{Collective, CollectiveError, Wire};

/// Which ranks share a host: hosts in order of their first rank, ranks in order within each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    hosts: Vec<Vec<usize>>,
}

impl Topology {
    /// Groups ranks by `host_of[rank]` (any key that names a host, such as its address).
    pub fn group<K: PartialEq>(host_of: &[K]) -> Topology {
        let mut keys: Vec<&K> = Vec::new();
        let mut hosts: Vec<Vec<usize>> = Vec::new();
        for (rank, key) in host_of.iter().enumerate() {
            match keys.iter().position(|k| *k == key) {
                Some(h) => hosts[h].push(rank),
                None => {
                    keys.push(key);
                    hosts.push(vec![rank]);
                }
            }
        }
        Topology { hosts }
    }

    /// How many hosts.
    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// Ranks per host, when every host has the same number.
    pub fn ranks_per_host(&self) -> Option<usize> {
        let k = self.hosts.first()?.len();
        self.hosts.iter().all(|h| h.len() == k).then_some(k)
    }

    /// Whether a hierarchical all-reduce applies: two hosts or more, with the same number
    /// of ranks each, two or more.
    pub fn hierarchical(&self) -> bool {
        self.hosts() >= 2 && self.ranks_per_host().is_some_and(|k| k >= 2)
    }

    /// `rank`'s host and its index among that host's ranks.
    pub fn locate(&self, rank: usize) -> Option<(usize, usize)> {
        self.hosts
            .iter()
            .enumerate()
            .find_map(|(h, ranks)| ranks.iter().position(|&r| r == rank).map(|j| (h, j)))
    }

    /// The ranks of host `h`.
    pub fn host(&self, h: usize) -> &[usize] {
        &self.hosts[h]
    }

    /// Local rank `j` of every host, in host order.
    pub fn column(&self, j: usize) -> Vec<usize> {
        self.hosts
            .iter()
            .filter_map(|h| h.get(j).copied())
            .collect()
    }
}

/// One rank's end of a hierarchical all-reduce: a ring among its host's ranks and a ring
/// among the ranks with its local index on the other hosts.
pub struct Hierarchical {
    rank: usize,
    world: usize,
    topo: Topology,
    local: Ring,
    cross: Ring,
}

impl Hierarchical {
    /// Forms both rings. `local_peers[i]` and `cross_peers[i]` are the addresses of rank
    /// `i`'s two listeners; this rank listens on `local_listener` and `cross_listener`. The
    /// local ring uses shared memory where `cfg` allows; the cross ring is TCP only.
    pub fn connect(
        local_listener: TcpListener,
        cross_listener: TcpListener,
        rank: usize,
        local_peers: &[SocketAddr],
        cross_peers: &[SocketAddr],
        topo: Topology,
        cfg: RingConfig,
    ) -> Result<Hierarchical, CollectiveError> {
        let world = local_peers.len();
        let setup = |reason: String| CollectiveError::Setup { rank, reason };
        if !topo.hierarchical() || cross_peers.len() != world {
            return Err(setup(format!(
                "no hierarchical all-reduce over {world} ranks on {} hosts",
                topo.hosts()
            )));
        }
        let (host, j) = topo
            .locate(rank)
            .ok_or_else(|| setup(format!("rank {rank} is on no host")))?;
        let members = topo.host(host);
        let local_addrs: Vec<SocketAddr> = members.iter().map(|&r| local_peers[r]).collect();
        let local = Ring::connect(local_listener, j, &local_addrs, cfg.clone())?;
        let column = topo.column(j);
        let cross_addrs: Vec<SocketAddr> = column.iter().map(|&r| cross_peers[r]).collect();
        let cross_cfg = RingConfig {
            shared_memory: false,
            ..cfg
        };
        let cross = Ring::connect(cross_listener, host, &cross_addrs, cross_cfg)?;
        Ok(Hierarchical {
            rank,
            world,
            topo,
            local,
            cross,
        })
    }

    /// Breaks both rings' connections (see [`Ring::abort_handle`]).
    pub fn abort_handle(&self) -> std::io::Result<RingAbort> {
        Ok(self.local.abort_handle()?.join(self.cross.abort_handle()?))
    }

    /// [`Ring::probe`] on the ring between hosts; the peer is returned as a global rank.
    pub fn probe(&mut self, bytes: usize) -> Result<Option<(usize, f64)>, CollectiveError> {
        let (_, j) = self.topo.locate(self.rank).expect("located at connect");
        let column = self.topo.column(j);
        Ok(self
            .cross
            .probe(bytes)?
            .map(|(host, bps)| (column[host], bps)))
    }

    /// What this rank's all-reduce does, for the log.
    pub fn describe(&self) -> String {
        let k = self.topo.ranks_per_host().unwrap_or(0);
        format!(
            "hierarchical all-reduce: {} hosts x {k} ranks (shared memory within a host: {})",
            self.topo.hosts(),
            self.local.shared_memory_links() == (true, true)
        )
    }
}

impl Collective for Hierarchical {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum_as(&mut self, data: &mut [f32], wire: Wire) -> Result<(), CollectiveError> {
        let slice = self.local.reduce_scatter(data, Wire::F32)?;
        self.cross.all_reduce_sum_as(&mut data[slice], wire)?;
        self.local.all_gather(data, Wire::F32)
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let (root_host, root_j) = self.topo.locate(root).ok_or(CollectiveError::Failed {
            rank: self.rank,
            reason: format!(
                "broadcast from rank {root}, outside a world of {}",
                self.world
            ),
        })?;
        // The root's column carries it to every host, then each host passes it on.
        let (_, j) = self.topo.locate(self.rank).expect("located at connect");
        if j == root_j {
            self.cross.broadcast(data, root_host)?;
        }
        self.local.broadcast(data, root_j)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::ring::listen;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn topology_groups_ranks_by_host() {
        let t = Topology::group(&["a", "a", "b", "b", "c", "c"]);
        assert!(t.hierarchical());
        assert_eq!(t.locate(3), Some((1, 1)));
        assert_eq!(t.column(0), vec![0, 2, 4]);
        // Uneven hosts, one host, one rank per host: a flat ring instead.
        assert!(!Topology::group(&["a", "a", "b"]).hierarchical());
        assert!(!Topology::group(&["a", "a", "a"]).hierarchical());
        assert!(!Topology::group(&["a", "b", "c"]).hierarchical());
        // Interleaved ranks still group by host.
        let t = Topology::group(&["a", "b", "a", "b"]);
        assert_eq!((t.host(0), t.host(1)), (&[0, 2][..], &[1, 3][..]));
    }

    /// `hosts` × `k` ranks as threads, host h on 127.0.0.(11+h); returns each rank's result.
    fn on_hosts<T: Send + 'static>(
        hosts: usize,
        k: usize,
        f: impl Fn(Hierarchical) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let world = hosts * k;
        let ip = |r: usize| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11 + (r / k) as u8));
        let local: Vec<TcpListener> = (0..world).map(|r| listen(ip(r)).unwrap()).collect();
        let cross: Vec<TcpListener> = (0..world).map(|r| listen(ip(r)).unwrap()).collect();
        let addrs = |ls: &[TcpListener]| -> Vec<SocketAddr> {
            ls.iter().map(|l| l.local_addr().unwrap()).collect()
        };
        let (lp, cp) = (addrs(&local), addrs(&cross));
        let topo = Topology::group(&lp.iter().map(|a| a.ip()).collect::<Vec<_>>());
        let handles: Vec<_> = local
            .into_iter()
            .zip(cross)
            .enumerate()
            .map(|(rank, (l, c))| {
                let (lp, cp, topo, f) = (lp.clone(), cp.clone(), topo.clone(), f.clone());
                std::thread::spawn(move || {
                    let cfg = RingConfig {
                        chunk_bytes: 4096,
                        ..Default::default()
                    };
                    f(Hierarchical::connect(l, c, rank, &lp, &cp, topo, cfg).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn hierarchical_all_reduce_and_broadcast_match_a_flat_one() {
        for (hosts, k) in [(2, 2), (3, 2), (2, 3)] {
            let results = on_hosts(hosts, k, |mut h| {
                assert!(h.describe().ends_with("true)"), "{}", h.describe());
                let r = h.rank() as f32;
                let mut out = Vec::new();
                for len in [0usize, 1, 5, 1000, 70_001] {
                    let mut v: Vec<f32> = (0..len).map(|i| r * 1000.0 + i as f32).collect();
                    h.all_reduce_sum(&mut v).unwrap();
                    out.push(v);
                }
                let mut b: Vec<f32> = if h.rank() == 3 {
                    (0..9000).map(|i| i as f32).collect()
                } else {
                    vec![0.0; 9000]
                };
                h.broadcast(&mut b, 3).unwrap();
                (out, b)
            });
            let world = hosts * k;
            let ranks_sum: f32 = (0..world).map(|r| r as f32 * 1000.0).sum();
            for (sums, b) in results {
                for v in sums {
                    let want: Vec<f32> = (0..v.len())
                        .map(|i| ranks_sum + world as f32 * i as f32)
                        .collect();
                    assert_eq!(v, want, "{hosts} hosts x {k}");
                }
                assert_eq!(b, (0..9000).map(|i| i as f32).collect::<Vec<_>>());
            }
        }
    }

    /// A flat ring over two hosts of two ranks: shared memory on the links within a host,
    /// TCP on the two that cross, and both kinds in one step.
    #[test]
    fn a_flat_ring_across_hosts_shares_memory_only_within_a_host() {
        let ip = |r: usize| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11 + (r / 2) as u8));
        let listeners: Vec<TcpListener> = (0..4).map(|r| listen(ip(r)).unwrap()).collect();
        let peers: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let peers = peers.clone();
                std::thread::spawn(move || {
                    let cfg = RingConfig {
                        chunk_bytes: 8192,
                        ..Default::default()
                    };
                    let mut ring = Ring::connect(l, rank, &peers, cfg).unwrap();
                    let links = ring.shared_memory_links();
                    let mut v: Vec<f32> = (0..300_001).map(|i| (rank * 7 + i) as f32).collect();
                    ring.all_reduce_sum(&mut v).unwrap();
                    (links, v)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        // Rank 0 -> 1 and 2 -> 3 stay on their host; 1 -> 2 and 3 -> 0 cross.
        let links: Vec<_> = results.iter().map(|(l, _)| *l).collect();
        assert_eq!(
            links,
            vec![(true, false), (false, true), (true, false), (false, true)]
        );
        let want: Vec<f32> = (0..300_001).map(|i| (4 * i + 42) as f32).collect();
        for (_, v) in results {
            assert_eq!(v, want);
        }
    }

    #[test]
    fn a_compressed_hierarchical_all_reduce_is_the_same_on_every_rank_and_close() {
        let results = on_hosts(2, 2, |mut h| {
            let r = h.rank() as f32;
            let mut v: Vec<f32> = (0..50_000).map(|i| (i as f32 * 0.001 + r).sin()).collect();
            h.all_reduce_sum_as(&mut v, Wire::Bf16).unwrap();
            v
        });
        let exact: Vec<f32> = (0..50_000)
            .map(|i| (0..4).map(|r| (i as f32 * 0.001 + r as f32).sin()).sum())
            .collect();
        for v in &results {
            assert_eq!(v, &results[0], "every rank ends with the same bits");
        }
        let worst = results[0]
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        // bf16 keeps 8 bits of mantissa: sums of four values below 4 in magnitude are off by
        // a few hundredths at most, and not exact (the wire was really used).
        assert!(worst < 0.05 && worst > 0.0, "{worst}");
    }
}
