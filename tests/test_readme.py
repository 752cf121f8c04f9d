"""The README's quick-start commands are the ones CI runs and the first ends in `shardline serve`;
its embedding example is a script that runs as written."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
import shlex
import subprocess
import sys
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


EMBEDDING_HEADING = "## Embedding the engine"


def readme_embedding_script() -> str:
    """The README's embedding example: the first ```python block after its heading."""
    text = (ROOT / "README.md").read_text()
    assert f"\n{EMBEDDING_HEADING}\n" in text, f"README.md has no {EMBEDDING_HEADING!r} section"
    section = text.split(f"\n{EMBEDDING_HEADING}\n", 1)[1]
    match = re.search(r"^```python\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    assert match is not None, f"no ```python block after {EMBEDDING_HEADING!r}"
    return match.group(1)


def test_readme_embedding_example_is_a_whole_script() -> None:
    """Imports, an `async def main()`, `asyncio.run(main())`; it streams `generate` and `chat`."""
    tree = ast.parse(readme_embedding_script())
    imports = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
               for alias in node.names}
    assert {"asyncio", "Engine", "EngineConfig", "SamplingParams"} <= imports
    assert any(isinstance(node, ast.AsyncFunctionDef) and node.name == "main" for node in tree.body)
    assert ast.unparse(tree.body[-1]) == "asyncio.run(main())"
    calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert {"engine.generate", "engine.chat"} <= calls


def test_readme_embedding_example_runs(tmp_path: pathlib.Path) -> None:
    """Run as written (`python embed.py`, no `__main__` guard): both parts print text."""
    script = tmp_path / "embed.py"
    script.write_text(readme_embedding_script())
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert "Completion:" in proc.stdout and "Chat:" in proc.stdout, proc.stdout
    completion = proc.stdout.split("Completion:", 1)[1].split("Chat:", 1)[0]
    chat = proc.stdout.split("Chat:", 1)[1]
    assert completion.strip(), f"the generate part printed nothing: {proc.stdout!r}"
    assert chat.strip(), f"the chat part printed nothing: {proc.stdout!r}"
