// The CPU kernels' entry points, for C++ callers in this extension (cpu_decoder.cpp): the same
// functions the `shardline::` torch ops run, called without the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace shardline_cpu {

void rms_norm(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps);
void fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                        double eps);
void rotary_embedding(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& cos_cache, const at::Tensor& sin_cache);
void silu_and_mul(const at::Tensor& out, const at::Tensor& x);
void store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_cache,
              const at::Tensor& slot_mapping);
void paged_decode_attention(const at::Tensor& out, const at::Tensor& query,
                            const at::Tensor& kv_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                            const std::optional<at::Tensor>& seq_ids, double scale);
// `then`: the packed weight of the GEMM that runs next, if known (its first panels are
// prefetched during this one's last).
void packed_gemm(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                 const std::optional<at::Tensor>& bias, const at::Tensor* then = nullptr);
// The K (input features) of a packed weight, in either of its forms.
int64_t packed_in_features(const at::Tensor& packed);
// The int8-activation GEMM (q8_gemm.cpp) and whether a tensor is its packed weight.
bool is_q8(const at::Tensor& packed);
int64_t q8_in_features(const at::Tensor& packed);
void q8_gemm(const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
             const std::optional<at::Tensor>& bias);

}  // namespace shardline_cpu
