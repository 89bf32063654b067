//! Gradient buckets: flattening a bucket's weighted gradients into one buffer and copying
//! the sums back ([`gather`], [`scatter`]), and overlapping each bucket's all-reduce with
//! the rest of backward ([`Overlap`]), on the ring (CPU ranks) and on NCCL (CUDA ranks).
//!
//! A hook on every trainable parameter (PyTorch's post-accumulate-grad hook, set through the
//! shim) reports when backward has written that parameter's gradient. Once every gradient of
//! a bucket is in, and every earlier bucket has been handed over, the bucket's gradients are
//! copied, weighted, into its flat buffer, and the bucket's all-reduce starts while backward
//! goes on with earlier layers: on the ring, the buffer goes to the communication thread
//! ([`Background`]); on NCCL, the all-reduce is queued on a side stream that waits for the
//! copy ([`SideStream`]). Buckets are handed over in bucket order on every rank, whatever
//! order the hooks fire in, so every rank's collective sees the same sequence of operations.
//! After backward, [`finish`] hands over what is left (a bucket holding a parameter that got
//! no gradient this step goes only then), waits for every bucket, and copies the sums back
//! into the gradients. Without hooks (`train.overlap_grad_sync: never`) every bucket is
//! handed over in `finish`, through the same buffers.
//!
//! [`finish`]: Overlap::finish
#![allow(unsafe_code)] // the hook's FFI, and flat buffers seen as tensors while they are filled

use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{anyhow, bail, Result};
use ferry_cluster::collective::background::{panic_message, Background, Submitter};
use ferry_cluster::collective::nccl::{Nccl, SideStream};
use ferry_cluster::collective::Wire;
use tch::{Device, Kind, Tensor};

type GradReadyCb = extern "C" fn(*mut c_void, i64, *mut torch_sys::C_tensor);
type ReleaseCb = extern "C" fn(*mut c_void);

extern "C" {
    fn ferry_on_grad_ready(
        t: *mut torch_sys::C_tensor,
        data: *mut c_void,
        index: i64,
        cb: GradReadyCb,
        release: ReleaseCb,
        err: *mut *mut c_char,
    ) -> c_int;
}

/// How many values a bucket's flat buffer holds for parameters of `sizes` values: theirs,
/// then one flag per parameter.
pub fn bucket_len(sizes: impl Iterator<Item = i64>) -> i64 {
    sizes.fold(0, |len, n| len + n + 1)
}

/// Writes each gradient times `weight` (zeros where a parameter has none) into consecutive
/// parts of the flat f32 buffer `flat`, then one flag per parameter: 1 where it has a
/// gradient. Summed across ranks, a flag counts the ranks that had one. `grads` gives each
/// gradient with its parameter's size.
pub fn gather(flat: &Tensor, grads: &[(Option<&Tensor>, i64)], weight: f64) -> Result<()> {
    let mut off = 0i64;
    let mut defined = Vec::with_capacity(grads.len());
    for (g, n) in grads {
        let mut dst = flat.f_narrow(0, off, *n)?;
        let g = g.filter(|g| g.defined());
        match g {
            Some(g) => drop(g.f_reshape([-1])?.f_mul_scalar_out(&dst, weight)?),
            None => drop(dst.f_zero_()?),
        }
        defined.push(g.is_some());
        off += n;
    }
    // The flags are written in place (one fill in the usual case that every parameter has a
    // gradient): on a GPU, a copy from host memory would wait for the device.
    let mut flags = flat.f_narrow(0, off, grads.len() as i64)?;
    if defined.iter().all(|&d| d) {
        drop(flags.f_fill_(1.0)?);
    } else {
        drop(flags.f_zero_()?);
        for (k, _) in defined.iter().enumerate().filter(|(_, &d)| d) {
            drop(flags.f_narrow(0, k as i64, 1)?.f_fill_(1.0)?);
        }
    }
    Ok(())
}

