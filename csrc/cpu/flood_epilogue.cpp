// The O(N) epilogue of the fused loss on CPU: the "mean" denominator, the reduction, the flood transform and
// d loss / d l_i, in one pass over the per-row losses. The same math as flood_kernels/_flood.py, which
// expresses it as ~8 tensor ops that autograd differentiates; for small problems (N x V of a few thousand
// elements, the typical CPU classifier) those ops' dispatch and autograd bookkeeping cost several times the
// kernel, so the CPU backend's fused op (flood_kernels::flooded_loss) calls this instead.
//
//   denominator  = sum_i [y_i != ignore] w_{y_i}   (the count without weights; PyTorch's "mean" rule)
//   raw          = sum_i l_i  (/ denominator for "mean"); ignored rows hold l_i = 0
//   batch:       loss = |raw - b| + b,                          dl/dl_i = sgn(raw - b)   (/ denominator)
//   individual:  loss = sum_i [valid] (|l_i - b_i| + b_i) (/d), dl/dl_i = [valid] sgn(l_i - b_i) (/ d)
//   none:        loss = raw,                                    dl/dl_i = 1              (/ denominator)
//
// sgn is torch.sign's (the one autograd uses for |x|): 0 at 0, and 0 for NaN, so that every backend agrees
// with the composition; a NaN loss still reaches the gradient through its row, whose d l_i is NaN. Sums run
// in double.

#include "../flood_ce.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace flood_kernels {
namespace {

template <typename A>
A sgn(A x) {
  return x > A(0) ? A(1) : x < A(0) ? A(-1) : A(0);
}

// The weight of row i's target in the "mean" denominator (1 without weights, 0 for an ignored row).
template <typename A>
struct RowWeights {
  const int64_t* target;
  int64_t target_stride;
  const A* weight;  // (V,) or null
  int64_t n_classes;
  int64_t ignore_index;

  bool valid(int64_t i) const { return target[i * target_stride] != ignore_index; }

  double of(int64_t i) const {
    const int64_t y = target[i * target_stride];
    if (y == ignore_index) return 0.0;
    if (weight == nullptr) return 1.0;
    TORCH_CHECK_INDEX(y >= 0 && y < n_classes, "flood_kernels: target ", y, " is out of bounds for ", n_classes,
                      " classes (row ", i, ", ignore_index ", ignore_index, ")");
    return static_cast<double>(weight[y]);
  }

  A denominator(int64_t n_rows) const {
    double sum = 0.0;
    for (int64_t i = 0; i < n_rows; ++i) sum += of(i);
    return static_cast<A>(sum);
  }
};

template <typename A>
RowWeights<A> row_weights(const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index) {
  return {target.const_data_ptr<int64_t>(), target.stride(0),
          weight.has_value() ? weight->const_data_ptr<A>() : nullptr,
          weight.has_value() ? weight->size(0) : 0, ignore_index};
}

void check_target_and_weight(const char* op, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                             c10::ScalarType dtype) {
  TORCH_CHECK(target.dim() == 1 && target.scalar_type() == at::kLong && target.device().is_cpu(), op,
              ": target must be a 1-D int64 CPU tensor, got ", target.scalar_type(), " of shape ", target.sizes(),
              " on ", target.device());
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->scalar_type() == dtype && weight->device().is_cpu() &&
                    weight->is_contiguous(),
                op, ": weight must be a contiguous 1-D ", dtype, " CPU tensor, got ", weight->scalar_type(),
                " of shape ", weight->sizes(), " on ", weight->device());
  }
}

at::Tensor mean_denominator_cpu(const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                int64_t ignore_index, c10::ScalarType dtype) {
  constexpr const char* op = "flood_kernels::mean_denominator";
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": dtype must be float32 or float64, got ", dtype);
  check_target_and_weight(op, target, weight, dtype);
  at::Tensor out = at::empty({}, target.options().dtype(dtype));
  if (dtype == at::kDouble) {
    *out.mutable_data_ptr<double>() = row_weights<double>(target, weight, ignore_index).denominator(target.size(0));
  } else {
    *out.mutable_data_ptr<float>() = row_weights<float>(target, weight, ignore_index).denominator(target.size(0));
  }
  return out;
}

