"""SmolLM2-135M-Instruct through shardline matches transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

from shardline.model.attention import Attention, AttentionMetadata
from shardline.model.config import ModelConfig
from shardline.model.loader import load_model
from shardline.model.parallel_context import ParallelContext
from support.hf_compat import cache_kwarg, output_cache

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Paris is the capital of",
    "In 1969, Neil Armstrong became the first person to",
]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
BLOCK_SIZE = 16


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    model = load_model(ModelConfig.from_path(smollm2_dir), ParallelContext.single())
    for module in model.modules():
        if isinstance(module, Attention):
            module.kv_cache = torch.zeros(64, 2, BLOCK_SIZE, module.num_kv_heads, module.head_dim)
    return model


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    from support.hf_reference import hf_causal_lm

    return hf_causal_lm(smollm2_dir)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


class PagedSession:
    """One request decoded through the paged cache, one token per step."""

    def __init__(self, model, block_table: list[int]) -> None:
        self.model, self.table, self.tokens = model, block_table, []

    def step(self, new_tokens: list[int]) -> torch.Tensor:
        attn = AttentionMetadata.build(query_lens=[len(new_tokens)], context_lens=[len(self.tokens)],
                                       block_tables=[self.table], block_size=BLOCK_SIZE)
        positions = torch.arange(len(self.tokens), len(self.tokens) + len(new_tokens))
        self.tokens += new_tokens
        with torch.no_grad():
            return self.model.compute_logits(self.model(torch.tensor(new_tokens), positions, attn))


def test_prefill_logits_match_transformers_batched(ours, hf, tokenizer):
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    tables = [[1 + i * 4 + j for j in range(4)] for i in range(len(prompts))]
    attn = AttentionMetadata.build(query_lens=[len(p) for p in prompts], context_lens=[0] * len(prompts),
                                   block_tables=tables, block_size=BLOCK_SIZE)
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.tensor([i for p in prompts for i in range(len(p))])
    with torch.no_grad():
        logits = ours.compute_logits(ours(ids, positions, attn))
        start = 0
        for prompt in prompts:
            want = hf(torch.tensor([prompt])).logits[0]
            got = logits[start:start + len(prompt)]
            start += len(prompt)
            assert rel_err(got, want) <= 1e-4


def test_twenty_paged_decode_steps_match_transformers(ours, hf, tokenizer):
    prompt = tokenizer(PROMPTS[3])["input_ids"]
    session = PagedSession(ours, [9, 3, 17, 5])  # scattered blocks
    logits = session.step(prompt)[-1]
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        past, want = output_cache(out), out.logits[0, -1]
        assert rel_err(logits, want) <= 1e-4
        for _ in range(20):
            token = int(want.argmax())
            logits = session.step([token])[-1]
            out = hf(torch.tensor([[token]]), use_cache=True, **{cache_kwarg(hf): past})
            past, want = output_cache(out), out.logits[0, -1]
            assert rel_err(logits, want) <= 1e-4


def test_greedy_chat_continuation_is_identical(ours, hf, tokenizer):
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"]
    with torch.no_grad():
        generated = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    want = generated[0, len(prompt):].tolist()
    session = PagedSession(ours, [20, 21, 40, 22])
    got: list[int] = []
    logits = session.step(prompt)
    while len(got) < len(want):
        got.append(int(logits[-1].argmax()))
        logits = session.step([got[-1]])
    assert got == want
    assert "Paris" in tokenizer.decode(got)


def test_gguf_file_loads_to_the_same_model(ours, hf, smollm2_dir):
    """The default model is its GGUF (no float32 copy on disk): every weight it holds in the
    file's blocks dequantizes to transformers' float32 value bit for bit, and the 1-D ones
    (norms) equal transformers' too."""
    import dataclasses

    from shardline.model.gguf_weights import GGUFLinearWeight
    from shardline.model.registry import ModelRegistry

    gguf = next(smollm2_dir.glob("*.gguf"))
    assert not (smollm2_dir / "config.json").exists() and not list(smollm2_dir.glob("*.safetensors"))
    config = ModelConfig.from_path(smollm2_dir)
    assert config.architecture == "LlamaForCausalLM" and config.gguf_file == str(gguf)
    assert config.hf_config.tie_word_embeddings and config.hf_config.num_key_value_heads == 3
    dense_config = dataclasses.replace(config, gguf_file=None)
    reference = ModelRegistry.resolve(config.architecture)(dense_config, ParallelContext.single())
    with torch.no_grad():
        reference.load_weights((k, v) for k, v in hf.state_dict().items()
                               if "rotary_emb" not in k and k != "lm_head.weight")
    from_gguf, modules = dict(ours.named_parameters()), dict(ours.named_modules())
    for name, param in reference.named_parameters():
        value = from_gguf[name]
        if value.is_meta:  # kept in the file's blocks (model/gguf_weights.py): their values
            module = modules[name.rpartition(".")[0]]
            blocks = getattr(module, "packed_weight", None)
            blocks = blocks if isinstance(blocks, GGUFLinearWeight) else None
            parts = sorted(blocks.parts, key=lambda p: p[0]) if blocks else [(0, module.gguf_weight)]
            value = torch.cat([part.materialize() for _, part in parts])
        assert torch.equal(param, value), name


