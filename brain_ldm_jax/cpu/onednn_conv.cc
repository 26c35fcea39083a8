// oneDNN convolutions (and, further down, weight-bound convolutions and matmuls through oneDNN's
// sgemm) as XLA FFI custom calls, for XLA:CPU.
//
// XLA:CPU's own 3D convolution (and the 2D convolutions our exact rewrites use) reaches 20-50 % of
// the GEMM peak at 16-64 channels; oneDNN's direct convolution kernels reach 90-120 % (see
// brain_ldm_jax/cpu/onednn.py). One handler serves the three passes of a convolution:
//
//   pass 0 (forward):         a = x  (N, *S, Ci), b = w  (*K, Ci, Co), bias (Co) -> y (N, *S', Co)
//   pass 1 (input gradient):  a = dy (N, *S', Co), b = w                    -> dx (N, *S, Ci)
//   pass 2 (kernel gradient): a = x,  b = dy                        -> dw (*K, Ci, Co), dbias (Co)
//
// The bias rides along because oneDNN adds it (and sums its gradient) inside the convolution's own
// loops: done in XLA, each is one more pass over a full-size tensor, and the bias gradient's
// reduction kept a full-size buffer of its own alive at the autoencoder's memory peak.
//
// Activations are channels-last (oneDNN's "nxc") outside the call; with the `blocked` attribute
// the call reorders them to and from the layout oneDNN picks (onednn.py says when). The kernel is
// reordered to the layout the chosen oneDNN implementation wants on every call (it changes every
// training step, and the reorder is small beside the convolution), except where the forward pass
// has `kernel_ready`: then b is already in that layout, made by the second handler here
// (BldmOnednnPrepareKernel) from the kernel alone, so that XLA can hoist it out of a sampler's loop.
// Primitives are built once per problem and cached.
//
// The library is not linked: Python passes the path of libdnnl.so to BldmOnednnLoad, which resolves
// the few C API functions used here. The declarations below are oneDNN's v3 C API (dnnl.h), whose
// enum values have been stable since v1.

#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace {

// ---- oneDNN v3 C API: the subset used, resolved with dlsym. ----
typedef int dnnl_status_t;  // dnnl_success = 0
typedef int64_t dnnl_dims_t[12];
typedef struct dnnl_engine* dnnl_engine_t;
typedef struct dnnl_stream* dnnl_stream_t;
typedef struct dnnl_memory_desc* dnnl_memory_desc_t;
typedef const struct dnnl_memory_desc* const_dnnl_memory_desc_t;
typedef struct dnnl_memory* dnnl_memory_t;
typedef struct dnnl_primitive_desc* dnnl_primitive_desc_t;
typedef const struct dnnl_primitive_desc* const_dnnl_primitive_desc_t;
typedef struct dnnl_primitive* dnnl_primitive_t;
typedef const struct dnnl_primitive* const_dnnl_primitive_t;
typedef struct dnnl_primitive_attr* dnnl_primitive_attr_t;
typedef const struct dnnl_primitive_attr* const_dnnl_primitive_attr_t;
typedef struct {
  int arg;
  dnnl_memory_t memory;
} dnnl_exec_arg_t;

constexpr int kCpuEngine = 1;            // dnnl_cpu
constexpr unsigned kStreamInOrder = 1;   // dnnl_stream_in_order
constexpr int kF32 = 3;                  // dnnl_f32
constexpr int kFormatAny = 1;            // dnnl_format_tag_any
constexpr int kForwardTraining = 64;     // dnnl_forward_training
constexpr int kConvolutionDirect = 1;    // dnnl_convolution_direct
constexpr int kQueryExecArgMd = 255;     // dnnl_query_exec_arg_md
constexpr int kScratchpadModeUser = 1;   // dnnl_scratchpad_mode_user
constexpr int kArgSrc = 1, kArgDst = 17, kArgWeights = 33, kArgBias = 41, kArgScratchpad = 80;
constexpr int kArgDiffSrc = 129, kArgDiffDst = 145, kArgDiffWeights = 161, kArgDiffBias = 169;
void* const kNoHandle = nullptr;  // DNNL_MEMORY_NONE

struct Dnnl {
  dnnl_status_t (*engine_create)(dnnl_engine_t*, int, size_t);
  dnnl_status_t (*stream_create)(dnnl_stream_t*, dnnl_engine_t, unsigned);
  dnnl_status_t (*stream_wait)(dnnl_stream_t);
  dnnl_status_t (*memory_desc_create_with_strides)(dnnl_memory_desc_t*, int, const dnnl_dims_t,
                                                   int, const dnnl_dims_t);
  dnnl_status_t (*memory_desc_create_with_tag)(dnnl_memory_desc_t*, int, const dnnl_dims_t, int,
                                               int);
  int (*memory_desc_equal)(const_dnnl_memory_desc_t, const_dnnl_memory_desc_t);
  size_t (*memory_desc_get_size)(const_dnnl_memory_desc_t);
  dnnl_status_t (*memory_create)(dnnl_memory_t*, const_dnnl_memory_desc_t, dnnl_engine_t, void*);
  dnnl_status_t (*memory_destroy)(dnnl_memory_t);
  dnnl_status_t (*primitive_attr_create)(dnnl_primitive_attr_t*);
  dnnl_status_t (*primitive_attr_set_scratchpad_mode)(dnnl_primitive_attr_t, int);
  dnnl_status_t (*convolution_forward_primitive_desc_create)(
      dnnl_primitive_desc_t*, dnnl_engine_t, int, int, const_dnnl_memory_desc_t,
      const_dnnl_memory_desc_t, const_dnnl_memory_desc_t, const_dnnl_memory_desc_t,
      const dnnl_dims_t, const dnnl_dims_t, const dnnl_dims_t, const dnnl_dims_t,
      const_dnnl_primitive_attr_t);
  dnnl_status_t (*convolution_backward_data_primitive_desc_create)(
      dnnl_primitive_desc_t*, dnnl_engine_t, int, const_dnnl_memory_desc_t,
      const_dnnl_memory_desc_t, const_dnnl_memory_desc_t, const dnnl_dims_t, const dnnl_dims_t,
      const dnnl_dims_t, const dnnl_dims_t, const_dnnl_primitive_desc_t,
      const_dnnl_primitive_attr_t);
  dnnl_status_t (*convolution_backward_weights_primitive_desc_create)(
      dnnl_primitive_desc_t*, dnnl_engine_t, int, const_dnnl_memory_desc_t,
      const_dnnl_memory_desc_t, const_dnnl_memory_desc_t, const_dnnl_memory_desc_t,
      const dnnl_dims_t, const dnnl_dims_t, const dnnl_dims_t, const dnnl_dims_t,
      const_dnnl_primitive_desc_t, const_dnnl_primitive_attr_t);
  dnnl_status_t (*reorder_primitive_desc_create)(dnnl_primitive_desc_t*, const_dnnl_memory_desc_t,
                                                 dnnl_engine_t, const_dnnl_memory_desc_t,
                                                 dnnl_engine_t, const_dnnl_primitive_attr_t);
  const_dnnl_memory_desc_t (*primitive_desc_query_md)(const_dnnl_primitive_desc_t, int, int);
  dnnl_status_t (*primitive_create)(dnnl_primitive_t*, const_dnnl_primitive_desc_t);
  dnnl_status_t (*primitive_execute)(const_dnnl_primitive_t, dnnl_stream_t, int,
                                     const dnnl_exec_arg_t*);
  dnnl_status_t (*sgemm)(char, char, int64_t, int64_t, int64_t, float, const float*, int64_t,
                         const float*, int64_t, float, float*, int64_t);
  dnnl_engine_t engine = nullptr;
};

Dnnl* g_dnnl = nullptr;

template <typename Fn>
bool Resolve(void* lib, const char* name, Fn* fn, std::string* missing) {
  *fn = reinterpret_cast<Fn>(dlsym(lib, name));
  if (*fn == nullptr) *missing += std::string(" ") + name;
  return *fn != nullptr;
}

// ---- One convolution problem and its cached primitives. ----

