//! All-reduce bus bandwidth of ferry's TCP ring, as separate processes on loopback.
//!
//! `allreduce_bench WORLD SIZES_BYTES ITERS` starts WORLD copies of itself (one per rank),
//! which form a ring and time ITERS all-reduces of each size (fp32) after a warm-up.
//! Rank 0 prints `size_bytes seconds_per_op busbw_GBps` per size, with
//! busbw = bytes / time × 2(n-1)/n, as nccl-tests and `bench/allreduce_gloo.py` report it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::time::Instant;

use ferry_cluster::collective::ring::{Ring, RingConfig};
use ferry_cluster::collective::Collective;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 6 && args[1] == "rank" {
        return rank(&args[2], &args[3], &args[4], &args[5]);
    }
    let [_, world, sizes, iters] = args.as_slice() else {
        eprintln!("usage: allreduce_bench WORLD SIZES_BYTES(comma-separated) ITERS");
        std::process::exit(2);
    };
    let n: usize = world.parse().expect("WORLD is a number");
    // Free ports, released just before the ranks bind them.
    let ports: Vec<String> = (0..n)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0")
                .expect("bind")
                .local_addr()
                .expect("addr")
                .port()
                .to_string()
        })
        .collect();
    let ports = ports.join(",");
    let children: Vec<_> = (0..n)
        .map(|r| {
            Command::new(std::env::current_exe().expect("exe"))
                .args(["rank", &r.to_string(), &ports, sizes, iters])
                .spawn()
                .expect("spawn rank")
        })
        .collect();
    for mut c in children {
        assert!(c.wait().expect("wait").success(), "a rank failed");
    }
}

fn rank(rank: &str, ports: &str, sizes: &str, iters: &str) {
    let rank: usize = rank.parse().expect("rank");
    let peers: Vec<SocketAddr> = ports
        .split(',')
        .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p.parse().expect("port")))
        .collect();
    let listener = TcpListener::bind(peers[rank]).expect("bind my port");
    // FERRY_RING_SHM=0 keeps bulk data on TCP, as between hosts.
    let cfg = RingConfig {
        shared_memory: std::env::var("FERRY_RING_SHM").map_or(true, |v| v != "0"),
        ..RingConfig::default()
    };
    let mut ring = Ring::connect(listener, rank, &peers, cfg).expect("ring");
    let iters: usize = iters.parse().expect("iters");
    let n = peers.len() as f64;
    for size in sizes.split(',').map(|s| s.parse::<usize>().expect("size")) {
        let mut buf = vec![1.0f32; size / 4];
        for _ in 0..2 {
            ring.all_reduce_sum(&mut buf).expect("warm-up");
        }
        ring.barrier().expect("barrier");
        let t0 = Instant::now();
        for _ in 0..iters {
            ring.all_reduce_sum(&mut buf).expect("all-reduce");
        }
        let dt = t0.elapsed().as_secs_f64() / iters as f64;
        if rank == 0 {
            println!(
                "{size} {dt:.6e} {:.4}",
                size as f64 / dt * 2.0 * (n - 1.0) / n / 1e9
            );
        }
    }
}
