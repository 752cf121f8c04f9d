// Fused paged decode attention for CPU float32: one query token per sequence attends over its
// context read straight out of the paged KV cache through its block table (no gather copy).
//
// kv_cache     [num_blocks, 2, block_size, num_kv_heads, head_dim]  (K at [b, 0], V at [b, 1]),
//              float32, float16 or bfloat16 (kv_types.h): 16-bit K/V are widened to float32 as
//              they are read (in registers on AVX-512; a block at a time into an L1 buffer on
//              the portable path) and everything after is float32, as with a float32 cache
// query, out   [num_tokens, num_heads, head_dim]  (rows may be strided; head_dim contiguous)
// block_tables [num_seqs, max_blocks] int32
// seq_lens     [num_seqs] int32, tokens to attend (the new token included)
// query_start_loc [num_seqs + 1] int32: sequence i's query row is query_start_loc[i]
// seq_ids      optional int64 [n]: attend only these sequences (default: every sequence)
//
// Work is split over sequences; each item walks its sequence's blocks once, computing q.k for
// every query head (the num_heads / num_kv_heads that share a kv head read its K and V rows),
// with a block-wise online softmax (running max and sum in float32) and a float32 V accumulator.
//
// The loops are written so that gcc -O3 vectorizes them without -ffast-math: dot products keep
// kLanes independent partial sums, exp is a branch-free polynomial over a block of scores.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_math.h"
#include "cpu_pool.h"
#include "kv_types.h"

