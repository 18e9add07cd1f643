// CUDA kernels of flood_kernels._C (TORCH_LIBRARY_IMPL CUDA): the per-row fused cross-entropy forward
// (one read of the logits), backward (one read + one write), loss_and_grad (both in one kernel, one read + one
// write) and scale_grad_ (grad *= grad_output unless it is 1, tested on the device), mirroring
// csrc/cpu/flood_ce_kernel.h and flood_kernels/triton/cross_entropy.py. The row kernels share their device code:
// add_pack / add_scalars + warp_reduce / store_warp_totals / reduce_warp_totals + lse_of + row_loss (the statistics
// and l_i), row_scale (the flood sign) and RowGradient (the gradient).
//
// Layout: a warp per row when V <= 1024 (kWarpRows rows per block), otherwise a block per row. Each thread
// streams its part of the row with 16-byte vector loads (after a scalar head that aligns the row; scalar tail),
// keeps an online (max, sum-exp) pair in fp32 (fp64 for fp64 input), then warp shuffles + shared memory
// combine the pairs. Row offsets are 64-bit. Out-of-range targets give NaN (no host sync, no device assert).
// loss_and_grad past V = 1024 holds the row in registers from its read to its gradient's write (a block; on sm_90
// a thread-block cluster of up to 8 blocks that exchange their totals through distributed shared memory: bf16 rows
// up to 262144 classes, fp32 up to 131072); longer rows re-read the row for the gradient (from L2 at best).

#include "../flood_ce.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

namespace flood_kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpRows = 4;           // rows per block in the warp-per-row layout
constexpr int64_t kWarpRowMaxV = 1024;  // V up to this: a warp per row
constexpr int kUnroll = 4;             // 16-byte loads in flight per thread
// Block size cap of the block-per-row layout, and its kernels' __launch_bounds__. Unbounded, ptxas gives several
// instantiations (fp64, softcap, smoothing) more than 64 registers, so a 1024-thread launch of those fails ("too
// many resources requested for launch"); 512 threads leave up to 128 registers per thread. The warp layout
// launches 128 threads and stays unbounded (a bound there makes ptxas spill to save registers).
constexpr int kMaxBlockThreads = 512;

// Fast exp as Triton's tl.exp (ex2.approx) for fp32; exact exp for fp64. Both give exp(-inf) = 0,
// exp(NaN) = NaN, exp(+inf) = +inf.
__device__ __forceinline__ float dexp(float x) { return __expf(x); }
__device__ __forceinline__ double dexp(double x) { return ::exp(x); }
__device__ __forceinline__ float dlog(float x) { return ::logf(x); }
__device__ __forceinline__ double dlog(double x) { return ::log(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// tanh(u) and 1 - tanh(u)^2, as _tanh_with_derivative in the Triton kernel.
template <typename A>
__device__ __forceinline__ void tanh_with_derivative(A u, A& th, A& dth) {
  tanh_with_derivative_given_exp(u, dexp(A(-2) * (u < A(0) ? -u : u)), th, dth);
}

template <typename A, bool SOFTCAP>
__device__ __forceinline__ A capped(A x, A softcap) {
  if constexpr (SOFTCAP) {
    A th, dth;
    tanh_with_derivative(x / softcap, th, dth);
    return softcap * th;
  } else {
    return x;
  }
}

// 16 bytes of T.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  Pack<T> pack;
  *reinterpret_cast<uint4*>(&pack) = *reinterpret_cast<const uint4*>(p);
  return pack;
}

// Element i of a pack in the accumulation type. bf16 -> fp32 is a 16-bit shift of the pack's 32-bit words, written
// as such so that the packs stay packed in registers (c10::BFloat16's conversion unpacks them: twice the registers).
template <typename T>
__device__ __forceinline__ typename AccOf<T>::type pack_value(const Pack<T>& pack, int i) {
  return static_cast<typename AccOf<T>::type>(pack.v[i]);
}
template <>
__device__ __forceinline__ float pack_value(const Pack<c10::BFloat16>& pack, int i) {
  const uint32_t word = reinterpret_cast<const uint32_t*>(&pack)[i / 2];
  return __uint_as_float(i % 2 == 0 ? word << 16 : word & 0xffff0000u);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& pack) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&pack);
}

// Elements before the first 16-byte boundary of p (all of them if p is not even element aligned).
template <typename T>
__device__ __forceinline__ int64_t head_elements(const void* p, int64_t n) {
  const uintptr_t misalign = reinterpret_cast<uintptr_t>(p) & 15;
  if (misalign % sizeof(T) != 0) return n;
  const int64_t head = misalign == 0 ? 0 : static_cast<int64_t>((16 - misalign) / sizeof(T));
  return head < n ? head : n;
}

struct KernelParams {
  // outputs
  void* losses;       // forward, loss_and_grad (N,)
  void* lse_out;      // forward (N, 2): [shift, log_sum] (LogSumExp)
  void* grad;         // backward (N, V), may alias logits; loss_and_grad (N, V) contiguous, a new tensor
  int64_t grad_row_stride;
  // inputs
  const void* logits;
  int64_t logits_row_stride;
  const int64_t* target;
  int64_t target_stride;
  const void* weight;      // (V,) loss dtype or null
  const void* weight_sum;  // () loss dtype, device scalar, or null (backward with weight and smoothing)
  const void* grad_losses;
  int64_t grad_losses_stride;
  const void* lse_in;  // backward (N, 2), [shift, log_sum] at stride 1
  int64_t lse_stride;  // between rows
  // sizes
  int64_t n_rows;
  int64_t n_classes;
  // scalar options
  int64_t ignore_index;
  double label_smoothing;
  double z_loss;
  double softcap;
  double reverse_coef;
  // loss_and_grad (last, so that the fields above keep their offsets)
  const void* flood_level;     // (N,) loss dtype, stride flood_level_stride (0: one level); only read if flood_rows
  int64_t flood_level_stride;
  const void* grad_scale;      // () loss dtype, device scalar: 1 / denominator (times grad_output) or 1
  bool flood_rows;             // scale row i by sgn(l_i - flood_level[i]) as well
};

// ---- online log-sum-exp state -------------------------------------------------------------------------
// (m, s): m = max of the z seen (NaN ignored; a NaN poisons s instead), s = sum exp(z - shift(m)) with
// shift(-inf) = 0, so an all -inf prefix holds s = 0 and never computes exp(-inf - -inf).
template <typename A>
struct MaxSum {
  A m;
  A s;
};

template <typename A>
__device__ __forceinline__ A rescale(A s, A m, A new_m) {
  return m == neg_inf<A>() ? s : s * dexp(m - new_m);  // m finite (or +inf: s is NaN already)
}

