//! The deterministic distributed sampler.
//!
//! Every epoch has one global order: a Fisher-Yates shuffle seeded by (seed, epoch), or
//! the identity without shuffling. A step consumes the next `batch × world` samples of
//! that order; rank r takes its contiguous `batch`-sized part. The data cursor is
//! therefore (epoch, samples consumed in the epoch), which does not depend on the world
//! size: a job resumed with another number of ranks neither repeats nor skips samples.

/// SplitMix64: a small, well-mixed generator whose output is fixed by its seed forever
/// (unlike a library RNG whose algorithm may change between versions).
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 bits.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub(crate) fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform in 0..n (n > 0), without modulo bias.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let v = self.next();
            if v < zone {
                return v % n;
            }
        }
    }
}

/// Splits epochs of `len` samples into per-rank batches.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub len: usize,
    pub batch: usize,
    pub world: usize,
    pub seed: u64,
    pub shuffle: bool,
}

impl Sampler {
    /// The epoch's global order.
    pub fn order(&self, epoch: u32) -> Vec<u32> {
        let mut v: Vec<u32> = (0..self.len as u32).collect();
        if self.shuffle {
            let mut rng =
                SplitMix64(self.seed ^ (u64::from(epoch) + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
            for i in (1..v.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                v.swap(i, j);
            }
        }
        v
    }

    /// Samples one step consumes across all ranks.
    pub fn global_batch(&self) -> usize {
        self.batch * self.world
    }

    /// Steps in an epoch: the last one may be short.
    pub fn steps_per_epoch(&self) -> usize {
        self.len.div_ceil(self.global_batch())
    }

    /// The indices rank `rank` trains on at the step that starts at `consumed`. A short last
    /// step is split as evenly as possible, so every rank has the same number of steps.
    pub fn batch<'a>(&self, order: &'a [u32], consumed: usize, rank: usize) -> &'a [u32] {
        &order[self.range(consumed, rank)]
    }

    /// Where [`Sampler::batch`] lies in the epoch's order.
    pub fn range(&self, consumed: usize, rank: usize) -> std::ops::Range<usize> {
        let remaining = self.len.saturating_sub(consumed).min(self.global_batch());
        let (base, extra) = (remaining / self.world, remaining % self.world);
        let start = consumed + rank * base + rank.min(extra);
        start..start + base + usize::from(rank < extra)
    }

    /// How many samples a step starting at `consumed` takes in all.
    pub fn step_size(&self, consumed: usize) -> usize {
        self.len.saturating_sub(consumed).min(self.global_batch())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(len: usize, batch: usize, world: usize) -> Sampler {
        Sampler {
            len,
            batch,
            world,
            seed: 7,
            shuffle: true,
        }
    }

    #[test]
    fn an_epoch_is_a_permutation_fixed_by_seed_and_epoch() {
        let s = sampler(100, 8, 1);
        let (a, b) = (s.order(0), s.order(0));
        assert_eq!(a, b);
        assert_ne!(a, s.order(1));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        let plain = Sampler {
            shuffle: false,
            ..s
        };
        assert_eq!(plain.order(3), (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn ranks_get_disjoint_shards_covering_the_epoch_with_equal_step_counts() {
        for (len, batch, world) in [(100, 8, 1), (100, 8, 3), (10, 4, 4), (97, 5, 2)] {
            let s = sampler(len, batch, world);
            let order = s.order(2);
            let mut seen = vec![0u32; len];
            let mut consumed = 0;
            let mut steps = 0;
            while consumed < len {
                for r in 0..world {
                    for &i in s.batch(&order, consumed, r) {
                        seen[i as usize] += 1;
                    }
                }
                consumed += s.step_size(consumed);
                steps += 1;
            }
            assert_eq!(steps, s.steps_per_epoch());
            assert!(
                seen.iter().all(|&c| c == 1),
                "len {len} batch {batch} world {world}: {seen:?}"
            );
        }
    }

    #[test]
    fn the_cursor_survives_a_change_of_world_size() {
        let two = sampler(64, 4, 2);
        let order = two.order(5);
        // Two steps with 2 ranks consume 16 samples; continue with 1 rank, then 4.
        let mut consumed = 0;
        let mut seen = Vec::new();
        for _ in 0..2 {
            for r in 0..2 {
                seen.extend_from_slice(two.batch(&order, consumed, r));
            }
            consumed += two.step_size(consumed);
        }
        let one = Sampler {
            world: 1,
            ..two.clone()
        };
        seen.extend_from_slice(one.batch(&order, consumed, 0));
        consumed += one.step_size(consumed);
        let four = Sampler {
            world: 4,
            ..two.clone()
        };
        while consumed < 64 {
            for r in 0..4 {
                seen.extend_from_slice(four.batch(&order, consumed, r));
            }
            consumed += four.step_size(consumed);
        }
        assert_eq!(seen, order, "same samples, same order, none twice");
    }
}
