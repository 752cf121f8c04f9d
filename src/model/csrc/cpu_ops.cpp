// Fused element-wise ops of a Llama-family layer for CPU float32, one pass over memory each:
//
//   rms_norm(out, x, weight, eps)                 out = x / rms(x) * weight
//   fused_add_rms_norm(x, residual, weight, eps)  residual += x; x = residual / rms * weight
//   rotary_embedding(positions, q, k, cos, sin)   neox-style rotation of q and k, in place
//   silu_and_mul(out, x)                          out = silu(x[:, :d]) * x[:, d:]
//   store_kv(k, v, kv_cache, slot_mapping)        the new K/V rows into their cache slots (a
//                                                 float16/bfloat16 cache: rounded to nearest even)
//   argmax_rows(out, x)                           out[r] = argmax(x[r]) (torch's: first max, NaN
//                                                 wins), the greedy sampler's pick
//
// Each replaces 3-12 torch ops (and their temporaries). Rows are split over the threads of
// cpu_pool.h (awake between the kernels of a step, unlike OpenMP's under the PASSIVE policy),
// and only when a task gets at least kMinWork elements: a decode step's 64 x 576 norm takes
// ~10 us on one core.
//
// Arithmetic follows the torch expressions they replace (model/layers.py, model/attention.py)
// in float32: sums of squares and dot products keep kLanes partial sums, so results differ
// from torch's by rounding only.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"
#include "cpu_math.h"
#include "cpu_pool.h"
#include "kv_types.h"

namespace {

constexpr int64_t kMinWork = 1 << 15;  // elements per thread task

int64_t row_grain(int64_t row_elems) {
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, row_elems));
}

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 &&
                  t.stride(1) == 1,
              op, ": ", name, " must be a CPU float32 [rows, features] tensor with contiguous rows");
}

inline float sum_of_squares(const float* x, int64_t n) { return cpu_math::lane_dot(x, x, n); }

// What both norms take: two row tensors of one shape and a [features] weight.
void check_norm_args(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                     const char* b_name, const at::Tensor& weight) {
  check_rows(a, op, a_name);
  check_rows(b, op, b_name);
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", a_name, " and ", b_name, " differ in shape");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat &&
                  weight.numel() == a.size(1),
              op, ": weight must be a contiguous float32 [features] tensor");
}

// out = weight * (x / rms(x)) for one row of n values (out may be x).
inline void norm_row(float* out, const float* x, const float* __restrict weight, int64_t n,
                     float eps) {
  const float inv = 1.f / std::sqrt(sum_of_squares(x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inv);
}

// x <- x * cos + rotate_half(x) * sin for every head of one token (cos and sin hold the two
// halves' equal angles, as the torch table does).
inline void rotate_heads(float* __restrict x, int64_t heads, int64_t dim,
                         const float* __restrict cos, const float* __restrict sin) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* __restrict a = x + h * dim;
    float* __restrict b = a + half;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = a[i], x2 = b[i];
      a[i] = x1 * cos[i] + (-x2) * sin[i];
      b[i] = x2 * cos[half + i] + x1 * sin[half + i];
    }
  }
}

typedef float argmax_vec __attribute__((vector_size(64)));
typedef int32_t argmax_ivec __attribute__((vector_size(64)));

// torch.argmax of one row: the first index of the maximum, or of the first NaN if any.
int64_t row_argmax(const float* __restrict x, int64_t n) {
  int64_t i = 0;
  float best_value = x[0];
  int64_t best_index = 0;
  bool nan_seen = false;
  if (n >= 16) {
    // 16 lanes, each keeping the first index of its own maximum (strict >), then the lanes'
    // maxima are merged, ties going to the smallest index.
    argmax_vec best;
    std::memcpy(&best, x, sizeof(best));
    argmax_ivec best_idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    argmax_ivec idx = best_idx;
    argmax_ivec nan_lanes = best != best;
    for (i = 16; i + 16 <= n; i += 16) {
      argmax_vec v;
      std::memcpy(&v, x + i, sizeof(v));
      idx += 16;
      const argmax_ivec greater = v > best;  // false for NaN
      nan_lanes |= v != v;
      best = greater ? v : best;
      best_idx = greater ? idx : best_idx;
    }
    for (int lane = 0; lane < 16; ++lane) nan_seen |= nan_lanes[lane] != 0;
    best_value = best[0];
    best_index = best_idx[0];
    for (int lane = 1; lane < 16; ++lane) {
      if (best[lane] > best_value || (best[lane] == best_value && best_idx[lane] < best_index)) {
        best_value = best[lane];
        best_index = best_idx[lane];
      }
    }
  } else {
    i = 1;
    nan_seen = x[0] != x[0];
  }
  for (; i < n; ++i) {  // the tail: later indices, so only a strictly greater value wins
    nan_seen |= x[i] != x[i];
    if (x[i] > best_value) {
      best_value = x[i];
      best_index = i;
    }
  }
  if (nan_seen) {
    for (int64_t j = 0; j < n; ++j) {
      if (x[j] != x[j]) return j;
    }
  }
  return best_index;
}