template <typename A>
__device__ __forceinline__ MaxSum<A> combine(MaxSum<A> a, MaxSum<A> b) {
  const A m = a.m > b.m ? a.m : b.m;
  return {m, rescale(a.s, a.m, m) + rescale(b.s, b.m, m)};
}

template <typename A>
__device__ __forceinline__ void add_values(MaxSum<A>& st, const A* z, int n) {
  A block_max = st.m;
#pragma unroll
  for (int i = 0; i < n; ++i) block_max = z[i] > block_max ? z[i] : block_max;  // NaN skipped
  const A shift = block_max == neg_inf<A>() ? A(0) : block_max;
  A s = rescale(st.s, st.m, block_max);
#pragma unroll
  for (int i = 0; i < n; ++i) s += dexp(z[i] - shift);  // +inf: exp(inf - inf) = NaN, as in Triton
  st = {block_max, s};
}

template <typename A>
__device__ __forceinline__ void warp_reduce(MaxSum<A>& st, A& smooth) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    MaxSum<A> other{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset)};
    st = combine(st, other);
    smooth += __shfl_xor_sync(0xffffffffu, smooth, offset);
  }
}

// ---- row statistics (the forward's pass; also the first pass of loss_and_grad) -------------------------

// Adds one (capped) logit z of class col to a thread's statistics: the online (max, sum-exp) pair st and, with
// SMOOTHING, smooth += w_col z (z without weights).
template <bool SMOOTHING, typename A>
__device__ __forceinline__ void add_logits(MaxSum<A>& st, A& smooth, const A* z, int n, const A* weight, int64_t col) {
  add_values(st, z, n);
  if constexpr (SMOOTHING) {
#pragma unroll
    for (int i = 0; i < n; ++i) smooth += weight ? weight[col + i] * z[i] : z[i];
  }
}

// add_logits for one 16-byte pack of raw logits whose first element is class col.
template <typename T, bool SOFTCAP, bool SMOOTHING, typename A>
__device__ __forceinline__ void add_pack(MaxSum<A>& st, A& smooth, const Pack<T>& pack, const A* weight, A softcap,
                                         int64_t col) {
  A z[Pack<T>::kSize];
#pragma unroll
  for (int i = 0; i < Pack<T>::kSize; ++i) z[i] = capped<A, SOFTCAP>(pack_value(pack, i), softcap);
  add_logits<SMOOTHING>(st, smooth, z, Pack<T>::kSize, weight, col);
}

// add_logits for the classes [begin, end) of the row x that are this thread's (begin + tid, begin + tid + nthreads, ...),
// one at a time: the scalar head and tail around a row's 16-byte packs.
template <typename T, bool SOFTCAP, bool SMOOTHING, typename A>
__device__ __forceinline__ void add_scalars(MaxSum<A>& st, A& smooth, const T* x, int64_t begin, int64_t end,
                                            const A* weight, A softcap, int tid, int nthreads) {
  for (int64_t c = begin + tid; c < end; c += nthreads) {
    const A z = capped<A, SOFTCAP>(static_cast<A>(x[c]), softcap);
    add_logits<SMOOTHING>(st, smooth, &z, 1, weight, c);
  }
}

// Adds this thread's part of the row to its statistics (st = {-inf, 0} and smooth = 0 to start): the online
// (max, sum-exp) of the (capped) logits and, with SMOOTHING, sum_c w_c z_c (sum_c z_c without weights), over the
// classes tid, tid + nthreads, ... (16-byte packs after the scalar head that aligns x, then a scalar tail).
template <typename T, bool SOFTCAP, bool SMOOTHING, typename A>
__device__ __forceinline__ void row_partials(const T* x, const A* weight, int64_t V, A softcap, int tid, int nthreads,
                                             MaxSum<A>& st, A& smooth) {
  constexpr int kVec = Pack<T>::kSize;
  const int64_t head = head_elements<T>(x, V);
  const int64_t n_vec = (V - head) / kVec;
  const int64_t tail = head + n_vec * kVec;
  add_scalars<T, SOFTCAP, SMOOTHING>(st, smooth, x, 0, head, weight, softcap, tid, nthreads);
  const T* xv = x + head;
  for (int64_t k0 = tid; k0 < n_vec; k0 += static_cast<int64_t>(nthreads) * kUnroll) {
    Pack<T> packs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + static_cast<int64_t>(u) * nthreads;
      if (k < n_vec) packs[u] = load_pack(xv + k * kVec);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + static_cast<int64_t>(u) * nthreads;
      if (k < n_vec) add_pack<T, SOFTCAP, SMOOTHING>(st, smooth, packs[u], weight, softcap, head + k * kVec);
    }
  }
  add_scalars<T, SOFTCAP, SMOOTHING>(st, smooth, x, tail, V, weight, softcap, tid, nthreads);
}

// Block layout: the warps' totals in shared memory (three __shared__ arrays of kWarp). Each kernel's row body
// (the Body tag) gets arrays of its own, as if they were declared in it (so the forward kernels compile as they
// did before loss_and_grad shared this code).
template <typename A>
struct WarpTotals {
  A* m;
  A* s;
  A* smooth;
};
template <int BODY, typename T, bool SOFTCAP, bool SMOOTHING>
struct RowBody {};
constexpr int kForwardBody = 0;
constexpr int kLossAndGradBody = 1;
constexpr int kResidentBody = 2;

template <typename Body, typename A>
__device__ __forceinline__ WarpTotals<A> warp_totals() {
  __shared__ A shared_m[kWarp];
  __shared__ A shared_s[kWarp];
  __shared__ A shared_smooth[kWarp];
  return {shared_m, shared_s, shared_smooth};
}

// Block layout, every thread of the block: lane 0 of each warp stores its warp's totals (after warp_reduce), then
// the block-wide barrier. warp = tid / kWarp, lane = tid % kWarp.
template <typename A>
__device__ __forceinline__ void store_warp_totals(const WarpTotals<A>& totals, const MaxSum<A>& st, A smooth,
                                                  int warp, int lane) {
  if (lane == 0) {
    totals.m[warp] = st.m;
    totals.s[warp] = st.s;
    totals.smooth[warp] = smooth;
  }
  __syncthreads();
}

// Block layout, the whole of warp 0 only (after store_warp_totals): the row's totals from the n_warps warps' ones,
// in every lane of warp 0.
template <typename A>
__device__ __forceinline__ void reduce_warp_totals(const WarpTotals<A>& totals, MaxSum<A>& st, A& smooth, int lane,
                                                   int n_warps) {
  st = lane < n_warps ? MaxSum<A>{totals.m[lane], totals.s[lane]} : MaxSum<A>{neg_inf<A>(), A(0)};
  smooth = lane < n_warps ? totals.smooth[lane] : A(0);
  warp_reduce(st, smooth);
}

