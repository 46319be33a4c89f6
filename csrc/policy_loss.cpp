// CPU kernels of medgrpo::policy_loss_forward / policy_loss_backward
// (spec: reference.per_token_policy_loss and reference.loss_row_weights).
//
// Rows run in parallel; each row's sums are written to its own slot and reduced over
// rows serially afterwards, so results do not depend on the number of threads.
// Per-token math runs in at::opmath_type (fp32, fp64 for fp64 input) like the reference;
// the sums over tokens and rows accumulate in double: a serial fp32 sum over thousands of
// tokens drifts by ~sqrt(T) ulp, more than torch's cascade summation, and double costs
// nothing extra here.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"

namespace medgrpo {
namespace {

enum LossType : int64_t { kGrpo = 0, kBnpo = 1, kDrGrpo = 2, kDapo = 3 };
enum KlEstimator : int64_t { kK1 = 1, kK2 = 2, kK3 = 3 };
enum ImportanceSampling : int64_t { kTokenIS = 0, kSequenceIS = 1 };

// Tokens per parallel task: a row costs about one exp per token.
constexpr int64_t kGrainTokens = 8192;

// PolicyLossConfig.hparams() / .modes() (medgrpo/ops/policy_loss.py), unpacked.
struct LossConfig {
  double epsilon_low;
  double epsilon_high;
  double beta;
  double dual_clip;              // 0: off, else c > 1
  double num_items_value;        // -1: not given
  double max_completion_length;  // dr_grpo only
  int64_t loss_type;
  int64_t kl_estimator;
  bool sequence_is;
};

LossConfig parse_config(at::ArrayRef<double> hparams, at::IntArrayRef modes) {
  TORCH_CHECK(hparams.size() == 6, "medgrpo: policy loss hparams must have 6 entries [epsilon_low, "
              "epsilon_high, beta, dual_clip, num_items, max_completion_length], got ", hparams.size());
  TORCH_CHECK(modes.size() == 3, "medgrpo: policy loss modes must have 3 entries [loss_type, "
              "kl_estimator, importance_sampling], got ", modes.size());
  const LossConfig config{hparams[0], hparams[1], hparams[2], hparams[3], hparams[4], hparams[5],
                          modes[0], modes[1], modes[2] == kSequenceIS};
  TORCH_CHECK(config.loss_type >= kGrpo && config.loss_type <= kDapo,
              "medgrpo: loss_type must be 0 (grpo), 1 (bnpo), 2 (dr_grpo) or 3 (dapo), got ", config.loss_type);
  TORCH_CHECK(config.kl_estimator >= kK1 && config.kl_estimator <= kK3,
              "medgrpo: kl_estimator must be 1 (k1), 2 (k2) or 3 (k3), got ", config.kl_estimator);
  TORCH_CHECK(modes[2] == kTokenIS || modes[2] == kSequenceIS,
              "medgrpo: importance_sampling must be 0 (token) or 1 (sequence), got ", modes[2]);
  TORCH_CHECK(config.loss_type != kDrGrpo || config.max_completion_length > 0,
              "medgrpo: loss_type dr_grpo needs max_completion_length > 0, got ", config.max_completion_length);
  return config;
}

// The inputs, contiguous, in the dtypes the kernels read: logp / old_logp / ref_logp in one
// compute dtype (logp's, or the accumulation dtype when they differ), advantages and mask in
// the accumulation dtype. Absent optionals stay undefined.
struct LossInputs {
  at::Tensor logp;
  at::Tensor advantages;
  at::Tensor mask;
  at::Tensor old_logp;
  at::Tensor ref_logp;
  at::ScalarType out_dtype;  // accumulation dtype of the caller's logp
  int64_t rows;
  int64_t cols;
  bool per_token_advantages;
};

void check_like_logp(const at::Tensor& t, const at::Tensor& logp, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.sizes() == logp.sizes(), "medgrpo: ", name, " must have logp's shape ", logp.sizes(),
              ", got ", t.sizes());
}

LossInputs prepare_inputs(const at::Tensor& logp, const at::Tensor& advantages, const at::Tensor& mask,
                          const std::optional<at::Tensor>& old_logp, const std::optional<at::Tensor>& ref_logp) {
  check_floating(logp, "logp");
  check_dim(logp, 2, "logp");
  check_like_logp(mask, logp, "mask");
  TORCH_CHECK(!at::isComplexType(mask.scalar_type()), "medgrpo: mask must be bool, integer or float");
  check_cpu(advantages, "advantages");
  TORCH_CHECK(!at::isComplexType(advantages.scalar_type()), "medgrpo: advantages must be real");
  const int64_t rows = logp.size(0);
  const bool per_token = advantages.dim() == 2;
  const bool per_sequence = advantages.dim() == 1 && advantages.size(0) == rows;
  TORCH_CHECK(per_sequence || (per_token && advantages.sizes() == logp.sizes()),
              "medgrpo: advantages must have shape (B,) or (B, T) with (B, T) = ", logp.sizes(), ", got ",
              advantages.sizes());
  at::ScalarType compute = logp.scalar_type();
  for (const auto* opt : {&old_logp, &ref_logp}) {
    if (opt->has_value()) {
      const char* name = opt == &old_logp ? "old_logp" : "ref_logp";
      check_floating(**opt, name);
      check_like_logp(**opt, logp, name);
      if ((*opt)->scalar_type() != logp.scalar_type()) {
        // Mixed dtypes (e.g. bf16 logp, fp32 ref_logp): read everything in the accumulation
        // dtype, as the reference does, rather than rounding the wider input down.
        compute = accumulation_dtype(logp.scalar_type());
      }
    }
  }
  const at::ScalarType acc = accumulation_dtype(logp.scalar_type());
  LossInputs in;
  in.logp = contiguous_as(logp, compute);
  in.advantages = contiguous_as(advantages, acc);
  in.mask = contiguous_as(mask, acc);
  in.old_logp = old_logp.has_value() ? contiguous_as(*old_logp, compute) : at::Tensor();
  in.ref_logp = ref_logp.has_value() ? contiguous_as(*ref_logp, compute) : at::Tensor();
  in.out_dtype = acc;
  in.rows = rows;
  in.cols = logp.size(1);
  in.per_token_advantages = per_token;
  return in;
}

// torch.maximum / torch.minimum semantics: a NaN operand gives NaN.
template <typename T>
inline T nan_max(T a, T b) {
  return (a > b || std::isnan(a)) ? a : b;
}
template <typename T>
inline T nan_min(T a, T b) {
  return (a < b || std::isnan(a)) ? a : b;
}

// Masked sums of one row (or of the batch).
struct RowSums {
  double loss = 0;
  double tokens = 0;
  double kl = 0;
  double clipped_low = 0;
  double clipped_high = 0;
  double clipped_dual = 0;
};

// Which clip regions a token falls in; a clipped token gets no surrogate gradient.
struct ClipFlags {
  bool low;
  bool high;
  bool dual;
  bool unclipped() const { return !(low || high || dual); }
};

// The per-token math of the loss and its gradient, on rows of the prepared inputs.
template <typename scalar_t>
struct PolicyLossKernel {
  using acc_t = at::opmath_type<scalar_t>;

