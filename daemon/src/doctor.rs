//! `ferryd doctor`: checks what CUDA jobs need on this node and says what is missing.
//! libtorch's CUDA, the GPUs, NCCL (found, linked and loaded the way CUDA ranks get it),
//! then on a GPU a one-rank NCCL all-reduce and broadcast, and a bf16 autocast matmul.
//! A node without a GPU passes. Only a check that runs and gives a wrong answer fails.

use anyhow::{Context, Result};
use ferry_cluster::collective::nccl::{self, Nccl, UniqueId};
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::gpu;

const CHILD: &str = "FERRYD_DOCTOR_CHILD";

/// Runs the checks; the exit status is 1 when one of them failed.
pub fn run(config: &Config) -> Result<i32> {
    if std::env::var_os(CHILD).is_none() {
        println!("ferryd {}", env!("CARGO_PKG_VERSION"));
        println!("libtorch (build): {}", env!("FERRY_LIBTORCH_LIB"));
        // The loader reads LD_LIBRARY_PATH at start-up, so the checks run in a child
        // process with NCCL's link directory on it, as CUDA ranks do.
        match gpu::find_nccl(config.nccl_library.as_deref()) {
            Ok(lib) => {
                println!("nccl library: {}", lib.display());
                let dir = gpu::nccl_link_dir(&config.data_dir, &lib)
                    .with_context(|| format!("cannot link {}", lib.display()))?;
                let status = std::process::Command::new(std::env::current_exe()?)
                    .arg("doctor")
                    .env(CHILD, "1")
                    .env("LD_LIBRARY_PATH", gpu::library_path_with(&dir))
                    .status()?;
                return Ok(status.code().unwrap_or(1));
            }
            Err(e) => println!("nccl library: not found: {e}"),
        }
    }
    let mut failed = false;
    match crate::train::sandbox::abi() {
        Some(abi) => println!(
            "rank sandbox: Landlock ABI {abi} available; rank_sandbox = {} (auto: CPU jobs)",
            config.rank_sandbox
        ),
        None => println!(
            "rank sandbox: no Landlock in this kernel: a job's model can read and write whatever ferryd's user can"
        ),
    }
    let nccl_loads = nccl::library_present();
    println!(
        "nccl loadable: {}",
        if nccl_loads {
            "yes"
        } else {
            "no (several CUDA ranks need it)"
        }
    );
    let device = match crate::train::load_cuda() {
        Ok(d) => d,
        Err(_) => {
            println!("cuda: no usable CUDA device");
            println!("result: ok (CPU-only node: CUDA checks skipped)");
            return Ok(0);
        }
    };
    println!("cuda: {} device(s)", tch::Cuda::device_count());
    if nccl_loads {
        match nccl_world_one(device) {
            Ok(()) => {
                println!("nccl all-reduce, broadcast and gradient buckets, world size 1, GPU 0: ok")
            }
            Err(e) => {
                failed = true;
                println!("nccl, world size 1: FAILED: {e:#}");
            }
        }
    }
    let a = Tensor::ones([64, 64], (Kind::Float, device));
    crate::train::torchscript::set_autocast(device, ferry_cluster::spec::Precision::Bf16);
    let kind = a.matmul(&a).kind();
    crate::train::torchscript::set_autocast(device, ferry_cluster::spec::Precision::Fp32);
    if kind == Kind::BFloat16 {
        println!("bf16 autocast on GPU 0: ok");
    } else {
        failed = true;
        println!("bf16 autocast on GPU 0: FAILED: a matmul came out {kind:?}");
    }
    println!("result: {}", if failed { "FAILED" } else { "ok" });
    Ok(i32::from(failed))
}

/// A one-rank communicator sums and broadcasts a device tensor to itself; then the CUDA
/// ranks' own bucket code averages real gradients.
fn nccl_world_one(device: Device) -> Result<()> {
    let id = UniqueId::new()?;
    let mut comm = Nccl::init(&id, 0, 1)?;
    let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).to_device(device);
    #[allow(unsafe_code)]
    // SAFETY: `t` is a contiguous f32 device tensor of 3 values, alive across the call;
    // the operations run on the legacy default stream, before the copy back below.
    unsafe {
        comm.all_reduce_sum(t.data_ptr(), 3, std::ptr::null_mut())?;
        comm.broadcast(t.data_ptr(), 3, 0, std::ptr::null_mut())?;
    }
    let got = Vec::<f32>::try_from(t.to_device(Device::Cpu))?;
    anyhow::ensure!(got == [1.0, 2.0, 3.0], "got {got:?}");
    drop(comm);
    nccl_gradient_buckets(device).context("gradient buckets")
}

/// The CUDA ranks' gradient path on a one-rank communicator: two buckets, weight 0.5.
fn nccl_gradient_buckets(device: Device) -> Result<()> {
    for overlap in [false, true] {
        let mode = if overlap {
            "during backward, on a side stream"
        } else {
            "after backward"
        };
        nccl_buckets_once(device, overlap).with_context(|| format!("all-reduce {mode}"))?;
    }
    Ok(())
}

fn nccl_buckets_once(device: Device, overlap: bool) -> Result<()> {
    let mut dist = crate::train::dist::Dist::nccl_alone(device)?;
    let params: Vec<(String, Tensor)> = [("a", 3i64), ("b", 5)]
        .into_iter()
        .map(|(n, k)| {
            let p = Tensor::arange(k, (tch::Kind::Float, device)).set_requires_grad(true);
            (n.to_string(), p)
        })
        .collect();
    dist.broadcast_state(params.iter())?;
    dist.plan_buckets(&params, 12, overlap, ferry_cluster::collective::Wire::F32)?;
    anyhow::ensure!(dist.bucket_count() == 2, "{} buckets", dist.bucket_count());
    for step in 0..2 {
        for (_, p) in &params {
            crate::train::torchscript::clear_grad(&mut p.shallow_clone());
        }
        dist.begin_step(0.5);
        // d/dp of sum(p^2) = 2p, times the weight 0.5: p.
        let loss = params
            .iter()
            .map(|(_, p)| p.square().sum(tch::Kind::Float))
            .reduce(|a, b| a + b)
            .expect("two parameters");
        loss.backward();
        dist.sync_grads(&params)?;
        for (name, p) in &params {
            let got = Vec::<f32>::try_from(p.grad().to_device(Device::Cpu))?;
            let want: Vec<f32> = (0..got.len()).map(|i| i as f32).collect();
            anyhow::ensure!(
                got == want,
                "step {step}: gradient of {name}: got {got:?}, want {want:?}"
            );
        }
        if overlap {
            let early = dist.overlap_report.as_ref().map(|r| r.during_backward);
            anyhow::ensure!(
                early == Some(2),
                "step {step}: {early:?} of 2 buckets went during backward"
            );
        }
    }
    Ok(())
}
