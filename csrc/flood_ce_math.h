// Scalar math shared by the CPU and CUDA kernels (host and device code; one definition of each series).
// Included through flood_ce.h before any per-ISA code-generation pragma, so the CPU builds share one
// generic instantiation (used per row, not per element).
#pragma once

#if defined(__CUDACC__)
#define FLOOD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FLOOD_HOST_DEVICE inline
#endif

namespace flood_kernels {

// The accumulation type of the kernels: float for every logits dtype, double for double (loss_dtype's rule).
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// tanh(u) and its derivative 1 - tanh(u)^2, given t = exp(-2 |u|) from the caller's exp: a series near 0,
// where (1 - t) / (1 + t) would cancel, the closed forms elsewhere (as _tanh_with_derivative in the Triton
// kernel, flood_kernels/triton/cross_entropy.py).
template <typename A>
FLOOD_HOST_DEVICE void tanh_with_derivative_given_exp(A u, A t, A& th, A& dth) {
  const A a = u < A(0) ? -u : u;
  const A a2 = a * a;
  const A near =
      a * (A(1) + a2 * (A(-1.0 / 3.0) + a2 * (A(2.0 / 15.0) + a2 * (A(-17.0 / 315.0) + a2 * A(62.0 / 2835.0)))));
  const bool is_near = a < A(0.125);
  const A magnitude = is_near ? near : (A(1) - t) / (A(1) + t);
  dth = is_near ? A(1) - near * near : A(4) * t / ((A(1) + t) * (A(1) + t));
  th = u < A(0) ? -magnitude : magnitude;
}

// A row's log-sum-exp as the statistics pass ends with it: lse = shift + log_sum, with shift the row's max (0 for
// an all -inf row) and log_sum = log(sum_c exp(z_c - shift)). The two are kept apart, not rounded into one float:
// a confident row's l_y = lse - z_y = (shift - z_y) + log_sum and p_y = exp((z_y - shift) - log_sum) are then exact
// to a rounding of their own size, where one float lse leaves an error of an ulp of |lse| in both (1.9e-6 at
// lse = 30 in float32: all of l_y and of p_y - 1 once they are that small). The ops store it as lse (N, 2), a row
// [shift, log_sum] (store / load).
template <typename A>
struct LogSumExp {
  A shift;
  A log_sum;
  FLOOD_HOST_DEVICE static LogSumExp load(const A* row) { return {row[0], row[1]}; }
  FLOOD_HOST_DEVICE void store(A* row) const {
    row[0] = shift;
    row[1] = log_sum;
  }
  FLOOD_HOST_DEVICE A value() const { return shift + log_sum; }
  // log p_c = z_c - lse, the exponent of the class's probability.
  FLOOD_HOST_DEVICE A log_prob(A z) const { return (z - shift) - log_sum; }
};

}  // namespace flood_kernels
