"""The tiny checkpoints other tests build on: loadable by transformers and by shardline alike."""

from __future__ import annotations

import pytest
import torch

from shardline.model.attention import AttentionMetadata
from shardline.model.config import ModelConfig
from shardline.model.loader import load_model
from shardline.model.parallel_context import ParallelContext
from support.tiny_models import SPECIAL_TOKENS, make_tiny_model_dir


def test_tokenizer_round_trips_bytes_and_formats_chat(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_tiny_model_dir(tmp_path))
    text = "héllo, wörld! 🙂\n\tend"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256  # one token per byte
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 256
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [256, 257, 258]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                         add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(("arch", "tied"), [("LlamaForCausalLM", True), ("MistralForCausalLM", False),
                                             ("Qwen2ForCausalLM", False)])
def test_tiny_models_match_transformers(tmp_path, arch, tied):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model_dir(tmp_path, arch=arch, tie_word_embeddings=tied, num_kv_heads=1)
    config = ModelConfig.from_path(path)
    assert config.architecture == arch
    ours = load_model(config, ParallelContext.single())
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([3, 256, 70, 71, 10, 258, 99, 1])
    attn = AttentionMetadata.build(query_lens=[8], context_lens=[0], block_tables=[[0, 1]], block_size=4)
    with torch.no_grad():
        got = ours.compute_logits(ours(ids, torch.arange(8), attn))
        want = theirs(ids[None]).logits[0]
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


@pytest.mark.gpu
def test_tiny_model_on_cuda_matches_cpu(tmp_path, worker_module):
    path = make_tiny_model_dir(tmp_path)
    config = ModelConfig.from_path(path)
    cpu = worker_module.run_scenario(load_model(config, ParallelContext.single()), 320)
    cuda_model = load_model(config, ParallelContext.single("cuda"))
    assert next(cuda_model.parameters()).device.type == "cuda"
    cuda = worker_module.run_scenario(cuda_model, 320, device="cuda")
    for name in cpu:
        torch.testing.assert_close(cuda[name].cpu(), cpu[name], rtol=1e-4, atol=1e-4)