/// The inverse of [`gather`] (without the weight): copies consecutive parts of `flat` into
/// the parameters' gradients. A parameter without a gradient here gets one if another rank
/// had one (as DistributedDataParallel does), so every rank applies the same update; one that
/// no rank had a gradient for keeps none.
pub fn scatter(flat: &Tensor, params: &[&Tensor]) -> Result<()> {
    let mut grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
    let total: i64 = params.iter().map(|p| p.numel() as i64).sum();
    // Flags are read back only when needed: on a device, reading them waits for the sum.
    let flags = if grads.iter().all(Tensor::defined) {
        Vec::new()
    } else {
        let f = flat.f_narrow(0, total, params.len() as i64)?;
        Vec::<f32>::try_from(f.f_to_device(Device::Cpu)?)?
    };
    let mut off = 0i64;
    for (k, (p, g)) in params.iter().zip(&mut grads).enumerate() {
        let n = p.numel() as i64;
        let src = flat.f_narrow(0, off, n)?.f_view(p.size().as_slice())?;
        if g.defined() {
            g.f_copy_(&src)?;
        } else if flags[k] > 0.5 {
            let mut fresh = p.f_zeros_like()?;
            fresh.f_copy_(&src)?;
            super::torchscript::set_grad(p, &fresh);
        }
        off += n;
    }
    Ok(())
}

/// A flat buffer seen as a 1-d f32 CPU tensor.
///
/// # Safety
/// The tensor borrows `buf`'s memory: drop it before `buf` is moved elsewhere, resized or
/// freed.
unsafe fn view(buf: &mut [f32]) -> Result<Tensor> {
    Ok(Tensor::f_from_blob(
        buf.as_mut_ptr() as *const u8,
        &[buf.len() as i64],
        &[1],
        Kind::Float,
        Device::Cpu,
    )?)
}

/// One step's progress, shared with the hooks.
struct State {
    /// Parameter indices per bucket, in hand-over order.
    buckets: Vec<Vec<usize>>,
    /// Each parameter's bucket, and its number of values.
    bucket_of: Vec<usize>,
    numels: Vec<i64>,
    /// Per bucket: hooked parameters whose gradient has not arrived this step, and how many
    /// it has in all.
    missing: Vec<usize>,
    expected: Vec<usize>,
    /// Per parameter: whether it has a hook.
    hooked: Vec<bool>,
    /// Per parameter: its gradient, once backward has reported it.
    grads: Vec<Option<Tensor>>,
    /// Where buckets go.
    launcher: Box<dyn Launcher>,
    /// The first bucket not handed over yet.
    next: usize,
    /// This rank's share of the global batch, by which its gradients are weighed.
    weight: f64,
    /// Whether a step is in progress (hooks outside one are ignored).
    armed: bool,
    /// The first failure inside a hook, reported by `finish`.
    error: Option<String>,
}

impl State {
    /// Hands over every complete bucket that is next in order.
    fn hand_over_ready(&mut self) -> Result<()> {
        while self.next < self.buckets.len() && self.missing[self.next] == 0 {
            self.hand_over(self.next)?;
            self.next += 1;
        }
        Ok(())
    }

    /// Starts bucket `b`'s all-reduce.
    fn hand_over(&mut self, b: usize) -> Result<()> {
        let grads: Vec<(Option<&Tensor>, i64)> = self.buckets[b]
            .iter()
            .map(|&i| (self.grads[i].as_ref(), self.numels[i]))
            .collect();
        self.launcher.launch(b, &grads, self.weight)
    }
}

/// Where a bucket goes once its gradients are in.
trait Launcher: Send {
    /// Gathers bucket `b`'s gradients (times `weight`) into its buffer and starts its
    /// all-reduce. Called once per bucket and step, in bucket order.
    fn launch(&mut self, b: usize, grads: &[(Option<&Tensor>, i64)], weight: f64) -> Result<()>;
    /// Waits for bucket `b`'s sum and scatters it into the gradients of `params`. Called in
    /// bucket order, after every bucket of the step was launched.
    fn land(&mut self, b: usize, params: &[&Tensor]) -> Result<()>;
    /// After a step, also one that failed: nothing of it may still touch the buffers when
    /// the next step writes them.
    fn reset(&mut self);
}

/// CPU ranks: host buffers, all-reduced on the ring's communication thread.
struct RingLauncher {
    /// Per bucket: its flat buffer, while not with the communication thread.
    buffers: Vec<Option<Vec<f32>>>,
    /// Per bucket: the ticket of its all-reduce this step.
    tickets: Vec<Option<u64>>,
    submit: Submitter,
    comm: Arc<Mutex<Background>>,
    /// How gradients travel between hosts.
    wire: Wire,
}