  const scalar_t* logp;
  const scalar_t* old_logp;  // nullptr: logp itself (ratio 1)
  const scalar_t* ref_logp;  // nullptr: no KL
  const acc_t* advantages;
  const acc_t* mask;
  int64_t cols;
  bool per_token_advantages;
  bool sequence_is;
  int64_t kl_estimator;
  // Bounds cast to acc_t once, as the reference compares acc_t tensors with Python floats.
  acc_t ratio_low;   // 1 - epsilon_low
  acc_t ratio_high;  // 1 + epsilon_high
  acc_t dual_clip;   // 0: off
  acc_t beta;

  PolicyLossKernel(const LossInputs& in, const LossConfig& config)
      : logp(in.logp.const_data_ptr<scalar_t>()),
        old_logp(in.old_logp.defined() ? in.old_logp.const_data_ptr<scalar_t>() : nullptr),
        ref_logp(in.ref_logp.defined() ? in.ref_logp.const_data_ptr<scalar_t>() : nullptr),
        advantages(in.advantages.const_data_ptr<acc_t>()),
        mask(in.mask.const_data_ptr<acc_t>()),
        cols(in.cols),
        per_token_advantages(in.per_token_advantages),
        sequence_is(config.sequence_is),
        kl_estimator(config.kl_estimator),
        ratio_low(static_cast<acc_t>(1.0 - config.epsilon_low)),
        ratio_high(static_cast<acc_t>(1.0 + config.epsilon_high)),
        dual_clip(static_cast<acc_t>(config.dual_clip)),
        beta(static_cast<acc_t>(config.beta)) {}

