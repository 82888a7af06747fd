// oneDNN convolutions, batch normalisation and matrix products, and max pooling, as XLA FFI
// handlers (CPU, float32 or bfloat16, NHWC activations, HWIO kernels), one handler per pass so
// that JAX wraps each op in a custom VJP (cnnjax/onednn.py):
//   cnnjax_onednn_conv_fwd          x [N, H, W, Ci], w [KH, KW, Ci / G, Co] -> y [N, Ho, Wo, Co]
//   cnnjax_onednn_conv_bwd_data     dy [N, Ho, Wo, Co], w [KH, KW, Ci / G, Co] -> dx [N, H, W, Ci]
//   cnnjax_onednn_conv_bwd_weights  x [N, H, W, Ci], dy [N, Ho, Wo, Co] -> dw [KH, KW, Ci / G, Co]
//   cnnjax_onednn_conv_fwd_bias          x, w, bias [Co] (float32) -> y = conv(x, w) + bias
//   cnnjax_onednn_conv_fwd_bias_relu     x, w, bias -> y = max(conv(x, w) + bias, 0) (a post-op)
//   cnnjax_onednn_conv_fwd_bias_relu6    x, w, bias -> y = min(max(conv(x, w) + bias, 0), 6)
//   cnnjax_onednn_conv_bwd_weights_bias  x, dy -> dw, dbias [Co] (float32): the bias gradient
//                                        (dy summed over N, Ho, Wo) in the same pass
//   (attributes: strides [2] and padding [4] = (top, bottom, left, right); G groups, as lax's
//   feature_group_count, from the shapes: G = Ci / w's third dimension, depthwise G = Ci)
//   cnnjax_onednn_norm_fwd  x [..., C], scale [C], shift [C] -> y [..., C], mean [C], var [C]
//   cnnjax_onednn_norm_bwd  x, dy [..., C], scale, mean, var [C] -> dx, dscale, dshift
//   cnnjax_onednn_norm_infer  x [..., C], mean, var, scale, shift [C] -> y [..., C] (the given
//                             statistics: inference mode), then a ReLU where the attribute
//                             relu is 1 (oneDNN's fuse_norm_relu: the same pass)
//   (attribute: epsilon)
//   cnnjax_onednn_matmul  a [M, K] (or [K, M]: transpose_a), b [K, N] (or [N, K]: transpose_b)
//                         -> [M, N]: a dense layer's product and its two gradients
//   cnnjax_onednn_max_pool_fwd  x [N, H, W, C] -> y [N, Ho, Wo, C]
//   cnnjax_onednn_max_pool_bwd  x, y, dy -> dx [N, H, W, C], shared among a window's ties
//   cnnjax_onednn_max_pool_bwd_first  x, y, dy -> dx, all to a window's first maximum
//   (attributes: window k, stride s and padding [4] = (top, bottom, left, right) of k x k
//   windows, Ho = (H + top + bottom - k) / s + 1; max_pool_bwd only for non-overlapping
//   unpadded windows, s = k (the remainder rows and columns dropped), the gradient of jax's
//   reduce_max; max_pool_bwd_first that of lax.reduce_window (flax's nn.max_pool, padded with
//   -inf). Not oneDNN's pooling, whose gradient goes to one maximum in its own order.)
// A convolution's operands and result share one dtype (float32 or bfloat16); batch norm's x, y,
// dy and dx are float32 or bfloat16, its per-channel scale, shift, mean, var and their
// gradients always float32 (mixed precision keeps statistics in float32).
//
// oneDNN picks its kernel for the shape (weights in its own blocked layout, reordered from and
// to HWIO here); where AMX runs bfloat16, the kernel gradient on small output maps is a matrix
// product instead (UseWeightsMatmul). Primitives are built once per shape and pass and
// cached; executions are serialised by one lock, because every primitive already runs on all
// of oneDNN's OpenMP threads and XLA may call two of them at once (a convolution's two
// gradients).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum class Pass { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// N, H, W, Ci, KH, KW, Co, stride h, stride w, pad top, bottom, left, right, pass, dtype,
// epilogue (0: none, 1: bias, 2: bias and ReLU, 3: bias and ReLU6, the forward pass's
// post-op), groups.
using Key = std::array<int64_t, 17>;

using dt = dnnl::memory::data_type;

// oneDNN's type of an FFI buffer's elements: float32 or bfloat16 (anything else is refused
// before a primitive is built).
bool OnednnType(ffi::DataType type, dt* out) {
  if (type == ffi::DataType::F32) return *out = dt::f32, true;
  if (type == ffi::DataType::BF16) return *out = dt::bf16, true;
  return false;
}

// oneDNN's operands at 64-byte boundaries: from a std::vector's 16-byte aligned data its AMX
// kernels ran bf16 convolutions on 4x4 and 8x8 maps up to 2.7x slower (BENCHMARKS.md notes).
// Grows `buffer` (kept between calls) to hold `bytes` at a 64-byte boundary; never shrinks
// it, since growing back would zero-fill the regrown bytes again on every other call.
char* Aligned(std::vector<char>& buffer, size_t bytes) {
  constexpr size_t kAlign = 64;
  if (buffer.size() < bytes + kAlign) buffer.resize(bytes + kAlign);
  const auto address = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + (kAlign - address % kAlign) % kAlign;
}

