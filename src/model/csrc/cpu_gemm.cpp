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
//   and q and checks every value): per 32 x 32 block of a panel, 32 d and 32 m (float16 values,
//   stored as float16) and the 32 x 32 q, as int8 (1,152 bytes) or, where every q of the weight
//   fits, as 4-bit nibbles (640 bytes), for the 4,096 the float32 block takes. A thread turns a
//   panel back into float32 in its own buffer (d * q is exact in float32, so the values are the
//   weight's, bit for bit) and runs the same tiles on it: the results are those of the float32
//   panels, and a decode step, which streams every weight from memory, reads 3.6-6.4x fewer
//   bytes. GGUF's K-quants (Q4_K, Q5_K: w = (d * sc) * q - dmin * m per 32 inputs; Q6_K:
//   (d * sc) * q per 16) are such blocks too, with float32 scales: d * sc is exact in float32
//   but not a float16 value, and the one rounding of d * q + m (d * q exact, m = -(dmin * m))
//   is gguf-py's. Q4_K: float32 d and m and nibbles (768 bytes); Q5_K: int8 q (1,280); Q6_K:
//   two d per column (one per 16 inputs) and int8 q (1,280); a fused weight mixing Q6_K with
//   types that have an m: two d and an m (1,408).
//   Up to 16 rows (4 without AVX-512), "direct" tiles skip the buffer: they
//   turn each block's values into floats in registers and multiply them at once, the same
//   values in the same order (a one-sequence SmolLM2 decode step 12-20% faster).
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
#include <c10/util/Half.h>
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

// 16 float16 (their bits) as 16 floats.
inline vec16 half_to_float(const uint16_t* h) {
#if defined(__AVX512F__)
  return reinterpret_cast<vec16>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h))));
#elif defined(__F16C__)
  const __m256 halves[2] = {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h))),
                            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 8)))};
  vec16 out;
  std::memcpy(&out, halves, sizeof(out));
  return out;
#else
  vec16 out;
  for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(c10::Half(h[i], c10::Half::from_bits()));
  return out;
#endif
}

// 16 bytes of nibbles as two rows of 16 floats: the low nibbles (`lo`) and the high ones
// (`hi`), as 0..15 or, `Signed`, as two's complement -8..7.
template <bool Signed>
inline void nibbles_to_float(const uint8_t* bytes, vec16& lo, vec16& hi) {
#if defined(__AVX512F__)
  // vpermps looks up a float by the low 4 bits of each index and ignores the rest: the bytes,
  // widened, index the low nibbles' values as they are and, shifted right by 4, the high ones'.
  // Two lookups and a shift stand for two masks or shifts and two int-to-float conversions.
  const __m512 values = Signed ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1)
                               : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  lo = reinterpret_cast<vec16>(_mm512_permutexvar_ps(v, values));
  hi = reinterpret_cast<vec16>(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), values));
#elif defined(__AVX2__)
  __m256 lows[2], highs[2];
  for (int half = 0; half < 2; ++half) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * half)));
    const __m256i low = Signed ? _mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28)
                               : _mm256_and_si256(v, _mm256_set1_epi32(15));
    const __m256i high = Signed ? _mm256_srai_epi32(_mm256_slli_epi32(v, 24), 28) : _mm256_srli_epi32(v, 4);
    lows[half] = _mm256_cvtepi32_ps(low);
    highs[half] = _mm256_cvtepi32_ps(high);
  }
  std::memcpy(&lo, lows, sizeof(lo));
  std::memcpy(&hi, highs, sizeof(hi));
#else
  for (int i = 0; i < 16; ++i) {
    const int low = bytes[i] & 15, high = bytes[i] >> 4;
    lo[i] = Signed ? (low ^ 8) - 8 : low;
    hi[i] = Signed ? (high ^ 8) - 8 : high;
  }
#endif
}

// How a packed weight stores its values (packed_linear.py): float32 panels, or integer blocks
// with q as int8 or as unsigned or signed 4-bit nibbles and float16 d and m (GGUF's Q4_0, Q4_1,
// Q8_0), or with float32 scales (GGUF's K-quants, whose d * sc is exact in float32 but not a
// float16 value): d and m with nibbles (Q4_K) or int8 q (Q5_K), two d per column (one per 16
// inputs, Q6_K's sub-blocks) with int8 q, and two d and an m (a fused weight mixing those).
enum class Form { kFloat32, kInt8, kUnsigned4, kSigned4, kUnsigned4F32, kInt8F32, kInt8Halves, kInt8HalvesM };

