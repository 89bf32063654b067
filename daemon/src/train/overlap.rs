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
use ferry_cluster::collective::background::{Background, Submitter};
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

/// Writes each gradient times `weight` (zeros where a parameter has none) into consecutive
/// parts of the flat f32 buffer `flat`; `grads` gives each gradient with its parameter's size.
pub fn gather<'a>(
    flat: &Tensor,
    grads: impl Iterator<Item = (Option<&'a Tensor>, i64)>,
    weight: f64,
) -> Result<()> {
    let mut off = 0i64;
    for (g, n) in grads {
        let mut dst = flat.narrow(0, off, n);
        match g.filter(|g| g.defined()) {
            Some(g) => drop(g.reshape([-1]).f_mul_scalar_out(&dst, weight)?),
            None => drop(dst.f_zero_()?),
        }
        off += n;
    }
    Ok(())
}

/// The inverse of [`gather`] (without the weight): copies consecutive parts of `flat` into
/// the gradients, skipping parameters that have none.
pub fn scatter<'a>(
    flat: &Tensor,
    grads: impl Iterator<Item = (Option<&'a mut Tensor>, i64)>,
) -> Result<()> {
    let mut off = 0i64;
    for (g, n) in grads {
        if let Some(g) = g.filter(|g| g.defined()) {
            let src = flat.narrow(0, off, n).view(g.size().as_slice());
            g.f_copy_(&src)?;
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
    /// Per bucket: parameters whose gradient has not arrived this step.
    missing: Vec<usize>,
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
        // SAFETY: `flat` is dropped before `buf` moves to the communication thread.
        let flat = unsafe { view(&mut buf)? };
        let grads = self.buckets[b]
            .iter()
            .map(|&i| (self.grads[i].as_ref(), self.numels[i]));
        gather(&flat, grads, self.weight)?;
        drop(flat);
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
    if r.is_err() {
        State::lock(state).error = Some("a gradient hook panicked".into());
    }
}

extern "C" fn release(data: *mut c_void) {
    // SAFETY: gives back the reference that `Overlap::new` leaked for this hook.
    drop(unsafe { Arc::from_raw(data as *const Mutex<State>) });
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
        let mut bucket_of = vec![usize::MAX; params.len()];
        let mut buffers = Vec::with_capacity(buckets.len());
        for (b, bucket) in buckets.iter().enumerate() {
            let mut len = 0;
            for &i in bucket {
                bucket_of[i] = b;
                len += params[i].1.numel();
            }
            buffers.push(Some(vec![0f32; len]));
        }
        if let Some(i) = bucket_of.iter().position(|&b| b == usize::MAX) {
            bail!("parameter {} is in no gradient bucket", params[i].0);
        }
        let state = Arc::new(Mutex::new(State {
            missing: buckets.iter().map(Vec::len).collect(),
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
        for (i, (name, p)) in params.iter().enumerate().filter(|_| hooks) {
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
    /// gradient back into each parameter's gradient. Returns how many buckets were handed
    /// over during backward.
    pub fn finish(&self, params: &[(String, Tensor)], comm: &mut Background) -> Result<usize> {
        let mut guard = State::lock(&self.state);
        let s = &mut *guard;
        let result = Self::complete(s, params, comm);
        // Ready for the next step, whatever happened.
        s.armed = false;
        s.next = 0;
        s.error = None;
        for (b, bucket) in s.buckets.iter().enumerate() {
            s.missing[b] = bucket.len();
            s.tickets[b] = None;
        }
        s.grads.iter_mut().for_each(|g| *g = None);
        result
    }

    fn complete(
        s: &mut State,
        params: &[(String, Tensor)],
        comm: &mut Background,
    ) -> Result<usize> {
        if !s.armed {
            bail!("gradient synchronisation finished without being armed");
        }
        if let Some(e) = s.error.take() {
            bail!("gradient synchronisation failed during backward: {e}");
        }
        for (i, (_, p)) in params.iter().enumerate() {
            if s.grads[i].is_none() {
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
            // SAFETY: `flat` is dropped before `buf` moves.
            let flat = unsafe { view(&mut buf)? };
            let mut grads: Vec<Option<Tensor>> =
                s.buckets[b].iter().map(|&i| s.grads[i].take()).collect();
            let sizes = s.buckets[b].iter().map(|&i| s.numels[i]);
            scatter(&flat, grads.iter_mut().map(Option::as_mut).zip(sizes))?;
            drop(flat);
            s.buffers[b] = Some(buf);
        }
        Ok(during_backward)
    }
}