struct Shapes {
  dnnl::memory::dims src, weights, dst, strides, pad_l, pad_r;
};

Shapes ShapesOf(const Key& k) {
  const int64_t n = k[0], h = k[1], w = k[2], ci = k[3], kh = k[4], kw = k[5], co = k[6];
  const int64_t ho = (h + k[9] + k[10] - kh) / k[7] + 1;
  const int64_t wo = (w + k[11] + k[12] - kw) / k[8] + 1;
  const int64_t g = k[16];
  return {{n, ci, h, w},
          g == 1 ? dnnl::memory::dims{co, ci, kh, kw}
                 : dnnl::memory::dims{g, co / g, ci / g, kh, kw},
          {n, co, ho, wo},
          {k[7], k[8]}, {k[9], k[11]}, {k[10], k[12]}};
}

// A pass ready to run: the convolution primitive, its NHWC activation layouts and, when
// oneDNN wants the kernel (or the kernel's gradient) in a layout other than HWIO, the reorder
// between the two.
struct Plan {
  dnnl::primitive conv;
  dnnl::memory::desc src_md, dst_md;  // x (or dx) and y (or dy), NHWC
  dnnl::memory::desc weights_md;  // the layout the convolution reads or writes
  dnnl::memory::desc hwio_md;
  std::unique_ptr<dnnl::reorder> weights_reorder;  // HWIO -> weights_md, or back for dw
  dnnl::memory::desc scratch_md;
  dnnl::memory::desc bias_md;  // [Co] float32, when the pass takes or gives a bias
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// The one stream every primitive runs on (used under the lock).
dnnl::stream& Stream() {
  static dnnl::stream stream(Engine());
  return stream;
}

dnnl::memory::desc Desc(const dnnl::memory::dims& dims, dnnl::memory::format_tag tag,
                        dt type = dt::f32) {
  return dnnl::memory::desc(dims, type, tag);
}

std::unique_ptr<Plan> MakePlan(const Key& key) {
  using tag = dnnl::memory::format_tag;
  const Shapes s = ShapesOf(key);
  const auto type = static_cast<dt>(key[14]);
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto plan = std::make_unique<Plan>();
  plan->bias_md = Desc({key[6]}, tag::a);  // float32 at any activation type
  const auto src = plan->src_md = Desc(s.src, tag::nhwc, type);
  const auto dst = plan->dst_md = Desc(s.dst, tag::nhwc, type);
  const auto any_weights = Desc(s.weights, tag::any, type);
  // A grouped kernel [KH, KW, Ci / G, Co] (lax's layout, output channels group-major) is
  // oneDNN's [G, Co / G, Ci / G, KH, KW] in the order h, w, i, g, o.
  plan->hwio_md = Desc(s.weights, key[16] == 1 ? tag::hwio : tag::hwigo, type);
  const bool with_bias = key[15] != 0;
  const auto bias = plan->bias_md;
  if (key[15] >= 2) {  // the activation after the bias: 2 ReLU, 3 ReLU6
    dnnl::post_ops activation;
    if (key[15] == 2) {
      activation.append_eltwise(dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
    } else {
      activation.append_eltwise(dnnl::algorithm::eltwise_clip, 0.0f, 6.0f);
    }
    attr.set_post_ops(activation);
  }
  auto fwd = with_bias ? dnnl::convolution_forward::primitive_desc(
                             Engine(), dnnl::prop_kind::forward_training, algo, src,
                             any_weights, bias, dst, s.strides, s.pad_l, s.pad_r, attr)
                       : dnnl::convolution_forward::primitive_desc(
                             Engine(), dnnl::prop_kind::forward_training, algo, src,
                             any_weights, dst, s.strides, s.pad_l, s.pad_r, attr);
  switch (static_cast<Pass>(key[13])) {
    case Pass::kForward:
      plan->conv = dnnl::convolution_forward(fwd);
      plan->weights_md = fwd.weights_desc();
      plan->scratch_md = fwd.scratchpad_desc();
      break;
    case Pass::kBackwardData: {
      dnnl::convolution_backward_data::primitive_desc bwd(
          Engine(), algo, src, any_weights, dst, s.strides, s.pad_l, s.pad_r, fwd, attr);
      plan->conv = dnnl::convolution_backward_data(bwd);
      plan->weights_md = bwd.weights_desc();
      plan->scratch_md = bwd.scratchpad_desc();
      break;
    }
    case Pass::kBackwardWeights: {
      auto bwd = with_bias ? dnnl::convolution_backward_weights::primitive_desc(
                                 Engine(), algo, src, any_weights, bias, dst, s.strides,
                                 s.pad_l, s.pad_r, fwd, attr)
                           : dnnl::convolution_backward_weights::primitive_desc(
                                 Engine(), algo, src, any_weights, dst, s.strides, s.pad_l,
                                 s.pad_r, fwd, attr);
      plan->conv = dnnl::convolution_backward_weights(bwd);
      plan->weights_md = bwd.diff_weights_desc();
      plan->scratch_md = bwd.scratchpad_desc();
      break;
    }
  }
  if (plan->weights_md != plan->hwio_md) {
    const bool to_hwio = static_cast<Pass>(key[13]) == Pass::kBackwardWeights;
    plan->weights_reorder = std::make_unique<dnnl::reorder>(
        to_hwio ? dnnl::reorder::primitive_desc(Engine(), plan->weights_md, Engine(),
                                                plan->hwio_md)
                : dnnl::reorder::primitive_desc(Engine(), plan->hwio_md, Engine(),
                                                plan->weights_md));
  }
  return plan;
}

std::mutex& Lock() {
  static std::mutex lock;
  return lock;
}

// `body()`, with a oneDNN exception (no primitive for a shape, a failed execution) returned
// as an FFI error that JAX raises, instead of ending the process.
template <typename Body>
ffi::Error Guarded(const char* what, Body&& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("oneDNN ") + what + " failed: " + e.what());
  }
}

