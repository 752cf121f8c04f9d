// Integer GEMM with 8-bit activations (the opt-in int8 mode): out[M, N] = x[M, K] @ W^T (+ bias)
// for weights of the integer-block form w = d * q + m per 32 inputs of an output (GGUF's Q4_0,
// Q4_1, Q8_0, Q4_K, Q5_K; packed_linear.py finds d, m and q), as llama.cpp computes them: each
// row of x is quantized per block of 32 inputs to int8 (scale amax / 127, round to nearest), the
// block's dot products are exact int32 sums of q * x_q, and one float step per block applies the
// scales:
//
//   out[r, n] = sum_b  dx[r, b] * (d[n, b] * dot[r, n, b] + m2[n, b] * sx[r, b])
//
// with sx the block's sum of x_q and m2 = m - offset * d for q stored with an offset. The values
// are not float32's (x is rounded to 8 bits): this path is opt-in, with its accuracy measured.
//
// Q6_K's blocks have two d (one per 16 inputs): their halves' dot products are kept apart and
// scaled by their own d (bytes; the offset corrected with each half's sum of x_q).
//
// Layout: a 64-byte header (magic, n, k, groups), then per column group of 16 outputs its kind
// and byte offset (int64 each), then the groups' data, each group in its own kind, so that a
// fused weight's parts (a Q4_K_M file's q / k Q4_K and v Q6_K) each keep their own form.
//
// Block kinds (q8_pack or q8_pack_into, from d, m and q): the group's blocks one after another;
// per block the q, then d[16] and m2[16], as float16 where every one of the weight's is a float16
// value (Q4_0, Q4_1, Q8_0), else as float32:
//   * nibbles (every q in 0..15, or -8..7 stored as q + 8): 256 bytes, byte [j][c][i] holding
//     q[c][4j + i] in its low and q[c][16 + 4j + i] in its high nibble (j < 4);
//   * bytes: 512 bytes, byte [j][c][i] = q[c][4j + i] (j < 8): with AVX512-VNNI as q + 128
//     (vpdpbusd multiplies unsigned weights by signed activations), else as signed int8 (AVX2's
//     maddubs takes |q| and x_q with q's sign, which cannot overflow its int16 sums).
// So one 64-byte load holds 4 consecutive inputs of 16 columns: the vpdpbusd / maddubs operand.
//
// Super-block kinds (q8_kquant_new or q8_kquant_init, then q8_kquant_fill, from a GGUF file's
// Q4_K, Q5_K and Q6_K blocks, at about the file's size): per 256 inputs of a group, the file's
// float16 super-block scales and its integer sub-block scales as they are:
//   * Q4_K / Q5_K: D[16] and -Dmin[16] (float16), the file's 12 bytes of 6-bit sc[8] and mn[8]
//     per column as bytes [12][16] (taken apart once a super-block, kscales_all), so that d = D * sc
//     and m = -Dmin * mn per block of 32 (the kernel forms them: exact products,
//     the values gguf-py's dequantize uses); Q6_K: D[16] (float16), sc[16][16] (int8, one per 16
//     inputs), d = D * sc per half block;
//   * then the 8 blocks' q, unsigned (Q6_K: q + 32, its offset corrected per half with the half's
//     sum of x_q): the low nibbles as the nibble kind's 256 bytes, then Q5_K's bit 4 as one
//     64-byte plane (byte [c][i]: bit j for input 4j + i, bit 4 + j for 16 + 4j + i) or Q6_K's
//     bits 4-5 as two (inputs 0..15, 16..31; bits 2j, 2j + 1 for 4j + i), put back in registers.
// Bytes a weight: the file's, Q4_K 0.5625, Q5_K 0.6875, Q6_K 0.8203.
//
// Threads: cpu_pool.h's, over the column groups.

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"
#include "cpu_pool.h"

namespace {

constexpr int kCols = 16;   // output columns per group
constexpr int kBlock = 32;  // inputs per block
constexpr int kHeader = 64;
constexpr int64_t kMagic = 0x38514C44534E5348;  // "HSNSDLQ8"
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int kRows = 8;  // rows per tile: 8 int32 + 8 float accumulators
#else
constexpr int kRows = 4;
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int kByteOffset = 128;
#else
constexpr int kByteOffset = 0;
#endif

// Block kinds: storage | kHalfScales | kTwoScales (two d per block, one per 16 inputs; bytes
// only). Super-block kinds: kQ4K, kQ5K, kQ6K.
enum Kind : int64_t { kNibble = 1, kByte = 2, kHalfScales = 4, kTwoScales = 8, kQ4K = 16, kQ5K = 32, kQ6K = 64 };
constexpr int64_t kSuperKinds = kQ4K | kQ5K | kQ6K;
constexpr int kSuper = 256;  // inputs per super-block

struct Header {
  int64_t magic, n, k, groups;
};
struct Group {
  int64_t kind, offset;  // offset: from the data's start
};

inline int64_t data_start(int64_t groups) { return (kHeader + groups * int64_t(sizeof(Group)) + 63) / 64 * 64; }

// A super-block kind's layout: hb high-bit planes (Q4_K 0, Q5_K 1, Q6_K 2).
template <int hb>
struct Super {
  static constexpr int kHeadBytes = (hb == 2 ? 2 : 4) * kCols;  // float16 D[16] (and -Dmin[16])
  // then Q6_K's int8 scales [16][16], or Q4_K / Q5_K's 12 bytes of 6-bit scales and mins [12][16]
  static constexpr int kScaleBytes = kHeadBytes + (hb == 2 ? 16 : 12) * kCols;
  static constexpr int kQBytes = 256 + 64 * hb;  // per block of 32 inputs
  static constexpr int kBytes = kScaleBytes + 8 * kQBytes;
};
inline int super_planes(int64_t kind) { return kind == kQ4K ? 0 : kind == kQ5K ? 1 : 2; }
inline int super_bytes(int64_t kind) {
  return kind == kQ4K ? Super<0>::kBytes : kind == kQ5K ? Super<1>::kBytes : Super<2>::kBytes;
}

// Q4_K / Q5_K: sub-block blk's 6-bit scale and min of column c, from the file's 12 bytes kept
// per column as bytes [12][16] (ggml's get_scale_min_k4).
inline void kscale(const uint8_t* scales, int blk, int c, int& sc, int& mn) {
  auto at = [&](int i) { return static_cast<int>(scales[kCols * i + c]); };
  if (blk < 4) {
    sc = at(blk) & 63;
    mn = at(blk + 4) & 63;
  } else {
    sc = (at(blk + 4) & 0xF) | ((at(blk - 4) >> 6) << 4);
    mn = (at(blk + 4) >> 4) | ((at(blk) >> 6) << 4);
  }
}
#if defined(__AVX2__) || defined(__AVX512F__)
// kscale for every sub-block and the 16 columns at once, once a super-block: out = sc[8][16]
// then mn[8][16] (bytes; 16-bit shifts, the bits that cross a byte masked off).
inline void kscales_all(const uint8_t* scales, uint8_t* out) {
#if defined(__AVX512BW__)
  auto at = [&](int i) { return _mm512_loadu_si512(scales + kCols * i); };  // sub-blocks i .. i + 3
  auto put = [&](int i, __m512i v) { _mm512_storeu_si512(out + kCols * i, v); };
  const __m512i six = _mm512_set1_epi8(63), four = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
  const __m512i lo = at(0), mid = at(4), hi = at(8);
  put(0, _mm512_and_si512(lo, six));
  put(4, _mm512_or_si512(_mm512_and_si512(hi, four), _mm512_and_si512(_mm512_srli_epi16(lo, 2), top)));
  put(8, _mm512_and_si512(mid, six));
  put(12, _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(hi, 4), four), _mm512_and_si512(_mm512_srli_epi16(mid, 2), top)));
