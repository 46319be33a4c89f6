// CPU kernel of medgrpo::group_advantages (spec: reference.group_advantages).
//
// A GRPO batch holds a few thousand rewards, so the statistics run serially in index
// order: deterministic, and cheaper than spawning threads. They are computed in double
// from the used rewards (fp32, or fp64 for fp64 input) and rounded once on output, so no
// serial fp32 sum over the batch loses accuracy against torch's cascade summation. Means
// and stds take two passes (mean, then centered squares), not the sum of squares.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"

namespace medgrpo {
namespace {

enum AdvantageScale : int64_t { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };

// TRL flags a group as zero-std with torch.isclose(std, 0), i.e. std <= 1e-8.
constexpr double kZeroStdAtol = 1e-8;

// Which group each member belongs to: i / group_size, or group_ids[i] (-1 when out of range).
struct GroupLayout {
  int64_t num_groups;
  int64_t group_size;  // > 0: contiguous groups
  const int64_t* ids;  // group_size == 0: one id per member

  int64_t group_of(int64_t i) const {
    if (ids == nullptr) {
      return i / group_size;
    }
    const int64_t g = ids[i];
    return (g >= 0 && g < num_groups) ? g : -1;
  }
};

// Per-group statistics, one slot per group.
struct GroupStats {
  std::vector<double> mean;
  std::vector<double> std;
  std::vector<int64_t> count;
};

// A member enters the statistics when its reward is scorable and its group id valid.
inline bool is_member(double r, int64_t g) {
  return g >= 0 && !std::isnan(r);
}

double bessel_std(double squares, int64_t count) {
  return count >= 2 ? std::sqrt(squares / static_cast<double>(count - 1)) : 0.0;
}

GroupStats compute_group_stats(const double* r, int64_t n, const GroupLayout& layout) {
  const int64_t num_groups = layout.num_groups;
  GroupStats out{std::vector<double>(num_groups), std::vector<double>(num_groups), std::vector<int64_t>(num_groups, 0)};
  std::vector<int64_t>& count = out.count;
  std::vector<double> sum(num_groups, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = layout.group_of(i);
    if (is_member(r[i], g)) {
      sum[g] += r[i];
      count[g] += 1;
    }
  }
  for (int64_t g = 0; g < num_groups; ++g) {
    out.mean[g] = count[g] > 0 ? sum[g] / static_cast<double>(count[g]) : 0.0;
  }
  std::vector<double> squares(num_groups, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = layout.group_of(i);
    if (is_member(r[i], g)) {
      const double dev = r[i] - out.mean[g];
      squares[g] += dev * dev;
    }
  }
  for (int64_t g = 0; g < num_groups; ++g) {
    out.std[g] = bessel_std(squares[g], count[g]);
  }
  return out;
}

// Bessel std over every member of the batch (the same members the group statistics use).
double batch_std(const double* r, int64_t n, const GroupLayout& layout) {
  double sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (is_member(r[i], layout.group_of(i))) {
      sum += r[i];
      count += 1;
    }
  }
  const double mean = sum / static_cast<double>(std::max<int64_t>(count, 1));
  double squares = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (is_member(r[i], layout.group_of(i))) {
      const double dev = r[i] - mean;
      squares += dev * dev;
    }
  }
  return bessel_std(squares, count);
}

std::vector<double> compute_advantages(const double* r, int64_t n, const GroupLayout& layout,
                                       const GroupStats& stats, int64_t scale, double eps) {
  std::vector<double> adv(n, 0.0);
  const double batch_denom = scale == kScaleBatch ? batch_std(r, n, layout) + eps : 1.0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = layout.group_of(i);
    if (!is_member(r[i], g)) {
      continue;  // NaN reward or bad group id: advantage 0
    }
    const double denom = scale == kScaleGroup ? stats.std[g] + eps : batch_denom;
    // `denom > 0` so that a NaN denominator also gives 0, like the reference.
    adv[i] = denom > 0.0 ? (r[i] - stats.mean[g]) / denom : 0.0;
  }
  return adv;
}

