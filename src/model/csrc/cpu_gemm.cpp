// Decode-sized float32 GEMMs on CPU: out[M, N] = x[M, K] @ W^T (+ bias), for the few rows
// (one per running sequence) that a decode step multiplies by every weight matrix.
//
// Three parts:
//
// * A register-blocked kernel over a prepacked weight: W [N, K] is stored as panels of kNR = 32
//   output columns, each panel K x 32 contiguous (model/packed_linear.py packs it once). A tile of
//   up to kMR rows keeps its kMR x 32 outputs in vector registers for the whole K loop, so each
//   weight value read is used kMR times, and the panel is read once per tile (from L2: a panel
//   is at most a few hundred KiB).
//
// * The same panels stored as integer blocks, for weights that are exactly w = d * q + m per 32
//   inputs of an output (what GGUF's Q4_0/Q4_1/Q8_0 dequantize to; packed_linear.py finds d, m
//   and q and checks every value): per 32 x 32 block of a panel, 32 d and 32 m (float32) and the
//   32 x 32 q (int8), 1,280 bytes for the 4,096 the float32 block takes. A thread turns a panel
//   back into float32 in its own buffer (d * q is exact in float32, so the values are the
//   weight's, bit for bit) and runs the same tiles on it: the results are those of the float32
//   panels, and a decode step, which streams every weight from memory, reads 3.2x fewer bytes.
//
// * The threads of cpu_pool.h, which stay awake between the GEMMs of one step; each walks its
//   own contiguous range of panels, chunk after chunk, the calling thread the first. The last
//   panel of a chunk prefetches the panel after it, so only a thread's first panel of a GEMM
//   comes cold from memory (with a prefetch only inside the chunk, 1 panel in 3 of a 576-wide
//   projection did).
//
// Vector code uses GCC vector extensions, so the same source compiles to AVX-512 (where the
// build's -march=native has it) or AVX2/NEON.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"
#include "cpu_pool.h"

namespace {

constexpr int kNR = 32;  // output columns per weight panel (two 16-float vectors)
#if defined(__AVX512F__)
constexpr int kMR = 12;  // rows per tile: 24 accumulators + 2 weight vectors of 32 registers
#else
constexpr int kMR = 4;  // 16 vector registers (AVX2 splits each 16-float vector in two)
#endif

typedef float vec16 __attribute__((vector_size(64)));
typedef float vec16u __attribute__((vector_size(64), aligned(4)));  // unaligned loads/stores

// 16 int8 as 16 floats (GCC 12 does __builtin_convertvector of int8 element by element).
inline vec16 int8_to_float(const int8_t* q) {
#if defined(__AVX512F__)
  return reinterpret_cast<vec16>(
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))));
#elif defined(__AVX2__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m256 halves[2] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)),
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)))};
  vec16 out;
  std::memcpy(&out, halves, sizeof(out));
  return out;
#else
  vec16 out;
  for (int i = 0; i < 16; ++i) out[i] = q[i];
  return out;
#endif
}

// The integer-block panels (packed_linear.py pack_blocks): per 32 rows of K, d[32] and m[32]
// (float32, one per output column), then q[32][32] (int8, k-major like the float32 panel).
constexpr int64_t kBlockK = 32;
constexpr int64_t kScaleBytes = 2 * kNR * sizeof(float);
constexpr int64_t kBlockBytes = kScaleBytes + kBlockK * kNR;
// An integer-block panel is turned back into float32 this many rows of K at a time (16 KiB).
constexpr int64_t kSliceK = 4 * kBlockK;

// A panel's blocks back to float32, K x 32 into `out`: w = d * q + m.
void dequantize_panel(const uint8_t* __restrict blocks, int64_t K, float* __restrict out) {
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK, blocks += kBlockBytes) {
    const float* scales = reinterpret_cast<const float*>(blocks);
    const vec16 d_lo = *reinterpret_cast<const vec16u*>(scales);
    const vec16 d_hi = *reinterpret_cast<const vec16u*>(scales + 16);
    const vec16 m_lo = *reinterpret_cast<const vec16u*>(scales + kNR);
    const vec16 m_hi = *reinterpret_cast<const vec16u*>(scales + kNR + 16);
    const int8_t* q = reinterpret_cast<const int8_t*>(blocks + kScaleBytes);
#pragma GCC unroll 4
    for (int64_t k = 0; k < kBlockK; ++k) {
      const vec16 q_lo = int8_to_float(q + k * kNR);
      const vec16 q_hi = int8_to_float(q + k * kNR + 16);
      float* row = out + (k0 + k) * kNR;
      *reinterpret_cast<vec16u*>(row) = d_lo * q_lo + m_lo;
      *reinterpret_cast<vec16u*>(row + 16) = d_hi * q_hi + m_hi;
    }
  }
}

