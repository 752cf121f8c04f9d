// GGUF weights as they are in the file, multiplied without a float32 copy of the weight:
// out[M, N] = x[M, K] @ W^T (+ bias), W given as its GGUF rows (N rows of K / block_size blocks,
// in ggml's block formats, usually a memory mapping of the file).
//
// Each thread takes groups of kGroup output rows: it turns the group's blocks back into float32
// in its own buffer (kGroup x K floats, in L2: 128 KiB for K = 2,048) with exactly the values
// gguf-py's `dequantize` gives (the same float32 products and sums, in the same order), then
// multiplies them by every row of x in register tiles of kMR x kNR dot products. A decode step
// (a few rows) thus reads each weight byte once from memory and turns it into floats once; a
// prefill chunk reuses the floats for all its rows.
//
// Types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (ggml's type
// numbers). Vector code uses GCC vector extensions, so the same source compiles to AVX-512, AVX2
// or plain x86-64; the Q4_K, Q5_K, Q6_K and Q8_0 dequantizers have vector versions (AVX2 and
// AVX-512 intrinsics for the byte widening) that AVX2 / AVX-512 builds use, bit for bit the
// scalar ones' values (tests/model/test_portable_builds.py runs the kernel tests on each build).

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_pool.h"

namespace {

// ggml's type numbers (ggml.h enum ggml_type).
enum GgmlType : int64_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8,
  kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kBF16 = 30,
};

struct TypeInfo {
  int64_t block, bytes;  // values per block, bytes per block (0: not supported)
};

TypeInfo type_info(int64_t type) {
  switch (type) {
    case kF32: return {32, 128};  // plain types go 32 values at a time
    case kF16: return {32, 64};
    case kBF16: return {32, 64};
    case kQ4_0: return {32, 18};
    case kQ4_1: return {32, 20};
    case kQ5_0: return {32, 22};
    case kQ5_1: return {32, 24};
    case kQ8_0: return {32, 34};
    case kQ2_K: return {256, 84};
    case kQ3_K: return {256, 110};
    case kQ4_K: return {256, 144};
    case kQ5_K: return {256, 176};
    case kQ6_K: return {256, 210};
    default: return {0, 0};
  }
}

inline float f16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Each dequantizer writes one block's values to y, as gguf-py's dequantize_blocks computes them:
// d * q (exact), (d * q) + m, (d * sc) * q - (dmin * m) with the products in that order.

void deq_f32(const uint8_t* b, float* y) { std::memcpy(y, b, 32 * sizeof(float)); }

void deq_f16(const uint8_t* b, float* y) {
  for (int i = 0; i < 32; ++i) y[i] = f16(b + 2 * i);
}

void deq_bf16(const uint8_t* b, float* y) {
  for (int i = 0; i < 32; ++i) {
    uint16_t h;
    std::memcpy(&h, b + 2 * i, 2);
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    std::memcpy(y + i, &bits, 4);
  }
}

void deq_q4_0(const uint8_t* b, float* y) {
  const float d = f16(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>((qs[j] & 15) - 8);
    y[j + 16] = d * static_cast<float>((qs[j] >> 4) - 8);
  }
}

void deq_q4_1(const uint8_t* b, float* y) {
  const float d = f16(b), m = f16(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(qs[j] & 15) + m;
    y[j + 16] = d * static_cast<float>(qs[j] >> 4) + m;
  }
}

template <bool Offset>
void deq_q5(const uint8_t* b, float* y) {
  const float d = f16(b);
  const float m = Offset ? f16(b + 2) : 0.0f;
  const uint8_t* rest = b + (Offset ? 4 : 2);
  uint32_t qh;
  std::memcpy(&qh, rest, 4);
  const uint8_t* qs = rest + 4;
  for (int j = 0; j < 16; ++j) {
    const int lo = (qs[j] & 15) | (((qh >> j) & 1) << 4);
    const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    if (Offset) {
      y[j] = d * static_cast<float>(lo) + m;
      y[j + 16] = d * static_cast<float>(hi) + m;
    } else {
      y[j] = d * static_cast<float>(lo - 16);
      y[j + 16] = d * static_cast<float>(hi - 16);
    }
  }
}

void deq_q8_0(const uint8_t* b, float* y) {
  const float d = f16(b);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(qs[j]) * d;
}

