// CPU kernels of medgrpo::policy_loss_forward / policy_loss_backward
// (spec: reference.per_token_policy_loss and reference.loss_row_weights).
//
// Structure:
// * Rows run in parallel; each row's sums go to its own slot and are reduced over rows
//   serially afterwards, so results do not depend on the number of threads.
// * A row is processed in blocks of kBlock tokens (Block / RowReader). Inputs that are not
//   already in the accumulation type acc_t (fp32; fp64 for fp64 logp) are converted block by
//   block into stack buffers; so is the mask, read in its own dtype (bool, int, float ...)
//   instead of in an extra pass over the batch. A partial last block is zero-padded to
//   whole vectors, so the token loops never handle a tail.
// * The per-token math (TokenMath, *_block) runs on at::vec::Vectorized<acc_t>: AVX2 /
//   AVX-512 when the build enables them (see setup.py), NEON on aarch64, a scalar emulation
//   otherwise. exp is at::vec's (Sleef's 1-ulp exp on x86), computed for a whole block
//   before its token loop. Every other operation rounds as in the reference.
// * The token loops of a block cover only the vectors from its first to its last masked-in
//   token, which skips a completion's padding. Masked-out tokens inside are selected away
//   (never multiplied), so NaN/inf padding cannot reach a value or a gradient.
// * Sums over tokens: each vector lane accumulates at most 64 tokens of a block in acc_t,
//   the lanes are added by a shuffle tree, and block totals in double. The error stays of
//   the order of torch's cascade summation (a serial fp32 sum over a long row's tokens does
//   not), and the token loops stay vectorized.

// at::vec picks its implementation from CPU_CAPABILITY*, which ATen's own kernels get from
// its build system. Here it follows the instruction set this file is compiled for.
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__FMA__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"