struct Problem {
  int64_t pass, n, ci, co;
  int64_t blocked;  // activations in oneDNN's own layout inside the call (else channels-last)
  std::vector<int64_t> in_sp, k_sp, out_sp, strides, pad_lo, pad_hi;

  int nsp() const { return static_cast<int>(in_sp.size()); }
  std::vector<int64_t> Key() const {
    std::vector<int64_t> key = {pass, n, ci, co, blocked};
    for (const auto* v : {&in_sp, &k_sp, &out_sp, &strides, &pad_lo, &pad_hi})
      key.insert(key.end(), v->begin(), v->end());
    return key;
  }
};

// Channels-last activations (N, *S, C) described with oneDNN's logical (N, C, *S) dims.
dnnl_memory_desc_t ActivationMd(int64_t n, int64_t c, const std::vector<int64_t>& sp) {
  dnnl_dims_t dims = {}, strides = {};
  int nd = 2 + static_cast<int>(sp.size());
  dims[0] = n;
  dims[1] = c;
  int64_t stride = c;
  for (int i = static_cast<int>(sp.size()) - 1; i >= 0; --i) {
    dims[2 + i] = sp[i];
    strides[2 + i] = stride;
    stride *= sp[i];
  }
  strides[1] = 1;
  strides[0] = stride;
  dnnl_memory_desc_t md = nullptr;
  g_dnnl->memory_desc_create_with_strides(&md, nd, dims, kF32, strides);
  return md;
}

// Our (*K, Ci, Co) kernel described with oneDNN's logical (Co, Ci, *K) dims.
dnnl_memory_desc_t KernelMd(const Problem& p) {
  dnnl_dims_t dims = {}, strides = {};
  int nd = 2 + p.nsp();
  dims[0] = p.co;
  dims[1] = p.ci;
  strides[0] = 1;
  strides[1] = p.co;
  int64_t stride = p.ci * p.co;
  for (int i = p.nsp() - 1; i >= 0; --i) {
    dims[2 + i] = p.k_sp[i];
    strides[2 + i] = stride;
    stride *= p.k_sp[i];
  }
  dnnl_memory_desc_t md = nullptr;
  g_dnnl->memory_desc_create_with_strides(&md, nd, dims, kF32, strides);
  return md;
}

dnnl_memory_desc_t AnyKernelMd(const Problem& p) {
  dnnl_dims_t dims = {};
  dims[0] = p.co;
  dims[1] = p.ci;
  for (int i = 0; i < p.nsp(); ++i) dims[2 + i] = p.k_sp[i];
  dnnl_memory_desc_t md = nullptr;
  g_dnnl->memory_desc_create_with_tag(&md, 2 + p.nsp(), dims, kF32, kFormatAny);
  return md;
}

// An activation operand or result in the implementation's own layout, when it is not ours.
struct ActivationReorder {
  dnnl_primitive_t prim = nullptr;  // ours -> the implementation's (operands) or back (results)
  const_dnnl_memory_desc_t impl_md = nullptr;
  size_t bytes = 0;
};

struct Plan {
  dnnl_primitive_t conv = nullptr;
  ActivationReorder a_reorder, b_reorder, out_reorder;
  // Between our kernel layout and the implementation's (null when they agree).
  dnnl_primitive_t kernel_reorder = nullptr;
  const_dnnl_memory_desc_t user_kernel_md = nullptr, impl_kernel_md = nullptr;
  const_dnnl_memory_desc_t a_md = nullptr, out_md = nullptr, b_md = nullptr, scratch_md = nullptr;
  const_dnnl_memory_desc_t bias_md = nullptr;
  size_t impl_kernel_bytes = 0, scratch_bytes = 0;
};

std::string Status(const char* what, dnnl_status_t s) {
  return std::string("oneDNN ") + what + " failed with status " + std::to_string(s);
}

// Activations of any layout: the implementation picks (a blocked one, for the "jit" kernels).
dnnl_memory_desc_t AnyActivationMd(int64_t n, int64_t c, const std::vector<int64_t>& sp) {
  dnnl_dims_t dims = {n, c};
  for (size_t i = 0; i < sp.size(); ++i) dims[2 + i] = sp[i];
  dnnl_memory_desc_t md = nullptr;
  int nd = 2 + static_cast<int>(sp.size());
  g_dnnl->memory_desc_create_with_tag(&md, nd, dims, kF32, kFormatAny);
  return md;
}

// The reorder between our layout (`user_md`) and the one `pd` chose for `arg`, if they differ:
// into the implementation's layout for an operand, out of it for the result.
std::string ActivationPlan(const_dnnl_primitive_desc_t pd, int arg,
                           const_dnnl_memory_desc_t user_md, bool operand, ActivationReorder* r) {
  Dnnl& d = *g_dnnl;
  const_dnnl_memory_desc_t impl = d.primitive_desc_query_md(pd, kQueryExecArgMd, arg);
  if (impl == nullptr || d.memory_desc_equal(impl, user_md)) return "";
  const_dnnl_memory_desc_t from = operand ? user_md : impl, to = operand ? impl : user_md;
  dnnl_primitive_desc_t rpd = nullptr;
  dnnl_status_t s = d.reorder_primitive_desc_create(&rpd, from, d.engine, to, d.engine, nullptr);
  if (s != 0) return Status("activation reorder descriptor", s);
  s = d.primitive_create(&r->prim, rpd);
  if (s != 0) return Status("activation reorder primitive", s);
  r->impl_md = impl;
  r->bytes = d.memory_desc_get_size(impl);
  return "";
}

// Builds the primitives for one problem; returns an error message, empty on success.
std::string BuildPlan(const Problem& p, Plan* plan) {
  Dnnl& d = *g_dnnl;
  dnnl_dims_t strides = {}, dilates = {}, pad_l = {}, pad_r = {};
  for (int i = 0; i < p.nsp(); ++i) {
    strides[i] = p.strides[i];
    pad_l[i] = p.pad_lo[i];
    pad_r[i] = p.pad_hi[i];
  }
  dnnl_memory_desc_t x_md = ActivationMd(p.n, p.ci, p.in_sp);
  dnnl_memory_desc_t y_md = ActivationMd(p.n, p.co, p.out_sp);
  const bool blocked = p.blocked != 0;
  dnnl_memory_desc_t x_conv = blocked ? AnyActivationMd(p.n, p.ci, p.in_sp) : x_md;
  dnnl_memory_desc_t y_conv = blocked ? AnyActivationMd(p.n, p.co, p.out_sp) : y_md;
  dnnl_memory_desc_t any_k = AnyKernelMd(p);
  dnnl_memory_desc_t user_k = KernelMd(p);
  dnnl_memory_desc_t bias_md = nullptr;
  dnnl_dims_t bias_dims = {p.co}, bias_strides = {1};
  d.memory_desc_create_with_strides(&bias_md, 1, bias_dims, kF32, bias_strides);
  plan->bias_md = bias_md;
  dnnl_primitive_attr_t attr = nullptr;
  d.primitive_attr_create(&attr);
  d.primitive_attr_set_scratchpad_mode(attr, kScratchpadModeUser);

  // The forward descriptor is needed by all passes (as the backward passes' hint).
  dnnl_primitive_desc_t fwd = nullptr;
  dnnl_status_t s = d.convolution_forward_primitive_desc_create(
      &fwd, d.engine, kForwardTraining, kConvolutionDirect, x_conv, any_k, bias_md, y_conv, strides,
      dilates, pad_l, pad_r, attr);
  if (s != 0) return Status("convolution forward descriptor", s);
  dnnl_primitive_desc_t pd = fwd;
  int kernel_arg = kArgWeights;
  if (p.pass == 1) {
    s = d.convolution_backward_data_primitive_desc_create(
        &pd, d.engine, kConvolutionDirect, x_conv, any_k, y_conv, strides, dilates, pad_l, pad_r,
        fwd, attr);
    if (s != 0) return Status("convolution input-gradient descriptor", s);
  } else if (p.pass == 2) {
    s = d.convolution_backward_weights_primitive_desc_create(
        &pd, d.engine, kConvolutionDirect, x_conv, any_k, bias_md, y_conv, strides, dilates, pad_l,
        pad_r, fwd, attr);
    if (s != 0) return Status("convolution kernel-gradient descriptor", s);
    kernel_arg = kArgDiffWeights;
  }
  s = d.primitive_create(&plan->conv, pd);
  if (s != 0) return Status("convolution primitive", s);

  plan->impl_kernel_md = d.primitive_desc_query_md(pd, kQueryExecArgMd, kernel_arg);
  plan->user_kernel_md = user_k;
  plan->impl_kernel_bytes = d.memory_desc_get_size(plan->impl_kernel_md);
  plan->scratch_md = d.primitive_desc_query_md(pd, kQueryExecArgMd, kArgScratchpad);
  plan->scratch_bytes = plan->scratch_md ? d.memory_desc_get_size(plan->scratch_md) : 0;
  plan->a_md = p.pass == 1 ? y_md : x_md;
  plan->b_md = y_md;  // pass 2's second operand (dy)
  plan->out_md = p.pass == 0 ? y_md : x_md;
  const int a_arg = p.pass == 1 ? kArgDiffDst : kArgSrc;
  std::string err = ActivationPlan(pd, a_arg, plan->a_md, true, &plan->a_reorder);
  if (err.empty() && p.pass == 2) {
    err = ActivationPlan(pd, kArgDiffDst, plan->b_md, true, &plan->b_reorder);
  }
  if (err.empty() && p.pass != 2) {
    const int out_arg = p.pass == 0 ? kArgDst : kArgDiffSrc;
    err = ActivationPlan(pd, out_arg, plan->out_md, false, &plan->out_reorder);
  }
  if (!err.empty()) return err;

  if (!d.memory_desc_equal(plan->impl_kernel_md, user_k)) {
    dnnl_primitive_desc_t rpd = nullptr;
    s = p.pass == 2 ? d.reorder_primitive_desc_create(&rpd, plan->impl_kernel_md, d.engine, user_k,
                                                      d.engine, nullptr)
                    : d.reorder_primitive_desc_create(&rpd, user_k, d.engine,
                                                      plan->impl_kernel_md, d.engine, nullptr);
    if (s != 0) return Status("kernel reorder descriptor", s);
    s = d.primitive_create(&plan->kernel_reorder, rpd);
    if (s != 0) return Status("kernel reorder primitive", s);
  }
  return "";
}

