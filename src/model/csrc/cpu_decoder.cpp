// A Llama-family decoder stack's layers in one call, for CPU float32 steps of decode-sized
// batches on a single rank (model/llama.py picks it; the Python layers are the reference).
//
// A decode step of SmolLM2 runs ~250 torch op calls and ~360 module calls from Python, ~6 ms
// per step on a 2-core VM: a fifth of a one-sequence step, whose GEMMs take ~22 ms. This loop
// runs the same kernels, in the same order, on the same tensors as the Python path
// (RMSNorm + residual, QKV GEMM, rotary, KV store, paged attention, O GEMM, RMSNorm + residual,
// gate/up GEMM, SiLU-and-mul, down GEMM; the final norm), so results are identical.
//
//   decoder_layers(hidden, positions, norms, packed, biases, kv_caches, cos_cache, sin_cache,
//                  slot_mapping, block_tables, seq_lens, query_start_loc,
//                  num_heads, num_kv_heads, head_dim, eps, scale) -> normed hidden
//
// hidden     [T, H] the embeddings (used as the residual stream and changed in place)
// norms      2 per layer (input, post-attention) and the final norm's weight
// packed     4 per layer: qkv, o, gate_up, down, packed as model/packed_linear.py packs them
// biases     4 per layer, each None or the layer's bias
// kv_caches  one per layer
// attention metadata as the paged decode kernel takes it: one query row per entry.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu_kernels.h"

namespace {

// A linear layer's GEMM in the weight's form: the int8-activation kernel's (q8_gemm.cpp) or the
// packed one, which prefetches `then` (the next GEMM's weight) when that is packed panels too.
void linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
            const std::optional<at::Tensor>& bias, const at::Tensor* then) {
  if (shardline_cpu::is_q8(weight)) {
    shardline_cpu::q8_gemm(out, x, weight, bias);
  } else {
    shardline_cpu::packed_gemm(out, x, weight, bias, then && !shardline_cpu::is_q8(*then) ? then : nullptr);
  }
}

at::Tensor decoder_layers(const at::Tensor& hidden, const at::Tensor& positions,
                          const std::vector<at::Tensor>& norms,
                          const std::vector<at::Tensor>& packed,
                          const std::vector<std::optional<at::Tensor>>& biases,
                          const std::vector<at::Tensor>& kv_caches, const at::Tensor& cos_cache,
                          const at::Tensor& sin_cache, const at::Tensor& slot_mapping,
                          const at::Tensor& block_tables, const at::Tensor& seq_lens,
                          const at::Tensor& query_start_loc, int64_t num_heads,
                          int64_t num_kv_heads, int64_t head_dim, double eps, double scale) {
  const int64_t layers = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(layers > 0, "decoder_layers: no layers");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * layers + 1 &&
                  static_cast<int64_t>(packed.size()) == 4 * layers &&
                  static_cast<int64_t>(biases.size()) == 4 * layers,
              "decoder_layers: expected 2 norms, 4 packed weights and 4 biases per layer (and "
              "the final norm) for ", layers, " layers");
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous() && hidden.scalar_type() == at::kFloat,
              "decoder_layers: hidden must be a contiguous float32 [tokens, hidden] tensor");
  for (const at::Tensor& weight : packed) {
    TORCH_CHECK(weight.dim() == 3 || shardline_cpu::is_q8(weight),
                "decoder_layers: every weight must be packed (model/packed_linear.py, q8_linear.py)");
  }
  const int64_t tokens = hidden.size(0), width = hidden.size(1);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  at::Tensor residual = hidden;  // the stream the layers add into, in place
  at::Tensor x = at::empty_like(hidden);
  shardline_cpu::rms_norm(x, hidden, norms[0], eps);
  for (int64_t layer = 0; layer < layers; ++layer) {
    if (layer > 0) shardline_cpu::fused_add_rms_norm(x, residual, norms[2 * layer], eps);
    const int64_t p = 4 * layer;
    at::Tensor qkv = at::empty({tokens, q_size + 2 * kv_size}, hidden.options());
    linear(qkv, x, packed[p], biases[p], &packed[p + 1]);
    at::Tensor q = qkv.narrow(1, 0, q_size);
    at::Tensor k = qkv.narrow(1, q_size, kv_size);
    at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size);
    shardline_cpu::rotary_embedding(positions, q, k, cos_cache, sin_cache);
    shardline_cpu::store_kv(k, v, kv_caches[layer], slot_mapping);
    at::Tensor attended = at::empty({tokens, num_heads, head_dim}, hidden.options());
    shardline_cpu::paged_decode_attention(attended, q.view({tokens, num_heads, head_dim}),
                                          kv_caches[layer], block_tables, seq_lens,
                                          query_start_loc, std::nullopt, scale);
    at::Tensor o = at::empty({tokens, width}, hidden.options());
    linear(o, attended.view({tokens, q_size}), packed[p + 1], biases[p + 1], &packed[p + 2]);
    shardline_cpu::fused_add_rms_norm(o, residual, norms[2 * layer + 1], eps);
    const int64_t intermediate = shardline_cpu::is_q8(packed[p + 3])  // down's K
                                     ? shardline_cpu::q8_in_features(packed[p + 3])
                                     : shardline_cpu::packed_in_features(packed[p + 3]);
    at::Tensor gu = at::empty({tokens, 2 * intermediate}, hidden.options());
    linear(gu, o, packed[p + 2], biases[p + 2], &packed[p + 3]);
    at::Tensor act = at::empty({tokens, intermediate}, hidden.options());
    shardline_cpu::silu_and_mul(act, gu);
    x = at::empty({tokens, width}, hidden.options());
    const bool more = p + 4 < static_cast<int64_t>(packed.size());
    linear(x, act, packed[p + 3], biases[p + 3], more ? &packed[p + 4] : nullptr);
  }
  shardline_cpu::fused_add_rms_norm(x, residual, norms[2 * layers], eps);
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shardline, m) {
  m.def(
      "decoder_layers(Tensor(a!) hidden, Tensor positions, Tensor[] norms, Tensor[] packed, "
      "Tensor?[] biases, Tensor[] kv_caches, Tensor cos_cache, Tensor sin_cache, "
      "Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, "
      "int num_heads, int num_kv_heads, int head_dim, float eps, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(shardline, CPU, m) { m.impl("decoder_layers", &decoder_layers); }