namespace medgrpo {
namespace {

using at::vec::Vectorized;

enum LossType : int64_t { kGrpo = 0, kBnpo = 1, kDrGrpo = 2, kDapo = 3 };
enum KlEstimator : int64_t { kK1 = 1, kK2 = 2, kK3 = 3 };
enum ImportanceSampling : int64_t { kTokenIS = 0, kSequenceIS = 1 };

// Tokens per parallel task: a few microseconds of work, well above the cost of a fork.
constexpr int64_t kGrainTokens = 16384;
// Tokens per block, the unit of input conversion and of the lane sums: each fp32 vector
// lane sums at most 64 tokens of a block (1024 tokens with AVX-512, 512 with AVX2).
constexpr int64_t kBlock = 64 * Vectorized<float>::size();

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

// The inputs, contiguous: logp / old_logp / ref_logp in one compute dtype (logp's, or the
// accumulation dtype when they differ), advantages in the accumulation dtype, the mask in
// its own dtype. Absent optionals stay undefined.
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
  in.mask = mask.contiguous();
  in.old_logp = old_logp.has_value() ? contiguous_as(*old_logp, compute) : at::Tensor();
  in.ref_logp = ref_logp.has_value() ? contiguous_as(*ref_logp, compute) : at::Tensor();
  in.out_dtype = acc;
  in.rows = rows;
  in.cols = logp.size(1);
  in.per_token_advantages = per_token;
  return in;
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

// ------------------------------------------------------------------ vector helpers

template <typename T>
constexpr int64_t kLanes = Vectorized<T>::size();

// x where `keep` is set, else +0: a select, so NaN/inf in x never leaks.
template <typename T>
inline Vectorized<T> select(const Vectorized<T>& keep, const Vectorized<T>& x) {
  return Vectorized<T>::blendv(Vectorized<T>(T(0)), x, keep);
}

template <typename T>
inline bool all_zero(const Vectorized<T>& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v.zero_mask() == (1 << kLanes<T>) - 1;
  } else {
    T values[kLanes<T>];
    v.store(values);
    return std::all_of(values, values + kLanes<T>, [](T x) { return x == T(0); });
  }
}

// The lanes of v added up (a shuffle tree in T), as a double.
template <typename T>
inline double lane_sum(const Vectorized<T>& v) {
  return static_cast<double>(
      at::vec::vec_reduce_all<T>([](const Vectorized<T>& a, const Vectorized<T>& b) { return a + b; }, v));
}

// ------------------------------------------------------------------ blocks of a row

// Which inputs a call has, fixed at compile time so that the token loops do not branch on them.
template <bool PerTokenAdvantages, bool HasRef, bool TokenRatio>
struct Mode {
  static constexpr bool per_token_advantages = PerTokenAdvantages;
  static constexpr bool has_ref = HasRef;
  static constexpr bool token_ratio = TokenRatio;  // exp(logp - old_logp) per token, else the row's ratio
  static constexpr bool reads_logp = HasRef || TokenRatio;
};

// One block of a row as acc_t arrays, padded to whole vectors with weight-0 tokens. A null
// pointer: not given (old / ref logp), not needed, or (advantages) one for the whole row.
// The token loops run over [active_begin, active_end), from the first to the last vector
// holding a masked-in token (completions are prefixes, so this skips the padding); the
// masked-out tokens within are selected away.
template <typename acc_t>
struct Block {
  const acc_t* weight = nullptr;
  const acc_t* logp = nullptr;
  const acc_t* old_logp = nullptr;
  const acc_t* ref_logp = nullptr;
  const acc_t* advantages = nullptr;
  int64_t size = 0;    // tokens
  int64_t padded = 0;  // size rounded up to a multiple of kLanes<acc_t>
  int64_t active_begin = 0;
  int64_t active_end = 0;
};

// [first, last + 1) of the vectors of weight[0, padded) with a non-zero weight, in tokens.
template <typename acc_t>
std::pair<int64_t, int64_t> active_span(const acc_t* weight, int64_t padded) {
  int64_t end = padded;
  while (end > 0 && all_zero(Vectorized<acc_t>::loadu(weight + end - kLanes<acc_t>))) {
    end -= kLanes<acc_t>;
  }
  int64_t begin = 0;
  while (begin < end && all_zero(Vectorized<acc_t>::loadu(weight + begin))) {
    begin += kLanes<acc_t>;
  }
  return {begin, end};
}

// Conversion / padding space for one block.
template <typename acc_t>
struct BlockBuffers {
  acc_t weight[kBlock];
  acc_t logp[kBlock];
  acc_t old_logp[kBlock];
  acc_t ref_logp[kBlock];
  acc_t advantages[kBlock];
};

// n values as acc_t, zero-padded to `padded`: src itself when that needs no conversion or
// padding, else a converted copy in buffer.
template <typename acc_t, typename src_t>
const acc_t* as_acc(const src_t* src, int64_t n, int64_t padded, acc_t* buffer) {
  if constexpr (std::is_same_v<src_t, acc_t>) {
    if (n == padded) {
      return src;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    buffer[i] = static_cast<acc_t>(src[i]);
  }
  std::fill(buffer + n, buffer + padded, acc_t(0));
  return buffer;
}

// Reads mask[begin, begin + n) as acc_t weights; chosen once per call by the mask dtype.
template <typename acc_t>
using WeightReader = const acc_t* (*)(const void* mask, int64_t begin, int64_t n, int64_t padded, acc_t* buffer);

template <typename acc_t, typename mask_t>
const acc_t* read_weights(const void* mask, int64_t begin, int64_t n, int64_t padded, acc_t* buffer) {
  // A bool is one byte holding 0 or 1; as uint8_t the conversion vectorizes.
  using stored_t = std::conditional_t<std::is_same_v<mask_t, bool>, uint8_t, mask_t>;
  return as_acc(static_cast<const stored_t*>(mask) + begin, n, padded, buffer);
}

template <typename acc_t>
WeightReader<acc_t> weight_reader(at::ScalarType mask_dtype) {
  WeightReader<acc_t> reader = nullptr;
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask_dtype, "policy_loss_mask", [&] {
    reader = &read_weights<acc_t, scalar_t>;
  });
  return reader;
}

// The prepared inputs, read block by block.
template <typename scalar_t>
struct RowReader {
  using acc_t = at::opmath_type<scalar_t>;

  const scalar_t* logp;
  const scalar_t* old_logp;  // nullptr: logp itself (ratio 1)
  const scalar_t* ref_logp;  // nullptr: no KL
  const acc_t* advantages;
  const void* mask;
  WeightReader<acc_t> read_mask;
  int64_t cols;
  bool per_token_advantages;

  explicit RowReader(const LossInputs& in)
      : logp(in.logp.const_data_ptr<scalar_t>()),
        old_logp(in.old_logp.defined() ? in.old_logp.const_data_ptr<scalar_t>() : nullptr),
        ref_logp(in.ref_logp.defined() ? in.ref_logp.const_data_ptr<scalar_t>() : nullptr),
        advantages(in.advantages.const_data_ptr<acc_t>()),
        mask(in.mask.const_data_ptr()),
        read_mask(weight_reader<acc_t>(in.mask.scalar_type())),
        cols(in.cols),
        per_token_advantages(in.per_token_advantages) {}