// The integer-block panels (packed_linear.py pack_blocks): per 32 rows of K, the scales, one
// per output column: d[32] and m[32] as float16, or as float32 d[32] (then d2[32] for the
// second 16 inputs where the form has two, then m[32] where it has one); then q: int8
// q[32][32], k-major like the float32 panel, or nibbles [16][32], byte [k / 2][n] holding
// q[k][n] (k even) in its low half and q[k + 1][n] in its high half. w = d * q + m (m = -0.0
// where the form has none: d * q + (-0.0) is d * q, bit for bit).
constexpr int64_t kBlockK = 32;
constexpr int64_t kScaleBytes = 2 * kNR * sizeof(uint16_t);
constexpr int64_t kInt8BlockBytes = kScaleBytes + kBlockK * kNR;
constexpr int64_t kNibbleBlockBytes = kScaleBytes + kBlockK * kNR / 2;
constexpr int64_t kF32ScaleBytes = 2 * kNR * sizeof(float);  // d and m, or d and d2
constexpr int64_t kNibbleF32BlockBytes = kF32ScaleBytes + kBlockK * kNR / 2;  // 768
constexpr int64_t kInt8F32BlockBytes = kF32ScaleBytes + kBlockK * kNR;  // 1,280
constexpr int64_t kInt8HalvesMBlockBytes = kF32ScaleBytes + kNR * sizeof(float) + kBlockK * kNR;  // 1,408
// An integer-block panel is turned back into float32 this many rows of K at a time (16 KiB).
constexpr int64_t kSliceK = 4 * kBlockK;

constexpr bool float32_scales(Form form) {
  return form == Form::kUnsigned4F32 || form == Form::kInt8F32 || form == Form::kInt8Halves ||
         form == Form::kInt8HalvesM;
}
constexpr bool two_d(Form form) { return form == Form::kInt8Halves || form == Form::kInt8HalvesM; }
constexpr bool nibbles(Form form) {
  return form == Form::kUnsigned4 || form == Form::kSigned4 || form == Form::kUnsigned4F32;
}
constexpr int64_t scale_bytes(Form form) {
  return !float32_scales(form) ? kScaleBytes
         : form == Form::kInt8HalvesM ? kInt8HalvesMBlockBytes - kBlockK * kNR
                                      : kF32ScaleBytes;
}
constexpr int64_t block_bytes(Form form) {
  return scale_bytes(form) + (nibbles(form) ? kBlockK * kNR / 2 : kBlockK * kNR);
}

inline vec16 load16(const float* p) { return *reinterpret_cast<const vec16u*>(p); }

// One block of a panel: its 32 d (and 32 d2: the second 16 inputs' d, d itself where the form
// has one d) and 32 m as floats, and its q.
template <Form F>
struct Block {
  vec16 d_lo, d_hi, d2_lo, d2_hi, m_lo, m_hi;
  const uint8_t* q;

  explicit Block(const uint8_t* block) : q(block + scale_bytes(F)) {
    if constexpr (float32_scales(F)) {
      const float* scales = reinterpret_cast<const float*>(block);
      d_lo = load16(scales);
      d_hi = load16(scales + 16);
      if constexpr (two_d(F)) {
        d2_lo = load16(scales + kNR);
        d2_hi = load16(scales + kNR + 16);
      } else {
        d2_lo = d_lo;
        d2_hi = d_hi;
      }
      if constexpr (F == Form::kInt8Halves) {
        for (int i = 0; i < 16; ++i) m_lo[i] = -0.0f;  // no m: -0.0
        m_hi = m_lo;
      } else {
        const float* m = scales + (two_d(F) ? 2 : 1) * kNR;
        m_lo = load16(m);
        m_hi = load16(m + 16);
      }
    } else {
      const uint16_t* scales = reinterpret_cast<const uint16_t*>(block);
      d_lo = half_to_float(scales);
      d_hi = half_to_float(scales + 16);
      d2_lo = d_lo;
      d2_hi = d_hi;
      m_lo = half_to_float(scales + kNR);
      m_hi = half_to_float(scales + kNR + 16);
    }
  }

