"""GGUF files of the issue-24 families (written by gguf-py's GGUFWriter) load into shardline
and give transformers' logits and greedy tokens on the same file: gemma2 and gemma3 (sandwich
norms stored as 1 + w, tied head, soft-capping and the sliding window from the metadata; Gemma
3's q/k norms and its every-6th global layer with its own rope base), phi3 (fused
`attn_qkv` and gate + up `ffn_up`, split as views of the file's blocks), qwen3 (per-head q/k
norms), qwen3moe and qwen2moe (stacked `ffn_*_exps` experts split per expert, the
`ffn_gate_inp` router, Qwen2-MoE's shared expert and its gate), with F32 and Q8_0 weights;
Mixtral as llama.cpp writes it (architecture llama with experts, q/k rows permuted) against
transformers on the checkpoint it came from. A
family shardline does not load from GGUF is refused naming it and listing the known ones.

Qwen3-MoE files say nothing about renormalising the top-k weights; shardline renormalises, as
llama.cpp does and every Qwen3-MoE checkpoint says (transformers' GGUF path keeps its config
default, so the reference is given norm_topk_prob=True)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from shardline.model import paged_decode
from shardline.model.config import GGUF_ARCHITECTURES, ModelConfig
from shardline.model.errors import CheckpointError
from shardline.model.loader import load_model
from shardline.model.parallel_context import ParallelContext
from support.gguf_arch_models import ARCH_SHAPES, VOCAB, write_tiny_arch_gguf
from support.gguf_models import prefill_logits

pytestmark = pytest.mark.skipif(
    not paged_decode.KERNEL.load(), reason="the CPU kernels do not build here"
)
IDS = [1, 45, 12, 7, 260, 2, 99, 17]


@pytest.mark.parametrize("type_name", ["F32", "Q8_0"])
@pytest.mark.parametrize("arch", list(ARCH_SHAPES))
def test_gguf_of_each_family_equals_transformers_on_the_same_file(
    arch: str, type_name: str, tmp_path: pathlib.Path
) -> None:
    from transformers import AutoModelForCausalLM

    path = write_tiny_arch_gguf(tmp_path / "m.gguf", arch, type_name, seed=3)
    config = ModelConfig.from_path(str(path))
    assert config.architecture == GGUF_ARCHITECTURES[arch]
    model = load_model(config, ParallelContext.single())
    # (transformers' Phi-3 config default pad id 32000 lies outside the tiny vocabulary)
    extra = {"qwen3moe": {"norm_topk_prob": True}, "phi3": {"pad_token_id": 0}}.get(arch, {})
    ref = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, **extra
    ).eval()
    with torch.no_grad():
        want = ref(torch.tensor([IDS])).logits[0]
    got = prefill_logits(model, IDS)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, err
    seq_ref, seq = list(IDS), list(IDS)
    for _ in range(4):
        with torch.no_grad():
            seq_ref.append(int(ref(torch.tensor([seq_ref])).logits[0, -1].argmax()))
        seq.append(int(prefill_logits(model, seq)[-1].argmax()))
    assert seq == seq_ref


def test_moe_config_from_gguf_metadata(tmp_path: pathlib.Path) -> None:
    path = write_tiny_arch_gguf(tmp_path / "m.gguf", "qwen2moe")
    hf = ModelConfig.from_path(str(path)).hf_config
    shape = ARCH_SHAPES["qwen2moe"]
    assert (hf.num_experts, hf.num_experts_per_tok) == (shape["experts"], shape["top_k"])
    assert hf.moe_intermediate_size == shape["expert_inter"]
    assert hf.shared_expert_intermediate_size == shape["shared_inter"]
    assert hf.norm_topk_prob is False and hf.vocab_size == VOCAB


def test_an_unknown_gguf_family_is_refused_naming_it_and_the_known(tmp_path: pathlib.Path) -> None:
    import gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv7")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        CheckpointError, match=r"holds a 'rwkv7' model; supported: .*qwen2moe, qwen3, qwen3moe"
    ):
        ModelConfig.from_path(str(path))


def test_mixtral_written_as_llama_with_experts_equals_transformers(tmp_path: pathlib.Path) -> None:
    # transformers does not load Mixtral from GGUF: the reference is its own model on the
    # safetensors checkpoint the GGUF was written from (as llama.cpp's converter writes it).
    from transformers import AutoModelForCausalLM

    from support.gguf_arch_models import write_mixtral_gguf
    from support.hf_tiny import make_hf_model_dir

    ref = AutoModelForCausalLM.from_pretrained(
        make_hf_model_dir(tmp_path / "hf", "MixtralForCausalLM", seed=5), dtype=torch.float32
    ).eval()
    path = write_mixtral_gguf(tmp_path / "m.gguf", ref)
    config = ModelConfig.from_path(str(path))
    assert config.architecture == "MixtralForCausalLM"
    model = load_model(config, ParallelContext.single())
    with torch.no_grad():
        want = ref(torch.tensor([IDS])).logits[0]
    got = prefill_logits(model, IDS)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