// A float32 or bfloat16 element (bfloat16 stored as uint16_t): read as float, written with
// rounding to nearest even.
struct F32 {
  using Storage = float;
  using Bits = uint32_t;
  static float Get(float v) { return v; }
  static float Put(float v) { return v; }
};
struct BF16 {
  using Storage = uint16_t;
  using Bits = uint16_t;
  static float Get(uint16_t v) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static uint16_t Put(float f) {  // round to nearest even, NaN kept quiet (branch-free)
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(f != f ? (bits >> 16) | 0x40u : rounded);
  }
};

// Whether an ungrouped convolution's weight gradient is computed as one matrix product
// (WeightsByMatmul; grouped ones always take oneDNN's) rather than
// by oneDNN's backward-weights convolution: where AMX runs bfloat16 and the output map has at
// most 16 pixels (4x4), its convolution kernels are slower than the product (BENCHMARKS.md).
// CNNJAX_ONEDNN_WEIGHTS_MATMUL=1 or =0 forces the choice (tests).
bool UseWeightsMatmul(dt type, int64_t out_pixels) {
  const char* mode = std::getenv("CNNJAX_ONEDNN_WEIGHTS_MATMUL");
  if (mode != nullptr && *mode != '\0') return *mode == '1';
  const auto amx = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_amx);
  static const bool has_amx =
      (static_cast<unsigned>(dnnl::get_effective_cpu_isa()) & amx) == amx;
  return has_amx && type == dt::bf16 && out_pixels <= 16;
}

// out [M, N] = op(a) op(b) of `type` (float32 or bfloat16) matrices, op transposing a stored
// [K, M] (ta) or b stored [N, K] (tb), accumulated in float32 and rounded once into out's
// dtype, by oneDNN's matmul (AMX or AVX-512 BF16 for bfloat16), built once per shape. Called
// under the lock.
void Product(dt type, int64_t m, int64_t k, int64_t n, bool ta, bool tb, const void* a,
             const void* b, void* out) {
  using dims = dnnl::memory::dims;
  const auto a_md = dnnl::memory::desc({m, k}, type, ta ? dims{1, m} : dims{k, 1});
  const auto b_md = dnnl::memory::desc({k, n}, type, tb ? dims{1, k} : dims{n, 1});
  const auto out_md = Desc({m, n}, dnnl::memory::format_tag::ab, type);
  static std::map<std::tuple<int64_t, int64_t, int64_t, bool, bool, dt>, dnnl::matmul> products;
  const auto key = std::make_tuple(m, k, n, ta, tb, type);
  auto found = products.find(key);
  if (found == products.end()) {
    found = products.emplace(key, dnnl::matmul(dnnl::matmul::primitive_desc(
                                      Engine(), a_md, b_md, out_md))).first;
  }
  dnnl::stream& stream = Stream();
  found->second.execute(stream,
                        {{DNNL_ARG_SRC, dnnl::memory(a_md, Engine(), const_cast<void*>(a))},
                         {DNNL_ARG_WEIGHTS, dnnl::memory(b_md, Engine(), const_cast<void*>(b))},
                         {DNNL_ARG_DST, dnnl::memory(out_md, Engine(), out)}});
  stream.wait();
}

// dw [KH*KW*Ci, Co] (HWIO flattened) = patches^T dy, with patches [N*Ho*Wo, KH*KW*Ci] the
// input windows (zeros where they overhang the padding) and dy [N*Ho*Wo, Co], accumulated in
// float32 and rounded once into dw's dtype; the bias gradient (float32) sums dy's rows.
// Called under the lock.
ffi::Error WeightsByMatmul(const Key& key, const char* x, const void* dy, void* dw,
                           float* bias) {
  const Shapes s = ShapesOf(key);
  const int64_t n = key[0], h = key[1], w = key[2], ci = key[3], kh = key[4], kw = key[5];
  const int64_t co = key[6], ho = s.dst[2], wo = s.dst[3];
  const auto type = static_cast<dt>(key[14]);
  const int64_t taps = kh * kw * ci, rows = n * ho * wo;
  const size_t size = dnnl::memory::data_type_size(type);
  static std::vector<char> patches;
  char* const out = Aligned(patches, rows * taps * size);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / (ho * wo), oy = r / wo % ho, ox = r % wo;
    char* row = out + r * taps * size;
    for (int64_t i = 0; i < kh; ++i) {
      for (int64_t j = 0; j < kw; ++j, row += ci * size) {
        const int64_t y = oy * key[7] + i - key[9], xx = ox * key[8] + j - key[11];
        if (y < 0 || y >= h || xx < 0 || xx >= w) {
          std::memset(row, 0, ci * size);
        } else {
          std::memcpy(row, x + ((b * h + y) * w + xx) * ci * size, ci * size);
        }
      }
    }
  }
  Product(type, taps, rows, co, /*ta=*/true, /*tb=*/false, out, dy, dw);
  if (bias) {
    const auto* dy_f32 = static_cast<const float*>(dy);
    const auto* dy_bf16 = static_cast<const uint16_t*>(dy);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < co; ++c) {
      float sum = 0.0f;
      for (int64_t r = 0; r < rows; ++r) {
        sum += type == dt::f32 ? dy_f32[r * co + c] : BF16::Get(dy_bf16[r * co + c]);
      }
      bias[c] = sum;
    }
  }
  return ffi::Error::Success();
}