// The row's log-sum-exp from its (max, sum-exp) totals, as (shift, log_sum).
template <typename A>
__device__ __forceinline__ LogSumExp<A> lse_of(const MaxSum<A>& st) {
  return {st.m == neg_inf<A>() ? A(0) : st.m, dlog(st.s)};
}

// l_i from the row's lse and smoothing sum (one thread): 0 for ignore_index, NaN for a target outside [0, V).
// weight, V and softcap are p's, unpacked by the caller.
template <typename T, bool SOFTCAP, bool SMOOTHING, typename A>
__device__ __forceinline__ A row_loss(const KernelParams& p, const T* x, const A* weight, int64_t V, A softcap,
                                      int64_t target, const LogSumExp<A>& row_lse, A smooth) {
  const bool in_range = target >= 0 && target < V;
  const int64_t safe_target = in_range ? target : 0;
  const A z_target = capped<A, SOFTCAP>(static_cast<A>(x[safe_target]), softcap);
  const A w_target = weight ? weight[safe_target] : A(1);
  const A eps = static_cast<A>(p.label_smoothing);
  const A lse = row_lse.value();
  A loss = (A(1) - eps) * w_target * ((row_lse.shift - z_target) + row_lse.log_sum);
  if constexpr (SMOOTHING) {
    if (weight) {
      // sum(w) comes from the host side as a device scalar (weight.sum(), no sync), not from a per-row loop.
      loss += eps / static_cast<A>(V) * (lse * *static_cast<const A*>(p.weight_sum) - smooth);
    } else {
      loss += eps * (lse - smooth / static_cast<A>(V));
    }
  }
  loss += static_cast<A>(p.z_loss) * lse * lse;
  loss += static_cast<A>(p.reverse_coef) * (A(1) - dexp(row_lse.log_prob(z_target)));
  if (!in_range) loss = std::numeric_limits<A>::quiet_NaN();
  if (target == p.ignore_index) loss = A(0);
  return loss;
}

// ---- row gradient (the backward's pass; also the second pass of loss_and_grad) -------------------------

// scale * d l_i / d x_c of one row: a p_c - [c == y] b - eps / V w_c, with a = (1 - eps) w_y + eps / V sum(w) +
// 2 zeta lse + rho' p_y and b = (1 - eps) w_y + rho' p_y, times dz/dx = 1 - tanh^2 under softcap; NaN everywhere for
// a target outside [0, V) (the ignored rows are the callers' business: exact zeros, see store_zeros).
template <typename T, bool SOFTCAP, bool SMOOTHING>
struct RowGradient {
  using A = typename AccOf<T>::type;
  const A* weight;
  A softcap;
  LogSumExp<A> lse;
  A scale;
  A prob_coef;
  A target_coef;
  A smoothing_coef;
  int64_t target;

  // x: the row's logits, of which the target's is read here; scale: the row's d loss / d l_i.
  __device__ __forceinline__ RowGradient(const KernelParams& p, const T* x, int64_t target_, LogSumExp<A> lse_,
                                         A scale_)
      : weight(static_cast<const A*>(p.weight)), softcap(static_cast<A>(p.softcap)), lse(lse_), target(target_) {
    const int64_t V = p.n_classes;
    const bool in_range = target >= 0 && target < V;
    const int64_t safe_target = in_range ? target : 0;
    const A eps = static_cast<A>(p.label_smoothing);
    const A z_target = capped<A, SOFTCAP>(static_cast<A>(x[safe_target]), softcap);
    const A w_target = weight ? weight[safe_target] : A(1);
    scale = in_range ? scale_ : std::numeric_limits<A>::quiet_NaN();
    target_coef = (A(1) - eps) * w_target + static_cast<A>(p.reverse_coef) * dexp(lse.log_prob(z_target));
    smoothing_coef = eps / static_cast<A>(V);
    A total_weight = static_cast<A>(V);
    if constexpr (SMOOTHING) {
      if (weight) total_weight = *static_cast<const A*>(p.weight_sum);
    }
    prob_coef = target_coef + smoothing_coef * total_weight + A(2) * static_cast<A>(p.z_loss) * lse.value();
  }

  // The gradient at class col, whose raw logit is xval, in the logits' dtype.
  __device__ __forceinline__ T operator()(A xval, int64_t col) const {
    A z = xval;
    A dz = A(1);
    if constexpr (SOFTCAP) {
      A th;
      tanh_with_derivative(xval / softcap, th, dz);
      z = softcap * th;
    }
    A grad = prob_coef * dexp(lse.log_prob(z)) - (col == target ? target_coef : A(0));
    if constexpr (SMOOTHING) grad -= smoothing_coef * (weight ? weight[col] : A(1));
    if constexpr (SOFTCAP) grad *= dz;
    return static_cast<T>(grad * scale);
  }
};

// Exact zeros into g[0, n) (an ignored row, or this block's part of one), over this thread's elements:
// 16-byte packs after the scalar head that aligns g, then a scalar tail.
template <typename T>
__device__ __forceinline__ void store_zeros(T* g, int64_t n, int tid, int nthreads) {
  constexpr int kVec = Pack<T>::kSize;
  Pack<T> zeros;
#pragma unroll
  for (int i = 0; i < kVec; ++i) zeros.v[i] = T(0);
  const int64_t head = head_elements<T>(g, n);
  const int64_t n_vec = (n - head) / kVec;
  for (int64_t c = tid; c < head; c += nthreads) g[c] = T(0);
  for (int64_t k = tid; k < n_vec; k += nthreads) store_pack(g + head + k * kVec, zeros);
  for (int64_t c = head + n_vec * kVec + tid; c < n; c += nthreads) g[c] = T(0);
}