namespace {

// Elements of K/V a task reads at least before the work is split over threads.
constexpr int64_t kMinTaskWork = 1 << 16;


// acc += sum over t < count of p[t] * v_t, where v_t = values + t * stride.
template <int64_t kDim>
inline void accumulate(float* __restrict acc, const float* __restrict p,
                       const float* __restrict values, int64_t count, int64_t stride,
                       int64_t dim) {
  if constexpr (kDim > 0) dim = kDim;
  for (int64_t t = 0; t < count; ++t) {
    const float pt = p[t];
    const float* __restrict v = values + t * stride;
    for (int64_t d = 0; d < dim; ++d) acc[d] += pt * v[d];
  }
}

// exp(x) for x <= 0 (scores minus their running max), element-wise over n values in place.
inline void exp_inplace(float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = cpu_math::exp_approx(x[i]);
}

// Everything an item needs, read-only and shared by the threads. T: the cache's element type.
template <typename T>
struct Problem {
  const T* cache;
  const float* query;
  float* out;
  const int32_t* tables;
  const int32_t* lens;
  const int32_t* starts;
  const int64_t* seq_ids;  // nullptr: item / num_kv_heads is the sequence
  int64_t num_blocks, block_size, num_kv_heads, head_dim, group, max_blocks;
  int64_t q_row, q_head, o_row, o_head;
  float scale;
};

// The cache block holding token `first` of a sequence whose block table is `table`.
template <typename T>
inline int64_t block_at(const Problem<T>& p, const int32_t* table, int64_t first) {
  const int64_t block = table[first / p.block_size];
  TORCH_CHECK(block >= 0 && block < p.num_blocks,
              "paged_decode_attention: block id ", block, " out of range");
  return block;
}

// The block a sequence-per-item walk reads after the one holding token `first` (of `len`, item
// `item` of [.., end)): the sequence's next block, else the next item's first; nullptr if none.
template <typename T>
inline const char* block_after(const Problem<T>& p, const int32_t* table, int64_t first,
                               int64_t len, int64_t item, int64_t end) {
  const int64_t block_elems = 2 * p.block_size * p.num_kv_heads * p.head_dim;  // K and V
  const T* block = nullptr;
  if (first + p.block_size < len) {
    block = p.cache + block_at(p, table, first + p.block_size) * block_elems;
  } else if (item + 1 < end) {
    const int64_t next_seq = p.seq_ids ? p.seq_ids[item + 1] : item + 1;
    if (p.lens[next_seq] <= 0) return nullptr;
    block = p.cache + block_at(p, p.tables + next_seq * p.max_blocks, 0) * block_elems;
  }
  return reinterpret_cast<const char*>(block);
}

// Share `part` of `parts` of the `lines` 64-byte cache lines from `base` (nullptr: none), into
// L2 (prefetcht1): spread over the parts of a computation, requests go out at its pace.
inline void prefetch_share(const char* base, int64_t lines, int64_t part, int64_t parts) {
  if (base == nullptr) return;
  for (int64_t line = lines * part / parts; line < lines * (part + 1) / parts; ++line) {
    __builtin_prefetch(base + 64 * line, 0, 2);
  }
}

// Online-softmax state of `heads` query heads of one item: float32 V accumulators of `dim`,
// running maxima and sums.
struct OnlineSoftmax {
  std::vector<float> acc, running_max, running_sum;
  OnlineSoftmax(int64_t heads, int64_t dim) : acc(heads * dim), running_max(heads), running_sum(heads) {}
  void reset() {
    std::fill(acc.begin(), acc.end(), 0.f);
    std::fill(running_max.begin(), running_max.end(), -std::numeric_limits<float>::infinity());
    std::fill(running_sum.begin(), running_sum.end(), 0.f);
  }
};

// Sequences [begin, end): block-wise online softmax over each sequence's blocks for every query
// head, kv head by kv head within a block (a block's K, then V, is one contiguous run, read
// whole while it is in cache, instead of a third of each token row per item). The next block,
// which lies anywhere in the cache where the hardware prefetcher cannot follow, is prefetched
// while this one computes, a head's share of its lines at each head. Per head, the operations
// and their order are those of one (sequence, kv head) item at a time. A 16-bit cache's block
// is widened into an L1 buffer first (kv_types::widen), then read as a float32 block is.
template <int64_t kDim, typename T>
void attend_items(const Problem<T>& p, int64_t begin, int64_t end) {
  const int64_t dim = kDim > 0 ? kDim : p.head_dim;
  const int64_t group = p.group, block_size = p.block_size, kv_heads = p.num_kv_heads;
  const int64_t heads = kv_heads * group;
  const int64_t token_stride = kv_heads * dim;  // between tokens of one block
  const int64_t kv_stride = block_size * token_stride;  // K half -> V half of a block
  std::vector<float> scores(block_size);
  std::vector<float> widened(std::is_same_v<T, float> ? 0 : 2 * kv_stride);
  OnlineSoftmax state(heads, dim);
  std::vector<float>& acc = state.acc;
  std::vector<float>& running_max = state.running_max;
  std::vector<float>& running_sum = state.running_sum;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t seq = p.seq_ids ? p.seq_ids[item] : item;
    const int64_t len = p.lens[seq];
    const int64_t row = p.starts[seq];
    const float* q = p.query + row * p.q_row;
    const int32_t* table = p.tables + seq * p.max_blocks;
    state.reset();
    for (int64_t first = 0; first < len; first += block_size) {
      const int64_t block = block_at(p, table, first);
      const int64_t count = std::min(block_size, len - first);
      const char* ahead = block_after(p, table, first, len, item, end);
      const int64_t ahead_lines = 2 * kv_stride * static_cast<int64_t>(sizeof(T)) / 64;  // next K and V
      const float* block_data;
      if constexpr (std::is_same_v<T, float>) {
        block_data = p.cache + block * 2 * kv_stride;
      } else {
        kv_types::widen(widened.data(), p.cache + block * 2 * kv_stride, 2 * kv_stride);
        block_data = widened.data();
      }
      for (int64_t kv_head = 0; kv_head < kv_heads; ++kv_head) {
        const float* keys = block_data + kv_head * dim;
        const float* values = keys + kv_stride;
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kv_head * group + g;
          prefetch_share(ahead, ahead_lines, h, heads);
          const float* qg = q + h * p.q_head;
          float* s = scores.data();
          for (int64_t t = 0; t < count; ++t) {
            s[t] = cpu_math::lane_dot<kDim>(qg, keys + t * token_stride, dim) * p.scale;
          }
          float block_max = s[0];
          for (int64_t t = 1; t < count; ++t) block_max = std::max(block_max, s[t]);
          const float new_max = std::max(running_max[h], block_max);
          for (int64_t t = 0; t < count; ++t) s[t] -= new_max;
          exp_inplace(s, count);
          float block_sum = 0.f;
          for (int64_t t = 0; t < count; ++t) block_sum += s[t];
          float* a = acc.data() + h * dim;
          if (new_max > running_max[h]) {
            const float correction = std::exp(running_max[h] - new_max);
            running_sum[h] *= correction;
            for (int64_t d = 0; d < dim; ++d) a[d] *= correction;
            running_max[h] = new_max;
          }
          running_sum[h] += block_sum;
          accumulate<kDim>(a, s, values, count, token_stride, dim);
        }
      }
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* o = p.out + row * p.o_row + h * p.o_head;
      const float inv = 1.f / running_sum[h];
      const float* a = acc.data() + h * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] = a[d] * inv;
    }
  }
}

