"""The README's quick-start commands are the ones CI runs and the first ends in `shardline serve`."""

from __future__ import annotations

import importlib.util
import pathlib
import shlex
from types import ModuleType

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_commands_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / "scripts" / "readme_commands.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_commands() -> dict[str, str]:
    return _readme_commands_module().readme_commands(ROOT / "README.md")  # type: ignore[no-any-return]


def serve_argv() -> list[str]:
    """The server part of the README's first command: its last `&&` step, as argv."""
    last_step = readme_commands()["serve"].split("&&")[-1]
    return shlex.split(last_step)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert "cmd=$(python3 scripts/readme_commands.py test)" in lines
    assert 'bash -c "$cmd"' in lines
    assert lines.index('bash -c "$cmd"') > lines.index("cmd=$(python3 scripts/readme_commands.py test)")


def test_readme_first_command_ends_by_starting_the_server() -> None:
    argv = serve_argv()
    assert pathlib.PurePath(argv[0]).name == "shardline", argv
    assert argv[1] == "serve", argv
    # It sets up the machine first: a virtualenv and an install of this project.
    setup = readme_commands()["serve"]
    assert "venv" in setup and "pip install" in setup


@pytest.mark.slow
def test_readme_serve_command_answers_a_chat_request(tmp_path: pathlib.Path) -> None:
    """The README's server command, against the installed venv, answers one chat request."""
    import openai

    from server.process import server_process

    argv = serve_argv()
    executable = ROOT / argv[0] if not pathlib.Path(argv[0]).is_absolute() else pathlib.Path(argv[0])
    if not executable.exists():
        pytest.fail(f"{argv[0]} is not installed; run the README's first command's setup steps first")
    with server_process([str(executable), *argv[1:], "--max-model-len", "512"], tmp_path) as server:
        server.wait_healthy(600)
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
        [model] = client.models.list().data
        reply = client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0
        )
        assert reply.choices[0].message.content
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 16
        assert server.stop() == 0