impl Launcher for RingLauncher {
    fn launch(&mut self, b: usize, grads: &[(Option<&Tensor>, i64)], weight: f64) -> Result<()> {
        let mut buf = self.buffers[b]
            .take()
            .ok_or_else(|| anyhow!("bucket {b} handed over twice in one step"))?;
        // SAFETY: `flat` is dropped (at the end of the closure) before `buf` moves.
        let filled = (|| gather(&unsafe { view(&mut buf) }?, grads, weight))();
        if let Err(e) = filled {
            self.buffers[b] = Some(buf);
            return Err(e);
        }
        self.tickets[b] = Some(self.submit.all_reduce_sum_as(buf, self.wire));
        Ok(())
    }

    fn land(&mut self, b: usize, params: &[&Tensor]) -> Result<()> {
        let ticket = self.tickets[b]
            .take()
            .ok_or_else(|| anyhow!("bucket {b} was never handed over"))?;
        let mut buf = lock(&self.comm).wait(ticket)?;
        // SAFETY: `flat` is dropped (at the end of the closure) before `buf` moves.
        let copied = (|| scatter(&unsafe { view(&mut buf) }?, params))();
        self.buffers[b] = Some(buf);
        copied
    }

    fn reset(&mut self) {
        // A buffer still with the communication thread stays there: the next launch of its
        // bucket fails ("handed over twice") rather than race with it.
        self.tickets.iter_mut().for_each(|t| *t = None);
    }
}

/// CUDA ranks: device buffers, all-reduced by NCCL on a side stream while libtorch's stream
/// computes (or, without a side stream, on libtorch's stream after backward).
struct NcclLauncher {
    buffers: Vec<Tensor>,
    /// With gradient compression: each bucket's 16-bit copy, which NCCL sums.
    halves: Vec<Tensor>,
    wire: Wire,
    nccl: Arc<Mutex<Nccl>>,
    side: Option<SideStream>,
    /// Whether libtorch's stream already waits for this step's all-reduces.
    joined: bool,
}

impl Launcher for NcclLauncher {
    fn launch(&mut self, b: usize, grads: &[(Option<&Tensor>, i64)], weight: f64) -> Result<()> {
        let flat = &self.buffers[b];
        // On libtorch's stream, like the kernels that computed the gradients.
        gather(flat, grads, weight)?;
        let stream = match &self.side {
            Some(side) => {
                side.side_after_main()?;
                side.raw()
            }
            None => std::ptr::null_mut(),
        };
        // Compressed: cast into the bucket's 16-bit buffer on libtorch's stream (ordered
        // before the all-reduce like the gather), and all-reduce that.
        let (buf, wire) = match self.halves.get(b) {
            Some(half) => {
                half.shallow_clone().f_copy_(flat)?;
                (half, self.wire)
            }
            None => (flat, Wire::F32),
        };
        // SAFETY: `buf` is a contiguous device buffer of `numel` values of `wire`'s type that
        // lives as long as `self`; the all-reduce runs after the gather and the cast (same
        // stream, or the side stream waits for it) and before the scatter (`land` makes
        // libtorch's stream wait for the side stream).
        unsafe { lock(&self.nccl).all_reduce_sum_as(buf.data_ptr(), buf.numel(), wire, stream)? };
        self.joined = false;
        Ok(())
    }

    fn land(&mut self, b: usize, params: &[&Tensor]) -> Result<()> {
        self.join()?;
        if let Some(half) = self.halves.get(b) {
            self.buffers[b].shallow_clone().f_copy_(half)?;
        }
        scatter(&self.buffers[b], params)
    }

    fn reset(&mut self) {
        let _ = self.join();
    }
}

impl NcclLauncher {
    /// Makes libtorch's stream wait for every all-reduce launched so far.
    fn join(&mut self) -> Result<()> {
        if let (Some(side), false) = (&self.side, self.joined) {
            side.main_after_side()?;
            self.joined = true;
        }
        Ok(())
    }
}