// Runs one pass under the lock. `a` and `b` are the pass's inputs and `out` its output, in
// the order of the handler's arguments above; `bias` (float32 [Co], or null) is the forward
// pass's bias input or the backward-weights pass's bias-gradient output; `activation` what
// follows the forward pass's bias (0 none, 1 ReLU, 2 ReLU6).
ffi::Error RunConv(Pass pass, ffi::AnyBuffer a, ffi::AnyBuffer b,
                   ffi::Result<ffi::AnyBuffer> out, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding, float* bias = nullptr,
                   int64_t activation = 0) {
  if (strides.size() != 2 || padding.size() != 4) {
    return ffi::Error::InvalidArgument("strides must have 2 entries and padding 4");
  }
  dt type;
  if (!OnednnType(a.element_type(), &type) || b.element_type() != a.element_type() ||
      out->element_type() != a.element_type()) {
    return ffi::Error::InvalidArgument(
        "convolution operands must all be float32 or all bfloat16");
  }
  // The NHWC activation that carries N, H, W, Ci, and the HWIO-shaped buffer.
  auto x_dims = pass == Pass::kBackwardData ? out->dimensions() : a.dimensions();
  auto w_dims = pass == Pass::kBackwardWeights ? out->dimensions() : b.dimensions();
  if (x_dims.size() != 4 || w_dims.size() != 4) {
    return ffi::Error::InvalidArgument(
        "activations must be [N, H, W, C] and kernels [KH, KW, Ci / groups, Co]");
  }
  // Groups: the input's channels over the kernel's input channels (lax's feature_group_count).
  const int64_t groups = w_dims[2] > 0 ? x_dims[3] / w_dims[2] : 0;
  if (groups < 1 || x_dims[3] != groups * w_dims[2] || w_dims[3] % groups != 0) {
    return ffi::Error::InvalidArgument(
        "the input's channels must be the kernel's input channels times a number of groups "
        "that divides the kernel's output channels");
  }
  const Key key = {x_dims[0], x_dims[1], x_dims[2], x_dims[3], w_dims[0], w_dims[1],
                   w_dims[3], strides[0], strides[1], padding[0], padding[1], padding[2],
                   padding[3], static_cast<int64_t>(pass), static_cast<int64_t>(type),
                   bias == nullptr ? 0 : 1 + activation, groups};
  std::lock_guard<std::mutex> guard(Lock());
  if (pass == Pass::kBackwardWeights) {
    const Shapes s = ShapesOf(key);
    if (groups == 1 && UseWeightsMatmul(type, s.dst[2] * s.dst[3])) {
      return WeightsByMatmul(key, static_cast<const char*>(a.untyped_data()), b.untyped_data(),
                             out->untyped_data(), bias);
    }
  }
  static std::map<Key, std::unique_ptr<Plan>> plans;
  auto& plan = plans[key];
  if (!plan) plan = MakePlan(key);
  dnnl::stream& stream = Stream();
  static std::vector<char> weights_buffer, scratch_buffer;
  dnnl::memory scratch(plan->scratch_md, Engine(),
                       Aligned(scratch_buffer, plan->scratch_md.get_size()));
  // The convolution's weights (or weight gradient) memory: the HWIO buffer itself, or a
  // buffer in oneDNN's layout reordered from (or to) it.
  void* hwio = pass == Pass::kBackwardWeights ? out->untyped_data() : b.untyped_data();
  dnnl::memory hwio_mem(plan->hwio_md, Engine(), hwio);
  dnnl::memory weights_mem = hwio_mem;
  if (plan->weights_reorder) {
    weights_mem = dnnl::memory(plan->weights_md, Engine(),
                               Aligned(weights_buffer, plan->weights_md.get_size()));
    if (pass != Pass::kBackwardWeights) {
      plan->weights_reorder->execute(stream, hwio_mem, weights_mem);
    }
  }
  auto src = [&](void* data) { return dnnl::memory(plan->src_md, Engine(), data); };
  auto dst = [&](void* data) { return dnnl::memory(plan->dst_md, Engine(), data); };
  std::unordered_map<int, dnnl::memory> args;
  switch (pass) {
    case Pass::kForward:
      args = {{DNNL_ARG_SRC, src(a.untyped_data())},
              {DNNL_ARG_WEIGHTS, weights_mem},
              {DNNL_ARG_DST, dst(out->untyped_data())},
              {DNNL_ARG_SCRATCHPAD, scratch}};
      if (bias) args.emplace(DNNL_ARG_BIAS, dnnl::memory(plan->bias_md, Engine(), bias));
      plan->conv.execute(stream, args);
      break;
    case Pass::kBackwardData:
      plan->conv.execute(stream, {{DNNL_ARG_DIFF_DST, dst(a.untyped_data())},
                                  {DNNL_ARG_WEIGHTS, weights_mem},
                                  {DNNL_ARG_DIFF_SRC, src(out->untyped_data())},
                                  {DNNL_ARG_SCRATCHPAD, scratch}});
      break;
    case Pass::kBackwardWeights:
      args = {{DNNL_ARG_SRC, src(a.untyped_data())},
              {DNNL_ARG_DIFF_DST, dst(b.untyped_data())},
              {DNNL_ARG_DIFF_WEIGHTS, weights_mem},
              {DNNL_ARG_SCRATCHPAD, scratch}};
      if (bias) args.emplace(DNNL_ARG_DIFF_BIAS, dnnl::memory(plan->bias_md, Engine(), bias));
      plan->conv.execute(stream, args);
      if (plan->weights_reorder) plan->weights_reorder->execute(stream, weights_mem, hwio_mem);
      break;
  }
  stream.wait();
  return ffi::Error::Success();
}