// ncols <= kNR floats from `src` as two vectors, zero past ncols.
inline void load_row(const float* src, int ncols, vec16& lo, vec16& hi) {
  float padded[kNR] = {};
  std::memcpy(padded, src, sizeof(float) * ncols);
  std::memcpy(&lo, padded, sizeof(vec16));
  std::memcpy(&hi, padded + 16, sizeof(vec16));
}

// One tile: c[m, 0:ncols] = a[m, :] . panel[:, j] (+ bias) for m < M, j < ncols <= kNR; with
// `accumulate`, c[m, j] += instead (the sums of earlier K-slices, bias included, go on in the
// same order, so slicing K does not change a bit). With `next` set, it also prefetches
// 128-byte rows [pf_begin, pf_end) of that panel into L2, one row every `pf_every` steps of k:
// the tiles of a panel share the next panel's rows, so its weights stream in from memory
// evenly while this panel computes from cache.
template <int M>
void tile(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t K,
          float* __restrict c, int64_t ldc, int ncols, const float* __restrict bias,
          bool accumulate, const float* next, int64_t pf_row, int64_t pf_end, int64_t pf_every) {
  vec16 lo[M], hi[M];
  if (accumulate) {  // c holds the sums over the K before this slice: go on from them
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) load_row(c + m * ldc, ncols, lo[m], hi[m]);
  } else {
    vec16 bias_lo = {}, bias_hi = {};
    if (bias != nullptr) load_row(bias, ncols, bias_lo, bias_hi);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      lo[m] = bias_lo;
      hi[m] = bias_hi;
    }
  }
  // Steps of k go in runs, the prefetches for a run before it: no test in the inner loop. A run
  // is at least 8 steps (a shorter loop costs more to restart than a one-row tile's step).
  const int64_t group = (8 + pf_every - 1) / pf_every;  // rows prefetched per run
  for (int64_t k = 0; k < K;) {
    const int64_t run_end = std::min(K, k + pf_every * group);
    for (int64_t g = 0; next != nullptr && g < group && pf_row < pf_end; ++g, ++pf_row) {
      __builtin_prefetch(next + pf_row * kNR, 0, 2);
      __builtin_prefetch(next + pf_row * kNR + 16, 0, 2);
    }
    for (; k < run_end; ++k) {
      const vec16 b_lo = *reinterpret_cast<const vec16u*>(b + k * kNR);
      const vec16 b_hi = *reinterpret_cast<const vec16u*>(b + k * kNR + 16);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        const float value = a[m * lda + k];
        lo[m] += value * b_lo;
        hi[m] += value * b_hi;
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    float* row = c + m * ldc;
    if (ncols == kNR) {
      *reinterpret_cast<vec16u*>(row) = lo[m];
      *reinterpret_cast<vec16u*>(row + 16) = hi[m];
    } else {
      float padded[kNR];
      std::memcpy(padded, &lo[m], sizeof(vec16));
      std::memcpy(padded + 16, &hi[m], sizeof(vec16));
      std::memcpy(row, padded, sizeof(float) * ncols);
    }
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int,
                        const float*, bool, const float*, int64_t, int64_t, int64_t);

template <int... Ms>
constexpr std::array<TileFn, sizeof...(Ms)> make_tiles(std::integer_sequence<int, Ms...>) {
  return {&tile<Ms + 1>...};
}
constexpr auto kTiles = make_tiles(std::make_integer_sequence<int, kMR>{});

// Rows are taken kRowBlock at a time (16 tiles), so that a block of x stays in L2 while the
// weight panels stream past it: a prefill chunk of 2,048 rows reads the weights 11 times.
constexpr int64_t kRowBlock = 16 * kMR;

// Below this many multiply-adds a GEMM runs on the calling thread alone.
constexpr int64_t kMinParallelWork = 1 << 16;

// How a GEMM of M rows, K and N (or N's panels x 32) is handed to parallel_for: its work items,
// (row block, panel) pairs, and the grain.
struct WorkSplit {
  int64_t items, grain;
};
WorkSplit work_split(int64_t M, int64_t K, int64_t N) {
  const int64_t items = (M + kRowBlock - 1) / kRowBlock * ((N + kNR - 1) / kNR);
  return {items, M * K * N < kMinParallelWork ? items : 1};
}

// A packed weight, in either form: float32 panels [panels, K, 32] or integer blocks
// [panels, K / 32, kBlockBytes] (uint8).
struct Packed {
  const char* data = nullptr;
  int64_t K = 0, panels = 0;
  bool blocks = false, valid = false;

  int64_t panel_bytes() const {
    return blocks ? K / kBlockK * kBlockBytes : K * kNR * static_cast<int64_t>(sizeof(float));
  }
  const char* panel(int64_t p) const { return data + p * panel_bytes(); }
};

// The weight `t` holds, if it is packed in either form (else `valid` is false).
Packed packed_of(const at::Tensor& t) {
  if (!t.defined() || !t.device().is_cpu() || !t.is_contiguous() || t.dim() != 3) return {};
  const char* data = static_cast<const char*>(t.data_ptr());
  if (t.scalar_type() == at::kByte && t.size(2) == kBlockBytes) {
    return {data, t.size(1) * kBlockK, t.size(0), true, true};
  }
  if (t.scalar_type() == at::kFloat && t.size(2) == kNR) return {data, t.size(1), t.size(0), false, true};
  return {};
}

// What `packed` holds, or why it cannot be a packed weight for x's K and out's N.
Packed packed_view(const at::Tensor& packed, int64_t K, int64_t N, const char* op) {
  const Packed weight = packed_of(packed);
  TORCH_CHECK(weight.valid, op, ": packed must be a contiguous CPU float32 [panels, K, ", kNR,
              "] or uint8 [panels, K / ", kBlockK, ", ", kBlockBytes, "] tensor");
  TORCH_CHECK(weight.K == K, op, ": packed weight has K=", weight.K, ", x has ", K);
  TORCH_CHECK(weight.panels == (N + kNR - 1) / kNR, op, ": packed weight has ", weight.panels,
              " panels, out has ", N, " columns");
  return weight;
}

// The GEMM that will run after this one (the decoder-layer loop knows it): its weight, and how
// parallel_for will split its items.
struct NextGemm {
  Packed weight;
  int64_t items = 0, grain = 1;
};

// Prefetches go 128 bytes (a float32 panel's row, two cache lines) at a time.
constexpr int64_t kPrefetchBytes = kNR * sizeof(float);

struct Gemm {
  const float* a;
  int64_t lda, M, K;
  Packed weight;
  const float* bias;
  float* c;
  int64_t ldc, N;
  NextGemm then;

  int64_t panels() const { return weight.panels; }

  // Work items are (row block, panel) pairs, row block major: items [i0, i1).
  void run_items(int64_t i0, int64_t i1) const {
    const int64_t P = panels();
    // The last chunk of this thread's own region prefetches, instead of a panel past it, the
    // panel this thread starts the next GEMM with (else it would come cold from memory).
    const char* then_panel = nullptr;
    if (then.weight.valid && cpu_pool::chunk_place.last_of_own_region) {
      const int64_t first = cpu_pool::first_item_of_own_region(then.items, then.grain);
      then_panel = then.weight.panel(first % then.weight.panels);
    }
    for (int64_t i = i0; i < i1;) {
      const int64_t block = i / P, p0 = i % P, p1 = std::min(P, p0 + (i1 - i));
      const bool last = i + (p1 - p0) == i1;
      run(block * kRowBlock, std::min(M, (block + 1) * kRowBlock), p0, p1,
          last ? then_panel : nullptr);
      i += p1 - p0;
    }
  }

  // Rows [m0, m1) of panels [p0, p1). Rows go in tiles of near-equal size (64 rows: 6 tiles of
  // 10-11, not 5 of 12 and a 4). The last panel prefetches `then_panel` when given.
  void run(int64_t m0, int64_t m1, int64_t p0, int64_t p1, const char* then_panel) const {
    const int64_t rows_in = m1 - m0;
    const int64_t tiles = (rows_in + kMR - 1) / kMR;
    // A float32 panel is used whole; an integer-block one a K-slice at a time, turned back into
    // float32 in a buffer that stays in L1, and the tiles carry their sums across the slices.
    const int64_t slice = weight.blocks ? kSliceK : K;
    const int64_t calls = (K + slice - 1) / slice * tiles;  // tile calls per panel
    alignas(64) float unpacked[kSliceK * kNR];
    for (int64_t p = p0; p < p1; ++p) {
      const char* source = weight.panel(p);
      const int ncols = static_cast<int>(std::min<int64_t>(kNR, N - p * kNR));
      const float* panel_bias = bias != nullptr ? bias + p * kNR : nullptr;
      // Past the chunk too: the pool gives this thread the next chunk of its region next.
      const char* next = p + 1 < panels() ? source + weight.panel_bytes() : nullptr;
      int64_t next_rows = weight.panel_bytes() / kPrefetchBytes;  // spread over the tile calls
      if (p + 1 == p1 && then_panel != nullptr) {
        next = then_panel;
        next_rows = then.weight.panel_bytes() / kPrefetchBytes;
      }
      const int64_t every = std::max<int64_t>(1, K * tiles / next_rows);
      int64_t call = 0;
      for (int64_t k0 = 0; k0 < K; k0 += slice) {
        const int64_t k_len = std::min(slice, K - k0);
        const float* b = reinterpret_cast<const float*>(source) + k0 * kNR;
        if (weight.blocks) {
          dequantize_panel(reinterpret_cast<const uint8_t*>(source) + k0 / kBlockK * kBlockBytes,
                           k_len, unpacked);
          b = unpacked;
        }
        int64_t m = m0;
        for (int64_t t = 0; t < tiles; ++t, ++call) {
          const int64_t rows = (m1 - m) / (tiles - t);  // what is left, spread over what is left
          kTiles[rows - 1](a + m * lda + k0, lda, b, k_len, c + m * ldc + p * kNR, ldc, ncols,
                           panel_bias, k0 > 0, reinterpret_cast<const float*>(next),
                           next_rows * call / calls, next_rows * (call + 1) / calls, every);
          m += rows;
        }
      }
    }
  }
};

}  // namespace