// Writes the row's scale * d l_i / d x into g (may alias x: each element is read, then written by the same
// thread): exact zeros for ignore_index, NaN for a target outside [0, V). lse and scale are only asked for
// (load_lse(), load_scale()) by rows that need them: not by ignored rows, and scale not by out-of-range ones.
// Holds a __syncthreads (block layout) / __syncwarp (warp layout) that every thread of the row reaches unless
// the row is ignored (then the whole row returns early: target is the same for all its threads).
template <typename T, bool SOFTCAP, bool SMOOTHING, bool BLOCK_PER_ROW, typename LoadLse, typename LoadScale>
__device__ __forceinline__ void grad_row(const KernelParams& p, const T* x, T* g, int64_t target, LoadLse load_lse,
                                         LoadScale load_scale) {
  using A = typename AccOf<T>::type;
  constexpr int kVec = Pack<T>::kSize;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int64_t V = p.n_classes;
  if (target == p.ignore_index) {  // exact zeros, whatever the logits hold
    store_zeros(g, V, tid, nthreads);
    return;
  }
  const int64_t head = head_elements<T>(g, V);
  const bool vectorize = head_elements<T>(x, V) == head;  // same misalignment: vectorize both sides
  const int64_t n_vec = vectorize ? (V - head) / kVec : 0;
  const int64_t tail = vectorize ? head + n_vec * kVec : 0;  // scalar loop start after the vector body

  const bool in_range = target >= 0 && target < V;
  const LogSumExp<A> lse = load_lse();
  const A scale = in_range ? load_scale() : A(0);  // out of range, RowGradient's scale is NaN
  // Reads the target's logit, which every thread does before any thread of this row writes (the __syncthreads
  // below): in place, it is overwritten by whichever thread owns it.
  const RowGradient<T, SOFTCAP, SMOOTHING> grad_of(p, x, target, lse, scale);
  if constexpr (BLOCK_PER_ROW) {
    __syncthreads();
  } else {
    __syncwarp();
  }

  if (vectorize) {
    for (int64_t c = tid; c < head; c += nthreads) g[c] = grad_of(static_cast<A>(x[c]), c);
    const T* xv = x + head;
    T* gv = g + head;
    for (int64_t k0 = tid; k0 < n_vec; k0 += static_cast<int64_t>(nthreads) * kUnroll) {
      Pack<T> packs[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = k0 + static_cast<int64_t>(u) * nthreads;
        if (k < n_vec) packs[u] = load_pack(xv + k * kVec);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = k0 + static_cast<int64_t>(u) * nthreads;
        if (k < n_vec) {
          Pack<T> out;
#pragma unroll
          for (int i = 0; i < kVec; ++i) out.v[i] = grad_of(pack_value(packs[u], i), head + k * kVec + i);
          store_pack(gv + k * kVec, out);
        }
      }
    }
  }
  for (int64_t c = tail + tid; c < V; c += nthreads) g[c] = grad_of(static_cast<A>(x[c]), c);
}

// The logits, gradient and target of row `row` (the gradient pointer is only valid for the kernels that write one).
template <typename T>
struct RowRefs {
  const T* x;
  T* g;
  int64_t target;
};

template <typename T>
__device__ __forceinline__ RowRefs<T> row_refs(const KernelParams& p, int64_t row) {
  return {static_cast<const T*>(p.logits) + row * p.logits_row_stride, static_cast<T*>(p.grad) + row * p.grad_row_stride,
          p.target[row * p.target_stride]};
}

// ---- the three row bodies -----------------------------------------------------------------------------

// The row of this thread: blockIdx.x (block layout), or threadIdx.y of the block's kWarpRows (warp layout).
template <bool BLOCK_PER_ROW>
__device__ __forceinline__ int64_t row_index() {
  return BLOCK_PER_ROW ? static_cast<int64_t>(blockIdx.x) : static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
}

// forward: l_i and lse_i, as (shift, log_sum) (one read of the row).
template <typename T, bool SOFTCAP, bool SMOOTHING, bool BLOCK_PER_ROW>
__device__ __forceinline__ void forward_row(const KernelParams& p) {
  using A = typename AccOf<T>::type;
  const int64_t row = row_index<BLOCK_PER_ROW>();
  if (!BLOCK_PER_ROW && row >= p.n_rows) return;  // whole warps leave; no block-wide sync in this layout
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int64_t V = p.n_classes;
  const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  const A* weight = static_cast<const A*>(p.weight);
  const A softcap = static_cast<A>(p.softcap);

  MaxSum<A> st{neg_inf<A>(), A(0)};
  A smooth = A(0);  // sum_c w_c z_c (sum_c z_c without weights)
  row_partials<T, SOFTCAP, SMOOTHING>(x, weight, V, softcap, tid, nthreads, st, smooth);
  warp_reduce(st, smooth);
  if constexpr (BLOCK_PER_ROW) {
    const WarpTotals<A> totals = warp_totals<RowBody<kForwardBody, T, SOFTCAP, SMOOTHING>, A>();
    const int warp = tid / kWarp;
    const int lane = tid % kWarp;
    const int n_warps = (nthreads + kWarp - 1) / kWarp;
    store_warp_totals(totals, st, smooth, warp, lane);
    if (warp != 0) return;
    reduce_warp_totals(totals, st, smooth, lane, n_warps);
  }
  if (tid != 0) return;

  const LogSumExp<A> lse = lse_of(st);
  const int64_t target = p.target[row * p.target_stride];
  static_cast<A*>(p.losses)[row] = row_loss<T, SOFTCAP, SMOOTHING>(p, x, weight, V, softcap, target, lse, smooth);
  lse.store(static_cast<A*>(p.lse_out) + 2 * row);
}

// backward: the gradient scaled by grad_losses[i], from the forward's lse (one read + one write of the row).
template <typename T, bool SOFTCAP, bool SMOOTHING, bool BLOCK_PER_ROW>
__device__ __forceinline__ void backward_row(const KernelParams& p) {
  using A = typename AccOf<T>::type;
  const int64_t row = row_index<BLOCK_PER_ROW>();
  if (row >= p.n_rows) return;
  const auto [x, g, target] = row_refs<T>(p, row);
  grad_row<T, SOFTCAP, SMOOTHING, BLOCK_PER_ROW>(
      p, x, g, target, [&] { return LogSumExp<A>::load(static_cast<const A*>(p.lse_in) + row * p.lse_stride); },
      [&] { return static_cast<const A*>(p.grad_losses)[row * p.grad_losses_stride]; });
}

// loss_and_grad: the row's d loss / d l_i, s_i = grad_scale * (flood_rows ? sgn(l_i - flood_level[i]) : 1), from its
// loss l_i. d |l - b| / d l = sgn(l - b): +1, -1, 0 at the level, NaN for a NaN difference (as the Triton kernel).
template <typename A>
__device__ __forceinline__ A row_scale(const KernelParams& p, int64_t row, A loss) {
  const A scale = *static_cast<const A*>(p.grad_scale);
  if (!p.flood_rows) return scale;
  const A excess = loss - static_cast<const A*>(p.flood_level)[row * p.flood_level_stride];
  const A sign = excess > A(0)    ? A(1)
                 : excess < A(0)  ? A(-1)
                 : excess == A(0) ? A(0)
                                  : std::numeric_limits<A>::quiet_NaN();
  return sign * scale;
}

