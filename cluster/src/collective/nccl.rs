//! NCCL for CUDA ranks, through cudarc's bindings with dynamic loading: the binary builds
//! and runs on machines without CUDA, and finds out at run time whether NCCL is there.
//!
//! cudarc looks for `libnccl.so` (and a few versioned names) but not `libnccl.so.2`, the
//! only name the PyTorch wheel ships. The daemon therefore finds `libnccl.so.2` itself and
//! puts a directory with a `libnccl.so` link to it on each CUDA rank's `LD_LIBRARY_PATH`
//! (see `ferryd`'s `gpu` module). [`library_present`] checks before any call, because
//! cudarc panics when a symbol's library is missing.
//!
//! Buffers are CUDA device pointers and operations are enqueued on a CUDA stream: the
//! caller (the training runtime, which owns the tensors) passes both. This file holds no
//! libtorch.

#![allow(unsafe_code)]

use std::ffi::{c_void, CStr};

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::sys;

use super::CollectiveError;

/// Whether a loadable NCCL library is on the library path.
pub fn library_present() -> bool {
    // SAFETY: only tries to dlopen candidate names; nothing is called.
    unsafe { sys::is_culib_present() }
}

fn check(rank: usize, op: &'static str, r: sys::ncclResult_t) -> Result<(), CollectiveError> {
    if r == sys::ncclResult_t::ncclSuccess {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string.
    let msg = unsafe { CStr::from_ptr(sys::ncclGetErrorString(r)) }
        .to_string_lossy()
        .into_owned();
    Err(CollectiveError::Setup {
        rank,
        reason: format!("NCCL {op} failed: {msg} ({r:?})"),
    })
}

fn missing(rank: usize) -> CollectiveError {
    CollectiveError::Setup {
        rank,
        reason: "the NCCL library (libnccl.so) is not on the library path; install the torch wheel's nvidia-nccl package or set nccl_library in ferryd's config".into(),
    }
}

/// The id every rank of a communicator is created with; rank 0 makes it and the
/// rendezvous carries it to the others (as hex text).
#[derive(Clone)]
pub struct UniqueId(sys::ncclUniqueId);

impl UniqueId {
    /// A fresh id (rank 0).
    pub fn new() -> Result<UniqueId, CollectiveError> {
        if !library_present() {
            return Err(missing(0));
        }
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        // SAFETY: writes the 128-byte id into `id`.
        check(0, "ncclGetUniqueId", unsafe {
            sys::ncclGetUniqueId(&mut id)
        })?;
        Ok(UniqueId(id))
    }

    /// The id as 256 hex digits.
    pub fn to_hex(&self) -> String {
        self.0
            .internal
            .iter()
            .map(|&b| format!("{:02x}", b as u8))
            .collect()
    }

    /// Parses [`UniqueId::to_hex`]'s output.
    pub fn from_hex(s: &str) -> Option<UniqueId> {
        if s.len() != 256 || !s.is_ascii() {
            return None;
        }
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (i, b) in id.internal.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()? as _;
        }
        Some(UniqueId(id))
    }
}

/// One rank's NCCL communicator.
pub struct Nccl {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
}

// SAFETY: a communicator may be used from any thread, one call at a time (&mut self).
unsafe impl Send for Nccl {}

