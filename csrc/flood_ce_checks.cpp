// Argument checks of the extension's ops (declared in flood_ce.h), shared by the CPU (flood_ce.cpp) and CUDA
// (cuda/flood_ce.cu) implementations: every message names the op and the argument. A file of its own so that the
// CUDA kernels' CPU emulation (tests/cuda_emulation) builds with exactly the checks the real ops run.

#include "flood_ce.h"

#include <c10/util/Exception.h>

#include <cstdint>

namespace flood_kernels {

// ---- argument checks ----------------------------------------------------------------------------------

c10::ScalarType loss_dtype(c10::ScalarType logits_dtype) {
  return logits_dtype == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

void check_loss_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, c10::DeviceType device_type) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (N, V), got ", logits.dim(), "-D tensor of shape ",
              logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, op,
              ": logits must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(logits.device().type() == device_type, op, ": logits must be a ", device_type, " tensor, got ",
              logits.device());
  const int64_t n_rows = logits.size(0);
  const int64_t n_classes = logits.size(1);
  TORCH_CHECK(n_classes >= 1 || n_rows == 0, op, ": logits must have at least one class (V >= 1), got shape ",
              logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1 || n_classes <= 1, op,
              ": logits must have class stride 1 (any row stride), got strides ", logits.strides());
  TORCH_CHECK(logits.stride(0) >= 0, op, ": logits must have a non-negative row stride, got ", logits.strides());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n_rows, op, ": target must have shape (", n_rows,
              ",) to match logits ", logits.sizes(), ", got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), op, ": target is on ", target.device(), " but logits are on ",
              logits.device());
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == n_classes, op, ": weight must have shape (", n_classes,
                ",) (one per class), got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == loss_dtype(dtype), op, ": weight must be ", loss_dtype(dtype), " for ", dtype,
                " logits, got ", w.scalar_type());
    TORCH_CHECK(w.device() == logits.device(), op, ": weight is on ", w.device(), " but logits are on ",
                logits.device());
    TORCH_CHECK(w.is_contiguous(), op, ": weight must be contiguous");
  }
}

namespace {

// t (named name) of the loss dtype, on logits' device.
void check_loss_dtype_and_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK(t.scalar_type() == loss_dtype(logits.scalar_type()), op, ": ", name, " must be ",
              loss_dtype(logits.scalar_type()), " for ", logits.scalar_type(), " logits, got ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " is on ", t.device(), " but logits are on ",
              logits.device());
}

void check_row_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  const int64_t n_rows = logits.size(0);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n_rows, op, ": ", name, " must have shape (", n_rows,
              ",) (one per row of logits), got ", t.sizes());
  check_loss_dtype_and_device(op, name, t, logits);
}

void check_lse(const char* op, const at::Tensor& lse, const at::Tensor& logits) {
  const int64_t n_rows = logits.size(0);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == n_rows && lse.size(1) == 2, op, ": lse must have shape (", n_rows,
              ", 2) (each row's shift and log_sum, as the forward op returns it), got ", lse.sizes());
  TORCH_CHECK(lse.stride(1) == 1, op, ": lse must have stride 1 between a row's shift and log_sum, got strides ",
              lse.strides());
  check_loss_dtype_and_device(op, "lse", lse, logits);
}

void check_writable_rows(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1), op,
              ": logits are written in place, so rows must not overlap (row stride >= V), got strides ",
              logits.strides(), " for shape ", logits.sizes());
}

}  // namespace

void check_backward_inputs(const char* op, const at::Tensor& grad_losses, const at::Tensor& logits,
                           const at::Tensor& target, const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                           c10::DeviceType device_type, bool in_place) {
  check_loss_inputs(op, logits, target, weight, device_type);
  check_row_vector(op, "grad_losses", grad_losses, logits);
  check_lse(op, lse, logits);
  if (in_place) check_writable_rows(op, logits);
}

void check_loss_and_grad_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, const at::Tensor& flood_level,
                                const at::Tensor& grad_scale, c10::DeviceType device_type) {
  check_loss_inputs(op, logits, target, weight, device_type);
  check_row_vector(op, "flood_level", flood_level, logits);
  TORCH_CHECK(grad_scale.dim() == 0, op, ": grad_scale must be a 0-d tensor, got shape ", grad_scale.sizes());
  check_loss_dtype_and_device(op, "grad_scale", grad_scale, logits);
}

void check_scale_grad_inputs(const char* op, const at::Tensor& grad, const at::Tensor& grad_output,
                             c10::DeviceType device_type) {
  TORCH_CHECK(grad.device().type() == device_type, op, ": grad must be a ", device_type, " tensor, got ",
              grad.device());
  TORCH_CHECK(grad.is_contiguous(), op, ": grad must be contiguous, got strides ", grad.strides());
  const auto dtype = grad.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, op,
              ": grad must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(grad_output.dim() == 0, op, ": grad_output must be a 0-d tensor, got shape ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == loss_dtype(grad.scalar_type()), op, ": grad_output must be ",
              loss_dtype(grad.scalar_type()), " for a ", grad.scalar_type(), " grad, got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == grad.device(), op, ": grad_output is on ", grad_output.device(),
              " but grad is on ", grad.device());
}

}  // namespace flood_kernels