  // Tokens [begin, begin + n) of `row`; with_logp = false skips logp / old / ref.
  Block<acc_t> block(int64_t row, int64_t begin, int64_t n, bool with_logp, BlockBuffers<acc_t>& buf) const {
    const int64_t offset = row * cols + begin;
    Block<acc_t> b;
    b.size = n;
    b.padded = (n + kLanes<acc_t> - 1) / kLanes<acc_t> * kLanes<acc_t>;
    b.weight = read_mask(mask, offset, n, b.padded, buf.weight);
    std::tie(b.active_begin, b.active_end) = active_span(b.weight, b.padded);
    if (per_token_advantages) {
      b.advantages = as_acc(advantages + offset, n, b.padded, buf.advantages);
    }
    if (with_logp) {
      b.logp = as_acc(logp + offset, n, b.padded, buf.logp);
      if (old_logp != nullptr) {
        b.old_logp = as_acc(old_logp + offset, n, b.padded, buf.old_logp);
      }
      if (ref_logp != nullptr) {
        b.ref_logp = as_acc(ref_logp + offset, n, b.padded, buf.ref_logp);
      }
    }
    return b;
  }

  // f(block, first token) over the blocks of `row`.
  template <typename F>
  void for_each_block(int64_t row, bool with_logp, const F& f) const {
    BlockBuffers<acc_t> buf;
    for (int64_t begin = 0; begin < cols; begin += kBlock) {
      f(block(row, begin, std::min(kBlock, cols - begin), with_logp, buf), begin);
    }
  }
};

// ------------------------------------------------------------------ per-token math

// The clip region of a token with advantage a, as thresholds on its ratio r:
// loss = -a * min(max(r, lo), hi), which equals the reference's
// max(-a r, -a clip(r, 1 - eps_low, 1 + eps_high)) (then min with -a c under dual clip)
// value for value, since multiplying by -a is monotone in every rounding.
// r < lo: clipped low (a < 0); r > hi: clipped high (a > 0) or dual-clipped (a < 0).
// A token gets a surrogate gradient iff it is in neither region.
template <typename acc_t>
struct ClipRegion {
  using Vec = Vectorized<acc_t>;
  Vec neg_adv;  // -a
  Vec lo;
  Vec hi;
  Vec positive;  // a > 0 (all bits), for the high / dual split
  Vec negative;  // a < 0
};

// The exps of a block, computed before its token loop: an exp is a call, which would
// otherwise spill every vector register live in the loop.
template <typename acc_t>
struct BlockExps {
  acc_t ratio[kBlock];  // exp(logp - old_logp)
  acc_t kl[kBlock];     // exp(ref_logp - logp), for the k3 estimator
};

// The per-token loss and gradient, on vectors of one block.
template <typename acc_t>
struct TokenMath {
  using Vec = Vectorized<acc_t>;

  // Bounds cast to acc_t once, as the reference compares acc_t tensors with Python floats.
  acc_t ratio_low;   // 1 - epsilon_low
  acc_t ratio_high;  // 1 + epsilon_high
  acc_t dual_clip;   // 0: off
  acc_t beta;
  int64_t kl_estimator;
  bool sequence_is;

  explicit TokenMath(const LossConfig& config)
      : ratio_low(static_cast<acc_t>(1.0 - config.epsilon_low)),
        ratio_high(static_cast<acc_t>(1.0 + config.epsilon_high)),
        dual_clip(static_cast<acc_t>(config.dual_clip)),
        beta(static_cast<acc_t>(config.beta)),
        kl_estimator(config.kl_estimator),
        sequence_is(config.sequence_is) {}

  ClipRegion<acc_t> clip_region(const Vec& adv) const {
    constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
    const Vec negative = adv < Vec(acc_t(0));
    const Vec positive = adv > Vec(acc_t(0));
    const Vec above_negative = Vec(dual_clip > acc_t(0) ? dual_clip : inf);
    return ClipRegion<acc_t>{adv.neg(), Vec::blendv(Vec(-inf), Vec(ratio_low), negative),
                             Vec::blendv(Vec::blendv(Vec(inf), above_negative, negative), Vec(ratio_high), positive),
                             positive, negative};
  }

