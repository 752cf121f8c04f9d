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
// Layout (q8_pack): the output columns in groups of 16, each group's blocks one after another;
// per block the q, then d[16] and m2[16], as float16 where every one of the weight's is a float16
// value (Q4_0, Q4_1, Q8_0), else as float32 (K-quants):
//   * nibbles (every q in 0..15, or -8..7 stored as q + 8): 256 bytes, byte [j][c][i] holding
//     q[c][4j + i] in its low and q[c][16 + 4j + i] in its high nibble (j < 4);
//   * bytes: 512 bytes, byte [j][c][i] = q[c][4j + i] (j < 8): with AVX512-VNNI as q + 128
//     (vpdpbusd multiplies unsigned weights by signed activations), else as signed int8 (AVX2's
//     maddubs takes |q| and x_q with q's sign, which cannot overflow its int16 sums).
// So one 64-byte load holds 4 consecutive inputs of 16 columns: the vpdpbusd / maddubs operand.
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

// storage | kHalfScales | kTwoScales (two d per block, one per 16 inputs: Q6_K; bytes only)
enum Kind : int64_t { kNibble = 1, kByte = 2, kHalfScales = 4, kTwoScales = 8 };

struct Header {
  int64_t magic, kind, n, k;
};

inline int q_bytes(int64_t kind) { return (kind & 3) == kNibble ? 256 : 512; }
inline int num_scales(int64_t kind) { return (kind & kTwoScales) ? 3 : 2; }
inline int block_bytes(int64_t kind) {
  return q_bytes(kind) + num_scales(kind) * kCols * ((kind & kHalfScales) ? 2 : 4);
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
// and the sum of its first 16 (two-scale blocks correct each half for the bytes' offset).
void quantize_row(const float* x, int64_t k, int8_t* q, float* scale, int32_t* sum, int32_t* first_half) {
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
}

// A tile's rows of x: each row's int8 values, and per block its scale, scale * sum and (two-scale
// blocks) each half's offset correction, offset * scale * (the half's sum).
struct Rows {
  const int8_t* xq[kRows];
  const float* sx[kRows];
  const float* ssum[kRows];
  const float* corr_lo[kRows];
  const float* corr_hi[kRows];
};

// One tile: up to kRows rows x 16 columns over every block of a column group, float totals
// out[r][c] (in registers for the SIMD builds). Each block's dot products are kept per half (a:
// inputs 0..15, a2: 16..31; two chains, not one of 8 dependent vpdpbusd): a one-scale block adds
// them and applies d and m2; a two-scale block (Q6_K) applies d1 and d2 to its halves, each
// corrected for the bytes' offset, and m.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
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
    __m512i a[R], a2[R];
    for (int r = 0; r < R; ++r) a[r] = a2[r] = _mm512_setzero_si512();
    if (nibbles) {
      for (int j = 0; j < 4; ++j) {
        const __m512i v = _mm512_loadu_si512(qb + 64 * j);
        const __m512i lo = _mm512_and_si512(v, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          int32_t x0, x1;
          std::memcpy(&x0, x.xq[r] + b * kBlock + 4 * j, 4);
          std::memcpy(&x1, x.xq[r] + b * kBlock + 16 + 4 * j, 4);
          a[r] = _mm512_dpbusd_epi32(a[r], lo, _mm512_set1_epi32(x0));
          a2[r] = _mm512_dpbusd_epi32(a2[r], hi, _mm512_set1_epi32(x1));
        }
      }
    } else {
      for (int j = 0; j < 8; ++j) {
        const __m512i v = _mm512_loadu_si512(qb + 64 * j);
        for (int r = 0; r < R; ++r) {
          int32_t x0;
          std::memcpy(&x0, x.xq[r] + b * kBlock + 4 * j, 4);
          if (j < 4) {
            a[r] = _mm512_dpbusd_epi32(a[r], v, _mm512_set1_epi32(x0));
          } else {
            a2[r] = _mm512_dpbusd_epi32(a2[r], v, _mm512_set1_epi32(x0));
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
      const __m512 scale = _mm512_set1_ps(x.sx[r][b]);
      if constexpr (two) {
        total[r] = _mm512_fmadd_ps(s[0], _mm512_fmsub_ps(scale, _mm512_cvtepi32_ps(a[r]), _mm512_set1_ps(x.corr_lo[r][b])), total[r]);
        total[r] = _mm512_fmadd_ps(s[1], _mm512_fmsub_ps(scale, _mm512_cvtepi32_ps(a2[r]), _mm512_set1_ps(x.corr_hi[r][b])), total[r]);
      } else {
        total[r] = _mm512_fmadd_ps(_mm512_mul_ps(s[0], scale), _mm512_cvtepi32_ps(_mm512_add_epi32(a[r], a2[r])), total[r]);
      }
      total[r] = _mm512_fmadd_ps(s[two ? 2 : 1], _mm512_set1_ps(x.ssum[r][b]), total[r]);
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
            int32_t x0, x1;
            std::memcpy(&x0, x.xq[r] + b * kBlock + 4 * j, 4);
            std::memcpy(&x1, x.xq[r] + b * kBlock + 16 + 4 * j, 4);
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
            int32_t x0;
            std::memcpy(&x0, x.xq[r] + b * kBlock + 4 * j, 4);
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
        const __m256 scale = _mm256_set1_ps(x.sx[r][b]);
        if constexpr (two) {
          total[r] = _mm256_fmadd_ps(s[0], _mm256_fmsub_ps(scale, _mm256_cvtepi32_ps(a[r]), _mm256_set1_ps(x.corr_lo[r][b])), total[r]);
          total[r] = _mm256_fmadd_ps(s[1], _mm256_fmsub_ps(scale, _mm256_cvtepi32_ps(a2[r]), _mm256_set1_ps(x.corr_hi[r][b])), total[r]);
        } else {
          total[r] = _mm256_fmadd_ps(_mm256_mul_ps(s[0], scale), _mm256_cvtepi32_ps(_mm256_add_epi32(a[r], a2[r])), total[r]);
        }
        total[r] = _mm256_fmadd_ps(s[two ? 2 : 1], _mm256_set1_ps(x.ssum[r][b]), total[r]);
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
      const int8_t* xb = x.xq[r] + b * kBlock;
      const float scale = x.sx[r][b];
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
          out[r][c] += scale_at(qb, kind, 0, c) * (scale * static_cast<float>(acc[0]) - x.corr_lo[r][b]) +
                       scale_at(qb, kind, 1, c) * (scale * static_cast<float>(acc[1]) - x.corr_hi[r][b]) +
                       scale_at(qb, kind, 2, c) * x.ssum[r][b];
        } else {
          out[r][c] += scale_at(qb, kind, 0, c) * scale * static_cast<float>(acc[0] + acc[1]) +
                       scale_at(qb, kind, 1, c) * x.ssum[r][b];
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

// Two-scale weights (d2 given: Q6_K's d per 16 inputs) are stored as bytes with d1, d2 and m
// (the offset corrected per half at run time); others with d and m2 = m - offset * d.
at::Tensor q8_pack(const at::Tensor& d, const at::Tensor& m, const at::Tensor& q,
                   const std::optional<at::Tensor>& d2) {
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
  at::Tensor out = at::zeros({kHeader + groups * nb * bb}, q.options().dtype(at::kByte));
  uint8_t* op = out.data_ptr<uint8_t>();
  const Header header{kMagic, kind, n, k};
  std::memcpy(op, &header, sizeof(header));
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* blk = op + kHeader + (g * nb + b) * bb;
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
  TORCH_CHECK(is_q8(packed), "q8_in_features: packed must come from q8_pack");
  Header h;
  std::memcpy(&h, packed.data_ptr<uint8_t>(), sizeof(h));
  return h.k;
}

void shardline_cpu::q8_gemm(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() >= kHeader,
              "q8_gemm: packed must come from q8_pack");
  Header h;
  std::memcpy(&h, packed.data_ptr<uint8_t>(), sizeof(h));
  TORCH_CHECK(h.magic == kMagic, "q8_gemm: packed must come from q8_pack");
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
  std::vector<int8_t> xq(rows * k);
  std::vector<float> xs(rows * nb);
  std::vector<int32_t> xsum(rows * nb), xfirst(rows * nb);
  const float* xp = x.data_ptr<float>();
  const int64_t xstride = x.stride(0);
  cpu_pool::parallel_for(rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      quantize_row(xp + r * xstride, k, xq.data() + r * k, xs.data() + r * nb, xsum.data() + r * nb,
                   xfirst.data() + r * nb);
    }
  });
  const uint8_t* base = packed.data_ptr<uint8_t>() + kHeader;
  const int bb = block_bytes(h.kind);
  float* op = out.data_ptr<float>();
  const int64_t ostride = out.stride(0);
  const int64_t groups = (n + kCols - 1) / kCols;
  std::vector<float> ssum(rows * nb);
  for (int64_t i = 0; i < rows * nb; ++i) ssum[i] = xs[i] * static_cast<float>(xsum[i]);
  // Two-scale blocks: each half's offset correction, offset * scale * (the half's sum).
  std::vector<float> corr_lo, corr_hi;
  if (h.kind & kTwoScales) {
    corr_lo.resize(rows * nb);
    corr_hi.resize(rows * nb);
    for (int64_t i = 0; i < rows * nb; ++i) {
      corr_lo[i] = static_cast<float>(kByteOffset) * xs[i] * static_cast<float>(xfirst[i]);
      corr_hi[i] = static_cast<float>(kByteOffset) * xs[i] * static_cast<float>(xsum[i] - xfirst[i]);
    }
  }
  cpu_pool::parallel_for(groups, 1, [&](int64_t g0, int64_t g1) {
    float total[kRows][kCols];
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* gp = base + g * nb * bb;
      const int cols = static_cast<int>(std::min<int64_t>(kCols, n - g * kCols));
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
        const int t = static_cast<int>(std::min<int64_t>(kRows, rows - r0));
        Rows rx{};
        for (int r = 0; r < t; ++r) {
          rx.xq[r] = xq.data() + (r0 + r) * k;
          rx.sx[r] = xs.data() + (r0 + r) * nb;
          rx.ssum[r] = ssum.data() + (r0 + r) * nb;
          if (h.kind & kTwoScales) {
            rx.corr_lo[r] = corr_lo.data() + (r0 + r) * nb;
            rx.corr_hi[r] = corr_hi.data() + (r0 + r) * nb;
          }
        }
        tile_rows<kRows>(t, gp, nb, h.kind, rx, total);
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
}

TORCH_LIBRARY_IMPL(shardline, CPU, m) {
  m.impl("q8_pack", &q8_pack);
  m.impl("q8_gemm", &q8_gemm_op);
}
