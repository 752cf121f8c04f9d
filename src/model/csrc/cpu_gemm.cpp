// Decode-sized float32 GEMMs on CPU: out[M, N] = x[M, K] @ W^T (+ bias), for the few rows
// (one per running sequence) that a decode step multiplies by every weight matrix.
//
// Two parts:
//
// * A register-blocked kernel over a prepacked weight: W [N, K] is stored as panels of kNR = 32
//   output columns, each panel K x 32 contiguous (model/packed_linear.py packs it once). A tile of
//   up to kMR rows keeps its kMR x 32 outputs in vector registers for the whole K loop, so each
//   weight value read is used kMR times, and the panel is read once per tile (from L2: a panel
//   is at most a few hundred KiB).
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

// One tile: c[m, 0:ncols] = a[m, :] . panel[:, j] (+ bias) for m < M, j < ncols <= kNR.
// With `next` set, it also prefetches rows [pf_begin, pf_end) of that panel (same size) into
// L2, one row every `pf_every` steps of k: the tiles of a panel share the next panel's rows,
// so its weights stream in from memory evenly while this panel computes from cache.
template <int M>
void tile(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t K,
          float* __restrict c, int64_t ldc, int ncols, const float* __restrict bias,
          const float* next, int64_t pf_row, int64_t pf_end, int64_t pf_every) {
  vec16 lo[M], hi[M];
  vec16 bias_lo = {}, bias_hi = {};
  if (bias != nullptr) {
    float padded[kNR] = {};
    std::memcpy(padded, bias, sizeof(float) * ncols);
    std::memcpy(&bias_lo, padded, sizeof(vec16));
    std::memcpy(&bias_hi, padded + 16, sizeof(vec16));
  }
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    lo[m] = bias_lo;
    hi[m] = bias_hi;
  }
  int64_t countdown = 1;
  for (int64_t k = 0; k < K; ++k) {
    const vec16 b_lo = *reinterpret_cast<const vec16u*>(b + k * kNR);
    const vec16 b_hi = *reinterpret_cast<const vec16u*>(b + k * kNR + 16);
    if (next != nullptr && --countdown == 0) {
      countdown = pf_every;
      if (pf_row < pf_end) {
        __builtin_prefetch(next + pf_row * kNR, 0, 2);
        __builtin_prefetch(next + pf_row * kNR + 16, 0, 2);
        ++pf_row;
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      const float value = a[m * lda + k];
      lo[m] += value * b_lo;
      hi[m] += value * b_hi;
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
                        const float*, const float*, int64_t, int64_t, int64_t);

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

// The GEMM that will run after this one (the decoder-layer loop knows it): its panels, K, and
// how parallel_for will split its items.
struct NextGemm {
  const float* packed = nullptr;
  int64_t K = 0, panels = 0, items = 0, grain = 1;
};

struct Gemm {
  const float* a;
  int64_t lda, M, K;
  const float* packed;
  const float* bias;
  float* c;
  int64_t ldc, N;
  NextGemm then;

  int64_t panels() const { return (N + kNR - 1) / kNR; }

  // Work items are (row block, panel) pairs, row block major: items [i0, i1).
  void run_items(int64_t i0, int64_t i1) const {
    const int64_t P = panels();
    // The last chunk of this thread's own region prefetches, instead of a panel past it, the
    // panel this thread starts the next GEMM with (else it would come cold from memory).
    const float* then_panel = nullptr;
    if (then.packed != nullptr && cpu_pool::chunk_place.last_of_own_region) {
      const int64_t first = cpu_pool::first_item_of_own_region(then.items, then.grain);
      then_panel = then.packed + (first % then.panels) * then.K * kNR;
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
  void run(int64_t m0, int64_t m1, int64_t p0, int64_t p1, const float* then_panel) const {
    const int64_t rows_in = m1 - m0;
    const int64_t tiles = (rows_in + kMR - 1) / kMR;
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = packed + p * K * kNR;
      const int ncols = static_cast<int>(std::min<int64_t>(kNR, N - p * kNR));
      const float* panel_bias = bias != nullptr ? bias + p * kNR : nullptr;
      // Past the chunk too: the pool gives this thread the next chunk of its region next.
      const float* next = p + 1 < panels() ? panel + K * kNR : nullptr;
      int64_t next_rows = K;  // the rows of `next`, spread over this panel's tiles
      if (p + 1 == p1 && then_panel != nullptr) {
        next = then_panel;
        next_rows = then.K;
      }
      const int64_t every = std::max<int64_t>(1, K * tiles / next_rows);
      int64_t m = m0;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t rows = (m1 - m) / (tiles - t);  // what is left, spread over what is left
        kTiles[rows - 1](a + m * lda, lda, panel, K, c + m * ldc + p * kNR, ldc, ncols,
                         panel_bias, next, next_rows * t / tiles, next_rows * (t + 1) / tiles,
                         every);
        m += rows;
      }
    }
  }
};


void check_packed(const at::Tensor& packed, int64_t K, int64_t N, const char* op) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kFloat &&
                  packed.is_contiguous() && packed.dim() == 3 && packed.size(2) == kNR,
              op, ": packed must be a contiguous CPU float32 [panels, K, ", kNR, "] tensor");
  TORCH_CHECK(packed.size(1) == K, op, ": packed weight has K=", packed.size(1), ", x has ", K);
  TORCH_CHECK(packed.size(0) == (N + kNR - 1) / kNR, op, ": packed weight has ",
              packed.size(0), " panels, out has ", N, " columns");
}

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
  check_packed(packed, K, N, op);
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == N,
                op, ": bias must be a contiguous float32 [", N, "] tensor");
    bias_ptr = bias->data_ptr<float>();
  }
  if (M == 0 || N == 0) return;
  NextGemm next;
  if (then != nullptr && then->dim() == 3 && then->size(2) == kNR && then->is_contiguous() &&
      then->scalar_type() == at::kFloat) {
    // Its padded width stands for its N: the same panels, so the same items.
    const WorkSplit split = work_split(M, then->size(1), then->size(0) * kNR);
    next = {then->data_ptr<float>(), then->size(1), then->size(0), split.items, split.grain};
  }
  const Gemm g{x.data_ptr<float>(), x.stride(0), M, K, packed.data_ptr<float>(), bias_ptr,
               out.data_ptr<float>(), out.stride(0), N, next};
  const WorkSplit split = work_split(M, K, N);
  cpu_pool::parallel_for(split.items, split.grain,
                         [&g](int64_t begin, int64_t end) { g.run_items(begin, end); });
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