  // With per-token advantages, sets c to the region of the tokens at j; else c keeps the
  // row's region (a local copy made before the loop, so that it stays in registers).
  template <typename M>
  void update_clip_region(const Block<acc_t>& b, int64_t j, ClipRegion<acc_t>& c) const {
    if constexpr (M::per_token_advantages) {
      c = clip_region(Vec::loadu(b.advantages + j));
    }
  }

  // Whether each token is clipped (no surrogate gradient). A NaN ratio is not.
  static Vec clipped(const Vec& ratio, const ClipRegion<acc_t>& c) {
    return (ratio < c.lo) | (ratio > c.hi);
  }

  // with_kl: whether the pass reads the KL terms (the forward always does, for the metric).
  template <typename M>
  void block_exps(const Block<acc_t>& b, bool with_kl, BlockExps<acc_t>& out) const {
    const bool kl_exp = M::has_ref && with_kl && kl_estimator == kK3;
    for (int64_t j = b.active_begin; j < b.active_end; j += kLanes<acc_t>) {
      if constexpr (M::token_ratio) {
        (Vec::loadu(b.logp + j) - Vec::loadu(b.old_logp + j)).exp().store(out.ratio + j);
      }
      if (kl_exp) {
        kl_delta(b, j).exp().store(out.kl + j);
      }
    }
  }

  template <typename M>
  static Vec ratio(const BlockExps<acc_t>& e, int64_t j, acc_t shared_ratio) {
    if constexpr (M::token_ratio) {
      return Vec::loadu(e.ratio + j);
    } else {
      return Vec(shared_ratio);
    }
  }

  // ref_logp - logp, the argument of the KL estimators.
  static Vec kl_delta(const Block<acc_t>& b, int64_t j) {
    return Vec::loadu(b.ref_logp + j) - Vec::loadu(b.logp + j);
  }

  // KL(pi || pi_ref) estimate at the tokens at j.
  Vec kl(const Block<acc_t>& b, const BlockExps<acc_t>& e, int64_t j) const {
    const Vec d = kl_delta(b, j);
    switch (kl_estimator) {
      case kK1:
        return d.neg();
      case kK2:
        return Vec(acc_t(0.5)) * (d * d);
      default:
        return Vec::loadu(e.kl + j) - d - Vec(acc_t(1));
    }
  }

  // d kl / d logp at the tokens at j.
  Vec kl_grad(const Block<acc_t>& b, const BlockExps<acc_t>& e, int64_t j) const {
    switch (kl_estimator) {
      case kK1:
        return Vec(acc_t(1));
      case kK2:
        return kl_delta(b, j).neg();
      default:
        return Vec(acc_t(1)) - Vec::loadu(e.kl + j);
    }
  }
};

// acc_t lane sums of one block (each lane holds at most kBlock / lanes tokens).
template <typename acc_t>
struct LaneSums {
  using Vec = Vectorized<acc_t>;
  Vec loss{acc_t(0)};
  Vec tokens{acc_t(0)};
  Vec kl{acc_t(0)};
  Vec below{acc_t(0)};      // clipped low
  Vec above_pos{acc_t(0)};  // clipped high
  Vec above_neg{acc_t(0)};  // dual-clipped