// Batch normalisation over the rows of x [M, C] (any [..., C] flattened): in training mode
// statistics per channel over all M rows (biased variance), y = (x - mean) / sqrt(var + eps)
// * scale + shift, and its backward, dx, dscale and dshift from dy; in inference mode y from
// the given mean and var, and max(y, 0) (kInferenceRelu). x [B, ..., C] is described to
// oneDNN as what it is, B images of M / B pixels in NHWC: as [M, C] its kernels ran 2.0-3.4x
// slower in bfloat16, 1.4-1.7x in float32 (BNCNN's 32x32x32 layer; BENCHMARKS.md, 2026-12-06).
enum class NormPass { kForward, kBackward, kInference, kInferenceRelu };

struct NormPlan {
  dnnl::primitive norm;
  dnnl::memory::desc rows_md, channels_md;
};

ffi::Error RunNorm(NormPass pass, dt type, int64_t batch, int64_t rows, int64_t channels,
                   float epsilon, const std::unordered_map<int, void*>& args) {
  using tag = dnnl::memory::format_tag;
  using flag = dnnl::normalization_flags;
  std::lock_guard<std::mutex> guard(Lock());
  static std::map<std::tuple<NormPass, dt, int64_t, int64_t, int64_t, float>,
                  std::unique_ptr<NormPlan>>
      plans;
  auto& plan = plans[{pass, type, batch, rows, channels, epsilon}];
  if (!plan) {
    plan = std::make_unique<NormPlan>();
    plan->rows_md = Desc({batch, channels, 1, rows / batch}, tag::nhwc, type);
    plan->channels_md = Desc({channels}, tag::a);
    const bool inference = pass == NormPass::kInference || pass == NormPass::kInferenceRelu;
    const auto flags = flag::use_scale | flag::use_shift |
                       (inference ? flag::use_global_stats : flag::none) |
                       (pass == NormPass::kInferenceRelu ? flag::fuse_norm_relu : flag::none);
    dnnl::batch_normalization_forward::primitive_desc fwd(
        Engine(), inference ? dnnl::prop_kind::forward_inference
                            : dnnl::prop_kind::forward_training,
        plan->rows_md, plan->rows_md, epsilon, flags);
    if (pass == NormPass::kBackward) {
      plan->norm = dnnl::batch_normalization_backward(
          dnnl::batch_normalization_backward::primitive_desc(
              Engine(), dnnl::prop_kind::backward, plan->rows_md, plan->rows_md, plan->rows_md,
              epsilon, flags, fwd));
    } else {
      plan->norm = dnnl::batch_normalization_forward(fwd);
    }
  }
  std::unordered_map<int, dnnl::memory> memories;
  for (const auto& [arg, data] : args) {
    const bool per_channel = arg == DNNL_ARG_SCALE || arg == DNNL_ARG_SHIFT ||
                             arg == DNNL_ARG_MEAN || arg == DNNL_ARG_VARIANCE ||
                             arg == DNNL_ARG_DIFF_SCALE || arg == DNNL_ARG_DIFF_SHIFT;
    memories.emplace(arg, dnnl::memory(per_channel ? plan->channels_md : plan->rows_md,
                                       Engine(), data));
  }
  dnnl::stream& stream = Stream();
  plan->norm.execute(stream, memories);
  stream.wait();
  return ffi::Error::Success();
}

// The dtype of batch norm's activations (x, y, dy, dx), which must agree.
template <typename... Buffers>
bool ActivationType(dt* type, const ffi::AnyBuffer& first, const Buffers&... rest) {
  return OnednnType(first.element_type(), type) &&
         ((rest.element_type() == first.element_type()) && ...);
}

// RunNorm on x [..., C] (C: the per-channel operands' length; its first axis the batch
// where it has three or more) after checking that the activations (x and the others,
// `named` as in " and y") share a dtype oneDNN takes.
template <typename... Buffers>
ffi::Error Norm(NormPass pass, int64_t channels, float epsilon, const char* named,
                const std::unordered_map<int, void*>& args, const ffi::AnyBuffer& x,
                const Buffers&... others) {
  dt type;
  if (!ActivationType(&type, x, others...)) {
    return ffi::Error::InvalidArgument(std::string("batch norm's x") + named +
                                       " must be float32 or bfloat16");
  }
  if (channels <= 0 || x.element_count() == 0 || x.element_count() % channels != 0) {
    return ffi::Error::InvalidArgument("batch norm's x must hold whole rows of its channels");
  }
  const int64_t rows = x.element_count() / channels;
  const auto d = x.dimensions();
  const int64_t batch = d.size() >= 3 ? d[0] : rows;
  return Guarded("batch norm", [&] {
    return RunNorm(pass, type, batch, rows, channels, epsilon, args);
  });
}