// [zero_std_fraction over non-empty groups, fraction of members left out (NaN or bad id)].
std::vector<double> compute_summary(const GroupStats& stats, int64_t n) {
  int64_t nonempty = 0;
  int64_t zero_std = 0;
  int64_t members = 0;
  for (size_t g = 0; g < stats.count.size(); ++g) {
    members += stats.count[g];
    if (stats.count[g] >= 1) {
      nonempty += 1;
      zero_std += stats.std[g] <= kZeroStdAtol ? 1 : 0;
    }
  }
  return {static_cast<double>(zero_std) / static_cast<double>(std::max<int64_t>(nonempty, 1)),
          static_cast<double>(n - members) / static_cast<double>(std::max<int64_t>(n, 1))};
}

// A 1-D tensor of `dtype` holding `values` (rounded once from double).
template <typename T>
at::Tensor to_tensor(const std::vector<T>& values, at::ScalarType dtype) {
  const auto source = std::is_same_v<T, double> ? at::kDouble : at::kLong;
  at::Tensor host = at::from_blob(const_cast<T*>(values.data()), {static_cast<int64_t>(values.size())},
                                  at::TensorOptions().dtype(source));
  return host.to(dtype, /*non_blocking=*/false, /*copy=*/true);
}

// The rewards the advantages are computed from, as a fresh tensor in the accumulation dtype.
at::Tensor used_rewards(const at::Tensor& rewards, const std::optional<at::Tensor>& keys,
                        const std::optional<at::Tensor>& stats, double k) {
  TORCH_CHECK(keys.has_value() == stats.has_value(),
              "medgrpo: group_advantages needs both keys and stats for normalization, or neither");
  if (keys.has_value()) {
    return normalize_rewards_cpu(rewards, *keys, *stats, k);
  }
  at::Tensor used = at::empty({rewards.numel()}, rewards.options().dtype(accumulation_dtype(rewards.scalar_type())));
  used.copy_(rewards);  // a copy, never an alias of the input
  return used;
}

GroupLayout make_layout(int64_t n, const std::optional<at::Tensor>& group_ids, int64_t group_size,
                        at::Tensor& ids_i64) {
  TORCH_CHECK(group_size >= 0, "medgrpo: group_size must be >= 0, got ", group_size);
  if (group_size > 0) {
    TORCH_CHECK(n % group_size == 0, "medgrpo: the number of rewards (", n,
                ") must be divisible by group_size (", group_size, ")");
    return GroupLayout{n / group_size, group_size, nullptr};
  }
  TORCH_CHECK(group_ids.has_value(), "medgrpo: group_advantages needs group_ids when group_size == 0");
  check_integral(*group_ids, "group_ids");
  check_dim(*group_ids, 1, "group_ids");
  check_numel(*group_ids, n, "group_ids");
  ids_i64 = contiguous_as(*group_ids, at::kLong);
  return GroupLayout{n, 0, ids_i64.const_data_ptr<int64_t>()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_advantages_cpu(
    const at::Tensor& rewards, const std::optional<at::Tensor>& group_ids, int64_t group_size,
    const std::optional<at::Tensor>& keys, const std::optional<at::Tensor>& stats, double k, int64_t scale,
    double eps) {
  check_floating(rewards, "rewards");
  check_dim(rewards, 1, "rewards");
  TORCH_CHECK(scale == kScaleGroup || scale == kScaleBatch || scale == kScaleNone,
              "medgrpo: scale must be 0 (group), 1 (batch) or 2 (none), got ", scale);
  const int64_t n = rewards.numel();
  at::Tensor ids_i64;
  const GroupLayout layout = make_layout(n, group_ids, group_size, ids_i64);
  const at::Tensor used = used_rewards(rewards, keys, stats, k);
  const at::Tensor used64 = used.to(at::kDouble);  // no copy for fp64
  const double* r = used64.const_data_ptr<double>();
  const GroupStats group = compute_group_stats(r, n, layout);
  const at::ScalarType acc = used.scalar_type();
  return {to_tensor(compute_advantages(r, n, layout, group, scale, eps), acc),
          used,
          to_tensor(group.mean, acc),
          to_tensor(group.std, acc),
          to_tensor(group.count, at::kInt),
          to_tensor(compute_summary(group, n), acc)};
}

}  // namespace medgrpo

TORCH_LIBRARY_IMPL(medgrpo, CPU, m) {
  m.impl("group_advantages", &medgrpo::group_advantages_cpu);
}