// 64-byte aligned blocks for the scratchpad and the reordered kernel, reused across calls. A block
// this large (the paper UNet's reordered kernels reach 127 MB) allocated per call is a fresh mmap
// whose pages the kernel faults in and zeroes every time: 70 thousand page faults and 10-20 % of
// a paper-width UNet forward. The pool keeps as many blocks as calls ever ran at once.
class BlockPool {
 public:
  struct Block {
    void* ptr = nullptr;
    size_t size = 0;
  };
  Block Take(size_t bytes) {
    if (bytes == 0) return {};
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(bytes);  // the smallest free block that fits
      if (it != free_.end()) {
        Block b{it->second, it->first};
        free_.erase(it);
        return b;
      }
    }
    size_t size = (bytes + 63) / 64 * 64;
    return {std::aligned_alloc(64, size), size};
  }
  void Give(Block b) {
    if (b.ptr == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace(b.size, b.ptr);
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
};

BlockPool g_blocks;

// A block of the pool for the length of one call.
struct PooledBlock {
  explicit PooledBlock(size_t bytes) : block(g_blocks.Take(bytes)) {}
  ~PooledBlock() { g_blocks.Give(block); }
  PooledBlock(const PooledBlock&) = delete;
  PooledBlock& operator=(const PooledBlock&) = delete;
  BlockPool::Block block;
};

struct Memory {
  Memory(const_dnnl_memory_desc_t md, void* data) {
    g_dnnl->memory_create(&mem, md, g_dnnl->engine, data);
  }
  ~Memory() {
    if (mem) g_dnnl->memory_destroy(mem);
  }
  dnnl_memory_t mem = nullptr;
};

// Reorders the operand at *data (layout *md) into `impl` and points both at the copy, when `r`
// says the implementation wants another layout.
std::string ReorderOperand(const ActivationReorder& r, dnnl_stream_t stream, void** data,
                           const_dnnl_memory_desc_t* md, void* impl) {
  if (r.prim == nullptr) return "";
  Memory from(*md, *data), to(r.impl_md, impl);
  dnnl_exec_arg_t args[] = {{kArgSrc, from.mem}, {kArgDst, to.mem}};
  dnnl_status_t s = g_dnnl->primitive_execute(r.prim, stream, 2, args);
  if (s != 0) return Status("activation reorder", s);
  *data = impl;
  *md = r.impl_md;
  return "";
}

// `bias` is pass 0's bias and pass 2's bias gradient; unused by pass 1. With `kernel_ready`
// (pass 0 only) b is the kernel in the implementation's layout already.
std::string Execute(const Plan& plan, const Problem& p, void* a, void* b, void* bias, void* out,
                    bool kernel_ready) {
  Dnnl& d = *g_dnnl;
  dnnl_stream_t stream = nullptr;
  thread_local dnnl_stream_t tls_stream = nullptr;
  if (tls_stream == nullptr) d.stream_create(&tls_stream, d.engine, kStreamInOrder);
  stream = tls_stream;

  const bool reorder_kernel = plan.kernel_reorder && !kernel_ready;
  PooledBlock scratch(plan.scratch_bytes);
  PooledBlock impl_kernel(reorder_kernel ? plan.impl_kernel_bytes : 0);
  void* kernel_user = p.pass == 2 ? out : b;
  void* kernel_impl = reorder_kernel ? impl_kernel.block.ptr : kernel_user;
  Memory user_k(plan.user_kernel_md, kernel_user);
  Memory impl_k(plan.impl_kernel_md, kernel_impl);
  Memory scratch_m(plan.scratch_md, scratch.block.ptr);

  if (reorder_kernel && p.pass != 2) {
    dnnl_exec_arg_t args[] = {{kArgSrc, user_k.mem}, {kArgDst, impl_k.mem}};
    dnnl_status_t s = d.primitive_execute(plan.kernel_reorder, stream, 2, args);
    if (s != 0) return Status("kernel reorder", s);
  }
  dnnl_status_t s;
  // Activations in the implementation's layout, where it is not ours.
  PooledBlock a_impl(plan.a_reorder.bytes), b_impl(plan.b_reorder.bytes);
  PooledBlock out_impl(plan.out_reorder.bytes);
  const_dnnl_memory_desc_t a_md = plan.a_md, b_md = plan.b_md, out_md = plan.out_md;
  std::string err = ReorderOperand(plan.a_reorder, stream, &a, &a_md, a_impl.block.ptr);
  if (err.empty()) err = ReorderOperand(plan.b_reorder, stream, &b, &b_md, b_impl.block.ptr);
  if (!err.empty()) return err;
  void* user_out = out;
  if (plan.out_reorder.prim) {
    out = out_impl.block.ptr;
    out_md = plan.out_reorder.impl_md;
  }
  if (p.pass == 0) {
    Memory x(a_md, a), y(out_md, out), bias_m(plan.bias_md, bias);
    dnnl_exec_arg_t args[] = {{kArgSrc, x.mem}, {kArgWeights, impl_k.mem}, {kArgBias, bias_m.mem},
                              {kArgDst, y.mem}, {kArgScratchpad, scratch_m.mem}};
    s = d.primitive_execute(plan.conv, stream, 5, args);
  } else if (p.pass == 1) {
    Memory dy(a_md, a), dx(out_md, out);
    dnnl_exec_arg_t args[] = {{kArgDiffDst, dy.mem}, {kArgWeights, impl_k.mem},
                              {kArgDiffSrc, dx.mem}, {kArgScratchpad, scratch_m.mem}};
    s = d.primitive_execute(plan.conv, stream, 4, args);
  } else {
    Memory x(a_md, a), dy(b_md, b), dbias(plan.bias_md, bias);
    dnnl_exec_arg_t args[] = {{kArgSrc, x.mem}, {kArgDiffDst, dy.mem},
                              {kArgDiffWeights, impl_k.mem}, {kArgDiffBias, dbias.mem},
                              {kArgScratchpad, scratch_m.mem}};
    s = d.primitive_execute(plan.conv, stream, 5, args);
  }
  if (s != 0) return Status("convolution", s);
  if (plan.out_reorder.prim) {
    Memory from(out_md, out), to(plan.out_md, user_out);
    dnnl_exec_arg_t args[] = {{kArgSrc, from.mem}, {kArgDst, to.mem}};
    s = d.primitive_execute(plan.out_reorder.prim, stream, 2, args);
    if (s != 0) return Status("activation reorder", s);
  }
  if (plan.kernel_reorder && p.pass == 2) {
    dnnl_exec_arg_t args[] = {{kArgSrc, impl_k.mem}, {kArgDst, user_k.mem}};
    s = d.primitive_execute(plan.kernel_reorder, stream, 2, args);
    if (s != 0) return Status("kernel-gradient reorder", s);
  }
  s = d.stream_wait(stream);
  return s != 0 ? Status("stream wait", s) : "";
}

std::mutex g_plans_mu;
std::map<std::vector<int64_t>, std::unique_ptr<Plan>>* g_plans = nullptr;

namespace ffi = xla::ffi;

std::vector<int64_t> ToVector(ffi::Span<const int64_t> s) {
  return std::vector<int64_t>(s.begin(), s.end());
}

// The problem the attributes describe, for `pass`; an error when they disagree.
ffi::Error MakeProblem(int64_t pass, int64_t blocked, ffi::Span<const int64_t> x_shape,
                       ffi::Span<const int64_t> kernel_shape, ffi::Span<const int64_t> y_shape,
                       ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                       ffi::Span<const int64_t> pad_hi, Problem* p) {
  size_t nsp = x_shape.size() - 2;
  if (pass < 0 || pass > 2 || nsp < 1 || nsp > 3 || kernel_shape.size() != nsp + 2 ||
      y_shape.size() != nsp + 2 || strides.size() != nsp || pad_lo.size() != nsp ||
      pad_hi.size() != nsp) {
    return ffi::Error::InvalidArgument("oneDNN convolution: inconsistent problem attributes");
  }
  p->pass = pass;
  p->blocked = blocked;
  p->n = x_shape[0];
  p->ci = x_shape[nsp + 1];
  p->co = y_shape[nsp + 1];
  p->in_sp.assign(x_shape.begin() + 1, x_shape.begin() + 1 + nsp);
  p->out_sp.assign(y_shape.begin() + 1, y_shape.begin() + 1 + nsp);
  p->k_sp.assign(kernel_shape.begin(), kernel_shape.begin() + nsp);
  p->strides = ToVector(strides);
  p->pad_lo = ToVector(pad_lo);
  p->pad_hi = ToVector(pad_hi);
  return ffi::Error::Success();
}

// The problem the attributes describe, and its cached plan (built on first use).
ffi::Error FindPlan(int64_t pass, int64_t blocked, ffi::Span<const int64_t> x_shape,
                    ffi::Span<const int64_t> kernel_shape, ffi::Span<const int64_t> y_shape,
                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                    ffi::Span<const int64_t> pad_hi, Problem* p, Plan** plan) {
  if (g_dnnl == nullptr) {
    return ffi::Error::Internal("oneDNN convolution called before BldmOnednnLoad");
  }
  ffi::Error error =
      MakeProblem(pass, blocked, x_shape, kernel_shape, y_shape, strides, pad_lo, pad_hi, p);
  if (error.failure()) return error;
  std::lock_guard<std::mutex> lock(g_plans_mu);
  if (g_plans == nullptr) g_plans = new std::map<std::vector<int64_t>, std::unique_ptr<Plan>>;
  auto key = p->Key();
  auto it = g_plans->find(key);
  if (it == g_plans->end()) {
    auto fresh = std::make_unique<Plan>();
    std::string err = BuildPlan(*p, fresh.get());
    if (!err.empty()) return ffi::Error::Internal(err);
    it = g_plans->emplace(key, std::move(fresh)).first;
  }
  *plan = it->second.get();
  return ffi::Error::Success();
}

// A prepared kernel's buffer (sized by BldmOnednnPreparedKernelBytes) must hold the layout.
ffi::Error CheckPreparedSize(const Plan& plan, size_t buffer_bytes) {
  if (buffer_bytes >= plan.impl_kernel_bytes) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(
      "oneDNN convolution: the implementation's kernel layout takes " +
      std::to_string(plan.impl_kernel_bytes) + " bytes, more than the prepared kernel's " +
      std::to_string(buffer_bytes));
}

ffi::Error Convolution(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::RemainingArgs extra_args, ffi::ResultBuffer<ffi::F32> out,
                       ffi::RemainingRets extra_rets, int64_t pass, int64_t blocked,
                       int64_t kernel_ready, ffi::Span<const int64_t> x_shape,
                       ffi::Span<const int64_t> kernel_shape, ffi::Span<const int64_t> y_shape,
                       ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                       ffi::Span<const int64_t> pad_hi) {
  if (kernel_ready && pass != 0) {
    return ffi::Error::InvalidArgument("oneDNN convolution: kernel_ready is for the forward pass");
  }
  Problem p;
  Plan* plan = nullptr;
  ffi::Error error = FindPlan(pass, blocked, x_shape, kernel_shape, y_shape, strides, pad_lo,
                              pad_hi, &p, &plan);
  if (error.failure()) return error;
  if (kernel_ready) {
    error = CheckPreparedSize(*plan, b.size_bytes());
    if (error.failure()) return error;
  }
  // Pass 0 takes the bias as a third operand; pass 2 returns the bias gradient second.
  void* bias = nullptr;
  if (pass == 0) {
    auto arg = extra_args.get<ffi::Buffer<ffi::F32>>(0);
    if (arg.has_error()) return arg.error();
    bias = arg->untyped_data();
  } else if (pass == 2) {
    auto ret = extra_rets.get<ffi::Buffer<ffi::F32>>(0);
    if (ret.has_error()) return ret.error();
    bias = (*ret)->untyped_data();
  }
  std::string err = Execute(*plan, p, a.untyped_data(), b.untyped_data(), bias,
                            out->untyped_data(), kernel_ready != 0);
  if (!err.empty()) return ffi::Error::Internal(err);
  return ffi::Error::Success();
}

// The forward pass's kernel in the layout its implementation wants (for `kernel_ready`).
ffi::Error PrepareKernel(ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> out,
                         int64_t blocked, ffi::Span<const int64_t> x_shape,
                         ffi::Span<const int64_t> kernel_shape, ffi::Span<const int64_t> y_shape,
                         ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                         ffi::Span<const int64_t> pad_hi) {
  Problem p;
  Plan* plan = nullptr;
  ffi::Error error = FindPlan(0, blocked, x_shape, kernel_shape, y_shape, strides, pad_lo, pad_hi,
                              &p, &plan);
  if (error.failure()) return error;
  error = CheckPreparedSize(*plan, out->size_bytes());
  if (error.failure()) return error;
  if (plan->kernel_reorder == nullptr) {
    std::memcpy(out->untyped_data(), kernel.untyped_data(), plan->impl_kernel_bytes);
    return ffi::Error::Success();
  }
  Dnnl& d = *g_dnnl;
  thread_local dnnl_stream_t stream = nullptr;
  if (stream == nullptr) d.stream_create(&stream, d.engine, kStreamInOrder);
  Memory user_k(plan->user_kernel_md, kernel.untyped_data());
  Memory impl_k(plan->impl_kernel_md, out->untyped_data());
  dnnl_exec_arg_t args[] = {{kArgSrc, user_k.mem}, {kArgDst, impl_k.mem}};
  dnnl_status_t s = d.primitive_execute(plan->kernel_reorder, stream, 2, args);
  if (s == 0) s = d.stream_wait(stream);
  if (s != 0) return ffi::Error::Internal(Status("kernel reorder", s));
  return ffi::Error::Success();
}

}  // namespace