#else
  auto at = [&](int i) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + kCols * i)); };
  auto put = [&](int i, __m128i v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(out + kCols * i), v); };
  const __m128i six = _mm_set1_epi8(63), four = _mm_set1_epi8(0x0F), top = _mm_set1_epi8(0x30);
  for (int i = 0; i < 4; ++i) {
    const __m128i lo = at(i), mid = at(4 + i), hi = at(8 + i);
    put(i, _mm_and_si128(lo, six));
    put(4 + i, _mm_or_si128(_mm_and_si128(hi, four), _mm_and_si128(_mm_srli_epi16(lo, 2), top)));
    put(8 + i, _mm_and_si128(mid, six));
    put(12 + i, _mm_or_si128(_mm_and_si128(_mm_srli_epi16(hi, 4), four), _mm_and_si128(_mm_srli_epi16(mid, 2), top)));
  }
#endif
}
#endif

inline int q_bytes(int64_t kind) { return (kind & 3) == kNibble ? 256 : 512; }
inline int num_scales(int64_t kind) { return (kind & kTwoScales) ? 3 : 2; }
inline int block_bytes(int64_t kind) {
  return q_bytes(kind) + num_scales(kind) * kCols * ((kind & kHalfScales) ? 2 : 4);
}

int64_t group_bytes(int64_t kind, int64_t k) {
  return (kind & kSuperKinds) ? k / kSuper * super_bytes(kind) : k / kBlock * block_bytes(kind);
}

inline float half_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Scale c (< 16) of a block's d (which = 0) or m2 (which = 1); two-scale blocks: d1, d2, m.
inline float scale_at(const uint8_t* qb, int64_t kind, int which, int c) {
  const uint8_t* p = qb + q_bytes(kind);
  if (kind & kHalfScales) return half_to_float(p + 2 * (which * kCols + c));
  float v;
  std::memcpy(&v, p + 4 * (which * kCols + c), 4);
  return v;
}

// x (one row, K floats) -> int8 per block of 32, the block's scale and sum of its int8 values,
// and the sum of its first 16 (two-scale blocks correct each half for the bytes' offset). The
// AVX-512 form is the scalar one's arithmetic (the same products, rounded to nearest even as
// nearbyint does in the default rounding mode; exact maxima and integer sums): same values.
void quantize_row(const float* x, int64_t k, int8_t* q, float* scale, int32_t* sum, int32_t* first_half) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + b * kBlock), v1 = _mm512_loadu_ps(x + b * kBlock + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kBlock), _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * kBlock + 16), _mm512_cvtepi32_epi8(i1));
    const int32_t s16 = _mm512_reduce_add_epi32(i0);
    scale[b] = amax / 127.f;
    sum[b] = s16 + _mm512_reduce_add_epi32(i1);
    first_half[b] = s16;
  }
#else
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.f;
    for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t s = 0, s16 = 0;
    for (int i = 0; i < kBlock; ++i) {
      const int v = static_cast<int>(std::nearbyint(xb[i] * inv));
      q[b * kBlock + i] = static_cast<int8_t>(v);
      s += v;
      if (i == 15) s16 = s;
    }
    scale[b] = amax / 127.f;
    sum[b] = s;
    first_half[b] = s16;
  }
#endif
}

// A tile's rows of x, interleaved so that one pointer with constant offsets serves every row of
// the tile (the broadcasts come straight from memory; no row pointer is kept in a register or
// spilled): per block b, word (b, j, r) holds the 4 int8 values of row r at inputs 4j .. 4j + 3
// (j < 8), the rows at the tile's own stride (a one-row tile's are contiguous: a decode step's x
// stays in a few cache lines); per block, the rows' scale, scale * sum and scale * each half's
// sum (two-scale blocks correct each half for the q's offset: offset * that, exact for the
// offsets, powers of two; Q6_K's products are kept ready). Built once a GEMM (q8_gemm).
constexpr int kVals = 6;  // per block and row: scale, scale * sum, each half's, 32 * each half's
struct Rows {  // accessors for a tile of R rows (its layout's row stride)
  const int32_t* words;  // [blocks][8][R]
  const float* vals;     // [blocks][kVals][R]
  template <int R> int32_t word(int64_t b, int j, int r) const { return words[(b * 8 + j) * R + r]; }
  template <int R> float val(int64_t b, int i, int r) const { return vals[(b * kVals + i) * R + r]; }
  template <int R> float sx(int64_t b, int r) const { return val<R>(b, 0, r); }
  template <int R> float ssum(int64_t b, int r) const { return val<R>(b, 1, r); }
  template <int R> float lo(int64_t b, int r) const { return val<R>(b, 2, r); }
  template <int R> float hi(int64_t b, int r) const { return val<R>(b, 3, r); }
  template <int R> float lo32(int64_t b, int r) const { return val<R>(b, 4, r); }  // 32 * lo, 32 * hi (Q6_K's offset)
  template <int R> float hi32(int64_t b, int r) const { return val<R>(b, 5, r); }
  template <int R> void block(int64_t b, int r, int8_t* out) const {  // row r's 32 values of block b
    for (int j = 0; j < 8; ++j) std::memcpy(out + 4 * j, words + (b * 8 + j) * R + r, 4);
  }
};

// One tile: up to kRows rows x 16 columns over every block of a column group, float totals
// out[r][c] (in registers for the SIMD builds). A block's dot products are exact int32 sums: a
// one-scale block applies d and m2 to their total; a two-scale block (Q6_K) applies d1 and d2 to
// its halves' sums, each corrected for the bytes' offset, and m. The AVX-512 kernels keep one
// chain a row (R accumulators besides the R totals: no spills at R = 8), two for tiles of under
// 4 rows (a one-row step would wait on one chain's latency), and Q6_K's halves one after the
// other; the AVX2 ones keep each half's sums apart.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
template <int R>
constexpr bool kSplit = R < 4;  // two accumulator chains a row (see tile_super)