  acc_t advantage(int64_t row, int64_t i) const {
    return per_token_advantages ? advantages[i] : advantages[row];
  }

  acc_t log_ratio(int64_t i) const {
    return old_logp == nullptr ? acc_t(0)
                               : static_cast<acc_t>(logp[i]) - static_cast<acc_t>(old_logp[i]);
  }

  double row_tokens(int64_t row) const {
    double tokens = 0;
    for (int64_t i = row * cols; i < (row + 1) * cols; ++i) {
      tokens += mask[i];
    }
    return tokens;
  }

  // Sequence IS (GSPO): exp of the row's mask-weighted mean log-ratio.
  acc_t sequence_ratio(int64_t row, double tokens) const {
    double weighted = 0;
    for (int64_t i = row * cols; i < (row + 1) * cols; ++i) {
      if (mask[i] != acc_t(0)) {
        weighted += mask[i] * log_ratio(i);
      }
    }
    return std::exp(static_cast<acc_t>(weighted / std::max(tokens, 1.0)));
  }

  ClipFlags clip_flags(acc_t ratio, acc_t adv) const {
    return ClipFlags{ratio < ratio_low && adv < acc_t(0), ratio > ratio_high && adv > acc_t(0),
                     dual_clip > acc_t(0) && adv < acc_t(0) && ratio > dual_clip};
  }

  // max(-A r, -A clip(r)), bounded by -A c for A < 0 under dual clip.
  acc_t surrogate(acc_t ratio, acc_t adv) const {
    const acc_t clipped = std::min(std::max(ratio, ratio_low), ratio_high);
    acc_t loss = nan_max(-adv * ratio, -adv * clipped);
    if (dual_clip > acc_t(0) && adv < acc_t(0)) {
      loss = nan_min(loss, -adv * dual_clip);
    }
    return loss;
  }

  // KL(pi || pi_ref) estimate at token i, with d = ref - logp.
  acc_t kl(int64_t i) const {
    const acc_t d = static_cast<acc_t>(ref_logp[i]) - static_cast<acc_t>(logp[i]);
    switch (kl_estimator) {
      case kK1:
        return -d;
      case kK2:
        return acc_t(0.5) * d * d;
      default:
        return std::exp(d) - d - acc_t(1);
    }
  }

  // d kl / d logp at token i.
  acc_t kl_grad(int64_t i) const {
    const acc_t d = static_cast<acc_t>(ref_logp[i]) - static_cast<acc_t>(logp[i]);
    switch (kl_estimator) {
      case kK1:
        return acc_t(1);
      case kK2:
        return -d;
      default:
        return acc_t(1) - std::exp(d);
    }
  }

  bool kl_in_loss() const { return ref_logp != nullptr && beta != acc_t(0); }

  RowSums forward_row(int64_t row) const {
    RowSums sums;
    sums.tokens = row_tokens(row);
    const acc_t shared_ratio = sequence_is ? sequence_ratio(row, sums.tokens) : acc_t(1);
    for (int64_t i = row * cols; i < (row + 1) * cols; ++i) {
      const acc_t w = mask[i];
      if (w == acc_t(0)) {
        continue;  // masked out: contributes exactly 0, even over NaN/inf padding
      }
      const acc_t ratio = sequence_is ? shared_ratio : std::exp(log_ratio(i));
      const acc_t adv = advantage(row, i);
      acc_t loss = surrogate(ratio, adv);
      if (ref_logp != nullptr) {
        const acc_t kl_i = kl(i);
        if (beta != acc_t(0)) {
          loss += beta * kl_i;
        }
        sums.kl += w * kl_i;
      }
      const ClipFlags flags = clip_flags(ratio, adv);
      sums.loss += w * loss;
      sums.clipped_low += flags.low ? w : acc_t(0);
      sums.clipped_high += flags.high ? w : acc_t(0);
      sums.clipped_dual += flags.dual ? w : acc_t(0);
    }
    return sums;
  }

