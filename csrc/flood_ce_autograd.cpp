// Autograd of flood_kernels::forward for the extension's CPU and CUDA kernels (TORCH_LIBRARY_IMPL Autograd).
//
// The same formula as the Python registration that serves the Triton ops (flood_kernels/_ops.py): the
// per-row grad_losses that autograd hands over already hold grad_output, the flood sign and the mean
// denominator, and go straight to the backward kernel (one read of the logits, one write of the gradient,
// or the in-place variant when inplace_backward was asked for and the rows do not overlap). Registered in
// C++ so that a call costs a few microseconds of dispatch instead of the Python autograd wrapper's ~100.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <iterator>
#include <optional>
#include <tuple>

namespace flood_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                             const std::optional<at::Tensor>&, int64_t, double,
                                                             double, double, double, double, bool);
using BackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, const at::Tensor&, int64_t, double, double,
                                     double, double, double);
using BackwardInplaceSignature = void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, const at::Tensor&, int64_t, double, double,
                                      double, double, double);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The scalar options, in schema order after ignore_index.
constexpr const char* kScalarNames[] = {"label_smoothing", "z_loss", "softcap", "reverse_ce", "reverse_ce_log_zero"};

class FloodCrossEntropy : public torch::autograd::Function<FloodCrossEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
                               double z_loss, double softcap, double reverse_ce, double reverse_ce_log_zero,
                               bool inplace_backward) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto forward_op = op_handle<ForwardSignature>("flood_kernels::forward");
    auto [losses, lse] = forward_op.call(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                                         reverse_ce, reverse_ce_log_zero, inplace_backward);
    ctx->save_for_backward({logits, target, weight.value_or(at::Tensor()), lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    const double scalars[] = {label_smoothing, z_loss, softcap, reverse_ce, reverse_ce_log_zero};
    for (size_t i = 0; i < std::size(scalars); ++i) ctx->saved_data[kScalarNames[i]] = scalars[i];
    ctx->saved_data["inplace_backward"] = inplace_backward;
    ctx->mark_non_differentiable({lse});
    return {losses, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    constexpr size_t kForwardArguments = 10;
    variable_list grads(kForwardArguments);
    if (!grad_outputs[0].defined()) return grads;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const at::Tensor& target = saved[1];
    const std::optional<at::Tensor> weight = saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const at::Tensor& lse = saved[3];
    const at::Tensor grad_losses = grad_outputs[0].to(lse.scalar_type()).contiguous();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    double s[std::size(kScalarNames)];
    for (size_t i = 0; i < std::size(kScalarNames); ++i) s[i] = ctx->saved_data[kScalarNames[i]].toDouble();
    // Symbolic sizes: under torch.compile with dynamic shapes this guards on the condition, not on N.
    const bool rows_writable = logits.sym_size(0) <= 1 || logits.sym_stride(0) >= logits.sym_size(1);
    if (ctx->saved_data["inplace_backward"].toBool() && rows_writable) {
      static const auto backward_inplace_op = op_handle<BackwardInplaceSignature>("flood_kernels::backward_");
      backward_inplace_op.call(grad_losses, logits, target, weight, lse, ignore_index, s[0], s[1], s[2], s[3], s[4]);
      grads[0] = logits;
    } else {
      static const auto backward_op = op_handle<BackwardSignature>("flood_kernels::backward");
      grads[0] = backward_op.call(grad_losses, logits, target, weight, lse, ignore_index, s[0], s[1], s[2], s[3], s[4]);
    }
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor> forward_autograd(const at::Tensor& logits, const at::Tensor& target,
                                                    const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                    double label_smoothing, double z_loss, double softcap,
                                                    double reverse_ce, double reverse_ce_log_zero,
                                                    bool inplace_backward) {
  variable_list outputs = FloodCrossEntropy::apply(logits, target, weight, ignore_index, label_smoothing, z_loss,
                                                   softcap, reverse_ce, reverse_ce_log_zero, inplace_backward);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flood_kernels, Autograd, m) {
  m.impl("forward", &forward_autograd);
}

}  // namespace flood_kernels