impl Drop for NcclLauncher {
    /// The buffers go back to libtorch's allocator, which reuses them on its stream: that
    /// stream must first wait for NCCL to be done with them.
    fn drop(&mut self) {
        let _ = self.join();
    }
}

/// Locks `m`, also after a panic elsewhere while it was held (the data stays usable: every
/// holder leaves it consistent or fails the step).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

extern "C" fn grad_ready(data: *mut c_void, index: i64, grad: *mut torch_sys::C_tensor) {
    // SAFETY: `grad` is a new tensor handle the shim gives away; `data` is the pointer from
    // `Arc::into_raw` that this hook owns until its release.
    let grad = unsafe { Tensor::from_ptr(grad) };
    let state = unsafe { &*(data as *const Mutex<State>) };
    // A panic must not unwind into C++: it becomes the step's error.
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut s = lock(state);
        let i = index as usize;
        // One report per parameter and step: ferry runs one backward per step. (Gradient
        // accumulation over several backwards would have to arm only the last one.)
        if !s.armed || s.error.is_some() || s.grads[i].is_some() {
            return;
        }
        s.grads[i] = Some(grad);
        let b = s.bucket_of[i];
        s.missing[b] -= 1;
        if let Err(e) = s.hand_over_ready() {
            s.error = Some(format!("{e:#}"));
        }
    }));
    if let Err(panic) = r {
        let what = panic_message(panic.as_ref());
        lock(state).error = Some(format!("a gradient hook panicked: {what}"));
    }
}

extern "C" fn release(data: *mut c_void) {
    // SAFETY: gives back the reference that `Overlap::new` leaked for this hook.
    drop(unsafe { Arc::from_raw(data as *const Mutex<State>) });
}

/// What one step's overlap did.
pub struct OverlapReport {
    /// Buckets whose all-reduce started during backward.
    pub during_backward: usize,
    /// Hooked parameters that got no gradient from backward (their bucket, and every later
    /// one, waited for backward to end).
    pub silent: Vec<usize>,
}

/// The collective a rank's buckets go through.
pub enum BucketComm {
    /// CPU ranks: the ring, on its communication thread.
    Ring(Arc<Mutex<Background>>),
    /// CUDA ranks: NCCL; with a side stream when buckets go during backward.
    Nccl {
        nccl: Arc<Mutex<Nccl>>,
        device: Device,
        side: Option<SideStream>,
    },
}

/// Gradient averaging in buckets, overlapped with backward when hooked: arm it before
/// backward, finish it after.
pub struct Overlap {
    state: Arc<Mutex<State>>,
    hooked: bool,
}

