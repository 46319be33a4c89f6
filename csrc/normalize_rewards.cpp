// CPU kernel of medgrpo::normalize_rewards (spec: reference.normalize_rewards).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace medgrpo {
namespace {

// Elements per task: the per-element work is one exp, so small batches stay serial.
constexpr int64_t kGrainSize = 4096;

template <typename scalar_t>
void normalize_rewards_kernel(const at::Tensor& rewards, const at::Tensor& keys,
                              const at::Tensor& stats, double k, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* r = rewards.const_data_ptr<scalar_t>();
  const int64_t* key = keys.const_data_ptr<int64_t>();
  const acc_t* rows = stats.const_data_ptr<acc_t>();
  const int64_t num_keys = stats.size(0);
  const acc_t k_acc = static_cast<acc_t>(k);
  acc_t* o = out.data_ptr<acc_t>();
  at::parallel_for(0, rewards.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      o[i] = normalized_reward<acc_t>(static_cast<acc_t>(r[i]), key[i], rows, num_keys, k_acc);
    }
  });
}

}  // namespace

at::Tensor normalize_rewards_cpu(const at::Tensor& rewards, const at::Tensor& keys,
                                 const at::Tensor& stats, double k) {
  check_floating(rewards, "rewards");
  check_dim(rewards, 1, "rewards");
  const at::ScalarType acc = accumulation_dtype(rewards.scalar_type());
  auto [keys_i64, stats_acc] = prepare_normalization(keys, stats, rewards.numel(), acc);
  const at::Tensor r = rewards.contiguous();
  at::Tensor out = at::empty({r.numel()}, r.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.scalar_type(), "normalize_rewards_cpu", [&] {
    normalize_rewards_kernel<scalar_t>(r, keys_i64, stats_acc, k, out);
  });
  return out;
}

}  // namespace medgrpo

TORCH_LIBRARY_IMPL(medgrpo, CPU, m) {
  m.impl("normalize_rewards", &medgrpo::normalize_rewards_cpu);
}