void argmax_rows(const at::Tensor& out, const at::Tensor& x) {
  check_rows(x, "argmax_rows", "x");
  TORCH_CHECK(x.size(1) > 0, "argmax_rows: x must have at least one column");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kLong && out.dim() == 1 &&
                  out.is_contiguous() && out.size(0) == x.size(0),
              "argmax_rows: out must be a contiguous CPU int64 [rows] tensor");
  const int64_t n = x.size(1), stride = x.stride(0);
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  cpu_pool::parallel_for(x.size(0), row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = row_argmax(xp + r * stride, n);
  });
}

// For the tests of cpu_pool.h: counts[i] += 1 for every item i of a parallel_for over
// counts.numel() items in chunks of at least `grain` (every item must come out exactly once).
void pool_claims(const at::Tensor& counts, int64_t grain) {
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kLong && counts.dim() == 1 &&
                  counts.is_contiguous(),
              "pool_claims: counts must be a contiguous CPU int64 vector");
  int64_t* c = counts.data_ptr<int64_t>();
  cpu_pool::parallel_for(counts.numel(), grain, [c](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) __atomic_fetch_add(c + i, 1, __ATOMIC_RELAXED);
  });
}

}  // namespace

void shardline_cpu::rms_norm(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                             double eps) {
  check_norm_args("rms_norm", x, "x", out, "out", weight);
  const int64_t rows = x.size(0), hidden = x.size(1);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const int64_t xs = x.stride(0), os = out.stride(0);
  cpu_pool::parallel_for(rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      norm_row(op + r * os, xp + r * xs, wp, hidden, static_cast<float>(eps));
    }
  });
}

void shardline_cpu::fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                       const at::Tensor& weight, double eps) {
  check_norm_args("fused_add_rms_norm", x, "x", residual, "residual", weight);
  const int64_t rows = x.size(0), hidden = x.size(1);
  float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const int64_t xs = x.stride(0), rs = residual.stride(0);
  cpu_pool::parallel_for(rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* __restrict xr = xp + r * xs;
      float* __restrict rr = rp + r * rs;
      for (int64_t i = 0; i < hidden; ++i) rr[i] = xr[i] + rr[i];
      norm_row(xr, rr, wp, hidden, static_cast<float>(eps));
    }
  });
}

void shardline_cpu::rotary_embedding(const at::Tensor& positions, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& cos_cache,
                                     const at::Tensor& sin_cache) {
  check_rows(q, "rotary_embedding", "q");
  check_rows(k, "rotary_embedding", "k");
  TORCH_CHECK(positions.device().is_cpu() && positions.scalar_type() == at::kLong &&
                  positions.dim() == 1 && positions.is_contiguous(),
              "rotary_embedding: positions must be a contiguous CPU int64 vector");
  for (const at::Tensor* t : {&cos_cache, &sin_cache}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->is_contiguous(),
                "rotary_embedding: cos and sin must be contiguous float32 [positions, head_dim]");
  }
  const int64_t tokens = positions.size(0), dim = cos_cache.size(1);
  TORCH_CHECK(q.size(0) == tokens && k.size(0) == tokens,
              "rotary_embedding: q, k and positions differ in tokens");
  TORCH_CHECK(dim % 2 == 0 && q.size(1) % dim == 0 && k.size(1) % dim == 0,
              "rotary_embedding: q and k must hold whole heads of the table's even head_dim");
  const int64_t q_heads = q.size(1) / dim, k_heads = k.size(1) / dim;
  const int64_t max_position = cos_cache.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_position, "rotary_embedding: position ", pos[t],
                " is outside the table of ", max_position);
  }
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  const float* cp = cos_cache.data_ptr<float>();
  const float* sp = sin_cache.data_ptr<float>();
  const int64_t qs = q.stride(0), ks = k.stride(0);
  cpu_pool::parallel_for(tokens, row_grain((q_heads + k_heads) * dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + pos[t] * dim;
      const float* s = sp + pos[t] * dim;
      rotate_heads(qp + t * qs, q_heads, dim, c, s);
      rotate_heads(kp + t * ks, k_heads, dim, c, s);
    }
  });
}

