//! All-reduce bus bandwidth of ferry's TCP ring, as separate processes on loopback.
//!
//! `allreduce_bench WORLD SIZES_BYTES ITERS` starts WORLD copies of itself (one per rank),
//! which form a ring and time ITERS all-reduces of each size (fp32) after a warm-up.
//! Rank 0 prints `size_bytes seconds_per_op busbw_GBps` per size, with
//! busbw = bytes / time × 2(n-1)/n, as nccl-tests and `bench/allreduce_gloo.py` report it.
//!
//! The environment picks the collective: `FERRY_RING_SHM=0` (TCP only), `FERRY_BENCH_HOSTS=H`
//! (the ranks on H loopback "hosts", 127.0.0.11 and up), `FERRY_BENCH_ALGO=hier` (the
//! hierarchical all-reduce over those hosts) and `FERRY_BENCH_WIRE=bf16|fp16` (compressed).
//!
//! `allreduce_bench limits` measures what bounds any all-reduce on this machine, in the same
//! run: one TCP stream over loopback (a sender thread and a receiver thread, 4 MB writes)
//! and a single-threaded memcpy of 64 MB, each the best of three. It prints
//! `loopback_GBps memcpy_GBps`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::time::Instant;

use ferry_cluster::collective::hier::{Hierarchical, Topology};
use ferry_cluster::collective::ring::{Ring, RingConfig};
use ferry_cluster::collective::{Collective, Wire};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 6 && args[1] == "rank" {
        return rank(&args[2], &args[3], &args[4], &args[5]);
    }
    if args.len() == 2 && args[1] == "limits" {
        let best = |f: fn() -> f64| (0..3).map(|_| f()).fold(0.0, f64::max);
        println!("{:.4} {:.4}", best(loopback_stream), best(memcpy));
        return;
    }
    let [_, world, sizes, iters] = args.as_slice() else {
        eprintln!("usage: allreduce_bench WORLD SIZES_BYTES(comma-separated) ITERS");
        std::process::exit(2);
    };
    let n: usize = world.parse().expect("WORLD is a number");
    // Free ports (two per rank), released just before the ranks bind them.
    let ports: Vec<String> = (0..2 * n)
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

/// GB/s of one TCP stream over loopback: 1 GiB in 4 MB writes, read into a 4 MB buffer.
fn loopback_stream() -> f64 {
    use std::io::{Read, Write};
    const TOTAL: usize = 1 << 30;
    const BLOCK: usize = 4 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sender = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        let block = vec![1u8; BLOCK];
        for _ in 0..TOTAL / BLOCK {
            s.write_all(&block).expect("send");
        }
    });
    let (mut r, _) = listener.accept().expect("accept");
    let mut buf = vec![0u8; BLOCK];
    let t0 = Instant::now();
    let mut got = 0;
    while got < TOTAL {
        let n = r.read(&mut buf).expect("recv");
        assert!(n > 0, "the sender closed early");
        got += n;
    }
    let dt = t0.elapsed().as_secs_f64();
    sender.join().expect("sender");
    TOTAL as f64 / dt / 1e9
}

/// GB/s of a single-threaded copy between two 64 MB buffers (bytes copied per second).
fn memcpy() -> f64 {
    const BYTES: usize = 64 << 20;
    let src = vec![1u8; BYTES];
    let mut dst = vec![0u8; BYTES];
    dst.copy_from_slice(&src); // fault the pages in
    let t0 = Instant::now();
    for _ in 0..4 {
        dst.copy_from_slice(std::hint::black_box(&src));
    }
    let dt = t0.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    4.0 * BYTES as f64 / dt / 1e9
}

/// This rank's collective, as the environment asks: `FERRY_BENCH_HOSTS=H` puts the ranks on
/// H "hosts" (127.0.0.11, .12, ...; shared memory within a host, TCP between them) and
/// `FERRY_BENCH_ALGO=hier` runs the hierarchical all-reduce there instead of the flat ring.
fn collective(rank: usize, ports: &[u16]) -> Box<dyn Collective> {
    let env = |k: &str| std::env::var(k).ok();
    let world = ports.len() / 2;
    let hosts: usize = env("FERRY_BENCH_HOSTS").map_or(1, |h| h.parse().expect("hosts"));
    let ip = |r: usize| match hosts {
        1 => IpAddr::V4(Ipv4Addr::LOCALHOST),
        _ => IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11 + (r * hosts / world) as u8)),
    };
    let addrs = |off: usize| -> Vec<SocketAddr> {
        (0..world)
            .map(|r| SocketAddr::new(ip(r), ports[off + r]))
            .collect()
    };
    let (local, cross) = (addrs(0), addrs(world));
    // FERRY_RING_SHM=0 keeps bulk data on TCP, as between hosts.
    let cfg = RingConfig {
        shared_memory: env("FERRY_RING_SHM").is_none_or(|v| v != "0"),
        socket_buffer: env("FERRY_RING_SOCKBUF").map_or(0, |v| v.parse().expect("bytes")),
        chunk_bytes: env("FERRY_RING_CHUNK").map_or(1 << 20, |v| v.parse().expect("bytes")),
        ..RingConfig::default()
    };
    let listener = TcpListener::bind(local[rank]).expect("bind my port");
    if env("FERRY_BENCH_ALGO").as_deref() == Some("hier") {
        let topo = Topology::group(&local.iter().map(|a| a.ip()).collect::<Vec<_>>());
        let cross_listener = TcpListener::bind(cross[rank]).expect("bind my port");
        return Box::new(
            Hierarchical::connect(listener, cross_listener, rank, &local, &cross, topo, cfg)
                .expect("hierarchical"),
        );
    }
    Box::new(Ring::connect(listener, rank, &local, cfg).expect("ring"))
}

fn rank(rank: &str, ports: &str, sizes: &str, iters: &str) {
    let rank: usize = rank.parse().expect("rank");
    let ports: Vec<u16> = ports.split(',').map(|p| p.parse().expect("port")).collect();
    let mut ring = collective(rank, &ports);
    // FERRY_BENCH_WIRE=bf16|fp16 compresses the values on TCP links.
    let wire = match std::env::var("FERRY_BENCH_WIRE").as_deref() {
        Ok("bf16") => Wire::Bf16,
        Ok("fp16") => Wire::F16,
        _ => Wire::F32,
    };
    let iters: usize = iters.parse().expect("iters");
    let n = ring.world_size() as f64;
    for size in sizes.split(',').map(|s| s.parse::<usize>().expect("size")) {
        let mut buf = vec![1.0f32; size / 4];
        for _ in 0..2 {
            ring.all_reduce_sum_as(&mut buf, wire).expect("warm-up");
        }
        // At least ITERS operations and about half a second, the same count on every rank.
        let t0 = Instant::now();
        for _ in 0..3 {
            ring.all_reduce_sum_as(&mut buf, wire).expect("calibration");
        }
        let each = t0.elapsed().as_secs_f64() / 3.0;
        let mut count = [(0.5 / each).ceil().max(iters as f64) as f32];
        ring.all_reduce_sum(&mut count).expect("count");
        let iters = (f64::from(count[0]) / n).ceil() as usize;
        ring.barrier().expect("barrier");
        let t0 = Instant::now();
        for _ in 0..iters {
            ring.all_reduce_sum_as(&mut buf, wire).expect("all-reduce");
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
