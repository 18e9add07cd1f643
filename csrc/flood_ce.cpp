// flood_kernels._C: the op schemas (TORCH_LIBRARY) and the CPU implementation (TORCH_LIBRARY_IMPL CPU); the
// argument checks are in flood_ce_checks.cpp. Fake (meta) kernels and autograd are registered in Python
// (flood_kernels/_ops.py), which imports this module only to load the ops into the dispatcher.
//
// CPU kernels: csrc/cpu/flood_ce_kernel.h, compiled once per instruction set; the set matching
// at::get_cpu_capability() (AVX512 / AVX2 / DEFAULT; the ATEN_CPU_CAPABILITY environment variable lowers it)
// is picked once, at first use.

#include "flood_ce.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <Python.h>

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

namespace flood_kernels {
namespace {

// ---- CPU implementation -------------------------------------------------------------------------------

const CpuKernels& cpu_kernels() {
  static const CpuKernels chosen = [] {
    const std::string capability = at::get_cpu_capability();
    CpuKernels k;
    if (capability.find("AVX512") != std::string::npos) k = cpu_AVX512::kernels();
    if (k.forward == nullptr && capability.find("AVX2") != std::string::npos) k = cpu_AVX2::kernels();
    if (k.forward == nullptr) k = cpu_DEFAULT::kernels();
    return k;
  }();
  return chosen;
}

// On CPU a target outside [0, V) that is not ignore_index raises IndexError, like F.cross_entropy.
void check_targets_cpu(const at::Tensor& target, int64_t n_classes, int64_t ignore_index) {
  const int64_t* t = target.const_data_ptr<int64_t>();
  const int64_t stride = target.stride(0);
  for (int64_t i = 0; i < target.size(0); ++i) {
    const int64_t y = t[i * stride];
    TORCH_CHECK_INDEX(y == ignore_index || (y >= 0 && y < n_classes), "flood_kernels: target ", y,
                      " is out of bounds for ", n_classes, " classes (row ", i, ", ignore_index ",
                      ignore_index, ")");
  }
}

RowArgs make_args(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                  int64_t ignore_index, double label_smoothing, double z_loss, double softcap, double reverse_ce,
                  double reverse_ce_log_zero) {
  RowArgs a;
  a.logits = logits.const_data_ptr();
  a.logits_row_stride = logits.stride(0);
  a.target = target.const_data_ptr<int64_t>();
  a.target_stride = target.stride(0);
  a.n_classes = logits.size(1);
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.z_loss = z_loss;
  a.softcap = softcap;
  a.reverse_coef = reverse_ce * -reverse_ce_log_zero;
  a.dtype = logits.scalar_type();
  if (weight.has_value()) {
    a.weight = weight->const_data_ptr();
    if (label_smoothing > 0.0) {
      double sum = 0.0;
      if (weight->scalar_type() == at::kDouble) {
        const double* w = weight->const_data_ptr<double>();
        for (int64_t c = 0; c < a.n_classes; ++c) sum += w[c];
      } else {
        const float* w = weight->const_data_ptr<float>();
        for (int64_t c = 0; c < a.n_classes; ++c) sum += w[c];
      }
      a.weight_sum = sum;
    }
  }
  return a;
}

// A gradient far larger than the last-level cache, in a buffer of its own, is written with non-temporal
// stores: the cache lines are not read before being overwritten (in place, the logits' lines are in cache).
bool streams_to_memory(const at::Tensor& grad, const at::Tensor& logits) {
  constexpr size_t kLargerThanCaches = size_t{64} << 20;
  return !grad.is_same(logits) && grad.nbytes() >= kLargerThanCaches;
}

void set_grad_output(RowArgs& a, const at::Tensor& grad, const at::Tensor& logits) {
  a.grad = grad.mutable_data_ptr();
  a.grad_row_stride = grad.stride(0);
  a.stream_grad = streams_to_memory(grad, logits);
}

// The rows in parallel, at least ~32K elements of work per task.
void run_rows(RowKernel kernel, const RowArgs& a, int64_t n_rows) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, a.n_classes));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& logits, const at::Tensor& target,
                                               const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                               double label_smoothing, double z_loss, double softcap,
                                               double reverse_ce, double reverse_ce_log_zero,
                                               bool /*inplace_backward: read by the Python autograd only*/) {
  constexpr const char* op = "flood_kernels::forward";
  check_loss_inputs(op, logits, target, weight, c10::DeviceType::CPU);
  const int64_t n_rows = logits.size(0);
  const auto options = logits.options().dtype(loss_dtype(logits.scalar_type()));
  at::Tensor losses = at::empty({n_rows}, options);
  at::Tensor lse = at::empty({n_rows, 2}, options);
  if (n_rows == 0) return {losses, lse};
  check_targets_cpu(target, logits.size(1), ignore_index);
  RowArgs a = make_args(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reverse_ce,
                        reverse_ce_log_zero);
  a.losses = losses.mutable_data_ptr();
  a.lse_out = lse.mutable_data_ptr();
  run_rows(cpu_kernels().forward, a, n_rows);
  return {losses, lse};
}

void backward_into(const char* op, const at::Tensor& grad, const at::Tensor& grad_losses, const at::Tensor& logits,
                   const at::Tensor& target, const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                   int64_t ignore_index, double label_smoothing, double z_loss, double softcap, double reverse_ce,
                   double reverse_ce_log_zero) {
  const int64_t n_rows = logits.size(0);
  if (n_rows == 0) return;
  check_targets_cpu(target, logits.size(1), ignore_index);
  RowArgs a = make_args(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reverse_ce,
                        reverse_ce_log_zero);
  set_grad_output(a, grad, logits);
  a.grad_losses = grad_losses.const_data_ptr();
  a.grad_losses_stride = grad_losses.stride(0);
  a.lse_in = lse.const_data_ptr();
  a.lse_stride = lse.stride(0);
  run_rows(cpu_kernels().backward, a, n_rows);
}