  // The weights w = d * q + m of the block's rows `per_step` at a time from row k (1 for int8
  // q, 2 for nibbles, which hold rows k and k + 1), with the d of `half` (0: rows 0-15, 1: rows
  // 16-31; the same d unless the form has two): w[2 r] and w[2 r + 1] are row k + r's columns
  // 0-15 and 16-31. The slices and the direct tiles both take their values from here.
  static constexpr int64_t per_step = nibbles(F) ? 2 : 1;
  void rows(int64_t k, int half, vec16 (&w)[2 * per_step]) const {
    const vec16& dl = half ? d2_lo : d_lo;
    const vec16& dh = half ? d2_hi : d_hi;
    if constexpr (!nibbles(F)) {
      const int8_t* qk = reinterpret_cast<const int8_t*>(q) + k * kNR;
      w[0] = dl * int8_to_float(qk) + m_lo;
      w[1] = dh * int8_to_float(qk + 16) + m_hi;
    } else {
      vec16 even_lo, odd_lo, even_hi, odd_hi;
      nibbles_to_float<F == Form::kSigned4>(q + k / 2 * kNR, even_lo, odd_lo);
      nibbles_to_float<F == Form::kSigned4>(q + k / 2 * kNR + 16, even_hi, odd_hi);
      w[0] = dl * even_lo + m_lo;
      w[1] = dh * even_hi + m_hi;
      w[2] = dl * odd_lo + m_lo;
      w[3] = dh * odd_hi + m_hi;
    }
  }
};

// The rows of a block taken with one d: all 32, or 16 and 16 where the form has two d.
template <Form F>
constexpr int64_t kHalfRows = two_d(F) ? kBlockK / 2 : kBlockK;

// A panel's blocks back to float32, K x 32 into `out`.
template <Form F>
void dequantize_panel(const uint8_t* __restrict blocks, int64_t K, float* __restrict out) {
  constexpr int64_t kStep = Block<F>::per_step;
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK, blocks += block_bytes(F)) {
    const Block<F> block(blocks);
    float* rows = out + k0 * kNR;
    for (int half = 0; half * kHalfRows<F> < kBlockK; ++half) {
#pragma GCC unroll 4
      for (int64_t k = half * kHalfRows<F>; k < (half + 1) * kHalfRows<F>; k += kStep) {
        vec16 w[2 * kStep];
        block.rows(k, half, w);
#pragma GCC unroll 4
        for (int64_t i = 0; i < 2 * kStep; ++i) *reinterpret_cast<vec16u*>(rows + k * kNR + 16 * i) = w[i];
      }
    }
  }
}

void dequantize_panel(Form form, const uint8_t* blocks, int64_t K, float* out) {
  switch (form) {
    case Form::kInt8: return dequantize_panel<Form::kInt8>(blocks, K, out);
    case Form::kUnsigned4: return dequantize_panel<Form::kUnsigned4>(blocks, K, out);
    case Form::kSigned4: return dequantize_panel<Form::kSigned4>(blocks, K, out);
    case Form::kUnsigned4F32: return dequantize_panel<Form::kUnsigned4F32>(blocks, K, out);
    case Form::kInt8F32: return dequantize_panel<Form::kInt8F32>(blocks, K, out);
    case Form::kInt8Halves: return dequantize_panel<Form::kInt8Halves>(blocks, K, out);
    case Form::kInt8HalvesM: return dequantize_panel<Form::kInt8HalvesM>(blocks, K, out);
    case Form::kFloat32: break;
  }
  TORCH_CHECK(false, "dequantize_panel: not an integer-block form");
}

// ncols <= kNR floats from `src` as two vectors, zero past ncols.
inline void load_row(const float* src, int ncols, vec16& lo, vec16& hi) {
  float padded[kNR] = {};
  std::memcpy(padded, src, sizeof(float) * ncols);
  std::memcpy(&lo, padded, sizeof(vec16));
  std::memcpy(&hi, padded + 16, sizeof(vec16));
}

// A tile's M rows of sums start from the bias (zero without one).
template <int M>
inline void start_rows(const float* bias, int ncols, vec16 (&lo)[M], vec16 (&hi)[M]) {
  vec16 bias_lo = {}, bias_hi = {};
  if (bias != nullptr) load_row(bias, ncols, bias_lo, bias_hi);
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    lo[m] = bias_lo;
    hi[m] = bias_hi;
  }
}