// The bytes of a forward pass's kernel in its implementation's layout (oneDNN may pad it), for
// onednn.py to size a prepared kernel when it traces; -1 when the problem has no plan.
extern "C" __attribute__((visibility("default"))) int64_t BldmOnednnPreparedKernelBytes(
    int64_t blocked, int64_t nsp, const int64_t* x_shape, const int64_t* kernel_shape,
    const int64_t* y_shape, const int64_t* strides, const int64_t* pad_lo,
    const int64_t* pad_hi) {
  using Ints = xla::ffi::Span<const int64_t>;
  const size_t rank = static_cast<size_t>(nsp) + 2, n = static_cast<size_t>(nsp);
  Problem p;
  Plan* plan = nullptr;
  xla::ffi::Error error = FindPlan(0, blocked, Ints(x_shape, rank), Ints(kernel_shape, rank),
                                   Ints(y_shape, rank), Ints(strides, n), Ints(pad_lo, n),
                                   Ints(pad_hi, n), &p, &plan);
  return error.failure() ? -1 : static_cast<int64_t>(plan->impl_kernel_bytes);
}

// Defines the handler `name`, exported although the library is built with hidden visibility:
// the handlers are its interface.
#define BLDM_EXPORTED_HANDLER(name, impl, ...)                                           \
  extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* name(                 \
      XLA_FFI_CallFrame* call_frame);                                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl, __VA_ARGS__)

