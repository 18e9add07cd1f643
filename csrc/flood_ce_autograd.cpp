// Autograd of the extension's ops (TORCH_LIBRARY_IMPL Autograd), registered in C++ so that a call costs a
// few microseconds of dispatch instead of a Python autograd wrapper's tens.
//
// flood_kernels::forward (per-row losses, any reduction; CPU and CUDA kernels): the same formula as the
// Python registration that serves the Triton ops (flood_kernels/_ops.py). The per-row grad_losses that
// autograd hands over already hold grad_output, the flood sign and the mean denominator, and go straight to
// the backward kernel (one read of the logits, one write of the gradient, or the in-place variant when
// inplace_backward was asked for and the rows do not overlap).
//
// flood_kernels::flooded_loss (the whole loss for reduction "mean" / "sum"; CPU): the row kernel and the
// O(N) epilogue (flood_epilogue: reduction, flood transform, d loss / d l_i) in one autograd node, instead of
// the ~8 tensor ops and autograd nodes of flood_kernels/_flood.py. Backward is one op: the saved per-row
// scale times grad_output into the backward kernel, or, on the single-read path (loss_and_grad wrote the
// gradient in forward, as flood_kernels/_single_read.py), scale_grad_ by grad_output.
//
// Both give first derivatives only: a backward with create_graph=True raises (check_first_derivative).

#include "flood_ce.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

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

using LossAndGradSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const std::optional<at::Tensor>&, const at::Tensor&,
                                                                 const at::Tensor&, bool, int64_t, double, double,
                                                                 double, double, double);
using ScaleGradSignature = void(const at::Tensor&, const at::Tensor&);
using MeanDenominatorSignature = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                                            c10::ScalarType);
using EpilogueSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                         const std::optional<at::Tensor>&,
                                                                         const at::Tensor&, int64_t, bool, int64_t);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The row kernels' options, as the ops take them after weight (or lse), and inplace_backward: saved on the
// autograd context in forward, read back in backward.
struct RowOptions {
  int64_t ignore_index;
  double label_smoothing, z_loss, softcap, reverse_ce, reverse_ce_log_zero;
  bool inplace_backward;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["z_loss"] = z_loss;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["reverse_ce"] = reverse_ce;
    ctx->saved_data["reverse_ce_log_zero"] = reverse_ce_log_zero;
    ctx->saved_data["inplace_backward"] = inplace_backward;
  }

  static RowOptions load(AutogradContext* ctx) {
    auto number = [&](const char* name) { return ctx->saved_data[name].toDouble(); };
    return {ctx->saved_data["ignore_index"].toInt(), number("label_smoothing"), number("z_loss"), number("softcap"),
            number("reverse_ce"), number("reverse_ce_log_zero"), ctx->saved_data["inplace_backward"].toBool()};
  }
};

std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> row_losses(const at::Tensor& logits, const at::Tensor& target,
                                              const std::optional<at::Tensor>& weight, const RowOptions& o) {
  static const auto forward_op = op_handle<ForwardSignature>("flood_kernels::forward");
  return forward_op.call(logits, target, weight, o.ignore_index, o.label_smoothing, o.z_loss, o.softcap,
                         o.reverse_ce, o.reverse_ce_log_zero, o.inplace_backward);
}

// grad_losses_i * d l_i / d logits: the backward kernel, over the logits when inplace_backward was asked for
// and the rows do not overlap.
at::Tensor row_gradients(const at::Tensor& grad_losses, const at::Tensor& logits, const at::Tensor& target,
                         const std::optional<at::Tensor>& weight, const at::Tensor& lse, const RowOptions& o) {
  // Symbolic sizes: under torch.compile with dynamic shapes this guards on the condition, not on N.
  const bool rows_writable = logits.sym_size(0) <= 1 || logits.sym_stride(0) >= logits.sym_size(1);
  if (o.inplace_backward && rows_writable) {
    static const auto backward_inplace_op = op_handle<BackwardInplaceSignature>("flood_kernels::backward_");
    backward_inplace_op.call(grad_losses, logits, target, weight, lse, o.ignore_index, o.label_smoothing, o.z_loss,
                             o.softcap, o.reverse_ce, o.reverse_ce_log_zero);
    return logits;
  }
  static const auto backward_op = op_handle<BackwardSignature>("flood_kernels::backward");
  return backward_op.call(grad_losses, logits, target, weight, lse, o.ignore_index, o.label_smoothing, o.z_loss,
                          o.softcap, o.reverse_ce, o.reverse_ce_log_zero);
}