// A tile's M rows of sums into c[m, 0:ncols].
template <int M>
inline void store_rows(const vec16 (&lo)[M], const vec16 (&hi)[M], float* c, int64_t ldc, int ncols) {
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
    // Written out here rather than start_rows / store_rows (which direct_tile uses): with them,
    // GCC 12 compiled this tile so that a 64-row GEMM stack ran 5-15% slower (measured twice,
    // alternating), the inner loop unchanged and the registers around it allocated otherwise.
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

// A tile of few rows straight from the integer blocks: each weight value goes from its block
// into the multiply-adds, with no float32 slice in between, and the sums stay in registers for
// the whole K. Where a step has a handful of sequences the slice path's stores and reloads
// cost as much as the products. The values and the order of the sums are the slice path's
// (w = d * q + m, then c += x * w over k in order), so the results are the same, bit for bit.
// Prefetches: rows [pf_row, pf_end) of the panel `next`, spread evenly over the K blocks.
template <int M, Form F>
void direct_tile(const float* __restrict a, int64_t lda, const uint8_t* __restrict blocks,
                 int64_t K, float* __restrict c, int64_t ldc, int ncols,
                 const float* __restrict bias, const float* next, int64_t pf_row, int64_t pf_end) {
  constexpr int64_t kStep = Block<F>::per_step;
  vec16 lo[M], hi[M];
  start_rows<M>(bias, ncols, lo, hi);
  const int64_t nblocks = K / kBlockK, pf_rows = pf_end - pf_row;
  for (int64_t blk = 0; blk < nblocks; ++blk, blocks += block_bytes(F)) {
    const int64_t pf_stop = pf_row + pf_rows * (blk + 1) / nblocks;
    for (int64_t r = pf_row + pf_rows * blk / nblocks; next != nullptr && r < pf_stop; ++r) {
      __builtin_prefetch(next + r * kNR, 0, 2);
      __builtin_prefetch(next + r * kNR + 16, 0, 2);
    }
    const Block<F> block(blocks);
    const float* ak = a + blk * kBlockK;
    for (int half = 0; half * kHalfRows<F> < kBlockK; ++half) {
#pragma GCC unroll 2
      for (int64_t k = half * kHalfRows<F>; k < (half + 1) * kHalfRows<F>; k += kStep) {
        vec16 w[2 * kStep];
        block.rows(k, half, w);
#pragma GCC unroll 2
        for (int64_t r = 0; r < kStep; ++r) {
#pragma GCC unroll 16
          for (int m = 0; m < M; ++m) {
            const float value = ak[m * lda + k + r];
            lo[m] += value * w[2 * r];
            hi[m] += value * w[2 * r + 1];
          }
        }
      }
    }
  }
  store_rows<M>(lo, hi, c, ldc, ncols);
}

#if defined(__AVX512F__)
constexpr int kDirectMR = 8;  // 16 sums, 4 scale vectors and the weights in flight: 32 registers
#else
constexpr int kDirectMR = 2;  // AVX2: a vec16 is two of the 16 registers
#endif
// Up to this many rows a GEMM of integer blocks runs direct tiles, two where one is too few:
// the second turns the blocks into floats again, and still beats the slices (a 30-layer stack
// of SmolLM2's shapes, 2 threads: 9-16 rows 3-10% faster, 24 rows no faster).
constexpr int64_t kDirectMaxRows = 2 * kDirectMR;

using DirectFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, float*, int64_t, int,
                          const float*, const float*, int64_t, int64_t);

template <Form F, int... Ms>
constexpr std::array<DirectFn, sizeof...(Ms)> make_direct(std::integer_sequence<int, Ms...>) {
  return {&direct_tile<Ms + 1, F>...};
}
constexpr auto kDirectInt8 = make_direct<Form::kInt8>(std::make_integer_sequence<int, kDirectMR>{});
constexpr auto kDirectUnsigned4 = make_direct<Form::kUnsigned4>(std::make_integer_sequence<int, kDirectMR>{});
constexpr auto kDirectSigned4 = make_direct<Form::kSigned4>(std::make_integer_sequence<int, kDirectMR>{});
constexpr auto kDirectUnsigned4F32 = make_direct<Form::kUnsigned4F32>(std::make_integer_sequence<int, kDirectMR>{});
constexpr auto kDirectInt8F32 = make_direct<Form::kInt8F32>(std::make_integer_sequence<int, kDirectMR>{});
constexpr auto kDirectInt8Halves = make_direct<Form::kInt8Halves>(std::make_integer_sequence<int, kDirectMR>{});
constexpr auto kDirectInt8HalvesM = make_direct<Form::kInt8HalvesM>(std::make_integer_sequence<int, kDirectMR>{});

