//! The input pipeline: decode threads that prepare a rank's next batches while it trains.
//!
//! A [`Loader`] is given the batches a rank will take, in order (its shard of the epoch:
//! the sampler says which samples those are, so nothing else is read). Thread `t` of `T`
//! decodes batches `t, t + T, t + 2T, ...` into a queue of `depth` ready batches, and the
//! rank takes them round-robin, in order. At most `T × (depth + 1)` batches exist at once,
//! whatever the data set's size. Dropping the loader stops its threads after the batch
//! each is decoding.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use anyhow::{anyhow, Result};

use super::data::{Batch, Dataset};
use super::transform::View;

/// One batch to prepare: its samples and their view.
#[derive(Debug, Clone)]
pub struct Planned {
    pub indices: Vec<u32>,
    pub view: View,
}

/// Batches prepared ahead by a pool of threads.
pub struct Loader {
    queues: Vec<Receiver<Result<Batch>>>,
    next: usize,
    total: usize,
}

impl Loader {
    /// Starts `threads` decode threads over `plan`, each `depth` batches ahead.
    pub fn start(data: Arc<Dataset>, plan: Vec<Planned>, threads: usize, depth: usize) -> Loader {
        let threads = threads.clamp(1, plan.len().max(1));
        let plan = Arc::new(plan);
        let total = plan.len();
        let queues = (0..threads)
            .map(|t| {
                let (tx, rx) = sync_channel(depth.max(1));
                let (data, plan) = (data.clone(), plan.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("decode-{t}"))
                    .spawn(move || {
                        for p in plan.iter().skip(t).step_by(threads) {
                            let batch = data.batch(&p.indices, p.view);
                            let failed = batch.is_err();
                            // The rank has gone on (or stopped): nothing more is wanted.
                            if tx.send(batch).is_err() || failed {
                                return;
                            }
                        }
                    });
                if let Err(e) = spawned {
                    let (tx, rx) = sync_channel(1);
                    let _ = tx.send(Err(anyhow!("cannot start a decode thread: {e}")));
                    return rx;
                }
                rx
            })
            .collect();
        Loader {
            queues,
            next: 0,
            total,
        }
    }

    /// The next batch in plan order; None when the plan is done.
    pub fn next_batch(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.total {
            return None;
        }
        let q = &self.queues[self.next % self.queues.len()];
        self.next += 1;
        Some(
            q.recv()
                .unwrap_or_else(|_| Err(anyhow!("a decode thread ended before its batch"))),
        )
    }
}

/// The decode threads a rank uses: `data.decode_threads`, or the cores it was given.
pub fn decode_threads(configured: u32, rank_threads: u32) -> usize {
    match configured {
        0 => rank_threads.max(1) as usize,
        n => n as usize,
    }
}

/// Decodes one batch with up to `threads` threads at once (the teacher's requests, which
/// come one at a time): the samples are split among them, and put back in order.
pub fn batch_now(data: &Dataset, indices: &[u32], view: View, threads: usize) -> Result<Batch> {
    let threads = threads.clamp(1, indices.len().max(1));
    if threads == 1 {
        return data.batch(indices, view);
    }
    let chunk = indices.len().div_ceil(threads);
    let parts: Vec<Result<Batch>> = std::thread::scope(|s| {
        let handles: Vec<_> = indices
            .chunks(chunk)
            .map(|c| s.spawn(move || data.batch(c, view)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a decode thread panicked")))
            })
            .collect()
    });
    let mut out: Option<Batch> = None;
    let mut images = Vec::new();
    for (k, part) in parts.into_iter().enumerate() {
        let mut b = part?;
        images.push(std::mem::replace(&mut b.images, tch::Tensor::new()));
        let shift = k * chunk;
        match &mut out {
            None => out = Some(b),
            Some(o) => {
                o.labels.extend(b.labels);
                o.draws.extend(b.draws);
                o.kept.extend(b.kept.into_iter().map(|p| p + shift));
                o.skipped.extend(b.skipped);
            }
        }
    }
    let mut out = out.ok_or_else(|| anyhow!("an empty batch"))?;
    out.images = super::data::join_pixels(&images, false);
    Ok(out)
}

/// `ferryd bench-input`: images per second through the pipeline (decode, crop, resize,
/// flip, jitter, normalise, float on the CPU), per thread count, as JSON lines.
pub fn bench(
    data: &ferry_cluster::spec::DataSpec,
    batch: usize,
    batches: usize,
    threads: &[usize],
) -> Result<()> {
    // The batch's float work runs on this thread alone, as a DataLoader's main process.
    tch::set_num_threads(1);
    let ds = Arc::new(Dataset::load_training(
        data,
        0,
        &super::data::Indexing::cached(None),
    )?);
    let sampler = super::sampler::Sampler {
        len: ds.len(),
        batch,
        world: 1,
        seed: 0,
        shuffle: true,
    };
    for (round, &t) in threads.iter().enumerate() {
        let order = sampler.order(round as u32);
        let plan: Vec<Planned> = (0..sampler.len)
            .step_by(batch)
            .take(batches)
            .map(|c| Planned {
                indices: sampler.batch(&order, c, 0).to_vec(),
                view: View::Train {
                    epoch: round as u32,
                },
            })
            .collect();
        let start = std::time::Instant::now();
        let mut loader = Loader::start(ds.clone(), plan, t, data.prefetch_batches as usize);
        let (mut images, mut first) = (0usize, None);
        while let Some(b) = loader.next_batch() {
            let (x, _) = b?.to_device(&ds.transform, tch::Device::Cpu);
            images += x.size()[0] as usize;
            first.get_or_insert(start.elapsed().as_secs_f64());
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "threads": t,
                "images": images,
                "seconds": secs,
                "images_per_sec": images as f64 / secs.max(1e-9),
                "first_batch_s": first,
                "max_rss_mb": max_rss_mb(),
            })
        );
    }
    Ok(())
}

/// This process's peak resident set, in MB.
pub fn max_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