// Autograd does not record the kernels: their gradient would be a constant to a second derivative, which would
// then be silently wrong. A backward with create_graph=True (grad mode on when it starts) raises instead, as the
// Python registrations do (first_derivatives_only in flood_kernels/_ops.py).
void check_first_derivative() {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "flood_kernels: backward with create_graph=True (a gradient penalty, a Hessian-vector product, MAML): "
              "the fused kernels give first derivatives only, and a second derivative through them would silently "
              "miss the loss's curvature. Use backend='reference' (PyTorch ops, differentiable to any order)");
}

class FloodCrossEntropy : public torch::autograd::Function<FloodCrossEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
                               double z_loss, double softcap, double reverse_ce, double reverse_ce_log_zero,
                               bool inplace_backward) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const RowOptions o{ignore_index, label_smoothing, z_loss, softcap, reverse_ce, reverse_ce_log_zero,
                       inplace_backward};
    auto [losses, lse] = row_losses(logits, target, weight, o);
    ctx->save_for_backward({logits, target, weight.value_or(at::Tensor()), lse});
    o.save(ctx);
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);  // no zero tensor for lse's gradient
    return {losses, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    constexpr size_t kForwardArguments = 10;
    variable_list grads(kForwardArguments);
    if (!grad_outputs[0].defined()) return grads;
    check_first_derivative();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& lse = saved[3];
    const at::Tensor grad_losses = grad_outputs[0].to(lse.scalar_type()).contiguous();
    grads[0] = row_gradients(grad_losses, saved[0], saved[1], optional_tensor(saved[2]), lse, RowOptions::load(ctx));
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> flood_epilogue(const at::Tensor& losses, const at::Tensor& target,
                                                              const std::optional<at::Tensor>& weight,
                                                              const at::Tensor& flood_level, int64_t flood_mode,
                                                              bool mean, int64_t ignore_index) {
  static const auto epilogue_op = op_handle<EpilogueSignature>("flood_kernels::flood_epilogue");
  return epilogue_op.call(losses, target, weight, flood_level, flood_mode, mean, ignore_index);
}

class FloodedLoss : public torch::autograd::Function<FloodedLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, const at::Tensor& flood_level,
                               int64_t flood_mode, bool mean, int64_t ignore_index, double label_smoothing,
                               double z_loss, double softcap, double reverse_ce, double reverse_ce_log_zero,
                               bool inplace_backward, bool single_read) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const RowOptions o{ignore_index, label_smoothing, z_loss, softcap, reverse_ce, reverse_ce_log_zero,
                       inplace_backward};
    ctx->saved_data["single_read"] = single_read;
    ctx->set_materialize_grads(false);  // no zero tensor for raw's gradient
    if (single_read) {
      // Row i's gradient is grad_scale * sgn(l_i - b_i) (iFlood) or grad_scale (no flooding) times d l_i, known
      // inside the row: the kernel writes it after one read of the logits; batch flooding never gets here.
      TORCH_CHECK(flood_mode != static_cast<int64_t>(FloodMode::kBatch),
                  "flood_kernels::flooded_loss: single_read needs flood_mode 0 (none) or 2 (individual)");
      const auto dtype = loss_dtype(logits.scalar_type());
      static const auto denominator_op = op_handle<MeanDenominatorSignature>("flood_kernels::mean_denominator");
      static const auto loss_and_grad_op = op_handle<LossAndGradSignature>("flood_kernels::loss_and_grad");
      const at::Tensor grad_scale = mean ? denominator_op.call(target, weight, ignore_index, dtype).reciprocal()
                                         : at::ones({}, logits.options().dtype(dtype));
      auto [losses, grad] = loss_and_grad_op.call(
          logits, target, weight, flood_level.expand_symint({logits.sym_size(0)}), grad_scale,
          flood_mode == static_cast<int64_t>(FloodMode::kIndividual), ignore_index, label_smoothing, z_loss, softcap,
          reverse_ce, reverse_ce_log_zero);
      auto [loss, raw, row_scale] = flood_epilogue(losses, target, weight, flood_level, flood_mode, mean,
                                                   ignore_index);
      ctx->save_for_backward({grad});
      ctx->saved_data["gradient_handed_out"] = false;
      ctx->mark_non_differentiable({raw});
      return {loss, raw};
    }
    auto [losses, lse] = row_losses(logits, target, weight, o);
    auto [loss, raw, row_scale] = flood_epilogue(losses, target, weight, flood_level, flood_mode, mean, ignore_index);
    ctx->save_for_backward({logits, target, weight.value_or(at::Tensor()), lse, row_scale});
    o.save(ctx);
    ctx->mark_non_differentiable({raw});
    return {loss, raw};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    constexpr size_t kForwardArguments = 14;
    variable_list grads(kForwardArguments);
    if (!grad_outputs[0].defined()) return grads;
    check_first_derivative();
    const variable_list saved = ctx->get_saved_variables();
    if (ctx->saved_data["single_read"].toBool()) {
      TORCH_CHECK(!ctx->saved_data["gradient_handed_out"].toBool(),
                  "flooded_cross_entropy: the single-read path hands its precomputed gradient to the first "
                  "backward and cannot backward twice (retain_graph=True); set FLOOD_KERNELS_SINGLE_READ=0 "
                  "for the two-pass path, which can");
      ctx->saved_data["gradient_handed_out"] = true;
      const at::Tensor& grad = saved[0];
      static const auto scale_grad_op = op_handle<ScaleGradSignature>("flood_kernels::scale_grad_");
      scale_grad_op.call(grad, grad_outputs[0].to(loss_dtype(grad.scalar_type())));
      grads[0] = grad;
      return grads;
    }
    const at::Tensor& row_scale = saved[4];
    const at::Tensor grad_losses = at::mul(row_scale, grad_outputs[0].to(row_scale.scalar_type()));
    grads[0] = row_gradients(grad_losses, saved[0], saved[1], optional_tensor(saved[2]), saved[3],
                             RowOptions::load(ctx));
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor> flooded_loss_autograd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& flood_level, int64_t flood_mode, bool mean, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, double reverse_ce, double reverse_ce_log_zero, bool inplace_backward,
    bool single_read) {
  variable_list outputs = FloodedLoss::apply(logits, target, weight, flood_level, flood_mode, mean, ignore_index,
                                             label_smoothing, z_loss, softcap, reverse_ce, reverse_ce_log_zero,
                                             inplace_backward, single_read);
  return {outputs[0], outputs[1]};
}

// Without autograd (inference mode): the loss only.
std::tuple<at::Tensor, at::Tensor> flooded_loss_no_grad(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& flood_level, int64_t flood_mode, bool mean, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, double reverse_ce, double reverse_ce_log_zero, bool inplace_backward,
    bool /*single_read: no gradient to write*/) {
  const RowOptions o{ignore_index, label_smoothing, z_loss, softcap, reverse_ce, reverse_ce_log_zero,
                     inplace_backward};
  auto [losses, lse] = row_losses(logits, target, weight, o);
  auto [loss, raw, row_scale] = flood_epilogue(losses, target, weight, flood_level, flood_mode, mean, ignore_index);
  return {loss, raw};
}

}  // namespace

TORCH_LIBRARY_IMPL(flood_kernels, Autograd, m) {
  m.impl("forward", &forward_autograd);
  m.impl("flooded_loss", &flooded_loss_autograd);
}

TORCH_LIBRARY_IMPL(flood_kernels, CPU, m) {
  m.impl("flooded_loss", &flooded_loss_no_grad);
}

}  // namespace flood_kernels