#if defined(__AVX512F__)
// The online-softmax update of N query heads that share one kv head, for one chunk of up to
// 16 tokens (their scores at s[i * 16 + t], overwritten with the probabilities; their V sums
// at a[i * kDim]), then the chunk's V rows added into those sums. Each V row is loaded once for
// the N heads, and their N x kVecs sums are independent chains: one head's kVecs chains would
// wait on the FMA latency at every token. Per head, the same operations in the same order.
// `ahead` (or nullptr): `ahead_lines` cache lines to prefetch, spread over the tokens.
template <int64_t kDim, int N, typename T>
void softmax_values(float* s, float* a, float* running_max, float* running_sum,
                    const T* v_head, int64_t count, int64_t token_stride, __mmask16 live,
                    __m512 scale, const char* ahead, int64_t ahead_lines) {
  constexpr int64_t kVecs = kDim / 16;
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 av[N][kVecs];
  for (int i = 0; i < N; ++i) {
    float* si = s + i * 16;
    const __m512 sv = _mm512_mask_mul_ps(minus_inf, live, _mm512_maskz_loadu_ps(live, si), scale);
    const float new_max = std::max(running_max[i], _mm512_reduce_max_ps(sv));
    const __m512 pv =
        _mm512_maskz_mov_ps(live, cpu_math::exp512(_mm512_sub_ps(sv, _mm512_set1_ps(new_max))));
    _mm512_storeu_ps(si, pv);
    for (int64_t c = 0; c < kVecs; ++c) av[i][c] = _mm512_loadu_ps(a + i * kDim + 16 * c);
    if (new_max > running_max[i]) {
      const float correction = std::exp(running_max[i] - new_max);
      running_sum[i] *= correction;
      const __m512 corr = _mm512_set1_ps(correction);
      for (int64_t c = 0; c < kVecs; ++c) av[i][c] = _mm512_mul_ps(av[i][c], corr);
      running_max[i] = new_max;
    }
    running_sum[i] += _mm512_reduce_add_ps(pv);
  }
  for (int64_t t = 0; t < count; ++t) {
    prefetch_share(ahead, ahead_lines, t, count);
    const T* v = v_head + t * token_stride;
    __m512 row[kVecs];
    for (int64_t c = 0; c < kVecs; ++c) row[c] = kv_types::load16(v + 16 * c);
    for (int i = 0; i < N; ++i) {
      const __m512 pt = _mm512_set1_ps(s[i * 16 + t]);
      for (int64_t c = 0; c < kVecs; ++c) av[i][c] = _mm512_fmadd_ps(pt, row[c], av[i][c]);
    }
  }
  for (int i = 0; i < N; ++i) {
    for (int64_t c = 0; c < kVecs; ++c) _mm512_storeu_ps(a + i * kDim + 16 * c, av[i][c]);
  }
}