void deq_q2_k(const uint8_t* b, float* y) {
  const uint8_t* scales = b;
  const uint8_t* qs = b + 16;
  const float d = f16(b + 80), dmin = f16(b + 82);
  for (int e = 0; e < 256; e += 16) {
    const int g = e / 16, half = e / 128, shift = 2 * ((e % 128) / 32), l0 = e % 32;
    const float dl = d * static_cast<float>(scales[g] & 15);
    const float ml = dmin * static_cast<float>(scales[g] >> 4);
    for (int l = 0; l < 16; ++l) {
      y[e + l] = dl * static_cast<float>((qs[half * 32 + l0 + l] >> shift) & 3) - ml;
    }
  }
}

void deq_q3_k(const uint8_t* b, float* y) {
  const uint8_t* hmask = b;
  const uint8_t* qs = b + 32;
  const uint8_t* sc = b + 96;
  const float d = f16(b + 108);
  for (int e = 0; e < 256; e += 16) {
    const int g = e / 16;
    const int low = (g < 8 ? sc[g] : sc[g - 8] >> 4) & 15;
    const int high = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
    const float dl = d * static_cast<float>((low | (high << 4)) - 32);
    const int half = e / 128, shift = 2 * ((e % 128) / 32), bit = e / 32, l0 = e % 32;
    for (int l = 0; l < 16; ++l) {
      const int q = ((qs[half * 32 + l0 + l] >> shift) & 3) - (((hmask[l0 + l] >> bit) & 1) ? 0 : 4);
      y[e + l] = dl * static_cast<float>(q);
    }
  }
}

// Q4_K / Q5_K's 8 six-bit scales and mins (gguf-py Q4_K.get_scale_min).
inline void scale_min(const uint8_t* s, int j, int& sc, int& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 15) | ((s[j - 4] >> 2) & 0x30);
    mn = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
  }
}

// A Q4_K (or, `High`, Q5_K) block's fields.
template <bool High>
struct Q45Block {
  float d, dmin;
  const uint8_t *scales, *qh, *qs;
  explicit Q45Block(const uint8_t* b)
      : d(f16(b)), dmin(f16(b + 2)), scales(b + 4), qh(b + 16), qs(b + (High ? 48 : 16)) {}
};

template <bool High>
void deq_q45_k(const uint8_t* b, float* y) {
  const Q45Block<High> k(b);
  const float d = k.d, dmin = k.dmin;
  const uint8_t *scales = k.scales, *qh = k.qh, *qs = k.qs;
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    scale_min(scales, j, sc, mn);
    const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(mn);
    const uint8_t* q = qs + (j / 2) * 32;
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) {
      int v = (q[l] >> shift) & 15;
      if (High) v |= ((qh[l] >> j) & 1) << 4;
      y[32 * j + l] = dl * static_cast<float>(v) - ml;
    }
  }
}

void deq_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16(b + 208);
  for (int e = 0; e < 256; e += 16) {
    const float dl = d * static_cast<float>(scales[e / 16]);
    const int half = e / 128, nib = 4 * ((e % 128) / 64), l0 = e % 64;
    const int shift = 2 * ((e % 128) / 32), h0 = e % 32;
    for (int l = 0; l < 16; ++l) {
      const int q = (((ql[half * 64 + l0 + l] >> nib) & 15) | (((qh[half * 32 + h0 + l] >> shift) & 3) << 4)) - 32;
      y[e + l] = dl * static_cast<float>(q);
    }
  }
}

#if defined(__AVX2__) || defined(__AVX512F__)
// Vector dequantizers of the types most files hold (Q4_K, Q5_K, Q6_K, Q8_0) for AVX2 and
// AVX-512 builds: 16 quants at a time widened to int32 lanes, their bits picked with shifts and
// masks, converted to float and scaled with the same float32 operations, in the same order, as
// the scalar code above (separate multiply and subtract: no FMA, which would round once where
// gguf-py rounds twice). A plain x86-64 build keeps the scalar ones.
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64)));

// 16 bytes as 16 int32 lanes, sign-extended (`Signed`, int8) or zero-extended (uint8).
template <bool Signed>
inline vi16 load_bytes(const uint8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
#if defined(__AVX512F__)
  return reinterpret_cast<vi16>(Signed ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes));
