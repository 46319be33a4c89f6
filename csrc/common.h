// Helpers shared by the CPU kernels of the medgrpo ops (see medgrpo/ops/reference.py).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <utility>

namespace medgrpo {

// fp64 stays fp64 (so gradcheck works); every other float dtype accumulates in fp32.
inline at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "medgrpo: ", name, " must be a CPU tensor, got ", t.device());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "medgrpo: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_integral(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), "medgrpo: ", name,
              " must be an integer tensor, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, "medgrpo: ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_numel(const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.numel() == numel, "medgrpo: ", name, " must have ", numel,
              " elements, got shape ", t.sizes());
}

// `t` as a contiguous tensor of `dtype`; no copy when it already is one.
inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t.contiguous() : t.to(dtype).contiguous();
}

// Checks the (keys, stats) pair of reward normalization and returns (int64 keys, acc stats).
inline std::pair<at::Tensor, at::Tensor> prepare_normalization(const at::Tensor& keys,
                                                               const at::Tensor& stats, int64_t n,
                                                               at::ScalarType acc) {
  check_integral(keys, "keys");
  check_dim(keys, 1, "keys");
  check_numel(keys, n, "keys");
  check_floating(stats, "stats");
  check_dim(stats, 2, "stats");
  TORCH_CHECK(stats.size(1) == 3, "medgrpo: stats must have shape (K, 3) = (p25, p50, p75), got ",
              stats.sizes());
  return {contiguous_as(keys, at::kLong), contiguous_as(stats, acc)};
}

// sigmoid(k (r - p50) / IQR) with the (p25, p50, p75) row of `key`. A degenerate key
// (!(IQR > 0), NaN included) takes the IQR -> 0+ limit: a 0 / 0.5 / 1 step around p50.
// A key outside [0, num_keys) or a NaN reward gives NaN.
template <typename acc_t>
inline acc_t normalized_reward(acc_t r, int64_t key, const acc_t* stats, int64_t num_keys, acc_t k) {
  if (key < 0 || key >= num_keys || std::isnan(r)) {
    return std::numeric_limits<acc_t>::quiet_NaN();
  }
  const acc_t p25 = stats[3 * key];
  const acc_t p50 = stats[3 * key + 1];
  const acc_t p75 = stats[3 * key + 2];
  const acc_t iqr = p75 - p25;
  if (!(iqr > acc_t(0))) {
    return r > p50 ? acc_t(1) : (r < p50 ? acc_t(0) : acc_t(0.5));
  }
  const acc_t z = k * (r - p50) / iqr;
  return acc_t(1) / (acc_t(1) + std::exp(-z));  // exp overflow -> inf -> 0: the right limit
}

// Defined in normalize_rewards.cpp; group_advantages normalizes through it too.
at::Tensor normalize_rewards_cpu(const at::Tensor& rewards, const at::Tensor& keys,
                                 const at::Tensor& stats, double k);

}  // namespace medgrpo