// The same computation with AVX-512 for head_dim 64 and 128 (kDim / 16 vectors per row), one
// sequence per item and 16 tokens at a time. Reading every kv head of a token together walks a
// block's K (then V) as one contiguous run, which the hardware prefetcher streams. Each key
// vector is loaded once for the query heads that share it, a dot product ends in one tree
// reduction, a chunk's scores sit in one vector for the online softmax (max, exp and sum without
// scalar loops), and V rows are accumulated in vector registers.
template <int64_t kDim, typename T>
void attend_seqs_avx512(const Problem<T>& p, int64_t begin, int64_t end) {
  constexpr int64_t kVecs = kDim / 16;
  constexpr int64_t kPass = std::max<int64_t>(1, 12 / kVecs);  // query heads per V pass
  const int64_t group = p.group, block_size = p.block_size, kv_heads = p.num_kv_heads;
  const int64_t heads = kv_heads * group;
  const int64_t token_stride = kv_heads * kDim;
  const int64_t kv_stride = block_size * token_stride;
  const __m512 scale = _mm512_set1_ps(p.scale);
  std::vector<float> scores(heads * 16);
  OnlineSoftmax state(heads, kDim);
  std::vector<float>& acc = state.acc;
  std::vector<float>& running_max = state.running_max;
  std::vector<float>& running_sum = state.running_sum;
  std::vector<__m512> q_vecs(heads * kVecs);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t seq = p.seq_ids ? p.seq_ids[item] : item;
    const int64_t len = p.lens[seq];
    const int64_t row = p.starts[seq];
    const int32_t* table = p.tables + seq * p.max_blocks;
    for (int64_t h = 0; h < heads; ++h) {
      const float* q = p.query + row * p.q_row + h * p.q_head;
      for (int64_t c = 0; c < kVecs; ++c) q_vecs[h * kVecs + c] = _mm512_loadu_ps(q + 16 * c);
    }
    state.reset();
    for (int64_t first = 0; first < len; first += block_size) {
      const int64_t block = block_at(p, table, first);
      const int64_t in_block = std::min(block_size, len - first);
      // The next block (or the next sequence's first) lies anywhere in the cache, where the
      // hardware prefetcher cannot follow: ask for its K while this block's K is read and its V
      // while this block's V is, a token's share of the lines at each token, so that requests
      // go out at the pace lines are used. (All at once cost more than it saved when the cache
      // sat in L3; the whole next block during the K pass alone left the V pass without
      // requests in flight: 9-10% slower on one core.)
      const char* ahead = block_after(p, table, first, len, item, end);
      const int64_t half_bytes = kv_stride * static_cast<int64_t>(sizeof(T));
      const char* ahead_values = ahead != nullptr ? ahead + half_bytes : nullptr;
      const int64_t half_lines = half_bytes / 64;  // the lines of a block's K (or V)
      const int64_t passes = kv_heads * ((group + kPass - 1) / kPass);  // V passes per chunk
      for (int64_t chunk = 0; chunk < in_block; chunk += 16) {
        const int64_t count = std::min<int64_t>(16, in_block - chunk);
        const __mmask16 live = static_cast<__mmask16>((1u << count) - 1u);
        const T* keys = p.cache + block * 2 * kv_stride + chunk * token_stride;
        const T* values = keys + kv_stride;
        for (int64_t t = 0; t < count; ++t) {
          prefetch_share(ahead, half_lines, chunk + t, in_block);  // the next block's K
          for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
            const T* k = keys + t * token_stride + kvh * kDim;
            __m512 kv[kVecs];
            for (int64_t c = 0; c < kVecs; ++c) kv[c] = kv_types::load16(k + 16 * c);
            for (int64_t g = 0; g < group; ++g) {
              const int64_t h = kvh * group + g;
              const __m512* qh = q_vecs.data() + h * kVecs;
              __m512 sum = _mm512_mul_ps(qh[0], kv[0]);
              for (int64_t c = 1; c < kVecs; ++c) sum = _mm512_fmadd_ps(qh[c], kv[c], sum);
              scores[h * 16 + t] = _mm512_reduce_add_ps(sum);
            }
          }
        }
        // The query heads that share a kv head, kPass at a time (see softmax_values). This
        // chunk's share of the next block's V lines, split over the passes.
        const int64_t chunk_lines = half_lines * (chunk + count) / in_block - half_lines * chunk / in_block;
        const char* chunk_ahead =
            ahead_values != nullptr ? ahead_values + 64 * (half_lines * chunk / in_block) : nullptr;
        int64_t pass_index = 0;
        for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
          for (int64_t g0 = 0; g0 < group; g0 += kPass, ++pass_index) {
            const int64_t h = kvh * group + g0;
            const int n = static_cast<int>(std::min<int64_t>(kPass, group - g0));
            auto* pass = n == 3 ? &softmax_values<kDim, 3, T>
                         : n == 2 ? &softmax_values<kDim, 2, T> : &softmax_values<kDim, 1, T>;
            const int64_t line0 = chunk_lines * pass_index / passes;
            pass(scores.data() + h * 16, acc.data() + h * kDim, running_max.data() + h,
                 running_sum.data() + h, values + kvh * kDim, count, token_stride, live, scale,
                 chunk_ahead != nullptr ? chunk_ahead + 64 * line0 : nullptr,
                 chunk_lines * (pass_index + 1) / passes - line0);
          }
        }
      }
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* o = p.out + row * p.o_row + h * p.o_head;
      const __m512 inv = _mm512_set1_ps(1.f / running_sum[h]);
      const float* a = acc.data() + h * kDim;
      for (int64_t c = 0; c < kVecs; ++c) {
        _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(a + 16 * c), inv));
      }
    }
  }
}
#endif

}  // namespace