at::Tensor backward_cpu(const at::Tensor& grad_losses, const at::Tensor& logits, const at::Tensor& target,
                        const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                        double label_smoothing, double z_loss, double softcap, double reverse_ce,
                        double reverse_ce_log_zero) {
  constexpr const char* op = "flood_kernels::backward";
  check_backward_inputs(op, grad_losses, logits, target, weight, lse, c10::DeviceType::CPU, /*in_place=*/false);
  at::Tensor grad = empty_gradient_cpu(logits);
  backward_into(op, grad, grad_losses, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap,
                reverse_ce, reverse_ce_log_zero);
  return grad;
}

std::tuple<at::Tensor, at::Tensor> loss_and_grad_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& flood_level, const at::Tensor& grad_scale, bool flood_rows, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, double reverse_ce, double reverse_ce_log_zero) {
  constexpr const char* op = "flood_kernels::loss_and_grad";
  check_loss_and_grad_inputs(op, logits, target, weight, flood_level, grad_scale, c10::DeviceType::CPU);
  const int64_t n_rows = logits.size(0);
  at::Tensor losses = at::empty({n_rows}, logits.options().dtype(loss_dtype(logits.scalar_type())));
  at::Tensor grad = empty_gradient_cpu(logits);
  if (n_rows == 0) return {losses, grad};
  check_targets_cpu(target, logits.size(1), ignore_index);
  RowArgs a = make_args(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, reverse_ce,
                        reverse_ce_log_zero);
  a.losses = losses.mutable_data_ptr();
  set_grad_output(a, grad, logits);
  a.flood_level = flood_level.const_data_ptr();
  a.flood_level_stride = flood_level.stride(0);
  a.grad_scale = grad_scale.const_data_ptr();
  a.flood_rows = flood_rows;
  run_rows(cpu_kernels().loss_and_grad, a, n_rows);
  return {losses, grad};
}

// grad *= grad_output unless grad_output is exactly 1 (the common case costs no pass over grad). Reading the
// value is free on CPU; the CUDA and Triton versions test it on the device.
void scale_grad_cpu(const at::Tensor& grad, const at::Tensor& grad_output) {
  check_scale_grad_inputs("flood_kernels::scale_grad_", grad, grad_output, c10::DeviceType::CPU);
  if (grad_output.item<double>() != 1.0) grad.mul_(grad_output);
}

void backward_inplace_cpu(const at::Tensor& grad_losses, const at::Tensor& logits, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                          double label_smoothing, double z_loss, double softcap, double reverse_ce,
                          double reverse_ce_log_zero) {
  constexpr const char* op = "flood_kernels::backward_";
  check_backward_inputs(op, grad_losses, logits, target, weight, lse, c10::DeviceType::CPU, /*in_place=*/true);
  backward_into(op, logits, grad_losses, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap,
                reverse_ce, reverse_ce_log_zero);
}

}  // namespace

TORCH_LIBRARY(flood_kernels, m) {
  m.def(
      "forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, "
      "float z_loss, float softcap, float reverse_ce, float reverse_ce_log_zero, bool inplace_backward) "
      "-> (Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_losses, Tensor logits, Tensor target, Tensor? weight, Tensor lse, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap, float reverse_ce, float reverse_ce_log_zero) -> Tensor");
  m.def(
      "backward_(Tensor grad_losses, Tensor(a!) logits, Tensor target, Tensor? weight, Tensor lse, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, float reverse_ce, "
      "float reverse_ce_log_zero) -> ()");
  m.def(
      "loss_and_grad(Tensor logits, Tensor target, Tensor? weight, Tensor flood_level, Tensor grad_scale, "
      "bool flood_rows, int ignore_index, float label_smoothing, float z_loss, float softcap, float reverse_ce, "
      "float reverse_ce_log_zero) -> (Tensor, Tensor)");
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
  // The whole loss for reduction "mean" / "sum" in one autograd node (csrc/flood_ce_autograd.cpp): the row
  // kernels plus the O(N) epilogue (csrc/cpu/flood_epilogue.cpp); flood_mode 0 none, 1 batch, 2 individual.
  m.def("mean_denominator(Tensor target, Tensor? weight, int ignore_index, ScalarType dtype) -> Tensor");
  m.def(
      "flood_epilogue(Tensor losses, Tensor target, Tensor? weight, Tensor flood_level, int flood_mode, "
      "bool mean, int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def(
      "flooded_loss(Tensor logits, Tensor target, Tensor? weight, Tensor flood_level, int flood_mode, bool mean, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, float reverse_ce, "
      "float reverse_ce_log_zero, bool inplace_backward, bool single_read) -> (Tensor, Tensor)");
  m.def("empty_cpu_cache() -> ()", &empty_cpu_cache);
}

TORCH_LIBRARY_IMPL(flood_kernels, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
  m.impl("backward_", &backward_inplace_cpu);
  m.impl("loss_and_grad", &loss_and_grad_cpu);
  m.impl("scale_grad_", &scale_grad_cpu);
}

}  // namespace flood_kernels

// An empty Python module: importing flood_kernels._C loads this library, whose static initializers register
// the ops above with the dispatcher (no pybind11, so the module can use the limited API).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "flood_kernels C++/CUDA ops; load it to register torch.ops.flood_kernels.{forward,backward,backward_}",
      -1,    // size
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
