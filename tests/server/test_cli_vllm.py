"""`shardline serve` as vLLM users type it (issue 21 item 5): `serve MODEL`, every EngineConfig
field a flag, one-line configuration errors with exit 2, --dtype/--device auto, CORS, several
served names, --max-logprobs, --generation-config, --chat-template, --version, -v after the
command. Most run in-process (the parser, the config, the app around the fake engine); one
real `serve` subprocess on the tiny model checks them together."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import subprocess
import types
from typing import Any

import httpx
import pytest

from server.e2e_support import shardline_executable
from server.fake_engine import FakeEngine
from server.helpers import asgi_client, assert_openai_error
from server.process import server_process
from shardline.engine import cli, cli_args
from shardline.engine import config as config_module
from shardline.engine.config import ConfigError, EngineConfig
from shardline.engine.errors import InvalidRequestError
from shardline.engine.model_info import check_logprobs_cap, check_model_config, load_model_info
from shardline.engine.request import SamplingParams
from shardline.engine.server import build_app
from shardline.engine.server.app import CORSSettings
from shardline.engine.tokenizer import load_tokenizer

TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}|{{ m['content'] }}>>{% endfor %}"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def _parse(*argv: str) -> argparse.Namespace:
    return cli._build_parser().parse_args(list(argv))


def _config(*argv: str) -> EngineConfig:
    return cli._engine_config(_parse(*argv))


def _serve_flags() -> set[str]:
    parser = cli._build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {s for action in commands.choices["serve"]._actions for s in action.option_strings}


# ---------------------------------------------------------------------- one definition
def test_every_engine_config_field_has_a_flag_with_help() -> None:
    """A field added to EngineConfig is on the command line, or excluded with a reason."""
    flags = _serve_flags()
    docs = cli_args.field_docs()
    for field in dataclasses.fields(EngineConfig):
        if field.name in cli_args.EXCLUDED_FIELDS:
            assert cli_args.EXCLUDED_FIELDS[field.name].strip(), (
                f"{field.name}: exclusion without a reason"
            )
            continue
        assert cli_args.flag_name(field.name) in flags, f"EngineConfig.{field.name} has no flag"
        assert docs.get(field.name), f"EngineConfig.{field.name} has no docstring (its --help)"
    assert set(cli_args.EXCLUDED_FIELDS) <= {f.name for f in dataclasses.fields(EngineConfig)}


def test_flags_reach_the_config_with_their_types() -> None:
    config = _config(
        "serve",
        "--model-arch",
        "LlamaForCausalLM",
        "-tp",
        "2",
        "--pipeline-parallel-size",
        "1",
        "--transport",
        "tcp",
        "--gpu-memory-utilization",
        "0.5",
        "--kv-cache-memory-bytes",
        "512M",
        "--no-prefix-caching",
        "--enforce-eager",
        "--no-async-scheduling",
        "--plugins",
        "a:b",
        "c:d",
        "--worker-timeout",
        "3.5",
        "--num-threads",
        "2",
        "--max-logprobs",
        "50",
        "--restart-backoff",
        "0",
        "--freeze-gc",
        "--seed",
        "7",
    )
    assert (config.model_arch, config.tensor_parallel_size, config.transport) == (
        "LlamaForCausalLM",
        2,
        "tcp",
    )
    assert config.gpu_memory_utilization == 0.5 and config.kv_cache_memory_bytes == 512 << 20
    assert (config.enable_prefix_caching, config.cuda_graphs, config.async_scheduling) == (
        False,
        False,
        False,
    )
    assert (
        config.plugins == ("a:b", "c:d")
        and config.worker_timeout == 3.5
        and config.num_threads == 2
    )
    assert (config.max_logprobs, config.restart_backoff, config.freeze_gc, config.seed) == (
        50,
        0.0,
        True,
        7,
    )
    # Left out: the dataclass's own defaults (no second copy in the parser).
    defaults = _config("serve")
    for field in dataclasses.fields(EngineConfig):
        if field.name not in ("dtype", "device"):  # normalized: None -> "auto"
            assert getattr(defaults, field.name) == getattr(EngineConfig(), field.name), field.name
    assert _config("generate", "hi").max_num_seqs == 1


def test_tcp_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli_args.TCP_TOKEN_ENV, "s3cret")
    assert _config("serve").tcp_token == "s3cret"
    assert _config("serve", "--tcp-token", "flag").tcp_token == "flag"


# ---------------------------------------------------------------------- vLLM's spellings
def test_model_positional_or_flag() -> None:
    assert _config("serve", "/some/model").model == "/some/model"
    assert _config("serve", "--model", "/some/model").model == "/some/model"
    assert _config("serve", "/some/model", "--model", "/some/model").model == "/some/model"
    assert _config("serve").model == EngineConfig.model
    with pytest.raises(ConfigError, match="given twice") as info:
        _config("serve", "/a", "--model", "/b")
    assert info.value.field == "model"


@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "serve"],
        ["serve", "-v"],
        ["serve", "--log-level", "DEBUG"],
        ["--log-level", "debug", "generate", "hi"],
        ["generate", "hi", "-v"],
    ],
)
def test_log_level_before_or_after_the_command(argv: list[str]) -> None:
    assert _parse(*argv).log_level == "debug"


def test_log_level_default_and_uvicorn_level() -> None:
    args = _parse("serve", "--uvicorn-log-level", "warning")
    assert args.log_level is None and args.uvicorn_log_level == "warning"


@pytest.mark.parametrize("argv", [["--version"], ["serve", "--version"]])
def test_version(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from shardline import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"shardline {__version__}"


def test_dtype_auto_and_its_spellings(
    monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: pathlib.Path
) -> None:
    assert _config("serve").dtype == "auto"
    assert _config("serve", "--dtype", "auto").torch_dtype_name == "float32"  # on the CPU
    assert _config("serve", "--dtype", "half").torch_dtype_name == "float16"
    assert _config("serve", "--dtype", "float").torch_dtype_name == "float32"
    assert EngineConfig(dtype=None).torch_dtype_name == "float32"
    with pytest.raises(ConfigError) as info:
        EngineConfig(dtype="int8")
    assert info.value.field == "dtype"
    # On CUDA, "auto" is the checkpoint's half dtype; bfloat16 for a float32 checkpoint (vLLM's).
    assert EngineConfig(model=str(tiny_llama_dir), device="cuda").torch_dtype_name == "bfloat16"
    monkeypatch.setattr("shardline.engine.model_info.checkpoint_dtype", lambda model: "float16")
    assert EngineConfig(model=str(tiny_llama_dir), device="cuda").torch_dtype_name == "float16"
    assert (
        EngineConfig(model=str(tiny_llama_dir), device="cuda", dtype="float32").torch_dtype_name
        == "float32"
    )


def test_device_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    assert _config("serve", "--device", "auto").device == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    monkeypatch.setattr(config_module, "cuda_available", lambda: True)
    assert _config("serve", "--device", "auto").device == "cuda"
    monkeypatch.setattr(config_module, "cuda_available", lambda: False)
    assert _config("serve", "--device", "auto").device == "cpu"
    assert _config("serve", "--device", "cuda:1").device == "cuda:1"


# ---------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize(
    ("argv", "setting"),
    [
        (["--max-model-len", "1"], "max_model_len"),
        (
            ["--max-model-len", "999999"],
            "max_model_len",
        ),  # over the model's limit: read from config.json
        (["--max-model-len", "many"], "--max-model-len"),
        (["--tensor-parallel-size", "0"], "tensor_parallel_size"),
        (["--tensor-parallel-size", "3"], "tensor_parallel_size"),  # 3 does not divide 4 heads
        (["--dtype", "int8"], "--dtype"),
        (["--device", "tpu"], "device"),
        (["--max-logprobs", "-2"], "max_logprobs"),
        (["--generation-config", "/no/such/folder"], "generation_config"),
        (["--chat-template", "no-such-file.jinja"], "chat_template"),
        (["--allowed-methods", "GET"], "allowed_methods"),
        (["--served-model-name", " "], "served_model_name"),
    ],
)
def test_a_configuration_mistake_is_one_line_and_exit_2(
    argv: list[str], setting: str, tiny_llama_dir: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        code = cli.main(["serve", str(tiny_llama_dir), *argv])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("shardline serve: error: ") and setting in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_a_missing_model_is_one_line_and_exit_2(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("shardline serve: error: model: ") and len(err.strip().splitlines()) == 1
    ), err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["serve", str(empty)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_bad_max_model_len_in_a_real_process() -> None:
    """The console script itself: one line on stderr, exit 2, no traceback."""
    result = subprocess.run(
        [shardline_executable(), "serve", "--max-model-len", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == "shardline serve: error: max_model_len: must be >= 2, got 1\n", (
        result.stderr
    )


# ---------------------------------------------------------------------- the app
async def test_cors_preflight_only_with_allowed_origins() -> None:
    preflight = {
        "Origin": "http://ui.test",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    cors = CORSSettings(allowed_origins=("http://ui.test",))
    app = build_app(FakeEngine(), served_model_name="m", api_key="k", cors=cors)
    async with asgi_client(app) as client:
        # The preflight carries no API key: answered by CORS before the key check.
        response = await client.options("/v1/chat/completions", headers=preflight)
        assert response.status_code == 200, response.text
        assert response.headers["access-control-allow-origin"] == "http://ui.test"
        assert "POST" in response.headers["access-control-allow-methods"]
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        other = await client.options(
            "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.test"}
        )
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        response = await client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"Origin": "http://ui.test", "Authorization": "Bearer k"},
        )
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://ui.test"
    plain = build_app(FakeEngine(), served_model_name="m", api_key=None)
    async with asgi_client(plain) as client:
        response = await client.options("/v1/chat/completions", headers=preflight)
        assert not any(h.startswith("access-control-") for h in response.headers), response.headers
        response = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"Origin": "http://ui.test"}
        )
        assert response.status_code == 200
        assert not any(h.startswith("access-control-") for h in response.headers)


def test_cors_flags() -> None:
    args = _parse(
        "serve",
        "--allowed-origins",
        '["http://a.test", "http://b.test"]',
        "--allowed-methods",
        "GET,POST",
        "--allow-credentials",
    )
    assert cli._cors(args) == CORSSettings(
        ("http://a.test", "http://b.test"), ("GET", "POST"), ("*",), True
    )
    assert cli._cors(_parse("serve")) is None
    with pytest.raises(SystemExit):
        _parse("serve", "--allowed-origins", "[1, 2]")


async def test_served_model_name_aliases() -> None:
    config = _config("serve", "--served-model-name", "first", "second")
    assert config.served_model_names == ("first", "second")
    app = build_app(FakeEngine(), served_model_name=config.served_model_names, api_key=None)
    async with asgi_client(app) as client:
        listed = (await client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in listed] == ["first", "second"]
        for name in ("first", "second"):
            response = await client.post("/v1/chat/completions", json={**CHAT, "model": name})
            assert response.status_code == 200, response.text
            assert response.json()["model"] == "first"  # responses report the first name
            response = await client.post(
                "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2}
            )
            assert response.status_code == 200 and response.json()["model"] == "first"
            assert (await client.get(f"/v1/models/{name}")).json()["id"] == name
        error = assert_openai_error(
            await client.post("/v1/chat/completions", json={**CHAT, "model": "third"}),
            404,
            param="model",
            code="model_not_found",
        )
        assert "first" in error["message"] and "second" in error["message"]
        assert_openai_error(await client.get("/v1/models/third"), 404)
        assert (
            await client.post("/v1/chat/completions", json={**CHAT, "model": "second"})
        ).status_code == 200


async def test_max_logprobs_caps_requests_naming_the_field() -> None:
    app = build_app(FakeEngine(), served_model_name="m", api_key=None, max_logprobs=3)
    async with asgi_client(app) as client:
        chat = {**CHAT, "logprobs": True, "top_logprobs": 4}
        error = assert_openai_error(
            await client.post("/v1/chat/completions", json=chat), 400, param="top_logprobs"
        )
        assert "--max-logprobs" in error["message"]
        completion = {"prompt": "x", "max_tokens": 2, "logprobs": 4}
        assert_openai_error(
            await client.post("/v1/completions", json=completion), 400, param="logprobs"
        )
        response = await client.post("/v1/chat/completions", json={**chat, "top_logprobs": 3})
        assert response.status_code == 200, response.text


def _asks(**fields: int) -> Any:
    """Parameters asking for these logprobs (what check_logprobs_cap reads of SamplingParams)."""
    return types.SimpleNamespace(**{"logprobs": None, "prompt_logprobs": None, **fields})


def test_max_logprobs_in_the_engine() -> None:
    """The engine's own cap (Engine and LLM callers): above it refused naming the field, and a
    cap above the former fixed 20 lets such a request through."""
    with pytest.raises(InvalidRequestError) as info:
        check_logprobs_cap(SamplingParams(logprobs=21), max_logprobs=20, vocab_size=1000)
    assert info.value.field == "logprobs"
    with pytest.raises(InvalidRequestError) as info:
        check_logprobs_cap(_asks(prompt_logprobs=6), max_logprobs=5, vocab_size=1000)
    assert info.value.field == "prompt_logprobs"
    check_logprobs_cap(_asks(logprobs=50, prompt_logprobs=50), max_logprobs=50, vocab_size=1000)
    check_logprobs_cap(SamplingParams(logprobs=999), max_logprobs=-1, vocab_size=1000)
    with pytest.raises(InvalidRequestError):
        check_logprobs_cap(SamplingParams(logprobs=1001), max_logprobs=-1, vocab_size=1000)


async def test_engine_serves_more_logprobs_than_20_when_allowed(
    tiny_llama_dir: pathlib.Path,
) -> None:
    from shardline.engine import Engine

    config = EngineConfig(
        model=str(tiny_llama_dir),
        transport="inproc",
        max_model_len=64,
        num_kv_blocks=32,
        block_size=4,
        max_logprobs=25,
    )
    async with await Engine.start(config) as engine:
        with pytest.raises(InvalidRequestError) as info:
            async for _ in engine.generate("hello", SamplingParams(max_tokens=2, logprobs=26)):
                pass
        assert info.value.field == "logprobs"
        outs = [
            out async for out in engine.generate("hello", SamplingParams(max_tokens=2, logprobs=25))
        ]
        entries = [entry for out in outs for entry in out.logprobs or []]
        assert [len(entry.top) for entry in entries] == [25, 25]


# ---------------------------------------------------------------------- model files
def _model_with_generation_config(
    src: pathlib.Path, dest: pathlib.Path, **values: Any
) -> pathlib.Path:
    shutil.copytree(src, dest)
    (dest / "generation_config.json").write_text(json.dumps(values))
    return dest


def test_generation_config_auto_vllm_and_a_folder(
    tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    model = _model_with_generation_config(
        tiny_llama_dir, tmp_path / "model", eos_token_id=[256, 7], temperature=0.3, top_k=5
    )
    auto = load_model_info(_config("serve", str(model)))
    assert auto.generation_defaults == {"temperature": 0.3, "top_k": 5}
    assert auto.eos_token_ids == {256, 7}
    # vllm: the model's sampling defaults are not applied; its EOS ids still stop (as vLLM).
    vllm = load_model_info(_config("serve", str(model), "--generation-config", "vllm"))
    assert vllm.generation_defaults == {} and vllm.eos_token_ids == {256, 7}
    # PATH: another folder's file, for the defaults and the EOS ids.
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(
        json.dumps({"temperature": 0.9, "eos_token_id": 9})
    )
    chosen = load_model_info(_config("serve", str(model), "--generation-config", str(other)))
    assert chosen.generation_defaults == {"temperature": 0.9} and chosen.eos_token_ids == {256, 9}
    # A bad value in the model's file is a one-line configuration error; "vllm" does not read it.
    (model / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ConfigError, match="temperature"):
        check_model_config(_config("serve", str(model)))
    check_model_config(_config("serve", str(model), "--generation-config", "vllm"))


@pytest.mark.parametrize("loader", ["fast", "transformers"])
@pytest.mark.parametrize("given", ["inline", "file"])
def test_chat_template_override(
    given: str,
    loader: str,
    tiny_llama_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if loader == "transformers":
        monkeypatch.setenv("SHARDLINE_TOKENIZER", "transformers")
    value = TEMPLATE
    if given == "file":
        file = tmp_path / "template.jinja"
        file.write_text(TEMPLATE)
        value = str(file)
    messages = [{"role": "user", "content": "hi"}]
    own = load_tokenizer(tiny_llama_dir)
    assert own.apply_chat_template(messages, tokenize=False).startswith("<|im_start|>user")
    config = _config("serve", str(tiny_llama_dir), "--chat-template", value)
    info = load_model_info(config)
    assert info.tokenizer.apply_chat_template(messages, tokenize=False) == "<<user|hi>>"
    assert info.apply_chat_template(messages) == list(b"<<user|hi>>")


# ---------------------------------------------------------------------- a real server
def test_serve_model_positional_with_vllm_flags(
    tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """`SHARDLINE_API_KEY=... shardline serve MODEL --served-model-name a b --allowed-origins ...
    --chat-template ... --dtype auto`: one real start on the tiny model."""
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    command = [
        shardline_executable(),
        "serve",
        str(tiny_llama_dir),
        "--served-model-name",
        "a",
        "b",
        "--dtype",
        "auto",
        "--max-model-len",
        "64",
        "--num-kv-blocks",
        "32",
        "--max-num-seqs",
        "4",
        "--allowed-origins",
        "http://ui.test",
        "--chat-template",
        str(template),
        "-v",
    ]
    with server_process(command, tmp_path, env={"SHARDLINE_API_KEY": "sk-env"}) as server:
        server.wait_healthy(120)
        url = server.base_url
        auth = {"Authorization": "Bearer sk-env"}
        assert_openai_error(httpx.get(url + "/v1/models", timeout=30), 401)
        assert [
            m["id"] for m in httpx.get(url + "/v1/models", headers=auth, timeout=30).json()["data"]
        ] == ["a", "b"]
        preflight = httpx.options(
            url + "/v1/chat/completions",
            timeout=30,
            headers={"Origin": "http://ui.test", "Access-Control-Request-Method": "POST"},
        )
        assert (
            preflight.status_code == 200
            and preflight.headers["access-control-allow-origin"] == "http://ui.test"
        )
        tokens = httpx.post(
            url + "/tokenize",
            headers=auth,
            timeout=30,
            json={"model": "b", "messages": [{"role": "user", "content": "hi"}]},
        ).json()["tokens"]
        assert tokens == list(b"<<user|hi>>")
        response = httpx.post(
            url + "/v1/chat/completions",
            headers=auth,
            timeout=60,
            json={**CHAT, "model": "b", "temperature": 0},
        )
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "a"
        assert server.stop() == 0
        log = server.log()
    assert "device cpu, dtype float32" in log
    assert "DEBUG" in log  # -v after the command
    assert "Traceback" not in log
