// CPU row kernels of the fused cross-entropy, written once against at::vec::Vectorized and compiled once
// per instruction set by flood_ce_{default,avx2,avx512}.cpp (each defines FLOOD_ISA_NS and CPU_CAPABILITY
// before including this file; at::vec puts its types in the inline namespace CPU_CAPABILITY, so the builds
// do not collide). The math mirrors flood_kernels/triton/cross_entropy.py line by line:
//
//   forward       (one read of the row): running max / sum-exp in chunks that stay in L1 (max pass, then
//                 exp pass over the same chunk), fp32 accumulation (fp64 for fp64 input), then the loss.
//   backward      (one read + one write): grad_c = scale * (a p_c - [c == y] b - eps/V w_c) * dz/dx.
//   loss_and_grad (one read + one write): both, the gradient from the exps kept by the loss pass.
//
// Not a standalone header: no include guard on purpose.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace flood_kernels {
namespace FLOOD_ISA_NS {
namespace {

using at::vec::Vectorized;

// ---- vector helpers -------------------------------------------------------------------------------------

// exp with IEEE edge cases: NaN -> NaN, +inf / overflow -> +inf, -inf -> 0. Vectorized<float>::exp_u20
// (~20 ulp) clamps NaN and +inf to finite values, so those lanes are patched. Measured (AVX-512, one core,
// 4096 x 32000 fp32 in cache): forward 48.6 ms with exp_u20 + patch vs 59.8 ms with Vectorized::exp (Sleef
// u10); end-to-end accuracy against float64 stays at or below torch's own fp32 (losses ~1e-7 relative).
inline Vectorized<float> vexp(const Vectorized<float>& d) {
  const Vectorized<float> r = d.exp_u20();
  const Vectorized<float> finite_range = d <= Vectorized<float>(88.72283935546875f);
  return Vectorized<float>::blendv(d * Vectorized<float>(std::numeric_limits<float>::infinity()), r,
                                   finite_range);
}
inline Vectorized<double> vexp(const Vectorized<double>& d) {
  return d.exp();
}

// Non-temporal store of a full vector to a vector-aligned address (the line goes to memory without being
// read first); stream_fence() orders them before the kernel returns.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kStreamingStores = true;
inline void stream_store(float* p, const Vectorized<float>& v) { _mm512_stream_ps(p, v); }
inline void stream_fence() { _mm_sfence(); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr bool kStreamingStores = true;
inline void stream_store(float* p, const Vectorized<float>& v) { _mm256_stream_ps(p, v); }
inline void stream_fence() { _mm_sfence(); }
#else
constexpr bool kStreamingStores = false;
inline void stream_store(float* p, const Vectorized<float>& v) { v.store(p); }
inline void stream_fence() {}
#endif

template <typename A>
inline A sexp(A x) {
  return std::exp(x);
}

// Load Vectorized<A>::size() elements of T as a vector of the accumulation type A (count < size: the
// first `count` elements, the other lanes 0).
template <typename T, typename A>
inline Vectorized<A> load_acc(const T* p) {
  if constexpr (std::is_same_v<T, A>) {
    return Vectorized<A>::loadu(p);
  } else {
    Vectorized<float> out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}
template <typename T, typename A>
inline Vectorized<A> load_acc(const T* p, int64_t count) {
  if constexpr (std::is_same_v<T, A>) {
    return Vectorized<A>::loadu(p, count);
  } else {
    auto both = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, count));
    return std::get<0>(both);
  }
}
template <typename T, typename A>
inline void store_acc(T* p, const Vectorized<A>& v, int64_t count) {
  if constexpr (std::is_same_v<T, A>) {
    v.store(p, count);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, count);
  }
}

// tanh(u) and 1 - tanh(u)^2 as in the Triton kernel: series near 0, (1 - t) / (1 + t) with t = exp(-2|u|)
// elsewhere.
template <typename A>
inline void vtanh_with_derivative(const Vectorized<A>& u, Vectorized<A>& th, Vectorized<A>& dth) {
  using Vec = Vectorized<A>;
  const Vec one(A(1));
  const Vec a = u.abs();
  const Vec t = vexp(Vec(A(-2)) * a);
  const Vec far = (one - t) / (one + t);
  const Vec a2 = a * a;
  const Vec near =
      a * (one + a2 * (Vec(A(-1.0 / 3.0)) +
                       a2 * (Vec(A(2.0 / 15.0)) + a2 * (Vec(A(-17.0 / 315.0)) + a2 * Vec(A(62.0 / 2835.0))))));
  const Vec is_near = a < Vec(A(0.125));
  const Vec magnitude = Vec::blendv(far, near, is_near);
  th = Vec::blendv(magnitude, magnitude.neg(), u < Vec(A(0)));
  const Vec one_plus_t = one + t;
  dth = Vec::blendv(Vec(A(4)) * t / (one_plus_t * one_plus_t), one - near * near, is_near);
}

template <typename A>
inline Vectorized<A> vcapped(const Vectorized<A>& x, A softcap) {
  Vectorized<A> th, dth;
  vtanh_with_derivative(x / Vectorized<A>(softcap), th, dth);
  return Vectorized<A>(softcap) * th;
}

template <typename A>
inline void stanh_with_derivative(A u, A& th, A& dth) {
  tanh_with_derivative_given_exp(u, sexp(A(-2) * std::abs(u)), th, dth);
}

// NaN-propagating max.
template <typename A>
inline A max_nan(A a, A b) {
  return (a != a || b != b) ? std::numeric_limits<A>::quiet_NaN() : (a > b ? a : b);
}

// Horizontal max / sum of a vector with lane shuffles (at::vec's per-ISA reductions); the max propagates NaN
// (at::vec::maximum is IEEE 754-2019 maximum).
template <typename A>
inline A reduce_max(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](const Vectorized<A>& a, const Vectorized<A>& b) { return at::vec::maximum(a, b); },
                                    v);
}