// loss_and_grad: the forward's l_i (written to losses) and the backward's gradient with grad_losses[i] = s_i =
// grad_scale * (flood_rows ? sgn(l_i - flood_level[i]) : 1), in one kernel: the statistics pass reads the row
// from memory, the gradient pass reads it again (from L2). grad is a fresh buffer (never the logits).
template <typename T, bool SOFTCAP, bool SMOOTHING, bool BLOCK_PER_ROW>
__device__ __forceinline__ void loss_and_grad_row(const KernelParams& p) {
  using A = typename AccOf<T>::type;
  const int64_t row = row_index<BLOCK_PER_ROW>();
  if (!BLOCK_PER_ROW && row >= p.n_rows) return;  // whole warps leave; no block-wide sync in this layout
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int64_t V = p.n_classes;
  const auto [x, g, target] = row_refs<T>(p, row);
  const A* weight = static_cast<const A*>(p.weight);
  const A softcap = static_cast<A>(p.softcap);

  MaxSum<A> st{neg_inf<A>(), A(0)};
  A smooth = A(0);  // sum_c w_c z_c (sum_c z_c without weights)
  row_partials<T, SOFTCAP, SMOOTHING>(x, weight, V, softcap, tid, nthreads, st, smooth);
  warp_reduce(st, smooth);
  if constexpr (BLOCK_PER_ROW) {
    const WarpTotals<A> totals = warp_totals<RowBody<kLossAndGradBody, T, SOFTCAP, SMOOTHING>, A>();
    const int warp = tid / kWarp;
    const int lane = tid % kWarp;
    const int n_warps = (nthreads + kWarp - 1) / kWarp;
    store_warp_totals(totals, st, smooth, warp, lane);  // every thread: holds the barrier
    if (warp == 0) reduce_warp_totals(totals, st, smooth, lane, n_warps);
  }
  // Thread 0 (lane 0 of the row's warp; of warp 0 in the block layout) now holds the row's totals.

  // Thread 0: lse, l_i (written out) and the row's scale s_i; then every thread of the row gets lse and s_i.
  LogSumExp<A> lse{A(0), A(0)};
  A scale = A(0);
  if (tid == 0) {
    lse = lse_of(st);
    const A loss = row_loss<T, SOFTCAP, SMOOTHING>(p, x, weight, V, softcap, target, lse, smooth);
    static_cast<A*>(p.losses)[row] = loss;
    scale = row_scale(p, row, loss);
  }
  if constexpr (BLOCK_PER_ROW) {
    __shared__ LogSumExp<A> shared_lse;
    __shared__ A shared_scale;
    if (tid == 0) {
      shared_lse = lse;
      shared_scale = scale;
    }
    __syncthreads();
    lse = shared_lse;
    scale = shared_scale;
  } else {
    lse.shift = __shfl_sync(0xffffffffu, lse.shift, 0);
    lse.log_sum = __shfl_sync(0xffffffffu, lse.log_sum, 0);
    scale = __shfl_sync(0xffffffffu, scale, 0);
  }

  grad_row<T, SOFTCAP, SMOOTHING, BLOCK_PER_ROW>(p, x, g, target, [&] { return lse; }, [&] { return scale; });
}

// ---- kernels: the warp layout (kWarp x kWarpRows threads) and the block layout (up to kMaxBlockThreads) ------

template <typename T, bool SOFTCAP, bool SMOOTHING>
__global__ void forward_warp_kernel(KernelParams p) {
  forward_row<T, SOFTCAP, SMOOTHING, false>(p);
}
template <typename T, bool SOFTCAP, bool SMOOTHING>
__global__ void __launch_bounds__(kMaxBlockThreads) forward_block_kernel(KernelParams p) {
  forward_row<T, SOFTCAP, SMOOTHING, true>(p);
}
template <typename T, bool SOFTCAP, bool SMOOTHING>
__global__ void backward_warp_kernel(KernelParams p) {
  backward_row<T, SOFTCAP, SMOOTHING, false>(p);
}
template <typename T, bool SOFTCAP, bool SMOOTHING>
__global__ void __launch_bounds__(kMaxBlockThreads) backward_block_kernel(KernelParams p) {
  backward_row<T, SOFTCAP, SMOOTHING, true>(p);
}
template <typename T, bool SOFTCAP, bool SMOOTHING>
__global__ void loss_and_grad_warp_kernel(KernelParams p) {
  loss_and_grad_row<T, SOFTCAP, SMOOTHING, false>(p);
}
template <typename T, bool SOFTCAP, bool SMOOTHING>
__global__ void __launch_bounds__(kMaxBlockThreads) loss_and_grad_block_kernel(KernelParams p) {
  loss_and_grad_row<T, SOFTCAP, SMOOTHING, true>(p);
}

// ---- loss_and_grad with the row held in registers: the logits are read from memory once ---------------------
// A row's 16-byte packs are split over a cluster of cluster_ctas blocks (sm_90 thread-block clusters; a lone block
// anywhere): block `rank` loads the packs [rank * packs_per_cta, (rank + 1) * packs_per_cta) into registers,
// kResidentPacks per thread, and holds them until it writes their gradient. Block 0 also takes the scalar head and
// tail around the packs (under 32 bytes a row, read twice). Each block reduces its part to (max, sum-exp, smoothing
// sum); after a cluster barrier each reads all the blocks' totals through distributed shared memory and combines
// them in rank order, so every block has the same lse and computes l_i and s_i itself. A second cluster barrier,
// arrived at after the reads and waited for at the end, keeps every block's shared memory alive while others read it.
constexpr int kResidentPacks = 8;
constexpr int kResidentThreads = 512;
constexpr int kMaxClusterCtas = 8;  // the portable cluster size