ffi::Error NormForward(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> shift, ffi::Result<ffi::AnyBuffer> y,
                       ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> variance,
                       float epsilon) {
  return Norm(NormPass::kForward, scale.element_count(), epsilon, " and y",
              {{DNNL_ARG_SRC, x.untyped_data()}, {DNNL_ARG_SCALE, scale.typed_data()},
               {DNNL_ARG_SHIFT, shift.typed_data()}, {DNNL_ARG_DST, y->untyped_data()},
               {DNNL_ARG_MEAN, mean->typed_data()},
               {DNNL_ARG_VARIANCE, variance->typed_data()}},
              x, *y);
}

ffi::Error NormBackward(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> variance,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dshift, float epsilon) {
  return Norm(NormPass::kBackward, scale.element_count(), epsilon, ", dy and dx",
              {{DNNL_ARG_SRC, x.untyped_data()}, {DNNL_ARG_DIFF_DST, dy.untyped_data()},
               {DNNL_ARG_SCALE, scale.typed_data()}, {DNNL_ARG_MEAN, mean.typed_data()},
               {DNNL_ARG_VARIANCE, variance.typed_data()},
               {DNNL_ARG_DIFF_SRC, dx->untyped_data()},
               {DNNL_ARG_DIFF_SCALE, dscale->typed_data()},
               {DNNL_ARG_DIFF_SHIFT, dshift->typed_data()}},
              x, dy, *dx);
}

ffi::Error NormInference(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> mean,
                         ffi::Buffer<ffi::F32> variance, ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::F32> shift, ffi::Result<ffi::AnyBuffer> y,
                         float epsilon, int64_t relu) {
  return Norm(relu ? NormPass::kInferenceRelu : NormPass::kInference, scale.element_count(),
              epsilon, " and y",
              {{DNNL_ARG_SRC, x.untyped_data()}, {DNNL_ARG_MEAN, mean.typed_data()},
               {DNNL_ARG_VARIANCE, variance.typed_data()}, {DNNL_ARG_SCALE, scale.typed_data()},
               {DNNL_ARG_SHIFT, shift.typed_data()}, {DNNL_ARG_DST, y->untyped_data()}},
              x, *y);
}

// Product's out [M, N] = op(a) op(b) for a dense layer's forward (x w), input gradient
// (dy w^T) and kernel gradient (x^T dy): XLA:CPU computes a bfloat16 product in float32.
ffi::Error Matmul(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                  int64_t ta, int64_t tb) {
  dt type;
  const auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  if (!OnednnType(a.element_type(), &type) || b.element_type() != a.element_type() ||
      out->element_type() != a.element_type() || ad.size() != 2 || bd.size() != 2 ||
      od.size() != 2) {
    return ffi::Error::InvalidArgument(
        "a matrix product takes float32 or bfloat16 matrices, all of one dtype");
  }
  const int64_t m = od[0], n = od[1], k = ta ? ad[0] : ad[1];
  if ((ta ? ad[1] : ad[0]) != m || (tb ? bd[1] : bd[0]) != k || (tb ? bd[0] : bd[1]) != n) {
    return ffi::Error::InvalidArgument("a matrix product's shapes disagree");
  }
  return Guarded("matrix product", [&] {
    std::lock_guard<std::mutex> guard(Lock());
    Product(type, m, k, n, ta != 0, tb != 0, a.untyped_data(), b.untyped_data(),
            out->untyped_data());
    return ffi::Error::Success();
  });
}

// Max pooling, NHWC, float32 or bfloat16, over k x k windows with stride s and padding (as
// lax.reduce_window pads with -inf: padded positions never win): the maximum of the window's
// in-bounds views in row-major order (a NaN wins; of -0 and +0 the first, where XLA's maximum
// gives +0: equal values, and the same gradient). Backward, either as
// cnnjax.models.blocks.max_pool computes it with XLA for non-overlapping windows (the gradient
// bit for bit): dy / (number of window elements equal to y) to each of them; or as
// lax.reduce_window's (select_and_scatter_add with >=): all of dy to the window's first
// element equal to y, summed where windows overlap (where y is NaN, to the window's first NaN:
// lax's selection moves past a NaN to a later element, so such windows differ). XLA runs
// the bfloat16 passes through float32 conversions at a fraction of memory speed
// (BENCHMARKS.md).
struct PoolWindow {
  int64_t k, s, top, left;  // size, stride, padding before the rows and before the columns
};

// The loops (max_pool.h) compiled twice: for any x86-64 CPU (SSE2, as the rest of the
// extension), and for CPUs with AVX-512, where they run 1.3-1.9x faster on 16 channels or more
// (BNCNN's); on fewer (LeNet's 6) the 16-lane loops are slower than SSE2's (BENCHMARKS.md).
namespace any_x86 {
#include "max_pool.h"
}  // namespace any_x86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
namespace avx512 {
#include "max_pool.h"
}  // namespace avx512
#pragma GCC pop_options