template <typename A>
inline A reduce_sum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](const Vectorized<A>& a, const Vectorized<A>& b) { return a + b; }, v);
}

// ---- one row ------------------------------------------------------------------------------------------

// The per-row math of the three kernels, with the options of one call unpacked once.
template <typename T>
struct RowMath {
  using A = typename AccOf<T>::type;
  using Vec = Vectorized<A>;
  static constexpr int64_t W = Vec::size();
  static constexpr int64_t kChunk = 16384 / sizeof(A);  // 16 KB of z values: stays in L1 between two passes

  const RowArgs& args;
  const int64_t V;
  const A softcap;
  const bool has_softcap;
  const bool has_smoothing;
  const A* weight;
  const A eps;
  const A z_loss;
  const A reverse_coef;
  const A weight_sum;
  const A smoothing_coef;
  const A total_weight;

  explicit RowMath(const RowArgs& a)
      : args(a),
        V(a.n_classes),
        softcap(static_cast<A>(a.softcap)),
        has_softcap(a.softcap > 0.0),
        has_smoothing(a.label_smoothing > 0.0),
        weight(static_cast<const A*>(a.weight)),
        eps(static_cast<A>(a.label_smoothing)),
        z_loss(static_cast<A>(a.z_loss)),
        reverse_coef(static_cast<A>(a.reverse_coef)),
        weight_sum(static_cast<A>(a.weight_sum)),
        smoothing_coef(eps / static_cast<A>(a.n_classes)),
        total_weight((has_smoothing && weight) ? weight_sum : static_cast<A>(a.n_classes)) {}

  const T* logits_row(int64_t row) const { return static_cast<const T*>(args.logits) + row * args.logits_row_stride; }
  int64_t target_of(int64_t row) const { return args.target[row * args.target_stride]; }

