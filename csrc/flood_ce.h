// Shared declarations of the flood_kernels._C extension: argument checks (used by the CPU and CUDA op
// implementations) and the per-ISA CPU row kernels (compiled once per instruction set, see csrc/cpu/).
#pragma once

#include "flood_ce_math.h"

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <optional>

#include <cstdint>

namespace flood_kernels {

// ---- argument checks (every message names the op and the argument) ----------------------------------

// The loss / accumulation dtype: float64 for float64 logits, float32 otherwise.
c10::ScalarType loss_dtype(c10::ScalarType logits_dtype);

// logits (N, V) of fp32/fp16/bf16/fp64 with class stride 1 (any row stride) on `device_type`;
// target int64 (N,); weight None or (V,) contiguous of the loss dtype. All on logits' device.
void check_loss_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, c10::DeviceType device_type);

// The backward ops: check_loss_inputs, plus grad_losses (N,) and lse (N, 2) (each row's [shift, log_sum], see
// LogSumExp; pair stride 1) of the loss dtype on logits' device, and for the in-place op logits writable row by
// row (rows must not overlap).
void check_backward_inputs(const char* op, const at::Tensor& grad_losses, const at::Tensor& logits,
                           const at::Tensor& target, const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                           c10::DeviceType device_type, bool in_place);

// The single-read op: check_loss_inputs, plus flood_level (N,) and grad_scale () of the loss dtype.
void check_loss_and_grad_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, const at::Tensor& flood_level,
                                const at::Tensor& grad_scale, c10::DeviceType device_type);

// scale_grad_: grad contiguous floating point on `device_type`, grad_output () of its loss dtype.
void check_scale_grad_inputs(const char* op, const at::Tensor& grad, const at::Tensor& grad_output,
                             c10::DeviceType device_type);

// flood_kernels::flood_epilogue's and flooded_loss's flood_mode argument (flood_kernels/_ops.py FLOOD_MODES).
enum class FloodMode : int64_t { kNone = 0, kBatch = 1, kIndividual = 2 };

// ---- CPU gradient buffers (csrc/cpu/gradient_buffers.cpp) ---------------------------------------------

// An uninitialized contiguous tensor shaped and typed like `like` (a CPU tensor); large ones are recycled
// from freed gradients, already faulted in, instead of fresh pages from the OS.
at::Tensor empty_gradient_cpu(const at::Tensor& like);

// Return every cached free block to the OS.
void empty_cpu_cache();

// ---- CPU row kernels ----------------------------------------------------------------------------------

// Everything a row kernel needs, as raw pointers (64-bit strides in elements).
struct RowArgs {
  // outputs
  void* losses = nullptr;       // forward: (N,) loss dtype, contiguous
  void* lse_out = nullptr;      // forward: (N, 2) loss dtype, contiguous: [shift, log_sum] (LogSumExp)
  void* grad = nullptr;         // backward: (N, V) logits dtype (may be the logits themselves)
  int64_t grad_row_stride = 0;
  bool stream_grad = false;     // write grad with non-temporal stores (a large buffer, not the logits)
  // inputs
  const void* logits = nullptr;  // (N, V), class stride 1
  int64_t logits_row_stride = 0;
  const int64_t* target = nullptr;
  int64_t target_stride = 1;
  const void* weight = nullptr;  // (V,) loss dtype, contiguous, or null
  const void* grad_losses = nullptr;  // backward: (N,) loss dtype
  int64_t grad_losses_stride = 1;
  const void* lse_in = nullptr;  // backward: (N, 2) loss dtype, [shift, log_sum] at stride 1
  int64_t lse_stride = 2;        // between rows
  const void* flood_level = nullptr;  // loss_and_grad: (N,) loss dtype (stride 0 for one level)
  int64_t flood_level_stride = 0;
  const void* grad_scale = nullptr;   // loss_and_grad: () loss dtype, 1 / denominator or 1
  bool flood_rows = false;            // loss_and_grad: scale row i by sgn(l_i - b_i)
  // sizes
  int64_t n_classes = 0;
  // scalar options
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  double softcap = 0.0;       // 0 = none
  double reverse_coef = 0.0;  // reverse_ce * (-reverse_ce_log_zero)
  double weight_sum = 0.0;    // sum of the class weights (only with weight and label smoothing)
  c10::ScalarType dtype = c10::ScalarType::Float;
};

using RowKernel = void (*)(const RowArgs& args, int64_t row_begin, int64_t row_end);

struct CpuKernels {
  RowKernel forward = nullptr;
  RowKernel backward = nullptr;
  RowKernel loss_and_grad = nullptr;
};

// One set per instruction set; a set that was not compiled for this platform has null members.
namespace cpu_DEFAULT { CpuKernels kernels(); }
namespace cpu_AVX2 { CpuKernels kernels(); }
namespace cpu_AVX512 { CpuKernels kernels(); }

}  // namespace flood_kernels
