"""A bare `.gguf` path serves alone (issue 23): the tokenizer and chat template come from the
file's metadata (converted once, cached under $SHARDLINE_HOME), the EOS id from it, and greedy
tokens equal transformers' on the same file; a split model (`-00001-of-0000N.gguf`) loads too."""

from __future__ import annotations

import pytest
import torch

from shardline.engine import Engine, EngineConfig, SamplingParams
from support.gguf_models import prefill_logits, write_tiny_llama_gguf

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


async def test_bare_gguf_serves_with_its_tokenizer_template_and_eos(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", "Q4_K", seed=8, chat_template=TEMPLATE)
    messages = [{"role": "user", "content": "Hello world, why is the sky blue?"}]
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = list(hf_tok(text, add_special_tokens=False)["input_ids"])
    ref = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    )
    with torch.no_grad():
        want = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    cfg = EngineConfig(model=str(path), transport="inproc", max_model_len=128, num_kv_blocks=64)
    async with await Engine.start(cfg) as engine:
        assert 2 in engine.eos_token_ids  # tokenizer.ggml.eos_token_id
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        outputs = [out async for out in engine.chat(messages, params)]
        assert outputs[-1].num_prompt_tokens == len(prompt)
        assert outputs[-1].token_ids == want
    # The converted tokenizer is cached: the next start reads it without transformers.
    from shardline.engine.tokenizer import gguf_tokenizer_dir

    assert (gguf_tokenizer_dir(path) / "tokenizer.json").is_file()


def test_split_gguf_loads_as_the_single_file(tmp_path) -> None:
    import gguf

    from shardline.model.config import ModelConfig
    from shardline.model.errors import CheckpointError
    from shardline.model.loader import load_model
    from shardline.model.parallel_context import ParallelContext

    single = write_tiny_llama_gguf(tmp_path / "one.gguf", "Q6_K", seed=9)
    original = gguf.GGUFWriter.__init__

    def split_writer(self, *args, **kwargs):  # every 8 tensors a part
        original(self, *args, **{**kwargs, "split_max_tensors": 8})

    gguf.GGUFWriter.__init__ = split_writer
    try:
        write_tiny_llama_gguf(tmp_path / "split.gguf", "Q6_K", seed=9)
    finally:
        gguf.GGUFWriter.__init__ = original
    parts = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(parts) == 3
    ids = [1, 30, 200, 7]
    want = prefill_logits(
        load_model(ModelConfig.from_path(str(single)), ParallelContext.single()), ids
    )
    got = prefill_logits(
        load_model(ModelConfig.from_path(str(parts[0])), ParallelContext.single()), ids
    )
    assert torch.equal(got, want)
    parts[1].unlink()
    with pytest.raises(CheckpointError, match=r"lacks part\(s\) split-00002-of-00003\.gguf"):
        load_model(ModelConfig.from_path(str(parts[0])), ParallelContext.single())


def test_the_tokenizer_is_converted_in_a_child_process(tmp_path) -> None:
    """Converting a GGUF's tokenizer imports transformers and reads the file's metadata: in the
    engine's process that kept ~300 MiB for good (128k vocabulary); a child process does it."""
    import os
    import subprocess
    import sys

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", "Q4_0", seed=3)
    script = (
        "import pathlib, sys\n"
        "from shardline.engine.tokenizer import gguf_tokenizer_dir\n"
        "folder = gguf_tokenizer_dir(pathlib.Path(sys.argv[1]))\n"
        "assert (folder / 'tokenizer.json').is_file(), folder\n"
        "assert 'transformers' not in sys.modules, 'transformers imported in the engine process'\n"
    )
    env = {**os.environ, "SHARDLINE_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [p for p in (tmp_path / "home" / "gguf_tokenizers").iterdir() if p.name.startswith(".")]


def test_a_gguf_without_tokenizer_metadata_is_refused_naming_the_file(tmp_path, monkeypatch) -> None:
    import gguf
    import numpy as np

    from shardline.engine.tokenizer import gguf_tokenizer_dir

    monkeypatch.setenv("SHARDLINE_HOME", str(tmp_path / "home"))
    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="cannot build a tokenizer from the metadata of .*bare.gguf"):
        gguf_tokenizer_dir(path)
    # nothing half-converted is left behind, and a later call tries again (and fails the same)
    assert not list((tmp_path / "home" / "gguf_tokenizers").iterdir())
