//! Collective operations between the ranks of a job: the interface the training runtime
//! uses, with one algorithm per file. [`ring::Ring`] is the TCP ring for CPU ranks (any world
//! size, persistent connections, chunked and pipelined). [`nccl`] (feature `nccl`, which the
//! daemon enables) wraps NCCL for CUDA ranks: its buffers are device memory, so it takes
//! device pointers and a stream rather than implementing this trait over host slices.
//! [`background::Background`] runs any of these collectives on a thread of its own, so that
//! training overlaps gradient communication with backward.

pub mod background;
pub mod hier;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod ring;
pub mod shm;
mod wire;

pub use wire::Wire;

use std::time::Duration;

/// What can go wrong between ranks. Every message names this rank (and the peer, where one
/// is to blame).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {rank}: lost the connection to rank {peer} ({addr}) during {op}: {reason}; rank {peer} probably died or was killed")]
    PeerLost {
        rank: usize,
        peer: usize,
        addr: String,
        op: &'static str,
        reason: String,
    },
    #[error("rank {rank}: rank {peer} ({addr}) sent nothing for {timeout:?} during {op}; it is stalled (raise collective_timeout if its steps are that slow)")]
    Timeout {
        rank: usize,
        peer: usize,
        addr: String,
        op: &'static str,
        timeout: Duration,
    },
    #[error("rank {rank}: cannot form the ring: {reason}")]
    Setup { rank: usize, reason: String },
    #[error("rank {rank}: {reason}")]
    Failed { rank: usize, reason: String },
    #[error("rank {rank}: {op} on {got} values, but the root/other ranks use {want}")]
    Mismatch {
        rank: usize,
        op: &'static str,
        got: usize,
        want: usize,
    },
}

/// All-reduce, broadcast and barrier over `f32` buffers, in the same order on every rank.
pub trait Collective: Send {
    /// This rank, 0-based.
    fn rank(&self) -> usize;
    /// How many ranks take part.
    fn world_size(&self) -> usize;
    /// Element-wise sum across ranks, in place; every rank ends with the same values.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_sum_as(data, Wire::F32)
    }
    /// [`Collective::all_reduce_sum`] with the values on `wire` between hosts.
    fn all_reduce_sum_as(&mut self, data: &mut [f32], wire: Wire) -> Result<(), CollectiveError>;
    /// Element-wise mean across ranks, in place.
    fn all_reduce_avg(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_sum(data)?;
        let n = self.world_size() as f32;
        data.iter_mut().for_each(|v| *v /= n);
        Ok(())
    }
    /// Copies `root`'s buffer into every rank's.
    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), CollectiveError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.all_reduce_sum(&mut [0.0])
    }
}