  // log-sum-exp of the row's (capped) logits as (shift, log_sum), one read of memory: running max / sum-exp in
  // chunks that stay in L1 (max pass, then exp pass over the same chunk). Also sum_c w_c z_c (sum_c z_c without
  // weights).
  // With `exps`, also keeps exp(z_c - shift_k) for every class and the shift of each chunk k, so that the
  // gradient can be had without a second exp (write_grad_from_exps).
  LogSumExp<A> lse_of(const T* x, A& smoothing_sum, A* exps = nullptr, A* chunk_shifts = nullptr) const {
    if (V < W) return lse_of_narrow(x, smoothing_sum, exps, chunk_shifts);
    alignas(64) A buf[kChunk];
    const A neg_inf = -std::numeric_limits<A>::infinity();
    const bool use_buf = !std::is_same_v<T, A> || has_softcap;
    A running_max = neg_inf;  // NaN once a NaN was seen
    A running_sum = A(0);     // sum_c exp(z_c - shift(running_max)), shift(-inf) = 0
    smoothing_sum = A(0);
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t len = std::min(kChunk, V - c0);
      const int64_t full = len - len % W;
      // Pass 1 (reads memory): z into the L1 buffer (or in place for fp32 without softcap), max, sums.
      Vec vmax(neg_inf), vmax2(neg_inf), vsmooth(A(0));
      const A* z;
      if (use_buf) {
        for (int64_t j = 0; j < full; j += W) {
          Vec v = load_acc<T, A>(x + c0 + j);
          if (has_softcap) v = vcapped(v, softcap);
          v.store(buf + j);
          vmax = at::vec::maximum(vmax, v);
          if (has_smoothing) vsmooth += weight ? Vec::loadu(weight + c0 + j) * v : v;
        }
        if (full < len) {
          const int64_t rem = len - full;
          Vec v = load_acc<T, A>(x + c0 + full, rem);
          if (has_softcap) v = vcapped(v, softcap);
          v.store(buf + full, rem);
          vmax = at::vec::maximum(vmax, Vec::set(Vec(neg_inf), v, rem));
          if (has_smoothing) vsmooth += Vec::set(Vec(A(0)), weight ? Vec::loadu(weight + c0 + full, rem) * v : v, rem);
        }
        z = buf;
      } else {
        z = reinterpret_cast<const A*>(x) + c0;
        int64_t j = 0;
        for (; j + 2 * W <= full; j += 2 * W) {
          const Vec v0 = Vec::loadu(z + j), v1 = Vec::loadu(z + j + W);
          vmax = at::vec::maximum(vmax, v0);
          vmax2 = at::vec::maximum(vmax2, v1);
          if (has_smoothing) vsmooth += weight ? Vec::loadu(weight + c0 + j) * v0 + Vec::loadu(weight + c0 + j + W) * v1
                                               : v0 + v1;
        }
        for (; j < full; j += W) {
          const Vec v = Vec::loadu(z + j);
          vmax = at::vec::maximum(vmax, v);
          if (has_smoothing) vsmooth += weight ? Vec::loadu(weight + c0 + j) * v : v;
        }
        if (full < len) {
          const int64_t rem = len - full;
          const Vec v = Vec::loadu(z + full, rem);
          vmax = at::vec::maximum(vmax, Vec::set(Vec(neg_inf), v, rem));
          if (has_smoothing) vsmooth += Vec::set(Vec(A(0)), weight ? Vec::loadu(weight + c0 + full, rem) * v : v, rem);
        }
      }
      const A new_max = max_nan(running_max, reduce_max(at::vec::maximum(vmax, vmax2)));
      // An all -inf prefix must not produce exp(-inf - -inf) = NaN: its sum is 0 and stays 0.
      const A shift = new_max == neg_inf ? A(0) : new_max;
      if (running_max != neg_inf) running_sum *= sexp(running_max - shift);
      // Pass 2 (from L1): sum of exp(z - shift), in the same order with or without keeping the exps (the
      // loss must not depend on which kernel computed it).
      const Vec vshift(shift);
      A* e = exps != nullptr ? exps + c0 : nullptr;
      if (e != nullptr) chunk_shifts[c0 / kChunk] = shift;
      Vec s0(A(0)), s1(A(0));
      int64_t j = 0;
      for (; j + 2 * W <= full; j += 2 * W) {
        const Vec e0 = vexp(Vec::loadu(z + j) - vshift), e1 = vexp(Vec::loadu(z + j + W) - vshift);
        if (e != nullptr) {
          e0.store(e + j);
          e1.store(e + j + W);
        }
        s0 += e0;
        s1 += e1;
      }
      for (; j < full; j += W) {
        const Vec e0 = vexp(Vec::loadu(z + j) - vshift);
        if (e != nullptr) e0.store(e + j);
        s0 += e0;
      }
      if (full < len) {
        const int64_t rem = len - full;
        const Vec e1 = Vec::set(Vec(A(0)), vexp(Vec::loadu(z + full, rem) - vshift), rem);
        if (e != nullptr) e1.store(e + full, rem);
        s1 += e1;
      }
      running_sum += reduce_sum(s0 + s1);
      running_max = new_max;
      if (has_smoothing) smoothing_sum += reduce_sum(vsmooth);
    }
    return {running_max == neg_inf ? A(0) : running_max, std::log(running_sum)};
  }

  // lse_of for a row narrower than one vector (a classifier's few classes): the same math in scalar code,
  // without the masked vector loads and lane reductions that would cost more than the row.
  LogSumExp<A> lse_of_narrow(const T* x, A& smoothing_sum, A* exps, A* chunk_shifts) const {
    const A neg_inf = -std::numeric_limits<A>::infinity();
    A z[W];
    A row_max = neg_inf;
    smoothing_sum = A(0);
    for (int64_t c = 0; c < V; ++c) {
      A v = static_cast<A>(x[c]);
      if (has_softcap) {
        A th, dth;
        stanh_with_derivative(v / softcap, th, dth);
        v = softcap * th;
      }
      z[c] = v;
      row_max = max_nan(row_max, v);
      if (has_smoothing) smoothing_sum += weight ? weight[c] * v : v;
    }
    const A shift = row_max == neg_inf ? A(0) : row_max;
    A sum = A(0);
    for (int64_t c = 0; c < V; ++c) {
      const A e = sexp(z[c] - shift);
      if (exps != nullptr) exps[c] = e;
      sum += e;
    }
    if (chunk_shifts != nullptr) chunk_shifts[0] = shift;
    return {shift, std::log(sum)};
  }

  // The target's capped logit z_y = softcap tanh(x_y / softcap) and dz_y / dx_y, by the same code that gave
  // the row's lse its z_y (the vector tanh, or the scalar one for rows narrower than a vector): the two round
  // differently, and a confident row's 1 - p_y = 1 - exp(z_y - lse) must not see that difference (it did:
  // ~1e-6 absolute, 20x torch's own fp32 error, in the target's gradient).
  void capped_target(A x_target, A& z, A& dz) const {
    if (V < W) {
      A th;
      stanh_with_derivative(x_target / softcap, th, dz);
      z = softcap * th;
      return;
    }
    Vec th, dth;
    vtanh_with_derivative(Vec(x_target) / Vec(softcap), th, dth);
    (Vec(softcap) * th).store(&z, 1);
    dth.store(&dz, 1);
  }

  // l_i from the row's lse: 0 for ignore_index, NaN for a target outside [0, V).
  A loss_of(const T* x, int64_t target, const LogSumExp<A>& row_lse, A smoothing_sum) const {
    const bool in_range = target >= 0 && target < V;
    const int64_t safe_target = in_range ? target : 0;
    A z_target = static_cast<A>(x[safe_target]);
    if (has_softcap) {
      A dz_target;
      capped_target(z_target, z_target, dz_target);
    }
    const A w_target = weight ? weight[safe_target] : A(1);
    const A lse = row_lse.value();
    A loss = (A(1) - eps) * w_target * ((row_lse.shift - z_target) + row_lse.log_sum);
    if (has_smoothing) {
      if (weight) {
        loss += eps / static_cast<A>(V) * (lse * weight_sum - smoothing_sum);
      } else {
        loss += eps * (lse - smoothing_sum / static_cast<A>(V));
      }
    }
    loss += z_loss * lse * lse;
    loss += reverse_coef * (A(1) - sexp(row_lse.log_prob(z_target)));
    if (!in_range) loss = std::numeric_limits<A>::quiet_NaN();
    if (target == args.ignore_index) loss = A(0);
    return loss;
  }

  // What the gradient of a row needs to know about its target, read before the row is (possibly)
  // overwritten. d l_i / d z_c = a p_c - [c == y] b - eps/V w_c with a = prob_coef =
  // (1 - eps) w_y + eps/V sum(w) + 2 zeta lse + rho' p_y and b = target_coef = (1 - eps) w_y + rho' p_y.
  struct TargetTerms {
    bool in_range;
    A p_target, w_target, dz_target, target_coef, prob_coef;
  };

  TargetTerms target_terms(const T* x, int64_t target, const LogSumExp<A>& lse) const {
    TargetTerms t;
    t.in_range = target >= 0 && target < V;
    const int64_t safe_target = t.in_range ? target : 0;
    A z_target = static_cast<A>(x[safe_target]);
    t.dz_target = A(1);
    if (has_softcap) capped_target(z_target, z_target, t.dz_target);
    t.p_target = sexp(lse.log_prob(z_target));
    t.w_target = weight ? weight[safe_target] : A(1);
    t.target_coef = (A(1) - eps) * t.w_target + reverse_coef * t.p_target;
    t.prob_coef = t.target_coef + smoothing_coef * total_weight + A(2) * z_loss * lse.value();
    return t;
  }

  // scale * (a p_c - eps/V w_c) for the classes [col, col + count) given p_c (and dz/dx under softcap).
  Vec scaled_grad(const Vec& p, const Vec& vprob, const Vec& vscale, int64_t col, int64_t count) const {
    Vec grad = vprob * p;
    if (has_smoothing) {
      const Vec vsmooth(smoothing_coef);
      if (weight) {
        grad = grad - vsmooth * (count == W ? Vec::loadu(weight + col) : Vec::loadu(weight + col, count));
      } else {
        grad = grad - vsmooth;
      }
    }
    return grad * vscale;
  }

  // Whether the row's gradient goes to memory with non-temporal stores: a large fresh buffer (no
  // read-for-ownership of lines that are about to be overwritten anyway), fp32, vector-aligned row.
  bool streams(const T* g) const {
    return std::is_same_v<T, float> && kStreamingStores && args.stream_grad &&
           reinterpret_cast<uintptr_t>(g) % sizeof(Vec) == 0;
  }

  static void store_grad(T* g, const Vec& grad, int64_t count, bool stream) {
    if constexpr (std::is_same_v<T, A>) {
      if (count == W) {
        if constexpr (std::is_same_v<T, float>) {
          if (stream) return stream_store(g, grad);
        }
        grad.store(g);
        return;
      }
    }
    store_acc<T, A>(g, grad, count);
  }

  // The target's own element: its -b term, written after the vector loop.
  void write_target(T* g, int64_t target, const TargetTerms& t, A scale) const {
    if (!t.in_range) return;
    A grad_target = t.prob_coef * t.p_target - t.target_coef;
    if (has_smoothing) grad_target -= smoothing_coef * t.w_target;
    g[target] = static_cast<T>(grad_target * t.dz_target * scale);
  }

  // g = scale * d l_i / d x (one read of x, one write of g; g may alias x): exact zeros for ignore_index,
  // NaN for a target outside [0, V).
  void write_grad(const T* x, T* g, int64_t target, const LogSumExp<A>& lse, A scale) const {
    if (target == args.ignore_index) {
      std::memset(static_cast<void*>(g), 0, sizeof(T) * V);  // exact zeros, whatever the logits hold
      return;
    }
    const TargetTerms t = target_terms(x, target, lse);
    if (!t.in_range) scale = std::numeric_limits<A>::quiet_NaN();
    const Vec vshift(lse.shift), vlog_sum(lse.log_sum), vprob(t.prob_coef), vscale(scale);
    auto grad_of = [&](const Vec& xv, int64_t col, int64_t count) {
      if (!has_softcap) return scaled_grad(vexp((xv - vshift) - vlog_sum), vprob, vscale, col, count);
      Vec th, dz;
      vtanh_with_derivative(xv / Vec(softcap), th, dz);
      return scaled_grad(vexp((Vec(softcap) * th - vshift) - vlog_sum), vprob, vscale, col, count) * dz;
    };
    const int64_t full = V - V % W;
    const bool stream = streams(g);
    for (int64_t j = 0; j < full; j += W) store_grad(g + j, grad_of(load_acc<T, A>(x + j), j, W), W, stream);
    if (full < V) {
      const int64_t rem = V - full;
      store_grad(g + full, grad_of(load_acc<T, A>(x + full, rem), full, rem), rem, stream);
    }
    write_target(g, target, t, scale);
  }

  // write_grad without softcap from the exps and chunk shifts that lse_of kept: p_c = exp(z_c - shift_k) *
  // exp(shift_k - lse), one multiply per class instead of an exp, and the logits are not read again.
  void write_grad_from_exps(const T* x, T* g, int64_t target, const LogSumExp<A>& lse, A scale, const A* exps,
                            const A* chunk_shifts) const {
    if (target == args.ignore_index) {
      std::memset(static_cast<void*>(g), 0, sizeof(T) * V);
      return;
    }
    const TargetTerms t = target_terms(x, target, lse);
    if (!t.in_range) scale = std::numeric_limits<A>::quiet_NaN();
    const Vec vprob(t.prob_coef), vscale(scale);
    const bool stream = streams(g);
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t len = std::min(kChunk, V - c0);
      const int64_t full = len - len % W;
      const Vec rescale(sexp(lse.log_prob(chunk_shifts[c0 / kChunk])));
      for (int64_t j = 0; j < full; j += W) {
        store_grad(g + c0 + j, scaled_grad(Vec::loadu(exps + c0 + j) * rescale, vprob, vscale, c0 + j, W), W,
                   stream);
      }
      if (full < len) {
        const int64_t rem = len - full;
        store_grad(g + c0 + full,
                   scaled_grad(Vec::loadu(exps + c0 + full, rem) * rescale, vprob, vscale, c0 + full, rem), rem,
                   stream);
      }
    }
    write_target(g, target, t, scale);
  }
};