  // grad of g * sum_t w_t loss_t with respect to logp[row, :], written to grad[row * cols ...].
  template <typename out_t>
  void backward_row(int64_t row, acc_t g, out_t* grad) const {
    const double tokens = row_tokens(row);
    const acc_t shared_ratio = sequence_is ? sequence_ratio(row, tokens) : acc_t(1);
    // Sequence IS: every token's surrogate depends on the row's ratio, whose derivative
    // with respect to logp_t is ratio * w_t / max(tokens, 1).
    double surrogate_sum = 0;
    if (sequence_is) {
      for (int64_t i = row * cols; i < (row + 1) * cols; ++i) {
        const acc_t w = mask[i];
        const acc_t adv = advantage(row, i);
        if (w != acc_t(0) && clip_flags(shared_ratio, adv).unclipped()) {
          surrogate_sum += w * -adv;
        }
      }
    }
    const acc_t sequence_scale = static_cast<acc_t>(shared_ratio * surrogate_sum / std::max(tokens, 1.0));
    for (int64_t i = row * cols; i < (row + 1) * cols; ++i) {
      const acc_t w = mask[i];
      if (w == acc_t(0)) {
        grad[i] = out_t(0);
        continue;
      }
      acc_t d = acc_t(0);
      if (sequence_is) {
        d = sequence_scale;
      } else {
        const acc_t ratio = std::exp(log_ratio(i));
        const acc_t adv = advantage(row, i);
        d = clip_flags(ratio, adv).unclipped() ? -adv * ratio : acc_t(0);
      }
      if (kl_in_loss()) {
        d += beta * kl_grad(i);
      }
      grad[i] = static_cast<out_t>(g * w * d);
    }
  }
};

int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, kGrainTokens / std::max<int64_t>(cols, 1));
}

// Items the dapo loss is normalized by: the num_items tensor, else hparam, else the token count.
double dapo_items(const std::optional<at::Tensor>& num_items, const LossConfig& config, double tokens) {
  if (num_items.has_value()) {
    TORCH_CHECK(num_items->numel() == 1, "medgrpo: num_items must hold one value, got shape ", num_items->sizes());
    return num_items->item<double>();
  }
  return config.num_items_value >= 0 ? config.num_items_value : tokens;
}

// Weight by which each row's masked loss sum enters the scalar loss (reference.loss_row_weights),
// computed in double and rounded once to the output dtype.
template <typename acc_t>
void row_weights(const std::vector<RowSums>& rows, double tokens, const LossConfig& config,
                 const std::optional<at::Tensor>& num_items, acc_t* weight) {
  const int64_t batch = static_cast<int64_t>(rows.size());
  double shared = 0;
  if (config.loss_type == kBnpo) {
    shared = 1.0 / std::max(tokens, 1.0);
  } else if (config.loss_type == kDrGrpo) {
    shared = 1.0 / (static_cast<double>(batch) * config.max_completion_length);
  } else if (config.loss_type == kDapo) {
    shared = 1.0 / std::max(dapo_items(num_items, config, tokens), 1.0);
  }
  for (int64_t b = 0; b < batch; ++b) {
    const double w = config.loss_type == kGrpo ? 1.0 / (static_cast<double>(batch) * std::max(rows[b].tokens, 1.0))
                                               : shared;
    weight[b] = static_cast<acc_t>(w);
  }
}