  void add_to(RowSums& sums, bool with_kl) const {
    sums.loss += lane_sum(loss);
    sums.tokens += lane_sum(tokens);
    sums.kl += with_kl ? lane_sum(kl) : 0.0;
    sums.clipped_low += lane_sum(below);
    sums.clipped_high += lane_sum(above_pos);
    sums.clipped_dual += lane_sum(above_neg);
  }
};

// The loss, KL and clip sums of one block.
template <typename M, typename acc_t>
void forward_block(const TokenMath<acc_t>& math, const Block<acc_t>& b, const ClipRegion<acc_t>& row_clip,
                   acc_t shared_ratio, RowSums& sums) {
  using Vec = Vectorized<acc_t>;
  const bool kl_in_loss = M::has_ref && math.beta != acc_t(0);
  BlockExps<acc_t> exps;
  math.template block_exps<M>(b, /*with_kl=*/true, exps);
  LaneSums<acc_t> lanes;
  ClipRegion<acc_t> c = row_clip;
  for (int64_t j = b.active_begin; j < b.active_end; j += kLanes<acc_t>) {
    const Vec w = Vec::loadu(b.weight + j);
    const Vec active = w != Vec(acc_t(0));
    math.template update_clip_region<M>(b, j, c);
    const Vec r = math.template ratio<M>(exps, j, shared_ratio);
    Vec loss = c.neg_adv * at::vec::minimum(at::vec::maximum(r, c.lo), c.hi);
    if constexpr (M::has_ref) {
      const Vec kl = math.kl(b, exps, j);
      if (kl_in_loss) {
        loss = loss + Vec(math.beta) * kl;
      }
      lanes.kl = lanes.kl + select(active, kl * w);
    }
    lanes.loss = lanes.loss + select(active, loss * w);
    lanes.tokens = lanes.tokens + w;
    lanes.below = lanes.below + ((r < c.lo) & w);
    const Vec above = r > c.hi;
    lanes.above_pos = lanes.above_pos + (above & c.positive & w);
    lanes.above_neg = lanes.above_neg + (above & c.negative & w);
  }
  lanes.add_to(sums, M::has_ref);
}

// Sequence IS (GSPO): adds the block's masked token count and masked log-ratio sum.
template <typename acc_t>
void log_ratio_block(const Block<acc_t>& b, double& tokens, double& weighted) {
  using Vec = Vectorized<acc_t>;
  Vec token_lanes(acc_t(0));
  Vec ratio_lanes(acc_t(0));
  for (int64_t j = b.active_begin; j < b.active_end; j += kLanes<acc_t>) {
    const Vec w = Vec::loadu(b.weight + j);
    token_lanes = token_lanes + w;
    if (b.old_logp != nullptr) {
      const Vec log_ratio = Vec::loadu(b.logp + j) - Vec::loadu(b.old_logp + j);
      ratio_lanes = ratio_lanes + select(w != Vec(acc_t(0)), log_ratio * w);
    }
  }
  tokens += lane_sum(token_lanes);
  weighted += lane_sum(ratio_lanes);
}

// Sequence IS backward: sum over unclipped masked-in tokens of w * -a.
template <typename M, typename acc_t>
double surrogate_block(const TokenMath<acc_t>& math, const Block<acc_t>& b, const ClipRegion<acc_t>& row_clip,
                       acc_t shared_ratio) {
  using Vec = Vectorized<acc_t>;
  Vec lanes(acc_t(0));
  ClipRegion<acc_t> c = row_clip;
  for (int64_t j = b.active_begin; j < b.active_end; j += kLanes<acc_t>) {
    const Vec w = Vec::loadu(b.weight + j);
    math.template update_clip_region<M>(b, j, c);
    const Vec term = Vec::blendv(c.neg_adv * w, Vec(acc_t(0)), math.clipped(Vec(shared_ratio), c));
    lanes = lanes + select(w != Vec(acc_t(0)), term);
  }
  return lane_sum(lanes);
}

// grad of g * sum_t w_t loss_t over one block, written to grad[0, b.padded).
// sequence_scale: with sequence IS, the surrogate gradient of every token.
template <typename M, typename acc_t>
void backward_block(const TokenMath<acc_t>& math, const Block<acc_t>& b, const ClipRegion<acc_t>& row_clip,
                    acc_t g, acc_t sequence_scale, acc_t* grad) {
  using Vec = Vectorized<acc_t>;
  const bool kl_in_loss = M::has_ref && math.beta != acc_t(0);
  BlockExps<acc_t> exps;
  math.template block_exps<M>(b, kl_in_loss, exps);
  std::fill(grad, grad + b.active_begin, acc_t(0));
  std::fill(grad + b.active_end, grad + b.padded, acc_t(0));
  ClipRegion<acc_t> c = row_clip;
  for (int64_t j = b.active_begin; j < b.active_end; j += kLanes<acc_t>) {
    const Vec w = Vec::loadu(b.weight + j);
    Vec d;
    if (!M::token_ratio && math.sequence_is) {
      d = Vec(sequence_scale);
    } else {
      math.template update_clip_region<M>(b, j, c);
      const Vec r = math.template ratio<M>(exps, j, acc_t(1));
      d = Vec::blendv(c.neg_adv * r, Vec(acc_t(0)), math.clipped(r, c));
    }
    if (kl_in_loss) {
      d = d + Vec(math.beta) * math.kl_grad(b, exps, j);
    }
    select(w != Vec(acc_t(0)), Vec(g) * w * d).store(grad + j);
  }
}

// ------------------------------------------------------------------ rows

template <typename scalar_t, typename M>
struct PolicyLossKernel {
  using acc_t = at::opmath_type<scalar_t>;