void shardline_cpu::paged_decode_attention(const at::Tensor& out, const at::Tensor& query,
                                           const at::Tensor& kv_cache,
                                           const at::Tensor& block_tables,
                                           const at::Tensor& seq_lens,
                                           const at::Tensor& query_start_loc,
                                           const std::optional<at::Tensor>& seq_ids,
                                           double scale) {
  TORCH_CHECK(kv_cache.device().is_cpu(), "paged_decode_attention: kv_cache must be a CPU tensor");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(1) == 2 && kv_cache.is_contiguous(),
              "paged_decode_attention: kv_cache must be contiguous "
              "[num_blocks, 2, block_size, num_kv_heads, head_dim]");
  const int64_t num_blocks = kv_cache.size(0);
  const int64_t block_size = kv_cache.size(2);
  const int64_t num_kv_heads = kv_cache.size(3);
  const int64_t head_dim = kv_cache.size(4);
  for (const at::Tensor* t : {&out, &query}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 &&
                    t->size(2) == head_dim && t->stride(2) == 1,
                "paged_decode_attention: query and out must be CPU float32 "
                "[num_tokens, num_heads, head_dim] with a contiguous last dimension");
  }
  TORCH_CHECK(out.sizes() == query.sizes(), "paged_decode_attention: out and query differ in shape");
  const int64_t num_heads = query.size(1);
  TORCH_CHECK(num_heads % num_kv_heads == 0,
              "paged_decode_attention: num_heads is not a multiple of num_kv_heads");
  const int64_t group = num_heads / num_kv_heads;
  for (const at::Tensor* t : {&block_tables, &seq_lens, &query_start_loc}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kInt && t->is_contiguous(),
                "paged_decode_attention: block_tables, seq_lens and query_start_loc must be "
                "contiguous CPU int32 tensors");
  }
  TORCH_CHECK(block_tables.dim() == 2, "paged_decode_attention: block_tables must be 2-D");
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(block_tables.size(0) == num_seqs && query_start_loc.size(0) == num_seqs + 1,
              "paged_decode_attention: block_tables, seq_lens and query_start_loc disagree on "
              "the number of sequences");
  const int64_t max_blocks = block_tables.size(1);

  at::Tensor ids;
  if (seq_ids.has_value()) {
    ids = seq_ids->to(at::kLong).contiguous();
  }
  const int64_t n = seq_ids.has_value() ? ids.size(0) : num_seqs;
  const int64_t* id_ptr = seq_ids.has_value() ? ids.data_ptr<int64_t>() : nullptr;
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int64_t num_tokens = query.size(0);
  int64_t longest = 1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t seq = id_ptr ? id_ptr[i] : i;
    TORCH_CHECK(seq >= 0 && seq < num_seqs, "paged_decode_attention: seq_ids out of range");
    const int64_t len = lens[seq];
    TORCH_CHECK(len > 0 && len <= max_blocks * block_size,
                "paged_decode_attention: seq_len ", len, " does not fit its block table");
    TORCH_CHECK(starts[seq] >= 0 && starts[seq] < num_tokens,
                "paged_decode_attention: query row out of range");
    longest = std::max(longest, len);
  }
  // Work goes to the threads of cpu_pool.h, awake between the kernels of a step (waking a
  // sleeping OpenMP thread costs ~100 us on a VM, more than a decode x8 layer at context 100
  // takes on one core); tasks still get enough work to be worth the hand-off.
  const int64_t seq_work = longest * num_heads * head_dim;  // one item per sequence, either path
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, seq_work));
  kv_types::dispatch(kv_cache, "paged_decode_attention", [&](auto element) {
    using T = decltype(element);
    const Problem<T> problem{kv_cache.data_ptr<T>(), query.data_ptr<float>(), out.data_ptr<float>(),
                             block_tables.data_ptr<int32_t>(), lens, starts, id_ptr,
                             num_blocks, block_size, num_kv_heads, head_dim, group, max_blocks,
                             query.stride(0), query.stride(1), out.stride(0), out.stride(1),
                             static_cast<float>(scale)};
    cpu_pool::parallel_for(n, grain, [&](int64_t begin, int64_t end) {
#if defined(__AVX512F__)
      if (head_dim == 64) return attend_seqs_avx512<64>(problem, begin, end);
      if (head_dim == 128) return attend_seqs_avx512<128>(problem, begin, end);
#endif
      switch (head_dim) {  // the common sizes unrolled; any other at run time
        case 64: attend_items<64>(problem, begin, end); break;
        case 128: attend_items<128>(problem, begin, end); break;
        default: attend_items<0>(problem, begin, end);
      }
    });
  });
}

TORCH_LIBRARY(shardline, m) {
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, "
      "Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, Tensor? seq_ids, "
      "float scale) -> ()");
}

TORCH_LIBRARY_IMPL(shardline, CPU, m) {
  m.impl("paged_decode_attention", &shardline_cpu::paged_decode_attention);
}
