//! TorchScript models through ferry's C++ shim (`torchscript_shim.cpp`): parameters *and*
//! buffers by their PyTorch names, forward, train/eval and save.
#![allow(unsafe_code)] // FFI to the shim; every call is checked and owns what it returns.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use tch::Tensor;

type NamedCb = extern "C" fn(*mut c_void, *const c_char, *mut torch_sys::C_tensor);

extern "C" {
    fn ferry_free_string(s: *mut c_char);
    fn ferry_clear_grad(t: *mut torch_sys::C_tensor);
    fn ferry_set_grad(t: *mut torch_sys::C_tensor, g: *mut torch_sys::C_tensor);
    fn ferry_autocast(device: c_int, dtype: c_int);
    fn ferry_ts_load(path: *const c_char, cuda_index: c_int, err: *mut *mut c_char) -> *mut c_void;
    fn ferry_ts_free(m: *mut c_void);
    fn ferry_ts_train(
        m: *mut c_void,
        on: c_int,
        frozen: *const *const c_char,
        n_frozen: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn ferry_ts_forward(
        m: *mut c_void,
        input: *const torch_sys::C_tensor,
        err: *mut *mut c_char,
    ) -> *mut torch_sys::C_tensor;
    fn ferry_ts_taps(
        m: *mut c_void,
        names: *const *const c_char,
        n: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn ferry_ts_taps_free(t: *mut c_void);
    fn ferry_ts_forward_taps(
        m: *mut c_void,
        t: *mut c_void,
        input: *const torch_sys::C_tensor,
        out: *mut *mut torch_sys::C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    fn ferry_ts_named(
        m: *mut c_void,
        buffers: c_int,
        data: *mut c_void,
        cb: NamedCb,
        err: *mut *mut c_char,
    ) -> c_int;
    fn ferry_ts_save(m: *mut c_void, path: *const c_char, err: *mut *mut c_char) -> c_int;
    fn ferry_trace_start(
        names: *const *const c_char,
        ts: *const *const torch_sys::C_tensor,
        is_buffer: *const c_int,
        n: c_int,
        input: *const torch_sys::C_tensor,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn ferry_trace_end(
        m: *mut c_void,
        output: *const torch_sys::C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    fn ferry_sgd_step(
        params: *const *const torch_sys::C_tensor,
        grads: *const *const torch_sys::C_tensor,
        bufs: *const *const torch_sys::C_tensor,
        n: c_int,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn ferry_adamw_step(
        params: *const *const torch_sys::C_tensor,
        grads: *const *const torch_sys::C_tensor,
        m: *const *const torch_sys::C_tensor,
        v: *const *const torch_sys::C_tensor,
        n: c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        bc1: f64,
        bc2: f64,
        err: *mut *mut c_char,
    ) -> c_int;
    fn ferry_unscale_grads(
        grads: *const *const torch_sys::C_tensor,
        n: c_int,
        found_inf: *mut torch_sys::C_tensor,
        inv_scale: *const torch_sys::C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    fn ferry_jit_optimize(on: c_int);
}

/// Takes the shim's error string, if any.
pub(crate) fn take_err(err: *mut c_char) -> Option<String> {
    if err.is_null() {
        return None;
    }
    // SAFETY: the shim returns a NUL-terminated malloc'ed string, freed once here.
    let s = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { ferry_free_string(err) };
    Some(s)
}

/// Turns autocast on (to `precision`) or off for `device`, on this thread. Every model kind
/// goes through the dispatcher, so this covers TorchScript and built-in models alike.
pub fn set_autocast(device: tch::Device, precision: ferry_cluster::spec::Precision) {
    use ferry_cluster::spec::Precision;
    let dev = c_int::from(matches!(device, tch::Device::Cuda(_)));
    let dtype = match precision {
        Precision::Fp32 => 0,
        Precision::Fp16 => 1,
        Precision::Bf16 => 2,
    };
    // SAFETY: sets thread-local dispatcher state; no pointers cross.
    unsafe { ferry_autocast(dev, dtype) }
}

/// Drops `t`'s gradient, as PyTorch's `zero_grad(set_to_none=True)` does.
pub fn clear_grad(t: &mut Tensor) {
    // SAFETY: the tensor is live and only its autograd metadata changes.
    unsafe { ferry_clear_grad(t.as_mut_ptr()) }
}

/// Makes `g` the gradient of `p` (they then share storage).
pub fn set_grad(p: &Tensor, g: &Tensor) {
    let (mut p, mut g) = (p.shallow_clone(), g.shallow_clone());
    // SAFETY: both tensors are live; only `p`'s autograd metadata changes.
    unsafe { ferry_set_grad(p.as_mut_ptr(), g.as_mut_ptr()) }
}

/// Handles to pass to the shim, checked to be `n` long.
fn handles(ts: &[Tensor], n: usize, what: &str) -> Result<Vec<*const torch_sys::C_tensor>> {
    if ts.len() != n {
        return Err(anyhow!("{what}: {} tensors for {n} parameters", ts.len()));
    }
    Ok(ts.iter().map(Tensor::as_ptr).collect())
}

/// The parameter count of one multi-tensor step, as the shim takes it.
fn count(n: usize) -> Result<c_int> {
    c_int::try_from(n).map_err(|_| anyhow!("{n} parameters are too many for one step"))
}

/// An optimizer step's outcome from the shim's status and error string.
fn step_result(rc: c_int, err: *mut c_char, what: &str) -> Result<()> {
    match (rc, take_err(err)) {
        (_, Some(e)) => Err(anyhow!("{what} step failed: {e}")),
        (0, None) => Ok(()),
        (_, None) => Err(anyhow!(
            "{what} step failed (out of memory for its message)"
        )),
    }
}

/// One `torch.optim.SGD` step (dampening 0) over `params`, whose gradients are `grads`, with
/// PyTorch's multi-tensor kernels. `bufs` are the momentum buffers (empty without momentum).
pub fn sgd_step(
    params: &[Tensor],
    grads: &[Tensor],
    bufs: &[Tensor],
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    nesterov: bool,
) -> Result<()> {
    let n = params.len();
    let (p, g) = (
        handles(params, n, "params")?,
        handles(grads, n, "gradients")?,
    );
    let b = if momentum != 0.0 {
        handles(bufs, n, "momentum buffers")?
    } else {
        Vec::new()
    };
    let mut err = std::ptr::null_mut();
    // SAFETY: every handle is a live tensor borrowed for the call; `b` is read only with
    // momentum, when it holds n handles; the shim copies nothing it keeps.
    let rc = unsafe {
        ferry_sgd_step(
            p.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            count(n)?,
            lr,
            momentum,
            weight_decay,
            c_int::from(nesterov),
            &mut err,
        )
    };
    step_result(rc, err, "SGD")
}

/// AdamW's hyperparameters for one step: `bc1`, `bc2` are the bias corrections 1 - beta^t.
pub struct AdamwStep {
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub bc1: f64,
    pub bc2: f64,
}

/// One `torch.optim.AdamW` step over `params` with multi-tensor kernels; `m`, `v` are the
/// first and second moments.
pub fn adamw_step(
    params: &[Tensor],
    grads: &[Tensor],
    m: &[Tensor],
    v: &[Tensor],
    h: &AdamwStep,
) -> Result<()> {
    let n = params.len();
    let (p, g) = (
        handles(params, n, "params")?,
        handles(grads, n, "gradients")?,
    );
    let (m, v) = (
        handles(m, n, "first moments")?,
        handles(v, n, "second moments")?,
    );
    let mut err = std::ptr::null_mut();
    // SAFETY: every handle is a live tensor borrowed for the call, each list n long.
    let rc = unsafe {
        ferry_adamw_step(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            count(n)?,
            h.lr,
            h.betas[0],
            h.betas[1],
            h.eps,
            h.weight_decay,
            h.bc1,
            h.bc2,
            &mut err,
        )
    };
    step_result(rc, err, "AdamW")
}

/// `torch.amp.GradScaler`'s unscale, with its multi-tensor kernel: multiplies `grads` by
/// `inv_scale` and sets `found_inf` to 1 when any of them holds an inf or NaN. Both are
/// one-element fp32 tensors on the gradients' device; nothing is read back.
pub fn unscale_grads(grads: &[Tensor], found_inf: &mut Tensor, inv_scale: &Tensor) -> Result<()> {
    let g = handles(grads, grads.len(), "gradients")?;
    let mut err = std::ptr::null_mut();
    // SAFETY: every handle is a live tensor borrowed for the call; found_inf is written in
    // place, through a handle that outlives the call.
    let rc = unsafe {
        ferry_unscale_grads(
            g.as_ptr(),
            count(grads.len())?,
            found_inf.as_mut_ptr(),
            inv_scale.as_ptr(),
            &mut err,
        )
    };
    step_result(rc, err, "loss-scale unscale")
}

/// Whether TorchScript's graph executor optimises graphs (profiling runs, then autodiff
/// subgraphs and fusion) or runs them as written, op by op, as PyTorch eager does.
/// libtorch keeps this per thread: set it on the thread that runs forward, before the first.
pub fn jit_optimize(on: bool) {
    // SAFETY: sets a thread-local flag; no pointers cross.
    unsafe { ferry_jit_optimize(c_int::from(on)) }
}

/// A loaded TorchScript module. Not shared between threads.
pub struct TorchScriptModule {
    ptr: *mut c_void,
    /// The forward that also returns submodules' outputs (`set_taps`), and how many.
    taps: Option<(*mut c_void, usize)>,
}

// SAFETY: the module is used by one thread at a time (moved, never shared).
unsafe impl Send for TorchScriptModule {}

impl Drop for TorchScriptModule {
    fn drop(&mut self) {
        // SAFETY: the pointers came from ferry_ts_taps and ferry_ts_load and are freed once,
        // the function that refers to the module first.
        unsafe {
            if let Some((t, _)) = self.taps.take() {
                ferry_ts_taps_free(t);
            }
            ferry_ts_free(self.ptr)
        }
    }
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| anyhow!("path {} contains a NUL byte", p.display()))
}

extern "C" fn collect(data: *mut c_void, name: *const c_char, t: *mut torch_sys::C_tensor) {
    // SAFETY: data is the Vec passed by `named`; name is valid for the call; t is owned.
    let out = unsafe { &mut *(data as *mut Vec<(String, Tensor)>) };
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    out.push((name, unsafe { Tensor::from_ptr(t) }));
}

impl TorchScriptModule {
    /// Loads a module saved by `torch.jit.save`, onto the CPU or CUDA device `cuda_index`.
    pub fn load(path: &Path, cuda_index: Option<usize>) -> Result<Self> {
        let p = cpath(path)?;
        let mut err = std::ptr::null_mut();
        let idx = cuda_index.map_or(-1, |i| i as c_int);
        // SAFETY: p is a valid C string; err receives an owned string on failure.
        let ptr = unsafe { ferry_ts_load(p.as_ptr(), idx, &mut err) };
        if let Some(e) = take_err(err) {
            return Err(anyhow!(
                "cannot load TorchScript model {}: {}",
                path.display(),
                e.lines().next().unwrap_or_default()
            ));
        }
        Ok(TorchScriptModule { ptr, taps: None })
    }

    /// Switches dropout and BatchNorm between training and evaluation behaviour; submodules
    /// under a `frozen` prefix stay in evaluation mode.
    pub fn set_train(&mut self, on: bool, frozen: &[String]) -> Result<()> {
        let names: Vec<CString> = frozen
            .iter()
            .filter_map(|f| CString::new(f.as_str()).ok())
            .collect();
        let ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let mut err = std::ptr::null_mut();
        // SAFETY: ptr is live; the prefix strings outlive the call.
        unsafe {
            ferry_ts_train(
                self.ptr,
                on as c_int,
                ptrs.as_ptr(),
                ptrs.len() as c_int,
                &mut err,
            )
        };
        take_err(err).map_or(Ok(()), |e| Err(anyhow!("train({on}) failed: {e}")))
    }

    /// Runs `forward(input)`; the result must be a tensor (or a tuple starting with one).
    pub fn forward(&self, input: &Tensor) -> Result<Tensor> {
        let mut err = std::ptr::null_mut();
        // SAFETY: ptr is live; input outlives the call; the result is owned.
        let out = unsafe { ferry_ts_forward(self.ptr, input.as_ptr(), &mut err) };
        if let Some(e) = take_err(err) {
            return Err(anyhow!("the model's forward failed: {e}"));
        }
        // SAFETY: non-null on success, ownership moves to the Tensor.
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    /// Makes [`TorchScriptModule::forward_taps`] return the outputs of the submodules
    /// `names` (by their PyTorch names) along with the logits.
    pub fn set_taps(&mut self, names: &[String]) -> Result<()> {
        let c: Vec<CString> = names
            .iter()
            .map(|n| CString::new(n.as_str()).map_err(|_| anyhow!("a module name with a NUL byte")))
            .collect::<Result<_>>()?;
        let ptrs: Vec<*const c_char> = c.iter().map(|n| n.as_ptr()).collect();
        let mut err = std::ptr::null_mut();
        // SAFETY: ptr is live; the names outlive the call; the result is owned here.
        let t = unsafe { ferry_ts_taps(self.ptr, ptrs.as_ptr(), count(ptrs.len())?, &mut err) };
        if let Some(e) = take_err(err) {
            bail!("{e}");
        }
        if let Some((old, _)) = self.taps.replace((t, names.len())) {
            // SAFETY: from ferry_ts_taps, no longer referenced.
            unsafe { ferry_ts_taps_free(old) };
        }
        Ok(())
    }

    /// Runs forward on `input`: the logits and the outputs of the modules of `set_taps`.
    pub fn forward_taps(&self, input: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let Some((t, n)) = self.taps else {
            return Ok((self.forward(input)?, Vec::new()));
        };
        let mut out = vec![std::ptr::null_mut(); n + 1];
        let mut err = std::ptr::null_mut();
        // SAFETY: both pointers are live; `out` has room for n + 1 owned results.
        unsafe { ferry_ts_forward_taps(self.ptr, t, input.as_ptr(), out.as_mut_ptr(), &mut err) };
        if let Some(e) = take_err(err) {
            return Err(anyhow!("the model's forward failed: {e}"));
        }
        // SAFETY: every slot is set on success; ownership moves to the Tensors.
        let mut out = out.into_iter().map(|p| unsafe { Tensor::from_ptr(p) });
        let logits = out.next().expect("n + 1 outputs");
        Ok((logits, out.collect()))
    }

    fn named(&self, buffers: bool) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = Vec::new();
        let mut err = std::ptr::null_mut();
        // SAFETY: `collect` only touches `out` during the call.
        unsafe {
            ferry_ts_named(
                self.ptr,
                buffers as c_int,
                &mut out as *mut _ as *mut c_void,
                collect,
                &mut err,
            )
        };
        take_err(err).map_or(Ok(out), |e| Err(anyhow!("listing tensors failed: {e}")))
    }

    /// Parameters with their state_dict names; the tensors alias the module's.
    pub fn named_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        self.named(false)
    }

    /// Buffers (e.g. BatchNorm running statistics) with their state_dict names.
    pub fn named_buffers(&self) -> Result<Vec<(String, Tensor)>> {
        self.named(true)
    }

    /// Saves the module (with its current weights) as TorchScript.
    /// Traces `forward` (a built-in model's forward pass) on `input` into a TorchScript
    /// module whose state_dict is `params` and `buffers`, under their names: what
    /// torch.jit.trace makes of an nn.Module, for torch.jit.load.
    pub fn trace(
        params: &[(String, Tensor)],
        buffers: &[(String, Tensor)],
        input: &Tensor,
        forward: impl FnOnce(&Tensor) -> Tensor,
    ) -> Result<TorchScriptModule> {
        let all: Vec<(&String, &Tensor, c_int)> = params
            .iter()
            .map(|(n, t)| (n, t, 0))
            .chain(buffers.iter().map(|(n, t)| (n, t, 1)))
            .collect();
        let names: Vec<CString> = all
            .iter()
            .map(|(n, _, _)| CString::new(n.as_str()))
            .collect::<Result<_, _>>()?;
        let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let ts: Vec<*const torch_sys::C_tensor> = all.iter().map(|(_, t, _)| t.as_ptr()).collect();
        let kinds: Vec<c_int> = all.iter().map(|(_, _, b)| *b).collect();
        let mut err = std::ptr::null_mut();
        // SAFETY: the arrays and tensors outlive the call; err receives an owned string.
        let ptr = unsafe {
            ferry_trace_start(
                name_ptrs.as_ptr(),
                ts.as_ptr(),
                kinds.as_ptr(),
                all.len() as c_int,
                input.as_ptr(),
                &mut err,
            )
        };
        if let Some(e) = take_err(err) {
            return Err(anyhow!("cannot start tracing the model: {e}"));
        }
        let module = TorchScriptModule { ptr, taps: None };
        // tch's layers unwrap libtorch's errors: a panic during the trace fails the trace.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| forward(input)));
        let out = match out {
            Ok(t) => t,
            Err(_) => {
                // Ends the tracer's state, with an empty output.
                let empty = Tensor::zeros([0], (tch::Kind::Float, input.device()));
                let mut e2 = std::ptr::null_mut();
                // SAFETY: ptr is live.
                unsafe { ferry_trace_end(module.ptr, empty.as_ptr(), &mut e2) };
                let _ = take_err(e2);
                return Err(anyhow!(
                    "the model's forward pass panicked while it was traced"
                ));
            }
        };
        let mut err = std::ptr::null_mut();
        // SAFETY: ptr is live; out outlives the call.
        unsafe { ferry_trace_end(module.ptr, out.as_ptr(), &mut err) };
        take_err(err).map_or(Ok(module), |e| {
            Err(anyhow!("cannot finish tracing the model: {e}"))
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let p = cpath(path)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: ptr is live; p is a valid C string.
        unsafe { ferry_ts_save(self.ptr, p.as_ptr(), &mut err) };
        take_err(err).map_or(Ok(()), |e| {
            Err(anyhow!(
                "cannot save TorchScript to {}: {e}",
                path.display()
            ))
        })
    }
}