template <int R, bool two>
void tile(const uint8_t* gp, int64_t nb, int64_t kind, const Rows& x, float out[kRows][kCols]) {
  const int bb = block_bytes(kind), qbytes = q_bytes(kind);
  const bool half = kind & kHalfScales;
  const bool nibbles = (kind & 3) == kNibble;
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* qb = gp + b * bb;
    // One-scale blocks with 4 rows or more: one chain a row (the sum is exact); else each
    // half its own (two-scale blocks: their own d; under 4 rows: latency, as tile_super's).
    constexpr bool halves = two || kSplit<R>;
    __m512i a[R], a2[halves ? R : 1];
    for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_si512();
    if constexpr (halves) {
      for (int r = 0; r < R; ++r) a2[r] = _mm512_setzero_si512();
    }
    if (nibbles) {
      for (int j = 0; j < 4; ++j) {
        const __m512i v = _mm512_loadu_si512(qb + 64 * j);
        const __m512i lo = _mm512_and_si512(v, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          const int32_t x0 = x.word<R>(b, j, r), x1 = x.word<R>(b, 4 + j, r);
          a[r] = _mm512_dpbusd_epi32(a[r], lo, _mm512_set1_epi32(x0));
          if constexpr (halves) {
            a2[r] = _mm512_dpbusd_epi32(a2[r], hi, _mm512_set1_epi32(x1));
          } else {
            a[r] = _mm512_dpbusd_epi32(a[r], hi, _mm512_set1_epi32(x1));  // (nibbles: one scale)
          }
        }
      }
    } else {
      for (int j = 0; j < 8; ++j) {
        const __m512i v = _mm512_loadu_si512(qb + 64 * j);
        for (int r = 0; r < R; ++r) {
          const int32_t x0 = x.word<R>(b, j, r);
          if constexpr (halves) {
            if (j < 4) {
              a[r] = _mm512_dpbusd_epi32(a[r], v, _mm512_set1_epi32(x0));
            } else {
              a2[r] = _mm512_dpbusd_epi32(a2[r], v, _mm512_set1_epi32(x0));
            }
          } else {
            a[r] = _mm512_dpbusd_epi32(a[r], v, _mm512_set1_epi32(x0));
          }
        }
      }
    }
    __m512 s[3];  // d, m2 (two-scale: d1, d2, m)
    for (int i = 0; i < (two ? 3 : 2); ++i) {
      s[i] = half ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + qbytes) + i))
                  : _mm512_loadu_ps(reinterpret_cast<const float*>(qb + qbytes) + kCols * i);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 scale = _mm512_set1_ps(x.sx<R>(b, r));
      if constexpr (two) {
        total[r] = _mm512_fmadd_ps(s[0], _mm512_fmsub_ps(scale, _mm512_cvtepi32_ps(a[r]), _mm512_set1_ps(kByteOffset * x.lo<R>(b, r))), total[r]);
        total[r] = _mm512_fmadd_ps(s[1], _mm512_fmsub_ps(scale, _mm512_cvtepi32_ps(a2[r]), _mm512_set1_ps(kByteOffset * x.hi<R>(b, r))), total[r]);
      } else {
        if constexpr (halves) a[r] = _mm512_add_epi32(a[r], a2[r]);
        total[r] = _mm512_fmadd_ps(_mm512_mul_ps(s[0], scale), _mm512_cvtepi32_ps(a[r]), total[r]);
      }
      total[r] = _mm512_fmadd_ps(s[two ? 2 : 1], _mm512_set1_ps(x.ssum<R>(b, r)), total[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out[r], total[r]);
}
// Bits 4 (Q5_K) or 4-5 (Q6_K) of the 4 inputs j of a block half, from its high-bit plane: shift
// bit j (2j) to 4 (16-bit shifts: the bits that cross a byte are masked off).
template <int hb>
inline __m512i plane_bits512(__m512i p, int j, bool upper) {
  const __m512i mask = _mm512_set1_epi8(hb == 2 ? 0x30 : 0x10);
  if constexpr (hb == 1) {
    if (upper) {  // bit 4 + j
      switch (j) {
        case 0: return _mm512_and_si512(p, mask);
        case 1: return _mm512_and_si512(_mm512_srli_epi16(p, 1), mask);
        case 2: return _mm512_and_si512(_mm512_srli_epi16(p, 2), mask);
        default: return _mm512_and_si512(_mm512_srli_epi16(p, 3), mask);
      }
    }
    switch (j) {  // bit j
      case 0: return _mm512_and_si512(_mm512_slli_epi16(p, 4), mask);
      case 1: return _mm512_and_si512(_mm512_slli_epi16(p, 3), mask);
      case 2: return _mm512_and_si512(_mm512_slli_epi16(p, 2), mask);
      default: return _mm512_and_si512(_mm512_slli_epi16(p, 1), mask);
    }
  } else {
    (void)upper;  // (each half its own plane)
    switch (j) {  // bits 2j, 2j + 1
      case 0: return _mm512_and_si512(_mm512_slli_epi16(p, 4), mask);
      case 1: return _mm512_and_si512(_mm512_slli_epi16(p, 2), mask);
      case 2: return _mm512_and_si512(p, mask);
      default: return _mm512_and_si512(_mm512_srli_epi16(p, 2), mask);
    }
  }
}

