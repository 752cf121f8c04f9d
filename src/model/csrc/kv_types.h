// KV-cache element types of the CPU kernels (paged_decode.cpp, cpu_ops.cpp): float32, float16
// and bfloat16 caches (`EngineConfig.kv_cache_dtype`). Kernels compute in float32; a 16-bit
// element is widened exactly (float16 -> float32 by the hardware's converter where the build
// has one, bfloat16 by a 16-bit shift) and a float32 value is stored rounded to nearest even,
// the rounding torch's `.to(dtype)` uses, so the fused store equals `index_copy_` of `.to()`.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace kv_types {

// One element widened to float32 (exact for every type).
inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.x);
#else
  return static_cast<float>(x);
#endif
}
inline float to_float(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// dst[i] = float(src[i]) for n elements.
inline void widen(float* __restrict dst, const float* __restrict src, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
inline void widen(float* __restrict dst, const c10::Half* __restrict src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}
inline void widen(float* __restrict dst, const c10::BFloat16* __restrict src, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;  // vectorized
}

// dst[i] = src[i] rounded to the element type (to nearest, ties to even) for n elements.
inline void narrow(float* __restrict dst, const float* __restrict src, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
inline void narrow(c10::Half* __restrict dst, const float* __restrict src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);  // c10's conversion: to nearest even
}
inline void narrow(c10::BFloat16* __restrict dst, const float* __restrict src, int64_t n) {
  const uint32_t* in = reinterpret_cast<const uint32_t*>(src);
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {  // c10::round_to_nearest_even, branch-free (vectorized)
    const uint32_t bits = in[i];
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    out[i] = static_cast<uint16_t>(nan ? 0x7fc0u : rounded);
  }
}

#if defined(__AVX512F__)
// 16 consecutive elements widened to float32 in a register.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#endif

// Calls f(T{}) with T the C++ element type of a float32/float16/bfloat16 cache; `op` names the
// caller in the error for any other dtype.
template <typename F>
void dispatch(const at::Tensor& cache, const char* op, F&& f) {
  switch (cache.scalar_type()) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default:
      TORCH_CHECK(false, op, ": kv_cache must be float32, float16 or bfloat16, got ", cache.scalar_type());
  }
}

}  // namespace kv_types
