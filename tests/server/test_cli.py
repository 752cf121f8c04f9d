"""The `shardline` command: help everywhere, argument errors, bench dispatch, serve life cycle."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess

import httpx
import pytest

from server.e2e_support import MAX_MODEL_LEN, MAX_TOKENS, PROMPTS, References, shardline_executable
from server.helpers import assert_openai_error
from server.process import fake_serve_command, server_process
from shardline.engine import cli


@pytest.mark.parametrize("argv", [[], ["serve"], ["generate"], ["fetch"], ["bench"]])
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: shardline")
    if argv == ["serve"]:
        for flag in ("--model", "--host", "--port", "--tensor-parallel-size", "--pipeline-parallel-size",
                     "--data-parallel-size", "--transport", "--api-key", "--max-model-len", "--max-num-seqs",
                     "--max-num-batched-tokens", "--num-kv-blocks", "--served-model-name",
                     "--no-prefix-caching", "--device", "--http-header-timeout", "--http-body-timeout",
                     "--max-connections"):
            assert flag in out, flag


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["serve", "--tensor-parallel-size", "0"], "tensor_parallel_size"),
        (["serve", "--transport", "inproc", "--tensor-parallel-size", "2"], "transport"),
        (["generate", "hi", "--max-num-seqs", "0"], "max_num_seqs"),
    ],
)
def test_invalid_engine_config_exits_2_naming_the_field(
    argv: list[str], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    assert field in capsys.readouterr().err


def test_generate_sizes_its_engine_for_its_one_request() -> None:
    parse = cli._build_parser().parse_args
    assert cli._engine_config(parse(["generate", "hi"])).max_num_seqs == 1
    assert cli._engine_config(parse(["generate", "hi", "--max-num-seqs", "4"])).max_num_seqs == 4
    assert cli._engine_config(parse(["serve"])).max_num_seqs == 128
    assert cli._engine_config(parse(["serve", "--max-num-seqs", "8"])).max_num_seqs == 8


def test_bench_runs_the_named_script_with_its_arguments(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    record = tmp_path / "args.json"
    (tmp_path / "echo.py").write_text(
        "import json, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        "sys.exit(3)\n"
    )
    monkeypatch.setattr(cli, "BENCHMARKS_DIR", tmp_path)
    assert cli.main(["bench", "echo", "--requests", "4", "--json"]) == 3
    assert json.loads(record.read_text()) == ["--requests", "4", "--json"]
    assert cli.main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "echo" in err


def test_bench_without_a_name_asks_for_the_name_only(capsys: pytest.CaptureFixture[str]) -> None:
    """`shardline bench` alone: NAME is required, the script's arguments are not."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: NAME" in err, err
    assert "args" not in err.splitlines()[-1], err


def test_bench_name_alone_runs_the_script_without_arguments(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "args.json"
    (tmp_path / "echo.py").write_text(
        f"import json, sys\nopen({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    monkeypatch.setattr(cli, "BENCHMARKS_DIR", tmp_path)
    assert cli.main(["bench", "echo"]) == 0
    assert json.loads(record.read_text()) == []


def test_bench_help_lists_the_real_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    names = sorted(p.stem for p in cli.BENCHMARKS_DIR.glob("*.py") if not p.stem.startswith("_"))
    assert names, "benchmarks/ has scripts"
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in names)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_logs_start_up_serves_and_exits_0_on_signal(tmp_path: pathlib.Path, sig: int) -> None:
    with server_process(fake_serve_command("--served-model-name", "m", "--api-key", "k"), tmp_path) as server:
        server.wait_healthy(60)
        log = server.log()
        assert "KV cache 64 blocks" in log
        assert "tensor-parallel 1, pipeline-parallel 1, data-parallel 1" in log
        assert f"http://127.0.0.1:{server.port}" in log
        headers = {"Authorization": "Bearer k"}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert_openai_error(httpx.post(server.base_url + "/v1/chat/completions", json=body), 401)
        response = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
        assert server.stop(sig) == 0
        log = server.log()
        assert "shutting down the engine" in log
        assert "Traceback" not in log


def test_serve_exits_nonzero_when_the_engine_dies(tmp_path: pathlib.Path) -> None:
    with server_process(fake_serve_command(), tmp_path, env={"FAKE_DIE_AFTER_S": "1.5"}) as server:
        server.wait_healthy(60)
        assert server.proc.wait(timeout=60) == 1
        assert "the engine died" in server.log()


def test_serve_exits_nonzero_when_the_engine_cannot_start(tmp_path: pathlib.Path) -> None:
    with server_process(fake_serve_command(), tmp_path, env={"FAKE_START_FAIL": "1"}) as server:
        assert server.proc.wait(timeout=60) == 1
        assert "engine failed to start" in server.log()


@pytest.mark.slow
def test_generate_streams_the_engine_answer(references: References) -> None:
    prompt = PROMPTS[0]
    result = subprocess.run(
        [shardline_executable(), "generate", prompt, "--no-chat", "--max-tokens", str(MAX_TOKENS),
         "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == references.completions[prompt][0] + "\n"


@pytest.mark.slow
def test_fetch_prints_the_cached_model_directory() -> None:
    result = subprocess.run([shardline_executable(), "fetch"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    path = pathlib.Path(result.stdout.strip().splitlines()[-1])
    # The default model is its GGUF (no float32 copy), its tokenizer and generation config.
    assert list(path.glob("*.gguf")) and (path / "tokenizer.json").is_file()
    assert not (path / "model.safetensors").exists()