DirectFn direct_kernel(Form form, int64_t rows) {
  switch (form) {
    case Form::kInt8: return kDirectInt8[rows - 1];
    case Form::kUnsigned4: return kDirectUnsigned4[rows - 1];
    case Form::kSigned4: return kDirectSigned4[rows - 1];
    case Form::kUnsigned4F32: return kDirectUnsigned4F32[rows - 1];
    case Form::kInt8F32: return kDirectInt8F32[rows - 1];
    case Form::kInt8Halves: return kDirectInt8Halves[rows - 1];
    case Form::kInt8HalvesM: return kDirectInt8HalvesM[rows - 1];
    case Form::kFloat32: break;
  }
  return nullptr;
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

// A packed weight, in any of its forms: float32 panels [panels, K, 32] (float32), or integer
// blocks [panels, K / 32, bytes] of int8 q (uint8, 1,152 bytes), unsigned nibbles (uint8, 640
// bytes) or signed nibbles (int8, 640 bytes).
struct Packed {
  const char* data = nullptr;
  int64_t K = 0, panels = 0;
  Form form = Form::kFloat32;
  bool valid = false;

  bool blocks() const { return form != Form::kFloat32; }
  int64_t panel_bytes() const {
    return blocks() ? K / kBlockK * block_bytes(form) : K * kNR * static_cast<int64_t>(sizeof(float));
  }
  const char* panel(int64_t p) const { return data + p * panel_bytes(); }
};

// The weight `t` holds, if it is packed in any form (else `valid` is false).
Packed packed_of(const at::Tensor& t) {
  if (!t.defined() || !t.device().is_cpu() || !t.is_contiguous() || t.dim() != 3) return {};
  const char* data = static_cast<const char*>(t.data_ptr());
  const int64_t width = t.size(2), K = t.size(1) * kBlockK, panels = t.size(0);
  const auto type = t.scalar_type();
  if (type == at::kByte && width == kInt8BlockBytes) return {data, K, panels, Form::kInt8, true};
  if (type == at::kByte && width == kNibbleBlockBytes) return {data, K, panels, Form::kUnsigned4, true};
  if (type == at::kChar && width == kNibbleBlockBytes) return {data, K, panels, Form::kSigned4, true};
  if (type == at::kByte && width == kNibbleF32BlockBytes) return {data, K, panels, Form::kUnsigned4F32, true};
  if (type == at::kByte && width == kInt8F32BlockBytes) return {data, K, panels, Form::kInt8F32, true};
  if (type == at::kChar && width == kInt8F32BlockBytes) return {data, K, panels, Form::kInt8Halves, true};
  if (type == at::kByte && width == kInt8HalvesMBlockBytes) return {data, K, panels, Form::kInt8HalvesM, true};
  if (type == at::kFloat && width == kNR) return {data, t.size(1), panels, Form::kFloat32, true};
  return {};
}

// What `packed` holds, or why it cannot be a packed weight for x's K and out's N.
Packed packed_view(const at::Tensor& packed, int64_t K, int64_t N, const char* op) {
  const Packed weight = packed_of(packed);
  TORCH_CHECK(weight.valid, op, ": packed must be a contiguous CPU float32 [panels, K, ", kNR,
              "] tensor, or integer blocks [panels, K / ", kBlockK, ", bytes]: uint8 with ",
              kInt8BlockBytes, " or ", kNibbleBlockBytes, " bytes, int8 with ", kNibbleBlockBytes,
              "; float32 scales: uint8 with ", kNibbleF32BlockBytes, ", ", kInt8F32BlockBytes, " or ",
              kInt8HalvesMBlockBytes, ", int8 with ", kInt8F32BlockBytes);
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
    const int64_t slice = weight.blocks() ? kSliceK : K;
    const int64_t calls = (K + slice - 1) / slice * tiles;  // tile calls per panel
    // Few rows of integer blocks: direct tiles (above), one or two a panel.
    const bool direct = weight.blocks() && rows_in <= kDirectMaxRows;
    const int64_t direct_tiles = (rows_in + kDirectMR - 1) / kDirectMR;
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
      if (direct) {
        int64_t m = m0;
        for (int64_t t = 0; t < direct_tiles; ++t) {
          const int64_t rows = (m1 - m) / (direct_tiles - t);
          direct_kernel(weight.form, rows)(
              a + m * lda, lda, reinterpret_cast<const uint8_t*>(source), K, c + m * ldc + p * kNR, ldc,
              ncols, panel_bias, reinterpret_cast<const float*>(next), next_rows * t / direct_tiles,
              next_rows * (t + 1) / direct_tiles);
          m += rows;
        }
        continue;
      }
      const int64_t every = std::max<int64_t>(1, K * tiles / next_rows);
      int64_t call = 0;
      for (int64_t k0 = 0; k0 < K; k0 += slice) {
        const int64_t k_len = std::min(slice, K - k0);
        const float* b = reinterpret_cast<const float*>(source) + k0 * kNR;
        if (weight.blocks()) {
          const int64_t offset = k0 / kBlockK * block_bytes(weight.form);
          dequantize_panel(weight.form, reinterpret_cast<const uint8_t*>(source) + offset, k_len, unpacked);
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