// The attributes after which both handlers take a convolution problem's shapes.
template <typename Binding>
auto WithProblemShapes(Binding binding) {
  using Shape = xla::ffi::Span<const int64_t>;
  return std::move(binding)
      .template Attr<Shape>("x_shape")
      .template Attr<Shape>("kernel_shape")
      .template Attr<Shape>("y_shape")
      .template Attr<Shape>("strides")
      .template Attr<Shape>("pad_lo")
      .template Attr<Shape>("pad_hi");
}

// The binding of both convolution handlers (this one and `patches`' below): a and b, the bias as
// a third operand (forward) or a second result (kernel gradient), then the problem's attributes.
auto ConvolutionBinding() {
  return WithProblemShapes(xla::ffi::Ffi::Bind()
                               .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                               .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                               .RemainingArgs()
                               .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                               .RemainingRets()
                               .Attr<int64_t>("pass_")
                               .Attr<int64_t>("blocked")
                               .Attr<int64_t>("kernel_ready"));
}

BLDM_EXPORTED_HANDLER(BldmOnednnConvolution, Convolution, ConvolutionBinding());

BLDM_EXPORTED_HANDLER(BldmOnednnPrepareKernel, PrepareKernel,
                      WithProblemShapes(xla::ffi::Ffi::Bind()
                                            .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                            .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                            .Attr<int64_t>("blocked")));

// ---- Matrix products: oneDNN's sgemm. ----
//
// c = op(a) @ op(b), row-major, where an operand of rank > 2 is the matrix of its leading dims
// (rows) by its last (columns), and op transposes it when `trans_a` / `trans_b` is set. A dense
// layer's forward pass is a @ b, its input gradient dy @ b^T, its kernel gradient a^T @ dy.
// `contraction` (the length summed over) is checked here and read by onednn.hlo_flops.

namespace {

xla::ffi::Error Matmul(xla::ffi::Buffer<xla::ffi::F32> a, xla::ffi::Buffer<xla::ffi::F32> b,
                       xla::ffi::ResultBuffer<xla::ffi::F32> c, int64_t trans_a,
                       int64_t trans_b, int64_t contraction) {
  auto matrix = [](const auto& x, int64_t* rows, int64_t* cols) {
    auto dims = x.dimensions();
    *cols = dims.size() ? dims[dims.size() - 1] : 1;
    *rows = *cols ? static_cast<int64_t>(x.element_count()) / *cols : 0;
  };
  int64_t a_rows, a_cols, b_rows, b_cols;
  matrix(a, &a_rows, &a_cols);
  matrix(b, &b_rows, &b_cols);
  const int64_t m = trans_a ? a_cols : a_rows, k = trans_a ? a_rows : a_cols;
  const int64_t n = trans_b ? b_rows : b_cols, kb = trans_b ? b_cols : b_rows;
  if (k != kb || k != contraction || static_cast<int64_t>(c->element_count()) != m * n) {
    return xla::ffi::Error::InvalidArgument(
        "oneDNN matmul: operands (" + std::to_string(m) + " x " + std::to_string(k) + ") @ (" +
        std::to_string(kb) + " x " + std::to_string(n) + ") and a result of " +
        std::to_string(c->element_count()) + " elements (contraction " +
        std::to_string(contraction) + ") do not agree");
  }
  if (m == 0 || n == 0) return xla::ffi::Error::Success();
  if (k == 0) {
    std::memset(c->untyped_data(), 0, c->size_bytes());
    return xla::ffi::Error::Success();
  }
  dnnl_status_t s = g_dnnl->sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, 1.0f,
                                  a.typed_data(), a_cols, b.typed_data(), b_cols, 0.0f,
                                  c->typed_data(), n);
  if (s != 0) return xla::ffi::Error::Internal(Status("sgemm", s));
  return xla::ffi::Error::Success();
}

}  // namespace

BLDM_EXPORTED_HANDLER(BldmOnednnMatmul, Matmul,
                      xla::ffi::Ffi::Bind()
                          .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                          .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                          .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                          .Attr<int64_t>("trans_a")
                          .Attr<int64_t>("trans_b")
                          .Attr<int64_t>("contraction"));

// ---- Weight-bound convolutions: the input's tap slices and one sgemm. ----
//
// Where the kernel outweighs the input (the `patches` lowering: the paper UNet's 768-channel
// levels at batch 1), a convolution is one matrix product with the kernel as stored,
// (N * output voxels, taps * Ci) @ (taps * Ci, Co): oneDNN's direct convolution would reorder the
// 64 MB kernel in every pass. The rows (each output voxel's taps, "im2col") are gathered here into
// a pooled buffer; in XLA the 27 slices and their concatenation cost 0.6-0.8 ms beside the
// product's 6-8 ms at 3x4x3, 768 channels. The same three passes and attributes as the
// convolution handler above (`blocked` and `kernel_ready` must be 0):
//
//   pass 0: y = rows(x) @ w + bias;   pass 1: dx = scatter-add of dy @ w^T;
//   pass 2: dw = rows(x)^T @ dy, dbias = the sum of dy over its rows.