template <typename T, bool SOFTCAP, bool SMOOTHING>
__global__ void __launch_bounds__(kResidentThreads)
    loss_and_grad_resident_kernel(KernelParams p, int cluster_ctas, int64_t packs_per_cta) {
  using A = typename AccOf<T>::type;
  constexpr int kVec = Pack<T>::kSize;
  const int64_t row = blockIdx.x / cluster_ctas;
  const int rank = static_cast<int>(blockIdx.x % cluster_ctas);
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int64_t V = p.n_classes;
  const auto [x, g, target] = row_refs<T>(p, row);
  if (target == p.ignore_index) {  // the whole cluster: l_i = 0 and exact zeros, without reading the row
    const int64_t part = (V + cluster_ctas - 1) / cluster_ctas;
    const int64_t begin = rank * part < V ? rank * part : V;
    const int64_t end = begin + part < V ? begin + part : V;
    store_zeros(g + begin, end - begin, tid, nthreads);
    if (rank == 0 && tid == 0) static_cast<A*>(p.losses)[row] = A(0);
    return;
  }

  const A* weight = static_cast<const A*>(p.weight);
  const A softcap = static_cast<A>(p.softcap);
  const int64_t head = head_elements<T>(x, V);
  const int64_t n_vec = (V - head) / kVec;
  const int64_t tail = head + n_vec * kVec;
  const int64_t first_pack = rank * packs_per_cta;
  const int64_t end_pack = first_pack + packs_per_cta < n_vec ? first_pack + packs_per_cta : n_vec;
  const bool owns_edges = rank == 0;
  const T* xv = x + head;
  Pack<T> packs[kResidentPacks];
#pragma unroll
  for (int j = 0; j < kResidentPacks; ++j) {
    const int64_t k = first_pack + tid + static_cast<int64_t>(j) * nthreads;
    if (k < end_pack) packs[j] = load_pack(xv + k * kVec);
  }

  MaxSum<A> st{neg_inf<A>(), A(0)};
  A smooth = A(0);  // sum_c w_c z_c (sum_c z_c without weights)
  if (owns_edges) {
    add_scalars<T, SOFTCAP, SMOOTHING>(st, smooth, x, 0, head, weight, softcap, tid, nthreads);
    add_scalars<T, SOFTCAP, SMOOTHING>(st, smooth, x, tail, V, weight, softcap, tid, nthreads);
  }
#pragma unroll
  for (int j = 0; j < kResidentPacks; ++j) {
    const int64_t k = first_pack + tid + static_cast<int64_t>(j) * nthreads;
    if (k < end_pack) add_pack<T, SOFTCAP, SMOOTHING>(st, smooth, packs[j], weight, softcap, head + k * kVec);
  }
  warp_reduce(st, smooth);
  const WarpTotals<A> totals = warp_totals<RowBody<kResidentBody, T, SOFTCAP, SMOOTHING>, A>();
  const int warp = tid / kWarp;
  const int lane = tid % kWarp;
  store_warp_totals(totals, st, smooth, warp, lane);  // every thread: holds the barrier
  if (warp == 0) reduce_warp_totals(totals, st, smooth, lane, (nthreads + kWarp - 1) / kWarp);
  // Thread 0 now holds this block's totals; next, the row's.

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ A block_totals[3];  // (max, sum-exp, smoothing sum) of this block, read by the cluster
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  if (cluster_ctas > 1) {
    if (tid == 0) {
      block_totals[0] = st.m;
      block_totals[1] = st.s;
      block_totals[2] = smooth;
    }
    cluster.sync();  // every block of the cluster has started and published its totals
    if (tid == 0) {
      st = {neg_inf<A>(), A(0)};
      smooth = A(0);
      for (int r = 0; r < cluster_ctas; ++r) {
        const A* part = cluster.map_shared_rank(block_totals, r);
        st = combine(st, MaxSum<A>{part[0], part[1]});
        smooth += part[2];
      }
    }
    cluster.barrier_arrive();  // done reading the other blocks' shared memory
  }
#else
  if (cluster_ctas > 1) __trap();  // the host launches clusters only for code built for sm_90 and later
#endif

  __shared__ LogSumExp<A> shared_lse;
  __shared__ A shared_scale;
  if (tid == 0) {
    const LogSumExp<A> lse = lse_of(st);
    const A loss = row_loss<T, SOFTCAP, SMOOTHING>(p, x, weight, V, softcap, target, lse, smooth);
    if (rank == 0) static_cast<A*>(p.losses)[row] = loss;
    shared_lse = lse;
    shared_scale = row_scale(p, row, loss);
  }
  __syncthreads();

  const RowGradient<T, SOFTCAP, SMOOTHING> grad_of(p, x, target, shared_lse, shared_scale);
  const bool vector_store = head_elements<T>(g, V) == head;  // g aligned as x: store packs as they were loaded
#pragma unroll
  for (int j = 0; j < kResidentPacks; ++j) {
    const int64_t k = first_pack + tid + static_cast<int64_t>(j) * nthreads;
    if (k < end_pack) {
      Pack<T> out;
#pragma unroll
      for (int i = 0; i < kVec; ++i) out.v[i] = grad_of(pack_value(packs[j], i), head + k * kVec + i);
      if (vector_store) {
        store_pack(g + head + k * kVec, out);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) g[head + k * kVec + i] = out.v[i];
      }
    }
  }
  if (owns_edges) {
    for (int64_t c = tid; c < head; c += nthreads) g[c] = grad_of(static_cast<A>(x[c]), c);
    for (int64_t c = tail + tid; c < V; c += nthreads) g[c] = grad_of(static_cast<A>(x[c]), c);
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cluster_ctas > 1) cluster.barrier_wait();
#endif
}

// grad *= *grad_output (math in the accumulation type), unless *grad_output is exactly 1: every block reads the
// device scalar first and then returns without touching grad (no host sync). Grid-stride over 16-byte packs
// (after a scalar head that aligns grad; scalar tail), 64-bit indices.
constexpr int kScaleThreads = 256;
constexpr int64_t kScaleMaxBlocks = 16384;

template <typename T>
__global__ void __launch_bounds__(kScaleThreads)
    scale_grad_kernel(T* grad, const typename AccOf<T>::type* grad_output, int64_t n) {
  using A = typename AccOf<T>::type;
  constexpr int kVec = Pack<T>::kSize;
  const A scale = *grad_output;
  if (scale == A(1)) return;  // NaN != 1: scaled (NaN), as grad.mul_(grad_output) would
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  auto scaled = [&](T v) { return static_cast<T>(static_cast<A>(v) * scale); };

  const int64_t head = head_elements<T>(grad, n);  // all of grad if it is not even element aligned
  const int64_t n_vec = (n - head) / kVec;
  const int64_t tail = head + n_vec * kVec;
  for (int64_t i = first; i < head; i += stride) grad[i] = scaled(grad[i]);
  T* gv = grad + head;
  // Block b's step covers the packs [b * blockDim.x * kUnroll, (b + 1) * blockDim.x * kUnroll) of each grid step.
  for (int64_t k0 = static_cast<int64_t>(blockIdx.x) * blockDim.x * kUnroll + threadIdx.x; k0 < n_vec;
       k0 += stride * kUnroll) {
    Pack<T> packs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + static_cast<int64_t>(u) * blockDim.x;
      if (k < n_vec) packs[u] = load_pack(gv + k * kVec);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + static_cast<int64_t>(u) * blockDim.x;
      if (k < n_vec) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) packs[u].v[i] = scaled(packs[u].v[i]);
        store_pack(gv + k * kVec, packs[u]);
      }
    }
  }
  for (int64_t i = tail + first; i < n; i += stride) grad[i] = scaled(grad[i]);
}

// ---- launchers ----------------------------------------------------------------------------------------