void shardline_cpu::silu_and_mul(const at::Tensor& out, const at::Tensor& x) {
  check_rows(x, "silu_and_mul", "x");
  check_rows(out, "silu_and_mul", "out");
  const int64_t rows = x.size(0), d = out.size(1);
  TORCH_CHECK(out.size(0) == rows && x.size(1) == 2 * d,
              "silu_and_mul: x must be [rows, 2d] for out [rows, d]");
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0), os = out.stride(0);
  cpu_pool::parallel_for(rows, row_grain(2 * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict gate = xp + r * xs;
      const float* __restrict up = gate + d;
      float* __restrict o = op + r * os;
      for (int64_t i = 0; i < d; ++i) {
        const float g = gate[i];
        o[i] = g / (1.f + cpu_math::exp_approx(-g)) * up[i];
      }
    }
  });
}

void shardline_cpu::store_kv(const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& kv_cache, const at::Tensor& slot_mapping) {
  check_rows(k, "store_kv", "k");
  check_rows(v, "store_kv", "v");
  TORCH_CHECK(kv_cache.device().is_cpu() && kv_cache.dim() == 5 && kv_cache.size(1) == 2 &&
                  kv_cache.is_contiguous(),
              "store_kv: kv_cache must be a contiguous CPU "
              "[num_blocks, 2, block_size, num_kv_heads, head_dim] tensor");
  TORCH_CHECK(slot_mapping.device().is_cpu() && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.dim() == 1 && slot_mapping.is_contiguous(),
              "store_kv: slot_mapping must be a contiguous CPU int64 vector");
  const int64_t tokens = slot_mapping.size(0);
  const int64_t block_size = kv_cache.size(2);
  const int64_t row = kv_cache.size(3) * kv_cache.size(4);
  TORCH_CHECK(k.size(0) == tokens && v.size(0) == tokens && k.size(1) == row && v.size(1) == row,
              "store_kv: k and v must be [tokens, num_kv_heads * head_dim] for the slots");
  const int64_t slots = kv_cache.size(0) * block_size;
  const int64_t* sp = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < slots, "store_kv: slot ", sp[t], " is outside the cache's ",
                slots);
  }
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t ks = k.stride(0), vs = v.stride(0);
  // A float32 cache takes the rows as they are; a 16-bit one rounded to nearest even (kv_types.h).
  kv_types::dispatch(kv_cache, "store_kv", [&](auto element) {
    using T = decltype(element);
    T* cache = kv_cache.data_ptr<T>();
    cpu_pool::parallel_for(tokens, row_grain(2 * row), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t block = sp[t] / block_size, offset = sp[t] % block_size;
        T* key = cache + ((block * 2) * block_size + offset) * row;
        kv_types::narrow(key, kp + t * ks, row);
        kv_types::narrow(key + block_size * row, vp + t * vs, row);
      }
    });
  });
}

TORCH_LIBRARY_FRAGMENT(shardline, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos_cache, "
        "Tensor sin_cache) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor slot_mapping) -> ()");
  m.def("argmax_rows(Tensor(a!) out, Tensor x) -> ()");
  m.def("pool_claims(Tensor(a!) counts, int grain) -> ()");
}

TORCH_LIBRARY_IMPL(shardline, CPU, m) {
  m.impl("rms_norm", &shardline_cpu::rms_norm);
  m.impl("fused_add_rms_norm", &shardline_cpu::fused_add_rms_norm);
  m.impl("rotary_embedding", &shardline_cpu::rotary_embedding);
  m.impl("silu_and_mul", &shardline_cpu::silu_and_mul);
  m.impl("store_kv", &shardline_cpu::store_kv);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("pool_claims", &pool_claims);
}