#else
  const __m128i upper = _mm_srli_si128(bytes, 8);
  const __m256i halves[2] = {Signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes),
                             Signed ? _mm256_cvtepi8_epi32(upper) : _mm256_cvtepu8_epi32(upper)};
  vi16 out;
  std::memcpy(&out, halves, sizeof(out));
  return out;
#endif
}

inline vi16 load_u8(const uint8_t* p) { return load_bytes<false>(p); }
inline vi16 load_i8(const uint8_t* p) { return load_bytes<true>(p); }

inline vf16 to_float(vi16 v) { return __builtin_convertvector(v, vf16); }

inline void store(float* y, vf16 v) { *reinterpret_cast<vf16u*>(y) = v; }

void deq_q8_0_simd(const uint8_t* b, float* y) {
  const float d = f16(b);
  store(y, to_float(load_i8(b + 2)) * d);
  store(y + 16, to_float(load_i8(b + 18)) * d);
}

template <bool High>
void deq_q45_k_simd(const uint8_t* b, float* y) {
  const Q45Block<High> k(b);
  const float d = k.d, dmin = k.dmin;
  const uint8_t *scales = k.scales, *qh = k.qh, *qs = k.qs;
  vi16 hbits[2];
  if (High) {
    hbits[0] = load_u8(qh);
    hbits[1] = load_u8(qh + 16);
  }
  for (int j = 0; j < 8; j += 2) {  // sub-blocks j (low nibbles) and j + 1 (high ones) of 32 bytes
    int sc0, mn0, sc1, mn1;
    scale_min(scales, j, sc0, mn0);
    scale_min(scales, j + 1, sc1, mn1);
    const float dl0 = d * static_cast<float>(sc0), ml0 = dmin * static_cast<float>(mn0);
    const float dl1 = d * static_cast<float>(sc1), ml1 = dmin * static_cast<float>(mn1);
    const uint8_t* q = qs + (j / 2) * 32;
    for (int c = 0; c < 2; ++c) {
      const vi16 bytes = load_u8(q + 16 * c);
      vi16 lo = bytes & 15, hi = bytes >> 4;
      if (High) {
        lo |= ((hbits[c] >> j) & 1) << 4;
        hi |= ((hbits[c] >> (j + 1)) & 1) << 4;
      }
      store(y + 32 * j + 16 * c, to_float(lo) * dl0 - ml0);
      store(y + 32 * (j + 1) + 16 * c, to_float(hi) * dl1 - ml1);
    }
  }
}

void deq_q6_k_simd(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16(b + 208);
  for (int half = 0; half < 2; ++half) {
    for (int c = 0; c < 2; ++c) {  // 16 of the 32 bytes of qh each 4 groups of 16 take bits from
      const vi16 h = load_u8(qh + half * 32 + 16 * c);
      const vi16 l0 = load_u8(ql + half * 64 + 16 * c), l1 = load_u8(ql + half * 64 + 32 + 16 * c);
      const vi16 q[4] = {(l0 & 15) | ((h & 3) << 4), (l1 & 15) | (((h >> 2) & 3) << 4),
                         (l0 >> 4) | (((h >> 4) & 3) << 4), (l1 >> 4) | (((h >> 6) & 3) << 4)};
      for (int s = 0; s < 4; ++s) {  // e = half * 128 + 32 * s + 16 * c
        const int e = half * 128 + 32 * s + 16 * c;
        const float dl = d * static_cast<float>(scales[e / 16]);
        store(y + e, to_float(q[s] - 32) * dl);
      }
    }
  }
}
#endif  // AVX2 or AVX-512

using DeqFn = void (*)(const uint8_t*, float*);

DeqFn deq_fn(int64_t type) {
  switch (type) {
    case kF32: return deq_f32;
    case kF16: return deq_f16;
    case kBF16: return deq_bf16;
    case kQ4_0: return deq_q4_0;
    case kQ4_1: return deq_q4_1;
    case kQ5_0: return deq_q5<false>;
    case kQ5_1: return deq_q5<true>;
    case kQ2_K: return deq_q2_k;
    case kQ3_K: return deq_q3_k;
#if defined(__AVX2__) || defined(__AVX512F__)
    case kQ8_0: return deq_q8_0_simd;
    case kQ4_K: return deq_q45_k_simd<false>;
    case kQ5_K: return deq_q45_k_simd<true>;
    case kQ6_K: return deq_q6_k_simd;
#else
    case kQ8_0: return deq_q8_0;
    case kQ4_K: return deq_q45_k<false>;
    case kQ5_K: return deq_q45_k<true>;
    case kQ6_K: return deq_q6_k;
#endif
    default: return nullptr;
  }
}