struct Launch {
  dim3 grid;
  dim3 block;
  bool block_per_row;
};

Launch launch_config(int64_t n_rows, int64_t n_classes, int64_t element_size) {
  if (n_classes <= kWarpRowMaxV) {
    const int64_t blocks = (n_rows + kWarpRows - 1) / kWarpRows;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "flood_kernels: too many rows (", n_rows, ")");
    return {dim3(static_cast<unsigned>(blocks)), dim3(kWarp, kWarpRows), false};
  }
  TORCH_CHECK(n_rows <= std::numeric_limits<int32_t>::max(), "flood_kernels: too many rows (", n_rows, ")");
  // About 4 vector loads per thread per unrolled step, 128..kMaxBlockThreads threads.
  const int64_t vectors = n_classes * element_size / 16;
  int threads = 128;
  while (threads < kMaxBlockThreads && static_cast<int64_t>(threads) * kUnroll * 4 < vectors) threads *= 2;
  return {dim3(static_cast<unsigned>(n_rows)), dim3(threads), true};
}

using CudaRowKernel = void (*)(KernelParams);

// One launch of a row kernel in the layout `l` chose: its block-per-row or its warp-per-row instantiation.
void launch_rows(CudaRowKernel block_kernel, CudaRowKernel warp_kernel, const KernelParams& p, const Launch& l,
                 cudaStream_t stream) {
  (l.block_per_row ? block_kernel : warp_kernel)<<<l.grid, l.block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f.template operator()<SOFTCAP, SMOOTHING>() with the flags as compile-time constants.
template <typename F>
void with_flags(bool softcap, bool smoothing, F&& f) {
  if (softcap) {
    if (smoothing) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (smoothing) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

KernelParams make_params(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         int64_t ignore_index, double label_smoothing, double z_loss, double softcap, double reverse_ce,
                         double reverse_ce_log_zero) {
  KernelParams p{};
  p.logits = logits.const_data_ptr();
  p.logits_row_stride = logits.stride(0);
  p.target = target.const_data_ptr<int64_t>();
  p.target_stride = target.stride(0);
  p.weight = weight.has_value() ? weight->const_data_ptr() : nullptr;
  p.n_rows = logits.size(0);
  p.n_classes = logits.size(1);
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.z_loss = z_loss;
  p.softcap = softcap;
  p.reverse_coef = reverse_ce * -reverse_ce_log_zero;
  return p;
}

// With class weights and label smoothing the kernels need sum(w): computed on device (no host sync) into the
// returned tensor, which the caller keeps alive until the launch is enqueued.
at::Tensor set_weight_sum(KernelParams& p, const std::optional<at::Tensor>& weight, double label_smoothing) {
  if (!weight.has_value() || label_smoothing <= 0.0) return {};
  at::Tensor weight_sum = weight->sum();
  p.weight_sum = weight_sum.const_data_ptr();
  return weight_sum;
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                double label_smoothing, double z_loss, double softcap,
                                                double reverse_ce, double reverse_ce_log_zero,
                                                bool /*inplace_backward: read by the Python autograd only*/) {
  constexpr const char* op = "flood_kernels::forward";
  check_loss_inputs(op, logits, target, weight, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n_rows = logits.size(0);
  const auto options = logits.options().dtype(loss_dtype(logits.scalar_type()));
  at::Tensor losses = at::empty({n_rows}, options);
  at::Tensor lse = at::empty({n_rows, 2}, options);
  if (n_rows == 0) return {losses, lse};
  KernelParams p = make_params(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reverse_ce,
                               reverse_ce_log_zero);
  const at::Tensor weight_sum = set_weight_sum(p, weight, label_smoothing);
  p.losses = losses.mutable_data_ptr();
  p.lse_out = lse.mutable_data_ptr();
  const Launch l = launch_config(n_rows, p.n_classes, logits.element_size());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "flood_ce_forward_cuda", [&] {
    with_flags(softcap > 0.0, label_smoothing > 0.0, [&](auto cap, auto smooth) {
      constexpr bool kSoftcap = decltype(cap)::value, kSmoothing = decltype(smooth)::value;
      launch_rows(forward_block_kernel<scalar_t, kSoftcap, kSmoothing>,
                  forward_warp_kernel<scalar_t, kSoftcap, kSmoothing>, p, l, stream);
    });
  });
  return {losses, lse};
}

void backward_into_cuda(const at::Tensor& grad, const at::Tensor& grad_losses, const at::Tensor& logits,
                        const at::Tensor& target, const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                        int64_t ignore_index, double label_smoothing, double z_loss, double softcap, double reverse_ce,
                        double reverse_ce_log_zero) {
  const int64_t n_rows = logits.size(0);
  if (n_rows == 0) return;
  KernelParams p = make_params(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reverse_ce,
                               reverse_ce_log_zero);
  const at::Tensor weight_sum = set_weight_sum(p, weight, label_smoothing);
  p.grad = grad.mutable_data_ptr();
  p.grad_row_stride = grad.stride(0);
  p.grad_losses = grad_losses.const_data_ptr();
  p.grad_losses_stride = grad_losses.stride(0);
  p.lse_in = lse.const_data_ptr();
  p.lse_stride = lse.stride(0);
  const Launch l = launch_config(n_rows, p.n_classes, logits.element_size());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "flood_ce_backward_cuda", [&] {
    with_flags(softcap > 0.0, label_smoothing > 0.0, [&](auto cap, auto smooth) {
      constexpr bool kSoftcap = decltype(cap)::value, kSmoothing = decltype(smooth)::value;
      launch_rows(backward_block_kernel<scalar_t, kSoftcap, kSmoothing>,
                  backward_warp_kernel<scalar_t, kSoftcap, kSmoothing>, p, l, stream);
    });
  });
}

at::Tensor backward_cuda(const at::Tensor& grad_losses, const at::Tensor& logits, const at::Tensor& target,
                         const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                         double label_smoothing, double z_loss, double softcap, double reverse_ce,
                         double reverse_ce_log_zero) {
  constexpr const char* op = "flood_kernels::backward";
  check_backward_inputs(op, grad_losses, logits, target, weight, lse, c10::DeviceType::CUDA, /*in_place=*/false);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty(logits.sizes(), logits.options().memory_format(c10::MemoryFormat::Contiguous));
  backward_into_cuda(grad, grad_losses, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap,
                     reverse_ce, reverse_ce_log_zero);
  return grad;
}

void backward_inplace_cuda(const at::Tensor& grad_losses, const at::Tensor& logits, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                           double label_smoothing, double z_loss, double softcap, double reverse_ce,
                           double reverse_ce_log_zero) {
  constexpr const char* op = "flood_kernels::backward_";
  check_backward_inputs(op, grad_losses, logits, target, weight, lse, c10::DeviceType::CUDA, /*in_place=*/true);
  const c10::cuda::CUDAGuard guard(logits.device());
  backward_into_cuda(logits, grad_losses, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap,
                     reverse_ce, reverse_ce_log_zero);
}

// The resident kernel's layout for rows of n_classes: the fewest blocks per cluster (1, 2, 4, ... up to
// max_cluster_ctas) whose registers hold the row's packs (kResidentPacks per thread, at most kResidentThreads threads
// a block), with the fewest threads (from 128) that hold a block's share; cluster_ctas = 0 when none holds it.
struct ResidentLaunch {
  int cluster_ctas;
  int threads;
  int64_t packs_per_cta;
};

ResidentLaunch resident_launch(int64_t n_classes, int64_t element_size, int max_cluster_ctas) {
  const int64_t packs = (n_classes * element_size + 15) / 16;  // bounds every row's packs, whatever its alignment
  const int64_t per_block = static_cast<int64_t>(kResidentThreads) * kResidentPacks;
  for (int ctas = 1; ctas <= max_cluster_ctas; ctas *= 2) {
    if (ctas * per_block < packs) continue;
    const int64_t packs_per_cta = (packs + ctas - 1) / ctas;
    int threads = 128;
    while (static_cast<int64_t>(threads) * kResidentPacks < packs_per_cta) threads *= 2;
    return {ctas, threads, packs_per_cta};
  }
  return {0, 0, 0};
}

// Whether `kernel` can run in thread-block clusters on the current device: an sm_90 or later GPU, and the
// kernel's binary for it built for sm_90 or later (not JIT-compiled from older PTX, which has no clusters).
bool clusters_available(const void* kernel) {
  int device = 0;
  int major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 9) return false;
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  // ptxVersion is the __CUDA_ARCH__ the loaded code was compiled with (binaryVersion is the SASS arch: 90 after
  // the driver JIT-compiles compute_80 PTX for an H100, whose code is still the pre-sm_90 branch that traps).
  return attributes.ptxVersion >= 90 && attributes.binaryVersion >= 90;
}

// Launches the resident loss_and_grad kernel if a block or a cluster holds the row, else returns false.
template <typename T, bool SOFTCAP, bool SMOOTHING>
bool launch_resident(const KernelParams& p, cudaStream_t stream) {
  const auto kernel = loss_and_grad_resident_kernel<T, SOFTCAP, SMOOTHING>;
  ResidentLaunch l = resident_launch(p.n_classes, sizeof(T), 1);
  if (l.cluster_ctas == 0 && clusters_available(reinterpret_cast<const void*>(kernel))) {
    l = resident_launch(p.n_classes, sizeof(T), kMaxClusterCtas);
  }
  if (l.cluster_ctas == 0) return false;
  const int64_t blocks = p.n_rows * l.cluster_ctas;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "flood_kernels: too many rows (", p.n_rows, ")");
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(static_cast<unsigned>(l.threads));
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = static_cast<unsigned>(l.cluster_ctas);
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = l.cluster_ctas > 1 ? 1 : 0;
  if (l.cluster_ctas > 1) {  // no co-resident cluster of this size (MPS / green-context SM limits): two-pass path
    int max_clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&max_clusters, kernel, &config) != cudaSuccess || max_clusters == 0) {
      (void)cudaGetLastError();
      return false;
    }
  }
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p, l.cluster_ctas, l.packs_per_cta));
  return true;
}

