//! Gradient buckets: flattening a bucket's weighted gradients into one buffer and copying
//! the sums back ([`gather`], [`scatter`], shared by the ring and NCCL), and, for CPU ranks on
//! the ring, overlapping the all-reduce with backward ([`Overlap`]).
//!
//! A hook on every trainable parameter (PyTorch's post-accumulate-grad hook, set through the
//! shim) reports when backward has written that parameter's gradient. Once every gradient of
//! a bucket is in, and every earlier bucket has been handed over, the bucket's gradients are
//! copied, weighted, into its flat buffer, and the buffer goes to the communication thread
//! ([`Background`]), which all-reduces it while backward goes on with earlier layers.
//! Buckets are handed over in bucket order on every rank, whatever order the hooks fire in,
//! so every rank's ring sees the same sequence of operations. After backward, [`finish`]
//! hands over what is left (a bucket holding a parameter that got no gradient this step goes
//! only then, with zeros for it), waits for every bucket, and copies the sums back into the
//! gradients. Without hooks (`train.overlap_grad_sync: false`) every bucket is handed over
//! in `finish`, through the same buffers.
//!
//! [`finish`]: Overlap::finish
#![allow(unsafe_code)] // the hook's FFI, and flat buffers seen as tensors while they are filled

use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{anyhow, bail, Result};
use ferry_cluster::collective::background::{panic_message, Background, Submitter};
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
    let mut flags = vec![0f32; grads.len()];
    let mut off = 0i64;
    for ((g, n), flag) in grads.iter().zip(&mut flags) {
        let mut dst = flat.f_narrow(0, off, *n)?;
        match g.filter(|g| g.defined()) {
            Some(g) => {
                drop(g.f_reshape([-1])?.f_mul_scalar_out(&dst, weight)?);
                *flag = 1.0;
            }
            None => drop(dst.f_zero_()?),
        }
        off += n;
    }
    let flags = Tensor::from_slice(&flags).f_to_device(flat.device())?;
    flat.f_narrow(0, off, grads.len() as i64)?.f_copy_(&flags)?;
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
    /// Per bucket: its flat buffer, while not with the communication thread.
    buffers: Vec<Option<Vec<f32>>>,
    /// Per bucket: the ticket of its all-reduce this step.
    tickets: Vec<Option<u64>>,
    /// The first bucket not handed over yet.
    next: usize,
    /// This rank's share of the global batch, by which its gradients are weighed.
    weight: f64,
    /// Whether a step is in progress (hooks outside one are ignored).
    armed: bool,
    submit: Submitter,
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

    /// Copies bucket `b`'s gradients, times the weight, into its buffer and queues its all-reduce.
    fn hand_over(&mut self, b: usize) -> Result<()> {
        let mut buf = self.buffers[b]
            .take()
            .ok_or_else(|| anyhow!("bucket {b} handed over twice in one step"))?;
        let grads: Vec<(Option<&Tensor>, i64)> = self.buckets[b]
            .iter()
            .map(|&i| (self.grads[i].as_ref(), self.numels[i]))
            .collect();
        // SAFETY: `flat` is dropped (at the end of the closure) before `buf` moves.
        let filled = (|| gather(&unsafe { view(&mut buf) }?, &grads, self.weight))();
        drop(grads);
        if let Err(e) = filled {
            self.buffers[b] = Some(buf);
            return Err(e);
        }
        self.tickets[b] = Some(self.submit.all_reduce_sum(buf));
        Ok(())
    }

    fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
}

extern "C" fn grad_ready(data: *mut c_void, index: i64, grad: *mut torch_sys::C_tensor) {
    // SAFETY: `grad` is a new tensor handle the shim gives away; `data` is the pointer from
    // `Arc::into_raw` that this hook owns until its release.
    let grad = unsafe { Tensor::from_ptr(grad) };
    let state = unsafe { &*(data as *const Mutex<State>) };
    // A panic must not unwind into C++: it becomes the step's error.
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut s = State::lock(state);
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
        State::lock(state).error = Some(format!("a gradient hook panicked: {what}"));
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

/// Gradient averaging on the ring, overlapped with backward: arm it before backward, finish
/// it after.
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
        comm: &Background,
        hooks: bool,
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
        let mut buffers = Vec::with_capacity(buckets.len());
        for (b, bucket) in buckets.iter().enumerate() {
            bucket.iter().for_each(|&i| bucket_of[i] = b);
            let len = bucket_len(bucket.iter().map(|&i| params[i].1.numel() as i64));
            buffers.push(Some(vec![0f32; len as usize]));
        }
        if let Some(i) = bucket_of.iter().position(|&b| b == usize::MAX) {
            bail!("parameter {} is in no gradient bucket", params[i].0);
        }
        let expected: Vec<usize> = buckets
            .iter()
            .map(|b| b.iter().filter(|&&i| hooked[i]).count())
            .collect();
        let state = Arc::new(Mutex::new(State {
            missing: expected.clone(),
            expected,
            hooked: hooked.clone(),
            tickets: vec![None; buckets.len()],
            grads: (0..params.len()).map(|_| None).collect(),
            numels: params.iter().map(|(_, p)| p.numel() as i64).collect(),
            buckets,
            bucket_of,
            buffers,
            next: 0,
            weight: 1.0,
            armed: false,
            submit: comm.submitter(),
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
        let mut s = State::lock(&self.state);
        s.weight = weight;
        s.armed = true;
    }

    /// After backward: hands over the buckets still waiting (taking the gradients the hooks
    /// did not report from `params`), waits for every all-reduce and writes the global mean
    /// gradient back into each parameter's gradient.
    pub fn finish(
        &self,
        params: &[(String, Tensor)],
        comm: &mut Background,
    ) -> Result<OverlapReport> {
        let mut guard = State::lock(&self.state);
        let s = &mut *guard;
        let result = Self::complete(s, params, comm);
        // Ready for the next step, whatever happened.
        s.armed = false;
        s.next = 0;
        s.error = None;
        s.missing.clone_from(&s.expected);
        s.tickets.iter_mut().for_each(|t| *t = None);
        s.grads.iter_mut().for_each(|g| *g = None);
        result
    }

    fn complete(
        s: &mut State,
        params: &[(String, Tensor)],
        comm: &mut Background,
    ) -> Result<OverlapReport> {
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
            let ticket = s.tickets[b]
                .take()
                .ok_or_else(|| anyhow!("bucket {b} was never handed over"))?;
            let mut buf = comm.wait(ticket)?;
            let bucket: Vec<&Tensor> = s.buckets[b].iter().map(|&i| &params[i].1).collect();
            // SAFETY: `flat` is dropped (at the end of the closure) before `buf` moves.
            let copied = (|| scatter(&unsafe { view(&mut buf) }?, &bucket))();
            s.buffers[b] = Some(buf);
            copied?;
        }
        Ok(OverlapReport {
            during_backward,
            silent,
        })
    }
}