namespace {

// The problem padded to three spatial dims (a missing dim: size 1, one tap, no padding).
struct Geometry3 {
  int64_t in[3], out[3], k[3], stride[3], pad[3];
  int64_t taps() const { return k[0] * k[1] * k[2]; }
  int64_t out_voxels() const { return out[0] * out[1] * out[2]; }
  int64_t in_voxels() const { return in[0] * in[1] * in[2]; }
};

Geometry3 Pad3(const Problem& p) {
  Geometry3 g;
  int off = 3 - p.nsp();
  for (int i = 0; i < 3; ++i) {
    bool real = i >= off;
    g.in[i] = real ? p.in_sp[i - off] : 1;
    g.out[i] = real ? p.out_sp[i - off] : 1;
    g.k[i] = real ? p.k_sp[i - off] : 1;
    g.stride[i] = real ? p.strides[i - off] : 1;
    g.pad[i] = real ? p.pad_lo[i - off] : 0;
  }
  return g;
}

// For every (example, output voxel, tap), in the kernel's own (kd, kh, kw) order, the input
// voxel it reads (its index over all examples), or -1 where it reads padding.
template <typename Fn>
void ForEachTap(const Geometry3& g, int64_t n, Fn fn) {
  int64_t row = 0;
  for (int64_t b = 0; b < n; ++b)
    for (int64_t od = 0; od < g.out[0]; ++od)
      for (int64_t oh = 0; oh < g.out[1]; ++oh)
        for (int64_t ow = 0; ow < g.out[2]; ++ow, ++row) {
          int64_t tap = 0;
          for (int64_t kd = 0; kd < g.k[0]; ++kd)
            for (int64_t kh = 0; kh < g.k[1]; ++kh)
              for (int64_t kw = 0; kw < g.k[2]; ++kw, ++tap) {
                int64_t d = od * g.stride[0] - g.pad[0] + kd;
                int64_t h = oh * g.stride[1] - g.pad[1] + kh;
                int64_t w = ow * g.stride[2] - g.pad[2] + kw;
                bool inside = d >= 0 && d < g.in[0] && h >= 0 && h < g.in[1] && w >= 0 &&
                              w < g.in[2];
                fn(row, tap, inside ? ((b * g.in[0] + d) * g.in[1] + h) * g.in[2] + w : -1);
              }
        }
}

// rows[row][tap][ci] = x[voxel][ci], zero where the tap reads padding.
void GatherRows(const Geometry3& g, int64_t n, int64_t ci, const float* x, float* rows) {
  const int64_t taps = g.taps();
  ForEachTap(g, n, [&](int64_t row, int64_t tap, int64_t voxel) {
    float* dst = rows + (row * taps + tap) * ci;
    if (voxel < 0) {
      std::memset(dst, 0, ci * sizeof(float));
    } else {
      std::memcpy(dst, x + voxel * ci, ci * sizeof(float));
    }
  });
}

// dx[voxel][ci] = the sum of rows[row][tap][ci] over the (row, tap) that read it.
void ScatterAddRows(const Geometry3& g, int64_t n, int64_t ci, const float* rows, float* dx) {
  const int64_t taps = g.taps();
  std::memset(dx, 0, n * g.in_voxels() * ci * sizeof(float));
  ForEachTap(g, n, [&](int64_t row, int64_t tap, int64_t voxel) {
    if (voxel < 0) return;
    const float* src = rows + (row * taps + tap) * ci;
    float* dst = dx + voxel * ci;
    for (int64_t c = 0; c < ci; ++c) dst[c] += src[c];
  });
}

using F32Buffer = xla::ffi::Buffer<xla::ffi::F32>;

xla::ffi::Error Sgemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float* a,
                      int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                      int64_t ldc) {
  dnnl_status_t s = g_dnnl->sgemm(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
  if (s != 0) return xla::ffi::Error::Internal(Status("sgemm", s));
  return xla::ffi::Error::Success();
}

// The problem of a handler that computes its passes with sgemm (this one, the upsampling one
// below): oneDNN loaded, and neither its blocked layout nor a prepared kernel asked for.
xla::ffi::Error SgemmProblem(const char* what, int64_t pass, int64_t blocked,
                             int64_t kernel_ready, xla::ffi::Span<const int64_t> x_shape,
                             xla::ffi::Span<const int64_t> kernel_shape,
                             xla::ffi::Span<const int64_t> y_shape,
                             xla::ffi::Span<const int64_t> strides,
                             xla::ffi::Span<const int64_t> pad_lo,
                             xla::ffi::Span<const int64_t> pad_hi, Problem* p) {
  if (g_dnnl == nullptr) {
    return xla::ffi::Error::Internal(std::string(what) + " called before BldmOnednnLoad");
  }
  if (blocked || kernel_ready) {
    return xla::ffi::Error::InvalidArgument(std::string(what) +
                                            ": blocked and kernel_ready must be 0");
  }
  xla::ffi::Error error =
      MakeProblem(pass, 0, x_shape, kernel_shape, y_shape, strides, pad_lo, pad_hi, p);
  if (error.failure()) return error;
  const size_t nsp = p->nsp();
  if (kernel_shape[nsp] != p->ci || kernel_shape[nsp + 1] != p->co || y_shape[0] != p->n) {
    return xla::ffi::Error::InvalidArgument(std::string(what) +
                                            ": x, kernel and y shapes do not agree");
  }
  return xla::ffi::Error::Success();
}

// The buffers must be the sizes the attributes imply, since the loops index by those: (a, b,
// out) is (x, w, y) in the forward pass, (dy, w, dx) in the input gradient's, (x, dy, dw) in the
// kernel gradient's.
xla::ffi::Error CheckSizes(const char* what, int64_t pass, int64_t x_size, int64_t k_size,
                           int64_t y_size, size_t a, size_t b, size_t out) {
  const int64_t sizes[3][3] = {{x_size, k_size, y_size}, {y_size, k_size, x_size},
                               {x_size, y_size, k_size}};
  if (static_cast<int64_t>(a) == sizes[pass][0] && static_cast<int64_t>(b) == sizes[pass][1] &&
      static_cast<int64_t>(out) == sizes[pass][2]) {
    return xla::ffi::Error::Success();
  }
  return xla::ffi::Error::InvalidArgument(std::string(what) +
                                          ": operand sizes do not match the problem");
}

// The forward pass' third operand: the bias, Co elements.
xla::ffi::Error BiasOperand(const char* what, xla::ffi::RemainingArgs extra_args, int64_t co,
                            const float** bias) {
  auto buffer = extra_args.get<xla::ffi::Buffer<xla::ffi::F32>>(0);
  if (buffer.has_error()) return buffer.error();
  if (static_cast<int64_t>(buffer->element_count()) != co) {
    return xla::ffi::Error::InvalidArgument(std::string(what) + ": the bias must have Co elements");
  }
  *bias = buffer->typed_data();
  return xla::ffi::Error::Success();
}

// y (rows, Co) = the bias in every row.
void FillRows(const float* bias, int64_t rows, int64_t co, float* y) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(y + r * co, bias, co * sizeof(float));
}

// The kernel gradient pass' second result: the bias gradient, dy (rows, Co) summed over rows.
xla::ffi::Error SumBiasGradient(const char* what, xla::ffi::RemainingRets extra_rets,
                                const float* dy, int64_t rows, int64_t co) {
  auto dbias = extra_rets.get<xla::ffi::Buffer<xla::ffi::F32>>(0);
  if (dbias.has_error()) return dbias.error();
  if (static_cast<int64_t>((*dbias)->element_count()) != co) {
    return xla::ffi::Error::InvalidArgument(std::string(what) +
                                            ": the bias gradient must have Co elements");
  }
  float* db = (*dbias)->typed_data();
  std::memset(db, 0, co * sizeof(float));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < co; ++c) db[c] += dy[r * co + c];
  return xla::ffi::Error::Success();
}

xla::ffi::Error Patches(const char* what, int64_t pass, const Problem& p, F32Buffer a, F32Buffer b,
                        xla::ffi::RemainingArgs extra_args,
                        xla::ffi::ResultBuffer<xla::ffi::F32> out,
                        xla::ffi::RemainingRets extra_rets) {
  using xla::ffi::Error;
  const Geometry3 g = Pad3(p);
  const int64_t rows = p.n * g.out_voxels(), depth = g.taps() * p.ci;
  Error error = CheckSizes(what, pass, p.n * g.in_voxels() * p.ci, depth * p.co, rows * p.co,
                     a.element_count(), b.element_count(), out->element_count());
  if (error.failure()) return error;
  const float* bias = nullptr;
  if (pass == 0) error = BiasOperand(what, extra_args, p.co, &bias);
  if (pass == 2) error = SumBiasGradient(what, extra_rets, b.typed_data(), rows, p.co);
  if (error.failure()) return error;
  if (pass == 0) FillRows(bias, rows, p.co, out->typed_data());  // the product adds to it
  if (rows == 0 || p.co == 0 || depth == 0) {  // nothing to multiply: zero gradients
    if (pass != 0) std::memset(out->untyped_data(), 0, out->size_bytes());
    return Error::Success();
  }
  PooledBlock cols(rows * depth * sizeof(float));
  float* cols_data = static_cast<float*>(cols.block.ptr);
  if (pass == 1) {
    error = Sgemm('N', 'T', rows, depth, p.co, a.typed_data(), p.co, b.typed_data(), p.co, 0.0f,
                  cols_data, depth);
    if (error.failure()) return error;
    ScatterAddRows(g, p.n, p.ci, cols_data, out->typed_data());
    return Error::Success();
  }
  GatherRows(g, p.n, p.ci, a.typed_data(), cols_data);
  if (pass == 0) {
    return Sgemm('N', 'N', rows, p.co, depth, cols_data, depth, b.typed_data(), p.co, 1.0f,
                 out->typed_data(), p.co);
  }
  return Sgemm('T', 'N', depth, p.co, rows, cols_data, depth, b.typed_data(), p.co, 0.0f,
               out->typed_data(), p.co);
}