// One tile of a super-block kind (hb: 0 Q4_K, 1 Q5_K, 2 Q6_K): each block's q put together from
// its nibbles and bit planes, d = D * sc (and m = -Dmin * mn) formed per block, then as tile's.
template <int R, int hb>
void tile_super(const uint8_t* gp, int64_t ns, const Rows& x, float out[kRows][kCols]) {
  using S = Super<hb>;
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t s = 0; s < ns; ++s) {
    const uint8_t* sp = gp + s * S::kBytes;
    const __m512 big_d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp)));
    const uint8_t* scales = sp + Super<hb>::kHeadBytes;
    alignas(64) uint8_t scale_mins[2 * 8 * kCols];  // Q4_K / Q5_K: sc[8][16], mn[8][16]
    if constexpr (hb != 2) kscales_all(scales, scale_mins);
    for (int blk = 0; blk < 8; ++blk) {
      const int64_t b = s * 8 + blk;
      const uint8_t* qb = sp + S::kScaleBytes + blk * S::kQBytes;
      __m512i a[R];  // one chain a row: Q4_K / Q5_K a block (the sum is exact), Q6_K a half
      if constexpr (hb == 2) {
        // Each half with its own d, one after the other: its sums are applied before the next
        // half starts (R accumulators live, not 2R: no spills at R = 8), in the order of the
        // formula (d1's term, then d2's).
        auto sc = [&](int half) {
          return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + kCols * (2 * blk + half)))));
        };
        for (int half = 0; half < 2; ++half) {
          const __m512 dh = _mm512_mul_ps(big_d, sc(half));
          const __m512i plane = _mm512_loadu_si512(qb + 256 + 64 * half);
          for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const __m512i v = _mm512_loadu_si512(qb + 64 * j);
            const __m512i q = _mm512_or_si512(
                _mm512_and_si512(half == 0 ? v : _mm512_srli_epi16(v, 4), low), plane_bits512<2>(plane, j, half));
            for (int r = 0; r < R; ++r) a[r] = _mm512_dpbusd_epi32(a[r], q, _mm512_set1_epi32(x.word<R>(b, 4 * half + j, r)));
          }
          for (int r = 0; r < R; ++r) {
            const __m512 scale = _mm512_set1_ps(x.sx<R>(b, r));
            const __m512 offset = _mm512_set1_ps(half == 0 ? x.lo32<R>(b, r) : x.hi32<R>(b, r));
            total[r] = _mm512_fmadd_ps(dh, _mm512_fmsub_ps(scale, _mm512_cvtepi32_ps(a[r]), offset), total[r]);
          }
        }
      } else {
        // (with under 4 rows, a second chain a row for the high nibbles: one chain of 8
        // dependent vpdpbusd would bound a one-row step by its latency)
        __m512i a2[kSplit<R> ? R : 1];
        for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_si512();
        if constexpr (kSplit<R>) {
          for (int r = 0; r < R; ++r) a2[r] = _mm512_setzero_si512();
        }
        // (no unroll pragma here: with it, one-row steps measured slower)
        for (int j = 0; j < 4; ++j) {
          const __m512i v = _mm512_loadu_si512(qb + 64 * j);
          __m512i lo = _mm512_and_si512(v, low);
          __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
          if constexpr (hb == 1) {
            const __m512i p = _mm512_loadu_si512(qb + 256);
            lo = _mm512_or_si512(lo, plane_bits512<1>(p, j, false));
            hi = _mm512_or_si512(hi, plane_bits512<1>(p, j, true));
          }
          for (int r = 0; r < R; ++r) {
            a[r] = _mm512_dpbusd_epi32(a[r], lo, _mm512_set1_epi32(x.word<R>(b, j, r)));
            if constexpr (kSplit<R>) {
              a2[r] = _mm512_dpbusd_epi32(a2[r], hi, _mm512_set1_epi32(x.word<R>(b, 4 + j, r)));
            } else {
              a[r] = _mm512_dpbusd_epi32(a[r], hi, _mm512_set1_epi32(x.word<R>(b, 4 + j, r)));
            }
          }
        }
        if constexpr (kSplit<R>) {
          for (int r = 0; r < R; ++r) a[r] = _mm512_add_epi32(a[r], a2[r]);
        }
        auto u8 = [&](int i) {
          return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(scale_mins + kCols * i))));
        };
        const __m512 d = _mm512_mul_ps(big_d, u8(blk));
        const __m512 neg_dmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp) + 1));
        const __m512 m = _mm512_mul_ps(neg_dmin, u8(8 + blk));
        for (int r = 0; r < R; ++r) {
          const __m512 scale = _mm512_set1_ps(x.sx<R>(b, r));
          total[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, scale), _mm512_cvtepi32_ps(a[r]), total[r]);
          total[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(x.ssum<R>(b, r)), total[r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out[r], total[r]);
}
#elif defined(__AVX2__)
template <int R, bool two>
void tile(const uint8_t* gp, int64_t nb, int64_t kind, const Rows& x, float out[kRows][kCols]) {
  const int bb = block_bytes(kind), qbytes = q_bytes(kind);
  const bool half = kind & kHalfScales;
  const bool nibbles = (kind & 3) == kNibble;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int h = 0; h < 2; ++h) {  // columns 8h .. 8h + 7
    __m256 total[R];
    for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* qb = gp + b * bb;
      __m256i a[R], a2[R];
      for (int r = 0; r < R; ++r) a[r] = a2[r] = _mm256_setzero_si256();
      if (nibbles) {
        for (int j = 0; j < 4; ++j) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 64 * j + 32 * h));
          const __m256i lo = _mm256_and_si256(v, low);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          for (int r = 0; r < R; ++r) {
            const int32_t x0 = x.word<R>(b, j, r), x1 = x.word<R>(b, 4 + j, r);
            // (nibbles are never two-scale: both halves' products go into a, one madd for both)
            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)),
                                               _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)));
            a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(p, ones));
          }
        }
      } else {
        for (int j = 0; j < 8; ++j) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 64 * j + 32 * h));
          const __m256i w = _mm256_abs_epi8(v);
          for (int r = 0; r < R; ++r) {
            const int32_t x0 = x.word<R>(b, j, r);
            const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(x0), v);
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xs), ones);
            if (j < 4) {
              a[r] = _mm256_add_epi32(a[r], p);
            } else {
              a2[r] = _mm256_add_epi32(a2[r], p);
            }
          }
        }
      }
      __m256 s[3];  // d, m2 (two-scale: d1, d2, m)
      for (int i = 0; i < (two ? 3 : 2); ++i) {
        s[i] = half ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + qbytes + 32 * i + 16 * h)))
                    : _mm256_loadu_ps(reinterpret_cast<const float*>(qb + qbytes) + kCols * i + 8 * h);
      }
      for (int r = 0; r < R; ++r) {
        const __m256 scale = _mm256_set1_ps(x.sx<R>(b, r));
        if constexpr (two) {
          total[r] = _mm256_fmadd_ps(s[0], _mm256_fmsub_ps(scale, _mm256_cvtepi32_ps(a[r]), _mm256_set1_ps(kByteOffset * x.lo<R>(b, r))), total[r]);
          total[r] = _mm256_fmadd_ps(s[1], _mm256_fmsub_ps(scale, _mm256_cvtepi32_ps(a2[r]), _mm256_set1_ps(kByteOffset * x.hi<R>(b, r))), total[r]);
        } else {
          total[r] = _mm256_fmadd_ps(_mm256_mul_ps(s[0], scale), _mm256_cvtepi32_ps(_mm256_add_epi32(a[r], a2[r])), total[r]);
        }
        total[r] = _mm256_fmadd_ps(s[two ? 2 : 1], _mm256_set1_ps(x.ssum<R>(b, r)), total[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out[r] + 8 * h, total[r]);
  }
}
template <int hb>
inline __m256i plane_bits256(__m256i p, int j, bool upper) {
  const __m256i mask = _mm256_set1_epi8(hb == 2 ? 0x30 : 0x10);
  if constexpr (hb == 1) {
    if (upper) {
      switch (j) {
        case 0: return _mm256_and_si256(p, mask);
        case 1: return _mm256_and_si256(_mm256_srli_epi16(p, 1), mask);
        case 2: return _mm256_and_si256(_mm256_srli_epi16(p, 2), mask);
        default: return _mm256_and_si256(_mm256_srli_epi16(p, 3), mask);
      }
    }
    switch (j) {
      case 0: return _mm256_and_si256(_mm256_slli_epi16(p, 4), mask);
      case 1: return _mm256_and_si256(_mm256_slli_epi16(p, 3), mask);
      case 2: return _mm256_and_si256(_mm256_slli_epi16(p, 2), mask);
      default: return _mm256_and_si256(_mm256_slli_epi16(p, 1), mask);
    }
  } else {
    (void)upper;
    switch (j) {
      case 0: return _mm256_and_si256(_mm256_slli_epi16(p, 4), mask);
      case 1: return _mm256_and_si256(_mm256_slli_epi16(p, 2), mask);
      case 2: return _mm256_and_si256(p, mask);
      default: return _mm256_and_si256(_mm256_srli_epi16(p, 2), mask);
    }
  }
}

