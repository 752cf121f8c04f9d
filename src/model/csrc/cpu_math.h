// Float32 helpers shared by the CPU kernels (paged_decode.cpp, cpu_ops.cpp): a dot product in
// independent lanes, and e^x without libm.
//
// e^x: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, then a degree-7 polynomial for e^r:
// relative error about 2e-7, below float32's resolution of the sums it feeds. Branch-free, so
// gcc -O3 vectorizes loops over it without -ffast-math; exp512 is the same with AVX-512.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cpu_math {

constexpr int64_t kLanes = 16;

// a . b over n values as kLanes independent partial sums (vectorizable without reassociation).
// kDim > 0 is n known at compile time (the loops unroll; 64 and 128 are instantiated).
template <int64_t kDim = 0>
inline float lane_dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  if constexpr (kDim > 0) n = kDim;
  const int64_t whole = n - n % kLanes;
  float partial[kLanes] = {};
  for (int64_t i = 0; i < whole; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) partial[j] += a[i + j] * b[i + j];
  }
  float sum = 0.f;
  for (int64_t i = whole; i < n; ++i) sum += a[i] * b[i];
  for (int64_t j = 0; j < kLanes; ++j) sum += partial[j];
  return sum;
}

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
constexpr float kMin = -87.f;         // e^-87 ~ 1.6e-38, the smallest normal float: below, 0
constexpr float kMax = 88.f;          // e^88 ~ 1.7e38: above, +inf
constexpr float kPoly[8] = {1.98412698e-4f, 1.38888889e-3f, 8.33333333e-3f, 4.16666667e-2f,
                            1.66666667e-1f, 0.5f, 1.f, 1.f};

inline float exp_approx(float v) {
  const float clamped = std::min(std::max(v, kMin), kMax);
  const float n = (clamped * kLog2e + kRound) - kRound;
  const float r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  float p = kPoly[0];
  for (int i = 1; i < 8; ++i) p = p * r + kPoly[i];
  // 2^n as two factors, so that n = 128 (x near 88.7) does not overflow the exponent field.
  const int32_t half_n = static_cast<int32_t>(n) / 2;
  const int32_t bits_a = (half_n + 127) << 23;
  const int32_t bits_b = (static_cast<int32_t>(n) - half_n + 127) << 23;
  float scale_a, scale_b;
  std::memcpy(&scale_a, &bits_a, sizeof(float));
  std::memcpy(&scale_b, &bits_b, sizeof(float));
  const float e = p * scale_a * scale_b;
  return v < kMin ? 0.f : (v > kMax ? INFINITY : e);
}

#if defined(__AVX512F__)
// The 16 lanes of x <= 0 (scores minus their running max); 2^n applied by scalef.
inline __m512 exp512(__m512 x) {
  const __m512 clamped = _mm512_max_ps(x, _mm512_set1_ps(kMin));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), clamped);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kPoly[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kPoly[i]));
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kMin), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(tiny, _mm512_scalef_ps(p, n), _mm512_setzero_ps());
}
#endif

}  // namespace cpu_math
