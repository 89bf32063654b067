// A thin C ABI over torch::jit::Module for what tch's CModule does not expose: buffers
// (BatchNorm running statistics) by name, next to parameters, so that ferry can load a
// PyTorch state_dict into a TorchScript model and checkpoint it whole.
// Tensors cross as heap-allocated at::Tensor*, the same representation tch uses, so Rust
// takes ownership with tch::Tensor::from_ptr. Every entry point catches C++ exceptions and
// returns the message through `err` (freed with ferry_free_string).

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/jit/passes/fixup_trace_scope_blocks.h>
#include <torch/csrc/jit/passes/normalize_ops.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>
#include <torch/script.h>

#include <cmath>
#include <memory>
#include <optional>

#include <cstring>
#include <new>
#include <string>

namespace {
// A malloc'ed copy for ferry to free, or null when memory is out (callers also return -1).
char *dup(const std::string &s) {
  char *p = static_cast<char *>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

std::vector<at::Tensor> tensors(at::Tensor *const *ts, int n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int i = 0; i < n; i++) v.push_back(*ts[i]);
  return v;
}
}  // namespace

extern "C" {
typedef void (*ferry_named_tensor_cb)(void *data, const char *name, at::Tensor *t);
typedef void (*ferry_grad_ready_cb)(void *data, int64_t index, at::Tensor *grad);
typedef void (*ferry_release_cb)(void *data);
}

namespace {
// Tells ferry that backward has accumulated a parameter's gradient: `cb(data, index, grad)`,
// with a new handle to the gradient that ferry owns. `release(data)` runs when the hook is
// destroyed (with its tensor, or when replaced), so ferry can free what `data` points to.
struct GradReady : torch::autograd::PostAccumulateGradHook {
  void *data;
  int64_t index;
  ferry_grad_ready_cb cb;
  ferry_release_cb release;
  GradReady(void *d, int64_t i, ferry_grad_ready_cb c, ferry_release_cb r) : data(d), index(i), cb(c), release(r) {}
  void operator()(const torch::autograd::Variable &t) override { cb(data, index, new at::Tensor(t.grad())); }
  ~GradReady() override { release(data); }
};
}  // namespace