template <int R, int hb>
void tile_super(const uint8_t* gp, int64_t ns, const Rows& x, float out[kRows][kCols]) {
  using S = Super<hb>;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int h = 0; h < 2; ++h) {  // columns 8h .. 8h + 7
    __m256 total[R];
    for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
    for (int64_t s = 0; s < ns; ++s) {
      const uint8_t* sp = gp + s * S::kBytes;
      const __m256 big_d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp + 16 * h)));
      const uint8_t* scales = sp + Super<hb>::kHeadBytes;
      alignas(64) uint8_t scale_mins[2 * 8 * kCols];  // Q4_K / Q5_K: sc[8][16], mn[8][16]
      if constexpr (hb != 2) kscales_all(scales, scale_mins);
      for (int blk = 0; blk < 8; ++blk) {
        const int64_t b = s * 8 + blk;
        const uint8_t* qb = sp + S::kScaleBytes + blk * S::kQBytes;
        __m256i a[R], a2[R];
        for (int r = 0; r < R; ++r) a[r] = a2[r] = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 64 * j + 32 * h));
          __m256i lo = _mm256_and_si256(v, low);
          __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          if constexpr (hb == 1) {
            const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 256 + 32 * h));
            lo = _mm256_or_si256(lo, plane_bits256<1>(p, j, false));
            hi = _mm256_or_si256(hi, plane_bits256<1>(p, j, true));
          } else if constexpr (hb == 2) {
            lo = _mm256_or_si256(lo, plane_bits256<2>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 256 + 32 * h)), j, false));
            hi = _mm256_or_si256(hi, plane_bits256<2>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + 320 + 32 * h)), j, true));
          }
          for (int r = 0; r < R; ++r) {
            const int32_t x0 = x.word<R>(b, j, r), x1 = x.word<R>(b, 4 + j, r);
            // unsigned q (< 64) times int8 x: pairs within maddubs' int16 (2 * 63 * 128); one-
            // scale blocks (q < 32) add both halves in int16 too
            const __m256i plo = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0));
            const __m256i phi = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1));
            if constexpr (hb == 2) {
              a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(plo, ones));
              a2[r] = _mm256_add_epi32(a2[r], _mm256_madd_epi16(phi, ones));
            } else {
              a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(_mm256_add_epi16(plo, phi), ones));
            }
          }
        }
        if constexpr (hb == 2) {
          auto sc = [&](int half) {
            return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales + kCols * (2 * blk + half) + 8 * h))));
          };
          const __m256 d1 = _mm256_mul_ps(big_d, sc(0)), d2 = _mm256_mul_ps(big_d, sc(1));
          for (int r = 0; r < R; ++r) {
            const __m256 scale = _mm256_set1_ps(x.sx<R>(b, r));
            total[r] = _mm256_fmadd_ps(d1, _mm256_fmsub_ps(scale, _mm256_cvtepi32_ps(a[r]), _mm256_set1_ps(32.f * x.lo<R>(b, r))), total[r]);
            total[r] = _mm256_fmadd_ps(d2, _mm256_fmsub_ps(scale, _mm256_cvtepi32_ps(a2[r]), _mm256_set1_ps(32.f * x.hi<R>(b, r))), total[r]);
          }
        } else {
          auto u8 = [&](int i) {  // columns 8h .. 8h + 7
            return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scale_mins + kCols * i + 8 * h))));
          };
          const __m256 d = _mm256_mul_ps(big_d, u8(blk));
          const __m256 neg_dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp + 2 * kCols + 16 * h)));
          const __m256 m = _mm256_mul_ps(neg_dmin, u8(8 + blk));
          for (int r = 0; r < R; ++r) {
            const __m256 scale = _mm256_set1_ps(x.sx<R>(b, r));
            total[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, scale), _mm256_cvtepi32_ps(a[r]), total[r]);
            total[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(x.ssum<R>(b, r)), total[r]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out[r] + 8 * h, total[r]);
  }
}
#else
template <int R, bool two>
void tile(const uint8_t* gp, int64_t nb, int64_t kind, const Rows& x, float out[kRows][kCols]) {
  const int bb = block_bytes(kind);
  const bool nibbles = (kind & 3) == kNibble;
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < kCols; ++c) out[r][c] = 0.f;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* qb = gp + b * bb;
    for (int r = 0; r < R; ++r) {
      int8_t xb[kBlock];
      x.block<R>(b, r, xb);
      const float scale = x.sx<R>(b, r);
      for (int c = 0; c < kCols; ++c) {
        int32_t acc[2] = {0, 0};  // inputs 0..15, 16..31
        for (int j = 0; j < (nibbles ? 4 : 8); ++j) {
          for (int i = 0; i < 4; ++i) {
            const uint8_t byte = qb[64 * j + 4 * c + i];
            if (nibbles) {
              acc[0] += (byte & 0x0F) * xb[4 * j + i];
              acc[1] += (byte >> 4) * xb[16 + 4 * j + i];
            } else {
              acc[j / 4] += static_cast<int8_t>(byte) * xb[4 * j + i];
            }
          }
        }
        if constexpr (two) {
          out[r][c] += scale_at(qb, kind, 0, c) * (scale * static_cast<float>(acc[0]) - kByteOffset * x.lo<R>(b, r)) +
                       scale_at(qb, kind, 1, c) * (scale * static_cast<float>(acc[1]) - kByteOffset * x.hi<R>(b, r)) +
                       scale_at(qb, kind, 2, c) * x.ssum<R>(b, r);
        } else {
          out[r][c] += scale_at(qb, kind, 0, c) * scale * static_cast<float>(acc[0] + acc[1]) +
                       scale_at(qb, kind, 1, c) * x.ssum<R>(b, r);
        }
      }
    }
  }
}
// q[c][p] (p < 32, unsigned) of a super-block kind's block qb (the layout in the header comment).
template <int hb>
inline int super_q(const uint8_t* qb, int c, int p) {
  const int upper = p >= 16, j = (p & 15) >> 2, i = p & 3;
  const uint8_t byte = qb[64 * j + 4 * c + i];
  int v = upper ? byte >> 4 : byte & 15;
  if constexpr (hb == 1) v |= ((qb[256 + 4 * c + i] >> (upper ? 4 + j : j)) & 1) << 4;
  if constexpr (hb == 2) v |= ((qb[256 + 64 * upper + 4 * c + i] >> (2 * j)) & 3) << 4;
  return v;
}

template <int R, int hb>
void tile_super(const uint8_t* gp, int64_t ns, const Rows& x, float out[kRows][kCols]) {
  using S = Super<hb>;
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < kCols; ++c) out[r][c] = 0.f;
  }
  for (int64_t s = 0; s < ns; ++s) {
    const uint8_t* sp = gp + s * S::kBytes;
    const uint8_t* scales = sp + Super<hb>::kHeadBytes;
    for (int blk = 0; blk < 8; ++blk) {
      const int64_t b = s * 8 + blk;
      const uint8_t* qb = sp + S::kScaleBytes + blk * S::kQBytes;
      for (int c = 0; c < kCols; ++c) {
        const float big_d = half_to_float(sp + 2 * c);
        const float neg_dmin = hb == 2 ? 0.f : half_to_float(sp + 2 * (kCols + c));
        int q[kBlock];
        for (int p = 0; p < kBlock; ++p) q[p] = super_q<hb>(qb, c, p);
        float d = 0.f, m = 0.f;  // Q4_K / Q5_K: the block's d and m
        if constexpr (hb != 2) {
          int sc, mn;
          kscale(scales, blk, c, sc, mn);
          d = big_d * static_cast<float>(sc);
          m = neg_dmin * static_cast<float>(mn);
        }
        for (int r = 0; r < R; ++r) {
          int8_t xb[kBlock];
          x.block<R>(b, r, xb);
          int32_t acc[2] = {0, 0};
          for (int p = 0; p < kBlock; ++p) acc[p >> 4] += q[p] * xb[p];
          const float scale = x.sx<R>(b, r);
          if constexpr (hb == 2) {
            const float d1 = big_d * static_cast<float>(static_cast<int8_t>(scales[kCols * 2 * blk + c]));
            const float d2 = big_d * static_cast<float>(static_cast<int8_t>(scales[kCols * (2 * blk + 1) + c]));
            out[r][c] += d1 * (scale * static_cast<float>(acc[0]) - 32.f * x.lo<R>(b, r)) +
                         d2 * (scale * static_cast<float>(acc[1]) - 32.f * x.hi<R>(b, r));
          } else {
            out[r][c] += d * scale * static_cast<float>(acc[0] + acc[1]) + m * x.ssum<R>(b, r);
          }
        }
      }
    }
  }
}
#endif

// tile<t, two-scale or not> for a tile of t <= R rows.
template <int R>
void tile_rows(int t, const uint8_t* gp, int64_t nb, int64_t kind, const Rows& x, float out[kRows][kCols]) {
  if constexpr (R >= 1) {
    if (t == R) {
      return (kind & kTwoScales) ? tile<R, true>(gp, nb, kind, x, out) : tile<R, false>(gp, nb, kind, x, out);
    }
    tile_rows<R - 1>(t, gp, nb, kind, x, out);
  }
}