impl Nccl {
    /// Joins the communicator `id` as `rank` of `world`, on the CUDA device that is current
    /// on this thread. Blocks until every rank has joined.
    pub fn init(id: &UniqueId, rank: usize, world: usize) -> Result<Nccl, CollectiveError> {
        if !library_present() {
            return Err(missing(rank));
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; the id is copied by value.
        check(rank, "ncclCommInitRank", unsafe {
            sys::ncclCommInitRank(&mut comm, world as i32, id.0, rank as i32)
        })?;
        Ok(Nccl { comm, rank, world })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Sums `count` f32 values at device address `buf` across ranks, in place, enqueued on
    /// `stream` (null: the legacy default stream, which libtorch uses unless told otherwise).
    ///
    /// # Safety
    /// `buf` must point to `count` f32 values in device memory of this rank's GPU, valid
    /// until the stream has run the operation.
    pub unsafe fn all_reduce_sum(
        &mut self,
        buf: *mut c_void,
        count: usize,
        stream: *mut c_void,
    ) -> Result<(), CollectiveError> {
        self.all_reduce_sum_as(buf, count, super::Wire::F32, stream)
    }

    /// [`Nccl::all_reduce_sum`] over `count` values of `wire`'s type (f32, bf16 or fp16): a
    /// compressed all-reduce hands NCCL the gradients already cast to 16 bits, and NCCL sums
    /// them in that type, as DDP's bf16/fp16 compression hooks do.
    ///
    /// # Safety
    /// As for [`Nccl::all_reduce_sum`], with `count` values of `wire`'s type at `buf`.
    pub unsafe fn all_reduce_sum_as(
        &mut self,
        buf: *mut c_void,
        count: usize,
        wire: super::Wire,
        stream: *mut c_void,
    ) -> Result<(), CollectiveError> {
        let kind = match wire {
            super::Wire::F32 => sys::ncclDataType_t::ncclFloat32,
            super::Wire::Bf16 => sys::ncclDataType_t::ncclBfloat16,
            super::Wire::F16 => sys::ncclDataType_t::ncclFloat16,
        };
        check(
            self.rank,
            "ncclAllReduce",
            sys::ncclAllReduce(
                buf,
                buf,
                count,
                kind,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                stream as sys::cudaStream_t,
            ),
        )
    }

    /// Copies `root`'s `count` f32 values at `buf` to every rank, in place.
    ///
    /// # Safety
    /// As for [`Nccl::all_reduce_sum`].
    pub unsafe fn broadcast(
        &mut self,
        buf: *mut c_void,
        count: usize,
        root: usize,
        stream: *mut c_void,
    ) -> Result<(), CollectiveError> {
        check(
            self.rank,
            "ncclBroadcast",
            sys::ncclBroadcast(
                buf,
                buf,
                count,
                sys::ncclDataType_t::ncclFloat32,
                root as i32,
                self.comm,
                stream as sys::cudaStream_t,
            ),
        )
    }
}

/// A CUDA stream beside libtorch's (the legacy default stream), for NCCL to run on while
/// libtorch computes, with the two orderings between them. Both streams belong to the
/// device's primary context, which libtorch uses too.
pub struct SideStream {
    side: Arc<CudaStream>,
    main: Arc<CudaStream>,
    rank: usize,
}

impl SideStream {
    /// A non-blocking stream on GPU `ordinal` (as this process sees it).
    pub fn new(ordinal: usize, rank: usize) -> Result<SideStream, CollectiveError> {
        // SAFETY: only probes whether libcuda can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CollectiveError::Failed {
                rank,
                reason: "the CUDA driver library (libcuda.so) cannot be loaded".into(),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver(rank, "opening the GPU", e))?;
        let side = ctx
            .new_stream()
            .map_err(|e| driver(rank, "creating a stream", e))?;
        Ok(SideStream {
            main: ctx.default_stream(),
            side,
            rank,
        })
    }

    /// The side stream, for NCCL calls.
    pub fn raw(&self) -> *mut c_void {
        self.side.cu_stream() as *mut c_void
    }

    /// Work queued on the side stream from now on waits for all work queued on libtorch's
    /// stream so far.
    pub fn side_after_main(&self) -> Result<(), CollectiveError> {
        self.side
            .join(&self.main)
            .map_err(|e| driver(self.rank, "ordering the streams", e))
    }

    /// Work queued on libtorch's stream from now on waits for all work queued on the side
    /// stream so far.
    pub fn main_after_side(&self) -> Result<(), CollectiveError> {
        self.main
            .join(&self.side)
            .map_err(|e| driver(self.rank, "ordering the streams", e))
    }
}

fn driver(rank: usize, what: &str, e: cudarc::driver::DriverError) -> CollectiveError {
    CollectiveError::Failed {
        rank,
        reason: format!("CUDA driver error while {what}: {e:?}"),
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by ncclCommInitRank and is destroyed once.
        unsafe {
            let _ = sys::ncclCommDestroy(self.comm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_ids_round_trip_as_hex() {
        let mut raw = sys::ncclUniqueId { internal: [0; 128] };
        for (i, b) in raw.internal.iter_mut().enumerate() {
            *b = (i * 7) as u8 as _;
        }
        let id = UniqueId(raw);
        let hex = id.to_hex();
        assert_eq!(hex.len(), 256);
        let back = UniqueId::from_hex(&hex).unwrap();
        assert_eq!(back.0.internal, id.0.internal);
        assert!(UniqueId::from_hex("zz").is_none());
        assert!(UniqueId::from_hex(&"g".repeat(256)).is_none());
    }
}