impl Overlap {
    /// Buckets for `params` (the trainable ones, in a fixed order; `buckets` lists indices
    /// into it). With `hooks`, sets a hook on every parameter, so that buckets go during
    /// backward.
    pub fn new(
        params: &[(String, Tensor)],
        buckets: Vec<Vec<usize>>,
        comm: BucketComm,
        hooks: bool,
        wire: Wire,
    ) -> Result<Overlap> {
        // A parameter that does not require a gradient (exported that way) never gets one,
        // and a tensor listed twice (tied weights) has one hook slot: only its first listing
        // is hooked. The others go with zeros or, after backward, with their gradient.
        let mut seen = std::collections::HashSet::new();
        let hooked: Vec<bool> = params
            .iter()
            .map(|(_, p)| {
                hooks && p.requires_grad() && p.numel() > 0 && seen.insert(p.data_ptr() as usize)
            })
            .collect();
        let mut bucket_of = vec![usize::MAX; params.len()];
        for (b, bucket) in buckets.iter().enumerate() {
            bucket.iter().for_each(|&i| bucket_of[i] = b);
        }
        if let Some(i) = bucket_of.iter().position(|&b| b == usize::MAX) {
            bail!("parameter {} is in no gradient bucket", params[i].0);
        }
        let lens = buckets
            .iter()
            .map(|b| bucket_len(b.iter().map(|&i| params[i].1.numel() as i64)));
        let launcher: Box<dyn Launcher> = match comm {
            BucketComm::Ring(comm) => {
                let submit = lock(&comm).submitter();
                Box::new(RingLauncher {
                    buffers: lens.map(|n| Some(vec![0f32; n as usize])).collect(),
                    tickets: vec![None; buckets.len()],
                    submit,
                    comm,
                    wire,
                })
            }
            BucketComm::Nccl { nccl, device, side } => {
                let lens: Vec<i64> = lens.collect();
                let zeros = |kind: Kind| -> Result<Vec<Tensor>> {
                    Ok(lens
                        .iter()
                        .map(|&n| Tensor::f_zeros([n], (kind, device)))
                        .collect::<Result<_, _>>()?)
                };
                let halves = match wire {
                    Wire::F32 => Vec::new(),
                    Wire::Bf16 => zeros(Kind::BFloat16)?,
                    Wire::F16 => zeros(Kind::Half)?,
                };
                Box::new(NcclLauncher {
                    buffers: zeros(Kind::Float)?,
                    halves,
                    wire,
                    nccl,
                    side,
                    joined: true,
                })
            }
        };
        let expected: Vec<usize> = buckets
            .iter()
            .map(|b| b.iter().filter(|&&i| hooked[i]).count())
            .collect();
        let state = Arc::new(Mutex::new(State {
            missing: expected.clone(),
            expected,
            hooked: hooked.clone(),
            launcher,
            grads: (0..params.len()).map(|_| None).collect(),
            numels: params.iter().map(|(_, p)| p.numel() as i64).collect(),
            buckets,
            bucket_of,
            next: 0,
            weight: 1.0,
            armed: false,
            error: None,
        }));
        for (i, (name, p)) in params.iter().enumerate().filter(|(i, _)| hooked[*i]) {
            let data = Arc::into_raw(state.clone()) as *mut c_void;
            let mut err = std::ptr::null_mut();
            let mut handle = p.shallow_clone();
            // SAFETY: `handle` is a live tensor; the shim takes `data` and releases it exactly
            // once, through `release`, on success or failure.
            let rc = unsafe {
                ferry_on_grad_ready(
                    handle.as_mut_ptr(),
                    data,
                    i as i64,
                    grad_ready,
                    release,
                    &mut err,
                )
            };
            if rc != 0 {
                let why = super::torchscript::take_err(err).unwrap_or_default();
                bail!("cannot hook parameter {name}'s gradient: {why}");
            }
        }
        Ok(Overlap {
            state,
            hooked: hooks,
        })
    }

    /// Whether buckets go during backward.
    pub fn hooked(&self) -> bool {
        self.hooked
    }

    /// Starts a step: this rank's gradients will be weighed by `weight`.
    pub fn arm(&self, weight: f64) {
        let mut s = lock(&self.state);
        s.weight = weight;
        s.armed = true;
    }

    /// After backward: hands over the buckets still waiting (taking the gradients the hooks
    /// did not report from `params`), waits for every all-reduce and writes the global mean
    /// gradient back into each parameter's gradient.
    pub fn finish(&self, params: &[(String, Tensor)]) -> Result<OverlapReport> {
        let mut guard = lock(&self.state);
        let s = &mut *guard;
        let result = Self::complete(s, params);
        // Ready for the next step, whatever happened.
        s.launcher.reset();
        s.armed = false;
        s.next = 0;
        s.error = None;
        s.missing.clone_from(&s.expected);
        s.grads.iter_mut().for_each(|g| *g = None);
        result
    }

    fn complete(s: &mut State, params: &[(String, Tensor)]) -> Result<OverlapReport> {
        if !s.armed {
            bail!("gradient synchronisation finished without being armed");
        }
        if let Some(e) = s.error.take() {
            bail!("gradient synchronisation failed during backward: {e}");
        }
        let mut silent = Vec::new();
        for (i, (_, p)) in params.iter().enumerate() {
            if s.grads[i].is_none() {
                if s.hooked[i] {
                    silent.push(i);
                }
                s.grads[i] = Some(p.grad());
            }
        }
        let during_backward = s.next;
        s.missing.iter_mut().for_each(|m| *m = 0);
        s.hand_over_ready()?;
        for b in 0..s.buckets.len() {
            let bucket: Vec<&Tensor> = s.buckets[b].iter().map(|&i| &params[i].1).collect();
            s.launcher.land(b, &bucket)?;
        }
        Ok(OverlapReport {
            during_backward,
            silent,
        })
    }
}