// tile_super<t, the kind's planes> for a tile of t <= R rows (ns super-blocks).
template <int R>
void tile_super_rows(int t, const uint8_t* gp, int64_t ns, int64_t kind, const Rows& x, float out[kRows][kCols]) {
  if constexpr (R >= 1) {
    if (t == R) {
      switch (super_planes(kind)) {
        case 0: return tile_super<R, 0>(gp, ns, x, out);
        case 1: return tile_super<R, 1>(gp, ns, x, out);
        default: return tile_super<R, 2>(gp, ns, x, out);
      }
    }
    tile_super_rows<R - 1>(t, gp, ns, kind, x, out);
  }
}

// The bytes of a packed weight [N, K] with these kinds for its column groups.
int64_t packed_nbytes(int64_t n, int64_t k, const std::vector<int64_t>& kinds) {
  const int64_t groups = (n + kCols - 1) / kCols;
  TORCH_CHECK(static_cast<int64_t>(kinds.size()) == groups, "q8: ", groups, " column groups, ", kinds.size(), " kinds");
  int64_t size = data_start(groups);
  for (const int64_t kind : kinds) size += group_bytes(kind, k);
  return size;
}

// Write the header and group table of such a weight into `out` (its bytes, zeroed).
void init_packed(uint8_t* out, int64_t n, int64_t k, const std::vector<int64_t>& kinds) {
  const int64_t groups = (n + kCols - 1) / kCols;
  std::vector<Group> table(groups);
  int64_t offset = 0;
  for (int64_t g = 0; g < groups; ++g) {
    table[g] = Group{kinds[g], offset};
    offset += group_bytes(kinds[g], k);
  }
  const Header header{kMagic, n, k, groups};
  std::memcpy(out, &header, sizeof(header));
  std::memcpy(out + kHeader, table.data(), groups * sizeof(Group));
}

at::Tensor new_packed(int64_t n, int64_t k, const std::vector<int64_t>& kinds) {
  at::Tensor out = at::zeros({packed_nbytes(n, k, kinds)}, at::TensorOptions().dtype(at::kByte));
  init_packed(out.data_ptr<uint8_t>(), n, k, kinds);
  return out;
}

Header read_header(const at::Tensor& packed, const char* what) {
  TORCH_CHECK(packed.dim() == 1 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() >= kHeader,
              what, ": packed must come from q8_pack or q8_kquant_new");
  Header h;
  std::memcpy(&h, packed.data_ptr<uint8_t>(), sizeof(h));
  TORCH_CHECK(h.magic == kMagic && packed.numel() >= data_start(h.groups), what,
              ": packed must come from q8_pack or q8_kquant_new");
  return h;
}

// The kinds of a super-block-kind weight [N, K] (K a multiple of 256) from `types`, the GGUF K
// type of each column group of 16 outputs: 4 (Q4_K), 5 (Q5_K) or 6 (Q6_K).
std::vector<int64_t> kquant_kinds(int64_t n, int64_t k, at::IntArrayRef types) {
  TORCH_CHECK(n > 0 && k > 0 && k % kSuper == 0, "q8_kquant: K must be a positive multiple of 256, got ", k);
  std::vector<int64_t> kinds;
  for (const int64_t t : types) {
    TORCH_CHECK(t == 4 || t == 5 || t == 6, "q8_kquant: types must be 4 (Q4_K), 5 (Q5_K) or 6 (Q6_K), got ", t);
    kinds.push_back(t == 4 ? kQ4K : t == 5 ? kQ5K : kQ6K);
  }
  return kinds;
}

int64_t q8_kquant_nbytes(int64_t n, int64_t k, at::IntArrayRef types) {
  return packed_nbytes(n, k, kquant_kinds(n, k, types));
}

// An empty such weight in `out` (zeroed uint8 of q8_kquant_nbytes bytes, e.g. a slice of one
// huge-page buffer for them all); q8_kquant_fill writes its rows.
void q8_kquant_init(const at::Tensor& out, int64_t n, int64_t k, at::IntArrayRef types) {
  const std::vector<int64_t> kinds = kquant_kinds(n, k, types);
  TORCH_CHECK(out.dim() == 1 && out.scalar_type() == at::kByte && out.is_contiguous() &&
                  out.numel() == packed_nbytes(n, k, kinds),
              "q8_kquant_init: out must be contiguous uint8 of q8_kquant_nbytes bytes");
  init_packed(out.data_ptr<uint8_t>(), n, k, kinds);
}

at::Tensor q8_kquant_new(int64_t n, int64_t k, at::IntArrayRef types) {
  return new_packed(n, k, kquant_kinds(n, k, types));
}

// A GGUF K-quant super-block (256 inputs) as q (unsigned: Q6_K's + 32), sub-block scales and
// float super-block scales (ggml's layouts; packed_linear._decode_k_rows in numpy).
struct Decoded {
  uint8_t q[kSuper];
  uint8_t sc[16];  // Q6_K: sc[16] (int8 bits); Q4_K / Q5_K: the file's 12 bytes of scales and mins
  uint16_t d_bits, dmin_bits;  // the file's float16 D and Dmin
};

void decode_super(const uint8_t* raw, int64_t kind, Decoded& out) {
  if (kind == kQ6K) {
    const uint8_t *ql = raw, *qh = raw + 128;
    for (int e = 0; e < kSuper; ++e) {
      const int h = e / 128, t = e % 128;
      const int lo4 = (ql[64 * h + t % 64] >> (4 * (t / 64))) & 15;
      const int hi2 = (qh[32 * h + t % 32] >> (2 * (t / 32))) & 3;
      out.q[e] = static_cast<uint8_t>(lo4 | (hi2 << 4));
    }
    std::memcpy(out.sc, raw + 192, 16);
    std::memcpy(&out.d_bits, raw + 208, 2);
    out.dmin_bits = 0;
    return;
  }
  std::memcpy(&out.d_bits, raw, 2);
  std::memcpy(&out.dmin_bits, raw + 2, 2);
  std::memcpy(out.sc, raw + 4, 12);  // as they are (the kernels' kscale takes them apart)
  const uint8_t* qs = raw + (kind == kQ4K ? 16 : 48);
  for (int b = 0; b < 8; ++b) {
    for (int i = 0; i < kBlock; ++i) {
      int v = (qs[32 * (b / 2) + i] >> (4 * (b % 2))) & 15;
      if (kind == kQ5K) v |= ((raw[16 + i] >> b) & 1) << 4;
      out.q[kBlock * b + i] = static_cast<uint8_t>(v);
    }
  }
}