std::tuple<at::Tensor, at::Tensor> loss_and_grad_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& flood_level, const at::Tensor& grad_scale, bool flood_rows, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, double reverse_ce, double reverse_ce_log_zero) {
  constexpr const char* op = "flood_kernels::loss_and_grad";
  check_loss_and_grad_inputs(op, logits, target, weight, flood_level, grad_scale, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n_rows = logits.size(0);
  at::Tensor losses = at::empty({n_rows}, logits.options().dtype(loss_dtype(logits.scalar_type())));
  at::Tensor grad = at::empty(logits.sizes(), logits.options().memory_format(c10::MemoryFormat::Contiguous));
  if (n_rows == 0) return {losses, grad};
  KernelParams p = make_params(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reverse_ce,
                               reverse_ce_log_zero);
  const at::Tensor weight_sum = set_weight_sum(p, weight, label_smoothing);
  p.losses = losses.mutable_data_ptr();
  p.grad = grad.mutable_data_ptr();
  p.grad_row_stride = grad.stride(0);
  p.flood_level = flood_rows ? flood_level.const_data_ptr() : nullptr;
  p.flood_level_stride = flood_level.stride(0);
  p.grad_scale = grad_scale.const_data_ptr();
  p.flood_rows = flood_rows;
  const Launch l = launch_config(n_rows, p.n_classes, logits.element_size());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "flood_ce_loss_and_grad_cuda", [&] {
    with_flags(softcap > 0.0, label_smoothing > 0.0, [&](auto cap, auto smooth) {
      constexpr bool kSoftcap = decltype(cap)::value, kSmoothing = decltype(smooth)::value;
      if (l.block_per_row && launch_resident<scalar_t, kSoftcap, kSmoothing>(p, stream)) return;
      launch_rows(loss_and_grad_block_kernel<scalar_t, kSoftcap, kSmoothing>,
                  loss_and_grad_warp_kernel<scalar_t, kSoftcap, kSmoothing>, p, l, stream);
    });
  });
  return {losses, grad};
}

// grad *= grad_output unless grad_output is exactly 1, tested on the device by every block (no host sync).
void scale_grad_cuda(const at::Tensor& grad, const at::Tensor& grad_output) {
  check_scale_grad_inputs("flood_kernels::scale_grad_", grad, grad_output, c10::DeviceType::CUDA);
  const int64_t n = grad.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t packs = std::max<int64_t>(1, n * static_cast<int64_t>(grad.element_size()) / 16);
  const int64_t per_block = static_cast<int64_t>(kScaleThreads) * kUnroll;
  const int64_t blocks = std::min<int64_t>((packs + per_block - 1) / per_block, kScaleMaxBlocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "flood_scale_grad_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    scale_grad_kernel<scalar_t><<<dim3(static_cast<unsigned>(blocks)), dim3(kScaleThreads), 0, stream>>>(
        grad.mutable_data_ptr<scalar_t>(), grad_output.const_data_ptr<acc_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(flood_kernels, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("backward", &backward_cuda);
  m.impl("backward_", &backward_inplace_cuda);
  m.impl("loss_and_grad", &loss_and_grad_cuda);
  m.impl("scale_grad_", &scale_grad_cuda);
}

}  // namespace flood_kernels