def test_its_gguf_blocks_pack_as_integer_blocks_with_the_same_logits(smollm2_dir, tokenizer):
    """The GGUF's Q4_1/Q8_0 blocks go straight into the packed decode GEMM's integer panels
    (`pack_gguf_weights`): every linear weight (the tied LM head too), Q4_1's as 4-bit nibbles
    and Q8_0's as int8, 5.4x smaller than float32 panels, and a prefill and decode steps give
    the logits of float32 panels of the dequantized values bit for bit."""
    from shardline.model import packed_linear, paged_decode
    from shardline.model.gguf_weights import GGUFLinearWeight

    if not paged_decode.KERNEL.load():
        pytest.skip("the CPU kernels do not build here")

    def loaded():
        model = load_model(ModelConfig.from_path(smollm2_dir), ParallelContext.single())
        for module in model.modules():
            if isinstance(module, Attention):
                module.kv_cache = torch.zeros(64, 2, BLOCK_SIZE, module.num_kv_heads, module.head_dim)
        return model

    def run(model) -> list[torch.Tensor]:
        session = PagedSession(model, [9, 3, 17, 5])
        logits = [session.step(tokenizer(PROMPTS[2])["input_ids"])]
        for _ in range(4):
            logits.append(session.step([int(logits[-1][-1].argmax())]))
        return logits

    floats_model = loaded()
    layers = [m for m in floats_model.modules() if isinstance(getattr(m, "packed_weight", None), GGUFLinearWeight)]
    assert len(layers) == 121  # 30 x (qkv, o, gate_up, down) + the tied LM head
    floats = 0
    for m in layers:
        weight = m.packed_weight
        dense = torch.zeros(weight.out_features, weight.in_features)
        for first, part in weight.parts:
            dense[first : first + part.shape[0]] = part.materialize()
        m.packed_weight = packed_linear.pack_weight(dense)
        floats += m.packed_weight.numel() * 4
    want = run(floats_model)

    model = loaded()
    blocks = packed_linear.pack_gguf_weights(model)
    packed = [m.packed_weight for m in model.modules() if isinstance(getattr(m, "packed_weight", None), torch.Tensor)]
    assert len(packed) == 121 and all(w.dtype == torch.uint8 for w in packed)
    widths = [w.shape[2] for w in packed]
    assert widths.count(1152) == 1 and widths.count(640) == len(packed) - 1  # the LM head: Q8_0
    assert floats / blocks > 5.3
    for got, expected in zip(run(model), want, strict=True):
        assert torch.equal(got, expected)