// A GGUF weight: N rows of `row_bytes` bytes, `stride` bytes apart.
struct Weight {
  const uint8_t* data;
  int64_t N, K, stride, type;
  TypeInfo info;
  DeqFn deq;

  void row(int64_t n, float* y) const {
    const uint8_t* src = data + n * stride;
    for (int64_t k = 0; k < K; k += info.block, src += info.bytes) deq(src, y + k);
  }
};

Weight weight_view(const at::Tensor& w, int64_t type, const char* op) {
  const TypeInfo info = type_info(type);
  TORCH_CHECK(info.block > 0, op, ": ggml type ", type, " has no kernel");
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.stride(1) == 1,
              op, ": the weight must be a CPU uint8 [rows, bytes] tensor with contiguous rows");
  TORCH_CHECK(w.size(1) % info.bytes == 0, op, ": a row of ", w.size(1), " bytes is not whole blocks of ",
              info.bytes);
  return {w.data_ptr<uint8_t>(), w.size(0), w.size(1) / info.bytes * info.block, w.stride(0), type, info,
          deq_fn(type)};
}

typedef float vec16 __attribute__((vector_size(64)));
typedef float vec16u __attribute__((vector_size(64), aligned(4)));

inline float hsum(vec16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

constexpr int kNR = 4;  // weight rows per register tile
#if defined(__AVX512F__)
constexpr int kMR = 4;  // x rows per register tile: 16 accumulators of 32 registers
#else
constexpr int kMR = 2;  // AVX2: a vec16 is two of the 16 registers
#endif
constexpr int64_t kGroup = 16;     // weight rows a thread turns into floats at a time
constexpr int64_t kRowBlock = 64;  // x rows a group is multiplied by before the next rows

// A vector stays in a register: GCC then does not fold its load into each multiply-add that
// uses it (AVX-512 only, where a vec16 is one register).
inline void in_register(vec16& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// c[m, r] (+ bias[r]) = a[m, :] . w[r, :] for m < M, r < R (c[m * ldc + r]): 16 lanes of sums
// (lane l: the products of k = l mod 16, in order), then the lanes summed in order.
template <int M>
void dot_tile(const float* __restrict a, int64_t lda, const float* __restrict w, int64_t K, int R,
              float* __restrict c, int64_t ldc, const float* bias) {
  vec16 acc[M][kNR];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < kNR; ++r) acc[m][r] = vec16{};
  for (int64_t k = 0; k < K; k += 16) {
    // x's M vectors and each weight vector are loaded once (M + kNR loads): folded into the
    // multiply-adds as memory operands they were loaded M x kNR times, and loads, one 64-byte
    // vector a cycle on Zen 4, not the multiply-adds, bounded the tile (1.15-1.6x slower at
    // 16-64 rows).
    vec16 av[M];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      av[m] = *reinterpret_cast<const vec16u*>(a + m * lda + k);
      in_register(av[m]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < kNR; ++r) {
      vec16 wv = *reinterpret_cast<const vec16u*>(w + r * K + k);
      in_register(wv);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) acc[m][r] += av[m] * wv;
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) c[m * ldc + r] = hsum(acc[m][r]) + (bias != nullptr ? bias[r] : 0.0f);
}

using DotFn = void (*)(const float*, int64_t, const float*, int64_t, int, float*, int64_t, const float*);
template <int... Ms>
constexpr std::array<DotFn, sizeof...(Ms)> make_dots(std::integer_sequence<int, Ms...>) {
  return {&dot_tile<Ms + 1>...};
}
constexpr auto kDots = make_dots(std::make_integer_sequence<int, kMR>{});

// Below this many multiply-adds a GEMM runs on the calling thread alone.
constexpr int64_t kMinParallelWork = 1 << 16;

}  // namespace