// out [M, N] = x [M, K] @ W^T + bias, W given as its panels; `then`: the packed weight of the
// GEMM that follows (same rows), whose first panels are prefetched.
void shardline_cpu::packed_gemm(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                                const std::optional<at::Tensor>& bias, const at::Tensor* then) {
  const char* op = "packed_gemm";
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&out), &x}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 &&
                    t->stride(1) == 1,
                op, ": x and out must be CPU float32 [rows, features] with contiguous rows");
  }
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  TORCH_CHECK(out.size(0) == M, op, ": out has ", out.size(0), " rows, x has ", M);
  const Packed weight = packed_view(packed, K, N, op);
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == N,
                op, ": bias must be a contiguous float32 [", N, "] tensor");
    bias_ptr = bias->data_ptr<float>();
  }
  if (M == 0 || N == 0) return;
  NextGemm next;
  if (then != nullptr) next.weight = packed_of(*then);
  if (next.weight.valid) {
    // Its padded width stands for its N: the same panels, so the same items.
    const WorkSplit split = work_split(M, next.weight.K, next.weight.panels * kNR);
    next.items = split.items;
    next.grain = split.grain;
  }
  const Gemm g{x.data_ptr<float>(), x.stride(0), M, K, weight, bias_ptr,
               out.data_ptr<float>(), out.stride(0), N, next};
  const WorkSplit split = work_split(M, K, N);
  cpu_pool::parallel_for(split.items, split.grain,
                         [&g](int64_t begin, int64_t end) { g.run_items(begin, end); });
}

int64_t shardline_cpu::packed_in_features(const at::Tensor& packed) {
  const Packed weight = packed_of(packed);
  TORCH_CHECK(weight.valid, "not a packed weight (model/packed_linear.py)");
  return weight.K;
}

TORCH_LIBRARY_FRAGMENT(shardline, m) {
  m.def("packed_gemm(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(shardline, CPU, m) {
  m.impl("packed_gemm", [](at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                           const std::optional<at::Tensor>& bias) {
    shardline_cpu::packed_gemm(out, x, packed, bias);
  });
}