// ---- Upsampling convolutions: each input voxel times each tap, then summed into the outputs. ----
//
// conv(upsample_nearest2(x), w) with a 3x3x3 kernel and padding 1 (the UNet's and the decoder's
// upsampling) as its transpose is usually computed ("col2im"): every input voxel's product with
// every tap, taps (N * input voxels, Ci) @ (Ci, Co) for each of the 27 taps, then each output
// voxel sums the 27 products it reads. That is 27 multiply-adds per input voxel and channel pair,
// against 216 for the convolution of the upsampled input and 64 for the 8 sub-pixel parity
// convolutions. The products go to a pooled buffer, (N * input voxels, 27, Co), and are summed
// one axis at a time. The attributes are the convolution handlers': x_shape the input before
// upsampling, y_shape twice its spatial size, strides 1, padding 1 (checked):
//
//   pass 0: y = fold(x @ w_t) + bias;   pass 1: dx = sum over t of unfold(dy)_t @ w_t^T;
//   pass 2: dw_t = x^T @ unfold(dy)_t, dbias = the sum of dy over its rows.

// Along one spatial axis of length n (2n after upsampling), output o reads, through tap
// t = 0, 1, 2, upsampled voxel o + t - 1, that is input voxel (o + t - 1) / 2 (none outside).
// `in` is (outer, n, mid, 3, inner), `out` (outer, 2n, mid, inner); out = init (or 0) + the sum
// of the 3 taps each output reads.
void FoldAxis(const float* __restrict in, int64_t outer, int64_t n, int64_t mid, int64_t inner,
              const float* __restrict init, float* __restrict out) {
  for (int64_t b = 0; b < outer; ++b)
    for (int64_t o = 0; o < 2 * n; ++o)
      for (int64_t m = 0; m < mid; ++m) {
        float* dst = out + ((b * 2 * n + o) * mid + m) * inner;
        if (init != nullptr) {
          for (int64_t c = 0; c < inner; ++c) dst[c] = init[c];
        } else {
          for (int64_t c = 0; c < inner; ++c) dst[c] = 0.0f;
        }
        for (int64_t t = 0; t < 3; ++t) {
          int64_t u = o + t - 1;
          if (u < 0 || u >= 2 * n) continue;
          const float* src = in + (((b * n + u / 2) * mid + m) * 3 + t) * inner;
          for (int64_t c = 0; c < inner; ++c) dst[c] += src[c];
        }
      }
}

// FoldAxis' transpose: `in` (outer, 2n, mid, inner) -> `out` (outer, n, mid, 3, inner), where
// input voxel s collects, for tap t, the outputs 2s + 1 - t and 2s + 2 - t that read it.
void UnfoldAxis(const float* __restrict in, int64_t outer, int64_t n, int64_t mid,
                int64_t inner, float* __restrict out) {
  for (int64_t b = 0; b < outer; ++b)
    for (int64_t s = 0; s < n; ++s)
      for (int64_t m = 0; m < mid; ++m)
        for (int64_t t = 0; t < 3; ++t) {
          float* dst = out + (((b * n + s) * mid + m) * 3 + t) * inner;
          for (int64_t c = 0; c < inner; ++c) dst[c] = 0.0f;
          for (int64_t o = 2 * s + 1 - t; o <= 2 * s + 2 - t; ++o) {
            if (o < 0 || o >= 2 * n) continue;
            const float* src = in + ((b * 2 * n + o) * mid + m) * inner;
            for (int64_t c = 0; c < inner; ++c) dst[c] += src[c];
          }
        }
}

// The products (N, D, H, W, 27, Co) summed into y (N, 2D, 2H, 2W, Co): along W, H, then D.
void FoldProducts(const float* products, int64_t n, const int64_t in[3], int64_t co,
                  const float* bias, float* y) {
  const int64_t d = in[0], h = in[1], w = in[2];
  PooledBlock w_done(n * d * h * 2 * w * 9 * co * sizeof(float));
  PooledBlock h_done(n * d * 2 * h * 2 * w * 3 * co * sizeof(float));
  float* a = static_cast<float*>(w_done.block.ptr);
  float* b = static_cast<float*>(h_done.block.ptr);
  FoldAxis(products, n * d * h, w, 9, co, nullptr, a);
  FoldAxis(a, n * d, h, 2 * w * 3, co, nullptr, b);
  FoldAxis(b, n, d, 4 * h * w, co, bias, y);
}

// dy (N, 2D, 2H, 2W, Co) -> (N, D, H, W, 27, Co), each input voxel's tap-t cotangent.
void UnfoldCotangent(const float* dy, int64_t n, const int64_t in[3], int64_t co, float* out) {
  const int64_t d = in[0], h = in[1], w = in[2];
  PooledBlock d_done(n * d * 2 * h * 2 * w * 3 * co * sizeof(float));
  PooledBlock h_done(n * d * h * 2 * w * 9 * co * sizeof(float));
  float* a = static_cast<float*>(d_done.block.ptr);
  float* b = static_cast<float*>(h_done.block.ptr);
  UnfoldAxis(dy, n, d, 4 * h * w, co, a);
  UnfoldAxis(a, n * d, h, 2 * w * 3, co, b);
  UnfoldAxis(b, n * d * h, w, 9, co, out);
}

xla::ffi::Error Upsample(const char* what, int64_t pass, const Problem& p, F32Buffer a,
                         F32Buffer b, xla::ffi::RemainingArgs extra_args,
                         xla::ffi::ResultBuffer<xla::ffi::F32> out,
                         xla::ffi::RemainingRets extra_rets) {
  using xla::ffi::Error;
  bool upsampling = p.nsp() == 3;
  for (int i = 0; upsampling && i < 3; ++i) {
    upsampling = p.k_sp[i] == 3 && p.strides[i] == 1 && p.pad_lo[i] == 1 && p.pad_hi[i] == 1 &&
                 p.out_sp[i] == 2 * p.in_sp[i];
  }
  if (!upsampling) {
    return Error::InvalidArgument(
        "upsampling convolution: takes a 3x3x3 kernel, strides 1, padding 1 and an output twice "
        "the input's size");
  }
  const int64_t in[3] = {p.in_sp[0], p.in_sp[1], p.in_sp[2]};
  const int64_t rows = p.n * in[0] * in[1] * in[2], taps = 27;
  Error error = CheckSizes(what, pass, rows * p.ci, taps * p.ci * p.co, rows * 8 * p.co,
                     a.element_count(), b.element_count(), out->element_count());
  if (error.failure()) return error;
  const float* bias = nullptr;
  if (pass == 0) error = BiasOperand(what, extra_args, p.co, &bias);
  if (pass == 2) error = SumBiasGradient(what, extra_rets, b.typed_data(), rows * 8, p.co);
  if (error.failure()) return error;
  if (rows == 0 || p.co == 0 || p.ci == 0) {  // nothing to multiply: the bias, zero gradients
    if (pass == 0) {
      FillRows(bias, rows * 8, p.co, out->typed_data());
    } else {
      std::memset(out->untyped_data(), 0, out->size_bytes());
    }
    return Error::Success();
  }
  PooledBlock products(rows * taps * p.co * sizeof(float));
  float* per_tap = static_cast<float*>(products.block.ptr);
  if (pass == 0) {
    for (int64_t t = 0; t < taps; ++t) {
      error = Sgemm('N', 'N', rows, p.co, p.ci, a.typed_data(), p.ci,
                    b.typed_data() + t * p.ci * p.co, p.co, 0.0f, per_tap + t * p.co,
                    taps * p.co);
      if (error.failure()) return error;
    }
    FoldProducts(per_tap, p.n, in, p.co, bias, out->typed_data());
    return Error::Success();
  }
  UnfoldCotangent(pass == 1 ? a.typed_data() : b.typed_data(), p.n, in, p.co, per_tap);
  for (int64_t t = 0; t < taps; ++t) {
    error = pass == 1 ? Sgemm('N', 'T', rows, p.ci, p.co, per_tap + t * p.co, taps * p.co,
                              b.typed_data() + t * p.ci * p.co, p.co, t ? 1.0f : 0.0f,
                              out->typed_data(), p.ci)
                      : Sgemm('T', 'N', p.ci, p.co, rows, a.typed_data(), p.ci,
                              per_tap + t * p.co, taps * p.co, 0.0f,
                              out->typed_data() + t * p.ci * p.co, p.co);
    if (error.failure()) return error;
  }
  return Error::Success();
}