template <typename A>
void epilogue(const A* losses, const RowWeights<A>& rows, const A* level, int64_t level_stride, int64_t n_rows,
              FloodMode mode, bool mean, A& loss, A& raw, A* row_scale) {
  const A denominator = mean ? rows.denominator(n_rows) : A(1);
  double raw_sum = 0.0;
  for (int64_t i = 0; i < n_rows; ++i) raw_sum += static_cast<double>(losses[i]);
  raw = mean ? static_cast<A>(raw_sum) / denominator : static_cast<A>(raw_sum);
  if (mode == FloodMode::kIndividual) {
    double flooded_sum = 0.0;
    for (int64_t i = 0; i < n_rows; ++i) {
      if (!rows.valid(i)) {
        row_scale[i] = A(0);
        continue;
      }
      const A b = level[i * level_stride];
      const A excess = losses[i] - b;
      flooded_sum += static_cast<double>(std::abs(excess) + b);
      row_scale[i] = mean ? sgn(excess) / denominator : sgn(excess);
    }
    loss = mean ? static_cast<A>(flooded_sum) / denominator : static_cast<A>(flooded_sum);
    return;
  }
  A scale = A(1);
  loss = raw;
  if (mode == FloodMode::kBatch) {
    const A excess = raw - level[0];
    loss = std::abs(excess) + level[0];
    scale = sgn(excess);
  }
  if (mean) scale = scale / denominator;
  for (int64_t i = 0; i < n_rows; ++i) row_scale[i] = scale;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flood_epilogue_cpu(const at::Tensor& losses, const at::Tensor& target,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const at::Tensor& flood_level, int64_t flood_mode,
                                                                  bool mean, int64_t ignore_index) {
  constexpr const char* op = "flood_kernels::flood_epilogue";
  const auto dtype = losses.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kDouble) && losses.dim() == 1 && losses.is_contiguous() &&
                  losses.device().is_cpu(),
              op, ": losses must be a contiguous 1-D float32 or float64 CPU tensor, got ", dtype, " of shape ",
              losses.sizes());
  const int64_t n_rows = losses.size(0);
  check_target_and_weight(op, target, weight, dtype);
  TORCH_CHECK(target.size(0) == n_rows, op, ": target must have shape (", n_rows, ",) like losses, got ",
              target.sizes());
  TORCH_CHECK(flood_mode >= 0 && flood_mode <= static_cast<int64_t>(FloodMode::kIndividual), op,
              ": flood_mode must be 0 (none), 1 (batch) or 2 (individual), got ", flood_mode);
  const auto mode = static_cast<FloodMode>(flood_mode);
  TORCH_CHECK(flood_level.scalar_type() == dtype && flood_level.device().is_cpu(), op, ": flood_level must be a ",
              dtype, " CPU tensor, got ", flood_level.scalar_type(), " on ", flood_level.device());
  TORCH_CHECK(flood_level.dim() == 0 || (mode == FloodMode::kIndividual && flood_level.dim() == 1 &&
                                         flood_level.size(0) == n_rows),
              op, ": flood_level must be 0-d, or (", n_rows, ",) with flood_mode 2 (individual), got shape ",
              flood_level.sizes());
  const auto options = losses.options();
  at::Tensor loss = at::empty({}, options);
  at::Tensor raw = at::empty({}, options);
  at::Tensor row_scale = at::empty({n_rows}, options);
  const int64_t level_stride = flood_level.dim() == 0 ? 0 : flood_level.stride(0);
  auto run = [&](auto zero) {
    using A = decltype(zero);
    epilogue<A>(losses.const_data_ptr<A>(), row_weights<A>(target, weight, ignore_index),
                flood_level.const_data_ptr<A>(), level_stride, n_rows, mode, mean, *loss.mutable_data_ptr<A>(),
                *raw.mutable_data_ptr<A>(), row_scale.mutable_data_ptr<A>());
  };
  if (dtype == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
  return {loss, raw, row_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(flood_kernels, CPU, m) {
  m.impl("mean_denominator", &mean_denominator_cpu);
  m.impl("flood_epilogue", &flood_epilogue_cpu);
}

}  // namespace flood_kernels