// Rows [row0, row0 + rows) of a q8_kquant_new weight from the GGUF blocks `raw` (uint8 [rows,
// K / 256 * the type's block bytes], rows may be further apart): each row into its column's
// place, its type the one its group was made for (checked by the row's bytes).
void q8_kquant_fill(const at::Tensor& packed, int64_t row0, const at::Tensor& raw) {
  const Header h = read_header(packed, "q8_kquant_fill");
  TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == at::kByte && raw.stride(1) == 1,
              "q8_kquant_fill: raw must be uint8 [rows, bytes] with unit column stride");
  const int64_t rows = raw.size(0), ns = h.k / kSuper;
  TORCH_CHECK(row0 >= 0 && row0 + rows <= h.n, "q8_kquant_fill: rows ", row0, "..", row0 + rows, " of ", h.n);
  uint8_t* base = packed.data_ptr<uint8_t>();
  const Group* table = reinterpret_cast<const Group*>(base + kHeader);
  uint8_t* data = base + data_start(h.groups);
  for (int64_t g = row0 / kCols; rows > 0 && g <= (row0 + rows - 1) / kCols; ++g) {  // each group's kind fits
    const int64_t kind = table[g].kind;
    TORCH_CHECK(kind & kSuperKinds, "q8_kquant_fill: column group ", g, " is not a K-quant group");
    const int64_t want = ns * (kind == kQ4K ? 144 : kind == kQ5K ? 176 : 210);
    TORCH_CHECK(raw.size(1) == want, "q8_kquant_fill: rows have ", raw.size(1), " bytes, column group ", g, "'s type ",
                kind == kQ4K ? "Q4_K" : kind == kQ5K ? "Q5_K" : "Q6_K", " ", want);
  }
  const uint8_t* rp = raw.data_ptr<uint8_t>();
  const int64_t rstride = raw.stride(0);
  cpu_pool::parallel_for(rows, 64, [&](int64_t begin, int64_t end) {
    Decoded dec;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t col = row0 + r, g = col / kCols;
      const int c = static_cast<int>(col % kCols);
      const int64_t kind = table[g].kind;
      const int hb = super_planes(kind), sb = super_bytes(kind);
      const int file_bytes = kind == kQ4K ? 144 : kind == kQ5K ? 176 : 210;
      const int scale_bytes = hb == 2 ? Super<2>::kScaleBytes : Super<0>::kScaleBytes;
      const int qbytes = 256 + 64 * hb;
      for (int64_t s = 0; s < ns; ++s) {
        decode_super(rp + r * rstride + s * file_bytes, kind, dec);
        uint8_t* sp = data + table[g].offset + s * sb;
        std::memcpy(sp + 2 * c, &dec.d_bits, 2);
        uint8_t* scales = sp + (hb == 2 ? Super<2>::kHeadBytes : Super<0>::kHeadBytes);
        if (hb == 2) {
          for (int i = 0; i < 16; ++i) scales[kCols * i + c] = dec.sc[i];
        } else {
          const uint16_t neg_dmin = dec.dmin_bits ^ 0x8000;  // -Dmin: the sign bit flipped, exact
          std::memcpy(sp + 2 * (kCols + c), &neg_dmin, 2);
          for (int i = 0; i < 12; ++i) scales[kCols * i + c] = dec.sc[i];
        }
        for (int b = 0; b < 8; ++b) {
          uint8_t* qb = sp + scale_bytes + b * qbytes;
          const uint8_t* q = dec.q + kBlock * b;
          for (int j = 0; j < 4; ++j) {
            for (int i = 0; i < 4; ++i) {
              const int lo_v = q[4 * j + i], hi_v = q[16 + 4 * j + i];
              qb[64 * j + 4 * c + i] = static_cast<uint8_t>((lo_v & 15) | ((hi_v & 15) << 4));
              if (hb == 1) {
                qb[256 + 4 * c + i] |= static_cast<uint8_t>((((lo_v >> 4) & 1) << j) | (((hi_v >> 4) & 1) << (4 + j)));
              } else if (hb == 2) {
                qb[256 + 4 * c + i] |= static_cast<uint8_t>(((lo_v >> 4) & 3) << (2 * j));
                qb[320 + 4 * c + i] |= static_cast<uint8_t>(((hi_v >> 4) & 3) << (2 * j));
              }
            }
          }
        }
      }
    }
  });
}

// Two-scale weights (d2 given: Q6_K's d per 16 inputs) are stored as bytes with d1, d2 and m
// (the offset corrected per half at run time); others with d and m2 = m - offset * d.
// Packed into `into` (zeroed uint8 of at least q8_pack_bound bytes: a slice of one buffer for
// many weights) when given, else into a new tensor; returns the packed weight (a slice of
// `into`, of the bytes its form takes).
at::Tensor pack_blocks(const at::Tensor& d, const at::Tensor& m, const at::Tensor& q,
                       const std::optional<at::Tensor>& d2, const at::Tensor* into) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q8_pack: q must be int8 [N, K]");
  const int64_t n = q.size(0), k = q.size(1);
  TORCH_CHECK(k % kBlock == 0, "q8_pack: K must be a multiple of 32, got ", k);
  const int64_t nb = k / kBlock;
  auto check_scales = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 && t.size(0) == n &&
                    t.size(1) == nb,
                "q8_pack: ", name, " must be float32 [N, K / 32]");
  };
  check_scales(d, "d");
  check_scales(m, "m");
  const bool two = d2.has_value() && d2->defined();
  if (two) check_scales(*d2, "d2");
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* dp = d.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  const float* d2p = two ? d2->data_ptr<float>() : nullptr;
  int lo = 127, hi = -128;
  for (int64_t i = 0; i < n * k; ++i) {
    lo = std::min<int>(lo, qp[i]);
    hi = std::max<int>(hi, qp[i]);
  }
  int offset = kByteOffset;
  int64_t kind = kByte;
  if (two) {
    kind |= kTwoScales;
  } else if (lo >= 0 && hi <= 15) {
    kind = kNibble;
    offset = 0;
  } else if (lo >= -8 && hi <= 7) {
    kind = kNibble;
    offset = 8;
  }
  // The scales a block stores, in order: d, m2 (or d1, d2, m for two-scale blocks).
  const int count = two ? 3 : 2;
  auto scale = [&](int64_t i, int which) -> float {
    if (two) return which == 0 ? dp[i] : which == 1 ? d2p[i] : mp[i];
    return which == 0 ? dp[i] : mp[i] - static_cast<float>(offset) * dp[i];
  };
  // As float16 where every one is a float16 value (Q4_0/Q4_1/Q8_0: less to read), else float32
  // (K-quants' d * sc).
  bool half = true;
  for (int64_t i = 0; i < n * nb && half; ++i) {
    for (int which = 0; which < count; ++which) {
      const float v = scale(i, which);
      half = half && static_cast<float>(c10::Half(v)) == v;
    }
  }
  if (half) kind |= kHalfScales;
  const int64_t groups = (n + kCols - 1) / kCols;
  const int bb = block_bytes(kind);
  const std::vector<int64_t> kinds(groups, kind);
  at::Tensor out;
  if (into != nullptr) {
    const int64_t size = packed_nbytes(n, k, kinds);
    TORCH_CHECK(into->dim() == 1 && into->scalar_type() == at::kByte && into->is_contiguous() && into->numel() >= size,
                "q8_pack_into: out must be contiguous uint8 of q8_pack_bound bytes");
    out = into->narrow(0, 0, size);
    init_packed(out.data_ptr<uint8_t>(), n, k, kinds);
  } else {
    out = new_packed(n, k, kinds);
  }
  uint8_t* op = out.data_ptr<uint8_t>() + data_start(groups);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* blk = op + (g * nb + b) * bb;
      uint8_t* scales = blk + q_bytes(kind);
      for (int c = 0; c < kCols; ++c) {
        const int64_t col = g * kCols + c;
        if (col >= n) continue;
        const int8_t* qc = qp + col * k + b * kBlock;
        for (int which = 0; which < count; ++which) {
          const float v = scale(col * nb + b, which);
          if (half) {
            const uint16_t bits = c10::Half(v).x;
            std::memcpy(scales + 2 * (which * kCols + c), &bits, 2);
          } else {
            std::memcpy(scales + 4 * (which * kCols + c), &v, 4);
          }
        }
        if ((kind & 3) == kNibble) {
          for (int j = 0; j < 4; ++j) {
            for (int i = 0; i < 4; ++i) {
              const int lo_v = qc[4 * j + i] + offset, hi_v = qc[16 + 4 * j + i] + offset;
              blk[64 * j + 4 * c + i] = static_cast<uint8_t>(lo_v | (hi_v << 4));
            }
          }
        } else {
          for (int j = 0; j < 8; ++j) {
            for (int i = 0; i < 4; ++i) {
              blk[64 * j + 4 * c + i] = static_cast<uint8_t>(qc[4 * j + i] + offset);
            }
          }
        }
      }
    }
  }
  return out;
}