// out [M, N] (rows `out.stride(0)` apart) = x [M, K] @ dequantize(w)^T + bias.
void gguf_gemm(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, int64_t type,
               const std::optional<at::Tensor>& bias) {
  const char* op = "gguf_gemm";
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&out), &x}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->stride(1) == 1,
                op, ": x and out must be CPU float32 [rows, features] with contiguous rows");
  }
  const Weight weight = weight_view(w, type, op);
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  TORCH_CHECK(weight.K == K, op, ": the weight has K=", weight.K, ", x has ", K);
  TORCH_CHECK(weight.N == N, op, ": the weight has ", weight.N, " rows, out has ", N, " columns");
  TORCH_CHECK(out.size(0) == M, op, ": out has ", out.size(0), " rows, x has ", M);
  TORCH_CHECK(K % 16 == 0, op, ": K=", K, " is not a multiple of 16");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == N, op,
                ": bias must be a contiguous float32 [", N, "] tensor");
    bias_ptr = bias->data_ptr<float>();
  }
  if (M == 0 || N == 0) return;
  const float* a = x.data_ptr<float>();
  const int64_t lda = x.stride(0), ldc = out.stride(0);
  float* c = out.data_ptr<float>();
  const int64_t groups = (N + kGroup - 1) / kGroup;
  const int64_t grain = M * K * N < kMinParallelWork ? groups : 1;
  cpu_pool::parallel_for(groups, grain, [&](int64_t g0, int64_t g1) {
    thread_local std::vector<float> buffer;
    buffer.resize(static_cast<size_t>(kGroup * K));
    float* rows = buffer.data();
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * kGroup, count = std::min(kGroup, N - n0);
      for (int64_t r = 0; r < count; ++r) weight.row(n0 + r, rows + r * K);
      const int64_t padded = (count + kNR - 1) / kNR * kNR;
      std::fill(rows + count * K, rows + padded * K, 0.0f);
      for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
        const int64_t m1 = std::min(M, m0 + kRowBlock);
        for (int64_t r = 0; r < count; r += kNR) {
          const int R = static_cast<int>(std::min<int64_t>(kNR, count - r));
          for (int64_t m = m0; m < m1; m += kMR) {
            const int64_t rows_here = std::min<int64_t>(kMR, m1 - m);
            kDots[rows_here - 1](a + m * lda, lda, rows + r * K, K, R, c + m * ldc + n0 + r, ldc,
                                 bias_ptr != nullptr ? bias_ptr + n0 + r : nullptr);
          }
        }
      }
    }
  });
}

// out [N, K] float32 = the values of w's rows, as gguf-py's dequantize gives them.
void gguf_dequantize(at::Tensor& out, const at::Tensor& w, int64_t type) {
  const char* op = "gguf_dequantize";
  const Weight weight = weight_view(w, type, op);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.dim() == 2 && out.is_contiguous() &&
                  out.size(0) == weight.N && out.size(1) == weight.K,
              op, ": out must be a contiguous CPU float32 [", weight.N, ", ", weight.K, "] tensor");
  float* y = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, weight.K));
  cpu_pool::parallel_for(weight.N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) weight.row(n, y + n * weight.K);
  });
}

// out [T, K] float32 = rows ids[t] of w (an embedding lookup).
void gguf_embedding(at::Tensor& out, const at::Tensor& w, int64_t type, const at::Tensor& ids) {
  const char* op = "gguf_embedding";
  const Weight weight = weight_view(w, type, op);
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.is_contiguous(),
              op, ": ids must be a contiguous CPU int64 vector");
  const int64_t T = ids.size(0);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.dim() == 2 && out.is_contiguous() &&
                  out.size(0) == T && out.size(1) == weight.K,
              op, ": out must be a contiguous CPU float32 [", T, ", ", weight.K, "] tensor");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(0 <= id[t] && id[t] < weight.N, op, ": id ", id[t], " is outside 0..", weight.N - 1);
  }
  float* y = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) weight.row(id[t], y + t * weight.K);
}

TORCH_LIBRARY_FRAGMENT(shardline, m) {
  m.def("gguf_gemm(Tensor(a!) out, Tensor x, Tensor w, int type, Tensor? bias) -> ()");
  m.def("gguf_dequantize(Tensor(a!) out, Tensor w, int type) -> ()");
  m.def("gguf_embedding(Tensor(a!) out, Tensor w, int type, Tensor ids) -> ()");
}

TORCH_LIBRARY_IMPL(shardline, CPU, m) {
  m.impl("gguf_gemm", &gguf_gemm);
  m.impl("gguf_dequantize", &gguf_dequantize);
  m.impl("gguf_embedding", &gguf_embedding);
}