template <typename scalar_t>
void policy_loss_forward_kernel(const LossInputs& in, const LossConfig& config,
                                const std::optional<at::Tensor>& num_items, at::Tensor& loss, at::Tensor& metrics,
                                at::Tensor& row_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const PolicyLossKernel<scalar_t> kernel(in, config);
  std::vector<RowSums> rows(in.rows);
  at::parallel_for(0, in.rows, row_grain(in.cols), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      rows[b] = kernel.forward_row(b);
    }
  });
  RowSums total;
  for (const auto& row : rows) {
    total.tokens += row.tokens;
    total.kl += row.kl;
    total.clipped_low += row.clipped_low;
    total.clipped_high += row.clipped_high;
    total.clipped_dual += row.clipped_dual;
  }
  acc_t* weight = row_weight.data_ptr<acc_t>();
  row_weights(rows, total.tokens, config, num_items, weight);
  for (int64_t b = 0; b < in.rows; ++b) {
    total.loss += static_cast<double>(weight[b]) * rows[b].loss;  // the weights backward will see
  }
  const double denom = std::max(total.tokens, 1.0);
  acc_t* m = metrics.data_ptr<acc_t>();
  m[0] = static_cast<acc_t>(total.kl / denom);
  m[1] = static_cast<acc_t>(total.clipped_low / denom);
  m[2] = static_cast<acc_t>(total.clipped_high / denom);
  m[3] = static_cast<acc_t>((total.clipped_low + total.clipped_high) / denom);
  m[4] = static_cast<acc_t>(total.clipped_dual / denom);
  m[5] = static_cast<acc_t>(total.tokens);
  *loss.data_ptr<acc_t>() = static_cast<acc_t>(total.loss);
}

template <typename scalar_t>
void policy_loss_backward_kernel(const LossInputs& in, const LossConfig& config, double grad_loss,
                                 const at::Tensor& row_weight, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const PolicyLossKernel<scalar_t> kernel(in, config);
  const acc_t* weight = row_weight.const_data_ptr<acc_t>();
  const acc_t g = static_cast<acc_t>(grad_loss);
  scalar_t* out = grad.data_ptr<scalar_t>();
  at::parallel_for(0, in.rows, row_grain(in.cols), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      kernel.backward_row(b, g * weight[b], out);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_forward_cpu(
    const at::Tensor& logp, const at::Tensor& advantages, const at::Tensor& mask,
    const std::optional<at::Tensor>& old_logp, const std::optional<at::Tensor>& ref_logp,
    const std::optional<at::Tensor>& num_items, at::ArrayRef<double> hparams, at::IntArrayRef modes) {
  const LossConfig config = parse_config(hparams, modes);
  const LossInputs in = prepare_inputs(logp, advantages, mask, old_logp, ref_logp);
  const auto options = logp.options().dtype(in.out_dtype);
  at::Tensor loss = at::empty({}, options);
  at::Tensor metrics = at::empty({6}, options);
  at::Tensor row_weight = at::empty({in.rows}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logp.scalar_type(), "policy_loss_forward_cpu", [&] {
    policy_loss_forward_kernel<scalar_t>(in, config, num_items, loss, metrics, row_weight);
  });
  return {loss, metrics, row_weight};
}

at::Tensor policy_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logp,
                                    const at::Tensor& advantages, const at::Tensor& mask,
                                    const std::optional<at::Tensor>& old_logp,
                                    const std::optional<at::Tensor>& ref_logp, const at::Tensor& row_weight,
                                    at::ArrayRef<double> hparams, at::IntArrayRef modes) {
  const LossConfig config = parse_config(hparams, modes);
  const LossInputs in = prepare_inputs(logp, advantages, mask, old_logp, ref_logp);
  TORCH_CHECK(grad_loss.numel() == 1, "medgrpo: grad_loss must hold one value, got shape ", grad_loss.sizes());
  check_cpu(row_weight, "row_weight");
  check_dim(row_weight, 1, "row_weight");
  check_numel(row_weight, in.rows, "row_weight");
  const at::Tensor weight = contiguous_as(row_weight, in.out_dtype);
  at::Tensor grad = at::empty({in.rows, in.cols}, in.logp.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logp.scalar_type(), "policy_loss_backward_cpu", [&] {
    policy_loss_backward_kernel<scalar_t>(in, config, grad_loss.item<double>(), weight, grad);
  });
  return grad.to(logp.scalar_type());  // no-op unless mixed input dtypes forced an fp32 pass
}

}  // namespace medgrpo

TORCH_LIBRARY_IMPL(medgrpo, CPU, m) {
  m.impl("policy_loss_forward", &medgrpo::policy_loss_forward_cpu);
  m.impl("policy_loss_backward", &medgrpo::policy_loss_backward_cpu);
}