at::Tensor q8_pack(const at::Tensor& d, const at::Tensor& m, const at::Tensor& q,
                   const std::optional<at::Tensor>& d2) {
  return pack_blocks(d, m, q, d2, nullptr);
}

at::Tensor q8_pack_into(const at::Tensor& out, const at::Tensor& d, const at::Tensor& m, const at::Tensor& q,
                        const std::optional<at::Tensor>& d2) {
  return pack_blocks(d, m, q, d2, &out);
}

// The most bytes q8_pack takes for a weight [N, K] (bytes with float32 d, d2 and m).
int64_t q8_pack_bound(int64_t n, int64_t k) {
  TORCH_CHECK(n > 0 && k > 0 && k % kBlock == 0, "q8_pack_bound: K must be a positive multiple of 32, got ", k);
  return packed_nbytes(n, k, std::vector<int64_t>((n + kCols - 1) / kCols, kByte | kTwoScales));
}

}  // namespace

bool shardline_cpu::is_q8(const at::Tensor& packed) {
  if (packed.dim() != 1 || packed.scalar_type() != at::kByte || packed.numel() < kHeader || !packed.is_contiguous()) {
    return false;
  }
  int64_t magic;
  std::memcpy(&magic, packed.data_ptr<uint8_t>(), sizeof(magic));
  return magic == kMagic;
}

int64_t shardline_cpu::q8_in_features(const at::Tensor& packed) {
  return read_header(packed, "q8_in_features").k;
}

void shardline_cpu::q8_gemm(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                            const std::optional<at::Tensor>& bias) {
  const Header h = read_header(packed, "q8_gemm");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) == h.k && x.stride(1) == 1,
              "q8_gemm: x must be float32 [M, ", h.k, "] with unit column stride");
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && out.size(0) == x.size(0) &&
                  out.size(1) == h.n && out.stride(1) == 1,
              "q8_gemm: out must be float32 [M, ", h.n, "]");
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == h.n,
                "q8_gemm: bias must be float32 [N]");
    bp = bias->data_ptr<float>();
  }
  const int64_t rows = x.size(0), k = h.k, n = h.n, nb = k / kBlock;
  if (rows == 0) return;
  const int64_t tile_words = nb * 8 * kRows, tile_vals = nb * kVals * kRows;
  const int64_t tiles = (rows + kRows - 1) / kRows;
  // Rows' layout, tile after tile; every element a tile's kernels read is written below, so
  // the buffers are not zeroed (prefill's would be tens of MB a GEMM)
  const std::unique_ptr<int32_t[]> words(new int32_t[tiles * tile_words]);
  const std::unique_ptr<float[]> vals(new float[tiles * tile_vals]);
  const float* xp = x.data_ptr<float>();
  const int64_t xstride = x.stride(0);
  cpu_pool::parallel_for(rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> q(k);
    std::vector<float> scale(nb);
    std::vector<int32_t> sum(nb), first(nb);
    for (int64_t r = begin; r < end; ++r) {
      quantize_row(xp + r * xstride, k, q.data(), scale.data(), sum.data(), first.data());
      const int64_t at = r % kRows, stride = std::min<int64_t>(kRows, rows - r / kRows * kRows);  // the tile's rows
      int32_t* w = words.get() + r / kRows * tile_words;
      float* v = vals.get() + r / kRows * tile_vals;
      for (int64_t b = 0; b < nb; ++b) {
        for (int j = 0; j < 8; ++j) std::memcpy(w + (b * 8 + j) * stride + at, q.data() + b * kBlock + 4 * j, 4);
        const float lo = scale[b] * static_cast<float>(first[b]), hi = scale[b] * static_cast<float>(sum[b] - first[b]);
        const float row[kVals] = {scale[b], scale[b] * static_cast<float>(sum[b]), lo, hi, 32.f * lo, 32.f * hi};
        for (int i = 0; i < kVals; ++i) v[(b * kVals + i) * stride + at] = row[i];
      }
    }
  });
  const Group* table = reinterpret_cast<const Group*>(packed.data_ptr<uint8_t>() + kHeader);
  const uint8_t* base = packed.data_ptr<uint8_t>() + data_start(h.groups);
  float* op = out.data_ptr<float>();
  const int64_t ostride = out.stride(0);
  const int64_t groups = (n + kCols - 1) / kCols;
  cpu_pool::parallel_for(groups, 1, [&](int64_t g0, int64_t g1) {
    float total[kRows][kCols];
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* gp = base + table[g].offset;
      const int64_t kind = table[g].kind;
      const int cols = static_cast<int>(std::min<int64_t>(kCols, n - g * kCols));
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
        const int t = static_cast<int>(std::min<int64_t>(kRows, rows - r0));
        const Rows rx{words.get() + r0 / kRows * tile_words, vals.get() + r0 / kRows * tile_vals};
        if (kind & kSuperKinds) {
          tile_super_rows<kRows>(t, gp, k / kSuper, kind, rx, total);
        } else {
          tile_rows<kRows>(t, gp, nb, kind, rx, total);
        }
        for (int r = 0; r < t; ++r) {
          float* orow = op + (r0 + r) * ostride + g * kCols;
          for (int c = 0; c < cols; ++c) orow[c] = total[r][c] + (bp ? bp[g * kCols + c] : 0.f);
        }
      }
    }
  });
}

namespace {
void q8_gemm_op(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                const std::optional<at::Tensor>& bias) {
  shardline_cpu::q8_gemm(out, x, packed, bias);
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(shardline, m) {
  m.def("q8_pack(Tensor d, Tensor m, Tensor q, Tensor? d2=None) -> Tensor");
  m.def("q8_gemm(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
  m.def("q8_kquant_new(int n, int k, int[] types) -> Tensor", &q8_kquant_new);  // (no tensor to dispatch on)
  m.def("q8_kquant_nbytes(int n, int k, int[] types) -> int", &q8_kquant_nbytes);
  m.def("q8_kquant_init(Tensor(a!) out, int n, int k, int[] types) -> ()");
  m.def("q8_pack_into(Tensor(a!) out, Tensor d, Tensor m, Tensor q, Tensor? d2=None) -> Tensor(a)");
  m.def("q8_pack_bound(int n, int k) -> int", &q8_pack_bound);
  m.def("q8_kquant_fill(Tensor(a!) packed, int row0, Tensor raw) -> ()");
}

TORCH_LIBRARY_IMPL(shardline, CPU, m) {
  m.impl("q8_pack", &q8_pack);
  m.impl("q8_gemm", &q8_gemm_op);
  m.impl("q8_kquant_fill", &q8_kquant_fill);
  m.impl("q8_kquant_init", &q8_kquant_init);
  m.impl("q8_pack_into", &q8_pack_into);
}