  RowReader<scalar_t> reader;
  TokenMath<acc_t> math;

  PolicyLossKernel(const LossInputs& in, const LossConfig& config) : reader(in), math(config) {}

  // The row's region when it has one advantage (unused with per-token advantages).
  ClipRegion<acc_t> row_clip(int64_t row) const {
    const acc_t adv = M::per_token_advantages ? acc_t(0) : reader.advantages[row];
    return math.clip_region(Vectorized<acc_t>(adv));
  }

  // Sequence IS: (masked token count, exp of the masked mean log-ratio) of the row.
  std::pair<double, acc_t> sequence_ratio(int64_t row) const {
    double tokens = 0;
    double weighted = 0;
    reader.for_each_block(row, reader.old_logp != nullptr, [&](const Block<acc_t>& b, int64_t) {
      log_ratio_block(b, tokens, weighted);
    });
    return {tokens, std::exp(static_cast<acc_t>(weighted / std::max(tokens, 1.0)))};
  }

  RowSums forward_row(int64_t row) const {
    const acc_t shared_ratio = math.sequence_is ? sequence_ratio(row).second : acc_t(1);
    const ClipRegion<acc_t> clip = row_clip(row);
    RowSums sums;
    reader.for_each_block(row, M::reads_logp, [&](const Block<acc_t>& b, int64_t) {
      forward_block<M>(math, b, clip, shared_ratio, sums);
    });
    return sums;
  }

  // Sequence IS: every token's surrogate depends on the row's ratio, whose derivative
  // with respect to logp_t is ratio * w_t / max(tokens, 1).
  acc_t sequence_scale(int64_t row, const ClipRegion<acc_t>& clip) const {
    const auto [tokens, shared_ratio] = sequence_ratio(row);
    double surrogate_sum = 0;
    reader.for_each_block(row, /*with_logp=*/false, [&](const Block<acc_t>& b, int64_t) {
      surrogate_sum += surrogate_block<M>(math, b, clip, shared_ratio);
    });
    return static_cast<acc_t>(shared_ratio * surrogate_sum / std::max(tokens, 1.0));
  }

  // grad of g * sum_t w_t loss_t with respect to logp[row, :], written to grad[row * cols ...].
  void backward_row(int64_t row, acc_t g, scalar_t* grad) const {
    const ClipRegion<acc_t> clip = row_clip(row);
    const acc_t scale = math.sequence_is ? sequence_scale(row, clip) : acc_t(0);
    acc_t buffer[kBlock];
    reader.for_each_block(row, M::reads_logp, [&](const Block<acc_t>& b, int64_t begin) {
      scalar_t* out = grad + row * reader.cols + begin;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (b.size == b.padded) {
          backward_block<M>(math, b, clip, g, scale, out);
          return;
        }
      }
      backward_block<M>(math, b, clip, g, scale, buffer);
      std::copy(buffer, buffer + b.size, out);  // rounds to scalar_t
    });
  }
};

// f(Mode<...>{}) for the inputs of this call.
template <typename F>
void with_mode(const LossInputs& in, const LossConfig& config, const F& f) {
  const auto flag = [](bool value, const auto& g) {
    return value ? g(std::true_type{}) : g(std::false_type{});
  };
  const bool token_ratio = in.old_logp.defined() && !config.sequence_is;
  flag(in.per_token_advantages, [&](auto per_token) {
    flag(in.ref_logp.defined(), [&](auto has_ref) {
      flag(token_ratio, [&](auto ratio) { f(Mode<decltype(per_token)::value, decltype(has_ref)::value,
                                                 decltype(ratio)::value>{}); });
    });
  });
}

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
  std::vector<RowSums> rows(in.rows);
  with_mode(in, config, [&](auto mode) {
    const PolicyLossKernel<scalar_t, decltype(mode)> kernel(in, config);
    at::parallel_for(0, in.rows, row_grain(in.cols), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        rows[b] = kernel.forward_row(b);
      }
    });
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
  const acc_t* weight = row_weight.const_data_ptr<acc_t>();
  const acc_t g = static_cast<acc_t>(grad_loss);
  scalar_t* out = grad.data_ptr<scalar_t>();
  with_mode(in, config, [&](auto mode) {
    const PolicyLossKernel<scalar_t, decltype(mode)> kernel(in, config);
    at::parallel_for(0, in.rows, row_grain(in.cols), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        kernel.backward_row(b, g * weight[b], out);
      }
    });
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
