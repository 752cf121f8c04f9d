"""The C++ loop over a decoder stack's layers (csrc/cpu_decoder.cpp, LlamaModel._cpu_decoder):
bit-identical to the Python layers on the steps it takes, and the Python layers on the others."""

from __future__ import annotations

import pathlib

import pytest
import torch

from shardline.model import attention as attention_module
from shardline.model import llama, packed_linear, paged_decode
from shardline.model.attention import AttentionMetadata
from shardline.model.config import ModelConfig
from shardline.model.loader import load_model
from shardline.model.parallel_context import ParallelContext
from support.tiny_models import make_tiny_model_dir, quantize_linear_weights

pytestmark = pytest.mark.skipif(not paged_decode.KERNEL.load(),
                                reason="the CPU kernels do not build here")

BLOCK = 4


def _model(tmp_path: pathlib.Path, arch: str, quantized: bool = False, **shape) -> torch.nn.Module:
    """`quantized`: GGUF-quantized weights, which pack as integer blocks where K allows."""
    path = make_tiny_model_dir(tmp_path / arch, arch=arch, num_layers=3, **shape)
    model = load_model(ModelConfig.from_path(path), ParallelContext.single())
    if quantized:
        quantize_linear_weights(model)
    assert packed_linear.pack_linear_weights(model) > 0
    for module in model.modules():
        if isinstance(module, attention_module.Attention):
            module.kv_cache = torch.zeros(64, 2, BLOCK, module.num_kv_heads, module.head_dim)
    return model


# (context before the step, tokens this step) per request: fresh prefills, then a step mixing a
# decode, a prefix chunk and a fresh prompt, then decode-only steps.
STEPS = [[(0, 9), (0, 5)], [(9, 1), (5, 3), (0, 6)], [(10, 1), (8, 1), (6, 1)],
         [(11, 1), (9, 1), (7, 1)]]
TABLES = [[3, 7, 1, 9], [2, 11, 4], [5, 6, 8]]


def _run(model: torch.nn.Module, gen: torch.Generator, vocab: int) -> list[torch.Tensor]:
    outs = []
    with torch.inference_mode():
        for step in STEPS:
            attn = AttentionMetadata.build(query_lens=[q for _, q in step],
                                           context_lens=[c for c, _ in step],
                                           block_tables=TABLES[: len(step)], block_size=BLOCK)
            ids = torch.randint(0, vocab, (attn.query_start_loc_cpu[-1],), generator=gen)
            positions = torch.cat([torch.arange(c, c + q) for c, q in step])
            outs.append(model.compute_logits(model(ids, positions, attn)))
    return outs


@pytest.mark.parametrize(("arch", "shape"), [
    ("LlamaForCausalLM", {}),
    # q/k/v biases, and sizes that leave the last weight panel ragged (N % 32 != 0)
    ("Qwen2ForCausalLM", {"hidden_size": 48, "num_heads": 3, "num_kv_heads": 1,
                          "intermediate_size": 72}),
])
@pytest.mark.parametrize("rowwise_max", [128, 4])
@pytest.mark.parametrize("quantized", [False, True])
def test_the_loop_equals_the_python_layers(tmp_path, monkeypatch, arch, shape, rowwise_max, quantized):
    monkeypatch.setattr(attention_module, "ROWWISE_MAX_QUERY", rowwise_max)
    model = _model(tmp_path, arch, quantized, **shape)
    if quantized:  # Llama's weights all take integer blocks (Q4_1 and Q8_0 as uint8, Q4_0's
        # signed nibbles as int8); Qwen2's K of 48 and 72 cannot
        kinds = {m.packed_weight.dtype for m in model.modules() if getattr(m, "packed_weight", None) is not None}
        assert kinds == ({torch.uint8, torch.int8} if arch == "LlamaForCausalLM" else {torch.float32})
    vocab = model.config.vocab_size
    calls = []
    real = torch.ops.shardline.decoder_layers
    monkeypatch.setattr(torch.ops.shardline, "decoder_layers",
                        lambda hidden, *args: calls.append(hidden.shape[0]) or real(hidden, *args))
    fast = _run(model, torch.Generator().manual_seed(0), vocab)
    monkeypatch.setenv(llama.CPU_DECODER_ENV, "off")
    for module in model.modules():  # the same caches, emptied
        if isinstance(module, attention_module.Attention):
            module.kv_cache.zero_()
    taken = list(calls)
    slow = _run(model, torch.Generator().manual_seed(0), vocab)
    assert calls == taken  # off: the loop never ran
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)
    if rowwise_max == 128:
        assert taken == [14, 10, 3, 3]  # every step
    else:  # the 9-, 5- and 6-token chunks are too long for row-wise attention: Python layers
        assert taken == [3, 3]


def test_what_the_loop_leaves_to_the_python_layers(tmp_path, monkeypatch):
    model = _model(tmp_path, "LlamaForCausalLM")
    monkeypatch.setattr(torch.ops.shardline, "decoder_layers",
                        lambda *args: pytest.fail("the loop ran"))
    attn = AttentionMetadata.build(query_lens=[1], context_lens=[3], block_tables=[[1]],
                                   block_size=BLOCK)
    ids, positions = torch.tensor([7]), torch.tensor([3])
    with torch.inference_mode():
        monkeypatch.setattr(packed_linear, "MAX_ROWS", 0)  # rows the packed GEMM does not take
        model(ids, positions, attn)
        monkeypatch.undo()
        monkeypatch.setattr(torch.ops.shardline, "decoder_layers",
                            lambda *args: pytest.fail("the loop ran"))
        monkeypatch.setenv("SHARDLINE_CPU_FUSED_OPS", "off")
        model(ids, positions, attn)
        monkeypatch.delenv("SHARDLINE_CPU_FUSED_OPS")
        model.model.layers[1].mlp.down_proj.packed_weight = None  # one layer unpacked
        model(ids, positions, attn)


def test_a_bad_switch_value_is_refused(tmp_path, monkeypatch):
    model = _model(tmp_path, "LlamaForCausalLM")
    monkeypatch.setenv(llama.CPU_DECODER_ENV, "sometimes")
    attn = AttentionMetadata.build(query_lens=[1], context_lens=[0], block_tables=[[1]],
                                   block_size=BLOCK)
    with pytest.raises(ValueError, match="SHARDLINE_CPU_DECODER_LOOP='sometimes'"), torch.inference_mode():
        model(torch.tensor([7]), torch.tensor([0]), attn)


def test_bad_arguments_get_clear_errors():
    hidden = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="expected 2 norms, 4 packed weights and 4 biases"):
        torch.ops.shardline.decoder_layers(
            hidden, torch.zeros(2, dtype=torch.long), [torch.ones(8)], [], [],
            [torch.zeros(1, 2, 4, 1, 8)], torch.zeros(4, 8), torch.zeros(4, 8),
            torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, dtype=torch.int32),
            torch.ones(2, dtype=torch.int32), torch.arange(3, dtype=torch.int32), 1, 1, 8, 1e-6, 1.0)