using SgemmPasses = xla::ffi::Error (*)(const char*, int64_t, const Problem&, F32Buffer,
                                        F32Buffer, xla::ffi::RemainingArgs,
                                        xla::ffi::ResultBuffer<xla::ffi::F32>,
                                        xla::ffi::RemainingRets);

// The handler over `passes` (Patches or Upsample): the convolution handlers' binding.
template <SgemmPasses passes>
xla::ffi::Error SgemmConvolution(F32Buffer a, F32Buffer b, xla::ffi::RemainingArgs extra_args,
                                 xla::ffi::ResultBuffer<xla::ffi::F32> out,
                                 xla::ffi::RemainingRets extra_rets, int64_t pass,
                                 int64_t blocked, int64_t kernel_ready,
                                 xla::ffi::Span<const int64_t> x_shape,
                                 xla::ffi::Span<const int64_t> kernel_shape,
                                 xla::ffi::Span<const int64_t> y_shape,
                                 xla::ffi::Span<const int64_t> strides,
                                 xla::ffi::Span<const int64_t> pad_lo,
                                 xla::ffi::Span<const int64_t> pad_hi) {
  const char* what = passes == Patches ? "patches convolution" : "upsampling convolution";
  Problem p;
  xla::ffi::Error error = SgemmProblem(what, pass, blocked, kernel_ready, x_shape, kernel_shape,
                                       y_shape, strides, pad_lo, pad_hi, &p);
  if (error.failure()) return error;
  return passes(what, pass, p, a, b, extra_args, out, extra_rets);
}

}  // namespace

BLDM_EXPORTED_HANDLER(BldmPatchesConvolution, SgemmConvolution<Patches>, ConvolutionBinding());

BLDM_EXPORTED_HANDLER(BldmUpsampleConvolution, SgemmConvolution<Upsample>, ConvolutionBinding());

// ---- Two tools that are not convolutions, for hand-scheduled backward passes. ----
//
// Probe: the first element of each example of x, as float32 (B,). An ordering tool for
// hand-scheduled backward passes (`layers.after`). A value tied to this probe cannot be computed
// before x exists in memory, because XLA cannot fuse x's producer into a custom call. A tie
// through a plain slice of x does not hold: XLA fuses the slice with x's producer and computes
// that one element from x's inputs, keeping them alive.

namespace {

xla::ffi::Error Probe(xla::ffi::AnyBuffer x, xla::ffi::ResultBuffer<xla::ffi::F32> out) {
  auto dims = x.dimensions();
  int64_t batch = dims.size() ? dims[0] : 1;
  int64_t per_example = batch ? static_cast<int64_t>(x.element_count()) / batch : 0;
  float* dst = out->typed_data();
  for (int64_t b = 0; b < batch; ++b) {
    if (per_example == 0) {
      dst[b] = 0.0f;
    } else if (x.element_type() == xla::ffi::DataType::F32) {
      dst[b] = static_cast<const float*>(x.untyped_data())[b * per_example];
    } else if (x.element_type() == xla::ffi::DataType::BF16) {
      uint32_t bits = static_cast<uint32_t>(
                          static_cast<const uint16_t*>(x.untyped_data())[b * per_example])
                      << 16;
      std::memcpy(&dst[b], &bits, sizeof(float));
    } else {
      return xla::ffi::Error::InvalidArgument("probe takes float32 or bfloat16");
    }
  }
  return xla::ffi::Error::Success();
}

// ---- Materialize: x itself, in memory (the output aliases the input; XLA passes one buffer). ----
//
// A fusion barrier: XLA fuses an elementwise producer into each of its consumers, recomputing it
// per consumer and keeping its inputs alive until the last one; behind this call it is computed
// once, into memory. (XLA:CPU drops optimization barriers before fusion.)

xla::ffi::Error Materialize(xla::ffi::AnyBuffer x, xla::ffi::Result<xla::ffi::AnyBuffer> out) {
  if (out->untyped_data() != x.untyped_data()) {
    std::memcpy(out->untyped_data(), x.untyped_data(), x.size_bytes());
  }
  return xla::ffi::Error::Success();
}

}  // namespace

BLDM_EXPORTED_HANDLER(BldmMaterialize, Materialize,
                      xla::ffi::Ffi::Bind()
                          .Arg<xla::ffi::AnyBuffer>()
                          .Ret<xla::ffi::AnyBuffer>());

BLDM_EXPORTED_HANDLER(BldmProbe, Probe,
                      xla::ffi::Ffi::Bind()
                          .Arg<xla::ffi::AnyBuffer>()
                          .Ret<xla::ffi::Buffer<xla::ffi::F32>>());

// Resolves oneDNN's C API from the library at `path` and creates the CPU engine. Returns null on
// success, otherwise a static error message.
extern "C" __attribute__((visibility("default"))) const char* BldmOnednnLoad(const char* path) {
  static std::string error;
  if (g_dnnl != nullptr) return nullptr;
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    error = std::string("cannot load ") + path + ": " + dlerror();
    return error.c_str();
  }
  auto* d = new Dnnl();
  std::string missing;
  Resolve(lib, "dnnl_engine_create", &d->engine_create, &missing);
  Resolve(lib, "dnnl_stream_create", &d->stream_create, &missing);
  Resolve(lib, "dnnl_stream_wait", &d->stream_wait, &missing);
  Resolve(lib, "dnnl_memory_desc_create_with_strides", &d->memory_desc_create_with_strides,
          &missing);
  Resolve(lib, "dnnl_memory_desc_create_with_tag", &d->memory_desc_create_with_tag, &missing);
  Resolve(lib, "dnnl_memory_desc_equal", &d->memory_desc_equal, &missing);
  Resolve(lib, "dnnl_memory_desc_get_size", &d->memory_desc_get_size, &missing);
  Resolve(lib, "dnnl_memory_create", &d->memory_create, &missing);
  Resolve(lib, "dnnl_memory_destroy", &d->memory_destroy, &missing);
  Resolve(lib, "dnnl_primitive_attr_create", &d->primitive_attr_create, &missing);
  Resolve(lib, "dnnl_primitive_attr_set_scratchpad_mode", &d->primitive_attr_set_scratchpad_mode,
          &missing);
  Resolve(lib, "dnnl_convolution_forward_primitive_desc_create",
          &d->convolution_forward_primitive_desc_create, &missing);
  Resolve(lib, "dnnl_convolution_backward_data_primitive_desc_create",
          &d->convolution_backward_data_primitive_desc_create, &missing);
  Resolve(lib, "dnnl_convolution_backward_weights_primitive_desc_create",
          &d->convolution_backward_weights_primitive_desc_create, &missing);
  Resolve(lib, "dnnl_reorder_primitive_desc_create", &d->reorder_primitive_desc_create, &missing);
  Resolve(lib, "dnnl_primitive_desc_query_md", &d->primitive_desc_query_md, &missing);
  Resolve(lib, "dnnl_primitive_create", &d->primitive_create, &missing);
  Resolve(lib, "dnnl_primitive_execute", &d->primitive_execute, &missing);
  Resolve(lib, "dnnl_sgemm", &d->sgemm, &missing);
  if (!missing.empty()) {
    error = std::string(path) + " lacks oneDNN v3 functions:" + missing;
    delete d;
    return error.c_str();
  }
  if (d->engine_create(&d->engine, kCpuEngine, 0) != 0) {
    error = "oneDNN could not create a CPU engine";
    delete d;
    return error.c_str();
  }
  g_dnnl = d;
  return nullptr;
}