extern "C" {

void ferry_free_string(char *s) { std::free(s); }

// Drops a tensor's gradient (PyTorch's zero_grad(set_to_none=True)): the next backward
// writes a fresh gradient instead of zero-filling and accumulating into the old one.
void ferry_clear_grad(at::Tensor *t) { t->mutable_grad() = at::Tensor(); }

// Sets a tensor's gradient to `g` (which it then shares).
void ferry_set_grad(at::Tensor *t, at::Tensor *g) { t->mutable_grad() = *g; }

// Calls `cb(data, index, grad)` each time backward has accumulated `t`'s gradient (PyTorch's
// post-accumulate-grad hook), on whichever thread runs backward for `t`'s device. A tensor
// has one such hook: this replaces the previous one, whose `release` then runs. On failure
// `release(data)` has run too, so the caller frees nothing twice.
int ferry_on_grad_ready(at::Tensor *t, void *data, int64_t index, ferry_grad_ready_cb cb, ferry_release_cb release,
                        char **err) {
  std::unique_ptr<GradReady> hook(new (std::nothrow) GradReady(data, index, cb, release));
  if (!hook) {
    release(data);
    *err = dup("out of memory");
    return -1;
  }
  try {
    if (!t->requires_grad()) throw std::runtime_error("the tensor does not require a gradient");
    torch::autograd::impl::set_post_acc_grad_hooks(*t, std::move(hook));
    return 0;
  } catch (const std::exception &e) {
    *err = dup(e.what());
    return -1;
  }
}

// Mixed precision for the forward passes that follow, on this thread: `device` 0 is the
// CPU, 1 CUDA; `dtype` 0 turns autocast off, 1 selects float16, 2 bfloat16. The weight-cast
// cache stays off: ferry leaves autocast on across steps, and cached casts of weights
// that the optimizer has since updated would be stale. (tch's own autocast offers only
// CUDA float16; this is the route to bfloat16 and to CPU autocast.)
void ferry_autocast(int device, int dtype) {
  const auto dev = device == 1 ? at::kCUDA : at::kCPU;
  if (dtype == 0) {
    at::autocast::set_autocast_enabled(dev, false);
    return;
  }
  at::autocast::set_autocast_cache_enabled(false);
  at::autocast::set_autocast_dtype(dev, dtype == 1 ? at::kHalf : at::kBFloat16);
  at::autocast::set_autocast_enabled(dev, true);
}

// One torch.optim.SGD step (dampening 0) over n parameters with PyTorch's multi-tensor
// kernels, as torch.optim.SGD runs by default on CUDA (foreach): a few launches for the
// whole model instead of a few per parameter. `bufs` are the momentum buffers (ignored when
// momentum is 0; zeros before the first step give PyTorch's first step exactly). Gradients
// are left as they are.
int ferry_sgd_step(at::Tensor *const *params, at::Tensor *const *grads, at::Tensor *const *bufs, int n, double lr,
                   double momentum, double weight_decay, int nesterov, char **err) {
  try {
    at::NoGradGuard no_grad;
    auto p = tensors(params, n);
    auto d = tensors(grads, n);
    if (weight_decay != 0) d = at::_foreach_add(d, p, weight_decay);
    if (momentum != 0) {
      auto b = tensors(bufs, n);
      at::_foreach_mul_(b, momentum);
      at::_foreach_add_(b, d);
      d = nesterov ? at::_foreach_add(d, b, momentum) : b;
    }
    at::_foreach_add_(p, d, -lr);
    return 0;
  } catch (const std::exception &e) {
    *err = dup(e.what());
    return -1;
  }
}

// One torch.optim.AdamW step over n parameters with multi-tensor kernels: `m`, `v` are the
// moments, `bc1`, `bc2` the bias corrections 1 - beta^t of this step.
int ferry_adamw_step(at::Tensor *const *params, at::Tensor *const *grads, at::Tensor *const *m,
                     at::Tensor *const *v, int n, double lr, double beta1, double beta2, double eps,
                     double weight_decay, double bc1, double bc2, char **err) {
  try {
    at::NoGradGuard no_grad;
    auto p = tensors(params, n);
    auto g = tensors(grads, n);
    auto m1 = tensors(m, n);
    auto m2 = tensors(v, n);
    if (weight_decay != 0) at::_foreach_mul_(p, 1 - lr * weight_decay);
    at::_foreach_lerp_(m1, g, 1 - beta1);
    at::_foreach_mul_(m2, beta2);
    at::_foreach_addcmul_(m2, g, g, 1 - beta2);
    auto denom = at::_foreach_sqrt(m2);
    at::_foreach_div_(denom, std::sqrt(bc2));
    at::_foreach_add_(denom, eps);
    at::_foreach_addcdiv_(p, m1, denom, -lr / bc1);
    return 0;
  } catch (const std::exception &e) {
    *err = dup(e.what());
    return -1;
  }
}

// torch.amp.GradScaler's unscale with its multi-tensor kernel: multiplies the n gradients by
// `inv_scale` (a one-element fp32 tensor on their device) and sets `found_inf` (the same) to
// 1 when any of them holds an inf or NaN. Nothing is read back here: the caller reads
// found_inf once.
int ferry_unscale_grads(at::Tensor *const *grads, int n, at::Tensor *found_inf, at::Tensor *inv_scale,
                        char **err) {
  try {
    at::NoGradGuard no_grad;
    auto g = tensors(grads, n);
    at::_amp_foreach_non_finite_check_and_unscale_(g, *found_inf, *inv_scale);
    return 0;
  } catch (const std::exception &e) {
    *err = dup(e.what());
    return -1;
  }
}

// Whether TorchScript's graph executor optimises (profiling runs, autodiff graphs, fusion) or
// runs the graph as written, op by op, as PyTorch eager does. libtorch keeps it per thread.
void ferry_jit_optimize(int on) { torch::jit::setGraphExecutorOptimize(on != 0); }

void *ferry_ts_load(const char *path, int cuda_index, char **err) {
  try {
    c10::Device dev = cuda_index < 0 ? c10::Device(c10::kCPU) : c10::Device(c10::kCUDA, cuda_index);
    return new torch::jit::Module(torch::jit::load(path, dev));
  } catch (const std::exception &e) {
    *err = dup(e.what());
    return nullptr;
  }
}

void ferry_ts_free(void *m) { delete static_cast<torch::jit::Module *>(m); }

// Sets training mode; in training mode, submodules under a `frozen` prefix stay in eval
// mode, so a frozen backbone's BatchNorm keeps the statistics it was loaded with.
int ferry_ts_train(void *m, int on, const char *const *frozen, int n_frozen, char **err) {
  try {
    auto *mod = static_cast<torch::jit::Module *>(m);
    mod->train(on != 0);
    if (on) {
      for (const auto &sub : mod->named_modules()) {
        for (int i = 0; i < n_frozen; ++i) {
          const std::string prefix(frozen[i]);
          if (sub.name == prefix || sub.name.rfind(prefix + ".", 0) == 0) {
            torch::jit::Module handle = sub.value;  // a handle to the same module object
            handle.eval();
            break;
          }
        }
      }
    }
    return 0;
  } catch (const std::exception &e) {
    *err = dup(e.what());
    return -1;
  }
}

at::Tensor *ferry_ts_forward(void *m, at::Tensor *input, char **err) {
  try {
    auto *mod = static_cast<torch::jit::Module *>(m);
    c10::IValue out = mod->forward({*input});
    if (out.isTensor()) return new at::Tensor(out.toTensor());
    if (out.isTuple() && !out.toTuple()->elements().empty() && out.toTuple()->elements()[0].isTensor())
      return new at::Tensor(out.toTuple()->elements()[0].toTensor());
    *err = dup("forward() must return a tensor of logits (or a tuple whose first element is one), got " +
               out.tagKind());
    return nullptr;
  } catch (const std::exception &e) {
    *err = dup(e.what());
    return nullptr;
  }
}

// Calls `cb` for every parameter (buffers == 0) or every buffer (buffers != 0), recursively,
// with dotted names as in PyTorch's state_dict.
int ferry_ts_named(void *m, int buffers, void *data, ferry_named_tensor_cb cb, char **err) {
  try {
    auto *mod = static_cast<torch::jit::Module *>(m);
    if (buffers) {
      for (const auto &b : mod->named_buffers(true)) cb(data, b.name.c_str(), new at::Tensor(b.value));
    } else {
      for (const auto &p : mod->named_parameters(true)) cb(data, p.name.c_str(), new at::Tensor(p.value));
    }
    return 0;
  } catch (const std::exception &e) {
    *err = dup(e.what());
    return -1;
  }
}

// Starts tracing a built-in model: a module holding `tensors` under their state_dict names
// (dotted names become nested submodules; `is_buffer` marks buffers), each read in the graph
// through its attribute, as torch.jit.trace does for a module's parameters, so that the
// saved module carries them as its state_dict instead of as constants. The caller runs
// forward on `input`, then calls ferry_trace_end with the output. Returns the module.
void *ferry_trace_start(const char *const *names, at::Tensor *const *ts, const int *is_buffer, int n,
                        at::Tensor *input, char **err) {
  torch::jit::Module *root = nullptr;
  try {
    if (torch::jit::tracer::isTracing()) throw std::invalid_argument("cannot nest tracing calls");
    static int classes = 0;
    auto fresh = [&]() { return torch::jit::Module("__torch__.ferry.M" + std::to_string(classes++)); };
    root = new torch::jit::Module(fresh());
    // Each tensor's module path, created on first use.
    for (int i = 0; i < n; ++i) {
      std::string name(names[i]);
      torch::jit::Module mod = *root;
      size_t start = 0, dot;
      while ((dot = name.find('.', start)) != std::string::npos) {
        std::string part = name.substr(start, dot - start);
        if (!mod.hasattr(part)) mod.register_module(part, fresh());
        mod = mod.attr(part).toModule();
        start = dot + 1;
      }
      mod.register_parameter(name.substr(start), ts[i]->detach(), is_buffer[i] != 0);
    }
    auto state = std::make_shared<torch::jit::tracer::TracingState>();
    torch::jit::tracer::setTracingState(state);
    auto *self = state->graph->insertInput(0, "self")->setType(root->_ivalue()->type());
    auto *x = state->graph->addInput("x");
    x->setType(torch::jit::TensorType::get());
    state->setValue(*input, x);
    for (int i = 0; i < n; ++i) {
      std::string name(names[i]);
      torch::jit::Value *v = self;
      size_t start = 0, dot;
      while ((dot = name.find('.', start)) != std::string::npos) {
        v = state->graph->insertGetAttr(v, name.substr(start, dot - start));
        start = dot + 1;
      }
      v = state->graph->insertGetAttr(v, name.substr(start));
      state->setValue(*ts[i], v);
    }
    return root;
  } catch (const std::exception &e) {
    torch::jit::tracer::abandon();
    delete root;
    *err = dup(e.what());
    return nullptr;
  }
}

// Ends the trace begun by ferry_trace_start: `output` becomes the result of `forward`.
int ferry_trace_end(void *m, at::Tensor *output, char **err) {
  try {
    auto *mod = static_cast<torch::jit::Module *>(m);
    auto state = torch::jit::tracer::getTracingState();
    if (!state) throw std::invalid_argument("not tracing");
    state->graph->registerOutput(state->getOutput(*output, 0));
    torch::jit::FixupTraceScopeBlocks(state->graph, mod);
    torch::jit::NormalizeOps(state->graph);
    torch::jit::tracer::setTracingState(nullptr);
    auto fn = mod->_ivalue()->compilation_unit()->create_function("forward", state->graph);
    mod->type()->addMethod(fn);
    return 0;
  } catch (const std::exception &e) {
    torch::jit::tracer::abandon();
    *err = dup(e.what());
    return -1;
  }
}

// A module's forward that also returns the outputs of some of its submodules (feature
// distillation's taps), and how many.
struct FerryTaps {
  std::unique_ptr<torch::jit::GraphFunction> fn;
  int n;
};

namespace {
// The dotted path from `self` to the module `v` is, when `v` is a chain of attribute reads.
std::optional<std::string> module_path(torch::jit::Value *v, torch::jit::Value *self) {
  std::vector<std::string> parts;
  while (v != self) {
    torch::jit::Node *node = v->node();
    if (node->kind() != c10::prim::GetAttr) return std::nullopt;
    parts.push_back(node->s(c10::attr::name));
    v = node->input(0);
  }
  std::string path;
  for (auto it = parts.rbegin(); it != parts.rend(); ++it) path += (path.empty() ? "" : ".") + *it;
  return path;
}

bool under(const std::string &name, const std::string &module) {
  return name.size() > module.size() && name.compare(0, module.size(), module) == 0 && name[module.size()] == '.';
}
}  // namespace

// Builds a function that runs the module's forward and returns (its output, the output of
// each submodule `names`, in order). Calls of the model's own methods, and calls into the
// modules on the way to a named one, are inlined, so that its call, and with it its output, appears in the top-level graph; the
// function returns that value as well. A named module must run exactly once, at the top
// level of the (inlined) forward, not inside a branch or a loop.
void *ferry_ts_taps(void *m, const char *const *names, int n, char **err) {
  try {
    auto *mod = static_cast<torch::jit::Module *>(m);
    std::vector<std::string> wanted(names, names + n);
    auto graph = torch::jit::toGraphFunction(mod->get_method("forward").function()).graph()->copy();
    torch::jit::Value *self = graph->inputs().at(0);
    std::vector<torch::jit::Value *> found(n, nullptr);
    for (bool changed = true; changed;) {
      changed = false;
      for (torch::jit::Node *node : graph->nodes()) {
        if (node->kind() != c10::prim::CallMethod) continue;
        auto path = module_path(node->input(0), self);
        if (!path) continue;
        const std::string method = node->s(c10::attr::name);
        // Any method of the model itself (torchvision's forward calls _forward_impl), and
        // any method of a module above a named one, is inlined.
        bool into = path->empty();
        for (const auto &w : wanted) into = into || under(w, *path);
        std::vector<torch::jit::Value *> outs(node->outputs().begin(), node->outputs().end());
        if (into) {
          auto cls = node->input(0)->type()->expect<c10::ClassType>();
          outs = torch::jit::inlineCallTo(node, &torch::jit::toGraphFunction(cls->getMethod(method)));
          changed = true;
        }
        for (int i = 0; i < n; ++i) {
          if (wanted[i] != *path || method != "forward") continue;
          if (outs.size() != 1) throw std::invalid_argument("module `" + wanted[i] + "` returns more than one value");
          if (found[i] && found[i] != outs[0])
            throw std::invalid_argument("module `" + wanted[i] + "` runs more than once in forward; name one that runs once");
          found[i] = outs[0];
        }
        if (changed) break;  // the node list changed under the loop: scan again
      }
    }
    for (int i = 0; i < n; ++i) {
      if (found[i]) continue;
      std::string msg = "no module `" + wanted[i] + "` runs in the model's forward";
      bool exists = false;
      for (const auto &sub : mod->named_modules()) exists = exists || sub.name == wanted[i];
      if (exists) msg = "module `" + wanted[i] + "` does not run at the top level of forward (it runs inside a branch or a loop); name a module around it or inside it";
      throw std::invalid_argument(msg);
    }
    graph->setInsertPoint(graph->return_node());
    std::vector<torch::jit::Value *> outs{graph->outputs().at(0)};
    outs.insert(outs.end(), found.begin(), found.end());
    auto *tuple = graph->insertNode(graph->createTuple(outs));
    graph->eraseOutput(0);
    graph->registerOutput(tuple->output());
    auto name = mod->type()->name()->qualifiedName() + ".__ferry_taps";
    auto *taps = new FerryTaps{std::make_unique<torch::jit::GraphFunction>(name, graph, nullptr), n};
    return taps;
  } catch (const std::exception &e) {
    *err = dup(e.what());
    return nullptr;
  }
}

void ferry_ts_taps_free(void *t) { delete static_cast<FerryTaps *>(t); }

// Runs the function of ferry_ts_taps on `input`: `out[0]` gets the logits (as
// ferry_ts_forward picks them), `out[1..=n]` the submodules' outputs.
int ferry_ts_forward_taps(void *m, void *t, at::Tensor *input, at::Tensor **out, char **err) {
  try {
    auto *mod = static_cast<torch::jit::Module *>(m);
    auto *taps = static_cast<FerryTaps *>(t);
    std::vector<c10::IValue> stack{mod->_ivalue(), *input};
    taps->fn->run(stack);
    auto elems = stack.at(0).toTupleRef().elements();
    c10::IValue first = elems.at(0);
    if (first.isTuple() && !first.toTupleRef().elements().empty()) first = first.toTupleRef().elements()[0];
    if (!first.isTensor()) throw std::invalid_argument("forward() must return a tensor of logits, got " + first.tagKind());
    for (int i = 1; i <= taps->n; ++i)
      if (!elems.at(i).isTensor()) throw std::invalid_argument("a distilled module returns a " + elems.at(i).tagKind() + ", not a tensor");
    out[0] = new at::Tensor(first.toTensor());
    for (int i = 1; i <= taps->n; ++i) out[i] = new at::Tensor(elems[i].toTensor());
    return 0;
  } catch (const std::exception &e) {
    *err = dup(e.what());
    return -1;
  }
}

int ferry_ts_save(void *m, const char *path, char **err) {
  try {
    static_cast<torch::jit::Module *>(m)->save(path);
    return 0;
  } catch (const std::exception &e) {
    *err = dup(e.what());
    return -1;
  }
}
}