// ---- the three row kernels ----------------------------------------------------------------------------

// forward: one read of each row; writes l_i and lse_i (as its shift and log_sum).
template <typename T>
void forward_rows(const RowArgs& args, int64_t row_begin, int64_t row_end) {
  using A = typename AccOf<T>::type;
  const RowMath<T> m(args);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x = m.logits_row(row);
    A smoothing_sum;
    const LogSumExp<A> lse = m.lse_of(x, smoothing_sum);
    static_cast<A*>(args.losses)[row] = m.loss_of(x, m.target_of(row), lse, smoothing_sum);
    lse.store(static_cast<A*>(args.lse_out) + 2 * row);
  }
}

// backward: one read + one write per row, scaled by the per-row grad_losses (grad_output, flood sign and
// denominator folded together on device).
template <typename T>
void backward_rows(const RowArgs& args, int64_t row_begin, int64_t row_end) {
  using A = typename AccOf<T>::type;
  const RowMath<T> m(args);
  const A* grad_losses = static_cast<const A*>(args.grad_losses);
  const A* lse_in = static_cast<const A*>(args.lse_in);
  for (int64_t row = row_begin; row < row_end; ++row) {
    T* g = static_cast<T*>(args.grad) + row * args.grad_row_stride;
    m.write_grad(m.logits_row(row), g, m.target_of(row), LogSumExp<A>::load(lse_in + row * args.lse_stride),
                 grad_losses[row * args.grad_losses_stride]);
  }
  if (args.stream_grad) stream_fence();
}