// f(loops): the pooling loops for c channels on this CPU (any_x86's or avx512's MaxPoolLoops).
// CNNJAX_ONEDNN_POOL_LOOPS=any_x86 forces the loops every CPU runs (tests, on AVX-512 CPUs).
template <typename F>
void WithPoolLoops(int64_t c, F f) {
  static const bool avx512 = __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512dq");
  const char* mode = std::getenv("CNNJAX_ONEDNN_POOL_LOOPS");
  const bool any_x86_only = mode != nullptr && std::strcmp(mode, "any_x86") == 0;
  if (avx512 && c >= 16 && !any_x86_only) {
    f(avx512::MaxPoolLoops{});
  } else {
    f(any_x86::MaxPoolLoops{});
  }
}

// Checks a pooling call's buffers: x (and dx, `full`) [N, H, W, C], y and dy (`pooled`)
// [N, Ho, Wo, C] with Ho = (H + top + bottom - k) / s + 1 (0 where H + top + bottom < k; Wo
// likewise), all float32 or all bfloat16 (`*type`); `*win` the windows.
ffi::Error CheckPool(const ffi::AnyBuffer& x, std::initializer_list<const ffi::AnyBuffer*> full,
                     std::initializer_list<const ffi::AnyBuffer*> pooled, int64_t k, int64_t s,
                     ffi::Span<const int64_t> padding, dt* type, PoolWindow* win) {
  const auto d = x.dimensions();
  if (!OnednnType(x.element_type(), type) || d.size() != 4 || k < 1 || s < 1 ||
      padding.size() != 4 || *std::min_element(padding.begin(), padding.end()) < 0) {
    return ffi::Error::InvalidArgument(
        "max pooling takes float32 or bfloat16 [N, H, W, C], a window and stride >= 1 and "
        "4 paddings >= 0");
  }
  *win = {k, s, padding[0], padding[2]};
  auto outputs = [&](int64_t size) { return size >= k ? (size - k) / s + 1 : 0; };
  const int64_t ho = outputs(d[1] + padding[0] + padding[1]);
  const int64_t wo = outputs(d[2] + padding[2] + padding[3]);
  auto agrees = [&](const ffi::AnyBuffer* p, int64_t rows, int64_t cols) {
    const auto pd = p->dimensions();
    return p->element_type() == x.element_type() && pd.size() == 4 && pd[0] == d[0] &&
           pd[1] == rows && pd[2] == cols && pd[3] == d[3];
  };
  bool same = true;
  for (const ffi::AnyBuffer* p : full) same = same && agrees(p, d[1], d[2]);
  for (const ffi::AnyBuffer* p : pooled) same = same && agrees(p, ho, wo);
  if (!same) return ffi::Error::InvalidArgument("max pooling: shapes or dtypes disagree");
  return ffi::Error::Success();
}

ffi::Error PoolForward(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, int64_t k, int64_t s,
                       ffi::Span<const int64_t> padding) {
  const auto d = x.dimensions();
  dt type;
  PoolWindow win;
  if (auto error = CheckPool(x, {}, {&*y}, k, s, padding, &type, &win); error.failure()) {
    return error;
  }
  const auto yd = y->dimensions();
  return Guarded("max pooling", [&] {
    std::lock_guard<std::mutex> guard(Lock());  // one OpenMP team at a time, as for oneDNN's
    WithPoolLoops(d[3], [&](auto loops) {
      if (type == dt::f32) {
        loops.template Forward<F32>(static_cast<const float*>(x.untyped_data()),
                                    static_cast<float*>(y->untyped_data()), d[0], d[1], d[2],
                                    d[3], yd[1], yd[2], win);
      } else {
        loops.template Forward<BF16>(static_cast<const uint16_t*>(x.untyped_data()),
                                     static_cast<uint16_t*>(y->untyped_data()), d[0], d[1], d[2],
                                     d[3], yd[1], yd[2], win);
      }
    });
    return ffi::Error::Success();
  });
}

// One backward pass on buffers of T: `first` lax.reduce_window's gradient, else the ties'
// shared one.
template <typename T, bool first, typename Loops>
void PoolBackwardOf(Loops loops, const ffi::AnyBuffer& x, const ffi::AnyBuffer& y,
                    const ffi::AnyBuffer& dy, ffi::Result<ffi::AnyBuffer>& dx, int64_t k,
                    PoolWindow win) {
  using S = typename T::Storage;
  const auto d = x.dimensions();
  const auto yd = y.dimensions();
  const auto* xp = static_cast<const S*>(x.untyped_data());
  const auto* yp = static_cast<const S*>(y.untyped_data());
  const auto* dyp = static_cast<const S*>(dy.untyped_data());
  if constexpr (first) {
    loops.template BackwardFirst<T>(xp, yp, dyp, static_cast<S*>(dx->untyped_data()), d[0],
                                    d[1], d[2], d[3], yd[1], yd[2], win);
  } else {
    loops.template Backward<T>(xp, yp, dyp, dx->untyped_data(), d[0], d[1], d[2], d[3], k);
  }
}