// loss_and_grad: the loss and the gradient of a row in one read of the logits and one exp per class,
// scaled by sgn(l_i - b_i) (per-sample flooding) or 1, times grad_scale.
template <typename T>
void loss_and_grad_rows(const RowArgs& args, int64_t row_begin, int64_t row_end) {
  using A = typename AccOf<T>::type;
  const RowMath<T> m(args);
  const A* levels = static_cast<const A*>(args.flood_level);
  const A grad_scale = *static_cast<const A*>(args.grad_scale);
  // exp(z - shift) of the whole row (sizeof(A) V bytes per thread, in L2 for V up to ~10^5; kept by the
  // thread for the next call), unless softcap, whose gradient also needs tanh' and so recomputes from the
  // logits, or V beyond kMaxKeptExps, where a per-thread buffer would cost more memory than it saves time.
  constexpr int64_t kMaxKeptExps = int64_t{1} << 18;
  const bool keep_exps = !m.has_softcap && m.V <= kMaxKeptExps;
  thread_local std::vector<A> exps;
  thread_local std::vector<A> chunk_shifts;
  if (keep_exps) {
    exps.resize(m.V);
    chunk_shifts.resize((m.V + RowMath<T>::kChunk - 1) / RowMath<T>::kChunk);
  }
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x = m.logits_row(row);
    const int64_t target = m.target_of(row);
    A smoothing_sum;
    const LogSumExp<A> lse = keep_exps ? m.lse_of(x, smoothing_sum, exps.data(), chunk_shifts.data())
                                       : m.lse_of(x, smoothing_sum);
    const A loss = m.loss_of(x, target, lse, smoothing_sum);
    static_cast<A*>(args.losses)[row] = loss;
    A sign = A(1);
    if (args.flood_rows) {
      // The sign of the difference (as the Triton and CUDA kernels): +1, -1, 0, and NaN for a NaN loss or
      // an infinite loss at an infinite level.
      const A excess = loss - levels[row * args.flood_level_stride];
      sign = excess > A(0)    ? A(1)
             : excess < A(0)  ? A(-1)
             : excess == A(0) ? A(0)
                              : std::numeric_limits<A>::quiet_NaN();
    }
    T* g = static_cast<T*>(args.grad) + row * args.grad_row_stride;
    if (keep_exps) {
      m.write_grad_from_exps(x, g, target, lse, sign * grad_scale, exps.data(), chunk_shifts.data());
    } else {
      m.write_grad(x, g, target, lse, sign * grad_scale);
    }
  }
  if (args.stream_grad) stream_fence();
}

// Calls rows(T{}) with the logits' element type T.
template <typename Rows>
void with_logits_type(c10::ScalarType dtype, Rows rows) {
  switch (dtype) {
    case c10::ScalarType::Float: return rows(float{});
    case c10::ScalarType::Double: return rows(double{});
    case c10::ScalarType::Half: return rows(c10::Half{});
    case c10::ScalarType::BFloat16: return rows(c10::BFloat16{});
    default: return;  // unreachable: dtypes are checked by the op
  }
}

void forward_any(const RowArgs& args, int64_t begin, int64_t end) {
  with_logits_type(args.dtype, [&](auto tag) { forward_rows<decltype(tag)>(args, begin, end); });
}

void backward_any(const RowArgs& args, int64_t begin, int64_t end) {
  with_logits_type(args.dtype, [&](auto tag) { backward_rows<decltype(tag)>(args, begin, end); });
}

void loss_and_grad_any(const RowArgs& args, int64_t begin, int64_t end) {
  with_logits_type(args.dtype, [&](auto tag) { loss_and_grad_rows<decltype(tag)>(args, begin, end); });
}

}  // namespace

CpuKernels kernels() {
  CpuKernels k;
  k.forward = &forward_any;
  k.backward = &backward_any;
  k.loss_and_grad = &loss_and_grad_any;
  return k;
}

}  // namespace FLOOD_ISA_NS
}  // namespace flood_kernels