// Backward: `first` lax.reduce_window's gradient, else the ties' shared one (non-overlapping
// unpadded windows only).
template <bool first>
ffi::Error PoolBackward(ffi::AnyBuffer x, ffi::AnyBuffer y, ffi::AnyBuffer dy,
                        ffi::Result<ffi::AnyBuffer> dx, int64_t k, int64_t s,
                        ffi::Span<const int64_t> padding) {
  dt type;
  PoolWindow win;
  if (auto error = CheckPool(x, {&*dx}, {&y, &dy}, k, s, padding, &type, &win);
      error.failure()) {
    return error;
  }
  if (!first && (s != k || std::any_of(padding.begin(), padding.end(),
                                       [](int64_t p) { return p != 0; }))) {
    return ffi::Error::InvalidArgument(
        "max pooling's shared gradient takes non-overlapping unpadded windows");
  }
  return Guarded("max pooling", [&] {
    std::lock_guard<std::mutex> guard(Lock());
    WithPoolLoops(x.dimensions()[3], [&](auto loops) {
      if (type == dt::f32) {
        PoolBackwardOf<F32, first>(loops, x, y, dy, dx, k, win);
      } else {
        PoolBackwardOf<BF16, first>(loops, x, y, dy, dx, k, win);
      }
    });
    return ffi::Error::Success();
  });
}

#define CNNJAX_CONV_HANDLER(symbol, pass)                                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                            \
      symbol,                                                                               \
      [](ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,               \
         ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {              \
        return Guarded("convolution",                                                       \
                       [&] { return RunConv(pass, a, b, out, strides, padding); });         \
      },                                                                                    \
      ffi::Ffi::Bind()                                                                      \
          .Arg<ffi::AnyBuffer>()                                                            \
          .Arg<ffi::AnyBuffer>()                                                            \
          .Ret<ffi::AnyBuffer>()                                                            \
          .Attr<ffi::Span<const int64_t>>("strides")                                        \
          .Attr<ffi::Span<const int64_t>>("padding"));

}  // namespace

CNNJAX_CONV_HANDLER(CnnjaxOnednnConvFwd, Pass::kForward)
CNNJAX_CONV_HANDLER(CnnjaxOnednnConvBwdData, Pass::kBackwardData)
CNNJAX_CONV_HANDLER(CnnjaxOnednnConvBwdWeights, Pass::kBackwardWeights)

#define CNNJAX_CONV_BIAS_HANDLER(symbol, activation)                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                            \
      symbol,                                                                               \
      [](ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> bias,                    \
         ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> strides,                   \
         ffi::Span<const int64_t> padding) {                                                \
        return Guarded("convolution", [&] {                                                 \
          return RunConv(Pass::kForward, x, w, y, strides, padding, bias.typed_data(),      \
                         activation);                                                       \
        });                                                                                 \
      },                                                                                    \
      ffi::Ffi::Bind()                                                                      \
          .Arg<ffi::AnyBuffer>()                                                            \
          .Arg<ffi::AnyBuffer>()                                                            \
          .Arg<ffi::Buffer<ffi::F32>>()                                                     \
          .Ret<ffi::AnyBuffer>()                                                            \
          .Attr<ffi::Span<const int64_t>>("strides")                                        \
          .Attr<ffi::Span<const int64_t>>("padding"));

CNNJAX_CONV_BIAS_HANDLER(CnnjaxOnednnConvFwdBias, 0)
CNNJAX_CONV_BIAS_HANDLER(CnnjaxOnednnConvFwdBiasRelu, 1)
CNNJAX_CONV_BIAS_HANDLER(CnnjaxOnednnConvFwdBiasRelu6, 2)
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    CnnjaxOnednnConvBwdWeightsBias,
    [](ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
       ffi::ResultBuffer<ffi::F32> dbias, ffi::Span<const int64_t> strides,
       ffi::Span<const int64_t> padding) {
      return Guarded("convolution", [&] {
        return RunConv(Pass::kBackwardWeights, x, dy, dw, strides, padding,
                       dbias->typed_data());
      });
    },
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>()
        .Arg<ffi::AnyBuffer>()
        .Ret<ffi::AnyBuffer>()
        .Ret<ffi::Buffer<ffi::F32>>()
        .Attr<ffi::Span<const int64_t>>("strides")
        .Attr<ffi::Span<const int64_t>>("padding"));

using F32Buffer = ffi::Buffer<ffi::F32>;
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxOnednnNormFwd, NormForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Attr<float>("epsilon"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxOnednnNormBwd, NormBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Attr<float>("epsilon"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxOnednnNormInfer, NormInference,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxOnednnMaxPoolFwd, PoolForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("stride")
                                  .Attr<ffi::Span<const int64_t>>("padding"));
#define CNNJAX_POOL_BACKWARD_HANDLER(symbol, first)                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, PoolBackward<first>,              \
                                ffi::Ffi::Bind()                          \
                                    .Arg<ffi::AnyBuffer>()                \
                                    .Arg<ffi::AnyBuffer>()                \
                                    .Arg<ffi::AnyBuffer>()                \
                                    .Ret<ffi::AnyBuffer>()                \
                                    .Attr<int64_t>("window")              \
                                    .Attr<int64_t>("stride")              \
                                    .Attr<ffi::Span<const int64_t>>("padding"));
CNNJAX_POOL_BACKWARD_HANDLER(CnnjaxOnednnMaxPoolBwd, false)
CNNJAX_POOL_BACKWARD_HANDLER(CnnjaxOnednnMaxPoolBwdFirst, true)
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxOnednnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("transpose_a")
                                  .Attr<int64_t>("transpose_b"));
